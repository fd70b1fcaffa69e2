"""Training runs: seeded, checkpointed each epoch (atomically), resumable bit for bit.

A run directory holds ``config.json``, ``metrics.json`` (per epoch: train loss/accuracy, test
loss/accuracy, step time, and on request the per-layer alignment angles), ``curves.png`` and
``ckpt-epoch-NNNN.pt`` files.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from .data import Dataset, load_dataset
from .distributed import DistContext, LayerwiseAllReduce, average_buffers, reduce_learned_feedback
from .engine import MEMORY_MODES, alignment
from .errors import NeurosalError, first_line
from .layers import preserved_draws
from .models import Net
from .options import typed_fields
from .protocols import ReportsContext, implements
from .rules import make_rule
from .rules.base import Rule
from .substrates import apply_device, finish_step
from .substrates import epoch_stats as substrate_epoch_stats
from .text import bits
from .wrap import Wrapped, alignment_report, sal_layers, select_output, to_areas

CLIP_WARNING = 0.1  # warn when analog pulse trains cut more than this share of an epoch's updates


@dataclass
class TrainConfig:
    rule: str = "bp"
    rule_options: dict = field(default_factory=dict)
    model: str = "mlp:256x256"
    device: str | None = None  # a hardware device preset (e.g. "rram-like"), from an installed substrate
    device_options: dict = field(default_factory=dict)  # overrides of the device's parameters
    data: str = "digits"
    data_root: str | None = None
    label_column: str | None = None  # user tables: the label column's name or index (default: the last)
    limit: int | None = None  # keep only the first N training samples
    grayscale: bool = False  # colour images to one luminance channel (the SAL paper's recipe)
    context: int | None = None  # text: characters per window (default: the gpt model's ctx, else 128)
    epoch_samples: int | None = None  # samples drawn per epoch (without replacement); default: all
    eval_limit: int | None = None  # evaluate on the first N test samples (windows); default: all
    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "Adam"
    lr: float = 1e-3
    schedule: str = "constant"  # or "cosine": lr * (1 + cos(pi * (epoch-1) / epochs)) / 2 per epoch
    momentum: float = 0.9  # used by optimisers that take it (SGD, RMSprop)
    weight_decay: float = 0.0
    seed: int = 0
    accel: str = "auto"  # torch device: auto, cpu, cuda, cuda:1, ...
    memory: str = "cache"  # direct rules: "cache" or "recompute" (low memory)
    alignment: bool = False  # log per-layer angle to the BP signal each epoch
    fsdp: bool = False  # under torchrun, shard the model with FSDP2 (bp only; for very large models)
    keep_checkpoints: int = 3
    progress: bool = True

    # fields that may change between a run and its resumption
    RESUMABLE_CHANGES = ("epochs", "progress", "keep_checkpoints", "alignment", "accel", "eval_limit")

    def validate(self) -> None:
        if self.epochs < 1:
            raise NeurosalError("epochs must be >= 1")
        if self.batch_size < 1:
            raise NeurosalError("batch size must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise NeurosalError(f"learning rate must be a positive number, got {self.lr}")
        if self.schedule not in ("constant", "cosine"):
            raise NeurosalError(f"unknown lr schedule {self.schedule!r}; use constant or cosine")
        if self.memory not in MEMORY_MODES:
            raise NeurosalError(f"unknown memory mode {self.memory!r}; use one of {MEMORY_MODES}")
        for name in ("limit", "context", "epoch_samples", "eval_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise NeurosalError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise NeurosalError(f"{name.replace('_', ' ')} must be a finite number >= 0, got {value}")
        if self.keep_checkpoints < 1:
            raise NeurosalError("keep_checkpoints must be >= 1 (a run keeps its latest checkpoint)")

    @classmethod
    def from_dict(cls, values: dict, source: str) -> "TrainConfig":
        """A config read from a file (``source`` names it in errors): unknown keys are ignored (newer
        versions), missing ones take their defaults, mistyped ones are refused."""
        return cls(**typed_fields(cls, values, source, ignore_unknown=True))


def resolve_device(accel: str) -> torch.device:
    if accel == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(accel)
    except RuntimeError as exc:
        raise NeurosalError(f"unknown accelerator {accel!r}: use auto, cpu or cuda[:N]") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NeurosalError("--accel cuda asked for, but torch sees no CUDA device")
    return dev


def make_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float):
    table = {k.lower(): v for k, v in vars(torch.optim).items()
             if inspect.isclass(v) and issubclass(v, torch.optim.Optimizer) and v is not torch.optim.Optimizer}
    cls = table.get(name.lower())
    if cls is None:
        raise NeurosalError(f"unknown optimiser {name!r}; any torch.optim class, e.g. SGD, Adam, AdamW")
    sig = inspect.signature(cls.__init__).parameters
    kw = {"lr": lr}
    if "weight_decay" in sig:
        kw["weight_decay"] = weight_decay
    if "momentum" in sig:
        kw["momentum"] = momentum
    if "foreach" in sig:
        # one multi-tensor kernel per update op instead of a Python loop over the parameters: torch picks
        # it by itself only on CUDA, but it also speeds up CPU steps of nets with many small layers
        # (benchmarks/reports/foreach: a dfa step of mlp:32*128 15.6 -> 13.5 ms, neutral for 2 wide layers)
        kw["foreach"] = True
    return cls(params, **kw)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_and_hits(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean"):
    """Cross-entropy and the number of right guesses, per sample (``(B, V)`` logits, ``(B,)`` labels) or per
    position (``(B, T.., V)`` logits, ``(B, T..)`` targets: a language model's loss over every position)."""
    flat = logits.reshape(-1, logits.shape[-1])
    loss = torch.nn.functional.cross_entropy(flat, y.reshape(-1), reduction=reduction)
    return loss, (flat.argmax(-1) == y.reshape(-1)).sum()


@torch.no_grad()
def evaluate(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy per target (per sample, or per position for sequences).

    What the evaluation draws (spike encoders from torch's generators) comes from a fork of them: how
    often and on how much a run evaluates does not change its training (same seed, same run)."""
    was = net.training
    net.eval()
    if batch is None:  # about 2^18 targets at a time
        batch = max(1, (1 << 18) // max(1, y[0].numel()))
    total_loss = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    with torch.random.fork_rng(devices=[x.device.index or 0] if x.is_cuda else []):
        for i in range(0, len(x), batch):
            loss, hits = loss_and_hits(select_output(net(x[i:i + batch]))[0].float(), y[i:i + batch], "sum")
            total_loss += loss.double()
            correct += hits
    net.train(was)
    return float(total_loss) / y.numel(), int(correct) / y.numel()


class Trainer:
    """Builds data, model, rule and optimiser from a :class:`TrainConfig`, then :meth:`fit` runs it."""

    def __init__(self, cfg: TrainConfig, out_dir: str | Path | None, dataset: Dataset | None = None):
        cfg.validate()
        self.cfg = cfg
        self.dist = DistContext.from_env()  # set when launched by torchrun with more than one process
        self.main = self.dist is None or self.dist.main
        self.out = Path(out_dir) if out_dir is not None else None
        self.device = resolve_device(cfg.accel)
        if self.dist is not None and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        ds = dataset if dataset is not None else load_dataset(cfg.data, cfg.data_root, cfg.limit,
                                                              label_column=cfg.label_column,
                                                              context=context_for(cfg), gray=cfg.grayscale)
        #: targets per sample: 1, or the positions of a text window (a language model's loss is per token)
        self.sequence = ds.y_train.dim() > 1
        self.data = ds.to(self.device)
        self.rule: Rule = make_rule(cfg.rule, **cfg.rule_options)
        n_epoch = min(cfg.epoch_samples or len(ds.x_train), len(ds.x_train))
        self.rule.plan(cfg.epochs * math.ceil(n_epoch / cfg.batch_size))  # the run's length (SAL's warm-up)
        self.net = build_net(cfg, self.rule, ds.input_shape, ds.n_classes, self.device)
        if not isinstance(self.net, Net):  # zoo and user models: say at once if they cannot take this data
            check_model_io(self.net, cfg.model, self.data.x_train[:2], ds.n_classes, self.sequence)
        self.wrapped = wrap_for_training(cfg, self.net, self.rule, ds.input_shape, self.data.x_train[:2])
        self.model = self.wrapped  # what each step calls (DDP-wrapped when distributed)
        self.reducer = None
        if cfg.fsdp:
            if not self.rule.autograd:
                raise NeurosalError("--fsdp shards parameters across ranks; the local rules update whole "
                                    "layers in place, so use plain data parallelism (no --fsdp) for them")
            if self.dist is None:
                raise NeurosalError("--fsdp needs a multi-process launch: torchrun --nproc_per_node N ...")
            from torch.distributed.fsdp import fully_shard

            for blk in (self.net.blocks if isinstance(self.net, Net) else _repeated_blocks(self.net)):
                fully_shard(blk)
            fully_shard(self.net)
        elif self.dist is not None:
            # DDP's reducer expects every parameter's gradient from autograd, every step. Routing layers
            # (SAL) break both: an area no sample chose gets no gradient, and the router's comes from
            # its local objective, outside autograd. Models with them (outside the chains, which report
            # each layer) have every gradient averaged once after the backward pass instead.
            routed = any(implements(m, ReportsContext) for m in self.net.modules())
            if self.rule.autograd or not (self.wrapped.chain or routed):
                from torch.nn.parallel import DistributedDataParallel

                ids = [self.device.index] if self.device.type == "cuda" else None
                # wrap told DDP to skip what it cannot see -- learned feedback, layers writing their own
                # update (analog arrays) -- which the wrapper averages after each backward
                # (Wrapped.bypassed); the rule's buffers (fixed feedback, brsf's CPU-resident counter) are
                # the same on every rank by construction
                self.model = DistributedDataParallel(self.wrapped, device_ids=ids)
            else:  # chains: each layer's all-reduce starts as soon as its update is ready; routed
                # general models: all at once after the backward pass (train_epoch)
                self.wrapped.reduce_bypassed = False
                self.reducer = LayerwiseAllReduce(self.dist)
                if self.wrapped.chain:
                    self.wrapped.on_layer = self.reducer
        params = list(self.net.parameters()) + [p for p in self.rule.parameters() if p.numel()]
        self.opt = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.momentum, cfg.weight_decay)
        self.reference = make_rule("bp") if cfg.alignment and cfg.rule != "bp" else None
        self.history: list[dict] = []
        self.epoch = 0

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        return {
            "format": "neurosal-ckpt-1",
            "config": dataclasses.asdict(self.cfg),
            "epoch": self.epoch,
            "input_shape": list(self.data.input_shape),
            "n_classes": self.data.n_classes,
            "net": self._net_state(),
            "rule": self.rule.state_dict(),
            "optimizer": self._opt_state(),
            "history": self.history,
            "classes": self.data.classes,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }

    def _net_state(self) -> dict:
        if not self.cfg.fsdp:
            return self.net.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _opt_state(self) -> dict:
        if not self.cfg.fsdp:
            return self.opt.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.net, self.opt,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _load_net_and_opt(self, st: dict) -> None:
        if not self.cfg.fsdp:
            self.net.load_state_dict(st["net"])
            self.opt.load_state_dict(st["optimizer"])
            return
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                              set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.net, st["net"], options=opts)
        set_optimizer_state_dict(self.net, self.opt, st["optimizer"], options=opts)

    def restore(self, path: Path) -> None:
        st = checkpoint.load(path)
        old = dataclasses.asdict(TrainConfig.from_dict(st["config"], f"checkpoint {path}"))
        now = dataclasses.asdict(self.cfg)
        diff = [k for k in now if k not in TrainConfig.RESUMABLE_CHANGES and old[k] != now[k]]
        if diff:
            raise NeurosalError(f"cannot resume {path}: settings differ from the checkpoint's: "
                                + ", ".join(f"{k} ({old[k]!r} -> {now[k]!r})" for k in diff))
        if st["epoch"] > self.cfg.epochs:
            raise NeurosalError(f"cannot resume {path}: it is at epoch {st['epoch']}, beyond --epochs "
                                f"{self.cfg.epochs}")
        try:
            self._load_net_and_opt(st)
            self.rule.load_state_dict(st["rule"])
            # Random number states last: they are plain byte tensors and refuse a wrong size.
            torch.set_rng_state(st["torch_rng"])
            if self.device.type == "cuda" and st.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(st["cuda_rng"], self.device)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            raise NeurosalError(f"checkpoint {path} does not fit this model: "
                                f"{first_line(exc)}") from exc
        self.epoch = st["epoch"]
        self.history = list(st["history"])

    # ------------------------------------------------------------------ the loop
    def _batches(self, epoch: int):
        n = len(self.data.x_train)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)[:self.cfg.epoch_samples].to(self.device)
        bs = self.cfg.batch_size
        return [perm[i:i + bs] for i in range(0, len(perm), bs)]

    def lr_at(self, epoch: int) -> float:
        if self.cfg.schedule == "cosine":
            return self.cfg.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / self.cfg.epochs))
        return self.cfg.lr

    def train_batch(self, xb: torch.Tensor, yb: torch.Tensor):
        """One batch through the wrapped model with a plain ``loss.backward()`` (grads only)."""
        self.opt.zero_grad(set_to_none=True)
        logits, _ = select_output(self.model(xb))  # a user's model may return a dict or a tuple
        if self.rule.needs_target:
            self.wrapped.set_target(yb)
        loss, hits = loss_and_hits(logits, yb)
        loss.backward()
        return loss.detach(), hits

    def train_epoch(self, epoch: int) -> dict:
        from tqdm.auto import tqdm

        d, cfg = self.data, self.cfg
        batches = self._batches(epoch)
        lr = self.lr_at(epoch)
        for group in self.opt.param_groups:
            group["lr"] = lr
        rec: dict = {"epoch": epoch, "lr": lr}
        if self.reference is not None:
            idx = batches[0]
            if self.wrapped.chain:
                rec["alignment_deg"] = alignment(self.net, self.rule, self.reference,
                                                 d.x_train[idx], d.y_train[idx], d.n_classes)
            else:
                report = alignment_report(self.wrapped, d.x_train[idx], d.y_train[idx],
                                          loss_fn=lambda out, y: loss_and_hits(out, y)[0])
                rec["alignment_deg"] = report["layers"]
                if report["points"]:
                    rec["point_alignment_deg"] = report["points"]
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        step_times = []
        bar = tqdm(batches, desc=f"{cfg.rule} epoch {epoch}/{cfg.epochs}", disable=not (cfg.progress and self.main),
                   leave=False, unit="batch")
        t_epoch = time.perf_counter()
        for idx in bar:
            if self.dist is not None:
                idx = self.dist.shard(idx)
            xb, yb = d.x_train[idx], d.y_train[idx]
            t0 = time.perf_counter()
            loss, hits = self.train_batch(xb, yb)
            if self.reducer is not None:
                if not self.wrapped.chain:
                    self.reducer(self.net)  # every gradient at once (see __init__)
                self.reducer.wait()
            if self.reducer is not None:
                reduce_learned_feedback(self.dist, self.rule)  # kp/ldef feedback: beside the layers
            self.opt.step()
            finish_step(self.net)
            if self.dist is not None:
                average_buffers(self.dist, self.net)
            _sync(self.device)
            step_times.append(time.perf_counter() - t0)
            loss_sum += loss * len(idx)
            correct += hits
            if len(step_times) % 50 == 0:
                bar.set_postfix(loss=f"{float(loss):.4f}")
        if self.dist is not None:  # metrics of the global batch
            loss_sum, correct = self.dist.sum(loss_sum), self.dist.sum(correct)
        n_seen = sum(len(i) for i in batches)
        per_sample = d.y_train[0].numel()
        train_loss = float(loss_sum) / n_seen
        if not math.isfinite(train_loss):
            raise NeurosalError(f"training diverged in epoch {epoch}: the loss is NaN/Inf "
                                "(try a lower learning rate); earlier checkpoints are intact")
        n_eval = cfg.eval_limit or len(d.x_test)
        test_loss, test_acc = evaluate(self.net, d.x_test[:n_eval], d.y_test[:n_eval])
        times = sorted(step_times)
        rec.update(train_loss=train_loss, train_acc=int(correct) / (n_seen * per_sample),
                   test_loss=test_loss, test_acc=test_acc,
                   step_time_ms=1000 * times[len(times) // 2],
                   epoch_time_s=time.perf_counter() - t_epoch)
        if self.sequence:  # language models: bits per token (per character on text), tokens/s
            rec.update(train_bpc=bits(train_loss), test_bpc=bits(test_loss),
                       test_perplexity=math.exp(min(test_loss, 700.0)),
                       tokens_seen=n_seen * per_sample + (self.history[-1]["tokens_seen"] if self.history else 0),
                       tokens_per_s=n_seen * per_sample / max(sum(step_times), 1e-9))
        rec.update(self.rule.epoch_stats(self.net))
        rec.update(substrate_epoch_stats(self.net))
        return rec

    def fit(self, resume: bool = False) -> dict:
        """Train to ``cfg.epochs`` (from the latest checkpoint with ``resume``); returns :meth:`summary`.

        Under torchrun, the process group this trainer created is destroyed when ``fit`` returns or
        fails (see :mod:`neurosal.distributed`), so a launched job exits cleanly.
        """
        clean = False
        try:
            result = self._fit(resume)
            clean = True
            return result
        finally:
            if self.reducer is not None:
                self.reducer.pending.clear()
            if self.dist is not None:
                self.dist.close(clean)

    def _fit(self, resume: bool) -> dict:
        if resume:
            if self.out is None:
                raise NeurosalError("--resume needs an output folder")
            last = checkpoint.latest(self.out)
            if last is None:
                raise NeurosalError(f"nothing to resume: no checkpoint in {self.out}")
            self.restore(last)
        if self.out is not None and self.main:
            checkpoint.ensure_writable_dir(self.out)
            checkpoint.remove_stale_temps(self.out)
            checkpoint.atomic_write_text(self.out / "config.json",
                                         json.dumps(dataclasses.asdict(self.cfg), indent=2))
        for epoch in range(self.epoch + 1, self.cfg.epochs + 1):
            rec = self.train_epoch(epoch)
            self.history.append(rec)
            self.epoch = epoch
            state = self.state() if self.out is not None and (self.main or self.cfg.fsdp) else None  # collective
            if self.out is not None and self.main:
                checkpoint.save(checkpoint.epoch_path(self.out, epoch), state)
                checkpoint.prune(self.out, self.cfg.keep_checkpoints)
                self.write_metrics()
            if self.cfg.progress and self.main and self.sequence:
                print(f"[{self.cfg.rule}] epoch {epoch}: train {rec['train_bpc']:.3f} bpc, validation "
                      f"{rec['test_bpc']:.3f} bpc ({100 * rec['test_acc']:.1f}% next-character), "
                      f"{rec['tokens_per_s']:.0f} tokens/s", flush=True)
            elif self.cfg.progress and self.main:
                print(f"[{self.cfg.rule}] epoch {epoch}: loss {rec['train_loss']:.4f} "
                      f"test acc {100 * rec['test_acc']:.2f}% step {rec['step_time_ms']:.2f} ms", flush=True)
            clipped = max(rec.get("coincidence_clipped", [0.0]))
            if self.main and clipped > CLIP_WARNING:
                print(f"warning: epoch {epoch}: the pulse trains cut {100 * clipped:.0f}% of the requested "
                      "coincidence pulses (updates longer than bl); lower the learning rate or raise bl", flush=True)
            dead = rec.get("dead_areas", [])
            before = self.history[-2].get("dead_areas", []) if len(self.history) > 1 else []
            if self.main and sum(dead) and dead != before:  # once per change (metrics.json has every epoch)
                print(f"warning: epoch {epoch}: dead areas per layer {dead} (no sample routed "
                      "to them; raise the rule's balance option)", flush=True)
        return self.summary()

    def summary(self) -> dict:
        return {"config": dataclasses.asdict(self.cfg), "device": str(self.device),
                "n_params": sum(p.numel() for p in self.net.parameters()), "classes": self.data.classes,
                "epochs": self.history}

    def write_metrics(self) -> None:
        from .report import plot_curves

        checkpoint.atomic_write_text(self.out / "metrics.json", json.dumps(self.summary(), indent=2))
        plot_curves({self.cfg.rule: self.history}, self.out / "curves.png",
                    title=f"{self.cfg.rule} | {self.cfg.model} | {self.cfg.data}")


def load_run(run_dir: str | Path, accel: str = "cpu"):
    """Rebuild ``(net, rule, config, checkpoint)`` from a run folder's latest checkpoint (for export)."""
    run_dir = Path(run_dir)
    path = run_dir if run_dir.is_file() else checkpoint.latest(run_dir)
    if path is None:
        raise NeurosalError(f"no checkpoint in {run_dir}")
    st = checkpoint.load(path)
    cfg = TrainConfig.from_dict(st["config"], f"checkpoint {path}")
    device = resolve_device(accel)
    rule = make_rule(cfg.rule, **cfg.rule_options)
    net = build_net(cfg, rule, tuple(st["input_shape"]), st["n_classes"], device)
    try:
        net.load_state_dict(st["net"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise NeurosalError(f"checkpoint {path} does not fit its own model {cfg.model!r}: "
                            f"{first_line(exc)}") from exc
    return net.eval(), rule, cfg, st


def build_net(cfg: TrainConfig, rule: Rule, input_shape, n_classes: int, device: torch.device) -> torch.nn.Module:
    """The rule's version of the model, on ``device``, moved onto hardware ``cfg.device`` if given.

    Spec chains (mlp/cnn/snn) are built with the rule's hidden layers; zoo and user models
    (:mod:`neurosal.zoo`) as they are, with sal's area layers put in by :func:`neurosal.wrap.to_areas`.
    """
    from .zoo import build_zoo, is_zoo_spec

    torch.manual_seed(cfg.seed)
    if is_zoo_spec(cfg.model):
        net = build_zoo(cfg.model, tuple(input_shape), n_classes).to(device)
        if rule.name == "sal":
            names = sal_layers(net)
            if not names:
                raise NeurosalError(f"sal: {cfg.model} has no hidden nn.Linear to split into areas (conv "
                                    "layers stay dense); use dfa, or a model with hidden Linear layers")
            to_areas(net, names, rule)
    else:
        net = rule.build(cfg.model, input_shape, n_classes).to(device)
    if cfg.device:
        net = apply_device(net, cfg.device, cfg.device_options, cfg.seed)
    return net


def check_model_io(net: torch.nn.Module, spec: str, example: torch.Tensor, n_classes: int, sequence: bool) -> None:
    """One forward pass of ``net`` on two samples (eval mode, no gradients, random state kept): a model
    that cannot take the data's inputs, or does not return one score per class (per position for text),
    is refused with one line naming the shapes instead of failing inside the first training step."""
    was = net.training
    net.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[example.device.index] if example.is_cuda else []), \
                preserved_draws(net):
            out = net(example)
    except NeurosalError:
        raise
    except Exception as exc:
        raise NeurosalError(f"model {spec!r} cannot take this data's inputs (a batch of shape "
                            f"{tuple(example.shape)}): {type(exc).__name__}: {exc}") from exc
    finally:
        net.train(was)
    want = (len(example), example.shape[1], n_classes) if sequence else (len(example), n_classes)
    try:
        out, _ = select_output(out)  # a dict/tuple output: its logits
    except NeurosalError as exc:
        raise NeurosalError(f"model {spec!r}: {exc}") from None
    if tuple(out.shape) != want:
        got = tuple(out.shape)
        raise NeurosalError(f"model {spec!r} returns {got} for a batch of shape {tuple(example.shape)}; the "
                            f"trainer needs {want} ({'a score per class at every position' if sequence else 'a score per class'})")


def context_for(cfg: TrainConfig) -> int | None:
    """The window length of text data: ``cfg.context``, else the gpt model's ctx, else 128; None for
    other data (a context given with non-text data is refused when the data loads)."""
    from .text import is_text
    from .zoo import context_length

    if not is_text(cfg.data):
        return cfg.context
    ctx = context_length(cfg.model)
    if cfg.context is not None:
        if ctx is not None and cfg.context > ctx:
            raise NeurosalError(f"--context {cfg.context} is longer than the model's ctx={ctx}")
        return cfg.context
    return ctx or 128


def wrap_for_training(cfg: TrainConfig, net: torch.nn.Module, rule: Rule, input_shape, example) -> Wrapped:
    """The trainer's :class:`~neurosal.wrap.Wrapped` (feedback seeded by ``cfg.seed``); a general module
    is planned on ``example`` at once so every feedback matrix exists before the first checkpoint."""
    wrapped = Wrapped(net, rule, seed=cfg.seed, memory=cfg.memory,
                      input_shape=tuple(input_shape) if isinstance(net, Net) else None)
    rule.to(next(net.parameters()).device)
    if example is not None and rule.direct and not wrapped.chain:
        wrapped.materialise(example)
    return wrapped


def _repeated_blocks(model: torch.nn.Module) -> list:
    from .wrap import find_blocks

    return [model.get_submodule(n) for n in find_blocks(model)]
