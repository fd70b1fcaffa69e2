"""ONNX/NIR export of every model kind, verified against torch in onnxruntime."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from export.extras import export_nir
from export.onnx_export import export_onnx, reference_outputs, run_onnxruntime, verify
from hw_models.snn import record
from neurosal.data import load_dataset
from neurosal.errors import NeurosalError
from neurosal.train import TrainConfig, Trainer

DIGITS = load_dataset("digits")


def trained(model, rule="dfa", device=None, epochs=2, **opts):
    cfg = TrainConfig(rule=rule, model=model, epochs=epochs, batch_size=32, device=device, progress=False,
                      rule_options=opts)
    tr = Trainer(cfg, None, dataset=DIGITS)
    tr.fit()
    return tr.net.eval()


def inputs(net, n=50):
    x = DIGITS.x_test[:n]
    if model_is_spiking(net):
        torch.manual_seed(0)
        with torch.no_grad():
            x = net.stem(x)
    return x


def model_is_spiking(net):
    return net.spec.startswith("snn")


@pytest.mark.parametrize("model,rule,device", [
    ("mlp:64x32", "dfa", None), ("cnn:4,8/16", "fa", None), ("mlp:32*3:relu:res", "bp", None),
    ("mlp:64x32", "sal", None), ("mlp:32", "dfa", "rram-like"), ("cnn:4/16", "dfa", "linear-256"),
    ("cnn:4/16", "fa", "rram-like"),
    ("snn:32:T=10", "dfa", None), ("snn:24:T=8,neuron=synaptic", "bp", None),
])
def test_onnx_parity_for_every_model_kind(tmp_path, model, rule, device):
    net = trained(model, rule, device)
    x = inputs(net)
    export_onnx(net, x[:2], tmp_path / "m.onnx")
    rep = verify(net, tmp_path / "m.onnx", x, tol=1e-5)
    assert rep["ok"] and rep["max_abs_diff"] <= 1e-5 and rep["argmax_agreement"] == 1.0, rep
    for n in (1, 7):  # dynamic batch
        assert run_onnxruntime(tmp_path / "m.onnx", x[:n])[0].shape == (n, 10)


@pytest.mark.parametrize("mode", ["gather", "dense"])
def test_sal_routing_is_identical_in_onnx(tmp_path, mode):
    net = trained("mlp:64x32", "sal", areas=4)
    x = inputs(net, 200)
    export_onnx(net, x[:2], tmp_path / "sal.onnx", extra_outputs=True, sal_mode=mode)
    assert verify(net, tmp_path / "sal.onnx", x)["ok"]
    outs = run_onnxruntime(tmp_path / "sal.onnx", x)
    h = net.stem(x)
    for i, blk in enumerate(net.blocks[:-1]):
        route = blk.op.route(h)
        assert np.array_equal(outs[1 + i], route.area.numpy()), i
        assert len(set(route.area.tolist())) > 1  # more than one area really in use
        h = blk(h)


def test_spiking_export_gives_identical_spikes(tmp_path):
    net = trained("snn:32x16:T=12", "dfa")
    x = inputs(net, 40)
    export_onnx(net, x[:2], tmp_path / "snn.onnx", extra_outputs=True)
    outs = run_onnxruntime(tmp_path / "snn.onnx", x)
    torch.manual_seed(0)
    rec = record(net, DIGITS.x_test[:40])
    for layer, spikes in zip(rec["layers"], outs[1:]):
        assert np.array_equal(spikes, layer["spikes"].numpy())
        assert spikes.sum() > 0


def test_exported_file_runs_with_onnxruntime_alone(tmp_path):
    net = trained("mlp:64x32", "sal")
    x = inputs(net, 20)
    export_onnx(net, x[:2], tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "ref.npy", reference_outputs(net, x).numpy())
    code = f"""
import sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession({str(tmp_path / 'm.onnx')!r}, providers=["CPUExecutionProvider"])
out = s.run(None, {{"input": np.load({str(tmp_path / 'x.npy')!r})}})[0]
assert "torch" not in sys.modules
print(float(np.abs(out - np.load({str(tmp_path / 'ref.npy')!r})).max()))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.strip()) <= 1e-5


def test_cli_export_with_int8_and_report(tmp_path):
    run = tmp_path / "run"
    Trainer(TrainConfig(rule="dfa", model="mlp:64x32", epochs=8, batch_size=32, progress=False), run).fit()
    r = subprocess.run([sys.executable, "-m", "neurosal.cli", "export", str(run), "--onnx", str(tmp_path / "m.onnx"),
                        "--int8", str(tmp_path / "q.onnx"), "--report", str(tmp_path / "r.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "max abs diff" in r.stdout and "int8 accuracy" in r.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["onnx"]["ok"] and rep["onnx"]["opset"] == 18
    assert rep["int8"]["accuracy_fp32"] > 0.85 and abs(rep["int8"]["change_points"]) < 5, rep["int8"]
    assert (tmp_path / "q.onnx").stat().st_size < (tmp_path / "m.onnx").stat().st_size


def test_nir_export_of_a_spiking_model(tmp_path):
    import nir

    net = trained("snn:16:T=8,beta=0.8", "dfa", epochs=1)
    export_nir(net, tmp_path / "m.nir")
    g = nir.read(str(tmp_path / "m.nir"))
    assert set(g.nodes) == {"input", "fc0", "neuron0", "fc1", "neuron1", "output"}
    assert isinstance(g.nodes["neuron0"], nir.LIF) and isinstance(g.nodes["neuron1"], nir.LI)
    beta = net.blocks[0].post.beta
    assert np.allclose(g.nodes["neuron0"].tau, 1e-3 / (1 - beta)) and g.nodes["neuron0"].tau.shape == (16,)
    assert np.allclose(g.nodes["fc0"].weight, net.blocks[0].op.weight.detach().numpy())


@pytest.mark.parametrize("model,rule,device,msg", [
    ("mlp:16", "dfa", None, "not spiking|non-spiking"),
    ("snn:16:T=6", "sal", None, "area routing"),
    ("snn:16:T=6", "dfa", "linear-256", "quantisation"),
])
def test_models_that_cannot_go_to_nir_get_a_clear_error(tmp_path, model, rule, device, msg):
    net = trained(model, rule, device, epochs=1)
    with pytest.raises(NeurosalError, match=msg):
        export_nir(net, tmp_path / "m.nir")


def test_unexportable_layer_is_a_clear_error(tmp_path):
    net = trained("mlp:16", "dfa", epochs=1)
    net.blocks[0].op = torch.nn.Bilinear(64, 64, 16)
    with pytest.raises(NeurosalError, match="cannot export layer type Bilinear"):
        export_onnx(net, DIGITS.x_test[:2], tmp_path / "m.onnx")
    r = subprocess.run([sys.executable, "-m", "neurosal.cli", "export", str(tmp_path / "nowhere"), "--onnx",
                        str(tmp_path / "m.onnx")], capture_output=True, text=True)
    assert r.returncode == 2 and "no checkpoint" in r.stderr


@pytest.mark.parametrize("rule", ["dfa", "drtp", "sal"])
def test_a_wrapped_model_never_run_exports(tmp_path, rule):
    """Train in one process, export in another: wrap a fresh model, load the state dict, export. The
    direct rules plan at their first forward (probe the model, draw the projection); export traced that
    planning into the graph and failed (torch.export could not decompose it). The export twin is the
    unwrapped model: parity with the trained one."""
    import torch.nn as nn
    from conftest import sgd_step

    import neurosal

    def make():
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))

    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    opts = {"run_steps": 4} if rule == "sal" else {}  # sal: the warm-up ends inside the run
    trained = neurosal.wrap(make(), rule, **opts)
    opt = torch.optim.Adam(trained.parameters(), lr=1e-2)
    for _ in range(4):
        sgd_step(trained, opt, x, y)
    fresh = neurosal.wrap(make(), rule, **opts)
    fresh.load_state_dict(trained.state_dict())
    export_onnx(fresh, x[:4], tmp_path / "m.onnx")
    got = run_onnxruntime(tmp_path / "m.onnx", x)[0]
    with torch.no_grad():
        want = trained.eval()(x)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    untrained = neurosal.wrap(make(), rule, **opts)  # a baseline exported before any step
    export_onnx(untrained, x[:4], tmp_path / "u.onnx")
    assert verify(untrained, tmp_path / "u.onnx", x)["ok"]


def test_a_deep_model_read_through_converters_verifies_up_to_code_flips(tmp_path):
    """Through 8-bit DAC/ADC a value torch and onnxruntime compute a rounding error apart can land on
    neighbouring codes, and in a deep network the flip travels on: a few samples differ, the rest agree
    to float precision. verify passes the faithful export and reports that share; an export of another
    model (every sample moves) still fails."""
    import copy

    import torch.nn as nn
    from hw_models.analog import convert

    torch.manual_seed(0)
    net = nn.Sequential(nn.Unflatten(1, (8, 16)), nn.Linear(16, 32),
                        nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 6),
                        nn.Flatten(1), nn.Linear(8 * 32, 10))
    convert(net, "rram-like")
    net.eval()
    x = torch.randn(300, 128)
    export_onnx(net, x[:2], tmp_path / "q.onnx")
    rep = verify(net, tmp_path / "q.onnx", x, tol=1e-5)
    assert rep["ok"] and rep["quantised"] and rep["median_abs_diff"] <= 1e-5, rep
    assert 0 <= rep["samples_beyond_tol"] < 0.2 and rep["argmax_agreement"] >= 0.98
    other = copy.deepcopy(net)
    with torch.no_grad():
        other[-1].bias.add_(1e-3)  # (digital; a small weight change can stay within the ADC's codes)
    assert not verify(other, tmp_path / "q.onnx", x, tol=1e-5)["ok"]
