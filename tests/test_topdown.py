"""Top-down (ladder) inference and free bits: the NumPy reference checked against itself, then the
C core (through hvae.HVAE) checked against the reference (DESIGN.md section 6, issue 14 item 4).

The reference's top-down chain (tests/reference.py) is written from DESIGN.md section 6, not
from csrc/; its hand-derived gradient is checked here by central finite differences of its own
loss, its T = 1 chain against its bottom-up chain, its precision-weighted merge against the
product-of-Gaussians identity and its log_weight against scipy densities.
"""

import inspect
import itertools

import numpy as np
import pytest

import hvae
import reference as ref
from test_core import ref_kwargs
from test_reference import _assert_blocks_match, _fd_grad

LOG2PI = np.log(2 * np.pi)
X_DIM = 6
# Small top-down architectures: every level has a hidden layer, and the width of d_{i-1} (the
# last hidden width of level i-1) differs from dim z_{i-1}, so a layout that feeds z_{i-1} (or
# d_{i-1} of the wrong level) into encoder i cannot pass by accident.
ARCH = {
    1: ([3], [[4, 3]]),
    2: ([3, 2], [[5], [4, 3]]),
    3: ([3, 2, 2], [[4], [5, 3], [4]]),
    4: ([3, 2, 2, 1], [[4], [5, 3], [4, 3], [2]]),
}


def make_problem(T, likelihood, batch, seed, *, prior_variance="learned", scale=0.5):
    """Random top-down parameters (flat, float64), data suiting the likelihood, and noise."""
    latent, hidden = ARCH[T]
    rng = np.random.default_rng(seed)
    shapes = ref.param_shapes(X_DIM, latent, hidden, likelihood, prior_variance=prior_variance,
                              inference="top_down")
    params = rng.normal(0.0, scale, ref.num_params(shapes))
    if likelihood == "bernoulli":
        x = (rng.random((batch, X_DIM)) < 0.5).astype(np.float64)
    else:
        x = rng.normal(size=(batch, X_DIM))
    eps = [rng.standard_normal((batch, d)) for d in latent]
    cfg = dict(x_dim=X_DIM, latent_dims=latent, hidden_dims=hidden, likelihood=likelihood,
               prior_variance=prior_variance, inference="top_down")
    return params, x, eps, cfg


def _seed(*parts):
    return sum(ord(ch) * (k + 1) for k, ch in enumerate("-".join(map(str, parts)))) % 100_003


# ===========================================================================
# The reference against itself
# ===========================================================================

def test_ref_param_shapes_top_down():
    shapes = ref.param_shapes(6, [3, 2], [[5], [4, 3]], "gaussian_learned",
                              prior_variance="learned", inference="top_down")
    assert shapes == [
        ("enc1.0.weight", (5, 6)), ("enc1.0.bias", (5,)),
        ("enc1.1.weight", (6, 5)), ("enc1.1.bias", (6,)),
        ("enc2.0.weight", (4, 5)), ("enc2.0.bias", (4,)),      # reads d_1 (width 5), not z_1
        ("enc2.1.weight", (3, 4)), ("enc2.1.bias", (3,)),
        ("enc2.2.weight", (4, 3)), ("enc2.2.bias", (4,)),
        ("dec1.0.weight", (5, 3)), ("dec1.0.bias", (5,)),
        ("dec1.1.weight", (12, 5)), ("dec1.1.bias", (12,)),
        ("dec2.0.weight", (3, 2)), ("dec2.0.bias", (3,)),
        ("dec2.1.weight", (4, 3)), ("dec2.1.bias", (4,)),
        ("dec2.2.weight", (6, 4)), ("dec2.2.bias", (6,)),      # [m_1, s_1]
    ]
    unit = dict(ref.param_shapes(6, [3, 2], [[5], [4, 3]], "gaussian_learned",
                                 inference="top_down"))
    assert unit["dec2.2.weight"] == (3, 4)
    # the decoders are those of the bottom-up model; T = 1 is the bottom-up layout
    bu = dict(ref.param_shapes(6, [3, 2], [[5], [4, 3]], "gaussian_learned",
                               prior_variance="learned"))
    assert {k: v for k, v in bu.items() if k.startswith("dec")} == \
        {k: v for k, v in dict(shapes).items() if k.startswith("dec")}
    assert ref.param_shapes(6, [3], [[4, 2]], "bernoulli", inference="top_down") == \
        ref.param_shapes(6, [3], [[4, 2]], "bernoulli")


def test_ref_refusals():
    with pytest.raises(ValueError, match="hidden_dims"):
        ref.param_shapes(6, [3, 2], [[], [8]], "bernoulli", inference="top_down")
    with pytest.raises(ValueError, match="hidden_dims"):
        ref.param_shapes(6, [3, 2], [[8], []], "bernoulli", inference="top_down")
    with pytest.raises(ValueError, match="inference"):
        ref.param_shapes(6, [3], [[4]], "bernoulli", inference="bogus")
    params, x, eps, cfg = make_problem(2, "bernoulli", 3, 0)
    kw = dict(cfg, activation="tanh", kl="analytic")
    with pytest.raises(ValueError, match="deterministic"):
        ref.forward(params, x, x, None, **kw, deterministic=True)
    with pytest.raises(ValueError, match="deterministic"):
        ref.loss_and_grad(params, x, x, eps, **kw, deterministic=True)
    with pytest.raises(ValueError, match="eps"):
        ref.forward(params, x, x, eps[:1], **kw)
    for bad in ([0.1], [0.1, -0.2], [0.1, np.nan], ["a", 0.1], "ab", [0.1, np.inf]):
        with pytest.raises((ValueError, TypeError), match="free_bits"):
            ref.loss_and_grad(params, x, x, eps, **kw, free_bits=bad)


REF_GRAD_CASES = [
    (T, lik, ref.ACTIVATIONS[n % 3], kl, pv)
    for n, (T, lik, kl, pv) in enumerate(itertools.product(
        [1, 2, 3, 4], ref.LIKELIHOODS, ref.KL_ESTIMATORS, ref.PRIOR_VARIANCES))
    if not (T == 1 and pv == "unit")
]


@pytest.mark.parametrize("T,lik,act,kl,pv", REF_GRAD_CASES)
def test_ref_gradient_matches_finite_differences(T, lik, act, kl, pv):
    params, x, eps, cfg = make_problem(T, lik, 3, _seed(T, lik, act, kl, pv), prior_variance=pv)
    kw = dict(cfg, activation=act, kl=kl, beta=0.7)
    loss, grad = ref.loss_and_grad(params, x, x, eps, **kw)
    out = ref.forward(params, x, x, eps, **kw)
    assert loss == out["loss"]
    np.testing.assert_allclose(loss, np.mean(out["reconstruction"] + 0.7 * sum(out["kl"])),
                               rtol=1e-14)
    fd = _fd_grad(lambda q: ref.forward(q, x, x, eps, **kw)["loss"], params)
    shapes = ref.param_shapes(X_DIM, cfg["latent_dims"], cfg["hidden_dims"], lik,
                              prior_variance=pv, inference="top_down")
    g = _assert_blocks_match(grad, fd, shapes)
    for name, _ in shapes:  # every block is really exercised (ReLU may kill a whole layer)
        assert act == "relu" or np.any(g[name] != 0.0), name


@pytest.mark.parametrize("lik", ref.LIKELIHOODS)
@pytest.mark.parametrize("act", ref.ACTIVATIONS)
@pytest.mark.parametrize("kl", ref.KL_ESTIMATORS)
def test_ref_t1_top_down_is_bottom_up(lik, act, kl):
    params, x, eps, cfg = make_problem(1, lik, 4, _seed(lik, act, kl))
    kw = dict(cfg, activation=act, kl=kl, beta=0.8)
    kw.pop("inference")
    td = ref.forward(params, x, x, eps, **kw, inference="top_down")
    bu = ref.forward(params, x, x, eps, **kw)
    assert td["loss"] == bu["loss"]
    for key in ("reconstruction", "log_weight", "x_params"):
        np.testing.assert_array_equal(td[key], bu[key])
    for key in ("kl", "mu", "logvar", "z"):
        np.testing.assert_array_equal(td[key][0], bu[key][0])
    ltd, gtd = ref.loss_and_grad(params, x, x, eps, **kw, inference="top_down")
    lbu, gbu = ref.loss_and_grad(params, x, x, eps, **kw)
    assert ltd == lbu
    np.testing.assert_array_equal(gtd, gbu)


def test_ref_merge_is_the_product_of_gaussians():
    """N(z; mu^, e^lv^) N(z; m, e^s) = N(mu^; m, e^lv^ + e^s) N(z; mu_q, var_q) at any z, and the
    merge's z is mu_q + sqrt(var_q) eps; checked per dimension with scipy densities."""
    stats = pytest.importorskip("scipy.stats")
    params, x, eps, cfg = make_problem(3, "gaussian", 5, 3)
    out = ref.forward(params, x, x, eps, **cfg, activation="tanh", kl="analytic")
    for i in range(2):
        mh, lh = out["mu_hat"][i], out["logvar_hat"][i]
        m, s = out["prior_mean"][i], out["prior_logvar"][i]
        mq, lq, z = out["mu"][i], out["logvar"][i], out["z"][i]
        assert np.abs(s).max() > 0.1 and np.abs(mq - mh).max() > 0.05
        for zz in (z, z + 0.7, mh - 1.3):
            left = (stats.norm.logpdf(zz, mh, np.exp(0.5 * lh))
                    + stats.norm.logpdf(zz, m, np.exp(0.5 * s)))
            right = (stats.norm.logpdf(mh, m, np.sqrt(np.exp(lh) + np.exp(s)))
                     + stats.norm.logpdf(zz, mq, np.exp(0.5 * lq)))
            np.testing.assert_allclose(left, right, rtol=1e-11, atol=1e-11)
        np.testing.assert_allclose(z, mq + np.exp(0.5 * lq) * eps[i], rtol=1e-14, atol=1e-14)
    np.testing.assert_array_equal(out["mu"][2], out["mu_hat"][2])


@pytest.mark.parametrize("kl", ref.KL_ESTIMATORS)
def test_ref_terms_from_scipy_densities(kl):
    """log_weight, the analytic KL (closed form typed in) and the mc KL, level by level."""
    stats = pytest.importorskip("scipy.stats")
    params, x, eps, cfg = make_problem(3, "bernoulli", 5, 14)
    out = ref.forward(params, x, x, eps, **cfg, activation="relu", kl=kl)
    z, mq, lq = out["z"], out["mu"], out["logvar"]
    m, s = out["prior_mean"], out["prior_logvar"]
    l = out["x_params"]
    log_px = np.sum(stats.bernoulli.logpmf(x, 1 / (1 + np.exp(-l))), axis=1)
    np.testing.assert_allclose(-out["reconstruction"], log_px, rtol=1e-12)
    log_p = log_px + stats.norm.logpdf(z[2]).sum(1)
    log_q = 0.0
    for i in range(3):
        log_q = log_q + stats.norm.logpdf(z[i], mq[i], np.exp(0.5 * lq[i])).sum(1)
        if i < 2:
            log_p = log_p + stats.norm.logpdf(z[i], m[i], np.exp(0.5 * s[i])).sum(1)
    np.testing.assert_allclose(out["log_weight"], log_p - log_q, rtol=1e-12, atol=1e-12)
    top = 0.5 * np.sum(mq[2] ** 2 + np.exp(lq[2]) - 1 - lq[2], axis=1)
    np.testing.assert_allclose(out["kl"][2], top, rtol=1e-12)
    for i in range(2):
        vq, vp = np.exp(lq[i]), np.exp(s[i])
        if kl == "analytic":
            want = np.sum(0.5 * np.log(vp / vq) + (vq + (mq[i] - m[i]) ** 2) / (2 * vp) - 0.5,
                          axis=1)
        else:
            entropy = np.sum(0.5 * np.log(2 * np.pi * np.e * vq), axis=1)
            want = -stats.norm.logpdf(z[i], m[i], np.sqrt(vp)).sum(1) - entropy
        np.testing.assert_allclose(out["kl"][i], want, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize("kl", ref.KL_ESTIMATORS)
def test_ref_kl_unbiased(T, kl):
    """E[rec + sum KL] = E[-log_weight] for one x (the reference alone; 40k draws)."""
    n = 40_000
    params, x1, _, cfg = make_problem(T, "gaussian", 1, 5 + T)
    x = np.repeat(x1, n, axis=0)
    rng = np.random.default_rng(7)
    eps = [rng.standard_normal((n, d)) for d in cfg["latent_dims"]]
    out = ref.forward(params, x, x, eps, **cfg, activation="tanh", kl=kl)
    diff = out["reconstruction"] + sum(out["kl"]) + out["log_weight"]
    se = diff.std(ddof=1) / np.sqrt(n)
    assert se > 1e-3 and abs(diff.mean()) < 4.5 * se, (diff.mean(), se)


def _free_bits_setups(kl_means):
    """(name, free_bits, active) triples around the floor for levels with these mean KLs."""
    T = len(kl_means)
    yield "below", [0.5 * k for k in kl_means], [True] * T
    for j in range(T):
        lam = [0.0] * T
        lam[j] = kl_means[j] + 0.3
        yield f"above{j + 1}", lam, [i != j for i in range(T)]
    yield "all_above", [k + 0.2 for k in kl_means], [False] * T


@pytest.mark.parametrize("inference", ref.INFERENCES)
@pytest.mark.parametrize("T", [1, 3])
def test_ref_free_bits_finite_differences(inference, T):
    """Both sides of the floor: the loss is mean rec + beta sum_i max(lambda_i, mean KL_i), the
    gradient agrees with central differences, and is the no-free-bits gradient below the floor."""
    params, x, eps, cfg = make_problem(T, "gaussian_learned", 4, 21 + T)
    if inference == "bottom_up":
        cfg["inference"] = "bottom_up"
        shapes = ref.param_shapes(X_DIM, cfg["latent_dims"], cfg["hidden_dims"],
                                  "gaussian_learned", prior_variance="learned")
        params = np.random.default_rng(3).normal(0, 0.5, ref.num_params(shapes))
    else:
        shapes = ref.param_shapes(X_DIM, cfg["latent_dims"], cfg["hidden_dims"],
                                  "gaussian_learned", prior_variance="learned",
                                  inference="top_down")
    beta = 0.9
    kw = dict(cfg, activation="tanh", kl="analytic", beta=beta)
    plain = ref.forward(params, x, x, eps, **kw)
    means = [float(np.mean(k)) for k in plain["kl"]]
    assert min(means) > 0.05
    l0, g0 = ref.loss_and_grad(params, x, x, eps, **kw)
    rec = float(np.mean(plain["reconstruction"]))
    for name, lam, active in _free_bits_setups(means):
        loss, grad = ref.loss_and_grad(params, x, x, eps, **kw, free_bits=lam)
        out = ref.forward(params, x, x, eps, **kw, free_bits=lam)
        assert loss == out["loss"], name
        for a, b in zip(out["kl"], plain["kl"]):  # terms unaffected
            np.testing.assert_array_equal(a, b)
        want = rec + beta * sum(m if a else l for m, l, a in zip(means, lam, active))
        np.testing.assert_allclose(loss, want, rtol=1e-13, err_msg=name)
        fd = _fd_grad(lambda q: ref.forward(q, x, x, eps, **kw, free_bits=lam)["loss"], params)
        _assert_blocks_match(grad, fd, shapes)
        if all(active):
            np.testing.assert_allclose(grad, g0, rtol=1e-13, atol=1e-15)
            np.testing.assert_allclose(loss, l0, rtol=1e-13)
        if not any(active):
            _, g_rec = ref.loss_and_grad(params, x, x, eps, **dict(kw, beta=0.0))
            np.testing.assert_allclose(grad, g_rec, rtol=1e-13, atol=1e-15)
        if not all(active):
            assert np.abs(grad - g0).max() > 1e-3  # the floor really changes the gradient


# ===========================================================================
# The C core against the reference
# ===========================================================================

try:
    _HAS_TOPDOWN = "inference" in inspect.signature(hvae.HVAE.__init__).parameters
except (TypeError, ValueError):  # pragma: no cover
    _HAS_TOPDOWN = False
needs_c = pytest.mark.skipif(not _HAS_TOPDOWN, reason="hvae.HVAE has no inference= yet")
