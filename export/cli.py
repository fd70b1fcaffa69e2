"""``neurosal export RUN --onnx model.onnx [--int8 q.onnx] [--nir model.nir]``: export and verify."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from neurosal.checkpoint import atomic_write_text, ensure_writable_dir
from neurosal.cli import positive_int
from neurosal.errors import NeurosalError

MIN_OPSET, MAX_OPSET = 13, 23  # what torch.onnx's exporter and our verification cover


def graph_inputs(net, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Inputs in the form the exported graph takes (spiking models: encoded spike trains)."""
    from .onnx_export import kind_of

    if not kind_of(net).spiking:
        return x
    torch.manual_seed(seed)
    with torch.no_grad():
        return net.stem(x)


def cmd_export(args) -> int:
    from neurosal.data import load_dataset
    from neurosal.train import context_for, load_run

    from .extras import accuracy_onnx, export_nir, quantize_int8
    from .onnx_export import export_onnx, kind_of, verify

    if args.int8 and not args.onnx:
        raise NeurosalError("--int8 quantises the ONNX model: give --onnx PATH too")
    if not (args.onnx or args.nir):
        raise NeurosalError("nothing to do: give --onnx PATH and/or --nir PATH")
    if not (args.tol >= 0 and math.isfinite(args.tol)):
        raise NeurosalError(f"--tol must be a finite number >= 0, got {args.tol}")
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise NeurosalError(f"--opset {args.opset} is not supported: use {MIN_OPSET}..{MAX_OPSET}")
    for path in (args.onnx, args.int8, args.nir, args.report):
        if path:
            ensure_writable_dir(Path(path).parent)

    net, _, cfg, st = load_run(args.run)
    ds = load_dataset(cfg.data, cfg.data_root, label_column=cfg.label_column, context=context_for(cfg),
                      gray=cfg.grayscale)
    x, y = graph_inputs(net, ds.x_test[:args.samples]), ds.y_test[:args.samples]
    report = {"run": str(args.run), "model": cfg.model, "rule": cfg.rule, "kind": kind_of(net).name,
              "classes": st.get("classes")}
    if args.onnx:
        export_onnx(net, x[:2], args.onnx, opset=args.opset, sal_mode=args.sal_mode,
                    metadata={"neurosal.rule": cfg.rule, "neurosal.model": cfg.model,
                              "neurosal.classes": json.dumps(st.get("classes"))})
        rep = verify(net, args.onnx, x, args.tol)
        report["onnx"] = {"path": str(args.onnx), "opset": args.opset, **rep}
        print(f"{args.onnx}: onnx.checker ok; onnxruntime vs torch on {rep['samples']} held-out inputs: "
              f"max abs diff {rep['max_abs_diff']:.3g} (tolerance {args.tol:g}), argmax agreement "
              f"{100 * rep['argmax_agreement']:.1f}%")
        if rep.get("quantised") and rep["samples_beyond_tol"] > 0:
            print(f"  analog converters: {100 * rep['samples_beyond_tol']:.1f}% of the samples differ by DAC/ADC "
                  f"codes one apart (torch and onnxruntime round a boundary value apart); the median sample "
                  f"differs by {rep['median_abs_diff']:.3g}")
        if args.int8:  # calibrated on training inputs, evaluated on the held-out ones
            calib = graph_inputs(net, ds.x_train[:args.samples], seed=1).numpy()
            quantize_int8(args.onnx, args.int8, calib)
            acc_f, acc_q = accuracy_onnx(args.onnx, x, y), accuracy_onnx(args.int8, x, y)
            report["int8"] = {"path": str(args.int8), "accuracy_fp32": acc_f, "accuracy_int8": acc_q,
                              "change_points": 100 * (acc_q - acc_f)}
            print(f"{args.int8}: int8 accuracy {100 * acc_q:.2f}% vs fp32 {100 * acc_f:.2f}% "
                  f"({100 * (acc_q - acc_f):+.2f} points) on {len(x)} held-out samples")
    if args.nir:
        export_nir(net, args.nir)
        report["nir"] = {"path": str(args.nir)}
        print(f"{args.nir}: NIR graph written")
    if args.report:
        atomic_write_text(Path(args.report), json.dumps(report, indent=2))
    if args.onnx and not report["onnx"]["ok"]:
        worst = report["onnx"].get("median_abs_diff", report["onnx"]["max_abs_diff"])
        print(f"error: exported model differs from torch by {worst:.3g} > {args.tol:g}"
              f"{' (median sample)' if 'median_abs_diff' in report['onnx'] else ''}")
        return 1
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a trained run to ONNX (verified in onnxruntime) / NIR")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--onnx", default=None, help="ONNX output path")
    p.add_argument("--int8", default=None, help="also write a static int8 quantised ONNX here")
    p.add_argument("--nir", default=None, help="NIR output path (spiking models)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--sal-mode", default="gather", choices=["gather", "dense"],
                   help="SAL areas: gather the chosen weights (small batches) or compute all, then select")
    p.add_argument("--tol", type=float, default=1e-5, help="max abs difference allowed vs torch")
    p.add_argument("--samples", type=positive_int, default=256, help="held-out inputs used to verify")
    p.add_argument("--report", default=None, help="write the verification report as JSON")
    p.set_defaults(func=cmd_export)
