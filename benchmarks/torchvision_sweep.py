"""torchvision's model zoo through every rule, the analog substrate and the ONNX exporter: what users
bring, checked the way the tests check neurosal's own models.

Per model (untrained weights, a zero-initialised head given a random one; small inputs so the sweep runs
on a CPU):

* ``points``: the feedback points the direct rules find (one per residual / transformer block);
* ``fa_exact``: fa with B = W against autograd in float64, the largest relative gradient difference over
  every parameter (dropout and stochastic depth set to 0 so both passes compute the same function);
* ``dfa`` / ``drtp`` / ``sal``: one SGD step through ``neurosal.wrap``: the loss, and the share of
  parameters whose gradient is finite and nonzero;
* ``analog``: ``hw_models.convert(model, "rram-like")`` (8-bit DAC and ADC, read noise) trained one step
  with bp: the largest gradient and the convolutions with a channel that reads all zero;
* ``onnx`` (``--onnx``): the dfa-wrapped model exported and run in onnxruntime, the largest abs difference.

A run of some models (``--models``) updates their rows in an existing ``sweep.json`` and keeps the others.

torchvision is not a dependency of neurosal; install it beside the benchmark's environment (``pip install
--no-deps torchvision`` matching the pinned torch). A model that fails records its error and the sweep
goes on.

    python benchmarks/torchvision_sweep.py --out benchmarks/reports/torchvision [--onnx] [--models a,b]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import neurosal  # noqa: E402
from neurosal.bench import machine_info  # noqa: E402
from neurosal.errors import NeurosalError  # noqa: E402
from neurosal.wrap import layer_sites  # noqa: E402

#: (builder, constructor options, input side)
MODELS = {
    "resnet18": ({}, 64), "mobilenet_v2": ({}, 64), "mobilenet_v3_small": ({}, 64),
    "efficientnet_b0": ({}, 64), "squeezenet1_1": ({}, 64), "shufflenet_v2_x0_5": ({}, 64),
    "mnasnet0_5": ({}, 64), "convnext_tiny": ({}, 64), "regnet_y_400mf": ({}, 64), "densenet121": ({}, 64),
    "googlenet": ({"aux_logits": True, "init_weights": True}, 64), "swin_t": ({}, 64),
    "vit_b_16": ({"image_size": 64}, 64), "maxvit_t": ({"input_size": (224, 224)}, 224),
}
N_CLASSES = 10


def build(name: str, dtype=torch.float32) -> nn.Module:
    import torchvision

    opts, _ = MODELS[name]
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=N_CLASSES, **opts)
    for m in model.modules():  # a zero-initialised head (ViT's) zeroes every gradient below it at step one:
        if isinstance(m, nn.Linear) and not bool(m.weight.any()):  # the comparisons would be vacuous
            nn.init.normal_(m.weight, std=m.in_features ** -0.5)
    return model.to(dtype)


def no_randomness(model: nn.Module) -> nn.Module:
    """Dropout and stochastic depth to 0: two passes compute the same function."""
    for m in model.modules():
        if "Dropout" in type(m).__name__ or type(m).__name__ == "StochasticDepth":
            m.p = 0.0
    return model


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def batch(name: str, n: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    side = MODELS[name][1]
    return torch.randn(n, 3, side, side, generator=g, dtype=dtype), torch.randint(0, N_CLASSES, (n,), generator=g)


def fa_exact(name: str) -> float:
    model = no_randomness(build(name, torch.float64)).train()
    x, y = batch(name, 2, torch.float64)
    ref = copy.deepcopy(model)
    F.cross_entropy(logits(ref(x)), y).backward()
    w = neurosal.wrap(copy.deepcopy(model), "fa")
    for slot, (_, m) in enumerate(layer_sites(w.model)):
        w.rule.set_feedback(slot, (m.in_proj_weight if isinstance(m, nn.MultiheadAttention) else m.weight).detach())
    F.cross_entropy(logits(w(x)), y).backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in w.model.named_parameters() if p.grad is not None}
    if got.keys() != want.keys():
        raise AssertionError(f"gradients on different parameters: {sorted(set(got) ^ set(want))[:4]}")
    return max(float((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-300)) for k in want)


def train_step(name: str, rule: str) -> dict:
    model = build(name)
    w = neurosal.wrap(model, rule) if rule != "bp" else model
    x, y = batch(name, 4)
    opt = torch.optim.SGD(w.parameters(), lr=0.01)
    if rule == "drtp":
        w.set_target(y)
    loss = F.cross_entropy(logits(w(x)), y)
    loss.backward()
    grads = [p.grad for p in w.parameters()]
    ok = sum(1 for g in grads if g is not None and bool(torch.isfinite(g).all()) and bool(g.abs().max() > 0))
    opt.step()
    row = {"loss": float(loss), "params_learning": f"{ok}/{len(grads)}"}
    if rule != "bp":
        row["points"] = len(w.point_names or [])
    return row


def analog_step(name: str) -> dict:
    from hw_models.analog import attach, convert

    model = convert(build(name), "rram-like")
    x, y = batch(name, 4)
    dead, convs = [], 0
    hooks = []
    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv2d,)) and hasattr(m, "tiles"):
            convs += 1
            hooks.append(m.register_forward_hook(
                lambda mod, i, o, n=n: dead.append(n) if bool((o.abs().amax((0, 2, 3)) == 0).any()) else None))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    attach(opt, model)
    loss = F.cross_entropy(logits(model(x)), y)
    loss.backward()
    for h in hooks:
        h.remove()
    gmax = max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None)
    opt.step()
    ref = build(name)  # the float model's largest gradient, for scale
    F.cross_entropy(logits(ref(x)), y).backward()
    gref = max(float(p.grad.abs().max()) for p in ref.parameters() if p.grad is not None)
    return {"loss": float(loss), "max_grad": gmax, "float_max_grad": gref,
            "convs_with_a_dead_channel": f"{len(dead)}/{convs}"}


def onnx_parity(name: str) -> float:
    from export.onnx_export import export_onnx, verify

    model = neurosal.wrap(no_randomness(build(name)), "dfa")
    x, y = batch(name, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    F.cross_entropy(logits(model(x)), y).backward()
    opt.step()
    model.eval()
    with tempfile.TemporaryDirectory() as d:
        export_onnx(model, x[:2], Path(d) / "m.onnx")
        return float(verify(model, Path(d) / "m.onnx", x, tol=1e-4)["max_abs_diff"])


def run_model(name: str, onnx: bool) -> dict:
    row: dict = {"model": name}
    checks = [("fa_exact", lambda: fa_exact(name))]
    checks += [(r, lambda r=r: train_step(name, r)) for r in ("dfa", "drtp", "sal")]
    checks += [("analog", lambda: analog_step(name))] + ([("onnx", lambda: onnx_parity(name))] if onnx else [])
    for key, fn in checks:
        t = time.perf_counter()
        try:
            row[key] = fn()
        except NeurosalError as e:  # a refusal with its reason (sal on a net without hidden Linear)
            row[key] = {"refused": str(e).splitlines()[0][:200]}
        except Exception as e:  # a sweep records what fails and goes on
            row[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            traceback.print_exc(limit=3)
        print(f"  {name} {key}: {row[key]} ({time.perf_counter() - t:.1f}s)", flush=True)
    return row


def cell(v, key: str) -> str:
    if isinstance(v, dict) and "error" in v:
        return "error: " + v["error"][:60]
    if isinstance(v, dict) and "refused" in v:
        why = v["refused"]
        return "refused" + (" (no hidden Linear)" if "no hidden nn.Linear" in why else ": " + why[:60])
    if key == "fa_exact":
        return f"{v:.1e}"
    if key in ("dfa", "drtp", "sal"):
        return f"{v['params_learning']} ({v.get('points', '-')} pts)"
    if key == "analog":
        ref = f" (float {v['float_max_grad']:.3g})" if "float_max_grad" in v else ""
        return f"grad {v['max_grad']:.3g}{ref}, dead {v['convs_with_a_dead_channel']}"
    if key == "onnx":
        return f"{v:.1e}"
    return str(v)


def report(result: dict) -> str:
    keys = ["fa_exact", "dfa", "drtp", "sal", "analog"] + (["onnx"] if result["onnx"] else [])
    lines = ["# torchvision's models through neurosal", "",
             f"torchvision {result['torchvision']}, torch {result['machine']['torch']}, "
             f"{result['machine']['cpu_count']} CPUs. Script: `benchmarks/torchvision_sweep.py` (its docstring "
             "says what each column checks). fa_exact: largest relative gradient difference, fa with B = W "
             "against autograd, float64 (0 up to rounding: exact). dfa/drtp/sal: parameters with a finite "
             "nonzero gradient after one step of a batch of 4 (feedback points found); the rest get none by "
             "design: GoogLeNet's auxiliary classifiers (their logits are not in this loss) and, under sal, "
             "the areas no sample of the batch chose. 'refused (no hidden Linear)': sal splits hidden "
             "nn.Linear layers into areas and these conv nets have none (`areas_on=[...]` names layers). "
             "analog: rram-like, bp, one step: the largest gradient (the float model's beside it) and the "
             "convolutions with a channel reading all zero. onnx: the dfa-wrapped model exported and run "
             "in onnxruntime, largest abs difference. Untrained weights; torchvision's ViT head is "
             "zero-initialised and gets a random init here, or every gradient below it is 0 at the first "
             "step and fa_exact and onnx would compare zeros.", "",
             "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for row in result["rows"]:
        lines.append(f"| {row['model']} | " + " | ".join(cell(row.get(k), k) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision builders")
    ap.add_argument("--onnx", action="store_true", help="also export the dfa-wrapped models and verify them")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/reports/torchvision")
    ap.add_argument("--report-only", action="store_true", help="rewrite README.md from OUT/sweep.json")
    args = ap.parse_args(argv)
    if args.report_only:
        result = json.loads((Path(args.out) / "sweep.json").read_text())
        (Path(args.out) / "README.md").write_text(report(result))
        return 0
    try:
        import torchvision
    except ImportError:
        print("error: torchvision is not importable (install it beside this environment: pip install --no-deps "
              "torchvision)", file=sys.stderr)
        return 2
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        print(f"error: unknown model(s) {unknown}; known: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {m: run_model(m, args.onnx) for m in args.models.split(",")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "sweep.json").exists():  # a run of some models updates their rows, keeps the others
        old = json.loads((out / "sweep.json").read_text())
        if old.get("onnx") == args.onnx:
            rows = {**{r["model"]: r for r in old["rows"]}, **rows}
    rows = [rows[m] for m in MODELS if m in rows]
    result = {"benchmark": "torchvision_sweep", "machine": machine_info(torch.device("cpu")),
              "torchvision": torchvision.__version__, "onnx": args.onnx, "rows": rows}
    (out / "sweep.json").write_text(json.dumps(result, indent=1))
    (out / "README.md").write_text(report(result))
    print(f"wrote {out / 'sweep.json'} and {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
