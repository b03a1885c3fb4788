"""Data loaders: binarized and grey-level MNIST, scikit-learn's 8x8 digits, and binarization.

Every loader returns float32 arrays with values in [0, 1], one example per row: shape (n, 784)
for MNIST (a 28x28 image in row-major order) and (n, 64) for the digits (8x8). Every loader
takes a ``split``, one of ``"train"`` (the default), ``"valid"`` and ``"test"``. The files are
looked for in a data directory (see :func:`data_dir`): the ``data_dir`` argument, else the
``HVAE_DATA`` environment variable, else ``../shared/data`` beside the repository's root when
hvae runs from a source checkout, else ``~/hvae_data``. No loader downloads anything.

Files
-----
- ``binarized_mnist.npz`` (keys ``train``, ``valid``, ``test``, uint8 0/1, shape (n, 784)), or
  the original text files ``binarized_mnist_{train,valid,test}.amat``: statically binarized
  MNIST (Larochelle & Murray 2011), read by :func:`load_binarized_mnist`; 50000, 10000 and
  10000 images.
- ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``, each optionally gzip-compressed with a ``.gz`` suffix: the
  original MNIST (LeCun et al.), read by :func:`load_mnist`; train is the first 54000 of the
  60000 training images, valid the last 6000 (a tenth), test the 10000 of t10k.
"""
import gzip
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

__all__ = ["data_dir", "load_binarized_mnist", "read_amat", "read_idx", "load_mnist",
           "load_digits", "binarize", "subset"]

ENV_VAR = "HVAE_DATA"
MNIST_DIM = 784
SPLITS = ("train", "valid", "test")
DIGITS_SPLIT = (1350, 1500)  # digits: train = the first 1350 of 1797, valid = the next 150
_MNIST_PREFIX = {"train": "train", "valid": "train", "test": "t10k"}
_GZIP_MAGIC = b"\x1f\x8b"
_IDX_UBYTE = 0x08


def _resolve_data_dir(path=None):
    """``(directory, how it was chosen)``; see :func:`data_dir`."""
    if path is not None:
        return Path(os.fspath(path)).expanduser(), "the data_dir argument"
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser(), f"the {ENV_VAR} environment variable"
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file():  # a source checkout, not an installed package
        return root.parent / "shared" / "data", "the default beside the repository"
    return Path.home() / "hvae_data", "the default for an installed hvae"


def data_dir(path=None):
    """The directory where the loaders look for data files.

    Parameters
    ----------
    path : str or os.PathLike, optional
        Returned (with ``~`` expanded) when given.

    Returns
    -------
    pathlib.Path
        ``path`` if given; else the ``HVAE_DATA`` environment variable if it is set and not
        empty; else, when hvae runs from a source checkout (the directory holding the ``hvae``
        package also holds ``pyproject.toml``), ``shared/data`` in the parent of that
        repository root, i.e. ``../shared/data`` seen from the root; else ``~/hvae_data`` (an
        installed hvae). The directory need not exist.
    """
    return _resolve_data_dir(path)[0]


def _not_found(what, names, directory, source):
    looked = " or ".join(repr(n) for n in names)
    return FileNotFoundError(
        f"{what}: found none of {looked} in {directory} (the data directory, from {source}); "
        f"put the files there, pass data_dir=..., or set the {ENV_VAR} environment variable "
        f"to the directory that holds them (where to get them: the hvae.datasets docstring "
        f"and the README)")


def _check_split(split, choices):
    if split not in choices:
        raise ValueError(f"split: expected one of {choices}, got {split!r}")


# ----------------------------------------------------------------------------------------------
# binarized MNIST


def _check_binary_images(x, where):
    """Check a (n, 784) array of 0/1 values; return it as C-contiguous float32 (an archive may
    store it in Fortran order, whose rows are not contiguous: every core call would copy it)."""
    if x.ndim != 2 or x.shape[1] != MNIST_DIM:
        raise ValueError(f"{where}: expected shape (n, {MNIST_DIM}) (one 28x28 image per row), "
                         f"got {x.shape}")
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{where}: expected numbers 0/1, got dtype {x.dtype}")
    bad = ~((x == 0) | (x == 1))
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"{where}: expected values 0 or 1, found {x[i, j]!r} "
                         f"(row {i}, column {j}; {int(bad.sum())} such values)")
    return np.ascontiguousarray(x, dtype=np.float32)


def read_amat(path):
    """Read one ``.amat`` text file of binarized MNIST.

    The format of ``binarized_mnist_{train,valid,test}.amat``: one image per line, 784 values
    ``0`` or ``1`` separated by single spaces (other runs of blanks are accepted too). Trailing
    empty lines are ignored.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    ndarray of float32, shape (n, 784)
        One 28x28 image per row, row-major; values 0.0 and 1.0.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file holds no image, a line does not have 784 values, or a value is not 0 or 1;
        the message names the file and the line number (counted from 1).
    """
    path = Path(os.fspath(path))
    with open(path, "rb") as f:
        text = f.read()
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: no images (the file is empty); expected one image of "
                         f"{MNIST_DIM} values 0/1 per line")
    out = np.empty((len(lines), MNIST_DIM), dtype=np.uint8)
    # Fast path: lines in the canonical layout "v v ... v", 2 * 784 - 1 bytes, checked at once.
    width = 2 * MNIST_DIM - 1
    canonical = np.fromiter((len(line) == width for line in lines), dtype=bool, count=len(lines))
    rows = np.flatnonzero(canonical)
    if rows.size:
        buf = np.frombuffer(b"".join(lines[i] for i in rows), dtype=np.uint8).reshape(-1, width)
        digits = buf[:, 0::2] - np.uint8(ord("0"))  # '0' -> 0, '1' -> 1; others wrap above 1
        ok = (buf[:, 1::2] == ord(" ")).all(axis=1) & (digits <= 1).all(axis=1)
        out[rows[ok]] = digits[ok]
        canonical[rows[~ok]] = False  # parsed (and reported precisely) below
        del buf, digits
    # Slow path: any other line, token by token.
    for i in np.flatnonzero(~canonical):
        tokens = lines[i].split()
        if len(tokens) != MNIST_DIM:
            raise ValueError(f"{path}, line {i + 1}: {len(tokens)} values, expected "
                             f"{MNIST_DIM} (one 28x28 image per line)")
        for j, token in enumerate(tokens):
            try:
                value = float(token)
            except ValueError:
                value = None
            if value not in (0.0, 1.0):
                shown = token.decode("ascii", "replace")
                raise ValueError(f"{path}, line {i + 1}, value {j + 1}: {shown!r} is not "
                                 f"0 or 1")
            out[i, j] = int(value)
    return out.astype(np.float32)


def load_binarized_mnist(split="train", data_dir=None):
    """Statically binarized MNIST (Larochelle & Murray 2011), the standard split.

    Reads ``binarized_mnist.npz`` (keys ``train``, ``valid``, ``test``) from the data
    directory, or, if it is absent, the original text file ``binarized_mnist_{split}.amat``
    (see :func:`read_amat`).

    Parameters
    ----------
    split : {"train", "valid", "test"}
        50000, 10000 and 10000 images in the standard files.
    data_dir : str or os.PathLike, optional
        The directory holding the files; default: see :func:`data_dir`.

    Returns
    -------
    ndarray of float32, shape (n, 784)
        One 28x28 image per row, row-major; values 0.0 and 1.0.

    Raises
    ------
    ValueError
        If ``split`` is not one of the three, or the file is corrupt: not a readable ``.npz``,
        no array for ``split``, an array not of shape (n, 784), values other than 0 and 1, or an
        ``.amat`` line of the wrong length (the message gives the file and the line).
    FileNotFoundError
        If neither file is in the data directory.
    """
    _check_split(split, SPLITS)
    directory, source = _resolve_data_dir(data_dir)
    npz = directory / "binarized_mnist.npz"
    amat = directory / f"binarized_mnist_{split}.amat"
    if npz.is_file():
        unreadable = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)
        try:
            archive = np.load(npz, allow_pickle=False)
        except unreadable as exc:
            raise ValueError(f"{npz}: cannot read the archive ({exc})") from exc
        if not hasattr(archive, "files"):  # a plain array: an .npy file, not an archive
            raise ValueError(f"{npz}: not an .npz archive (a single array of shape "
                             f"{archive.shape})")
        with archive:
            if split not in archive.files:
                raise ValueError(f"{npz}: no array {split!r}; the archive holds "
                                 f"{sorted(archive.files)}, expected {list(SPLITS)}")
            try:
                x = archive[split]
            except unreadable as exc:
                raise ValueError(f"{npz}: cannot read the array {split!r} ({exc})") from exc
        return _check_binary_images(x, f"{npz}[{split!r}]")
    if amat.is_file():
        return read_amat(amat)
    raise _not_found(f"binarized MNIST, split {split!r}", [npz.name, amat.name], directory,
                     source)


# ----------------------------------------------------------------------------------------------
# IDX files and grey-level MNIST


def read_idx(path):
    """Read an IDX file of unsigned bytes, such as the original MNIST files.

    The format: a 4-byte magic number ``0x00 0x00 <type> <ndim>`` with type ``0x08`` (unsigned
    byte), then ``ndim`` big-endian uint32 sizes, then the data in row-major order. The MNIST
    images have magic ``0x00000803`` (n x 28 x 28), the labels ``0x00000801`` (n). The file may
    be gzip-compressed, which is detected from its first bytes, whatever its name.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    ndarray of uint8, shape given by the file's header
        E.g. (n, 28, 28) for MNIST images, (n,) for labels.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file is a corrupt gzip stream, the magic number is wrong, the data type is not
        unsigned byte (``0x08``), or the payload is shorter or longer than the header says. The
        message names the file.
    """
    path = Path(os.fspath(path))
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt gzip data ({exc})") from exc
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(raw)} bytes, no 4-byte magic "
                         f"number)")
    magic = int.from_bytes(raw[:4], "big")
    if raw[0] != 0 or raw[1] != 0 or raw[3] == 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number 0x{magic:08x}; expected "
                         f"0x000008NN with NN the number of dimensions, e.g. 0x00000803 for "
                         f"images, 0x00000801 for labels)")
    if raw[2] != _IDX_UBYTE:
        raise ValueError(f"{path}: IDX data type 0x{raw[2]:02x} is not supported (magic "
                         f"0x{magic:08x}); only unsigned byte (0x08) is")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, the {ndim} "
                         f"dimension sizes need {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim))
    count = 1
    for size in shape:
        count *= size
    payload = len(raw) - header
    if payload != count:
        what = "truncated" if payload < count else "too long"
        raise ValueError(f"{path}: {what}: the header says shape {shape}, {count} bytes of "
                         f"data, the file has {payload}")
    return np.frombuffer(raw, dtype=np.uint8, count=count, offset=header).reshape(shape).copy()


def _find_idx(directory, name):
    """``directory / name`` or ``directory / (name + '.gz')``, whichever exists, else None."""
    for candidate in (name, name + ".gz"):
        p = directory / candidate
        if p.is_file():
            return p
    return None


def load_mnist(split="train", data_dir=None, return_labels=False):
    """The original grey-level MNIST (LeCun et al.), scaled to [0, 1].

    Reads ``train-images-idx3-ubyte`` (splits ``"train"`` and ``"valid"``) or
    ``t10k-images-idx3-ubyte`` (``"test"``), and the matching ``*-labels-idx1-ubyte`` when
    labels are asked for, each plain or gzip-compressed with a ``.gz`` suffix, from the data
    directory.

    Parameters
    ----------
    split : {"train", "valid", "test"}
        train: the training file's images but its last tenth (54000 of the standard 60000);
        valid: that last tenth (6000); test: the t10k file (10000).
    data_dir : str or os.PathLike, optional
        The directory holding the files; default: see :func:`data_dir`.
    return_labels : bool
        Also return the labels.

    Returns
    -------
    x : ndarray of float32, shape (n, 784)
        One 28x28 image per row, row-major; grey levels divided by 255.
    y : ndarray of int64, shape (n,)
        The digits 0..9; only when ``return_labels``.

    Raises
    ------
    ValueError
        If ``split`` is not one of the three, a file is corrupt (see :func:`read_idx`),
        the images are not n x 28 x 28, the labels not n values in 0..9, or the two files
        disagree on n.
    FileNotFoundError
        If a file is not in the data directory.
    """
    _check_split(split, SPLITS)
    directory, source = _resolve_data_dir(data_dir)
    prefix = _MNIST_PREFIX[split]
    names = {"images": f"{prefix}-images-idx3-ubyte", "labels": f"{prefix}-labels-idx1-ubyte"}
    paths = {}
    for kind in ("images", "labels") if return_labels else ("images",):
        paths[kind] = _find_idx(directory, names[kind])
        if paths[kind] is None:
            raise _not_found(f"MNIST {split} {kind}", [names[kind], names[kind] + ".gz"],
                             directory, source)
    images = read_idx(paths["images"])
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{paths['images']}: expected images of shape (n, 28, 28), got "
                         f"{images.shape}")
    rows = _mnist_rows(split, len(images))
    x = images[rows].reshape(-1, MNIST_DIM).astype(np.float32)
    x /= np.float32(255.0)
    if not return_labels:
        return x
    labels = read_idx(paths["labels"])
    if labels.ndim != 1:
        raise ValueError(f"{paths['labels']}: expected labels of shape (n,), got {labels.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{paths['labels']}: {len(labels)} labels for {len(images)} images "
                         f"in {paths['images']}")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{paths['labels']}: labels must be digits 0..9, found "
                         f"{int(labels.max())}")
    return x, labels[rows].astype(np.int64)


def _mnist_rows(split, n):
    """The rows of a split in its file of n images: the training file's last tenth (6000 of
    60000) is the validation split."""
    if split == "test":
        return slice(None)
    cut = n - n // 10
    return slice(cut, None) if split == "valid" else slice(0, cut)


# ----------------------------------------------------------------------------------------------
# scikit-learn's digits


def load_digits(split="train", *, return_labels=False):
    """The 8x8 handwritten digits bundled with scikit-learn (no download), scaled to [0, 1].

    Parameters
    ----------
    split : {"train", "valid", "test"}
        Of the 1797 images in scikit-learn's order: train the first 1350, valid the next 150,
        test the last 297.
    return_labels : bool
        Also return the labels.

    Returns
    -------
    x : ndarray of float32, shape (n, 64)
        One 8x8 image per row, row-major; grey levels 0..16 divided by 16.
    y : ndarray of int64, shape (n,)
        The digits 0..9; only when ``return_labels``.

    Raises
    ------
    ValueError
        If ``split`` is not one of the three.
    ImportError
        If scikit-learn is not installed.
    """
    _check_split(split, SPLITS)
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as exc:
        raise ImportError("hvae.datasets.load_digits needs scikit-learn: "
                          "pip install scikit-learn") from exc
    bunch = sklearn_load_digits()
    rows = slice(*{"train": (0, DIGITS_SPLIT[0]), "valid": DIGITS_SPLIT,
                   "test": (DIGITS_SPLIT[1], None)}[split])
    x = np.asarray(bunch.data[rows], dtype=np.float32) / np.float32(16.0)
    if not return_labels:
        return x
    return x, np.asarray(bunch.target[rows], dtype=np.int64)


def subset(x, n, seed=0):
    """``n`` rows of ``x`` drawn without replacement with a fixed seed, in their original order.

    Not the first n: binarized MNIST's test split is sorted by digit.

    Parameters
    ----------
    x : ndarray, shape (m, ...)
    n : int or None
        Rows to keep; all of ``x`` (itself, not a copy) when None or >= m.
    seed : int

    Returns
    -------
    ndarray, shape (min(n, m), ...)
    """
    if n is None or n >= len(x):
        return x
    return x[np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))]


# ----------------------------------------------------------------------------------------------
# binarization


def binarize(x, rng=None, threshold=None):
    """Binarize grey levels in [0, 1]: Bernoulli draws (dynamic binarization) or a threshold.

    Dynamic binarization draws a fresh binary image each time, pixel ``i`` being 1 with
    probability ``x[i]``; call it on every minibatch when training on grey-level data.

    Parameters
    ----------
    x : array_like, any shape, e.g. (n, 784)
        Values in [0, 1].
    rng : numpy.random.Generator or int or None
        The generator for the draws (an int or None seeds a new one with
        ``numpy.random.default_rng``). Not allowed together with ``threshold``.
    threshold : float, optional
        If given, deterministic: 1 where ``x > threshold``, else 0.

    Returns
    -------
    ndarray of float32, the shape of ``x``
        Values 0.0 and 1.0.

    Raises
    ------
    ValueError
        If ``x`` has values outside [0, 1] or not finite, ``threshold`` is NaN, or both ``rng``
        and ``threshold`` are given.
    TypeError
        If ``rng`` is not a Generator, an int or None, or ``x`` is not numeric.
    """
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise TypeError(f"x: expected numbers in [0, 1], got dtype {x.dtype}")
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    if x.size and not (np.all(x >= 0) and np.all(x <= 1)):  # also False for NaN
        raise ValueError(f"x: expected values in [0, 1], got min {np.nanmin(x)!r}, "
                         f"max {np.nanmax(x)!r}" + (" and NaN" if np.isnan(x).any() else ""))
    if threshold is not None:
        if rng is not None:
            raise ValueError("binarize: give rng (random draws) or threshold, not both")
        threshold = float(threshold)
        if np.isnan(threshold):
            raise ValueError("threshold: expected a number, got nan")
        return (x > threshold).astype(np.float32)
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)):
        rng = np.random.default_rng(rng)
    elif not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy.random.Generator, an int or None, got "
                        f"{type(rng).__name__}")
    draw_dtype = np.float32 if x.dtype == np.float32 else np.float64
    u = rng.random(x.shape, dtype=draw_dtype)  # in [0, 1): P(u < p) = p, exact at 0 and 1
    return (u < x).astype(np.float32)
