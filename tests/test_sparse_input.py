"""The encoder's sparse first layer (csrc/layers.c): batches of at least 64 rows whose x has at
most a quarter of its entries nonzero go through kernels that visit only the nonzeros. Checked
against the NumPy reference and finite differences on both sides of every switch: the batch
size, the density, layers narrower and wider than a chunk of features, binary and real x, the
team's splits, and batches that alternate between the two paths."""
import numpy as np
import pytest

import hvae
from hvae import _core

import reference as ref

MIN_BATCH = _core.SPARSE_MIN_BATCH

# first-layer widths around the kernels' chunks (64 float32 / 32 float64 features, vectors of
# 8 / 4) and their tails: 10 (one vector and a tail of 2 / 2 vectors and 2), 70 (a full chunk
# and a tail of 6), 150 (two chunks, then 22)
CONFIGS = [
    dict(x_dim=30, latent_dims=[5], hidden_dims=[[]]),  # first layer = [mu, logvar], no act
    dict(x_dim=50, latent_dims=[4], hidden_dims=[[70]], activation="relu"),
    dict(x_dim=40, latent_dims=[6, 3], hidden_dims=[[150, 20], [8]], likelihood="gaussian",
         kl="mc"),
    dict(x_dim=36, latent_dims=[5, 3], hidden_dims=[[70], [6]], likelihood="gaussian_learned",
         prior_variance="learned", activation="leaky_relu"),
    dict(x_dim=36, latent_dims=[5, 3], hidden_dims=[[70], [6]], deterministic=True),
]
RTOL = {"float64": 1e-10, "float32": 1e-4}


def sparse_x(rng, B, D, density, dtype, binary=True):
    """(B, D) with round(density * B * D) nonzeros at random places: ones, or normal values."""
    x = np.zeros(B * D)
    at = rng.choice(B * D, size=int(round(density * B * D)), replace=False)
    x[at] = 1.0 if binary else rng.normal(size=at.size)
    return x.reshape(B, D).astype(dtype)


def make(cfg, dtype, seed=0):
    m = hvae.HVAE(**cfg, dtype=dtype, seed=seed)
    m.params[:] = np.random.default_rng(seed + 7).normal(0, 0.3, m.n_params)
    return m


def ref_kwargs(m):
    return dict(x_dim=m.x_dim, latent_dims=m.latent_dims, hidden_dims=m.hidden_dims,
                likelihood=m.likelihood, activation=m.activation, kl=m.kl,
                deterministic=m.deterministic, prior_variance=m.prior_variance)


def check_against_reference(m, x, target, eps, rtol):
    """loss, gradient and the encoder's outputs of m on x against tests/reference.py."""
    p64 = m.params.astype(np.float64)
    e64 = None if eps is None else [e.astype(np.float64) for e in eps]
    t64 = x if target is None else target
    want_loss, want_grad = ref.loss_and_grad(p64, x.astype(np.float64), t64.astype(np.float64),
                                             e64, beta=0.8, **ref_kwargs(m))
    loss, grad = m.loss_and_grad(x, eps, target=target, beta=0.8)
    np.testing.assert_allclose(loss, want_loss, rtol=rtol)
    np.testing.assert_allclose(grad, want_grad, rtol=rtol, atol=rtol * np.abs(want_grad).max())
    want = ref.forward(p64, x.astype(np.float64), t64.astype(np.float64), e64, beta=0.8,
                       **ref_kwargs(m))
    mulv, _ = m._core.encode(m.params, x, None)
    d = m.latent_dims[0]
    np.testing.assert_allclose(mulv[0][:, :d], want["mu"][0], rtol=rtol, atol=rtol)
    return grad


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("B,density,binary", [(64, 0.1, True), (150, 0.2, False),
                                              (200, 0.02, True)])
def test_sparse_batches_match_reference(cfg, dtype, B, density, binary):
    m = make(cfg, dtype)
    rng = np.random.default_rng(B)
    x = sparse_x(rng, B, m.x_dim, density, dtype, binary)
    if m.likelihood != "bernoulli":
        target = rng.normal(size=x.shape).astype(dtype)
    else:  # the Bernoulli likelihood scores values in [0, 1] only
        target = None if binary else (x != 0).astype(dtype)
    eps = None if m.deterministic else m.draw_eps(B)
    check_against_reference(m, x, target, eps, RTOL[dtype])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("B,extra", [(MIN_BATCH - 1, 0), (MIN_BATCH, 0), (MIN_BATCH, 1),
                                     (100, 0), (100, 1)])
def test_either_side_of_the_switches(dtype, B, extra):
    """A quarter of the entries nonzero (the sparse kernels' limit), and one more (the GEMM);
    one row fewer than the smallest sparse batch."""
    m = make(CONFIGS[2], dtype)
    rng = np.random.default_rng(3)
    cap = B * m.x_dim // 4
    x = np.zeros(B * m.x_dim)
    x[rng.choice(x.size, size=cap + extra, replace=False)] = 1.0
    x = x.reshape(B, m.x_dim).astype(dtype)
    check_against_reference(m, x, rng.normal(size=x.shape).astype(dtype), m.draw_eps(B),
                            RTOL[dtype])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_all_zero_batch(dtype):
    """No nonzeros: every row and column of the index is empty; the first layer's weight
    gradient is exactly zero and its output the bias."""
    m = make(CONFIGS[1], dtype)
    x = np.zeros((80, m.x_dim), dtype)
    grad = check_against_reference(m, x, None, m.draw_eps(80), RTOL[dtype])
    name, offset, shape = m._core.param_table()[0]
    assert np.all(grad[offset:offset + int(np.prod(shape))] == 0)
    bias_name, boff, bshape = m._core.param_table()[1]
    assert np.any(grad[boff:boff + bshape[0]] != 0)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_batches_alternating_between_the_paths(dtype):
    """The backward takes the path its forward took: sparse, dense and sparse batches of one
    size through one workspace, and a small batch after a large one."""
    m = make(CONFIGS[2], dtype)
    rng = np.random.default_rng(5)
    for B, density in ((128, 0.1), (128, 0.6), (128, 0.05), (70, 0.5), (30, 0.1), (96, 0.1)):
        x = sparse_x(rng, B, m.x_dim, density, dtype, binary=False)
        check_against_reference(m, x, rng.normal(size=x.shape).astype(dtype), m.draw_eps(B),
                                RTOL[dtype])


def test_finite_differences_of_the_sparse_layer():
    """Central differences of the loss against the gradient of the first layer's weights and
    bias on a sparse batch (float64)."""
    m = make(CONFIGS[1], "float64")
    rng = np.random.default_rng(11)
    B = 96
    x = sparse_x(rng, B, m.x_dim, 0.1, "float64", binary=False)
    t = (x != 0).astype(x.dtype)  # what the Bernoulli likelihood scores: in [0, 1]
    eps = m.draw_eps(B)
    _, grad = m.loss_and_grad(x, eps, target=t)
    (_, w_off, w_shape), (_, b_off, b_shape) = m._core.param_table()[:2]
    cols = np.flatnonzero(x.any(axis=0))[:4]
    empty = np.flatnonzero(~x.any(axis=0))[:2]
    rows = [0, 33, w_shape[0] - 1]  # first, middle and last feature (in the tail chunk)
    coords = [w_off + r * w_shape[1] + c for r in rows for c in [*cols, *empty]]
    coords += [b_off + r for r in rows]
    h = 1e-6
    for k in coords:
        base = m.params[k]
        m.params[k] = base + h
        up = m.loss_and_grad(x, eps, target=t)[0]
        m.params[k] = base - h
        down = m.loss_and_grad(x, eps, target=t)[0]
        m.params[k] = base
        fd = (up - down) / (2 * h)
        assert abs(fd - grad[k]) <= 1e-6 * max(1.0, abs(fd)), (k, fd, grad[k])
    assert np.all(grad[[w_off + r * w_shape[1] + c for r in rows for c in empty]] == 0)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("where", ["blocks", "feature_tail", "input_tail"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_overflowing_first_layer_gradient_takes_no_step(dtype, where, threads):
    """train_step on a sparse batch whose only gradient too large for Adam (g * g overflows) is
    the first layer's weight gradient: x of 1e20 (1e160 in float64) against weights of 1e-20
    (1e-160), so that every activation is ordinary but x * d out is not. No step: params and
    moments untouched. The gradient is written through transposes of 8 x 8 (float32) or 4 x 4
    (float64) blocks checked on the way, with scalar tails; `where` puts the overflow in whole
    blocks only (features 0-63, inputs 0-287), in the last features only (200-202: the tail of
    the last part's last chunk; 512 rows are enough for the team to split the layer: 203
    features = 104 + 99 or 64 + 72 + 67), or in the last inputs only (296-299 of 300)."""
    m = make(dict(x_dim=300, latent_dims=[4], hidden_dims=[[203]], activation="relu"), dtype)
    (_, w_off, w_shape), _, (_, v_off, v_shape) = m._core.param_table()[:3]
    scale = {"float32": 1e20, "float64": 1e160}[dtype]
    m.params[w_off:w_off + w_shape[0] * w_shape[1]] /= scale
    live = {"blocks": slice(0, 64), "feature_tail": slice(200, 203), "input_tail": slice(0, 203)}
    second = m.params[v_off:v_off + v_shape[0] * v_shape[1]].reshape(v_shape)
    keep = second[:, live[where]].copy()
    second[:] = 0  # features outside `live` get no gradient
    second[:, live[where]] = keep
    rng = np.random.default_rng(3)
    B = 512
    x = sparse_x(rng, B, m.x_dim, 0.1, dtype)
    big = slice(296, 300) if where == "input_tail" else slice(0, 288)
    x[:, big] *= scale
    x[0, big] = scale  # at least one nonzero there
    target = (x != 0).astype(dtype)
    m1, m2, grad = np.zeros_like(m.params), np.ones_like(m.params), np.zeros_like(m.params)
    before = [a.copy() for a in (m.params, m1, m2)]
    loss, _, ok = m._core.train_step(m.params, m1, m2, grad, x, m.draw_eps(B), 1, target=target,
                                     threads=threads)
    assert np.isfinite(loss) and not ok
    w = grad[w_off:w_off + w_shape[0] * w_shape[1]].reshape(w_shape)
    limit = np.sqrt(np.finfo(dtype).max) / 2
    over = ~(np.abs(w) <= limit)
    rows, cols = np.nonzero(over)
    assert rows.size and np.all(np.isin(rows, np.arange(203)[live[where]]))
    assert np.all((cols >= big.start) & (cols < big.stop))
    rest = np.delete(grad, np.arange(w_off, w_off + w.size))
    assert np.all(np.abs(rest) <= 1e6)  # the other gradients are ordinary
    for a, b in zip((m.params, m1, m2), before):
        np.testing.assert_array_equal(a, b)
