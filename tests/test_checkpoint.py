"""save / hvae.load: round trip, atomic writes, and clear errors for bad files."""
import io
import json
import os
import zipfile

import numpy as np
import pytest

import hvae


@pytest.fixture
def trained(tmp_path):
    rng = np.random.default_rng(0)
    X = (rng.random((120, 10)) < 0.4).astype(np.float32)
    m = hvae.HVAE(10, [4, 2], [[8], [5]], kl="mc", activation="relu", seed=7)
    m.fit(X, epochs=2, batch_size=40, progress=False)
    path = tmp_path / "m.npz"
    m.save(path)
    return m, path


def test_round_trip(trained):
    m, path = trained
    r = hvae.load(path)
    assert repr(r) == repr(m)
    np.testing.assert_array_equal(r.params, m.params)
    np.testing.assert_array_equal(r.optimizer_.m, m.optimizer_.m)
    assert r.optimizer_.step == m.optimizer_.step and r.history_ == m.history_
    assert r._rng.bit_generator.state == m._rng.bit_generator.state
    with np.load(path, allow_pickle=False) as f:  # plain npz, no pickle needed
        assert set(f.files) == {"meta", "params", "adam_m", "adam_v"}
    fresh = hvae.HVAE(3, [2], seed=0)
    fresh.save(path)  # a model never trained has no optimiser state
    assert hvae.load(path).optimizer_ is None


def test_prior_variance_round_trip_and_older_files(tmp_path):
    """prior_variance survives save/load; a file written before the option existed (no such
    key in its config) loads as the unit-variance model it was."""
    m = hvae.HVAE(10, [4, 2], [[8], [5]], kl="mc", prior_variance="learned", seed=1)
    path = tmp_path / "learned.npz"
    m.save(path)
    r = hvae.load(path)
    assert r.prior_variance == "learned" and repr(r) == repr(m)
    x = (np.random.default_rng(0).random((3, 10)) < 0.5).astype(np.float32)
    eps = m.draw_eps(3)
    np.testing.assert_array_equal(r.loss_and_grad(x, eps)[1], m.loss_and_grad(x, eps)[1])
    old = hvae.HVAE(10, [4, 2], [[8], [5]], seed=1)
    old.save(path)
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(bytes(arrays.pop("meta")).decode())
    del meta["config"]["prior_variance"]
    blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, meta=blob, **arrays)
    r = hvae.load(path)
    assert r.prior_variance == "unit"
    np.testing.assert_array_equal(r.params, old.params)


def test_save_is_atomic(trained, tmp_path, monkeypatch):
    """A failure while writing leaves the previous file intact and no temporary behind."""
    m, path = trained
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        m.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.npz"]


def rewrite(path, mutate):
    """Rewrite the npz at path after mutate(dict of name -> array, meta dict)."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(bytes(arrays.pop("meta")).decode())
    mutate(arrays, meta)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("mutate,words", [
    (lambda a, m: m.update(format="other"), "format"),
    (lambda a, m: m.update(version=99), "version"),
    (lambda a, m: a.update(params=a["params"][:-1]), "params"),
    (lambda a, m: a.update(params=a["params"].astype(np.float64)), "params"),
    (lambda a, m: a.pop("adam_v"), "adam_v"),
    (lambda a, m: m["config"].update(x_dim=11), "params"),
    (lambda a, m: m["config"].update(likelihood="poisson"), "likelihood"),
    (lambda a, m: m["config"].pop("kl"), "config"),
    (lambda a, m: m["config"].update(hidden_dims=[[2 ** 24] * 8, [2 ** 24] * 8]), "memory|params"),
    (lambda a, m: m.update(rng_state={"bit_generator": "PCG64", "state": "x"}), "state"),
    (lambda a, m: m.pop("history"), "history"),
])
def test_inconsistent_files_raise(trained, mutate, words):
    _, path = trained
    rewrite(path, mutate)
    with pytest.raises((ValueError, MemoryError), match=words):
        hvae.load(path)


def test_truncated_corrupt_and_foreign_files(trained, tmp_path):
    _, path = trained
    data = path.read_bytes()
    for cut in (10, len(data) // 3, len(data) - 30):
        bad = tmp_path / f"cut{cut}.npz"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a valid hvae checkpoint"):
            hvae.load(bad)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (tmp_path / "flip.npz").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="not a valid hvae checkpoint"):
        hvae.load(tmp_path / "flip.npz")
    np.savez(tmp_path / "foreign.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="meta"):
        hvae.load(tmp_path / "foreign.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="not a valid hvae checkpoint"):
        hvae.load(tmp_path / "text.npz")
    with pytest.raises(FileNotFoundError):
        hvae.load(tmp_path / "missing.npz")


def test_pickle_inside_is_refused(trained, tmp_path):
    _, path = trained
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["params"] = np.array([object()] * 3, dtype=object)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    bad = tmp_path / "pickle.npz"
    bad.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="params"):
        hvae.load(bad)


def test_giant_declared_array_is_refused_before_allocating(trained, tmp_path):
    """A header that declares a huge array must not be trusted."""
    _, path = trained
    bad = tmp_path / "giant.npz"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.namelist():
            raw = src.read(item)
            if item == "params.npy":
                header = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.float32))
                header["shape"] = (2 ** 40,)
                out = io.BytesIO()
                np.lib.format.write_array_header_1_0(out, header)
                raw = out.getvalue() + b"\0" * 16
            dst.writestr(item, raw)
    with pytest.raises(ValueError, match="params"):
        hvae.load(bad)


def test_stale_temporary_files_are_cleaned(trained, tmp_path):
    """A writer killed mid-save leaves '.m.npz.hvae-<pid>-*.tmp'; the next save removes it when
    that process is gone, and leaves a live writer's file alone."""
    m, path = trained
    dead = tmp_path / ".m.npz.hvae-999999999-abc.tmp"
    live = tmp_path / f".m.npz.hvae-{os.getpid()}-abc.tmp"
    dead.write_bytes(b"half")
    live.write_bytes(b"half")
    m.save(path)
    assert not dead.exists() and live.exists()
    hvae.load(path)
