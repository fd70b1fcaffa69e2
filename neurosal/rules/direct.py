"""Rules that project a global signal straight to every hidden layer: dfa and drtp.

``delta_l = post_l'(a_l) * (s B_l)`` where ``s`` is the output error ``e`` (DFA, Nokland 2016) or the
negated one-hot target ``-y*`` (DRTP, Frenkel et al. 2021; the sign makes its updates agree with DFA's
when the output is still near zero). The output layer always learns from its own error ``e``.

All hidden layers' ``B_l`` are column blocks of one matrix ``B`` (n_classes x sum of layer sizes), so
the projections for all layers are one matmul (Launay et al. 2020) -- or, in the engine's low-memory
mode, one slice at a time while the forward pass is recomputed.

Residual blocks write into one shared stream, which the head reads; the error direction that helps
is the same for every block writing to it. With ``share_stream`` (default) all blocks of a residual
stream get the stream's one feedback matrix, so their updates pull the same way instead of 127
independent random ways.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..errors import NeurosalError
from ..options import check, positive
from .base import Rule, RuleConfig, gaussian, register, uniform


@dataclasses.dataclass
class DirectConfig(RuleConfig):
    #: "gaussian" N(0, scale^2/n_classes) or "uniform" with the same variance
    init: str = "gaussian"
    scale: float = 1.0
    #: residual blocks use the feedback matrix of the stream they add to: a spec chain's residual
    #: blocks; in the general engine, consecutive points of one width on a stream the head reads through
    #: a normalisation (``readout_norm`` found one: pre-LN transformers). Other points: one block each
    share_stream: bool = True
    #: feedback variance: "classes" scale^2/n_classes per entry (each unit's signal ~ the error's size:
    #: fine with Adam-style optimisers); "width" scale^2/width of the point, so a point's whole signal has
    #: the error's norm, as backprop's gradients roughly do (TinyDFA's normalisation) -- use it with
    #: plain SGD on wide points (conv feature maps), where "classes" makes updates width-times too large
    feedback_norm: str = "classes"
    #: general engine, per-sample error, points with positions (feature maps, tokens): "auto"/"shared" one
    #: signal per channel shared by the positions, divided by their number (as a pooled readout's true
    #: gradient is); "broadcast" the same signal at every position, not divided (BioTorch's conv DFA: the
    #: error broadcast over positions through a kernel-shaped matrix; borders aside); "flatten" one per
    #: unit (what spec chains always do)
    positions: str = "auto"
    #: general engine, feedback points on a residual stream (blocks, ``Point`` markers) that the head
    #: reads through a LayerNorm/RMSNorm (pre-LN transformers: the final norm): each point's signal
    #: reaches it through that norm's local derivative, taken at the point's own value. The norm has no
    #: weights to transport; its derivative removes the part of the signal along the stream's own
    #: direction, which would only grow the stream (without it the direct rules blow a GPT's stream up
    #: to norms of 1e3-1e5 and stay near the unigram level; see benchmarks/reports/lm). False: the
    #: projected signal arrives as it is
    readout_norm: bool = True

    def __post_init__(self):
        check(self.init in ("gaussian", "uniform"), "rule option init", f"use gaussian or uniform, not {self.init!r}")
        check(self.feedback_norm in ("classes", "width"), "rule option feedback_norm",
              f"use classes or width, not {self.feedback_norm!r}")
        check(self.positions in ("auto", "shared", "broadcast", "flatten"), "rule option positions",
              f"use auto, shared, broadcast or flatten, not {self.positions!r}")
        check(positive(self.scale), "rule option scale", f"must be a positive number, got {self.scale}")


class DirectRule(Rule):
    direct = True
    Config = DirectConfig

    def setup(self, net, out_shapes, n_classes, generator):
        if self.config.init not in ("gaussian", "uniform"):
            raise NeurosalError(f"{self.name}: init must be 'gaussian' or 'uniform'")
        if self.config.positions in ("shared", "broadcast"):
            raise NeurosalError(f"{self.name}: spec chains project to every unit (positions=flatten); "
                                f"positions={self.config.positions} is for other models (neurosal.wrap)")
        self.spans: list[tuple[int, int]] = []
        self.time_steps: list[int | None] = []  # spiking layers share one projection across time
        width = 0
        widths: list[int] = []
        for l, shape in enumerate(out_shapes[:-1]):
            if getattr(net.blocks[l].post, "shares_feedback_over_time", False):
                self.time_steps.append(shape[0])
                shape = shape[1:]
            else:
                self.time_steps.append(None)
            if l and net.blocks[l].residual and self.config.share_stream:
                self.spans.append(self.spans[-1])  # same stream, same feedback
            else:
                self.spans.append((width, width + math.prod(shape)))
                width += math.prod(shape)
                widths.append(math.prod(shape))
        p = next(net.parameters())
        self.register_buffer("B", self.make_projection(n_classes, widths, generator).to(p.device, p.dtype))

    def make_projection(self, n_out: int, widths: list[int], generator: torch.Generator) -> torch.Tensor:
        """The fixed ``(n_out, sum(widths))`` feedback matrix, one column block per point: N(0,
        scale^2/n_out) (``feedback_norm="classes"``) or N(0, scale^2/width) per block (``"width"``); ``init=
        "uniform"``: the same variances."""
        std = self.config.scale / math.sqrt(n_out)
        shape = (n_out, sum(widths))
        if self.config.init == "gaussian":
            b = gaussian(shape, std, generator)
        else:
            b = uniform(shape, std * math.sqrt(3), generator)
        if self.config.feedback_norm == "width" and widths:
            b = torch.cat([part * math.sqrt(n_out / w) for part, w in zip(b.split(list(widths), dim=1), widths)], 1)
        return b

    def source(self, e: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def project(s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``s @ b`` for all points at once (rows of ``s``: samples or positions), row-major, so each
        point's columns are a view the next elementwise op reads row by row. (The transposed product
        ``(b^T s^T)^T`` is 2x faster on its own with 10 classes, but every consumer then reads it
        column-wise: a transposing copy or a 20x slower ReLU derivative per point, which costs more.)"""
        lead = s.shape[:-1]
        return (s.reshape(-1, s.shape[-1]) @ b).reshape(*lead, b.shape[1])

    def feedback_slice(self, l: int) -> torch.Tensor:
        start, end = self.spans[l]
        return self.B[:, start:end]

    def _over_time(self, l: int, g: torch.Tensor) -> torch.Tensor:
        t = self.time_steps[l]
        return g if t is None else g.unsqueeze(1).expand(g.shape[0], t, *g.shape[1:])

    def signal(self, l: int, e, target) -> torch.Tensor:
        """The signal on hidden block ``l``'s output alone (low-memory path)."""
        return self._over_time(l, self.project(self.source(e, target), self.feedback_slice(l)))

    def teach(self, net, cache, e, target):
        last = len(cache) - 1
        yield last, cache[last].delta_from_output(e)
        if last == 0:
            return
        g_all = self.project(self.source(e, target), self.B)  # every hidden layer's projection in one matmul
        for l in range(last - 1, -1, -1):
            start, end = self.spans[l]
            yield l, cache[l].delta_from_output(self._over_time(l, g_all[:, start:end]))


@register
class DFA(DirectRule):
    name = "dfa"
    summary = "direct feedback alignment: output error projected to every layer"

    def source(self, e, target):
        return e


@dataclasses.dataclass
class DRTPConfig(DirectConfig):
    #: subtract the batch's mean target (the class frequencies) from each one-hot target: the signal
    #: keeps what tells samples apart and drops the part every sample shares, which a softmax output
    #: learns from its own error. It mattered on text while the signal reached a GPT's stream as
    #: projected (4.55 -> 4.40 bits/char on the LM test's model, unigram 4.43); through the readout
    #: norm (``readout_norm``), which already removes the push along the stream, it changes little
    #: (3.53 -> 3.52)
    center: bool = False


@register
class DRTP(DirectRule):
    name = "drtp"
    summary = "direct random target projection: the one-hot target, no error"
    Config = DRTPConfig

    #: the signal is the target, not the error: the general engine needs ``set_target(y)`` per batch
    needs_target = True

    def source(self, e, target):
        if target is None:
            raise NeurosalError("drtp teaches from the target: call model.set_target(y) before backward()")
        # the one-hot target, negated, with the 1/batch scale of a mean-loss error (per row of e); rows
        # without a target (all zero: positions a loss ignores, ignore_index) stay out of that count and
        # of the centring, and get no signal (counted on the device: no wait for a GPU every step)
        t = target.reshape(e.shape).to(e.dtype)
        rows = t.reshape(-1, t.shape[-1])
        has = rows.ne(0).any(-1, keepdim=True)
        n = has.sum().clamp_min(1).to(e.dtype)
        if self.config.center:
            t = (rows - (rows.sum(0) / n) * has).reshape(t.shape)
        return -t / n
