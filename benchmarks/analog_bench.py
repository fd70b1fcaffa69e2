"""Analog-training throughput (samples/s) against float training of the same net, in one run.

A training step on an analog substrate = forward through DAC / noisy devices / ADC, the rule's
teaching signals, the optimiser, and the pulse programming of every array. Target (issue 4): at most
3x slower than float on CPU; issue 14: linear devices <= 1.5x, nonlinear noisy devices <= 2.5x.

Per rule, one net per device (float, ideal, ...) is built and warmed; then each device's net and the
float net take their steps in turn, one step each (float, device, float, device, ...), so that a slow
spell of a shared machine hits both alike, and the multiple is the ratio of the two medians. (Measured
per device in blocks of 20 steps instead, as this bench did before, the float step alone moved between
1.7 and 2.6 ms from block to block on a 2-core VM, and the multiples with it; with all eight nets
taking turns, each step found its weights evicted from the caches by seven other nets, which a training
process running alone does not see: linear-256 fused measured 1.55-1.63x there against 1.42-1.46x in
pairs.) The float row reports the median over the pairings of its median step time.
The process's allocator is warmed first, as in ``sal_bench.py`` (one 16 MB block allocated and freed:
glibc then keeps MB-sized blocks instead of mapping and page-faulting each anew, as any training process
that has loaded a dataset does); ``--cold`` skips that.

    python benchmarks/analog_bench.py --small --out results/analog_bench.json
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


def measure_interleaved(steps_by_device, n, warmup=3):
    """Median seconds per step of each closure, the closures taking turns one step at a time."""
    for step in steps_by_device:
        for _ in range(warmup):
            step()
    times = [[] for _ in steps_by_device]
    for _ in range(n):
        for step, out in zip(steps_by_device, times):
            t0 = time.perf_counter()
            step()
            out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="results/analog_bench.json")
    ap.add_argument("--rounds", type=int, default=3, help="steps per device: rounds x 20 (--small) or x 30")
    ap.add_argument("--cold", action="store_true", help="do not warm the allocator first (see above)")
    args = ap.parse_args(argv)
    if not args.cold:
        warm_allocator()
    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model, batch, n_steps = ("mlp:256x256", 128, 20) if args.small else ("mlp:2048x2048", 1024, 30)
    rows = []
    for rule in ("bp", "dfa", "sal"):
        float_step = build(rule, None, {}, model, batch, dev)
        pairs = [measure_interleaved([float_step, build(rule, name, options, model, batch, dev)],
                                     args.rounds * n_steps) for name, options in DEVICES[1:]]
        f_all = statistics.median(f for f, _ in pairs)
        results = [(f_all, f_all)] + [(d, f) for f, d in pairs]
        for (name, options), (sec, paired) in zip(DEVICES, results):
            sps = batch / sec
            label = (name or "float") + ("[fused]" if options.get("fused") else "")
            # the multiple is against the float steps taken in turn with this device's
            row = {"rule": rule, "device": label, "model": model, "batch": batch, "samples_per_s": sps,
                   "float_samples_per_s": batch / paired, "slowdown_vs_float": sec / paired}
            rows.append(row)
            print(f"{rule:4s} {row['device']:18s} {sps:10.0f} samples/s  x{row['slowdown_vs_float']:.2f} slower", flush=True)
    save_result(args.out, "analog_bench", dev, rows=rows, steps_per_device=args.rounds * n_steps, interleaved="per step, each device with float", allocator="cold" if args.cold else "warm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
