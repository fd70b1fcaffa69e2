"""Spiking networks on tensors: snnTorch LIF populations trained online by local three-factor rules.

Model spec (``neurosal train --model snn:100 --rule dfa``)::

    snn:100x100[:key=value,...]     hidden LIF layers; options:
        T=25          time steps            enc=rate|latency   input encoding (gain=1.0 for rate)
        beta=0.9      membrane decay        theta=1.0          threshold
        neuron=leaky  or synaptic (alpha=0.8: current decay)  slope=25   fast-sigmoid surrogate slope
        beta_out=0.9  decay of the leaky-integrator readout

Dynamics (snnTorch ``Leaky``/``Synaptic``, subtractive reset, ``reset_delay=False``), per step t::

    r(t)   = H(m(t-1) - theta)                     (snnTorch's reset flag on the previous membrane)
    u(t)   = beta m(t-1) + I(t) - r(t) theta       (Synaptic: I -> s(t) = alpha s(t-1) + I(t))
    S(t)   = H(u(t) - theta)
    m(t)   = u(t) - (S(t) - r(t)) theta = beta m(t-1) + I(t) - S(t) theta

Every synaptic layer delivers its spikes one step later (spikes emitted at t arrive at t+1), as on
event-driven hardware and in the Brian2 twin (:mod:`hw_models.brian`). The readout integrates the
last hidden layer's spikes without spiking; the logits are its time-averaged membrane.

Learning. ``bp`` is BPTT through snnTorch with the fast-sigmoid surrogate. Every other rule uses the
LIF tail's *local* rule: the teaching signal L_j(t) that the rule delivers (DFA: the output error
projected by a fixed random matrix, broadcast over time, as in e-prop with random feedback) is
multiplied by the neuron's eligibility. For a synapse i -> j::

    e_ij(t) = psi_j(t) xbar_i(t),   psi_j = 1 / (1 + slope |u_j(t) - theta|)^2,
    xbar_i(t) = beta xbar_i(t-1) + x_i(t)              (Synaptic: filtered by alpha, then beta)
    dW_ij = sum_t L_j(t) e_ij(t)

which the tensor path computes in the equivalent reverse-time form (delta(t) = sum_{t'>=t}
beta^(t'-t) L psi (t'), dW = sum_t delta(t) x(t)^T) so the update is one matmul over samples and time
steps. The reset's dependence on the weights is left out of the eligibility, as in e-prop.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from neurosal.errors import NeurosalError
from neurosal.models import Block, Net
from neurosal.report import save_figure

DEFAULTS = {"T": 25, "beta": 0.9, "theta": 1.0, "enc": "rate", "gain": 1.0, "neuron": "leaky",
            "alpha": 0.8, "slope": 25.0, "beta_out": 0.9}


def delay(s: torch.Tensor) -> torch.Tensor:
    """Spikes emitted at t arrive at t + 1 (time is dim 1)."""
    return torch.cat([torch.zeros_like(s[:, :1]), s[:, :-1]], dim=1)


def advance(s: torch.Tensor) -> torch.Tensor:
    """The inverse shift: what arrives at t + 1 belongs to step t (the last step's is lost)."""
    return torch.cat([s[:, 1:], torch.zeros_like(s[:, :1])], dim=1)


def lif_membrane(a, beta: float, theta: float, neuron: str = "leaky", alpha: float = 0.0):
    """u(t), the membrane at the threshold check (before reset), for input currents ``a`` (B, T, n),
    with snnTorch's arithmetic in the same order; the spikes are ``u > theta``."""
    m = torch.zeros_like(a[:, 0])
    syn = torch.zeros_like(a[:, 0])
    out = []
    for t in range(a.shape[1]):
        r = (m - theta > 0).to(a.dtype)
        if neuron == "leaky":
            u = beta * m + a[:, t] - r * theta
        else:
            syn = alpha * syn + a[:, t]
            u = beta * m + syn - r * theta
        s = (u - theta > 0).to(a.dtype)
        m = u - (s - r) * theta
        out.append(u)
    return torch.stack(out, 1)


class RateEncoder(nn.Module):
    """Bernoulli spikes with probability ``gain * x`` per step (x clipped to [0, 1]); delayed by one
    step like every synaptic input. Uses torch's global generator (seeded, checkpointed)."""

    def __init__(self, steps: int, gain: float = 1.0):
        super().__init__()
        self.steps, self.gain = steps, gain

    def forward(self, x):
        p = (x.flatten(1).clamp(0, 1) * self.gain).clamp(0, 1)
        return delay(torch.bernoulli(p.unsqueeze(1).expand(-1, self.steps, -1).contiguous()))


class LatencyEncoder(nn.Module):
    """One spike per input, earlier for larger values: t = round((1 - x) (T - 1)); x <= 0.05 is silent."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps

    def forward(self, x):
        x = x.flatten(1).clamp(0, 1)
        t = torch.round((1 - x) * (self.steps - 1)).long()
        s = torch.zeros(x.shape[0], self.steps, x.shape[1], dtype=x.dtype, device=x.device)
        s.scatter_(1, t.unsqueeze(1), (x > 0.05).to(x.dtype).unsqueeze(1))
        return delay(s)


class LIFTail(nn.Module):
    """A population of LIF neurons: input currents (B, T, n) -> delayed spikes (B, T, n)."""

    shares_feedback_over_time = True  # direct rules broadcast one projection over all steps

    def __init__(self, beta=0.9, theta=1.0, slope=25.0, neuron="leaky", alpha=0.8):
        super().__init__()
        import snntorch as snn
        from snntorch import surrogate

        if neuron not in ("leaky", "synaptic"):
            raise NeurosalError(f"snn: neuron must be 'leaky' or 'synaptic', not {neuron!r}")
        if not (0 < beta <= 1 and 0 <= alpha <= 1 and theta > 0 and slope > 0):
            raise NeurosalError("snn: need 0 < beta <= 1, 0 <= alpha <= 1, theta > 0, slope > 0")
        self.beta, self.theta, self.slope, self.neuron, self.alpha = beta, theta, slope, neuron, alpha
        grad = surrogate.fast_sigmoid(slope=slope)
        kw = dict(beta=beta, threshold=theta, spike_grad=grad, reset_mechanism="subtract", reset_delay=False)
        self.cell = snn.Leaky(**kw) if neuron == "leaky" else snn.Synaptic(alpha=alpha, **kw)
        # the decays snnTorch really applies (stored as float32 tensors): the local rule and the Brian2
        # twin must use these exact values
        self.beta = float(self.cell.beta)
        self.alpha = float(self.cell.alpha) if neuron == "synaptic" else alpha

    def forward(self, a):
        return delay(self.run(a)[0])

    def run(self, a):
        """Spikes and membranes (after reset) of every step, through snnTorch."""
        spikes, mems = [], []
        if self.neuron == "leaky":
            mem = torch.zeros_like(a[:, 0])
            for t in range(a.shape[1]):
                spk, mem = self.cell(a[:, t], mem)
                spikes.append(spk)
                mems.append(mem)
        else:
            syn = mem = torch.zeros_like(a[:, 0])
            for t in range(a.shape[1]):
                spk, syn, mem = self.cell(a[:, t], syn, mem)
                spikes.append(spk)
                mems.append(mem)
        return torch.stack(spikes, 1).to(a.dtype), torch.stack(mems, 1)  # snnTorch emits float32

    @torch.no_grad()
    def membrane(self, a):
        """u(t) before reset -- the state the surrogate derivative is taken at."""
        return lif_membrane(a, self.beta, self.theta, self.neuron, self.alpha)

    def local_vjp(self, state, g):
        """The e-prop local rule: teaching signal x eligibility, as a signal on the input current."""
        a, _ = state
        psi = 1.0 / (1.0 + self.slope * (self.membrane(a) - self.theta).abs()) ** 2
        delta = _reverse_filter(advance(g) * psi, self.beta)  # output at t+1 <- spike at t
        if self.neuron == "synaptic":
            delta = _reverse_filter(delta, self.alpha)
        return delta


def _reverse_filter(q: torch.Tensor, decay: float) -> torch.Tensor:
    """d(t) = q(t) + decay d(t+1): the backward form of a forward exponential trace."""
    out = torch.empty_like(q)
    acc = torch.zeros_like(q[:, 0])
    for t in range(q.shape[1] - 1, -1, -1):
        acc = q[:, t] + decay * acc
        out[:, t] = acc
    return out


class LeakyReadout(nn.Module):
    """Non-spiking output neurons: m(t) = beta m(t-1) + I(t); logits = mean over time of m."""

    def __init__(self, beta=0.9):
        super().__init__()
        self.beta = beta

    def forward(self, a):
        m = torch.zeros_like(a[:, 0])
        total = torch.zeros_like(m)
        for t in range(a.shape[1]):
            m = self.beta * m + a[:, t]
            total = total + m
        return total / a.shape[1]


def parse(spec: str) -> tuple[list[int], dict]:
    parts = spec.split(":")
    if parts[0].strip().lower() != "snn" or len(parts) < 2 or not parts[1]:
        raise NeurosalError(f"cannot parse spiking model {spec!r}: use snn:100x100[:T=25,beta=0.9,...]")
    try:
        widths = [int(w) for w in parts[1].split("x")]
    except ValueError:
        raise NeurosalError(f"cannot parse spiking model {spec!r}: widths like 100x100") from None
    opts = dict(DEFAULTS)
    for item in (parts[2].split(",") if len(parts) > 2 and parts[2] else []):
        k, _, v = item.partition("=")
        if k not in DEFAULTS:
            raise NeurosalError(f"unknown spiking model option {k!r}; known: {', '.join(DEFAULTS)}")
        try:
            opts[k] = type(DEFAULTS[k])(v) if not isinstance(DEFAULTS[k], str) else v
        except ValueError:
            raise NeurosalError(f"bad value for spiking model option {k}: {v!r}") from None
    if opts["enc"] not in ("rate", "latency"):
        raise NeurosalError(f"snn: enc must be 'rate' or 'latency', not {opts['enc']!r}")
    if opts["T"] < 2 or any(w <= 0 for w in widths):
        raise NeurosalError("snn: need T >= 2 and positive widths")
    return widths, opts


def build_snn(spec: str, input_shape, n_classes: int, linear=nn.Linear, tail=lambda act: act) -> Net:
    """The model plugin behind ``snn:...`` specs (``tail`` is ignored: spiking neurons are the tail)."""
    widths, o = parse(spec)
    n_in = 1
    for d in input_shape:
        n_in *= d
    stem = RateEncoder(o["T"], o["gain"]) if o["enc"] == "rate" else LatencyEncoder(o["T"])
    blocks = []
    for w in widths:
        blocks.append(Block(linear(n_in, w), LIFTail(o["beta"], o["theta"], o["slope"], o["neuron"], o["alpha"])))
        n_in = w
    blocks.append(Block(nn.Linear(n_in, n_classes), LeakyReadout(o["beta_out"])))
    return Net(stem, blocks, spec)


@torch.no_grad()
def record(net: Net, x: torch.Tensor) -> dict:
    """Spike trains and membranes of every hidden layer for inputs ``x`` (for plots and checks)."""
    was = net.training
    net.eval()
    h = net.stem(x)
    out = {"input": advance(h), "layers": []}
    for blk in net.blocks[:-1]:
        a = blk.op(h)
        spikes, _ = blk.post.run(a)
        out["layers"].append({"spikes": spikes, "membrane": blk.post.membrane(a)})
        h = delay(spikes)
    net.train(was)
    return out


def plot_activity(net: Net, x: torch.Tensor, path, sample: int = 0, neurons: int = 8) -> None:
    """Spike raster of every layer and membrane traces of a few hidden neurons, for one sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = record(net, x[sample:sample + 1])
    trains = [("input", rec["input"][0])] + [(f"hidden {i}", r["spikes"][0]) for i, r in enumerate(rec["layers"])]
    fig, axes = plt.subplots(len(trains) + 1, 1, figsize=(8, 2.2 * (len(trains) + 1)), sharex=True)
    for ax, (name, s) in zip(axes, trains):
        t, n = torch.nonzero(s, as_tuple=True)
        ax.scatter(t.numpy(), n.numpy(), s=4, marker="|")
        ax.set(ylabel=f"{name}\nneuron")
    mem = rec["layers"][0]["membrane"][0][:, :neurons]
    for j in range(mem.shape[1]):
        axes[-1].plot(mem[:, j].numpy(), lw=1)
    axes[-1].axhline(net.blocks[0].post.theta, ls="--", color="k", lw=0.8)
    axes[-1].set(xlabel="time step", ylabel="membrane u(t)\n(hidden 0)")
    fig.tight_layout()
    save_figure(fig, path)
