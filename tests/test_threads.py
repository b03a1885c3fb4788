"""Threads: the core releases the GIL, several Python threads training different models at once
get bit for bit the results of training them one after another, and calls on one shared model
from several threads are serialised (same results, no crash)."""
import threading
import time

import numpy as np

import hvae
from hvae import _core


def data(n=600, d=20, seed=0):
    rng = np.random.default_rng(seed)
    proto = rng.random((4, d)) < 0.5
    return (proto[rng.integers(0, 4, n)] ^ (rng.random((n, d)) < 0.05)).astype(np.float32)


SPECS = [  # different architectures, options and seeds
    dict(x_dim=20, latent_dims=[6, 3], hidden_dims=[[16], [8]], seed=0),
    dict(x_dim=20, latent_dims=[5], hidden_dims=[[12, 12]], kl="mc", activation="relu", seed=1),
    dict(x_dim=20, latent_dims=[4, 3, 2], hidden_dims=[[10], [6], []], dtype="float64", seed=2),
    dict(x_dim=20, latent_dims=[5], hidden_dims=[[8]], likelihood="gaussian", seed=3),
]


def run_in_threads(targets):
    """Start one thread per callable at once; re-raise the first exception; return
    (start, end) perf_counter times of each."""
    spans = [None] * len(targets)
    errors = []
    barrier = threading.Barrier(len(targets))

    def wrap(i, f):
        try:
            barrier.wait()
            t0 = time.perf_counter()
            f()
            spans[i] = (t0, time.perf_counter())
        except BaseException as exc:  # noqa: B902
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(i, f)) for i, f in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hangs"
    if errors:
        raise errors[0]
    return spans


def strip_seconds(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def test_threads_training_different_models_match_sequential_bit_for_bit():
    X = data()
    fit = dict(epochs=8, batch_size=24, progress=False)
    sequential = [hvae.HVAE(**spec).fit(X, **fit) for spec in SPECS]
    models = [hvae.HVAE(**spec) for spec in SPECS]
    spans = run_in_threads([lambda m=m: m.fit(X, **fit) for m in models])
    for a, b in zip(models, sequential):
        np.testing.assert_array_equal(a.params, b.params)
        np.testing.assert_array_equal(a.optimizer_.m, b.optimizer_.m)
        np.testing.assert_array_equal(a.optimizer_.v, b.optimizer_.v)
        assert strip_seconds(a.history_) == strip_seconds(b.history_)
    # the trainings overlapped in time (that they ran in parallel, not just interleaved, is
    # test_core_releases_the_gil_during_long_calls)
    overlapping = sum(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans)
                      for b in spans[i + 1:])
    assert overlapping >= 1, spans


def test_threads_sharing_one_model_are_serialised():
    """Forward, encode and decode on one Model from four threads at once: the workspace is
    shared, the calls take turns (a lock), every result equals the single-threaded one."""
    m = hvae.HVAE(20, [6, 3], [[16], [8]], kl="mc", dtype="float64", seed=0)
    rng = np.random.default_rng(0)
    batches = []
    for b in (3, 17, 64, 5):  # different batch sizes: the workspace is resized between calls
        x = rng.random((b, 20))
        eps = [rng.standard_normal((b, d)) for d in m.latent_dims]
        batches.append((x, eps))

    def results(x, eps):
        g = np.empty(m.n_params)
        loss, terms, lw = m._core.forward(m.params, x, None, eps, grad=g, log_weight=True)
        mulv, z = m._core.encode(m.params, x, eps)
        xp, zs = m._core.decode(m.params, eps[1], eps=[eps[0]], temperature=0.7)
        return [loss, terms, lw, g, *mulv, *z, xp, *zs]

    want = [results(x, eps) for x, eps in batches]
    got = [[] for _ in batches]

    def worker(i):
        for _ in range(40):
            got[i].append(results(*batches[i]))
    run_in_threads([lambda i=i: worker(i) for i in range(len(batches))])
    for i, runs in enumerate(got):
        for r in runs:
            for a, b in zip(r, want[i]):
                np.testing.assert_array_equal(a, b)


class Counter(threading.Thread):
    """A pure-Python loop counting as fast as the GIL lets it."""

    def __init__(self):
        super().__init__(daemon=True)
        self.count = 0
        self.stop = False

    def run(self):
        while not self.stop:
            self.count += 1


def progress_during(call, counter):
    """(counts per second of the counter thread while call() runs, seconds call() took)."""
    c0, t0 = counter.count, time.perf_counter()
    call()
    t1, c1 = time.perf_counter(), counter.count
    return (c1 - c0) / (t1 - t0), t1 - t0


def test_core_releases_the_gil_during_long_calls():
    """While the main thread is inside a long forward/backward, a pure-Python thread keeps
    counting at a good fraction of its free speed; while it is inside _vecmath (which keeps the
    GIL: it is an accuracy helper) the counter almost stops. The contrast shows the measurement
    works on a loaded machine too."""
    m = hvae.HVAE(784, [100, 50], seed=0)
    g = np.empty(m.n_params, np.float32)
    B = 256
    while True:  # a batch size whose forward + backward takes at least 0.15 s
        x = np.random.default_rng(0).random((B, 784), dtype=np.float32)
        eps = m.draw_eps(B)
        t0 = time.perf_counter()
        m._core.forward(m.params, x, None, eps, grad=g)
        if time.perf_counter() - t0 > 0.15 or B >= 16384:
            break
        B *= 2
    big = np.random.default_rng(0).random(4_000_000)

    counter = Counter()
    counter.start()
    try:
        time.sleep(0.05)
        free, _ = progress_during(lambda: time.sleep(0.15), counter)
        released, d1 = progress_during(lambda: m._core.forward(m.params, x, None, eps, grad=g),
                                       counter)
        held = []
        for _ in range(3):
            rate, _ = progress_during(lambda: _core._vecmath("tanh", big), counter)
            held.append(rate)
    finally:
        counter.stop = True
        counter.join()
    assert released > 0.2 * free, (released, free, d1)
    assert min(held) < 0.5 * released, (held, released)
