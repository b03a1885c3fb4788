"""Pictures: image grids as PNG (pure NumPy + zlib, no plotting library) and loss curves
(matplotlib, optional)."""
import os
import struct
import zlib

import numpy as np

from .atomic import atomic_write


def infer_image_shape(dim):
    """(h, w) for a flattened square image of ``dim`` pixels (784 -> (28, 28), 64 -> (8, 8))."""
    side = int(round(np.sqrt(dim)))
    if side * side != dim:
        raise ValueError(f"image_shape: {dim} pixels is not a square image; pass image_shape")
    return side, side


def image_grid(images, image_shape=None, ncols=None, pad=1, pad_value=1.0):
    """Tile flattened images into one 2-D array.

    Parameters
    ----------
    images : array_like, shape (n, h*w)
        Grey values in [0, 1] (clipped).
    image_shape : (int, int), optional
        (h, w); inferred for square images.
    ncols : int, optional
        Images per row (default: about sqrt(n)).
    pad : int
        Pixels between images.
    pad_value : float
        Grey value of the padding.

    Returns
    -------
    ndarray, shape (rows*(h+pad)+pad, ncols*(w+pad)+pad), float in [0, 1]
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 2 or len(images) == 0:
        raise ValueError(f"images: expected shape (n, pixels) with n >= 1, got {images.shape}")
    h, w = image_shape or infer_image_shape(images.shape[1])
    if h * w != images.shape[1]:
        raise ValueError(f"image_shape: {h}x{w} does not match {images.shape[1]} pixels")
    n = len(images)
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad), pad_value)
    for k, img in enumerate(np.clip(images, 0, 1)):
        r, c = divmod(k, ncols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top:top + h, left:left + w] = img.reshape(h, w)
    return grid


def save_png(path, gray):
    """Write a 2-D array of grey values in [0, 1] as an 8-bit greyscale PNG, atomically.

    ``path`` must end in ``.png`` (the bytes are PNG whatever the name); missing folders are
    created.
    """
    if not os.fspath(path).lower().endswith(".png"):
        raise ValueError(f"path: the image is written as PNG; expected a name ending in .png, "
                         f"got {os.fspath(path)!r}")
    gray = np.asarray(gray, dtype=np.float64)
    if gray.ndim != 2:
        raise ValueError(f"gray: expected a 2-D array, got shape {gray.shape}")
    pixels = np.round(np.clip(gray, 0, 1) * 255).astype(np.uint8)
    h, w = pixels.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)  # filter type 0 per row

    def chunk(tag, data):
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    atomic_write(path, lambda f: f.write(png))


def save_image_grid(path, images, image_shape=None, ncols=None, scale=2):
    """Tile images (see :func:`image_grid`), enlarge each pixel ``scale`` times, write a PNG."""
    grid = image_grid(images, image_shape, ncols)
    if scale > 1:
        grid = np.kron(grid, np.ones((scale, scale)))
    save_png(path, grid)


def plot_history(history, path, title=None):
    """Loss curves of ``HVAE.history_``: train and validation loss, reconstruction and the KL of
    each level per epoch, saved as a PNG (needs matplotlib)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: leaves the session's backend alone
    except ImportError as exc:
        raise ImportError("plot_history needs matplotlib: pip install matplotlib") from exc
    if not history:
        raise ValueError("history: no epochs to plot")
    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [r["loss"] for r in history], label="train loss")
    val = [(r["epoch"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    if val:
        ax1.plot(*zip(*val), label="validation loss")
    ax1.plot(epochs, [r["reconstruction"] for r in history], "--", label="reconstruction")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("nats per example")
    ax1.legend()
    for i in range(len(history[0]["kl"])):
        ax2.plot(epochs, [r["kl"][i] for r in history], label=f"KL level {i + 1}")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("nats per example")
    ax2.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
