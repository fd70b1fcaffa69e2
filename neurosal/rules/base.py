"""The learning-rule interface and the registry that selects a rule by name.

A rule decides the *teaching signal* ``delta_l`` (dL/da_l as the rule estimates it) that each layer
receives. It never touches weights itself: the engine hands each ``delta_l`` to the layer's substrate
(:func:`neurosal.layers.apply_local_update`), which turns it into a weight change. The protocols a rule
offers the engines are in :mod:`neurosal.protocols`; the engines are :mod:`neurosal.wrap` (any module)
and :mod:`neurosal.engine` (the spec chains). Rules that learn
their own feedback pathway (ldef) hold those parameters and set their ``.grad``.

Two families:

* layerwise rules (bp, fa, usf, ldef) carry the signal down block by block through a feedback
  matrix shaped like the forward weight: :meth:`LayerwiseRule.feedback_weight`.
* direct rules (dfa, drtp, sal) project a global signal (error or target) straight to every hidden
  layer: :meth:`DirectRule.signal`. Their layers are independent, which the engine exploits.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
import torch.nn as nn

from ..errors import NeurosalError
from ..options import typed_fields

REGISTRY: dict[str, type["Rule"]] = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


@dataclasses.dataclass
class RuleConfig:
    """Options every rule accepts (subclasses add their own fields)."""


class Rule(nn.Module):
    """Base class. Feedback matrices are buffers, so they checkpoint and move with ``.to(device)``."""

    name = "?"
    summary = ""
    Config = RuleConfig
    #: trains with torch.autograd on the whole graph (the BP baseline) instead of teaching signals
    autograd = False
    #: every hidden layer's signal depends only on the output error/target (DFA family)
    direct = False
    #: the signal needs the target itself (drtp): the general engine asks for ``set_target(y)``
    needs_target = False
    #: the factor the user's loss carries in the coming backward (a GradScaler's scale, 1/k for k
    #: accumulated micro-batches; set per forward by :class:`~neurosal.wrap.Wrapped` from its
    #: ``loss_scale``): terms a rule adds that are not derived from the error -- drtp's target, kp/ldef's
    #: decay -- are multiplied by it, so they keep their weight against the error-derived ones
    loss_scale = 1.0

    def __init__(self, config: RuleConfig | None = None):
        super().__init__()
        self.config = config if config is not None else self.Config()

    def extra_repr(self) -> str:
        """The options that differ from the rule's defaults (``print(wrapped)`` shows them)."""
        default = self.Config()
        changed = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)
                   if getattr(self.config, f.name) != getattr(default, f.name)}
        return ", ".join(f"{k}={v!r}" for k, v in changed.items())

    def hidden_layer(self, n_in: int, n_out: int) -> nn.Module:
        """The layer used for hidden fully connected blocks (SAL overrides: area-partitioned)."""
        return nn.Linear(n_in, n_out)

    def hidden_tail(self, activation: nn.Module) -> nn.Module:
        """The parameter-free tail of hidden fully connected blocks (SAL adds RMS scaling)."""
        return activation

    def build(self, spec: str, input_shape, n_classes: int):
        """The model ``spec`` with this rule's hidden layers and tails."""
        from ..models import build_model

        return build_model(spec, input_shape, n_classes, self.hidden_layer, self.hidden_tail)

    def plan(self, run_steps: int) -> None:
        """Told before the model is built: the run's length in training steps (batches), for rules with a
        schedule over the run (SAL's warm-up); default: not needed."""

    def setup(self, net, out_shapes: list[tuple[int, ...]], n_classes: int, generator: torch.Generator):
        """Create feedback state for ``net``; ``out_shapes[l]`` is block l's per-sample output shape."""

    def teach(self, net, cache, e: torch.Tensor, target: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(l, delta_l)`` from the top layer down. ``e`` = dL/dlogits, ``target`` one-hot."""
        raise NotImplementedError

    def after_step(self, net) -> None:
        """Called after the optimiser step (hook for rules with per-step bookkeeping)."""

    def epoch_stats(self, net) -> dict:
        """Extra per-epoch metrics for metrics.json (e.g. SAL's area usage); default none."""
        return {}


def make_rule(name: str, **options) -> Rule:
    """Build a registered rule; ``options`` fill its config dataclass (unknown keys are refused)."""
    key = name.lower()
    if key not in REGISTRY:
        base, sep, opts = key.partition(":")
        if sep and base in REGISTRY:  # "fa:init=xavier", as the benchmark scripts spell a rule
            raise NeurosalError(f"unknown rule {name!r}: options are given apart -- on the command line "
                                f"--rule {base} --rule-options {opts}; in Python wrap(model, {base!r}, option=value)")
        raise NeurosalError(f"unknown rule {name!r}; known: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[key]
    return cls(cls.Config(**typed_fields(cls.Config, options, f"rule {key!r}")))


def parse_options(text: str | None) -> dict:
    """``"rank=10,areas=4"`` -> ``{"rank": 10, "areas": 4}`` (ints, floats, bools, strings)."""
    out: dict = {}
    if not text:
        return out
    for item in text.split(","):
        k, eq, v = (s.strip() for s in item.partition("="))
        if not (eq and k):
            raise NeurosalError(f"option {item!r} is not key=value")
        for conv in (int, float):
            try:
                out[k] = conv(v)
                break
            except ValueError:
                continue
        else:
            out[k] = {"true": True, "false": False}.get(v.lower(), v)
    return out


def gaussian(shape, std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * std


def uniform(shape, bound: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound
