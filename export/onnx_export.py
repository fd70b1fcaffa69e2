"""ONNX export of every trained model kind, verified in onnxruntime on the spot.

Each trained net is first turned into an *inference twin* -- the same function, written with ops that
export to one static ONNX graph with a dynamic batch axis:

* float Linear / Conv2d blocks: as they are;
* SAL area layers: routing as ONNX ops (projection, cosine to the frozen prototypes, ArgMax) and a
  Gather of each sample's chosen area weights followed by a batched MatMul;
* analog layers: the weights the devices hold, with the DAC/ADC quantisation (deterministic; read
  noise, a random process, is left out of the graph);
* spiking layers: the LIF recurrence unrolled over the T time steps, state carried in the graph,
  spikes out; the input is the encoded spike train (B, T, n_in).

:func:`export_onnx` writes the file, runs ``onnx.checker``, and compares onnxruntime against the
original torch model on held-out inputs (max abs difference; an error above the tolerance).
"""

from __future__ import annotations

import copy
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from hw_models.analog import analog_conv, analog_mvm
from hw_models.snn import delay, lif_membrane
from neurosal.areas import AreaLinear
from neurosal.errors import NeurosalError
from neurosal.layers import conv_function, keep_own_forward, replace_module
from neurosal.models import Block, Net
from neurosal.protocols import LocalDerivative
from neurosal.wrap import MHAForward, Wrapped, select_output

OPSET = 18


def _analog_of(op):
    """(device config, w_max, fan_in) of an analog layer, or None for a float one."""
    tiles = getattr(op, "tiles", None)
    return None if tiles is None else (tiles.cfg, tiles.w_max, tiles.fan_in)


def _through_devices(analog, x, fn):
    """``fn(x)`` -- through the layer's DAC and ADC when it is analog (the function the analog layers
    themselves use, :func:`hw_models.analog.analog_mvm`)."""
    if analog is None:
        return fn(x)
    cfg, w_max, fan_in = analog
    return analog_mvm(x, None, lambda v, _w: fn(v), cfg, w_max, fan_in)


class LinearTwin(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.weight = nn.Parameter(op.weight.detach().clone(), requires_grad=False)
        self.bias = None if op.bias is None else nn.Parameter(op.bias.detach().clone(), requires_grad=False)
        self.analog = _analog_of(op)

    def forward(self, x):
        y = _through_devices(self.analog, x, lambda v: F.linear(v, self.weight))
        return y if self.bias is None else y + self.bias


class Conv2dTwin(nn.Module):
    """A (possibly analog) Conv2d -- or Conv1d -- through its devices' DAC and ADC."""

    def __init__(self, op: nn.Conv2d | nn.Conv1d):
        super().__init__()
        self.weight = nn.Parameter(op.weight.detach().clone(), requires_grad=False)
        self.bias = None if op.bias is None else nn.Parameter(op.bias.detach().clone(), requires_grad=False)
        self.kw = dict(stride=op.stride, padding=op.padding, dilation=op.dilation, groups=op.groups)
        self.conv = conv_function(op)
        self.analog = _analog_of(op)

    def forward(self, x):
        if self.analog is None:
            y = self.conv(x, self.weight, None, **self.kw)
        else:  # one patch per read, as the analog convolutions read (no read noise: a random process)
            y = analog_conv(x, self.weight, *self.analog, **self.kw)
        if self.bias is None:
            return y
        return y + self.bias.view(-1, *([1] * (self.weight.dim() - 2)))


class MHATwin(nn.MultiheadAttention):
    """An analog ``nn.MultiheadAttention`` (:class:`hw_models.analog.AnalogMultiheadAttention`): the packed
    projection through its devices' DAC and ADC, written-out attention (no read noise: a random process
    the exported graph leaves out); ``out_proj`` is exported as any analog Linear."""

    def __init__(self, op: nn.MultiheadAttention):
        w = op.in_proj_weight
        super().__init__(op.embed_dim, op.num_heads, dropout=op.dropout, bias=op.in_proj_bias is not None,
                         batch_first=op.batch_first, device=w.device, dtype=w.dtype)
        self.load_state_dict(op.state_dict(), strict=False)  # not the devices' extra state
        self.out_proj = op.out_proj
        self.requires_grad_(False)
        self.analog = _analog_of(op)

    def in_projection(self, x):
        y = _through_devices(self.analog, x, lambda v: F.linear(v, self.in_proj_weight))
        return y if self.in_proj_bias is None else y + self.in_proj_bias

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        return MHAForward(self, self.in_projection)(query, key, value, key_padding_mask, need_weights, attn_mask,
                                                    average_attn_weights, is_causal)


class SALTwin(nn.Module):
    """Routing as ONNX ops, then the chosen area per sample, one graph for any batch size.

    ``mode="gather"``: Gather each sample's area weights and a batched MatMul -- the area's compute
    only, best for small batches (edge inference); it materialises batch x out x in weights.
    ``mode="dense"``: every area's output, then GatherElements of the chosen one -- K times the
    compute but no weight copies, far faster for large batches.
    """

    def __init__(self, op: AreaLinear, mode: str = "gather"):
        super().__init__()
        if mode not in ("gather", "dense"):
            raise NeurosalError(f"SAL export mode must be 'gather' or 'dense', not {mode!r}")
        self.mode = mode
        self.weight = nn.Parameter(op.weight.detach().clone(), requires_grad=False)  # (K, out, in)
        self.bias = nn.Parameter(op.bias_stacked.detach().clone(), requires_grad=False)  # (K, out)
        self.router = nn.Parameter(op.router.detach().clone(), requires_grad=False)
        self.register_buffer("offset", (op.router @ op.center).detach().clone())
        self.register_buffer("prototypes", op.prototypes.detach().clone())
        self.analog = _analog_of(op)

    def forward(self, x):
        return self.apply_routed(x)[0]

    def apply_routed(self, x):
        """(output, chosen area per sample)."""
        xr = x.mean(1) if x.dim() == 3 else x
        z = xr @ self.router.t() - self.offset
        cos = F.normalize(z, dim=1) @ self.prototypes.t()
        area = torch.argmax(cos, dim=1)
        if self.mode == "dense":
            k, out = self.weight.shape[0], self.weight.shape[1]
            flat = self.weight.reshape(k * out, -1)

            def fn(v):
                y_all = F.linear(v, flat).unflatten(-1, (k, out))  # (B, [T,] K, out)
                idx = area.view(-1, *([1] * (y_all.dim() - 1))).expand(*y_all.shape[:-2], 1, out)
                return torch.gather(y_all, -2, idx).squeeze(-2)
        else:
            w = self.weight[area]  # (B, out, in): Gather
            if x.dim() == 2:
                fn = lambda v: torch.bmm(w, v.unsqueeze(2)).squeeze(2)  # noqa: E731
            else:
                fn = lambda v: torch.bmm(v, w.transpose(1, 2))  # noqa: E731
        y = _through_devices(self.analog, x, fn)
        b = self.bias[area]
        return y + (b if x.dim() == 2 else b.unsqueeze(1)), area


class LIFTwin(nn.Module):
    """The LIF population unrolled over time (snnTorch's arithmetic); returns the delayed spikes."""

    def __init__(self, post):
        super().__init__()
        self.beta, self.theta, self.alpha, self.neuron = post.beta, post.theta, post.alpha, post.neuron

    def forward(self, a):
        return self.run(a)[0]

    def run(self, a):
        """(delayed spikes for the next layer, spikes as emitted)."""
        u = lif_membrane(a, self.beta, self.theta, self.neuron, self.alpha)
        s = (u - self.theta > 0).to(a.dtype)
        return delay(s), s


@dataclass
class ModelKind:
    spiking: bool
    sal: bool
    analog: bool

    @property
    def name(self) -> str:
        parts = ["spiking" if self.spiking else "float"] + (["sal"] if self.sal else []) + (["analog"] if self.analog else [])
        return "+".join(parts)


def kind_of(net: nn.Module) -> ModelKind:
    mods = list(net.modules())
    return ModelKind(spiking=any(isinstance(m, LocalDerivative) for m in mods),
                     sal=any(isinstance(m, AreaLinear) for m in mods),
                     analog=any(_analog_of(m) is not None for m in mods))


class TokenSALTwin(SALTwin):
    """A general model's area layer: every position of a (..., n_in) input routed on its own."""

    def apply_routed(self, x):
        flat = x.reshape(-1, x.shape[-1])
        y, area = super().apply_routed(flat)
        return y.reshape(*x.shape[:-1], y.shape[-1]), area.reshape(x.shape[:-1])


class ModuleTwin(nn.Module):
    """The exportable twin of any trained module (zoo or the user's): a copy in which SAL's area layers
    route with ONNX ops and analog layers compute what their devices hold; everything else as it is."""

    def __init__(self, model: nn.Module, sal_mode: str = "gather"):
        super().__init__()
        self.kind = kind_of(model)
        if self.kind.spiking:
            raise NeurosalError("spiking models export through their spec chain (snn:...)")
        twin = copy.deepcopy(model)
        self.output = None
        if isinstance(twin, Wrapped):  # inference needs none of the rule's machinery -- and a wrapper
            # not yet run would plan (draw its feedback, probe the model) inside the traced graph
            self.output = twin.output
            twin = twin.unwrap()
        for name, m in list(twin.named_modules()):
            if isinstance(m, AreaLinear):
                new = TokenSALTwin(m, sal_mode) if m.tokens else SALTwin(m, sal_mode)
            elif _analog_of(m) is not None and isinstance(m, nn.MultiheadAttention):
                new = MHATwin(m)  # before its out_proj, which the loop reaches next (now the twin's)
            elif _analog_of(m) is not None and isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                new = Conv2dTwin(m)
            elif _analog_of(m) is not None and isinstance(m, nn.Linear):
                new = LinearTwin(m)
            else:
                continue
            replace_module(twin, name, keep_own_forward(new))
        self.model = twin.eval()

    def output_names(self) -> list[str]:
        return ["logits"]

    def forward(self, x):
        return select_output(self.model(x), self.output)[0]  # a dict/tuple output: its logits (or wrap's output=)


class InferenceTwin(nn.Module):
    """The exportable twin of a trained :class:`neurosal.models.Net`. Outputs logits, and on request
    each SAL layer's chosen area (int64) and each spiking layer's spike train."""

    def __init__(self, net: Net, extra_outputs: bool = False, sal_mode: str = "gather"):
        super().__init__()
        self.kind = kind_of(net)
        self.stem = nn.Identity() if self.kind.spiking else net.stem  # spiking: input = spike trains
        self.extra_outputs = extra_outputs
        blocks = []
        for blk in net.blocks:
            op = blk.op
            if isinstance(op, AreaLinear):
                new_op = SALTwin(op, sal_mode)
            elif isinstance(op, nn.Conv2d):
                new_op = Conv2dTwin(op)
            elif isinstance(op, nn.Linear):
                new_op = LinearTwin(op)
            else:
                raise NeurosalError(f"cannot export layer type {type(op).__name__} to ONNX")
            post = LIFTwin(blk.post) if isinstance(blk.post, LocalDerivative) else blk.post
            blocks.append(Block(new_op, post, blk.residual))
        self.blocks = nn.ModuleList(blocks)

    def output_names(self) -> list[str]:
        names = ["logits"]
        if self.extra_outputs:
            names += [f"area_{i}" for i, b in enumerate(self.blocks) if isinstance(b.op, SALTwin)]
            names += [f"spikes_{i}" for i, b in enumerate(self.blocks) if isinstance(b.post, LIFTwin)]
        return names

    def forward(self, x):
        h = self.stem(x)
        areas, spikes = [], []
        for blk in self.blocks:
            if isinstance(blk.op, SALTwin):
                a, area = blk.op.apply_routed(h)
                areas.append(area)
            else:
                a = blk.op(h)
            if isinstance(blk.post, LIFTwin):
                out, s = blk.post.run(a)
                spikes.append(s)
            else:
                out = blk.post(a)
            h = torch.add(h, out, alpha=blk.residual) if blk.residual else out
        return (h, *areas, *spikes) if self.extra_outputs else h


def export_onnx(net: nn.Module, example: torch.Tensor, path: str | Path, opset: int = OPSET,
                extra_outputs: bool = False, sal_mode: str = "gather",
                metadata: dict[str, str] | None = None) -> InferenceTwin:
    """Write ``net`` (eval mode) as ONNX with a dynamic batch axis; returns the twin that was exported.

    ``metadata`` becomes the model's ``metadata_props`` (e.g. the class names). The file appears whole
    or not at all: the graph is written beside ``path``, checked, then renamed onto it.
    """
    import onnx

    net = net.eval()
    if isinstance(net, Net):
        twin = InferenceTwin(net, extra_outputs, sal_mode).eval()
    else:
        if extra_outputs:
            raise NeurosalError("extra outputs (areas, spikes) are exported for spec chains only")
        twin = ModuleTwin(net, sal_mode).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.onnx")
    batch = torch.export.Dim("batch", min=1)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        try:
            torch.onnx.export(twin, (example,), str(tmp), input_names=["input"],
                              output_names=twin.output_names(), opset_version=opset, dynamic_shapes=({0: batch},),
                              dynamo=True, external_data=False, verbose=False)
        except NeurosalError:
            raise
        except Exception as exc:
            raise NeurosalError(f"ONNX export of this {twin.kind.name} model failed: {type(exc).__name__}: "
                                f"{exc}") from exc
        finally:
            quiet.setLevel(level)
        model = onnx.load(str(tmp))
        for key, value in (metadata or {}).items():
            model.metadata_props.add(key=key, value=str(value))
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return twin


@contextmanager
def deterministic_devices(net: nn.Module):
    """Analog layers without read noise (a random process the exported graph leaves out)."""
    tiles = [m.tiles for m in net.modules() if _analog_of(m) is not None]
    saved = [t.cfg for t in tiles]
    try:
        for t in tiles:
            t.cfg = t.cfg.replace(read_noise=0.0)
        yield
    finally:
        for t, cfg in zip(tiles, saved):
            t.cfg = cfg


def reference_outputs(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The original torch model's logits for the twin's input (spiking: spike trains, stem bypassed;
    analog: the devices' deterministic function, without read noise)."""
    net.eval()
    with torch.no_grad(), deterministic_devices(net):
        if isinstance(net, Net) and kind_of(net).spiking:
            h = x
            for blk in net.blocks:
                h = blk(h)
            return h
        return select_output(net(x))[0]


def run_onnxruntime(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.detach().cpu().numpy()})


def quantised(net: nn.Module) -> bool:
    """Whether ``net`` has analog layers whose reads go through a DAC or an ADC."""
    return any(a is not None and (a[0].dac_bits or a[0].adc_bits) for a in map(_analog_of, net.modules()))


def verify(net: nn.Module, path, x: torch.Tensor, tol: float = 1e-5) -> dict:
    """onnxruntime vs the original torch model on ``x``: max abs difference of the logits and
    argmax agreement; ``ok`` is False above ``tol``.

    A model read through converters (analog layers with ``dac_bits``/``adc_bits``) rounds to codes, and a
    value that torch and onnxruntime compute a rounding error apart on either side of a code boundary
    lands on neighbouring codes: the same graph, one code apart, and in a deep network that flip travels
    on (a 6-layer rram-like transformer: ~4% of samples, the rest equal to 1e-7). There ``ok`` asks that
    the median sample agree within ``tol`` -- a wrong export moves every sample -- and
    ``samples_beyond_tol`` reports the share of the others."""
    outs = run_onnxruntime(path, x)
    ref = reference_outputs(net, x).cpu()
    got = torch.from_numpy(outs[0])
    per = (got - ref).abs().reshape(len(x), -1).amax(1)
    diff = float(per.max())
    agree = float((got.argmax(1) == ref.argmax(1)).float().mean())
    rep = {"max_abs_diff": diff, "argmax_agreement": agree, "tolerance": tol, "ok": diff <= tol,
           "samples": len(x)}
    if quantised(net):
        rep.update(quantised=True, samples_beyond_tol=float((per > tol).float().mean()),
                   median_abs_diff=float(per.median()), ok=float(per.median()) <= tol)
    return rep
