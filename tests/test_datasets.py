"""The data loaders in hvae.datasets: every file format on small synthetic files (valid, corrupt and
truncated, with the error messages), the data directory's resolution, and the real shared data
when it is present (skipped with a reason otherwise)."""
import gzip
import re
from pathlib import Path

import numpy as np
import pytest

from hvae import datasets
from hvae.datasets import (binarize, data_dir, load_binarized_mnist, load_digits, load_mnist,
                           read_amat, read_idx)


# ----------------------------------------------------------------------------------------------
# helpers: synthetic files


def binary_images(n, seed=0):
    return (np.random.default_rng(seed).random((n, 784)) < 0.3).astype(np.uint8)


def write_amat(path, x, sep=" ", end="\n"):
    path.write_text("".join(sep.join(str(int(v)) for v in row) + end for row in x))
    return path


def idx_bytes(arr, type_byte=0x08, magic_prefix=b"\x00\x00"):
    arr = np.asarray(arr, dtype=np.uint8)
    header = magic_prefix + bytes([type_byte, arr.ndim])
    header += b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return header + arr.tobytes()


def write_idx(path, arr, compress=False, **kwargs):
    data = idx_bytes(arr, **kwargs)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def grey_images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("HVAE_DATA", raising=False)


# ----------------------------------------------------------------------------------------------
# data_dir


def test_data_dir_default(no_env):
    root = Path(datasets.__file__).resolve().parents[1]
    assert (root / "hvae").is_dir()
    assert data_dir() == root.parent / "shared" / "data"
    assert isinstance(data_dir(), Path)


def test_data_dir_default_of_an_installed_package(no_env, monkeypatch, tmp_path):
    """Installed (no pyproject.toml beside the package): ~/hvae_data, not a folder inside the
    virtual environment."""
    fake = tmp_path / "lib" / "site-packages" / "hvae" / "datasets.py"
    monkeypatch.setattr(datasets, "__file__", str(fake))
    assert data_dir() == Path.home() / "hvae_data"
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="hvae_data.*installed hvae"):
        load_binarized_mnist("train")


def test_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HVAE_DATA", str(tmp_path / "elsewhere"))
    assert data_dir() == tmp_path / "elsewhere"  # need not exist
    assert data_dir(tmp_path) == tmp_path        # the argument wins
    monkeypatch.setenv("HVAE_DATA", "")          # empty: as if unset
    assert data_dir() == Path(datasets.__file__).resolve().parents[1].parent / "shared" / "data"


def test_data_dir_argument(no_env, tmp_path):
    assert data_dir(str(tmp_path)) == tmp_path
    assert data_dir("~/x") == Path.home() / "x"


def test_loaders_use_env(monkeypatch, tmp_path):
    x = binary_images(3)
    np.savez(tmp_path / "binarized_mnist.npz", train=x, valid=x[:1], test=x[:2])
    write_idx(tmp_path / "t10k-images-idx3-ubyte", grey_images(4))
    monkeypatch.setenv("HVAE_DATA", str(tmp_path))
    assert load_binarized_mnist("test").shape == (2, 784)
    assert load_mnist("test").shape == (4, 784)


# ----------------------------------------------------------------------------------------------
# binarized MNIST: .npz


def test_npz_in_fortran_order_comes_back_row_major(tmp_path, monkeypatch):
    """An archive that stores the images column-major (as the shared binarized_mnist.npz
    does) loads as C-contiguous float32: rows contiguous, as the core and NumPy's row slicing
    expect."""
    x = np.asfortranarray(binary_images(6))
    np.savez(tmp_path / "binarized_mnist.npz", train=x, valid=x, test=x)
    monkeypatch.setenv("HVAE_DATA", str(tmp_path))
    got = load_binarized_mnist("train")
    assert got.flags["C_CONTIGUOUS"] and got.dtype == np.float32
    np.testing.assert_array_equal(got, x)


def test_npz(tmp_path):
    x = binary_images(5)
    np.savez_compressed(tmp_path / "binarized_mnist.npz", train=x, valid=x[:2], test=x[:3])
    for split, n in (("train", 5), ("valid", 2), ("test", 3)):
        got = load_binarized_mnist(split, data_dir=tmp_path)
        assert got.dtype == np.float32 and got.shape == (n, 784)
        np.testing.assert_array_equal(got, x[:n])
    assert load_binarized_mnist(data_dir=str(tmp_path)).shape == (5, 784)  # default "train"


def test_npz_preferred_over_amat(tmp_path):
    x = binary_images(2)
    np.savez(tmp_path / "binarized_mnist.npz", train=x, valid=x, test=x)
    write_amat(tmp_path / "binarized_mnist_train.amat", 1 - x[:1])
    np.testing.assert_array_equal(load_binarized_mnist("train", tmp_path), x)


@pytest.mark.parametrize("split", ["Train", "validation", "", None, 0])
def test_bad_split(tmp_path, split):
    with pytest.raises(ValueError, match="split"):
        load_binarized_mnist(split, tmp_path)


@pytest.mark.parametrize("arrays,words", [
    (dict(train=np.zeros((3, 783), np.uint8)), [r"\(n, 784\)", r"\(3, 783\)"]),
    (dict(train=np.zeros(784, np.uint8)), [r"\(n, 784\)"]),
    (dict(train=np.full((2, 784), 2, np.uint8)), ["0 or 1", "row 0, column 0"]),
    (dict(train=np.full((2, 784), 0.5, np.float32)), ["0 or 1"]),
    (dict(train=np.full((2, 784), np.nan)), ["0 or 1"]),
    (dict(valid=np.zeros((2, 784), np.uint8)), ["no array 'train'", "valid"]),
])
def test_npz_corrupt(tmp_path, arrays, words):
    np.savez(tmp_path / "binarized_mnist.npz", **arrays)
    with pytest.raises(ValueError) as err:
        load_binarized_mnist("train", tmp_path)
    msg = str(err.value)
    assert "binarized_mnist.npz" in msg
    for w in words:
        assert re.search(w, msg), (w, msg)


def test_npz_float_01_accepted(tmp_path):
    x = binary_images(2).astype(np.float64)
    np.savez(tmp_path / "binarized_mnist.npz", train=x)
    np.testing.assert_array_equal(load_binarized_mnist("train", tmp_path), x)


@pytest.mark.parametrize("content", [b"", b"not a zip file at all", "truncated", "npy"])
def test_npz_unreadable(tmp_path, content):
    path = tmp_path / "binarized_mnist.npz"
    if content == "truncated":
        np.savez(path, train=binary_images(20))
        path.write_bytes(path.read_bytes()[:3000])
    elif content == "npy":
        with open(path, "wb") as f:
            np.save(f, binary_images(2))
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="binarized_mnist.npz"):
        load_binarized_mnist("train", tmp_path)


# ----------------------------------------------------------------------------------------------
# binarized MNIST: .amat


def test_amat(tmp_path):
    x = binary_images(4)
    path = write_amat(tmp_path / "binarized_mnist_valid.amat", x)
    got = read_amat(path)
    assert got.dtype == np.float32 and got.shape == (4, 784)
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(load_binarized_mnist("valid", tmp_path), x)
    np.testing.assert_array_equal(read_amat(str(path)), x)


def test_amat_tolerant_layout(tmp_path):
    x = binary_images(3)
    # CRLF line ends, a trailing space, trailing blank lines, one line with double spaces/tabs
    text = "".join(" ".join(map(str, r)) + " \r\n" for r in x[:2])
    text += "\t".join(map(str, x[2])).replace("\t", "  ", 5) + "\n\n\n"
    (tmp_path / "a.amat").write_text(text)
    np.testing.assert_array_equal(read_amat(tmp_path / "a.amat"), x)


def test_amat_missing_line_length(tmp_path):
    x = binary_images(5)
    lines = [" ".join(map(str, r)) for r in x]
    lines[3] = lines[3][:-2]  # line 4 has 783 values
    (tmp_path / "binarized_mnist_test.amat").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        load_binarized_mnist("test", tmp_path)
    msg = str(err.value)
    assert "binarized_mnist_test.amat" in msg and "line 4" in msg and "783" in msg


@pytest.mark.parametrize("bad,words", [
    ("2", ["line 2", "value 10", "'2'"]),
    ("x", ["line 2", "value 10", "'x'"]),
    ("-1", ["line 2", "value 10", "'-1'"]),
])
def test_amat_bad_value(tmp_path, bad, words):
    x = binary_images(3)
    rows = [list(map(str, r)) for r in x]
    rows[1][9] = bad
    (tmp_path / "b.amat").write_text("".join(" ".join(r) + "\n" for r in rows))
    with pytest.raises(ValueError) as err:
        read_amat(tmp_path / "b.amat")
    msg = str(err.value)
    assert "b.amat" in msg and "0 or 1" in msg
    for w in words:
        assert w in msg, (w, msg)


def test_amat_blank_line_inside(tmp_path):
    x = binary_images(2)
    (tmp_path / "c.amat").write_text(" ".join(map(str, x[0])) + "\n\n"
                                      + " ".join(map(str, x[1])) + "\n")
    with pytest.raises(ValueError, match=r"c\.amat, line 2: 0 values"):
        read_amat(tmp_path / "c.amat")


def test_amat_empty(tmp_path):
    (tmp_path / "e.amat").write_text("\n")
    with pytest.raises(ValueError, match=r"e\.amat.*no images"):
        read_amat(tmp_path / "e.amat")


def test_amat_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_amat(tmp_path / "nope.amat")


def test_binarized_not_found(tmp_path, no_env):
    with pytest.raises(FileNotFoundError) as err:
        load_binarized_mnist("valid", tmp_path / "empty")
    msg = str(err.value)
    for w in ("binarized_mnist.npz", "binarized_mnist_valid.amat", str(tmp_path / "empty"),
              "HVAE_DATA", "data_dir argument"):
        assert w in msg, (w, msg)


def test_binarized_not_found_via_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HVAE_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="HVAE_DATA environment variable") as err:
        load_binarized_mnist("test")
    assert str(tmp_path) in str(err.value)


# ----------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("shape", [(5, 28, 28), (7,), (2, 3, 4, 5), (0, 28, 28)])
def test_idx_roundtrip(tmp_path, compress, shape):
    arr = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    got = read_idx(write_idx(tmp_path / "f.idx", arr, compress=compress))
    assert got.dtype == np.uint8 and got.shape == shape
    np.testing.assert_array_equal(got, arr)
    got[...] = 0  # a writable array of its own


def test_idx_gzip_detected_by_content(tmp_path):
    arr = grey_images(2)
    # gzip without .gz in the name, and a plain file with a .gz name
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a", arr, compress=True)), arr)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "b.gz", arr)), arr)


def test_idx_magic_values(tmp_path):
    assert idx_bytes(grey_images(1))[:4] == b"\x00\x00\x08\x03"
    assert idx_bytes(np.arange(3))[:4] == b"\x00\x00\x08\x01"


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("mutate,words", [
    (lambda b: b"\x12\x34" + b[2:], ["bad magic number", "0x12340803"]),
    (lambda b: b[:3] + b"\x00" + b[4:], ["bad magic number"]),
    (lambda b: b[:2] + b"\x0d" + b[3:], ["data type 0x0d", "0x08"]),
    (lambda b: b[:-1], ["truncated", "(3, 28, 28)", "2351"]),
    (lambda b: b[:30], ["truncated"]),
    (lambda b: b[:10], ["truncated IDX header"]),
    (lambda b: b[:3], ["not an IDX file"]),
    (lambda b: b"", ["not an IDX file"]),
    (lambda b: b + b"\x00", ["too long"]),
])
def test_idx_corrupt(tmp_path, compress, mutate, words):
    data = mutate(idx_bytes(grey_images(3)))
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(ValueError) as err:
        read_idx(path)
    msg = str(err.value)
    assert str(path) in msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("cut", [5, 40, -9])
def test_idx_corrupt_gzip(tmp_path, cut):
    data = gzip.compress(idx_bytes(grey_images(3)))
    path = tmp_path / "t.gz"
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*gzip"):
        read_idx(path)


def test_idx_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


# ----------------------------------------------------------------------------------------------
# grey-level MNIST


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("split,prefix", [("test", "t10k"), ("train", "train")])
def test_load_mnist(tmp_path, compress, split, prefix):
    images = grey_images(6)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = np.array([0, 9, 3, 3, 1, 7], np.uint8)
    sfx = ".gz" if compress else ""
    write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{sfx}", images, compress=compress)
    write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{sfx}", labels, compress=compress)
    x = load_mnist(split, data_dir=tmp_path)
    assert x.dtype == np.float32 and x.shape == (6, 784)
    assert x[0, 0] == 0.0 and x[0, 1] == 1.0
    np.testing.assert_allclose(x, images.reshape(6, 784) / 255.0, rtol=1e-6)
    x2, y = load_mnist(split, data_dir=tmp_path, return_labels=True)
    np.testing.assert_array_equal(x2, x)
    assert y.dtype == np.int64 and y.shape == (6,)
    np.testing.assert_array_equal(y, labels)


def test_load_mnist_splits(tmp_path):
    """train and valid split the training file, its last tenth being valid; train is the
    default, as for every loader."""
    images = grey_images(20)
    labels = np.arange(20, dtype=np.uint8) % 10
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    x_train, y_train = load_mnist("train", tmp_path, return_labels=True)
    x_valid, y_valid = load_mnist("valid", tmp_path, return_labels=True)
    assert len(x_train) == 18 and len(x_valid) == 2
    np.testing.assert_array_equal(np.concatenate([x_train, x_valid]) * 255,
                                  images.reshape(20, 784).astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([y_train, y_valid]), labels)
    np.testing.assert_array_equal(load_mnist(data_dir=tmp_path), x_train)


def test_load_mnist_bad_split(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation", tmp_path)


def test_load_mnist_not_found(tmp_path, no_env):
    with pytest.raises(FileNotFoundError) as err:
        load_mnist("train", tmp_path)
    msg = str(err.value)
    for w in ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz", str(tmp_path),
              "HVAE_DATA"):
        assert w in msg, (w, msg)
    # images present, labels absent: fine without labels, an error naming the labels with them
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", grey_images(2), compress=True)
    assert load_mnist("train", tmp_path).shape == (2, 784)
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        load_mnist("train", tmp_path, return_labels=True)


@pytest.mark.parametrize("images,labels,words", [
    (np.zeros((3, 28, 27), np.uint8), None, ["(n, 28, 28)", "(3, 28, 27)"]),
    (np.zeros((3, 784), np.uint8), None, ["(n, 28, 28)"]),
    (np.zeros((3, 28, 28), np.uint8), np.zeros(4, np.uint8), ["4 labels for 3 images"]),
    (np.zeros((3, 28, 28), np.uint8), np.zeros((3, 1), np.uint8), ["shape (n,)"]),
    (np.zeros((3, 28, 28), np.uint8), np.array([1, 10, 2], np.uint8), ["0..9", "10"]),
])
def test_load_mnist_inconsistent(tmp_path, images, labels, words):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
    if labels is not None:
        write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    with pytest.raises(ValueError) as err:
        load_mnist("test", tmp_path, return_labels=labels is not None)
    msg = str(err.value)
    assert "t10k-" in msg
    for w in words:
        assert w in msg, (w, msg)


# ----------------------------------------------------------------------------------------------
# digits


def test_load_digits():
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (the 'test' extra)")
    parts = [load_digits(split, return_labels=True) for split in ("train", "valid", "test")]
    assert [len(x) for x, _ in parts] == [1350, 150, 297]
    x, y = (np.concatenate(a) for a in zip(*parts))
    assert x.dtype == np.float32 and x.shape == (1797, 64)
    assert x.min() == 0.0 and x.max() == 1.0
    assert y.dtype == np.int64 and y.shape == (1797,)
    assert set(np.unique(y)) == set(range(10))
    np.testing.assert_array_equal(load_digits(), parts[0][0])  # train is the default
    with pytest.raises(ValueError, match="split"):
        load_digits(True)  # return_labels is keyword-only: a stray positional is refused


def test_subset_is_a_fixed_random_subset_in_order():
    x = np.arange(100)[:, None]
    a, b = datasets.subset(x, 10), datasets.subset(x, 10)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 10 and (np.diff(a[:, 0]) > 0).all() and a[-1, 0] > 10  # not the first 10
    assert not np.array_equal(a, datasets.subset(x, 10, seed=1))
    assert datasets.subset(x, 100) is x and datasets.subset(x, None) is x


def test_load_digits_without_sklearn(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "sklearn" or name.startswith("sklearn."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_digits()


# ----------------------------------------------------------------------------------------------
# binarize


def test_binarize_dynamic():
    p = np.random.default_rng(0).random((200, 50)).astype(np.float32)
    p[0, :] = 0.0
    p[1, :] = 1.0
    b = binarize(p, rng=np.random.default_rng(1))
    assert b.dtype == np.float32 and b.shape == p.shape
    assert set(np.unique(b)) <= {0.0, 1.0}
    assert (b[0] == 0).all() and (b[1] == 1).all()
    # the mean matches the probabilities
    q = np.full((400, 500), 0.3)
    assert abs(binarize(q, rng=2).mean() - 0.3) < 0.005
    # reproducible with the same seed, different draws on the next call of one Generator
    np.testing.assert_array_equal(binarize(p, rng=np.random.default_rng(1)), b)
    g = np.random.default_rng(3)
    assert not np.array_equal(binarize(p, rng=g), binarize(p, rng=g))
    assert binarize(p).shape == p.shape  # rng=None: a fresh generator


def test_binarize_threshold():
    x = np.array([[0.0, 0.2, 0.5, 0.51, 1.0]])
    np.testing.assert_array_equal(binarize(x, threshold=0.5), [[0, 0, 0, 1, 1]])
    assert binarize(x, threshold=0.5).dtype == np.float32
    np.testing.assert_array_equal(binarize([0, 1], threshold=0.5), [0, 1])


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(x=[0.5, 1.2]), ValueError, "[0, 1]"),
    (dict(x=[-0.1, 0.5]), ValueError, "[0, 1]"),
    (dict(x=[np.nan, 0.5]), ValueError, "NaN"),
    (dict(x=["a"]), TypeError, "x"),
    (dict(x=[0.5], rng=np.random.default_rng(0), threshold=0.5), ValueError, "not both"),
    (dict(x=[0.5], threshold=float("nan")), ValueError, "threshold"),
    (dict(x=[0.5], rng="seed"), TypeError, "rng"),
    (dict(x=[0.5], rng=np.random.RandomState(0)), TypeError, "rng"),
])
def test_binarize_bad_input(kwargs, exc, words):
    with pytest.raises(exc) as err:
        binarize(**kwargs)
    assert words in str(err.value)


# ----------------------------------------------------------------------------------------------
# the real shared data (skipped where absent)


def shared_file(name):
    path = data_dir() / name
    if not path.is_file():
        pytest.skip(f"real data file {name} not found in {data_dir()} (set HVAE_DATA to the "
                    f"directory that holds it)")
    return path


def test_real_binarized_mnist():
    shared_file("binarized_mnist.npz")
    for split, n in (("valid", 10000), ("test", 10000)):
        x = load_binarized_mnist(split)
        assert x.dtype == np.float32 and x.shape == (n, 784) and x.flags["C_CONTIGUOUS"]
        assert set(np.unique(x)) == {0.0, 1.0}
        assert 0.10 < x.mean() < 0.16


def test_real_mnist_t10k():
    shared_file("t10k-images-idx3-ubyte.gz")
    shared_file("t10k-labels-idx1-ubyte.gz")
    raw = read_idx(data_dir() / "t10k-images-idx3-ubyte.gz")
    assert raw.dtype == np.uint8 and raw.shape == (10000, 28, 28)
    x, y = load_mnist("test", return_labels=True)
    assert x.dtype == np.float32 and x.shape == (10000, 784)
    assert x.min() == 0.0 and x.max() == 1.0
    assert 0.12 < x.mean() < 0.145  # MNIST's mean grey level is about 0.13
    assert y.dtype == np.int64 and y.shape == (10000,)
    np.testing.assert_array_equal(np.unique(y), np.arange(10))
    assert np.bincount(y).min() > 800  # every class well represented
    np.testing.assert_array_equal(x[0], raw[0].reshape(784) / np.float32(255))
