"""Every public method of HVAE with top-down inference: shapes, what the numbers mean, the
round trip through a checkpoint and the command line. The core's numbers against the NumPy
reference are tests/test_topdown.py."""
import copy

import numpy as np
import pytest

import hvae
import reference as ref
from hvae import cli


@pytest.fixture(scope="module")
def trained():
    """A small top-down model trained a little on binary data with structure."""
    rng = np.random.default_rng(0)
    proto = rng.random((4, 12)) < 0.5
    X = (proto[rng.integers(0, 4, 300)] ^ (rng.random((300, 12)) < 0.05)).astype(np.float32)
    m = hvae.HVAE(12, [6, 3], [[16], [8]], inference="top_down", seed=0)
    m.fit(X, epochs=15, batch_size=50, lr=3e-3, lr_decay=1.0, kl_warmup_epochs=0,
          kl_warmup_delay=0, progress=False)
    return m, X


def test_defaults_and_repr():
    m = hvae.HVAE(12, [6, 3], [[16], [8]], inference="top_down", seed=0)
    assert m.inference == "top_down" and m.prior_variance == "learned"
    assert hvae.HVAE(12, [6, 3]).inference == "bottom_up"
    assert hvae.HVAE(12, [6, 3]).prior_variance == "unit"
    assert "inference='top_down'" in repr(m) and "prior_variance" not in repr(m)
    assert "prior_variance='unit'" in repr(hvae.HVAE(12, [6, 3], [[16], [8]], seed=0,
                                                     inference="top_down",
                                                     prior_variance="unit"))
    shapes = {k: v.shape for k, v in m.named_params().items()}
    assert shapes["enc2.0.weight"] == (8, 16)  # reads d_1, encoder 1's last hidden layer
    assert shapes["dec2.1.weight"] == (12, 8)  # [m_1, s_1]


def test_training_lowers_the_loss_and_records_every_level(trained):
    m, _ = trained
    losses = [r["loss"] for r in m.history_]
    assert losses[-1] < losses[0] - 1
    assert all(len(r["kl"]) == 2 for r in m.history_)


def test_encode_is_q_at_the_posterior_means(trained):
    """encode(x): per level q(z_i | z_{i+1}, x) with z_{i+1} at its mean: the reference's
    forward at zero noise, whose z are the means."""
    m, X = trained
    x = X[:5].astype(np.float64)
    m64 = hvae.HVAE(12, [6, 3], [[16], [8]], inference="top_down", dtype="float64")
    m64.params[:] = m.params
    enc = m64.encode(x)
    out = ref.forward(m64.params, x, x, [np.zeros((5, d)) for d in (6, 3)], x_dim=12,
                      latent_dims=[6, 3], hidden_dims=[[16], [8]], likelihood="bernoulli",
                      activation="tanh", kl="analytic", prior_variance="learned",
                      inference="top_down")
    for (mu, lv), rmu, rlv in zip(enc, out["mu"], out["logvar"]):
        np.testing.assert_allclose(mu, rmu, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(lv, rlv, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(m64.transform(x), enc[-1][0])
    # sampling: the levels below the top see a sampled z_{i+1}, so they differ from the means
    sampled = m64.encode(x, sample=True)
    np.testing.assert_array_equal(sampled[-1][0], enc[-1][0])  # q(z_T | x) sees no sample
    assert not np.allclose(sampled[0][0], enc[0][0])


def test_generative_side(trained):
    m, X = trained
    s, zs = m.sample(9, return_latents=True)
    assert s.shape == (9, 12) and ((s >= 0) & (s <= 1)).all()
    assert [z.shape for z in zs] == [(9, 6), (9, 3)]
    r = m.reconstruct(X[:7])
    assert r.shape == (7, 12)
    # a trained model reconstructs better than the pixel marginals
    err = np.abs(r - X[:7]).mean()
    assert err < np.abs(X.mean(axis=0) - X[:7]).mean()
    assert m.decode(np.zeros((2, 3), np.float32)).shape == (2, 12)
    assert m.decode(np.zeros((2, 6), np.float32), level=1).shape == (2, 12)
    assert m.interpolate(X[0], X[1], steps=5).shape == (5, 12)
    assert m.traverse(X[0], level=2, dim=1, values=np.linspace(-2, 2, 4)).shape == (4, 12)
    assert m.traverse(X[0], level=1, dim=0, values=[0.0]).shape == (1, 12)


def test_evaluation(trained):
    m, X = trained
    x = X[:20]
    m._rng = np.random.default_rng(1)
    elbo = m.elbo(x)
    ll = m.log_likelihood(x, k=200)
    assert elbo.shape == ll.shape == (20,) and ll.dtype == np.float64
    assert ll.mean() > elbo.mean()  # the IWAE bound tightens with k
    assert m.score(x, k=50) == pytest.approx(m.log_likelihood(x, k=50).mean(), abs=1.0)
    # elbo_terms: the closed-form KL is unbiased here, so rec + KL ~ -log_weight on average
    xs = np.repeat(X[:1], 20000, axis=0)
    t = m.elbo_terms(xs)
    diff = t["reconstruction"] + sum(t["kl"]) + t["log_weight"]
    assert abs(diff.mean()) < 4.5 * diff.std() / np.sqrt(len(diff))


def test_partial_fit_and_free_bits_in_fit(trained):
    _, X = trained
    m = hvae.HVAE(12, [6, 3], [[16], [8]], inference="top_down", seed=1)
    m.partial_fit(X, free_bits=0.5)
    assert m.train_config_["free_bits"] == [0.5, 0.5]
    with pytest.warns(UserWarning, match=r"free_bits \[0.5, 0.5\] -> \[0.1, 0.2\]"):
        m.fit(X, epochs=2, free_bits=[0.1, 0.2], progress=False)
    assert len(m.history_) == 2
    with pytest.raises(ValueError, match="free_bits"):
        m.fit(X, epochs=3, free_bits=[0.1], progress=False)
    assert len(m.history_) == 2


def test_free_bits_keep_a_level_alive():
    """A level whose KL the data can do without collapses without free bits; with a floor
    above its KL the training loss gives it no push down."""
    rng = np.random.default_rng(2)
    X = (rng.random((400, 12)) < 0.3).astype(np.float32)  # no structure: z is useless
    kl = {}
    for fb in (None, 2.0):
        m = hvae.HVAE(12, [4], [[8]], inference="top_down", seed=3)
        m.fit(X, epochs=20, batch_size=50, lr=3e-3, lr_decay=1.0, kl_warmup_epochs=0,
              kl_warmup_delay=0, free_bits=fb, progress=False)
        kl[fb] = m.history_[-1]["kl"][0]
    assert kl[None] < 0.2 and kl[2.0] > 1.0


def test_save_load_round_trip(trained, tmp_path):
    m, X = trained
    m2 = copy.copy(m)  # the same object state, saved and loaded
    path = tmp_path / "td.npz"
    m2.save(path)
    back = hvae.load(path)
    assert back.inference == "top_down" and back.prior_variance == "learned"
    np.testing.assert_array_equal(back.params, m.params)
    eps = back.draw_eps(4)
    np.testing.assert_array_equal(back.loss_and_grad(X[:4], eps)[1],
                                  m.loss_and_grad(X[:4], eps)[1])


def test_cli_trains_a_top_down_model(tmp_path, capsys):
    path = tmp_path / "cli.npz"
    rc = cli.main(["train", "--data", "digits", "--latent-dims", "8", "4", "--inference",
                   "top_down", "--free-bits", "0.1", "--epochs", "1", "--max-examples", "200",
                   "--no-progress", "--checkpoint", str(path)])
    assert rc == 0
    m = hvae.load(path)
    assert m.inference == "top_down" and m.prior_variance == "learned"
    assert "inference='top_down'" in capsys.readouterr().out
    # resuming with a different inference is refused
    rc = cli.main(["train", "--data", "digits", "--inference", "bottom_up", "--epochs", "2",
                   "--resume", "--no-progress", "--checkpoint", str(path)])
    assert rc != 0 and "--inference" in capsys.readouterr().err
    rc = cli.main(["train", "--data", "digits", "--latent-dims", "8", "4", "--free-bits", "1",
                   "2", "3", "--epochs", "1", "--checkpoint", str(tmp_path / "x.npz")])
    assert rc == 2 and "--free-bits: 3 values for 2 levels" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()
