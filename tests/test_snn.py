"""Spiking networks: LIF dynamics, eligibility traces, tensor vs Brian2, online learning on digits."""


import pytest
import torch

from hw_models.snn import LIFTail, _reverse_filter, build_snn, delay, record
from neurosal.data import load_dataset
from neurosal.errors import NeurosalError
from neurosal.train import TrainConfig, Trainer


def test_lif_matches_the_closed_form():
    """Constant current I below threshold: u(t) = I (1 - beta^(t+1)) / (1 - beta); above it, the first
    spike comes at the first t with u(t) > theta, and the membrane drops by theta."""
    beta, theta = 0.75, 1.0  # exact in float32, as snnTorch stores it
    lif = LIFTail(beta=beta, theta=theta)
    t = torch.arange(40, dtype=torch.float64)
    sub = torch.full((1, 40, 1), 0.2, dtype=torch.float64)  # fixed point 0.8 < theta: never fires
    u = lif.membrane(sub)[0, :, 0]
    assert torch.allclose(u, 0.2 * (1 - beta ** (t + 1)) / (1 - beta), atol=1e-12)
    assert lif.run(sub)[0].sum() == 0
    supra = torch.full((1, 40, 1), 0.3, dtype=torch.float64)  # fixed point 1.2 > theta
    spikes, mem = lif.run(supra)
    first = int(torch.nonzero(spikes[0, :, 0])[0])
    closed = 0.3 * (1 - beta ** (t + 1)) / (1 - beta)
    assert first == int(torch.nonzero(closed > theta)[0])
    assert mem[0, first, 0].item() == pytest.approx(closed[first].item() - theta, abs=1e-12)
    assert torch.equal(lif.membrane(supra)[0, :, 0] > theta, spikes[0, :, 0] > 0)


def test_eligibility_trace_update_equals_hand_computed():
    """dW_ij = sum_t L_j(t) psi_j(t) xbar_i(t), xbar the presynaptic trace -- computed by hand in the
    forward (on-chip) form and compared with the tensor path's reverse-time form."""
    torch.manual_seed(0)
    slope = 25.0
    lif = LIFTail(beta=0.9, slope=slope)
    beta = lif.beta  # the float32-rounded decay snnTorch applies
    T, n_in, n = 12, 3, 2
    x = (torch.rand(1, T, n_in) < 0.5).double()
    w = torch.randn(n, n_in, dtype=torch.float64)
    a = x @ w.T
    g = torch.randn(1, T, n, dtype=torch.float64)  # signal on the delayed output
    delta = lif.local_vjp((a, delay(lif.run(a)[0])), g)
    tensor_dw = delta[0].T @ x[0]
    u = lif.membrane(a)[0]
    psi = 1 / (1 + slope * (u - 1.0).abs()) ** 2
    L = torch.cat([g[0, 1:], torch.zeros(1, n, dtype=torch.float64)])  # spike at t is read at t+1
    xbar = torch.zeros(n_in, dtype=torch.float64)
    hand = torch.zeros(n, n_in, dtype=torch.float64)
    for t in range(T):
        xbar = beta * xbar + x[0, t]
        hand += torch.outer(L[t] * psi[t], xbar)
    assert torch.allclose(tensor_dw, hand, rtol=1e-12, atol=1e-14)


def test_reverse_filter_is_the_adjoint_of_the_forward_trace():
    q = torch.randn(2, 9, 3, dtype=torch.float64)
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    fwd = torch.zeros_like(x)
    acc = torch.zeros_like(x[:, 0])
    for t in range(9):
        acc = 0.7 * acc + x[:, t]
        fwd[:, t] = acc
    assert torch.allclose((q * fwd).sum(), (_reverse_filter(q, 0.7) * x).sum())


def test_tensor_and_brian2_agree():
    pytest.importorskip("brian2")
    from hw_models.brian import cross_check

    rep = cross_check(widths=(20, 10), n_in=16, steps=30, samples=2, seed=0, target="numpy")
    for layer in rep["layers"]:
        assert layer["spike_trains_identical"], layer
        assert layer["spikes_tensor"] > 10
        assert layer["dw_max_rel_error"] <= 1e-5 and layer["db_max_rel_error"] <= 1e-5, layer
    assert rep["ok"]


def test_online_dfa_snn_on_digits_reaches_85_percent():
    ds = load_dataset("digits")
    cfg = TrainConfig(rule="dfa", model="snn:100", epochs=5, batch_size=32, progress=False)
    hist = Trainer(cfg, None, dataset=ds).fit()["epochs"]
    assert hist[-1]["test_acc"] >= 0.85, [r["test_acc"] for r in hist]  # measured 91.3%


def test_bptt_baseline_and_sal_areas_on_spiking_layers():
    ds = load_dataset("digits")
    for rule, opts in (("bp", {}), ("sal", {"areas": 2})):
        cfg = TrainConfig(rule=rule, model="snn:64:T=15", epochs=2, batch_size=32, progress=False, rule_options=opts)
        tr = Trainer(cfg, None, dataset=ds)
        hist = tr.fit()["epochs"]
        assert hist[-1]["test_acc"] > 0.5, (rule, hist[-1])
    assert type(tr.net.blocks[0].op).__name__ == "AreaLinear"
    assert sum(hist[-1]["area_usage"][0]) == len(ds.x_train)


def test_spiking_net_on_analog_synapses_and_synaptic_neurons():
    """Synaptic-current neurons, trained online with DFA, with weights in a linear 256-level device:
    learns, and tracks float weights (measured 76.1% float vs 75.9% analog)."""
    ds = load_dataset("digits")
    acc = {}
    for device in (None, "linear-256"):
        cfg = TrainConfig(rule="dfa", model="snn:48:T=12,neuron=synaptic,alpha=0.5", epochs=3, batch_size=32,
                          device=device, progress=False)
        tr = Trainer(cfg, None, dataset=ds)
        acc[device] = tr.fit()["epochs"][-1]["test_acc"]
    assert type(tr.net.blocks[0].op).__name__ == "AnalogLinear"
    assert acc[None] > 0.6 and abs(acc["linear-256"] - acc[None]) < 0.05, acc


def test_latency_encoding_and_recording():
    net = build_snn("snn:8:T=10,enc=latency", (4,), 3)
    x = torch.tensor([[1.0, 0.5, 0.0, 0.2]])
    rec = record(net, x)
    inp = rec["input"][0]
    assert inp.sum() == 3  # the 0.0 input stays silent
    assert inp[0, 0] == 1 and inp[round(0.5 * 9), 1] == 1  # larger values fire earlier
    assert rec["layers"][0]["spikes"].shape == (1, 10, 8)


@pytest.mark.parametrize("spec,msg", [("snn:abc", "widths"), ("snn:10:T=1", "T >= 2"),
                                      ("snn:10:foo=1", "unknown spiking model option"),
                                      ("snn:10:enc=morse", "enc must be")])
def test_bad_spiking_specs(spec, msg):
    with pytest.raises(NeurosalError, match=msg):
        build_snn(spec, (4,), 2)


def test_snn_cli_train_plot_and_crosscheck(tmp_path, capsys):
    from neurosal.cli import main

    run = tmp_path / "run"
    assert main(["train", "--rule", "dfa", "--model", "snn:32:T=10", "--epochs", "1", "--out", str(run),
                 "--no-progress"]) == 0, capsys.readouterr().err
    assert main(["snn-plot", str(run)]) == 0, capsys.readouterr().err
    assert (run / "activity.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["snn-crosscheck", "--widths", "12", "--steps", "20", "--samples", "1", "--out",
                 str(tmp_path / "x.json")]) == 0
    assert "OK" in capsys.readouterr().out and (tmp_path / "x.json").exists()


def test_alignment_logging_does_not_change_training():
    ds = load_dataset("digits", limit=256)

    def weights(alignment):
        cfg = TrainConfig(rule="dfa", model="snn:16:T=6", epochs=2, batch_size=64, progress=False, alignment=alignment)
        tr = Trainer(cfg, None, dataset=ds)
        hist = tr.fit()["epochs"]
        return tr.net.state_dict(), hist

    (a, _), (b, hist) = weights(False), weights(True)
    assert "alignment_deg" in hist[-1]
    assert all(torch.equal(a[k], b[k]) for k in a)
