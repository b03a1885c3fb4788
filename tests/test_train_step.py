"""The fused training step (_core.Model.train_step) and the core's thread team: one thread gives
bit for bit forward + adam_update; more threads give the same to round-off, reproducibly; a
non-finite loss or gradient takes no step; bad arguments raise exceptions naming them."""
import multiprocessing
import threading

import numpy as np
import pytest

import hvae
from hvae import _core

CONFIGS = [
    dict(x_dim=9, latent_dims=[4], hidden_dims=[[7]]),
    dict(x_dim=9, latent_dims=[5, 3], hidden_dims=[[8, 6], [4]], kl="mc", activation="relu"),
    dict(x_dim=7, latent_dims=[4, 3, 2], hidden_dims=[[6], [], [5]], likelihood="gaussian",
         activation="leaky_relu"),
    dict(x_dim=6, latent_dims=[3, 2], hidden_dims=[[5], [4]], likelihood="gaussian_learned"),
    dict(x_dim=8, latent_dims=[3, 2], hidden_dims=[[6], [4]], deterministic=True),
    dict(x_dim=8, latent_dims=[4, 3, 2], hidden_dims=[[6], [5], [4]], kl="mc",
         prior_variance="learned"),
    # wide enough for the team to split GEMMs, activations, the likelihood and Adam
    dict(x_dim=300, latent_dims=[40, 10], hidden_dims=[[256], [64]]),
    # one row is enough for the team to split the likelihood
    dict(x_dim=9000, latent_dims=[2], hidden_dims=[[4]], likelihood="gaussian_learned"),
    # at B = 16 the 1024 -> 16 layer's input gradient is split over its 16 features, fewer than
    # 3 threads' aligned shares: a part with no features of its own
    dict(x_dim=64, latent_dims=[8], hidden_dims=[[1024]], activation="leaky_relu"),
    # latents wide enough for the team to split the KL terms by rows (at B = 512)
    dict(x_dim=50, latent_dims=[64, 32], hidden_dims=[[64], [32]], kl="mc",
         prior_variance="learned"),
    dict(x_dim=50, latent_dims=[64, 32], hidden_dims=[[64], [32]], deterministic=True),
]
# Adam's step is about lr whatever the gradient's size, so a gradient near zero that rounds
# differently moves a parameter differently (by up to 2 lr a step when its sign flips): a few
# parameters in 10 000 may differ by that much (seen: one of 126036 by 16% of lr, float32);
# the others agree to round-off; a wrong split moves many by about lr
TOL = {"float32": dict(rtol=1e-4, atol=1e-4), "float64": dict(rtol=1e-10, atol=1e-13)}


def assert_params_close(got, want, dtype, steps, lr=3e-3):
    """Parameters after `steps` Adam steps equal up to round-off, but for the few whose
    near-zero gradient Adam's normalisation amplified (at most 2 lr a step apart)."""
    off = ~np.isclose(got, want, **TOL[dtype])
    assert off.sum() <= max(1, off.size // 10000), f"{off.sum()} of {off.size} parameters differ"
    np.testing.assert_array_less(np.abs(got - want)[off], 2 * lr * steps)


def run(cfg, dtype, steps, B, threads, *, target=False, seed=0, density=0.4):
    """(params, m, v, grad, losses, terms) after `steps` train_step calls on binary x with
    `density` ones (at most 0.25 from 64 rows: the sparse first layer); threads None: the
    two-call path (forward with grad, then adam_update)."""
    m = hvae.HVAE(**cfg, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 1)
    grad, m1, m2 = np.zeros_like(m.params), np.zeros_like(m.params), np.zeros_like(m.params)
    losses, terms = [], []
    for t in range(1, steps + 1):
        x = (rng.random((B, m.x_dim)) < density).astype(dtype)
        tg = (rng.random((B, m.x_dim)) < 0.4).astype(dtype) if target else None
        eps = None if m.deterministic else m.draw_eps(B)
        kw = dict(beta=0.7, lr=3e-3, beta1=0.8, beta2=0.99)
        if threads is None:
            loss, tm, _ = m._core.forward(m.params, x, tg, eps, beta=kw["beta"], grad=grad)
            assert _core.adam_update(m.params, m1, m2, grad, t, lr=kw["lr"], beta1=kw["beta1"],
                                     beta2=kw["beta2"])
        else:
            loss, tm, ok = m._core.train_step(m.params, m1, m2, grad, x, eps, t, target=tg,
                                              threads=threads, **kw)
            assert ok is True
        losses.append(loss)
        terms.append(tm)
    return m.params, m1, m2, grad, losses, terms


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_one_thread_equals_forward_then_adam_bit_for_bit(cfg, dtype):
    for B, target, density in ((1, False, 0.4), (5, True, 0.4), (33, False, 0.4),
                               (64, True, 0.1)):
        want = run(cfg, dtype, 3, B, None, target=target, density=density)
        got = run(cfg, dtype, 3, B, 1, target=target, density=density)
        for a, b in zip(got, want):
            for u, w in zip(a, b) if isinstance(a, list) else [(a, b)]:
                np.testing.assert_array_equal(u, w)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[4], CONFIGS[5], CONFIGS[6], CONFIGS[7],
                                 CONFIGS[8], CONFIGS[9], CONFIGS[10]])
def test_threads_match_one_thread_and_are_reproducible(cfg, dtype):
    # the input gradient of a layer is split over its features when B <= its outputs (64, 16),
    # else over the batch (512); x with 10% ones from 64 rows: the sparse first layer
    for B, density in ((1, 0.4), (3, 0.4), (16, 0.4), (64, 0.4), (512, 0.4), (64, 0.1),
                       (512, 0.1)):
        one = run(cfg, dtype, 3, B, 1, density=density)
        for threads in (2, 3):
            got = run(cfg, dtype, 3, B, threads, density=density)
            assert_params_close(got[0], one[0], dtype, steps=3)
            np.testing.assert_allclose(got[4], one[4], rtol=TOL[dtype]["rtol"])
            again = run(cfg, dtype, 3, B, threads, density=density)
            for a, b in zip(got[:4], again[:4]):
                np.testing.assert_array_equal(a, b)
            assert got[4] == again[4]


def test_forward_threads_match_one_thread():
    m = hvae.HVAE(**CONFIGS[6], dtype="float64", seed=3)
    x = (np.random.default_rng(0).random((50, m.x_dim)) < 0.4).astype(np.float64)
    eps = m.draw_eps(50)
    g1, g2 = np.empty_like(m.params), np.empty_like(m.params)
    one = m._core.forward(m.params, x, None, eps, grad=g1, log_weight=True)
    two = m._core.forward(m.params, x, None, eps, grad=g2, log_weight=True, threads=2)
    assert two[0] == pytest.approx(one[0], rel=1e-12)
    np.testing.assert_allclose(two[1], one[1], rtol=1e-12)
    np.testing.assert_allclose(two[2], one[2], rtol=1e-12)
    np.testing.assert_allclose(g2, g1, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("threads", [1, 2])
def test_non_finite_gradient_or_loss_takes_no_step(threads):
    """float32 Bernoulli with x = 1e20: a finite loss whose gradient fails adam_update's check
    (g * g would overflow); x = 3e38: an infinite loss. Neither changes params, m or v."""
    m = hvae.HVAE(5, [2], [[4]], seed=0)
    x = np.full((3, 5), 1e20, np.float32)
    eps = m.draw_eps(3)
    m1, m2, grad = np.zeros_like(m.params), np.ones_like(m.params), np.zeros_like(m.params)
    before = [a.copy() for a in (m.params, m1, m2)]
    loss, terms, ok = m._core.train_step(m.params, m1, m2, grad, x, eps, 1, threads=threads)
    assert np.isfinite(loss) and not ok
    assert not _core.adam_update(m.params.copy(), m1.copy(), m2.copy(), grad, 1)
    for a, b in zip((m.params, m1, m2), before):
        np.testing.assert_array_equal(a, b)
    loss, terms, ok = m._core.train_step(m.params, m1, m2, grad, np.full((3, 5), 3e38, np.float32),
                                         eps, 1, threads=threads)
    assert not np.isfinite(loss) and not ok and terms.shape == (2, 3)
    for a, b in zip((m.params, m1, m2), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B", [4, 80])
def test_overflow_only_in_one_weight_gradient_takes_no_step(threads, B):
    """The only gradient too large for Adam is part of the decoder's last layer's weight
    gradient (its input a tanh output): targets of +1e22 and -1e22 in alternate rows for the
    last 50 of 200 pixels, so that their d logits is huge but sums to zero over the batch (the
    bias gradient stays ordinary), and that layer's weights 0, so that nothing flows back to
    the other layers. No step. At 80 rows (300 x 200 weights) two threads split the layer's
    backward, and the overflowing rows (features 150-199) are the second thread's; 4 rows stay
    on one thread."""
    m = hvae.HVAE(200, [2], [[300]], activation="tanh", seed=0)
    table = {name: (off, shape) for name, off, shape in m._core.param_table()}
    off, shape = table["dec1.1.weight"]
    bias_off = table["dec1.1.bias"][0]
    m.params[off:off + shape[0] * shape[1]] = 0
    rng = np.random.default_rng(1)
    x = (rng.random((B, 200)) < 0.5).astype(np.float32)
    target = x.copy()
    target[:, 150:] = np.where((np.arange(B) % 2 == 0)[:, None], 1e22, -1e22)
    m1, m2, grad = np.zeros_like(m.params), np.ones_like(m.params), np.zeros_like(m.params)
    before = [a.copy() for a in (m.params, m1, m2)]
    loss, _, ok = m._core.train_step(m.params, m1, m2, grad, x, m.draw_eps(B), 1, target=target,
                                     threads=threads)
    assert np.isfinite(loss) and not ok
    limit = np.sqrt(np.finfo(np.float32).max) / 2
    big = np.flatnonzero(~(np.abs(grad) <= limit))
    assert big.size and np.all((big >= off + 150 * shape[1]) & (big < off + shape[0] * shape[1]))
    assert np.all(np.abs(grad[bias_off:bias_off + shape[0]]) <= 1)
    for a, b in zip((m.params, m1, m2), before):
        np.testing.assert_array_equal(a, b)


def test_fit_n_jobs_in_python_threads_matches_sequential():
    """Two models trained at once from two Python threads, each on a team of two threads, give
    the results of training them one after the other."""
    X = (np.random.default_rng(0).random((256, 300)) < 0.3).astype(np.float32)

    def train(seed):
        return hvae.HVAE(**CONFIGS[6], seed=seed).fit(X, epochs=2, batch_size=64, progress=False,
                                                      n_jobs=2)
    want = [train(s).params for s in (0, 1)]
    got = [None, None]

    def work(k):
        got[k] = train(k).params
    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def _train_in_child(model, X, queue):
    model.fit(X, epochs=1, batch_size=64, progress=False, n_jobs=2)
    queue.put(model.params.copy())


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork")
def test_forked_child_trains_with_threads():
    """A child forked after training with n_jobs=2 has none of the parent's worker threads: it
    starts its own team instead of waiting for them."""
    X = (np.random.default_rng(0).random((128, 300)) < 0.3).astype(np.float32)
    m = hvae.HVAE(**CONFIGS[6], seed=0).fit(X, epochs=1, batch_size=64, progress=False,
                                            n_jobs=2)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_train_in_child, args=(m, X, queue))
    child.start()
    params = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    m.fit(X, epochs=1, batch_size=64, progress=False, n_jobs=2)
    np.testing.assert_array_equal(params, m.params)


def _args(core, dtype, P, B=2, D=4, T=1):
    return dict(params=np.zeros(P, dtype), m=np.zeros(P, dtype), v=np.zeros(P, dtype),
                grad=np.zeros(P, dtype), x=np.zeros((B, D), dtype),
                eps=[np.zeros((B, 3), dtype)][:T], step=1)


BAD = [  # (change to the valid arguments, exception, words in the message)
    (lambda a: a.update(params=a["params"].astype(np.float64)), TypeError,
     "params: expected dtype"),
    (lambda a: a.update(params=list(a["params"])), TypeError, "params: expected a numpy.ndarray"),
    (lambda a: a.update(m=a["m"][:-1]), ValueError, "m: expected shape"),
    (lambda a: a.update(v=np.zeros(2 * len(a["v"]), np.float32)[::2]), ValueError,
     "v: expected a C-contiguous"),
    (lambda a: a.update(grad=a["params"]), ValueError, "grad: must not share memory with params"),
    (lambda a: a.update(v=a["m"]), ValueError, "v: must not share memory with m"),
    (lambda a: a.update(x=a["x"][:, :3]), ValueError, "x: expected shape (batch, 4)"),
    (lambda a: a.update(x=np.full((2, 4), np.nan, np.float32)), ValueError, "x: expected finite"),
    (lambda a: a.update(x="abc"), TypeError, "x: expected"),
    (lambda a: a.update(eps=None), ValueError, "eps: expected a list"),
    (lambda a: a.update(eps=[np.zeros((3, 3), np.float32)]), ValueError, "eps[0]: expected shape"),
    (lambda a: a.update(step=0), ValueError, "step: expected an integer in [1"),
    (lambda a: a.update(step=1.5), TypeError, "step: expected an integer"),
    (lambda a: a.update(lr=-1.0), ValueError, "lr: expected"),
    (lambda a: a.update(beta1=1.0), ValueError, "beta1: expected"),
    (lambda a: a.update(beta2=1 - 1e-9), ValueError, "beta2: expected a number < 1"),
    (lambda a: a.update(adam_eps=0.0), ValueError, "adam_eps: expected"),
    (lambda a: a.update(adam_eps=1e-50), ValueError, "adam_eps: expected a number > 0"),
    (lambda a: a.update(beta="x"), TypeError, "beta: expected a number"),
    (lambda a: a.update(target=np.zeros((3, 4), np.float32)), ValueError, "target: expected shape"),
    (lambda a: a.update(threads=0), ValueError, "threads: expected an integer in [1, 64]"),
    (lambda a: a.update(threads=_core.MAX_THREADS + 1), ValueError, "threads: expected"),
    (lambda a: a.update(threads="2"), TypeError, "threads: expected an integer"),
]


@pytest.mark.parametrize("change, exc, words", BAD)
def test_train_step_rejects(change, exc, words):
    core = _core.Model(4, [3], [[5]], dtype="float32")
    args = _args(core, np.float32, core.n_params)
    change(args)
    before = {k: np.array(v, copy=True) for k, v in args.items()
              if k in ("params", "m", "v", "grad") and isinstance(v, np.ndarray)}
    with pytest.raises(exc) as info:
        core.train_step(**args)
    assert str(info.value).startswith(words), str(info.value)
    for k, b in before.items():
        np.testing.assert_array_equal(args[k], b)


def test_train_step_rejects_grad_sharing_the_batch():
    core = _core.Model(4, [3], [[5]], dtype="float32")
    P = core.n_params
    buf = np.zeros(P + 8, np.float32)
    args = _args(core, np.float32, P)
    args["grad"] = buf[:P]
    args["x"] = buf[P - 4:P + 4].reshape(2, 4)
    with pytest.raises(ValueError, match="grad: must not share memory with x"):
        core.train_step(**args)


def test_forward_rejects_bad_threads():
    core = _core.Model(4, [3], [[5]], dtype="float32")
    x, eps = np.zeros((2, 4), np.float32), [np.zeros((2, 3), np.float32)]
    with pytest.raises(ValueError, match=r"threads: expected an integer in \[1, 64\], got 0"):
        core.forward(np.zeros(core.n_params, np.float32), x, None, eps, threads=0)
    with pytest.raises(TypeError, match="threads: expected an integer"):
        core.forward(np.zeros(core.n_params, np.float32), x, None, eps, threads=None)


def test_n_jobs_out_of_range():
    m = hvae.HVAE(4, [2], [[3]], seed=0)
    with pytest.raises(ValueError, match="n_jobs"):
        m.loss_and_grad(np.zeros((2, 4)), n_jobs=_core.MAX_THREADS + 1)


def _our_openblas():
    """threadpoolctl's controllers of hvae's OpenBLAS (not the copies NumPy and SciPy bundle;
    hvae's may be the scipy-openblas32 wheel's)."""
    import threadpoolctl
    ctl = threadpoolctl.ThreadpoolController().select(internal_api="openblas")
    ours = [c for c in ctl.lib_controllers
            if not any(bundled in c.filepath for bundled in ("numpy.libs", "scipy.libs"))]
    assert ours, [c.filepath for c in ctl.lib_controllers]
    return ours


@pytest.mark.parametrize("entry", ["forward", "encode", "decode"])
def test_one_thread_call_runs_blas_at_one_thread(entry):
    """n_jobs = 1 means one thread: during a core call of one thread hvae's OpenBLAS is at one
    thread too (seen from another Python thread while the calls run, the GIL released: all but
    the readings in the moments between calls, before the first and after the last), and
    afterwards back at the count it had."""
    import threading

    import threadpoolctl
    ours = _our_openblas()
    m = hvae.HVAE(784, [50], [[400, 400]], seed=0)
    x = (np.random.default_rng(0).random((20000, 784)) < 0.4).astype(np.float32)
    eps = m.draw_eps(20000)
    seen, done = [], threading.Event()

    z = np.zeros((20000, 50), np.float32)
    calls = {"forward": lambda: m._core.forward(m.params, x, None, eps, threads=1),
             "encode": lambda: m._core.encode(m.params, x, eps),
             "decode": lambda: m._core.decode(m.params, z, 1)}

    def call():
        try:
            for _ in range(3):
                calls[entry]()
        finally:
            done.set()

    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        worker = threading.Thread(target=call)
        worker.start()
        while not done.wait(0.01):
            seen.append([c.num_threads for c in ours])
        worker.join()
        assert [c.num_threads for c in ours] == [2] * len(ours)
    at_one = sum(s == [1] * len(ours) for s in seen)
    assert len(seen) >= 10 and at_one >= 0.8 * len(seen), (at_one, len(seen))


def test_team_call_restores_the_blas_thread_count():
    """While a call with a team runs, hvae's OpenBLAS runs at one thread (else its threads would
    compete with the team's); afterwards it has the count it had before."""
    import threadpoolctl
    ours = _our_openblas()
    m = hvae.HVAE(**CONFIGS[6], seed=0)
    x = (np.random.default_rng(0).random((64, m.x_dim)) < 0.4).astype(np.float32)
    g, m1, m2 = np.zeros_like(m.params), np.zeros_like(m.params), np.zeros_like(m.params)
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        for threads in (1, 2, 3):
            m._core.train_step(m.params, m1, m2, g, x, m.draw_eps(64), 1, threads=threads)
            m._core.forward(m.params, x, None, m.draw_eps(64), grad=g, threads=threads)
            assert [c.num_threads for c in ours] == [2] * len(ours)
