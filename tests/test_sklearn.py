"""scikit-learn's estimator protocol: get_params / set_params, clone, warm_start, fit(X, y),
transform, fit_transform, score_samples, score; a Pipeline into LogisticRegression and a
GridSearchCV over latent_dims; the checks of sklearn.utils.estimator_checks that apply.

The checks run one by one, each at the width of the data it generates (x_dim is a constructor
argument, so a check whose data has three columns needs x_dim=3). Those left out, and why:

- check_no_attributes_set_in_init, check_do_not_raise_errors_in_init_or_set_params,
  check_n_features_in: the model exists from construction (``params`` drawn and the
  arguments validated by ``__init__``, evaluation before any fit), by design.
- check_n_features_in_after_fitting, check_fit2d_predict1d,
  check_estimators_empty_data_messages, check_complex_data, check_dtype_object: they match
  scikit-learn's own error wording ("X has 3 features, but ... is expecting", "Reshape your
  data", "0 feature(s)") or expect object arrays to be converted; hvae refuses such input with
  its own messages naming the argument (tests/test_bad_input.py).
- check_methods_sample_order_invariance, check_methods_subset_invariance,
  check_pipeline_consistency: score_samples and score are importance-sampled estimates that
  draw fresh noise from the model's stream on every call, so they differ between calls.
- check_array_api_input: no array API support (NumPy arrays only).
"""
import subprocess
import sys

import numpy as np
import pytest

from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.utils import estimator_checks

import hvae

# a constant step size and no KL warm-up: a run's numbers do not depend on its planned length
FIT = dict(batch_size=20, lr_decay=1.0, kl_warmup_delay=0, kl_warmup_epochs=0, progress=False)


def small(**kw):
    return hvae.HVAE(**{"x_dim": 6, "latent_dims": [3], "hidden_dims": [[8]], "seed": 0,
                        "dtype": "float64", **kw})


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X / 16.0, y


def test_import_does_not_import_sklearn():
    code = "import sys, hvae; hvae.HVAE(4, [2]); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_get_params_returns_the_arguments_as_passed():
    latent, x_dim = 3, np.int64(6)
    m = hvae.HVAE(x_dim, latent, seed=1)
    p = m.get_params()
    assert p["x_dim"] is x_dim and p["latent_dims"] is latent
    assert p["hidden_dims"] is None and p["prior_variance"] is None and p["warm_start"] is True
    assert sorted(p) == sorted(["x_dim", "latent_dims", "hidden_dims", "likelihood",
                                "activation", "kl", "dtype", "seed", "deterministic", "init",
                                "prior_variance", "inference", "warm_start"])
    # the attributes keep the resolved architecture
    assert m.latent_dims == [3] and m.hidden_dims == [[6, 6]] and m.prior_variance == "unit"
    assert hvae.HVAE(6, [3, 2], inference="top_down").prior_variance == "learned"
    assert m.get_params(deep=False) == p


def test_clone_builds_the_same_untrained_model():
    m = small(latent_dims=(3,), hidden_dims=None, prior_variance=None)
    X = np.random.default_rng(0).random((40, 6))
    m.fit(X, epochs=2, **FIT)
    c = clone(m)
    assert c is not m and c.get_params() == m.get_params()
    assert c.history_ == [] and c.optimizer_ is None
    assert np.array_equal(c.params, small(latent_dims=(3,), hidden_dims=None).params)
    assert not np.shares_memory(c.params, m.params)
    assert repr(c) == repr(small(latent_dims=[3], hidden_dims=[[6, 6]]))


def test_set_params_rebuilds_and_refuses_without_changing_anything():
    m = small(hidden_dims=[8])  # one list for every level
    X = np.random.default_rng(0).random((40, 6))
    m.fit(X, epochs=1, **FIT)
    before = m.n_params
    assert m.set_params(latent_dims=[3, 2]) is m
    assert m.latent_dims == [3, 2] and m.n_params != before and m.history_ == []
    assert np.array_equal(m.params, small(latent_dims=[3, 2], hidden_dims=[8]).params)
    assert m.get_params()["latent_dims"] == [3, 2]
    m.fit(X, epochs=1, **FIT)  # the rebuilt model trains
    snapshot = (m.params.copy(), repr(m), m.get_params(), len(m.history_))
    with pytest.raises(ValueError, match="'latnt_dims' is not a parameter of HVAE"):
        m.set_params(latnt_dims=[2])
    with pytest.raises(ValueError, match="likelihood"):
        m.set_params(likelihood="poisson")
    with pytest.raises(TypeError, match="warm_start"):
        m.set_params(warm_start="no")
    assert np.array_equal(m.params, snapshot[0]) and repr(m) == snapshot[1]
    assert m.get_params() == snapshot[2] and len(m.history_) == snapshot[3]
    assert m.set_params() is m and np.array_equal(m.params, snapshot[0])  # no arguments: no-op


def test_warm_start_true_continues_the_run_false_starts_over(tmp_path):
    X = np.random.default_rng(1).random((60, 6))
    X2 = np.random.default_rng(2).random((60, 6))
    four = small().fit(X, epochs=4, **FIT)
    # warm_start=True (the default): fit continues the run, whose length is epochs
    grown = small().fit(X, epochs=2, **FIT).fit(X, epochs=4, **FIT)
    assert np.array_equal(grown.params, four.params) and len(grown.history_) == 4
    done = small().fit(X, epochs=2, **FIT)
    kept = done.params.copy()
    with pytest.warns(UserWarning, match="nothing to train"):
        done.fit(X2, epochs=2, **FIT)  # the run is over: other data change nothing
    assert np.array_equal(done.params, kept) and len(done.history_) == 2
    # warm_start=False: every fit is a new run from the seed, on whatever data it is given
    cold = small(warm_start=False).fit(X, epochs=3, **FIT).fit(X2, epochs=2, **FIT)
    fresh = small().fit(X2, epochs=2, **FIT)
    assert np.array_equal(cold.params, fresh.params) and len(cold.history_) == 2
    assert cold.optimizer_.step == fresh.optimizer_.step and cold.train_config_["epochs"] == 2
    # partial_fit always continues
    cold.partial_fit(X2)
    assert len(cold.history_) == 3
    assert np.array_equal(cold.params, small().fit(X2, epochs=2, **FIT).partial_fit(X2).params)
    # refused fit arguments leave a warm_start=False model as it was
    kept = cold.params.copy()
    with pytest.raises(ValueError, match="batch_size"):
        cold.fit(X, epochs=1, batch_size=0)
    assert np.array_equal(cold.params, kept) and len(cold.history_) == 3
    # the flag survives a checkpoint; a warm model stopped halfway resumes its run exactly
    cold.save(tmp_path / "cold.npz")
    assert hvae.load(tmp_path / "cold.npz").warm_start is False
    half = small().fit(X, epochs=4, callbacks=[lambda m, r: r["epoch"] == 2], **FIT)
    assert len(half.history_) == 2
    half.save(tmp_path / "half.npz")
    resumed = hvae.load(tmp_path / "half.npz").fit(X)
    assert np.array_equal(resumed.params, four.params) and len(resumed.history_) == 4


def test_fit_ignores_y_and_returns_self():
    X = np.random.default_rng(2).random((40, 6))
    a = small()
    assert a.fit(X, np.arange(40), epochs=2, **FIT) is a
    b = small().fit(X, epochs=2, **FIT)
    assert np.array_equal(a.params, b.params)
    c = small()
    assert c.partial_fit(X, np.arange(40), batch_size=20) is c


def test_transform_fit_transform_score_samples_score():
    X = np.random.default_rng(3).random((30, 6))
    Z = small().fit_transform(X, epochs=2, **FIT)
    m = small().fit(X, epochs=2, **FIT)
    assert Z.shape == (30, 3) and np.array_equal(Z, m.transform(X))
    assert np.array_equal(Z, m.encode(X)[-1][0])
    state = m._rng.bit_generator.state
    s = m.score_samples(X, k=20)
    m._rng.bit_generator.state = state
    assert s.shape == (30,) and s.dtype == np.float64
    assert np.array_equal(s, m.log_likelihood(X, k=20))
    m._rng.bit_generator.state = state
    assert m.score(X, np.zeros(30), k=20) == pytest.approx(s.mean(), rel=1e-12)
    with pytest.raises(ValueError, match="k"):
        m.score_samples(X, k=0)


def test_pipeline_of_hvae_features_into_logistic_regression(digits):
    X, y = digits
    train, test = slice(0, 1200), slice(1200, None)
    pipe = Pipeline([("vae", hvae.HVAE(64, [10], [[64]], seed=0)),
                     ("clf", LogisticRegression(max_iter=2000))])
    assert pipe.fit(X[train], y[train], vae__epochs=8, vae__batch_size=50,
                    vae__kl_warmup_delay=0, vae__kl_warmup_epochs=2, vae__progress=False) is pipe
    vae = pipe.named_steps["vae"]
    assert len(vae.history_) == 8 and vae.train_config_["kl_warmup_epochs"] == 2
    accuracy = pipe.score(X[test], y[test])
    assert accuracy > 0.6, accuracy  # 10 classes: chance is 0.1
    assert np.array_equal(pipe.predict(X[test]),
                          pipe.named_steps["clf"].predict(vae.transform(X[test])))
    # get_params / set_params through the pipeline's names
    assert pipe.get_params()["vae__latent_dims"] == [10]
    pipe.set_params(vae__latent_dims=[4])
    assert pipe.named_steps["vae"].latent_dims == [4]
    assert pipe.named_steps["vae"].history_ == []


def test_grid_search_over_latent_dims(digits):
    X, _ = digits
    grid = GridSearchCV(hvae.HVAE(64, [2], [[32]], seed=0),
                        {"latent_dims": [[2], [8]]}, cv=2)
    grid.fit(X[:200], epochs=4, batch_size=50, kl_warmup_delay=0, kl_warmup_epochs=0,
             progress=False)  # each fold scored by its log-likelihood, k = 5000
    scores = grid.cv_results_["mean_test_score"]
    assert len(scores) == 2 and np.isfinite(scores).all()
    assert grid.best_params_ == {"latent_dims": [[2], [8]][int(np.argmax(scores))]}
    best = grid.best_estimator_
    assert best.latent_dims == grid.best_params_["latent_dims"] and len(best.history_) == 4
    # the base estimator was cloned, never fitted
    assert grid.estimator.history_ == [] and grid.estimator.latent_dims == [2]


# (check, x_dim: the width of the data the check generates[, the check's keyword arguments])
CHECKS = [
    ("check_estimator_cloneable", 3), ("check_estimator_tags_renamed", 3),
    ("check_valid_tag_types", 3), ("check_estimator_repr", 3), ("check_mixin_order", 3),
    ("check_parameters_default_constructible", 3), ("check_get_params_invariance", 3),
    ("check_set_params", 3), ("check_transformer_n_iter", 3), ("check_fit1d", 3),
    ("check_estimators_overwrite_params", 2), ("check_estimators_fit_returns_self", 2),
    ("check_readonly_memmap_input", 2), ("check_fit_idempotent", 2),
    ("check_fit_check_is_fitted", 2), ("check_fit_score_takes_y", 3),
    ("check_dont_overwrite_parameters", 3), ("check_estimators_nan_inf", 3),
    ("check_f_contiguous_array_estimator", 3), ("check_transformer_data_not_an_array", 3),
    ("check_transformer_general", 3), ("check_transformer_preserve_dtypes", 3),
    ("check_dict_unchanged", 3), ("check_positive_only_tag_during_fit", 4),
    ("check_estimators_dtypes", 5), ("check_transformers_unfitted_stateless", 5),
    ("check_fit2d_1sample", 10), ("check_fit2d_1feature", 1),
    ("check_estimator_sparse_tag", 3), ("check_estimator_sparse_array", 3),
    ("check_estimator_sparse_matrix", 3), ("check_estimators_pickle", 3),
    ("check_estimators_pickle", 3, {"readonly_memmap": True}),
]


def checked(x_dim, warm_start):
    return hvae.HVAE(x_dim, [2], [[4]], likelihood="gaussian", dtype="float64", seed=0,
                     warm_start=warm_start)


@pytest.mark.parametrize("warm_start", [False, True])
@pytest.mark.parametrize("check", CHECKS, ids=[c[0] + ("[readonly_memmap]" if c[2:] else "")
                                               for c in CHECKS])
# set_params rebuilds the model, so a refused value is refused there, not in a later fit
@pytest.mark.filterwarnings("ignore:.*It is recommended to delay parameter validation")
def test_estimator_check(check, warm_start):
    name, x_dim, kwargs = (*check, {})[:3]
    getattr(estimator_checks, name)("HVAE", checked(x_dim, warm_start), **kwargs)
