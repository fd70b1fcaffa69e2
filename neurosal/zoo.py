"""Models beyond the spec chains, trained through the general engine (:mod:`neurosal.wrap`).

    resnet:20                         CIFAR-style ResNet (He et al. 2016, sec. 4.2): 6n+2 layers, three
                                      stages of n basic blocks (16/32/64 channels), BatchNorm, parameter-free
                                      shortcuts (option A: strided identity, zero-padded channels);
                                      resnet:N for N = 8, 14, 20, 32, 44, 56, 110, ...; resnet:20:width=32
                                      scales the channels
    vit:patch=4,dim=64,depth=4,heads=4,mlp=2,pool=mean
                                      a small Vision Transformer (Dosovitskiy et al. 2021): patch embedding,
                                      learned positions, pre-LayerNorm encoder layers with GELU, LayerNorm,
                                      linear head on the mean of the tokens (pool=mean, as in Beyer et al.
                                      2022's plain ViT baselines) or on a class token (pool=cls); every
                                      field optional
    gpt:layers=4,dim=256,heads=4,ctx=128,mlp=4
                                      a GPT-style decoder for character-level text (Radford et al. 2019):
                                      token embedding plus learned positions, pre-LayerNorm blocks of
                                      causal self-attention (fused q/k/v Linear, scaled-dot-product
                                      attention) and a GELU MLP (mlp x dim hidden units), final LayerNorm,
                                      linear head to the vocabulary at every position; GPT-2
                                      initialisation (N(0, 0.02), residual projections scaled by
                                      1/sqrt(2 layers)); untied head. Every field optional.
    path/to/file.py:ClassName[:k=v,...]
                                      your own module: the class is imported from the file and built with
                                      the k=v options, plus ``n_classes`` / ``input_shape`` when its
                                      constructor takes them

The ``file.py`` form runs that file's code, as importing any Python module does: point it only at
code you trust (your own).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import GREY_HINT, NeurosalError

KINDS = ("resnet", "vit", "gpt")


def is_zoo_spec(spec: str) -> bool:
    head = spec.split(":", 1)[0].strip().lower()
    return head in KINDS or _file_part(spec) is not None


def _file_part(spec: str):
    """``(path, class, options)`` for ``path.py:Class[:opts]`` specs, else None."""
    if ".py:" not in spec:
        return None
    path, _, rest = spec.partition(".py:")
    cls, _, opts = rest.partition(":")
    return Path(path + ".py"), cls, opts


def _options(text: str, spec: str) -> dict:
    from .rules.base import parse_options

    try:
        return parse_options(text)
    except NeurosalError as exc:
        raise NeurosalError(f"model {spec!r}: {exc}") from None


# ----------------------------------------------------------------------------- ResNet

class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.pad = stride, c_out - c_in

    def shortcut(self, x):
        """Option A: parameter-free (subsample, zero-pad the new channels)."""
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, depth: int = 20, in_channels: int = 3, n_classes: int = 10, width: int = 16):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise NeurosalError(f"resnet:{depth}: the depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        stages, c = [], width
        for i, c_out in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(c, c_out, 2 if (i and not j) else 1))
                c = c_out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(c, n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        h = self.layer3(self.layer2(self.layer1(h)))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


# ----------------------------------------------------------------------------- ViT

class ViT(nn.Module):
    def __init__(self, input_shape=(1, 28, 28), n_classes: int = 10, patch: int = 4, dim: int = 64,
                 depth: int = 4, heads: int = 4, mlp: float = 2.0, pool: str = "mean"):
        super().__init__()
        if pool not in ("mean", "cls"):
            raise NeurosalError(f"vit: pool must be mean or cls, not {pool!r}")
        self.pool = pool
        c, h, w = input_shape
        if h % patch or w % patch:
            raise NeurosalError(f"vit: patch {patch} does not divide the {h}x{w} images")
        if dim % heads:
            raise NeurosalError(f"vit: dim {dim} is not a multiple of heads {heads}")
        self.patch_embed = nn.Conv2d(c, dim, patch, patch)
        n_tokens = (h // patch) * (w // patch) + (pool == "cls")
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos = nn.Parameter(torch.randn(1, n_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, int(mlp * dim), dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.cls is not None:
            t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1)
        t = t + self.pos
        for blk in self.blocks:
            t = blk(t)
        return self.head(self.norm(t[:, 0] if self.cls is not None else t.mean(1)))


# ----------------------------------------------------------------------------- GPT

class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t only."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class GPTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, int(mlp * dim))
        self.fc2 = nn.Linear(int(mlp * dim), dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """Decoder-only transformer: ``(B, T)`` token indices -> ``(B, T, vocab)`` next-token logits."""

    def __init__(self, vocab: int, layers: int = 4, dim: int = 256, heads: int = 4, ctx: int = 128,
                 mlp: float = 4.0):
        super().__init__()
        if dim % heads:
            raise NeurosalError(f"gpt: dim {dim} is not a multiple of heads {heads}")
        self.ctx = ctx
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(ctx, dim)
        self.blocks = nn.ModuleList(GPTBlock(dim, heads, mlp) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        t = idx.shape[-1]
        if t > self.ctx:
            raise NeurosalError(f"gpt: {t} positions given, the model has ctx={self.ctx}")
        if idx.is_floating_point():
            raise NeurosalError("gpt takes token indices (an integer tensor), got floats")
        h = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h))


GPT_FIELDS = {"layers": int, "dim": int, "heads": int, "ctx": int, "mlp": (int, float)}


def gpt_options(spec: str) -> dict:
    """The checked k=v options of a ``gpt:...`` spec (defaults not filled in)."""
    o = _options(spec.partition(":")[2], spec)
    for k, v in o.items():
        if k not in GPT_FIELDS:
            raise NeurosalError(f"model {spec!r}: unknown option {k!r}; gpt takes {', '.join(GPT_FIELDS)}")
        if not isinstance(v, GPT_FIELDS[k]) or isinstance(v, bool) or v <= 0:
            raise NeurosalError(f"model {spec!r}: {k} must be a positive number, got {v!r}")
    return o


def context_length(spec: str) -> int | None:
    """The context a model spec was built for (gpt's ctx, 128 by default), or None when it has none."""
    if spec.split(":", 1)[0].strip().lower() != "gpt":
        return None
    return gpt_options(spec).get("ctx", 128)


# ----------------------------------------------------------------------------- building

def build_zoo(spec: str, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    file = _file_part(spec)
    if file is not None:
        return _from_file(spec, *file, input_shape, n_classes)
    kind, _, rest = spec.strip().partition(":")
    kind = kind.lower()
    if kind == "gpt":
        o = gpt_options(spec)
        ctx = o.setdefault("ctx", 128)
        if len(input_shape) != 1 or input_shape[0] > ctx:
            raise NeurosalError(f"model {spec!r} needs text windows of at most ctx={ctx} characters "
                                f"(--data austen or a .txt file); the data has shape {tuple(input_shape)}")
        return GPT(n_classes, **o)
    if len(input_shape) != 3:
        raise NeurosalError(f"model {spec!r} needs image inputs (C, H, W); the data has shape {tuple(input_shape)}{GREY_HINT if len(input_shape) == 2 else ''}")
    if kind == "resnet":
        depth_text, _, opts = rest.partition(":")
        try:
            depth = int(depth_text or 20)
        except ValueError:
            raise NeurosalError(f"model {spec!r}: resnet:N needs a depth N = 6n+2, e.g. resnet:20") from None
        o = _options(opts, spec)
        unknown = set(o) - {"width"}
        if unknown:
            raise NeurosalError(f"model {spec!r}: unknown option(s) {sorted(unknown)}; resnet takes width")
        width = o.get("width", 16)
        if not isinstance(width, int) or width < 1:
            raise NeurosalError(f"model {spec!r}: width must be a positive integer")
        return ResNet(depth, input_shape[0], n_classes, width)
    o = _options(rest, spec)
    fields = {"patch": int, "dim": int, "depth": int, "heads": int, "mlp": (int, float), "pool": str}
    for k, v in o.items():
        if k not in fields:
            raise NeurosalError(f"model {spec!r}: unknown option {k!r}; vit takes {', '.join(fields)}")
        if k == "pool":
            if v not in ("mean", "cls"):
                raise NeurosalError(f"model {spec!r}: pool must be mean or cls, not {v!r}")
            continue
        if not isinstance(v, fields[k]) or isinstance(v, bool) or v <= 0:
            raise NeurosalError(f"model {spec!r}: {k} must be a positive number, got {v!r}")
    return ViT(tuple(input_shape), n_classes, **o)


def _from_file(spec: str, path: Path, cls_name: str, opts: str, input_shape, n_classes: int) -> nn.Module:
    if not path.is_file():
        raise NeurosalError(f"model {spec!r}: no such file {path}")
    name = f"neurosal_user_{abs(hash(str(path.resolve())))}"
    module = sys.modules.get(name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            raise NeurosalError(f"model {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
        sys.modules[name] = module
    cls = getattr(module, cls_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        found = [k for k, v in vars(module).items() if inspect.isclass(v) and issubclass(v, nn.Module)
                 and v.__module__ == name]
        raise NeurosalError(f"model {spec!r}: {path} has no nn.Module class {cls_name!r}; it defines "
                            f"{', '.join(found) or 'none'}")
    kwargs = _options(opts, spec)
    params = inspect.signature(cls.__init__).parameters
    if "n_classes" in params:
        kwargs.setdefault("n_classes", n_classes)
    if "input_shape" in params:
        kwargs.setdefault("input_shape", tuple(input_shape))
    try:
        return cls(**kwargs)
    except Exception as exc:
        missing = [n for n, p in params.items() if n != "self" and p.default is p.empty
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in kwargs]
        hint = (f" (give {', '.join(missing)} in the spec: "
                f"{path}:{cls_name}:{','.join(f'{n}=...' for n in missing)})" if missing else "")
        raise NeurosalError(f"model {spec!r}: {cls_name}(**{kwargs}) failed: {type(exc).__name__}: {exc}"
                            f"{hint}") from exc


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(model: nn.Module) -> str:
    return f"{type(model).__name__} ({n_params(model) / 1e6:.3g}M parameters)"


__all__ = ["BasicBlock", "ResNet", "ViT", "GPT", "context_length", "build_zoo", "is_zoo_spec", "describe"]
