"""Fit our device models to a measured pulse-response curve: ``neurosal fit-device data.csv``.

Input: a CSV with one row per programming pulse, in measurement order -- ``pulse`` (index),
``conductance`` (after the pulse), optional ``device`` (several devices in one file) and optional
``direction`` (``up``/``down``, ``+``/``-``, ``1``/``-1``; without it, each device's curve is split into
potentiation and depression runs by the sign of its smoothed slope). Typical measurements: cycles of
N potentiation pulses followed by N depression pulses.

Method. Every model is a one-pulse map ``G -> G'`` per direction, so each consecutive pair of readings
is one sample of that map (no time integration, no initial-state fitting):

``linear``      dG = +s_p (up) / -s_d (down)
``softbounds``  dG = k (g_max - G) up, -k (G - g_min) down                  (one rate k = 1/N)
``lim``         dG = (sat - G)(1 - exp(-k)) per direction: linear in G, so a least-squares line per
                direction gives k and the asymptote sat, hence Lim's nl and the level count N
``pow``         dG = (R/N) ((g_max - G)/R)^gamma up (mirrored down): a line in log-log coordinates

Bounds g_min/g_max come from the data (robust extremes of each device's readings). The model is chosen
by its one-pulse prediction error on held-out cycles (the last quarter of each device's pulses); ties
within 2% go to the simpler model. Cycle-to-cycle noise is the residual spread of dG in units of the
nominal step (our ``ctoc``); device-to-device spread is the spread of per-device step sizes and bounds
(``dtod_step``, ``dtod_bounds``). Uncertainties: standard deviations over bootstrap resamples of the
pulses (and of the devices, for the spreads). Output: a preset JSON usable as ``--device file.json``,
a report (JSON) and a PNG of data against each model's replay of the same pulse sequence.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neurosal.errors import NeurosalError

MODELS = ("linear", "softbounds", "lim", "pow")
SIMPLER_BY = 0.02  # a more complex model must beat a simpler one by this share of held-out error


@dataclass
class Curve:
    """One device's readings: conductance after each pulse and the pulse's direction (+1 / -1)."""

    device: str
    g: np.ndarray
    direction: np.ndarray  # direction[i] is the pulse that took g[i-1] to g[i]; direction[0] unused
    truth: dict | None = None  # simulated curves: the device's own bounds and step scale


@dataclass
class Steps:
    """One-pulse samples (G before, G after, direction) pooled over devices, with the device index."""

    g0: np.ndarray
    g1: np.ndarray
    up: np.ndarray
    dev: np.ndarray
    held_out: np.ndarray  # boolean: in the last quarter of its device's pulses

    def subset(self, mask) -> "Steps":
        return Steps(self.g0[mask], self.g1[mask], self.up[mask], self.dev[mask], self.held_out[mask])


@dataclass
class Fit:
    model: str
    params: dict  # DeviceConfig fields: levels, nl_p, nl_d, gamma
    g_min: float
    g_max: float
    up: tuple = ()  # per-direction raw coefficients (for prediction)
    down: tuple = ()
    ctoc: float = 0.0
    extra: dict = field(default_factory=dict)

    def predict(self, g: np.ndarray, up: np.ndarray) -> np.ndarray:
        """G after one pulse, per sample, clamped to the bounds."""
        r = self.g_max - self.g_min
        if self.model == "linear":
            out = np.where(up, g + self.up[0], g - self.down[0])
        elif self.model in ("softbounds", "lim"):
            a_u, b_u = self.up
            a_d, b_d = self.down
            out = np.where(up, g + a_u + b_u * g, g + a_d + b_d * g)
        else:  # pow
            n, gamma = self.params["levels"], self.params["gamma"]
            dist_up = np.clip((self.g_max - g) / r, 0, None)
            dist_dn = np.clip((g - self.g_min) / r, 0, None)
            out = np.where(up, g + r / n * dist_up ** gamma, g - r / n * dist_dn ** gamma)
        return np.clip(out, self.g_min, self.g_max)


# ----------------------------------------------------------------------------- reading

def _direction(text: str, where: str) -> int:
    t = text.strip().lower()
    if t in ("up", "+", "1", "+1", "p", "pot", "potentiation", "set"):
        return 1
    if t in ("down", "-", "-1", "d", "dep", "depression", "reset"):
        return -1
    raise NeurosalError(f"{where}: direction {text!r} is neither up nor down")


def _infer_directions(g: np.ndarray) -> np.ndarray:
    """Split a curve into potentiation / depression runs by the sign of its smoothed slope."""
    if len(g) < 3:
        return np.ones(len(g), dtype=int)
    width = max(3, min(15, len(g) // 20 * 2 + 1))
    slope = np.convolve(np.diff(g), np.ones(width) / width, mode="same")
    d = np.concatenate([[1], np.where(slope >= 0, 1, -1)])
    return d


def read_curves(path: str | Path) -> list[Curve]:
    """The CSV described in the module docstring -> one :class:`Curve` per device."""
    path = Path(path)
    if not path.is_file():
        raise NeurosalError(f"measurement file {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    except UnicodeDecodeError:
        raise NeurosalError(f"{path} is not a text CSV file") from None
    except csv.Error as exc:
        raise NeurosalError(f"cannot read {path} as CSV: {exc}") from exc
    if len(rows) < 2:
        raise NeurosalError(f"{path} holds no measurements (a header and one row per pulse expected)")
    header = [h.strip().lower() for h in rows[0]]
    need = {"conductance"}
    if not need <= set(header):
        raise NeurosalError(f"{path}: needs a header with a 'conductance' column (and optionally pulse, "
                            f"device, direction); found {', '.join(header)}")
    col = {name: header.index(name) for name in ("pulse", "conductance", "device", "direction") if name in header}
    per: dict[str, tuple[list, list]] = {}
    for i, r in enumerate(rows[1:], start=2):
        if len(r) != len(header):
            raise NeurosalError(f"{path}: row {i} has {len(r)} columns, the header has {len(header)}")
        try:
            g = float(r[col["conductance"]])
        except ValueError:
            raise NeurosalError(f"{path}: row {i}: conductance {r[col['conductance']]!r} is not a number") from None
        if not math.isfinite(g):
            raise NeurosalError(f"{path}: row {i}: conductance is NaN/Inf")
        dev = r[col["device"]].strip() if "device" in col else "0"
        d = _direction(r[col["direction"]], f"{path}: row {i}") if "direction" in col else 0
        per.setdefault(dev, ([], []))
        per[dev][0].append(g)
        per[dev][1].append(d)
    curves = []
    for dev, (gs, ds) in per.items():
        g = np.asarray(gs, dtype=np.float64)
        if len(g) < 8:
            raise NeurosalError(f"{path}: device {dev!r} has {len(g)} readings; at least 8 are needed")
        d = np.asarray(ds) if "direction" in col else _infer_directions(g)
        curves.append(Curve(dev, g, d))
    return curves


def steps_of(curves: list[Curve]) -> Steps:
    g0, g1, up, dev, held = [], [], [], [], []
    for k, c in enumerate(curves):
        n = len(c.g) - 1
        g0.append(c.g[:-1])
        g1.append(c.g[1:])
        up.append(c.direction[1:] > 0)
        dev.append(np.full(n, k))
        held.append(np.arange(n) >= int(0.75 * n))
    return Steps(*(np.concatenate(a) for a in (g0, g1, up, dev, held)))


# ----------------------------------------------------------------------------- fitting

def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares y = a + b x."""
    if len(x) < 2 or np.ptp(x) == 0:
        return float(np.mean(y)) if len(y) else 0.0, 0.0
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b)


def bounds(curves: list[Curve]) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Pooled g_min/g_max (medians of per-device robust extremes) and the per-device extremes."""
    lo = np.array([np.percentile(c.g, 0.5) for c in curves])
    hi = np.array([np.percentile(c.g, 99.5) for c in curves])
    return float(np.median(lo)), float(np.median(hi)), lo, hi


def fit_model(model: str, s: Steps, g_min: float, g_max: float) -> Fit:
    r = g_max - g_min
    if r <= 0:
        raise NeurosalError("the measured conductances do not span a range (g_max <= g_min)")
    # a pulse into a saturated device says nothing about the law that got it there: leave out steps
    # that start at the data's edge in the direction they push
    edge = 0.005 * r
    keep = np.where(s.up, s.g0 < g_max - edge, s.g0 > g_min + edge)
    s = s.subset(keep)
    dg = s.g1 - s.g0
    u, d = s.up, ~s.up
    if u.sum() < 3 or d.sum() < 3:
        raise NeurosalError("need at least 3 potentiation and 3 depression pulses to fit a device")
    if model == "linear":
        # steps away from the bounds (clamped readings would bias the step)
        room_u = u & (s.g0 < g_max - 0.05 * r)
        room_d = d & (s.g0 > g_min + 0.05 * r)
        s_p = float(np.mean(dg[room_u])) if room_u.any() else float(np.mean(dg[u]))
        s_d = float(-np.mean(dg[room_d])) if room_d.any() else float(-np.mean(dg[d]))
        s_p, s_d = max(s_p, 1e-12 * r), max(s_d, 1e-12 * r)
        n = r / ((s_p + s_d) / 2)
        return Fit(model, {"levels": n}, g_min, g_max, (s_p,), (s_d,), extra={"asymmetry": s_p / s_d})
    if model == "softbounds":
        # dG = k (g_max - G) up, -k (G - g_min) down: a line per direction whose root is the bound (a
        # soft-bounds device only approaches its bounds, so they are fitted, not read off the data)
        a_u, b_u = _line(s.g0[u], dg[u])
        a_d, b_d = _line(s.g0[d], dg[d])
        b_u, b_d = min(b_u, -1e-9), min(b_d, -1e-9)
        hi, lo = -a_u / b_u, -a_d / b_d
        if not hi > lo:
            raise NeurosalError("the soft-bounds fit found no range (upper bound below lower bound)")
        k = min((-b_u - b_d) / 2, 0.999999)
        # our soft-bounds device relaxes by exp(-1/N) per pulse: k = 1 - exp(-1/N)
        return Fit(model, {"levels": -1 / math.log1p(-k)}, lo, hi, (k * hi, -k), (k * lo, -k),
                   extra={"asymmetry": b_u / b_d})
    if model == "lim":
        a_u, b_u = _line(s.g0[u], dg[u])
        a_d, b_d = _line(s.g0[d], dg[d])
        b_u, b_d = min(b_u, -1e-9), min(b_d, -1e-9)
        sat_p, sat_d = -a_u / b_u, -a_d / b_d
        k_p, k_d = -math.log1p(max(b_u, -0.999999)), -math.log1p(max(b_d, -0.999999))
        nl_p = _lim_nl(sat_p - g_min, r)
        nl_d = _lim_nl(g_max - sat_d, r)
        n_p, n_d = 1 / (k_p * nl_p), 1 / (k_d * nl_d)
        return Fit(model, {"levels": math.sqrt(n_p * n_d), "nl_p": nl_p, "nl_d": nl_d}, g_min, g_max,
                   (a_u, b_u), (a_d, b_d), extra={"levels_up": n_p, "levels_down": n_d, "asymmetry": n_d / n_p})
    if model == "pow":
        # dG = C (g_max - G)^gamma up (mirrored down); the bound is searched on a grid beyond the data
        (hi, c_u, g_u), (lo, c_d, g_d) = (_pow_side(s.g0[u], dg[u], g_max, r, +1),
                                          _pow_side(s.g0[d], -dg[d], g_min, r, -1))
        gamma = max((g_u + g_d) / 2, 1e-3)
        rr = hi - lo
        n_u, n_d = rr / (c_u * rr ** g_u), rr / (c_d * rr ** g_d)
        return Fit(model, {"levels": math.sqrt(n_u * n_d), "gamma": gamma}, lo, hi,
                   extra={"gamma_up": g_u, "gamma_down": g_d, "asymmetry": n_d / n_u})
    raise NeurosalError(f"unknown device model {model!r}; known: {', '.join(MODELS)}")


def _pow_side(g: np.ndarray, step: np.ndarray, edge: float, r: float, sign: int):
    """One direction of the power-step model: the bound (searched from the data's edge outwards), C and
    gamma of ``|dG| = C dist^gamma``, ``dist`` the distance to that bound; least squares in dG."""
    best = None
    for extra in np.linspace(0.0, 0.5, 51):
        bound = edge + sign * extra * r
        dist = sign * (bound - g)
        ok = (dist > 1e-6 * r) & (step > 0)
        if ok.sum() < 3:
            continue
        a, gamma = _line(np.log(dist[ok]), np.log(step[ok]))
        pred = np.exp(a) * np.clip(dist, 1e-12 * r, None) ** gamma
        sse = float(np.sum((pred - step) ** 2))
        if best is None or sse < best[0]:
            best = (sse, bound, math.exp(a), gamma)
    if best is None:
        raise NeurosalError("too few unclamped pulses to fit the power-step model")
    return best[1:]


def _lim_nl(span: float, r: float) -> float:
    """Lim's nl from the asymptote's distance to the starting bound: span = R / (1 - exp(-1/nl))."""
    if span <= r * (1 + 1e-9):
        return 50.0  # no curvature visible: effectively linear (nl -> inf), capped
    return float(-1.0 / math.log1p(-r / span))


def _held_out_rmse(model: str, s: Steps, lo_dev: np.ndarray, hi_dev: np.ndarray) -> float:
    """One-pulse RMSE on each device's last quarter, the model fitted on that device's first three."""
    se, n = 0.0, 0
    for k in range(len(lo_dev)):
        sk = s.subset(s.dev == k)
        test = sk.subset(sk.held_out)
        try:
            f = fit_model(model, sk.subset(~sk.held_out), lo_dev[k], hi_dev[k])
        except NeurosalError:
            return math.inf
        se += float(np.sum((f.predict(test.g0, test.up) - test.g1) ** 2))
        n += len(test.g0)
    return math.sqrt(se / max(n, 1))


@dataclass
class Report:
    chosen: Fit
    fits: dict[str, Fit]
    held_out_rmse: dict[str, float]
    uncertainty: dict[str, float]
    dtod_step: float
    dtod_bounds: float
    dtod_uncertainty: dict[str, float]
    n_devices: int
    n_pulses: int

    def preset(self) -> dict:
        f = self.chosen
        out = {"model": f.model, "g_min": f.g_min, "g_max": f.g_max, **{k: float(v) for k, v in f.params.items()},
               "ctoc": f.ctoc, "dtod_step": self.dtod_step, "dtod_bounds": min(self.dtod_bounds, 0.45)}
        out["levels"] = float(max(out["levels"], 2.0))
        return out

    def summary(self) -> dict:
        return {"model": self.chosen.model, "preset": self.preset(), "uncertainty": self.uncertainty,
                "dtod_uncertainty": self.dtod_uncertainty, "held_out_rmse": self.held_out_rmse,
                "asymmetry": self.chosen.extra.get("asymmetry"), "extra": self.chosen.extra,
                "devices": self.n_devices, "pulses": self.n_pulses}


def fit_device(curves: list[Curve], models=MODELS, bootstrap: int = 100, seed: int = 0) -> Report:
    """Fit every model, choose by held-out error, estimate noise, spreads and uncertainties."""
    g_min, g_max, lo_dev, hi_dev = bounds(curves)
    s = steps_of(curves)
    fits = {m: fit_model(m, s.subset(~s.held_out), g_min, g_max) for m in models}
    # held-out error of each model fitted device by device (devices differ: a pooled fit would blame
    # the device-to-device spread on the model)
    errs = {m: _held_out_rmse(m, s, lo_dev, hi_dev) for m in models}
    order = sorted(models, key=lambda m: MODELS.index(m))  # simplest first
    chosen = order[0]
    for m in order[1:]:
        if errs[m] < errs[chosen] * (1 - SIMPLER_BY):
            chosen = m
    full = fit_model(chosen, s, g_min, g_max)  # refit on all pulses
    fits[chosen] = full
    r = g_max - g_min
    # per device: its own fit (bounds from its own readings) gives its step size, and residuals free of
    # the device-to-device spread, hence the cycle-to-cycle noise
    per_fit, resid = [], []
    for k in range(len(curves)):
        sk = s.subset(s.dev == k)
        try:
            fk = fit_model(chosen, sk, lo_dev[k], hi_dev[k])
        except NeurosalError:
            continue
        rk = fk.g_max - fk.g_min
        inside = (sk.g0 > fk.g_min + 0.02 * rk) & (sk.g0 < fk.g_max - 0.02 * rk)
        resid.append((sk.g1 - fk.predict(sk.g0, sk.up))[inside] / (rk / fk.params["levels"]))
        per_fit.append(fk)
    per_dev = [f.params["levels"] for f in per_fit]
    if len(per_fit) > 1:  # the typical device: medians of the per-device fits (robust to one odd device)
        full.params = {k: float(np.median([f.params[k] for f in per_fit])) for k in full.params}
        full.g_min = float(np.median([f.g_min for f in per_fit]))
        full.g_max = float(np.median([f.g_max for f in per_fit]))
        g_min, g_max = full.g_min, full.g_max
    resid_all = np.concatenate(resid) if resid else np.zeros(0)
    full.ctoc = float(np.std(resid_all)) if len(resid_all) > 2 else 0.0
    # uncertainties: bootstrap over pulses (model parameters) and over devices (spreads)
    rng = np.random.default_rng(seed)
    draws: dict[str, list] = {}
    for _ in range(bootstrap):
        pick = rng.integers(0, len(s.g0), len(s.g0))
        try:
            b = fit_model(chosen, s.subset(pick), g_min, g_max)
        except NeurosalError:
            continue
        for k, v in b.params.items():
            draws.setdefault(k, []).append(v)
        if len(resid_all) > 2:
            draws.setdefault("ctoc", []).append(float(np.std(rng.choice(resid_all, len(resid_all)))))
    unc = {k: float(np.std(v)) for k, v in draws.items()}
    dtod_step = dtod_bounds = 0.0
    dunc = {"dtod_step": 0.0, "dtod_bounds": 0.0}
    if len(per_dev) > 1:
        steps = 1 / np.asarray(per_dev)
        dtod_step = float(np.std(steps) / np.mean(steps))
        shrink = np.concatenate([(lo_dev - g_min) / r, (g_max - hi_dev) / r])
        dtod_bounds = float(np.sqrt(np.mean(shrink ** 2)))
        bs, bb = [], []
        for _ in range(bootstrap):
            pick = rng.integers(0, len(steps), len(steps))
            bs.append(np.std(steps[pick]) / np.mean(steps[pick]))
            pk = rng.integers(0, len(shrink), len(shrink))
            bb.append(np.sqrt(np.mean(shrink[pk] ** 2)))
        dunc = {"dtod_step": float(np.std(bs)), "dtod_bounds": float(np.std(bb))}
    return Report(full, fits, errs, unc, dtod_step, dtod_bounds, dunc, len(curves), len(s.g0))


def simulate_curves(cfg, devices: int = 4, cycles: int = 3, pulses: int | None = None, seed: int = 0) -> list[Curve]:
    """Measured-like curves from a known device: each device (its own bounds and step scale, drawn with
    ``cfg``'s device-to-device spreads) gets ``cycles`` x (``pulses`` up, then ``pulses`` down), with
    ``cfg``'s cycle-to-cycle noise -- the same physics the arrays run. ``pulses`` defaults to 1.3 N, so
    a device saturates in each half cycle, as a measurement protocol should make it. For tests/examples."""
    import torch

    from .devices import Response

    n = pulses or int(round(1.3 * cfg.levels))
    gen = torch.Generator().manual_seed(seed)
    r = cfg.g_max - cfg.g_min
    out = []
    for k in range(devices):
        def spread(std):
            return float(torch.randn((), generator=gen, dtype=torch.float64)) * std if std else 0.0

        lo = torch.tensor([cfg.g_min + abs(spread(cfg.dtod_bounds)) * r], dtype=torch.float64)
        hi = torch.tensor([cfg.g_max - abs(spread(cfg.dtod_bounds)) * r], dtype=torch.float64)
        scale = torch.tensor([max(1 + spread(cfg.dtod_step), 0.05)], dtype=torch.float64)
        resp = Response(cfg, lo, hi, scale)
        g, gs, ds = lo.clone(), [float(lo)], [1]
        for _ in range(cycles):
            for direction in [1] * n + [-1] * n:
                z = torch.randn(1, generator=gen, dtype=torch.float64) if cfg.ctoc > 0 else None
                g = resp.step_signed(g, torch.tensor([float(direction)], dtype=torch.float64), z)
                gs.append(float(g))
                ds.append(direction)
        out.append(Curve(str(k), np.asarray(gs), np.asarray(ds),
                         {"g_min": float(lo), "g_max": float(hi), "step_scale": float(scale)}))
    return out


def write_curves(curves: list[Curve], path: Path) -> None:
    """The CSV form :func:`read_curves` reads."""
    lines = ["pulse,conductance,device,direction"]
    for c in curves:
        lines += [f"{i},{g:.9g},{c.device},{'up' if d > 0 else 'down'}" for i, (g, d) in enumerate(zip(c.g, c.direction))]
    Path(path).write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- replay and plot

def replay(f: Fit, c: Curve) -> np.ndarray:
    """The model's conductance along the device's own pulse sequence, from its first reading."""
    g = np.empty_like(c.g)
    g[0] = c.g[0]
    for i in range(1, len(g)):
        g[i] = f.predict(np.array([g[i - 1]]), np.array([c.direction[i] > 0]))[0]
    return g


def plot(report: Report, curves: list[Curve], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neurosal.report import save_figure

    c = curves[0]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(c.g, ".", ms=3, color="0.4", label=f"measured (device {c.device})")
    for name, f in report.fits.items():
        style = "-" if name == report.chosen.model else "--"
        ax.plot(replay(f, c), style, lw=1.5 if style == "-" else 1,
                label=f"{name} (held-out RMSE {report.held_out_rmse[name]:.3g})")
    ax.set(xlabel="pulse", ylabel="conductance", title=f"fit-device: chosen {report.chosen.model}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------- command

def cmd_fit_device(args) -> int:
    from neurosal.checkpoint import atomic_write_text, ensure_writable_dir

    from .devices import DeviceConfig

    out = ensure_writable_dir(Path(args.out))
    curves = read_curves(args.data)
    report = fit_device(curves, bootstrap=args.bootstrap, seed=args.seed)
    preset = report.preset()
    DeviceConfig(**preset).validate()  # the file must load as a device
    atomic_write_text(out / "device.json", json.dumps({**preset, "source": f"fit-device {args.data}"}, indent=2))
    atomic_write_text(out / "fit.json", json.dumps(report.summary(), indent=2))
    plot(report, curves, out / "fit.png")
    u = report.uncertainty
    print(f"model: {report.chosen.model} (held-out one-pulse RMSE: "
          + ", ".join(f"{m} {e:.3g}" for m, e in report.held_out_rmse.items()) + ")")
    for k, v in preset.items():
        if isinstance(v, float):
            pm = u.get(k, report.dtod_uncertainty.get(k))
            print(f"  {k:12s} {v:.4g}" + (f" +- {pm:.2g}" if pm else ""))
    print(f"asymmetry (up/down step): {report.chosen.extra.get('asymmetry', float('nan')):.3g}; "
          f"{report.n_devices} device(s), {report.n_pulses} pulses")
    print(f"wrote {out / 'device.json'} (use: --device {out / 'device.json'}), {out / 'fit.json'}, {out / 'fit.png'}")
    return 0


def add_parser(subparsers) -> None:
    from neurosal.cli import positive_int

    p = subparsers.add_parser("fit-device", help="fit device models to a measured pulse-response curve (CSV)")
    p.add_argument("data", help="CSV: pulse, conductance[, device][, direction], one row per pulse")
    p.add_argument("--out", default="runs/fit-device", help="folder for device.json, fit.json, fit.png")
    p.add_argument("--bootstrap", type=positive_int, default=100, help="resamples for the uncertainties")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_fit_device)
