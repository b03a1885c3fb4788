"""The core's counter-based noise (csrc/noise.h, ``_core.Model.noise``) and the evaluation that
draws with it: the numbers of the reference written from the papers (tests/reference_noise.py,
Philox from NumPy), the standard normal distribution, independence, and invariance to how the
rows are split over calls, threads and dtypes."""
import math

import numpy as np
import pytest

import hvae
import reference_noise
from hvae import evaluation

SEED = 20261201


def model(dtype="float64", inference="bottom_up", **kw):
    return hvae.HVAE(12, [5, 3], [[8], [6]], dtype=dtype, inference=inference, seed=1, **kw)


def test_philox_of_the_reference_is_the_published_one():
    """Random123's known-answer vector for Philox4x64-10 (counter and key 0), through NumPy."""
    assert [hex(v) for v in reference_noise.philox_state(0, 0)] == [
        "0x16554d9eca36314c", "0xdb20fe9d672d0fdc", "0xd7e772cee186176b", "0x7e68b68aec7ba23b"]


@pytest.mark.parametrize("first_row", [0, 1, 12345, 2 ** 62 + 3, 2 ** 63 - 3])
def test_core_noise_equals_the_reference_bit_for_bit(first_row):
    m = model()
    got = m._core.noise(6, SEED, first_row)
    want = reference_noise.noise(m.latent_dims, 6, SEED, first_row)
    for g, w in zip(got, want):
        assert g.dtype == np.float64 and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def test_reference_covers_the_tail_and_the_rejections():
    """Rows whose draws take every branch (counted by the reference): the tail with a retry
    and the wedge test with a rejection, bit for bit."""
    m = hvae.HVAE(12, [200], [[8]], dtype="float64", seed=1)
    counts = {}
    want = reference_noise.noise([200], 3, 18, 53, counts)[0]
    assert counts["tail_retry"] >= 1 and counts["wedge_reject"] >= 1, counts
    assert counts["wedge"] > counts["wedge_reject"]  # accepted wedge points too
    np.testing.assert_array_equal(m._core.noise(3, 18, 53)[0], want)
    assert (np.abs(want) > reference_noise.R).sum() >= 1


def test_layers_have_their_probabilities():
    """A chi-square test of |z| over the ziggurat's 256 layer bins [x[i+1], x[i]) and the
    tail [R, inf) (255 degrees of freedom; 330 is above the 0.999 quantile): a wrong edge or
    a wrong wedge test in one layer shifts the mass of its bin."""
    m = hvae.HVAE(12, [100, 20], [[8], [6]], dtype="float64", seed=1)
    z = np.abs(np.concatenate([a.ravel() for a in m._core.noise(20000, SEED + 7, threads=2)]))
    edges = np.array([0.0] + reference_noise.X[1:][::-1][1:] + [np.inf])  # 0 < x[255] .. < R
    observed = np.histogram(z, bins=edges)[0]
    tail = np.vectorize(lambda t: math.erfc(t / math.sqrt(2)))(edges)  # P(|z| > t)
    expected = z.size * (tail[:-1] - tail[1:])
    assert len(observed) == 256 and expected.min() > 100
    chi2 = float(np.sum((observed - expected) ** 2 / expected))
    assert chi2 < 330, chi2


def test_rows_wider_than_a_chunk_equal_the_reference():
    """Levels of 600 and 257 units: the fill draws a row's normals in chunks of 256."""
    m = hvae.HVAE(12, [600, 257], [[8], [6]], dtype="float64", seed=1)
    for got, want in zip(m._core.noise(3, SEED, 5, threads=2),
                         reference_noise.noise([600, 257], 3, SEED, 5)):
        np.testing.assert_array_equal(got, want)


def test_float32_noise_is_the_float64_noise_rounded():
    got32 = model("float32")._core.noise(500, SEED, 9)
    got64 = model("float64")._core.noise(500, SEED, 9)
    for a, b in zip(got32, got64):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b.astype(np.float32))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_rows_do_not_depend_on_calls_or_threads(threads):
    m = model(inference="top_down")
    whole = m._core.noise(3000, SEED)
    parts = [m._core.noise(n, SEED, start, threads=threads)
             for start, n in ((0, 1), (1, 999), (1000, 2000))]
    for i in range(len(whole)):
        np.testing.assert_array_equal(np.concatenate([p[i] for p in parts]), whole[i])


def test_standard_normal():
    """2.4 M draws: mean, variance, skewness and kurtosis within 4.5 standard errors of
    N(0, 1)'s, the tail masses beyond 1, R (the base strip's edge) and 4 exact, and a
    Kolmogorov-Smirnov distance below its 0.1% critical value."""
    m = hvae.HVAE(12, [100, 20], [[8], [6]], dtype="float64", seed=1)
    z = np.concatenate([a.ravel() for a in m._core.noise(20000, SEED, threads=2)])
    n = z.size
    for stat, want, var in ((z.mean(), 0.0, 1.0), (z.var(), 1.0, 2.0),
                            (np.mean(z ** 3), 0.0, 15.0), (np.mean(z ** 4), 3.0, 96.0)):
        assert abs(stat - want) < 4.5 * math.sqrt(var / n), (stat, want)
    for t in (1.0, reference_noise.R, 4.0):
        p = math.erfc(t / math.sqrt(2))
        assert abs(np.mean(np.abs(z) > t) - p) < 4.5 * math.sqrt(p * (1 - p) / n), t
        assert abs(np.mean(z > t) - p / 2) < 4.5 * math.sqrt(p / 2 / n), t
    s = np.sort(z[::12])
    cdf = 0.5 * np.vectorize(math.erfc)(-s / math.sqrt(2))
    i = np.arange(1, s.size + 1) / s.size
    ks = max(np.max(i - cdf), np.max(cdf - (i - 1 / s.size)))
    assert ks < 1.95 / math.sqrt(s.size), ks


def test_rows_levels_and_seeds_are_uncorrelated():
    m = hvae.HVAE(12, [40, 40], [[8], [6]], dtype="float64", seed=1)
    a, b = m._core.noise(20000, SEED)
    other = m._core.noise(20000, SEED + 1)[0]
    bound = 4.5 / math.sqrt(a.size)
    for u, v in ((a[:-1], a[1:]), (a, b), (a, other), (a[:, :-1], a[:, 1:])):
        assert abs(np.corrcoef(u.ravel(), v.ravel())[0, 1]) < bound


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("inference", ["bottom_up", "top_down"])
def test_forward_drawing_its_noise_equals_forward_given_it(dtype, inference):
    """1200 rows: enough that the team splits the fill; with the gradient too (the backward
    reads the noise the core drew)."""
    m = model(dtype, inference)
    x = (np.random.default_rng(0).random((400, 12)) > 0.5).astype(dtype)
    eps = m._core.noise(400 * 3, SEED, 100)
    g_want, g_got = np.empty(m.n_params, dtype), np.empty(m.n_params, dtype)
    want = m._core.forward(m.params, x, None, eps, log_weight=True, objective="iwae", k=3,
                           grad=g_want, threads=2)
    got = m._core.forward(m.params, x, None, None, log_weight=True, objective="iwae", k=3,
                          noise_seed=SEED, noise_row=100, grad=g_got, threads=2)
    assert got[0] == want[0]
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_array_equal(g_got, g_want)


def test_bound_of_a_part_is_the_part_of_the_bound():
    """Example e's noise is row e k + j whatever comes before it (the offset an MPI rank's
    shard gets), in both branches: several examples per call (k <= rows) and one example in
    chunks (k > rows)."""
    m = model(inference="top_down")
    x = (np.random.default_rng(1).random((7, 12)) > 0.5).astype(np.float64)
    for k, rows in ((5, 12), (9, 4)):
        whole = evaluation._bound(m, x, k, rows, False, 1, SEED, 0)
        part = evaluation._bound(m, x[3:], k, rows, False, 2, SEED, 3)
        np.testing.assert_allclose(part, whole[3:], rtol=1e-12)
        shifted = evaluation._bound(m, x[3:], k, rows, False, 1, SEED, 0)
        assert not np.allclose(shifted, whole[3:])


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-12), ("float32", 2e-5)])
def test_log_likelihood_does_not_depend_on_batch_size_or_threads(dtype, rtol):
    m = model(dtype, inference="top_down")
    x = (np.random.default_rng(0).random((9, 12)) > 0.5).astype(dtype)
    m.fit(x, epochs=2, progress=False, kl_warmup_epochs=0, kl_warmup_delay=0)
    state = m._rng.bit_generator.state
    results = []
    for batch_size, n_jobs in ((4096, 1), (700, 2), (64, 1), (13, 3)):
        m._rng.bit_generator.state = state
        results.append(m.log_likelihood(x, k=100, batch_size=batch_size, n_jobs=n_jobs))
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], rtol=rtol)
    m._rng.bit_generator.state = state
    seed = int(m._rng.integers(0, 2 ** 63))
    eps = m._core.noise(9 * 100, seed)
    lw = m._core.forward(m.params, x, None, eps, log_weight=True, objective="iwae", k=100)[2]
    want = np.logaddexp.reduce(lw.astype(np.float64).reshape(9, 100), axis=1) - np.log(100)
    np.testing.assert_allclose(results[0], want, rtol=rtol)


def test_bad_arguments():
    m = model()
    x = np.zeros((2, 12))
    for bad, err in ((-1, ValueError), (2 ** 31, ValueError), (2.5, TypeError),
                     (True, TypeError), ("3", TypeError)):
        with pytest.raises(err, match="rows: expected an integer"):
            m._core.noise(bad, 1)
    for name in ("seed", "first_row"):
        for bad, err in ((-1, ValueError), (2 ** 63, ValueError), (1.0, TypeError),
                         (None, TypeError)):
            args = {"seed": 1, "first_row": 0, name: bad}
            with pytest.raises(err, match=f"{name}: expected an integer"):
                m._core.noise(3, args["seed"], args["first_row"])
    with pytest.raises(ValueError, match="noise_seed: expected an integer"):
        m._core.forward(m.params, x, noise_seed=-2)
    with pytest.raises(ValueError, match="noise_row: expected an integer"):
        m._core.forward(m.params, x, noise_seed=1, noise_row=-1)
    with pytest.raises(ValueError, match="eps: must be None when noise_seed is given"):
        m._core.forward(m.params, x, None, m.draw_eps(2), noise_seed=1)
    with pytest.raises(ValueError, match="noise_row: given without noise_seed"):
        m._core.forward(m.params, x, None, m.draw_eps(2), noise_row=3)
    with pytest.raises(ValueError, match="or noise_seed"):
        m._core.forward(m.params, x)
    ae = hvae.HVAE(12, [3], [[8]], deterministic=True)
    for call in (lambda: ae._core.noise(2, 1), lambda: ae._core.forward(ae.params, x.astype(
            np.float32), noise_seed=1)):
        with pytest.raises(ValueError, match="seed: a deterministic autoencoder"):
            call()
    assert [a.shape for a in m._core.noise(0, 1)] == [(0, 5), (0, 3)]
