"""fit-device: curves generated from known devices are recovered; the CLI writes a usable preset."""

import json

import numpy as np
import pytest

from hw_models.devices import DeviceConfig
from hw_models.fit import fit_device, read_curves, simulate_curves, write_curves
from neurosal.cli import main

NOISE_FREE = [
    DeviceConfig(model="linear", levels=50),
    DeviceConfig(model="softbounds", levels=80),
    DeviceConfig(model="lim", levels=60, nl_p=0.5, nl_d=0.25),
    DeviceConfig(model="pow", levels=100, gamma=1.5),
]


@pytest.mark.parametrize("cfg", NOISE_FREE, ids=[c.model for c in NOISE_FREE])
def test_noise_free_curves_give_back_their_model_and_parameters(cfg):
    """Stated error: 2% on every parameter of a noise-free device (the one-pulse maps are exact for
    linear/soft-bounds/Lim, first order in 1/N for the power step)."""
    rep = fit_device(simulate_curves(cfg, devices=2, cycles=2, seed=0), bootstrap=10)
    assert rep.chosen.model == cfg.model
    for key in ("levels", "nl_p", "nl_d", "gamma"):
        if key in rep.chosen.params:
            assert rep.chosen.params[key] == pytest.approx(getattr(cfg, key), rel=0.02), key
    assert rep.preset()["ctoc"] < 0.02


@pytest.mark.parametrize("cfg", [
    DeviceConfig(model="linear", levels=50, ctoc=0.2, dtod_step=0.2),
    DeviceConfig(model="softbounds", levels=80, ctoc=0.2, dtod_step=0.2),
    DeviceConfig(model="lim", levels=60, nl_p=0.5, nl_d=0.25, ctoc=0.1, dtod_step=0.2, dtod_bounds=0.02),
], ids=["linear", "softbounds", "lim"])
@pytest.mark.parametrize("seed", [1, 2])
def test_noisy_devices_recover_noise_spread_and_levels(cfg, seed):
    """Stated errors for 8 noisy devices x 3 cycles: cycle-to-cycle noise within 10%, the device-to-device
    step spread within 0.04 of the drawn devices' own spread, levels within 15%, Lim's nl within 25%."""
    curves = simulate_curves(cfg, devices=8, cycles=3, seed=seed)
    scale = np.array([c.truth["step_scale"] for c in curves])
    rep = fit_device(curves, bootstrap=30)
    preset = rep.preset()
    assert rep.chosen.model == cfg.model
    assert preset["ctoc"] == pytest.approx(cfg.ctoc, rel=0.10)
    assert abs(preset["dtod_step"] - scale.std() / scale.mean()) < 0.04
    assert preset["levels"] == pytest.approx(cfg.levels, rel=0.15)
    for key in ("nl_p", "nl_d"):
        if key in preset:
            assert preset[key] == pytest.approx(getattr(cfg, key), rel=0.25)
    assert all(v >= 0 for v in rep.uncertainty.values()) and "levels" in rep.uncertainty


def test_cli_writes_a_preset_that_trains(tmp_path, capsys):
    data = tmp_path / "meas.csv"
    write_curves(simulate_curves(DeviceConfig(model="lim", levels=40, nl_p=0.4, nl_d=0.2, ctoc=0.05), devices=3,
                                 cycles=2, seed=4), data)
    assert main(["fit-device", str(data), "--out", str(tmp_path / "fit"), "--bootstrap", "20"]) == 0
    out = capsys.readouterr().out
    assert "model: lim" in out and "nl_p" in out
    preset = json.loads((tmp_path / "fit" / "device.json").read_text())
    assert preset["model"] == "lim" and preset["levels"] == pytest.approx(40, rel=0.15)
    assert (tmp_path / "fit" / "fit.png").stat().st_size > 5000
    report = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert set(report["held_out_rmse"]) == {"linear", "softbounds", "lim", "pow"}
    run = tmp_path / "run"
    assert main(["train", "--rule", "dfa", "--model", "mlp:16", "--epochs", "1", "--limit", "300",
                 "--device", str(tmp_path / "fit" / "device.json"), "--out", str(run), "--no-progress"]) == 0


def test_directions_are_inferred_when_the_file_has_none(tmp_path):
    curves = simulate_curves(DeviceConfig(model="softbounds", levels=30), devices=1, cycles=2, seed=0)
    path = tmp_path / "m.csv"
    path.write_text("pulse,conductance\n" + "".join(f"{i},{g}\n" for i, g in enumerate(curves[0].g)))
    inferred = read_curves(path)[0].direction[1:]
    agree = np.mean(inferred == curves[0].direction[1:])
    assert agree > 0.9  # only the turning points and the saturated tails can be ambiguous


@pytest.mark.parametrize("text,message", [
    ("pulse,current\n1,2\n", "'conductance' column"),
    ("conductance\n", "no measurements"),
    ("conductance\n" + "0.1\n" * 3, "at least 8"),
    ("conductance,direction\n" + "".join(f"{i / 10},sideways\n" for i in range(10)), "neither up nor down"),
    ("conductance\n" + "".join(f"{v}\n" for v in ["0.1", "x"] * 5), "not a number"),
])
def test_bad_measurement_files_are_clear_errors(tmp_path, capsys, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    assert main(["fit-device", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
