"""Step time and activation memory of every rule against BP on any model, measured side by side.

Models: mlp 784-(256 x depth)-10 at depth 8 and 16, LeNet (conv6-pool-conv16-pool-fc120-fc84), a
CIFAR-style ResNet-20 with BatchNorm, a small ViT (patch 4, dim 64, depth 4, heads 4) -- all on 28x28
single-channel inputs (Fashion-MNIST's shape). Every rule runs through ``neurosal.wrap`` and a plain
``loss.backward()``:

* ``general``: the model as a plain ``nn.Sequential``/zoo module (the general engine: autograd with the
  rules' feedback functions and feedback points);
* ``chain``: the same mlp/LeNet as neurosal's spec chain (the fast path: no autograd graph).

``dfa[recompute]``: DFA with one block's activations alive at a time (spec chains: the no-autograd
recompute; ResNet/ViT: each feedback block recomputed under activation checkpointing).

Each case is timed in rounds that interleave all its rules (median of the per-round medians), so
ratios to BP are measured side by side under the same machine load. Activation memory is exact and
allocator-independent: the bytes of non-parameter tensors autograd saves for backward (general), or
what the chain engine caches (chain), unique storages.

With ``--biotorch`` the same LeNet/ResNet-20 step of BioTorch's FA (``pip install --no-deps
biotorch==0.0.16`` in the benchmark's environment; never a dependency of neurosal) is timed beside ours.

    python benchmarks/general_bench.py --small --out benchmarks/reports/general
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import neurosal  # noqa: E402
from neurosal.bench import machine_info, storage_counter, wrapped_activation_bytes  # noqa: E402
from neurosal.engine import forward_cached  # noqa: E402
from neurosal.rules import make_rule, parse_options  # noqa: E402
from neurosal.zoo import ResNet, ViT  # noqa: E402

RULES = ["bp", "fa", "usf", "kp", "ldef", "dfa", "drtp", "sal", "dfa[recompute]"]


def mlp_seq(depth: int, width: int = 256) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    n = 784
    for _ in range(depth):
        layers += [nn.Linear(n, width), nn.ReLU()]
        n = width
    return nn.Sequential(*layers, nn.Linear(n, 10))


def lenet_seq() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(16 * 7 * 7, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


MODELS = {
    "mlp-d8": (lambda: mlp_seq(8), "mlp:256*8", 512),
    "mlp-d16": (lambda: mlp_seq(16), "mlp:256*16", 512),
    "lenet": (lenet_seq, "cnn", 128),
    "resnet20": (lambda: ResNet(20, 1, 10), None, 32),
    "vit": (lambda: ViT((1, 28, 28), 10, patch=4, dim=64, depth=4, heads=4), None, 64),
}


def build(model: str, path: str, rule: str):
    """``rule``: a name, ``name[recompute]`` (the low-memory mode) and/or ``name:key=value`` (one rule
    option, e.g. ``dfa:readout_norm=false``, to time an option side by side with the default)."""
    make, spec, batch = MODELS[model]
    base, _, option = rule.partition(":")
    name, _, mode = base.partition("[")
    memory = mode.rstrip("]") or "cache"
    options = parse_options(option)
    torch.manual_seed(0)
    if path == "chain":
        r = make_rule(name, **options)
        net = r.build(spec, (1, 28, 28), 10)
        return neurosal.wrap(net, r, seed=1, memory=memory), batch
    return neurosal.wrap(make(), name, seed=1, memory=memory, **options), batch


def saved_bytes(wrapped, x, y) -> int:
    """Non-parameter bytes kept alive for the update of one step (see the module docstring)."""
    if wrapped.chain and not wrapped.rule.autograd:
        seen, count = storage_counter(wrapped.parameters())
        with torch.no_grad():
            _, cache = forward_cached(wrapped.model, x)
        for c in cache:
            count([c.x, c.state])
        return sum(seen.values())
    return wrapped_activation_bytes(wrapped, x, y)


def biotorch_fa(model: str):
    """BioTorch's FA version of the same model, or None when biotorch is not importable."""
    try:
        from biotorch.module.biomodule import BioModule
    except Exception:  # not installed (it is a benchmark-only peer)
        return None
    make, _, batch = MODELS[model]
    torch.manual_seed(0)
    return BioModule(make(), mode="fa"), batch


def run(models, rules, rounds: int, steps: int, bio: bool, notes: list) -> list[dict]:
    rows = []
    for model in models:
        cases = []
        paths = ["general"] + (["chain"] if MODELS[model][1] else [])
        for path in paths:
            for rule in rules:
                if rule.partition(":")[0] == "sal" and model == "resnet20":
                    continue  # no hidden Linear: conv layers stay dense, sal would be dfa
                if rule.endswith("[recompute]") and path == "general" and model in ("mlp-d8", "mlp-d16", "lenet"):
                    continue  # plain stacks: the points are activations, no blocks to recompute
                cases.append((path, rule, *build(model, path, rule)))
        if bio:
            b = biotorch_fa(model)
            if b is not None:
                cases.append(("biotorch", "fa", *b))
        batch = cases[0][3]
        x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
        opts = [torch.optim.SGD(c[2].parameters(), lr=1e-3) for c in cases]

        def step(i):
            m, opt = cases[i][2], opts[i]
            opt.zero_grad(set_to_none=True)
            out = m(x)
            if getattr(m, "rule", None) is not None and m.rule.needs_target:
                m.set_target(y)
            F.cross_entropy(out, y).backward()
            opt.step()

        unsupported = []
        for i in range(len(cases)):  # warm up (and plan the direct rules' points)
            try:
                step(i)
            except Exception as exc:  # a peer that cannot run this model (BioTorch: 2-d Linear inputs only)
                if cases[i][0] != "biotorch":
                    raise
                unsupported.append({"model": model, "path": "biotorch", "rule": "fa",
                                    "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"})
                continue
            step(i)
        bad = {i for i, c in enumerate(cases) if c[0] == "biotorch" and unsupported}
        cases = [c for i, c in enumerate(cases) if i not in bad]
        opts = [o for i, o in enumerate(opts) if i not in bad]
        per_round = [[] for _ in cases]
        for _ in range(rounds):
            for i in range(len(cases)):
                times = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    step(i)
                    times.append(time.perf_counter() - t0)
                per_round[i].append(statistics.median(times))
        for i, (path, rule, m, _) in enumerate(cases):
            act = saved_bytes(m, x, y) if path != "biotorch" else None  # recompute: + the largest block
            rows.append({"model": model, "path": path, "rule": rule, "batch": batch,
                         "step_ms": 1000 * statistics.median(per_round[i]),
                         "activations_mb": None if act is None else act / 2 ** 20,
                         "params": sum(p.numel() for p in m.parameters())})
        notes.extend(unsupported)
        print(f"{model}: " + ", ".join(f"{r['path']}/{r['rule']} {r['step_ms']:.2f} ms" for r in rows if r["model"] == model),
              flush=True)
    base = {(r["model"], r["path"]): r for r in rows if r["rule"] == "bp"}
    general_bp = {r["model"]: r for r in rows if r["rule"] == "bp" and r["path"] == "general"}
    for r in rows:
        b = base.get((r["model"], r["path"])) or general_bp[r["model"]]
        r["time_vs_bp"] = r["step_ms"] / b["step_ms"]
        if r["activations_mb"] is not None and b["activations_mb"]:
            r["act_vs_bp"] = r["activations_mb"] / b["activations_mb"]
    fa_gen = {r["model"]: r for r in rows if r["rule"] == "fa" and r["path"] == "general"}
    for r in rows:
        if r["path"] == "biotorch":
            r["ours_fa_vs_this"] = fa_gen[r["model"]]["step_ms"] / r["step_ms"]
    return rows


def markdown(rows, info, notes=()) -> str:
    lines = ["# Any model: step time and activation memory of every rule vs BP", "",
             f"Machine: {info['platform']}, {info['cpu_count']} CPUs, torch {info['torch']}, "
             f"{info['torch_threads']} threads, device {info['device']}. Ratios measured side by side in one "
             "run (interleaved rounds).", "",
             "| model | path | rule | batch | step ms | time / BP | activations MB | act / BP |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        act = "" if r["activations_mb"] is None else f"{r['activations_mb']:.2f}"
        ratio = f"{r['act_vs_bp']:.2f}" if "act_vs_bp" in r else ""
        lines.append(f"| {r['model']} | {r['path']} | {r['rule']} | {r['batch']} | {r['step_ms']:.2f} | "
                     f"{r['time_vs_bp']:.2f} | {act} | {ratio} |")
    bio = [r for r in rows if r["path"] == "biotorch"]
    if bio:
        lines += ["", "BioTorch 0.0.16 FA, same model, same batch, same run: our FA step / BioTorch's = "
                  + ", ".join(f"{r['model']} {r['ours_fa_vs_this']:.2f}" for r in bio)]
    for n in notes:
        lines += ["", f"BioTorch could not run {n['model']}: {n['error']}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="fewer rounds (CI-sized)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--biotorch", action="store_true", help="time BioTorch's FA beside ours (if installed)")
    ap.add_argument("--out", default="benchmarks/reports/general")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"error: unknown model(s) {unknown}; known: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    rounds, steps = (3, 5) if args.small else (7, 10)
    notes: list = []
    rows = run(models, [r for r in args.rules.split(",") if r], rounds, steps, args.biotorch, notes)
    info = machine_info(torch.device("cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "general_bench.json").write_text(json.dumps({"machine": info, "rows": rows, "notes": notes}, indent=2))
    (out / "report.md").write_text(markdown(rows, info, notes))
    print(markdown(rows, info, notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
