"""What a new user meets first: nonsense input refused with a hint, a never-trained model that
says so, files written where asked, the API and the command line sharing their defaults, and
the shipped checkpoints loading with the settings they were trained with."""
import glob
import inspect
import json
import os
import warnings
import zipfile

import numpy as np
import pytest

import hvae
from hvae import cli, plotting, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def binary(n=40, d=12, seed=0):
    return (np.random.default_rng(seed).random((n, d)) < 0.4).astype(np.float32)


@pytest.fixture(scope="module")
def trained():
    return hvae.HVAE(12, [4, 2], [[8], [6]], seed=0).fit(binary(), epochs=2, progress=False,
                                                         kl_warmup_epochs=1, kl_warmup_delay=0)


@pytest.mark.parametrize("pixels", [binary() * 255, (binary() * 255).astype(np.uint8),
                                    binary() - 0.5])
def test_bernoulli_refuses_targets_outside_0_1_everywhere(trained, pixels):
    m = trained
    calls = {"fit": lambda: m.fit(pixels, epochs=3, progress=False),
             "fit validation_data": lambda: m.fit(binary(), validation_data=pixels, epochs=3,
                                                  progress=False),
             "loss_and_grad": lambda: m.loss_and_grad(pixels),
             "loss_and_grad target": lambda: m.loss_and_grad(binary(), target=pixels),
             "elbo_terms": lambda: m.elbo_terms(pixels),
             "elbo": lambda: m.elbo(pixels),
             "log_likelihood": lambda: m.log_likelihood(pixels, k=2),
             "score": lambda: m.score(pixels, k=2)}
    before = m.params.copy()
    for what, call in calls.items():
        with pytest.raises(ValueError, match=r"bernoulli likelihood scores values in \[0, 1\]"
                                             r".*divide by 255.*hvae.datasets.binarize"):
            call()
    np.testing.assert_array_equal(m.params, before)
    assert len(m.history_) == 2
    # what is not scored may be anything: a denoising input against targets in [0, 1]
    assert np.isfinite(m.loss_and_grad(pixels, target=binary())[0])
    # and other likelihoods take any real values
    g = hvae.HVAE(12, [3], likelihood="gaussian", seed=0)
    assert np.isfinite(g.loss_and_grad(pixels)[0])


def test_untrained_model_warns_once():
    m = hvae.HVAE(12, [4, 2], [[8], [6]], seed=0)
    with pytest.warns(UserWarning, match="sample: this model was never trained"):
        m.sample(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.sample(3)
        m.log_likelihood(binary(3), k=2)  # once per model
    with pytest.warns(UserWarning, match="log_likelihood: this model was never trained"):
        hvae.HVAE(12, [3], seed=0).log_likelihood(binary(3), k=2)


def test_trained_and_loaded_models_do_not_warn(trained, tmp_path):
    trained.save(tmp_path / "m.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained.sample(2)
        hvae.load(tmp_path / "m.npz").log_likelihood(binary(2), k=2)


def test_writes_create_missing_folders(trained, tmp_path):
    """save, a fit checkpoint and an image all create the folders of their path, like the
    command line; nothing leaks a temporary name."""
    trained.save(tmp_path / "a" / "b" / "m.npz")
    assert hvae.load(tmp_path / "a" / "b" / "m.npz").history_ == trained.history_
    m = hvae.HVAE(12, [3], seed=0)
    m.fit(binary(), epochs=1, progress=False, checkpoint=tmp_path / "c" / "m.npz",
          kl_warmup_epochs=0, kl_warmup_delay=0)
    assert len(hvae.load(tmp_path / "c" / "m.npz").history_) == 1
    plotting.save_image_grid(tmp_path / "d" / "g.png", np.ones((4, 16)))
    assert (tmp_path / "d" / "g.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path)) == ["a", "c", "d"]


@pytest.mark.parametrize("name", ["out.jpg", "out.jpeg", "out", "out.png.tmp"])
def test_images_are_png_by_name(tmp_path, name, capsys, trained):
    with pytest.raises(ValueError, match=r"PNG; expected a name ending in \.png"):
        plotting.save_image_grid(tmp_path / name, np.ones((4, 16)))
    assert not os.listdir(tmp_path)
    trained.save(tmp_path / "m.npz")
    code = cli.main(["sample", str(tmp_path / "m.npz"), "--image-shape", "3x4", "-o",
                     str(tmp_path / name)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("hvae: error: path: the image is written as PNG"), err
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]
    plotting.save_image_grid(tmp_path / "upper.PNG", np.ones((4, 16)))


def test_api_and_cli_share_defaults():
    """Every default of HVAE and of fit's training settings is the command line's."""
    sig = inspect.signature(hvae.HVAE)
    parser = cli.build_parser()
    train = next(a for a in parser._actions if a.dest == "command").choices["train"]
    helps = {a.dest: a.help or "" for a in train._actions}
    for name in ("likelihood", "activation", "kl", "init", "dtype", "inference"):
        assert f"default: {sig.parameters[name].default}" in helps[name], name
    assert sig.parameters["prior_variance"].default is None  # by inference, as the help says
    assert "default: unit for bottom-up inference, learned for top-down" in \
        helps["prior_variance"]
    for name, default in training.TRAIN_DEFAULTS.items():
        shown = {float: lambda v: f"{v:g}", type(None): lambda v: "none"}.get(type(default), str)
        assert f"default: {shown(default)}" in helps[name], (name, helps[name])
    fit = inspect.signature(hvae.HVAE.fit).parameters
    assert all(fit[name].default is None for name in training.TRAIN_DEFAULTS)
    assert inspect.signature(hvae.HVAE.score).parameters["k"].default == \
        inspect.signature(hvae.HVAE.log_likelihood).parameters["k"].default == 5000
    assert {a.dest: a.default for a in parser._subparsers._group_actions[0].choices[
        "eval"]._actions}["k"] == 5000
    splits = [inspect.signature(f).parameters["split"].default
              for f in (hvae.datasets.load_binarized_mnist, hvae.datasets.load_mnist,
                        hvae.datasets.load_digits)]
    assert splits == ["train"] * 3


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results",
                                                               "*.npz"))))
def test_shipped_checkpoints_load_with_their_settings(path, capsys):
    with zipfile.ZipFile(path) as zf, zf.open("meta.npy") as f:
        saved = json.loads(bytes(np.lib.format.read_array(f)).decode())["config"]
    m = hvae.load(path)
    for key, value in saved.items():
        assert getattr(m, key) == value, key
    assert m.init == "glorot" and m.prior_variance == saved.get("prior_variance", "unit")
    assert len(m.history_) > 200  # real runs (hvae5-topdown stopped early at 218), not smoke
    if m.train_config_:  # the run's settings (checkpoints written since runs remember them)
        assert m.train_config_["epochs"] == len(m.history_)
        assert m.train_config_["objective"] == ("iwae" if "iwae" in path else "elbo")
    assert cli.main(["info", path]) == 0
    out = capsys.readouterr().out
    assert "optimizer state not saved" in out and "0 optimizer steps" not in out


def test_eval_estimates_its_time(trained, tmp_path, capsys, monkeypatch):
    pytest.importorskip("sklearn")
    m = hvae.HVAE(64, [4], [[8]], seed=0).fit(hvae.datasets.binarize(
        hvae.datasets.load_digits(), rng=0), epochs=1, progress=False)
    m.save(tmp_path / "d.npz")
    assert cli.main(["eval", str(tmp_path / "d.npz"), "-k", "30", "--max-examples", "20",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "log-likelihood with k=30: about " in out and "the ELBO, one sample per example, " \
        "took" in out
