"""Named device presets, all in one place. ``get_device("rram-like", levels=32)`` overrides fields.

Each preset's source -- the device class, the paper or peer preset its numbers follow, what is measured
and what is representative -- is in :data:`SOURCES` (``describe(name)``). A fitted device from
``neurosal fit-device`` is a JSON file of the same fields: ``get_device("path/device.json")``.
"""

from __future__ import annotations

import json
from pathlib import Path

from neurosal.errors import NeurosalError, first_line

from .devices import DeviceConfig

PRESETS: dict[str, DeviceConfig] = {
    "ideal": DeviceConfig(model="linear", levels=1_000_000),
    "linear-256": DeviceConfig(model="linear", levels=256),
    "rram-like": DeviceConfig(model="lim", levels=100, nl_p=0.5, nl_d=0.25, dtod_step=0.1,
                              dtod_bounds=0.05, ctoc=0.2, read_noise=0.005, dac_bits=8, adc_bits=8),
    "pcm-like": DeviceConfig(model="lim", levels=200, nl_p=0.6, nl_d=0.05, dtod_step=0.15, ctoc=0.3,
                             read_noise=0.01, dac_bits=8, adc_bits=8, update="unidirectional",
                             drift_nu=0.05, drift_nu_dtod=0.2),
    "lim-unidirectional": DeviceConfig(model="lim", levels=64, nl_p=0.3, nl_d=0.1, update="unidirectional"),
    "softbounds": DeviceConfig(model="softbounds", levels=200, dtod_step=0.1, ctoc=0.1),
    "powstep": DeviceConfig(model="pow", levels=200, gamma=1.5, dtod_step=0.1, ctoc=0.1),
}

#: Where each preset's numbers come from. None is a fit to one chip: each is a representative member of
#: its device class, with values inside the ranges the cited work reports. Fit your own device with
#: ``neurosal fit-device`` and use the file it writes (``--device device.json``).
SOURCES: dict[str, str] = {
    "ideal": "Reference, not a device: a linear device with 10^6 levels and no noise, so analog training "
             "must reproduce float training (aihwkit's FloatingPointDevice plays this role).",
    "linear-256": "An 8-bit linear synapse: constant steps, no noise (aihwkit's ConstantStepDevice with "
                  "dw_min = w_max/256). Electrochemical RAM reaches hundreds to over a thousand near-linear, "
                  "symmetric states (Fuller et al., Adv. Mater. 2017; Tang et al., IEDM 2018).",
    "rram-like": "Filamentary/oxide RRAM class: ~100 levels, asymmetric exponential steps (depression more "
                 "abrupt: nl_d < nl_p), ~10% device-to-device step spread, cycle-to-cycle noise of a "
                 "fraction of a step, 8-bit converters (DAC scaled per read vector as aihwkit's noise "
                 "management; ADC full scale adc_range = 1, chosen by measured read error: "
                 "benchmarks/reports/analog/adc_calibration.md). Step law: Lim et al., Neural Comput. Appl. 2019 "
                 "(exponential pulse response); noise and asymmetry magnitudes in the range aihwkit's "
                 "ReRamES preset fits to measured RRAM (Gong et al., Nat. Commun. 9, 2102, 2018).",
    "pcm-like": "Phase-change memory class: gradual SET (potentiation) and abrupt RESET (depression, nl_d "
                "= 0.05), so it is used unidirectionally on a G+ - G- pair with refresh, as in Burr et al., "
                "IEEE TED 62(11) 2015; conductance drift G ~ t^-nu with nu ~ 0.05 and device spread, as "
                "reported for PCM (Le Gallo et al., Nature Commun. 2018; aihwkit's PCM presets, Nandakumar "
                "et al., Front. Neurosci. 2020).",
    "lim-unidirectional": "Lim et al., Neural Comput. Appl. 2019: finite, asymmetric nonlinear synapse "
                          "(64 levels, nl_p 0.3 / nl_d 0.1) trained with their unidirectional update and "
                          "reset-and-reprogram refresh.",
    "softbounds": "aihwkit's SoftBounds law (step shrinks linearly towards the bound it approaches), 200 "
                  "levels, 10% device-to-device and cycle-to-cycle spread: a generic bounded analog "
                  "synapse as in Gokmen & Vlasov, Front. Neurosci. 2016 (the RPU device analysis).",
    "powstep": "aihwkit's PowStep law (dG/dp proportional to the remaining range to the power gamma = 1.5): "
               "the state dependence between soft bounds (gamma = 1) and stronger saturation, 200 levels.",
}


def describe(name: str) -> str:
    """The source note of a preset."""
    return SOURCES[name]


def device_names() -> list[str]:
    return sorted(PRESETS)


def get_device(name: str, **overrides) -> DeviceConfig:
    """A preset by name, or a preset file (JSON of DeviceConfig fields, e.g. from ``fit-device``)."""
    if name.endswith(".json"):
        return load_preset_file(name).replace(**overrides)
    if name not in PRESETS:
        raise NeurosalError(f"unknown device {name!r}; known: {', '.join(device_names())}, or a preset .json file")
    return PRESETS[name].replace(**overrides)


def load_preset_file(path: str | Path) -> DeviceConfig:
    """A device from JSON (plain data, never code): DeviceConfig fields; ``source``/``fit`` notes ignored."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise NeurosalError(f"device file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NeurosalError(f"cannot read device file {path}: {first_line(exc)}") from exc
    if not isinstance(data, dict):
        raise NeurosalError(f"device file {path} must hold a JSON object of device settings")
    data = {k: v for k, v in data.items() if k not in ("source", "fit", "notes")}
    return DeviceConfig().replace(**data)
