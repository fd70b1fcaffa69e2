"""Step time and peak memory of every rule against backprop on the same MLPs and CNN, in one run.

Each (rule, model) is measured in a fresh subprocess so that peak memory is its own:
CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the first step;
CPU: peak RSS (``ru_maxrss``) above the RSS before the first step. The optimiser is plain SGD (no
state), so the memory difference is the training step's own: activations kept for the update, grads.

    python benchmarks/rules_bench.py --small --out results/rules_bench.json
    python benchmarks/rules_bench.py --out results/rules_bench_full.json   (GPU-sized)

Targets (issue 2): DFA step time <= BP's; DFA memory below BP's at depth >= 8.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RULES = [("bp", "cache"), ("fa", "cache"), ("usf", "cache"), ("ldef", "cache"), ("drtp", "cache"),
         ("dfa", "cache"), ("dfa", "recompute")]


def presets(small: bool):
    if small:
        return dict(mlp_width=256, depths=[2, 8, 16], mlp_batch=512, cnn="cnn:6,16/120,84",
                    cnn_batch=128, steps=15, warmup=3)
    return dict(mlp_width=2048, depths=[2, 8, 32], mlp_batch=2048, cnn="cnn:32,64/512,256",
                cnn_batch=512, steps=30, warmup=5)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(job: dict) -> dict:
    """Runs in its own process: build the net, time `steps` training steps, report peak memory."""
    import torch

    from neurosal.engine import block_output_shapes, train_step
    from neurosal.rules import make_rule
    from neurosal.substrates import finish_step

    torch.manual_seed(0)
    dev = torch.device(job["device"])
    shape, n_classes = tuple(job["input_shape"]), 10
    rule = make_rule(job["rule"])
    net = rule.build(job["model"], shape, n_classes).to(dev)
    rule.setup(net, block_output_shapes(net, shape), n_classes, torch.Generator().manual_seed(1))
    rule.to(dev)
    params = list(net.parameters()) + [p for p in rule.parameters() if p.numel()]
    opt = torch.optim.SGD(params, lr=1e-3)
    x = torch.randn(job["batch"], *shape, device=dev)
    y = torch.randint(0, n_classes, (job["batch"],), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        train_step(net, rule, x, y, n_classes, job["memory"])
        opt.step()
        finish_step(net)

    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = _rss_bytes()
    times = []
    for i in range(job["warmup"] + job["steps"]):
        t0 = time.perf_counter()
        step()
        sync()
        if i >= job["warmup"]:
            times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    med = statistics.median(times)
    return {"step_ms": 1000 * med, "samples_per_s": job["batch"] / med, "peak_mem_mb": peak / 2**20,
            "params": sum(p.numel() for p in net.parameters())}


def run_job(job: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {job}:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def machine_info(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "device": device, "threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="CPU-sized preset (minutes on 2 cores)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="results/rules_bench.json")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    p = presets(args.small)
    models = [(f"mlp:{p['mlp_width']}*{d}", [1, 28, 28], p["mlp_batch"], d) for d in p["depths"]]
    models.append((p["cnn"], [1, 28, 28], p["cnn_batch"], 4))
    rows = []
    for model, shape, batch, depth in models:
        base = None
        for rule, memory in RULES:
            job = dict(rule=rule, memory=memory, model=model, input_shape=shape, batch=batch,
                       device=device, steps=p["steps"], warmup=p["warmup"])
            res = run_job(job)
            if rule == "bp":
                base = res
            row = {"model": model, "depth": depth, "batch": batch,
                   "rule": rule if memory == "cache" else f"{rule}[{memory}]", **res,
                   "time_vs_bp": res["step_ms"] / base["step_ms"],
                   "mem_vs_bp": res["peak_mem_mb"] / base["peak_mem_mb"] if base["peak_mem_mb"] > 0 else None}
            rows.append(row)
            print(f"{model:22s} {row['rule']:15s} {res['step_ms']:9.2f} ms  x{row['time_vs_bp']:.2f}  "
                  f"{res['peak_mem_mb']:9.1f} MB  x{(row['mem_vs_bp'] or float('nan')):.2f}", flush=True)
    out = {"benchmark": "rules_bench", "preset": "small" if args.small else "full",
           "machine": machine_info(device), "settings": p, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
