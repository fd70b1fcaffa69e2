"""Rules that carry the teaching signal down block by block: bp, fa, usf, ldef.

``delta_l = post_l'(a_l) * g_l`` with ``g_l = B_{l+1}^T delta_{l+1}`` (plus ``g_{l+1}`` when block l+1 is
residual: the parameter-free skip carries the signal unchanged) and ``B`` shaped like the forward
weight ``W`` (for conv layers the product is the transposed convolution with kernel ``B``). The rules differ only
in ``B``: the true ``W`` (bp), a fixed random matrix (fa), ``sign(W)`` (usf) or a learned low-rank
matrix (ldef).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from ..errors import NeurosalError
from ..layers import feedback, weight_update
from ..options import check, non_negative, positive
from .base import Rule, RuleConfig, gaussian, register, uniform


class LayerwiseRule(Rule):
    def feedback_weight(self, l: int, op: nn.Module) -> torch.Tensor:
        """The matrix that stands in for ``op.weight`` on the way down (block ``l``)."""
        raise NotImplementedError

    def learn_feedback(self, l: int, entry, delta: torch.Tensor) -> None:
        """Local plasticity of the feedback pathway of block ``l`` (ldef); default: fixed."""

    def teach(self, net, cache, e, target):
        last = len(cache) - 1
        g = e  # the signal on the current block's output
        delta = cache[last].delta_from_output(g)
        yield last, delta
        for l in range(last - 1, -1, -1):
            above = cache[l + 1]
            op = net.blocks[l + 1].op
            g_below = feedback(op, delta, self.feedback_weight(l + 1, op), above.x.shape, above.ctx)
            if above.residual:
                g_below = g_below + g.reshape(g_below.shape)
            self.learn_feedback(l + 1, above, delta)
            g = g_below
            delta = cache[l].delta_from_output(g)
            yield l, delta


@register
class Backprop(LayerwiseRule):
    """The baseline. Training uses torch.autograd on the whole graph; :meth:`teach` is the same
    gradient computed block by block with the true weights (reference for tests and alignment)."""

    name = "bp"
    summary = "backpropagation (autograd), the baseline"
    autograd = True

    def feedback_weight(self, l, op):
        return op.weight


def _weight_bound(w: torch.Tensor) -> float:
    fan_in = w[0].numel() if w.dim() > 1 else w.numel()
    return 1.0 / math.sqrt(fan_in)


@dataclasses.dataclass
class FAConfig(RuleConfig):
    #: feedback init: "uniform" (torch's default layer init, U(-1/sqrt(fan_in), +)) or "gaussian"
    init: str = "uniform"
    #: multiplies the feedback matrices
    scale: float = 1.0

    def __post_init__(self):
        check(self.init in ("gaussian", "uniform"), "rule option init", f"use gaussian or uniform, not {self.init!r}")
        check(positive(self.scale), "rule option scale", f"must be a positive number, got {self.scale}")


@register
class FeedbackAlignment(LayerwiseRule):
    """Lillicrap et al. 2016: a fixed random ``B_l`` shaped like ``W_l`` for every block above the first."""

    name = "fa"
    summary = "feedback alignment: fixed random B shaped like W, layer by layer"
    Config = FAConfig

    def setup(self, net, out_shapes, n_classes, generator):
        if self.config.init not in ("uniform", "gaussian"):
            raise NeurosalError(f"fa: init must be 'uniform' or 'gaussian', not {self.config.init!r}")
        for l, blk in enumerate(net.blocks):
            if l == 0:
                continue
            w = blk.op.weight
            bound = _weight_bound(w)
            if self.config.init == "uniform":
                b = uniform(w.shape, bound, generator)
            else:
                b = gaussian(w.shape, bound / math.sqrt(3), generator)
            self.register_buffer(f"B{l}", (b * self.config.scale).to(w.device, w.dtype))

    def feedback_weight(self, l, op):
        return getattr(self, f"B{l}")

    def set_feedback(self, l: int, b: torch.Tensor) -> None:
        getattr(self, f"B{l}").copy_(b)


@dataclasses.dataclass
class USFConfig(RuleConfig):
    #: "norm": |B|_F = |W|_F (uSF with magnitude matched); "none": raw sign(W)
    scaling: str = "norm"

    def __post_init__(self):
        check(self.scaling in ("norm", "none"), "rule option scaling", f"use norm or none, not {self.scaling!r}")


@register
class SignSymmetry(LayerwiseRule):
    """Uniform sign-concordant feedback (Liao, Leibo & Poggio 2016; BioTorch's uSF):
    ``B = sign(W) * |W|_F / sqrt(numel)`` so the feedback has the forward weight's overall scale but
    carries only its signs."""

    name = "usf"
    summary = "sign symmetry: B = sign(W), magnitude-matched"
    Config = USFConfig

    def feedback_weight(self, l, op):
        w = op.weight
        s = torch.sign(w)
        if self.config.scaling == "norm":
            return s * (w.norm() / math.sqrt(w.numel()))
        if self.config.scaling == "none":
            return s
        raise NeurosalError(f"usf: scaling must be 'norm' or 'none', not {self.config.scaling!r}")


@dataclasses.dataclass
class LDEFConfig(RuleConfig):
    #: rank of each feedback pathway (the error is compressed to this many dims); 0 = n_classes
    rank: int = 0
    #: decay on the feedback factors (with the Kolen-Pollack-style update it makes B forget its init)
    decay: float = 1e-3

    def __post_init__(self):
        check(self.rank >= 0, "rule option rank", f"must be >= 0 (0: the number of classes), got {self.rank}")
        check(non_negative(self.decay), "rule option decay", f"must be a number >= 0, got {self.decay}")


@register
class LowDimErrorFeedback(LayerwiseRule):
    """Low-dimensional error feedback (after "Training Large Neural Networks With Low-Dimensional Error
    Feedback", 2025).

    Each block's feedback is a rank-r matrix ``B_l = A_l C_l`` (``A_l``: out x r, ``C_l``: r x in): the
    signal ``delta_{l}`` is first compressed to r dimensions (``delta A``) and then expanded (``. C``).
    The factors learn locally so that ``B`` aligns with the forward weight without reading it: each
    receives the projection of the forward layer's own update ``dW = delta^T x`` onto the factor
    (``dA = dW C^T``, ``dC = A^T dW``, i.e. the gradient of ``<A C, dW>``), plus a decay -- the
    Kolen-Pollack mechanism restricted to rank r. Optimised by the same optimiser as the weights.
    """

    name = "ldef"
    summary = "low-dimensional error feedback: learned rank-r B per layer"
    Config = LDEFConfig

    def setup(self, net, out_shapes, n_classes, generator):
        r = self.config.rank or n_classes
        if r < 1:
            raise NeurosalError("ldef: rank must be >= 1")
        self.factors = nn.ParameterList()
        for l, blk in enumerate(net.blocks):
            if l == 0:
                self.factors.append(nn.Parameter(torch.zeros(0)))
                self.factors.append(nn.Parameter(torch.zeros(0)))
                continue
            w = blk.op.weight
            if w.dim() not in (2, 4):
                raise NeurosalError(f"ldef: unsupported layer {type(blk.op).__name__}")
            n_out, n_in = w.shape[0], w[0].numel()
            rank = min(r, n_out, n_in)
            a = gaussian((n_out, rank), 1 / math.sqrt(rank), generator)
            c = gaussian((rank, n_in), _weight_bound(w) / math.sqrt(3), generator)
            self.factors.append(nn.Parameter(a.to(w.device, w.dtype)))
            self.factors.append(nn.Parameter(c.to(w.device, w.dtype)))

    def _ac(self, l):
        return self.factors[2 * l], self.factors[2 * l + 1]

    def feedback_weight(self, l, op):
        a, c = self._ac(l)
        return (a.detach() @ c.detach()).reshape(op.weight.shape)

    @torch.no_grad()
    def learn_feedback(self, l, entry, delta):
        a, c = self._ac(l)
        x = entry.x
        if delta.dim() == 2:  # Linear: project without forming the full dW
            ga = delta.t() @ (x @ c.t())
            gc = (delta @ a).t() @ x
        else:
            dw, _ = weight_update(entry.op, x, delta)
            dw = dw.reshape(dw.shape[0], -1)
            ga, gc = dw @ c.t(), a.t() @ dw
        lam = self.config.decay
        a.grad = ga + lam * a
        c.grad = gc + lam * c
