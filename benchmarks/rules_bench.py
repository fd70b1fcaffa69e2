"""Step time and peak memory of every rule against backprop on the same MLPs and CNN, in one run
(issue 2's benchmark; a preset of ``neurosal.bench``).

    python benchmarks/rules_bench.py --small --out results/rules_bench
    python benchmarks/rules_bench.py --out results/rules_bench_full      (GPU-sized)

Each case runs in its own subprocess; plain SGD (no optimiser state), so the memory difference is the
training step's own: activations kept for the update, and gradients. Targets: DFA step time <= BP's;
DFA memory below BP's at depth >= 8.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neurosal.bench import BenchConfig, run  # noqa: E402

RULES = ["bp", "fa", "usf", "ldef", "drtp", "dfa", "dfa[recompute]"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="CPU-sized preset (minutes on 2 cores)")
    ap.add_argument("--accel", default="auto")
    ap.add_argument("--out", default="results/rules_bench")
    args = ap.parse_args(argv)
    if args.small:
        cfg = BenchConfig(rules=RULES, widths=[], depths=[2, 8, 16], width=256, batch=512,
                          models=["cnn:6,16/120,84"], steps=10, warmup=3, accel=args.accel)
    else:
        cfg = BenchConfig(rules=RULES, widths=[], depths=[2, 8, 32], width=2048, batch=2048,
                          models=["cnn:32,64/512,256"], steps=30, warmup=5, accel=args.accel)
    run(cfg, args.out)
    print(f"wrote {args.out}/bench.json, bench.md, bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
