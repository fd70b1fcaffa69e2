"""Models as a stack of blocks: one parametrised layer (``op``) followed by a parameter-free tail (``post``).

That shape is what lets every rule work on every model: a rule sends a teaching signal to the output
of each block; the block's tail is differentiated locally (no weight transport involved) and the op's
substrate turns the signal into a weight change.

Spec strings::

    mlp:256x256          two hidden layers of 256 (ReLU)
    mlp:256*8            eight hidden layers of 256
    mlp:100x100:tanh     activation: relu (default), tanh, sigmoid
    mlp:64*128:relu:res  residual: every hidden block whose input and output widths match adds its
                         input to its output, h_l = h_{l-1} + alpha f(a_l), alpha = 1/sqrt(number of
                         residual blocks) so the stream's scale stays O(1) at any depth; the skip has
                         no parameters
    cnn  / cnn:lenet     LeNet-like: conv(6,5x5)-pool-conv(16,5x5)-pool-fc120-fc84
    cnn:32,64/128        conv channels / fully connected widths (5x5 'same' convs, 2x2 max-pool)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .errors import GREY_HINT, NeurosalError
from .layers import post_kind

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class Block(nn.Module):
    def __init__(self, op: nn.Module, post: nn.Module | None = None, residual: float = 0.0):
        super().__init__()
        self.op = op
        self.post = post if post is not None else nn.Identity()
        self.residual = float(residual)  # 0: plain block; else the branch scale alpha

    def forward(self, x):
        out = self.post(self.op(x))
        return torch.add(x, out, alpha=self.residual) if self.residual else out

    @property
    def post_kind(self) -> str:
        """How the tail is differentiated (see :func:`neurosal.layers.post_kind`), computed once."""
        kind = self.__dict__.get("_post_kind")
        if kind is None:
            kind = self.__dict__["_post_kind"] = post_kind(self.post)
        return kind


class Net(nn.Module):
    """``stem`` (parameter-free reshaping) then blocks; the last block's output is the logits."""

    def __init__(self, stem: nn.Module, blocks: list[Block], spec: str = ""):
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.spec = spec

    def forward(self, x):
        h = self.stem(x)
        for blk in self.blocks:
            h = blk(h)
        return h


@dataclass
class ModelSpec:
    kind: str
    hidden: list[int]
    conv: list[int]
    activation: str
    residual: bool = False


def parse_spec(spec: str) -> ModelSpec:
    parts = spec.strip().lower().split(":")
    kind = parts[0]
    if kind not in ("mlp", "cnn"):
        extra = "".join(f", {k}:..." for k in sorted(_model_plugins()))
        raise NeurosalError(f"unknown model {spec!r}: use mlp:WxW..., mlp:W*DEPTH, cnn[:C,C/F,F]{extra}, "
                            "resnet:N, vit:..., or path/to/file.py:ClassName")
    act = "relu"
    residual = len(parts) > 3 and parts[3] == "res"
    if len(parts) > 4 or (len(parts) > 3 and not residual):
        raise NeurosalError(f"cannot parse model spec {spec!r}: the 4th field may only be 'res'")
    if len(parts) > 2:
        act = parts[2] or "relu"
    if act not in ACTIVATIONS:
        raise NeurosalError(f"unknown activation {act!r} in {spec!r}; known: {', '.join(ACTIVATIONS)}")
    body = parts[1] if len(parts) > 1 else ("lenet" if kind == "cnn" else "")
    try:
        if kind == "mlp":
            if not body:
                raise ValueError
            if "*" in body:
                w, d = body.split("*")
                hidden, conv = [int(w)] * int(d), []
            else:
                hidden, conv = [int(w) for w in body.split("x")], []
        else:
            if body == "lenet":
                body = "6,16/120,84"
            c, _, f = body.partition("/")
            conv = [int(v) for v in c.split(",") if v]
            hidden = [int(v) for v in f.split(",") if v]
    except ValueError:
        raise NeurosalError(f"cannot parse model spec {spec!r}") from None
    if any(v <= 0 for v in hidden + conv):
        raise NeurosalError(f"model {spec!r}: layer sizes must be positive")
    return ModelSpec(kind, hidden, conv, act, residual)


def build_model(spec: str, input_shape: tuple[int, ...], n_classes: int,
                linear: Callable[[int, int], nn.Module] = nn.Linear,
                tail: Callable[[nn.Module], nn.Module] = lambda act: act) -> Net:
    """Build a model; ``linear(n_in, n_out)`` makes each *hidden* fully connected layer and
    ``tail(activation)`` its parameter-free tail.

    The factories are how area-partitioned layers (SAL) or other layer kinds slot in; the output layer
    is always a plain ``nn.Linear``.
    """
    plugin = _model_plugins().get(spec.split(":", 1)[0].strip().lower())
    if plugin is not None:  # e.g. snn:... from hw_models
        return plugin(spec, input_shape, n_classes, linear, tail)
    s = parse_spec(spec)
    act = ACTIVATIONS[s.activation]
    blocks: list[Block] = []
    if s.kind == "mlp":
        stem: nn.Module = nn.Flatten()
        n_in = 1
        for d in input_shape:
            n_in *= d
    else:
        if len(input_shape) != 3:
            raise NeurosalError(f"model {spec!r} needs image inputs (C, H, W); data has shape {input_shape}{GREY_HINT if len(input_shape) == 2 else ''}")
        stem = nn.Identity()
        c, hgt, wid = input_shape
        for ch in s.conv:
            conv_tail: list[nn.Module] = [act()]
            if min(hgt, wid) >= 2:
                conv_tail.append(nn.MaxPool2d(2))
                hgt, wid = hgt // 2, wid // 2
            blocks.append(Block(nn.Conv2d(c, ch, 5, padding=2), nn.Sequential(*conv_tail)))
            c = ch
        n_in = c * hgt * wid
        if blocks:
            blocks[-1].post.append(nn.Flatten())
        else:
            stem = nn.Flatten()
    widths = [n_in] + s.hidden
    n_res = sum(1 for a, b in zip(widths, widths[1:]) if a == b) if s.residual else 0
    for width in s.hidden:
        alpha = n_res ** -0.5 if n_res and n_in == width else 0.0
        blocks.append(Block(linear(n_in, width), tail(act()), residual=alpha))
        n_in = width
    blocks.append(Block(nn.Linear(n_in, n_classes)))
    return Net(stem, blocks, spec)


def _model_plugins() -> dict:
    """Model families other packages provide (entry point group ``neurosal.models``)."""
    from importlib.metadata import entry_points

    return {ep.name: ep.load() for ep in entry_points(group="neurosal.models")}
