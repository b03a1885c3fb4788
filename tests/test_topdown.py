"""Top-down (ladder) inference and free bits: the NumPy reference checked against itself, then the
C core (through hvae.HVAE) checked against the reference (DESIGN.md section 6, issue 14 item 4).

The reference's top-down chain (tests/reference.py) is written from DESIGN.md section 6, not
from csrc/; its hand-derived gradient is checked here by central finite differences of its own
loss, its T = 1 chain against its bottom-up chain, its precision-weighted merge against the
product-of-Gaussians identity and its log_weight against scipy densities.

The C core is then held to it: float64 to 1e-10 over T = 1..4 x likelihood x activation x prior
variance x kl estimator x batch 1 and 7 (loss, every gradient block, per-level KL,
reconstruction, log_weight), float32 to 1e-4, encode; central differences of the C loss; T = 1
top-down equal to bottom-up bit for bit; both KL estimators unbiased over 100 000 draws; free
bits on both sides of the floor (and at it) for both families; bad input at every entry point.
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

C_TOL = 1e-10


def c_model(T, lik, act, kl, pv, *, dtype="float64", inference="top_down", batch=7, seed=0,
            params=None):
    """hvae.HVAE of the ARCH[T] architecture with the reference's random parameters, its data
    and noise (in the model's dtype), and the reference keyword arguments."""
    p64, x, eps, _ = make_problem(T, lik, batch, seed, prior_variance=pv)
    latent, hidden = ARCH[T]
    m = hvae.HVAE(X_DIM, latent, hidden, likelihood=lik, activation=act, kl=kl,
                  prior_variance=pv, inference=inference, dtype=dtype, seed=seed)
    shapes = ref.param_shapes(X_DIM, latent, hidden, lik, prior_variance=pv, inference=inference)
    assert [(k, v.shape) for k, v in m.named_params().items()] == \
        [(k, tuple(s)) for k, s in shapes]
    if params is None:
        params = p64 if inference == "top_down" else \
            np.random.default_rng(seed + 1).normal(0, 0.5, ref.num_params(shapes))
    m.params[:] = params
    kw = dict(ref_kwargs(m), inference=inference)
    return m, x.astype(dtype), [e.astype(dtype) for e in eps], kw


def _as64(m, x, eps):
    return m.params.astype(np.float64), x.astype(np.float64), [e.astype(np.float64) for e in eps]


def assert_matches_reference(m, x, eps, kw, rtol, beta=0.7, free_bits=None):
    """C loss, gradient, terms and log_weight against the reference, relative to rtol."""
    p64, x64, e64 = _as64(m, x, eps)
    want = ref.forward(p64, x64, x64, e64, beta=beta, free_bits=free_bits, **kw)
    want_loss, want_grad = ref.loss_and_grad(p64, x64, x64, e64, beta=beta, free_bits=free_bits,
                                             **kw)
    if free_bits is None:
        loss, grad = m.loss_and_grad(x, eps, beta=beta)
    else:
        loss, grad = m.loss_and_grad(x, eps, beta=beta, free_bits=free_bits)
    terms = m.elbo_terms(x, eps)
    assert grad.dtype == m.params.dtype and grad.shape == m.params.shape
    np.testing.assert_allclose(loss, want_loss, rtol=rtol, err_msg="loss")
    scale = np.abs(want_grad).max()
    names = ref.param_shapes(m.x_dim, m.latent_dims, m.hidden_dims, m.likelihood,
                             prior_variance=kw["prior_variance"], inference=kw["inference"])
    got_named, want_named = ref.unflatten(grad, names), ref.unflatten(want_grad, names)
    for name, _ in names:
        np.testing.assert_allclose(got_named[name], want_named[name], rtol=rtol,
                                   atol=rtol * scale, err_msg=f"grad {name}")
    np.testing.assert_allclose(terms["reconstruction"], want["reconstruction"], rtol=rtol,
                               err_msg="reconstruction")
    assert len(terms["kl"]) == m.n_levels
    for i, (got, exp) in enumerate(zip(terms["kl"], want["kl"])):
        np.testing.assert_allclose(got, exp, rtol=rtol, atol=rtol * np.abs(exp).max(),
                                   err_msg=f"kl level {i + 1}")
    np.testing.assert_allclose(terms["log_weight"], want["log_weight"], rtol=rtol,
                               atol=rtol * np.abs(want["log_weight"]).max(), err_msg="log_weight")
    return want, want_loss, want_grad


GRID = list(itertools.product([1, 2, 3, 4], ref.LIKELIHOODS, ref.ACTIVATIONS,
                              ref.PRIOR_VARIANCES, ref.KL_ESTIMATORS, [1, 7]))


def _grid_id(case):
    T, lik, act, pv, kl, B = case
    return f"T{T}-{lik}-{act}-{pv}-{kl}-B{B}"


@pytest.mark.parametrize("case", GRID, ids=_grid_id)
def test_c_matches_reference_float64(case):
    T, lik, act, pv, kl, B = case
    m, x, eps, kw = c_model(T, lik, act, kl, pv, batch=B, seed=_seed(*case))
    assert_matches_reference(m, x, eps, kw, C_TOL)


@pytest.mark.parametrize("T,lik,act,pv,kl", [
    (1, "bernoulli", "tanh", "learned", "analytic"),
    (2, "gaussian", "relu", "unit", "mc"),
    (3, "gaussian_learned", "leaky_relu", "learned", "analytic"),
    (4, "bernoulli", "tanh", "learned", "mc"),
])
def test_c_matches_reference_float32(T, lik, act, pv, kl):
    m, x, eps, kw = c_model(T, lik, act, kl, pv, dtype="float32", batch=7, seed=_seed(T, lik))
    assert m.params.dtype == np.float32
    assert_matches_reference(m, x, eps, kw, 1e-4)


def test_c_layout_and_defaults():
    m = hvae.HVAE(X_DIM, [3, 2], [[5], [4, 3]], inference="top_down", dtype="float64", seed=0)
    assert m.prior_variance == "learned"  # the default for top-down
    shapes = ref.param_shapes(X_DIM, [3, 2], [[5], [4, 3]], "bernoulli",
                              prior_variance="learned", inference="top_down")
    assert [(k, v.shape) for k, v in m.named_params().items()] == \
        [(k, tuple(s)) for k, s in shapes]
    assert m.n_params == ref.num_params(shapes)
    for v in m.named_params().values():
        assert np.shares_memory(v, m.params)
    bu = hvae.HVAE(X_DIM, [3, 2], [[5], [4, 3]], dtype="float64", seed=0)
    assert bu.prior_variance == "unit"  # bottom-up keeps its default


@pytest.mark.parametrize("T,lik,act,pv,kl", [
    (2, "bernoulli", "tanh", "learned", "analytic"),
    (2, "gaussian", "leaky_relu", "unit", "mc"),
    (3, "gaussian_learned", "tanh", "learned", "mc"),
    (3, "bernoulli", "relu", "unit", "analytic"),
    (4, "gaussian_learned", "leaky_relu", "learned", "analytic"),
])
def test_c_finite_differences(T, lik, act, pv, kl):
    """Central differences of the C loss against the C gradient, every parameter block."""
    m, x, eps, kw = c_model(T, lik, act, kl, pv, batch=5, seed=_seed("fd", T, lik))
    beta = 1.3
    _, grad = m.loss_and_grad(x, eps, beta=beta)
    base = m.params.copy()

    def f(q):
        m.params[:] = q
        return m.loss_and_grad(x, eps, beta=beta)[0]

    fd = _fd_grad(f, base)
    m.params[:] = base
    shapes = ref.param_shapes(X_DIM, m.latent_dims, m.hidden_dims, lik, prior_variance=pv,
                              inference="top_down")
    g = _assert_blocks_match(grad, fd, shapes)
    assert sum(np.any(g[n] != 0) for n, _ in shapes) >= len(shapes) - (2 if act == "relu" else 0)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("lik", ref.LIKELIHOODS)
@pytest.mark.parametrize("act", ref.ACTIVATIONS)
@pytest.mark.parametrize("kl", ref.KL_ESTIMATORS)
def test_c_t1_top_down_is_bottom_up_bit_for_bit(dtype, lik, act, kl):
    td, x, eps, _ = c_model(1, lik, act, kl, "learned", dtype=dtype, seed=_seed(lik, act, kl))
    bu = hvae.HVAE(X_DIM, *ARCH[1], likelihood=lik, activation=act, kl=kl, dtype=dtype, seed=0)
    bu.params[:] = td.params
    for kwargs in (dict(beta=0.7), dict(beta=1.0, free_bits=[0.0]), dict(beta=1.0,
                                                                         free_bits=[1e3])):
        lt, gt = td.loss_and_grad(x, eps, **kwargs)
        lb, gb = bu.loss_and_grad(x, eps, **kwargs)
        assert lt == lb, kwargs
        np.testing.assert_array_equal(gt, gb, err_msg=str(kwargs))
    tt, tb = td.elbo_terms(x, eps), bu.elbo_terms(x, eps)
    np.testing.assert_array_equal(tt["reconstruction"], tb["reconstruction"])
    np.testing.assert_array_equal(tt["kl"][0], tb["kl"][0])
    np.testing.assert_array_equal(tt["log_weight"], tb["log_weight"])


@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize("kl", ref.KL_ESTIMATORS)
@pytest.mark.parametrize("pv", ref.PRIOR_VARIANCES)
def test_c_kl_estimators_unbiased(T, kl, pv):
    """For one x over 100 000 noise draws, mean(rec + sum_i KL_i) = mean(-log_weight) within 4.5
    standard errors of the paired difference; with kl="analytic" this is the claim of DESIGN.md
    section 6 that the closed-form KL at the sampled z_{i+1} is unbiased for top-down."""
    n = 100_000
    m, x, _, kw = c_model(T, "gaussian", "tanh", kl, pv, batch=1, seed=40 + T)
    xs = np.repeat(x, n, axis=0)
    rng = np.random.default_rng(50 + T)
    eps = [rng.standard_normal((n, d)) for d in m.latent_dims]
    t = m.elbo_terms(xs, eps)
    # the C log_weight is the reference's (direct densities) on a slice of the draws
    p64, _, _ = _as64(m, x, eps)
    want = ref.forward(p64, xs[:500], xs[:500], [e[:500] for e in eps], **kw)
    np.testing.assert_allclose(t["log_weight"][:500], want["log_weight"], rtol=1e-10)
    diff = t["reconstruction"] + sum(t["kl"]) + t["log_weight"]
    se = diff.std(ddof=1) / np.sqrt(n)
    assert 1e-4 < se < 0.01, se  # the check has power: a bias of 0.05 nats would show
    assert abs(diff.mean()) < 4.5 * se, (diff.mean(), se)


def _kl_means(m, x, eps):
    return [float(np.mean(k)) for k in m.elbo_terms(x, eps)["kl"]]


@pytest.mark.parametrize("inference", ref.INFERENCES)
@pytest.mark.parametrize("T", [1, 3])
def test_c_free_bits_both_sides_of_the_floor(inference, T):
    """Below the floor: the loss and gradient are those without free bits; above it at level j:
    the loss is mean rec + beta (sum_{i != j} mean KL_i + lambda_j); in every case the gradient
    matches the reference and central differences of the C loss."""
    m, x, eps, kw = c_model(T, "gaussian_learned", "tanh", "analytic", "learned",
                            inference=inference, batch=4, seed=60 + T)
    beta = 0.9
    means = _kl_means(m, x, eps)
    assert min(means) > 0.05
    rec = float(np.mean(m.elbo_terms(x, eps)["reconstruction"]))
    l0, g0 = m.loss_and_grad(x, eps, beta=beta)
    _, g_rec = m.loss_and_grad(x, eps, beta=0.0)
    shapes = ref.param_shapes(X_DIM, m.latent_dims, m.hidden_dims, m.likelihood,
                              prior_variance="learned", inference=inference)
    base = m.params.copy()
    for name, lam, active in _free_bits_setups(means):
        loss, grad = m.loss_and_grad(x, eps, beta=beta, free_bits=lam)
        want = rec + beta * sum(mu if a else la for mu, la, a in zip(means, lam, active))
        np.testing.assert_allclose(loss, want, rtol=1e-12, err_msg=name)
        assert_matches_reference(m, x, eps, kw, C_TOL, beta=beta, free_bits=lam)
        scale = np.abs(g0).max()
        if all(active):
            np.testing.assert_allclose(loss, l0, rtol=1e-12, err_msg=name)
            np.testing.assert_allclose(grad, g0, rtol=1e-12, atol=1e-12 * scale, err_msg=name)
        if not any(active):
            np.testing.assert_allclose(grad, g_rec, rtol=1e-12, atol=1e-12 * scale,
                                       err_msg=name)
        else:
            assert np.abs(grad - g_rec).max() > 1e-3 * scale, name

        def f(q):
            m.params[:] = q
            return m.loss_and_grad(x, eps, beta=beta, free_bits=lam)[0]

        fd = _fd_grad(f, base)
        m.params[:] = base
        _assert_blocks_match(grad, fd, shapes)


@pytest.mark.parametrize("inference", ref.INFERENCES)
def test_c_free_bits_floor_removes_exactly_that_levels_kl(inference):
    """With level j above its floor the gradient is the no-free-bits gradient minus beta times
    the gradient of mean_b KL_j (central differences of the C's own per-example KL terms)."""
    T = 3
    m, x, eps, _ = c_model(T, "bernoulli", "leaky_relu", "mc", "learned", inference=inference,
                           batch=5, seed=70)
    beta = 1.2
    means = _kl_means(m, x, eps)
    _, g0 = m.loss_and_grad(x, eps, beta=beta)
    base = m.params.copy()
    for j in range(T):
        lam = [0.0] * T
        lam[j] = abs(means[j]) + 0.5
        floors = [k > 0 for k in means]
        if not all(floors[i] for i in range(T) if i != j):
            pytest.skip("an mc KL mean <= 0 would sit under a zero floor")
        _, grad = m.loss_and_grad(x, eps, beta=beta, free_bits=lam)

        def kl_j(q):
            m.params[:] = q
            return float(np.mean(m.elbo_terms(x, eps)["kl"][j]))

        dkl = _fd_grad(kl_j, base)
        m.params[:] = base
        want = g0 - beta * dkl
        err = np.linalg.norm(grad - want) / np.linalg.norm(g0)
        assert err < 1e-7, (j, err)
        assert np.linalg.norm(beta * dkl) > 1e-3 * np.linalg.norm(g0)  # the level's KL mattered


@pytest.mark.parametrize("inference", ref.INFERENCES)
def test_c_free_bits_tie_is_floored(inference):
    """mean_b KL_j == lambda_j exactly (batch 1): the level's gradient is zero (strictly greater
    flows); a lambda just below it lets the gradient flow."""
    T = 2
    m, x, eps, kw = c_model(T, "gaussian", "tanh", "analytic", "learned", inference=inference,
                            batch=1, seed=80)
    kls = [float(k[0]) for k in m.elbo_terms(x, eps)["kl"]]
    _, g_tie = m.loss_and_grad(x, eps, free_bits=[kls[0], 0.0])
    _, g_above = m.loss_and_grad(x, eps, free_bits=[kls[0] + 0.5, 0.0])
    _, g_below = m.loss_and_grad(x, eps, free_bits=[kls[0] * (1 - 1e-9), 0.0])
    _, g0 = m.loss_and_grad(x, eps)
    scale = np.abs(g0).max()
    np.testing.assert_allclose(g_tie, g_above, rtol=1e-12, atol=1e-13 * scale)
    np.testing.assert_allclose(g_below, g0, rtol=1e-12, atol=1e-13 * scale)
    assert np.abs(g_tie - g0).max() > 1e-3 * scale


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,words", [
    (dict(inference="bogus"), "inference"),
    (dict(inference="Top_Down"), "inference"),
    (dict(inference=""), "inference"),
    (dict(inference="top_down", hidden_dims=[[], [8]]), "hidden_dims"),
    (dict(inference="top_down", hidden_dims=[[8], []]), "hidden_dims"),
    (dict(inference="top_down", deterministic=True), "deterministic"),
])
def test_c_constructor_refuses(kwargs, words):
    args = dict(x_dim=X_DIM, latent_dims=[3, 2], hidden_dims=[[5], [4]], dtype="float64")
    args.update(kwargs)
    with pytest.raises(ValueError, match=words):
        hvae.HVAE(**args)


BAD_FREE_BITS = [
    ([0.1], ValueError),                 # wrong length (T = 2)
    ([0.1, 0.2, 0.3], ValueError),
    ([0.1, -0.5], ValueError),           # negative
    (-1.0, ValueError),
    ([np.nan, 0.1], ValueError),         # not finite
    (np.nan, ValueError),
    ([0.1, np.inf], ValueError),
    ("a", (TypeError, ValueError)),      # not a number
    ([0.1, "a"], (TypeError, ValueError)),
    ([0.1, None], (TypeError, ValueError)),
    (object(), (TypeError, ValueError)),
]


@pytest.mark.parametrize("inference", ref.INFERENCES)
@pytest.mark.parametrize("bad,exc", BAD_FREE_BITS, ids=lambda v: repr(v)[:20])
def test_c_bad_free_bits(inference, bad, exc):
    m, x, eps, _ = c_model(2, "bernoulli", "tanh", "analytic", "learned", inference=inference,
                           batch=3)
    before = m.params.copy()
    with pytest.raises(exc, match="free_bits"):
        m.loss_and_grad(x, eps, free_bits=bad)
    np.testing.assert_array_equal(m.params, before)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_core_free_bits_minus_inf_is_no_floor(dtype):
    """The binding takes -inf (a level never floored: what the data-parallel step gives a level
    whose whole batch is above its floor); the public API refuses it as negative."""
    m, x, eps, _ = c_model(2, "bernoulli", "tanh", "mc", "learned", batch=5, dtype=dtype)
    g_none, g_inf = np.empty(m.n_params, m.dtype), np.empty(m.n_params, m.dtype)
    loss0, terms0, _ = m._core.forward(m.params, x, None, eps, 0.7, g_none)
    loss1, terms1, _ = m._core.forward(m.params, x, None, eps, 0.7, g_inf,
                                       free_bits=[-np.inf, -np.inf])
    assert loss1 == loss0 and np.array_equal(g_inf, g_none) and np.array_equal(terms1, terms0)
    big = float(np.abs(terms0[1]).max()) * 2 + 1  # level 1 floored, level 2 not
    m._core.forward(m.params, x, None, eps, 0.7, g_inf, free_bits=[big, -np.inf])
    assert not np.array_equal(g_inf, g_none)
    for bad in ([np.inf, 0.0], [0.0, np.nan], [-1.0, 0.0]):
        with pytest.raises(ValueError, match="free_bits"):
            m._core.forward(m.params, x, None, eps, 0.7, g_inf, free_bits=bad)
    with pytest.raises(ValueError, match="free_bits"):
        m.loss_and_grad(x, eps, free_bits=[-np.inf, 0.0])


def test_c_bad_free_bits_in_fit_and_partial_fit():
    m, x, _, _ = c_model(2, "bernoulli", "tanh", "analytic", "learned", batch=8)
    if "free_bits" not in inspect.signature(m.fit).parameters:
        pytest.fail("HVAE.fit has no free_bits argument (issue 14 item 3)")
    before = m.params.copy()
    for bad, exc in BAD_FREE_BITS:
        with pytest.raises(exc, match="free_bits"):
            m.fit(x, epochs=1, batch_size=4, progress=False, free_bits=bad)
        with pytest.raises(exc, match="free_bits"):
            m.partial_fit(x, batch_size=4, free_bits=bad)
    np.testing.assert_array_equal(m.params, before)


def test_c_bad_eps_and_x():
    T = 3
    m, x, eps, _ = c_model(T, "gaussian", "tanh", "mc", "learned", batch=4)
    bad_eps = [
        eps[:-1],                                        # wrong number of arrays
        eps + [eps[0]],
        [eps[0], eps[1][:, :1], eps[2]],                 # wrong width
        [eps[0], eps[1], np.zeros((5, m.latent_dims[2]))],  # wrong batch
        [eps[0].ravel(), eps[1], eps[2]],                # 1-D
        [eps[0], eps[1], eps[2][None]],                  # 3-D
    ]
    entry_points = [lambda e: m.loss_and_grad(x, e), lambda e: m.elbo_terms(x, e),
                    lambda e: m.loss_and_grad(x, e, free_bits=[0.1] * T)]
    for e in bad_eps:
        for call in entry_points:
            with pytest.raises(ValueError, match="eps"):
                call(e)
    with pytest.raises((TypeError, ValueError), match="eps"):
        m.loss_and_grad(x, eps[0])
    xn = x.copy()
    xn[2, 1] = np.nan
    for call in (lambda: m.loss_and_grad(xn, eps), lambda: m.elbo_terms(xn, eps),
                 lambda: m.loss_and_grad(xn, eps, free_bits=[0.1] * T)):
        with pytest.raises(ValueError, match="x"):
            call()
    with pytest.raises(ValueError, match="x"):
        m.loss_and_grad(x[:, :-1], eps)


def test_c_nan_x_every_entry_point():
    m, x, _, _ = c_model(2, "gaussian", "tanh", "analytic", "learned", batch=4)
    xn = x.copy()
    xn[1, 2] = np.nan
    calls = {
        "encode": lambda a: m.encode(a), "transform": lambda a: m.transform(a),
        "reconstruct": lambda a: m.reconstruct(a), "elbo": lambda a: m.elbo(a, k=2),
        "log_likelihood": lambda a: m.log_likelihood(a, k=3), "score": lambda a: m.score(a, k=3),
        "fit": lambda a: m.fit(a, epochs=1, batch_size=2, progress=False, free_bits=0.1),
        "partial_fit": lambda a: m.partial_fit(a, batch_size=2),
        "interpolate": lambda a: m.interpolate(a[1:2], a[:1]),
        "traverse": lambda a: m.traverse(a[1:2], 1, 0, [0.0, 1.0]),
    }
    before = m.params.copy()
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"^[xX]\b"):
            call(xn)
    np.testing.assert_array_equal(m.params, before)


# ---------------------------------------------------------------------------
# encode: q's parameters level by level
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("T,pv", [(1, "learned"), (2, "unit"), (3, "learned"), (4, "learned")])
def test_c_encode_matches_reference(T, pv):
    """encode(x): (mu_q_i, log var_q_i) with z_{i+1} at its posterior mean (DESIGN.md section 6),
    i.e. the reference at eps = 0; the core's encode with noise gives the reference's z."""
    m, x, eps, kw = c_model(T, "bernoulli", "leaky_relu", "analytic", pv, batch=5, seed=90 + T)
    p64, x64, e64 = _as64(m, x, eps)
    mean = ref.forward(p64, x64, x64, [np.zeros_like(e) for e in e64], **kw)
    for i, (mu, lv) in enumerate(m.encode(x)):
        np.testing.assert_allclose(mu, mean["mu"][i], rtol=C_TOL, atol=C_TOL, err_msg=f"mu {i}")
        np.testing.assert_allclose(lv, mean["logvar"][i], rtol=C_TOL, atol=C_TOL,
                                   err_msg=f"logvar {i}")
    sampled = ref.forward(p64, x64, x64, e64, **kw)
    mulv, z = m._core.encode(m.params, x, eps)
    for i in range(T):
        d = m.latent_dims[i]
        np.testing.assert_allclose(mulv[i][:, :d], sampled["mu"][i], rtol=C_TOL, atol=C_TOL)
        np.testing.assert_allclose(mulv[i][:, d:], sampled["logvar"][i], rtol=C_TOL, atol=C_TOL)
        np.testing.assert_allclose(z[i], sampled["z"][i], rtol=C_TOL, atol=C_TOL)
