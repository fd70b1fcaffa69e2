"""The ``neurosal`` command line.

    neurosal train   --rule dfa --model mlp:256x256 --data fashion-mnist --epochs 5 --out runs/x
    neurosal compare --rules bp,fa,dfa --data digits --model mlp:128x128 --epochs 10 --out runs/cmp
    neurosal sample  runs/lm --prompt "It is a truth" --length 300   (text from a language-model run)
    neurosal list    (rules, datasets, model specs)

Errors in input print one line ``error: ...`` and exit with status 2 -- unknown names, bad numbers,
unreadable, hostile or malformed files, folders that cannot be written, a full disk. Finished
checkpoints are never touched by a failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

from .errors import NeurosalError, first_line


class ArgumentParser(argparse.ArgumentParser):
    """argparse with neurosal's error form: one ``error: ...`` line, exit status 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see '{self.prog} --help')\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


positive_int.__name__ = "positive integer"  # what argparse names in its 'invalid ... value' message


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mlp:256x256",
                   help="mlp:256x256, mlp:256*8, cnn, cnn:6,16/120,84, snn:100, resnet:20, "
                        "vit:patch=4,dim=64,depth=4,heads=4, gpt:layers=4,dim=256,heads=4,ctx=128 (text), "
                        "or your module: path/to/file.py:ClassName")
    p.add_argument("--device", default=None,
                   help="train on simulated hardware: a device preset, e.g. rram-like (see 'neurosal list')")
    p.add_argument("--device-options", default=None, help="device parameter overrides, e.g. 'levels=32,ctoc=0'")
    p.add_argument("--data", default="digits", help="dataset name (austen: text) or path to .npz/.csv/.txt (see 'neurosal list')")
    p.add_argument("--data-root", default=None, help="folder with a dataset's files (mnist, cifar10, ...)")
    p.add_argument("--label-column", default=None,
                   help="your CSV's label column: its header name or index (default: the last column)")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N training samples")
    p.add_argument("--grayscale", action="store_true", help="colour images to one luminance channel")
    p.add_argument("--recipe", default=None,
                   help="a paper's settings, e.g. sal-paper (flags you give win; see 'neurosal list')")
    p.add_argument("--context", type=positive_int, default=None,
                   help="text data: characters per window (default: the gpt model's ctx)")
    p.add_argument("--epoch-samples", type=positive_int, default=None,
                   help="samples (text: windows) drawn per epoch; default: the whole training set")
    p.add_argument("--eval-limit", type=positive_int, default=None,
                   help="evaluate on the first N test samples (text: validation windows) only")
    p.add_argument("--epochs", type=positive_int, default=5)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--optimizer", default="Adam", help="any torch.optim class name (SGD, Adam, AdamW, ...)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine"],
                   help="learning rate per epoch: constant or cosine decay")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accel", default="auto", help="torch device: auto, cpu, cuda, cuda:1")
    p.add_argument("--memory", default="cache", choices=["cache", "recompute"],
                   help="direct rules: cache activations (fast) or recompute the forward (low memory)")
    p.add_argument("--alignment", action="store_true", help="log per-layer angle to the BP signal")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or epoch lines")


def _config(args, rule: str, options: dict):
    from .train import TrainConfig

    from .recipes import apply_recipe
    from .rules import parse_options

    settings = dict(model=args.model, data=args.data, device=args.device,
                    device_options=parse_options(args.device_options), data_root=args.data_root,
                    label_column=args.label_column, limit=args.limit, grayscale=args.grayscale,
                    context=args.context, epoch_samples=args.epoch_samples, eval_limit=args.eval_limit,
                    epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                    schedule=args.schedule, momentum=args.momentum, weight_decay=args.weight_decay,
                    seed=args.seed, accel=args.accel, memory=args.memory, alignment=args.alignment,
                    progress=not args.no_progress)
    if args.recipe:  # the recipe's settings where no flag was given
        settings, options = apply_recipe(args.recipe, rule, settings, options, getattr(args, "explicit", ()))
    return TrainConfig(rule=rule, rule_options=options, **settings)


def cmd_train(args) -> int:
    from .rules import parse_options
    from .train import Trainer

    cfg = _config(args, args.rule, parse_options(args.rule_options))
    cfg.fsdp = args.fsdp
    trainer = Trainer(cfg, args.out)
    summary = trainer.fit(resume=args.resume)
    last = summary["epochs"][-1] if summary["epochs"] else {}
    if trainer.main:
        print(json.dumps({"out": str(args.out), "epochs": trainer.epoch,
                          "test_acc": last.get("test_acc"), "train_loss": last.get("train_loss")}))
    return 0


def cmd_compare(args) -> int:
    from .data import load_dataset
    from .checkpoint import atomic_write_text, ensure_writable_dir
    from .report import format_table, plot_curves, write_csv
    from .rules import REGISTRY, make_rule, parse_options
    from .train import Trainer, context_for

    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    if not rules:
        raise NeurosalError("--rules is empty")
    unknown = [r for r in rules if r not in REGISTRY]
    if unknown:
        make_rule(unknown[0])  # refuses it, saying how options are given when it has some
    options = parse_options(args.rule_options)
    stray = [k for k in options if not any(k in REGISTRY[r].Config.__dataclass_fields__ for r in rules)]
    if stray:
        raise NeurosalError(f"no rule in {','.join(rules)} has an option {stray[0]!r}")
    # every setting is checked before the first rule trains, and the folder is proven writable
    configs = {rule: _config(args, rule, {k: v for k, v in options.items()
                                          if k in REGISTRY[rule].Config.__dataclass_fields__}) for rule in rules}
    for cfg in configs.values():
        cfg.validate()
    out = ensure_writable_dir(Path(args.out))
    first = next(iter(configs.values()))
    data = load_dataset(first.data, first.data_root, first.limit, label_column=first.label_column,
                        context=context_for(first), gray=first.grayscale)
    rows, histories = [], {}
    for rule, cfg in configs.items():
        t0 = time.perf_counter()
        trainer = Trainer(cfg, out / rule, dataset=data)
        summary = trainer.fit()
        hist = summary["epochs"]
        histories[rule] = hist
        rows.append({"rule": rule, "test_acc": 100 * hist[-1]["test_acc"],
                     "best_test_acc": 100 * max(r["test_acc"] for r in hist),
                     "train_loss": hist[-1]["train_loss"],
                     "step_ms": sum(r["step_time_ms"] for r in hist) / len(hist),
                     "time_s": time.perf_counter() - t0, "params": summary["n_params"]})
    table = format_table(rows, [("rule", "rule"), ("test_acc", "test acc %"), ("best_test_acc", "best %"),
                                ("train_loss", "train loss"), ("step_ms", "step ms"),
                                ("time_s", "total s"), ("params", "params")])
    print(f"\n{args.data} | {args.model} | {args.epochs} epochs | seed {args.seed}\n{table}")
    atomic_write_text(out / "compare.json", json.dumps({"rows": rows, "histories": histories,
                                                        "classes": data.classes}, indent=2))
    write_csv(out / "compare.csv", rows)
    plot_curves(histories, out / "compare.png", title=f"{args.data} | {args.model}")
    print(f"results: {out / 'compare.json'}, {out / 'compare.csv'}, {out / 'compare.png'}")
    return 0


def number_list(text: str | None, name: str, kind=int) -> list:
    """``"256,1024"`` -> [256, 1024]; ``1e8`` is accepted for ints; each value must be positive."""
    if not text:
        return []
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise NeurosalError(f"--{name} takes comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not (v > 0 and math.isfinite(v)) or (kind is int and v != int(v))]
    if bad:
        raise NeurosalError(f"--{name}: {bad[0]:g} is not a positive {'integer' if kind is int else 'number'}")
    return [kind(v) for v in values]


def cmd_bench(args) -> int:
    from .bench import BenchConfig, run

    cfg = BenchConfig.small() if args.small else BenchConfig.full()
    if args.rules:
        cfg.rules = [r for r in args.rules.split(",") if r]
    sweeps = ("widths", "depths", "params", "models", "gpt_params", "gpt_depths")
    if any(getattr(args, name) is not None for name in sweeps):  # the sweeps named replace the preset's
        for name in sweeps:
            setattr(cfg, name, [])
    for name in ("widths", "depths"):
        if getattr(args, name) is not None:
            setattr(cfg, name, number_list(getattr(args, name), name))
    if args.params is not None:
        cfg.params = number_list(args.params, "params", float)
    if args.gpt_params is not None:
        cfg.gpt_params = number_list(args.gpt_params, "gpt-params", float)
    if args.gpt_depths is not None:
        cfg.gpt_depths = number_list(args.gpt_depths, "gpt-depths")
    for name in ("gpt_dim", "ctx", "vocab", "gpt_batch"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    for name in ("width", "depth", "batch", "steps"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.models:
        cfg.models = [m for m in args.models.split(";") if m]
    if args.devices:
        cfg.devices = [None] + [d for d in args.devices.split(",") if d]
    cfg.accel, cfg.compile = args.accel, args.compile
    if args.dtype:
        cfg.dtype = args.dtype
    run(cfg, args.out)
    print(f"wrote {args.out}/bench.json, bench.md, bench.png")
    return 0


def cmd_sample(args) -> int:
    from .text import TextCorpus, generate
    from .train import load_run

    net, _, cfg, st = load_run(args.run, args.accel)
    vocab = st.get("classes")
    if len(st["input_shape"]) != 1 or not vocab or not all(isinstance(c, str) and len(c) == 1 for c in vocab):
        raise NeurosalError(f"{args.run} is not a character-level language model run (trained on "
                            f"{cfg.data!r} with {cfg.model!r}); sample needs --data austen or a .txt file")
    corpus = TextCorpus(cfg.data, "", "", list(vocab), "")
    prompt = args.prompt.replace("\\n", "\n")
    if not prompt:
        raise NeurosalError("--prompt is empty: give at least one character")
    ids = corpus.encode(prompt)
    out = generate(net, ids, args.length, st["input_shape"][0], args.temperature, args.top_k, args.seed)
    print(prompt + corpus.decode(out.tolist()))
    return 0


def cmd_list(args) -> int:
    from .data import dataset_names
    from .rules import REGISTRY

    print("rules:")
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Config))
        print(f"  {name:6s} {cls.summary}" + (f"  [options: {opts}]" if opts else ""))
    print("datasets:", ", ".join(dataset_names()), "or a path to .npz/.csv (tables, arrays) or .txt (text)")
    print("models:   mlp:256x256, mlp:256*8, mlp:100x100:tanh, mlp:64*32:relu:res, cnn, cnn:6,16/120,84, "
          "snn:100, resnet:20, vit:patch=4,dim=64,depth=4,heads=4,mlp=2, gpt:layers=4,dim=256,heads=4,ctx=128 "
          "(text), path/to/file.py:ClassName[:k=v,...]")
    from .recipes import RECIPES
    from .substrates import device_names

    print("devices: ", ", ".join(device_names()) or "none (install hw_models)")
    print("recipes: " + "; ".join(f"{r.name} ({r.summary})" for r in RECIPES.values()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="neurosal", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model with one rule")
    p.add_argument("--rule", default="bp")
    p.add_argument("--rule-options", default=None, help="e.g. 'rank=10' (see 'neurosal list')")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.json, curves.png)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model with FSDP2 (bp)")
    _common(p)
    p.set_defaults(func=cmd_train, subparser=p)

    p = sub.add_parser("compare", help="train each rule on the same data and print one table")
    p.add_argument("--rules", default="bp,fa,usf,dfa,drtp,ldef")
    p.add_argument("--rule-options", default=None)
    p.add_argument("--out", default="runs/compare")
    _common(p)
    p.set_defaults(func=cmd_compare, subparser=p)

    p = sub.add_parser("bench", help="step time, memory and FLOP/s of rules over width/depth/size sweeps",
                       description="Step time, memory and FLOP/s of rules over sweeps. The sweeps named "
                                   "(--widths, --depths, --params, --models, --gpt-params, --gpt-depths) replace "
                                   "the preset's and the others are off; naming none runs the preset's sweeps.")
    p.add_argument("--small", action="store_true", help="preset that finishes in minutes on 2 CPU cores")
    p.add_argument("--rules", default=None, help="e.g. bp,fa,dfa,sal,dfa[recompute]")
    p.add_argument("--widths", default=None, help="width sweep at --depth, e.g. 256,1024")
    p.add_argument("--depths", default=None, help="depth sweep at --width, e.g. 2,8,32,128")
    p.add_argument("--params", default=None, help="parameter-count sweep at --depth, e.g. 1e8,1e9")
    p.add_argument("--models", default=None, help="extra model specs (28x28 inputs), e.g. 'cnn;snn:100:T=25'")
    p.add_argument("--gpt-params", default=None, help="transformer presets by size: 1e7,1e8,1e9")
    p.add_argument("--gpt-depths", default=None, help="transformer depth sweep at --gpt-dim, e.g. 4,16,32")
    p.add_argument("--gpt-dim", type=positive_int, default=None, help="model width of the depth sweep")
    p.add_argument("--ctx", type=positive_int, default=None, help="transformer tokens per window")
    p.add_argument("--vocab", type=positive_int, default=None, help="transformer vocabulary (random tokens)")
    p.add_argument("--gpt-batch", type=positive_int, default=None, help="transformer windows per step")
    p.add_argument("--width", type=positive_int, default=None)
    p.add_argument("--depth", type=positive_int, default=None)
    p.add_argument("--batch", type=positive_int, default=None)
    p.add_argument("--steps", type=positive_int, default=None)
    p.add_argument("--devices", default=None, help="analog device presets to add, e.g. rram-like")
    p.add_argument("--dtype", default=None, choices=["float32", "bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the BP baseline")
    p.add_argument("--accel", default="auto")
    p.add_argument("--out", default="runs/bench")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("sample", help="generate text from a trained language-model run")
    p.add_argument("run", help="run folder (its latest checkpoint) or a checkpoint file")
    p.add_argument("--prompt", default="\n", help="text to continue (\\n for a newline); default a newline")
    p.add_argument("--length", type=positive_int, default=500, help="characters to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0: always the most likely character")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample among the k most likely only")
    p.add_argument("--seed", type=int, default=0, help="same seed, same text (same device and torch)")
    p.add_argument("--accel", default="cpu", help="torch device: cpu, cuda, ...")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("list", help="rules, datasets, model specs and hardware devices")
    p.set_defaults(func=cmd_list)
    from .substrates import command_plugins

    for add in command_plugins():
        add(sub)
    return ap


def _explicit(sub: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The options given on the command line (a recipe fills the others): the subcommand's parser
    again, with every default suppressed."""
    saved = {a.dest: a.default for a in sub._actions}
    try:
        for a in sub._actions:
            a.default = argparse.SUPPRESS
        given, _ = sub.parse_known_args(argv)
    finally:
        for a in sub._actions:
            a.default = saved[a.dest]
    return set(vars(given))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "recipe", None):
        args.explicit = _explicit(args.subparser, argv[argv.index(args.command) + 1:])
    try:
        return args.func(args)
    except NeurosalError as exc:
        return _fail(str(exc))
    except OSError as exc:  # a folder that cannot be written, a full disk, a vanished file, ...
        where = f" ({exc.filename})" if exc.filename else ""
        return _fail(f"{exc.strerror or first_line(exc)}{where}; finished checkpoints are kept")
    except MemoryError:
        return _fail("out of memory (try a smaller --batch-size or model)")
    except KeyboardInterrupt:
        print("interrupted; finished checkpoints are kept", file=sys.stderr)
        return 130


def _fail(message: str) -> int:
    """Print one ``error: ...`` line (a message never spans lines) and return exit status 2."""
    print("error: " + " ".join(message.split()), file=sys.stderr)
    return 2


def entry() -> None:
    """The ``neurosal`` command and ``python -m neurosal.cli``: :func:`main`, then exit.

    A rank of a multi-process job (torchrun: ``WORLD_SIZE`` > 1, where the trainer makes a process group)
    leaves by ``os._exit`` once its output is flushed: its process group is destroyed by
    then, every file it wrote is closed (checkpoints are written atomically), and interpreter
    finalisation is what remained -- where a rank still aborted about once in 10-20 jobs on a 2-core
    machine (``terminate called without an active exception``: a C++ thread object of the distributed
    runtime destroyed while joinable during static destruction), turning a finished job into a failed
    one. One process on its own exits the ordinary way.
    """
    from .distributed import launched_world_size

    if launched_world_size() <= 1:
        sys.exit(main())
    try:
        code = main()
    except SystemExit as exc:  # argparse's exits
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except BaseException:  # a crash: its traceback as the interpreter would print it, then the same status
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
