"""Language-model report: validation bits per character of every rule against BP on austen, equal tokens.

    python benchmarks/lm_report.py --out benchmarks/reports/lm            # the committed report (CPU)
    python benchmarks/lm_report.py --steps 100 --seeds 0 --out /tmp/lm    # a quick look

Each rule trains the same GPT (``--model``) on the same windows of the five training novels for the same
number of steps (so the same number of tokens), with Adam and a cosine learning-rate schedule, for each
seed; the validation text is Persuasion, held out whole. Every ``--eval-every`` steps the validation bits
per character on the first ``--eval-windows`` windows are logged (the learning curve); after the last
step the whole of Persuasion is evaluated. Writes ``results.json`` (every curve), ``report.md`` (table:
mean and spread over seeds, the gap to BP, the unigram level) and ``curves.png``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neurosal.rules import parse_options  # noqa: E402
from neurosal.text import bits, generate, load_text, unigram_bpc  # noqa: E402
from neurosal.train import Trainer, TrainConfig, evaluate  # noqa: E402
from neurosal.zoo import context_length  # noqa: E402

RULES = ["bp", "fa", "usf", "ldef", "dfa", "drtp", "sal"]
#: ablation rows: the direct rules with the signal arriving as projected (not through the final LayerNorm),
#: and with one block of B per block instead of the stream's shared one
ABLATIONS = [f"{r}:{o}" for o in ("readout_norm=false", "share_stream=false") for r in ("dfa", "drtp", "sal")]


def run_one(rule: str, seed: int, args, sample: bool) -> dict:
    """One (rule, seed) run. ``rule`` is a name, or ``name:key=value,...`` with rule options (an ablation
    row). With ``sample``, the trained model's text from the prompt "It was a " comes back too."""
    torch.set_num_threads(args.threads)
    corpus, ds = data(args.model)
    ctx = context_length(args.model)
    epochs = args.steps // args.eval_every
    name, _, opts = rule.partition(":")
    cfg = TrainConfig(rule=name, rule_options=parse_options(opts), model=args.model, data="austen", epochs=epochs,
                      epoch_samples=args.eval_every * args.batch, eval_limit=args.eval_windows,
                      batch_size=args.batch, optimizer="AdamW", lr=args.lr, schedule="cosine", seed=seed,
                      weight_decay=0.0, progress=False)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, None, dataset=ds)
    hist = trainer.fit()["epochs"]
    wall = time.perf_counter() - t0
    full_loss, full_acc = evaluate(trainer.net, ds.x_test, ds.y_test)
    out = {"rule": rule, "seed": seed, "tokens": [h["tokens_seen"] for h in hist],
           "val_bpc": [h["test_bpc"] for h in hist], "train_bpc": [h["train_bpc"] for h in hist],
           "final_val_bpc": bits(full_loss), "final_val_acc": full_acc,
           "tokens_per_s": statistics.median(h["tokens_per_s"] for h in hist), "wall_s": wall}
    if sample:
        prompt = corpus.encode("It was a ")
        out["sample"] = "It was a " + corpus.decode(generate(trainer.net, prompt, 160, ctx, 0.8, None, 0).tolist())
    return out


@functools.cache
def data(model: str):
    """austen and its windows at the model's context, read once per process (a worker runs many jobs)."""
    corpus = load_text("austen")
    return corpus, corpus.windows(context_length(model))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt:layers=4,dim=96,heads=4,ctx=64")
    ap.add_argument("--rules", default=";".join(RULES + ABLATIONS),
                    help="';'-separated rules, each a name or name:key=value,... (rule options)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per run")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at a time, each in its own process (results do not depend on it)")
    ap.add_argument("--out", default="benchmarks/reports/lm")
    ap.add_argument("--from-results", action="store_true",
                    help="only rewrite report.md and curves.png from the folder's results.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_results:
        saved = json.loads((out / "results.json").read_text())
        rules = list(dict.fromkeys(r["rule"] for r in saved["runs"]))
        write_markdown(out / "report.md", saved["info"], saved["runs"], rules, saved["samples"])
        plot(out / "curves.png", saved["info"], saved["runs"], rules)
        return 0
    corpus, _ = data(args.model)
    ctx = context_length(args.model)
    unigram = unigram_bpc(corpus)
    rules = [r for r in args.rules.split(";") if r]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    todo = [(rule, seed, args, seed == seeds[0]) for rule in rules for seed in seeds]
    runs, samples = [], {}
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for r in pool.map(run_one, *zip(*todo)):
            if "sample" in r:
                samples[r["rule"]] = r.pop("sample")
            runs.append(r)
            print(f"{r['rule']} seed {r['seed']}: validation {r['final_val_bpc']:.3f} bpc "
                  f"({r['tokens_per_s']:.0f} tokens/s, {r['wall_s']:.0f} s)", flush=True)
    info = {"model": args.model, "steps": args.steps, "batch": args.batch, "context": ctx,
            "tokens": args.steps * args.batch * ctx, "optimizer": "AdamW", "lr": args.lr, "schedule": "cosine",
            "validation": corpus.validation, "validation_chars": len(corpus.val), "unigram_bpc": unigram,
            "threads": args.threads, "jobs": args.jobs, "torch": torch.__version__}
    (out / "results.json").write_text(json.dumps({"info": info, "runs": runs, "samples": samples}, indent=1))
    write_markdown(out / "report.md", info, runs, rules, samples)
    plot(out / "curves.png", info, runs, rules)
    print(f"wrote {out}/results.json, report.md, curves.png")
    return 0


def _stats(values):
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_markdown(path: Path, info: dict, runs: list, rules: list, samples: dict) -> None:
    by = {r: [x for x in runs if x["rule"] == r] for r in rules}
    bp = statistics.fmean(x["final_val_bpc"] for x in by["bp"]) if by.get("bp") else None
    lines = ["# Character-level language modelling on austen: every rule at equal tokens\n",
             f"Model `{info['model']}`, {info['steps']} steps of {info['batch']} windows x {info['context']} "
             f"characters = {info['tokens']:,} training tokens per run; {info['optimizer']} lr {info['lr']}, "
             f"cosine schedule; validation: {info['validation']}, all {info['validation_chars']:,} characters. "
             f"Seeds: {sorted({x['seed'] for x in runs})}. CPU, torch threads: {info['threads']}, torch {info['torch']}.\n",
             f"Unigram level (training-text character frequencies on Persuasion): **{info['unigram_bpc']:.3f} "
             "bits per character**.\n",
             *([f"Note: {info['rerun']}.\n"] if info.get("rerun") else []),
             "| rule | validation bpc (mean ± sd) | gap to BP | below unigram by | next-char acc % | tokens/s |",
             "|---|---|---|---|---|---|"]
    for r in rules:
        xs = by[r]
        m, sd = _stats([x["final_val_bpc"] for x in xs])
        acc = statistics.fmean(x["final_val_acc"] for x in xs)
        tps = statistics.fmean(x["tokens_per_s"] for x in xs)
        gap = f"{m - bp:+.3f}" if bp is not None and r != "bp" else "—"
        lines.append(f"| {r} | {m:.3f} ± {sd:.3f} | {gap} | {info['unigram_bpc'] - m:.3f} | {100 * acc:.1f} | "
                     f"{tps:,.0f} |")
    lines += ["", "tokens/s: median training throughput of the run (steps only, evaluation excluded); other work "
              "shared the 2-core CPU during some runs, so these numbers are indicative only.", "",
              "## Samples (seed 0, temperature 0.8, prompt \"It was a \")", ""]
    for r in rules:
        lines += [f"**{r}**", "", "```", samples.get(r, ""), "```", ""]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, info: dict, runs: list, rules: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    bases = list(dict.fromkeys(r.partition(":")[0] for r in rules))
    colours = {b: f"C{i}" for i, b in enumerate(bases)}  # an ablation row: its rule's colour, dashed
    for r in rules:
        xs = [x for x in runs if x["rule"] == r]
        tokens = xs[0]["tokens"]
        curves = list(zip(*[x["val_bpc"] for x in xs]))
        mean = [statistics.fmean(c) for c in curves]
        lo, hi = [min(c) for c in curves], [max(c) for c in curves]
        base, _, option = r.partition(":")
        style = "-" if not option else ("--" if "share_stream" in option else ":")
        ax.plot([t / 1e6 for t in tokens], mean, style, marker=".", color=colours[base], label=r)
        ax.fill_between([t / 1e6 for t in tokens], lo, hi, color=colours[base], alpha=0.12)
    ax.axhline(info["unigram_bpc"], color="grey", ls="--", lw=1, label="unigram")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation bits per character")
    ax.set_title(f"austen, {info['model']} (band: min-max over seeds)", fontsize=9)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
