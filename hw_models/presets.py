"""Named device presets, all in one place. ``get_device("rram-like", levels=32)`` overrides fields.

The numbers are representative, not fitted to one chip: ranges follow the device classes aihwkit's
presets and Lim et al. describe (RRAM: tens to a few hundred levels, asymmetric nonlinear steps,
noticeable device-to-device spread; PCM: gradual potentiation, abrupt depression, drift).
"""

from __future__ import annotations

import json
from pathlib import Path

from neurosal.errors import NeurosalError, first_line

from .devices import DeviceConfig

PRESETS: dict[str, DeviceConfig] = {
    # float-like: a linear device with a million levels and no noise
    "ideal": DeviceConfig(model="linear", levels=1_000_000),
    # a clean linear device with finite resolution
    "linear-256": DeviceConfig(model="linear", levels=256),
    # RRAM-like: ~100 levels, asymmetric nonlinear steps, variation, 8-bit periphery
    "rram-like": DeviceConfig(model="lim", levels=100, nl_p=0.5, nl_d=0.25, dtod_step=0.1,
                              dtod_bounds=0.05, ctoc=0.2, read_noise=0.005, dac_bits=8, adc_bits=8),
    # PCM-like: gradual potentiation, abrupt depression -> used unidirectionally, with drift
    "pcm-like": DeviceConfig(model="lim", levels=200, nl_p=0.6, nl_d=0.05, dtod_step=0.15, ctoc=0.3,
                             read_noise=0.01, dac_bits=8, adc_bits=8, update="unidirectional",
                             drift_nu=0.05, drift_nu_dtod=0.2),
    # Lim et al.'s setting: a finite, asymmetric nonlinear synapse, updated unidirectionally
    "lim-unidirectional": DeviceConfig(model="lim", levels=64, nl_p=0.3, nl_d=0.1, update="unidirectional"),
    # aihwkit-style soft-bounds and power-step devices
    "softbounds": DeviceConfig(model="softbounds", levels=200, dtod_step=0.1, ctoc=0.1),
    "powstep": DeviceConfig(model="pow", levels=200, gamma=1.5, dtod_step=0.1, ctoc=0.1),
}


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
