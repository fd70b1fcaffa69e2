"""A crossbar of differential pairs: weight = (G+ - G-) / R_nominal * w_max, programmed by pulses.

Programming a requested weight change ``dw`` (any shape, one entry per pair):

1. pulse count ``p = |dw| / dw_pulse`` -- deterministic rounding or unbiased stochastic rounding
   (``pulses``), optionally capped (``max_pulses``). ``dw_pulse`` is the weight change one pulse makes
   *at the operating point* (see below), so requested and delivered changes agree in expectation there;
2. *bidirectional*: ``dw > 0`` potentiates G+ and depresses G- by floor(p/2) pulses each (mirrored for
   ``dw < 0``); an odd pulse goes to the device with more room left in the direction it would move
   (ties: the device that should rise). Single-pulse updates -- most updates -- thus move both devices
   and keep the pair near mid-range, where the full weight range +-w_max stays reachable;
   *unidirectional* (Lim et al.): only potentiation pulses, to G+ for ``dw > 0`` and to G- for
   ``dw < 0``; when a device passes ``refresh_at`` of its range, both devices of the pair are reset to
   their lower bound and the pair's weight is re-programmed onto one device by potentiation pulses;
3. cycle-to-cycle noise: each pulse adds N(0, (ctoc * s)^2), summed in closed form over the pulses;
   drawn only for the pairs that receive pulses (an update pulses ~10 % of them; see ``_pulse_noise``);
4. every conductance is clamped to its device's own bounds, which lie inside [g_min, g_max].

**Step convention.** ``levels`` N fixes the device physics (for the linear device: N steps of R/N from
bound to bound; see :mod:`hw_models.devices` for the others). The periphery's pulse size is calibrated
at the pair's operating point, as aihwkit defines ``dw_min`` at w = 0: mid-range of both devices for
bidirectional pairs (the mean of the nominal device's up-step and down-step there), the lower bound for
unidirectional ones (its first up-step). A soft-bounds device at mid-range moves half a nominal step per
pulse, so it gets twice the pulses; away from the operating point a nonlinear device delivers more or
less than requested, as real arrays do. Initial weights are written by pulses and then checked by
read-back (``write_verify`` rounds of read, compare, correct), as real arrays program.

Device-to-device variation (step-size spread, bound shrink, drift exponent) is drawn once, from the
array's own generator, when the array is made. All randomness comes from that generator, which lives on
the array's device (no host-device copy per update) and whose state is part of the array's state: same
seed, same result, and checkpoints resume bit for bit.
"""

from __future__ import annotations

import hashlib
import math

import torch

from neurosal.errors import NeurosalError

from .devices import DeviceConfig, Response, compile_kernel, relaxation_shape, step_kernel


def _seed_from_state(state: torch.Tensor) -> int:
    return int.from_bytes(hashlib.sha256(state.cpu().numpy().tobytes()).digest()[:8], "little")


def device_generator(seed_or_gen: int | torch.Generator, device) -> torch.Generator:
    """A generator on ``device`` (CUDA draws stay on the GPU), from a seed or another generator's seed."""
    device = torch.device(device if device is not None else "cpu")
    if isinstance(seed_or_gen, torch.Generator):
        if seed_or_gen.device == device:
            return seed_or_gen
        seed_or_gen = seed_or_gen.initial_seed()
    return torch.Generator(device=device).manual_seed(int(seed_or_gen))


class DifferentialArray:
    def __init__(self, cfg: DeviceConfig, shape, w_max: float, generator: int | torch.Generator,
                 device=None, dtype=torch.float32):
        self.cfg = cfg.validate()
        self.shape = tuple(shape)
        self.w_max = float(w_max)
        self.gen = device_generator(generator, device)
        #: read noise of inference reads (no autograd: evaluation): a stream of its own, so how often and
        #: on how much you evaluate does not change what training draws (same seed, same training run)
        self.read_gen = torch.Generator(device=self.gen.device).manual_seed(
            _seed_from_state(self.gen.get_state()) ^ 0x5EED)
        kw = dict(device=self.gen.device, dtype=dtype)
        r = cfg.g_max - cfg.g_min
        self.r_nominal = r
        self.dw_pulse = operating_step(cfg) * self.w_max / r  # weight change of one pulse, see above
        self.clip = torch.zeros(2, dtype=torch.float64, device=self.gen.device)  # coincidence: lost, asked

        def spread(std):
            if std == 0:
                return torch.zeros((2, *self.shape), **kw)
            return torch.randn((2, *self.shape), generator=self.gen, **kw) * std

        # index 0: G+, index 1: G-
        shrink_lo = spread(cfg.dtod_bounds).abs()
        shrink_hi = spread(cfg.dtod_bounds).abs()
        self.lo = cfg.g_min + shrink_lo * r
        self.hi = cfg.g_max - shrink_hi * r
        self.step_scale = (1 + spread(cfg.dtod_step)).clamp_min(0.05)
        self.nu = (cfg.drift_nu * (1 + spread(cfg.drift_nu_dtod))).clamp_min(0)
        self.g = self.lo.clone()
        # drift: the programmed conductances and the drifted tensor made from them (see drift)
        self._drift_base = self._drift_g = None
        self._drift_version = 0
        self.resets = 0  # pairs refreshed so far (unidirectional)
        self._bind()

    def set_w_max(self, w_max: float) -> None:
        """The weight the full conductance difference stands for (a loaded state's)."""
        self.w_max = float(w_max)
        self.dw_pulse = operating_step(self.cfg) * self.w_max / self.r_nominal
        self._fused_consts = None

    def _bind(self) -> None:
        """Precompute each device's response constants (after creation or loading state)."""
        self.response = [Response(self.cfg, self.lo[i], self.hi[i], self.step_scale[i]) for i in (0, 1)]
        # odd-pulse choice in closed form: with u = G+ + G-, for an increase G+ has at least G-'s room
        # iff u <= hi+ + lo-; for a decrease G+ has more room iff u > lo+ + hi-
        self._odd_up = self.hi[0] + self.lo[1]
        self._odd_down = self.lo[0] + self.hi[1]
        self._fused_consts = None

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
        return torch.randn(shape, generator=self.gen, device=self.g.device, dtype=self.g.dtype)

    def _randn_read(self, shape):
        """Read noise for an inference read (evaluation): from :attr:`read_gen`."""
        return torch.randn(shape, generator=self.read_gen, device=self.g.device, dtype=self.g.dtype)

    def _pulse_noise(self, counts: torch.Tensor, rows: int = 2) -> torch.Tensor | None:
        """Cycle-to-cycle normals, ``(rows, *counts.shape)`` (row 0 for G+, row 1 for G-; one row serves
        both devices of a unidirectional pair, where only one device per pair moves), standard normal at
        least where a pair gets pulses (``counts > 0``); None when the device has no cycle-to-cycle noise.

        A device that gets no pulse has no cycle-to-cycle noise (the step multiplies its draw by
        sqrt(0)), so on the CPU, where a normal costs ~3.5 ns, only the pulsed pairs draw when they are
        few: under an optimiser's small steps ~10 % of the pairs pulse per update, and dense draws were a
        third of an rram-like training step. The draws then go to the pulsed pairs row by row in index
        order, and the other entries are exactly 0; an update without any pulse draws nothing. Where more
        than 40 % of the pairs pulse (coincidence trains), finding and filling them costs more than it
        saves (measured crossover ~45 %), and every pair draws, as on a GPU (drawing is cheap there and
        counting the pulsed pairs would stall on the host)."""
        if self.cfg.ctoc <= 0:
            return None
        shape = (rows, *counts.shape)
        if counts.device.type != "cpu":
            return self._randn(shape)
        flat = counts.reshape(-1)
        if int(torch.count_nonzero(flat)) > 0.4 * flat.numel():  # counts are >= 0: nonzero means pulsed
            return self._randn(shape)
        idx = (flat > 0).nonzero().squeeze(1)  # (bool nonzero is faster than float's)
        z = torch.zeros((rows, flat.numel()), dtype=self.g.dtype, device=self.g.device)
        if idx.numel():
            drawn = self._randn((rows, idx.numel()))
            for r in range(rows):
                z[r][idx] = drawn[r]
        return z.view(shape)

    def _fires(self, p: torch.Tensor, lead: tuple[int, ...] = (), dtype=torch.bool) -> torch.Tensor:
        """Bernoulli draws of shape ``lead + p.shape`` (``p`` broadcast over the leading axes), 1 with
        probability ``p`` resolved to 1/65536: exactly ``round(p * 65536) / 65536`` for ``0 <= p <= 1``
        (``p = 0`` never fires, ``p = 1`` always does). ``dtype``: of the 0/1 result.

        Each draw takes 16 random bits: one 64-bit word from the generator gives four, which is 2-4x
        faster than one float uniform per draw on a CPU generator (the pulse trains of the coincidence
        mode need bl * batch * width draws per layer and step), and the comparison stays in 16-bit
        integers. The resolution moves an expected pulse count by at most 1.5e-5 pulses per slot.
        """
        shape = (*lead, *p.shape)
        h = self._bits(shape)
        q = torch.round(p * 65536)
        out = torch.lt(h, (q - 32768).clamp(-32768, 32767).to(torch.int16),
                       out=torch.empty(shape, dtype=dtype, device=h.device))
        # 65537 outcomes do not fit 16 bits: a certain draw (q = 65536) would miss h = 32767 (the check
        # is skipped where it is free to ask whether any draw is certain: on the CPU)
        certain = q >= 65536
        if certain.device.type != "cpu" or bool(certain.any()):
            out.logical_or_(certain)
        return out

    def _bits(self, shape) -> torch.Tensor:
        """16 random bits per entry as int16 (``h + 32768`` uniform on 0..65535), four per 64-bit draw."""
        n = math.prod(shape)
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=self.gen.device)
        words.random_(-2 ** 63, None, generator=self.gen)  # every 64-bit pattern equally likely
        return words.view(torch.int16)[:n].view(shape)

    # ------------------------------------------------------------------ programming
    def pulse_counts(self, dw: torch.Tensor) -> torch.Tensor:
        """Non-negative pulse counts for a requested change (the sign is applied by the caller)."""
        p = dw.abs() / self.dw_pulse
        if self.cfg.pulses == "stochastic":
            base = p.floor()
            p = base + self._fires(p - base, dtype=p.dtype)
        else:
            p = torch.round(p)
        if self.cfg.max_pulses:
            p = p.clamp(max=self.cfg.max_pulses)
        return p

    def _step(self, i: int, dp: torch.Tensor, z: torch.Tensor | None) -> None:
        """Device i of every pair after signed pulse counts dp (> 0 potentiation, < 0 depression); ``z``
        its cycle-to-cycle normals (:meth:`_pulse_noise`) or None."""
        self.g[i] = self.response[i].step_signed(self.g[i], dp, z)

    def _step_one_device(self, p: torch.Tensor, to_plus: torch.Tensor) -> None:
        """Unidirectional: ``p`` potentiation pulses to G+ where ``to_plus``, to G- elsewhere."""
        z = self._pulse_noise(p, rows=1)
        z = z[0] if z is not None else None
        self._step(0, p * to_plus, z)
        self._step(1, p * ~to_plus, z)

    def apply(self, dw: torch.Tensor) -> torch.Tensor:
        """Program a requested weight change; returns the pulse counts used (before refresh)."""
        if self._fusable:
            return self._apply_fused(dw)
        return self.apply_pulses(torch.sign(dw) * self.pulse_counts(dw))

    def step_to(self, target: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
        """Program the change ``target - held`` (an optimiser's step from the weights last read) and return
        the weights read back. A NaN/Inf change is refused before any device moves."""
        if not self._fusable:
            dw = target - held
            check_request(dw)
            self.apply(dw)
            return self.weights()
        _, w = self._sync(target.reshape(-1), held.reshape(-1))
        return w.view(self.shape)

    def _sync(self, target: torch.Tensor, held: torch.Tensor):
        """The fused update of the change ``target - held`` (flat); updates G and returns the pulse counts
        and the weights read back. The draws come from the array's generator in the eager order: rounding
        bits, then the pulsed pairs' cycle-to-cycle normals (then a refresh's, unidirectional). With noise
        the pulse counts come first (their own small kernel), so that only the pulsed pairs draw; a
        NaN/Inf change is refused before any device moves. Unidirectional pairs: the kernel also says
        whether any device passed ``refresh_at``; the refresh itself (rare) runs eagerly."""
        c = self.cfg
        uni = c.update == "unidirectional"
        kernel = _fused("uni" if uni else "sync", c.model)
        h = self._bits(target.shape).to(self.g.dtype) if c.pulses == "stochastic" else None
        consts = self._consts()
        extra = (self._refresh_level,) if uni else ()
        g2 = self.g.reshape(2, -1)
        if c.ctoc > 0:
            p, finite = _fused("counts", c.model)(target, held, h, consts[0], consts[3])
            check_request(finite)
            z = self._pulse_noise(p, rows=1 if uni else 2)
            out = kernel(target, held, g2, None, p, z, *extra, *consts)
        else:
            out = kernel(target, held, g2, h, None, None, *extra, *consts)
            check_request(out[3])
        g, p, w = out[:3]
        self.g = g.view(self.g.shape)
        if uni and bool(out[4]):
            self.refresh()
            w = self.weights().reshape(-1)
        return p, w

    def apply_trains(self, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """Apply coincidence pulse counts (:meth:`coincidence_pulses`): the up pulses, then the down pulses
        (no accumulator cancels them); return the weights read back."""
        if not self._fusable or self.cfg.update != "bidirectional":
            self.apply_pulses(up)
            self.apply_pulses(-down)
            return self.weights()
        up, down = up.reshape(-1), down.reshape(-1)
        za, zb = self._pulse_noise(up), self._pulse_noise(down)
        g, w = _fused("trains", self.cfg.model)(up, down, self.g.reshape(2, -1), za, zb, *self._consts())
        self.g = g.view(self.g.shape)
        return w.view(self.shape)

    @property
    def _fusable(self) -> bool:
        c = self.cfg
        return c.fused and c.model in ("linear", "lim", "softbounds")

    def _apply_fused(self, dw: torch.Tensor) -> torch.Tensor:
        """:meth:`apply` as one compiled kernel: pulse counts, the pair split (or, unidirectional, the one
        device that moves) and the devices' steps in one pass over the array. The random draws come from
        the array's own generator in the eager order, so the kernel is the same maths on the same draws
        (tested against the eager path)."""
        flat = dw.reshape(-1)  # the sync kernel serves: the change dw - 0 is dw exactly
        p, _ = self._sync(flat, torch.zeros_like(flat))
        return p.view(self.shape)

    def _consts(self) -> tuple:
        """The fused kernels' constants, flattened: the kernels are elementwise, and one dynamic length
        compiles once for every layer's shape. (The rounding bits go in as floats, exact: the compiler
        vectorises no 16-bit integer loads.)"""
        c = self.cfg
        n = math.prod(self.shape)
        consts = self._fused_consts
        if consts is None:  # once per binding
            # scalars as tensors: a Python float would be compiled in, one compilation per value. Per
            # device only its bounds and step scale (2, n): the kernel derives the step, asymptotes, rates
            # and odd-pulse thresholds from them (it is bound by what it reads: ~13 floats per pair, was 23)
            scalars = (c.max_pulses or math.inf, c.ctoc, self.w_max / self.r_nominal, self.dw_pulse,
                       *relaxation_shape(c))
            consts = self._fused_consts = (
                *(self.g.new_tensor(v) for v in scalars[:4]), compact(self.lo.reshape(2, n)),
                compact(self.hi.reshape(2, n)), compact((self.step_scale / c.levels).reshape(2, n)),
                *(self.g.new_tensor(v) for v in scalars[4:]))
            self._refresh_level = self.g.new_tensor(c.refresh_at)  # the unidirectional kernel's, as a share
        return consts

    def coincidence_pulses(self, x: torch.Tensor, d: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Up and down pulse counts for the update ``-lr * d^T x`` by stochastic pulse coincidence.

        Each sample drives a train of ``bl`` slots per row (input i fires with probability
        ``sqrt(c) |x_i| / max|x|``) and per column (error j: ``sqrt(c) |d_j| / max|d|``); a device gets a
        pulse where both fire, in the direction of sign(-x_i d_j). With ``c = lr max|x| max|d| /
        (dw_pulse bl)`` the expected net count is exactly the requested change in pulses. The train has
        the fixed length ``bl`` of real periphery: where an update needs more than ``bl`` pulses (``c > 1``)
        the probabilities are capped at 1 and the update is cut (aihwkit's BL clipping with balanced
        scaling); the share of requested pulses cut is accumulated in ``self.clip`` (lost, asked).

        Returns ``(up, down)``, both non-negative: a crossbar has no per-device accumulator, so pulses of
        opposite sign from different samples are each applied -- they cancel on a linear device, but on a
        state-dependent one (soft bounds, Lim) an up and a down pulse leave a net drift, as in aihwkit.
        """
        x = x.reshape(-1, x.shape[-1])
        d = d.reshape(-1, d.shape[-1])
        if lr == 0:
            zero = torch.zeros(self.shape, dtype=self.g.dtype, device=self.g.device)
            return zero, zero
        # all-zero x or d: root = 0, so no train fires (decided on the device: no host sync)
        xmax, dmax = x.abs().max(), d.abs().max()
        bl = self.cfg.bl
        root = torch.sqrt(lr * xmax * dmax / (self.dw_pulse * bl))  # sqrt(c), a tensor
        tiny = torch.finfo(x.dtype).tiny
        ax, ad = x.abs() * (root / xmax.clamp_min(tiny)), d.abs() * (root / dmax.clamp_min(tiny))
        px, pd = ax.clamp(max=1), ad.clamp(max=1)
        asked = (ax.sum(1) * ad.sum(1)).sum()  # expected pulses per slot, summed over devices
        self.clip += torch.stack([asked - (px.sum(1) * pd.sum(1)).sum(), asked]).to(self.clip.dtype)
        # 0/1 trains (bl, batch, n) and sample signs as 8-bit integers: the coincidence counts are integer
        # matmuls (exact, ~3x faster than float on CPU)
        fire_x = self._fires(px, (bl,), torch.int8)
        fire_d = self._fires(pd, (bl,), torch.int8)
        signed_x = (fire_x * torch.sign(x).to(torch.int8)).reshape(-1, x.shape[-1])
        signed_d = (fire_d * torch.sign(-d).to(torch.int8)).reshape(-1, d.shape[-1])
        # all coincidences and their signed sum; up and down follow (both counts are whole numbers)
        total = _count(fire_d.reshape(-1, d.shape[-1]).t(), fire_x.reshape(-1, x.shape[-1]))
        net = _count(signed_d.t(), signed_x)
        return ((total + net) // 2).to(self.g.dtype), ((total - net) // 2).to(self.g.dtype)

    def take_clip(self) -> tuple[float, float]:
        """Coincidence pulses (cut, requested) since the last call, then reset."""
        lost, asked = self.clip.tolist()
        self.clip.zero_()
        return lost, asked

    def take_clip_fraction(self) -> float | None:
        """Share of the coincidence pulses requested since the last call that the train length cut."""
        return clip_fraction([self])

    def apply_pulses(self, sp: torch.Tensor) -> torch.Tensor:
        """Apply signed pulse counts (> 0: raise the weight); returns their magnitudes."""
        p = sp.abs()
        sgn = torch.sign(sp)
        if self.cfg.update == "unidirectional":
            self._step_one_device(p, sgn > 0)
            self.refresh()
        else:  # floor(p/2) each; an odd pulse to the device with more room in its direction
            z = self._pulse_noise(p)
            za, zb = (z[0], z[1]) if z is not None else (None, None)
            half = torch.floor(p / 2)
            odd = p - 2 * half
            rises = sgn > 0
            u = self.g[0] + self.g[1]
            # ties: the device that should rise (G+ for an increase, G- for a decrease)
            to_plus = (rises & (u <= self._odd_up)) | (~rises & (u > self._odd_down))
            self._step(0, sgn * (half + odd * to_plus), za)
            self._step(1, -sgn * (half + odd * ~to_plus), zb)
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
            self._step_one_device(p, target > 0)
            self.resets += n
        return n

    def program(self, w: torch.Tensor) -> None:
        """Write weights onto the pairs by pulses, then write-verify.

        Unidirectional: both devices reset to their lower bound, then potentiation pulses onto one.
        Bidirectional: both devices set to the middle of their range, then the normal update, so each
        device has room to move both ways. Then ``write_verify`` rounds: read the pairs back (with read
        noise, as a real read), and correct the remaining error by whole pulses (deterministic rounding:
        an error below half a pulse is left alone).
        """
        if self.cfg.update == "unidirectional":
            self.g = self.lo.clone()
            self._step_one_device(self.pulse_counts(w), w > 0)
        else:
            self.g = (self.lo + self.hi) / 2
            self.apply(w)
        step = torch.full_like(w, self.dw_pulse)  # per pair: what one pulse did last round
        for _ in range(self.cfg.write_verify):
            read = self.weights(noisy=True)
            err = w - read
            sp = torch.sign(err) * torch.round(err.abs() / step)
            if self.cfg.max_pulses:
                sp = sp.clamp(-self.cfg.max_pulses, self.cfg.max_pulses)
            if not torch.any(sp):
                break
            self.apply_pulses(sp)
            moved = (self.weights() - read.detach()) / sp.where(sp != 0, torch.ones_like(sp))
            # a nonlinear device's pulses are larger or smaller than nominal away from the operating
            # point: aim the next round with the step each pair just showed (bounded, positive)
            step = torch.where(sp != 0, moved.clamp(0.1 * self.dw_pulse, 10 * self.dw_pulse), step)

    def drift(self, t: float, t0: float = 1.0) -> None:
        """The conductances as they are time ``t`` after they were programmed (PCM-like drift: G - g_lo
        shrinks by (t / t0)^-nu). Absolute, as aihwkit's ``drift_analog_weights``: drift(10) then
        drift(1000) gives the state at 1000 s, not at 10^4 s (a sweep over t on one model measures each
        t); ``t <= t0`` gives the programmed state back. Any update starts a new clock from the
        conductances it leaves."""
        base = self._drift_state()
        base = self.g if base is None else base
        self.g = base.clone() if t <= t0 else self.lo + (base - self.lo) * (t / t0) ** (-self.nu)
        self._drift_base, self._drift_g, self._drift_version = base, self.g, self.g._version

    def _drift_state(self) -> torch.Tensor | None:
        """The programmed conductances while the devices hold only drift since (no update after it)."""
        aged = self._drift_base is not None and self.g is self._drift_g and self.g._version == self._drift_version
        return self._drift_base if aged else None

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        return {"g": self.g, "lo": self.lo, "hi": self.hi, "step_scale": self.step_scale, "nu": self.nu,
                "resets": self.resets, "rng": self.gen.get_state(), "read_rng": self.read_gen.get_state(),
                "drift_base": self._drift_state()}

    def load(self, st: dict) -> None:
        dev, dt = self.g.device, self.g.dtype
        for k in ("g", "lo", "hi", "step_scale", "nu"):
            setattr(self, k, st[k].to(dev, dt))
        base = st.get("drift_base")  # (absent before drift was absolute)
        self._drift_base = None if base is None else base.to(dev, dt)
        self._drift_g, self._drift_version = self.g, self.g._version
        self.resets = int(st["resets"])
        rng = st["rng"]
        try:
            self.gen.set_state(rng)
        except RuntimeError:
            # a state from another device type (CUDA Philox vs CPU Mersenne twister): continue with a
            # stream seeded from it -- deterministic, but not the stream the other device would draw
            self.gen.manual_seed(_seed_from_state(rng))
        read = st.get("read_rng")  # (absent before inference reads had their own stream)
        if read is not None:
            try:
                self.read_gen.set_state(read)
            except RuntimeError:
                self.read_gen.manual_seed(_seed_from_state(read))

    def to_(self, device, dtype) -> None:
        """Move the array (its module moved: ``.to``/``.cuda``/``.double``). Conductances stay in at
        least float32 whatever the module's dtype: a device's step is ~1/levels of its range, below a
        16-bit float's resolution near the bounds. A generator on another device type continues with a
        stream seeded from its state (deterministic; a state cannot cross device types)."""
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        base = self._drift_state()
        for k in ("g", "lo", "hi", "step_scale", "nu"):
            setattr(self, k, getattr(self, k).to(device, dtype))
        self._drift_base = None if base is None else base.to(device, dtype)
        self._drift_g, self._drift_version = self.g, self.g._version
        self.clip = self.clip.to(self.g.device)
        if self.gen.device != self.g.device:
            seed = _seed_from_state(self.gen.get_state())
            self.gen = torch.Generator(device=self.g.device).manual_seed(seed)
            seed = _seed_from_state(self.read_gen.get_state())
            self.read_gen = torch.Generator(device=self.g.device).manual_seed(seed)
        self._bind()
        self._bind()


def _count(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of small integers (int8 0/+-1 trains), exact, as int32.

    On the CPU torch's integer matmul (row-major ``b``; ``a`` row-major or a transposed row-major
    tensor), elsewhere and for other layouts a float matmul (exact below 2^24; on a GPU the fast path
    anyway, and ``_int_mm``'s CUDA kernel is untested here). Operands with a dimension of 1 take the
    float path too: torch 2.13's CPU ``_int_mm`` miscounts them (their strides are ambiguous, e.g.
    (1, 1)), and they are tiny."""
    (m, k), n = a.shape, b.shape[1]
    canonical = a.stride() in ((k, 1), (1, m)) and b.stride() == (n, 1)
    if a.device.type == "cpu" and min(m, k, n) > 1 and canonical:
        try:
            return torch._int_mm(a, b)
        except RuntimeError:
            pass
    return (a.float() @ b.float()).round().to(torch.int32)


def check_request(dw: torch.Tensor) -> None:
    """Refuse a NaN/Inf weight change (``dw``, or a precomputed all-finite flag). Reading the flag is one
    host sync per array and update on a GPU (documented exception to the no-sync rule, like the
    unidirectional refresh check in :meth:`DifferentialArray._sync`): refusing before any device moves
    needs the answer on the host."""
    ok = dw if dw.dtype == torch.bool else torch.isfinite(dw).all()
    if not ok:
        raise NeurosalError("the optimiser proposed a NaN/Inf weight change for an analog layer")


def compact(t: torch.Tensor) -> torch.Tensor:
    """A per-device constant ``(n,)`` or ``(2, n)`` as one column ``(1,)`` / ``(2, 1)`` when every device
    of a row has the same value (no device-to-device spread): the kernel broadcasts the same numbers and
    reads ~8 floats less per weight (a 784x256 array's call in a training step: 331 -> 298 us)."""
    flat = t.reshape(-1, t.shape[-1])
    if bool((flat == flat[:, :1]).all()):
        return flat[:, :1].reshape(*t.shape[:-1], 1).clone()
    return t


def _counts(dw, h, max_pulses, dw_pulse):
    """``pulse_counts`` on flattened arrays, as one expression for torch.compile: ``h`` the rounding draws
    (:meth:`DifferentialArray._bits` as floats; None: deterministic rounding), ``max_pulses`` inf for no cap."""
    p = dw.abs() / dw_pulse
    if h is not None:  # unbiased stochastic rounding with 16-bit draws, exactly as DifferentialArray._fires
        base = p.floor()
        q = torch.round((p - base) * 65536)
        # h < clamp(q - 32768) | (q == 65536), compared in floats (exact: both sides are small whole
        # numbers; h arrives as floats)
        p = base + (h < q - 32768).to(p.dtype)
    else:
        p = torch.round(p)
    return torch.minimum(p, max_pulses)


def _pair_step(g, s, p, z, ctoc, lo, hi, du, a_p, a_d, b_p, b_d, linear: bool):
    """``apply_pulses`` (bidirectional) + ``Response.step_signed`` of both devices, flattened: ``p`` pulses
    in the direction of ``s``'s sign (``s`` the change or the signed counts themselves); ``z`` (2, n)
    cycle-to-cycle normals or None. Per device (2, n) or (2, 1): the bounds and ``du`` (step scale / N);
    the odd-pulse thresholds follow from the bounds as in :meth:`DifferentialArray._bind`."""
    rises = s > 0
    sgn = rises.to(s.dtype) - (s < 0).to(s.dtype)  # torch.sign, in a form the compiler vectorises
    half = torch.floor(p / 2)
    odd = p - 2 * half
    u = g[0] + g[1]
    to_plus = torch.where(rises, u <= hi[0] + lo[1], u > lo[0] + hi[1]).to(s.dtype)
    dp = torch.stack([sgn * (half + odd * to_plus), -sgn * (half + odd * (1 - to_plus))])
    return _device_step(g, dp, z, ctoc, lo, hi, du, a_p, a_d, b_p, b_d, linear)


def _device_step(g, dp, z, ctoc, lo, hi, du, a_p, a_d, b_p, b_d, linear: bool):
    """``step_kernel`` with the step, asymptotes and rates derived from each device's bounds and ``du``
    (step scale / N) as in :class:`~hw_models.devices.Response` (``a_*``, ``b_*``: ``relaxation_shape``)."""
    r = hi - lo
    return step_kernel(g, dp, z, linear, r * du, lo + r * a_p, hi - r * a_d, du * b_p, du * b_d, lo, hi, ctoc)


def _counts_kernel(target, held, h, max_pulses, dw_pulse):
    """The pulse counts of the change ``target - held`` and whether it is finite: the first half of a
    noisy device's sync, so that only the pulsed pairs draw cycle-to-cycle noise."""
    dw = target - held
    return _counts(dw, h, max_pulses, dw_pulse), torch.isfinite(dw).all()


def _sync_kernel(target, held, g, h, p, z, max_pulses, ctoc, scale, dw_pulse, *consts, linear: bool):
    """:meth:`DifferentialArray.step_to` (and ``apply``, bidirectional) in one kernel, the same maths op for
    op as ``pulse_counts`` + ``apply_pulses`` + ``Response.step_signed`` on flattened arrays: the change
    ``target - held``, its pulse counts (from the rounding draws ``h``, or given as ``p``), both devices'
    steps (``g`` (2, n): index 0 G+; per-device constants (2, n) or (2, 1)), the weights read back
    (``scale`` = w_max / R) and whether the change was finite (None when the counts were given: the counts
    kernel checked it). Returns (G, counts, weights, finite)."""
    dw, finite = target - held, None
    if p is None:
        p, finite = _counts(dw, h, max_pulses, dw_pulse), torch.isfinite(dw).all()
    g = _pair_step(g, dw, p, z, ctoc, *consts, linear)
    return g, p, (g[0] - g[1]) * scale, finite


def _uni_kernel(target, held, g, h, p, z, refresh_at, max_pulses, ctoc, scale, dw_pulse, lo, hi, du, a_p, a_d,
                b_p, b_d, linear: bool):
    """:meth:`DifferentialArray.step_to` for unidirectional pairs (``apply_pulses`` + ``_step_one_device``):
    potentiation pulses to G+ for an increase, to G- for a decrease (``z``: (1, n) noise, one normal per
    pair serves both: only one device of a pair moves), the weights read back, whether the change was
    finite (None when the counts were given, as in the sync kernel), and whether any device passed
    ``refresh_at`` of its range (the caller then refreshes)."""
    dw, finite = target - held, None
    if p is None:
        p, finite = _counts(dw, h, max_pulses, dw_pulse), torch.isfinite(dw).all()
    rises = (dw > 0).to(dw.dtype)
    dp = torch.stack([p * rises, p * (1 - rises)])
    g = _device_step(g, dp, z, ctoc, lo, hi, du, a_p, a_d, b_p, b_d, linear)
    full = (g >= lo + refresh_at * (hi - lo)).any()
    return g, p, (g[0] - g[1]) * scale, finite, full


def _trains_kernel(up, down, g, za, zb, max_pulses, ctoc, scale, dw_pulse, *consts, linear: bool):
    """:meth:`DifferentialArray.apply_trains` in one kernel: the up pulses, then the down pulses (``za``,
    ``zb``: each train's (2, n) noise or None), and the weights read back. ``max_pulses`` and
    ``dw_pulse`` are unused (the counts are given)."""
    g = _pair_step(g, up, up, za, ctoc, *consts, linear)
    g = _pair_step(g, -down, down, zb, ctoc, *consts, linear)
    return g, (g[0] - g[1]) * scale


# One compiled entry per kernel and device family, each its own code object: torch.compile's recompile
# limit counts per function, and an entry then meets only the None/not-None draw variants and one length
def _sync_linear(target, held, g, *args):
    return _sync_kernel(target, held, g, *args, linear=True)


def _sync_exp(target, held, g, *args):
    return _sync_kernel(target, held, g, *args, linear=False)


def _uni_linear(target, held, g, *args):
    return _uni_kernel(target, held, g, *args, linear=True)


def _uni_exp(target, held, g, *args):
    return _uni_kernel(target, held, g, *args, linear=False)


def _trains_linear(up, down, g, *args):
    return _trains_kernel(up, down, g, *args, linear=True)


def _trains_exp(up, down, g, *args):
    return _trains_kernel(up, down, g, *args, linear=False)


_ENTRIES = {("sync", True): _sync_linear, ("sync", False): _sync_exp,
            ("trains", True): _trains_linear, ("trains", False): _trains_exp,
            ("uni", True): _uni_linear, ("uni", False): _uni_exp, ("counts", None): _counts_kernel}
_COMPILED: dict = {}


def _fused(kind: str, model: str):
    """The compiled kernel for ``kind`` ("sync" / "uni": :meth:`DifferentialArray.step_to` and ``apply``
    of bidirectional / unidirectional pairs;
    "counts": the pulse counts a noisy sync draws its noise for; "trains":
    :meth:`DifferentialArray.apply_trains`) and a device model (compiled on first use;
    ``DeviceConfig.fused``)."""
    key = (kind, None if kind == "counts" else model == "linear")  # counts: the same for every device
    if key not in _COMPILED:
        _COMPILED[key] = compile_kernel(_ENTRIES[key])
    return _COMPILED[key]


def clip_fraction(arrays) -> float | None:
    """Share of requested coincidence pulses cut, over ``arrays`` since their last reading (None: none asked)."""
    lost, asked = (sum(v) for v in zip(*(a.take_clip() for a in arrays)))
    return lost / asked if asked > 0 else None


def operating_step(cfg: DeviceConfig) -> float:
    """Conductance change of one pulse of the nominal device at the pair's operating point (see the
    module docstring): mid-range, mean of up and down steps (bidirectional); lower bound, up (unidirectional)."""
    one = torch.ones((), dtype=torch.float64)
    nominal = Response(cfg, one * cfg.g_min, one * cfg.g_max, one)
    if cfg.update == "unidirectional":
        g = one * cfg.g_min
        return float(nominal.up(g, one) - g)
    g = one * (cfg.g_min + cfg.g_max) / 2
    return float((nominal.up(g, one) - nominal.down(g, one)) / 2)
