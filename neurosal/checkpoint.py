"""Checkpoint files: written atomically, read without running any code, checked before use.

* Writing: a temp file beside the target, fsync, then ``os.replace`` -- a crash (or SIGKILL) while
  writing leaves the finished checkpoints as they were and at most a stale ``*.tmp`` file, which the
  next run removes.
* Reading: ``torch.load(weights_only=True)``. A checkpoint holds only tensors and plain Python data
  (dicts, lists, strings, numbers, None); a file that asks the unpickler for anything else -- a class,
  a function such as ``os.system`` -- is refused before any of it runs. Run folders are shared between
  people, so a checkpoint is untrusted input.
* Checking: the structure is validated (:data:`SCHEMA`) so that a malformed file is an ``error:``
  naming the file and the missing or mistyped part, never a ``KeyError`` later on.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from .errors import NeurosalError, first_line

FORMAT = "neurosal-ckpt-1"
PATTERN = re.compile(r"ckpt-epoch-(\d+)\.pt$")
TMP_SUFFIX = ".tmp"

#: top-level entries of a checkpoint and the types they must have
SCHEMA: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "config": (dict,),
    "epoch": (int,),
    "input_shape": (list, tuple),
    "n_classes": (int,),
    "net": (dict,),
    "rule": (dict,),
    "optimizer": (dict,),
    "history": (list,),
    "torch_rng": (torch.Tensor,),
}
#: entries that may be absent (older checkpoints) or None
OPTIONAL: dict[str, tuple[type, ...]] = {
    "cuda_rng": (torch.Tensor,),
    "classes": (list,),
}


def atomic_write_bytes(path: Path, write) -> None:
    """Write through ``write(fileobj)`` into a temp file beside ``path``, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=TMP_SUFFIX, dir=path.parent)
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
    """Write a checkpoint atomically (the state must hold only tensors and plain data)."""
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def ensure_writable_dir(path: Path) -> Path:
    """Create folder ``path`` if needed and prove a file can be written there -- before hours of work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".neurosal-probe.", suffix=TMP_SUFFIX, dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise NeurosalError(f"cannot write to folder {path}: {exc.strerror or exc}") from exc
    return path


def remove_stale_temps(folder: Path) -> None:
    """Remove temp files a killed writer left behind (never a finished file)."""
    for p in Path(folder).glob(f"*.*{TMP_SUFFIX}"):
        if p.name.startswith(("ckpt-epoch-", "metrics.json.", "config.json.", "curves.png.")):
            p.unlink(missing_ok=True)


def load(path: Path) -> dict:
    """Read and check a checkpoint; any problem is a :class:`NeurosalError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise NeurosalError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise NeurosalError(f"checkpoint {path} is not a file")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says what matters
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses every global it does not know (classes, functions like os.system, ...)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        asked = next((line for line in lines if "GLOBAL" in line), None)
        if asked:
            raise NeurosalError(f"checkpoint {path} was refused: it asks for Python objects beyond tensors and "
                                f"plain data, which could run code when loaded ({asked})") from exc
        detail = next((line for line in lines if line.startswith("Unsupported")), lines[-1] if lines else "")
        raise NeurosalError(f"checkpoint {path} is corrupt or truncated (not a plain-data pickle: {detail}); "
                            "nothing in it was run") from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, TypeError,
            AttributeError, IndexError) as exc:  # truncated zip, garbage bytes, ...
        raise NeurosalError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: "
                            f"{first_line(exc)})") from exc
    validate(state, path)
    return state


def validate(state, path: Path) -> None:
    """Check a loaded checkpoint's structure against :data:`SCHEMA`."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise NeurosalError(f"{path} is not a neurosal checkpoint (no '{FORMAT}' format tag)")
    missing = [k for k in SCHEMA if k not in state]
    if missing:
        raise NeurosalError(f"checkpoint {path} is incomplete: missing {', '.join(repr(k) for k in missing)}")
    for table, optional in ((SCHEMA, False), (OPTIONAL, True)):
        for key, types in table.items():
            value = state.get(key)
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, types):
                raise NeurosalError(f"checkpoint {path}: {key!r} should be {' or '.join(t.__name__ for t in types)}, "
                                    f"not {type(value).__name__}")
    if state["epoch"] < 0 or state["n_classes"] < 1:
        raise NeurosalError(f"checkpoint {path}: impossible epoch {state['epoch']} or class count "
                            f"{state['n_classes']}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in state["input_shape"]):
        raise NeurosalError(f"checkpoint {path}: input_shape {state['input_shape']!r} is not a list of sizes")
    if not all(isinstance(r, dict) for r in state["history"]):
        raise NeurosalError(f"checkpoint {path}: 'history' should be a list of per-epoch records")
    for key in ("rule", "model"):
        if not isinstance(state["config"].get(key), str):
            raise NeurosalError(f"checkpoint {path}: 'config' lacks the {key!r} setting")


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
