"""Spiking simulation speed: the tensor path against Brian2 (numpy and Cython targets), same network.

The network is input -> LIF hidden layers with the three-factor learning rule switched on in both
(eligibility traces and weight-change accumulation), run for T steps on N samples. The tensor path
simulates the whole batch at once; Brian2 runs sample after sample, as an event-driven simulation
does. Cython's one-off compilation is excluded (a warm-up run first).

    python benchmarks/snn_bench.py --small --out results/snn_bench.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hw_models.brian import simulate  # noqa: E402
from hw_models.snn import build_snn, delay  # noqa: E402
from neurosal.bench import save_result  # noqa: E402
from neurosal.engine import forward_cached  # noqa: E402
from neurosal.layers import weight_update  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--targets", default="numpy,cython")
    ap.add_argument("--out", default="results/snn_bench.json")
    args = ap.parse_args(argv)
    n_in, widths, steps, samples = (64, (100, 100), 100, 8) if args.small else (784, (500, 500), 200, 32)
    torch.manual_seed(0)
    net = build_snn(f"snn:{'x'.join(map(str, widths))}:T={steps}", (n_in,), 10).double()
    for blk in net.blocks[:-1]:
        blk.op.weight.data.mul_(3.0)
    raw = (torch.rand(samples, steps, n_in, dtype=torch.float64) < 0.2).double()
    x = delay(raw)
    net.stem = torch.nn.Identity()
    third = [torch.randn(samples, steps, w, dtype=torch.float64) * 1e-3 for w in widths]

    def tensor_run():
        logits, cache = forward_cached(net, x)
        for l, c in enumerate(cache[:-1]):
            weight_update(c.op, c.x, c.post.local_vjp(c.state, third[l]))

    tensor_run()
    t0 = time.perf_counter()
    tensor_run()
    rows = [{"path": "tensor", "seconds": time.perf_counter() - t0}]
    lif = net.blocks[0].post
    weights = [b.op.weight.detach().numpy() for b in net.blocks[:-1]]
    biases = [b.op.bias.detach().numpy() for b in net.blocks[:-1]]
    for target in [t for t in args.targets.split(",") if t]:
        try:
            simulate(weights, biases, raw[0].numpy().astype(bool), [g[0].numpy() for g in third],
                     lif.beta, lif.theta, lif.slope, target)  # warm-up (Cython compiles here)
            t0 = time.perf_counter()
            for s in range(samples):
                simulate(weights, biases, raw[s].numpy().astype(bool), [g[s].numpy() for g in third],
                         lif.beta, lif.theta, lif.slope, target)
            rows.append({"path": f"brian2[{target}]", "seconds": time.perf_counter() - t0})
        except Exception as exc:  # e.g. no compiler for the Cython target
            rows.append({"path": f"brian2[{target}]", "error": f"{type(exc).__name__}: {exc}"})
    base = rows[0]["seconds"]
    for r in rows:
        if "seconds" in r:
            r["samples_per_s"] = samples / r["seconds"]
            r["slowdown_vs_tensor"] = r["seconds"] / base
        print(f"{r['path']:16s} " + (f"{r['seconds']:8.3f} s  {r['samples_per_s']:9.1f} samples/s  "
                                     f"x{r['slowdown_vs_tensor']:.1f} vs tensor" if "seconds" in r else r["error"]))
    save_result(args.out, "snn_bench", torch.device("cpu"),
                network={"inputs": n_in, "hidden": list(widths), "steps": steps, "samples": samples}, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
