"""BioTorch's published Fashion-MNIST LeNet errors next to ours, and ResNet-20 on Fashion-MNIST.

BioTorch (Sanfiz & Akrout 2021, ``Benchmarks.md``) reports the top-1 error of LeNet-MNIST on Fashion-
MNIST: BP 9.2, FA 13.06, DFA 12.81, uSF 9.69, brSF 10.02, frSF 9.61 -- the best validation epoch, the
validation set being the 10k test set. Their recipe, as far as their published configs state it (the
LeNet SGD configs in ``benchmark_configs/cifar10/le_net/sgd/``; the Fashion-MNIST ones are not
published) and as their 0.0.16 package builds the model: LeNet-MNIST (conv 6@5x5-pool-conv 16@5x5-pool-
conv 120@5x5-fc 84-relu-fc 10, no padding) on 32x32 resized images normalised by mean 0.2859 / std
0.3530, Xavier-uniform weights and zero biases, SGD momentum 0.9, weight decay 1e-4, batch 128, x0.1 at
epochs 100/150/200 of 250, and **a learning rate per rule** (``THEIR_LR``): 0.1 for bp, usf, brsf and
frsf, 1e-3 for fa, 1e-4 for dfa. Their fa feedback is Xavier-uniform too (``fa:init=xavier`` here);
their dfa delivers the error at each conv layer's input through a kernel-shaped matrix, one value per
position (``dfa:positions=flatten`` is our nearest: one feedback row per unit).

Each rule goes through ``neurosal.wrap`` in a plain PyTorch loop; the statistic is theirs (best test
error over epochs) plus the last epoch's. ``--epochs`` shortens the schedule (milestones stay at 40/60/80
%); ``--lr`` replaces every rule's rate (the first, 15-epoch runs used 1e-2 for all).

Every run (rule, seed, epochs, rate) is one file under ``OUT/per_run/``: a checkpoint after every epoch
(resumed when the script is started again) and the finished run's JSON. Runs can therefore be spread over
processes (``--rules fa --threads 1`` in one, ``--rules dfa --threads 1`` in another) and sessions; the
report is written from whatever runs exist (``--report-only``), unfinished ones marked.

    python benchmarks/biotorch_repro.py --epochs 250 --seeds 1 --out benchmarks/reports/biotorch
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import neurosal  # noqa: E402
from neurosal.data import load_dataset  # noqa: E402
from neurosal.zoo import ResNet  # noqa: E402

PUBLISHED = {"bp": 9.2, "fa": 13.06, "dfa": 12.81, "usf": 9.69, "brsf": 10.02, "frsf": 9.61}
#: SGD learning rate of each rule in BioTorch's LeNet SGD configs (250 epochs)
THEIR_LR = {"bp": 0.1, "usf": 0.1, "brsf": 0.1, "frsf": 0.1, "fa": 1e-3, "dfa": 1e-4}
#: the rule options closest to BioTorch's layers (see the module docstring)
THEIR_OPTIONS = {"fa": "init=xavier", "dfa": "positions=flatten"}


class LeNetMNIST(nn.Module):
    """BioTorch's ``le_net_mnist`` architecture (written here; their package is not a dependency)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 120, 5), nn.ReLU(), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.features(x))


def data(size: int | None, limit: int | None):
    ds = load_dataset("fashion-mnist", None, limit)
    def prep(x):
        if size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return (x - 0.2859) / 0.3530
    return prep(ds.x_train), ds.y_train, prep(ds.x_test), ds.y_test


@torch.no_grad()
def error(model, x, y) -> float:
    model.eval()
    wrong = sum(int((model(x[i:i + 2000]).argmax(1) != y[i:i + 2000]).sum()) for i in range(0, len(x), 2000))
    return 100.0 * wrong / len(x)


def run_name(rule: str, seed: int, epochs: int, lr: float) -> str:
    return f"{rule.replace(':', '_').replace('=', '-').replace(',', '_')}-lr{lr:g}-e{epochs}-s{seed}"


def train(make, rule: str, seed: int, d, epochs: int, lr: float, batch: int = 128,
          ckpt: Path | None = None) -> dict:
    """One run; with ``ckpt`` a checkpoint is written after every epoch and a run found there resumes."""
    xtr, ytr, xte, yte = d
    torch.manual_seed(seed)
    name, _, opts = rule.partition(":")
    from neurosal.rules import parse_options

    options = parse_options(opts)
    lr = options.pop("lr", lr)
    model = neurosal.wrap(make(), name, seed=seed, **options)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    miles = [max(1, round(epochs * f)) for f in (0.4, 0.6, 0.8)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, miles, gamma=0.1)
    g = torch.Generator().manual_seed(seed)
    errs: list[float] = []
    losses: list[float] = []
    spent, diverged = 0.0, None
    if ckpt is not None and ckpt.exists():
        st = torch.load(ckpt, weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        g.set_state(st["gen"])
        errs, losses, spent = list(st["errors"]), list(st["losses"]), float(st["seconds"])
        print(f"  resumed {ckpt.name} at epoch {len(errs)}", flush=True)
    t0 = time.perf_counter()
    for _ in range(len(errs), epochs):
        model.train()
        total = torch.zeros(())
        for idx in torch.randperm(len(xtr), generator=g).split(batch):
            opt.zero_grad(set_to_none=True)
            out = model(xtr[idx])
            if model.rule.needs_target:
                model.set_target(ytr[idx])
            loss = F.cross_entropy(out, ytr[idx])
            loss.backward()
            opt.step()
            total = total + loss.detach()
        sched.step()
        errs.append(error(model, xte, yte))
        losses.append(float(total) / -(-len(xtr) // batch))
        if not math.isfinite(losses[-1]) or not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            diverged = len(errs)  # NaN/inf weights: every later epoch would read 90 % error
            break
        if len(errs) >= 10 and min(errs[-10:]) >= 89.5:
            diverged = len(errs)  # ten epochs at chance: a dead network, stopped rather than run on
            break
        if ckpt is not None:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "gen": g.get_state(), "errors": errs, "losses": losses,
                        "seconds": spent + time.perf_counter() - t0}, tmp)
            os.replace(tmp, ckpt)  # a run killed mid-save keeps its previous epoch
    return {"rule": rule, "seed": seed, "epochs": epochs, "lr": lr, "errors": errs, "train_loss": losses,
            "best": min(errs), "last": errs[-1], "seconds": spent + time.perf_counter() - t0,
            "diverged_at_epoch": diverged}


def load_runs(out: Path) -> tuple[list[dict], list[dict]]:
    """Finished runs (``per_run/*.json``) and unfinished ones (a checkpoint without its JSON)."""
    runs_dir = out / "per_run"
    done = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]
    names = {p.stem for p in runs_dir.glob("*.json")}
    partial = []
    for p in sorted(runs_dir.glob("*.pt")):
        if p.stem not in names:
            st = torch.load(p, weights_only=True)
            partial.append({"name": p.stem, "epochs_done": len(st["errors"]), "errors": list(st["errors"]),
                            "best": min(st["errors"]), "seconds": float(st["seconds"])})
    return done, partial


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rules", default=",".join(f"{r}:{THEIR_OPTIONS[r]}" if r in THEIR_OPTIONS else r
                                                for r in PUBLISHED),
                    help="rule[:option=value] list (default: their six, with the options nearest theirs)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=250)
    ap.add_argument("--lr", type=float, default=None,
                    help="one SGD rate for every rule (default: each rule's rate in BioTorch's configs)")
    ap.add_argument("--limit", type=int, default=None, help="first N training images")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--resnet-rules", default="",
                    help="e.g. bp,fa,usf,dfa (sal is refused on ResNet-20: it has no hidden Linear)")
    ap.add_argument("--resnet-epochs", type=int, default=2)
    ap.add_argument("--resnet-limit", type=int, default=10000)
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the runs found")
    ap.add_argument("--out", default="benchmarks/reports/biotorch")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "per_run").mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        d = data(32, args.limit)
        for rule in [r for r in args.rules.split(",") if r]:
            base = rule.partition(":")[0]
            lr = args.lr if args.lr is not None else THEIR_LR.get(base, 1e-3)
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                name = run_name(rule, seed, args.epochs, lr)
                if (out / "per_run" / f"{name}.json").exists():
                    continue
                r = train(LeNetMNIST, rule, seed, d, args.epochs, lr, ckpt=out / "per_run" / f"{name}.pt")
                r["limit"] = args.limit
                (out / "per_run" / f"{name}.json").write_text(json.dumps(r, indent=1))
                (out / "per_run" / f"{name}.pt").unlink(missing_ok=True)
                print(f"lenet {rule} lr {r['lr']:g} seed {seed}: best error {r['best']:.2f} "
                      f"(BioTorch {PUBLISHED.get(base, '-')})", flush=True)
        if args.resnet_rules:
            d = data(None, args.resnet_limit)
            res = json.loads((out / "resnet20.json").read_text()) if (out / "resnet20.json").exists() else {}
            res["settings"] = {"limit": args.resnet_limit, "epochs": args.resnet_epochs, "lr": 0.05}
            for rule in [r for r in args.resnet_rules.split(",") if r]:
                res[rule] = train(lambda: ResNet(20, 1, 10), rule, 0, d, args.resnet_epochs, 0.05)
                print(f"resnet20 {rule}: error {res[rule]['last']:.2f}", flush=True)
                (out / "resnet20.json").write_text(json.dumps(res, indent=1))
    write_report(out)
    return 0


def summary(runs: list[dict], key: str) -> tuple[float, float]:
    v = [r[key] for r in runs]
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def write_report(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done, partial = load_runs(out)
    groups: dict[tuple, list[dict]] = {}
    for r in done:
        groups.setdefault((r["rule"], r["lr"], r["epochs"], r.get("limit")), []).append(r)
    order = list(PUBLISHED)
    keys = sorted(groups, key=lambda k: (-k[2], order.index(k[0].partition(":")[0])
                                         if k[0].partition(":")[0] in order else 99, k[0], k[1]))
    results = {"lenet": [{"rule": k[0], "lr": k[1], "epochs": k[2], "limit": k[3],
                          "seeds": [r["seed"] for r in groups[k]], "best": [r["best"] for r in groups[k]],
                          "last": [r["last"] for r in groups[k]], "errors": [r["errors"] for r in groups[k]]}
                         for k in keys],
               "unfinished": partial, "published": PUBLISHED, "their_lr": THEIR_LR}
    if (out / "resnet20.json").exists():
        results["resnet20"] = json.loads((out / "resnet20.json").read_text())
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["# BioTorch's Fashion-MNIST LeNet benchmark, side by side", "",
             "LeNet-MNIST, 32x32 normalised Fashion-MNIST (60000 training images), SGD momentum 0.9, wd 1e-4, "
             "batch 128, x0.1 at 40/60/80 % of the epochs. BioTorch: 250 epochs at the rate of each rule's "
             "config (bp/usf/brsf/frsf 0.1, fa 1e-3, dfa 1e-4). Top-1 test error (%), mean ± std over the "
             "seeds; 'best' = best epoch on the test set (BioTorch's statistic), 'last' = final epoch. "
             "Every number is in `results.json`; one file per run under `per_run/`.", "",
             "| rule | lr | epochs | seeds | BioTorch | ours best | ours last | best − BioTorch | min/run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k in keys:
        runs = groups[k]
        bm, bs = summary(runs, "best")
        lm, ls = summary(runs, "last")
        pub = PUBLISHED.get(k[0].partition(":")[0])
        diff = f"{bm - pub:+.2f}" if pub is not None else ""
        mins = statistics.mean(r["seconds"] for r in runs) / 60
        ep = f"{k[2]}" + (f" ({k[3]} images)" if k[3] else "")
        stopped = [r["diverged_at_epoch"] for r in runs if r.get("diverged_at_epoch")]
        if stopped:  # NaN weights or ten epochs at chance: stopped there
            ep += f", {len(stopped)} stopped (epoch {', '.join(map(str, stopped))})"
        lines.append(f"| {k[0]} | {k[1]:g} | {ep} | {len(runs)} | {pub if pub is not None else '-'} | "
                     f"{bm:.2f} ± {bs:.2f} | {lm:.2f} ± {ls:.2f} | {diff} | {mins:.1f} |")
    if partial:
        lines += ["", "Unfinished runs (checkpoint in `per_run/`; the script resumes them):", ""]
        lines += [f"- `{p['name']}`: {p['epochs_done']} epochs done, best error so far {p['best']:.2f}"
                  for p in partial]
    res = results.get("resnet20")
    if res:
        st = res["settings"]
        lines += ["", "## ResNet-20 (BatchNorm) on Fashion-MNIST, short CPU run", "",
                  f"First {st['limit']} training images, {st['epochs']} epochs, SGD lr {st['lr']}, "
                  "1 seed, 28x28 inputs. Test error (%) per epoch.", "",
                  "| rule | errors per epoch | min/run |", "|---|---|---|"]
        for rule, r in res.items():
            if rule != "settings":
                lines.append(f"| {rule} | {', '.join(f'{e:.2f}' for e in r['errors'])} | {r['seconds'] / 60:.1f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k in keys:
        if k[2] < 50:
            continue
        mean = [statistics.mean(v) for v in zip(*(r["errors"] for r in groups[k]))]
        ax.plot(range(1, len(mean) + 1), mean,
                label=f"{k[0]} lr {k[1]:g} (BioTorch {PUBLISHED.get(k[0].partition(':')[0], '-')})")
    for p in partial:
        ax.plot(range(1, len(p["errors"]) + 1), p["errors"], ls="--", label=f"{p['name']} (unfinished)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)")
    ax.set_ylim(5, 40)
    ax.set_title("LeNet, Fashion-MNIST")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)

if __name__ == "__main__":
    raise SystemExit(main())
