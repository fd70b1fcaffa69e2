"""Analog-training throughput (samples/s) against float training of the same net, in one run.

A training step on an analog substrate = forward through DAC / noisy devices / ADC, the rule's
teaching signals, the optimiser, and the pulse programming of every array. Target (issue 4): at most
3x slower than float on CPU; issue 14: linear devices <= 1.5x, nonlinear noisy devices <= 2.5x.

Per rule, one net per device (float, ideal, ...) is built; then, in rounds, each net takes a block of
steps (2 untimed, then 10 timed) in turn: float, ideal, ..., float, ideal, ... Every device's timed steps
are pooled over the rounds and the median reported, the multiple being the ratio of the medians. Blocks,
because a training process runs one net with warm caches: taking turns step by step (tried on
2026-11-25) left every float step cache-cold after the analog net's step -- the float step took 2.4 ms
instead of 1.75 ms, the analog one hardly changed, and linear-256 fused read 1.5x where a process
running it alone measures 1.7-2.0x. Rounds, because this shared 2-core VM drifts: the float step alone
moved between 1.7 and 2.6 ms over minutes; many short blocks spread the drift over every device.
The process's allocator is warmed first, as in ``sal_bench.py`` (one 16 MB block allocated and freed:
glibc then keeps MB-sized blocks instead of mapping and page-faulting each anew, as any training process
that has loaded a dataset does); ``--cold`` skips that.

    python benchmarks/analog_bench.py --small --rounds 10 --out results/analog_bench.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from neurosal.bench import save_result, warm_allocator  # noqa: E402
from neurosal.engine import block_output_shapes, train_step  # noqa: E402
from neurosal.rules import make_rule  # noqa: E402
from neurosal.substrates import apply_device, finish_step  # noqa: E402

DEVICES = [(None, {}), ("ideal", {}), ("linear-256", {}), ("rram-like", {}), ("pcm-like", {}),
           ("linear-256", {"fused": True}), ("rram-like", {"fused": True}), ("pcm-like", {"fused": True})]


def build(rule_name, device_name, options, model, batch, device):
    """One training step of a fresh net on ``device_name`` (None: float), as a closure."""
    torch.manual_seed(0)
    shape = (1, 28, 28)
    # SAL in its steady state: areas exclusive from the first step (no warm-up share of a run to know)
    rule = make_rule(rule_name, **({"warmup": 0.0} if rule_name == "sal" else {}))
    net = rule.build(model, shape, 10).to(device)
    if device_name:
        net = apply_device(net, device_name, options, 0)
    rule.setup(net, block_output_shapes(net, shape), 10, torch.Generator().manual_seed(1))
    rule.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        train_step(net, rule, x, y, 10)
        opt.step()
        finish_step(net)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return step


def measure_blocks(steps_by_device, rounds, block=10, warm=2):
    """Median seconds per step of each closure: in every round each closure takes ``warm`` untimed and
    ``block`` timed steps in a row, the closures in turn; the timed steps are pooled over the rounds."""
    times = [[] for _ in steps_by_device]
    for _ in range(rounds):
        for step, out in zip(steps_by_device, times):
            for i in range(warm + block):
                t0 = time.perf_counter()
                step()
                if i >= warm:
                    out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="results/analog_bench.json")
    ap.add_argument("--rounds", type=int, default=10, help="rounds of 10 timed steps per device")
    ap.add_argument("--cold", action="store_true", help="do not warm the allocator first (see above)")
    args = ap.parse_args(argv)
    if not args.cold:
        warm_allocator()
    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model, batch = ("mlp:256x256", 128) if args.small else ("mlp:2048x2048", 1024)
    rows = []
    for rule in ("bp", "dfa", "sal"):
        steps = [build(rule, name, options, model, batch, dev) for name, options in DEVICES]
        medians = measure_blocks(steps, args.rounds)
        for (name, options), sec in zip(DEVICES, medians):
            sps = batch / sec
            label = (name or "float") + ("[fused]" if options.get("fused") else "")
            row = {"rule": rule, "device": label, "model": model, "batch": batch, "samples_per_s": sps,
                   "slowdown_vs_float": sec / medians[0]}
            rows.append(row)
            print(f"{rule:4s} {row['device']:18s} {sps:10.0f} samples/s  x{row['slowdown_vs_float']:.2f} slower", flush=True)
    save_result(args.out, "analog_bench", dev, rows=rows, timed_steps_per_device=args.rounds * 10, measured="rounds of blocks (2 untimed + 10 timed steps per net)", allocator="cold" if args.cold else "warm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
