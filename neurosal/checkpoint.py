"""Atomic checkpoint files: a crash while writing never harms a finished checkpoint."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

from .errors import NeurosalError

PATTERN = re.compile(r"ckpt-epoch-(\d+)\.pt$")


def atomic_write_bytes(path: Path, write) -> None:
    """Write through ``write(fileobj)`` into a temp file beside ``path``, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def save(path: Path, state: dict) -> None:
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def load(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise NeurosalError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated zip, pickle errors, ...
        raise NeurosalError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or "format" not in state or state["format"] != "neurosal-ckpt-1":
        raise NeurosalError(f"{path} is not a neurosal checkpoint")
    return state


def epoch_path(out: Path, epoch: int) -> Path:
    return Path(out) / f"ckpt-epoch-{epoch:04d}.pt"


def latest(out: Path) -> Path | None:
    found = sorted((int(m.group(1)), p) for p in Path(out).glob("ckpt-epoch-*.pt")
                   if (m := PATTERN.search(p.name)))
    return found[-1][1] if found else None


def prune(out: Path, keep: int) -> None:
    found = sorted((int(m.group(1)), p) for p in Path(out).glob("ckpt-epoch-*.pt")
                   if (m := PATTERN.search(p.name)))
    for _, p in found[:-keep] if keep > 0 else []:
        p.unlink()
