"""The ADC's full scale (``adc_range``) against what the arrays actually read: read error per layer and the
accuracy of analog training, for an MLP and a small conv net with BatchNorm on Fashion-MNIST.

The ADC of a preset with converters maps ``[-adc_range * w_max * sqrt(fan_in), +...]`` of the abs-max
scaled product onto ``2^(adc_bits-1) - 1`` codes per side. Too wide a range leaves the typical output a
code or two (a large read error, many reads of exactly 0); too narrow a range clips. Two measurements:

* ``read``: a float-trained model (Adam, 3 epochs) converted with ideal devices and 8-bit DAC / ADC; per
  analog layer, the relative error of the read against the float product and its share of zero reads,
  plus test accuracy;
* ``train``: the rram-like preset with only ``adc_range`` changed, trained from scratch (SGD lr 0.05,
  batch 32, 3 epochs on the first 4000 images), test accuracy per seed.

    python benchmarks/adc_calibration.py --out benchmarks/reports/analog
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hw_models.analog import attach, convert  # noqa: E402
from hw_models.devices import DeviceConfig  # noqa: E402
from hw_models.presets import get_device  # noqa: E402
from neurosal.bench import machine_info  # noqa: E402
from neurosal.data import load_dataset  # noqa: E402


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def cnn():
    layers, c = [nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()], 16
    for i in range(4):
        layers += [nn.Conv2d(c, 32, 3, padding=1, stride=2 if i % 2 == 0 else 1), nn.BatchNorm2d(32), nn.ReLU()]
        c = 32
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


MODELS = {"mlp": mlp, "cnn": cnn}


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def read_errors(model, x) -> list[dict]:
    """Per analog layer: relative error of its read against the float product, share of zero reads."""
    rows = []

    def hook(mod, i, o):
        exact = (F.linear(i[0], mod.weight) if isinstance(mod, nn.Linear)
                 else F.conv2d(i[0], mod.weight, None, mod.stride, mod.padding, mod.dilation, mod.groups))
        read = o - (mod.bias if isinstance(mod, nn.Linear) else mod.bias.view(1, -1, 1, 1))
        rows.append({"rel_err": float((read - exact).norm() / exact.norm()), "zero": float((read == 0).float().mean())})
    hooks = [m.register_forward_hook(hook) for m in model.modules() if hasattr(m, "tiles")]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranges", default="4,2,1,0.5,0.25")
    ap.add_argument("--train-ranges", default="4,1,0.5")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/reports/analog")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    d = load_dataset("fashion-mnist", limit=4000)
    x, y = d.x_train.float().view(-1, 1, 28, 28), d.y_train
    xt, yt = d.x_test.float().view(-1, 1, 28, 28)[:2000], d.y_test[:2000]
    result = {"machine": machine_info(torch.device("cpu")), "read": {}, "train": {}}
    for name, make in MODELS.items():
        torch.manual_seed(0)
        m = make()
        opt = torch.optim.Adam(m.parameters(), 2e-3)
        for _ in range(3):
            m.train()
            for i in range(0, 2000, 64):
                opt.zero_grad()
                F.cross_entropy(m(x[i:i + 64]), y[i:i + 64]).backward()
                opt.step()
        result["read"][name] = {"float_acc": accuracy(m, xt, yt)}
        for r in [float(v) for v in args.ranges.split(",")]:
            a = convert(copy.deepcopy(m), DeviceConfig(levels=1_000_000, dac_bits=8, adc_bits=8, adc_range=r))
            result["read"][name][str(r)] = {"layers": read_errors(a, xt[:500]), "acc": accuracy(a, xt, yt)}
            print(name, "read", r, result["read"][name][str(r)], flush=True)
        result["train"][name] = {}
        for r in [float(v) for v in args.train_ranges.split(",")]:
            accs = []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                a = convert(make(), get_device("rram-like", adc_range=r))
                opt = torch.optim.SGD(a.parameters(), 0.05)
                attach(opt, a)
                for _ in range(3):
                    a.train()
                    for i in range(0, len(x), 32):
                        opt.zero_grad()
                        F.cross_entropy(a(x[i:i + 32]), y[i:i + 32]).backward()
                        opt.step()
                accs.append(accuracy(a, xt, yt))
            result["train"][name][str(r)] = accs
            print(name, "train", r, accs, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adc_calibration.json").write_text(json.dumps(result, indent=1))
    lines = ["# ADC full scale (`adc_range`) against what the arrays read", "",
             "`benchmarks/adc_calibration.py` (docstring: the setup). Read: float-trained models converted with "
             "8-bit DAC/ADC and ideal devices; per analog layer relative read error / share of exact-zero "
             "reads. Train: rram-like with only adc_range changed, from scratch, test accuracy (%) per seed.", ""]
    for name in MODELS:
        rd = result["read"][name]
        lines += [f"## {name} (float-trained test accuracy {100 * rd['float_acc']:.1f}%)", "",
                  "| adc_range | per-layer read error / zero share | accuracy |", "|---|---|---|"]
        for r in [k for k in rd if k != "float_acc"]:
            cells = " ".join(f"{v['rel_err']:.3f}/{v['zero']:.2f}" for v in rd[r]["layers"])
            lines.append(f"| {r} | {cells} | {100 * rd[r]['acc']:.1f} |")
        lines += ["", "| adc_range | rram-like training, per seed | mean |", "|---|---|---|"]
        for r, accs in result["train"][name].items():
            lines.append(f"| {r} | {' / '.join(f'{100 * a:.1f}' for a in accs)} | {100 * statistics.mean(accs):.1f} |")
        lines.append("")
    (out / "adc_calibration.md").write_text("\n".join(lines))
    print(f"wrote {out / 'adc_calibration.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
