"""Bad input to the constructor, the binding and loss_and_grad: clear exceptions naming the argument;
odd-but-valid memory layouts give the same result as the plain array."""
import numpy as np
import pytest

import hvae
from hvae import _core


@pytest.fixture
def model():
    return hvae.HVAE(6, [3, 2], [[5], [4]], likelihood="gaussian", dtype="float64", seed=0)


def data(m, batch=4):
    rng = np.random.default_rng(0)
    return rng.normal(size=(batch, m.x_dim)), [rng.normal(size=(batch, d)) for d in m.latent_dims]


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(x_dim=0, latent_dims=[2]), ValueError, "x_dim"),
    (dict(x_dim=-3, latent_dims=[2]), ValueError, "x_dim"),
    (dict(x_dim=2.5, latent_dims=[2]), TypeError, "x_dim"),
    (dict(x_dim=4, latent_dims=[]), ValueError, "latent_dims"),
    (dict(x_dim=4, latent_dims=[0]), ValueError, "latent_dims[0]"),
    (dict(x_dim=4, latent_dims=[2] * 17), ValueError, "latent_dims"),
    (dict(x_dim=4, latent_dims=["a"]), TypeError, "latent_dims"),
    (dict(x_dim=4, latent_dims=[2], hidden_dims=[[3], [3]]), ValueError, "hidden_dims"),
    (dict(x_dim=4, latent_dims=[2], hidden_dims=[[-1]]), ValueError, "hidden_dims[0][0]"),
    (dict(x_dim=4, latent_dims=[2], hidden_dims=[[2 ** 30]]), ValueError, "hidden_dims[0][0]"),
    (dict(x_dim=4, latent_dims=[2], likelihood="poisson"), ValueError, "likelihood"),
    (dict(x_dim=4, latent_dims=[2], activation="gelu"), ValueError, "activation"),
    (dict(x_dim=4, latent_dims=[2], kl="exact"), ValueError, "kl"),
    (dict(x_dim=4, latent_dims=[2], dtype="float16"), ValueError, "dtype"),
    (dict(x_dim=4, latent_dims=[2], init="he"), ValueError, "init"),
    (dict(x_dim=4, latent_dims=[2], prior_variance="diag"), ValueError, "prior_variance"),
    (dict(x_dim=4, latent_dims=[2], prior_variance=1), ValueError, "prior_variance"),
    (dict(x_dim=4, latent_dims=[2], inference="ladder"), ValueError, "inference"),
    (dict(x_dim=4, latent_dims=[2], inference=None), ValueError, "inference"),
    (dict(x_dim=4, latent_dims=[2, 2], hidden_dims=[[3], []], inference="top_down"), ValueError,
     "hidden_dims[1]"),
    (dict(x_dim=4, latent_dims=[2], inference="top_down", deterministic=True), ValueError,
     "deterministic"),
])
def test_constructor_rejects(kwargs, exc, words):
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        hvae.HVAE(**kwargs)


def test_forward_rejects(model):
    x, eps = data(model)
    cases = [
        (lambda: model.loss_and_grad(x.astype(complex), eps), TypeError, "x"),
        (lambda: model.loss_and_grad(x[0], eps), ValueError, "x"),
        (lambda: model.loss_and_grad(x[:, :5], eps), ValueError, "x"),
        (lambda: model.loss_and_grad(x[:0], [e[:0] for e in eps]), ValueError, "x"),
        (lambda: model.loss_and_grad(np.where(x > 1, np.nan, x), eps), ValueError, "x"),
        (lambda: model.loss_and_grad(np.where(x > 1, np.inf, x), eps), ValueError, "finite"),
        (lambda: model.loss_and_grad(x, eps[:1]), ValueError, "eps"),
        (lambda: model.loss_and_grad(x, [eps[0], eps[1][:, :1]]), ValueError, r"eps\[1\]"),
        (lambda: model.loss_and_grad(x, [eps[0], eps[1][:2]]), ValueError, r"eps\[1\]"),
        (lambda: model.loss_and_grad(x, [eps[0], eps[1] * np.nan]), ValueError, r"eps\[1\]"),
        (lambda: model.loss_and_grad(x, eps[0]), TypeError, "eps"),
        (lambda: model.loss_and_grad(x, eps, target=x[:2]), ValueError, "target"),
        (lambda: model.loss_and_grad(x, eps, beta=-1.0), ValueError, "beta"),
        (lambda: model.loss_and_grad(x, eps, out=np.empty(3)), ValueError, "grad"),
        (lambda: model.loss_and_grad(x, eps, out=np.empty(model.n_params, np.float32)),
         TypeError, "grad"),
        (lambda: model._core.forward(model.params[:-1], x, None, eps), ValueError, "params"),
        (lambda: model._core.forward("abc", x, None, eps), TypeError, "params"),
        (lambda: model._core.forward(model.params, x, None, None), ValueError, "eps"),
        (lambda: model._core.forward(model.params, [["a"] * 6], None, eps), TypeError, "x"),
        (lambda: model._core.decode(model.params, eps[1], level=3), ValueError, "level"),
        (lambda: model._core.decode(model.params, eps[0]), ValueError, "z"),
        (lambda: model._core.decode(model.params, eps[1], temperature=np.nan), ValueError,
         "temperature"),
        (lambda: model._core.encode(model.params, x, [eps[0]]), ValueError, "eps"),
    ]
    for call, exc, words in cases:
        with pytest.raises(exc, match=words):
            call()


def test_odd_layouts_are_converted(model):
    """Lists, Fortran order, strided, read-only and byte-swapped arrays give the same numbers."""
    x, eps = data(model)
    want, _ = model.loss_and_grad(x, eps)
    ro = x.copy()
    ro.flags.writeable = False
    wide = np.zeros((4, 12))
    wide[:, ::2] = x
    variants = [x.tolist(), np.asfortranarray(x), wide[:, ::2], ro, x.astype(">f8")]
    for v in variants:
        got, _ = model.loss_and_grad(v, eps)
        assert got == want
    got, _ = model.loss_and_grad(x, [np.asfortranarray(e) for e in eps])
    assert got == want


def test_uninitialised_model_raises():
    m = _core.Model.__new__(_core.Model)
    with pytest.raises(RuntimeError, match="not initialised"):
        m.forward(np.zeros(3), np.zeros((1, 3)))


def test_adam_rejects():
    p = np.zeros(4)
    with pytest.raises(ValueError, match="step"):
        _core.adam_update(p, np.zeros(4), np.zeros(4), np.zeros(4), 0)
    with pytest.raises(TypeError, match="m"):
        _core.adam_update(p, np.zeros(4, np.float32), np.zeros(4), np.zeros(4), 1)
    with pytest.raises(ValueError, match="grad"):
        _core.adam_update(p, np.zeros(4), np.zeros(4), np.zeros(5), 1)
    ro = np.zeros(4)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="params"):
        _core.adam_update(ro, np.zeros(4), np.zeros(4), np.zeros(4), 1)
