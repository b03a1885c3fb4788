"""Importance-sampled log-likelihood: exact on a linear-Gaussian model, convergent in k, >= ELBO."""
import numpy as np
import pytest

import hvae
from hvae.evaluation import log_mean_exp

D, d = 5, 2


def linear_gaussian(rng, exact_posterior, inference="bottom_up"):
    """One level, unit-variance Gaussian likelihood:
    p(z) = N(0, I), p(x|z) = N(W z + b, I)  =>  p(x) = N(b, W W^T + I).
    W has orthogonal columns, so the posterior N(S W^T (x - b), S), S = (W^T W + I)^-1, is diagonal
    and the encoder can represent it exactly.

    Bottom-up: no hidden layers. Top-down (which needs a hidden layer per level): one ReLU layer
    of width 2 D in the encoder and the decoder, used as an exact identity, u = relu(v) - relu(-v):
    the first layer maps v to [v, -v] (zero-padded), the output layer reads [I, -I]."""
    if inference == "bottom_up":
        m = hvae.HVAE(D, [d], [[]], likelihood="gaussian", dtype="float64", seed=0, init="torch")
    else:
        m = hvae.HVAE(D, [d], [[2 * D]], likelihood="gaussian", activation="relu",
                      dtype="float64", seed=0, inference="top_down", init="torch")
    q, _ = np.linalg.qr(rng.normal(size=(D, d)))
    W = q * np.array([2.0, 0.7])
    b = rng.normal(size=D)
    S = np.linalg.inv(W.T @ W + np.eye(d))
    A = S @ W.T
    if not exact_posterior:  # a deliberately poor q: shrunk mean, inflated variance
        A = 0.5 * A
        S = 2.5 * S
    enc_w = np.vstack([A, np.zeros((d, D))])
    enc_b = np.r_[-A @ b, np.log(np.diag(S))]
    p = m.named_params()
    if inference == "bottom_up":
        p["dec1.0.weight"][:] = W
        p["dec1.0.bias"][:] = b
        p["enc1.0.weight"][:] = enc_w
        p["enc1.0.bias"][:] = enc_b
        return m, W, b
    split_x = np.vstack([np.eye(D), -np.eye(D)])                   # (2D, D): x -> [x, -x]
    split_z = np.zeros((2 * D, d))                                 # (2D, d): z -> [z, -z, 0]
    split_z[:d], split_z[d:2 * d] = np.eye(d), -np.eye(d)
    p["enc1.0.weight"][:] = split_x
    p["enc1.0.bias"][:] = 0
    p["enc1.1.weight"][:] = enc_w @ np.hstack([np.eye(D), -np.eye(D)])
    p["enc1.1.bias"][:] = enc_b
    p["dec1.0.weight"][:] = split_z
    p["dec1.0.bias"][:] = 0
    p["dec1.1.weight"][:] = W @ np.hstack([np.eye(d), -np.eye(d), np.zeros((d, 2 * D - 2 * d))])
    p["dec1.1.bias"][:] = b
    return m, W, b


def exact_log_px(x, W, b):
    cov = W @ W.T + np.eye(D)
    diff = x - b
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff) + logdet
                   + D * np.log(2 * np.pi))


@pytest.mark.parametrize("inference", ["bottom_up", "top_down"])
def test_exact_posterior_gives_exact_likelihood(inference):
    rng = np.random.default_rng(0)
    m, W, b = linear_gaussian(rng, exact_posterior=True, inference=inference)
    x = rng.normal(size=(6, D)) * 2
    want = exact_log_px(x, W, b)
    # the weights are constant: every estimate is exact (seen: 1e-14)
    np.testing.assert_allclose(m.elbo(x, k=1), want, rtol=0, atol=1e-9)
    np.testing.assert_allclose(m.elbo(x, k=7), want, rtol=0, atol=1e-9)
    np.testing.assert_allclose(m.log_likelihood(x, k=50), want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("inference", ["bottom_up", "top_down"])
def test_estimate_converges_to_exact_log_px_as_k_grows(inference):
    rng = np.random.default_rng(1)
    m, W, b = linear_gaussian(rng, exact_posterior=False, inference=inference)
    x = rng.normal(size=(20, D)) * 2
    want = exact_log_px(x, W, b)
    errors = {}
    for k in (1, 10, 100, 5000):
        errors[k] = np.mean(want - m.log_likelihood(x, k=k))
    assert errors[1] > 0.3  # the poor q has a visible ELBO gap
    assert errors[1] > errors[10] > abs(errors[100]), errors
    assert abs(errors[5000]) < 0.01, errors  # the gap closes as k grows (up to MC noise)
    # elbo(x, k) is the same k-sample bound: the same numbers from the same random stream
    state = m._rng.bit_generator.state
    elbo_k = m.elbo(x, k=100)
    m._rng.bit_generator.state = state
    np.testing.assert_array_equal(elbo_k, m.log_likelihood(x, k=100))
    assert abs(np.mean(want - m.elbo(x, k=5000))) < 0.01
    # chunked k (rows smaller than k) gives the same estimator
    chunked = m.log_likelihood(x[:3], k=5000, batch_size=700)
    np.testing.assert_allclose(chunked, want[:3], atol=0.05)


def test_log_likelihood_at_least_elbo_on_average():
    rng = np.random.default_rng(2)
    X = (rng.random((200, 12)) < 0.3).astype(np.float32)
    m = hvae.HVAE(12, [4, 2], [[8], [6]], kl="mc", seed=0).fit(X, epochs=3, progress=False)
    elbo = m.elbo(X[:50])
    ll = m.log_likelihood(X[:50], k=200)
    assert ll.mean() > elbo.mean()
    assert m.score(X[:50], k=200) == pytest.approx(ll.mean(), abs=0.5)
    assert m.elbo(X[:50], k=20).mean() > elbo.mean()


def test_log_mean_exp_is_stable():
    a = np.array([[-1000.0, -1000.0], [1000.0, 1000.0 + np.log(3)]])
    np.testing.assert_allclose(log_mean_exp(a, axis=1), [-1000.0, 1000.0 + np.log(2)])


def test_evaluation_rejects():
    m = hvae.HVAE(4, [2], seed=0)
    with pytest.raises(ValueError, match="k"):
        m.log_likelihood(np.zeros((2, 4)), k=0)
    with pytest.raises(ValueError, match="batch_size"):
        m.log_likelihood(np.zeros((2, 4)), batch_size=0)
    ae = hvae.HVAE(4, [2], seed=0, deterministic=True)
    with pytest.raises(ValueError, match="autoencoder"):
        ae.elbo(np.zeros((2, 4)))


def test_elbo_of_a_wide_model_needs_no_log_likelihood_batch():
    """elbo scores its rows as they come: no check sized to log_likelihood's 4096-row batches
    (which would refuse a very wide model's three rows)."""
    m = hvae.HVAE(300_000, [2], hidden_dims=[[2]], likelihood="gaussian", seed=0)
    x = np.random.default_rng(0).random((3, 300_000)).astype(np.float32)
    assert m.elbo(x).shape == (3,)
