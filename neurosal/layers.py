"""Per-layer local computations for the float substrate (``nn.Linear``, ``nn.Conv1d/2d/3d`` and their
transposes).

Two operations are all a learning rule needs from a parametrised layer:

* :func:`weight_update` -- the local plasticity: given the layer's input ``x`` and its teaching signal
  ``delta`` (dL/da for the layer's pre-activation ``a``), the weight and bias change
  ``dW = delta^T x`` (for conv: the correlation of delta with x), ``db = sum(delta)``.
* :func:`feedback` -- carry a teaching signal down through a feedback matrix shaped like the layer's
  weight: with ``B = W`` it is exactly backprop's ``W^T delta`` (conv: the transposed convolution).

A *substrate* turns the rule's teaching signal into a weight change. The float substrate writes
:func:`weight_update`'s result into ``.grad`` so that any ``torch.optim`` optimiser steps it. A layer
that offers :class:`~neurosal.protocols.LocalUpdate` (analog crossbar, area-partitioned layer, ...)
overrides that: :func:`apply_local_update` dispatches to it, and no rule needs to know.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import NeurosalError
from .protocols import LocalDerivative, LocalUpdate, OwnRandomState, RoutedFeedback, implements

PARAM_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: the transposed convolutions, by dimension: the adjoints of the convolutions with the same weight layout
_TRANSPOSED = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}
_CONV_INPUT = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}


def _conv_args(op: nn.Module):
    """The convolution's arguments for torch.nn.grad; with a padding mode other than zeros, torch pads the
    input itself (:func:`_padded`) and convolves without padding."""
    if op.padding_mode != "zeros":
        return dict(stride=op.stride, padding=0, dilation=op.dilation, groups=op.groups)
    padding = op.padding
    if padding == "valid":
        padding = 0
    elif padding == "same":  # torch pads 'same' symmetrically only for odd effective kernels
        eff = [d * (k - 1) for d, k in zip(op.dilation, op.kernel_size)]
        if any(v % 2 for v in eff):
            raise NeurosalError(f"{type(op).__name__} with padding='same' and an even kernel pads "
                                "asymmetrically; give numeric padding")
        padding = tuple(v // 2 for v in eff)
    return dict(stride=op.stride, padding=padding, dilation=op.dilation, groups=op.groups)


def _padded(op: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input as a convolution with ``padding_mode`` reflect / replicate / circular reads it (torch's
    own forward pads it so, then convolves with no padding); a zero-padded convolution's input as it is."""
    if getattr(op, "padding_mode", "zeros") == "zeros":
        return x
    return F.pad(x, op._reversed_padding_repeated_twice, mode=op.padding_mode)


def _unpad(op: nn.Module, g: torch.Tensor, input_shape) -> torch.Tensor:
    """A signal on the padded input taken back to the input: the padding's adjoint (a reflected or wrapped
    border adds onto the pixels it copies)."""
    with torch.enable_grad():
        z = torch.zeros(tuple(input_shape), dtype=g.dtype, device=g.device, requires_grad=True)
        (out,) = torch.autograd.grad(_padded(op, z), z, g)
    return out


def weight_update(op: nn.Module, x: torch.Tensor, delta: torch.Tensor):
    """(dW, db) for teaching signal ``delta`` on the output of ``op`` given its input ``x``."""
    if not isinstance(op, nn.Linear):
        x = _padded(op, x)
    if isinstance(op, nn.Linear):
        x2 = x.reshape(-1, x.shape[-1])
        d2 = delta.reshape(-1, delta.shape[-1])
        dw = d2.t() @ x2
        db = d2.sum(0) if op.bias is not None else None
        return dw, db
    if isinstance(op, nn.Conv2d):
        dw = torch.nn.grad.conv2d_weight(x, op.weight.shape, delta, **_conv_args(op))
        db = delta.sum((0, 2, 3)) if op.bias is not None else None
        return dw, db
    if isinstance(op, nn.Conv1d):
        dw = torch.nn.grad.conv1d_weight(x, op.weight.shape, delta, **_conv_args(op))
        db = delta.sum((0, 2)) if op.bias is not None else None
        return dw, db
    if isinstance(op, nn.Conv3d):
        dw = torch.nn.grad.conv3d_weight(x, op.weight.shape, delta, **_conv_args(op))
        db = delta.sum((0, 2, 3, 4)) if op.bias is not None else None
        return dw, db
    n = _transposed_dims(op)
    if n:  # y = C^T x with C the convolution of the same weight: dW is C's weight gradient with the
        # roles of input and output signal swapped
        dw = _CONV_WEIGHT[n](delta, op.weight.shape, x, **_conv_args(op))
        db = delta.sum((0, *range(2, delta.dim()))) if op.bias is not None else None
        return dw, db
    raise NeurosalError(f"no local update defined for layer type {type(op).__name__}")


def conv_function(op: nn.Module | int):
    """``F.conv1d``/``conv2d``/``conv3d`` for a convolution (module) or a number of spatial dimensions."""
    return _CONV_FN[op if isinstance(op, int) else op.weight.dim() - 2]


def _transposed_dims(op: nn.Module) -> int:
    return next((n for cls, n in _TRANSPOSED.items() if isinstance(op, cls)), 0)


def feedback(op: nn.Module, delta: torch.Tensor, weight: torch.Tensor, input_shape, ctx=None) -> torch.Tensor:
    """Signal on the input of ``op``: ``delta`` carried through ``weight`` (shaped like op.weight).

    Layers with per-sample structure (area-partitioned layers) offer
    :class:`~neurosal.protocols.RoutedFeedback`.
    """
    if implements(op, RoutedFeedback):
        return op.feedback_input(delta, weight, ctx)
    if isinstance(op, nn.Linear):
        return delta @ weight
    if isinstance(op, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        fn = _CONV_INPUT[weight.dim() - 2]
        if op.padding_mode == "zeros":
            return fn(tuple(input_shape), weight, delta, **_conv_args(op))
        pads = op._reversed_padding_repeated_twice  # (last axis first, before/after)
        shape = list(input_shape)
        for i in range(len(pads) // 2):
            shape[-1 - i] += pads[2 * i] + pads[2 * i + 1]
        return _unpad(op, fn(tuple(shape), weight, delta, **_conv_args(op)), input_shape)
    n = _transposed_dims(op)
    if n:  # the adjoint of a transposed convolution is the convolution (it gives back the input's size)
        return _CONV_FN[n](delta, weight, None, **_conv_args(op))
    raise NeurosalError(f"no feedback pathway defined for layer type {type(op).__name__}")


def own_forward(op: nn.Module) -> bool:
    """Whether ``op`` -- a subclass of ``nn.Linear``/``nn.Conv*`` -- computes its output its own way (a
    mask on the weight, a weight scale, fake quantisation) rather than by its torch base class's forward.
    Its weight's gradient is then not the plain layer's ``delta^T x``; substrates and area layers, which
    own their forward on purpose, are not counted."""
    base = next((c for c in PARAM_LAYERS if isinstance(op, c)), None)
    if base is None or implements(op, LocalUpdate) or implements(op, RoutedFeedback):
        return False
    return type(op).forward is not base.forward


def weight_hook(layer: nn.Module, name: str = "weight"):
    """The forward pre-hook that recomputes ``layer.<name>`` from other tensors at every call --
    ``torch.nn.utils.prune`` (``weight_orig * weight_mask``), the older ``torch.nn.utils.weight_norm``
    (``weight_g``, ``weight_v``) and ``spectral_norm`` (``weight_orig / sigma``) -- or None. Such a
    layer's ``weight`` is no parameter; a copy of the layer made from it would drop the mask or the
    normalisation without a word."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in layer._forward_pre_hooks.values():
        kinds = (BasePruningMethod, WeightNorm, SpectralNorm)
        if isinstance(hook, kinds) and getattr(hook, "_tensor_name", getattr(hook, "name", None)) == name:
            return hook
    return None


def hook_kind(hook) -> str:
    """'pruned' / 'weight_norm' / 'spectral_norm' for a :func:`weight_hook`'s hook."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.weight_norm import WeightNorm

    return "pruned" if isinstance(hook, BasePruningMethod) else \
        "weight_norm" if isinstance(hook, WeightNorm) else "spectral_norm"


def hooked_weight(layer: nn.Module, hook) -> torch.Tensor:
    """The weight ``hook`` (from :func:`weight_hook`) would give ``layer``'s next forward, computed without
    touching the layer (spectral_norm: no power iteration)."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm

    with torch.no_grad():
        if isinstance(hook, BasePruningMethod):
            return hook.apply_mask(layer)
        if isinstance(hook, SpectralNorm):
            return hook.compute_weight(layer, do_power_iteration=False)
        return hook.compute_weight(layer)


def _own_forward(module, args):
    return None


def keep_own_forward(module: nn.Module) -> nn.Module:
    """Make sure ``module``'s own forward runs inside torch's fused layers.

    ``nn.TransformerEncoderLayer`` in eval mode may take a fused fast path that reads ``linear1.weight``
    etc. directly, bypassing the submodules' forwards -- wrong for an area layer (its output depends on
    the routing) or an analog layer (DAC/ADC, device read-out). torch documents that the fast path is
    not taken when any submodule carries a forward hook; this registers a no-op pre-hook to that end.
    """
    module.register_forward_pre_hook(_own_forward)
    return module


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (dotted, as ``named_modules`` gives it) sits in ``root``."""
    parent, _, attr = name.rpartition(".")
    holder = root.get_submodule(parent) if parent else root
    # by name, also in a Sequential/ModuleList: a Sequential built from an OrderedDict names its children
    # (torchvision's ViT: ``heads.head``), and an index is a name there too
    setattr(holder, attr, new)


def accumulate_grad(p: torch.Tensor | None, g: torch.Tensor | None) -> None:
    """Add ``g`` to ``p.grad`` (creating it), in the parameter's dtype (autocast may compute in bf16). A
    frozen parameter (``requires_grad=False``) gets none, as autograd would give it none: an optimiser
    handed every parameter skips it only while its ``.grad`` stays None."""
    if p is None or g is None or not p.requires_grad:
        return
    g = g.to(p.dtype)
    if p.grad is None:
        p.grad = g.detach()  # a fresh tensor from weight_update: no copy needed
    else:
        p.grad.add_(g)


def float_update(op: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> None:
    """The float substrate: the local weight change into ``.grad``."""
    dw, db = weight_update(op, x, delta)
    accumulate_grad(op.weight, dw)
    accumulate_grad(op.bias, db)


def apply_local_update(op: nn.Module, x: torch.Tensor, delta: torch.Tensor, ctx=None) -> None:
    """Let the layer's substrate turn a teaching signal into a weight change (into ``.grad``)."""
    if implements(op, LocalUpdate):
        op.local_update(x, delta, ctx)
    else:
        float_update(op, x, delta)


# ----------------------------------------------------------------------------- non-parametric "post" ops

class RMSScale(nn.Module):
    """Parameter-free RMS normalisation over features: ``a / sqrt(mean(a^2) + eps)``.

    Put before the activation of deep SAL blocks, it bounds every hidden activation (each sample's
    pre-activation has unit RMS whatever the weights do), which is what keeps 128-layer stacks finite.
    """

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a * torch.rsqrt(a.pow(2).mean(dim=-1, keepdim=True) + RMS_EPS)


class RMSClip(nn.Module):
    """RMS scaling that only shrinks: ``a / max(sqrt(mean(a^2)), 1)``. Bounds every sample's RMS by 1 as
    :class:`RMSScale` does (deep stacks stay finite) but leaves small activations as they are (SAL's
    ``norm="rms_clip"``; differentiated by autograd, the generic tail path)."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a * torch.rsqrt(a.pow(2).mean(dim=-1, keepdim=True).clamp_min(1.0))


RMS_EPS = 1e-6

#: per-sample normalisations :func:`norm_vjp` carries a signal through
NORMS = (nn.LayerNorm, nn.RMSNorm)


def norm_vjp(norm: nn.Module, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``g`` (a signal on ``norm(h)``) carried to ``h`` through the true local derivative of ``norm``, an
    ``nn.LayerNorm`` or ``nn.RMSNorm`` (its gain included; its bias does not enter the derivative).

    torch's own fused normalisation and its backward kernel on a detached copy (about 25x faster on a
    CPU than writing the derivative out in elementwise ops, each of which allocates), in at least
    float32 as autocast normalises a bf16 stream; returned in ``g``'s dtype. The result has no component
    along the normalised ``h`` (and, for LayerNorm, none along the all-ones direction): the normalisation
    would undo any change there."""
    ct = torch.promote_types(h.dtype, torch.float32)
    weight = norm.weight.detach().to(ct) if norm.weight is not None else None
    with torch.enable_grad():
        a = h.detach().to(ct).requires_grad_()
        if isinstance(norm, nn.LayerNorm):
            y = F.layer_norm(a, norm.normalized_shape, weight, None, norm.eps)
        else:
            y = F.rms_norm(a, norm.normalized_shape, weight, norm.eps)
        (out,) = torch.autograd.grad(y, a, g.to(ct))
    return out.to(g.dtype)


ELEMENTWISE = {
    nn.ReLU: "relu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.Identity: "identity",
}


def post_kind(post: nn.Module) -> str:
    """How a block's non-parametric tail is differentiated: a fast path, the tail's own *local* rule
    (``local_state``/``local_vjp``, e.g. spiking neurons' eligibility traces), or generic autograd."""
    if implements(post, LocalDerivative):
        return "local"
    mods = [m for m in (post if isinstance(post, nn.Sequential) else [post])
            if not isinstance(m, nn.Identity)]
    if not mods:
        return "identity"
    if len(mods) == 1 and type(mods[0]) in ELEMENTWISE:
        return ELEMENTWISE[type(mods[0])]
    if len(mods) == 2 and type(mods[0]) is RMSScale and type(mods[1]) is nn.ReLU:
        return "rms_relu"
    if (len(mods) in (2, 3) and type(mods[0]) is nn.ReLU and _simple_pool(mods[1])
            and (len(mods) == 2 or type(mods[2]) is nn.Flatten)):
        return "relu_pool"
    for m in post.modules():
        if any(True for _ in m.parameters(recurse=False)):
            raise NeurosalError(f"{type(m).__name__} in a block's tail has parameters; "
                                "only parametric Linear/Conv2d layers may learn")
    return "generic"


def _simple_pool(m: nn.Module) -> bool:
    """Non-overlapping max-pooling, whose gradient is a scatter to the stored argmax positions."""
    if type(m) is not nn.MaxPool2d:
        return False
    k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * 2
    s = m.stride if isinstance(m.stride, tuple) else (m.stride,) * 2
    return k == s and m.padding in (0, (0, 0)) and m.dilation in (1, (1, 1)) and not m.ceil_mode


def post_forward(kind: str, post: nn.Module, a: torch.Tensor):
    """The tail's output and the state its derivative needs. ReLU + max-pool keeps the pool's argmax
    indices from the forward pass instead of recomputing the pooling to differentiate it."""
    if kind != "relu_pool":
        out = post(a)
        return out, post_state(kind, a, out)
    pool = post[1]
    pooled, idx = F.max_pool2d(torch.relu(a), pool.kernel_size, pool.stride, return_indices=True)
    out = pooled.flatten(1) if len(post) == 3 else pooled
    return out, (pooled, idx, pool.kernel_size)


def post_state(kind: str, a: torch.Tensor, h: torch.Tensor):
    """What to keep from the forward pass to differentiate the tail later (as little as possible)."""
    if kind == "identity":
        return None
    if kind in ("relu", "tanh", "sigmoid"):
        return h  # the output is the next block's input, kept anyway: no extra memory
    if kind in ("rms_relu", "local"):
        return a, h
    return a


def post_vjp(kind: str, post: nn.Module, state, g: torch.Tensor, a_shape) -> torch.Tensor:
    """Teaching signal on the pre-activation from a signal ``g`` on the block's output."""
    if kind == "identity":
        return g.reshape(a_shape)
    if kind == "local":
        return post.local_vjp(state, g.reshape(a_shape))
    if kind == "relu":  # h > 0 exactly where a > 0; the same fused kernel autograd uses
        return torch.ops.aten.threshold_backward(g.reshape(a_shape), state, 0)
    if kind == "relu_pool":  # to each window's argmax, where relu was active (pooled > 0 there)
        pooled, idx, k = state
        g = torch.ops.aten.threshold_backward(g.reshape(pooled.shape), pooled, 0)
        return F.max_unpool2d(g, idx, k, output_size=a_shape[-2:])
    if kind == "rms_relu":
        # y = a r, r = (mean(a^2) + eps)^-1/2, h = relu(y):  dL/da = r (g_y - y mean(g_y y))
        a, h = state
        g_y = torch.ops.aten.threshold_backward(g.reshape(a_shape), h, 0)
        r = torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + RMS_EPS)
        s = (g_y * h).mean(-1, keepdim=True)  # g_y vanishes where h = 0, so g_y*h == g_y*y
        return r * (g_y - (a * r) * s)
    if kind == "tanh":
        return g.reshape(a_shape) * (1 - state * state)
    if kind == "sigmoid":
        return g.reshape(a_shape) * state * (1 - state)
    with torch.enable_grad():  # a tiny local graph over a parameter-free op, freed at once
        a = state.detach().requires_grad_(True)
        out = post(a)
        (da,) = torch.autograd.grad(out, a, g.reshape(out.shape))
    return da


def output_error(logits: torch.Tensor, target: torch.Tensor):
    """Mean cross-entropy and its gradient e = dL/dlogits = (softmax - onehot) / batch."""
    logp = F.log_softmax(logits, dim=1)
    loss = F.nll_loss(logp, target)
    e = logp.exp()
    e[torch.arange(len(target), device=target.device), target] -= 1.0
    return loss, e / len(target)


def own_random_layers(module: nn.Module) -> list:
    """The layers of ``module`` that draw from generators of their own (:class:`OwnRandomState`)."""
    return [m for m in module.modules() if implements(m, OwnRandomState)]


@contextmanager
def replayed_draws(layers: list, states: list):
    """Inside: ``layers`` draw again what they drew from ``states`` (saved by ``rng_state()`` before a
    forward pass); afterwards their streams are where they were before (a recompute adds no draws)."""
    now = [m.rng_state() for m in layers]
    for m, st in zip(layers, states):
        m.set_rng_state(st)
    try:
        yield
    finally:
        for m, st in zip(layers, now):
            m.set_rng_state(st)


def forward_state(module: nn.Module) -> tuple:
    """What a forward pass of ``module`` depends on besides its parameters, its input and torch's own
    generators, as it is now: the generators of its layers that have their own (analog read noise) and
    its buffers (running statistics: BatchNorm's, SAL's routing centres and usage)."""
    layers = own_random_layers(module)
    return layers, [m.rng_state() for m in layers], [b.clone() for b in module.buffers()]


@contextmanager
def replayed_forward(module: nn.Module, state: tuple):
    """Inside: a forward pass of ``module`` finds what it found when ``state`` was taken
    (:func:`forward_state`) -- its layers draw again what they drew and its buffers hold what they held,
    so a recompute is the forward again and moves running statistics once per step, not twice;
    afterwards those generators are where they were."""
    layers, draws, buffers = state
    with torch.no_grad():
        for b, v in zip(module.buffers(), buffers):
            b.copy_(v)
    with replayed_draws(layers, draws):
        yield


@contextmanager
def preserved_draws(module: nn.Module):
    """A read-only pass (a probe, an alignment measurement): the layers of ``module`` with generators of
    their own are back where they were afterwards, as ``torch.random.fork_rng`` does for torch's."""
    layers = own_random_layers(module)
    with replayed_draws(layers, [m.rng_state() for m in layers]):
        yield


def in_backward() -> bool:
    """Whether autograd's engine is running a backward pass on this thread (a checkpoint recomputes)."""
    return torch._C._current_graph_task_id() != -1


def _module_state(m: nn.Module) -> tuple:
    rng = m.rng_state() if implements(m, OwnRandomState) else None
    return rng, {n: b.clone() for n, b in m._buffers.items() if b is not None}


def _swap_module_state(m: nn.Module, state: tuple) -> tuple:
    """Put ``state`` in place and return what was there. Buffers are rebound, not written: the tensors
    a recompute's backward saved (BatchNorm saves its running statistics) are never modified, and the
    module's own tensors come back unchanged."""
    rng, buffers = state
    was = (m.rng_state() if rng is not None else None), {n: m._buffers[n] for n in buffers}
    if rng is not None:
        m.set_rng_state(rng)
    m._buffers.update(buffers)
    return was


class ReplayLedger:
    """Activation checkpointing inside a model -- the user's ``torch.utils.checkpoint`` (either kind;
    Hugging Face's gradient checkpointing), or the direct rules' ``memory="recompute"`` -- runs parts of
    the forward pass again in the backward. Torch replays its own generators there, not a layer's own
    (analog read noise), and the recompute moves running statistics (BatchNorm's, SAL's routing centres
    and usage) a second time, from values the forward never saw, so it is not the forward again.

    The ledger makes it so: every module with buffers or its own generators gets a pre- and post-hook.
    A call inside a checkpointed region (saved-tensor hooks active, or autograd off inside a recording
    forward: the reentrant kind) records the module's state as it found it; the same module's recompute
    (in the backward) starts from the latest record -- recomputes run in reverse order -- and
    afterwards the module is put back as it was, so the recompute moves nothing. :meth:`clear` drops
    what no recompute used (called at the end of each backward)."""

    #: records kept per module (forwards under autograd never followed by a backward stop growing here)
    LIMIT = 64

    def __init__(self):
        self.records: dict[nn.Module, list] = {}
        self._after: dict[nn.Module, list] = {}
        self._seen: dict[int, weakref.ref] = {}  # every module looked at (cheaper than a WeakSet)
        #: set by the owner while its forward records under autograd (the reentrant kind runs with
        #: autograd off inside such a forward)
        self.recording = False

    def __getstate__(self):  # pickling a wrapped model: the hooks go with the modules, the rest is per step
        return {"records": {}, "_after": {}, "_seen": {}, "recording": False}

    @staticmethod
    def stateful(m: nn.Module) -> bool:
        return any(b is not None for b in m._buffers.values()) or implements(m, OwnRandomState)

    def _hooks_of(self, m: nn.Module) -> list:
        # the hooks are found on the module (not kept here), so a deep copy's or an unpickled model's
        # modules are known as hooked by the copy's ledger, which their hooks are bound to
        return [(d, k) for d in (m._forward_pre_hooks, m._forward_hooks) for k, h in list(d.items())
                if getattr(h, "__self__", None) is self]

    def watch(self, model: nn.Module) -> None:
        """Hook every stateful module of ``model`` not hooked yet (layers replaced since are found)."""
        seen = self._seen
        for m in model.modules():
            r = seen.get(id(m))
            if r is None or r() is not m:  # (an id may be reused once its module is gone)
                seen[id(m)] = weakref.ref(m)
                if self.stateful(m) and not self._hooks_of(m):
                    m.register_forward_pre_hook(self._pre)
                    m.register_forward_hook(self._post)

    def remove(self, model: nn.Module) -> None:
        for m in model.modules():
            for d, k in self._hooks_of(m):
                del d[k]
        self._seen = {}
        self.clear()

    def clear(self) -> None:
        self.records.clear()
        self._after.clear()

    def _pre(self, m, args):
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if in_backward():
            found = self.records.get(m)
            if found:
                self._after.setdefault(m, []).append(_swap_module_state(m, found.pop()))
            # a checkpoint's forward inside a recompute (checkpoints nested: the user's around the direct
            # rules' memory="recompute"): it will be recomputed once more, from the state replayed now
            if hooks is not None and getattr(hooks[0], "__qualname__", "").startswith("_checkpoint_hook"):
                self._record(m)
        elif hooks is not None or (self.recording and not torch.is_grad_enabled()):
            self._record(m)

    def _record(self, m) -> None:
        kept = self.records.setdefault(m, [])
        kept.append(_module_state(m))
        del kept[:-self.LIMIT]

    def _post(self, m, args, out):
        after = self._after.get(m)
        if after and in_backward():
            _swap_module_state(m, after.pop())


def check_materialised(model: nn.Module, what: str, hint: str = "") -> None:
    """Refuse a model with tensors on the meta device (one line): what is drawn or copied from its weights
    now (a rule's feedback, sal's areas, devices' conductances) would be lost, and ``to_empty()``
    afterwards leaves uninitialised memory in their place (fa trained with B ~ 1e36, silently)."""
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise NeurosalError(f"the model's {meta[0]!r}{' and more' if len(meta) > 1 else ''} is on the meta device: "
                            f"materialise and initialise it (to_empty(), reset_parameters() or your init) before "
                            f"{what}{hint}")
