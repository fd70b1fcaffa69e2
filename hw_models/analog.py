"""Analog layers: ``nn.Linear`` / ``nn.Conv2d`` (and SAL's area layers) whose weights live in
differential pairs of resistive devices. A substrate, not a rule.

How a step works, for any rule and any optimiser:

1. forward: inputs through the DAC (abs-max scaling per read vector -- a sample of an MLP, a token, a
   convolution's patch -- and ``dac_bits``), the weights as the devices hold them plus fresh read noise,
   the outputs through the ADC (``adc_bits``, clipped to its range);
2. the rule's teaching signal lands in the float mirror ``weight.grad`` exactly as for float layers
   (``dW = delta^T x``), and the optimiser proposes a new mirror value;
3. :meth:`AnalogTiles.after_optimizer_step` turns the proposed change into pulses on the arrays and
   writes back into ``weight`` what the devices actually hold (quantised, nonlinear, noisy, bounded).

So FA/BP feedback, exports and evaluation all read the physical weights. The bias stays digital.
For torch.autograd (the BP baseline) the forward is a straight-through estimator: the value is the
analog one, the gradient that of the float layer.
"""

from __future__ import annotations

import itertools
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from neurosal.areas import AreaLinear
from neurosal.errors import NeurosalError
from neurosal.layers import (check_materialised, conv_function, float_update, hook_kind, hooked_weight,
                             keep_own_forward, own_forward, replace_module, weight_hook)

from .array import DifferentialArray, check_request, clip_fraction
from .devices import DeviceConfig


def analog_mvm(x: torch.Tensor, w: torch.Tensor, fn, cfg: DeviceConfig, w_max: float, fan_in: int,
               noise=None, sumsq=None):
    """``fn(x, w)`` (a linear map of ``x``'s last axis, no bias) through DAC, read noise and ADC; ``x`` holds
    one read vector per last-axis row (a sample, a token; a convolution reads its patches through
    :func:`analog_conv`).

    The DAC scales each read vector by its own abs-max before quantising it (the "noise management" of
    analog periphery; aihwkit's ``NoiseManagementType.ABS_MAX`` likewise scales every input vector): a
    vector the array applies in one read cycle uses the converter's full range whatever the other vectors
    of the batch hold. (Scaling a whole sample's tokens or feature map by one factor let a single large
    activation push every other vector of it onto a few DAC codes, and the ADC rounded most of what a deep
    network's convolutions read to zero.)

    Read noise (``cfg.read_noise``, std per device relative to R) is fresh at every read, and a read is one
    matrix-vector product: each sample (each token, each output position of a convolution) meets its own
    draw of the conductances, as it does on an array that applies one input vector per read cycle
    (aihwkit's ``w_noise`` is the same "MVM-to-MVM" noise). Independent noise of std ``s`` on every weight
    of a row gives that row's output a normal of std ``s * |x|``, independent between outputs and reads,
    so it is drawn on the outputs (``noise(shape)``: standard normals from the array's generator) scaled
    by the norm of what each output reads (``sumsq(x)``, broadcastable to the output) -- exact in
    distribution, and one draw per output instead of one per weight. It enters at the array, between
    DAC and ADC.
    """
    if not (cfg.dac_bits or cfg.adc_bits):
        y = fn(x, w)
        return _periphery(y, lambda: sumsq(x), None, 1.0, cfg, w_max, fan_in, noise)
    # Abs-max scaling per read vector, then the DAC's integer codes: the array sees x / scale (|.| <= 1) on
    # 2^(bits-1) - 1 levels per side. The matmul runs on the codes (or on x / scale without a DAC) and
    # every scale folds into one factor per vector at the end: the ops are written in place, few and
    # fused, because this runs at every forward of every analog layer.
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-12)  # (torch.aminmax: 10x slower on a CPU)
    levels, unit = dac_levels(cfg)
    xn = (x * (levels / scale)).round_() if levels else x / scale  # |x| <= scale: no clamp needed
    y = fn(xn, w)  # in units of `unit`
    return _periphery(y, lambda: sumsq(xn), scale, unit, cfg, w_max, fan_in, noise)


def dac_levels(cfg: DeviceConfig) -> tuple[int, float]:
    """The DAC's levels per side (0: no DAC) and what one code stands for, in units of x / scale."""
    if not cfg.dac_bits:
        return 0, 1.0
    levels = 2 ** (cfg.dac_bits - 1) - 1
    return levels, 1.0 / levels


def _periphery(y, sumsq, scale, unit: float, cfg: DeviceConfig, w_max: float, fan_in: int, noise):
    """After the array's product ``y`` (in units of ``unit`` of the scaled input): read noise of std
    sigma * |read input| (``sumsq()``: its squared norm, in the same units), the ADC, the scale back."""
    sigma = cfg.read_noise * 2 ** 0.5 * w_max  # G+ and G- each read with std read_noise * R
    if noise is not None and sigma > 0:
        y.addcmul_(sumsq().sqrt_(), noise(y.shape).mul_(sigma))
    if scale is None:
        return y
    if cfg.adc_bits:  # codes of the ADC's grid over [-full, full] of the normalised output
        levels = 2 ** (cfg.adc_bits - 1) - 1
        full = cfg.adc_range * w_max * math.sqrt(fan_in) / unit
        y.mul_(levels / full).clamp_(-levels, levels).round_()
        unit *= full / levels
    return y.mul_(scale.mul_(unit))


def conv_padding(kernel_size, dilation, padding) -> list[tuple[int, int]]:
    """(before, after) zero padding per spatial axis as ``F.convNd`` pads: ``'same'`` puts the odd one of
    an even effective kernel after."""
    if isinstance(padding, int):
        padding = (padding,) * len(kernel_size)
    if padding == "valid":
        return [(0, 0)] * len(kernel_size)
    if padding == "same":
        eff = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        return [(e // 2, e - e // 2) for e in eff]
    return [(p, p) for p in padding]


def patch_products(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int,
                   mult: torch.Tensor | None = None, codes: bool = False, sumsq: bool = False):
    """A convolution as its patches' products with the weight's rows, one kernel offset at a time: the
    patches are multiplied by ``mult`` (one factor per patch and group, ``(batch, groups, *out)``) and,
    with ``codes``, rounded (the DAC) before the product -- so each patch (one read vector of the array)
    gets its own scale without building the im2col columns (1/prod(kernel) of their memory; 1.7x faster
    than im2col + one matmul on a 32x64x32x32 CPU read). Returns ``y`` as ``(batch, groups, out/groups,
    positions)``, the output's spatial shape, and with ``sumsq`` each read vector's squared norm
    ``(batch, groups, 1, positions)``. With ``mult`` None and no codes it is the convolution itself
    (tested)."""
    nd, k = w.dim() - 2, tuple(w.shape[2:])
    pads = [v for pair in reversed(conv_padding(k, dilation, padding)) for v in pair]
    xp = F.pad(x, pads) if any(pads) else x
    b, c = x.shape[:2]
    out = tuple((xp.shape[2 + i] - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1 for i in range(nd))
    cg, og, n = c // groups, w.shape[0] // groups, math.prod(out)
    wk = w.reshape(groups, og, cg, -1).permute(3, 0, 1, 2)  # (kernel offsets, g, out/g, in/g)
    y = x.new_zeros(b, groups, og, n)
    ss = x.new_zeros(b, groups, 1, n) if sumsq else None
    q = x.new_empty(b, groups, cg, *out)
    qv = q.view(b, groups, cg, n)
    for j, view in enumerate(_offset_views(xp, k, stride, dilation, out)):
        view = view.view(b, groups, cg, *out)
        if mult is None:
            q.copy_(view)
        else:
            torch.mul(view, mult.unsqueeze(2), out=q)
        if codes:
            q.round_()
        if cg == 1:  # depthwise: a broadcast product, not g matmuls of one column
            y.addcmul_(wk[j].unsqueeze(0), qv)
        else:
            y.add_(torch.matmul(wk[j], qv))
        if sumsq:
            ss.addcmul_(qv, qv) if cg == 1 else ss.add_(torch.matmul(qv.new_ones(1, cg), qv.square_()))
    return y, out, ss


def analog_conv(x: torch.Tensor, w: torch.Tensor, cfg: DeviceConfig, w_max: float, fan_in: int, stride,
                padding, dilation, groups: int, noise=None) -> torch.Tensor:
    """A convolution (no bias) read on an array of ``out x in/groups * kernel`` conductances, one input
    patch per read: with converters, each patch is a read vector of its own (abs-max scaled and quantised
    as :func:`analog_mvm` does, :func:`patch_products`); with read noise alone, the convolution itself,
    its noise scaled by each patch's norm (:func:`patch_sumsq`)."""
    if x.dim() == w.dim() - 1:  # an unbatched input (torch's convolutions take one)
        return analog_conv(x.unsqueeze(0), w, cfg, w_max, fan_in, stride, padding, dilation, groups,
                           noise).squeeze(0)
    if not (cfg.dac_bits or cfg.adc_bits):
        fn = conv_function(w.dim() - 2)
        conv = lambda v, w_: fn(v, w_, None, stride, padding, dilation, groups)  # noqa: E731
        return analog_mvm(x, w, conv, cfg, w_max, fan_in, noise, patch_sumsq(w.shape[2:], stride, padding,
                                                                             dilation, groups, w.shape[0]))
    scale = patch_absmax(x, w.shape[2:], stride, padding, dilation, groups).clamp_min_(1e-12)
    levels, unit = dac_levels(cfg)
    noisy = noise is not None and cfg.read_noise > 0
    y, out, ss = patch_products(x, w, stride, padding, dilation, groups, (levels or 1.0) / scale,
                                codes=bool(levels), sumsq=noisy)
    b = x.shape[0]
    y = _periphery(y, lambda: ss, scale.view(b, groups, 1, -1), unit, cfg, w_max, fan_in, noise)
    return y.view(b, w.shape[0], *out)


def _offset_views(x: torch.Tensor, kernel_size, stride, dilation, out):
    """For each kernel offset, the view of the (padded) input ``x`` that offset reads at every output
    position: a convolution's patches, one offset at a time."""
    for offset in itertools.product(*(range(v) for v in kernel_size)):
        yield x[(Ellipsis, *[slice(o * d, o * d + s * (m - 1) + 1, s)
                             for o, d, s, m in zip(offset, dilation, stride, out)])]


def patch_absmax(x: torch.Tensor, kernel_size, stride, padding, dilation, groups: int) -> torch.Tensor:
    """The abs-max of each input patch of a convolution, per group: ``(batch, groups, *out)``, from the
    channels' abs-max one kernel offset at a time (no pass over the patches; torch's max-pool on
    channels-first maps is ~12x slower than this on a CPU)."""
    b, c = x.shape[:2]
    a = x.abs().view(b, groups, c // groups, *x.shape[2:]).amax(2)
    pads = [v for pair in reversed(conv_padding(kernel_size, dilation, padding)) for v in pair]
    if any(pads):
        a = F.pad(a, pads)  # zeros: below every |x|, as the padded positions the patches read
    out = tuple((a.shape[2 + i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1
                for i in range(len(kernel_size)))
    views = _offset_views(a, kernel_size, stride, dilation, out)
    m = next(views).clone()
    for v in views:
        torch.maximum(m, v, out=m)
    return m


def row_sumsq(x: torch.Tensor) -> torch.Tensor:
    """What each output of a Linear layer reads: the squared norm of its input vector."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_()


def patch_sumsq(kernel_size, stride, padding, dilation, groups: int, out_channels: int):
    """What each output of a convolution reads: the squared norm of its input patch (per group), shaped to
    broadcast over the output channels."""
    def sumsq(x: torch.Tensor) -> torch.Tensor:
        ones = x.new_ones(groups, x.shape[1] // groups, *kernel_size)
        s = conv_function(len(kernel_size))(x * x, ones, None, stride, padding, dilation, groups)
        return s if groups == 1 else s.repeat_interleave(out_channels // groups, dim=1)
    return sumsq


def weight_range(cfg: DeviceConfig, params: list[torch.Tensor], fan_in: int) -> float:
    """``w_max`` of the arrays that will hold ``params`` (before programming them): ``cfg.w_range`` times
    the layer's weight scale (``cfg.w_scale``). ``"fan_in"``: ``1/sqrt(fan_in)``, the bound of torch's
    default init. ``"weights"``: that scale times the power of two nearest to the weights' own spread
    ``sqrt(3) rms(W)`` over it -- torch's default init keeps ``1/sqrt(fan_in)``, while a model initialised
    otherwise (EfficientNet's depthwise convolutions at ~1/25 of it, a ViT's std-0.02 projections, a
    trained model) still spans its devices' levels and its ADC's range instead of a few codes of them. A
    power of two is a shift in the digital periphery that scales the read back; all-zero weights keep
    ``1/sqrt(fan_in)``."""
    unit = 1.0 / math.sqrt(fan_in)
    if cfg.w_scale == "weights":
        n = sum(p.numel() for p in params)
        ms = sum(float(p.detach().double().pow(2).sum()) for p in params) / max(n, 1)
        spread = math.sqrt(3.0 * ms)
        if spread > 0 and math.isfinite(spread):
            unit *= 2.0 ** round(math.log2(spread / unit))
    return cfg.w_range * unit


class AnalogTiles:
    """The arrays behind a module's weight parameters, and the sync after each optimiser step."""

    def __init__(self, cfg: DeviceConfig, params: list[nn.Parameter], fan_in: int, seed: int):
        self.cfg = cfg
        self.w_max = weight_range(cfg, params, fan_in)
        self.fan_in = fan_in
        self.params = params
        self.arrays = []
        beyond = sum(int((p.detach().abs() > self.w_max).sum()) for p in params)
        #: share of the weights first programmed that lay beyond +-w_max (the devices hold them clipped)
        self.clipped_at_programming = beyond / max(1, sum(p.numel() for p in params))
        for i, p in enumerate(params):
            # conductances in at least float32 (see DifferentialArray.to_): a bf16 model's arrays too
            arr = DifferentialArray(cfg, p.shape, self.w_max, seed * 7919 + i, device=p.device,
                                    dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
            arr.program(p.detach())  # the float init, as the devices can hold it
            self.arrays.append(arr)
            with torch.no_grad():
                p.copy_(arr.weights())
        self.held = [p.detach().clone() for p in params]
        self.pending: dict[int, tuple] = {}  # coincidence mode: this step's (x, delta) per parameter
        self.mark_synced()

    def apply_(self, fn) -> None:
        """The module was moved or cast (``fn``: what ``nn.Module._apply`` applies to its tensors): the
        arrays go to its device (see :meth:`DifferentialArray.to_` for their dtype), the held copies
        follow the parameters."""
        ref = self.arrays[0].g if self.arrays else None
        if ref is not None:
            probe = fn(torch.zeros((), device=ref.device, dtype=self.held[0].dtype))
            for arr in self.arrays:
                arr.to_(probe.device, probe.dtype)
        self.held = [fn(h) for h in self.held]
        self.pending.clear()
        self.mark_synced()  # (the parameters' tensors were replaced: new version counters)

    def mark_synced(self) -> None:
        """Note the parameters' version counters: the devices hold what the parameters hold now."""
        self._versions = [p._version for p in self.params]

    def check_synced(self) -> None:
        """Warn (once per place) when a parameter changed in place since the devices were last programmed
        -- an optimiser step without :func:`attach` / ``neurosal.finish_step``: the layer would then read
        float weights the devices never held (their levels, nonlinearity and noise skipped). Reads
        version counters only: no pass over the weights, no device sync."""
        if any(p._version != v for p, v in zip(self.params, self._versions)):
            warnings.warn("an analog layer's weights changed since its devices were last programmed (an "
                          "optimiser step without hw_models.attach(opt, model) or neurosal.finish_step(model) "
                          "after it?): the devices do not hold them", stacklevel=4)
            self.mark_synced()

    @property
    def exact_read(self) -> bool:
        """Whether a read returns the weights themselves: no converters, no read noise."""
        c = self.cfg
        return not (c.dac_bits or c.adc_bits or c.read_noise > 0)

    def read(self, i: int, x: torch.Tensor, fn, sumsq=row_sumsq, training: bool = True) -> torch.Tensor:
        """Array ``i`` read with input ``x`` (``fn``: the layer's linear map, no bias): DAC, the devices'
        weights with fresh read noise per read, ADC (see :func:`analog_mvm`). ``training``: a training
        read (:func:`training_read`) draws its noise from the array's training stream, an inference read
        (evaluation) from its read stream, so evaluating does not move what training draws."""
        arr = self.arrays[i]
        noise = (arr._randn if training else arr._randn_read) if self.cfg.read_noise > 0 else None
        return analog_mvm(x, self.params[i].detach(), fn, self.cfg, self.w_max, self.fan_in, noise, sumsq)

    def read_conv(self, i: int, x: torch.Tensor, stride, padding, dilation, groups: int,
                  training: bool = True) -> torch.Tensor:
        """Array ``i`` read as a convolution of ``x``, one patch per read (:func:`analog_conv`)."""
        arr = self.arrays[i]
        noise = (arr._randn if training else arr._randn_read) if self.cfg.read_noise > 0 else None
        return analog_conv(x, self.params[i].detach(), self.cfg, self.w_max, self.fan_in, stride, padding,
                           dilation, groups, noise)

    @torch.no_grad()
    def sync(self, only: set[int] | None = None) -> None:
        """Program each array with its parameter's change since the last sync and read it back into the
        parameter; ``only``: the ids of the parameters to program (those an optimiser just stepped)."""
        coincidence = self.cfg.pulses == "coincidence"
        for k, (p, arr, held) in enumerate(zip(self.params, self.arrays, self.held)):
            if only is not None and id(p) not in only:
                continue  # another optimiser's parameter: its own step programs it
            if coincidence:
                request = p - held
                check_request(request)
                if k not in self.pending:
                    if p.grad is None:
                        continue  # nothing asked of this array this step
                    raise NeurosalError("pulses=coincidence needs the layer's inputs and teaching signal, and "
                                        "this step's update reached the layer without them")
                x, d = self.pending.pop(k)
                # the rate is fitted against the trains' own update d^T x, not against .grad: whatever
                # scaled the gradient since (a GradScaler's unscale, gradient clipping) is absorbed
                dt = request.dtype
                outer = d.reshape(-1, d.shape[-1]).t().to(dt) @ x.reshape(-1, x.shape[-1]).to(dt)
                w = arr.apply_trains(*arr.coincidence_pulses(x, d, self._sgd_rate(request, outer, held)))
            else:
                w = arr.step_to(p, held)
            p.copy_(w)
            # the next step's reference is what the parameter holds: the read-back itself (a fresh tensor,
            # no copy) unless the parameter rounds it (a bf16 model): the rounding would otherwise be
            # programmed into the devices as part of every later request
            self.held[k] = w if w.dtype == p.dtype else p.detach().clone()
        self.mark_synced()

    @staticmethod
    def _sgd_rate(request: torch.Tensor, grad: torch.Tensor | None, weights: torch.Tensor | None = None) -> float:
        """The rate of a plain SGD step ``request = -lr * grad`` (coincidence: ``grad`` the trains' own
        update ``d^T x``, so ``lr`` also absorbs a loss scale or a clipping factor). ``weights``: those the
        request was taken from (``request = new - weights``): its rounding, a few ulps of the weights,
        is allowed beside the 1e-3 relative misfit, so small steps on large weights are not mistaken for
        momentum or decay. Reads four numbers on the host in one transfer -- the rate and the check that
        the step was plain SGD -- so a CUDA step syncs once per array here (documented exception to the
        no-sync rule)."""
        if grad is None:
            return 0.0
        g, r = grad.reshape(-1), request.reshape(-1)
        gg = g @ g
        lr_t = -(r @ g) / gg.clamp_min(torch.finfo(g.dtype).tiny)
        r_norm = r.norm().clamp_min(1e-30)
        resid_t = (r + lr_t * g).norm() / r_norm
        rounding_t = (16 * torch.finfo(r.dtype).eps * weights.norm() / r_norm) if weights is not None \
            else torch.zeros((), dtype=r.dtype, device=r.device)
        gg, lr, resid, rounding = torch.stack([gg, lr_t, resid_t, rounding_t.to(r.dtype)]).tolist()
        if gg == 0:
            return 0.0
        if lr < 0 or resid > 1e-3 + rounding:
            raise NeurosalError("pulses=coincidence realises -lr * delta^T x by pulse trains from the layer's "
                                "own input and signal, so the step must be exactly that: plain SGD on one "
                                "backward pass per step (no momentum, weight decay, adaptive steps, gradient "
                                "accumulation or data-parallel averaging) of a rule whose update is delta^T x; "
                                "use --optimizer SGD --momentum 0, or pulses=stochastic")
        return lr

    @torch.no_grad()
    def drift(self, t: float) -> None:
        for p, arr, held in zip(self.params, self.arrays, self.held):
            arr.drift(t)
            p.copy_(arr.weights())
            held.copy_(p)
        self.mark_synced()

    def state(self) -> dict:
        return {"arrays": [a.state() for a in self.arrays], "held": self.held, "w_max": self.w_max}

    def load(self, st: dict) -> None:
        w_max = st.get("w_max")  # (absent before the range followed the weights: then it was w_range/sqrt)
        self.w_max = float(w_max) if w_max is not None else self.cfg.w_range / math.sqrt(self.fan_in)
        for a in self.arrays:
            a.set_w_max(self.w_max)
        for a, s in zip(self.arrays, st["arrays"]):
            a.load(s)
        for h, s in zip(self.held, st["held"]):
            h.copy_(s)
        self.mark_synced()  # (a state dict loads the parameters first, then this extra state)

    @property
    def resets(self) -> int:
        return sum(a.resets for a in self.arrays)

    def take_clip_fraction(self) -> float | None:
        """Coincidence mode: share of requested pulses the fixed train length cut since the last call."""
        return clip_fraction(self.arrays)


def _float_weight(layer: nn.Module) -> torch.Tensor:
    """``layer.weight``, or -- computed by a forward pre-hook (prune, the older weight_norm) -- what the
    next forward would compute: the attribute is stale after a step or a cast."""
    hook = weight_hook(layer)
    return layer.weight if hook is None else hooked_weight(layer, hook)


def _load_float(new: nn.Module, layer: nn.Module) -> None:
    """The float layer's state into its analog twin (whose own extra state -- the arrays -- comes later).
    A parametrised weight (weight_norm, orthogonal: ``torch.nn.utils.parametrize``) is stored as its
    factors; the twin takes the effective weight, which is what the arrays are programmed with. Any
    other state without a place on the twin is an error, not silently a randomly initialised weight."""
    state = dict(layer.state_dict())
    for name in [n for n in ("weight", "in_proj_weight") if parametrize.is_parametrized(layer, n)]:
        state = {k: v for k, v in state.items() if not k.startswith(f"parametrizations.{name}.")}
        state[name] = getattr(layer, name).detach()
    if weight_hook(layer) is not None:  # pruning's weight_orig/weight_mask, the older weight_norm's
        # weight_g/weight_v, spectral_norm's weight_orig/weight_u/weight_v: the next forward's weight
        state = {k: v for k, v in state.items() if not k.startswith("weight_")}
        state["weight"] = _float_weight(layer)
    unexpected = new.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise NeurosalError(f"convert: {type(layer).__name__} holds state the analog layer has no place for: "
                            f"{unexpected[:4]}")


class _AnalogMixin:
    """Shared plumbing: the tiles, the post-step sync, checkpoint state."""

    tiles: AnalogTiles

    def local_update(self, x, delta, ctx=None):
        """The float update into .grad; coincidence mode also keeps (x, delta) for the pulse trains."""
        if self.tiles.cfg.pulses == "coincidence":
            self._keep_for_coincidence(x, delta)
        parent = getattr(super(), "local_update", None)  # SAL's area layer has its own
        if parent is not None:
            parent(x, delta, ctx)
        else:
            float_update(self, x, delta)

    def _keep_for_coincidence(self, x, delta) -> None:
        if not isinstance(self, nn.Linear) or isinstance(self, AreaLinear):
            raise NeurosalError(f"pulses=coincidence is defined for Linear layers, not {type(self).__name__}")
        self.tiles.pending[0] = (x, delta)  # the latest pass wins (an alignment probe's is overwritten)

    def after_optimizer_step(self) -> None:
        self.tiles.sync()

    def _apply(self, fn, recurse=True):
        # model.to("cuda") / .cuda() / .double() after convert: the arrays (plain tensors, not buffers)
        # move with the module instead of staying behind on the old device
        super()._apply(fn, recurse)
        tiles = getattr(self, "tiles", None)  # (from_float moves the module before it has tiles)
        if tiles is not None:
            tiles.apply_(fn)
        return self

    def epoch_stats(self) -> dict:
        """Per-epoch figures for metrics.json: coincidence clipping (None outside coincidence mode)."""
        return {"coincidence_clipped": self.tiles.take_clip_fraction()}

    def rng_state(self):
        """The arrays' generator states (read noise, pulse draws): what a recompute replays."""
        return [(a.gen.get_state(), a.read_gen.get_state()) for a in self.tiles.arrays]

    def set_rng_state(self, state) -> None:
        for a, (train, read) in zip(self.tiles.arrays, state):
            a.gen.set_state(train)
            a.read_gen.set_state(read)

    def get_extra_state(self):
        return self.tiles.state()

    def set_extra_state(self, state):
        self.tiles.load(state)

    def _straight_through(self, x, hw_fn, float_fn):
        """The array's output ``hw_fn(x)`` (no autograd) with the float layer's derivative. Where the
        array reads exactly -- no converters, no read noise -- its output *is* the float layer's (the
        parameters hold the arrays' weights after every sync), so one matmul serves both. A Linear layer's
        derivative is written out (:class:`_ReadWithFloatGradient`), so its float forward is not run."""
        self.tiles.check_synced()
        learning = torch.is_grad_enabled() and self.weight.requires_grad
        if self.tiles.exact_read:
            y = float_fn(x)
        elif learning and isinstance(self, nn.Linear):
            y = _ReadWithFloatGradient.apply(x, self.weight, self.bias, hw_fn)
        else:
            with torch.no_grad():
                y_hw = hw_fn(x)
            if not learning:
                return y_hw
            y_f = float_fn(x)
            y = y_f + (y_hw - y_f).detach()
        if learning and self.tiles.cfg.pulses == "coincidence":
            # the autograd path (bp): the layer still sees its input and its output's gradient
            xd = x.detach()
            y.register_hook(lambda g: self._keep_for_coincidence(xd, g.detach()))
        return y


class _ReadWithFloatGradient(torch.autograd.Function):
    """``hw_fn(x)`` -- an array's read of ``F.linear(x, weight, bias)`` -- with the derivative of that float
    layer: the straight-through estimator without computing the float output it would discard."""

    @staticmethod
    def forward(ctx, x, weight, bias, hw_fn):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return hw_fn(x)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = grad @ weight
        flat = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            gw = flat.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = flat.sum(0)
        return gx, gw, gb, None


def training_read(module: nn.Module) -> bool:
    """Whether a module's forward reads for training: in train mode, or with autograd recording (a
    frozen-statistics fine-tune in eval mode). An evaluation (eval mode, no autograd) reads from the
    arrays' read streams, so how often and on how much you evaluate leaves training's draws alone."""
    return module.training or torch.is_grad_enabled()


def _linear_read(tiles: "AnalogTiles", i: int, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                 training: bool = True):
    """``x @ w^T + b`` as array ``i`` of ``tiles`` reads it (digital bias), with the float map's derivative
    under autograd (straight-through; :class:`_ReadWithFloatGradient`); an exactly reading array is the
    plain matmul. For linear maps held outside an ``nn.Linear`` (attention's packed projection, SAL's
    areas); :class:`AnalogLinear` reads through :meth:`_AnalogMixin._straight_through`, which also serves
    coincidence trains."""
    if tiles.exact_read:
        return F.linear(x, w, b)

    def hw(v):
        y = tiles.read(i, v, F.linear, training=training)
        return y if b is None else y + b
    if torch.is_grad_enabled() and w.requires_grad:
        return _ReadWithFloatGradient.apply(x, w, b, hw)
    with torch.no_grad():
        return hw(x)


class AnalogLinear(_AnalogMixin, nn.Linear):
    @classmethod
    def from_float(cls, layer: nn.Linear, cfg: DeviceConfig, seed: int) -> "AnalogLinear":
        w = _float_weight(layer)
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device=w.device, dtype=w.dtype)
        _load_float(new, layer)
        new.tiles = AnalogTiles(cfg, [new.weight], layer.in_features, seed)
        return new

    def forward(self, x):
        training = training_read(self)

        def hw(v):
            y = self.tiles.read(0, v, F.linear, training=training)
            return y + self.bias if self.bias is not None else y
        return self._straight_through(x, hw, lambda v: F.linear(v, self.weight, self.bias))


class _AnalogConv(_AnalogMixin):
    """The analog convolutions: one array of out x (in/groups * kernel) conductances, read at every output
    position as one read vector (:func:`analog_conv`), bias digital."""

    @classmethod
    def from_float(cls, layer, cfg: DeviceConfig, seed: int):
        w = _float_weight(layer)
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
                  device=w.device, dtype=w.dtype)
        _load_float(new, layer)
        new.tiles = AnalogTiles(cfg, [new.weight], layer.weight[0].numel(), seed)
        return new

    def forward(self, x):
        training = training_read(self)

        def hw(v):
            y = self.tiles.read_conv(0, v, self.stride, self.padding, self.dilation, self.groups, training)
            return y if self.bias is None else y + self.bias.view(-1, *([1] * (self.weight.dim() - 2)))
        return self._straight_through(x, hw, lambda v: self._conv_forward(v, self.weight, self.bias))


class AnalogConv2d(_AnalogConv, nn.Conv2d):
    pass


class AnalogConv1d(_AnalogConv, nn.Conv1d):
    """Sequences, audio, time series: read per output position as :class:`AnalogConv2d` reads per pixel."""


class AnalogConv3d(_AnalogConv, nn.Conv3d):
    """Volumes and video: read per output voxel."""


class AnalogMultiheadAttention(_AnalogMixin, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` on devices: the packed q/k/v projection (3E x E) on one array, the
    out-projection an :class:`AnalogLinear`; the attention itself (scores, softmax, the weighted sum of
    values) stays digital, the usual split of analog in-memory transformer accelerators, whose arrays
    hold the static weight matrices while the input-dependent products run in digital units.

    torch's own forward reads ``in_proj_weight`` and ``out_proj.weight`` directly (no DAC/ADC, no read
    noise, in the fused path not even the module calls), so the forward here is torch's written out
    (:class:`neurosal.wrap.MHAForward`) with both projections read through their arrays. Parameter names
    are torch's (checkpoints and exports keep their keys). The packed default only (no kdim/vdim,
    add_bias_kv, add_zero_attn), and not in ``pulses=coincidence`` mode (its trains are built per
    Linear layer from the layer's own input and signal).
    """

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention, cfg: DeviceConfig, seed: int) -> "AnalogMultiheadAttention":
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise NeurosalError("analog attention takes nn.MultiheadAttention's packed default (no kdim/vdim, "
                                "add_bias_kv or add_zero_attn)")
        if cfg.pulses == "coincidence":
            raise NeurosalError("pulses=coincidence is defined for Linear layers; nn.MultiheadAttention's "
                                "packed projection takes pulses=stochastic or deterministic")
        w = mha.in_proj_weight
        new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                  batch_first=mha.batch_first, device=w.device, dtype=w.dtype)
        _load_float(new, mha)
        new.out_proj = mha.out_proj  # the caller puts it on its own array, as any Linear
        new.train(mha.training)
        new.tiles = AnalogTiles(cfg, [new.in_proj_weight], mha.embed_dim, seed)
        return new

    def in_projection(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ in_proj_weight^T + in_proj_bias`` as the array reads it (digital bias), with the float
        projection's derivative (straight-through, as :class:`AnalogLinear`)."""
        self.tiles.check_synced()
        return _linear_read(self.tiles, 0, x, self.in_proj_weight, self.in_proj_bias, training_read(self))

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        from neurosal.wrap import MHAForward

        return MHAForward(self, self.in_projection)(query, key, value, key_padding_mask, need_weights, attn_mask,
                                                    average_attn_weights, is_causal)


class AnalogAreaLinear(_AnalogMixin, AreaLinear):
    """SAL's area layer on devices: one array per area; routing (a small projection) stays digital."""

    @classmethod
    def from_float(cls, layer: AreaLinear, cfg: DeviceConfig, seed: int) -> "AnalogAreaLinear":
        new = cls(layer.in_features, layer.out_features, layer.areas, layer.route_dim, layer.balance,
                  layer.temperature, layer.center_momentum, layer.tokens)
        _load_float(new, layer)  # with the float layer's warm-up clock
        new.grouped = layer.grouped
        new.to(layer.router.device, layer.router.dtype)
        new.tiles = AnalogTiles(cfg, list(new.area_weight), layer.in_features, seed)
        return new

    def get_extra_state(self):
        return self.tiles.state()  # (the warm-up clock: tensors of AreaLinear's own)

    def set_extra_state(self, state):
        if isinstance(state, dict) and "area_clock" in state:  # written when the clock was extra state too
            clock = state["area_clock"]
            self.steps, self.warmup_steps = int(clock["steps"]), int(clock["warmup_steps"])
            self.tiles.load(state["analog_tiles"])
        elif isinstance(state, dict) and set(state) == set(AreaLinear.CLOCK):
            pass  # a float area layer's older checkpoint: its clock is read already, the arrays stay programmed
        else:
            self.tiles.load(state)

    def area_forward(self, k: int, rows: torch.Tensor) -> torch.Tensor:
        """Area k's array read for its rows, with the float area's derivative under autograd (the
        general engine: straight-through, as :class:`AnalogLinear`); the spec chains' engine reads
        without autograd and updates locally."""
        if k == 0:
            self.tiles.check_synced()
        return _linear_read(self.tiles, k, rows, self.area_weight[k], self.area_bias[k], training_read(self))


#: share of a layer's weights beyond +-w_max above which convert says they were clipped
CLIP_WARN = 1e-4

#: parametrised layers convert leaves digital (said once, naming them)
NO_ANALOG_VERSION = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.RNNBase, nn.Bilinear)


def convert(net: nn.Module, device: DeviceConfig | str, seed: int = 0, include_output: bool = True,
            **options) -> nn.Module:
    """Put every ``nn.Linear``/``nn.Conv1d/2d/3d``/area layer and ``nn.MultiheadAttention``'s two projections
    (:class:`AnalogMultiheadAttention`) of ``net`` -- any module, anywhere in it -- on analog arrays (in
    place; returns ``net``). ``device`` is a :class:`DeviceConfig` or a preset name or file (``options``
    override its fields: ``convert(model, device="rram-like", levels=64)``). The output
    layer is the last one registered.

    Convert before :func:`neurosal.wrap` for the layerwise rules (wrapping patches the layers it finds);
    a model wrapped for a direct rule (dfa, drtp, sal) may be converted afterwards, before its first
    training step: pass the wrapper.
    """
    from neurosal.wrap import Wrapped

    if isinstance(device, str):
        from .presets import get_device

        cfg = get_device(device, **options)
    else:
        cfg = device.replace(**options) if options else device
    cfg.validate()
    target = net
    if isinstance(net, Wrapped):
        if not net.rule.direct or net.rule.autograd:
            raise NeurosalError("convert the model before wrapping it for a layerwise rule "
                                "(wrapping patches the layers it finds)")
        target = net.model
    check_materialised(target, "putting it on devices (its weights are programmed into them)")
    lazy = [n for n, p in target.named_parameters() if nn.parameter.is_lazy(p)]
    if lazy:
        raise NeurosalError(f"convert: {lazy[0]!r}{' and more' if len(lazy) > 1 else ''} belongs to a lazy layer "
                            "(LazyLinear/LazyConv) with no weight yet to program: run one forward with a batch first")
    named = [(n, m) for n, m in target.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, AreaLinear, nn.MultiheadAttention))
             and not isinstance(m, _AnalogMixin)]
    if not named:
        raise NeurosalError("convert: the model has no Linear/Conv2d layer to put on devices")
    digital = [n for n, m in target.named_modules() if isinstance(m, NO_ANALOG_VERSION)]
    if cfg.pulses == "coincidence":  # pulse trains are built per Linear layer from its own input and
        # signal: convolutions, SAL's areas and attention stay digital rather than refusing the model
        other = [n for n, m in named if not isinstance(m, nn.Linear)]
        named = [(n, m) for n, m in named if not any(n == a or n.startswith(a + ".") for a in other)]
        digital += other
    reparam = [n for n, m in named if parametrize.is_parametrized(m)]
    if reparam:  # weight_norm, orthogonal, spectral: a crossbar stores W itself, not W's factors
        warnings.warn(f"convert: {reparam[:3]}{' and more' if len(reparam) > 3 else ''} are parametrised "
                      "(torch.nn.utils.parametrize); the devices hold the effective weight and learn it "
                      "directly: the parametrisation is dropped", stacklevel=2)
    hooked = {}
    for n, m in named:
        hook = weight_hook(m)
        if hook is not None:
            hooked.setdefault(hook_kind(hook), []).append(n)
    custom = [n for n, m in named if own_forward(m)]
    if custom:  # MaskedLinear, an equalised-learning-rate scale, QAT's fake quantisation
        warnings.warn(f"convert: {custom[:3]}{' and more' if len(custom) > 3 else ''} compute their output their own "
                      "way (a Linear/Conv subclass with its own forward); their analog layers compute the plain "
                      "W x from the weight: that forward is dropped", stacklevel=2)
    for kind, names in hooked.items():  # prune / the older weight_norm, spectral_norm: hooks, not parametrize
        warnings.warn(f"convert: {names[:3]}{' and more' if len(names) > 3 else ''} are {kind} (a forward "
                      "pre-hook computes the weight); the devices hold the effective weight and learn it "
                      f"directly: the {'mask' if kind == 'pruned' else 'normalisation'} is dropped"
                      f"{' (pruned weights start at zero and may grow back)' if kind == 'pruned' else ''}",
                      stacklevel=2)
    if digital:
        warnings.warn(f"convert: {digital[:3]}{' and more' if len(digital) > 3 else ''} have no analog version "
                      "here (transposed convolutions, recurrent and bilinear layers; under pulses=coincidence "
                      "everything but nn.Linear) and stay digital", stacklevel=2)
    clipped = []
    for i, (name, op) in enumerate(named):
        if not include_output and i == len(named) - 1:
            continue
        if isinstance(op, nn.MultiheadAttention):  # its out_proj follows in `named`: a Linear of its own
            try:
                new = AnalogMultiheadAttention.from_float(op, cfg, seed * 1000 + i)
            except NeurosalError as exc:
                raise NeurosalError(f"{name}: {exc}") from None
        elif isinstance(op, AreaLinear):
            new = AnalogAreaLinear.from_float(op, cfg, seed * 1000 + i)
        elif isinstance(op, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if op.padding_mode != "zeros":  # the arrays' reads pad with zeros
                raise NeurosalError(f"{name}: analog convolutions pad with zeros, not {op.padding_mode!r}")
            kind = next(a for f, a in ((nn.Conv1d, AnalogConv1d), (nn.Conv2d, AnalogConv2d),
                                       (nn.Conv3d, AnalogConv3d)) if isinstance(op, f))
            new = kind.from_float(op, cfg, seed * 1000 + i)
        elif isinstance(op, nn.Linear):
            new = AnalogLinear.from_float(op, cfg, seed * 1000 + i)
        else:
            raise NeurosalError(f"{name}: no analog version of {type(op).__name__}")
        share = new.tiles.clipped_at_programming
        if share > CLIP_WARN:
            clipped.append(f"{name} ({100 * share:.2g}%)")
        frozen = {n for n, q in op.named_parameters() if not q.requires_grad}
        for n, q in new.named_parameters():  # a frozen layer stays frozen on devices (fine-tuning)
            if n in frozen:
                q.requires_grad_(False)
        replace_module(target, name, keep_own_forward(new))
    if clipped:  # a trained model's heavy-tailed weights (the range follows their spread, not their max)
        warnings.warn(f"convert: weights beyond the devices' range +-w_max were clipped when programmed: "
                      f"{', '.join(clipped[:4])}{' and more' if len(clipped) > 4 else ''}; a larger w_range "
                      "(w_max = w_range x the layer's weight scale) keeps them, at coarser steps", stacklevel=2)
    if isinstance(net, Wrapped):
        net.rebind()  # feedback points on replaced layers (sal's areas, a Linear before a functional activation)
    return net


def attach(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Realise every step of ``optimizer`` on ``model``'s arrays (pulses, then read-back) right after the
    step, so a training loop you do not control (Lightning, accelerate, HF Trainer) needs no change.
    Like calling ``neurosal.finish_step(model)`` after each ``optimizer.step()``, for the arrays of this
    optimiser's parameters: with several optimisers, attach each (every step programs what it moved;
    the others' arrays keep their trains and draws). Returns the hook handle."""
    def hook(opt, args, kwargs):
        stepped = {id(p) for group in opt.param_groups for p in group["params"]}
        for m in model.modules():
            if isinstance(m, _AnalogMixin):
                m.tiles.sync(only=stepped)

    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    analog = [n for n, m in model.named_modules() if isinstance(m, _AnalogMixin)]
    if analog and not any(id(p) in held for n in analog for p in model.get_submodule(n).parameters()):
        warnings.warn(f"attach: the optimiser holds no parameter of the analog layers ({analog[:3]}"
                      f"{' and more' if len(analog) > 3 else ''}): its steps program no array. Built before "
                      "hw_models.convert? Build it from the converted model's parameters", stacklevel=2)
    return optimizer.register_step_post_hook(hook)


def drift(net: nn.Module, t: float) -> None:
    """Every analog array of ``net`` as it is time ``t`` after programming (seconds, t0 = 1 s): absolute,
    so ``for t in times: drift(net, t); evaluate(net)`` measures each t (not their compounded ages);
    ``drift(net, 1)`` gives the programmed state back. Training steps start a new clock."""
    for m in net.modules():
        if isinstance(m, _AnalogMixin):
            m.tiles.drift(t)

