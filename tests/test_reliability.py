"""Reliability: bad input anywhere public raises a clear exception naming the argument (or works
the same as the plain array), absurd sizes raise MemoryError instead of getting the process
killed, extreme but finite numbers stay finite, divergence stops training cleanly, memory does
not grow over many core calls, and hostile checkpoints are refused.

Extends tests/test_bad_input.py and tests/test_checkpoint.py (not repeated here). Property-based
fuzzing of the binding is in tests/test_fuzz.py, threads in tests/test_threads.py, SIGKILL during
training in tests/test_kill_resume.py.
"""
import gc
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import hvae
from hvae import _core, cli

import reference as ref

INT_MAX = 2 ** 31 - 1
# .ci/sanitize.sh runs this file with AddressSanitizer preloaded: its shadow memory needs the
# whole address space (no RLIMIT_AS) and its quarantine of freed blocks makes RSS meaningless
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")


def model64(**kw):
    kw.setdefault("likelihood", "gaussian")
    return hvae.HVAE(6, [3, 2], [[5], [4]], dtype="float64", seed=0, **kw)


def batch(m, n=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, m.x_dim)).astype(m.dtype)
    if m.likelihood == "bernoulli":
        x = (x > 0).astype(m.dtype)
    return x, [rng.standard_normal((n, d)).astype(m.dtype) for d in m.latent_dims]


def odd_layouts(a):
    """Same values as a: list, Fortran order, strided view, read-only, byte-swapped, other
    dtype (float32 <-> float64 cast is exact for float32 values only, so only for float64)."""
    wide = np.zeros((a.shape[0], 2 * a.shape[1]), a.dtype)
    wide[:, ::2] = a
    ro = a.copy()
    ro.flags.writeable = False
    swapped = a.astype(a.dtype.newbyteorder(">" if sys.byteorder == "little" else "<"))
    out = {"list": a.tolist(), "fortran": np.asfortranarray(a), "strided": wide[:, ::2],
           "readonly": ro, "byteswapped": swapped}
    if a.dtype == np.float32:
        out["float64"] = a.astype(np.float64)
    return out


# ------------------------------------------------------------------------------------------------
# 1. the binding: scalars, aliasing, precision of Adam's hyper-parameters


@pytest.mark.parametrize("value,exc,words", [
    ("0.5", TypeError, "beta: expected a number"),
    (None, TypeError, "beta: expected a number"),
    ([1.0], TypeError, "beta: expected a number"),
    (True, TypeError, "beta: expected a number"),
    (-0.5, ValueError, r"beta: .*>= 0.0, got -0.5"),
    (np.inf, ValueError, "beta: .*got inf"),
    (np.nan, ValueError, "beta: .*got nan"),
    (10 ** 400, ValueError, "beta: expected a finite number"),
])
def test_forward_beta_is_named(value, exc, words):
    m = model64()
    x, eps = batch(m)
    with pytest.raises(exc, match=words):
        m._core.forward(m.params, x, None, eps, beta=value)


def test_numeric_scalars_of_other_types_work():
    m = model64()
    x, eps = batch(m)
    want = m._core.forward(m.params, x, None, eps, beta=0.5)[0]
    for beta in (np.float32(0.5), np.float64(0.5), np.array(0.5)):
        assert m._core.forward(m.params, x, None, eps, beta=beta)[0] == want
    assert m._core.forward(m.params, x, None, eps, beta=1)[0] == \
        m._core.forward(m.params, x, None, eps)[0]
    xp = m._core.decode(m.params, eps[1], temperature=np.float32(0))[0]
    np.testing.assert_array_equal(xp, m._core.decode(m.params, eps[1], temperature=0)[0])


@pytest.mark.parametrize("value,exc,words", [
    ("1", TypeError, "temperature: expected a number"),
    (None, TypeError, "temperature: expected a number"),
    (-1.0, ValueError, "temperature: .*got -1.0"),
    (np.nan, ValueError, "temperature: .*got nan"),
])
def test_decode_temperature_is_named(value, exc, words):
    m = model64()
    _, eps = batch(m)
    with pytest.raises(exc, match=words):
        m._core.decode(m.params, eps[1], temperature=value)


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(step=2 ** 70), ValueError, "step: expected an integer in"),
    (dict(step=-1), ValueError, "step: expected an integer in"),
    (dict(step=1.0), TypeError, "step: expected an integer"),
    (dict(step=True), TypeError, "step: expected an integer"),
    (dict(step="1"), TypeError, "step: expected an integer"),
    (dict(lr="a"), TypeError, "lr: expected a number"),
    (dict(lr=-1e-3), ValueError, "lr: .*got -0.001"),
    (dict(lr=np.inf), ValueError, "lr: .*got inf"),
    (dict(beta1=1.0), ValueError, r"beta1: expected a number in \[0.0, 1.0\), got 1.0"),
    (dict(beta2=np.nan), ValueError, "beta2: .*got nan"),
    (dict(beta2=-0.1), ValueError, "beta2"),
    (dict(eps=0.0), ValueError, "eps: .*> 0.0, got 0.0"),
    (dict(eps=None), TypeError, "eps: expected a number"),
])
def test_adam_scalars_are_named(kwargs, exc, words):
    args = dict(step=1)
    args.update(kwargs)
    step = args.pop("step")
    with pytest.raises(exc, match=words):
        _core.adam_update(np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3), step, **args)


@pytest.mark.parametrize("kwargs,words", [
    (dict(beta1=1 - 1e-12), "beta1"),     # rounds to 1.0f: bias correction 1 - 1^t = 0
    (dict(beta2=1 - 1e-12), "beta2"),
    (dict(eps=1e-50), "eps"),              # rounds to 0.0f: 0 / (sqrt(0) + 0) = NaN
    (dict(lr=1e39), "lr"),                 # rounds to inf
])
def test_adam_float32_rejects_what_float32_cannot_hold(kwargs, words):
    """Valid doubles that round to an invalid float32 would make NaN parameters from a zero
    gradient; in float64 the same values are fine."""
    z32 = [np.zeros(3, np.float32) for _ in range(4)]
    with pytest.raises(ValueError, match=f"{words}: .*float32"):
        _core.adam_update(*z32, 1, **kwargs)
    assert all((a == 0).all() for a in z32)
    z64 = [np.zeros(3) for _ in range(4)]
    assert _core.adam_update(*z64, 1, **kwargs)
    assert np.isfinite(z64[0]).all()


def test_adam_refuses_aliased_buffers():
    buf = np.zeros(8)
    a, b = buf[:4], buf[4:]
    with pytest.raises(ValueError, match="m: must not share memory with params"):
        _core.adam_update(a, a, b, np.zeros(4), 1)
    with pytest.raises(ValueError, match="grad: must not share memory with v"):
        _core.adam_update(np.zeros(4), a, b, b, 1)
    over = np.zeros(5)
    with pytest.raises(ValueError, match="must not share memory"):
        _core.adam_update(over[:4], np.zeros(4), over[1:], np.zeros(4), 1)
    np.testing.assert_array_equal(buf, 0)
    # adjacent, not overlapping: fine
    assert _core.adam_update(a, b, np.zeros(4), np.ones(4), 1)


def test_grad_overlapping_an_input_is_refused():
    """The core zeroes grad and then reads params, x, eps: a grad sharing any byte with them
    would silently give a wrong gradient."""
    m = model64()
    x, eps = batch(m)
    P = m.n_params
    buf = np.zeros(P + 1)
    buf[:P] = m.params
    with pytest.raises(ValueError, match="grad: must not share memory with params"):
        m._core.forward(buf[:P], x, None, eps, grad=buf[1:])
    big = np.zeros(P + x.size)
    xs = big[P - 1:P - 1 + x.size].reshape(x.shape)
    xs[:] = x
    with pytest.raises(ValueError, match="grad: must not share memory with x"):
        m._core.forward(m.params, xs, None, eps, grad=big[:P])
    e0 = big[P - 1:P - 1 + eps[0].size].reshape(eps[0].shape)
    e0[:] = eps[0]
    with pytest.raises(ValueError, match="grad: must not share memory with eps"):
        m._core.forward(m.params, x, None, [e0, eps[1]], grad=big[:P])
    with pytest.raises(ValueError, match="grad: must not share memory with target"):
        m._core.forward(m.params, x, xs, eps, grad=big[:P])


def test_vecmath_rejects_and_converts():
    x = np.linspace(-3, 3, 12).reshape(3, 4)
    want = _core._vecmath("tanh", x)
    for v in (x.tolist(), np.asfortranarray(x), x.astype(">f8"), x.T.copy().T):
        np.testing.assert_array_equal(_core._vecmath("tanh", v), want)
    assert _core._vecmath("exp", np.zeros((0, 3))).shape == (0, 3)
    with pytest.raises(ValueError, match="op: expected one of"):
        _core._vecmath("log", x)
    with pytest.raises(TypeError, match="x: expected a real"):
        _core._vecmath("exp", x.astype(complex))
    with pytest.raises(TypeError, match="op: expected one of"):
        _core._vecmath(3, x)


def test_model_description_rejects():
    for args, exc, words in [
        ((4, range(10 ** 12), []), ValueError, "latent_dims: expected at most 16"),
        ((4, [2], range(10 ** 12)), ValueError, "hidden_dims: expected 1 lists"),
        ((4, [2], [range(10 ** 12)]), ValueError, r"hidden_dims\[0\]: expected at most 8"),
        ((4, [2], [[3]], "bernoulli\0"), ValueError, "likelihood: expected one of"),
        ((4, [2], [[3]], "bernoulli", "tanh", "mc", False, "\ud800"), ValueError, "dtype"),
        ((4, [2], [[3]], 1), TypeError, "likelihood: expected one of"),
        ((2 ** 64, [2], [[3]]), ValueError, "x_dim: expected an integer in"),
        ((4, [2 ** 64], [[3]]), ValueError, r"latent_dims\[0\]"),
        ((4, [np.float64(2)], [[3]]), TypeError, r"latent_dims\[0\]: expected an integer"),
        ((4, [2], [[None]]), TypeError, r"hidden_dims\[0\]\[0\]"),
        ((4, 2, [[3]]), TypeError, "latent_dims: expected a sequence"),
    ]:
        with pytest.raises(exc, match=words):
            _core.Model(*args)
    # huge but valid descriptions are only a table: nothing is allocated until a call
    big = _core.Model(2 ** 24, [2 ** 24] * 16, [[2 ** 24] * 8] * 16)
    assert big.n_params > 2 ** 56
    with pytest.raises(MemoryError, match="parameters"):
        hvae.HVAE(2 ** 24, [2 ** 24], [[2 ** 24]])


# ------------------------------------------------------------------------------------------------
# 2. odd layouts on every path give the same numbers as the plain array


def test_odd_layouts_on_every_path():
    m = model64(likelihood="gaussian_learned")
    x, eps = batch(m, 5)
    loss0, grad0 = m.loss_and_grad(x, eps, target=x[::-1].copy())
    mulv0, z0 = m._core.encode(m.params, x, eps)
    xp0, zs0 = m._core.decode(m.params, eps[1], eps=[eps[0]], temperature=0.5)
    for name, v in odd_layouts(x).items():
        assert m.loss_and_grad(v, eps, target=np.asarray(v)[::-1])[0] == loss0, name
        for got, want in zip(m._core.encode(m.params, v, eps)[0], mulv0):
            np.testing.assert_array_equal(got, want, err_msg=name)
    for name, v in odd_layouts(eps[1]).items():
        np.testing.assert_array_equal(m._core.decode(m.params, v, eps=[eps[0]],
                                                     temperature=0.5)[0], xp0, err_msg=name)
        e = [eps[0], v]
        assert m._core.forward(m.params, x, x[::-1].copy(), e)[0] == loss0, name
        for got, want in zip(m._core.encode(m.params, x, e)[1], z0):
            np.testing.assert_array_equal(got, want, err_msg=name)
    for name, v in odd_layouts(eps[0]).items():
        got = m._core.decode(m.params, eps[1], eps=[v], temperature=0.5)
        np.testing.assert_array_equal(got[0], xp0, err_msg=name)
        np.testing.assert_array_equal(got[1][0], zs0[0], err_msg=name)
    p = m.params
    pw = np.zeros(2 * p.size)
    pw[::2] = p
    for name, v in {"list": p.tolist(), "strided": pw[::2], "byteswapped": p.astype(">f8"),
                    "readonly": np.frombuffer(p.tobytes())}.items():
        lossv, _, _ = m._core.forward(v, x, x[::-1].copy(), eps)
        assert lossv == loss0, name
    g = np.empty_like(grad0)
    m._core.forward(p, np.asfortranarray(x), x[::-1].copy(), [e.tolist() for e in eps], grad=g)
    np.testing.assert_array_equal(g, grad0)


def test_public_methods_accept_odd_layouts():
    rng = np.random.default_rng(0)
    X = (rng.random((40, 6)) < 0.5).astype(np.float32)
    m = hvae.HVAE(6, [3], [[5]], seed=0)
    m.fit(X, epochs=1, batch_size=20, progress=False)
    want_enc = m.encode(X[:5])
    for name, v in odd_layouts(X[:5]).items():
        for (a, b), (c, d) in zip(m.encode(v), want_enc):
            np.testing.assert_array_equal(a, c, err_msg=name)
            np.testing.assert_array_equal(b, d, err_msg=name)
    state = m._rng.bit_generator.state
    want_ll = m.log_likelihood(X[:5], k=4)
    for name, v in odd_layouts(X[:5]).items():
        m._rng.bit_generator.state = state
        np.testing.assert_array_equal(m.log_likelihood(v, k=4), want_ll, err_msg=name)
    z = rng.normal(size=(3, 3)).astype(np.float32)
    want_dec = m.decode(z)
    for name, v in odd_layouts(z).items():
        np.testing.assert_array_equal(m.decode(v), want_dec, err_msg=name)
    # fit on an odd layout trains exactly as on the plain array
    a, b = hvae.HVAE(6, [3], [[5]], seed=1), hvae.HVAE(6, [3], [[5]], seed=1)
    a.fit(X, epochs=1, batch_size=20, progress=False)
    b.fit(np.asfortranarray(X).astype(">f4"), epochs=1, batch_size=20, progress=False)
    np.testing.assert_array_equal(a.params, b.params)


# ------------------------------------------------------------------------------------------------
# 3. bad input on the public paths of HVAE not covered by test_bad_input.py


@pytest.fixture(scope="module")
def trained():
    rng = np.random.default_rng(0)
    X = (rng.random((60, 6)) < 0.5).astype(np.float32)
    return hvae.HVAE(6, [3, 2], [[5], [4]], seed=0).fit(X, epochs=1, batch_size=30,
                                                        progress=False), X


def test_encode_rejects(trained):
    m, X = trained
    for arg, exc, words in [
        (X[0], ValueError, r"x: expected shape \(batch, 6\)"),
        (X[:, :5], ValueError, "x: expected shape"),
        (X[None], ValueError, "x: expected shape"),
        (X[:0], ValueError, "x: expected at least one row"),
        (np.where(X > 0, np.nan, X), ValueError, "x: expected finite"),
        (X.astype(complex), TypeError, "x: expected a real"),
        ("abc", TypeError, "x: expected a real"),
        (None, TypeError, "x: expected a real"),
        (np.zeros((3, 6), "M8[s]"), TypeError, "x: expected a real"),
    ]:
        with pytest.raises(exc, match=words):
            m.encode(arg)
        with pytest.raises(exc, match=words):
            m.transform(arg)


def test_decode_and_sample_reject(trained):
    m, _ = trained
    z = np.zeros((3, 2), np.float32)
    for call, exc, words in [
        (lambda: m.decode(z[:, :1]), ValueError, r"z: expected shape \(batch, 2\)"),
        (lambda: m.decode(z[0]), ValueError, "z: expected a 2-D"),
        (lambda: m.decode(z[:0]), ValueError, "z: expected at least one row"),
        (lambda: m.decode(z * np.nan), ValueError, "z: expected finite"),
        (lambda: m.decode(z, level=0), ValueError, "level"),
        (lambda: m.decode(z, level=3), ValueError, "level"),
        (lambda: m.decode(z, level=1.0), TypeError, "level"),
        (lambda: m.decode(z, temperature=-1.0), ValueError, "temperature"),
        (lambda: m.decode(z, temperature=np.nan), ValueError, "temperature"),
        (lambda: m.decode(z.astype(complex)), TypeError, "z: expected a real"),
        (lambda: m.sample(0), ValueError, "n: expected an integer >= 1"),
        (lambda: m.sample(-5), ValueError, "n"),
        (lambda: m.sample(2.0), ValueError, "n"),
        (lambda: m.sample(True), ValueError, "n"),
        (lambda: m.sample(3, temperature=-1), ValueError, "temperature"),
        (lambda: m.sample(3, temperature=np.inf), ValueError, "temperature"),
        (lambda: m.sample(10 ** 13), ValueError, "n: at most"),   # fails at once
        (lambda: m.traverse(np.zeros(6), level=3, dim=0, values=[0]), ValueError, "level"),
        (lambda: m.traverse(np.zeros(6), level=1, dim=3, values=[0]), ValueError, "dim"),
        (lambda: m.interpolate(np.zeros((2, 6)), np.zeros(6)), ValueError, "x_a"),
    ]:
        with pytest.raises(exc, match=words):
            call()


def test_log_likelihood_and_elbo_reject(trained):
    m, X = trained
    for call, exc, words in [
        (lambda: m.log_likelihood(X, k=0), ValueError, "k: expected"),
        (lambda: m.log_likelihood(X, k=2.5), ValueError, "k: expected"),
        (lambda: m.log_likelihood(X, k=True), ValueError, "k: expected"),
        (lambda: m.log_likelihood(X, k=3, batch_size=-1), ValueError, "batch_size"),
        (lambda: m.log_likelihood(X[0], k=3), ValueError, "x: expected shape"),
        (lambda: m.log_likelihood(X * np.nan, k=3), ValueError, "x: expected finite"),
        (lambda: m.log_likelihood(X.astype(complex), k=3), TypeError, "x"),
        (lambda: m.elbo(X, k=0), ValueError, "k"),
        (lambda: m.elbo(X[:, :2]), ValueError, "x"),
        (lambda: m.score(X, k=-1), ValueError, "k"),
        (lambda: m.log_likelihood(X[:1], k=10 ** 13, batch_size=10 ** 13), MemoryError, None),
    ]:
        with pytest.raises(exc, match=words):
            call()
    # the two branches of the estimator (k <= rows, k > rows) on tiny batches
    assert np.isfinite(m.log_likelihood(X[:3], k=5, batch_size=2)).all()
    assert np.isfinite(m.log_likelihood(X[:3], k=5, batch_size=1)).all()
    assert m.log_likelihood(X[:0], k=3).shape == (0,)


def test_fit_rejects(trained, tmp_path):
    m, X = trained
    before = m.params.copy()
    for kwargs, exc, words in [
        (dict(X=X[0]), ValueError, "X: expected shape"),
        (dict(X=X.astype(complex)), TypeError, "X"),
        (dict(X="abc"), TypeError, "X"),
        (dict(X=X, epochs=-1), ValueError, "epochs"),
        (dict(X=X, epochs=1.0), ValueError, "epochs"),
        (dict(X=X, batch_size=-3), ValueError, "batch_size"),
        (dict(X=X, batch_size=10.0), ValueError, "batch_size"),
        (dict(X=X, beta=-1.0), ValueError, "beta"),
        (dict(X=X, beta=np.inf), ValueError, "beta"),
        (dict(X=X, lr=-1.0), ValueError, "lr"),
        (dict(X=X, lr_decay=0.0), ValueError, "lr_decay"),
        (dict(X=X * 255), ValueError, "divide by 255"),
        (dict(X=X, kl_warmup_epochs=-1), ValueError, "kl_warmup_epochs"),
        (dict(X=X, kl_warmup_delay=-1), ValueError, "kl_warmup_delay"),
        (dict(X=X, kl_warmup_delay=np.nan), ValueError, "kl_warmup_delay"),
        (dict(X=X, kl_warmup_delay="2"), TypeError, "kl_warmup_delay"),
        (dict(X=X, validation_data=X[:, :3]), ValueError, "validation_data"),
        (dict(X=X, validation_data=X * np.nan), ValueError, "validation_data"),
        (dict(X=X, validation_data=X, patience=-1), ValueError, "patience"),
        (dict(X=X, validation_data=X, patience=1.5), ValueError, "patience"),
    ]:
        kwargs.setdefault("epochs", 1)
        with pytest.raises(exc, match=words):
            m.fit(kwargs.pop("X"), progress=False, **kwargs)
    np.testing.assert_array_equal(m.params, before)
    # a huge batch_size is clipped to the data
    hvae.HVAE(6, [3], [[5]], seed=0).fit(X, epochs=1, batch_size=10 ** 12, progress=False)


def test_fit_on_empty_data_is_a_value_error():
    m = hvae.HVAE(6, [3], [[5]], seed=0)
    with pytest.raises(ValueError, match="X"):
        m.fit(np.zeros((0, 6), np.float32), epochs=1, progress=False)


def test_fit_on_empty_validation_data_is_a_value_error():
    m = hvae.HVAE(6, [3], [[5]], seed=0)
    X = np.ones((10, 6), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="validation_data"):
            m.fit(X, epochs=1, validation_data=X[:0], progress=False)


@pytest.mark.parametrize("kwargs", ["dir", "callbacks"])
def test_fit_checks_checkpoint_and_callbacks_before_training(kwargs, tmp_path):
    m = hvae.HVAE(6, [3], [[5]], seed=0)
    X = np.ones((10, 6), np.float32)
    arg = {"dir": dict(checkpoint=tmp_path), "callbacks": dict(callbacks=3)}[kwargs]
    with pytest.raises((ValueError, TypeError, OSError)):
        m.fit(X, epochs=1, progress=False, **arg)
    assert m.history_ == [] and (m.optimizer_ is None or m.optimizer_.step == 0)


@pytest.mark.parametrize("case", ["decode", "sample", "fit"])
def test_non_numbers_are_named(case, trained):
    m, X = trained
    call, name = {
        "decode": (lambda: m.decode(np.zeros((2, 2)), temperature="hot"), "temperature"),
        "sample": (lambda: m.sample(2, temperature=None), "temperature"),
        "fit": (lambda: m.fit(X, epochs=1, lr="fast", progress=False), "lr"),
    }[case]
    with pytest.raises(TypeError, match=name):
        call()


@pytest.mark.parametrize("case", ["hidden_int", "ragged"])
def test_argument_named_in_constructor_and_conversion(case):
    if case == "hidden_int":
        try:
            hvae.HVAE(4, [2], 3)
        except TypeError as exc:
            assert "hidden_dims" in str(exc)
    else:
        with pytest.raises(ValueError, match="x"):
            hvae.HVAE(4, [2]).loss_and_grad([[1, 2, 3, 4], [1]])


# ------------------------------------------------------------------------------------------------
# 4. absurd sizes


@pytest.fixture(scope="module")
def wide():
    """32 MB of parameters, but 16 MB of workspace per example."""
    return hvae.HVAE(1, [1], [[2 ** 20]], dtype="float32", seed=0)


def test_huge_batch_is_a_memory_error_not_a_crash(wide):
    B = 2 ** 20  # needs 16 TiB of workspace: refused before malloc, whatever the overcommit
    x = np.zeros((B, 1), np.float32)
    for call, name in [(lambda: wide.loss_and_grad(x), "x"), (lambda: wide.encode(x), "x"),
                       (lambda: wide.decode(x), "z"), (lambda: wide.elbo(x), "x"),
                       (lambda: wide.log_likelihood(x[:2], k=B, batch_size=B), "x")]:
        with pytest.raises(MemoryError, match=f"{name}: a batch of .* rows needs .* MiB"):
            call()
    # the model still works afterwards, with the same numbers as a fresh one
    fresh = hvae.HVAE(1, [1], [[2 ** 20]], dtype="float32", seed=0)
    eps = [np.ones((3, 1), np.float32)]
    assert wide.loss_and_grad(x[:3], eps)[0] == fresh.loss_and_grad(x[:3], eps)[0]


def test_more_rows_than_an_int_is_refused(tmp_path):
    """A batch of 2**31 + 1 rows (a sparse memory-mapped file: no memory used) is refused
    before anything reads it."""
    m = hvae.HVAE(1, [1], [[]], dtype="float32")
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        f.truncate((INT_MAX + 2) * 4)
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=(INT_MAX + 2, 1))
    try:
        for call, name in [(lambda: m._core.forward(m.params, mm, None, [mm]), "x"),
                           (lambda: m._core.encode(m.params, mm), "x"),
                           (lambda: m._core.decode(m.params, mm), "z")]:
            with pytest.raises(ValueError, match=f"{name}: batch of 2147483649 rows is too "
                                                 f"large"):
                call()
    finally:
        del mm


# Python-level allocations run in a subprocess under an address-space limit, so that a
# regression can only fail the test, never get this process (or the machine) OOM-killed.
_LIMITED = textwrap.dedent("""
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    import numpy as np, hvae
    m = hvae.HVAE(4, [2, 1], [[3], [2]], seed=0)
    out = {}
    for name, call in [
            ("sample", lambda: m.sample(2 ** 31)),
            ("log_likelihood", lambda: m.log_likelihood(np.zeros((1, 4)), k=10 ** 9,
                                                        batch_size=10 ** 9))]:
        try:
            call()
            out[name] = ["no error", ""]
        except BaseException as exc:
            out[name] = [type(exc).__name__, str(exc)]
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def limited():
    if UNDER_ASAN:
        pytest.skip("RLIMIT_AS cannot be combined with AddressSanitizer")
    proc = subprocess.run([sys.executable, "-c", _LIMITED], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case,name", [("sample", "n"), ("log_likelihood", "batch_size")])
def test_huge_requests_are_refused_before_allocating(limited, case, name):
    kind, message = limited[case]
    assert kind in ("ValueError", "MemoryError"), (kind, message)
    assert f"{name}:" in message or f"{name}=" in message, message


# ------------------------------------------------------------------------------------------------
# 5. numerical faults


def _extreme(dtype, likelihood, kl, activation, lv, logit):
    """A model whose logvar outputs are +-lv at every level and whose decoder-1 outputs are
    logits +-logit (or x-logvars +-lv), with data and noise."""
    m = hvae.HVAE(6, [3, 2], [[5], [4]], likelihood=likelihood, kl=kl, activation=activation,
                  dtype=dtype, seed=0)
    rng = np.random.default_rng(1)
    m.params[:] = rng.normal(0, 0.5, m.n_params)
    named = m.named_params()
    sign = lambda n: np.where(np.arange(n) % 2, -1.0, 1.0)  # noqa: E731
    for i, d in enumerate(m.latent_dims, 1):
        named[f"enc{i}.1.bias"][d:] = lv * sign(d)
    out = named["dec1.1.bias"]
    if likelihood == "gaussian_learned":
        out[:6], out[6:] = 0, lv * sign(6)
    else:
        out[:] = logit * sign(6)
    x = rng.normal(size=(4, 6)).astype(dtype)
    if likelihood == "bernoulli":
        x = (x > 0).astype(dtype)
    eps = [rng.standard_normal((4, d)).astype(dtype) for d in m.latent_dims]
    return m, x, eps


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian_learned"])
@pytest.mark.parametrize("kl", ["analytic", "mc"])
@pytest.mark.parametrize("dtype,lv,rtol", [("float64", 100.0, 1e-9), ("float32", 80.0, 1e-4)])
def test_extreme_but_finite_values_stay_finite_and_exact(likelihood, kl, dtype, lv, rtol):
    """logvar outputs +-lv (exp(100) ~ 3e43 is finite in float64, float32 holds exp(80)),
    logits +-1e4: the loss (~1e43) and gradient are finite and match the float64 reference,
    which uses logaddexp and exp directly."""
    m, x, eps = _extreme(dtype, likelihood, kl, "tanh", lv, 1e4)
    loss, grad = m.loss_and_grad(x, eps)
    p64, x64, e64 = m.params.astype(np.float64), x.astype(np.float64), \
        [e.astype(np.float64) for e in eps]
    kw = dict(x_dim=6, latent_dims=m.latent_dims, hidden_dims=m.hidden_dims,
              likelihood=likelihood, activation="tanh", kl=kl)
    want_loss, want_grad = ref.loss_and_grad(p64, x64, x64, e64, **kw)
    assert np.isfinite(want_loss) and np.isfinite(want_grad).all()
    assert np.isfinite(loss) and np.isfinite(grad).all()
    np.testing.assert_allclose(loss, want_loss, rtol=rtol)
    np.testing.assert_allclose(grad, want_grad, rtol=rtol, atol=rtol * np.abs(want_grad).max())
    terms = m.elbo_terms(x, eps)
    lw = ref.forward(p64, x64, x64, e64, **kw)["log_weight"]
    np.testing.assert_allclose(terms["log_weight"], lw, rtol=rtol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_huge_logits_and_large_inputs(dtype):
    """Logits +-1e4 (float32) / +-1e300 (float64): softplus and sigmoid never overflow; the
    Bernoulli loss is |logit| per wrong pixel. Gaussian data of 1e15 / 1e150 squared stay
    finite."""
    big = 1e4 if dtype == "float32" else 1e300
    m = hvae.HVAE(4, [2], [[3]], dtype=dtype, seed=0)
    named = m.named_params()
    named["dec1.1.weight"][:] = 0
    named["dec1.1.bias"][:] = [big, -big, big, -big]
    x = np.array([[1, 0, 1, 0], [0, 1, 0, 1]], dtype)
    eps = [np.zeros((2, 2), dtype)]
    terms = m.elbo_terms(x, eps)
    np.testing.assert_allclose(terms["reconstruction"], [0.0, 4 * big], rtol=1e-6, atol=1e-6)
    loss, grad = m.loss_and_grad(x, eps)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    itemsize = np.dtype(dtype).itemsize
    off = (named["dec1.1.bias"].ctypes.data - m.params.ctypes.data) // itemsize
    np.testing.assert_allclose(grad[off:off + 4], [0.5, -0.5, 0.5, -0.5])  # mean(sigmoid - x)
    scale = 1e15 if dtype == "float32" else 1e150
    gm = hvae.HVAE(4, [2], [[3]], likelihood="gaussian", dtype=dtype, seed=0)
    xg = np.full((2, 4), scale, dtype)
    loss, grad = gm.loss_and_grad(xg, eps)
    assert np.isfinite(loss) and np.isfinite(grad).all() and loss > 0.5 * 4 * scale ** 2 * 0.9


def test_log_likelihood_finite_at_extreme_log_weights():
    """Log weights of about -1e43: both branches of the estimator (several examples per call;
    one example in chunks with a streaming log-sum-exp) are finite and equal the float64
    log-mean-exp of the same log weights (the same noise in both: it depends on the seed and
    the sample's place, not on the chunks)."""
    m, x, _ = _extreme("float64", "gaussian", "mc", "tanh", 100.0, 0.0)
    n, k = len(x), 6

    def lme(a):
        return np.logaddexp.reduce(a, axis=-1) - np.log(a.shape[-1])

    state = m._rng.bit_generator.state
    got_a = m.log_likelihood(x, k=k, batch_size=64)
    m._rng.bit_generator.state = state
    got_b = m.log_likelihood(x, k=k, batch_size=4)
    m._rng.bit_generator.state = state
    eps = m._core.noise(n * k, int(m._rng.integers(0, 2 ** 63)))
    lw = m._core.forward(m.params, np.repeat(x, k, axis=0), None, eps, log_weight=True)[2]
    want = lme(lw.reshape(n, k))
    for got in (got_a, got_b):
        assert np.isfinite(got).all() and (got < -1e40).all()
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_diverging_training_stops_cleanly():
    """lr = 1e6 with relu: activations overflow within a few steps. fit raises the
    FloatingPointError naming epoch and step; the parameters are finite and exactly those after
    the last successful step (never a NaN written into them)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 6)).astype(np.float32)
    m = hvae.HVAE(6, [3, 2], [[8], [8]], likelihood="gaussian", activation="relu", seed=0)
    m._ensure_optimizer()
    snapshots = []
    train_step = m.optimizer_.train_step

    def recording_train_step(core, params, *args):
        loss, terms, ok = train_step(core, params, *args)
        if ok:
            snapshots.append(params.copy())
        return loss, terms, ok
    m.optimizer_.train_step = recording_train_step
    with pytest.raises(FloatingPointError, match=r"non-finite \w+ at epoch \d+, step \d+"):
        m.fit(X, epochs=20, batch_size=16, lr=1e6, progress=False)
    assert snapshots, "diverged before any step"
    assert np.isfinite(m.params).all()
    np.testing.assert_array_equal(m.params, snapshots[-1])
    assert np.isfinite(m.optimizer_.m).all() and np.isfinite(m.optimizer_.v).all()
    assert m.optimizer_.step == len(snapshots)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adam_never_writes_non_finite_parameters(dtype):
    """Zero, tiny and large gradients, first and huge step counts: parameters stay finite and
    an update moves each parameter by about lr (Adam's step is scale-free)."""
    rng = np.random.default_rng(0)
    for grad in (np.zeros(6), np.full(6, np.finfo(dtype).tiny), rng.normal(size=6) * 1e15):
        p, m1, m2 = (np.zeros(6, dtype) for _ in range(3))
        for step in (1, 2, 10 ** 9, 2 ** 62):
            assert _core.adam_update(p, m1, m2, grad.astype(dtype), step, lr=1.0)
            assert np.isfinite(p).all() and np.isfinite(m1).all() and np.isfinite(m2).all()
    p = np.zeros(6, dtype)
    g = (rng.normal(size=6) * 1e15).astype(dtype)
    _core.adam_update(p, np.zeros(6, dtype), np.zeros(6, dtype), g, 1, lr=1.0)
    np.testing.assert_allclose(p, -np.sign(g), rtol=1e-5)


@pytest.mark.parametrize("scale", [2.0, 100.0])
def test_adam_huge_finite_gradient_steps_by_lr_or_refuses(scale):
    dtype = np.float32
    g = np.full(3, np.sqrt(np.finfo(dtype).max) * scale, dtype)
    p, m1, m2 = (np.zeros(3, dtype) for _ in range(3))
    if _core.adam_update(p, m1, m2, g, 1, lr=1.0):
        np.testing.assert_allclose(p, -1.0, rtol=1e-5)
        assert np.isfinite(m2).all()
    else:
        assert (p == 0).all() and (m1 == 0).all() and (m2 == 0).all()


# ------------------------------------------------------------------------------------------------
# 6. memory does not grow over many core calls (leaks in success and error paths)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm") or UNDER_ASAN,
                    reason="needs /proc, and no AddressSanitizer quarantine")
def test_memory_does_not_grow_over_10000_core_calls():
    m = hvae.HVAE(32, [8, 4], [[16], [8]], kl="mc", dtype="float64", seed=0)
    rng = np.random.default_rng(0)
    x = rng.random((64, 32))
    xf = np.asfortranarray(x)            # converted (copied) on every call
    eps = [rng.standard_normal((64, d)) for d in m.latent_dims]
    grad = np.empty(m.n_params)
    core, p = m._core, m.params
    opt = [np.zeros(m.n_params) for _ in range(3)]

    def round_of_calls():
        core.forward(p, xf, x, eps, grad=grad, log_weight=True)
        core.encode(p, xf, eps)
        core.decode(p, eps[1], eps=[eps[0]], temperature=0.5)
        _core.adam_update(opt[0], opt[1], opt[2], grad, 1)
        _core._vecmath("softplus", x)
        core.param_table()
        for bad in (lambda: core.forward(p, xf, None, [eps[0], eps[1][:, :1]]),  # after copies
                    lambda: core.forward(p, xf, None, eps, grad=grad[:-1]),
                    lambda: core.encode(p, xf, [eps[0], eps[1] * np.nan]),
                    lambda: core.decode(p, eps[1], eps=[eps[0][:3]]),
                    lambda: core.forward(p, xf, None, eps, beta="x"),
                    lambda: _core.adam_update(opt[0], opt[0], opt[2], grad, 1)):
            try:
                bad()
            except (TypeError, ValueError):
                pass

    for _ in range(100):  # warm up: workspace, numpy caches, pymalloc arenas
        round_of_calls()
    gc.collect()
    watched = [p, x, xf, *eps, grad, *opt, core]
    refs = [sys.getrefcount(o) for o in watched]
    before = _rss_bytes()
    for _ in range(834):  # 834 rounds x 12 calls > 10 000 core calls
        round_of_calls()
    gc.collect()
    grown = _rss_bytes() - before
    # one leaked copy of x per round would be 834 x 16 KiB = 13 MiB
    assert grown < 4 * 2 ** 20, f"resident memory grew by {grown / 2 ** 20:.1f} MiB"
    # a leaked reference to an argument leaks no memory, but shows in its reference count
    assert [sys.getrefcount(o) for o in watched] == refs


# ------------------------------------------------------------------------------------------------
# 7. hostile checkpoints (hvae.load and the command line)


def _rewrite(src, dst, mutate=None, raw_meta=None):
    with np.load(src, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(bytes(arrays.pop("meta")).decode())
    if mutate:
        mutate(arrays, meta)
    text = raw_meta if raw_meta is not None else json.dumps(meta)
    arrays["meta"] = np.frombuffer(text.encode() if isinstance(text, str) else text, np.uint8)
    with open(dst, "wb") as f:
        np.savez(f, **arrays)
    return dst


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    rng = np.random.default_rng(0)
    X = (rng.random((40, 64)) < 0.3).astype(np.float32)
    m = hvae.HVAE(64, [4], [[8]], seed=0).fit(X, epochs=1, batch_size=20, progress=False)
    path = tmp_path_factory.mktemp("ckpt") / "good.npz"
    m.save(path)
    return path


def _meta_pickle(src, dst):
    with np.load(src, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["meta"] = np.array([{"format": "hvae-checkpoint"}], dtype=object)
    np.savez(dst, **arrays)
    return dst


HOSTILE = {
    "meta_is_a_list": dict(raw_meta="[1, 2]"),
    "meta_pickled": "pickle",
    "meta_not_utf8": dict(raw_meta=b"\xff\xfe{"),
    "optimizer_is_a_list": dict(mutate=lambda a, m: m.update(optimizer=[1])),
    "latent_dims_huge_count": dict(mutate=lambda a, m: m["config"].update(
        latent_dims=list(range(1, 10 ** 5)))),
    "hidden_huge_count": dict(mutate=lambda a, m: m["config"].update(
        hidden_dims=[[4] * 10 ** 5])),
    "x_dim_bool": dict(mutate=lambda a, m: m["config"].update(x_dim=True)),
    "x_dim_huge": dict(mutate=lambda a, m: m["config"].update(x_dim=10 ** 30)),
    "seed_str": dict(mutate=lambda a, m: m["config"].update(seed="abc")),
    "deep_json": dict(raw_meta="[" * 100000 + "]" * 100000),
    "history_not_dicts": dict(mutate=lambda a, m: m.update(history=[1, 2])),
    "history_bad_values": dict(mutate=lambda a, m: m["history"][0].update(val_loss="x",
                                                                         seconds="y")),
    "step_negative": dict(mutate=lambda a, m: m["optimizer"].update(step=-5)),
    "step_huge": dict(mutate=lambda a, m: m["optimizer"].update(step=10 ** 30)),
    "lr_nan": dict(mutate=lambda a, m: m["optimizer"].update(lr=float("nan"))),
    "beta1_out_of_range": dict(mutate=lambda a, m: m["optimizer"].update(beta1=5)),
    "params_nan": dict(mutate=lambda a, m: a.update(params=np.full_like(a["params"], np.nan))),
}


def _make_hostile(checkpoint, tmp_path, name, how):
    dst = tmp_path / f"{name}.npz"
    if how == "pickle":
        return _meta_pickle(checkpoint, dst)
    return _rewrite(checkpoint, dst, **how)


def _assert_cli_clean(path, capsys):
    for argv in (["info", path], ["sample", path, "-n", "4", "-o", str(path) + ".png"]):
        code = cli.main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 1, err
        assert "Traceback" not in err and err.startswith("hvae: error: ") \
            and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_metadata_is_refused(checkpoint, tmp_path, name, capsys):
    path = _make_hostile(checkpoint, tmp_path, name, HOSTILE[name])
    with pytest.raises(ValueError, match="not a valid hvae checkpoint"):
        hvae.load(path)
    _assert_cli_clean(path, capsys)


def test_compressed_checkpoint_loads_and_bad_path_types(checkpoint, tmp_path):
    with np.load(checkpoint, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    np.savez_compressed(tmp_path / "c.npz", **arrays)
    np.testing.assert_array_equal(hvae.load(tmp_path / "c.npz").params,
                                  hvae.load(checkpoint).params)
    for bad in (None, 3.5, [1]):
        with pytest.raises(TypeError):
            hvae.load(bad)
    with pytest.raises(ValueError, match="not a valid hvae checkpoint"):
        hvae.load(tmp_path)  # a directory
    with pytest.raises(ValueError, match="not a valid hvae checkpoint"):
        hvae.load("/dev/null")


def test_cli_absurd_sizes_are_clean_errors(checkpoint, tmp_path, capsys):
    """Requests that cannot fit fail at once with one line, exit status 1."""
    for argv in (["sample", checkpoint, "-n", str(10 ** 13), "-o", tmp_path / "s.png"],
                 ["train", "--data", "digits", "--latent-dims", str(2 ** 25),
                  "--checkpoint", tmp_path / "m.npz", "--no-progress"],
                 ["train", "--data", "digits", "--hidden-dims", str(2 ** 24), "--latent-dims",
                  str(2 ** 24), "--checkpoint", tmp_path / "m.npz", "--no-progress"]):
        code = cli.main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("hvae: error: ") and "Traceback" not in err, err
    assert not (tmp_path / "m.npz").exists()
