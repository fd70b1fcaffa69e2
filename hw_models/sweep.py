"""The device report: test accuracy vs number of levels, vs nonlinearity, vs device variation, for a
set of rules, next to the float baseline -- as CSV and plots.

    neurosal sweep --rules bp,dfa,sal --data digits --model mlp:128x128 --epochs 15 --out runs/sweep

Each axis changes one parameter of a base device (``--device``, default ``linear-256``):
``levels`` (N), ``nonlinearity`` (the Lim model with nl_p = nl_d = value; ``inf`` = linear) and
``variation`` (device-to-device step spread, with cycle-to-cycle noise of half that).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from neurosal.cli import positive_int
from neurosal.data import load_dataset
from neurosal.errors import NeurosalError
from neurosal.report import save_figure, write_csv
from neurosal.train import TrainConfig, Trainer

from .presets import get_device

AXES = {
    "levels": [8, 16, 32, 64, 256],
    "nonlinearity": [math.inf, 1.0, 0.3, 0.1, 0.03],
    "variation": [0.0, 0.3, 0.6, 1.0],
}


def device_overrides(axis: str, value: float) -> dict:
    if axis == "levels":
        return {"levels": int(value)}
    if axis == "nonlinearity":
        return {"model": "linear"} if math.isinf(value) else {"model": "lim", "nl_p": value, "nl_d": value}
    if axis == "variation":
        return {"dtod_step": value, "ctoc": value / 2}
    raise NeurosalError(f"unknown sweep axis {axis!r}; known: {', '.join(AXES)}")


def run_sweep(rules, data: str, model: str, epochs: int, base_device: str = "linear-256",
              axes: dict | None = None, seed: int = 0, batch_size: int = 32, lr: float = 1e-3,
              extra_device: dict | None = None, progress: bool = False, dataset=None) -> list[dict]:
    axes = axes or AXES
    ds = dataset if dataset is not None else load_dataset(data)
    get_device(base_device)  # fail early on an unknown device
    rows = []

    def train(rule, device, options):
        cfg = TrainConfig(rule=rule, model=model, data=data, epochs=epochs, batch_size=batch_size, lr=lr,
                          seed=seed, device=device, device_options=options, progress=False)
        return Trainer(cfg, None, dataset=ds).fit()["epochs"][-1]["test_acc"]

    for rule in rules:
        base = train(rule, None, {})
        rows.append({"rule": rule, "axis": "float", "value": "", "test_acc": base})
        if progress:
            print(f"{rule:5s} float: {100 * base:.2f}%", flush=True)
        for axis, values in axes.items():
            for v in values:
                opts = {**(extra_device or {}), **device_overrides(axis, v)}
                acc = train(rule, base_device, opts)
                rows.append({"rule": rule, "axis": axis, "value": v, "test_acc": acc})
                if progress:
                    print(f"{rule:5s} {axis}={v}: {100 * acc:.2f}%", flush=True)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = [a for a in AXES if any(r["axis"] == a for r in rows)]
    fig, subs = plt.subplots(1, len(axes), figsize=(4.5 * len(axes), 3.6), squeeze=False)
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    for ax, axis in zip(subs[0], axes):
        for i, rule in enumerate(rules):
            pts = [r for r in rows if r["rule"] == rule and r["axis"] == axis]
            xs = [str(r["value"]) for r in pts]
            line, = ax.plot(xs, [100 * r["test_acc"] for r in pts], marker="o", label=rule)
            base = next(r["test_acc"] for r in rows if r["rule"] == rule and r["axis"] == "float")
            ax.axhline(100 * base, ls="--", color=line.get_color(), alpha=0.6)
        ax.set(title=f"accuracy vs {axis}", xlabel=axis, ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    subs[0][0].legend(title="rule (dashed: float)")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def parse_axes(text: str | None) -> dict:
    """``"levels=8,256;nonlinearity=inf,0.03"`` -> {"levels": [8, 256], "nonlinearity": [inf, 0.03]}."""
    if not text:
        return dict(AXES)
    axes = {}
    for part in text.split(";"):
        name, _, values = part.partition("=")
        name = name.strip()
        if name not in AXES:
            raise NeurosalError(f"unknown sweep axis {name!r}; known: {', '.join(AXES)}")
        try:
            axes[name] = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise NeurosalError(f"cannot parse values of sweep axis {name!r}: {values!r}") from None
        if not axes[name]:
            raise NeurosalError(f"sweep axis {name!r} has no values")
    return axes


def cmd_sweep(args) -> int:
    from neurosal.checkpoint import atomic_write_text, ensure_writable_dir
    from neurosal.rules import make_rule, parse_options

    rules = [r for r in args.rules.split(",") if r]
    if not rules:
        raise NeurosalError("--rules is empty")
    for rule in rules:
        make_rule(rule)  # unknown names fail before anything trains
    axes, extra = parse_axes(args.axes), parse_options(args.device_options)
    for axis, values in axes.items():
        for v in values:
            get_device(args.device, **{**extra, **device_overrides(axis, v)})  # every device of the sweep
    TrainConfig(model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr).validate()
    out = ensure_writable_dir(Path(args.out))
    rows = run_sweep(rules, args.data, args.model, args.epochs, args.device, axes=axes, seed=args.seed,
                     batch_size=args.batch_size, lr=args.lr, extra_device=extra, progress=True)
    write_csv(out / "sweep.csv", rows)
    atomic_write_text(out / "sweep.json", json.dumps(rows, indent=2, default=str))
    plot(rows, out / "sweep.png", f"{args.data} | {args.model} | base device {args.device}")
    print(f"wrote {out / 'sweep.csv'}, {out / 'sweep.png'}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="device report: accuracy vs levels, nonlinearity, variation")
    p.add_argument("--rules", default="bp,dfa,sal")
    p.add_argument("--data", default="digits")
    p.add_argument("--model", default="mlp:128x128")
    p.add_argument("--epochs", type=positive_int, default=15)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="linear-256", help="base device preset the axes modify")
    p.add_argument("--device-options", default=None, help="fixed overrides of the base device")
    p.add_argument("--axes", default=None,
                   help="axes and values, e.g. 'levels=8,256;nonlinearity=inf,0.03' (default: all)")
    p.add_argument("--out", default="runs/sweep")
    p.set_defaults(func=cmd_sweep)
