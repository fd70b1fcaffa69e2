"""The contracts that hold neurosal together, in one file.

**A rule decides the teaching signal a layer receives; a substrate decides how that layer turns the
signal into a weight change.** Neither knows the other, and neither assumes the model is a chain:

* the *engine* (:mod:`neurosal.wrap` for any ``nn.Module``, :mod:`neurosal.engine` for the spec chains)
  finds the parametrised layers and the feedback points, and asks the rule for signals;
* a *rule* offers one of two small protocols -- :class:`LayerwiseFeedback` (the signal goes down layer
  by layer through a matrix shaped like the forward weight: bp, fa, usf, frsf, brsf, kp, ldef) or
  :class:`DirectFeedback` (a global signal projected straight to every feedback point: dfa, drtp, sal);
* a *layer* is any module with a ``weight`` whose local update the float substrate knows (``nn.Linear``,
  ``nn.Conv1d``, ``nn.Conv2d``); a layer that realises updates differently (an analog array, SAL's area
  layer) offers :class:`LocalUpdate`, and the engine hands it the signal instead; an attention module
  whose packed q/k/v projection is read by a substrate offers :class:`InProjection`;
* a *tail* (activation, pooling, spiking neurons) is differentiated by its true local derivative,
  unless it offers :class:`LocalDerivative` (spiking neurons' eligibility traces);
* a *substrate package* (analog arrays in ``hw_models``) offers :class:`Substrate` through an entry point.

Everything here is a ``typing.Protocol``: implementations do not inherit from these classes; the
engine checks them with ``isinstance`` (``runtime_checkable``), never by probing attribute names --
on hot paths through :func:`implements`, which decides once per class.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn


@runtime_checkable
class LayerwiseFeedback(Protocol):
    """A rule that carries the signal down through each layer's feedback matrix ``B`` (``W``'s shape).

    ``slot`` numbers the layer within the model (stable across runs: registration order); the rule
    keeps whatever state its ``B`` needs per slot.
    """

    def begin(self, n_outputs: int) -> None:
        """Called once before the first ``init_feedback``: the model's output width (a classifier's
        classes, a language model's vocabulary), for rules whose feedback is sized by it (ldef's rank)."""

    def init_feedback(self, slot: int, weight: torch.Tensor, generator: torch.Generator) -> None:
        """Create the feedback state of the layer in ``slot`` whose forward weight is ``weight``."""

    def feedback_weight(self, slot: int, weight: torch.Tensor) -> torch.Tensor:
        """The matrix that stands in for ``weight`` on the way down."""

    def learn_feedback(self, slot: int, op: nn.Module, x: torch.Tensor, delta: torch.Tensor,
                       dw: torch.Tensor | None = None) -> None:
        """Local plasticity of the feedback pathway (ldef, kp); fixed-feedback rules do nothing. ``dw`` is
        the layer's own update ``delta^T x`` when the engine has it already."""


@runtime_checkable
class DirectFeedback(Protocol):
    """A rule that projects one global signal to every feedback point through one matrix."""

    def source(self, e: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """The global signal from the output error ``e`` = dL/doutput and the one-hot ``target``."""

    def make_projection(self, n_out: int, widths: list[int], generator: torch.Generator) -> torch.Tensor:
        """The fixed ``(n_out, sum(widths))`` feedback matrix, one column block per point."""

    def project(self, s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``s @ b``: the global signal projected to all points in one matmul."""


@runtime_checkable
class LocalUpdate(Protocol):
    """A layer that turns a teaching signal on its output into a weight change itself (into ``.grad``).

    ``ctx`` is what its forward reported (SAL: the route of every sample), or ``None``.
    """

    def local_update(self, x: torch.Tensor, delta: torch.Tensor, ctx: Any = None) -> None: ...


@runtime_checkable
class InProjection(Protocol):
    """An attention module whose packed q/k/v projection is a layer of its own (an analog array): the
    engine computes that projection with ``in_projection(x)`` (``x @ in_proj_weight^T + in_proj_bias``
    as the substrate reads it) wherever it writes ``nn.MultiheadAttention`` out."""

    def in_projection(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class OwnRandomState(Protocol):
    """A layer drawing from generators of its own (analog read noise): recomputing a forward pass
    (``memory="recompute"``) replays its draws from the state saved at the forward, as torch's own
    checkpointing does for the default generators."""

    def rng_state(self) -> Any: ...

    def set_rng_state(self, state: Any) -> None: ...


@runtime_checkable
class ReportsContext(Protocol):
    """A layer whose forward makes per-sample decisions its update needs later (SAL's routing)."""

    def forward_ctx(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]: ...


@runtime_checkable
class RoutedFeedback(Protocol):
    """A layer whose input-side feedback depends on its forward's per-sample decisions (SAL's areas)."""

    def feedback_input(self, delta: torch.Tensor, weight: torch.Tensor, ctx: Any) -> torch.Tensor: ...


@runtime_checkable
class LocalDerivative(Protocol):
    """A tail with its own local learning rule in place of its true derivative (spiking neurons)."""

    def local_vjp(self, state: Any, g: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class AfterStep(Protocol):
    """A layer that realises the optimiser's proposed change physically (analog arrays)."""

    def after_optimizer_step(self) -> None: ...


@runtime_checkable
class EpochStats(Protocol):
    """A layer that reports per-epoch figures for ``metrics.json`` (None: nothing to report)."""

    def epoch_stats(self) -> dict: ...


@runtime_checkable
class Substrate(Protocol):
    """What a hardware package offers neurosal through the ``neurosal.substrates`` entry point."""

    def names(self) -> list[str]:
        """The device presets it provides."""

    def accepts(self, name: str) -> bool:
        """Whether it can build ``name`` (a preset name or a file)."""

    def apply(self, net: nn.Module, name: str, options: dict, seed: int) -> nn.Module:
        """Put every Linear/Conv of ``net`` (any module) on that device; the rule is unchanged."""


@functools.cache
def _class_implements(cls: type, proto: type) -> bool:
    members = [m for m in proto.__dict__ if not m.startswith("_") and callable(proto.__dict__[m])]
    return all(callable(getattr(cls, m, None)) for m in members)


def implements(obj: Any, proto: type) -> bool:
    """``isinstance(obj, proto)`` for the method-only protocols above, decided once per class (a
    runtime-checkable ``isinstance`` costs ~10 us, too much per layer per step)."""
    return _class_implements(type(obj), proto)
