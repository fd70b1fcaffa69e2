"""Resistive device models: how a conductance answers a train of programming pulses.

Every model is written in closed form for p pulses at once (p may differ per device), so an update of a
whole array is a handful of elementwise tensor ops on CPU or CUDA. Notation: a device lives in
``[g_min, g_max]`` (range ``R``), has ``N`` nominal levels (pulses from bound to bound for the linear
device), nominal step ``s = R / N``.

``linear``      G' = clamp(G +- p s)                                   (ideal / ConstantStep-like)
``lim``         Lim et al.: potentiation G(u) = g_min + B (1 - exp(-u / nl_p)), u = pulses / N,
                B = R / (1 - exp(-1 / nl_p)) (N pulses span the range exactly); depression mirrored from
                g_max with nl_d. Small nl: strongly nonlinear (large steps near one bound, tiny near the
                other); nl -> inf: linear. nl_p != nl_d makes the device asymmetric.
``softbounds``  per-pulse step shrinks linearly towards the bound it approaches (aihwkit SoftBounds):
                G' = g_max - (g_max - G) exp(-p s / R) up, mirrored down
``pow``         dG/dp = s ((g_max - G) / R)^gamma up (mirrored down), aihwkit PowStep's law
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from neurosal.errors import NeurosalError
from neurosal.options import typed_fields

MODELS = ("linear", "lim", "softbounds", "pow")
UPDATES = ("bidirectional", "unidirectional")
PULSE_MODES = ("round", "stochastic", "coincidence")
W_SCALES = ("weights", "fan_in")


@dataclass
class DeviceConfig:
    """One resistive device type and its periphery. Every field has a physical meaning and a check."""

    model: str = "linear"
    levels: float = 1000  # N: pulses from g_min to g_max for the linear device
    g_min: float = 0.0  # conductance bounds (arbitrary units, e.g. uS)
    g_max: float = 1.0
    nl_p: float = 1.0  # lim: potentiation nonlinearity (A / N); larger = more linear
    nl_d: float = 1.0  # lim: depression nonlinearity
    gamma: float = 1.0  # pow: exponent of the state dependence
    dtod_step: float = 0.0  # device-to-device spread of the step size (relative std)
    dtod_bounds: float = 0.0  # device-to-device shrink of each device's bounds (relative to R)
    ctoc: float = 0.0  # cycle-to-cycle noise per pulse (std, in units of the nominal step)
    read_noise: float = 0.0  # std of conductance read noise (relative to R), fresh at every read (each MVM)
    dac_bits: int = 0  # input quantisation (0 = off); abs-max scaling per read vector (sample, token, patch)
    adc_bits: int = 0  # output quantisation (0 = off)
    adc_range: float = 1.0  # ADC full scale in units of w_max * sqrt(fan_in) for unit-range inputs (4 left the
                            # typical read 1-2 codes of 8 bits: 4-14% read error; 1: 1-3%, no clipping seen;
                            # benchmarks/reports/analog/adc_calibration.md)
    update: str = "bidirectional"  # or "unidirectional" (Lim et al.: potentiation only + refresh)
    refresh_at: float = 0.9  # unidirectional: refresh a pair when a device passes this fraction of R
    pulses: str = "stochastic"  # pulse count from the requested change: unbiased "stochastic" rounding,
                                # "round", or "coincidence" of stochastic pulse trains (Linear, plain SGD)
    bl: int = 31  # coincidence: pulse-train length (slots per update); longer updates are cut (clipped)
    max_pulses: int = 0  # cap per update and device (0 = none)
    write_verify: int = 5  # programming: rounds of read-back and correcting pulses (0 = open loop)
    w_range: float = 4.0  # weight range w_max = w_range * the layer's weight scale (see w_scale)
    w_scale: str = "weights"  # the weight scale: "fan_in" = 1/sqrt(fan_in), torch's default init bound;
                              # "weights" = that times the power of two nearest sqrt(3) rms(W) sqrt(fan_in)
                              # of the weights first programmed (a shift in the digital periphery): the
                              # same for torch's default init, the devices' range kept on other inits
    drift_nu: float = 0.0  # PCM-like drift exponent: G(t) = g_min + (G - g_min) (t / t0)^-nu
    drift_nu_dtod: float = 0.0  # device-to-device spread of nu (relative std)
    fused: bool = False  # execution, not physics: run a bidirectional update (pulse counts or coincidence
                         # trains, pair split, device steps, read-back) as one torch.compile'd kernel, a
                         # unidirectional one's device steps; same maths and draws, 1.4-3x faster steps
                         # on CPU, 10-20 s to compile on first use (needs a C++ compiler)

    def validate(self) -> "DeviceConfig":
        err = []
        if self.model not in MODELS:
            err.append(f"model must be one of {MODELS}, not {self.model!r}")
        if not (math.isfinite(self.g_min) and math.isfinite(self.g_max)) or self.g_min >= self.g_max:
            err.append(f"g_min ({self.g_min}) must be below g_max ({self.g_max})")
        if not self.levels >= 2:
            err.append(f"levels must be >= 2, got {self.levels}")
        for name in ("nl_p", "nl_d", "gamma", "w_range", "adc_range"):
            if not getattr(self, name) > 0:
                err.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("dtod_step", "dtod_bounds", "ctoc", "read_noise", "drift_nu", "drift_nu_dtod"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                err.append(f"{name} must be a non-negative number, got {v}")
        if self.dtod_bounds >= 0.5:
            err.append("dtod_bounds must be below 0.5 (devices would have no range left)")
        if self.bl < 1:
            err.append("bl must be >= 1")
        for name in ("dac_bits", "adc_bits", "max_pulses", "write_verify"):
            if getattr(self, name) < 0:
                err.append(f"{name} must be >= 0")
        if self.w_scale not in W_SCALES:
            err.append(f"w_scale must be one of {W_SCALES}, not {self.w_scale!r}")
        if self.update not in UPDATES:
            err.append(f"update must be one of {UPDATES}, not {self.update!r}")
        if self.pulses not in PULSE_MODES:
            err.append(f"pulses must be one of {PULSE_MODES}, not {self.pulses!r}")
        if not 0 < self.refresh_at <= 1:
            err.append("refresh_at must be in (0, 1]")
        if err:
            raise NeurosalError("bad device parameters: " + "; ".join(err))
        return self

    def replace(self, **changes) -> "DeviceConfig":
        return dataclasses.replace(self, **typed_fields(DeviceConfig, changes, "device")).validate()


def relaxation_shape(cfg: DeviceConfig) -> tuple[float, float, float, float]:
    """``(a_p, a_d, b_p, b_d)`` of an exponential-relaxation device (see :class:`Response`): its asymptotes
    ``g_sat+ = lo + a_p (hi - lo)``, ``g_sat- = hi - a_d (hi - lo)`` and rates ``k = b du`` per pulse,
    ``du = step_scale / N``; the same for every device of a preset (zeros for the other models)."""
    if cfg.model == "lim":
        return (1 / -math.expm1(-1.0 / cfg.nl_p), 1 / -math.expm1(-1.0 / cfg.nl_d), 1 / cfg.nl_p, 1 / cfg.nl_d)
    if cfg.model == "softbounds":  # the bounds themselves, k = du
        return (1.0, 1.0, 1.0, 1.0)
    return (0.0, 0.0, 0.0, 0.0)


class Response:
    """A device model bound to per-device bounds and step scales, with its constants precomputed.

    The ``lim`` and ``softbounds`` models are exponential relaxations: p pulses move G towards an
    asymptote, ``G' = g_sat - (g_sat - G) exp(-p k)``. For ``lim`` potentiation ``g_sat = g_min + B``
    and ``k = 1 / (N nl_p)`` -- the closed form of B (1 - exp(-u / nl_p)) continued by p pulses -- and
    mirrored for depression; for soft bounds ``g_sat`` is the bound itself and ``k = 1 / N``.
    :meth:`step_signed` applies signed pulse counts (> 0 potentiation, < 0 depression) in one pass;
    devices that get no pulse come back exactly unchanged.
    """

    def __init__(self, cfg: DeviceConfig, lo, hi, step_scale):
        self.cfg, self.lo, self.hi = cfg, lo, hi
        self.r = hi - lo
        self.step = self.r * (step_scale / cfg.levels)  # per-device step size (linear model)
        self.du = step_scale / cfg.levels  # one pulse in normalised pulse time (u = pulses / N)
        if cfg.model in ("lim", "softbounds"):
            a_p, a_d, b_p, b_d = relaxation_shape(cfg)
            self.sat_p, self.sat_d = lo + self.r * a_p, hi - self.r * a_d
            self.k_p, self.k_d = self.du * b_p, self.du * b_d

    def _relax(self, g, p, sat, k):
        return sat - (sat - g) * torch.exp(-p * k)

    def up(self, g, p):
        cfg, lo, hi = self.cfg, self.lo, self.hi
        if cfg.model == "linear":
            out = g + p * self.step
        elif cfg.model == "pow":
            out = hi - self.r * _pow_decay((hi - g) / self.r, p * self.du, cfg.gamma)
        else:
            out = self._relax(g, p, self.sat_p, self.k_p)
        return torch.clamp(out, lo, hi)

    def down(self, g, p):
        cfg, lo, hi = self.cfg, self.lo, self.hi
        if cfg.model == "linear":
            out = g - p * self.step
        elif cfg.model == "pow":
            out = lo + self.r * _pow_decay((g - lo) / self.r, p * self.du, cfg.gamma)
        else:
            out = self._relax(g, p, self.sat_d, self.k_d)
        return torch.clamp(out, lo, hi)

    def step_signed(self, g, dp, z=None):
        """G after signed pulses dp. ``z`` (standard normal, same shape) drives cycle-to-cycle noise:
        |dp| pulses add ``z * ctoc * step * sqrt(|dp|)``, then G is clamped again."""
        c = self.cfg
        # fused arrays run their training updates in hw_models.array's kernels; what is left of theirs
        # here: programming's write-verify rounds (bidirectional: eagerly, without a compilation) and a
        # unidirectional pair's refresh and first programming (compiled device step)
        if c.fused and c.update == "unidirectional" and c.model in ("linear", "lim", "softbounds"):
            return _fused()(g, dp, z, c.model == "linear", self.step, getattr(self, "sat_p", 0.0),
                            getattr(self, "sat_d", 0.0), getattr(self, "k_p", 0.0), getattr(self, "k_d", 0.0),
                            self.lo, self.hi, c.ctoc)
        out = self._step_eager(g, dp)
        if z is not None:  # sqrt(|dp|) is exactly 0 where no pulse came: those devices stay as they are
            out = torch.clamp(out + z * (c.ctoc * self.step) * dp.abs().sqrt(), self.lo, self.hi)
        return out

    def _step_eager(self, g, dp):
        model = self.cfg.model
        if model == "linear":  # one pass; dp == 0 adds exactly zero
            return torch.clamp(g + dp * self.step, self.lo, self.hi)
        p = dp.abs()
        if model == "pow":
            moved = torch.where(dp > 0, self.up(g, p), self.down(g, p))
        else:
            pos = dp > 0
            moved = torch.clamp(self._relax(g, p, torch.where(pos, self.sat_p, self.sat_d),
                                            torch.where(pos, self.k_p, self.k_d)), self.lo, self.hi)
        return torch.where(dp == 0, g, moved)


def step_kernel(g, dp, z, linear: bool, step, sat_p, sat_d, k_p, k_d, lo, hi, ctoc: float):
    """The same maths as :meth:`Response.step_signed`, written as one expression for torch.compile (also
    the device step inside :mod:`hw_models.array`'s fused update kernels)."""
    if linear:
        out = g + dp * step
    else:
        pos = dp > 0
        sat = torch.where(pos, sat_p, sat_d)
        out = sat - (sat - g) * torch.exp(-dp.abs() * torch.where(pos, k_p, k_d))
    out = torch.clamp(out, lo, hi)
    if z is not None:  # noise on the moved value, clamped again: exactly the eager order
        out = torch.clamp(out + z * (ctoc * step) * dp.abs().sqrt(), lo, hi)
    return torch.where(dp == 0, g, out)


_COMPILED: dict = {}


def compile_kernel(fn):
    """``fn`` compiled for arrays of any length, always without autograd (grad mode is part of what a
    compilation assumes). ``cpp.dynamic_threads``: the CPU kernel takes its thread count at run time and
    always has a parallel loop. Without it the code generator decides serial or parallel from the length
    of the *first* call, and its on-disk cache hands that decision to every later process: a kernel first
    compiled for a 30x20 array (the test suite) then ran serially on a 784x256 one."""
    compiled = torch.no_grad()(torch.compile(fn, dynamic=True, options={"cpp.dynamic_threads": True}))

    def run(*args):
        try:
            return compiled(*args)
        except Exception as exc:  # torch wraps its compiler errors; the missing compiler is named in them
            if "InvalidCxxCompiler" not in f"{type(exc).__name__} {exc}":
                raise
            raise NeurosalError("fused=true compiles the device update with torch.compile, which needs a working "
                                "C++ compiler, and none was found (install g++, or set CXX); or leave fused off"
                                ) from None
    return run


def _fused():
    if "step" not in _COMPILED:
        _COMPILED["step"] = compile_kernel(step_kernel)
    return _COMPILED["step"]


def potentiate(cfg: DeviceConfig, g, p, lo, hi, step_scale):
    """Conductance after ``p`` (>= 0) potentiation pulses, per device (all arguments broadcast)."""
    return Response(cfg, lo, hi, step_scale).up(g, p)


def depress(cfg: DeviceConfig, g, p, lo, hi, step_scale):
    """Conductance after ``p`` (>= 0) depression pulses (the mirror image with ``nl_d``)."""
    return Response(cfg, lo, hi, step_scale).down(g, p)


def _pow_decay(w, t, gamma):
    """Solution of dw/dt = -w^gamma from w(0) = w, at time t (w in [0, 1])."""
    if abs(gamma - 1.0) < 1e-9:
        return w * torch.exp(-t)
    base = w.clamp_min(0).pow(1 - gamma) - (1 - gamma) * t
    return base.clamp_min(0).pow(1 / (1 - gamma))
