"""The C core against the independent NumPy reference, finite differences, and the seed's formulas."""
import itertools

import numpy as np
import pytest

import hvae
from hvae import _core

import reference as ref

LOG2PI = np.log(2 * np.pi)

# small architectures per T: latent dims and hidden widths that differ everywhere
ARCH = {
    1: ([3], [[5, 4]]),
    2: ([4, 3], [[6], [5, 4]]),
    3: ([4, 3, 2], [[6, 5], [], [3]]),
    4: ([5, 4, 3, 2], [[7], [6], [5], [4, 3]]),
}
X_DIM = 6


def make_case(T, likelihood, activation, kl, deterministic, batch, dtype="float64", seed=0,
              prior_variance="unit"):
    """A model with moderately scaled random parameters, data suiting the likelihood, noise."""
    latent, hidden = ARCH[T]
    m = hvae.HVAE(X_DIM, latent, hidden, likelihood=likelihood, activation=activation, kl=kl,
                  dtype=dtype, seed=seed, deterministic=deterministic,
                  prior_variance=prior_variance)
    rng = np.random.default_rng(seed + 1)
    m.params[:] = rng.normal(0, 0.5, m.n_params)
    if likelihood == "bernoulli":
        x = (rng.random((batch, X_DIM)) < 0.5).astype(dtype)
        target = (rng.random((batch, X_DIM)) < 0.5).astype(dtype)
    else:
        x = rng.normal(size=(batch, X_DIM)).astype(dtype)
        target = rng.normal(size=(batch, X_DIM)).astype(dtype)
    eps = [rng.standard_normal((batch, d)).astype(dtype) for d in latent]
    return m, x, target, eps


def ref_kwargs(m):
    return dict(x_dim=m.x_dim, latent_dims=m.latent_dims, hidden_dims=m.hidden_dims,
                likelihood=m.likelihood, activation=m.activation, kl=m.kl,
                deterministic=m.deterministic, prior_variance=m.prior_variance)


MODES = [("analytic", False), ("mc", False), ("analytic", True)]  # (kl, deterministic)
ALL = (list(itertools.product([1, 2, 3, 4], ref.LIKELIHOODS, ref.ACTIVATIONS, MODES, [1, 7],
                               ["unit"]))
       + list(itertools.product([2, 3, 4], ref.LIKELIHOODS, ["tanh", "relu"], MODES, [1, 7],
                                ["learned"])))


def _ids(case):
    T, lik, act, (kl, det), B, pv = case
    return f"T{T}-{lik}-{act}-{'ae' if det else kl}-B{B}" + ("-learnedvar" if pv != "unit" else "")


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-4)])
@pytest.mark.parametrize("case", ALL, ids=_ids)
def test_matches_reference(case, dtype, rtol):
    T, lik, act, (kl, det), B, pv = case
    m, x, target, eps = make_case(T, lik, act, kl, det, B, dtype, prior_variance=pv)
    beta = 0.7
    p64 = m.params.astype(np.float64)
    x64, t64, e64 = x.astype(np.float64), target.astype(np.float64), [e.astype(np.float64) for e in eps]
    want = ref.forward(p64, x64, t64, e64, beta=beta, **ref_kwargs(m))
    want_loss, want_grad = ref.loss_and_grad(p64, x64, t64, e64, beta=beta, **ref_kwargs(m))

    loss, grad = m.loss_and_grad(x, eps, target=target, beta=beta)
    terms = m.elbo_terms(x, eps, target=target)
    assert grad.dtype == np.dtype(dtype)
    scale = np.abs(want_grad).max()
    np.testing.assert_allclose(loss, want_loss, rtol=rtol)
    np.testing.assert_allclose(grad, want_grad, rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(terms["reconstruction"], want["reconstruction"], rtol=rtol)
    for got, exp in zip(terms["kl"], want["kl"]):
        np.testing.assert_allclose(got, exp, rtol=rtol, atol=rtol * np.abs(exp).max() + 1e-300)
    if det:
        assert terms["log_weight"] is None
    else:
        np.testing.assert_allclose(terms["log_weight"], want["log_weight"], rtol=rtol)
    # the encoder chain alone gives the reference's mu, logvar, z
    mulv, z = m._core.encode(m.params, x, None if det else eps)
    for i in range(T):
        d = m.latent_dims[i]
        np.testing.assert_allclose(mulv[i][:, :d], want["mu"][i], rtol=rtol, atol=rtol)
        np.testing.assert_allclose(mulv[i][:, d:], want["logvar"][i], rtol=rtol, atol=rtol)
        np.testing.assert_allclose(z[i], want["z"][i], rtol=rtol, atol=rtol)


@pytest.mark.parametrize("T,lik,act,kl,det,pv", [
    (1, "bernoulli", "tanh", "analytic", False, "unit"),
    (2, "gaussian", "relu", "mc", False, "unit"),
    (3, "gaussian_learned", "leaky_relu", "analytic", False, "unit"),
    (3, "bernoulli", "tanh", "mc", False, "unit"),
    (4, "gaussian_learned", "tanh", "mc", False, "unit"),
    (2, "gaussian", "tanh", "analytic", True, "unit"),
    (2, "bernoulli", "tanh", "analytic", False, "learned"),
    (3, "gaussian_learned", "relu", "mc", False, "learned"),
    (3, "gaussian", "tanh", "analytic", True, "learned"),
])
def test_finite_differences(T, lik, act, kl, det, pv):
    """Central differences of the C loss against the C gradient, every parameter block."""
    m, x, target, eps = make_case(T, lik, act, kl, det, 5, prior_variance=pv)
    beta = 1.3
    _, grad = m.loss_and_grad(x, eps, target=target, beta=beta)
    h = 1e-6
    base = m.params.copy()
    fd = np.empty_like(base)
    for k in range(m.n_params):
        m.params[k] = base[k] + h
        up = m.loss_and_grad(x, eps, target=target, beta=beta)[0]
        m.params[k] = base[k] - h
        down = m.loss_and_grad(x, eps, target=target, beta=beta)[0]
        m.params[k] = base[k]
        fd[k] = (up - down) / (2 * h)
    for name, offset, shape in m._core.param_table():
        n = int(np.prod(shape))
        g, f = grad[offset:offset + n], fd[offset:offset + n]
        err = np.linalg.norm(g - f) / max(np.linalg.norm(g), np.linalg.norm(f), 1e-3)
        assert err < 1e-6, (name, err)
    # the blocks that matter are really touched (nonzero)
    touched = [name for name, offset, shape in m._core.param_table()
               if np.any(grad[offset:offset + int(np.prod(shape))] != 0)]
    assert len(touched) >= len(m._core.param_table()) - (2 * T if det else 0)


def _seed_hvae_loss(x, xhat, mus, logvars, zhats):
    """The seed's hierarchical VAE loss, typed in from its derivation: squared error plus, per level,
    sum(mu^2 + sigma^2 - log sigma^2 - 1) against N(0, I) at the top and
    sum((mu - zhat)^2 + sigma^2 - log sigma^2 - 1) against N(zhat, I) below, per example."""
    T = len(mus)
    L = np.sum((x - xhat) ** 2, axis=1)
    for i in range(T):
        var = np.exp(logvars[i])
        prior_mean = zhats[i] if i < T - 1 else 0.0
        L = L + np.sum((mus[i] - prior_mean) ** 2 + var - logvars[i] - 1, axis=1)
    return L


@pytest.mark.parametrize("T", [1, 2, 3, 4])
def test_seed_formula(T):
    """L_seed = 2 * loss - D log(2 pi), per example, for likelihood='gaussian', kl='analytic'."""
    m, x, _, eps = make_case(T, "gaussian", "tanh", "analytic", False, 9)
    want = ref.forward(m.params, x, x, eps, **ref_kwargs(m))
    zhats = []
    for i in range(1, T):  # zhat_i = dec_{i+1}(z_{i+1}), through the C decoder chain
        xp, zs = m._core.decode(m.params, want["z"][i], level=i + 1)
        zhats.append(zs[-1] if zs else xp)
    xhat, _ = m._core.decode(m.params, want["z"][0], level=1)
    L = _seed_hvae_loss(x, xhat, want["mu"], want["logvar"], zhats)
    terms = m.elbo_terms(x, eps)
    per_example = terms["reconstruction"] + sum(terms["kl"])
    np.testing.assert_allclose(L, 2 * per_example - X_DIM * LOG2PI, rtol=1e-12)


@pytest.mark.parametrize("pv", ["unit", "learned"])
def test_decode_samples_the_prior_conditionals(pv):
    """decode draws z_{i-1} = mean + temperature * std * eps from p(z_{i-1} | z_i): the
    reference's prior means and (learned) log-variances at the same z_i."""
    m, x, _, eps = make_case(3, "bernoulli", "tanh", "mc", False, 4, prior_variance=pv)
    want = ref.forward(m.params, x, x, eps, **ref_kwargs(m))
    t = 0.7
    for i in range(1, 3):  # z_i (1-based) from the reference's sample of z_{i+1}
        noise = [np.random.default_rng(i).standard_normal((4, d)) for d in m.latent_dims[:i]]
        _, zs = m._core.decode(m.params, want["z"][i], level=i + 1, eps=noise, temperature=t)
        sd = 1.0 if pv == "unit" else np.exp(0.5 * want["prior_logvar"][i - 1])
        np.testing.assert_allclose(zs[-1], want["prior_mean"][i - 1] + t * sd * noise[-1],
                                   rtol=1e-12, atol=1e-12)
        _, means = m._core.decode(m.params, want["z"][i], level=i + 1)
        np.testing.assert_allclose(means[-1], want["prior_mean"][i - 1], rtol=1e-12, atol=1e-12)


def test_single_level_matches_textbook_vae():
    """T = 1: MSE/2 + KL and BCE + KL, the single-level VAE losses of the other seeds."""
    for lik in ("gaussian", "bernoulli"):
        m, x, _, eps = make_case(1, lik, "relu", "analytic", False, 6)
        mulv, z = m._core.encode(m.params, x, eps)
        mu, lv = mulv[0][:, :3], mulv[0][:, 3:]
        out, _ = m._core.decode(m.params, z[0], level=1)
        kl = -0.5 * np.sum(1 + lv - mu ** 2 - np.exp(lv), axis=1)
        if lik == "gaussian":
            rec = 0.5 * np.sum((x - out) ** 2, axis=1) + 0.5 * X_DIM * LOG2PI
        else:
            p = 1 / (1 + np.exp(-out))
            rec = -np.sum(x * np.log(p) + (1 - x) * np.log(1 - p), axis=1)  # BCE
        loss, _ = m.loss_and_grad(x, eps)
        np.testing.assert_allclose(loss, np.mean(rec + kl), rtol=1e-12)


def test_autoencoder_is_the_seed_autoencoder():
    """deterministic, T = 1, gaussian: 0.5 * squared error + constant; no noise used."""
    m, x, _, _ = make_case(1, "gaussian", "tanh", "analytic", True, 5)
    mulv, _ = m._core.encode(m.params, x)
    out, _ = m._core.decode(m.params, mulv[0][:, :3], level=1)
    loss, _ = m.loss_and_grad(x)
    np.testing.assert_allclose(loss, np.mean(0.5 * np.sum((x - out) ** 2, 1)) + 0.5 * X_DIM * LOG2PI)
    terms = m.elbo_terms(x)
    assert np.all(terms["kl"][0] == 0)


def test_denoising_target():
    """Corrupted input, clean target: the likelihood scores the target, the encoder sees the input."""
    m, x, target, eps = make_case(2, "bernoulli", "tanh", "mc", False, 4)
    a = m.elbo_terms(x, eps, target=target)
    b = m.elbo_terms(x, eps)
    np.testing.assert_array_equal(a["kl"][0], b["kl"][0])
    assert not np.allclose(a["reconstruction"], b["reconstruction"])


def _direct_log_weight(m, x, eps):
    """log p(x, z) - log q(z|x) from the densities (scipy.stats), not from the core's terms."""
    from scipy import stats
    want = ref.forward(m.params, x, x, eps, **ref_kwargs(m))
    T = m.n_levels
    lp = -want["reconstruction"] + stats.norm.logpdf(want["z"][-1]).sum(1)
    lq = 0.0
    for i in range(T):
        z, mu, sd = want["z"][i], want["mu"][i], np.exp(0.5 * want["logvar"][i])
        lq = lq + stats.norm.logpdf(z, mu, sd).sum(1)
        if i < T - 1:
            zhat, _ = m._core.decode(m.params, want["z"][i + 1], level=i + 2)
            zhat = _[-1] if _ else zhat
            lp = lp + stats.norm.logpdf(z, zhat, 1.0).sum(1)
    return lp - lq


def _paired_gap(m, x, n, seed):
    """(estimate - direct log weight) over n noise draws for one example: its mean and SE."""
    xs = np.repeat(x[:1], n, axis=0)
    rng = np.random.default_rng(seed)
    eps = [rng.standard_normal((n, d)) for d in m.latent_dims]
    direct = _direct_log_weight(m, xs, eps)
    t = m.elbo_terms(xs, eps)
    np.testing.assert_allclose(t["log_weight"], direct, rtol=1e-9)
    gap = -(t["reconstruction"] + sum(t["kl"])) - direct  # paired: same samples
    return gap.mean(), gap.std() / np.sqrt(n)


@pytest.mark.parametrize("T", [1, 2, 3])
def test_mc_estimator_is_unbiased(T):
    """E[-(rec + sum kl_mc)] = E[log p(x,z) - log q(z|x)] within 4 standard errors."""
    m, x, _, _ = make_case(T, "gaussian", "tanh", "mc", False, 1, seed=3)
    mean, se = _paired_gap(m, x, 20000, seed=11)
    assert se > 0 and abs(mean) < 4 * se, (mean, se)


def test_analytic_estimator_is_unbiased_for_one_level():
    m, x, _, _ = make_case(1, "bernoulli", "tanh", "analytic", False, 1, seed=4)
    mean, se = _paired_gap(m, x, 20000, seed=12)
    assert se > 0 and abs(mean) < 4 * se, (mean, se)


def test_analytic_estimator_is_biased_for_two_levels():
    """A chain where z_2 copies z_1 and zhat_1 = z_2: the analytic KL(q(z_1|x) || N(zhat_1, I))
    sees ||mu_1 - z_1||^2 + var while the true cross term sees ||z_1 - zhat_1||^2 ~ 0, so the
    analytic negative ELBO overstates the true one by about d_1 nats (here 3)."""
    d = 3
    m = hvae.HVAE(X_DIM, [d, d], [[], []], likelihood="gaussian", kl="analytic", dtype="float64",
                  seed=0)
    p = m.named_params()
    p["enc1.0.weight"][:] = 0
    p["enc1.0.bias"][:] = 0                      # q(z_1|x) = N(0, I)
    p["enc2.0.weight"][:] = np.vstack([np.eye(d), np.zeros((d, d))])
    p["enc2.0.bias"][:] = np.r_[np.zeros(d), -12 * np.ones(d)]  # z_2 = z_1 + tiny noise
    p["dec2.0.weight"][:] = np.eye(d)
    p["dec2.0.bias"][:] = 0                      # zhat_1 = z_2
    x = np.random.default_rng(0).normal(size=(1, X_DIM))
    mean, se = _paired_gap(m, x, 20000, seed=13)
    assert abs(mean) > 8 * se, (mean, se)
    assert abs(mean + d) < 0.1, mean
    # the same model with the unbiased estimator agrees with the densities
    m_mc = hvae.HVAE(X_DIM, [d, d], [[], []], likelihood="gaussian", kl="mc", dtype="float64")
    m_mc.params[:] = m.params
    mean, se = _paired_gap(m_mc, x, 20000, seed=13)
    assert abs(mean) < 4 * se + 1e-12, (mean, se)


def test_adam_update_matches_formula():
    rng = np.random.default_rng(0)
    for dtype in ("float32", "float64"):
        p, g = rng.normal(size=50).astype(dtype), rng.normal(size=50).astype(dtype)
        m1, m2 = np.zeros(50, dtype), np.zeros(50, dtype)
        p0 = p.copy()
        wm, wv, wp = np.zeros(50), np.zeros(50), p0.astype(np.float64)
        for t in (1, 2, 3):
            _core.adam_update(p, m1, m2, g, t, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8)
            wm = 0.9 * wm + 0.1 * g
            wv = 0.999 * wv + 0.001 * g.astype(np.float64) ** 2
            wp = wp - 0.01 * (wm / (1 - 0.9 ** t)) / (np.sqrt(wv / (1 - 0.999 ** t)) + 1e-8)
        np.testing.assert_allclose(p, wp, rtol=1e-5 if dtype == "float32" else 1e-12)


def test_named_params_layout_and_init():
    m = hvae.HVAE(784, [100, 50], seed=0, init="torch")
    named = m.named_params()
    shapes = ref.param_shapes(784, [100, 50], m.hidden_dims, "bernoulli")
    assert [(k, v.shape) for k, v in named.items()] == [(k, tuple(s)) for k, s in shapes]
    assert m.hidden_dims == [[200, 200], [100, 100]]
    for name, v in named.items():
        assert np.shares_memory(v, m.params)
        fan_in = named[name.replace("bias", "weight")].shape[1]
        assert np.abs(v).max() <= 1 / np.sqrt(fan_in)
        assert np.abs(v).max() > 0.9 / np.sqrt(fan_in)
    assert m.params.flags.c_contiguous and m.params.ndim == 1
    assert np.array_equal(hvae.HVAE(784, [100, 50], seed=0, init="torch").params, m.params)
    assert "HVAE(x_dim=784" in repr(m) and "parameters" in repr(m)
    glorot = hvae.HVAE(784, [100, 50], seed=0)  # the default
    for name, v in glorot.named_params().items():
        if name.endswith("bias"):
            assert not v.any()
        else:
            bound = np.sqrt(6 / sum(v.shape))
            assert bound >= np.abs(v).max() > 0.9 * bound
    g = hvae.HVAE(784, [100, 50], seed=0, init="glorot").named_params()
    for name, v in g.items():
        if name.endswith("bias"):
            assert not v.any()
        else:
            bound = np.sqrt(6 / sum(v.shape))
            assert bound * 0.9 < np.abs(v).max() <= bound


def test_inputs_not_mutated():
    m, x, target, eps = make_case(3, "gaussian_learned", "tanh", "mc", False, 4)
    copies = [m.params.copy(), x.copy(), target.copy(), [e.copy() for e in eps]]
    m.loss_and_grad(x, eps, target=target)
    m.elbo_terms(x, eps, target=target)
    m._core.encode(m.params, x, eps)
    m._core.decode(m.params, eps[-1], eps=eps[:-1])
    np.testing.assert_array_equal(copies[0], m.params)
    np.testing.assert_array_equal(copies[1], x)
    np.testing.assert_array_equal(copies[2], target)
    for a, b in zip(copies[3], eps):
        np.testing.assert_array_equal(a, b)


def test_float32_and_float64_agree():
    m64, x, target, eps = make_case(2, "bernoulli", "tanh", "mc", False, 16)
    m32 = hvae.HVAE(m64.x_dim, m64.latent_dims, m64.hidden_dims, kl="mc", dtype="float32")
    m32.params[:] = m64.params
    l64, g64 = m64.loss_and_grad(x, eps)
    l32, g32 = m32.loss_and_grad(x.astype(np.float32), [e.astype(np.float32) for e in eps])
    np.testing.assert_allclose(l32, l64, rtol=1e-5)
    np.testing.assert_allclose(g32, g64, rtol=1e-3, atol=1e-4 * np.abs(g64).max())
