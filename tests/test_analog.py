"""Analog synapses: device maths on hand-worked cases, bounds, seeds, float parity and trends."""

import math
import warnings

import pytest
import torch
import torch.nn as nn

from hw_models.analog import AnalogLinear, drift
from hw_models.array import DifferentialArray
from hw_models.devices import DeviceConfig, depress, potentiate
from hw_models.presets import PRESETS, get_device
from neurosal.data import load_dataset
from neurosal.errors import NeurosalError
from neurosal.train import TrainConfig, Trainer

DIGITS = load_dataset("digits")


def array(w_max=1.0, **kw):
    cfg = DeviceConfig(**{"levels": 10, "pulses": "round", **kw})
    return DifferentialArray(cfg, (1,), w_max, torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("bad,msg", [
    (dict(g_min=1.0, g_max=1.0), "g_min"), (dict(g_min=2.0, g_max=1.0), "g_min"),
    (dict(levels=1), "levels must be >= 2"), (dict(ctoc=-0.1), "ctoc"), (dict(read_noise=-1), "read_noise"),
    (dict(model="memristor"), "model must be"), (dict(update="sideways"), "update must be"),
    (dict(dtod_bounds=0.6), "dtod_bounds"), (dict(nl_p=0), "nl_p"),
])
def test_bad_device_parameters_are_refused(bad, msg):
    with pytest.raises(NeurosalError, match=msg):
        DeviceConfig(**bad).validate()


def test_unknown_device_is_a_clear_cli_error(tmp_path, capsys):
    from neurosal.cli import main

    assert main(["train", "--device", "flux-capacitor", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'flux-capacitor'" in err and "rram-like" in err and err.count("\n") == 1
    assert main(["train", "--device", "ideal", "--device-options", "levels=1", "--out", str(tmp_path),
                 "--no-progress"]) == 2
    assert "levels must be >= 2" in capsys.readouterr().err


def test_pulse_counts_bidirectional_hand_worked():
    a = array()
    a.program(torch.zeros(1, dtype=torch.float64))  # both devices at mid range, 0.5
    p = a.apply(torch.tensor([0.34], dtype=torch.float64))  # 3.4 steps -> 3 pulses
    assert p.item() == 3
    # G+ gets ceil(3/2) = 2 up-pulses, G- floor(3/2) = 1 down-pulse: 0.7 and 0.4
    assert torch.allclose(a.g[:, 0], torch.tensor([0.7, 0.4], dtype=torch.float64), atol=1e-12)
    assert a.weights().item() == pytest.approx(0.3, abs=1e-12)
    a.apply(torch.tensor([-0.04], dtype=torch.float64))  # 0.4 steps -> rounds to nothing
    assert a.weights().item() == pytest.approx(0.3, abs=1e-12)


def test_pulse_counts_unidirectional_and_saturation_hand_worked():
    a = array(update="unidirectional")
    a.program(torch.tensor([0.34], dtype=torch.float64))  # reset, then 3 potentiation pulses on G+
    assert torch.allclose(a.g[:, 0], torch.tensor([0.3, 0.0], dtype=torch.float64), atol=1e-12)
    a.apply(torch.tensor([-0.1], dtype=torch.float64))  # negative change: 1 pulse to G-, never depression
    assert torch.allclose(a.g[:, 0], torch.tensor([0.3, 0.1], dtype=torch.float64), atol=1e-12)
    a.apply(torch.tensor([0.75], dtype=torch.float64))  # 8 pulses: G+ 1.1 -> clamped to 1.0, past 0.9
    # refresh: weight 1.0 - 0.1 = 0.9 re-programmed from reset as 9 pulses on G+
    assert a.resets == 1
    assert torch.allclose(a.g[:, 0], torch.tensor([0.9, 0.0], dtype=torch.float64), atol=1e-12)


def test_linear_device_clamps_exactly_at_its_bounds():
    cfg = DeviceConfig(levels=10, g_min=0.0, g_max=1.0)
    g = torch.tensor([0.95, 0.05])
    one, zero = torch.ones(2), torch.zeros(2)
    up = potentiate(cfg, g, torch.tensor([3.0, 3.0]), zero, one, one)
    down = depress(cfg, g, torch.tensor([3.0, 3.0]), zero, one, one)
    assert up[0].item() == 1.0 and down[1].item() == 0.0  # exactly at the bound, not past it
    assert up[1].item() == pytest.approx(0.35) and down[0].item() == pytest.approx(0.65)


def test_lim_model_closed_form():
    cfg = DeviceConfig(model="lim", levels=64, nl_p=0.3, nl_d=0.1)
    lo, hi, sc = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    b = 1 / (1 - math.exp(-1 / 0.3))
    for p in (1, 10, 40):
        g = potentiate(cfg, lo.clone(), torch.tensor([float(p)], dtype=torch.float64), lo, hi, sc)
        assert g.item() == pytest.approx(b * (1 - math.exp(-p / 64 / 0.3)), rel=1e-12)
    # N pulses take a device from bound to bound, both ways; steps shrink towards the far bound
    assert potentiate(cfg, lo.clone(), torch.tensor([64.0], dtype=torch.float64), lo, hi, sc).item() == pytest.approx(1.0)
    assert depress(cfg, hi.clone(), torch.tensor([64.0], dtype=torch.float64), lo, hi, sc).item() == pytest.approx(0.0, abs=1e-12)
    first = potentiate(cfg, lo.clone(), torch.ones(1, dtype=torch.float64), lo, hi, sc) - lo
    late = potentiate(cfg, hi * 0.9, torch.ones(1, dtype=torch.float64), lo, hi, sc) - hi * 0.9
    assert first.item() > 5 * late.item()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_conductances_never_leave_their_bounds(name):
    cfg = get_device(name, dtod_bounds=0.1, dtod_step=0.3, ctoc=1.0)
    arr = DifferentialArray(cfg, (40, 30), 1.0, torch.Generator().manual_seed(1))
    arr.program(torch.randn(40, 30))
    gen = torch.Generator().manual_seed(2)
    for _ in range(30):
        arr.apply(torch.randn(40, 30, generator=gen) * 0.3)
        assert (arr.g >= arr.lo).all() and (arr.g <= arr.hi).all()
        assert (arr.g >= cfg.g_min).all() and (arr.g <= cfg.g_max).all()


def train(device=None, rule="dfa", epochs=10, seed=0, model="mlp:128x128", **options):
    cfg = TrainConfig(rule=rule, model=model, epochs=epochs, batch_size=32, seed=seed, device=device,
                      device_options=options, progress=False)
    tr = Trainer(cfg, None, dataset=DIGITS)
    return tr, tr.fit()["epochs"][-1]["test_acc"]


def test_ideal_device_reproduces_float_training():
    for rule in ("dfa", "bp"):
        _, float_acc = train(None, rule, epochs=15)
        _, ideal_acc = train("ideal", rule, epochs=15, pulses="round")
        assert abs(ideal_acc - float_acc) <= 0.005, (rule, float_acc, ideal_acc)


def test_same_seed_same_result():
    a, _ = train("rram-like", epochs=1, seed=4)
    b, _ = train("rram-like", epochs=1, seed=4)
    c, _ = train("rram-like", epochs=1, seed=5)
    sa, sb, sc = a.net.state_dict(), b.net.state_dict(), c.net.state_dict()
    w = "blocks.0.op.weight"
    assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))
    assert not torch.equal(sa[w], sc[w])


def test_accuracy_falls_with_fewer_levels_and_stronger_nonlinearity():
    from hw_models.sweep import run_sweep

    rows = run_sweep(["dfa"], "digits", "mlp:128x128", 10, dataset=DIGITS,
                     axes={"levels": [2, 256], "nonlinearity": [math.inf, 0.003]})
    acc = {(r["axis"], r["value"]): r["test_acc"] for r in rows}
    # measured (pulses calibrated at the operating point, both devices of a pair moving): levels 2 / 4 /
    # 8 / 256 -> 81.6 / 92.2 / 93.1 / 95.2%; nonlinearity 0.01 / 0.003 / 0.001 -> 94.1 / 90.5 / 28.0%.
    # (Before the pair fix, 4 levels gave 9.7%: single pulses only ever moved G+ -- a defect, not physics.)
    assert acc[("levels", 2)] < acc[("levels", 256)] - 0.05, acc
    assert acc[("nonlinearity", 0.003)] < acc[("nonlinearity", math.inf)] - 0.02, acc


def test_unidirectional_beats_bidirectional_on_asymmetric_nonlinear_device():
    accs = {}
    for update in ("bidirectional", "unidirectional"):
        accs[update] = sum(train("lim-unidirectional", epochs=15, seed=s, update=update, nl_p=0.5, nl_d=0.05)[1]
                           for s in (0, 1)) / 2
    assert accs["unidirectional"] > accs["bidirectional"], accs  # measured 96.3% vs 94.2% (seed 0)


def test_analog_conv_and_sal_layers_train():
    tr, acc = train("linear-256", rule="fa", model="cnn:8/32", epochs=4)
    assert type(tr.net.blocks[0].op).__name__ == "AnalogConv2d" and acc > 0.5
    tr, acc = train("linear-256", rule="sal", epochs=6)
    assert type(tr.net.blocks[0].op).__name__ == "AnalogAreaLinear" and acc > 0.85


def test_resume_on_analog_device_is_bit_for_bit(tmp_path):
    def cfg(epochs):
        return TrainConfig(rule="dfa", model="mlp:16", epochs=epochs, batch_size=64, device="rram-like",
                           progress=False, seed=2)

    straight = Trainer(cfg(2), tmp_path / "a")
    straight.fit()
    Trainer(cfg(1), tmp_path / "b").fit()
    resumed = Trainer(cfg(2), tmp_path / "b")
    resumed.fit(resume=True)
    a, b = straight.net.state_dict(), resumed.net.state_dict()
    assert torch.equal(a["blocks.0.op.weight"], b["blocks.0.op.weight"])
    assert torch.equal(a["blocks.0.op._extra_state"]["arrays"][0]["g"], b["blocks.0.op._extra_state"]["arrays"][0]["g"])


def test_quantised_periphery_and_drift():
    torch.manual_seed(0)
    lin = torch.nn.Linear(20, 6)
    cfg = DeviceConfig(levels=1_000_000, dac_bits=3, adc_bits=4, drift_nu=0.1, pulses="round")
    layer = AnalogLinear.from_float(lin, cfg, seed=0)
    x = torch.randn(5, 20)
    with torch.no_grad():
        y = layer(x) - layer.bias
        full = cfg.adc_range * layer.tiles.w_max * math.sqrt(20)
        scale = x.abs().amax(1, keepdim=True)
        grid = (y / scale) / full * 7  # 4-bit ADC: 7 levels each side
        assert torch.allclose(grid, grid.round(), atol=1e-4)
    w0 = layer.weight.detach().abs().sum()

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

    h = Holder()
    drift(h, 10.0)
    w1 = layer.weight.detach().abs().sum()
    drift(h, 1000.0)
    assert layer.weight.detach().abs().sum() < w1 < w0


@pytest.mark.parametrize("dac,adc", [(3, 0), (0, 4), (5, 6)])
def test_dac_and_adc_are_the_stated_quantisers(dac, adc):
    """Per-sample abs-max scaling, the DAC's 2^(b-1)-1 levels per side on x/scale, the ADC's on the
    normalised output over [-adc_range*w_max*sqrt(fan_in), +...] (clipped), the scale applied back --
    written out here the plain way, against the layer's folded, in-place implementation."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    lin = torch.nn.Linear(20, 6, bias=False)
    layer = AnalogLinear.from_float(lin, DeviceConfig(levels=1_000_000, dac_bits=dac, adc_bits=adc), seed=0)
    x = torch.randn(7, 20) * torch.logspace(-2, 1, 7)[:, None]  # samples of very different scales

    def q(v, bits, full):
        n = 2 ** (bits - 1) - 1
        return torch.round(v.clamp(-full, full) / full * n) / n * full

    scale = x.abs().amax(1, keepdim=True)
    xn = q(x / scale, dac, 1.0) if dac else x / scale
    y = F.linear(xn, layer.weight.detach())
    if adc:
        y = q(y, adc, layer.tiles.cfg.adc_range * layer.tiles.w_max * math.sqrt(20))
    with torch.no_grad():
        got = layer(x)
    assert torch.allclose(got, y * scale, rtol=1e-5, atol=1e-6 * float(scale.max()))


def test_coincidence_rate_of_a_vanishing_gradient_is_no_update():
    """A gradient whose squared norm underflows to 0 asks for no pulses (not a division by zero), and a
    zero gradient likewise; a momentum step is still refused."""
    from hw_models.analog import AnalogTiles

    tiny = torch.full((4, 4), 1e-30)
    assert AnalogTiles._sgd_rate(torch.zeros(4, 4), tiny) == 0.0
    assert AnalogTiles._sgd_rate(torch.zeros(4, 4), torch.zeros(4, 4)) == 0.0
    g = torch.randn(4, 4)
    assert AnalogTiles._sgd_rate(-0.1 * g, g) == pytest.approx(0.1, rel=1e-5)
    with pytest.raises(NeurosalError, match="plain SGD"):
        AnalogTiles._sgd_rate(-0.1 * g + 0.05 * torch.randn(4, 4), g)
    # a small step on large weights: the request's float32 rounding is not mistaken for momentum
    w, big_g = torch.randn(64, 64), g.repeat(16, 16)
    small = (w - 1e-6 * big_g) - w  # misfit ~0.1 from rounding alone: refused before
    assert AnalogTiles._sgd_rate(small, big_g, w) == pytest.approx(1e-6, rel=1e-2)
    with pytest.raises(NeurosalError, match="plain SGD"):  # a real misfit well above the rounding still is
        AnalogTiles._sgd_rate(small + 2e-5 * torch.randn(64, 64), big_g, w)


@pytest.mark.parametrize("how", ["grad_scaler", "clip"])
def test_coincidence_trains_realise_the_step_the_optimiser_took(how):
    """Pulse trains are built from the layer's own input and signal; a GradScaler (signal 1024x larger,
    .grad unscaled again) or gradient clipping (.grad shrunk after the backward) must not change how far
    the devices move: the rate is fitted against the trains' own update d^T x. Before, a scaled signal
    asked 1024x the pulses (cut at the train length) and a clipped step was realised unclipped."""
    import copy

    import neurosal
    from hw_models.analog import attach, convert

    torch.manual_seed(0)
    base = convert(torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)),
                   DeviceConfig(levels=4096, pulses="coincidence"))
    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))

    def moved(scaled):
        net = copy.deepcopy(base)
        w = neurosal.wrap(net, "bp")
        opt = torch.optim.SGD(w.parameters(), lr=0.5)
        attach(opt, w)
        before = net[0].weight.detach().clone()
        loss = torch.nn.functional.cross_entropy(w(x), y)
        if how == "grad_scaler":
            scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=scaled)
            scaler.scale(loss).backward()
            scaler.step(opt)
        else:
            loss.backward()
            if scaled:
                torch.nn.utils.clip_grad_norm_(w.parameters(), 0.01)
            opt.step()
        return (net[0].weight.detach() - before).abs().sum()

    plain, other = moved(False), moved(True)
    if how == "grad_scaler":  # the same step: the same expected pulses (the trains' draws differ slightly)
        assert float(other / plain) == pytest.approx(1.0, rel=0.1)
    else:  # the clipped step is smaller, and realised so
        assert float(other) < 0.5 * float(plain)


def test_forward_reads_the_array_once_and_differentiates_as_float():
    """One matmul per forward: with exact reads (no converters, no read noise) the array's output is the
    float layer's; with converters the output is the quantised read under grad too, and no float forward
    is run beside it -- the derivative is the float layer's either way (straight-through), for the
    input, the weight and the bias."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                self.n += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    x = torch.randn(5, 20)
    for cfg, exact in ((get_device("linear-256"), True), (DeviceConfig(levels=256, dac_bits=3, adc_bits=4), False)):
        layer = AnalogLinear.from_float(torch.nn.Linear(20, 6), cfg, seed=0)
        xg = x.clone().requires_grad_()
        with CountMatmuls() as count:
            y = layer(xg)
        assert count.n == 1
        with torch.no_grad():
            assert torch.equal(y, layer(x))  # the value under grad is the array's read
            if exact:
                assert torch.equal(y, torch.nn.functional.linear(x, layer.weight, layer.bias))
        y.pow(2).sum().backward()
        g = 2 * y.detach()
        assert torch.allclose(layer.weight.grad, g.t() @ x, rtol=1e-5, atol=1e-6)
        assert torch.allclose(layer.bias.grad, g.sum(0), rtol=1e-5, atol=1e-6)
        # tokens (batch, positions, features): the float layer's derivative, summed over the positions
        layer.zero_grad()
        x3 = torch.randn(2, 3, 20).requires_grad_()
        ref = torch.nn.Linear(20, 6)
        ref.load_state_dict({"weight": layer.weight.detach(), "bias": layer.bias.detach()})
        g3 = torch.randn(2, 3, 6)
        layer(x3).backward(g3)
        x3r = x3.detach().clone().requires_grad_()
        ref(x3r).backward(g3)
        for got, want in ((x3.grad, x3r.grad), (layer.weight.grad, ref.weight.grad), (layer.bias.grad, ref.bias.grad)):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        assert torch.allclose(xg.grad, (2 * y.detach()) @ layer.weight.detach(), rtol=1e-5, atol=1e-6)


def test_sweep_command_writes_csv_and_plot(tmp_path, capsys):
    from neurosal.cli import main

    assert main(["sweep", "--rules", "dfa", "--model", "mlp:32", "--epochs", "1", "--axes",
                 "levels=8,64;variation=0,0.5", "--out", str(tmp_path)]) == 0, capsys.readouterr().err
    lines = (tmp_path / "sweep.csv").read_text().splitlines()
    assert lines[0] == "rule,axis,value,test_acc" and len(lines) == 1 + 1 + 2 + 2
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_fused_kernel_matches_eager_update():
    """The torch.compile'd update is the same maths (same noise draws, same pulses): as ``apply``, as
    the optimiser's sync (``step_to``: change, update and read-back in one kernel) and for coincidence
    trains (``apply_trains``); a NaN change is refused before any device moves."""
    for name in ("rram-like", "linear-256", "softbounds", "pcm-like"):
        # pcm-like: unidirectional, refreshed early here so that refreshes happen within the test
        extra = {"refresh_at": 0.3} if name == "pcm-like" else {}
        arrays = [DifferentialArray(get_device(name, fused=f, **extra), (30, 20), 0.2, torch.Generator().manual_seed(3))
                  for f in (False, True)]
        gen = torch.Generator().manual_seed(4)
        for _ in range(5):
            dw = torch.randn(30, 20, generator=gen) * 0.01
            pulses = [a.apply(dw) for a in arrays]
            assert torch.equal(pulses[0], pulses[1]), name  # whole numbers from the same draws
        assert torch.allclose(arrays[0].g, arrays[1].g, rtol=1e-5, atol=1e-6), name
        held = [a.weights() for a in arrays]
        for _ in range(5):
            dw = torch.randn(30, 20, generator=gen) * 0.01
            held = [a.step_to(h + dw, h) for a, h in zip(arrays, held)]
        assert torch.allclose(arrays[0].g, arrays[1].g, rtol=1e-5, atol=1e-6), name
        assert torch.allclose(held[1], arrays[1].weights()), name  # the kernel's read-back is the weights
        before = arrays[1].g.clone()
        with pytest.raises(NeurosalError, match="NaN/Inf"):
            arrays[1].step_to(held[1] + float("nan"), held[1])
        assert torch.equal(arrays[1].g, before)
        assert arrays[0].resets == arrays[1].resets and (name != "pcm-like" or arrays[1].resets > 0)
        if name in ("linear-256", "pcm-like"):
            continue  # the trains kernel once, for the exponential family with noise (compile time)
        # coincidence trains: up then down pulses, both devices, noise drawn per device and train
        arrays = [DifferentialArray(get_device(name, fused=f, pulses="coincidence"), (30, 20), 0.2,
                                    torch.Generator().manual_seed(5)) for f in (False, True)]
        x, d = torch.randn(8, 20, generator=gen), torch.randn(8, 30, generator=gen)
        for _ in range(3):
            read = [a.apply_trains(*a.coincidence_pulses(x, d, lr=0.05)) for a in arrays]
        assert torch.allclose(arrays[0].g, arrays[1].g, rtol=1e-5, atol=1e-6), name
        assert torch.allclose(read[0], read[1], rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("stride", [4, 16])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("update", ["bidirectional", "unidirectional"])
def test_cycle_to_cycle_noise_lands_only_on_pulsed_devices(fused, update, stride):
    """Only the pairs that get pulses are moved by cycle-to-cycle noise: the others stay bitwise where
    they were, an update without any pulse draws nothing from the generator, and the pulsed devices'
    spread is ctoc * step * sqrt(pulses) (linear device far from its bounds, so nothing clamps) -- with
    few pairs pulsed (stride 16: 1 in 8, only they draw) and many (stride 4: half, every pair draws)."""
    cfg = DeviceConfig(model="linear", levels=10_000, ctoc=0.5, pulses="round", update=update, fused=fused,
                       refresh_at=1.0)
    n = 10_000 * stride // 4
    arr = DifferentialArray(cfg, (n,), 1.0, torch.Generator().manual_seed(0), dtype=torch.float64)
    if update == "bidirectional":
        arr.g = (arr.lo + arr.hi) / 2
    state = arr.gen.get_state()
    arr.apply(torch.full((n,), 0.4 * arr.dw_pulse, dtype=torch.float64))  # rounds to no pulse anywhere
    assert torch.equal(arr.gen.get_state(), state)
    before = arr.g.clone()
    pulses = torch.zeros(n, dtype=torch.float64)
    pulses[::stride], pulses[1::stride] = 1.0, -4.0  # single increases and 4-pulse decreases, the rest none
    arr.apply(pulses * arr.dw_pulse)
    moved = arr.g - before
    step = (cfg.g_max - cfg.g_min) / cfg.levels
    m = n // stride
    still = torch.ones(n, dtype=torch.bool)
    still[::stride] = still[1::stride] = False
    assert torch.equal(moved[:, still], torch.zeros_like(moved[:, still]))  # unpulsed pairs: untouched
    if update == "bidirectional":  # +1: the odd pulse to one device; -4: two pulses on each device
        single = moved[:, ::stride][moved[:, ::stride] != 0]
        assert single.numel() == m
        deviations = [single.abs() - step, (moved[0, 1::stride] + 2 * step), (moved[1, 1::stride] - 2 * step)]
        expect = [step * cfg.ctoc, step * cfg.ctoc * 2 ** 0.5, step * cfg.ctoc * 2 ** 0.5]
    else:  # G+ gets the increases, G- the four-pulse decreases (as potentiation)
        assert torch.equal(moved[1, ::stride], torch.zeros(m, dtype=torch.float64))
        assert torch.equal(moved[0, 1::stride], torch.zeros(m, dtype=torch.float64))
        deviations = [moved[0, ::stride] - step, moved[1, 1::stride] - 4 * step]
        expect = [step * cfg.ctoc, step * cfg.ctoc * 2]
    for dev, sd in zip(deviations, expect):
        # 2500 samples: the mean within 5 standard errors, the std within 8 % (~5.6 standard errors)
        assert abs(dev.mean().item()) < 5 * sd / len(dev) ** 0.5
        assert dev.std().item() == pytest.approx(sd, rel=0.08)


def test_fused_constants_are_one_column_only_without_device_spread():
    from hw_models.array import compact

    assert compact(torch.tensor([[2.0, 2.0, 2.0], [3.0, 3.0, 3.0]])).shape == (2, 1)
    assert compact(torch.full((5,), 0.5)).tolist() == [0.5]
    spread = torch.tensor([[2.0, 2.0, 2.0], [3.0, 3.0, 3.1]])
    assert compact(spread) is spread  # one device differs: every value is kept
    a = DifferentialArray(get_device("rram-like", fused=True), (6, 5), 0.2, torch.Generator().manual_seed(0))
    a._consts()
    assert a._fused_consts[6].shape == (2, 30)  # per-device step scales (dtod_step 0.1)
    b = DifferentialArray(get_device("linear-256", fused=True), (6, 5), 0.2, torch.Generator().manual_seed(0))
    assert [t.shape for t in b._consts()[4:7]] == [(2, 1)] * 3  # bounds and steps: one column each


def test_fused_kernels_compile_once_for_every_layer_shape():
    """One compiled kernel serves arrays of every shape and pulse size: a recompile per layer would hit
    torch.compile's recompile limit after a few layers and silently drop to eager."""
    shapes = [(30, 20), (64, 8), (10, 256), (256, 96), (7, 9)]
    arrays = [DifferentialArray(get_device("linear-256", fused=True), s, 0.1 * (i + 1), torch.Generator().manual_seed(i))
              for i, s in enumerate(shapes)]
    for a, s in zip(arrays, shapes):
        a.program(torch.zeros(s))  # both devices mid-range
    w = arrays[0].weights()
    arrays[0].step_to(w + 0.01, w)  # compiles the kernel (or finds it compiled)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for a in arrays[1:]:
            w = a.weights()
            assert torch.allclose(a.step_to(w + 0.01, w), w + 0.01, atol=2 * a.dw_pulse)


def test_coincidence_pulses_hand_worked_and_unbiased():
    """One input x=1 and one error d=-1 with lr chosen for an expected 3 pulses: the pulse count is a
    sum of Bernoulli coincidences, averaging 3 over many trains; signs follow -x*d."""
    cfg = DeviceConfig(levels=10, pulses="coincidence", bl=31)
    arr = DifferentialArray(cfg, (2, 1), 1.0, torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.tensor([[1.0]], dtype=torch.float64)
    d = torch.tensor([[-1.0, 0.5]], dtype=torch.float64)
    counts = torch.stack([torch.sub(*arr.coincidence_pulses(x, d, lr=0.3)) for _ in range(4000)])
    # requested change -lr * d^T x = [+0.3, -0.15] weight units = [+3, -1.5] pulses of 0.1
    assert torch.allclose(counts.mean(0)[:, 0], torch.tensor([3.0, -1.5], dtype=torch.float64), atol=0.06)
    assert (counts[:, 0, 0] >= 0).all() and (counts[:, 1, 0] <= 0).all()
    assert torch.equal(counts, counts.round())  # whole pulses
    # one update needing more than bl pulses is cut at bl: the train has a fixed length (real periphery)
    arr.take_clip_fraction()
    big = torch.stack([torch.sub(*arr.coincidence_pulses(x, d, lr=6.0)) for _ in range(500)]).mean(0)[0, 0]
    assert big.item() == pytest.approx(31.0, rel=0.03)
    assert arr.take_clip_fraction() > 0.4


@pytest.mark.parametrize("rule", ["dfa", "bp"])  # bp: the autograd path hands the layer its x and delta
def test_coincidence_training_needs_plain_sgd_and_learns(rule):
    ds = load_dataset("digits")
    cfg = TrainConfig(rule=rule, model="mlp:64", epochs=6, batch_size=32, optimizer="SGD", momentum=0.0, lr=0.1,
                      device="linear-256", device_options={"pulses": "coincidence"}, progress=False)
    acc = Trainer(cfg, None, dataset=ds).fit()["epochs"][-1]["test_acc"]
    assert acc > 0.85, acc
    bad = TrainConfig(rule=rule, model="mlp:16", epochs=1, device="linear-256", progress=False,
                      device_options={"pulses": "coincidence"})  # Adam
    with pytest.raises(NeurosalError, match="plain SGD"):
        Trainer(bad, None, dataset=ds).fit()


@pytest.mark.parametrize("model", ["snn:16:T=4", "cnn"])
def test_coincidence_accepts_small_plain_sgd_steps(model):
    """A plain SGD step far below the weights' size (lr 1e-3): the request's float32 rounding alone gave a
    1e-3 misfit, which was refused as momentum (spiking chains and the cnn failed on their first step)."""
    ds = load_dataset("digits", limit=96)
    cfg = TrainConfig(rule="fa", model=model, epochs=1, batch_size=96, optimizer="SGD", momentum=0.0, lr=1e-3,
                      device="linear-256", device_options={"pulses": "coincidence"}, progress=False)
    assert Trainer(cfg, None, dataset=ds).fit()["epochs"][-1]["train_loss"] > 0


def test_analog_area_layer_keeps_sals_warm_up_clock():
    """An area layer moved onto arrays keeps its warm-up clock, and the clock travels with the tiles'
    state through a state dict (a checkpoint)."""
    from hw_models.analog import AnalogAreaLinear, convert
    from neurosal.rules import make_rule

    def net():
        torch.manual_seed(0)
        return make_rule("sal", areas=3, run_steps=10).build("mlp:8", (1, 2, 2), 3)

    a = net()
    a.blocks[0].op.steps = 2
    convert(a, "linear-256", seed=0)
    layer = a.blocks[0].op
    assert isinstance(layer, AnalogAreaLinear) and (layer.steps, layer.warmup_steps) == (2, 5)
    b = convert(net(), "linear-256", seed=0)
    b.load_state_dict(a.state_dict())
    assert (b.blocks[0].op.steps, b.blocks[0].op.warmup_steps) == (2, 5)
    # written when the clock was part of the layer's extra state, beside the arrays
    old = {k: v for k, v in a.state_dict().items() if not k.endswith(("op.steps", "op.warmup_steps"))}
    old["blocks.0.op._extra_state"] = {"analog_tiles": old["blocks.0.op._extra_state"],
                                       "area_clock": {"steps": 4, "warmup_steps": 6}}
    c = convert(net(), "linear-256", seed=0)
    c.load_state_dict(old)
    assert (c.blocks[0].op.steps, c.blocks[0].op.warmup_steps) == (4, 6)


def test_fused_without_a_cpp_compiler_is_a_clear_error():
    """fused=true needs a C++ compiler at run time: without one, a NeurosalError saying so (the CLI's
    one ``error:`` line), not torch's compiler traceback."""
    from hw_models.devices import compile_kernel

    def kernel(a):
        return a * 2 + 1

    with torch._inductor.config.patch({"cpp.cxx": (None, "/nonexistent/g++"), "fx_graph_cache": False}):
        with pytest.raises(NeurosalError, match="needs a working C\\+\\+ compiler"):
            compile_kernel(kernel)(torch.ones(4))


@pytest.mark.parametrize("order", ["convert-then-cast", "cast-then-convert"])
def test_an_analog_model_follows_casts_and_keeps_float32_conductances(order):
    """model.to(...)/.double()/.bfloat16() after convert moved the parameters but left the arrays (plain
    tensors) where they were; a bf16 model's arrays were bf16 (a device step of 1/levels of the range is
    below bf16's resolution near the bounds) and each step's request carried the parameter's bf16
    rounding of the read-back into the devices: under lr = 0 they drifted. Now the arrays follow the
    module's device, keep float32 (float64 for a double model), and lr = 0 moves nothing."""
    import torch.nn.functional as F

    import neurosal
    from hw_models.analog import attach, convert

    def build(dtype):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        if order == "cast-then-convert":
            return convert(m.to(dtype), "linear-256")
        return convert(m, "linear-256").to(dtype)

    double = build(torch.float64)
    assert double[0].tiles.arrays[0].g.dtype == torch.float64 and double[0].tiles.held[0].dtype == torch.float64
    m = build(torch.bfloat16)
    arr = m[0].tiles.arrays[0]
    assert arr.g.dtype == torch.float32 and m[0].weight.dtype == torch.bfloat16
    w = neurosal.wrap(m, "fa")
    for lr in (0.0, 0.5):
        opt = torch.optim.SGD(w.parameters(), lr=lr)
        attach(opt, w.model)
        g0 = arr.g.clone()
        for _ in range(10):
            opt.zero_grad()
            F.cross_entropy(w(torch.randn(16, 8, dtype=torch.bfloat16)).float(), torch.randint(0, 3, (16,))).backward()
            opt.step()
        moved = (arr.g - g0).abs().max().item()
        assert (moved == 0.0) if lr == 0 else (moved > 0), (lr, moved)


@pytest.mark.parametrize("pulses", ["stochastic", "coincidence"])
def test_attach_on_each_of_two_optimisers_trains_as_one_optimiser(pulses):
    """attach() on every optimiser of a loop with several (a separate one for the digital layers): each
    step syncs all arrays. In coincidence mode the other optimiser's sync found no trains (or used them
    up with a zero request) and the layer's own step failed. Either order of the steps equals one
    optimiser over all parameters, devices included."""
    import torch.nn.functional as F

    import neurosal
    from hw_models.analog import attach, convert

    def run(split, reverse=False):
        torch.manual_seed(0)
        m = convert(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), "linear-256", pulses=pulses,
                    include_output=False)
        w = neurosal.wrap(m, "bp")
        params = dict(w.named_parameters())
        groups = [[params["model.0.weight"]], [p for n, p in params.items() if n != "model.0.weight"]] if split \
            else [list(params.values())]
        opts = [torch.optim.SGD(g, lr=0.1) for g in groups]
        for o in opts:
            attach(o, w.model)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for o in opts:
                o.zero_grad()
            F.cross_entropy(w(torch.randn(8, 8, generator=gen)), torch.randint(0, 3, (8,), generator=gen)).backward()
            for o in (reversed(opts) if reverse else opts):
                o.step()
        return m[0].tiles.arrays[0].g.clone(), m[0].weight.detach().clone()

    ref = run(False)
    for reverse in (False, True):
        got = run(True, reverse)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), reverse


def test_attach_names_an_optimiser_built_before_convert():
    """convert makes new layers: an optimiser built from the model before it holds the replaced
    parameters, so attach's steps programmed no array and the analog layers never learnt, silently."""
    from hw_models.analog import attach, convert

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    stale = torch.optim.SGD(model.parameters(), lr=0.1)
    convert(model, "linear-256")
    with pytest.warns(UserWarning, match=r"attach: the optimiser holds no parameter of the analog layers"):
        attach(stale, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attach(torch.optim.SGD(model.parameters(), lr=0.1), model)


def test_drift_is_absolute_time_since_programming():
    """drift(net, t) compounded: drift(10) then drift(1000) aged the devices to 10^4 s, so a retention
    sweep over t on one model (the usual loop) measured the product of all earlier ages. Now each call
    gives the state t after programming, drift(net, 1) the programmed state back, through a checkpoint
    too; a training step after drift starts a new clock from the drifted conductances."""
    import copy
    import io

    import torch.nn.functional as F

    import neurosal
    from hw_models.analog import attach, convert, drift

    torch.manual_seed(0)
    m = convert(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), "pcm-like")
    programmed = m[0].weight.detach().clone()
    swept, once = copy.deepcopy(m), copy.deepcopy(m)
    for t in (10.0, 3600.0, 1000.0):
        drift(swept, t)
    drift(once, 1000.0)
    assert torch.equal(swept[0].weight, once[0].weight) and not torch.equal(once[0].weight, programmed)
    drift(swept, 1.0)
    assert torch.equal(swept[0].weight, programmed)
    drift(swept, 1e5)
    buf = io.BytesIO()
    torch.save(swept.state_dict(), buf)
    buf.seek(0)
    loaded = copy.deepcopy(m)
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    drift(loaded, 1000.0)
    assert torch.equal(loaded[0].weight, once[0].weight)
    # training after drift: the update acts on the drifted devices, and the next drift starts from there
    w = neurosal.wrap(once, "fa")
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    attach(opt, w.model)
    F.cross_entropy(w(torch.randn(4, 8)), torch.randint(0, 3, (4,))).backward()
    opt.step()
    trained = once[0].weight.detach().clone()
    drift(once, 1.0)
    assert torch.equal(once[0].weight, trained)


@pytest.mark.parametrize("model", ["mlp", "user"])
def test_evaluating_does_not_change_what_training_draws(model):
    """Read noise of an evaluation (eval mode, no autograd) drew from the arrays' training stream, so
    how often and on how much you evaluated changed the trained model (the CLI's --eval-limit changed
    its training loss). Evaluation reads have a stream of their own: training with evaluations in
    between is bit for bit training without, and evaluation noise stays fresh at every read."""
    import torch.nn.functional as F

    import neurosal
    from hw_models.analog import attach, convert

    def train(evaluate_every: int):
        torch.manual_seed(0)
        if model == "mlp":
            net = convert(neurosal.rules.make_rule("dfa").build("mlp:16x16", (8,), 3), "rram-like")
        else:
            net = convert(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), "rram-like")
        w = neurosal.wrap(net, "dfa")
        opt = torch.optim.Adam(w.parameters(), 1e-2)
        attach(opt, w.model)
        gen = torch.Generator().manual_seed(1)
        probe = torch.randn(32, 8, generator=gen)
        evals = []
        for step in range(6):
            x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(w(x), y).backward()
            opt.step()
            if evaluate_every and step % evaluate_every == 0:
                w.eval()
                with torch.no_grad():
                    evals.append(w(probe))
                w.train()
        w.eval()
        with torch.no_grad():
            again = [w(probe), w(probe)]
        return [p.detach().clone() for p in w.parameters()], again

    plain, _ = train(0)
    often, again = train(1)
    assert all(torch.equal(a, b) for a, b in zip(plain, often))
    assert not torch.equal(again[0], again[1])  # the read noise is still fresh at every evaluation


@pytest.mark.parametrize("model,device", [("snn:16:T=4", None), ("mlp:32", "rram-like")])
def test_how_much_the_trainer_evaluates_does_not_change_its_training(model, device):
    """--eval-limit 100 vs 300 changed the training loss: the evaluation drew from the training's
    streams (spike encoders from torch's generators, analog read noise from the arrays'). Now the same
    seed trains the same model whatever the evaluation."""
    losses = []
    for limit in (50, 200):
        cfg = TrainConfig(rule="dfa", model=model, epochs=2, batch_size=32, seed=3, device=device, eval_limit=limit,
                          progress=False)
        epochs = Trainer(cfg, None, dataset=DIGITS).fit()["epochs"]
        losses.append([e["train_loss"] for e in epochs])
    assert losses[0] == losses[1]
