"""HVAE.fit / partial_fit: determinism, resuming, warm-up, early stopping, safe stops."""
import warnings

import numpy as np
import pytest

import hvae
from hvae.training import warmup_beta


def binary_data(n=300, d=20, seed=0):
    rng = np.random.default_rng(seed)
    proto = rng.random((4, d)) < 0.5
    return (proto[rng.integers(0, 4, n)] ^ (rng.random((n, d)) < 0.05)).astype(np.float32)


def small(seed=0, **kw):
    return hvae.HVAE(20, [6, 3], [[16], [8]], seed=seed, **kw)


# the schedule these tests were written for (they are about other things): constant lr, the KL
# at full weight from the first step
FLAT = dict(lr_decay=1.0, kl_warmup_epochs=0, kl_warmup_delay=0)


def test_fit_learns_and_records_history():
    X = binary_data()
    m = small(kl="mc")
    before = -np.mean(m.elbo(X))
    m.fit(X, epochs=8, batch_size=32, lr=3e-3, validation_data=X[:50], progress=False, **FLAT)
    after = -np.mean(m.elbo(X))
    assert after < before - 2, (before, after)
    assert [r["epoch"] for r in m.history_] == list(range(1, 9))
    r = m.history_[-1]
    assert set(r) >= {"loss", "reconstruction", "kl", "val_loss", "seconds", "beta", "lr"}
    assert len(r["kl"]) == 2 and r["val_loss"] is not None and r["seconds"] > 0
    np.testing.assert_allclose(r["loss"], r["reconstruction"] + sum(r["kl"]), rtol=1e-5)


def test_same_seed_same_parameters_and_resume_is_exact(tmp_path):
    """epochs counts the run's epochs, those done included: a run stopped after 2 of 4 and
    continued with no settings, in memory or from its checkpoint, is the 4-epoch run bit for
    bit (the lr schedule, the warm-up, batch size and beta come back from the run)."""
    X = binary_data()
    run = dict(epochs=4, batch_size=50, lr=4e-3, kl_warmup_epochs=1.5, kl_warmup_delay=0.5,
               beta=0.8, progress=False)
    a = small(seed=3).fit(X, **run)
    b = small(seed=3).fit(X, **run)
    np.testing.assert_array_equal(a.params, b.params)
    assert len({r["lr"] for r in a.history_}) == 4  # the schedule is not flat
    stop2 = [lambda model, rec: rec["epoch"] == 2]
    c = small(seed=3).fit(X, **run, callbacks=stop2)
    assert len(c.history_) == 2
    c.fit(X, progress=False)
    np.testing.assert_array_equal(a.params, c.params)
    d = small(seed=3).fit(X, **run, callbacks=stop2, checkpoint=tmp_path / "c.npz")
    e = hvae.load(tmp_path / "c.npz")
    assert e.train_config_ == d.train_config_
    e.fit(X, progress=False)
    np.testing.assert_array_equal(a.params, e.params)
    assert [r["epoch"] for r in e.history_] == [1, 2, 3, 4]
    assert [r["lr"] for r in e.history_] == [r["lr"] for r in a.history_]
    assert d.optimizer_.step * 2 == e.optimizer_.step
    f = small(seed=4).fit(X, **run)
    assert not np.array_equal(a.params, f.params)


def test_new_settings_override_and_are_reported():
    X = binary_data()
    m = small().fit(X, epochs=2, batch_size=50, progress=False, **FLAT)
    with pytest.warns(UserWarning, match=r"from epoch 3: epochs 2 -> 3, lr 0.001 -> 0.002"):
        m.fit(X, epochs=3, lr=2e-3, progress=False)
    assert m.history_[-1]["lr"] == 2e-3 and m.train_config_["batch_size"] == 50
    with pytest.warns(UserWarning, match="nothing to train: the model has done 3 epochs"):
        m.fit(X, progress=False)
    assert len(m.history_) == 3


def test_lr_schedule_and_defaults():
    """lr falls exponentially from lr in the first epoch to lr * lr_decay in the last; the
    defaults are the MNIST recipe (warm-up 5 + 20 epochs, lr 1e-3 falling tenfold)."""
    assert hvae.training.TRAIN_DEFAULTS == {
        "epochs": 50, "batch_size": 100, "lr": 1e-3, "lr_decay": 0.1, "kl_warmup_epochs": 20,
        "kl_warmup_delay": 5, "beta": 1.0, "free_bits": None, "objective": "elbo", "k": 1,
        "gradient": "standard", "patience": 0}
    m = small().fit(binary_data(), epochs=30, batch_size=300, progress=False)
    lrs = [r["lr"] for r in m.history_]
    assert lrs[0] == 1e-3 and lrs[-1] == pytest.approx(1e-4, rel=1e-12)
    np.testing.assert_allclose(np.diff(np.log(lrs)), np.log(0.1) / 29, rtol=1e-9)
    assert [r["beta"] for r in m.history_[:5]] == [0.0] * 5
    assert m.history_[5]["beta"] == pytest.approx(1 / 20)
    assert m.history_[24]["beta"] == 1.0
    with pytest.warns(UserWarning, match="before the KL warm-up does"):
        small().fit(binary_data(), epochs=3, progress=False)


def test_kl_warmup_and_beta():
    assert warmup_beta(1.0, 0, 0, 10) == 1.0
    assert warmup_beta(1.0, 2, 0, 10) == pytest.approx(0.05)
    assert warmup_beta(0.5, 2, 19, 10) == pytest.approx(0.5)
    assert warmup_beta(0.5, 2, 100, 10) == pytest.approx(0.5)
    X = binary_data()
    m = small().fit(X, epochs=3, batch_size=100, kl_warmup_epochs=2, kl_warmup_delay=0,
                    progress=False)
    assert [r["beta"] for r in m.history_] == pytest.approx([0.5, 1.0, 1.0])
    m = small().fit(X, epochs=1, batch_size=100, beta=4.0, progress=False, **FLAT)
    r = m.history_[0]
    np.testing.assert_allclose(r["loss"], r["reconstruction"] + 4 * sum(r["kl"]), rtol=1e-5)


def test_kl_warmup_delay():
    """KL weight 0 for the delay, then the linear warm-up; a delay of 0 changes nothing."""
    assert warmup_beta(1.0, 2, 0, 10, delay_epochs=1) == 0.0
    assert warmup_beta(1.0, 2, 9, 10, delay_epochs=1) == 0.0
    assert warmup_beta(1.0, 2, 10, 10, delay_epochs=1) == pytest.approx(0.05)
    assert warmup_beta(1.0, 2, 29, 10, delay_epochs=1) == pytest.approx(1.0)
    assert warmup_beta(0.5, 0, 10, 10, delay_epochs=1) == 0.5
    assert warmup_beta(0.5, 0, 9, 10, delay_epochs=1) == 0.0
    X = binary_data()
    m = small().fit(X, epochs=4, batch_size=100, kl_warmup_epochs=2, kl_warmup_delay=1,
                    progress=False)
    assert [r["beta"] for r in m.history_] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    r = m.history_[0]  # at beta = 0 the loss is the reconstruction alone
    np.testing.assert_allclose(r["loss"], r["reconstruction"], rtol=1e-6)


def test_early_stopping_keeps_best_parameters():
    X = binary_data()
    seen = []
    m = small(kl="mc")
    m.fit(X[:100], epochs=30, batch_size=10, lr=0.05, validation_data=X[100:], patience=2,
          progress=False, callbacks=[lambda model, rec: seen.append(model.params.copy())],
          **FLAT)
    vals = [r["val_loss"] for r in m.history_]
    assert len(vals) < 30  # stopped early
    best = int(np.argmin(vals))
    assert len(vals) == best + 3
    np.testing.assert_array_equal(m.params, seen[best])
    assert m.train_config_["epochs"] == len(vals)  # the run ended there: nothing left to resume
    with pytest.warns(UserWarning, match="nothing to train"):
        m.fit(X[:100], validation_data=X[100:], progress=False)


def test_resume_with_patience_is_exact(tmp_path):
    """The best epoch so far and its parameters are in the checkpoint: an early-stopping run
    stopped and resumed picks the same best epoch and ends with the same parameters."""
    X = binary_data()
    run = dict(epochs=30, batch_size=10, lr=0.05, validation_data=X[100:], patience=3,
               progress=False, **FLAT)
    a = small(kl="mc").fit(X[:100], **run)
    stopped = len(a.history_)
    assert stopped < 30 and int(np.argmin([r["val_loss"] for r in a.history_])) < stopped - 2
    path = tmp_path / "p.npz"

    def ctrl_c(model, rec):
        if rec["epoch"] == stopped - 1:
            raise KeyboardInterrupt

    with pytest.warns(RuntimeWarning, match="interrupted"):
        small(kl="mc").fit(X[:100], **run, checkpoint=path, callbacks=[ctrl_c])
    b = hvae.load(path)
    assert b.best_ is not None and b.best_[1] < stopped - 1
    b.fit(X[:100], validation_data=X[100:], progress=False)
    assert len(b.history_) == stopped
    np.testing.assert_array_equal(a.params, b.params)


def test_callback_can_stop():
    m = small().fit(binary_data(), epochs=10, progress=False,
                    callbacks=[lambda model, rec: rec["epoch"] == 3])
    assert len(m.history_) == 3


class FaultyCore:
    """Wraps the core: makes training step `at` return a NaN loss (the step not taken) or raise
    KeyboardInterrupt."""

    def __init__(self, core, at, fault):
        self.core, self.at, self.fault, self.calls, self.params_before = core, at, fault, 0, None

    def train_step(self, params, *args, **kw):
        self.calls += 1
        if self.calls == self.at:
            self.params_before = params.copy()
            if self.fault == "interrupt":
                raise KeyboardInterrupt
            _, _, _, x, eps, _ = args
            _, terms, _ = self.core.forward(params, x, None, eps)
            return float("nan"), terms, False
        return self.core.train_step(params, *args, **kw)

    def __getattr__(self, name):
        return getattr(self.core, name)


def test_non_finite_loss_stops_with_epoch_and_step():
    X = binary_data()
    m = small()
    m._core = FaultyCore(m._core, at=8, fault="nan")  # epoch 2 (3 steps an epoch), step 2
    with pytest.raises(FloatingPointError, match="epoch 3, step 2"):
        m.fit(X, epochs=5, batch_size=100, progress=False)
    np.testing.assert_array_equal(m.params, m._core.params_before)
    assert np.isfinite(m.params).all() and len(m.history_) == 2


def test_non_finite_gradient_changes_nothing():
    m = small(dtype="float64")
    m.fit(binary_data(), epochs=1, progress=False)
    p = m.params.copy()
    grad = np.zeros_like(p)
    grad[5] = np.inf
    assert not m.optimizer_.update(m.params, grad)
    np.testing.assert_array_equal(p, m.params)


def test_ctrl_c_leaves_model_usable():
    X = binary_data()
    m = small()
    m._core = FaultyCore(m._core, at=5, fault="interrupt")
    with pytest.warns(RuntimeWarning, match="interrupted"):
        m.fit(X, epochs=5, batch_size=100, progress=False, **FLAT)
    assert m.interrupted_ and len(m.history_) == 1
    np.testing.assert_array_equal(m.params, m._core.params_before)
    assert m.optimizer_.step == 4
    m._core = m._core.core
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.fit(X, progress=False)
    assert not m.interrupted_ and np.isfinite(m.elbo(X[:5])).all()


def test_partial_fit_is_one_epoch():
    m = small().partial_fit(binary_data(), batch_size=64)
    assert len(m.history_) == 1 and m.optimizer_.step == 5


def test_progress_bar_shows_loss_and_kl(capsys):
    small().fit(binary_data(), epochs=1, progress=True)
    err = capsys.readouterr().err
    assert "epoch 1" in err and "loss=" in err and "kl=" in err


def test_fit_rejects_bad_arguments():
    m, X = small(), binary_data()
    with pytest.raises(ValueError, match="epochs"):
        m.fit(X, epochs=-1)
    with pytest.raises(ValueError, match="batch_size"):
        m.fit(X, epochs=1, batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        m.fit(X, epochs=1, lr=np.nan)
    with pytest.raises(ValueError, match="patience"):
        m.fit(X, epochs=1, patience=2)
    with pytest.raises(ValueError, match="X"):
        m.fit(X[:, :5], epochs=1)
    with pytest.raises(ValueError, match="validation_data"):
        m.fit(X, epochs=1, validation_data=X[:, :3])
    with pytest.raises(ValueError, match="X"):
        m.fit(np.where(X > 0, np.nan, X), epochs=1, progress=False)


def test_autoencoder_validation_and_early_stopping():
    X = binary_data()
    m = small(deterministic=True).fit(X[:200], epochs=3, validation_data=X[200:], patience=5,
                                      progress=False)
    vals = [r["val_loss"] for r in m.history_]
    assert len(vals) == 3 and all(np.isfinite(vals))
    _, terms, _ = m._core.forward(m.params, X[200:])
    np.testing.assert_allclose(vals[np.argmin(vals)], terms.sum() / 100, rtol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True])
def test_n_jobs_splits_the_batch(deterministic):
    """n_jobs = 2 and 3 give the one-thread training up to float rounding, reproducibly."""
    X = binary_data()
    runs = {}
    for n_jobs in (None, 2, 3, 3):
        m = small(seed=5, dtype="float64", deterministic=deterministic)
        m.fit(X, epochs=2, batch_size=64, progress=False, n_jobs=n_jobs)
        runs.setdefault(n_jobs, []).append(m)
    for n_jobs in (2, 3):
        np.testing.assert_allclose(runs[n_jobs][0].params, runs[None][0].params, rtol=1e-9,
                                   atol=1e-12)
        assert runs[n_jobs][0].history_[-1]["loss"] == pytest.approx(
            runs[None][0].history_[-1]["loss"], rel=1e-12)
    np.testing.assert_array_equal(runs[3][0].params, runs[3][1].params)
    with pytest.raises(ValueError, match="n_jobs"):
        small().fit(X, epochs=1, n_jobs=0)


def test_loss_and_grad_n_jobs_matches_one_thread():
    m = small(seed=2, dtype="float64", kl="mc")
    X = binary_data(n=37)
    eps = m.draw_eps(37)
    want = m.loss_and_grad(X, eps)
    for n_jobs in (2, 4, 64):  # more parts than rows: empty parts are skipped
        got = m.loss_and_grad(X, eps, n_jobs=n_jobs)
        assert got[0] == pytest.approx(want[0], rel=1e-13)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-10, atol=1e-13)
    with pytest.raises(TypeError, match="eps"):
        m.loss_and_grad(X, 3, n_jobs=2)
    with pytest.raises(ValueError, match="eps"):
        m.loss_and_grad(X, eps[:1], n_jobs=2)
    with pytest.raises(ValueError, match="x"):
        m.loss_and_grad(np.where(X > 0, np.nan, X), eps, n_jobs=2)
