"""Image grids, the dependency-free PNG writer, and loss curves."""
import struct
import zlib

import numpy as np
import pytest

from hvae import plotting


def read_png(path):
    """Decode an 8-bit greyscale PNG written by save_png (filter 0 rows) into an array."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        n, tag = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        crc, = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + n
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 0)
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, w + 1)
    assert not raw[:, 0].any()
    return raw[:, 1:]


def test_image_grid_layout():
    imgs = np.arange(5 * 6, dtype=float).reshape(5, 6) / 30
    grid = plotting.image_grid(imgs, image_shape=(2, 3), ncols=3, pad=1)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1)
    np.testing.assert_allclose(grid[1:3, 1:4], imgs[0].reshape(2, 3))
    np.testing.assert_allclose(grid[4:6, 5:8], imgs[4].reshape(2, 3))
    assert plotting.infer_image_shape(784) == (28, 28)
    with pytest.raises(ValueError, match="image_shape"):
        plotting.image_grid(np.zeros((2, 10)))
    with pytest.raises(ValueError, match="images"):
        plotting.image_grid(np.zeros((0, 4)))


def test_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.random((7, 16))
    plotting.save_image_grid(tmp_path / "g.png", imgs, scale=2)
    pixels = read_png(tmp_path / "g.png")
    want = np.kron(plotting.image_grid(imgs), np.ones((2, 2)))
    np.testing.assert_array_equal(pixels, np.round(want * 255).astype(np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]


def test_plot_history(tmp_path):
    pytest.importorskip("matplotlib")
    hist = [{"epoch": e, "loss": 10 - e, "reconstruction": 8 - e, "kl": [1.0, 0.5],
             "val_loss": 11 - e if e % 2 else None} for e in range(1, 5)]
    plotting.plot_history(hist, tmp_path / "h.png", title="t")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="history"):
        plotting.plot_history([], tmp_path / "e.png")
