"""SAL reproduction report: SAL vs BP vs FA vs DFA on every dataset we have offline.

Mean +- std of the final test accuracy over seeds, a markdown table, convergence plots (test accuracy
per epoch, mean with a +-std band) and the raw per-run histories as JSON, in one results folder:

    python benchmarks/sal_report.py --out results/sal_report            (3 seeds, CPU: ~10 min)
    python benchmarks/sal_report.py --seeds 1 --quick --out /tmp/sal    (smoke run)

Each dataset has one model spec and one budget used for every rule (equal epochs, same optimiser,
same cosine schedule), so the comparison is like for like; the table states where SAL loses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neurosal.data import load_dataset  # noqa: E402
from neurosal.train import TrainConfig, Trainer  # noqa: E402

# dataset -> (model, epochs, batch size); tables are tiny, so small MLPs and more epochs
SUITE = {
    "digits": ("mlp:256x256", 30, 32),
    "mnist-5k": ("mlp:256x256", 20, 64),
    "fashion-mnist": ("mlp:256x256", 5, 128),
    "mnist1d": ("mlp:256x256", 30, 64),
    "iris": ("mlp:64x64", 60, 16),
    "wine": ("mlp:64x64", 60, 16),
    "breast-cancer": ("mlp:64x64", 40, 32),
}
RULES = ["bp", "fa", "dfa", "sal"]


def run(dataset: str, rules: list[str], seeds: list[int], quick: bool) -> dict:
    model, epochs, batch = SUITE[dataset]
    if quick:
        epochs = max(2, epochs // 5)
    data = load_dataset(dataset)
    out = {}
    for rule in rules:
        runs = []
        for seed in seeds:
            cfg = TrainConfig(rule=rule, model=model, data=dataset, epochs=epochs, batch_size=batch,
                              lr=1e-3, schedule="cosine", seed=seed, progress=False)
            t0 = time.perf_counter()
            hist = Trainer(cfg, None, dataset=data).fit()["epochs"]
            runs.append({"seed": seed, "test_acc": [r["test_acc"] for r in hist],
                         "train_loss": [r["train_loss"] for r in hist], "time_s": time.perf_counter() - t0,
                         **({"dead_areas": hist[-1]["dead_areas"]} if "dead_areas" in hist[-1] else {})})
            print(f"{dataset:14s} {rule:4s} seed {seed}: {100 * hist[-1]['test_acc']:.2f}%", flush=True)
        out[rule] = runs
    return {"model": model, "epochs": epochs, "batch_size": batch, "runs": out}


def summarise(results: dict) -> tuple[str, list[dict]]:
    rows = []
    for ds, res in results.items():
        row = {"dataset": ds, "model": res["model"], "epochs": res["epochs"]}
        for rule, runs in res["runs"].items():
            finals = [100 * r["test_acc"][-1] for r in runs]
            row[rule] = (statistics.mean(finals), statistics.stdev(finals) if len(finals) > 1 else 0.0)
        rows.append(row)
    rules = [r for r in RULES if any(r in row for row in rows)]
    lines = ["| dataset | model | epochs | " + " | ".join(rules) + " | SAL - BP |",
             "|---|---|---|" + "---|" * len(rules) + "---|"]
    for row in rows:
        best = max(row[r][0] for r in rules)
        cells = [(f"**{row[r][0]:.2f} ± {row[r][1]:.2f}**" if row[r][0] == best else f"{row[r][0]:.2f} ± {row[r][1]:.2f}")
                 for r in rules]
        gap = row["sal"][0] - row["bp"][0] if "sal" in row and "bp" in row else float("nan")
        verdict = f"{gap:+.2f}" + (" (SAL loses)" if gap < 0 else "")
        lines.append(f"| {row['dataset']} | {row['model']} | {row['epochs']} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines), rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(results)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, (ds, res) in zip(axes.flat, results.items()):
        for rule, runs in res["runs"].items():
            acc = 100 * np.array([r["test_acc"] for r in runs])
            ep = np.arange(1, acc.shape[1] + 1)
            mu, sd = acc.mean(0), acc.std(0)
            ax.plot(ep, mu, label=rule)
            ax.fill_between(ep, mu - sd, mu + sd, alpha=0.2)
        ax.set(title=ds, xlabel="epoch", ylabel="test acc (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/sal_report")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--datasets", default=",".join(SUITE))
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--quick", action="store_true", help="a fifth of the epochs (smoke test)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    datasets = [d for d in args.datasets.split(",") if d]
    unknown = [d for d in datasets if d not in SUITE]
    if unknown:
        raise SystemExit(f"error: no report settings for {unknown}; known: {', '.join(SUITE)}")
    results = {ds: run(ds, args.rules.split(","), list(range(args.seeds)), args.quick) for ds in datasets}
    table, rows = summarise(results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "convergence.png")
    md = ["# SAL vs BP vs FA vs DFA", "",
          f"Final test accuracy (%), mean ± std over {args.seeds} seeds; Adam, lr 1e-3, cosine decay, "
          "same model and epochs for every rule; best per row in bold.", "", table, "",
          "![convergence](convergence.png)", ""]
    (out / "report.md").write_text("\n".join(md))
    print("\n" + table)
    print(f"\nwrote {out / 'report.md'}, {out / 'results.json'}, {out / 'convergence.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
