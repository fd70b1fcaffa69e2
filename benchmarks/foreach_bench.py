"""The trainer's optimiser with and without ``foreach`` (multi-tensor kernels), side by side, on CPU.

torch uses the multi-tensor ("foreach") implementation of its optimisers by default only when every
parameter is on CUDA; on the CPU it loops over the parameters in Python. ``neurosal``'s trainer asks for
``foreach=True``. This measures one training step (teaching signals, local updates, the optimiser) of
each model and rule both ways, in interleaved rounds (median of per-round medians), batch 32, digits.

    python benchmarks/foreach_bench.py --out benchmarks/reports/foreach
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from neurosal.bench import machine_info, warm_allocator  # noqa: E402
from neurosal.data import load_dataset  # noqa: E402
from neurosal.engine import train_step  # noqa: E402
from neurosal.train import TrainConfig, Trainer  # noqa: E402

CASES = [("mlp:256x256", "bp", "Adam"), ("mlp:256x256", "dfa", "Adam"), ("mlp:32*128:relu:res", "dfa", "Adam"),
         ("mlp:32*128:relu:res", "sal", "Adam"), ("cnn", "fa", "SGD"), ("mlp:64*16", "fa", "AdamW")]


def stepper(ds, model, rule, optimizer, foreach):
    cfg = TrainConfig(rule=rule, model=model, epochs=1, batch_size=32, progress=False, optimizer=optimizer,
                      rule_options={"warmup": 0.0} if rule == "sal" else {})
    tr = Trainer(cfg, None, dataset=ds)
    for g in tr.opt.param_groups:
        g["foreach"] = foreach
    x, y = ds.x_train[:32], ds.y_train[:32]

    def step():
        tr.opt.zero_grad(set_to_none=True)
        train_step(tr.net, tr.rule, x, y, ds.n_classes)
        tr.opt.step()
    return step


def timed(step, repeats=20):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/foreach")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    warm_allocator()
    ds = load_dataset("digits")
    rows = []
    for model, rule, opt in CASES:
        steps = {fe: stepper(ds, model, rule, opt, fe) for fe in (False, True)}
        for s in steps.values():
            for _ in range(5):
                s()
        per = {fe: [] for fe in steps}
        for _ in range(args.rounds):
            for fe, s in steps.items():
                per[fe].append(timed(s))
        loop, multi = (statistics.median(per[fe]) for fe in (False, True))
        rows.append({"model": model, "rule": rule, "optimizer": opt, "loop_ms": loop, "foreach_ms": multi,
                     "ratio": multi / loop})
        print(f"{model:22s} {rule:4s} {opt:6s} loop {loop:8.2f} ms  foreach {multi:8.2f} ms  x{multi / loop:.2f}",
              flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "foreach_bench", "machine": machine_info(torch.device("cpu")), "rounds": args.rounds,
              "batch": 32, "rows": rows}
    (out / "foreach.json").write_text(json.dumps(result, indent=2))
    lines = ["# The trainer's optimiser: Python loop vs foreach (multi-tensor) on CPU", "",
             f"`benchmarks/foreach_bench.py`; {result['machine']['cpu_count']} CPU cores, torch "
             f"{result['machine']['torch']}, {result['machine']['torch_threads']} threads; batch 32 on digits; "
             f"one step = teaching signals + local updates + optimiser; median of {args.rounds} interleaved rounds.",
             "", "| model | rule | optimiser | loop ms | foreach ms | foreach / loop |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['rule']} | {r['optimizer']} | {r['loop_ms']:.2f} | {r['foreach_ms']:.2f} | "
              f"{r['ratio']:.2f} |" for r in rows]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
