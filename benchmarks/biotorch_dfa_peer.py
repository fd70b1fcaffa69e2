"""DFA on BioTorch's LeNet with plain SGD: BioTorch's own DFA and ours, same data, init and recipe.

Our reproduction of BioTorch's Fashion-MNIST table (``biotorch_repro.py``) could not run DFA at the
short schedule's learning rates: it diverged at 1e-2. This runs BioTorch's DFA (``BioModule(...,
mode="dfa")``, their Xavier feedback init, their error broadcast at each layer's input) beside
``neurosal.wrap(..., "dfa")`` on the same LeNet-MNIST, the same 32x32 normalised images, SGD momentum
0.9 and weight decay 1e-4, batch 128, the same batch order per seed, and records the test error per
epoch and the weight norms at the end. BioTorch must be importable (benchmark environment only:
``pip install --no-deps biotorch==0.0.16``, or ``PYTHONPATH`` at an unpacked copy); never a dependency.

    PYTHONPATH=/path/to/biotorch python benchmarks/biotorch_dfa_peer.py --out benchmarks/reports/biotorch
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import neurosal  # noqa: E402
from biotorch_repro import LeNetMNIST, data, error  # noqa: E402


def run(kind: str, lr: float, seed: int, d, epochs: int, options: dict | None = None) -> dict:
    xtr, ytr, xte, yte = d
    torch.manual_seed(seed)
    if kind == "biotorch":
        from biotorch.module.biomodule import BioModule

        config = {"type": "dfa", "options": {"init": "xavier", "constrain_weights": False, "gradient_clip": False}}
        model = BioModule(LeNetMNIST(), mode="dfa", output_dim=10, layer_config=config)
    else:
        model = neurosal.wrap(LeNetMNIST(), "dfa", seed=seed, **(options or {}))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                          weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    errors = []
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xtr), generator=g).split(128):
            opt.zero_grad(set_to_none=True)
            if kind == "biotorch":
                out = model(xtr[idx], targets=ytr[idx], loss_function=F.cross_entropy)
            else:
                out = model(xtr[idx])
                model.set_target(ytr[idx])
            F.cross_entropy(out, ytr[idx]).backward()
            opt.step()
        errors.append(error(model, xte, yte))
    norms = [float(p.detach().norm()) for n, p in model.named_parameters()
             if n.endswith("weight") and "backward" not in n]
    return {"errors": errors, "weight_norms": norms, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lrs", default="0.01,0.001,0.0001")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--limit", type=int, default=10000, help="first N training images")
    ap.add_argument("--options", default="", help="our DFA's rule options, e.g. positions=flatten")
    ap.add_argument("--impls", default="biotorch,neurosal")
    ap.add_argument("--out", default="benchmarks/reports/biotorch")
    ap.add_argument("--name", default="dfa_peer", help="file name of the .json/.md written under --out")
    args = ap.parse_args(argv)
    from neurosal.rules import parse_options

    options = parse_options(args.options)
    impls = args.impls.split(",")
    try:
        if "biotorch" in impls:
            import biotorch.module.biomodule  # noqa: F401
    except ImportError as exc:
        print(f"error: BioTorch is not importable ({exc}); install it in the benchmark environment", file=sys.stderr)
        return 2
    d = data(32, args.limit)
    rows = []
    for lr in (float(v) for v in args.lrs.split(",")):
        for kind in impls:
            runs = [run(kind, lr, s, d, args.epochs, options) for s in range(args.seeds)]
            rows.append({"impl": kind, "lr": lr, "runs": runs})
            print(f"lr {lr:g} {kind:8s} " + " | ".join(
                f"errors {', '.join(f'{e:.1f}' for e in r['errors'])}; top norm {r['weight_norms'][-1]:.3g}"
                for r in runs), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "name")}
    (out / f"{args.name}.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    lines = ["# DFA on LeNet with plain SGD: BioTorch's implementation and ours", "",
             f"`benchmarks/biotorch_dfa_peer.py`: first {args.limit} Fashion-MNIST images at 32x32, LeNet-MNIST, "
             f"SGD momentum 0.9, wd 1e-4, batch 128, constant rate, {args.epochs} epochs, seeds 0-{args.seeds - 1} "
             "(same init and batch order for both). Test error (%) after each epoch; norms of the five weight "
             "matrices (conv1, conv2, conv3, fc1, fc2) at the end (Xavier start: about 1.3, 3.0, 5.4, 9.9, 4.1). "
             f"Our DFA's options: {args.options or 'defaults'}.", "",
             "| lr | implementation | seed | test error per epoch | weight norms at the end |", "|---|---|---|---|---|"]
    for r in rows:
        for s, run_ in enumerate(r["runs"]):
            errs = ", ".join(f"{e:.1f}" for e in run_["errors"])
            norms = ", ".join("nan" if not math.isfinite(v) else f"{v:.3g}" for v in run_["weight_norms"])
            lines.append(f"| {r['lr']:g} | {r['impl']} | {s} | {errs} | {norms} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / args.name}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
