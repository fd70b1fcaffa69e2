"""The benchmark runner behind ``neurosal bench`` and ``benchmarks/``.

For each rule and model in a sweep (widths, depths up to 128, parameter counts up to 1B on a large GPU)
it measures one training step -- forward, teaching signals, local updates, optimiser -- in a fresh
subprocess, so peak memory is the case's own:

* step time (median) and samples/s;
* peak memory: CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before the first step;
  CPU: peak RSS above the RSS before the first step;
* achieved FLOP/s -- the algorithm's own FLOPs (BP: forward + both backward matmuls; DFA/SAL: forward
  + weight updates + the projections) over the step time -- as a fraction of a matmul peak measured on
  the same device and dtype.

Transformers (``gpt_params``: presets of 1e7, 1e8, 1e9 parameters; ``gpt_depths``: a depth sweep at
``gpt_dim``) run through the general engine (:func:`neurosal.wrap`) on random token windows with a per-token
loss; their FLOPs count the matmuls of the blocks, the causal attention and the head (BP and the
layerwise rules: 3x the forward; the direct rules add the projection of the error and, recomputing, a
second forward); SAL rows add the area load (largest area's share of tokens over an even split; areas
have no capacity limit, no token is dropped).

Results: ``bench.json`` (machine, versions, settings, rows), ``bench.md`` (one table, with time and
memory ratios against BP on the same model) and ``bench.png`` (memory and time vs depth).
Rules may carry a memory mode: ``dfa[recompute]``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checkpoint import atomic_write_text, ensure_writable_dir
from .errors import NeurosalError
from .report import save_figure


@dataclass
class BenchConfig:
    rules: list[str] = field(default_factory=lambda: ["bp", "fa", "dfa", "sal"])
    widths: list[int] = field(default_factory=lambda: [256, 1024])  # at depth `depth`
    depths: list[int] = field(default_factory=lambda: [2, 8, 32])  # at width `width`
    params: list[float] = field(default_factory=list)  # target parameter counts at depth `depth`
    models: list[str] = field(default_factory=list)  # extra model specs, e.g. "cnn" (28x28 inputs)
    width: int = 256
    depth: int = 4
    batch: int = 256
    steps: int = 10
    warmup: int = 3
    accel: str = "auto"
    dtype: str = "float32"  # or "bf16": torch.autocast for the forward and the updates
    compile: bool = False  # torch.compile the model (the BP baseline's path)
    devices: list = field(default_factory=lambda: [None])  # analog device presets to include
    input_dim: int = 784
    n_classes: int = 10
    gpt_params: list[float] = field(default_factory=list)  # transformer presets by size (GPT_PRESETS)
    gpt_depths: list[int] = field(default_factory=list)  # transformer depth sweep at gpt_dim
    gpt_dim: int = 256
    ctx: int = 256  # tokens per window
    vocab: int = 256
    gpt_batch: int = 8  # windows per step

    def validate(self) -> None:
        """Refuse a sweep that could not run, before minutes of benchmarking (one ``error:`` line)."""
        from .engine import MEMORY_MODES
        from .models import build_model
        from .rules import REGISTRY
        from .substrates import substrate_for
        from .train import resolve_device

        for text in self.rules:
            name, mode = parse_rule(text)
            if name not in REGISTRY:
                raise NeurosalError(f"unknown rule {name!r} in the bench rules; known: {', '.join(sorted(REGISTRY))}")
            if mode not in MEMORY_MODES:
                raise NeurosalError(f"unknown memory mode {mode!r} in {text!r}; use one of {MEMORY_MODES}")
        if self.dtype not in ("float32", "bf16"):
            raise NeurosalError(f"bench dtype must be float32 or bf16, not {self.dtype!r}")
        for p in self.gpt_params:
            if p not in GPT_PRESETS:
                raise NeurosalError(f"no transformer preset of {p:g} parameters; presets: "
                                    + ", ".join(f"{k:g}" for k in GPT_PRESETS))
        if self.gpt_dim % 64 and self.gpt_dim > 64:
            raise NeurosalError(f"gpt_dim must be a multiple of 64 (heads of 64), got {self.gpt_dim}")
        for name in ("width", "depth", "batch", "steps", "input_dim", "n_classes", "gpt_dim", "ctx", "vocab",
                     "gpt_batch"):
            if getattr(self, name) < 1:
                raise NeurosalError(f"bench {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise NeurosalError(f"bench warmup must be >= 0, got {self.warmup}")
        for dev in self.devices:
            if dev is not None:
                substrate_for(dev)  # a preset name or a preset file, as training accepts
        resolve_device(self.accel)
        for spec in self.models:  # the extra specs are small (28x28 inputs): build each once to check it
            build_model(spec, (1, 28, 28), self.n_classes)
        if not cases(self):
            raise NeurosalError("the bench sweep is empty: give --widths, --depths, --params or --models")

    @staticmethod
    def small() -> "BenchConfig":
        return BenchConfig(widths=[128, 512], depths=[2, 8, 32], params=[1e5, 1e6], width=256, depth=4,
                           batch=128, steps=5, warmup=2, gpt_depths=[2, 8], gpt_dim=64, ctx=64, gpt_batch=4)

    @staticmethod
    def full() -> "BenchConfig":
        return BenchConfig(widths=[1024, 4096, 8192], depths=[2, 8, 32, 128], params=[1e7, 1e8, 1e9],
                           width=2048, depth=8, batch=1024, steps=20, warmup=5, dtype="bf16",
                           gpt_params=[1e7, 1e8, 1e9], gpt_depths=[4, 16, 32], gpt_dim=1024, ctx=1024, gpt_batch=8)


#: transformer presets: parameter count -> (layers, dim, heads); the blocks hold 12 * layers * dim^2
#: weights (10.6M, 99.1M, 1.007B), heads of 64 (1e7, 1e8) or 128 (1e9) dimensions
GPT_PRESETS = {1e7: (6, 384, 6), 1e8: (14, 768, 12), 1e9: (20, 2048, 16)}


def gpt_spec(layers: int, dim: int, heads: int, ctx: int) -> str:
    return f"gpt:layers={layers},dim={dim},heads={heads},ctx={ctx}"


def parse_rule(text: str) -> tuple[str, str]:
    if text.endswith("]") and "[" in text:
        name, mode = text[:-1].split("[", 1)
        return name, mode
    return text, "cache"


def cases(cfg: BenchConfig) -> list[dict]:
    """Every (rule, device, model) of the sweep; each model is mlp:WIDTH*DEPTH."""
    models = []
    for w in cfg.widths:
        models.append(("width", w, cfg.depth))
    for d in cfg.depths:
        models.append(("depth", cfg.width, d))
    for p in cfg.params:
        w = max(64, int(round(math.sqrt(p / cfg.depth) / 64)) * 64)
        models.append(("params", w, cfg.depth))
    specs = [(sweep, f"mlp:{w}*{d}", w, d) for sweep, w, d in models]
    specs += [("model", spec, None, None) for spec in cfg.models]
    for p in cfg.gpt_params:
        layers, dim, heads = GPT_PRESETS[p]
        specs.append(("gpt-params", gpt_spec(layers, dim, heads, cfg.ctx), None, layers))
    for d in cfg.gpt_depths:
        specs.append(("gpt-depth", gpt_spec(d, cfg.gpt_dim, max(1, cfg.gpt_dim // 64), cfg.ctx), None, d))
    seen, out = set(), []
    for sweep, spec, w, d in specs:
        for rule in cfg.rules:
            for dev in cfg.devices:
                key = (sweep, spec, rule, dev)
                if key not in seen:
                    seen.add(key)
                    out.append({"sweep": sweep, "model": spec, "width": w, "depth": d, "rule": rule, "device": dev})
    return out


def mlp_flops(rule: str, batch: int, dims: list[int], n_classes: int) -> float:
    """FLOPs of one training step of an MLP with layer sizes ``dims`` (input ... output)."""
    mats = [a * b for a, b in zip(dims, dims[1:])]
    fwd = 2 * batch * sum(mats)
    name, _ = parse_rule(rule)
    if name in ("bp", "fa", "usf", "ldef"):  # weight grads + signals carried down (not into the input)
        return fwd + 2 * batch * sum(mats) + 2 * batch * sum(mats[1:])
    proj = 2 * batch * n_classes * sum(dims[1:-1])  # DFA-family projections
    extra = fwd if parse_rule(rule)[1] == "recompute" else 0
    return fwd + 2 * batch * sum(mats) + proj + extra


def gpt_flops(rule: str, batch: int, ctx: int, layers: int, dim: int, vocab: int, mlp: float = 4.0) -> float:
    """FLOPs of one training step of :class:`~neurosal.zoo.GPT` on ``batch`` windows of ``ctx`` tokens."""
    tokens = batch * ctx
    per_token = 2 * layers * (4 + 2 * mlp) * dim * dim + 2 * layers * ctx * dim + 2 * dim * vocab  # causal: T/2 keys
    fwd = tokens * per_token
    name, memory = parse_rule(rule)
    total = 3 * fwd
    if name in ("dfa", "drtp", "sal"):
        total += 2 * tokens * vocab * dim * layers  # the error projected to every block's output
        if memory == "recompute":
            total += fwd - tokens * 2 * dim * vocab
    return total


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def matmul_peak(device, dtype, n: int | None = None) -> float:
    """Measured FLOP/s of a square matmul (the roofline we compare against)."""
    import torch

    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    reps = 10 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def resolve(accel: str):
    import torch

    return torch.device(accel if accel != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def measure(job: dict) -> dict:
    """One case, in this process: build, warm up, time ``steps`` steps, read the peak memory."""
    import torch

    if job["model"].startswith("gpt"):
        return measure_gpt(job)
    from .engine import block_output_shapes, train_step
    from .rules import make_rule
    from .substrates import apply_device, finish_step

    torch.manual_seed(0)
    dev = resolve(job["accel"])
    name, memory = parse_rule(job["rule"])
    n_classes = job["n_classes"]
    shape = (job["input_dim"],) if job["model"].startswith("mlp") else (1, 28, 28)
    rule = make_rule(name)
    net = rule.build(job["model"], shape, n_classes).to(dev)
    if job.get("device"):
        net = apply_device(net, job["device"], {}, 0)
    rule.setup(net, block_output_shapes(net, shape), n_classes, torch.Generator().manual_seed(1))
    rule.to(dev)
    model = torch.compile(net) if job.get("compile") and rule.autograd else net
    opt = torch.optim.SGD(list(net.parameters()) + [p for p in rule.parameters() if p.numel()], lr=1e-3)
    x = torch.randn(job["batch"], *shape, device=dev)
    y = torch.randint(0, n_classes, (job["batch"],), device=dev)
    amp = job.get("dtype") == "bf16"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            if rule.autograd:
                torch.nn.functional.cross_entropy(model(x), y).backward()
            else:
                train_step(net, rule, x, y, n_classes, memory)
        opt.step()
        finish_step(net)

    times, peak = _timed(step, job, dev)
    med = statistics.median(times)
    res = {"step_ms": 1000 * med, "samples_per_s": job["batch"] / med, "peak_mem_mb": peak / 2 ** 20,
           "activations_mb": retained_activation_bytes(net, rule, x, y, n_classes, memory) / 2 ** 20,
           "params": sum(p.numel() for p in net.parameters())}
    if job["width"]:  # analytic FLOPs for the mlp:W*D sweeps
        dims = [job["input_dim"]] + [job["width"]] * job["depth"] + [n_classes]
        res["flops_per_step"] = flops = mlp_flops(job["rule"], job["batch"], dims, n_classes)
        res["achieved_flops"] = flops / med
    return res


def _timed(step, job, dev) -> tuple[list[float], int]:
    """Run ``warmup + steps`` steps; the timed steps' seconds and the peak memory above the start."""
    import torch

    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = _rss()
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
    return times, peak


def measure_gpt(job: dict) -> dict:
    """One transformer case through the general engine (see the module docstring)."""
    import torch

    from .areas import AreaLinear
    from .train import loss_and_hits
    from .wrap import wrap
    from .zoo import build_zoo, gpt_options

    torch.manual_seed(0)
    dev = resolve(job["accel"])
    name, memory = parse_rule(job["rule"])
    o = gpt_options(job["model"])
    ctx, vocab, batch = o["ctx"], job["vocab"], job["gpt_batch"]
    net = build_zoo(job["model"], (ctx,), vocab).to(dev)
    wrapped = wrap(net, name, seed=1, memory=memory)
    model = torch.compile(wrapped) if job.get("compile") and wrapped.rule.autograd else wrapped
    opt = torch.optim.SGD(list(wrapped.parameters()), lr=1e-4)
    x = torch.randint(0, vocab, (batch, ctx), device=dev)
    y = torch.randint(0, vocab, (batch, ctx), device=dev)
    amp = job.get("dtype") == "bf16"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        if wrapped.rule.needs_target:
            wrapped.set_target(y)
        loss_and_hits(out.float(), y)[0].backward()
        opt.step()

    times, peak = _timed(step, job, dev)
    med = statistics.median(times)
    areas = [m for m in net.modules() if isinstance(m, AreaLinear)]
    loads = [m.take_usage() for m in areas]  # tokens per area over the warm-up and timed steps
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        act = wrapped_activation_bytes(wrapped, x, y)
    layers, dim = o["layers"], o["dim"]
    flops = gpt_flops(job["rule"], batch, ctx, layers, dim, vocab, o.get("mlp", 4.0))
    res = {"step_ms": 1000 * med, "samples_per_s": batch / med, "tokens_per_s": batch * ctx / med,
           "peak_mem_mb": peak / 2 ** 20, "activations_mb": act / 2 ** 20,
           "params": sum(p.numel() for p in net.parameters()), "flops_per_step": flops,
           "achieved_flops": flops / med}
    if loads:  # per layer: the busiest area's tokens over an even split
        res["area_load_max_over_mean"] = max(max(u) * len(u) / max(1, sum(u)) for u in loads)
        res["dead_areas"] = sum(u.count(0) for u in loads)
    return res


def wrapped_activation_bytes(wrapped, x, y) -> int:
    """Bytes of activations one step of a wrapped (general) model keeps for its update: what autograd
    saves in the forward (unique storages, parameters excluded); recomputing, plus the largest feedback
    block's own, alive while it is recomputed."""
    import torch

    from .train import loss_and_hits

    seen, count = storage_counter(wrapped.parameters())
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        out = wrapped(x)
        loss_and_hits(out.float(), y)
    wrapped.zero_grad(set_to_none=True)
    total = sum(seen.values())
    if wrapped.memory == "recompute" and not wrapped.chain:
        total += max_block_bytes(wrapped, x)
    return total


def max_block_bytes(wrapped, x) -> int:
    """Activation bytes of the largest feedback block, recomputed when its signal arrives."""
    import torch

    blocks = [wrapped.model.get_submodule(n) for n in wrapped.point_names]
    inputs = {}
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.setdefault(m, a[0].detach())) for b in blocks]
    with torch.no_grad():  # one pass captures every block's input
        wrapped.model(x)
    for h in hooks:
        h.remove()
    sizes = []
    for block in blocks:
        seen, count = storage_counter(block.parameters())
        run = block.forward.original if hasattr(block.forward, "original") else block
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            run(inputs[block])
        sizes.append(sum(seen.values()))
    return max(sizes)


def storage_counter(exclude) -> tuple[dict, callable]:
    """``(seen, count)``: ``count(t)`` records the bytes of each distinct storage of the tensors in ``t``
    (a tensor, or nested tuples/lists of them) in ``seen``, skipping the storages of ``exclude``
    (the parameters); it returns ``t``, so it serves as a saved-tensors pack hook too."""
    import torch

    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen: dict[int, int] = {}

    def count(t):
        if isinstance(t, torch.Tensor):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in skip:
                seen[ptr] = t.untyped_storage().nbytes()
        elif isinstance(t, (tuple, list)):
            for v in t:
                count(v)
        return t

    return seen, count


def retained_activation_bytes(net, rule, x, y, n_classes: int, memory: str) -> int:
    """Exact bytes of activations a training step keeps alive for its update (parameters excluded):
    BP -- the tensors autograd saves for backward (unique storages); the local rules -- what the
    engine caches per block (inputs and tail state) plus the projection of the error for all layers
    (cache mode), or the largest single block (recompute mode). Independent of the allocator."""
    import torch

    from .engine import forward_cached

    seen, count = storage_counter(net.parameters())

    if rule.autograd:
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            torch.nn.functional.cross_entropy(net(x), y)  # the graph (and what it saved) is dropped at once
        return sum(seen.values())
    with torch.no_grad():
        _, cache = forward_cached(net, x)
    if memory == "recompute" and rule.direct:
        per_block = []
        for c in cache:
            seen.clear()
            count([c.x, c.state])
            per_block.append(sum(seen.values()))
        return max(per_block) * 2  # one block's input and state, plus its successor's
    for c in cache:
        count([c.x, c.state])
    extra = 0
    if rule.direct and hasattr(rule, "B"):
        extra = x.shape[0] * rule.B.shape[1] * x.element_size()  # the one-matmul projection
    return sum(seen.values()) + extra


def run_isolated(job: dict) -> dict:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "neurosal.bench", json.dumps(job)], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0:
        return {"error": error_line(r.stderr) or f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def error_line(stderr: str) -> str:
    """The line of a worker's traceback that names its exception (torch adds hints after it, e.g. "Set
    TORCHDYNAMO_VERBOSE=1 ..."), else its last line."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", ln):
            return ln
    return lines[-1] if lines else ""


def warm_allocator() -> None:
    """Allocate and free one 16 MB block: glibc's mmap threshold rises to it, so MB-sized tensors are kept
    and reused instead of mapped and page-faulted anew each time -- the state of any training process that
    has loaded a dataset. Benchmarks call it first so that they time the computation, not a cold heap."""
    import torch

    torch.empty(16 * 2**20 // 4)


def machine_info(device) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor(), "cpu_count": os.cpu_count(), "device": str(device),
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    gpu_count=torch.cuda.device_count())
    return info


def save_result(path: str | Path, name: str, device, **payload) -> dict:
    """Write a benchmark's JSON: its name, the machine it ran on, and its payload (rows, settings...)."""
    result = {"benchmark": name, "machine": machine_info(device), **payload}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return result


def run(cfg: BenchConfig, out: str | Path, progress: bool = True) -> dict:
    import torch

    cfg.validate()
    out = ensure_writable_dir(Path(out))
    dev = resolve(cfg.accel)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NeurosalError("--accel cuda asked for, but torch sees no CUDA device")
    peak = matmul_peak(dev, torch.bfloat16 if cfg.dtype == "bf16" else torch.float32)
    rows = []
    for case in cases(cfg):
        job = {**case, "batch": cfg.batch, "steps": cfg.steps, "warmup": cfg.warmup, "accel": str(dev),
               "dtype": cfg.dtype, "compile": cfg.compile, "input_dim": cfg.input_dim, "n_classes": cfg.n_classes,
               "vocab": cfg.vocab, "gpt_batch": cfg.gpt_batch}
        res = run_isolated(job)
        row = {**case, **res}
        if "achieved_flops" in res:
            row["flops_fraction"] = res["achieved_flops"] / peak
        rows.append(row)
        if progress:
            frac = f"{100 * row['flops_fraction']:5.1f}% of peak" if "flops_fraction" in row else ""
            msg = res.get("error") or f"{res['step_ms']:9.2f} ms {res['peak_mem_mb']:9.1f} MB {frac}"
            print(f"{case['sweep']:6s} {case['model']:16s} {case['rule']:15s} "
                  f"{case['device'] or 'float':10s} {msg}", flush=True)
    _ratios(rows)
    result = {"benchmark": "neurosal bench", "machine": machine_info(dev), "settings": asdict(cfg),
              "matmul_peak_flops": peak, "rows": rows}
    atomic_write_text(out / "bench.json", json.dumps(result, indent=2))
    atomic_write_text(out / "bench.md", markdown(result))
    plot(rows, out / "bench.png")
    return result


def _ratios(rows: list[dict]) -> None:
    base = {(r["sweep"], r["model"], r["device"]): r for r in rows if r["rule"] == "bp" and "step_ms" in r}
    for r in rows:
        b = base.get((r["sweep"], r["model"], r["device"]))
        if b and "step_ms" in r:
            r["time_vs_bp"] = r["step_ms"] / b["step_ms"]
            r["mem_vs_bp"] = r["peak_mem_mb"] / b["peak_mem_mb"] if b["peak_mem_mb"] > 0 else None
            r["act_vs_bp"] = r["activations_mb"] / b["activations_mb"] if b["activations_mb"] > 0 else None


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# neurosal bench — {m.get('gpu', m['processor'] or m['platform'])} ({m['device']}), torch {m['torch']}",
             "", f"matmul peak: {result['matmul_peak_flops'] / 1e9:.1f} GFLOP/s; dtype {result['settings']['dtype']}; "
             f"batch {result['settings']['batch']}", "",
             "peak MB: CUDA allocator peak, or peak RSS on CPU (allocator-dependent); act MB: the exact bytes of "
             "activations the step keeps for its update.", "",
             "| sweep | model | rule | device | step ms | samples/s | peak MB | act MB | GFLOP/s | % peak | time/BP | mem/BP | act/BP |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['sweep']} | {r['model']} | {r['rule']} | {r['device'] or 'float'} "
                         f"| error: {r['error']} | | | | | | | | |")
            continue
        mem, act = r.get("mem_vs_bp"), r.get("act_vs_bp")
        gflops = f"{r['achieved_flops'] / 1e9:.1f} | {100 * r['flops_fraction']:.1f}" if "achieved_flops" in r else "– | –"
        lines.append(f"| {r['sweep']} | {r['model']} | {r['rule']} | {r['device'] or 'float'} | "
                     f"{r['step_ms']:.2f} | {r['samples_per_s']:.0f} | {r['peak_mem_mb']:.1f} | "
                     f"{r['activations_mb']:.1f} | {gflops} | {r.get('time_vs_bp', float('nan')):.2f} | "
                     f"{mem if mem is None else f'{mem:.2f}'} | {act if act is None else f'{act:.2f}'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for rule in dict.fromkeys(r["rule"] for r in rows):
        pts = sorted((r["depth"], r) for r in rows if r["rule"] == rule and r["sweep"] == "depth" and "step_ms" in r
                     and not r["device"])
        if pts:
            a1.plot([d for d, _ in pts], [r["activations_mb"] for _, r in pts], marker="o", label=rule)
            a2.plot([d for d, _ in pts], [r["step_ms"] for _, r in pts], marker="o", label=rule)
    a1.set(xlabel="depth", ylabel="activations kept for the update (MB)", xscale="log")
    a2.set(xlabel="depth", ylabel="step time (ms)", xscale="log", yscale="log")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend()
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":  # worker mode: one case, JSON result on the last line
    print(json.dumps(measure(json.loads(sys.argv[1]))))
