"""Analog fidelity: the pair update moves both devices, requested == delivered at the operating point,
programming is verified by read-back, coincidence trains have a fixed length, randomness lives on the
array's device (bp with pulse coincidence: tests/test_analog.py)."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hw_models.array import DifferentialArray
from hw_models.devices import DeviceConfig
from neurosal.data import load_dataset
from neurosal.train import TrainConfig, Trainer

MODELS = [("linear", {}), ("softbounds", {}), ("lim", {"nl_p": 0.5, "nl_d": 0.25}), ("pow", {"gamma": 1.5})]


def pair_array(n=1, seed=0, **kw):
    cfg = DeviceConfig(**{"levels": 10, "pulses": "round", **kw})
    return DifferentialArray(cfg, (n,), 1.0, seed, dtype=torch.float64)


def test_single_pulse_decreases_move_both_devices_and_reach_minus_w_max():
    """Defect 1: the odd pulse of a decrease used to go to G+ always, so G- never moved and single-pulse
    updates could only reach -w_max/2."""
    a = pair_array()
    a.program(torch.zeros(1, dtype=torch.float64))
    g_minus0 = a.g[1, 0].item()
    for _ in range(3):
        a.apply(torch.tensor([-0.1], dtype=torch.float64))  # one pulse each
    assert a.g[1, 0].item() > g_minus0  # G- rose
    assert a.weights().item() == pytest.approx(-0.3, abs=1e-12)
    for _ in range(40):
        a.apply(torch.tensor([-0.1], dtype=torch.float64))
    assert a.weights().item() == pytest.approx(-1.0, abs=1e-12)  # the full range, not -0.5
    assert a.g[0, 0].item() == pytest.approx(0.0) and a.g[1, 0].item() == pytest.approx(1.0)


def test_alternating_single_pulses_do_not_drift_the_pair():
    """A +1/-1 pulse sequence keeps both devices near mid-range (no device walks to a bound)."""
    a = pair_array()
    a.program(torch.zeros(1, dtype=torch.float64))
    for i in range(200):
        a.apply(torch.tensor([0.1 if i % 2 == 0 else -0.1], dtype=torch.float64))
    assert abs(a.weights().item()) <= 0.1 + 1e-12
    assert (a.g[:, 0] - 0.5).abs().max().item() <= 0.1 + 1e-12


@pytest.mark.parametrize("update", ["bidirectional", "unidirectional"])
@pytest.mark.parametrize("model,kw", MODELS, ids=[m for m, _ in MODELS])
def test_delivered_equals_requested_at_the_operating_point(model, kw, update):
    """Defect 2: a soft-bounds pair delivered ~0.5x of each request near w = 0. Pulse counts are now
    calibrated at the operating point, for every device model."""
    n = 4000
    a = pair_array(n, levels=100, model=model, update=update, **kw)
    a.program(torch.zeros(n, dtype=torch.float64))
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).double()
    pulses = 1 if update == "unidirectional" else 2  # bidirectional: one up-step + one down-step
    request = sign * pulses * a.dw_pulse
    w0 = a.weights().clone()
    a.apply(request)
    ratio = ((a.weights() - w0) / request).mean().item()
    assert ratio == pytest.approx(1.0, abs=0.02), ratio


@pytest.mark.parametrize("model,kw", MODELS, ids=[m for m, _ in MODELS])
def test_programming_is_verified_by_read_back(model, kw):
    """Defect 2, second half: initial weights were written at 0.48x on soft-bounds devices."""
    n = 5000
    a = pair_array(n, levels=100, model=model, pulses="stochastic", **kw)
    target = (torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64) - 0.5) * 1.2
    a.program(target)
    held = a.weights()
    assert (held @ target / (target @ target)).item() == pytest.approx(1.0, abs=0.01)
    assert ((held - target).abs().max() / a.dw_pulse).item() <= 0.75  # within a pulse of the target
    open_loop = pair_array(n, levels=100, model=model, pulses="stochastic", write_verify=0, **kw)
    open_loop.program(target)
    assert (held - target).abs().mean() <= (open_loop.weights() - target).abs().mean() + 1e-12


def test_coincidence_trains_have_a_fixed_length_and_report_what_they_cut(monkeypatch):
    """Defect 3: the train used to grow to ~10^4 slots on `ideal`; now it is bl slots, and an update
    that needs more pulses than bl is cut, with the cut share reported."""
    cfg = DeviceConfig(levels=1_000_000, pulses="coincidence", bl=31)
    arr = DifferentialArray(cfg, (8, 16), 1.0, 0, dtype=torch.float64)
    shapes = []
    real = arr._fires
    monkeypatch.setattr(arr, "_fires", lambda p, lead=(), dtype=torch.bool: shapes.append((*lead, *p.shape))
                        or real(p, lead, dtype))
    x, d = torch.rand(4, 16, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    arr.coincidence_pulses(x, d, lr=0.1)
    assert sorted(shapes) == [(31, 4, 8), (31, 4, 16)]  # bl slots per sample and row/column
    cut = arr.take_clip_fraction()
    assert cut is not None and cut > 0.9  # ideal devices: a tiny dw_pulse, almost everything asked is cut
    assert arr.take_clip_fraction() is None  # reset after reading


def test_pulse_draws_have_the_stated_probability_and_certain_ends():
    """The 16-bit Bernoulli draws behind stochastic rounding and the coincidence trains: p = 0 never
    fires, p = 1 always does (the one outcome 16 bits cannot hold), and in between the rate is p within
    its binomial spread."""
    arr = DifferentialArray(DeviceConfig(levels=100), (1,), 1.0, 0)
    p = torch.tensor([0.0, 1.0, 0.3, 1e-3, 0.5 / 65536, 1 - 0.4 / 65536])
    fires = arr._fires(p, (400_000,), torch.int8).double().mean(0)
    assert fires[0] == 0 and fires[1] == 1
    for rate, q in zip(fires[2:4], (0.3, 1e-3)):
        assert abs(rate - q) < 5 * (q * (1 - q) / 400_000) ** 0.5
    assert fires[4] < 1e-4 and fires[5] == 1  # resolved to 1/65536: rounds to 0 and to certain
    as_float = arr._fires(p[:2], (1000,), torch.float64)  # stochastic rounding's dtype
    assert torch.equal(as_float, torch.tensor([0.0, 1.0], dtype=torch.float64).expand(1000, 2))


@pytest.mark.parametrize("shape", [(1, 31, 1), (1, 62, 17), (2, 31, 1), (17, 93, 3), (64, 992, 8)])
def test_coincidence_counts_are_exact_integer_products(shape):
    """The integer matmul behind the coincidence counts equals the float product for every layout it
    gets (a transposed view of the trains; one row is the case torch's CPU kernel miscounts)."""
    from hw_models.array import _count

    m, k, n = shape
    g = torch.Generator().manual_seed(m * k + n)
    a = torch.randint(-1, 2, (k, m), generator=g, dtype=torch.int8).t()
    b = torch.randint(-1, 2, (k, n), generator=g, dtype=torch.int8)
    ref = a.double() @ b.double()
    assert torch.equal(_count(a, b).double(), ref)
    assert torch.equal(_count(a.contiguous(), b).double(), ref)


def test_coincidence_with_a_silent_side_fires_nothing():
    """All-zero inputs or errors: no pulse and nothing asked (decided on the device, without a branch)."""
    arr = DifferentialArray(DeviceConfig(levels=100, pulses="coincidence"), (3, 4), 1.0, 0)
    for x, d in ((torch.zeros(2, 4), torch.randn(2, 3)), (torch.randn(2, 4), torch.zeros(2, 3))):
        up, down = arr.coincidence_pulses(x, d, lr=0.1)
        assert not up.any() and not down.any() and torch.isfinite(up).all()
    assert arr.take_clip_fraction() is None


def test_coincidence_cut_is_exact_for_one_device():
    cfg = DeviceConfig(levels=10, pulses="coincidence", bl=31)
    arr = DifferentialArray(cfg, (1, 1), 1.0, 0, dtype=torch.float64)
    x, d = torch.ones(1, 1, dtype=torch.float64), -torch.ones(1, 1, dtype=torch.float64)
    counts = torch.stack([torch.sub(*arr.coincidence_pulses(x, d, lr=6.0)) for _ in range(200)])  # asks 60
    assert torch.equal(counts, torch.full_like(counts, 31.0))  # both trains fire every slot: bl pulses
    assert arr.take_clip_fraction() == pytest.approx(1 - 31 / 60)


@pytest.mark.parametrize("model", ["linear", "softbounds"])
def test_coincidences_of_opposite_sign_are_separate_pulses(model):
    """Two samples asking for opposite changes of the same weight: no accumulator nets them, so both
    trains' pulses reach the device. A linear device ends where it started; a soft-bounds device drifts
    towards its symmetry point (w = 0), as in aihwkit's pulsed update."""
    n = 2000
    cfg = DeviceConfig(model=model, levels=50, pulses="coincidence", bl=31)
    arr = DifferentialArray(cfg, (1, n), 1.0, 0, dtype=torch.float64)
    arr.program(torch.full((1, n), 0.4, dtype=torch.float64))
    w0 = arr.weights().clone()
    x = torch.ones(2, n, dtype=torch.float64)
    d = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)  # the two samples cancel in -lr d^T x
    up, down = arr.coincidence_pulses(x, d, lr=0.1)
    assert up.sum() > 0 and down.sum() > 0
    arr.apply_pulses(up)
    arr.apply_pulses(-down)
    beyond_net = (arr.weights() - w0) - arr.dw_pulse * (up - down)  # what the net count does not explain
    if model == "linear":
        assert torch.allclose(beyond_net, torch.zeros_like(beyond_net), atol=1e-12)  # ups and downs cancel
    else:
        assert beyond_net.mean().item() < -0.1 * arr.dw_pulse  # pulled towards 0 from w = 0.4


def test_coincidence_on_ideal_devices_trains_and_warns_when_trains_cut(capsys):
    ds = load_dataset("digits")
    cfg = TrainConfig(rule="dfa", model="mlp:32", epochs=1, batch_size=32, optimizer="SGD", momentum=0.0,
                      lr=0.1, device="ideal", device_options={"pulses": "coincidence"}, progress=True)
    rec = Trainer(cfg, None, dataset=ds).fit()["epochs"][-1]
    assert len(rec["coincidence_clipped"]) == 2 and min(rec["coincidence_clipped"]) > 0.5
    assert "warning: epoch 1: the pulse trains cut" in capsys.readouterr().out


def test_randomness_lives_on_the_arrays_device():
    """Defect 4: draws were made on the CPU generator and copied over every step."""
    arr = pair_array(4)
    assert arr.gen.device == arr.g.device
    st = arr.state()
    arr.apply(torch.full((4,), 0.25, dtype=torch.float64))
    b = pair_array(4)
    b.load(st)
    b.apply(torch.full((4,), 0.25, dtype=torch.float64))
    assert torch.equal(arr.g, b.g)  # the generator state travels with the checkpoint


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_arrays_draw_on_the_gpu():
    cfg = DeviceConfig(levels=100, ctoc=0.1, read_noise=0.01)
    arr = DifferentialArray(cfg, (64, 64), 1.0, 0, device="cuda")
    assert arr.gen.device.type == "cuda"
    arr.program(torch.randn(64, 64, device="cuda") * 0.1)
    arr.apply(torch.randn(64, 64, device="cuda") * 0.05)
    assert arr.g.device.type == "cuda" and torch.isfinite(arr.g).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_model_converted_on_the_cpu_moves_to_the_gpu_with_its_arrays():
    """convert() on the CPU, then model.cuda(): the arrays and their generators follow (they stayed on the
    CPU, plain tensors beside the parameters), and a training step runs on the GPU."""
    import torch.nn as nn
    import torch.nn.functional as F

    import neurosal
    from hw_models.analog import attach, convert

    torch.manual_seed(0)
    m = convert(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), "rram-like").cuda()
    arrays = [a for layer in (m[0], m[2]) for a in layer.tiles.arrays]
    assert all(a.g.device.type == "cuda" and a.gen.device.type == "cuda" for a in arrays)
    w = neurosal.wrap(m, "fa")
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    attach(opt, w.model)
    g0 = arrays[0].g.clone()
    F.cross_entropy(w(torch.randn(4, 8, device="cuda")), torch.randint(0, 3, (4,), device="cuda")).backward()
    opt.step()
    assert not torch.equal(arrays[0].g, g0) and torch.isfinite(arrays[0].g).all()


def test_every_preset_states_its_source():
    from hw_models.presets import PRESETS, SOURCES

    assert set(SOURCES) == set(PRESETS)
    assert all(len(text) > 60 for text in SOURCES.values())


# ----------------------------------------------------------------------------- read noise, per read
@pytest.mark.parametrize("kind", ["linear", "conv", "conv_groups", "conv1d", "conv3d"])
def test_read_noise_is_fresh_for_every_read(kind):
    """Every matrix-vector product (each sample; each output position of a convolution) meets its own
    draw of the conductances: the output noise has std read_noise*sqrt(2)*w_max*|input it reads| and is
    independent between reads -- identical samples in one batch read differently (one weight draw shared
    by the batch, the former model, gave them identical outputs: correlation 1)."""
    import torch.nn as nn
    import torch.nn.functional as F
    from hw_models.analog import convert, patch_sumsq, row_sumsq

    torch.manual_seed(0)
    cfg = DeviceConfig(levels=1000, read_noise=0.02)
    if kind == "linear":
        layer = convert(nn.Sequential(nn.Linear(48, 64, bias=False)), cfg, seed=1)[0]
        x = torch.randn(1, 48).repeat(400, 1)  # one input read 400 times
        sumsq, exact = row_sumsq, lambda v: F.linear(v, layer.weight)
    elif kind == "conv3d":
        layer = convert(nn.Sequential(nn.Conv3d(2, 6, 3, padding=1, bias=False)), cfg, seed=1)[0]
        x = torch.randn(1, 2, 5, 5, 5).repeat(50, 1, 1, 1, 1)
        x[:, :, 0] = 0  # a zero slice: patches of unequal norms
        sumsq = patch_sumsq(layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups,
                            layer.out_channels)
        exact = lambda v: F.conv3d(v, layer.weight, None, layer.stride, layer.padding)  # noqa: E731
    elif kind == "conv1d":
        layer = convert(nn.Sequential(nn.Conv1d(4, 6, 5, padding=2, dilation=1, bias=False)), cfg, seed=1)[0]
        x = torch.randn(1, 4, 40).repeat(100, 1, 1)
        x[:, :, :2] = 0  # patches of unequal norms (none all zero)
        sumsq = patch_sumsq(layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups,
                            layer.out_channels)
        exact = lambda v: F.conv1d(v, layer.weight, None, layer.stride, layer.padding, layer.dilation,  # noqa: E731
                                   layer.groups)
    else:
        layer = convert(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2 if kind == "conv_groups" else 1,
                                                bias=False)), cfg, seed=1)[0]
        x = torch.randn(1, 4, 6, 6).repeat(100, 1, 1, 1)
        x[:, :, 0] = 0  # a zero row of the image: patches of unequal norms
        sumsq = patch_sumsq(layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups,
                            layer.out_channels)
        exact = lambda v: F.conv2d(v, layer.weight, None, layer.stride, layer.padding, layer.dilation,  # noqa: E731
                                   layer.groups)
    t = layer.tiles
    with torch.no_grad():
        z = (layer(x) - exact(x)) / (t.cfg.read_noise * 2 ** 0.5 * t.w_max * sumsq(x).sqrt())
    z = z.reshape(x.shape[0], -1)
    assert torch.isfinite(z).all() and z.numel() > 10_000
    assert abs(float(z.mean())) < 0.05 and abs(float(z.var()) - 1) < 0.06
    c = torch.corrcoef(z[:50])  # between reads of the same input
    assert abs(float(c[~torch.eye(50, dtype=torch.bool)].mean())) < 0.05


# ----------------------------------------------------------------------------- attention on devices

def _encoder(batch_first=True):
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first, norm_first=True).double()


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_projections_are_read_through_their_arrays(batch_first):
    """torch's attention reads in_proj_weight / out_proj.weight directly: converted, both projections must
    go through their arrays. With read noise, two reads of the same input differ (they did not: the
    attention was read as floats); with an exactly reading device the written-out attention is torch's."""
    from hw_models.analog import AnalogLinear, AnalogMultiheadAttention, convert

    x = torch.randn(3, 5, 16, dtype=torch.float64)
    n = x.shape[1 if batch_first else 0]  # sequence length
    mask = torch.ones(n, n, dtype=torch.bool).triu(1)
    ref = _encoder(batch_first)
    exact = convert(copy.deepcopy(ref), DeviceConfig(levels=1_000_000))
    assert isinstance(exact.self_attn, AnalogMultiheadAttention)
    assert isinstance(exact.self_attn.out_proj, AnalogLinear)
    for m in (ref, exact):
        m.eval()
    with torch.no_grad():
        want = ref.self_attn(x, x, x, attn_mask=mask)[0]
        got = exact.self_attn(x, x, x, attn_mask=mask)[0]
    # the devices hold the weights to 1e-6 of w_max (10^6 levels): close, not bitwise
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()))
    noisy = convert(copy.deepcopy(ref), DeviceConfig(levels=1_000_000, read_noise=0.05))
    attn = noisy.self_attn
    attn.out_proj = copy.deepcopy(exact.self_attn.out_proj)  # noise only in the packed projection
    with torch.no_grad():
        a, b = attn(x, x, x)[0], attn(x, x, x)[0]
    assert float((a - b).abs().max()) > 1e-3 * float(a.abs().max())
    noisy.eval()
    with torch.no_grad():  # the fused eval path of the encoder layer must not bypass the arrays either
        assert not torch.equal(noisy(x), noisy(x))


def test_attention_on_devices_trains_with_fa_and_dfa_and_exports():
    from export.onnx_export import export_onnx, reference_outputs, run_onnxruntime
    from hw_models.analog import attach, convert
    from neurosal.zoo import build_zoo

    import neurosal

    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    for rule in ("fa", "dfa"):
        torch.manual_seed(0)
        vit = convert(build_zoo("vit:patch=4,dim=16,depth=1,heads=2", (1, 8, 8), 4), "linear-256")
        attn = vit.blocks[0].self_attn
        before = attn.in_proj_weight.detach().clone()
        w = neurosal.wrap(vit, rule)
        opt = torch.optim.Adam(w.parameters(), lr=3e-3)
        attach(opt, w)
        losses = []
        for _ in range(30):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(w(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss))
        assert losses[-1] < 0.7 * losses[0], (rule, losses[0], losses[-1])
        moved = attn.in_proj_weight.detach()
        assert not torch.equal(moved, before)
        step = attn.tiles.arrays[0].dw_pulse  # every weight a whole number of pulses from where it started
        assert float(((moved - before) / step - ((moved - before) / step).round()).abs().max()) < 1e-3
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "vit.onnx"
        model = w.unwrap()
        export_onnx(model, x[:2], path)
        ref = reference_outputs(model, x)
        got = torch.as_tensor(run_onnxruntime(path, x)[0])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_attention_refuses_coincidence_and_unpacked_projections():
    from hw_models.analog import AnalogLinear, AnalogMultiheadAttention, convert
    from neurosal.errors import NeurosalError

    with pytest.raises(NeurosalError, match="pulses=coincidence is defined for Linear layers"):
        AnalogMultiheadAttention.from_float(_encoder().self_attn, DeviceConfig(levels=256, pulses="coincidence"), 0)
    with pytest.warns(UserWarning, match=r"\['self_attn'\] have no analog version here .* stay digital"):
        layer = convert(_encoder(), DeviceConfig(levels=256, pulses="coincidence"))  # the rest on devices
    assert type(layer.self_attn) is nn.MultiheadAttention and type(layer.self_attn.out_proj) is not AnalogLinear
    assert isinstance(layer.linear1, AnalogLinear)
    torch.manual_seed(0)
    with pytest.raises(NeurosalError, match="packed default"):
        convert(nn.MultiheadAttention(16, 2, kdim=8, vdim=8), "linear-256")


def test_conv1d_models_train_on_devices_and_export():
    """A 1-d conv net (sequences) converted whole: the Conv1d on its own array, trained with fa in whole
    pulses, exported through its DAC/ADC with onnxruntime parity."""
    import tempfile
    from pathlib import Path

    import neurosal
    from export.onnx_export import export_onnx, reference_outputs, run_onnxruntime
    from hw_models.analog import AnalogConv1d, attach, convert

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(2, 6, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(4), nn.Flatten(),
                        nn.Linear(24, 3))
    convert(net, DeviceConfig(levels=256, dac_bits=8, adc_bits=8))
    assert isinstance(net[0], AnalogConv1d)
    x = torch.randn(24, 2, 30)
    y = (x[:, 0].mean(1) > 0).long() + (x[:, 1].mean(1) > 0).long()
    w = neurosal.wrap(net, "fa")
    opt = torch.optim.Adam(w.parameters(), lr=1e-2)
    attach(opt, w)
    before = net[0].weight.detach().clone()
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(w(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    moved = (net[0].weight.detach() - before) / net[0].tiles.arrays[0].dw_pulse
    assert float(moved.abs().max()) >= 1 and float((moved - moved.round()).abs().max()) < 1e-3
    model = w.unwrap()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c1.onnx"
        export_onnx(model, x[:2], path)
        ref = reference_outputs(model, x)
        got = torch.as_tensor(run_onnxruntime(path, x)[0])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    with pytest.raises(Exception, match="pad with zeros"):
        convert(nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular"), "linear-256")


def test_frozen_layers_stay_frozen_on_devices():
    from hw_models.analog import convert

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    net[0].requires_grad_(False)
    net[2].bias.requires_grad_(False)
    convert(net, "linear-256")
    assert [p.requires_grad for p in net.parameters()] == [False, False, True, False]
    # and they stay put under a layerwise rule, whose analog layers write their own update into .grad
    # (an optimiser handed every parameter skips a frozen one only while its .grad is None)
    import neurosal
    from hw_models.analog import attach

    before = [p.detach().clone() for p in net.parameters()]
    w = neurosal.wrap(net, "fa")
    opt = torch.optim.SGD(w.parameters(), lr=0.5)
    attach(opt, w)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(w(torch.randn(6, 4)), torch.tensor([0, 1, 0, 1, 0, 1])).backward()
        opt.step()
    moved = [not torch.equal(a, p) for a, p in zip(before, net.parameters())]
    assert moved == [False, False, True, False]


def test_an_optimiser_step_the_devices_never_saw_is_reported():
    """Forgetting hw_models.attach: the optimiser moves the float parameters, the devices are never
    programmed and every read uses weights they never held. Said (once per place); with attach, a
    state-dict round trip and drift, nothing is said."""
    import warnings

    import neurosal
    from hw_models.analog import attach, convert, drift

    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])

    def steps(attached):
        torch.manual_seed(0)
        w = neurosal.wrap(convert(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), "rram-like"), "fa")
        opt = torch.optim.Adam(w.parameters(), 1e-2)
        if attached:
            attach(opt, w)
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(w(x), y).backward()
            opt.step()
        w.load_state_dict(w.state_dict())
        drift(w, 10.0)
        w(x)

    with pytest.warns(UserWarning, match="devices were last programmed"):
        steps(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steps(True)


def test_read_only_passes_leave_the_arrays_random_streams_alone():
    """Planning probes, materialise and alignment measurements read through noisy arrays; like
    torch's generators under fork_rng, the arrays' own streams must be where they were afterwards (a
    measurement must not change what the training run draws next)."""
    import neurosal
    from hw_models.analog import convert
    from neurosal.wrap import alignment_report

    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    for rule in ("fa", "dfa"):
        torch.manual_seed(0)
        net = convert(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)),
                      DeviceConfig(levels=1000, read_noise=0.05))
        gens = [a.gen for m in net for a in getattr(getattr(m, "tiles", None), "arrays", [])]
        before = [g.get_state() for g in gens]
        w = neurosal.wrap(net, rule).materialise(x)
        alignment_report(w, x, y)
        assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, before)), rule


def test_convert_says_which_layers_stay_digital():
    from hw_models.analog import convert

    net = nn.Sequential(nn.ConvTranspose2d(2, 2, 3), nn.Flatten(), nn.LazyLinear(3))
    net(torch.randn(1, 2, 4, 4))
    with pytest.warns(UserWarning, match=r"\['0'\] have no analog version .* stay digital"):
        convert(net, "linear-256")


def test_convert_programs_a_parametrised_layers_effective_weight_and_says_so():
    """A weight_norm'd Linear goes onto the devices with its effective weight W = g v / |v| (the array
    stores W, not its factors), and convert says the parametrisation is dropped."""
    from torch.nn.utils import parametrizations

    from hw_models.analog import convert

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), parametrizations.weight_norm(nn.Linear(16, 16)), nn.ReLU(),
                        nn.Linear(16, 3))
    with torch.no_grad():
        net[2].parametrizations.weight.original0.mul_(2.0)  # W is no longer v: the factors matter
    x = torch.randn(4, 8)
    with torch.no_grad():
        want = net(x)
    with pytest.warns(UserWarning, match=r"\['2'\] are parametrised .* effective weight"):
        analog = convert(copy.deepcopy(net), DeviceConfig(levels=1_000_000))
    analog.eval()
    with torch.no_grad():
        got = analog(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("kind", ["prune", "weight_norm", "spectral_norm"])
def test_convert_programs_a_hooked_layers_effective_weight_and_says_so(kind):
    """A pruned Linear (``weight_orig``, ``weight_mask``), or one under the older weight_norm /
    spectral_norm, has no ``weight`` parameter: convert refused it with the names of the extra state. It
    programs the effective weight -- a pruned weight is a zero -- and says what is dropped."""
    from hw_models.analog import convert
    from test_any_model import _hooked

    def make():  # two equal nets: torch cannot deep-copy a pruned layer
        net = _hooked(kind).float()
        with torch.no_grad():  # the effective weight is no longer the stored tensor
            (net[2].weight_g if kind == "weight_norm" else net[2].weight_orig).mul_(2.0)
        return net

    net, x = make(), torch.randn(4, 8)
    with torch.no_grad():
        want, effective = net(x), net[2].weight.clone()
    said = "pruned" if kind == "prune" else kind
    with pytest.warns(UserWarning, match=rf"\['2'\] are {said} .* effective weight"):
        analog = convert(make(), DeviceConfig(levels=1_000_000)).eval()
    with torch.no_grad():
        got = analog(x)
    assert (effective == 0).any() == (kind == "prune")
    assert (analog[2].weight[effective == 0] == 0).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("rule", ["sal", "dfa"])
def test_convert_after_the_first_step_keeps_the_feedback_points(rule):
    """The feedback points' hooks sat on the modules found at the first step (or materialise): convert
    afterwards replaced sal's area layers -- which are its points -- and a Linear whose activation is
    functional, so their points were gone and the layers below learnt by backprop, silently. convert
    rebinds the points: an exactly reading device gives the float model's gradients, planned first or not."""
    import neurosal
    from hw_models.analog import convert

    class Functional(nn.Module):  # F.relu: the point is the Linear's own output
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, x):
            return self.head(F.relu(self.b(F.relu(self.a(x)))))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)) \
        if rule == "sal" else Functional()
    base = neurosal.wrap(model, rule, **({"warmup": 0} if rule == "sal" else {}))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    base.materialise(x)
    grads = []
    for device in (None, DeviceConfig(levels=1_000_000)):
        w = copy.deepcopy(base)
        if device is not None:
            convert(w, device)
        torch.manual_seed(1)
        F.cross_entropy(w(x), y).backward()
        grads.append({n: p.grad for n, p in w.model.named_parameters() if p.grad is not None and "router" not in n})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-3, atol=1e-5, msg=n)


def test_sal_area_layers_on_devices_learn_through_the_general_engine():
    """SAL's area layers on arrays inside any model (wrap, then convert): the read had no derivative
    for the area weights (they never learnt) and, where the layer's input needed a gradient, the DAC's
    in-place ops broke the backward (a ViT with sal on rram-like crashed). Now the read is
    straight-through as for any analog Linear: with an exactly reading device the gradients are the
    float area layer's; with converters and noise every routed area gets one."""
    import copy

    import neurosal
    from hw_models.analog import convert
    from neurosal.areas import AreaLinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    base = neurosal.wrap(model, "sal", warmup=0)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    grads = {}
    for name, device in (("float", None), ("exact", DeviceConfig(levels=1_000_000)),
                         ("noisy", DeviceConfig(levels=1000, dac_bits=6, adc_bits=8, read_noise=0.02))):
        w = copy.deepcopy(base)
        if device is not None:
            convert(w, device)
        torch.manual_seed(1)
        torch.nn.functional.cross_entropy(w(x), y).backward()
        areas = [m for m in w.model.modules() if isinstance(m, AreaLinear)]
        grads[name] = [[None if p.grad is None else p.grad.clone() for p in a.area_weight] for a in areas]
    for f, e in zip(grads["float"], grads["exact"]):
        for gf, ge in zip(f, e):
            assert (gf is None) == (ge is None)
            if gf is not None:
                torch.testing.assert_close(ge, gf, rtol=1e-3, atol=1e-5)
    assert all(any(g is not None for g in layer) for layer in grads["noisy"])


def test_layers_in_a_sequential_with_named_children_are_replaced(tmp_path):
    """A Sequential built from an OrderedDict names its children (torchvision's ViT keeps its head as
    ``heads.head``): convert, sal's area layers and the export twin indexed it by int() and failed."""
    from collections import OrderedDict

    import neurosal
    from export.onnx_export import export_onnx, verify
    from hw_models.analog import AnalogLinear, convert
    from neurosal.areas import AreaLinear

    def model():
        torch.manual_seed(0)
        return nn.Sequential(OrderedDict(body=nn.Linear(6, 16), act=nn.ReLU(),
                                         heads=nn.Sequential(OrderedDict(head=nn.Linear(16, 3)))))

    net = convert(model(), "linear-256")
    assert isinstance(net.body, AnalogLinear) and isinstance(net.heads.head, AnalogLinear)
    w = neurosal.wrap(model(), "sal", warmup=0)
    assert isinstance(w.model.body, AreaLinear)
    x = torch.randn(5, 6)
    F.cross_entropy(w(x), torch.tensor([0, 1, 2, 0, 1])).backward()
    w.eval()
    export_onnx(w, x, tmp_path / "named.onnx")
    assert verify(w, tmp_path / "named.onnx", x, tol=1e-5)["ok"]


# ----------------------------------------------------------------------------- read vectors and weight range

CONV_GEOMETRIES = [  # (dims, in, out, kernel, stride, padding, dilation, groups)
    (2, 4, 6, 3, 1, 1, 1, 1), (2, 4, 6, 3, 2, 0, 1, 2), (2, 6, 6, (2, 3), 1, "same", (2, 1), 3),
    (2, 6, 6, (2, 3), (1, 2), (0, 1), (2, 1), 3),
    (2, 4, 8, 4, 1, "same", 1, 1), (1, 4, 6, 5, 2, 2, 2, 1), (3, 2, 4, 3, (1, 2, 1), 1, 1, 2),
    (2, 6, 6, 3, 1, 1, 1, 6), (1, 4, 4, 3, 1, "same", 1, 4),
]


@pytest.mark.parametrize("geom", CONV_GEOMETRIES)
def test_patch_products_are_the_convolution(geom):
    """The analog convolution reads patch by patch (one kernel offset at a time, so every patch can carry
    its own DAC scale): unscaled, that is the convolution -- strides, dilation, groups, depthwise, 'same'
    with an even kernel (torch puts the odd pad after), 1-3 spatial axes; the patches' abs-max
    and squared norms are those of the unfolded patches."""
    from hw_models.analog import patch_absmax, patch_products

    nd, cin, cout, k, s, p, d, g = geom
    tup = lambda v: (v,) * nd if isinstance(v, int) else v  # noqa: E731
    torch.manual_seed(0)
    x = torch.randn(3, cin, *([7] * nd), dtype=torch.float64)
    w = torch.randn(cout, cin // g, *tup(k), dtype=torch.float64)
    ref = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd](x, w, None, tup(s), p, tup(d), g)
    y, out, ss = patch_products(x, w, tup(s), p, tup(d), g, sumsq=True)
    assert out == tuple(ref.shape[2:])
    torch.testing.assert_close(y.reshape(ref.shape), ref, rtol=1e-12, atol=1e-12)
    ones = torch.ones(g, cin // g, *tup(k), dtype=torch.float64)
    norms = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd](x * x, ones, None, tup(s), p, tup(d), g)
    torch.testing.assert_close(ss.reshape(norms.shape), norms, rtol=1e-12, atol=1e-12)
    if nd == 2 and p != "same":  # the abs-max against the unfolded patches
        cols = F.unfold(x, tup(k), tup(d), p, tup(s)).reshape(3, g, -1, math.prod(out))
        torch.testing.assert_close(patch_absmax(x, tup(k), tup(s), p, tup(d), g).reshape(3, g, -1),
                                   cols.abs().amax(2), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["conv", "tokens"])
def test_the_dac_scales_every_read_vector_by_its_own_abs_max(kind):
    """A read applies one input vector (a convolution's patch, a token): the DAC scales each by its own
    abs-max, written out here the plain way (unfold, per-column scale, quantise, matmul, ADC). One scale per
    sample put all of a feature map's patches on the codes of its largest value."""
    from hw_models.analog import convert

    torch.manual_seed(0)
    cfg = DeviceConfig(levels=1_000_000, dac_bits=4, adc_bits=6)
    if kind == "conv":
        layer = convert(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False)), cfg)[0]
        x = torch.randn(2, 4, 6, 6)
        x[:, :, :2, :2] *= 100  # one corner of every map far larger than the rest
        cols = F.unfold(x, 3, padding=1).reshape(2, 2, 18, 36)  # (B, groups, per-group patch, positions)
        scale = cols.abs().amax(2, keepdim=True)
        w = layer.weight.detach().reshape(2, 3, 18)
        fan_in = 18
    else:
        layer = convert(nn.Sequential(nn.Linear(8, 5, bias=False)), cfg)[0]
        x = torch.randn(3, 7, 8)
        x[:, 0] *= 100  # the first token far larger than the others
        scale = x.abs().amax(-1, keepdim=True)
        w = layer.weight.detach()
        fan_in = 8

    def q(v, bits, full):
        n = 2 ** (bits - 1) - 1
        return torch.round(v.clamp(-full, full) / full * n) / n * full

    xn = q((cols if kind == "conv" else x) / scale, 4, 1.0)
    full = cfg.adc_range * layer.tiles.w_max * fan_in ** 0.5
    if kind == "conv":
        y = q(torch.einsum("gon,bgnp->bgop", w, xn), 6, full) * scale
        ref = y.reshape(2, 6, 6, 6)
    else:
        ref = q(xn @ w.t(), 6, full) * scale
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # with the DAC alone, the small vectors read as finely as their own size allows (one scale per sample
    # rounded them all to code 0: relative error 1)
    layer.tiles.cfg = DeviceConfig(levels=1_000_000, dac_bits=4)
    with torch.no_grad():
        got = layer(x)
        exact = F.conv2d(x, layer.weight, None, 1, 1, 1, 2) if kind == "conv" else x @ layer.weight.t()
    small = ((slice(None), slice(None), slice(3, None), slice(3, None)) if kind == "conv"
             else (slice(None), slice(1, None)))
    err = (got - exact)[small].norm() / exact[small].norm()
    assert float(err) < 0.2


def test_weight_range_follows_the_weights_scale_in_powers_of_two():
    """torch's default init keeps w_max = w_range / sqrt(fan_in); weights initialised 25x smaller
    (EfficientNet's depthwise convolutions) get a range 32x smaller, so they span the devices' levels;
    all-zero weights and w_scale='fan_in' keep the fan-in range."""
    from hw_models.analog import convert

    torch.manual_seed(0)
    cfg = DeviceConfig(levels=100)
    plain = convert(nn.Sequential(nn.Linear(64, 32)), cfg)[0]
    assert plain.tiles.w_max == pytest.approx(4.0 / 8.0, rel=1e-12)
    small = nn.Linear(64, 32)
    with torch.no_grad():
        small.weight.mul_(1 / 25)
    w0 = small.weight.detach().clone()
    small = convert(nn.Sequential(small), cfg)[0]
    assert small.tiles.w_max == pytest.approx(4.0 / 8.0 / 32, rel=1e-12)
    # programmed to within a few of the devices' 100 levels (on the fan-in range: +-0.02 = 2 levels)
    assert float((small.weight.detach() - w0).abs().max()) < 3 * small.tiles.w_max / 100
    assert convert(nn.Sequential(nn.Linear(64, 32)), DeviceConfig(levels=100, w_scale="fan_in"))[0].tiles.w_max \
        == pytest.approx(0.5)
    zero = nn.Linear(64, 32)
    nn.init.zeros_(zero.weight)
    assert convert(nn.Sequential(zero), cfg)[0].tiles.w_max == pytest.approx(0.5)
    from neurosal.errors import NeurosalError

    with pytest.raises(NeurosalError, match="w_scale"):
        DeviceConfig(w_scale="max").validate()


def test_a_deep_conv_net_initialised_small_reads_through_its_converters():
    """rram-like (8-bit DAC and ADC) on convolutions initialised as EfficientNet's (kaiming normal over
    fan-out: depthwise ones ~1/25 of 1/sqrt(fan_in)): the fan-in range left them a few device levels
    and ADC codes, whole channels read exactly 0, BatchNorm divided them by sqrt(eps) and the first
    gradient was ~1e8. Now no channel reads all zero, the read follows the float layer, the gradient
    stays bounded."""
    from hw_models.analog import attach, convert

    def net():
        torch.manual_seed(0)
        layers = [nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.SiLU()]
        for _ in range(3):
            layers += [nn.Conv2d(32, 32, 5, padding=2, groups=32, bias=False), nn.BatchNorm2d(32), nn.SiLU(),
                       nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32), nn.SiLU()]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)]
        m = nn.Sequential(*layers)
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out")
        return m

    x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 10, (8,))
    ref, m = net(), convert(net(), "rram-like")
    reads = []
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            mod.register_forward_hook(lambda mod, i, o: reads.append((o, F.conv2d(i[0], mod.weight, None, mod.stride,
                                                                                  mod.padding, 1, mod.groups))))
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    attach(opt, m)
    loss = F.cross_entropy(m(x), y)
    loss.backward()
    for o, exact in reads:
        assert (o.abs().amax((0, 2, 3)) > 0).all()
        assert float((o - exact).norm() / exact.norm()) < 0.3
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert max(float(g.abs().max()) for g in grads) < 100
    with torch.no_grad():
        assert abs(float(loss) - float(F.cross_entropy(ref(x), y))) < 1.0


def test_the_weight_range_travels_with_the_devices_state():
    """A checkpoint of devices programmed on a scaled range loads into a model converted from other
    weights: the range comes with the conductances (else they would read back at another scale); an
    older state without it was written on the fan-in range."""
    from hw_models.analog import convert

    def model(scale):
        torch.manual_seed(1)
        m = nn.Sequential(nn.Linear(16, 8))
        with torch.no_grad():
            m[0].weight.mul_(scale)
        return convert(m, DeviceConfig(levels=1000))

    a, b = model(1 / 20), model(1.0)
    assert a[0].tiles.w_max != b[0].tiles.w_max
    b.load_state_dict(a.state_dict())
    assert b[0].tiles.w_max == a[0].tiles.w_max
    torch.testing.assert_close(b[0].tiles.arrays[0].weights(), a[0].tiles.arrays[0].weights(), rtol=0, atol=0)
    st = a.state_dict()
    del st["0._extra_state"]["w_max"]
    b.load_state_dict(st)
    assert b[0].tiles.w_max == pytest.approx(4.0 / 16 ** 0.5)


def test_read_noise_of_a_quantised_patch_scales_with_its_codes_norm():
    """With a DAC, each patch's read noise has std sigma * |its codes| (in the codes' units, scaled back):
    written out the plain way (unfold, per-patch codes), the normalised noise is a standard normal."""
    from hw_models.analog import convert

    torch.manual_seed(0)
    cfg = DeviceConfig(levels=1_000_000, dac_bits=4, read_noise=0.02)
    layer = convert(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False)), cfg, seed=3)[0]
    x = torch.randn(1, 4, 6, 6).repeat(60, 1, 1, 1)
    x[:, :, :2, :2] *= 30  # patches of very different scales
    cols = F.unfold(x, 3, padding=1).reshape(60, 2, 18, 36)
    scale = cols.abs().amax(2, keepdim=True)
    codes = torch.round(cols / scale * 7)
    w = layer.weight.detach().reshape(2, 3, 18)
    clean = torch.einsum("gon,bgnp->bgop", w, codes) * scale / 7
    sigma = cfg.read_noise * 2 ** 0.5 * layer.tiles.w_max
    std = sigma * codes.norm(dim=2, keepdim=True) * scale / 7
    with torch.no_grad():
        z = ((layer(x).reshape(60, 2, 3, 36) - clean) / std).reshape(60, -1)
    assert abs(float(z.mean())) < 0.05 and abs(float(z.var()) - 1) < 0.06
    c = torch.corrcoef(z[:40])
    assert abs(float(c[~torch.eye(40, dtype=torch.bool)].mean())) < 0.05


def test_convert_says_when_programming_clips_a_models_weights():
    """A trained model's heavy tails (here 1% of the weights at 30x the rest's spread) lie beyond the
    range that follows the weights' spread: convert says which layers were clipped and by how much; a
    default-initialised model, or a larger w_range, is not."""
    import warnings

    from hw_models.analog import convert

    def model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        with torch.no_grad():
            w = m[0].weight.view(-1)
            w[::100] = 30 * w.std() * torch.sign(w[::100])
        return m

    with pytest.warns(UserWarning, match=r"clipped when programmed: 0 \(1%\)"):
        convert(model(), DeviceConfig(levels=100))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(model(), DeviceConfig(levels=100, w_range=64.0))
        convert(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), DeviceConfig(levels=100))


@pytest.mark.parametrize("device", ["converters", "linear-256"])
def test_an_analog_convolution_takes_an_unbatched_input(device):
    """torch's convolutions take an unbatched input (C, L...); the analog ones read it as a batch of one
    (the patch-by-patch read took its channels for the batch and failed)."""
    from hw_models.analog import convert

    torch.manual_seed(0)
    cfg = DeviceConfig(levels=1000, dac_bits=6, adc_bits=8) if device == "converters" else device
    for conv, x in ((nn.Conv1d(2, 3, 3, padding=1), torch.randn(2, 10)),
                    (nn.Conv2d(2, 4, 3, groups=2), torch.randn(2, 6, 6))):
        m = convert(nn.Sequential(conv), cfg)[0].eval()
        with torch.no_grad():
            one, batched = m(x), m(x[None])[0]
        assert one.shape == batched.shape
        torch.testing.assert_close(one, batched, rtol=0, atol=0)
