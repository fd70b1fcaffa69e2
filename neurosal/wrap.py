"""The general engine: any ``nn.Module`` trained by any rule, inside the user's own training loop.

    model = neurosal.wrap(MyNet(), rule="dfa")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()          # the rule's signals, not backprop's
        opt.step()

``loss.backward()`` stays the user's: the rule acts through autograd, so optimisers, schedulers, AMP
(autocast + GradScaler), gradient clipping, DDP and any loss work unchanged. How each family acts:

* **layerwise rules** (bp, fa, usf, frsf, brsf, kp, ldef): every ``nn.Linear``, ``nn.Conv1d``,
  ``nn.Conv2d`` and the packed in-projection and out-projection of ``nn.MultiheadAttention`` runs through
  one autograd function whose backward sends the signal to its input through the rule's feedback matrix
  (:meth:`~neurosal.protocols.LayerwiseFeedback.feedback_weight`) and hands the layer its local update
  (``dW = delta^T x``, or the layer's own :class:`~neurosal.protocols.LocalUpdate`: analog arrays).
  Everything else -- BatchNorm, LayerNorm, softmax attention, GELU, residual adds, pooling, reshapes --
  keeps its true derivative, so with feedback = the weights every gradient equals autograd's.
* **direct rules** (dfa, drtp, sal): the model's output is joined to a set of *feedback points*; the
  backward pass takes the error ``e`` = dL/doutput there, projects the rule's global signal to all points
  in one matmul and injects each slice at its point. The graph is cut after each point (what follows
  sees a detached tensor), so a point's signal trains only the layers between it and the point below,
  through their true local derivatives, and no error passes between points. Points are chosen
  automatically (:func:`find_points`) or marked with :class:`Point` modules. Where the points lie on a
  residual stream that the head reads through a LayerNorm/RMSNorm (:func:`readout_norm`), each point's
  signal first passes through that norm's local derivative at the point's value. When the output has more
  than two dimensions (a sequence, ``(B, T, V)``), the projection is per position: a point shaped
  ``(B, T, ...)`` receives at position t the projection of the error at position t.
* **spec chains** (:class:`neurosal.models.Net`, what ``mlp:``/``cnn``/``snn:`` build) take a fast path
  behind the same API: the forward pass runs without autograd, keeping only what each block's local
  update needs, and the backward is :func:`neurosal.engine.chain_backward` -- the same rule methods
  (``feedback_weight``, ``source``), one matmul for all direct projections, and the low-memory
  ``memory="recompute"`` mode. ``benchmarks/general_bench.py`` measures it against the general path.
* **activation checkpointing inside the model** (``torch.utils.checkpoint``, either kind; Hugging Face's
  gradient checkpointing): a recompute is the forward again -- the layers' own draws and the buffers as
  the forward found them (:class:`~neurosal.layers.ReplayLedger`); points met with autograd off (the
  reentrant kind) get their signals when their region is recomputed.
* **sal**: the chosen ``nn.Linear`` layers (default: every Linear but the output head and attention
  projections -- MLP hidden layers and transformer FFNs) become :class:`~neurosal.areas.AreaLinear`
  layers routing every sample (every token, for sequences) to one of K areas; the rest is dfa.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .areas import AreaLinear
from .engine import MEMORY_MODES, ChainStep, block_output_shapes
from .errors import NeurosalError
from .layers import (NORMS, PARAM_LAYERS, ReplayLedger, _conv_args, check_materialised, feedback, in_backward,
                     hook_kind, keep_own_forward, norm_vjp, own_forward, preserved_draws, replace_module,
                     weight_hook, weight_update)
from .models import Net
from .protocols import DirectFeedback, InProjection, LayerwiseFeedback, LocalUpdate, RoutedFeedback, implements
from .rules import make_rule
from .rules.base import Rule
from .rules.layerwise import LayerwiseRule

#: modules whose output is a natural feedback point after a parametrised layer (a plain stack)
ACTIVATIONS = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Mish,
               nn.Hardtanh, nn.ReLU6, nn.Hardswish, nn.PReLU, nn.SELU, nn.CELU)
#: parameter-free modules a plain stack's feedback point moves through (activation, pooling, reshapes):
#: the signal arrives where the next parametrised layer reads, as in a spec chain's block tail
PASS_THROUGH = ACTIVATIONS + (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                              nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                              nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Flatten,
                              nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)
#: normalisation layers a plain stack's point moves through too (Conv -> BatchNorm -> ReLU, Linear ->
#: LayerNorm -> GELU): their affine parameters and derivatives belong to the layer they follow, so they learn
#: from its point's signal through their local derivative (left below the next point, they learnt through
#: the next layer's true weights, and the signal skipped their derivative)
NORM_TAIL = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm, nn.GroupNorm,
             nn.LocalResponseNorm, nn.RMSNorm)
#: parametrised layers the layerwise rules have no feedback matrix for (their true derivative is kept)
UNTREATED = (nn.RNNBase, nn.Bilinear)
#: torch's own composite layers that count as blocks
TORCH_BLOCKS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


#: torch functions that multiply by a weight matrix: a parameter that feeds one of them outside the
#: layers a rule knows carries the signal down through its true weights (weight transport)
_MIXING = {F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
           F.conv_transpose3d, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.addmv,
           torch.mv, torch.einsum, torch.tensordot, torch.Tensor.matmul, torch.Tensor.__matmul__,
           torch.Tensor.__rmatmul__, torch.Tensor.mm, torch.Tensor.bmm, torch.Tensor.addmm}


#: elementwise activation functions a layer's output may go through in a user's forward (``F.relu(fc(x))``):
#: a feedback point at such a layer's own output takes their derivative, as a module activation's point
#: after it would (DFA's ``(B e) * f'(a)``)
FUNCTIONAL_ACTIVATIONS = {F.relu, torch.relu, torch.Tensor.relu, F.relu6, F.gelu, torch.tanh, torch.Tensor.tanh,
                          F.tanh, torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid, F.silu, F.mish, F.leaky_relu,
                          F.elu, F.selu, F.celu, F.softplus, F.hardtanh, F.hardswish, F.hardsigmoid, F.softsign,
                          F.logsigmoid, F.tanhshrink, F.softshrink, F.hardshrink}

#: deterministic functions that reshape rather than compute, which a functional stack applies between an
#: activation and the next layer (``F.max_pool2d(F.relu(conv(x)), 2)``, ``torch.flatten(x, 1)``): a point
#: followed by them takes its signal where the next layer reads, as after ``nn.MaxPool2d``/``nn.Flatten``
FUNCTIONAL_RESHAPES = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                       F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                       F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.flatten, torch.Tensor.flatten,
                       torch.Tensor.view, torch.Tensor.reshape, torch.reshape}

#: their in-place forms (``x.relu_()``): the derivative cannot be replayed from a value they overwrote
INPLACE_ACTIVATIONS = {f for f in (getattr(torch, n, None) for n in ("relu_", "tanh_", "sigmoid_", "selu_", "celu_"))
                       if f is not None} | {torch.Tensor.relu_, torch.Tensor.tanh_, torch.Tensor.sigmoid_,
                                            F.relu_, F.leaky_relu_, F.elu_, F.hardtanh_}


@dataclass
class _Use:
    """One use of a watched tensor ``t`` by a torch function, as :func:`activation_chain` reads it (small:
    no large intermediate is kept alive through the planning pass)."""
    func: object
    first: bool  # t is the function's first argument
    extra: tuple | None  # the other arguments, None when one is a tensor
    kwargs: dict | None
    out: torch.Tensor | None  # kept only for activations and reshapes (a chain goes on from them)
    in_place: bool  # the function returned t itself
    same_shape: bool
    out_shape: tuple


class _ConsumerWatch(torch.overrides.TorchFunctionMode):
    """During the planning pass: which torch functions use each watched tensor (the modules' outputs,
    added as they are made; then the activations' and reshapes' outputs after them) -- how the direct
    rules tell ``F.relu(fc(x))``. Reads of metadata (``x.size(0)``: no tensor out) are no uses."""

    def __init__(self):
        super().__init__()
        self.watched: dict[int, torch.Tensor] = {}  # id -> tensor (kept alive: ids are not reused)
        self.consumers: dict[int, list[_Use]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat = [b for a in (*args, *kwargs.values()) for b in (a if isinstance(a, (list, tuple)) else (a,))]
        hits = [a for a in flat if torch.is_tensor(a) and id(a) in self.watched]
        tensor_out = torch.is_tensor(out) or (isinstance(out, (tuple, list)) and any(map(torch.is_tensor, out)))
        if not hits or not tensor_out:
            return out
        chainable = torch.is_tensor(out) and (func in FUNCTIONAL_ACTIVATIONS or func in FUNCTIONAL_RESHAPES)
        clean = not any(torch.is_tensor(a) for a in (*args[1:], *kwargs.values()))
        for a in hits:
            self.consumers.setdefault(id(a), []).append(_Use(
                func, bool(args) and args[0] is a, tuple(args[1:]) if clean else None, dict(kwargs) if clean else None,
                out if chainable else None, out is a, torch.is_tensor(out) and out.shape == a.shape,
                tuple(out.shape) if torch.is_tensor(out) else ()))
        if chainable:
            self.watched[id(out)] = out
        return out


def activation_chain(watch: _ConsumerWatch, o: torch.Tensor) -> tuple[list, str | None]:
    """The functional activations, pooling and flattening ``o`` goes through before the next layer reads
    it, each the only use of the one before (``torch.flatten(F.max_pool2d(F.relu(o), 2), 1)``: three),
    as ``(func, extra args, kwargs)``; and why the chain stops early when an in-place activation is what
    follows (its derivative cannot be replayed from the value)."""
    chain: list = []
    t = o
    while True:
        used = watch.consumers.get(id(t), [])
        if not used:
            return chain, None
        u = used[0]
        if (u.func in FUNCTIONAL_ACTIVATIONS and u.in_place) or u.func in INPLACE_ACTIVATIONS:
            return chain, getattr(u.func, "__name__", str(u.func))
        if len(used) != 1 or not u.first or u.out is None or u.extra is None:
            return chain, None
        if u.func in FUNCTIONAL_ACTIVATIONS and u.same_shape:
            chain.append((u.func, u.extra, u.kwargs))
        elif u.func in (torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.flatten, torch.Tensor.flatten):
            if len(u.out_shape) != 2 or u.out_shape[0] != t.shape[0] or t.dim() < 2:
                return chain, None  # only (B, ...) -> (B, features): a view's sizes are this batch's
            chain.append((torch.flatten, (1,), {}))
        elif u.func in FUNCTIONAL_RESHAPES and not u.kwargs.get("return_indices") and u.out_shape[:2] == t.shape[:2]:
            chain.append((u.func, u.extra, u.kwargs))  # pooling: batch and channels kept
        else:
            return chain, None
        t = u.out


def _back_through(replay: tuple[torch.Tensor, torch.Tensor], signal: torch.Tensor) -> torch.Tensor:
    """A signal made at the output of a :func:`chain_replay`, taken back through its derivative."""
    a, h = replay
    return torch.autograd.grad(h, a, signal.to(h.dtype))[0]


def chain_replay(chain: list, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of the chain run again from ``value``, with autograd: the output's shape is where
    the signal is made, its derivative takes it back to the point."""
    with torch.enable_grad():
        a = value.detach().requires_grad_(True)
        h = a
        for func, extra, kwargs in chain:
            h = func(h, *extra, **kwargs)
    return a, h


class _MixingWatch(torch.overrides.TorchFunctionMode):
    """During one forward: which of the ``watched`` parameters -- or tensors made from one alone (a
    transpose, a cast, a view) -- enter a matrix product (:data:`_MIXING`).
    A layer the rules do not know (Hugging Face GPT-2's ``Conv1D``, a user's own ``x @ W``) is found
    by what it does, not by its type."""

    def __init__(self, watched: Iterable[tuple[str, torch.Tensor]]):
        super().__init__()
        self.names = {id(p): n for n, p in watched}
        self.keep: list = []  # made tensors stay alive while watched: their ids are not reused
        self.found: dict[str, list[torch.Tensor]] = {}  # name -> the products it entered

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat = [b for a in (*args, *kwargs.values()) for b in (a if isinstance(a, (list, tuple)) else (a,))]
        hits = [(self.names[id(a)], a) for a in flat if torch.is_tensor(a) and id(a) in self.names]
        if hits:
            if func in _MIXING:
                for n, _ in hits:
                    self.found.setdefault(n, []).append(out)
            elif (torch.is_tensor(out) and sum(torch.is_tensor(a) for a in flat) == 1
                  and out.numel() == hits[0][1].numel()):  # W.t(), W.to(dtype), W.view(...): still W
                self.names[id(out)] = hits[0][0]
                self.keep.append(out)
        return out


def unknown_mixing(model: nn.Module, known: Iterable[nn.Module], run) -> dict[str, list[torch.Tensor]]:
    """``model``'s modules whose trainable parameters enter a matrix product in ``run()`` (a forward)
    without belonging to a ``known`` layer (nor an :class:`AreaLinear`/attention/untreated layer, which
    have their own handling): module name -> the products' outputs."""
    skip = {id(p) for m in known for p in m.parameters()}
    skip |= {id(p) for m in model.modules() if isinstance(m, (AreaLinear, nn.MultiheadAttention) + UNTREATED)
             for p in m.parameters()}
    watched = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in skip]
    if not watched:
        run()
        return {}
    watch = _MixingWatch(watched)
    with watch:
        run()
    found: dict[str, list[torch.Tensor]] = {}
    for n, outs in watch.found.items():
        found.setdefault(n.rpartition(".")[0] or n, []).extend(outs)
    return found


def _warn_unknown_mixing(rule: str, names: list[str], how: str) -> None:
    if names:
        warnings.warn(f"{rule}: {names[:3]}{' and more' if len(names) > 3 else ''} multiply by their own weight "
                      f"matrices but are no nn.Linear/Conv/attention layer the rules know: {how} (weight "
                      "transport there, silently backprop's)", stacklevel=5)


class Point(nn.Identity):
    """A feedback point for the direct rules (dfa, drtp, sal): put it in your model where the projected
    error should arrive (after a block, after an activation). Identity in every other respect; when a
    model holds any Point, only Points are used."""


# ----------------------------------------------------------------------------- layerwise: one function

@dataclass(eq=False)
class Site:
    """A parametrised layer as the layerwise engine sees it: its rule slot, the module whose
    ``weight``/``bias`` and local update it uses, and what its backward needs decided once."""

    slot: int
    op: nn.Module
    rule: Rule

    def __post_init__(self):
        self.local = implements(self.op, LocalUpdate)  # the layer's substrate writes its own .grad
        self.learns = type(self.rule).learn_feedback is not LayerwiseRule.learn_feedback
        self.linear = isinstance(self.op, nn.Linear) and not implements(self.op, RoutedFeedback)
        #: a Linear/Conv subclass with a forward of its own (mask, weight scale, fake quantisation)
        self.custom = own_forward(self.op) and not isinstance(self.op, _InProjection)


class _FeedbackLayer(torch.autograd.Function):
    """Forward: the layer's own forward. Backward: the rule's feedback to the input, the substrate's
    local update to the weights."""

    @staticmethod
    def forward(ctx, x, weight, bias, site: Site, run):
        ctx.site = site
        ctx.save_for_backward(x)
        return run(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors  # once: a checkpoint lets saved tensors be unpacked only once
        x_dtype = x.dtype
        site = ctx.site
        op, rule = site.op, site.rule
        if x.dtype != g.dtype:  # autocast: the layer computed in g's dtype
            x = x.to(g.dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if site.linear and not site.local:  # the common case, without the generic dispatch
            g2 = g.reshape(-1, g.shape[-1])
            gx = gw = gb = None
            if need_x:
                b = rule.feedback_weight(site.slot, op.weight)
                gx = (g2 @ (b if b.dtype == g.dtype else b.to(g.dtype))).reshape(x.shape)
            if need_w or site.learns:
                dw = g2.t() @ x.reshape(-1, x.shape[-1])
                if site.learns:
                    rule.learn_feedback(site.slot, op, x, g, dw)
                if need_w:
                    gw = dw if dw.dtype == op.weight.dtype else dw.to(op.weight.dtype)
            if need_b:
                gb = g2.sum(0)
                gb = gb if gb.dtype == op.bias.dtype else gb.to(op.bias.dtype)
            return gx, gw, gb, None, None
        gx = None
        if need_x:
            b = rule.feedback_weight(site.slot, op.weight).to(g.dtype)
            gx = feedback(op, g, b, x.shape).to(x_dtype)
        if site.local:  # the layer's substrate turns the signal into its change itself
            if site.learns:
                rule.learn_feedback(site.slot, op, x, g)
            op.local_update(x, g, None)
            return gx, None, None, None, None
        gw = gb = None
        if need_w or need_b or site.learns:
            dw, db = weight_update(op, x, g)
            if site.learns:
                rule.learn_feedback(site.slot, op, x, g, dw)
            gw = dw.to(op.weight.dtype) if need_w else None
            gb = db.to(op.bias.dtype) if db is not None and need_b else None
        return gx, gw, gb, None, None


class _OwnForwardLayer(torch.autograd.Function):
    """A Linear/Conv subclass that computes its output its own way (``F.linear(x, W * mask)``, an
    equalised-learning-rate scale, fake quantisation). Backward: the input's signal is the rule's
    feedback, as for any layer; the parameters' gradients are the layer's own local derivative --
    autograd of its forward, whose graph the forward keeps (no weight transport: it stays in the layer).
    The plain layer's ``delta^T x`` would be the wrong gradient for such a weight."""

    @staticmethod
    def forward(ctx, x, site: Site, run, *params):
        ctx.site, ctx.shape, ctx.params = site, x.shape, params
        ctx.save_for_backward(x)
        with torch.enable_grad():
            out = run(x.detach())
        ctx.out = out
        return out.detach()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        site, out = ctx.site, ctx.out
        ctx.out = None
        op, rule = site.op, site.rule
        params = ctx.needs_input_grad[3:]
        own = [p for p, need in zip(ctx.params, params) if need]
        got = iter(torch.autograd.grad(out, own, g, allow_unused=True) if own and out.requires_grad else
                   [None] * len(own))
        grads = [next(got) if need else None for need in params]
        gx = None
        if ctx.needs_input_grad[0]:
            b = rule.feedback_weight(site.slot, op.weight).to(g.dtype)
            gx = feedback(op, g, b, ctx.shape).to(x.dtype)
        if site.learns:  # kp / ldef learn their feedback from the plain layer's update
            rule.learn_feedback(site.slot, op, x.to(g.dtype), g)
        return (gx, None, None, *grads)


class _LayerForward:
    """A layer's forward through :class:`_FeedbackLayer` (an object, not a closure, so ``copy.deepcopy``
    of a wrapped model gives a copy whose layers point at their own parameters)."""

    def __init__(self, site: Site, original, bypass: list):
        self.site, self.original, self.bypass = site, original, bypass

    def __call__(self, x):
        if self.bypass[0] or not torch.is_grad_enabled():
            return self.original(x)
        site = self.site
        if site.custom:
            return _OwnForwardLayer.apply(x, site, self.original, *[p for p in site.op.parameters() if p.requires_grad])
        op = site.op
        return _FeedbackLayer.apply(x, op.weight, op.bias, site, self.original)


class _Recomputed:
    """A feedback block's forward under activation checkpointing (direct rules, ``memory="recompute"``).

    The graph is cut at every point, so each block's backward needs only that block: autograd keeps
    just its input and recomputes the rest when the projected signal arrives, one block at a time. The
    recompute is the forward again exactly: torch's checkpoint replays its generators, the wrapper's
    :class:`~neurosal.layers.ReplayLedger` the layers' own draws and the buffers as the forward found
    them (running statistics move once per step, not twice; SAL routes as in the forward)."""

    def __init__(self, original):
        self.original = original

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.original(*args, **kwargs)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.original, *args, use_reentrant=False, **kwargs)


@dataclass(eq=False)
class _Deferred:
    """A feedback point met with autograd off inside a training forward: a reentrant checkpoint (torch's
    ``use_reentrant=True``, Hugging Face's default for gradient checkpointing) runs its region so and
    again, recording, in the backward. Its signal is computed with the others' and waits for that
    recompute (:class:`_Inject`)."""
    module: nn.Module
    shape: torch.Size
    dtype: torch.dtype
    value: torch.Tensor | None  # kept only when a readout norm's derivative needs it


class _Inject(torch.autograd.Function):
    """A recomputed point's output: its backward gives the point's signal, whatever arrives from above
    (the graph is cut there, as at every point)."""

    @staticmethod
    def forward(ctx, out, signal):
        ctx.signal = signal
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        signal, ctx.signal = ctx.signal, None
        return signal.to(g.dtype), None


class _InProjection(nn.Linear):
    """The packed q/k/v projection of an ``nn.MultiheadAttention`` seen as a Linear (shares its tensors,
    registers nothing: it is not part of the module tree)."""

    def __init__(self, mha: nn.MultiheadAttention):
        nn.Module.__init__(self)
        self.mha = [mha]  # a list: not registered as a submodule
        self.in_features, self.out_features = mha.embed_dim, 3 * mha.embed_dim

    @property
    def weight(self):  # noqa: D401 - the live parameter (optimisers may replace data, not the object)
        return self.mha[0].in_proj_weight

    @property
    def bias(self):
        return self.mha[0].in_proj_bias

    def forward(self, x):
        mha = self.mha[0]
        if implements(mha, InProjection):  # the projection as its substrate reads it (analog arrays)
            return mha.in_projection(x)
        return F.linear(x, self.weight, self.bias)


def _attention_mask(mha, attn_mask, key_padding_mask, is_causal, b, l, s, dtype, device):
    """One additive float mask, broadcastable to (B, H, L, S), from torch's mask conventions."""
    mask = None
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(l, s, dtype=torch.bool, device=device).triu(1)
    if attn_mask is not None:
        m = attn_mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(m, float("-inf"))
        m = m.to(dtype)
        mask = m.reshape(b, mha.num_heads, l, s) if m.dim() == 3 else m
    if key_padding_mask is not None:
        k = key_padding_mask
        if k.dtype == torch.bool:
            k = torch.zeros(k.shape, dtype=dtype, device=device).masked_fill(k, float("-inf"))
        k = k.to(dtype).reshape(b, 1, 1, s)
        mask = k if mask is None else mask + k
    return mask


class MHAForward:
    """``nn.MultiheadAttention.forward`` written out, with the packed in-projection a callable ``in_proj``
    and the out-projection the module's own ``out_proj`` called as a module: the layerwise rules route
    both through their feedback layers, analog attention both through its arrays."""

    def __init__(self, mha: nn.MultiheadAttention, in_proj: nn.Module):
        self.mha, self.in_proj = mha, in_proj

    def __call__(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                 average_attn_weights=True, is_causal=False):
        mha, in_proj = self.mha, self.in_proj
        if not mha.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, l, e = query.shape
        s = key.shape[1]
        h = mha.num_heads
        if query is key and key is value:
            q, k, v = in_proj(query).chunk(3, dim=-1)
        else:  # cross-attention: the packed projection of each input, its own third kept
            q = in_proj(query).chunk(3, dim=-1)[0]
            k = in_proj(key).chunk(3, dim=-1)[1]
            v = in_proj(value).chunk(3, dim=-1)[2]
        q, k, v = (t.reshape(b, -1, h, e // h).transpose(1, 2) for t in (q, k, v))
        mask = _attention_mask(mha, attn_mask, key_padding_mask, is_causal, b, l, s, q.dtype, q.device)
        p = mha.dropout if mha.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(e // h)
            if mask is not None:
                scores = scores + mask
            attn = torch.softmax(scores, dim=-1)
            out = F.dropout(attn, p) @ v
        else:
            attn = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = mha.out_proj(out.transpose(1, 2).reshape(b, l, e))
        if not mha.batch_first:
            out = out.transpose(0, 1)
        if attn is not None and average_attn_weights:
            attn = attn.mean(1)
        return out, attn


def _check_mha(name: str, mha: nn.MultiheadAttention) -> None:
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise NeurosalError(f"{name}: nn.MultiheadAttention with kdim/vdim, add_bias_kv or add_zero_attn "
                            "is not supported by the layerwise rules; use the packed default")


def layer_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The parametrised layers the layerwise rules act on, in registration order (their slots)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            _check_mha(name, m)
            out.append((f"{name}.in_proj", m))
        elif isinstance(m, PARAM_LAYERS):
            out.append((name, m))
    return out


# ----------------------------------------------------------------------------- direct: points and hub

class _Hub(torch.autograd.Function):
    """Joins the output and the feedback points; its backward turns dL/doutput into every point's signal."""

    @staticmethod
    def forward(ctx, wrapped, out, entries, keys, *points):
        """``entries``: this forward's points in order, tensors (``points``) or :class:`_Deferred`;
        ``keys``: which of ``wrapped.point_names`` made each (a module called at every time step of a
        loop makes several)."""
        ctx.wrapped = wrapped
        ctx.keys = keys
        ctx.target = wrapped.claim_target()
        ctx.deferred = [p if isinstance(p, _Deferred) else None for p in entries]
        ctx.shapes = [p.shape for p in entries]
        ctx.dtypes = [p.dtype for p in entries]
        # the readout norm's derivative is taken at every point's value, a functional activation's at
        # its own point's
        ctx.keep = [bool(wrapped._readout) or k in wrapped._gates for k in keys]
        live = iter(points)
        ctx.save_for_backward(*[t for t, k in [(next(live), k) for p, k in zip(entries, ctx.keep)
                                               if not isinstance(p, _Deferred)] if k])
        return out.view_as(out)

    @staticmethod
    def backward(ctx, e):
        wrapped = ctx.wrapped
        values = None
        if any(ctx.keep):
            live = iter(ctx.saved_tensors)
            values = [(next(live) if k else None) if d is None else d.value for d, k in zip(ctx.deferred, ctx.keep)]
        signals = wrapped._signals(e, ctx.shapes, ctx.dtypes, values, ctx.target, ctx.keys)
        out = []
        for d, s in zip(ctx.deferred, signals):
            if d is None:
                out.append(s)
            else:  # for the recompute of its region, which comes later in this backward
                wrapped._pending.setdefault(d.module, []).append(s)
        return (None, e, None, None, *out)


def _is_block(m: nn.Module) -> bool:
    if isinstance(m, TORCH_BLOCKS):
        return True
    if isinstance(m, PARAM_LAYERS + (AreaLinear,)):  # a layer with children of its own (weight_norm's
        return False  # parametrizations, an area layer's parameter lists)
    has_params = any(True for _ in m.parameters())
    has_children = any(True for _ in m.children())
    return has_params and has_children


def _weight_layers(m: nn.Module) -> list[nn.Module]:
    """The modules under ``m`` (itself included) that multiply by a weight: Linear/Conv layers, attention,
    and any module holding a matrix or kernel of its own (Hugging Face's ``Conv1D``, a layer scale);
    not normalisations (vectors) and not embeddings (a lookup)."""
    if isinstance(m, PARAM_LAYERS + (nn.MultiheadAttention, AreaLinear)):
        return [m]  # one layer, whatever it holds (an area layer's lists, weight_norm's parametrizations)
    own = not isinstance(m, nn.Embedding) and any(p.dim() >= 2 for p in m.parameters(recurse=False))
    return [m] * own + [w for c in m.children() for w in _weight_layers(c)]


def _units(m: nn.Module) -> dict[str, nn.Module]:
    """The blocks among ``m``'s children (by child name; a single-block container: ``"child.inner"``): its
    parametrised composite children when it is an ``nn.Sequential``/``nn.ModuleList`` holding two or more
    (ResNet stages, transformer layers, a stem and stages in one Sequential); else its children of one
    type, two or more of them, each with two or more weight layers (GoogLeNet's Inception modules, a
    U-Net's Down blocks, DenseNet's dense layers), and the one block of each of two or more single-block
    containers, all of one type (ResNet stages of one block)."""
    kids = list(m.named_children())
    containers = (nn.Sequential, nn.ModuleList)
    if isinstance(m, containers):
        blocks = {c: s for c, s in kids if _is_block(s)}
        return blocks if len(blocks) >= 2 else {}
    same: dict[type, dict] = {}
    for c, s in kids:
        if _is_block(s) and not isinstance(s, containers) and len(_weight_layers(s)) >= 2:
            same.setdefault(type(s), {})[c] = s
    units = {c: s for group in same.values() if len(group) >= 2 for c, s in group.items()}
    singles = {}
    for c, s in kids:
        inner = list(s.named_children()) if isinstance(s, containers) else []
        if len(inner) == 1 and _is_block(inner[0][1]):
            singles[f"{c}.{inner[0][0]}"] = inner[0][1]
    if len(singles) >= 2 and len({type(s) for s in singles.values()}) == 1:
        units.update(singles)
    return units


def _blocks_in(m: nn.Module, prefix: str) -> list[str]:
    if prefix and isinstance(m, TORCH_BLOCKS):  # torch's transformer layers are blocks even alone
        return [prefix]
    units = _units(m)
    found = []
    for c, s in m.named_children():  # in the order of the children: a unit, or the blocks inside one
        name = f"{prefix}.{c}" if prefix else c
        unit = next(((u, b) for u, b in units.items() if u == c or u.startswith(c + ".")), None)
        if unit is not None:
            found += _finer(unit[1], f"{prefix}.{unit[0]}" if prefix else unit[0])
        elif not isinstance(m, (nn.Sequential, nn.ModuleList)) or not units:
            found += _blocks_in(s, name)
    return found


def _finer(unit: nn.Module, name: str) -> list[str]:
    """A block, or the finer blocks it merely holds: a unit whose weight layers all lie in inner blocks of
    two or more weight layers each (a ConvNeXt/RegNet/Swin stage, a T5 stack, DenseNet's dense block) is
    replaced by them -- the feedback points go where the residual blocks end, not at the end of a stage."""
    if isinstance(unit, TORCH_BLOCKS):
        return [name]
    inner = _blocks_in(unit, name)
    if not inner:
        return [name]
    modules = [unit.get_submodule(n[len(name) + 1:]) for n in inner]
    covered = {id(w) for b in modules for w in _weight_layers(b)}
    if all(len(_weight_layers(b)) >= 2 for b in modules) and all(id(w) in covered for w in _weight_layers(unit)):
        return inner
    return [name]


def find_blocks(model: nn.Module) -> list[str]:
    """Repeated blocks, outermost first (:func:`_units`), each replaced by the finer blocks it merely
    holds (:func:`_finer`): ResNet and ConvNeXt blocks, transformer layers, Inception modules."""
    return _blocks_in(model, "")


@torch.no_grad()
def probe(model: nn.Module, args, kwargs, watch: _ConsumerWatch | None = None) -> tuple[list, object, list[str], list]:
    """One forward pass: every leaf-module call in order, ``(name, module, input, output)``; the output;
    the names of all modules, composite ones too, in the order their calls finished; and their outputs.
    With ``watch``, the functions consuming each parametrised layer's output are recorded too."""
    calls: list = []
    finished: list[str] = []
    outputs: list = []  # each finished call's output, beside ``finished``
    names = {m: n for n, m in model.named_modules()}

    def record(mod, inp, out):
        finished.append(names[mod])
        outputs.append(out)
        # a layer is one call even with children: torch.nn.utils.parametrize (weight_norm, orthogonal)
        # gives it a `parametrizations` child, which left it out and let it learn by backprop
        if next(mod.children(), None) is None or isinstance(mod, (nn.MultiheadAttention, AreaLinear) + PARAM_LAYERS):
            calls.append((names[mod], mod, inp[0] if inp else None, out))
        if watch is not None and torch.is_tensor(out):  # any module's output may be a feedback point
            # uses before it was this module's output were inside the module: an in-place activation
            # module (``ReLU6(inplace=True)`` ending torchvision's conv-norm-activation) returns the tensor
            # it changed, whose in-place use came before the point, not after it
            watch.consumers.pop(id(out), None)
            watch.watched[id(out)] = out

    handles = [m.register_forward_hook(record) for m in model.modules()]
    was = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), preserved_draws(model), warnings.catch_warnings():
            # a reentrant torch.utils.checkpoint in the model warns that nothing here requires grad
            warnings.filterwarnings("ignore", "None of the inputs have requires_grad", UserWarning)
            if watch is not None:
                with watch:
                    out = model(*args, **kwargs)
            else:
                out = model(*args, **kwargs)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return calls, out, finished, outputs


def select_output(out, key=None):
    """The tensor of a model's output that carries the error, and how to put a tensor back in its place.

    ``out`` a tensor (``key`` None); a mapping (a dict, HF-style ``ModelOutput``): ``out[key]``, by
    default ``"logits"`` or else its only tensor of two or more dims; a tuple/list/namedtuple:
    ``out[key]``, by default the first tensor of two or more dims (so a ``(loss, logits, ...)`` tuple
    gives the logits); a dataclass: the field ``key`` (default ``"logits"``). Returns
    ``(tensor, put)`` with ``put(t)`` the output with ``t`` in the tensor's place (a mapping is
    changed in place, a tuple or dataclass rebuilt)."""
    def batched(v):
        return torch.is_tensor(v) and v.dim() >= 2

    def pick(keys, values, what):
        if key is not None:
            if key not in keys:
                raise NeurosalError(f"output={key!r} is not in the model's {what} (has {list(keys)})")
            return key
        if "logits" in keys and batched(values[keys.index("logits")]):
            return "logits"
        found = [k for k, v in zip(keys, values) if batched(v)]
        if len(found) == 1 or (found and what == "tuple"):
            return found[0]
        raise NeurosalError(f"cannot tell which tensor of the model's {what} is the output the rule learns "
                            f"from ({found or 'none of two or more dims'}): name it with output=...")

    if torch.is_tensor(out):
        if key is not None:
            raise NeurosalError(f"output={key!r} names a part of the model's output, but it returns one tensor")
        return out, lambda t: t
    if isinstance(out, Mapping):
        keys = list(out.keys())
        k = pick(keys, [out[k] for k in keys], "mapping")

        def put(t):
            out[k] = t
            return out
        return out[k], put
    if isinstance(out, (tuple, list)):
        k = pick(list(range(len(out))), list(out), "tuple")

        def put(t):
            items = [t if i == k else v for i, v in enumerate(out)]
            return out._make(items) if hasattr(out, "_make") else type(out)(items)
        return out[k], put
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        fields = [f.name for f in dataclasses.fields(out)]
        k = pick(fields, [getattr(out, f) for f in fields], "dataclass")
        return getattr(out, k), lambda t: dataclasses.replace(out, **{k: t})
    raise NeurosalError(f"the direct rules need the model's output as a tensor, a mapping, a tuple or a "
                        f"dataclass holding one, got {type(out).__name__}")


#: layers that work channels-first on (B, C, L) inputs: a 3-d point after one of them is a feature map
CHANNELS_FIRST = (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, nn.InstanceNorm1d, nn.GroupNorm, nn.MaxPool1d,
                  nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)


def channels_first(modules: dict, points: list[str], finished: list[str]) -> list[tuple[str, int] | None]:
    """Per point (in the order of ``points``; at its first call): how the last parametrised or pooling layer
    to run before it lays out channels -- ``("first", 0)`` when it works channels-first on (B, C, L)
    (Conv1d, BatchNorm1d, 1-d pooling), ``("last", width)`` when it works on a last axis of that width (a
    Linear, a plain LayerNorm / RMSNorm, attention), None when it tells neither (a block's own layer scale, a normalisation
    that permutes). A 4-d point is a feature map (B, C, H, W) unless a last-axis layer of its last axis's
    width made it (Swin's (B, H, W, C); MaxViT's attention permutes back to channels first)."""
    found: dict[str, tuple[str, int] | None] = {}
    for i, name in enumerate(finished):
        if name not in points or name in found:
            continue
        last = next((modules[n] for n in reversed(finished[:i + 1])
                     if isinstance(modules[n], CHANNELS_FIRST + PARAM_LAYERS)
                     or any(True for _ in modules[n].parameters(recurse=False))),
                    None)
        found[name] = None
        if isinstance(last, CHANNELS_FIRST):  # (not Conv2d: a 3-d point after one is a flattened,
            found[name] = ("first", 0)       # usually transposed patch embedding -- tokens)
        elif isinstance(last, nn.Linear):
            found[name] = ("last", last.out_features)
        elif isinstance(last, nn.MultiheadAttention):
            found[name] = ("last", last.embed_dim)
        elif isinstance(last, (nn.LayerNorm, nn.RMSNorm)) and type(last).forward in (nn.LayerNorm.forward,
                                                                                    nn.RMSNorm.forward):
            shape = last.normalized_shape
            found[name] = ("last", shape[-1]) if shape else None
    return [found.get(name) for name in points]


def dense_output(sel: torch.Tensor, modules: dict, finished: list[str]) -> bool:
    """Whether the output is dense and channels-first, (B, K, *S): one prediction per position, classes
    on axis 1 as ``F.cross_entropy`` takes them (segmentation maps, volumes, per-step Conv1d heads).
    Four or more axes always; three when the last layer to run is a Conv1d / ConvTranspose1d -- after a
    Linear, (B, T, V) are tokens with the classes last."""
    if sel.dim() >= 4:
        return True
    if sel.dim() != 3:
        return False
    last = next((modules[n] for n in reversed(finished) if isinstance(modules[n], PARAM_LAYERS + (AreaLinear,))),
                None)
    return isinstance(last, (nn.Conv1d, nn.ConvTranspose1d))


def output_module(modules: dict, sel: torch.Tensor, points: list[str], finished: list[str],
                  outputs: list) -> str | None:
    """The module whose output is ``sel`` (the innermost, called once per forward, after every feedback
    point), or None. The direct rules join the points to the output there, so that whatever the model
    does with it afterwards -- a loss computed inside ``forward`` (HF-style ``labels=``), a dict or a
    tuple around it -- passes dL/d(that output) to the rule."""
    for i, (name, o) in enumerate(zip(finished, outputs)):
        if o is sel:
            if finished.count(name) != 1:
                return None
            last_point = max((j for j, n in enumerate(finished) if n in set(points)), default=-1)
            return name if last_point < i and name else None
    return None


def find_points(model: nn.Module, calls: list, out: torch.Tensor, blocks: list[str] | None = None,
                finished: list[str] | None = None) -> list[str]:
    """Where the direct rules' signal arrives (module names; the point is the module's output):

    1. the :class:`Point` modules, if the model has any;
    2. else every repeated block (:func:`find_blocks`): residual blocks, transformer layers;
    3. else, in a plain stack, every Linear/Conv but the head (the one whose output is the model's, else
       the last one called): after the run of normalisation/activation/pooling/reshape modules applied
       to its output (where the next layer reads), or at its own output when the activation is
       functional.

    A candidate whose output is the model's output is dropped (the output learns from ``e`` itself).
    """
    marked = [n for n, m in model.named_modules() if isinstance(m, Point)]
    if marked:
        return marked
    outputs = {}
    for name, _, _, o in calls:
        outputs.setdefault(name, o)
    blocks = find_blocks(model) if blocks is None else blocks  # (the caller may have found them already)
    if finished is not None:  # blocks of a kind that never ran in the planning pass are training-only
        # side branches -- GoogLeNet's auxiliary classifiers, whose outputs are logits with their own loss
        # -- not stages of the trunk (a block skipped by LayerDrop while others of its kind ran stays one)
        modules = dict(model.named_modules())
        ran = {type(modules[n]) for n in finished}
        blocks = [b for b in blocks if type(modules[b]) in ran]
    if blocks:
        return [b for b in blocks if outputs.get(b) is not out]
    layers = [(i, c) for i, c in enumerate(calls) if isinstance(c[1], PARAM_LAYERS + (AreaLinear,))]
    head = next((k for k, (_, c) in enumerate(layers) if c[3] is out), len(layers) - 1)
    head_module = layers[head][1][1] if layers else None
    points: list[str] = []
    # every call of the head is left out: a layer applied at every time step (a recurrent or spiking
    # loop) is called many times, and its earlier calls are the head as much as its last
    for i, (name, _, _, o) in [(i, c) for i, c in layers if c[1] is not head_module]:
        point, j = name, i
        while True:  # follow the output through activation, pooling, reshapes and spiking neurons
            nxt = next(((k, c) for k, c in enumerate(calls[j + 1:], j + 1) if c[2] is o), None)
            if nxt is None:
                break
            k, (nxt_name, mod, _, out) = nxt
            if isinstance(mod, PASS_THROUGH + NORM_TAIL):
                o = out
            elif is_neuron(mod, o, out):
                o = out[0]
            else:
                break
            j, point = k, nxt_name
        if point not in points:
            points.append(point)
    return points


def point_tensor(output):
    """A feedback point's tensor in a tuple or dict output and how to put a replacement back: the first
    tensor of a tuple ((spikes, membrane) of a spiking neuron, (output, state) of a recurrent cell: the
    state passes on untouched) or the first tensor entry of a dict (an HF-style encoder's hidden states).
    ``(None, None)`` when there is none."""
    if isinstance(output, tuple):
        if not (output and torch.is_tensor(output[0])):
            return None, None
        rest = output[1:]
        return output[0], (lambda t: (t, *rest)) if type(output) is tuple else (lambda t: type(output)(t, *rest))
    key = next((k for k, v in output.items() if torch.is_tensor(v)), None)
    if key is None:
        return None, None

    def put(t):
        out = copy.copy(output)  # the same type (ModelOutput, dict), the point's tensor replaced
        out[key] = t
        return out
    return output[key], put


def is_neuron(module: nn.Module, x, out) -> bool:
    """A stateful neuron layer applied to a layer's output ``x``: no trainable parameters, returning a
    tuple whose first tensor is shaped like ``x`` (snnTorch's ``Leaky``: ``(spikes, membrane)``; a
    Norse cell: ``(z, state)``). A feedback point goes after it, as after an activation."""
    return (isinstance(out, tuple) and bool(out) and torch.is_tensor(out[0]) and torch.is_tensor(x)
            and out[0].shape == x.shape and not any(p.requires_grad for p in module.parameters()))


def _may_learn(module: nn.Module) -> bool:
    """A point module with trainable parameters, or none at all (a neuron after a layer)."""
    params = list(module.parameters())
    return not params or any(p.requires_grad for p in params)


def readout_norm(modules: dict, points: list[str], finished: list[str]) -> str | None:
    """The name of the normalisation through which the head reads a residual stream's feedback points.

    Found when the points are blocks or :class:`Point` markers (a stream the blocks write to; points
    of a plain stack have their own tails) and the first leaf module to run after the last point is an
    ``nn.LayerNorm`` / ``nn.RMSNorm`` (a pre-LN transformer's final norm: GPT's ``ln_f``, ViT's
    ``norm``). The direct rules' signals then reach the points through its local derivative
    (:func:`neurosal.layers.norm_vjp`, at each point's value; points of another width are left as
    they are): that derivative is part of the path to the output and transports no weights.
    """
    if not points or not all(isinstance(modules[n], Point) or _is_block(modules[n]) for n in points):
        return None
    wanted = set(points)
    last = max((i for i, n in enumerate(finished) if n in wanted), default=None)
    if last is None:
        return None
    nxt = next((n for n in finished[last + 1:] if next(modules[n].children(), None) is None), None)
    return nxt if nxt is not None and isinstance(modules[nxt], NORMS) else None


# ----------------------------------------------------------------------------- the wrapper

class _Twins:
    """Wrappers deep-copied from one another before their first step -- an EMA or SWA average made at
    the start of training (``torch.optim.swa_utils.AveragedModel``, timm's ``ModelEma``), which then
    copies the trained wrapper's buffers into its own by position, every step. The direct rules make B
    at the first step; the first of the twins to make it plans the others with the same example input,
    so they hold the same entries of the same shapes (each draws its own B from its own copy of the
    generator: the same B it would have drawn at its own first step). Shared, not copied, by deepcopy."""

    def __init__(self, first: "Wrapped"):
        self.members: weakref.WeakSet = weakref.WeakSet([first])

    def __deepcopy__(self, memo):
        for m in list(self.members):  # the copy of a member being deep-copied joins
            twin = memo.get(id(m))
            if twin is not None:
                self.members.add(twin)
        return self

    def __reduce__(self):  # pickled (torch.save of the module): a loaded wrapper plans itself
        return (_no_twins, ())

    def plan_others(self, source: "Wrapped", args, kwargs) -> None:
        for twin in list(self.members):
            if twin is source or twin.has_projection or twin._hooks:
                continue
            p = next(twin.model.parameters(), None)
            if p is None:
                continue
            move = lambda v: v.to(p.device) if torch.is_tensor(v) else v  # noqa: E731 (an EMA kept on the CPU)
            try:
                twin.materialise(*[move(a) for a in args], **{k: move(v) for k, v in kwargs.items()})
            except (NeurosalError, RuntimeError):
                pass  # it plans itself at its own first step, as before


def _no_twins() -> _Twins:
    t = _Twins.__new__(_Twins)
    t.members = weakref.WeakSet()
    return t


class Wrapped(nn.Module):
    """A user's model trained by a rule. ``forward`` is the model's; train it with ``loss.backward()``.

    ``wrapped.model`` is the model (whose ``state_dict`` keys are the user's), ``wrapped.rule`` the rule
    (learned feedback, kp/ldef, is among ``wrapped.parameters()``); :meth:`unwrap` gives the plain
    model back for export.
    """

    def __init__(self, model: nn.Module, rule: Rule, seed: int = 0, points: Iterable[str] | None = None,
                 memory: str = "cache", input_shape: tuple[int, ...] | None = None,
                 output: str | int | None = None, loss_scale=None):
        super().__init__()
        if memory not in MEMORY_MODES:
            raise NeurosalError(f"unknown memory mode {memory!r}; use one of {MEMORY_MODES}")
        if output is not None and not isinstance(output, (str, int)):
            raise NeurosalError(f"output= names a key or an index of the model's output, got {type(output).__name__}")
        #: which part of a tuple/dict output carries the error (:func:`select_output`; None: found)
        self.output = output
        #: the module the direct rules join the points to the output at (:func:`output_module`), if any
        self.output_name: str | None = None
        self._joined = False  # this forward's points are joined already (at that module)
        #: what the loss is multiplied by before ``backward()``: None (1), a number, a callable returning
        #: one, or a ``torch.amp.GradScaler`` (its current scale) -- see :meth:`current_loss_scale`
        self.loss_scale = loss_scale
        self.model = model
        self.rule = rule
        self.seed = seed
        self.memory = memory
        #: called with each layer as soon as its update is in ``.grad`` (chains: overlapping all-reduce)
        self.on_layer = None
        self.chain = isinstance(model, Net)
        self._chain_ready = False
        self._restore: list = []
        self._hooks: list = []
        self._bypass = [False]  # True: the patched layers run plain autograd (the BP reference)
        self._collect: list | None = None
        self._watch: dict | None = None  # alignment probes: the points' signals / true gradients
        self._target: torch.Tensor | None = None
        #: checkpointed regions inside the model (the user's torch.utils.checkpoint, memory="recompute"):
        #: their recompute replays the forward's state (ReplayLedger), and points met with autograd off
        #: (reentrant kind) get their signals when recomputed (_Deferred)
        self._ledger = ReplayLedger()
        self._versions: dict | None = None  # see _check_stepped
        #: the names of the parameters the model had before the rule touched it (wrap sets them before sal
        #: splits layers into areas): those the user may keep out of the optimiser on purpose
        self._user_params = {f"model.{n}" for n, _ in model.named_parameters()}
        self._mixing_checked = rule.autograd or self.chain  # layerwise: see unknown_mixing at the first step
        self._steps_to_check = 3
        self._pending: dict[nn.Module, list] = {}
        self._queued: set = set()  # what runs once when the current backward pass has finished
        self.point_names: list[str] | None = list(points) if points is not None else None
        self._named_points = points is not None  # (named by the user: an unusable output is an error)
        #: the LayerNorm/RMSNorm the head reads the points' stream through (direct rules), see readout_norm
        self.readout_name: str | None = None
        self._readout: list[nn.Module] = []  # that module (a list: not registered as a submodule)
        self.widths: list[int] = []
        self._channels_first: list = []  # per point: channels_first's hint (index into point_names)
        #: a dense channels-first output (B, K, *S): segmentation, per-position prediction (:func:`dense_output`)
        self._dense = False
        #: per point key: the functional activations after a layer's own output (:func:`activation_chain`)
        self._gates: dict[int, list] = {}
        #: per point that ran at the first step, in the order their outputs arrived: its columns of the
        #: projection (``widths``: how many); a point called several times per forward (a layer in a
        #: time-step loop) has one block, its neurons' feedback the same at every call
        self._columns: list[tuple[int, int]] = []
        self._slots: dict[int, int] = {}  # point index -> its entry in widths/_columns
        self._point_index: dict[nn.Module, int] = {}
        self._keys: list[int] = []  # beside _collect: the point index of each entry
        #: the direct rules' feedback matrix B, made at the first step (or by materialise) and saved with
        #: the state dict: a run resumed from it keeps its B whatever seed the new wrapper was given
        #: (an empty placeholder until then, so that the buffers and the state dict list the same entries
        #: before and after: an EMA/SWA copy made before the first step pairs them by position)
        self.register_buffer("projection", torch.empty(0) if rule.direct and not self.chain else None)
        self._twins = _Twins(self)
        self._loaded_projection: torch.Tensor | None = None
        gen = torch.Generator().manual_seed(seed + 7919)
        self._gen = gen
        if self.chain:
            if memory == "recompute" and not rule.direct and not rule.autograd:
                raise NeurosalError("memory='recompute' applies to the direct rules (dfa, drtp, sal)")
            if input_shape is not None or not rule.direct:
                self._setup_chain(input_shape)
        else:
            if memory == "recompute" and not rule.direct:
                raise NeurosalError("memory='recompute' applies to the direct rules (dfa, drtp, sal)")
            if isinstance(rule, LayerwiseFeedback) and not rule.direct:
                self._install_layerwise(gen)
            elif not isinstance(rule, DirectFeedback):
                raise NeurosalError(f"rule {rule.name!r} offers neither layerwise nor direct feedback")
        #: under torch.distributed (a user's DDP loop), average the gradients DDP cannot see after each
        #: backward (:meth:`bypassed`); a trainer that reduces them itself sets this False. DDP neither
        #: broadcasts the rule's buffers nor the projection: the same seed makes them on every rank
        self.reduce_bypassed = True
        from torch.nn.parallel import DistributedDataParallel

        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, [n for n, _ in self.bypassed()] + [f"rule.{n}" for n, _ in rule.named_buffers()] + ["projection"])

    def extra_repr(self) -> str:
        parts = [f"rule={self.rule.name}", f"memory={self.memory}"]
        if self.rule.direct and not self.chain:
            parts.append("points=" + ("(found at the first step)" if self.point_names is None else repr(self.point_names)))
            if self.readout_name:
                parts.append(f"readout_norm={self.readout_name!r}")
            if self.output_name:
                parts.append(f"output_at={self.output_name!r}")
        if self.loss_scale is not None:
            parts.append(f"loss_scale={self.loss_scale!r}")
        return ", ".join(parts)

    # -- gradients outside autograd, and DDP
    def bypassed(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters whose gradients are written outside autograd, which DDP's reducer never sees
        (it would wait for them, or leave them unaveraged): a rule's learned feedback (kp, ldef), the
        parameters of layers that write their own update (:class:`~neurosal.protocols.LocalUpdate`:
        SAL's areas and router, analog arrays) and, for a spec chain under a local rule, every parameter
        (its backward is the engine's). DDP is told to skip them (``wrap`` sets its ignore list); under
        ``torch.distributed`` they are averaged over ranks after each backward instead."""
        out = [(f"rule.{n}", p) for n, p in self.rule.named_parameters()]
        if self.chain and not self.rule.autograd:
            return out + [(f"model.{n}", p) for n, p in self.model.named_parameters()]
        for name, m in self.model.named_modules():
            if implements(m, LocalUpdate):
                out += [(f"model.{name}.{n}" if name else f"model.{n}", p) for n, p in m.named_parameters()]
        return out

    def _after_backward(self, t: torch.Tensor, fn) -> None:
        """Run ``fn`` once when the backward pass through ``t`` has finished (however many forwards
        registered it for that pass)."""
        def queue(grad):
            if fn.__name__ not in self._queued:
                self._queued.add(fn.__name__)

                def run():
                    self._queued.discard(fn.__name__)
                    fn()
                torch.autograd.Variable._execution_engine.queue_callback(run)
            return None
        t.register_hook(queue)

    def _reduce_bypassed(self) -> None:
        """Average the bypassed gradients over ranks in one all-reduce (a rank that computed none gives
        zeros; a gradient no rank computed stays None, so no optimiser touches it)."""
        import torch.distributed as dist

        params = [p for _, p in self.bypassed() if p.requires_grad]
        if not params:
            return
        was_none = [p.grad is None for p in params]
        flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        grads = flat.split([p.numel() for p in params])
        # which of the gradients no rank computed stay untouched: one host read for all of them
        idle = [i for i, none in enumerate(was_none) if none]
        used = torch.stack([grads[i].any() for i in idle]).tolist() if idle else []
        keep = dict(zip(idle, used))
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = g.view_as(p).clone() if keep.get(i, True) else None

    def _check_stepped(self) -> None:
        """For the first optimiser steps: warn when parameters made by neurosal that hold a gradient were
        left as they were by a step that changed others -- an optimiser built before ``wrap`` (or
        ``convert``) holds the parameters those replaced, not sal's areas, kp/ldef's feedback or the
        analog layers, which then never learn (kp trains as fa), silently. (The model's own parameters
        kept out of the optimiser -- a linear probe -- are the user's choice.) Read from the tensors'
        version counters: cheap, and only until three steps have been seen."""
        if self._steps_to_check <= 0:
            return
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        before = self._versions
        self._versions = {n: (id(p), p._version) for n, p in params}
        if before is None:
            return
        same = [n for n, p in params if before.get(n) == (id(p), p._version)]
        if len(same) == len(params):
            return  # no step since the last forward (accumulating gradients, a skipped AMP step)
        self._steps_to_check -= 1
        stale = [n for n, p in params if n in same and p.grad is not None and n not in self._user_params]
        if stale:
            self._steps_to_check = 0
            warnings.warn(f"{stale[:3]}{' and more' if len(stale) > 3 else ''} got gradients but the optimiser "
                          "step that changed the other weights left them as they were: build the optimiser from "
                          "the wrapped model's parameters after neurosal.wrap / hw_models.convert (sal's areas, "
                          "kp/ldef's feedback and analog layers are new parameters)", stacklevel=3)

    def _watch_backward(self, out) -> None:
        """Under torch.distributed with more than one rank: average the bypassed gradients when this
        forward's backward has finished."""
        import torch.distributed as dist

        if not (self.reduce_bypassed and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return
        t = out if torch.is_tensor(out) else select_output(out, self.output)[0]
        if t.requires_grad:
            self._after_backward(t, self._reduce_bypassed)

    # -- chains
    def _setup_chain(self, input_shape) -> None:
        net = self.model
        shapes = block_output_shapes(net, input_shape) if input_shape is not None else None
        self.rule.setup(net, shapes, net.blocks[-1].op.out_features, self._gen)
        self.rule.to(next(net.parameters()).device)
        self._chain_ready = True

    def claim_target(self) -> torch.Tensor | None:
        """At a training forward: the target set for it (then forgotten), so that each forward keeps its
        own when several run before one backward (two inputs, one loss); None if none is set yet."""
        if not self.rule.needs_target:
            return None
        y, self._target = self._target, None
        return y

    def take_target(self, e: torch.Tensor, claimed: torch.Tensor | None = None) -> torch.Tensor | None:
        """This batch's one-hot target for rules that need it, else None: the one ``claimed`` by its
        forward, or else the one set since (then forgotten); times the loss scale
        (:meth:`current_loss_scale`), which the error ``e`` carries too."""
        if not self.rule.needs_target:
            return None
        if claimed is None:
            claimed, self._target = self._target, None
        if claimed is None:
            raise NeurosalError(f"{self.rule.name} teaches from the target: call model.set_target(y) "
                                "before backward()")
        if claimed.is_floating_point() and claimed.shape == e.shape:
            target = claimed.to(e.dtype)  # a target vector per sample: multi-hot, soft labels, regression
        elif claimed.is_floating_point() or claimed.dtype == torch.bool or claimed.shape != e.shape[:-1]:
            raise NeurosalError(f"set_target takes integer class indices shaped {tuple(e.shape[:-1])} or a float "
                                f"target shaped like the output {tuple(e.shape)}; got {claimed.dtype} "
                                f"{tuple(claimed.shape)}")
        else:
            n = e.shape[-1]
            claimed = claimed.to(torch.long)
            if claimed.numel() and int(claimed.max()) >= n:
                raise NeurosalError(f"set_target: class index {int(claimed.max())} for an output of {n} classes")
            ignored = claimed < 0  # ignore_index (-100: padding, masked positions): no target, no signal
            target = F.one_hot(claimed.clamp_min(0), n).to(e.dtype)
            if bool(ignored.any()):
                target = target.masked_fill(ignored.unsqueeze(-1), 0.0)
        return target if self.rule.loss_scale == 1.0 else target * self.rule.loss_scale

    def current_loss_scale(self) -> float:
        """The factor the loss carries in this step's backward, from ``loss_scale``.

        The error-derived signals carry it by themselves; what a rule adds that is *not* derived from
        the error -- drtp's target, sal's routing objective, kp/ldef's decay -- does not, and is
        multiplied by it, so that it keeps its weight against the rest: under a GradScaler (which divides
        every ``.grad`` by its scale before the step; pass the scaler) and when accumulating k micro-batches
        of ``loss / k`` (pass ``1 / k``). Read once per training forward (a GradScaler's ``get_scale()``
        waits for the GPU; its ``step`` waits anyway)."""
        s = self.loss_scale
        if s is None:
            return 1.0
        if hasattr(s, "get_scale"):
            s = s.get_scale()
        elif callable(s):
            s = s()
        try:
            value = float(s)
        except (TypeError, ValueError):
            raise NeurosalError(f"loss_scale must be a number, a callable giving one or a GradScaler, got "
                                f"{type(s).__name__}") from None
        if not math.isfinite(value) or value <= 0:
            raise NeurosalError(f"loss_scale must be a finite number > 0, got {value}")
        return value

    # -- layerwise
    def _install_layerwise(self, gen: torch.Generator) -> None:
        if self.rule.autograd:
            return  # bp: plain autograd
        sites = layer_sites(self.model)
        lazy = [n for n, m in sites if any(nn.parameter.is_lazy(p) for p in m.parameters(recurse=False))]
        if lazy:  # B is shaped like the weight, which a lazy layer has not yet
            raise NeurosalError(f"{self.rule.name}: {lazy[0]!r}{' and more' if len(lazy) > 1 else ''} is a lazy layer "
                                "(LazyLinear/LazyConv) whose weight has no shape yet: run one forward with a batch "
                                "before wrapping")
        if not sites and any(p.requires_grad for p in self.model.parameters()):
            warnings.warn(f"{self.rule.name}: this model has no nn.Linear/Conv1d/Conv2d/MultiheadAttention "
                          "layer, so its parameters learn by backprop", stacklevel=4)
        untreated = [n for n, m in self.model.named_modules() if isinstance(m, UNTREATED)]
        if untreated:
            warnings.warn(f"{self.rule.name}: {untreated[:3]}{' and more' if len(untreated) > 3 else ''} pass the "
                          "signal down through their own weights (the layerwise rules give feedback matrices to "
                          "Linear, (transposed) Conv1d/2d/3d and attention projections only): weight transport there",
                          stacklevel=4)
        if sites:  # the last layer registered is taken as the output layer
            last = sites[-1][1]
            self.rule.begin(last.out_proj.out_features if isinstance(last, nn.MultiheadAttention)
                            else last.weight.shape[0])
        for slot, (name, m) in enumerate(sites):
            if isinstance(m, nn.MultiheadAttention):
                proj = _InProjection(m)
                self.rule.init_feedback(slot, proj.weight, gen)
                proj.forward = _LayerForward(Site(slot, proj, self.rule), proj.forward, self._bypass)
                m.forward = MHAForward(m, proj)
            else:
                if not isinstance(m, nn.Linear):  # a convolution or a transposed one
                    try:
                        _conv_args(m)
                    except NeurosalError as exc:
                        raise NeurosalError(f"{name}: {exc}") from None
                self.rule.init_feedback(slot, m.weight, gen)
                m.forward = _LayerForward(Site(slot, m, self.rule), m.forward, self._bypass)
            self._restore.append(m)

    # -- direct
    def _plan(self, args, kwargs) -> None:
        found: list = []
        blocks = find_blocks(self.model)
        plain = self.point_names is None and not blocks and not any(isinstance(m, Point) for m in self.model.modules())

        watch = _ConsumerWatch()

        def run():
            found.append(probe(self.model, args, kwargs, watch))
        if plain:
            mixing = unknown_mixing(self.model, [m for m in self.model.modules() if isinstance(m, PARAM_LAYERS)], run)
        else:
            run()
            mixing = {}
        calls, out, finished, outputs = found[0]
        sel, _ = select_output(out, self.output)
        if self.point_names is None:
            self.point_names = find_points(self.model, calls, sel, blocks, finished)
            if not self.point_names:
                self._warn_no_points(calls, sel)
        if mixing and self.point_names:  # (no points at all: _warn_no_points said it; what makes the
            # output -- a tied head's x @ E^T -- learns from the error itself)
            def makes_output(t):
                return torch.is_tensor(t) and t.untyped_storage().data_ptr() == sel.untyped_storage().data_ptr()
            _warn_unknown_mixing(self.rule.name, sorted(n for n, outs in mixing.items()
                                                        if not any(makes_output(t) for t in outs)),
                                 "no feedback point follows them, so their signal comes down from the next point "
                                 "through the true weights of the layers between")
        modules = dict(self.model.named_modules())
        unknown = [n for n in self.point_names if n not in modules]
        if unknown:
            raise NeurosalError(f"feedback point(s) {unknown} are not modules of this model")
        below = [n for n, m in modules.items() if isinstance(m, UNTREATED) and n not in self.point_names
                 and any(p.requires_grad for p in m.parameters())
                 and not any(n.startswith(q + ".") for q in self.point_names)]
        if below and self.point_names:
            warnings.warn(f"{self.rule.name}: {below[:3]}{' and more' if len(below) > 3 else ''} (recurrent or "
                          "bilinear) are no feedback points: their signal comes down from the next point through "
                          "the true weights of the layers between (weight transport); name them in points=[...] "
                          "to give them the projected signal at their output", stacklevel=4)
        self._point_index = {modules[name]: i for i, name in enumerate(self.point_names)}
        for name in self.point_names:
            self._hooks.append(modules[name].register_forward_hook(self._at_point))
        self._channels_first = channels_first(modules, self.point_names, finished)
        self._dense = dense_output(sel, modules, finished)
        self._gates = {}
        first_out = {}
        for name, o in zip(finished, outputs):
            first_out.setdefault(name, o)
        inplace = []
        for key, name in enumerate(self.point_names):
            o = first_out.get(name)
            if torch.is_tensor(o):
                chain, stop = activation_chain(watch, o)
                if chain:
                    self._gates[key] = chain
                if stop and not chain:
                    inplace.append(f"{name} ({stop})")
        if inplace:
            warnings.warn(f"{self.rule.name}: the outputs of {inplace[:3]} go through an in-place functional "
                          "activation: the signal arrives before it, without its derivative; use inplace=False "
                          "or an activation module", stacklevel=4)
        if not torch.is_tensor(out):  # a tuple/dict: join at the module that made the output, if one did
            self.output_name = output_module(modules, sel, self.point_names, finished, outputs)
            if self.output_name is not None:
                self._hooks.append(modules[self.output_name].register_forward_hook(self._at_output))
        if self.rule.config.readout_norm:
            self.readout_name = readout_norm(modules, self.point_names, finished)
            self._readout = [modules[self.readout_name]] if self.readout_name is not None else []
        if self.memory == "recompute":  # (a lone normalisation a point follows is no block worth it)
            blocks = [modules[n] for n in self.point_names if any(True for _ in modules[n].parameters())
                      and not isinstance(modules[n], NORM_TAIL)]
            if not blocks:
                raise NeurosalError("memory='recompute' recomputes each feedback block in the backward pass; "
                                    "this model's points are not blocks with parameters (mark blocks with "
                                    "points=[...] or use the default cache mode)")
            for m in blocks:
                m.forward = _Recomputed(m.forward)
                self._restore.append(m)
        if not self.has_projection:
            self._materialise_planned(sel, finished, outputs)
            self._twins.plan_others(self, args, kwargs)

    def _materialise_planned(self, sel: torch.Tensor, finished: list[str], outputs: list) -> None:
        """The projection for every point the planning pass saw, in the order they finished there -- also
        points whose output does not require grad yet (a frozen backbone unfrozen later: gradual
        unfreezing): their columns are there when they start learning."""
        index = {n: i for i, n in enumerate(self.point_names)}
        keys, shapes = [], []
        for name, o in zip(finished, outputs):
            if name in index and index[name] not in keys:
                o = point_tensor(o)[0] if isinstance(o, (tuple, Mapping)) else o
                if torch.is_tensor(o):
                    keys.append(index[name])
                    gate = self._gates.get(index[name])
                    shapes.append(tuple((chain_replay(gate, o)[1] if gate else o).shape))
        if keys:
            self._materialise(self._error_shape(sel.shape), shapes, keys)

    def _join(self, out: torch.Tensor, entries: list, keys: list) -> torch.Tensor:
        return _Hub.apply(self, out, entries, keys, *[p for p in entries if not isinstance(p, _Deferred)])

    def _warn_no_points(self, calls: list, sel: torch.Tensor) -> None:
        """No feedback point was found: every parameter learns through the true chain rule from the output
        (backprop, whatever the rule's name). Said once, naming what learns that way, unless only the
        output layer has parameters (nothing to teach)."""
        layers = [c for c in calls if isinstance(c[1], PARAM_LAYERS + (AreaLinear,))]
        head = next((c[0] for c in layers if c[3] is sel), layers[-1][0] if layers else None)
        others = [n for n, p in self.model.named_parameters()
                  if p.requires_grad and not (head is not None and (n.startswith(head + ".") or head == ""))]
        if others:
            warnings.warn(f"{self.rule.name}: no feedback points in this model (no nn.Linear/Conv before the "
                          f"output layer, no repeated blocks, no neurosal.Point markers), so {others[:3]}"
                          f"{' and more' if len(others) > 3 else ''} learn by backprop; mark points with "
                          "neurosal.Point() or points=[...]", stacklevel=4)

    def _at_point(self, module, inputs, output):
        tensor, put = point_tensor(output) if isinstance(output, (tuple, Mapping)) else (None, None)
        if tensor is not None:
            first = self._at_point(module, inputs, tensor)
            return None if first is None else put(first)
        if isinstance(output, Mapping):
            return None  # a dict without tensors: nothing to teach here
        if not torch.is_tensor(output):
            if self._collect is not None and torch.is_grad_enabled() and self._named_points:
                raise NeurosalError(f"feedback point {type(module).__name__} returned {type(output).__name__}; a "
                                    "point's output must be a tensor, a tuple or a dict whose first entry is one")
            return None
        if self._collect is None and output.requires_grad and module in self._pending and in_backward():
            waiting = self._pending[module]  # a reentrant checkpoint's recompute: the signal is waiting
            if waiting:
                return _Inject.apply(output, waiting.pop())
        if self._collect is not None and not output.requires_grad and not torch.is_grad_enabled() \
                and _may_learn(module):
            keep = self._readout or self._point_index[module] in self._gates
            self._collect.append(_Deferred(module, output.shape, output.dtype, output.detach() if keep else None))
            self._keys.append(self._point_index[module])
            return None
        if self._collect is None and self._watch is not None and output.requires_grad:
            grads = self._watch.setdefault("true", [])  # the BP reference pass: backprop's signal here
            grads.append(None)
            i = len(grads) - 1
            output.register_hook(lambda g: grads.__setitem__(i, g.detach()))
            return None
        if self._collect is None or not output.requires_grad:
            return None
        self._collect.append(output)
        self._keys.append(self._point_index[module])
        return output.detach()

    def _at_output(self, module, inputs, output):
        """The output module's hook: join this forward's points to its output (see :func:`output_module`)."""
        if self._collect is None or self._joined or not self._collect or not torch.is_tensor(output) \
                or not output.requires_grad:
            return None
        self._joined = True
        return self._join(output, self._collect, self._keys)

    def _layout(self, e_shape, shapes, keys) -> list[tuple[int, int, int, bool]]:
        """Per point: (batch axis, projected width, positions sharing it, channels first).

        A per-position output (B, T.., V) feeds points (B, T.., ...) position by position. A per-sample
        output (B, V) feeds a point with more axes -- (B, C, H, W) feature maps, (B, T, D) or
        sequence-first (T, B, D) tokens -- with one signal per channel/feature, the same at every
        position and divided by their number (the rule's ``positions="shared"``; the general engine's
        default "auto"): the layers there share their weights over positions, and so does a pooled
        readout's true gradient. ``positions="flatten"`` projects to every unit independently instead.
        """
        lead = len(e_shape) - 1
        mode = self.rule.config.positions
        out = []
        if self._dense:  # e_shape channels-last (B, *S, K); every point a feature map (B, C, *S_p)
            for s in map(tuple, shapes):
                if len(s) != len(e_shape) or s[0] != e_shape[0]:
                    raise NeurosalError(f"a feedback point of shape {s} does not line up with the dense output "
                                        f"(B, K, *S) = {(e_shape[0], e_shape[-1], *e_shape[1:-1])}: a point must be "
                                        "a feature map (B, C, ...) with as many spatial axes")
                out.append((0, s[1], 1, True))
            return out
        for key, s in zip(keys, map(tuple, shapes)):
            if s[:lead] == tuple(e_shape[:lead]):
                axis = 0
            elif lead == 1 and len(s) > 2 and s[1] == e_shape[0]:
                axis = 1  # sequence-first (T, B, D)
            else:
                raise NeurosalError(f"a feedback point of shape {s} does not line up with the output "
                                    f"{tuple(e_shape)}: its batch (and position) dims must match")
            units = math.prod(s) // math.prod(e_shape[:lead])  # per sample (or per position)
            if lead == 1 and len(s) > 2 and mode != "flatten":
                # channels first: feature maps and volumes (B, C, H, W[, D]) unless a layer working on the
                # last axis made them (Swin's (B, H, W, C)); a 3-d point when a layer working channels-first
                # made it (Conv1d: (B, C, L)), else tokens (B, T, D)
                hint = self._channels_first[key] if key < len(self._channels_first) else None
                if len(s) >= 4:
                    first = axis == 0 and not (hint and hint[0] == "last" and s[-1] == hint[1] != s[1])
                else:
                    first = axis == 0 and bool(hint) and hint[0] == "first"
                feat = s[1] if first else s[-1]
                out.append((axis, feat, units // feat, first))
            else:
                out.append((axis, units, 1, False))
        return out

    def _materialise(self, e_shape, shapes, keys=None) -> None:
        keys = list(range(len(shapes))) if keys is None else keys
        self._slots, widths = {}, []
        for key, (_, w, _, _) in zip(keys, self._layout(e_shape, shapes, keys)):
            if key not in self._slots:  # a point called again (a time-step loop): the same block
                self._slots[key] = len(widths)
                widths.append(w)
        ref = next(self.model.parameters())
        self.widths = widths
        # one column block of B per point -- or, for the blocks of a stream the head reads through a
        # normalisation (share_stream), one per run of points of the same width: every block writing to
        # the stream pulls it the way the readout reads it, as a spec chain's residual blocks do
        shared = self.rule.config.share_stream and bool(self._readout)
        blocks: list[int] = []
        self._columns = []
        for i, w in enumerate(widths):
            if not (shared and i and w == widths[i - 1]):
                blocks.append(w)
            start = sum(blocks[:-1])
            self._columns.append((start, start + w))
        drawn = self.rule.make_projection(e_shape[-1], blocks, self._gen)  # (drawn anyway: the stream goes on)
        loaded, self._loaded_projection = self._loaded_projection, None
        if loaded is not None and tuple(loaded.shape) != tuple(drawn.shape):
            raise NeurosalError(f"the loaded feedback projection has shape {tuple(loaded.shape)}; this model's "
                                f"feedback points need {tuple(drawn.shape)}")
        self.projection = (drawn if loaded is None else loaded).to(ref.device, ref.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the projection is made at the first step: a state dict loaded before it keeps its B for then
        key = prefix + "projection"
        if self.projection is not None and not self.has_projection:  # the placeholder
            if key in state_dict and state_dict[key].numel():
                self._loaded_projection = state_dict[key].detach().clone()
            state_dict = {k: v for k, v in state_dict.items() if k != key}  # the placeholder stays as it is
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            if key in missing_keys:  # saved before a first step: nothing to keep
                missing_keys.remove(key)
            return
        early = key in state_dict and self.projection is not None and not state_dict[key].numel()
        if early:  # saved before a first step: ours stays
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if early and key in missing_keys:
            missing_keys.remove(key)

    def _add_point(self, key: int, width: int, n_out: int) -> None:
        """Columns for a point first met after the projection was made: the block of a stream point of
        its width when the stream shares one (share_stream), else a new block drawn from the wrapper's
        generator (deterministic given the run)."""
        shared = self.rule.config.share_stream and bool(self._readout)
        same = [i for i, w in enumerate(self.widths) if w == width] if shared else []
        if same:
            columns = self._columns[same[-1]]
        else:
            b = self.projection
            extra = self.rule.make_projection(n_out, [width], self._gen).to(b.device, b.dtype)
            columns = (b.shape[1], b.shape[1] + width)
            self.projection = torch.cat([b, extra], 1)
        self._slots[key] = len(self.widths)
        self.widths.append(width)
        self._columns.append(columns)

    def _signals(self, e: torch.Tensor, shapes, dtypes, values=None, target=None, keys=None) -> list[torch.Tensor]:
        """Each point's signal from the error ``e``; ``keys``: each point's index in ``point_names``
        (default: the points in the order of the first step, each once)."""
        if keys is None:
            keys = list(self._slots)[:len(shapes)] if self.has_projection else list(range(len(shapes)))
        replays = {}  # a point followed by functional activations/pooling: the signal is made at their output
        if values is not None and self._gates:
            shapes = list(shapes)
            for i, k in enumerate(keys):
                if k in self._gates and values[i] is not None:
                    replays[i] = chain_replay(self._gates[k], values[i])
                    shapes[i] = replays[i][1].shape
        e_shape = self._error_shape(e.shape)
        if not self.has_projection:
            self._materialise(e_shape, shapes, keys)
        layout = self._layout(e_shape, shapes, keys)
        for key, (_, w, _, _) in zip(keys, layout):
            if key not in self._slots:  # a point that had not run yet (a block LayerDrop skipped then)
                self._add_point(key, w, e_shape[-1])
        slots = [self._slots.get(k) for k in keys]
        if any(sl is None or self.widths[sl] != w for sl, (_, w, _, _) in zip(slots, layout)):
            widths = [w for _, w, _, _ in layout]
            raise NeurosalError(f"the feedback points changed shape ({widths} vs {self.widths} at the first "
                                "step): mark fixed points with neurosal.Point")
        b = self.projection
        columns = [self._columns[sl] for sl in slots]
        if self._dense:
            return self._dense_signals(e, shapes, dtypes, target, columns, replays)
        target = self.take_target(e, target)
        g = self.rule.project(self.rule.source(e, target).to(b.dtype), b).to(e.dtype)
        out = []
        parts = [g[..., a:b] for a, b in columns]
        norm = self._readout[0] if values is not None and self._readout else None
        first = {c: i for i, c in reversed(list(enumerate(columns)))}  # columns -> first point using them
        for i, (part, s, dt, (axis, _, positions, chan_first)) in enumerate(zip(parts, shapes, dtypes, layout)):
            s = tuple(s)
            if positions > 1:  # one signal per channel/feature, shared by every position
                if self.rule.config.positions != "broadcast":
                    part = part / positions
                if chan_first:
                    part = part.reshape(s[0], s[1], *([1] * (len(s) - 2))).expand(s)
                elif axis == 0:
                    part = part.reshape(s[0], *([1] * (len(s) - 2)), s[-1]).expand(s)
                else:
                    part = part.unsqueeze(0).expand(s)
                # a fresh tensor: autograd may accumulate into an incoming gradient in place, which an
                # expanded (stride-0) view cannot take
                part = part.reshape(s).contiguous()
            elif axis:
                part = part.reshape(s[1], s[0], *s[2:]).transpose(0, 1)
            # other parts stay views of their columns of the one row-major projection (no copy); an
            # in-place accumulation into one touches only that point's columns
            part = part.reshape(s)
            if norm is not None and i not in replays \
                    and s[len(s) - len(norm.normalized_shape):] == tuple(norm.normalized_shape):
                part = norm_vjp(norm, values[i], part)
            elif first[columns[i]] < i and part.untyped_storage().data_ptr() == g.untyped_storage().data_ptr():
                part = part.clone()  # columns shared with an earlier point: each point gets its own tensor
            if i in replays:  # F.relu(fc(x)): (B e) * f'(a); through a functional pool: its routing
                part = _back_through(replays[i], part)
            out.append(part.to(dt))
        return self._signals_made(out)

    def _signals_made(self, out: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._watch is not None:  # an alignment probe: what the rule gave each point
            self._watch["ours"] = [o.detach().clone() for o in out]
        return out

    def _error_shape(self, shape) -> tuple:
        """The output's shape as the projection reads it: classes last ((B, K, *S) -> (B, *S, K) when dense)."""
        shape = tuple(shape)
        return (shape[0], *shape[2:], shape[1]) if self._dense else shape

    def _dense_signals(self, e: torch.Tensor, shapes, dtypes, target, columns, replays=None) -> list[torch.Tensor]:
        """Dense output (B, K, *S) -- segmentation, per-position prediction: each point (B, C, *S_p) gets,
        position by position, the projection of the teaching source summed over the output positions its
        position covers (adaptive average pooling to S_p times |S| / |S_p|: the error's total is kept at
        every resolution, down- or upsampled). One projection per resolution."""
        b = self.projection
        e_cl = e.movedim(1, -1)  # (B, *S, K)
        source = self.rule.source(e_cl, self.take_target(e_cl, target)).to(b.dtype)
        size = tuple(e.shape[2:])
        by_size: dict[tuple, torch.Tensor] = {}
        out = []
        for s, dt, (a, c) in zip(map(tuple, shapes), dtypes, columns):
            grid = s[2:]
            if grid not in by_size:
                src = source
                if grid != size:
                    pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[len(grid) - 1]
                    src = pool(source.movedim(-1, 1), grid).movedim(1, -1) * (math.prod(size) / math.prod(grid))
                by_size[grid] = self.rule.project(src, b)
            part = by_size[grid][..., a:c].movedim(-1, 1).contiguous()
            if replays and len(out) in replays:
                part = _back_through(replays[len(out)], part)
            out.append(part.to(dt))
        return self._signals_made(out)

    def set_target(self, y: torch.Tensor) -> None:
        """This batch's targets (drtp teaches from them): integer class indices, or a float tensor shaped
        like the output (multi-hot labels, soft labels, regression targets). Taken by the next training
        forward, or -- set after it -- by its backward."""
        self._target = y

    def rebind(self) -> "Wrapped":
        """Attach the feedback points' hooks to the modules now at their names. After the first step (or
        :meth:`materialise`) the hooks sit on the modules found then; a module replaced since -- a layer
        put on devices by ``hw_models.convert``, which calls this -- lost its point, and the layers below
        it learnt by backprop through it, silently."""
        if not self._hooks:
            return self  # not planned yet: the first step finds the modules as they are then
        for h in self._hooks:
            h.remove()
        self._hooks = []
        modules = dict(self.model.named_modules())
        self._point_index = {modules[name]: i for i, name in enumerate(self.point_names)}
        for name in self.point_names:
            self._hooks.append(modules[name].register_forward_hook(self._at_point))
        if self.output_name is not None:
            self._hooks.append(modules[self.output_name].register_forward_hook(self._at_output))
        if self.readout_name is not None:
            self._readout = [modules[self.readout_name]]
        if self.memory == "recompute":
            for name in self.point_names:
                m = modules[name]
                if any(True for _ in m.parameters()) and not isinstance(m.__dict__.get("forward"), _Recomputed):
                    m.forward = _Recomputed(m.forward)
                    self._restore.append(m)
        return self

    @property
    def has_projection(self) -> bool:
        """Whether the direct rules' feedback matrix B exists yet (made at the first step or by
        :meth:`materialise`)."""
        return self.projection is not None and self.projection.numel() > 0

    def materialise(self, *args, **kwargs) -> "Wrapped":
        """Plan points and create the projection now from an example input (otherwise: the first
        training step does it). Lets you read or set ``wrapped.projection`` before training."""
        if self.chain:
            if not self._chain_ready:
                self._setup_chain(tuple(args[0].shape[1:]))
            return self
        if self.rule.direct and not self._hooks:
            self._plan(args, kwargs)  # (it makes the projection from its planning pass)
        return self

    def forward(self, *args, **kwargs):
        # a backward may follow whenever autograd records -- in eval mode too (frozen BatchNorm statistics
        # while training): the rule's signals must reach it then as well, or it would be backprop's
        if not torch.is_grad_enabled():
            return self.model(*args, **kwargs)
        self.rule.after_step(self.model)  # per-batch bookkeeping (brsf's draw counter)
        self._check_stepped()
        scale = self.current_loss_scale()
        if scale != 1.0 or self.rule.loss_scale != 1.0:  # the area layers looked up now: convert may have
            self.rule.loss_scale = scale  # replaced them since wrap (analog areas)
            for m in self.model.modules():
                if isinstance(m, AreaLinear):
                    m.loss_scale = scale
        if self.chain and not self.rule.autograd:
            if len(args) != 1 or kwargs:
                raise NeurosalError("a spec chain takes one input tensor")
            if not self._chain_ready:
                self._setup_chain(tuple(args[0].shape[1:]))
            anchor = next(p for p in self.model.parameters() if p.requires_grad)
            out = ChainStep.apply(self, args[0], anchor)
            self._watch_backward(out)
            return out
        self._ledger.watch(self.model)
        if not self.rule.direct:
            if self._mixing_checked:
                out = self._recorded(args, kwargs)
            else:
                self._mixing_checked, found = True, []
                names = unknown_mixing(self.model, [m for _, m in layer_sites(self.model)],
                                       lambda: found.append(self._recorded(args, kwargs)))
                out = found[0]
                _warn_unknown_mixing(self.rule.name, sorted(names),
                                     "the layerwise rules give feedback matrices to those layers only, so the "
                                     "signal passes down through these layers' true weights")
            self._watch_backward(out)
            return out
        if not self._hooks and self.point_names != []:
            self._plan(args, kwargs)
        self._collect, self._keys, self._joined = [], [], False
        try:
            out = self._recorded(args, kwargs)
        finally:
            points, keys, self._collect = self._collect, self._keys, None
        if not self._joined:
            sel, put = select_output(out, self.output)
            if points and sel.requires_grad:
                out = put(self._join(sel, points, keys))
        self._watch_backward(out)
        return out

    def _recorded(self, args, kwargs):
        """The model's training forward (autograd recording), its checkpointed regions watched."""
        self._ledger.recording = True
        try:
            out = self.model(*args, **kwargs)
        finally:
            self._ledger.recording = False
        if self._ledger.records or self._pending or any(isinstance(p, _Deferred) for p in self._collect or ()):
            t = out if torch.is_tensor(out) else select_output(out, self.output)[0]
            if t.requires_grad:  # what no recompute used is dropped when the backward has finished
                self._after_backward(t, self._cleanup)
        return out

    def _cleanup(self) -> None:
        self._ledger.clear()
        self._pending.clear()

    def unwrap(self) -> nn.Module:
        """The plain model (hooks and patched forwards removed); the wrapper is unusable afterwards."""
        self._ledger.remove(self.model)
        for m in self._restore:
            m.__dict__.pop("forward", None)
        for h in self._hooks:
            h.remove()
        self._restore, self._hooks = [], []
        return self.model


def _angle(u: torch.Tensor, v: torch.Tensor) -> float:
    nu, nv = u.norm(), v.norm()
    if nu == 0 or nv == 0:
        return float("nan")
    return math.degrees(math.acos(float(torch.clamp((u * v).sum() / (nu * nv), -1.0, 1.0))))


def update_alignment(wrapped: Wrapped, x: torch.Tensor, y: torch.Tensor, loss_fn=F.cross_entropy) -> list[float]:
    """Per parametrised layer (Linear/Conv/attention projection/area layer, registration order), the
    angle in degrees between the rule's weight update and backprop's on one batch (as BioTorch reports).
    Read-only: gradients, running statistics and random state are as they were afterwards."""
    return alignment_report(wrapped, x, y, loss_fn)["layers"]


def alignment_report(wrapped: Wrapped, x: torch.Tensor, y: torch.Tensor, loss_fn=F.cross_entropy) -> dict:
    """``layers``: :func:`update_alignment`'s angles; ``points`` (direct rules): per feedback point, the
    angle between the signal the rule injects there and backprop's gradient at that point."""
    model = wrapped.model
    weights = [_weight_sources(m, "in_proj_weight" if isinstance(m, nn.MultiheadAttention) else "weight")
               for _, m in layer_sites(model)]
    area_layers = [m for m in model.modules() if isinstance(m, AreaLinear)]
    params = list(wrapped.parameters())
    saved = [p.grad for p in params]
    # running statistics, and the rule's own counters (brsf's redraw step advances per forward)
    buffers = [(m, k, v.clone()) for m in wrapped.modules() for k, v in m._buffers.items() if v is not None]
    area_steps = [m.steps for m in area_layers]  # a probe is not a training step (SAL's warm-up clock)

    def update(w: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(w) if w.grad is None else w.grad.clone()

    def restore_buffers() -> None:
        with torch.no_grad():
            for m, k, v in buffers:
                now = m._buffers.get(k)
                if now is not None and now.shape == v.shape:
                    now.copy_(v)
                else:  # a state buffer the forward resized (snnTorch's membrane): as it was
                    m._buffers[k] = v.clone()

    def grads(run) -> list[torch.Tensor]:
        restore_buffers()  # both passes start from one state (spectral_norm's u moves in a forward)
        for p in params:
            p.grad = None
        # both passes draw the same (torch's and the layers' own generators), and neither moves them
        with torch.random.fork_rng(devices=[x.device.index] if x.is_cuda else []), preserved_draws(model):
            out, _ = select_output(run(x), wrapped.output)
            if wrapped.rule.needs_target:
                wrapped.set_target(y)
            loss_fn(out, y).backward()
        return ([torch.cat([update(w).flatten() for w in ws]) for ws in weights]
                + [torch.stack([update(w) for w in m.area_weight]) for m in area_layers])

    try:
        wrapped._watch = {}
        ours = grads(wrapped)
        wrapped._bypass[0] = True
        truth = grads(model)
        watch = wrapped._watch
    finally:
        wrapped._watch = None
        wrapped._bypass[0] = False
        for p, g in zip(params, saved):
            p.grad = g
        for m, n in zip(area_layers, area_steps):
            m.steps = n
        restore_buffers()
    points = [_angle(a, b) if b is not None else float("nan")
              for a, b in zip(watch.get("ours", []), watch.get("true", []))]
    return {"layers": [_angle(a, b) for a, b in zip(ours, truth)], "points": points}


def _weight_sources(m: nn.Module, name: str) -> list[torch.Tensor]:
    """The parameters ``m.<name>`` is made of: itself, or -- parametrised (weight_norm, orthogonal) or
    computed by a pre-hook (prune, the older weight_norm / spectral_norm) -- the ones it is computed
    from, whose gradients are the update the rule makes (the computed weight holds no ``.grad``)."""
    if name in m._parameters:
        return [m._parameters[name]]
    if parametrize.is_parametrized(m, name):
        return list(m.parametrizations[name].parameters())
    return [p for n, p in m.named_parameters(recurse=False) if n.startswith(name + "_")]


def _trainable(lin: nn.Module) -> bool:
    """Whether a Linear's weight learns: its parameter requires grad -- or, computed by a pre-hook (prune,
    the older weight_norm), the parameters it is computed from (the attribute of a no-grad forward
    does not)."""
    if weight_hook(lin) is None:
        return lin.weight.requires_grad
    return any(p.requires_grad for n, p in lin.named_parameters(recurse=False) if n.startswith("weight_"))


def sal_layers(model: nn.Module) -> list[str]:
    """SAL's default area layers: every ``nn.Linear`` but the output head (the last one registered), the
    projections inside attention modules and frozen layers (``requires_grad=False``: a fine-tuned model's
    backbone stays as it is) -- MLP hidden layers and transformer FFN layers."""
    names = {m: n for n, m in model.named_modules()}
    attention = [n for m, n in names.items() if isinstance(m, nn.MultiheadAttention)
                 or "attention" in type(m).__name__.lower()]
    linears = [n for m, n in names.items() if type(m) is nn.Linear]
    linears = [n for n in linears if not any(n.startswith(a + ".") for a in attention if a)]
    modules = dict(model.named_modules())
    return [n for n in linears[:-1] if _trainable(modules[n])]


def to_areas(model: nn.Module, names: Iterable[str], rule: Rule) -> None:
    """Replace each named ``nn.Linear`` by an area layer with the rule's K, routing per token. With
    ``area_init="shared"`` (default) every area starts as a copy of the Linear's own weights (a
    pretrained layer stays what it was until its areas diverge)."""
    modules = dict(model.named_modules())
    for name in names:
        lin = modules.get(name)
        if type(lin) is not nn.Linear:
            raise NeurosalError(f"sal: {name!r} is not an nn.Linear of this model")
        if not _trainable(lin):
            raise NeurosalError(f"sal: {name!r} is frozen (requires_grad=False); its areas could not learn")
        hook = weight_hook(lin)
        if hook is not None:  # the area layers would take today's weight and drop the mask / normalisation
            fix = {"pruned": "torch.nn.utils.prune.remove(layer, 'weight')",
                   "weight_norm": "torch.nn.utils.remove_weight_norm(layer)",
                   "spectral_norm": "torch.nn.utils.remove_spectral_norm(layer)"}[hook_kind(hook)]
            raise NeurosalError(f"sal: {name!r} is {hook_kind(hook).replace('_norm', '-normalised')} (a forward "
                                f"pre-hook computes its weight) and area layers keep no such hook: {fix} first, "
                                "or leave it out with areas_on=[...]")
        area = rule.area_layer(lin.in_features, lin.out_features, tokens=True)
        if rule.config.area_init == "shared":
            with torch.no_grad():
                for w, b in zip(area.area_weight, area.area_bias):
                    w.copy_(lin.weight)
                    if lin.bias is not None:
                        b.copy_(lin.bias)
        if lin.bias is None:  # a bias-free layer (LLaMA-style FFNs): its areas' biases are frozen zeros
            with torch.no_grad():
                for b in area.area_bias:
                    b.zero_().requires_grad_(False)
        area.to(lin.weight.device, lin.weight.dtype)
        replace_module(model, name, keep_own_forward(area))


def wrap(model: nn.Module, rule: str | Rule = "dfa", *, seed: int = 0, points: Iterable[str] | None = None,
         areas_on: Iterable[str] | None = None, memory: str = "cache", output: str | int | None = None,
         loss_scale=None, **options) -> Wrapped:
    """Train ``model`` with ``rule`` (a name and its options, or a built :class:`~neurosal.rules.base.Rule`).

    * ``seed`` seeds the rule's feedback matrices (same seed, same matrices);
    * ``points``: module names whose outputs are the direct rules' feedback points (default: chosen by
      :func:`find_points`, or your :class:`Point` markers);
    * ``areas_on``: for sal, the Linear layers that become area layers (default: :func:`sal_layers`);
    * ``memory``: ``"recompute"`` for the direct rules: spec chains recompute block by block without
      autograd; other models recompute each feedback block (activation checkpointing) when its signal
      arrives, so one block's activations are alive at a time instead of the whole model's;
    * ``output``: for a model returning a tuple, dict (HF-style ``ModelOutput``) or dataclass, the key or
      index of the tensor the direct rules take the error at (default: ``"logits"``, or the first/only
      tensor of two or more dims: :func:`select_output`). A loss computed inside ``forward`` works too
      when that tensor is a module's output (the usual head): the points are joined to it there;
    * ``loss_scale``: what your loss is multiplied by before ``backward()`` -- your
      ``torch.amp.GradScaler`` (fp16 AMP), ``1 / k`` when accumulating k micro-batches of ``loss / k``,
      or a callable giving the number; terms not derived from the error (drtp's target, sal's
      routing objective, kp/ldef's decay) are multiplied by it (:meth:`Wrapped.current_loss_scale`);
      settable later as ``wrapped.loss_scale``;
    * ``options``: the rule's options (``areas=8``, ``init="gaussian"``, ``rank=16``...).

    Build the optimiser from the wrapped model's parameters *after* wrapping (sal replaces layers,
    kp/ldef add learned feedback).
    """
    if isinstance(model, Wrapped):
        raise NeurosalError("this model is wrapped already")
    for m in model.modules():  # wrapped before, by another wrapper (a notebook cell run twice)
        patched = isinstance(m.__dict__.get("forward"), (_LayerForward, _Recomputed, MHAForward))
        hooked = any(isinstance(getattr(h, "__self__", None), Wrapped) for h in m._forward_hooks.values())
        if patched or hooked:
            raise NeurosalError("this model is wrapped already (its layers carry another wrapper's feedback): "
                                "unwrap() that wrapper first, or wrap a fresh copy")
    if not isinstance(model, nn.Module):
        raise NeurosalError(f"wrap expects an nn.Module, got {type(model).__name__}")
    check_materialised(model, "wrapping", "; shard with FSDP after wrapping")
    r = rule if isinstance(rule, Rule) else make_rule(rule, **options)
    if isinstance(rule, Rule) and options:
        raise NeurosalError("give options either to make_rule or to wrap, not both")
    chain = isinstance(model, Net)
    has_areas = any(isinstance(m, AreaLinear) for m in model.modules())
    if r.name == "sal" and chain and not has_areas:
        raise NeurosalError("this spec chain was not built for sal: build it with make_rule('sal').build(...)")
    user_params = {f"model.{n}" for n, _ in model.named_parameters()}
    if r.name == "sal" and not chain and (areas_on is not None or not has_areas):
        names = list(areas_on) if areas_on is not None else sal_layers(model)
        if not names:
            others = sorted({type(m).__name__ if type(m).__name__ != "Linear" else  # QAT's, a user's own
                             f"{type(m).__module__}.{type(m).__name__}" for m in model.modules()
                             if isinstance(m, nn.Linear) and type(m) is not nn.Linear})
            if others:  # put on an analog device before wrapping, parametrised (weight_norm), ...
                hint = ("wrap with sal first, then convert (the areas go onto the device)"
                        if any(o.startswith("Analog") for o in others) else
                        "name plain nn.Linear layers with areas_on=[...]")
                raise NeurosalError(f"sal splits plain nn.Linear layers into areas; this model's are {others}: {hint}")
            raise NeurosalError("sal: this model has no hidden nn.Linear to split into areas; name them "
                                "with areas_on=[...]")
        to_areas(model, names, r)
    elif areas_on is not None:
        raise NeurosalError("areas_on is a sal option")
    p = next(model.parameters(), None)
    if p is None:
        raise NeurosalError("this model has no parameters to train")
    r.to(p.device)
    wrapped = Wrapped(model, r, seed=seed, points=points, memory=memory, output=output, loss_scale=loss_scale)
    wrapped._user_params = user_params
    return wrapped
