"""Rules that carry the teaching signal down layer by layer: bp, fa, usf, frsf, brsf, kp, ldef.

``delta_l = post_l'(a_l) * g_l`` with ``g_l = B_{l+1}^T delta_{l+1}`` (plus ``g_{l+1}`` when block l+1 is
residual: the parameter-free skip carries the signal unchanged) and ``B`` shaped like the forward
weight ``W`` (for conv layers the product is the transposed convolution with kernel ``B``). The rules differ only
in ``B``: the true ``W`` (bp), a fixed random matrix (fa), ``sign(W)`` with uniform (usf), fixed
random (frsf) or batchwise random (brsf) magnitudes, a learned matrix (kp) or a learned low-rank matrix
(ldef).

Each rule's maths lives in three methods of the :class:`~neurosal.protocols.LayerwiseFeedback`
protocol, keyed by a layer *slot* (its number in the model): :meth:`init_feedback`,
:meth:`feedback_weight`, :meth:`learn_feedback`. The chain engine (spec models, slot = block index)
and the general engine (:mod:`neurosal.wrap`, any ``nn.Module``) both call exactly these.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from ..layers import accumulate_grad, feedback, weight_update
from ..options import check, non_negative, positive
from .base import Rule, RuleConfig, gaussian, register, uniform


class LayerwiseRule(Rule):
    def setup(self, net, out_shapes, n_classes, generator):
        """Feedback state for every block above the first (the first block's input needs no signal)."""
        for l, blk in enumerate(net.blocks):
            if l:
                self.init_feedback(l, blk.op.weight, generator)

    def begin(self, n_outputs: int) -> None:
        """The model's output width, before the first :meth:`init_feedback`; default: not needed."""

    def init_feedback(self, slot: int, weight: torch.Tensor, generator: torch.Generator) -> None:
        """Create the feedback state of layer ``slot``; default: none (B is a function of W)."""

    def feedback_weight(self, slot: int, weight: torch.Tensor) -> torch.Tensor:
        """The matrix that stands in for ``weight`` on the way down (layer ``slot``)."""
        raise NotImplementedError

    def learn_feedback(self, slot: int, op: nn.Module, x: torch.Tensor, delta: torch.Tensor,
                       dw: torch.Tensor | None = None) -> None:
        """Local plasticity of the feedback pathway of layer ``slot`` (ldef, kp); default: fixed.
        ``dw``: the layer's own update ``delta^T x``, when the engine has computed it already."""

    def teach(self, net, cache, e, target):
        last = len(cache) - 1
        g = e  # the signal on the current block's output
        delta = cache[last].delta_from_output(g)
        yield last, delta
        for l in range(last - 1, -1, -1):
            above = cache[l + 1]
            op = net.blocks[l + 1].op
            g_below = feedback(op, delta, self.feedback_weight(l + 1, op.weight), above.x.shape, above.ctx)
            if above.residual:
                g_below = g_below + g.reshape(g_below.shape)
            self.learn_feedback(l + 1, op, above.x, delta)
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

    def feedback_weight(self, slot, weight):
        return weight


def _weight_bound(w: torch.Tensor) -> float:
    fan_in = w[0].numel() if w.dim() > 1 else w.numel()
    return 1.0 / math.sqrt(fan_in)


def _xavier_bound(w: torch.Tensor) -> float:
    """Glorot & Bengio 2010: ``sqrt(6 / (fan_in + fan_out))``, fans counted over the kernel for conv."""
    fan_in = w[0].numel() if w.dim() > 1 else w.numel()
    fan_out = w.shape[0] * (w[0, 0].numel() if w.dim() > 2 else 1)
    return math.sqrt(6.0 / (fan_in + fan_out))


@dataclasses.dataclass
class FAConfig(RuleConfig):
    #: feedback init: "uniform" (torch's default layer init, U(-1/sqrt(fan_in), +)), "gaussian" (same
    #: variance) or "xavier" (U(-sqrt(6/(fan_in+fan_out)), +): BioTorch's default feedback init)
    init: str = "uniform"
    #: multiplies the feedback matrices
    scale: float = 1.0

    def __post_init__(self):
        check(self.init in ("gaussian", "uniform", "xavier"), "rule option init",
              f"use gaussian, uniform or xavier, not {self.init!r}")
        check(positive(self.scale), "rule option scale", f"must be a positive number, got {self.scale}")


@register
class FeedbackAlignment(LayerwiseRule):
    """Lillicrap et al. 2016: a fixed random ``B_l`` shaped like ``W_l`` for every block above the first."""

    name = "fa"
    summary = "feedback alignment: fixed random B shaped like W, layer by layer"
    Config = FAConfig

    def init_feedback(self, slot, weight, generator):
        bound = _weight_bound(weight)
        if self.config.init == "xavier":
            b = uniform(weight.shape, _xavier_bound(weight), generator)
        elif self.config.init == "uniform":
            b = uniform(weight.shape, bound, generator)
        else:
            b = gaussian(weight.shape, bound / math.sqrt(3), generator)
        self.register_buffer(f"B{slot}", (b * self.config.scale).to(weight.device, weight.dtype))

    def feedback_weight(self, slot, weight):
        return getattr(self, f"B{slot}")

    def set_feedback(self, slot: int, b: torch.Tensor) -> None:
        getattr(self, f"B{slot}").copy_(b)


@dataclasses.dataclass
class USFConfig(RuleConfig):
    #: "norm": |B|_F = |W|_F, following W as it grows (magnitude matched); "init": B's RMS fixed at W's
    #: RMS when the rule was set up -- the init's scale, as BioTorch and Xiao et al. 2018 scale sign
    #: feedback (their "scaling factor", the init's standard deviation); "none": raw sign(W)
    scaling: str = "norm"

    def __post_init__(self):
        check(self.scaling in ("norm", "init", "none"), "rule option scaling",
              f"use norm, init or none, not {self.scaling!r}")


@register
class SignSymmetry(LayerwiseRule):
    """Uniform sign-concordant feedback (Liao, Leibo & Poggio 2016; BioTorch's uSF):
    ``B = sign(W) * |W|_F / sqrt(numel)`` so the feedback has the forward weight's overall scale but
    carries only its signs. ``scaling="init"`` fixes that scale at W's RMS when the rule is set up, as
    BioTorch does (``sign(W)`` times the init's standard deviation; Xiao et al. 2018): the default
    follows W as it grows, which is less stable at large learning rates (benchmarks/reports/biotorch)."""

    name = "usf"
    summary = "sign symmetry: B = sign(W), magnitude-matched"
    Config = USFConfig

    def init_feedback(self, slot, weight, generator):
        _init_scale(self, slot, weight)

    def feedback_weight(self, slot, weight):
        return _sign_feedback(self, slot, weight, None)


def _init_scale(rule: LayerwiseRule, slot: int, weight: torch.Tensor) -> None:
    """Under ``scaling="init"``: W's RMS now (at set-up: the init's scale), kept in the state dict."""
    if rule.config.scaling == "init":
        rule.register_buffer(f"S{slot}", weight.detach().pow(2).mean().sqrt().clone())


def _sign_feedback(rule: LayerwiseRule, slot: int, weight: torch.Tensor,
                   magnitude: torch.Tensor | None) -> torch.Tensor:
    """``sign(W)`` times ``magnitude`` (uniform when None), scaled as ``rule.config.scaling`` says:
    ``|B|_F = |W|_F`` ("norm"), B's RMS = W's RMS at set-up ("init"), or not at all ("none")."""
    b = torch.sign(weight)
    if magnitude is not None:
        b = b * magnitude
    scaling = rule.config.scaling
    if scaling == "none":
        return b
    tiny = torch.finfo(b.dtype).tiny
    if scaling == "init":
        target = getattr(rule, f"S{slot}").to(b.dtype) * math.sqrt(b.numel())
        return b * (target / b.norm().clamp_min(tiny))
    return b * (weight.norm() / b.norm().clamp_min(tiny))


@dataclasses.dataclass
class SignConcordantConfig(USFConfig):
    """frsf / brsf: magnitudes |R|, R drawn like fa's uniform init; ``scaling`` as for usf."""


@register
class FixedRandomSignFeedback(LayerwiseRule):
    """frSF (Moskovitz et al. 2018; BioTorch's frSF): ``B = |R| * sign(W)``, R drawn once and fixed:
    the feedback always agrees with the forward weight in sign, with random fixed magnitudes."""

    name = "frsf"
    summary = "sign-concordant feedback with fixed random magnitudes"
    Config = SignConcordantConfig

    def init_feedback(self, slot, weight, generator):
        r = uniform(weight.shape, _weight_bound(weight), generator).abs()
        self.register_buffer(f"R{slot}", r.to(weight.device, weight.dtype))
        _init_scale(self, slot, weight)

    def feedback_weight(self, slot, weight):
        return _sign_feedback(self, slot, weight, getattr(self, f"R{slot}"))


@register
class BatchRandomSignFeedback(LayerwiseRule):
    """brSF (Moskovitz et al. 2018; BioTorch's brSF): ``B = |R| * sign(W)`` with R redrawn for every
    batch. R comes from a counter-based stream (seed, step, slot) drawn on the weight's device, so a
    resumed run redraws exactly the magnitudes the uninterrupted one would have."""

    name = "brsf"
    summary = "sign-concordant feedback with magnitudes redrawn every batch"
    Config = SignConcordantConfig

    def __init__(self, config=None):
        super().__init__(config)
        # the counter (seed, step) is read every step: its buffers stay on the CPU whatever device the
        # rule moves to (see _apply), so reading them never waits for a GPU
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("seed", torch.zeros((), dtype=torch.long))
        self._gens: dict = {}

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.step, self.seed = self.step.cpu(), self.seed.cpu()
        return self

    def init_feedback(self, slot, weight, generator):
        self.seed.fill_(int(torch.randint(0, 2 ** 31 - 1, (), generator=generator)))
        _init_scale(self, slot, weight)

    def feedback_weight(self, slot, weight):
        dev = weight.device
        gen = self._gens.get(dev)
        if gen is None:
            gen = self._gens[dev] = torch.Generator(dev)
        gen.manual_seed(int(self.seed) * 1_000_003 + int(self.step) * 7919 + slot)
        r = torch.rand(weight.shape, generator=gen, device=dev, dtype=weight.dtype)
        return _sign_feedback(self, slot, weight, r)

    def after_step(self, net) -> None:
        self.step += 1


@dataclasses.dataclass
class KPConfig(FAConfig):
    #: weight decay on the feedback matrices; with it B forgets its initialisation and approaches W
    decay: float = 1e-3

    def __post_init__(self):
        super().__post_init__()
        check(non_negative(self.decay), "rule option decay", f"must be a number >= 0, got {self.decay}")


@register
class KolenPollack(FeedbackAlignment):
    """Kolen-Pollack (Kolen & Pollack 1994; Akrout et al. 2019): a random ``B`` that learns locally with
    the forward layer's own update plus decay, ``dB = dW + decay * B``, so ``B - W`` decays and the
    feedback aligns with the weights without ever reading them. ``B`` is a parameter, stepped by the
    same optimiser as the weights."""

    name = "kp"
    summary = "Kolen-Pollack: B learns with W's own update plus decay"
    Config = KPConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.feedback = nn.ParameterDict()

    def init_feedback(self, slot, weight, generator):
        super().init_feedback(slot, weight, generator)
        self.feedback[str(slot)] = nn.Parameter(self._buffers.pop(f"B{slot}"))

    def feedback_weight(self, slot, weight):
        return self.feedback[str(slot)].detach()

    def set_feedback(self, slot, b):
        with torch.no_grad():
            self.feedback[str(slot)].copy_(b)

    @torch.no_grad()
    def learn_feedback(self, slot, op, x, delta, dw=None):
        b = self.feedback[str(slot)]
        if dw is None:
            dw, _ = weight_update(op, x, delta)
        accumulate_grad(b, dw.to(b.dtype) + (self.config.decay * self.loss_scale) * b)


@dataclasses.dataclass
class LDEFConfig(RuleConfig):
    #: rank of each feedback pathway (the error is compressed to this many dims); 0 = the model's output
    #: width (a classifier's classes, a language model's vocabulary)
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

    def __init__(self, config=None):
        super().__init__(config)
        self.factors = nn.ParameterList()
        self.n_classes = 0

    def setup(self, net, out_shapes, n_classes, generator):
        self.n_classes = n_classes
        super().setup(net, out_shapes, n_classes, generator)

    def begin(self, n_outputs):
        self.n_classes = n_outputs

    def init_feedback(self, slot, weight, generator):
        while len(self.factors) < 2 * slot:  # slots without feedback (a chain's first block) hold empties
            self.factors.append(nn.Parameter(torch.zeros(0, device=weight.device, dtype=weight.dtype)))
        r = self.config.rank or self.n_classes
        n_out, n_in = weight.shape[0], weight[0].numel()
        rank = min(r, n_out, n_in)
        a = gaussian((n_out, rank), 1 / math.sqrt(rank), generator)
        c = gaussian((rank, n_in), _weight_bound(weight) / math.sqrt(3), generator)
        self.factors.append(nn.Parameter(a.to(weight.device, weight.dtype)))
        self.factors.append(nn.Parameter(c.to(weight.device, weight.dtype)))

    def _ac(self, slot):
        return self.factors[2 * slot], self.factors[2 * slot + 1]

    def feedback_weight(self, slot, weight):
        a, c = self._ac(slot)
        return (a.detach() @ c.detach()).reshape(weight.shape)

    @torch.no_grad()
    def learn_feedback(self, slot, op, x, delta, dw=None):
        a, c = self._ac(slot)
        if isinstance(op, nn.Linear):  # project without forming the full dW (tokens: any leading dims)
            x2, d2 = x.reshape(-1, x.shape[-1]), delta.reshape(-1, delta.shape[-1])
            ga = d2.t() @ (x2 @ c.t().to(x2.dtype))
            gc = (d2 @ a.to(d2.dtype)).t() @ x2
        else:
            if dw is None:
                dw, _ = weight_update(op, x, delta)
            dw = dw.reshape(dw.shape[0], -1).to(a.dtype)
            ga, gc = dw @ c.t(), a.t() @ dw
        ga, gc = ga.to(a.dtype), gc.to(c.dtype)
        lam = self.config.decay * self.loss_scale  # the decay in the loss's units (see Rule.loss_scale)
        accumulate_grad(a, ga + lam * a)
        accumulate_grad(c, gc + lam * c)
