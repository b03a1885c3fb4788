"""Self-consistency tests of the NumPy hierarchical-VAE reference in tests/reference.py.

Checks the hand-derived gradient against central finite differences of the
loss over many model configurations, the parameter layout, the analytic KL
formula against Monte Carlo, and that ``log_weight`` and the "mc" loss are
unbiased estimates of the same ELBO.
"""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reference as ref  # noqa: E402


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

HIDDEN_BY_T = {
    1: [[4, 3]],
    2: [[4], []],
    3: [[3], [4, 3], []],
}
LATENT_BY_T = {
    1: [3],
    2: [3, 2],
    3: [3, 2, 2],
}
X_DIM = 4
BATCH = 3


def _make_problem(T, likelihood, deterministic, denoise, seed, batch=BATCH):
    """Random parameters and data for a small model.

    Parameters
    ----------
    T : int
        Number of levels.
    likelihood : str
        Observation model (bernoulli targets are drawn in [0, 1]).
    deterministic : bool
        If True, ``eps`` is None.
    denoise : bool
        If True, ``x_in`` differs from ``target``.
    seed : int
        RNG seed.
    batch : int, optional
        Batch size ``B``.

    Returns
    -------
    params : ndarray, shape (P,)
    x_in, target : ndarray, shape (B, D)
    eps : list of ndarray (B, d_i) or None
    cfg : dict
        Keyword arguments describing the model (without activation / kl).
    """
    rng = np.random.default_rng(seed)
    latent_dims = LATENT_BY_T[T]
    hidden_dims = HIDDEN_BY_T[T]
    shapes = ref.param_shapes(X_DIM, latent_dims, hidden_dims, likelihood)
    params = rng.normal(0.0, 0.5, size=ref.num_params(shapes))
    if likelihood == "bernoulli":
        target = rng.uniform(0.0, 1.0, size=(batch, X_DIM))
    else:
        target = rng.normal(0.0, 1.0, size=(batch, X_DIM))
    x_in = target + 0.3 * rng.normal(size=target.shape) if denoise else target.copy()
    eps = None if deterministic else [rng.normal(size=(batch, d)) for d in latent_dims]
    cfg = dict(x_dim=X_DIM, latent_dims=latent_dims, hidden_dims=hidden_dims,
               likelihood=likelihood)
    return params, x_in, target, eps, cfg


def _fd_grad(f, params, h=1e-6):
    """Central finite-difference gradient of scalar ``f`` at ``params`` (P,)."""
    g = np.zeros_like(params)
    for k in range(params.size):
        p_plus = params.copy()
        p_minus = params.copy()
        p_plus[k] += h
        p_minus[k] -= h
        g[k] = (f(p_plus) - f(p_minus)) / (2.0 * h)
    return g


# Every option value appears with T >= 2; T = 1 is covered too.
GRAD_CASES = [
    # (T, likelihood, activation, kl, deterministic, beta, denoise)
    (1, "bernoulli", "tanh", "analytic", False, 1.0, False),
    (1, "gaussian", "relu", "mc", False, 0.5, True),
    (1, "gaussian_learned", "leaky_relu", "analytic", True, 1.7, True),
]
for _T in (2, 3):
    for _n, (_lik, _act) in enumerate(
            [(lik, act) for lik in ref.LIKELIHOODS for act in ref.ACTIVATIONS]):
        _kl = ref.KL_ESTIMATORS[_n % 2]
        _det = (_n + _T) % 3 == 0
        _beta = (1.0, 0.6, 1.8)[(_n + _T) % 3]
        _den = (_n + _T) % 2 == 1
        GRAD_CASES.append((_T, _lik, _act, _kl, _det, _beta, _den))
for _T in (2, 3):
    for _kl in ref.KL_ESTIMATORS:
        for _det in (False, True):
            GRAD_CASES.append((_T, "gaussian_learned", "tanh", _kl, _det, 0.8, True))


def _case_id(case):
    T, lik, act, kl, det, beta, den = case
    return f"T{T}-{lik}-{act}-{kl}-{'det' if det else 'sto'}-b{beta}-{'den' if den else 'ae'}"


# ---------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------

def test_param_shapes_example():
    shapes = ref.param_shapes(4, [3], [[5]], "bernoulli")
    assert shapes == [
        ("enc1.0.weight", (5, 4)), ("enc1.0.bias", (5,)),
        ("enc1.1.weight", (6, 5)), ("enc1.1.bias", (6,)),
        ("dec1.0.weight", (5, 3)), ("dec1.0.bias", (5,)),
        ("dec1.1.weight", (4, 5)), ("dec1.1.bias", (4,)),
    ]


def test_param_shapes_hierarchy():
    shapes = dict(ref.param_shapes(6, [4, 2], [[5, 3], []], "gaussian_learned"))
    names = [n for n, _ in ref.param_shapes(6, [4, 2], [[5, 3], []], "gaussian_learned")]
    assert names == [
        "enc1.0.weight", "enc1.0.bias", "enc1.1.weight", "enc1.1.bias",
        "enc1.2.weight", "enc1.2.bias", "enc2.0.weight", "enc2.0.bias",
        "dec1.0.weight", "dec1.0.bias", "dec1.1.weight", "dec1.1.bias",
        "dec1.2.weight", "dec1.2.bias", "dec2.0.weight", "dec2.0.bias",
    ]
    assert shapes["enc1.0.weight"] == (5, 6)
    assert shapes["enc1.2.weight"] == (8, 3)
    assert shapes["enc2.0.weight"] == (4, 4)
    assert shapes["dec1.0.weight"] == (3, 4)  # reversed hidden widths
    assert shapes["dec1.1.weight"] == (5, 3)
    assert shapes["dec1.2.weight"] == (12, 5)  # 2*D for gaussian_learned
    assert shapes["dec2.0.weight"] == (4, 2)


def test_flatten_unflatten_roundtrip():
    shapes = ref.param_shapes(3, [2, 2], [[4], [3]], "bernoulli")
    flat = np.arange(ref.num_params(shapes), dtype=np.float64)
    named = ref.unflatten(flat, shapes)
    assert named["enc1.0.weight"].shape == (4, 3)
    # row-major, consecutive
    np.testing.assert_array_equal(named["enc1.0.weight"].ravel(), np.arange(12))
    np.testing.assert_array_equal(named["enc1.0.bias"], np.arange(12, 16))
    np.testing.assert_array_equal(ref.flatten(named, shapes), flat)
    named["enc1.0.bias"][0] = -1.0  # views
    assert flat[12] == -1.0


# ---------------------------------------------------------------------------
# Gradient
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", GRAD_CASES, ids=_case_id)
def test_gradient_matches_finite_differences(case):
    T, likelihood, activation, kl, deterministic, beta, denoise = case
    seed = sum(ord(ch) for ch in _case_id(case)) * 7 + T  # stable across runs
    params, x_in, target, eps, cfg = _make_problem(T, likelihood, deterministic, denoise, seed)
    kw = dict(cfg, activation=activation, kl=kl, deterministic=deterministic, beta=beta)

    loss, grad = ref.loss_and_grad(params, x_in, target, eps, **kw)
    assert np.isfinite(loss)
    assert loss == ref.forward(params, x_in, target, eps, **kw)["loss"]

    fd = _fd_grad(lambda p: ref.forward(p, x_in, target, eps, **kw)["loss"], params)

    shapes = ref.param_shapes(X_DIM, cfg["latent_dims"], cfg["hidden_dims"], likelihood)
    g_named = ref.unflatten(grad, shapes)
    fd_named = ref.unflatten(fd, shapes)
    for name, _ in shapes:
        a, b = g_named[name], fd_named[name]
        scale = max(np.linalg.norm(a), np.linalg.norm(b), 1e-2)
        rel = np.linalg.norm(a - b) / scale
        assert rel < 1e-6, f"{name}: rel err {rel:.2e}\nanalytic={a}\nfd={b}"


@pytest.mark.parametrize("kl", ref.KL_ESTIMATORS)
def test_deterministic_logvar_gradient_is_zero(kl):
    T = 2
    params, x_in, target, _, cfg = _make_problem(T, "gaussian", True, True, seed=3)
    _, grad = ref.loss_and_grad(params, x_in, target, None, **cfg, activation="tanh",
                                kl=kl, deterministic=True, beta=1.3)
    shapes = ref.param_shapes(X_DIM, cfg["latent_dims"], cfg["hidden_dims"], "gaussian")
    g = ref.unflatten(grad, shapes)
    for i, d in enumerate(cfg["latent_dims"], start=1):
        last = len(cfg["hidden_dims"][i - 1])
        assert np.all(g[f"enc{i}.{last}.weight"][d:] == 0.0)
        assert np.all(g[f"enc{i}.{last}.bias"][d:] == 0.0)
        assert np.any(g[f"enc{i}.{last}.weight"][:d] != 0.0)
    out = ref.forward(params, x_in, target, None, **cfg, activation="tanh", kl=kl,
                      deterministic=True)
    assert out["log_weight"] is None
    assert np.all(out["kl"][-1] == 0.0)
    for z, mu in zip(out["z"], out["mu"]):
        np.testing.assert_array_equal(z, mu)


def test_beta_scales_only_kl():
    params, x_in, target, eps, cfg = _make_problem(2, "bernoulli", False, False, seed=11)
    kw = dict(cfg, activation="relu", kl="mc")
    o1 = ref.forward(params, x_in, target, eps, **kw, beta=1.0)
    o2 = ref.forward(params, x_in, target, eps, **kw, beta=2.5)
    kl_mean = np.mean(sum(o1["kl"]))
    assert o2["loss"] == pytest.approx(o1["loss"] + 1.5 * kl_mean, rel=1e-12)
    assert o1["loss"] == pytest.approx(np.mean(o1["reconstruction"] + sum(o1["kl"])), rel=1e-12)


def test_reconstruction_formulas():
    rng = np.random.default_rng(5)
    x = rng.uniform(size=(2, 3))
    l = np.array([[0.3, -800.0, 900.0], [1.0, -2.0, 0.0]])
    rec, _ = ref._reconstruction(l, x, "bernoulli")
    expected = -np.sum(x * np.log(ref._sigmoid(l).clip(1e-300)) +
                       (1 - x) * np.log((1 - ref._sigmoid(l)).clip(1e-300)), axis=1)
    # row 0 has huge logits: compare the stable form analytically
    assert np.isfinite(rec).all()
    np.testing.assert_allclose(rec[1], expected[1], rtol=1e-12)
    m = rng.normal(size=(2, 3))
    s = rng.normal(size=(2, 3))
    rec_g, _ = ref._reconstruction(m, x, "gaussian")
    rec_gl, _ = ref._reconstruction(np.concatenate([m, s], 1), x, "gaussian_learned")
    np.testing.assert_allclose(rec_g, -ref._log_normal_unit(x, m), rtol=1e-12)
    np.testing.assert_allclose(rec_gl, -ref._log_normal_diag(x, m, s), rtol=1e-12)
    rec_gl0, _ = ref._reconstruction(np.concatenate([m, np.zeros_like(m)], 1), x,
                                     "gaussian_learned")
    np.testing.assert_allclose(rec_gl0, rec_g, rtol=1e-12)


# ---------------------------------------------------------------------------
# Monte Carlo checks
# ---------------------------------------------------------------------------

def test_analytic_kl_matches_monte_carlo():
    rng = np.random.default_rng(0)
    d, n = 3, 200_000
    mu = np.array([0.4, -0.7, 1.1])
    lv = np.array([-0.5, 0.3, 0.1])
    m = np.array([0.1, 0.2, -0.3])
    kl = ref._kl_diag_to_unit(mu[None], lv[None], m[None])[0]
    z = mu + np.exp(0.5 * lv) * rng.normal(size=(n, d))
    # independent log densities written out directly
    log_q = np.sum(-0.5 * np.log(2 * np.pi * np.exp(lv)) - 0.5 * (z - mu) ** 2 / np.exp(lv), axis=1)
    log_p = np.sum(-0.5 * np.log(2 * np.pi) - 0.5 * (z - m) ** 2, axis=1)
    sample = log_q - log_p
    se = sample.std(ddof=1) / np.sqrt(n)
    assert abs(sample.mean() - kl) < 4 * se


def test_top_level_kl_matches_monte_carlo_via_forward():
    n = 100_000
    params, x_in, target, _, cfg = _make_problem(1, "gaussian", False, False, seed=2, batch=1)
    rng = np.random.default_rng(9)
    out = ref.forward(params, x_in, target, [rng.normal(size=(1, 3))], **cfg,
                      activation="tanh", kl="analytic")
    mu, lv = out["mu"][0][0], out["logvar"][0][0]
    z = mu + np.exp(0.5 * lv) * rng.normal(size=(n, mu.size))
    sample = ref._log_normal_diag(z, mu, lv) - ref._log_normal_unit(z, 0.0)
    se = sample.std(ddof=1) / np.sqrt(n)
    assert abs(sample.mean() - out["kl"][0][0]) < 4 * se


@pytest.mark.parametrize("T,likelihood", [(1, "bernoulli"), (2, "gaussian_learned"),
                                          (3, "gaussian")])
def test_log_weight_and_mc_elbo_agree_in_expectation(T, likelihood):
    """E[log_weight] = ELBO = E[-(rec + sum kl_mc)] for a fixed x."""
    n = 20_000
    params, x1, _, _, cfg = _make_problem(T, likelihood, False, False, seed=4, batch=1)
    x = np.repeat(x1, n, axis=0)
    rng = np.random.default_rng(17)
    eps = [rng.normal(size=(n, d)) for d in cfg["latent_dims"]]
    out = ref.forward(params, x, x, eps, **cfg, activation="tanh", kl="mc", beta=1.0)
    lw = out["log_weight"]
    neg = -(out["reconstruction"] + sum(out["kl"]))
    se = np.sqrt(lw.var(ddof=1) / n + neg.var(ddof=1) / n)
    assert abs(lw.mean() - neg.mean()) < 4 * se
    # paired difference, tighter
    diff = lw - neg
    se_pair = diff.std(ddof=1) / np.sqrt(n)
    assert abs(diff.mean()) < 4 * se_pair + 1e-12


def test_log_weight_t1_closed_form():
    """For T=1: log_weight = -rec + log N(z;0,I) - log q(z|x), checked from eps."""
    params, x, _, eps, cfg = _make_problem(1, "bernoulli", False, False, seed=8)
    out = ref.forward(params, x, x, eps, **cfg, activation="relu", kl="analytic")
    lv = out["logvar"][0]
    z = out["z"][0]
    log_q = np.sum(-0.5 * (np.log(2 * np.pi) + lv + eps[0] ** 2), axis=1)
    log_p = -out["reconstruction"] + np.sum(-0.5 * (np.log(2 * np.pi) + z ** 2), axis=1)
    np.testing.assert_allclose(out["log_weight"], log_p - log_q, rtol=1e-12, atol=1e-12)
