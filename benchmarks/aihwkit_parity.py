"""neurosal's analog substrate side by side with IBM aihwkit, where the two models overlap.

Same digits split, same 64-H-10 ReLU net, the same initial weights copied into both, the same batch
order, plain SGD (lr 0.1, batch 32), bp; aihwkit's forward/backward IO set to perfect (these presets
have no converters) and its bias digital, as ours. Pairs (neurosal preset | aihwkit device):

    float        | torch float (no tiles)
    ideal        | FloatingPointDevice
    linear-256   | ConstantStepDevice, dw_min = w_max/256 (no noise)
    softbounds   | SoftBoundsDevice, dw_min = w_max/200 at w = 0, 10% cycle-to-cycle, 10% device spread

w_max per layer is neurosal's (w_range / sqrt(fan_in) for these default-initialised layers), given to
aihwkit as its device bound. Both update modes of neurosal run: the default (the optimiser's step
turned into stochastically rounded pulse counts) and pulse coincidence (bl = 31, like aihwkit's default
pulsed update).

Semantics that differ on purpose (so parity is not expected to be bitwise): neurosal holds a weight in
a differential pair of two bounded devices (G+ - G-), aihwkit in one device spanning [-w_max, w_max];
soft bounds therefore saturate towards +-w_max through two devices, not one.

aihwkit is a benchmark-only dependency, never imported by the package (build recipe:
../shared/methods.md). Without it the script says so and exits 0 after the neurosal half.

    python benchmarks/aihwkit_parity.py --out benchmarks/reports/analog
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from neurosal.bench import warm_allocator  # noqa: E402
from neurosal.data import load_dataset  # noqa: E402
from neurosal.engine import train_step  # noqa: E402
from neurosal.rules import make_rule  # noqa: E402
from neurosal.substrates import finish_step  # noqa: E402
from hw_models.plugin import SUBSTRATE  # noqa: E402  (directly: the benchmark venv may not install neurosal)

PAIRS = [
    ("float", None, {}, "float"),
    ("ideal", "ideal", {}, "FloatingPointDevice"),
    ("linear-256", "linear-256", {}, "ConstantStepDevice"),
    ("softbounds", "softbounds", {}, "SoftBoundsDevice"),
]


def init_weights(hidden: int, seed: int):
    torch.manual_seed(seed)
    net = make_rule("bp").build(f"mlp:{hidden}", (1, 8, 8), 10)
    return [(b.op.weight.detach().clone(), b.op.bias.detach().clone()) for b in net.blocks]


def batches(n: int, batch: int, epoch: int, seed: int):
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(n, generator=g)
    return [perm[i:i + batch] for i in range(0, n, batch)]


def run_neurosal(device, options, weights, data, hidden, epochs, seed, lr, batch, stream=0):
    """``stream``: which noise realisation the arrays draw (their generator's seed; the weights and
    batches stay those of ``seed``)."""
    rule = make_rule("bp")
    net = rule.build(f"mlp:{hidden}", (1, 8, 8), 10)
    for blk, (w, b) in zip(net.blocks, weights):
        blk.op.weight.data.copy_(w)
        blk.op.bias.data.copy_(b)
    if device:
        net = SUBSTRATE.apply(net, device, options, seed + 1000 * stream)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    times = []
    for ep in range(1, epochs + 1):
        t0 = time.perf_counter()
        for idx in batches(len(data.x_train), batch, ep, seed):
            opt.zero_grad(set_to_none=True)
            train_step(net, rule, data.x_train[idx], data.y_train[idx], 10)
            opt.step()
            finish_step(net)
        times.append(time.perf_counter() - t0)
    with torch.no_grad():
        acc = float((net(data.x_test).argmax(1) == data.y_test).float().mean())
    return acc, sum(times) / len(times)


def aihwkit_config(kind: str, w_max: float):
    from aihwkit.simulator.configs import FloatingPointRPUConfig, SingleRPUConfig
    from aihwkit.simulator.configs.devices import ConstantStepDevice, FloatingPointDevice, SoftBoundsDevice

    if kind == "FloatingPointDevice":
        cfg = FloatingPointRPUConfig(device=FloatingPointDevice())
    else:
        common = dict(w_max=w_max, w_min=-w_max, w_max_dtod=0.0, w_min_dtod=0.0, up_down=0.0, up_down_dtod=0.0)
        if kind == "ConstantStepDevice":
            dev = ConstantStepDevice(dw_min=w_max / 256, dw_min_dtod=0.0, dw_min_std=0.0, **common)
        else:
            dev = SoftBoundsDevice(dw_min=w_max / 200, dw_min_dtod=0.1, dw_min_std=0.1, **common)
        cfg = SingleRPUConfig(device=dev)
        cfg.forward.is_perfect = True
        cfg.backward.is_perfect = True
        cfg.update.desired_bl = 31
    cfg.mapping.digital_bias = True
    cfg.mapping.weight_scaling_omega = 0.0
    return cfg


def run_aihwkit(kind, weights, data, hidden, epochs, seed, lr, batch):
    from aihwkit.nn import AnalogLinear, AnalogSequential
    from aihwkit.optim import AnalogSGD

    w_maxes = [4 / math.sqrt(64), 4 / math.sqrt(hidden)]
    torch.manual_seed(seed)
    if kind == "float":
        model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
        layers = [model[0], model[2]]
        for layer, (w, b) in zip(layers, weights):
            layer.weight.data.copy_(w)
            layer.bias.data.copy_(b)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        l1 = AnalogLinear(64, hidden, rpu_config=aihwkit_config(kind, w_maxes[0]))
        l2 = AnalogLinear(hidden, 10, rpu_config=aihwkit_config(kind, w_maxes[1]))
        for layer, (w, b) in zip((l1, l2), weights):
            layer.set_weights(w, b)
        model = AnalogSequential(l1, torch.nn.ReLU(), l2)
        opt = AnalogSGD(model.parameters(), lr=lr)
        opt.regroup_param_groups(model)
    x_train, x_test = data.x_train.reshape(len(data.x_train), -1), data.x_test.reshape(len(data.x_test), -1)
    times = []
    for ep in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        for idx in batches(len(x_train), batch, ep, seed):
            opt.zero_grad()
            F.cross_entropy(model(x_train[idx]), data.y_train[idx]).backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        acc = float((model(x_test).argmax(1) == data.y_test).float().mean())
    return acc, sum(times) / len(times)


def markdown(result: dict) -> str:
    lines = [f"# neurosal vs aihwkit {result['aihwkit'] or '(not installed)'}", "",
             f"digits, 64-{result['hidden']}-10 ReLU, bp, plain SGD lr {result['lr']}, batch {result['batch']}, "
             f"{result['epochs']} epochs, seeds {result['seeds']}; the same initial weights and batch order "
             f"in both; aihwkit IO perfect, bias digital. Machine: {result['machine']}."
             + (f" Each side ran {result['repeats']} times per seed and device pair (aihwkit's generators are not "
                "seeded by torch; ours drew another noise stream each time, the initial weights and batches "
                "kept): accuracy is the mean over all runs, in brackets the lowest and highest mean of one "
                "repeat over the seeds." if result.get("repeats", 1) > 1 else ""), "",
             "| pair (neurosal \\| aihwkit) | neurosal mode | accuracy neurosal / aihwkit (%) | difference (points) "
             "| epoch time neurosal / aihwkit |", "|---|---|---|---|---|"]
    if not result["rows"]:  # --widths-only
        lines = lines[:2] + [f"Epoch times only; machine: {result['machine']}."]
    for r in result["rows"]:
        a = r.get("aihwkit_acc")
        diff = f"{100 * (r['neurosal_acc'] - a):+.2f}" if a is not None else "--"
        ratio = f"{r['neurosal_epoch_s'] / r['aihwkit_epoch_s']:.2f}x" if r.get("aihwkit_epoch_s") else "--"
        def spread(means):  # the spread of a side's repeated runs (aihwkit: identical; ours: noise streams)
            return f" ({100 * min(means):.2f}-{100 * max(means):.2f})" if len(means or []) > 1 else ""
        aa = (f"{100 * a:.2f}" + spread(r.get("aihwkit_repeat_means"))) if a is not None else "--"
        na = f"{100 * r['neurosal_acc']:.2f}" + spread(r.get("neurosal_repeat_means"))
        pair = r["pair"].replace("|", "\\|")
        lines.append(f"| {pair} | {r['mode']} | {na} / {aa} | {diff} | {ratio} |")
    if result.get("widths"):
        lines += ["", "Epoch time against hidden width (seed 0):", "",
                  "| hidden | pair | neurosal mode | neurosal s/epoch | aihwkit s/epoch | ratio |", "|---|---|---|---|---|---|"]
        for r in result["widths"]:
            pair = r["pair"].replace("|", "\\|")
            lines.append(f"| {r['hidden']} | {pair} | {r['mode']} | {r['neurosal_epoch_s']:.3f} | "
                         f"{r['aihwkit_epoch_s']:.3f} | {r['neurosal_epoch_s'] / r['aihwkit_epoch_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--widths", default="512,2048", help="extra hidden widths for the epoch-time sweep")
    ap.add_argument("--width-epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1,
                    help="run aihwkit's half this many times per seed: its C++ generators are not seeded by "
                         "torch, so identical runs differ; the table gives the spread of its seed means")
    ap.add_argument("--widths-only", action="store_true",
                    help="only the epoch-time sweep (with --widths), also timing fused=True; writes "
                         "aihwkit_widths.json/.md beside the parity table instead of replacing it")
    ap.add_argument("--out", default="benchmarks/reports/analog")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    warm_allocator()  # as the other benches (neurosal/bench.py): timings of a warmed process
    try:
        import aihwkit
        version = aihwkit.__version__
    except ImportError:
        version = None
        print("aihwkit is not importable here: only neurosal's half runs (build recipe: shared/methods.md)")
    data = load_dataset("digits")
    seeds = [int(s) for s in args.seeds.split(",")]
    lr, batch = 0.1, 32
    rows = []
    for pair, device, options, kind in ([] if args.widths_only else PAIRS):
        modes = [("default", {})] + ([("coincidence", {"pulses": "coincidence"})] if device else [])
        for mode, extra in modes:
            accs, times, a_accs, a_times = [], [], [], []
            repeats = args.repeats if (version and device) else 1  # float is deterministic in both
            for seed in seeds:
                w = init_weights(args.hidden, seed)
                for stream in range(repeats):  # as many noise realisations as aihwkit's repeats
                    acc, t = run_neurosal(device, {**options, **extra}, w, data, args.hidden, args.epochs, seed,
                                          lr, batch, stream)
                    accs.append(acc)
                    times.append(t)
                if version:
                    for _ in range(repeats):
                        acc, t = run_aihwkit(kind, w, data, args.hidden, args.epochs, seed, lr, batch)
                        a_accs.append(acc)
                        a_times.append(t)
            row = {"pair": f"{pair} | {kind}", "mode": mode, "neurosal_acc": sum(accs) / len(accs),
                   "neurosal_acc_seeds": accs, "neurosal_epoch_s": sum(times) / len(times),
                   "neurosal_repeat_means": [sum(accs[i::repeats]) / len(seeds) for i in range(repeats)]}
            if version:
                # a_accs is seed-major: seed 0's repeats, then seed 1's; a repeat's mean is over the seeds
                run_means = [sum(a_accs[i::repeats]) / len(seeds) for i in range(repeats)]
                row.update(aihwkit_acc=sum(a_accs) / len(a_accs), aihwkit_acc_seeds=a_accs,
                           aihwkit_repeat_means=run_means, aihwkit_epoch_s=sum(a_times) / len(a_times))
            rows.append(row)
            print(json.dumps(row), flush=True)
    widths = []
    if version:
        for hidden in [int(w) for w in args.widths.split(",") if w]:
            for pair, device, options, kind in PAIRS[2:]:
                modes = [("default", {}), ("coincidence", {"pulses": "coincidence"})]
                if args.widths_only:
                    modes = [modes[0], ("default, fused", {"fused": True}), modes[1],
                             ("coincidence, fused", {"pulses": "coincidence", "fused": True})]
                for mode, extra in modes:
                    w = init_weights(hidden, 0)
                    if extra.get("fused"):  # compile first (the kernels are shared by every width)
                        run_neurosal(device, {**options, **extra}, w, data, hidden, 1, 0, lr, batch)
                    _, t = run_neurosal(device, {**options, **extra}, w, data, hidden, args.width_epochs, 0, lr, batch)
                    _, ta = run_aihwkit(kind, w, data, hidden, args.width_epochs, 0, lr, batch)
                    widths.append({"hidden": hidden, "pair": f"{pair} | {kind}", "mode": mode,
                                   "neurosal_epoch_s": t, "aihwkit_epoch_s": ta})
                    print(json.dumps(widths[-1]), flush=True)
    import platform

    result = {"benchmark": "aihwkit_parity", "aihwkit": version, "torch": torch.__version__,
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
              "hidden": args.hidden, "epochs": args.epochs, "seeds": seeds, "repeats": args.repeats,
              "lr": lr, "batch": batch,
              "rows": rows, "widths": widths}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "aihwkit_widths" if args.widths_only else "aihwkit_parity"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
