"""Which normalisation before SAL's hidden activations? A sweep of candidates against the report's rows.

SAL's default ``norm="rms"`` (per-sample RMS scaling, :class:`neurosal.layers.RMSScale`) wins on the image
sets and MNIST-1D but costs wine / breast-cancer / mnist-5k against DFA (benchmarks/reports/sal). This
script tries normalisations that are *not* SAL options -- they replace ``SAL.hidden_tail`` for the run
only -- on the report's datasets, models, epochs and seeds, and prints each one's mean against the
report's bp / dfa / sal means (``results.json``). The outcome is in benchmarks/reports/sal/README.md.

    python benchmarks/sal_norm_sweep.py --datasets wine,breast-cancer --variants none,detached
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import sal_report  # noqa: E402
from neurosal.layers import RMSClip, RMSScale  # noqa: E402
from neurosal.rules.sal import SAL  # noqa: E402


class SoftRMS(nn.Module):
    """``a / sqrt(mean(a^2) + 1)``: a smooth rms_clip (about ``a`` when small, ``a / rms`` when large)."""

    def forward(self, a):
        return a * torch.rsqrt(a.pow(2).mean(dim=-1, keepdim=True) + 1.0)


class HalfRMS(nn.Module):
    """``a / rms(a)^0.5``: half-way between no scaling and RMS scaling."""

    def forward(self, a):
        return a * (a.pow(2).mean(dim=-1, keepdim=True) + 1e-6).pow(-0.25)


class DetachedRMS(nn.Module):
    """RMS scaling whose derivative treats the RMS as a constant: ``1/rms`` without the projection
    ``I - a a^T / (n rms^2)`` that removes the signal's radial component."""

    def forward(self, a):
        return a * torch.rsqrt(a.pow(2).mean(dim=-1, keepdim=True) + 1e-6).detach()


class BatchRMS(nn.Module):
    """One scale per layer: the batch's RMS in training (a constant to the derivative), its running
    average in evaluation; keeps each sample's own magnitude."""

    def __init__(self, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("ms", torch.ones(()))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    def forward(self, a):
        if self.training:
            ms = a.detach().pow(2).mean()
            self.ms.lerp_(ms, self.momentum if bool(self.ready) else 1.0)
            self.ready.fill_(True)
            return a * torch.rsqrt(ms + 1e-6)
        return a * torch.rsqrt(self.ms + 1e-6)


# name -> the norm module for the i-th hidden layer (0-based) of the report's 2-hidden-layer MLPs
VARIANTS = {
    "rms": lambda i: RMSScale(),
    "none": lambda i: None,
    "rms_clip": lambda i: RMSClip(),
    "soft": lambda i: SoftRMS(),
    "half": lambda i: HalfRMS(),
    "detached": lambda i: DetachedRMS(),
    "batch": lambda i: BatchRMS(),
    "skip_first": lambda i: None if i == 0 else RMSScale(),
    "skip_last": lambda i: None if i == 1 else RMSScale(),
}


def use(variant: str) -> None:
    """Replace SAL's hidden tail for the following runs (every report model has 2 hidden layers)."""
    calls = [0]

    def tail(self, activation):
        norm = VARIANTS[variant](calls[0] % 2)
        calls[0] += 1
        return nn.Sequential(norm, activation) if norm is not None else activation

    SAL.hidden_tail = tail


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="digits,mnist-5k,fashion-mnist,mnist1d,iris,wine,breast-cancer")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--baseline", default=str(Path(__file__).parent / "reports/sal/results.json"))
    p.add_argument("--out", help="write dataset -> variant -> per-seed accuracies here (JSON)")
    args = p.parse_args(argv)
    datasets, variants = args.datasets.split(","), args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; use {', '.join(VARIANTS)}")
    out: dict = {}
    for v in variants:
        use(v)
        sal_report.VARIANTS[f"sal[{v}]"] = ("sal", {})
        accs, _ = sal_report.run_suite(datasets, [f"sal[{v}]"], list(range(args.seeds)), False)
        for ds in datasets:
            out.setdefault(ds, {})[v] = accs[ds][f"sal[{v}]"]
    base = json.loads(Path(args.baseline).read_text())["suite"]
    for ds in datasets:
        b = {r: statistics.mean(base[ds][r]) for r in ("bp", "dfa")}
        cells = [f"{v} {statistics.mean(a):.2f} (dfa {statistics.mean(a) - b['dfa']:+.2f}, "
                 f"bp {statistics.mean(a) - b['bp']:+.2f})" for v, a in out[ds].items()]
        print(f"{ds:14s} bp {b['bp']:.2f} dfa {b['dfa']:.2f} | " + " | ".join(cells))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
