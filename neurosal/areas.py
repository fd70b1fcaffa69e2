"""Area-partitioned fully connected layer: the parameter structure of SAL (arXiv 2601.21561).

Inputs are ``(B, n_in)`` or spike trains ``(B, T, n_in)``; a spike train is routed by its time-averaged
input and keeps its area for the whole window. The layer holds K mutually exclusive *areas*, each a full ``(n_out, n_in)`` weight and bias. A sample
``x`` is routed to exactly one area by *learned-frozen decoupled routing*:

    z = R (x - mu)                         learnable projection R (route_dim x n_in); mu a running mean
    k(x) = argmax_k cos(z, p_k)            frozen prototypes p_k (orthonormal when K <= route_dim)
    a = W_k(x) x + b_k(x)                  only the chosen area computes

Samples are grouped by area once per batch and each group runs one matmul (a loop over the K areas,
never over samples; no K-times dense compute) -- or, in the general engine with ``grouped`` on (by
default on CUDA), all groups in one ``torch.nn.functional.grouped_mm`` for the forward and two for the
backward (:class:`_GroupedAreas`), with no Python loop over areas. The same grouping serves the local weight update:
``dW_k = delta_k^T x_k`` for the samples routed to area k. Areas that no sample chose get no gradient
at all (``.grad`` stays ``None``), so no optimiser -- momentum, Adam moments, weight decay -- touches
them: their update is exactly zero.

Warm-up (``warmup_steps``, set by the sal rule from its ``warmup`` share of the run): for the first
training steps every area gets the whole batch's update ``dW = delta^T x`` (routing is still computed
and the router still learns); with ``shared_init`` all areas start as one copy and stay one copy
through any optimiser until the warm-up ends. The step clock is saved with the module's state.

The router's projection learns locally from the layer's own input: it is pulled towards the
prototype each sample chose (routing sharpens and stays stable, since the targets are frozen) and
pushed towards balanced use of the areas by a Switch-style load term
``K * sum_k f_k * mean_b softmax(cos/tau)_k`` (f_k the fraction of the batch routed to k). Without the
balance term areas die; usage per area is counted for the epoch metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import NeurosalError
from .layers import accumulate_grad


@dataclass
class Route:
    """What a forward pass decided: the area of every sample and the grouping that follows from it."""

    area: torch.Tensor  # (B,) chosen area per sample
    order: torch.Tensor  # (B,) sample indices sorted by area (stable)
    counts: list[int]  # samples per area, length K
    counts_t: torch.Tensor | None = None  # the same on the device (K,)
    z: torch.Tensor | None = None  # (B, route_dim) projection into the routing space
    cos: torch.Tensor | None = None  # (B, K) cosine to each prototype
    x: torch.Tensor | None = None  # (B, n_in) what was routed (time-averaged for spike trains)
    #: the routing centre z was taken from (the buffer moves on: another forward before this one's
    #: backward -- two inputs, one loss -- must not change this forward's router gradient)
    center: torch.Tensor | None = None


class AreaLinear(nn.Module):
    def __init__(self, n_in: int, n_out: int, areas: int = 4, route_dim: int = 16,
                 balance: float = 0.1, temperature: float = 0.1, center_momentum: float = 0.01,
                 tokens: bool = False, *, shared_init: bool = False, warmup_steps: int = 0):
        super().__init__()
        #: route every position of a ``(B, T, n_in)`` input on its own (transformer FFNs, a top-1
        #: mixture of experts); False: a 3-d input is a spike train, routed by its time average
        self.tokens = tokens
        if areas < 1:
            raise NeurosalError(f"SAL needs at least one area per layer, got {areas}")
        if route_dim < 1:
            raise NeurosalError(f"SAL routing dimension must be >= 1, got {route_dim}")
        self.in_features, self.out_features, self.areas = n_in, n_out, areas
        self.route_dim = route_dim
        self.balance, self.temperature, self.center_momentum = balance, temperature, center_momentum
        if warmup_steps < 0:
            raise NeurosalError(f"SAL warm-up steps must be >= 0, got {warmup_steps}")
        # torch's default init, per area -- or one draw copied into every area (``shared_init``)
        dense = [nn.Linear(n_in, n_out) for _ in range(1 if shared_init else areas)]
        self.area_weight = nn.ParameterList([nn.Parameter(dense[0 if shared_init else k].weight.detach().clone())
                                             for k in range(areas)])
        self.area_bias = nn.ParameterList([nn.Parameter(dense[0 if shared_init else k].bias.detach().clone())
                                           for k in range(areas)])
        #: training steps (batches) before which all areas learn together from every sample
        self.warmup_steps = int(warmup_steps)
        #: training steps so far (saved with the module's state: a resumed run continues its warm-up)
        self.steps = 0
        self.loss_scale = 1.0  # see _learn_router
        self.router = nn.Parameter(torch.randn(route_dim, n_in) / math.sqrt(n_in))
        protos = torch.randn(max(route_dim, areas), max(route_dim, areas))
        if areas <= route_dim:
            protos = torch.linalg.qr(protos)[0][:areas, :route_dim]  # orthonormal, frozen
        else:
            protos = F.normalize(torch.randn(areas, route_dim), dim=1)
        self.register_buffer("prototypes", protos.contiguous())
        self.register_buffer("center", torch.zeros(n_in))
        self.register_buffer("center_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("usage", torch.zeros(areas, dtype=torch.long), persistent=False)
        #: "auto" (one grouped matmul on CUDA), "on", "off": how :meth:`forward` runs the areas
        self.grouped = "auto"

    @property
    def weight(self) -> torch.Tensor:
        """All areas stacked, ``(K, n_out, n_in)`` (for export and reference computations)."""
        return torch.stack(list(self.area_weight))

    @property
    def bias_stacked(self) -> torch.Tensor:
        return torch.stack(list(self.area_bias))

    # ------------------------------------------------------------------ warm-up
    @property
    def joint(self) -> bool:
        """Whether the next training step is a warm-up step: every area learns from the whole batch."""
        return self.areas > 1 and self.steps < self.warmup_steps

    #: the warm-up clock's entries in the state dict (0-d int64 tensors: a state dict of tensors only, as
    #: safetensors and EMA helpers that walk its values expect; plain ints on the module, read every step)
    CLOCK = ("steps", "warmup_steps")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self.CLOCK:
            destination[prefix + name] = torch.tensor(getattr(self, name), dtype=torch.long)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        legacy = state_dict.get(prefix + "_extra_state")  # written before the clock was tensors
        if not (isinstance(legacy, dict) and set(legacy) == set(self.CLOCK)):
            legacy = None
        if all(prefix + n in state_dict for n in self.CLOCK):
            self.steps, self.warmup_steps = (int(state_dict[prefix + n]) for n in self.CLOCK)
        elif legacy is not None:
            self.steps, self.warmup_steps = int(legacy["steps"]), int(legacy["warmup_steps"])
        else:  # written before the warm-up existed: no steps recorded, no warm-up left
            self.steps, self.warmup_steps = 0, 0
        # (a subclass's extra state -- an analog area layer's older checkpoints -- may set it after this)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for key in [prefix + n for n in self.CLOCK] + ([prefix + "_extra_state"] if legacy is not None else []):
            if key in unexpected_keys:
                unexpected_keys.remove(key)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, areas={self.areas}, route_dim={self.router.shape[0]}"

    # ------------------------------------------------------------------ routing
    def scores(self, x: torch.Tensor, router: torch.Tensor | None = None):
        """(z, cos): z = R (x - mu) without materialising x - mu, and its cosine to each prototype.
        ``router`` replaces R (the differentiable reference of the router's objective uses it)."""
        r = self.router if router is None else router
        z = torch.addmm(-(r @ self.center), x, r.t())
        return z, F.normalize(z, dim=1) @ self.prototypes.t()

    def route_scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores(x)[1]

    @torch.no_grad()
    def route(self, x: torch.Tensor) -> Route:
        if x.dim() not in (2, 3) or x.shape[-1] != self.in_features:
            raise NeurosalError(f"AreaLinear expects (batch, [time,] {self.in_features}) inputs, got {tuple(x.shape)}")
        if x.dim() == 3:
            x = x.mean(1)
        if self.training:
            mean = x.mean(0).to(self.center.dtype)  # autocast may hand us bf16
            # the first batch sets the centre, later ones move it; decided on the device (no host sync)
            weight = torch.where(self.center_ready, self.center_momentum, 1.0).to(self.center.dtype)
            self.center.lerp_(mean, weight)
            self.center_ready.fill_(True)
        if self.areas == 1:
            if self.training:
                self.usage += len(x)  # the one area serves every sample (it is not dead)
            area = torch.zeros(len(x), dtype=torch.long, device=x.device)
            return Route(area, torch.arange(len(x), device=x.device), [len(x)], x=x)
        z, cos = self.scores(x)
        area = cos.argmax(1)
        counts = torch.bincount(area, minlength=self.areas)
        if self.training:
            self.usage += counts
        # counts.tolist() is this layer's one host sync per step: the grouping's split sizes
        return Route(area, torch.argsort(area, stable=True), counts.tolist(), counts, z, cos, x,
                     self.center.clone())

    # ------------------------------------------------------------------ grouped compute
    def _grouped(self, rows: torch.Tensor, route: Route, fn, width: int) -> torch.Tensor:
        """Apply ``fn(k, rows_of_area_k)`` per area on the area-sorted rows; return in sample order.
        Areas without rows are not called, so under autograd their weights get no gradient either."""
        if self.areas == 1:
            return fn(0, rows)
        parts = rows.index_select(0, route.order).split(route.counts)
        out_sorted = torch.cat([fn(k, p) if len(p) else p.new_zeros((0, *p.shape[1:-1], width))
                                for k, p in enumerate(parts)])
        out = torch.empty_like(out_sorted)
        out.index_copy_(0, route.order, out_sorted)
        return out

    def area_forward(self, k: int, rows: torch.Tensor) -> torch.Tensor:
        """Area k's output for the rows routed to it (a substrate may override this)."""
        return F.linear(rows, self.area_weight[k], self.area_bias[k])

    def forward_ctx(self, x: torch.Tensor):
        route = self.route(x)
        if self._use_grouped(x):
            return _GroupedAreas.apply(x, route, *self.area_weight, *self.area_bias), route
        return self._grouped(x, route, self.area_forward, self.out_features), route

    def _use_grouped(self, x: torch.Tensor) -> bool:
        if self.areas == 1 or type(self).area_forward is not AreaLinear.area_forward:
            return False  # one area: a plain matmul; a substrate's own area_forward: its loop
        if self.area_weight[0].dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False  # grouped_mm has no float64 kernels
        if self.in_features % 8 or self.out_features % 8:
            return False  # its kernels want 16-byte aligned rows
        if self.grouped == "auto":
            return x.is_cuda and hasattr(F, "grouped_mm")
        return self.grouped == "on"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Under autograd (the general engine) the chosen areas get their gradient from autograd and
        the router learns from its local objective when the backward pass reaches this layer; during the
        warm-up every area gets the whole batch's gradient (:class:`_JointAreas`)."""
        lead = x.shape[:-1]
        if self.tokens:
            x = x.reshape(-1, self.in_features)
        # a backward may follow whenever autograd records, also in eval mode (frozen BatchNorm statistics
        # while fine-tuning): the module's training flag governs running statistics only
        learning = torch.is_grad_enabled()
        if learning and self.joint:
            route = self.route(x)
            out = _JointAreas.apply(x, self, route, *self.area_weight, *self.area_bias)
        else:
            out, route = self.forward_ctx(x)
        if learning and out.requires_grad:
            out.register_hook(lambda g: self._backward_step(route))
        return out.reshape(*lead, self.out_features) if self.tokens else out

    def _backward_step(self, route: Route) -> None:
        """When a backward pass reaches this layer: one training step more on the warm-up clock (it
        counts updates, not forward passes: an evaluation forward under autograd moves nothing), and
        the router learns from its local objective."""
        self.steps += 1
        if self.areas > 1:
            self._learn_router(route.x, route)

    def feedback_input(self, delta: torch.Tensor, weight: torch.Tensor, route: Route) -> torch.Tensor:
        """Signal on the input through per-area matrices ``weight`` (K, n_out, n_in)."""
        return self._grouped(delta, route, lambda k, p: p @ weight[k], self.in_features)

    # ------------------------------------------------------------------ local plasticity
    def local_update(self, x: torch.Tensor, delta: torch.Tensor, route: Route) -> None:
        joint = self.joint
        self.steps += 1
        if joint:  # warm-up: every area learns from the whole batch (all areas stay one copy if shared)
            d2, x2 = delta.reshape(-1, self.out_features), x.reshape(-1, self.in_features)
            gw, gb = d2.t() @ x2, d2.sum(0)
            for k, (w, b) in enumerate(zip(self.area_weight, self.area_bias)):  # own storage per area: an
                accumulate_grad(w, gw if k == 0 else gw.clone())  # in-place clip or accumulation of one
                accumulate_grad(b, gb if k == 0 else gb.clone())  # area's grad must not touch another's
            self._learn_router(route.x, route)
            return
        if self.areas == 1:
            parts_x, parts_d = [x], [delta]
        else:
            parts_x = x.index_select(0, route.order).split(route.counts)
            parts_d = delta.index_select(0, route.order).split(route.counts)
        for k, (xk, dk) in enumerate(zip(parts_x, parts_d)):
            if route.counts[k] == 0:
                continue  # untouched: .grad stays None, so no optimiser moves this area
            dk, xk = dk.reshape(-1, self.out_features), xk.reshape(-1, self.in_features)
            accumulate_grad(self.area_weight[k], dk.t() @ xk)
            accumulate_grad(self.area_bias[k], dk.sum(0))
        if self.areas > 1:
            self._learn_router(route.x, route)

    def router_loss(self, x: torch.Tensor, route: Route, router: torch.Tensor) -> torch.Tensor:
        """The router's local objective (pull to the chosen prototype + load balance), differentiable
        in ``router``; training uses its closed-form gradient :meth:`router_grad`."""
        cos = self.scores(x, router)[1]
        pull = -cos.gather(1, route.area[:, None]).mean()
        frac = route.counts_t.to(cos.dtype) / len(x)
        soft = torch.softmax(cos / self.temperature, dim=1).mean(0)
        return pull + self.balance * self.areas * (frac * soft).sum()

    def router_grad(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        """d router_loss / d R in closed form, reusing the forward pass's z and cosines."""
        dt = self.router.dtype  # autocast may have computed the routing in bf16: the update in full precision
        n, z, cos, x = len(x), route.z.to(dt), route.cos.to(dt), x.to(dt)
        frac = route.counts_t.to(cos.dtype) / n
        s = torch.softmax(cos / self.temperature, dim=1)
        c = (self.balance * self.areas / n) * frac  # d balance / d soft_bk, per area
        g_cos = s * (c - (s * c).sum(1, keepdim=True)) / self.temperature
        g_cos.scatter_add_(1, route.area[:, None], torch.full((n, 1), -1.0 / n, dtype=cos.dtype, device=cos.device))
        norm = z.norm(dim=1, keepdim=True).clamp_min(1e-12)
        u = z / norm
        g_u = g_cos @ self.prototypes
        g_z = (g_u - u * (u * g_u).sum(1, keepdim=True)) / norm
        center = self.center if route.center is None else route.center
        return g_z.t() @ x - torch.outer(g_z.sum(0), center.to(dt))

    def _learn_router(self, x: torch.Tensor, route: Route) -> None:
        with torch.no_grad():
            g = self.router_grad(x, route)
            # the routing objective in the units of the loss beside it (a GradScaler's scale, 1/k for
            # accumulated micro-batches: Rule.loss_scale, set per forward by the wrapper)
            accumulate_grad(self.router, g if self.loss_scale == 1.0 else g * self.loss_scale)

    def take_usage(self) -> list[int]:
        counts = self.usage.tolist()
        self.usage.zero_()
        return counts


class _GroupedAreas(torch.autograd.Function):
    """All areas of one layer in one grouped matmul: rows sorted by area, ``offs`` the groups' ends.

    forward ``y_i = W_k(i) x_i + b_k(i)``; backward ``dx = dy W_k`` (one grouped matmul) and
    ``dW_k = dy_k^T x_k`` (one grouped matmul over the jagged row groups), ``db_k`` by index-add. An area
    no row chose gets ``None``, so ``.grad`` stays ``None`` and no optimiser touches it, as in the
    per-area loop (deciding that reads the counts on the host, as the loop's split does).
    """

    @staticmethod
    def forward(ctx, x, route: Route, *params):
        k = len(params) // 2
        weights, biases = params[:k], params[k:]
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        w = torch.stack([p.to(dtype) for p in weights])  # (K, out, in)
        xs = x.to(dtype).index_select(0, route.order).contiguous()
        offs = torch.cumsum(route.counts_t, 0).to(torch.int32)
        ys = F.grouped_mm(xs, w.transpose(1, 2), offs=offs)
        ys = ys + torch.stack([b.to(dtype) for b in biases])[route.area.index_select(0, route.order)]
        out = torch.empty_like(ys)
        out.index_copy_(0, route.order, ys)
        ctx.save_for_backward(xs, w, offs, route.order, route.area)
        ctx.counts, ctx.in_dtype = route.counts, x.dtype
        ctx.param_dtypes = [p.dtype for p in params]
        return out

    @staticmethod
    def backward(ctx, g):
        xs, w, offs, order, area = ctx.saved_tensors
        gs = g.to(w.dtype).index_select(0, order).contiguous()
        gx_sorted = F.grouped_mm(gs, w, offs=offs)  # (N, in)
        gx = torch.empty_like(gx_sorted)
        gx.index_copy_(0, order, gx_sorted)
        pad = -len(gs) % 8  # the jagged (token) dimension's stride must be a multiple of 16 bytes
        gt = F.pad(gs.t(), (0, pad)).contiguous() if pad else gs.t().contiguous()
        gw = F.grouped_mm(gt, F.pad(xs, (0, 0, 0, pad)) if pad else xs, offs=offs)  # (K, out, in)
        gb = torch.zeros(w.shape[0], w.shape[1], dtype=g.dtype, device=g.device).index_add_(0, area, g)
        k = w.shape[0]
        used = [c > 0 for c in ctx.counts]
        dts = ctx.param_dtypes
        grads_w = [gw[i].to(dts[i]) if used[i] else None for i in range(k)]
        grads_b = [gb[i].to(dts[k + i]) if used[i] else None for i in range(k)]
        return (gx.to(ctx.in_dtype), None, *grads_w, *grads_b)



class _JointAreas(torch.autograd.Function):
    """The warm-up step under autograd: the forward is the routed one (each row through its own area),
    the input gradient goes back through the same areas, and every area's weight gets the whole batch's
    update ``dW = g^T x``, ``db = sum g`` -- all areas learn together (from one shared initialisation
    they stay one copy), while the router already learns its routing."""

    @staticmethod
    def forward(ctx, x, layer: AreaLinear, route: Route, *params):
        if layer._use_grouped(x):  # the forward as one grouped matmul (CUDA); the backward loops over areas
            out = _GroupedAreas.apply(x, route, *params)
        else:
            out = layer._grouped(x, route, layer.area_forward, layer.out_features)
        ctx.save_for_backward(x)
        ctx.layer, ctx.route = layer, route
        ctx.param_dtypes = [p.dtype for p in params]
        return out

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        layer, route = ctx.layer, ctx.route
        weights = list(layer.area_weight)
        gx = layer._grouped(g, route, lambda k, rows: rows @ weights[k].to(rows.dtype), layer.in_features)
        g2 = g.reshape(-1, layer.out_features)
        gw = g2.t() @ x.reshape(-1, layer.in_features).to(g.dtype)
        gb = g2.sum(0)
        k = layer.areas
        dts = ctx.param_dtypes
        # a separate tensor per area (as in the loop): autograd may hand each one over as that area's .grad
        return (gx.to(x.dtype), None, None, *[gw.to(dts[i], copy=i > 0) for i in range(k)],
                *[gb.to(dts[k + i], copy=i > 0) for i in range(k)])
