"""A crossbar of differential pairs: weight = (G+ - G-) / R_nominal * w_max, programmed by pulses.

Programming a requested weight change ``dw`` (any shape, one entry per pair):

1. pulse count ``p = |dw| / w_max * N`` -- deterministic rounding or unbiased stochastic rounding
   (``pulses``), optionally capped (``max_pulses``);
2. *bidirectional*: ``dw > 0`` potentiates G+ by ceil(p/2) and depresses G- by floor(p/2) (mirrored for
   ``dw < 0``) -- both devices move both ways, so an asymmetric device drifts;
   *unidirectional* (Lim et al.): only potentiation pulses, to G+ for ``dw > 0`` and to G- for
   ``dw < 0``; when a device passes ``refresh_at`` of its range, both devices of the pair are reset to
   their lower bound and the pair's weight is re-programmed onto one device by potentiation pulses;
3. cycle-to-cycle noise: each pulse adds N(0, (ctoc * s)^2), summed in closed form over the pulses;
4. every conductance is clamped to its device's own bounds, which lie inside [g_min, g_max].

Device-to-device variation (step-size spread, bound shrink, drift exponent) is drawn once, from the
array's own generator, when the array is made. All randomness comes from that generator, whose state
is part of the array's state: same seed, same result, and checkpoints resume bit for bit.
"""

from __future__ import annotations

import math

import torch

from .devices import DeviceConfig, Response


class DifferentialArray:
    def __init__(self, cfg: DeviceConfig, shape, w_max: float, generator: torch.Generator,
                 device=None, dtype=torch.float32):
        self.cfg = cfg.validate()
        self.shape = tuple(shape)
        self.w_max = float(w_max)
        self.gen = generator
        kw = dict(device=device, dtype=dtype)
        r = cfg.g_max - cfg.g_min
        self.r_nominal = r

        def spread(std):
            if std == 0:
                return torch.zeros((2, *self.shape), **kw)
            return torch.randn((2, *self.shape), generator=generator).to(**kw) * std

        # index 0: G+, index 1: G-
        shrink_lo = spread(cfg.dtod_bounds).abs()
        shrink_hi = spread(cfg.dtod_bounds).abs()
        self.lo = cfg.g_min + shrink_lo * r
        self.hi = cfg.g_max - shrink_hi * r
        self.step_scale = (1 + spread(cfg.dtod_step)).clamp_min(0.05)
        self.nu = (cfg.drift_nu * (1 + spread(cfg.drift_nu_dtod))).clamp_min(0)
        self.g = self.lo.clone()
        self.resets = 0  # pairs refreshed so far (unidirectional)
        self._bind()

    def _bind(self) -> None:
        """Precompute each device's response constants (after creation or loading state)."""
        self.response = [Response(self.cfg, self.lo[i], self.hi[i], self.step_scale[i]) for i in (0, 1)]

    # ------------------------------------------------------------------ reading
    def weights(self, noisy: bool = False) -> torch.Tensor:
        w = (self.g[0] - self.g[1]) * (self.w_max / self.r_nominal)
        if noisy and self.cfg.read_noise > 0:
            # independent read noise on G+ and G- (std sigma each) is one draw of std sigma*sqrt(2)
            sigma = self.cfg.read_noise * 2 ** 0.5 * self.w_max
            w = w + self._randn(w.shape) * sigma
        return w

    # ------------------------------------------------------------------ randomness
    def _randn(self, shape):
        return torch.randn(shape, generator=self.gen).to(self.g.device, self.g.dtype)

    def _rand(self, shape):
        return torch.rand(shape, generator=self.gen).to(self.g.device, self.g.dtype)

    # ------------------------------------------------------------------ programming
    def pulse_counts(self, dw: torch.Tensor) -> torch.Tensor:
        """Non-negative pulse counts for a requested change (the sign is applied by the caller)."""
        p = dw.abs() * (self.cfg.levels / self.w_max)
        if self.cfg.pulses == "stochastic":
            base = p.floor()
            p = base + (self._rand(p.shape) < (p - base)).to(p.dtype)
        else:
            p = torch.round(p)
        if self.cfg.max_pulses:
            p = p.clamp(max=self.cfg.max_pulses)
        return p

    def _step(self, i: int, dp: torch.Tensor) -> None:
        """Device i of every pair after signed pulse counts dp (> 0 potentiation, < 0 depression)."""
        z = self._randn(dp.shape) if self.cfg.ctoc > 0 else None  # cycle-to-cycle noise source
        self.g[i] = self.response[i].step_signed(self.g[i], dp, z)

    def apply(self, dw: torch.Tensor) -> torch.Tensor:
        """Program a requested weight change; returns the pulse counts used (before refresh)."""
        return self.apply_pulses(torch.sign(dw) * self.pulse_counts(dw))

    def coincidence_pulses(self, x: torch.Tensor, d: torch.Tensor, lr: float) -> torch.Tensor:
        """Signed pulse counts for the update ``-lr * d^T x`` by stochastic pulse coincidence.

        Each sample drives a train of ``bl`` slots per row (input i fires with probability |x_i| / max|x|)
        and per column (error j with probability c |d_j| / max|d|); a device gets a pulse where both fire,
        in the direction of sign(-x_i d_j). With c = lr max|x| max|d| / (dw_min bl) the expected count is
        exactly the requested change in pulses; ``bl`` grows when one update needs more than bl pulses.
        """
        x = x.reshape(-1, x.shape[-1])
        d = d.reshape(-1, d.shape[-1])
        xmax, dmax = x.abs().max(), d.abs().max()
        if xmax == 0 or dmax == 0 or lr == 0:
            return torch.zeros(self.shape, dtype=self.g.dtype, device=self.g.device)
        need = float(lr * xmax * dmax * self.cfg.levels / self.w_max)  # pulses per slot at full activity
        bl = max(self.cfg.bl, math.ceil(need))
        c = need / bl
        px = (x.abs() / xmax).repeat(bl, 1)
        pd = (d.abs() / dmax * c).repeat(bl, 1)
        xs = (self._rand(px.shape) < px).to(x.dtype) * torch.sign(x).repeat(bl, 1)
        ds = (self._rand(pd.shape) < pd).to(d.dtype) * torch.sign(-d).repeat(bl, 1)
        return ds.t() @ xs

    def apply_pulses(self, sp: torch.Tensor) -> torch.Tensor:
        """Apply signed pulse counts (> 0: raise the weight); returns their magnitudes."""
        p = sp.abs()
        sgn = torch.sign(sp)
        if self.cfg.update == "unidirectional":
            self._step(0, p * (sgn > 0))
            self._step(1, p * (sgn < 0))
            self.refresh()
        else:  # the device that should rise gets ceil(p/2) up-pulses, its partner floor(p/2) down-pulses
            a = torch.ceil(p / 2)
            self._step(0, sgn * a)
            self._step(1, sgn * (a - p))
        return p

    def refresh(self) -> int:
        """Reset saturated pairs and re-program their weight by potentiation pulses (unidirectional)."""
        level = self.lo + self.cfg.refresh_at * (self.hi - self.lo)
        full = (self.g >= level).any(0)
        n = int(full.sum())
        if n:
            w = self.weights()
            self.g[0] = torch.where(full, self.lo[0], self.g[0])
            self.g[1] = torch.where(full, self.lo[1], self.g[1])
            target = torch.where(full, w, torch.zeros_like(w))
            p = self.pulse_counts(target)  # zero outside the refreshed pairs: they do not move
            self._step(0, p * (target > 0))
            self._step(1, p * (target < 0))
            self.resets += n
        return n

    def program(self, w: torch.Tensor) -> None:
        """Write weights onto the pairs by pulses.

        Unidirectional: both devices reset to their lower bound, then potentiation pulses onto one.
        Bidirectional: both devices set to the middle of their range, then the normal update, so each
        device has room to move both ways.
        """
        if self.cfg.update == "unidirectional":
            self.g = self.lo.clone()
            p = self.pulse_counts(w)
            self._step(0, p * (w > 0))
            self._step(1, p * (w < 0))
        else:
            self.g = (self.lo + self.hi) / 2
            self.apply(w)

    def drift(self, t: float, t0: float = 1.0) -> None:
        """Conductance drift after time t (PCM-like): G - g_lo shrinks by (t / t0)^-nu."""
        if t <= t0:
            return
        self.g = self.lo + (self.g - self.lo) * (t / t0) ** (-self.nu)

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        return {"g": self.g, "lo": self.lo, "hi": self.hi, "step_scale": self.step_scale, "nu": self.nu,
                "resets": self.resets, "rng": self.gen.get_state()}

    def load(self, st: dict) -> None:
        dev, dt = self.g.device, self.g.dtype
        for k in ("g", "lo", "hi", "step_scale", "nu"):
            setattr(self, k, st[k].to(dev, dt))
        self.resets = int(st["resets"])
        self.gen.set_state(st["rng"])
        self._bind()
