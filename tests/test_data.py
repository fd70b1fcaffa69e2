"""Offline datasets and the loaders for files a user points to."""

import gzip
import os
import struct

import numpy as np
import pytest
import torch

from neurosal.data import FASHION_MNIST_DIR, load_dataset, read_idx
from neurosal.errors import NeurosalError


def write_idx(path, arr, gz=False):
    codes = {np.uint8: 0x08, np.float32: 0x0D}
    header = bytes([0, 0, codes[arr.dtype.type], arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    raw = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    (gzip.open if gz else open)(path, "wb").write(raw)


def test_idx_round_trip_and_truncation(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.idx", arr)
    write_idx(tmp_path / "b.idx.gz", arr.astype(np.float32), gz=True)
    assert np.array_equal(read_idx(tmp_path / "a.idx"), arr)
    assert np.array_equal(read_idx(tmp_path / "b.idx.gz"), arr.astype(np.float32))
    (tmp_path / "c.idx").write_bytes((tmp_path / "a.idx").read_bytes()[:-5])
    with pytest.raises(NeurosalError, match="truncated"):
        read_idx(tmp_path / "c.idx")


def test_mnist_folder_of_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for stem, n in (("train", 30), ("t10k", 10)):
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz=True)
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    ds = load_dataset("mnist", root=str(tmp_path))
    assert ds.x_train.shape == (30, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)
    assert float(ds.x_train.max()) <= 1.0 and ds.n_classes == 10


def test_cifar10_binary_batches(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}.bin", 4) for i in range(1, 6)] + [("test_batch.bin", 3)]:
        rec = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], 1)
        rec.astype(np.uint8).tofile(tmp_path / name)
    ds = load_dataset("cifar10", root=str(tmp_path))
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    os.truncate(tmp_path / "test_batch.bin", 3073 * 2 + 7)
    with pytest.raises(NeurosalError, match="truncated"):
        load_dataset("cifar10", root=str(tmp_path))


def test_csv_with_header(tmp_path):
    rows = ["a,b,label"] + [f"{i},{i * 2},{i % 2}" for i in range(20)]
    (tmp_path / "t.csv").write_text("\n".join(rows))
    ds = load_dataset(str(tmp_path / "t.csv"))
    assert ds.x_train.shape[1:] == (2,) and len(ds.x_train) + len(ds.x_test) == 20 and ds.n_classes == 2


@pytest.mark.parametrize("name,shape,n_train", [("digits", (1, 8, 8), 1258), ("iris", (4,), 105),
                                                ("wine", (13,), 125), ("breast-cancer", (30,), 398),
                                                ("mnist1d", (40,), 4000), ("mnist-5k", (1, 28, 28), 4000)])
def test_offline_datasets(name, shape, n_train):
    ds = load_dataset(name)
    assert ds.input_shape == shape and len(ds.x_train) == n_train
    assert set(ds.y_train.unique().tolist()) == set(range(ds.n_classes))


@pytest.mark.parametrize("name,file,loader", [("digits", "digits.csv.gz", "load_digits"),
                                              ("iris", "iris.csv", "load_iris"), ("wine", "wine_data.csv", "load_wine"),
                                              ("breast-cancer", "breast_cancer.csv", "load_breast_cancer")])
def test_bundled_tables_read_directly_equal_sklearns_loaders(name, file, loader):
    """The CLI reads scikit-learn's bundled CSVs itself (its import costs a second per command); the
    tables, labels and class names must be exactly what sklearn's own loaders give."""
    import sklearn.datasets

    from neurosal.data import _sklearn_csv

    x, y, names = _sklearn_csv(file, header=name != "digits")
    ref = getattr(sklearn.datasets, loader)()
    assert np.array_equal(x, ref.data) and np.array_equal(y, ref.target)
    if name != "digits":
        assert names == [str(n) for n in ref.target_names]
        assert load_dataset(name).classes == names
    assert _sklearn_csv("no_such_table.csv", header=True) is None  # -> the caller falls back to sklearn


def test_bundled_tables_fall_back_to_sklearn(monkeypatch):
    import neurosal.data as data

    direct = {n: load_dataset(n) for n in ("digits", "wine")}
    monkeypatch.setattr(data, "_sklearn_csv", lambda file, header: None)  # a scikit-learn that moved them
    for name, ds in direct.items():
        again = load_dataset(name)
        assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)
        assert again.classes == ds.classes


def test_split_does_not_depend_on_anything_but_the_data():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert np.array_equal(a.x_test.numpy(), b.x_test.numpy())


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                    reason="Debian package dataset-fashion-mnist not installed (make setup installs it)")
def test_fashion_mnist_from_debian_package():
    ds = load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(NeurosalError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist", root=str(tmp_path / "nowhere"))


def write_semeion(path, n=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        pixels = rng.integers(0, 2, 256).astype(float)
        label = np.eye(10)[i % 10]
        rows.append(" ".join(f"{v:.4f}" for v in pixels) + " " + " ".join(str(int(v)) for v in label))
    path.write_text("\n".join(rows) + "\n")


def test_semeion_from_a_folder_or_the_file(tmp_path):
    write_semeion(tmp_path / "semeion.data")
    ds = load_dataset("semeion", root=str(tmp_path))
    assert ds.x_train.shape[1:] == (1, 16, 16) and len(ds.x_train) + len(ds.x_test) == 40
    assert ds.n_classes == 10 and set(ds.y_train.tolist()) | set(ds.y_test.tolist()) == set(range(10))
    same = load_dataset(str(tmp_path / "semeion.data"))
    assert np.array_equal(same.x_train.numpy(), ds.x_train.numpy())
    with pytest.raises(NeurosalError, match="no offline source"):
        load_dataset("semeion")


@pytest.mark.parametrize("text,message", [
    ("1 0 1\n", "rows of 266 numbers"),
    (" ".join(["1"] * 256 + ["1", "1"] + ["0"] * 8) + "\n", "one-hot"),
    (" ".join(["x"] * 266) + "\n", "not the Semeion text table"),
    ("", "rows of 266 numbers"),
])
def test_bad_semeion_files_are_refused(tmp_path, text, message):
    (tmp_path / "semeion.data").write_text(text)
    with pytest.raises(NeurosalError, match=message):
        load_dataset("semeion", root=str(tmp_path))


def test_grayscale_turns_colour_images_into_luminance(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}.bin", 4) for i in range(1, 6)] + [("test_batch.bin", 3)]:
        rec = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], 1)
        rec.astype(np.uint8).tofile(tmp_path / name)
    gray = load_dataset("cifar10", root=str(tmp_path), gray=True)
    assert gray.x_train.shape == (20, 1, 32, 32) and gray.x_test.shape == (3, 1, 32, 32)
    # standardised after the conversion: zero mean, unit deviation over the training images
    assert abs(float(gray.x_train.mean())) < 1e-4 and abs(float(gray.x_train.std()) - 1) < 1e-2
    x = rng.random((12, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "colour.npz", X=x, y=np.arange(12) % 3)
    ds = load_dataset(str(tmp_path / "colour.npz"), gray=True)
    plain = load_dataset(str(tmp_path / "colour.npz"))
    lum = (plain.x_train * torch.tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
    assert ds.x_train.shape[1] == 1 and torch.allclose(ds.x_train, lum, rtol=0, atol=1e-6)
    digits = load_dataset("digits", gray=True)  # one channel already: unchanged
    assert digits.x_train.shape[1:] == (1, 8, 8)


def test_keras_style_npz_keeps_its_split_and_scales_8_bit_images(tmp_path):
    """Keras' ``mnist.npz`` layout (x_train, y_train, x_test, y_test) was refused ("expected arrays 'X'
    and 'y'"). It loads with its own split; 8-bit images go to [0, 1] like the built-in image sets
    (a table is standardised whatever its type); a conv model refusing (N, H, W) says how to add the axis."""
    from neurosal.zoo import build_zoo

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(30, 6, 6), dtype=np.uint8)
    y = (np.arange(30) % 3).astype(np.uint8)
    np.savez(tmp_path / "k.npz", x_train=x[:20], y_train=y[:20], x_test=x[20:], y_test=y[20:])
    ds = load_dataset(str(tmp_path / "k.npz"))
    assert ds.x_train.shape == (20, 6, 6) and ds.x_test.shape == (10, 6, 6) and ds.n_classes == 3
    assert torch.equal(ds.x_test, torch.as_tensor(x[20:] / 255.0, dtype=torch.float32))
    assert torch.equal(ds.y_test, torch.as_tensor(y[20:], dtype=torch.int64))
    with pytest.raises(NeurosalError, match=r"channel axis: x\[:, None\]"):
        build_zoo("resnet:8", ds.input_shape, ds.n_classes)
    np.savez(tmp_path / "other.npz", inputs=x, y=y)
    with pytest.raises(NeurosalError, match="or 'x_train', 'y_train', 'x_test', 'y_test'"):
        load_dataset(str(tmp_path / "other.npz"))
