"""The core's vectorisable elementwise math (csrc/vecmath.c) against libm through NumPy."""
import numpy as np
import pytest

from hvae import _core

REFS = {
    "exp": np.exp,
    "expm1": np.expm1,
    "tanh": np.tanh,
    "sigmoid": lambda v: np.exp(-np.logaddexp(0, -v)),
    "softplus": lambda v: np.logaddexp(0, v),
    "log1p": np.log1p,
}


def grid(op, dtype):
    lo, hi = (0.0, 1.0) if op == "log1p" else (-150.0, 150.0)
    dense = np.linspace(lo, hi, 300001)
    small = np.geomspace(1e-30, 1.0, 3001)
    pts = np.r_[dense, small] if op == "log1p" else np.r_[dense, small, -small, 0.0]
    if op in ("exp", "expm1"):
        pts = pts[pts < (88.0 if dtype == np.float32 else 700.0)]
    return pts.astype(dtype)


@pytest.mark.parametrize("dtype,max_ulp", [(np.float32, 4), (np.float64, 4)])
@pytest.mark.parametrize("op", sorted(REFS))
def test_accuracy_in_ulp(op, dtype, max_ulp):
    x = grid(op, dtype)
    got = _core._vecmath(op, x)
    assert got.dtype == dtype and got.shape == x.shape
    want = REFS[op](x.astype(np.longdouble)).astype(np.float64)
    tiny = np.finfo(dtype).tiny
    normal = np.abs(want) >= tiny
    rel = np.abs(got[normal] - want[normal]) / np.abs(want[normal])
    assert rel.max() <= max_ulp * np.finfo(dtype).eps, (op, rel.max() / np.finfo(dtype).eps)
    assert np.all(np.abs(got[~normal] - want[~normal]) <= tiny)  # flushed below the normal range


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_no_overflow_or_nan_for_finite_input(dtype):
    big = np.array([-1e30, -1e4, -800, 800, 1e4, 1e30], dtype=dtype)
    for op in ("exp", "tanh", "sigmoid", "softplus", "expm1"):
        out = _core._vecmath(op, big)
        assert np.isfinite(out).all(), (op, out)
    np.testing.assert_array_equal(_core._vecmath("tanh", big), np.sign(big))
    np.testing.assert_allclose(_core._vecmath("softplus", big)[3:], big[3:])
