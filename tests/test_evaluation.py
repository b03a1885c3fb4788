"""Importance-sampled log-likelihood: exact on a linear-Gaussian model, convergent in k, >= ELBO."""
import numpy as np
import pytest

import hvae
from hvae.evaluation import log_mean_exp

D, d = 5, 2


def linear_gaussian(rng, exact_posterior):
    """One level, no hidden layers, unit-variance Gaussian likelihood:
    p(z) = N(0, I), p(x|z) = N(W z + b, I)  =>  p(x) = N(b, W W^T + I).
    W has orthogonal columns, so the posterior N(S W^T (x - b), S), S = (W^T W + I)^-1, is diagonal
    and the encoder can represent it exactly."""
    m = hvae.HVAE(D, [d], [[]], likelihood="gaussian", dtype="float64", seed=0, init="torch")
    q, _ = np.linalg.qr(rng.normal(size=(D, d)))
    W = q * np.array([2.0, 0.7])
    b = rng.normal(size=D)
    S = np.linalg.inv(W.T @ W + np.eye(d))
    p = m.named_params()
    p["dec1.0.weight"][:] = W
    p["dec1.0.bias"][:] = b
    A = S @ W.T
    if not exact_posterior:  # a deliberately poor q: shrunk mean, inflated variance
        A = 0.5 * A
        S = 2.5 * S
    p["enc1.0.weight"][:] = np.vstack([A, np.zeros((d, D))])
    p["enc1.0.bias"][:] = np.r_[-A @ b, np.log(np.diag(S))]
    return m, W, b


def exact_log_px(x, W, b):
    cov = W @ W.T + np.eye(D)
    diff = x - b
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff) + logdet
                   + D * np.log(2 * np.pi))


def test_exact_posterior_gives_exact_likelihood():
    rng = np.random.default_rng(0)
    m, W, b = linear_gaussian(rng, exact_posterior=True)
    x = rng.normal(size=(6, D)) * 2
    want = exact_log_px(x, W, b)
    np.testing.assert_allclose(m.elbo(x, k=1), want, atol=1e-9)  # weights are constant
    np.testing.assert_allclose(m.log_likelihood(x, k=50), want, atol=1e-9)


def test_estimate_converges_to_exact_log_px_as_k_grows():
    rng = np.random.default_rng(1)
    m, W, b = linear_gaussian(rng, exact_posterior=False)
    x = rng.normal(size=(20, D)) * 2
    want = exact_log_px(x, W, b)
    errors = {}
    for k in (1, 10, 100, 5000):
        errors[k] = np.mean(want - m.log_likelihood(x, k=k))
    assert errors[1] > 0.3  # the poor q has a visible ELBO gap
    assert errors[1] > errors[10] > abs(errors[100]), errors
    assert abs(errors[5000]) < 0.01, errors  # the gap closes as k grows (up to MC noise)
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
