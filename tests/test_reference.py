"""Self-consistency tests of the NumPy hierarchical-VAE reference in tests/reference.py.

Checks the hand-derived gradient against central finite differences of the
loss over many model configurations, the parameter layout, the analytic KL
formula against Monte Carlo, and that ``log_weight`` and the "mc" loss are
unbiased estimates of the same ELBO; the same for ``prior_variance="learned"``,
plus its reduction to ``"unit"`` when the prior log-variance is zero.
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


def _make_problem(T, likelihood, deterministic, denoise, seed, batch=BATCH,
                  prior_variance="unit"):
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
    prior_variance : {"unit", "learned"}, optional
        Decoder layout; included in ``cfg`` only when not ``"unit"``.

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
    shapes = ref.param_shapes(X_DIM, latent_dims, hidden_dims, likelihood,
                              prior_variance=prior_variance)
    params = rng.normal(0.0, 0.5, size=ref.num_params(shapes))
    if likelihood == "bernoulli":
        target = rng.uniform(0.0, 1.0, size=(batch, X_DIM))
    else:
        target = rng.normal(0.0, 1.0, size=(batch, X_DIM))
    x_in = target + 0.3 * rng.normal(size=target.shape) if denoise else target.copy()
    eps = None if deterministic else [rng.normal(size=(batch, d)) for d in latent_dims]
    cfg = dict(x_dim=X_DIM, latent_dims=latent_dims, hidden_dims=hidden_dims,
               likelihood=likelihood)
    if prior_variance != "unit":
        cfg["prior_variance"] = prior_variance
    return params, x_in, target, eps, cfg


def _assert_blocks_match(grad, fd, shapes):
    """Every parameter block of grad within 1e-6 (relative) of the finite differences fd;
    returns grad by name."""
    g_named = ref.unflatten(grad, shapes)
    fd_named = ref.unflatten(fd, shapes)
    for name, _ in shapes:
        a, b = g_named[name], fd_named[name]
        scale = max(np.linalg.norm(a), np.linalg.norm(b), 1e-2)
        rel = np.linalg.norm(a - b) / scale
        assert rel < 1e-6, f"{name}: rel err {rel:.2e}\nanalytic={a}\nfd={b}"
    return g_named


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
    g_named = _assert_blocks_match(grad, fd, shapes)


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


# ---------------------------------------------------------------------------
# prior_variance="learned": p(z_i | z_{i+1}) = N(m, diag exp(s))
# ---------------------------------------------------------------------------

LEARNED_GRAD_CASES = []
for _T in (2, 3):
    for _mode in ("analytic", "mc", "ae"):
        for _B in (1, 5):
            for _lik in ("bernoulli", "gaussian_learned"):
                LEARNED_GRAD_CASES.append((_T, _mode, _B, _lik))


def _learned_id(case):
    T, mode, B, lik = case
    return f"T{T}-{mode}-B{B}-{lik}"


def _to_learned(params_unit, cfg, log_var=None):
    """Map unit-variance parameters to the learned layout.

    The mean half of each output layer of decoders ``2..T`` is the unit
    model's output layer; the log-variance half is zero (``s = 0``) unless
    ``log_var`` (callable ``(name, shape) -> array``) fills it.
    """
    args = (X_DIM, cfg["latent_dims"], cfg["hidden_dims"], cfg["likelihood"])
    su = ref.param_shapes(*args)
    sl = ref.param_shapes(*args, prior_variance="learned")
    assert [n for n, _ in su] == [n for n, _ in sl]
    pu = ref.unflatten(params_unit, su)
    pl = {}
    for (name, shu), (_, shl) in zip(su, sl):
        if shu == shl:
            pl[name] = pu[name]
        else:
            extra = np.zeros((shl[0] - shu[0],) + shu[1:])
            if log_var is not None:
                extra = log_var(name, extra.shape)
            pl[name] = np.concatenate([pu[name], extra], axis=0)
    return ref.flatten(pl, sl), su, sl


def test_param_shapes_learned_prior_variance():
    args = (6, [4, 3, 2], [[5], [], [3, 2]], "gaussian_learned")
    su = dict(ref.param_shapes(*args))
    sl = dict(ref.param_shapes(*args, prior_variance="learned"))
    assert su == dict(ref.param_shapes(*args, prior_variance="unit"))
    assert list(su) == list(sl)
    changed = {n for n in su if su[n] != sl[n]}
    assert changed == {"dec2.0.weight", "dec2.0.bias", "dec3.2.weight", "dec3.2.bias"}
    assert sl["dec2.0.weight"] == (8, 3) and sl["dec2.0.bias"] == (8,)
    assert sl["dec3.2.weight"] == (6, 3) and sl["dec3.2.bias"] == (6,)
    assert sl["dec1.1.weight"] == su["dec1.1.weight"] == (12, 5)  # decoder 1 unchanged
    # T = 1: nothing changes
    assert ref.param_shapes(4, [3], [[5]], "bernoulli", prior_variance="learned") == \
        ref.param_shapes(4, [3], [[5]], "bernoulli")


@pytest.mark.parametrize("bad", ["Unit", "learnt", "", None, 1])
def test_prior_variance_is_validated(bad):
    params, x, target, eps, cfg = _make_problem(2, "bernoulli", False, False, seed=1)
    kw = dict(cfg, activation="tanh", kl="analytic")
    with pytest.raises(ValueError, match="prior_variance"):
        ref.param_shapes(X_DIM, cfg["latent_dims"], cfg["hidden_dims"], "bernoulli",
                         prior_variance=bad)
    with pytest.raises(ValueError, match="prior_variance"):
        ref.forward(params, x, target, eps, **kw, prior_variance=bad)
    with pytest.raises(ValueError, match="prior_variance"):
        ref.loss_and_grad(params, x, target, eps, **kw, prior_variance=bad)


@pytest.mark.parametrize("case", LEARNED_GRAD_CASES, ids=_learned_id)
def test_learned_gradient_matches_finite_differences(case):
    T, mode, B, likelihood = case
    deterministic = mode == "ae"
    kl = "analytic" if deterministic else mode
    seed = sum(ord(ch) for ch in _learned_id(case)) * 13 + B
    activation = ("tanh", "leaky_relu")[seed % 2]
    beta = (1.0, 0.7)[B % 2]
    params, x_in, target, eps, cfg = _make_problem(T, likelihood, deterministic, seed % 3 == 0,
                                                   seed, batch=B, prior_variance="learned")
    kw = dict(cfg, activation=activation, kl=kl, deterministic=deterministic, beta=beta)

    loss, grad = ref.loss_and_grad(params, x_in, target, eps, **kw)
    out = ref.forward(params, x_in, target, eps, **kw)
    assert np.isfinite(loss)
    assert loss == out["loss"]
    for s in out["prior_logvar"]:  # the learned variance is really exercised
        assert s.shape[0] == B and np.abs(s).max() > 0.1

    fd = _fd_grad(lambda p: ref.forward(p, x_in, target, eps, **kw)["loss"], params)

    shapes = ref.param_shapes(X_DIM, cfg["latent_dims"], cfg["hidden_dims"], likelihood,
                              prior_variance="learned")
    g_named = _assert_blocks_match(grad, fd, shapes)
    # the log-variance half of every prior decoder's output layer gets a gradient
    for i in range(2, T + 1):
        last = len(cfg["hidden_dims"][i - 1])
        d = cfg["latent_dims"][i - 2]
        assert np.any(g_named[f"dec{i}.{last}.bias"][d:] != 0.0)


@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize("mode", ["analytic", "mc", "ae"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian_learned"])
def test_learned_with_zero_logvar_equals_unit(T, mode, likelihood):
    deterministic = mode == "ae"
    kl = "analytic" if deterministic else mode
    params_u, x_in, target, eps, cfg = _make_problem(T, likelihood, deterministic, True,
                                                     seed=31 + T, batch=4)
    params_l, su, sl = _to_learned(params_u, cfg)
    kw = dict(cfg, activation="tanh", kl=kl, deterministic=deterministic, beta=0.9)

    ou = ref.forward(params_u, x_in, target, eps, **kw)
    ol = ref.forward(params_l, x_in, target, eps, **kw, prior_variance="learned")
    for s in ol["prior_logvar"]:
        assert np.all(s == 0.0)
    for pm_u, pm_l in zip(ou["prior_mean"], ol["prior_mean"]):
        np.testing.assert_array_equal(pm_l, pm_u)
    np.testing.assert_allclose(ol["loss"], ou["loss"], rtol=1e-13)
    np.testing.assert_array_equal(ol["reconstruction"], ou["reconstruction"])
    for a, b in zip(ol["kl"], ou["kl"]):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
    if deterministic:
        assert ol["log_weight"] is None
    else:
        np.testing.assert_allclose(ol["log_weight"], ou["log_weight"], rtol=1e-13)

    lu, gu = ref.loss_and_grad(params_u, x_in, target, eps, **kw)
    ll, gl = ref.loss_and_grad(params_l, x_in, target, eps, **kw, prior_variance="learned")
    np.testing.assert_allclose(ll, lu, rtol=1e-13)
    gu_named = ref.unflatten(gu, su)
    gl_named = ref.unflatten(gl, sl)
    scale = np.abs(gu).max()
    for name, shape in su:
        np.testing.assert_allclose(gl_named[name][:shape[0]], gu_named[name],
                                   rtol=1e-12, atol=1e-13 * scale, err_msg=name)


def test_learned_with_nonzero_logvar_differs_from_unit():
    """The log-variance half is not ignored: s = 0.3 (bias only) gives its closed form."""
    params_u, x_in, target, eps, cfg = _make_problem(2, "bernoulli", False, False, seed=5)
    params_l, _, _ = _to_learned(
        params_u, cfg, log_var=lambda n, sh: np.full(sh, 0.3 if n.endswith("bias") else 0.0))
    kw = dict(cfg, activation="tanh", kl="analytic")
    ou = ref.forward(params_u, x_in, target, eps, **kw)
    ol = ref.forward(params_l, x_in, target, eps, **kw, prior_variance="learned")
    np.testing.assert_allclose(ol["prior_logvar"][0], 0.3, rtol=1e-14)
    np.testing.assert_array_equal(ol["kl"][1], ou["kl"][1])  # top level unchanged
    # closed form with the same q and m, s = 0.3
    mu, lv, m = ou["mu"][0], ou["logvar"][0], ou["prior_mean"][0]
    want = 0.5 * np.sum(0.3 - lv + (np.exp(lv) + (mu - m) ** 2) * np.exp(-0.3) - 1.0, axis=1)
    np.testing.assert_allclose(ol["kl"][0], want, rtol=1e-12)
    assert np.all(np.abs(ol["kl"][0] - ou["kl"][0]) > 1e-3)


def test_learned_analytic_kl_matches_monte_carlo_scipy():
    """Closed-form KL(N(mu, e^lv) || N(m, e^s)) against log q - log p with scipy densities."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(21)
    d, n = 3, 400_000
    mu = np.array([0.4, -0.7, 1.1])
    lv = np.array([-0.5, 0.3, 0.1])
    m = np.array([0.1, 0.2, -0.3])
    s = np.array([0.6, -0.4, 0.2])
    kl = ref._kl_diag_to_diag(mu[None], lv[None], m[None], s[None])[0]
    z = mu + np.exp(0.5 * lv) * rng.normal(size=(n, d))
    sample = np.sum(stats.norm.logpdf(z, mu, np.exp(0.5 * lv))
                    - stats.norm.logpdf(z, m, np.exp(0.5 * s)), axis=1)
    se = sample.std(ddof=1) / np.sqrt(n)
    assert abs(sample.mean() - kl) < 4 * se
    # the same number through forward: level 1 of a T=2 learned model, batch 1
    params, x_in, target, eps, cfg = _make_problem(2, "gaussian", False, False, seed=12, batch=1,
                                                   prior_variance="learned")
    out = ref.forward(params, x_in, target, eps, **cfg, activation="tanh", kl="analytic")
    mu, lv = out["mu"][0][0], out["logvar"][0][0]
    m, s = out["prior_mean"][0][0], out["prior_logvar"][0][0]
    assert np.abs(s).max() > 0.1
    z = mu + np.exp(0.5 * lv) * rng.normal(size=(n, mu.size))
    sample = np.sum(stats.norm.logpdf(z, mu, np.exp(0.5 * lv))
                    - stats.norm.logpdf(z, m, np.exp(0.5 * s)), axis=1)
    se = sample.std(ddof=1) / np.sqrt(n)
    assert abs(sample.mean() - out["kl"][0][0]) < 4 * se


def test_learned_log_weight_and_deterministic_terms_from_scipy():
    """log_weight and the autoencoder's lower-level term, typed in from scipy densities."""
    stats = pytest.importorskip("scipy.stats")
    params, x, _, eps, cfg = _make_problem(3, "bernoulli", False, False, seed=14, batch=5,
                                           prior_variance="learned")
    out = ref.forward(params, x, x, eps, **cfg, activation="relu", kl="mc")
    z, mu, lv = out["z"], out["mu"], out["logvar"]
    m, s = out["prior_mean"], out["prior_logvar"]
    log_p = -out["reconstruction"] + stats.norm.logpdf(z[2]).sum(1)
    log_q = 0.0
    for i in range(3):
        log_q = log_q + stats.norm.logpdf(z[i], mu[i], np.exp(0.5 * lv[i])).sum(1)
        if i < 2:
            log_p = log_p + stats.norm.logpdf(z[i], m[i], np.exp(0.5 * s[i])).sum(1)
    np.testing.assert_allclose(out["log_weight"], log_p - log_q, rtol=1e-12, atol=1e-12)
    # mc term of level i < T: -log p(z_i | z_{i+1}) - H(q(z_i | z_{i-1}))
    for i in range(2):
        entropy = np.sum(0.5 * (1.0 + np.log(2 * np.pi) + lv[i]), axis=1)
        want = -stats.norm.logpdf(z[i], m[i], np.exp(0.5 * s[i])).sum(1) - entropy
        np.testing.assert_allclose(out["kl"][i], want, rtol=1e-12, atol=1e-12)

    det = ref.forward(params, x, x, None, **cfg, activation="relu", kl="mc", deterministic=True)
    for i in range(2):
        want = -stats.norm.logpdf(det["mu"][i], det["prior_mean"][i],
                                  np.exp(0.5 * det["prior_logvar"][i])).sum(1)
        np.testing.assert_allclose(det["kl"][i], want, rtol=1e-12, atol=1e-12)
    assert np.all(det["kl"][2] == 0.0)


def test_learned_mc_term_expectation_equals_analytic():
    """E_eps1[mc term of level 1] = analytic KL, for a fixed z_2 (hence fixed m, s).

    Encoder 2's weight is zeroed so z_2 does not depend on z_1; eps_2 is the
    same for every sample, so m and s from decoder 2 are fixed while eps_1
    varies.  Paired comparison of the two estimators on the same draws.
    """
    n = 100_000
    params, x1, _, _, cfg = _make_problem(2, "bernoulli", False, False, seed=23, batch=1,
                                          prior_variance="learned")
    shapes = ref.param_shapes(X_DIM, cfg["latent_dims"], cfg["hidden_dims"], "bernoulli",
                              prior_variance="learned")
    ref.unflatten(params, shapes)["enc2.0.weight"][...] = 0.0
    x = np.repeat(x1, n, axis=0)
    rng = np.random.default_rng(29)
    eps = [rng.normal(size=(n, cfg["latent_dims"][0])),
           np.repeat(rng.normal(size=(1, cfg["latent_dims"][1])), n, axis=0)]
    kw = dict(cfg, activation="tanh")
    mc = ref.forward(params, x, x, eps, **kw, kl="mc")
    an = ref.forward(params, x, x, eps, **kw, kl="analytic")
    s = mc["prior_logvar"][0]
    np.testing.assert_array_equal(s, np.repeat(s[:1], n, axis=0))  # m, s fixed indeed
    assert np.abs(s).max() > 0.1
    np.testing.assert_allclose(an["kl"][0], an["kl"][0][0], rtol=1e-13)
    diff = mc["kl"][0] - an["kl"][0]
    se = diff.std(ddof=1) / np.sqrt(n)
    assert abs(diff.mean()) < 4 * se
    assert se < 0.05 * abs(an["kl"][0][0]) + 0.05  # the check has some power


@pytest.mark.parametrize("T,likelihood", [(2, "bernoulli"), (3, "gaussian_learned")])
def test_learned_log_weight_and_mc_elbo_agree_in_expectation(T, likelihood):
    """E[log_weight] = E[-(rec + sum kl_mc)] under the learned prior variance."""
    n = 20_000
    params, x1, _, _, cfg = _make_problem(T, likelihood, False, False, seed=4, batch=1,
                                          prior_variance="learned")
    x = np.repeat(x1, n, axis=0)
    rng = np.random.default_rng(19)
    eps = [rng.normal(size=(n, d)) for d in cfg["latent_dims"]]
    out = ref.forward(params, x, x, eps, **cfg, activation="tanh", kl="mc", beta=1.0)
    diff = out["log_weight"] + out["reconstruction"] + sum(out["kl"])
    se_pair = diff.std(ddof=1) / np.sqrt(n)
    assert abs(diff.mean()) < 4 * se_pair + 1e-12
