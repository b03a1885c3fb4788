"""Using what was learned: encode, transform, reconstruct, decode, sample, interpolate, traverse."""
import numpy as np
import pytest

import hvae


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    X = (rng.random((200, 16)) < 0.3).astype(np.float32)
    return hvae.HVAE(16, [5, 3], [[12], [8]], seed=0).fit(X, epochs=2, progress=False), X


def test_encode_and_transform(model):
    m, X = model
    enc = m.encode(X[:7])
    assert [(mu.shape, lv.shape) for mu, lv in enc] == [((7, 5), (7, 5)), ((7, 3), (7, 3))]
    np.testing.assert_array_equal(m.transform(X[:7]), enc[-1][0])
    # the chain of means: level 2 sees mu_1
    mulv, _ = m._core.encode(m.params, X[:7])
    np.testing.assert_array_equal(enc[1][0], mulv[1][:, :3])
    s1, s2 = m.encode(X[:7], sample=True), m.encode(X[:7], sample=True)
    np.testing.assert_array_equal(s1[0][0], enc[0][0])  # level 1 does not depend on noise
    assert not np.array_equal(s1[1][0], s2[1][0])


def test_reconstruct_and_sample(model):
    m, X = model
    r = m.reconstruct(X[:4])
    assert r.shape == (4, 16) and (r >= 0).all() and (r <= 1).all()
    x, zs = m.sample(9, return_latents=True)
    assert x.shape == (9, 16) and [z.shape for z in zs] == [(9, 5), (9, 3)]
    assert ((x >= 0) & (x <= 1)).all()
    cold = m.sample(3, temperature=0.0)
    np.testing.assert_allclose(cold, np.repeat(m.decode(np.zeros((1, 3))), 3, axis=0), rtol=1e-6)
    with pytest.raises(ValueError, match="n"):
        m.sample(0)
    with pytest.raises(ValueError, match="temperature"):
        m.sample(2, temperature=-1)


def test_decode_from_a_level(model):
    m, X = model
    mu1 = m.encode(X[:3])[0][0]
    np.testing.assert_allclose(m.decode(mu1, level=1), m.reconstruct(X[:3]), rtol=1e-6)
    x, zs = m.decode(np.zeros((2, 3)), return_latents=True, temperature=0.5)
    assert x.shape == (2, 16) and zs[0].shape == (2, 5)


def test_interpolate_and_traverse(model):
    m, X = model
    path = m.interpolate(X[0], X[1], steps=5)
    assert path.shape == (5, 16)
    np.testing.assert_allclose(path[0], m.decode(m.transform(X[:1]))[0], rtol=1e-5)
    np.testing.assert_allclose(path[-1], m.decode(m.transform(X[1:2]))[0], rtol=1e-5)
    t = m.traverse(X[0], level=2, dim=1, values=np.linspace(-2, 2, 7))
    assert t.shape == (7, 16) and not np.allclose(t[0], t[-1])
    mu2 = m.transform(X[:1])[0, 1]
    np.testing.assert_allclose(m.traverse(X[0], 2, 1, [mu2])[0], path[0], rtol=1e-5)
    with pytest.raises(ValueError, match="level"):
        m.traverse(X[0], level=3, dim=0, values=[0])
    with pytest.raises(ValueError, match="dim"):
        m.traverse(X[0], level=1, dim=5, values=[0])


def test_gaussian_likelihood_returns_means():
    m = hvae.HVAE(6, [2], likelihood="gaussian_learned", seed=0)
    x = m.sample(4)
    assert x.shape == (4, 6)
    xp, _ = m._core.decode(m.params, np.zeros((1, 2)), level=1)
    np.testing.assert_allclose(m.decode(np.zeros((1, 2))), xp[:, :6])
