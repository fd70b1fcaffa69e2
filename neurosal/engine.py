"""The rule engine: forward pass, teaching signals from a rule, local updates by each layer's substrate.

Non-BP rules run the forward pass under ``torch.no_grad()``: no autograd graph is built. Each block
keeps only what its local update needs -- its input ``x`` and the smallest state that differentiates
its parameter-free tail (a boolean mask for ReLU). The rule then yields teaching signals top-down and
each is consumed at once by the layer's substrate, so signals never pile up.

Memory modes for direct rules (dfa, drtp, sal):

* ``"cache"`` (default): cache every block's input during the forward pass, then update.
* ``"recompute"``: forward once without caching to get the error, then recompute the forward pass
  block by block and update each block as it goes. Only one block's activations are alive at a
  time, for the same FLOPs as BP (DFA skips BP's input-gradient matmuls).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import NeurosalError
from .layers import (apply_local_update, forward_state, output_error, post_forward, post_vjp, preserved_draws,
                     replayed_forward)
from .models import Net
from .protocols import ReportsContext, implements

MEMORY_MODES = ("cache", "recompute")


@dataclass
class LayerCache:
    op: nn.Module
    post: nn.Module
    kind: str
    x: torch.Tensor  # the block's input
    residual: float  # 0, or the branch scale alpha of h_out = h_in + alpha * post(a)
    a_shape: torch.Size
    state: Any  # what post_vjp needs (mask / output / pre-activation)
    ctx: Any = None  # what the op itself reported (e.g. the area each sample was routed to)

    def delta_from_output(self, g: torch.Tensor) -> torch.Tensor:
        """Teaching signal on the pre-activation from a signal on the block's output."""
        if self.residual:
            g = g * self.residual
        return post_vjp(self.kind, self.post, self.state, g, self.a_shape)


def run_op(op: nn.Module, h: torch.Tensor):
    """The op's output and its context (layers with routing report it via ``forward_ctx``)."""
    if implements(op, ReportsContext):
        return op.forward_ctx(h)
    return op(h), None


def block_step(blk, h: torch.Tensor):
    a, ctx = run_op(blk.op, h)
    kind = blk.post_kind
    out, state = post_forward(kind, blk.post, a)
    entry = LayerCache(blk.op, blk.post, kind, h, blk.residual, a.shape, state, ctx)
    return (torch.add(h, out, alpha=blk.residual) if blk.residual else out), entry


@torch.no_grad()
def forward_cached(net: Net, x: torch.Tensor):
    h = net.stem(x)
    cache = []
    for blk in net.blocks:
        h, entry = block_step(blk, h)
        cache.append(entry)
    return h, cache


@torch.no_grad()
def block_output_shapes(net: Net, input_shape) -> list[tuple[int, ...]]:
    p = next(net.parameters())
    was_training = net.training
    net.eval()  # a shape probe must not move running statistics (routing centres, usage counts)
    h = net.stem(torch.zeros((1, *input_shape), device=p.device, dtype=p.dtype))
    shapes = []
    for blk in net.blocks:
        h = blk(h)
        shapes.append(tuple(h.shape[1:]))
    net.train(was_training)
    return shapes


def _onehot(y: torch.Tensor, n: int, dtype) -> torch.Tensor:
    return F.one_hot(y, n).to(dtype)


def chain_forward(net: Net, rule, x: torch.Tensor, memory: str = "cache"):
    """The forward half of a chain step under no autograd: ``(logits, state)`` for :func:`chain_backward`."""
    if memory not in MEMORY_MODES:
        raise NeurosalError(f"unknown memory mode {memory!r}; use one of {MEMORY_MODES}")
    if memory == "recompute" and rule.direct:
        draws = _draw_states(net, x)  # the recompute replays this forward's random draws
        with torch.no_grad():
            return net(x), ("recompute", (x, draws))
    logits, cache = forward_cached(net, x)
    return logits, ("cache", cache)


@torch.no_grad()
def chain_backward(net: Net, rule, state, e: torch.Tensor, target: torch.Tensor | None, on_layer=None) -> None:
    """The backward half: the rule's signals from ``e`` = dL/dlogits, each turned into its layer's update
    at once (``on_layer(op)`` is called as soon as a layer's update is in its ``.grad``)."""
    mode, payload = state
    if mode == "recompute":
        x, (default, state) = payload
        # the forward again (spike encoders draw on torch's generators, analog reads on the arrays' own;
        # the buffers as the forward found them), so that the updates use the activations that made the
        # error; afterwards every stream is where it was
        with torch.random.fork_rng(devices=[x.device.index] if x.is_cuda else []), replayed_forward(net, state):
            torch.set_rng_state(default[0])
            if x.is_cuda:
                torch.cuda.set_rng_state(default[1], x.device)
            _direct_recompute(net, rule, x, e, target, on_layer)
        return
    cache = payload
    for l, delta in rule.teach(net, cache, e, target):
        entry = cache[l]
        apply_local_update(entry.op, entry.x, delta, entry.ctx)
        if on_layer is not None:
            on_layer(entry.op)
        if l + 1 < len(cache):
            cache[l + 1] = None  # the block above has served its feedback: free its input


def train_step(net: Net, rule, x: torch.Tensor, y: torch.Tensor, n_classes: int,
               memory: str = "cache", on_layer=None):
    """Fill ``.grad`` of the net (and of the rule's learned feedback) for one batch, cross-entropy loss.

    Returns ``(loss, logits)``; the caller zeroes grads before and steps the optimiser after.
    (:class:`neurosal.wrap.Wrapped` runs the same two halves behind ``loss.backward()``, for any loss.)
    """
    if rule.autograd:
        logits = net(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        return loss.detach(), logits.detach()
    logits, state = chain_forward(net, rule, x, memory)
    with torch.no_grad():
        loss, e = output_error(logits, y)
        chain_backward(net, rule, state, e, _onehot(y, n_classes, e.dtype), on_layer)
    return loss, logits


def _draw_states(net: Net, x: torch.Tensor) -> tuple:
    """What a forward pass of ``net`` on ``x`` depends on besides its weights, now: torch's default
    generators (CPU, and the input's CUDA device) and :func:`~neurosal.layers.forward_state`."""
    default = (torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None)
    return default, forward_state(net)


@torch.no_grad()
def _direct_recompute(net, rule, x, e, target, on_layer=None):
    h = net.stem(x)
    last = len(net.blocks) - 1
    for l, blk in enumerate(net.blocks):
        out, entry = block_step(blk, h)
        g = e if l == last else rule.signal(l, e, target)
        apply_local_update(entry.op, entry.x, entry.delta_from_output(g), entry.ctx)
        if on_layer is not None:
            on_layer(entry.op)
        h = out


class ChainStep(torch.autograd.Function):
    """A chain step behind autograd: forward = :func:`chain_forward`, backward = :func:`chain_backward`
    with the incoming gradient as ``e``. ``anchor`` is any parameter that requires grad (it makes autograd
    call the backward; it gets no gradient from here)."""

    @staticmethod
    def forward(ctx, owner, x, anchor):
        logits, state = chain_forward(owner.model, owner.rule, x, owner.memory)
        ctx.owner, ctx.state, ctx.target = owner, state, owner.claim_target()
        return logits

    @staticmethod
    def backward(ctx, e):
        owner = ctx.owner
        chain_backward(owner.model, owner.rule, ctx.state, e, owner.take_target(e, ctx.target), owner.on_layer)
        ctx.state = None
        return None, None, None


def _angle(u: torch.Tensor, v: torch.Tensor) -> float:
    nu, nv = u.norm(), v.norm()
    if nu == 0 or nv == 0:
        return float("nan")
    c = torch.clamp((u * v).sum() / (nu * nv), -1.0, 1.0)
    return math.degrees(math.acos(float(c)))


@torch.no_grad()
def alignment(net: Net, rule, reference, x: torch.Tensor, y: torch.Tensor, n_classes: int) -> list[float]:
    """Per layer, the angle (degrees) between the rule's teaching signal and backprop's, on one batch.

    Read-only: nothing is updated (learned-feedback rules get their factor grads cleared again).
    """
    was_training = net.training
    net.eval()  # no running statistics (routing centres) move during a read-only probe
    # nor the random streams (encoders draw; analog reads draw on the arrays' own generators)
    with torch.random.fork_rng(devices=[x.device.index] if x.is_cuda else []), preserved_draws(net):
        logits, cache = forward_cached(net, x)
    net.train(was_training)
    _, e = output_error(logits, y)
    target = _onehot(y, n_classes, e.dtype)
    ours = dict(rule.teach(net, cache, e, target))
    for p in rule.parameters():
        p.grad = None
    truth = dict(reference.teach(net, cache, e, target))
    return [_angle(ours[l], truth[l]) for l in range(len(cache))]
