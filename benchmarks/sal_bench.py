"""SAL step time against dense layers, in one run, JSON out.

Layer level (forward + local weight update for a given teaching signal, the code paths training uses):

* ``dense-active``: ``nn.Linear(n_in, n_out)`` -- the compute one SAL sample actually does;
* ``sal``: ``AreaLinear(n_in, n_out, K)`` -- routing, grouped matmuls, per-area update, router update;
* ``dense-same-params``: ``nn.Linear(n_in, K * n_out)`` -- a dense layer holding as many weights.

Network level (one training step of an MLP, forward + teaching signals + local updates, then the
optimiser): DFA on the dense MLP, SAL with K=1 (the same network and tail, one area) and SAL with K
areas. Targets: SAL layer step <= 1.3x the dense-active step at batch >= 1024 and <= 1.6x at batch 256
on CPU, routing and router update included.

The layers are timed in interleaved rounds (dense, sal, dense-same-params, repeated), medians reported.
The process's allocator is warmed first (one 16 MB block allocated and freed): glibc raises its mmap
threshold to the largest block freed, and a fresh process otherwise maps and page-faults every MB-sized
tensor anew -- SAL allocates K gradients of the layer's size per step where dense allocates one, so a
cold process measures the allocator more than the layer (``--cold`` measures that case; any real
training process has freed large tensors long before).

    python benchmarks/sal_bench.py --small --out results/sal_bench.json
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
from neurosal.areas import AreaLinear  # noqa: E402
from neurosal.engine import block_output_shapes, run_op, train_step  # noqa: E402
from neurosal.layers import apply_local_update  # noqa: E402
from neurosal.rules import make_rule  # noqa: E402


def timed(fn, device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def layer_case(batch, n_in, n_out, areas, device, repeats):
    torch.manual_seed(0)
    x = torch.randn(batch, n_in, device=device)
    layers = {"dense-active": torch.nn.Linear(n_in, n_out),
              "sal": AreaLinear(n_in, n_out, areas),
              "dense-same-params": torch.nn.Linear(n_in, areas * n_out)}
    steps = {}
    for name, layer in layers.items():
        layer.to(device)
        delta = torch.randn(batch, layer.out_features if name != "sal" else n_out, device=device)

        def step(layer=layer, delta=delta):
            for p in layer.parameters():
                p.grad = None
            with torch.no_grad():
                _, ctx = run_op(layer, x)
                apply_local_update(layer, x, delta, ctx)

        steps[name] = step
    times: dict = {name: [] for name in steps}
    for _ in range(5):  # rounds, so that slow drifts of the machine hit every layer alike
        for name, step in steps.items():
            times[name].append(timed(step, device, max(1, repeats // 5)))
    return {name: statistics.median(t) for name, t in times.items()}


def net_case(batch, width, depth, areas, device, repeats, optimizer: bool):
    shape = (1, 28, 28)
    # exclusive steps (warmup=0): what SAL costs after its warm-up; a warm-up step is one dense update per area
    cases = {"dfa (dense)": ("dfa", {}), "sal K=1": ("sal", {"areas": 1, "warmup": 0.0}),
             f"sal K={areas}": ("sal", {"areas": areas, "warmup": 0.0})}
    out = {}
    for name, (rule_name, opts) in cases.items():
        torch.manual_seed(0)
        rule = make_rule(rule_name, **opts)
        net = rule.build(f"mlp:{width}*{depth}", shape, 10).to(device)
        rule.setup(net, block_output_shapes(net, shape), 10, torch.Generator().manual_seed(1))
        rule.to(device)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        x = torch.randn(batch, *shape, device=device)
        y = torch.randint(0, 10, (batch,), device=device)

        def step():
            opt.zero_grad(set_to_none=True)
            train_step(net, rule, x, y, 10)
            if optimizer:
                opt.step()

        out[name] = timed(step, device, repeats)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="CPU-sized preset")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--areas", type=int, default=4)
    ap.add_argument("--out", default="results/sal_bench.json")
    ap.add_argument("--cold", action="store_true", help="do not warm the allocator first (see above)")
    args = ap.parse_args(argv)
    if not args.cold:
        warm_allocator()
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.small:
        layer_sizes, nets, repeats = [(256, 512, 512), (1024, 1024, 1024)], [(256, 512, 2)], 20
    else:
        layer_sizes, nets, repeats = [(1024, 1024, 1024), (8192, 4096, 4096)], [(4096, 2048, 8)], 30
    rows = []
    for batch, n_in, n_out in layer_sizes:
        t = layer_case(batch, n_in, n_out, args.areas, device, repeats)
        rows.append({"level": "layer", "batch": batch, "n_in": n_in, "n_out": n_out, "areas": args.areas,
                     "ms": t, "sal_vs_active": t["sal"] / t["dense-active"],
                     "sal_vs_same_params": t["sal"] / t["dense-same-params"]})
        print(f"layer B={batch} {n_in}->{n_out} K={args.areas}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in t.items())
              + f" | sal/active x{rows[-1]['sal_vs_active']:.2f}, sal/same-params x{rows[-1]['sal_vs_same_params']:.2f}")
    for batch, width, depth in nets:
        for with_opt in (False, True):
            t = net_case(batch, width, depth, args.areas, device, repeats, with_opt)
            key = f"sal K={args.areas}"
            rows.append({"level": "net+adam" if with_opt else "net", "batch": batch, "width": width,
                         "depth": depth, "areas": args.areas, "ms": t,
                         "sal_vs_k1": t[key] / t["sal K=1"], "sal_vs_dfa": t[key] / t["dfa (dense)"]})
            print(f"{rows[-1]['level']:8s} B={batch} mlp:{width}*{depth}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in t.items())
                  + f" | K={args.areas}/K=1 x{rows[-1]['sal_vs_k1']:.2f}")
    save_result(args.out, "sal_bench", device, rows=rows, allocator="cold" if args.cold else "warmed",
                threads=torch.get_num_threads())
    return 0


if __name__ == "__main__":
    sys.exit(main())
