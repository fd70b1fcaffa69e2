"""Analog convolutions against float ones, side by side in one run: forward + backward of one layer.

An analog convolution with converters reads patch by patch (each patch its own DAC scale,
``hw_models.analog.patch_products``); without converters it is the float convolution plus read noise.
Cases: devices without converters (linear-256), with 8-bit DAC/ADC and read noise (rram-like); the
rram-like read alone, and the same read written through im2col + one matmul (here, without the read
noise: the route the patch-by-patch read replaced), each timed in interleaved rounds (medians).

    python benchmarks/analog_conv_bench.py --out benchmarks/reports/analog
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hw_models.analog import convert, dac_levels  # noqa: E402
from neurosal.bench import machine_info, warm_allocator  # noqa: E402

SHAPES = [  # (batch, channels in, side, channels out, kernel, groups)
    (128, 16, 14, 32, 3, 1), (32, 64, 32, 64, 3, 1), (32, 96, 28, 96, 3, 96),
]


def im2col_read(layer, x):
    """The rram-like read written the im2col way (no read noise; the comparison is the data movement)."""
    t = layer.tiles
    cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    b, g = x.shape[0], layer.groups
    cols = cols.view(b, g, -1, cols.shape[-1])
    scale = cols.abs().amax(2, keepdim=True).clamp_min_(1e-12)
    levels, unit = dac_levels(t.cfg)
    cols.mul_(levels / scale).round_()
    y = torch.matmul(layer.weight.detach().reshape(g, layer.out_channels // g, -1), cols)
    full = t.cfg.adc_range * t.w_max * t.fan_in ** 0.5 / unit
    n = 2 ** (t.cfg.adc_bits - 1) - 1
    y.mul_(n / full).clamp_(-n, n).round_().mul_(scale * (unit * full / n))
    return y


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/reports/analog")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warm_allocator()
    rows = []
    for b, cin, side, cout, k, g in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(b, cin, side, side)
        ref = nn.Conv2d(cin, cout, k, padding=k // 2, groups=g)
        layers = {"float": ref}
        for dev in ("linear-256", "rram-like"):
            m = nn.Conv2d(cin, cout, k, padding=k // 2, groups=g)
            m.load_state_dict(ref.state_dict())
            layers[dev] = convert(nn.Sequential(m), dev)[0].train()
        rram = layers["rram-like"]

        def fwd_bwd(layer):
            return lambda: layer(x).sum().backward()
        cases = {name: fwd_bwd(layer) for name, layer in layers.items()}
        cases["rram-like read"] = lambda: rram.tiles.read_conv(0, x, rram.stride, rram.padding, rram.dilation,
                                                               rram.groups)
        cases["rram-like read, im2col"] = lambda: im2col_read(rram, x)
        times = {name: [] for name in cases}
        for fn in cases.values():
            fn()
        for _ in range(args.rounds):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
        ms = {name: statistics.median(v) for name, v in times.items()}
        row = {"shape": f"{b}x{cin}x{side}x{side} -> {cout}, k{k}, groups {g}", "ms": ms,
               "linear-256 / float": ms["linear-256"] / ms["float"], "rram-like / float": ms["rram-like"] / ms["float"],
               "im2col / patch read": ms["rram-like read, im2col"] / ms["rram-like read"]}
        rows.append(row)
        print(row, flush=True)
    result = {"benchmark": "analog_conv_bench", "machine": machine_info(torch.device("cpu")),
              "threads": args.threads, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import json

    (out / "analog_conv_bench.json").write_text(json.dumps(result, indent=1))
    lines = ["# Analog convolutions against float (`benchmarks/analog_conv_bench.py`)", "",
             f"One layer, forward + backward, {args.threads} thread(s), medians of {args.rounds} interleaved rounds "
             "(ms). 'read': the rram-like array read alone; 'im2col': the same read through im2col + one "
             "matmul (without its read noise), the route the patch-by-patch read replaced.", "",
             "| layer | float | linear-256 | rram-like | rram-like / float | read | read, im2col | im2col / read |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["ms"]
        lines.append(f"| {r['shape']} | {m['float']:.2f} | {m['linear-256']:.2f} | {m['rram-like']:.2f} | "
                     f"{r['rram-like / float']:.2f}x | {m['rram-like read']:.2f} | {m['rram-like read, im2col']:.2f} | "
                     f"{r['im2col / patch read']:.2f}x |")
    (out / "analog_conv_bench.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'analog_conv_bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
