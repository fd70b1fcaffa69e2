"""The same spiking network and the same on-chip learning rule, simulated event by event in Brian2.

Per time step (schedule ``groups -> synapses -> thresholds -> resets``, dt = 1 step)::

    groups      r = (v > theta);  v = beta v - r theta + bias       (snnTorch's subtractive reset flag)
                xbar = beta xbar (per synapse);  bbar = beta bbar + 1 (bias trace)
    synapses    spikes emitted in the previous step arrive:  v_post += w;  xbar += 1
    thresholds  psi = 1 / (1 + slope |v - theta|)^2              (surrogate derivative at u(t))
                dw += L_post(t) psi_post xbar;  db += L(t) psi bbar   (the three-factor update)
                spike if v > theta
    resets      v -= theta for spiking neurons;  v += r theta for all  (= snnTorch's reset algebra)

``L`` is the broadcast third factor (the rule's teaching signal per neuron and step, a TimedArray).
This is exactly the tensor path of :mod:`hw_models.snn` in float64; :func:`cross_check` runs both on
the same weights, inputs and dt and compares spike trains and weight changes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from neurosal.checkpoint import atomic_write_text, ensure_writable_dir
from neurosal.cli import number_list, positive_int
from neurosal.errors import NeurosalError


def simulate(weights, biases, input_spikes, third_factor, beta, theta, slope, target="numpy") -> dict:
    """One sample. ``weights[l]``: (n_out, n_in); ``input_spikes``: (T, n_in) spikes *emitted* by the
    input at each step; ``third_factor[l]``: (T, n_l). Returns spike trains, membranes, dW, db."""
    import brian2 as b2

    b2.prefs.codegen.target = target
    T = input_spikes.shape[0]
    dt = b2.defaultclock.dt
    net = b2.Network()
    idx, steps = np.nonzero(input_spikes.T)
    src = b2.SpikeGeneratorGroup(input_spikes.shape[1], idx, steps * dt)
    net.add(src)
    namespace = {"beta": beta, "theta": theta, "slope": slope}
    layers, syns, mons, vmons = [], [], [], []
    for l, (w, b, lf) in enumerate(zip(weights, biases, third_factor)):
        n_out, n_in = w.shape
        ns = dict(namespace, **{f"L{l}": b2.TimedArray(np.asarray(lf, dtype=float), dt=dt)})
        g = b2.NeuronGroup(n_out, "v : 1\nr : 1\nbias : 1\nbbar : 1\npsi : 1\ndb : 1",
                           threshold="v > theta", reset="v -= theta", namespace=ns, name=f"layer{l}")
        g.bias = b
        g.run_regularly("r = int(v > theta)\nv = beta*v - r*theta + bias\nbbar = beta*bbar + 1",
                        when="groups", name=f"layer{l}_decay")
        g.run_regularly(f"psi = 1/(1 + slope*abs(v - theta))**2\ndb += L{l}(t, i)*psi*bbar",
                        when="thresholds", order=-2, name=f"layer{l}_psi")
        g.run_regularly("v += r*theta", when="resets", order=1, name=f"layer{l}_reset_flag")
        s = b2.Synapses(src if l == 0 else layers[-1], g, "w : 1\nxbar : 1\ndw : 1",
                        on_pre="v_post += w\nxbar += 1", namespace=ns, name=f"syn{l}")
        pre, post = np.meshgrid(np.arange(n_in), np.arange(n_out))
        s.connect(i=pre.ravel(), j=post.ravel())
        s.w = np.asarray(w, dtype=float).ravel()
        s.run_regularly("xbar = beta*xbar", when="groups", name=f"syn{l}_decay")
        s.run_regularly(f"dw += L{l}(t, j)*psi_post*xbar", when="thresholds", order=-1, name=f"syn{l}_elig")
        mon = b2.SpikeMonitor(g)
        vmon = b2.StateMonitor(g, "psi", record=True, when="thresholds", order=-1)
        net.add(g, s, mon, vmon)
        layers.append(g)
        syns.append(s)
        mons.append(mon)
        vmons.append(vmon)
    net.schedule = ["start", "groups", "synapses", "thresholds", "resets", "end"]
    net.run(T * dt, namespace={})  # every name is in the groups' own namespaces
    out = {"spikes": [], "dw": [], "db": [], "psi": []}
    for g, s, mon, vmon, w in zip(layers, syns, mons, vmons, weights):
        train = np.zeros((T, len(g)), dtype=bool)
        steps = np.round(np.asarray(mon.t / dt)).astype(int)
        train[steps, np.asarray(mon.i)] = True
        out["spikes"].append(train)
        dw = np.zeros(w.shape)
        dw[np.asarray(s.j), np.asarray(s.i)] = np.asarray(s.dw)
        out["dw"].append(dw)
        out["db"].append(np.asarray(g.db))
        out["psi"].append(np.asarray(vmon.psi).T)
    return out


def cross_check(widths=(20, 10), n_in=16, steps=30, samples=2, beta=0.9, theta=1.0, slope=25.0, seed=0,
                target="numpy", rate=0.3) -> dict:
    """Tensor path vs Brian2 on the same weights, inputs and dt; DFA's broadcast error as third factor."""
    from neurosal.engine import block_output_shapes, forward_cached
    from neurosal.layers import output_error, weight_update
    from neurosal.rules import make_rule

    from .snn import advance, build_snn, delay

    torch.manual_seed(seed)
    spec = f"snn:{'x'.join(map(str, widths))}:T={steps},beta={beta},theta={theta},slope={slope}"
    net = build_snn(spec, (n_in,), 4).double()
    for blk in net.blocks[:-1]:  # strong enough weights that every layer spikes
        blk.op.weight.data.mul_(3.0)
    rule = make_rule("dfa")
    rule.setup(net, block_output_shapes(net, (n_in,)), 4, torch.Generator().manual_seed(seed + 1))
    rule.double()
    gen = torch.Generator().manual_seed(seed + 2)
    raw = (torch.rand(samples, steps, n_in, generator=gen, dtype=torch.float64) < rate).double()
    x = delay(raw)  # what the first layer receives
    y = torch.randint(0, 4, (samples,), generator=gen)

    # tensor path: the engine's forward and DFA's teaching signals through the LIF tails' local rule
    net.stem = torch.nn.Identity()
    t0 = time.perf_counter()
    logits, cache = forward_cached(net, x)
    _, e = output_error(logits, y)
    target_1h = torch.nn.functional.one_hot(y, 4).double()
    deltas = dict(rule.teach(net, cache, e, target_1h))
    t_tensor = time.perf_counter() - t0
    report = {"widths": list(widths), "n_in": n_in, "steps": steps, "samples": samples, "target": target,
              "layers": []}
    tensor_dw, tensor_db = zip(*(weight_update(cache[l].op, cache[l].x, deltas[l]) for l in range(len(widths))))
    tensor_spikes = [c.post.run(c.state[0])[0] for c in cache[:-1]]  # as emitted (before the delay)
    # the third factor each neuron sees at each step: the signal on its (delayed) output, one step on
    third = [advance(rule.signal(l, e, target_1h)) for l in range(len(widths))]

    t0 = time.perf_counter()
    b_dw = [np.zeros(w.shape) for w in tensor_dw]
    b_db = [np.zeros(len(b)) for b in tensor_db]
    b_spikes = []
    for s in range(samples):
        lif = net.blocks[0].post  # the decay snnTorch applies (float32-rounded), the same for Brian2
        res = simulate([blk.op.weight.detach().numpy() for blk in net.blocks[:-1]],
                       [blk.op.bias.detach().numpy() for blk in net.blocks[:-1]],
                       raw[s].numpy().astype(bool), [g[s].numpy() for g in third], lif.beta, lif.theta,
                       lif.slope, target)
        for l in range(len(widths)):
            b_dw[l] += res["dw"][l]
            b_db[l] += res["db"][l]
        b_spikes.append(res["spikes"])
    t_brian = time.perf_counter() - t0
    ok = True
    for l in range(len(widths)):
        ts = tensor_spikes[l].numpy().astype(bool)
        bs = np.stack([b[l] for b in b_spikes])
        same = bool(np.array_equal(ts, bs))
        tw = tensor_dw[l].numpy()
        rel = float(np.abs(tw - b_dw[l]).max() / max(np.abs(tw).max(), 1e-300))
        relb = float(np.abs(tensor_db[l].numpy() - b_db[l]).max() / max(np.abs(tensor_db[l].numpy()).max(), 1e-300))
        report["layers"].append({"layer": l, "spikes_tensor": int(ts.sum()), "spikes_brian2": int(bs.sum()),
                                 "spike_trains_identical": same, "dw_max_rel_error": rel, "db_max_rel_error": relb})
        ok &= same and rel <= 1e-5 and relb <= 1e-5
    report.update(ok=bool(ok), tolerance=1e-5, seconds_tensor=t_tensor, seconds_brian2=t_brian)
    return report


def cmd_crosscheck(args) -> int:
    widths = tuple(number_list(args.widths, "widths"))
    if not widths:
        raise NeurosalError("--widths is empty")
    if args.out:
        ensure_writable_dir(Path(args.out).parent)
    rep = cross_check(widths, args.inputs, args.steps, args.samples, seed=args.seed, target=args.target)
    for layer in rep["layers"]:
        print(f"layer {layer['layer']}: spikes tensor {layer['spikes_tensor']} / Brian2 {layer['spikes_brian2']}, "
              f"identical trains: {layer['spike_trains_identical']}, dW max rel error {layer['dw_max_rel_error']:.2e}, "
              f"db max rel error {layer['db_max_rel_error']:.2e}")
    print(f"{'OK' if rep['ok'] else 'MISMATCH'} (tolerance {rep['tolerance']:g}); tensor {rep['seconds_tensor']:.3f} s, "
          f"Brian2[{args.target}] {rep['seconds_brian2']:.2f} s")
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(rep, indent=2))
    return 0 if rep["ok"] else 1


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("snn-crosscheck", help="tensor SNN vs Brian2: same spikes, same weight changes?")
    p.add_argument("--widths", default="20,10", help="hidden LIF layer sizes")
    p.add_argument("--inputs", type=positive_int, default=16)
    p.add_argument("--steps", type=positive_int, default=30)
    p.add_argument("--samples", type=positive_int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", default="numpy", choices=["numpy", "cython"], help="Brian2 code generation")
    p.add_argument("--out", default=None, help="write the report as JSON")
    p.set_defaults(func=cmd_crosscheck)
