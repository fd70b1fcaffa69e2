"""Character-level text, offline: Jane Austen's novels from Debian, or a text file a user points to.

    austen            the six novels of Debian's ``r-cran-janeaustenr`` (4,025,022 characters, 81 distinct).
                      Training text: Sense and Sensibility, Pride and Prejudice, Mansfield Park, Emma,
                      Northanger Abbey (3,558,169 characters); validation: **Persuasion** (466,853
                      characters), held out whole -- the last novel Austen finished, so validation
                      measures generalisation to an unseen book, not to unseen lines of seen ones.
    path/to/file.txt  your UTF-8 text: the first 90% of its characters train, the last 10% validate.

The vocabulary is every character of the corpus (training and validation text), sorted by code point;
it travels with the dataset as ``Dataset.classes`` (one character per class) into checkpoints, so
:func:`generate` can decode a trained run's samples. A corpus becomes a :class:`~neurosal.data.Dataset`
of non-overlapping windows (:meth:`TextCorpus.windows`): ``x`` is ``(N, context)`` character indices and
``y`` the same window shifted by one character, so the loss covers every position.

Where the novels come from: the Debian package is an R lazy-load database. ``make setup`` fetches it
with ``apt-get download r-cran-janeaustenr`` and unpacks its ``data`` folder (no R needed) into
``<venv>/share/neurosal/janeaustenr``; ``/usr/lib/R/site-library/janeaustenr`` (an installed R package)
and ``--data-root FOLDER`` are searched too. ``Rdata.rdx`` (gzip) is an R-serialised index, variable ->
(offset, length) into ``Rdata.rdb``, where each object is a 4-byte big-endian length followed by a
zlib stream of an R serialisation (a character vector, one element per line). PyPI ``rdata`` parses
those serialisations: data only, nothing is executed.
"""

from __future__ import annotations

import gzip
import math
import sys
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .errors import NeurosalError, first_line

AUSTEN_TRAIN = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey")
AUSTEN_VALIDATION = "persuasion"
AUSTEN_HOW = ("get it with: make setup (or: apt-get download r-cran-janeaustenr && dpkg -x "
              "r-cran-janeaustenr_*.deb DIR, then --data-root DIR)")
TEXT_NAMES = ("austen",)
VALIDATION_SHARE = 0.1  # of a user's text file: the last 10% of its characters
MAX_VOCAB = 4096  # more distinct characters than this is not a character-level corpus


def is_text(name: str) -> bool:
    """Whether a ``--data`` value names text (a character-level corpus) rather than a classification set."""
    return name.lower() in TEXT_NAMES or name.lower().endswith(".txt")


@dataclass
class TextCorpus:
    name: str
    train: str
    val: str
    vocab: list[str]
    validation: str  # what the validation text is, in words

    def encode(self, text: str) -> torch.Tensor:
        """Characters -> int64 indices; characters outside the vocabulary are refused by name."""
        return torch.as_tensor(_encode(text, self.vocab, self.name))

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    def windows(self, context: int, limit: int | None = None):
        """The corpus as a :class:`~neurosal.data.Dataset` of ``context``-character windows (inputs) and
        the windows one character later (targets); ``limit`` keeps the first N training windows."""
        from .data import Dataset

        if context < 1:
            raise NeurosalError(f"the context must be >= 1 characters, got {context}")
        parts = []
        for part, text in (("training", self.train), ("validation", self.val)):
            ids = self.encode(text)
            n = (len(ids) - 1) // context
            if n < 1:
                raise NeurosalError(f"{self.name}: the {part} text has {len(ids)} characters, too few for one "
                                    f"window of {context} + 1 (use a longer text or a shorter context)")
            x = ids[:n * context].view(n, context)
            y = ids[1:n * context + 1].view(n, context)
            parts += [x, y]
        x_tr, y_tr, x_te, y_te = parts
        if limit is not None:
            x_tr, y_tr = x_tr[:limit], y_tr[:limit]
        return Dataset(self.name, x_tr, y_tr, x_te, y_te, len(self.vocab), list(self.vocab))


def _encode(text: str, vocab: list[str], name: str) -> np.ndarray:
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.array([ord(c) for c in vocab], dtype=np.uint32)
    idx = np.searchsorted(table, codes)
    idx = np.minimum(idx, len(table) - 1)
    bad = table[idx] != codes
    if bad.any():
        missing = sorted({chr(c) for c in codes[bad]})
        raise NeurosalError(f"{name}: {len(missing)} character(s) outside the vocabulary: "
                            + ", ".join(repr(c) for c in missing[:10]))
    return idx.astype(np.int64)


def make_corpus(name: str, train: str, val: str, validation: str) -> TextCorpus:
    vocab = sorted(set(train) | set(val))
    if len(vocab) > MAX_VOCAB:
        raise NeurosalError(f"{name}: {len(vocab)} distinct characters (more than {MAX_VOCAB}); "
                            "character-level models need a text, not arbitrary data")
    return TextCorpus(name, train, val, vocab, validation)


# ----------------------------------------------------------------------------- sources

def austen_dirs(root: str | None = None) -> list[Path]:
    """Where the janeaustenr ``data`` folder is looked for, in order: within ``root`` only when given."""
    if root is not None:
        r = Path(root)
        return [r, r / "data", r / "janeaustenr" / "data", r / "usr/lib/R/site-library/janeaustenr/data"]
    return [Path(sys.prefix) / "share/neurosal/janeaustenr/data",
            Path("/usr/lib/R/site-library/janeaustenr/data"),
            Path("/usr/local/lib/R/site-library/janeaustenr/data")]


def _find_austen(root: str | None) -> Path:
    for d in austen_dirs(root):
        if (d / "Rdata.rdx").is_file() and (d / "Rdata.rdb").is_file():
            return d
    where = root if root is not None else f"{sys.prefix}/share/neurosal/janeaustenr"
    raise NeurosalError(f"the Jane Austen novels (Debian package r-cran-janeaustenr) are not in {where}; "
                        + AUSTEN_HOW)


def _r_object(data: bytes, what: str):
    try:
        import rdata
    except ImportError as exc:
        raise NeurosalError("reading the austen novels needs PyPI's rdata: pip install rdata") from exc
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS": it is one
            return rdata.conversion.convert(rdata.parser.parse_data(data))
    except Exception as exc:  # a malformed file: rdata raises many kinds
        raise NeurosalError(f"{what} is not a readable R serialisation: {first_line(exc)}") from exc


@lru_cache(maxsize=4)
def read_austen(folder: str) -> dict[str, str]:
    """Every novel of a janeaustenr ``data`` folder: variable name -> text (lines joined by newlines)."""
    d = Path(folder)
    try:
        index = _r_object(gzip.decompress((d / "Rdata.rdx").read_bytes()), d / "Rdata.rdx")
    except (OSError, EOFError, zlib.error) as exc:
        raise NeurosalError(f"{d / 'Rdata.rdx'} is not a gzip-compressed R index: {first_line(exc)}") from exc
    blob = (d / "Rdata.rdb").read_bytes()
    variables = index.get("variables") if isinstance(index, dict) else None
    if not isinstance(variables, dict):
        raise NeurosalError(f"{d / 'Rdata.rdx'} has no variable index; is this the janeaustenr package?")
    novels = {}
    for name, where in variables.items():
        try:
            off, length = (int(v) for v in where)
        except (TypeError, ValueError):
            raise NeurosalError(f"{d / 'Rdata.rdx'}: bad entry for {name!r}") from None
        raw = blob[off:off + length]
        if off < 0 or length < 5 or len(raw) != length:
            raise NeurosalError(f"{d / 'Rdata.rdb'} is truncated: {name!r} lies outside the file")
        try:
            data = zlib.decompress(raw[4:])
        except zlib.error as exc:
            raise NeurosalError(f"{d / 'Rdata.rdb'}: {name!r} does not decompress: {first_line(exc)}") from exc
        lines = _r_object(data, f"{name!r} in {d / 'Rdata.rdb'}")
        if not isinstance(lines, (list, np.ndarray)) or not all(isinstance(s, str) for s in lines):
            raise NeurosalError(f"{d / 'Rdata.rdb'}: {name!r} is not a character vector")
        novels[str(name)] = "\n".join(lines)
    return novels


def load_austen(root: str | None = None) -> TextCorpus:
    novels = read_austen(str(_find_austen(root)))
    missing = [n for n in AUSTEN_TRAIN + (AUSTEN_VALIDATION,) if n not in novels]
    if missing:
        raise NeurosalError(f"the janeaustenr data lacks {missing}; reinstall it ({AUSTEN_HOW})")
    train = "\n\n".join(novels[n] for n in AUSTEN_TRAIN)
    return make_corpus("austen", train, novels[AUSTEN_VALIDATION], "Persuasion (held out whole)")


def load_text_file(path: str | Path) -> TextCorpus:
    p = Path(path)
    if not p.is_file():
        raise NeurosalError(f"no such text file: {p}")
    raw = p.read_bytes()
    if not raw.strip():
        raise NeurosalError(f"{p} is empty: a text file with at least a few hundred characters is needed")
    if b"\x00" in raw[:1 << 20]:
        raise NeurosalError(f"{p} looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NeurosalError(f"{p} is not UTF-8 text (byte {exc.start}); give a UTF-8 text file") from None
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    cut = int(len(text) * (1 - VALIDATION_SHARE))
    return make_corpus(p.name, text[:cut], text[cut:], f"the last {VALIDATION_SHARE:.0%} of {p.name}")


def load_text(name: str, root: str | None = None) -> TextCorpus:
    if name.lower() == "austen":
        return load_austen(root)
    if name.lower().endswith(".txt"):
        return load_text_file(name)
    raise NeurosalError(f"unknown text corpus {name!r}; use austen or a path to a .txt file")


# ----------------------------------------------------------------------------- measures and sampling

def bits(nats: float) -> float:
    """Nats per character -> bits per character."""
    return nats / math.log(2)


def unigram_bpc(corpus: TextCorpus) -> float:
    """Bits per character of the validation text under the training text's character frequencies
    (add-one smoothed): the floor a model that ignores context reaches; anything learnt is below it."""
    counts = np.bincount(_encode(corpus.train, corpus.vocab, corpus.name), minlength=len(corpus.vocab)) + 1.0
    logp = np.log2(counts / counts.sum())
    val = _encode(corpus.val, corpus.vocab, corpus.name)
    return float(-logp[val].mean())


@torch.no_grad()
def generate(model: torch.nn.Module, prompt: torch.Tensor, length: int, context: int,
             temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> torch.Tensor:
    """``length`` new token indices after ``prompt`` (1-D), sampled one at a time from the model's last
    position (the input cropped to its last ``context`` tokens). Seeded: same seed, same text, on the
    same device and torch build. ``temperature=0`` takes the most likely token."""
    if temperature < 0 or not math.isfinite(temperature):
        raise NeurosalError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise NeurosalError(f"top-k must be >= 1, got {top_k}")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = prompt.to(device).view(1, -1)
    out = torch.empty(length, dtype=torch.long, device=device)
    was = model.training
    model.eval()
    try:
        for i in range(length):
            logits = model(ids[:, -context:])[0, -1].float()
            if temperature == 0:
                nxt = logits.argmax().view(1)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.numel():
                    kth = torch.topk(logits, top_k).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
            out[i] = nxt[0]
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    finally:
        model.train(was)
    return out


__all__ = ["TextCorpus", "is_text", "load_text", "load_austen", "load_text_file", "make_corpus", "unigram_bpc",
           "generate", "bits", "AUSTEN_TRAIN", "AUSTEN_VALIDATION"]
