"""Entry points that make ``neurosal train --device NAME`` and ``neurosal sweep`` work."""

from __future__ import annotations

from .analog import convert
from .presets import device_names, get_device


class AnalogSubstrate:
    """The analog substrate: device presets by name, or a preset file (``fit-device``'s device.json)."""

    @staticmethod
    def names() -> list[str]:
        return device_names()

    @staticmethod
    def accepts(name: str) -> bool:
        return name in device_names() or name.endswith(".json")

    @staticmethod
    def apply(net, name: str, options: dict, seed: int):
        return convert(net, get_device(name, **options), seed)


SUBSTRATE = AnalogSubstrate()


def add_commands(subparsers) -> None:
    from . import brian, fit, sweep

    sweep.add_parser(subparsers)
    fit.add_parser(subparsers)
    brian.add_parser(subparsers)
    p = subparsers.add_parser("snn-plot", help="spike raster and membrane traces of a trained spiking run")
    p.add_argument("run", help="run folder (or checkpoint) of an snn:... model")
    p.add_argument("--sample", type=int, default=0, help="which test sample (0-based)")
    p.add_argument("--out", default=None, help="PNG path (default: RUN/activity.png)")
    p.set_defaults(func=_cmd_snn_plot)


def _cmd_snn_plot(args) -> int:
    from pathlib import Path

    from neurosal.checkpoint import ensure_writable_dir
    from neurosal.data import load_dataset
    from neurosal.errors import NeurosalError
    from neurosal.train import load_run

    from .snn import plot_activity

    net, _, cfg, _ = load_run(args.run)
    if not cfg.model.startswith("snn"):
        raise NeurosalError(f"{args.run} holds a {cfg.model!r} model, not a spiking one")
    ds = load_dataset(cfg.data, cfg.data_root, label_column=cfg.label_column, gray=cfg.grayscale)
    if not 0 <= args.sample < len(ds.x_test):
        raise NeurosalError(f"--sample {args.sample} is out of range: the test set has {len(ds.x_test)} samples")
    run_dir = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent
    out = Path(args.out) if args.out else run_dir / "activity.png"
    ensure_writable_dir(out.parent)
    plot_activity(net, ds.x_test, out, sample=args.sample)
    print(f"wrote {out}")
    return 0
