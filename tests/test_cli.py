"""The command line (hvae.cli) and the demo (hvae.demo), in-process on the 8x8 digits: seconds,
no dependence on the shared data directory."""
import argparse
import math
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")

import hvae  # noqa: E402
from hvae import cli, demo, training  # noqa: E402

TRAIN = ["train", "--data", "digits", "--max-examples", "200", "--latent-dims", "8", "4",
         "--no-progress"]
NUMBER = r"(-?\d+\.\d+) \+- (\d+\.\d+)"


@pytest.fixture(autouse=True)
def _no_shared_data(tmp_path, monkeypatch):
    """Point the default data directory at an empty folder: nothing may need MNIST."""
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv("HVAE_DATA", str(empty))


def run(capsys, *argv):
    """main(argv) -> (exit status, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_error(code, err, expected_code, *fragments):
    assert code == expected_code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvae: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err


def png_size(path, grey=True):
    """(width, height) from a PNG's signature and IHDR chunk (8-bit greyscale if grey)."""
    with open(path, "rb") as f:
        head = f.read(33)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    length, tag = struct.unpack(">I4s", head[8:16])
    assert tag == b"IHDR" and length == 13
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    assert not grey or (depth, colour) == (8, 0)
    return width, height


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint trained 2 epochs on 200 digits."""
    path = tmp_path_factory.mktemp("ckpt") / "m.npz"
    assert cli.main([*TRAIN, "--epochs", "2", "--checkpoint", str(path)]) == 0
    return path


# ----------------------------------------------------------------------------------------------
# train


def test_train_writes_checkpoint_and_no_test_score(tmp_path, capsys):
    path = tmp_path / "sub" / "m.npz"  # the folder is created
    code, out, err = run(capsys, *TRAIN, "--epochs", "2", "--checkpoint", path)
    assert code == 0, err
    assert "epoch 1/2" in out and "epoch 2/2" in out and "training 2 epochs" in out
    assert "test ELBO" not in out and f"hvae eval {path}" in out  # the test split: when asked
    model = hvae.load(path)
    assert len(model.history_) == 2 and model.latent_dims == [8, 4]
    assert model.kl == "mc" and model.seed == 0 and model.init == "glorot"
    assert all(r["val_loss"] is not None for r in model.history_)  # validation split used
    assert model.train_config_ == {**training.TRAIN_DEFAULTS, "epochs": 2, "data": "digits",
                                   "max_examples": 200, "no_binarize": False}
    code, out, err = run(capsys, *TRAIN, "--epochs", "1", "--checkpoint", tmp_path / "one.npz")
    assert code == 0 and "training 1 epoch " in out, err


def interrupt_after(monkeypatch, epochs):
    """Ctrl-C at the start of the epoch after ``epochs`` (the checkpoint holds those)."""
    real = training.run_epoch

    def run_epoch(model, *args):
        if len(model.history_) == epochs:
            monkeypatch.setattr(training, "run_epoch", real)
            raise KeyboardInterrupt
        return real(model, *args)

    monkeypatch.setattr(training, "run_epoch", run_epoch)


def test_interrupted_run_resumed_with_no_flags_is_the_uninterrupted_run(tmp_path, capsys,
                                                                        monkeypatch):
    """A run with every training setting away from its default, on a subset of the data,
    interrupted after 3 of 7 epochs and resumed with --resume alone, equals the uninterrupted
    run bit for bit: parameters, Adam, the random stream and the history (the lr schedule,
    the warm-up, the best epoch of early stopping, the binarization draws)."""
    flags = ["train", "--data", "digits", "--max-examples", "300", "--latent-dims", "8", "4",
             "--epochs", "7", "--batch-size", "40", "--lr", "0.004", "--lr-decay", "0.5",
             "--kl-warmup-epochs", "2", "--kl-warmup-delay", "1", "--beta", "0.9",
             "--patience", "5", "--free-bits", "0.1", "0.05", "--seed", "3", "--no-progress"]
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert run(capsys, *flags, "--checkpoint", a)[0] == 0
    interrupt_after(monkeypatch, 3)
    assert run(capsys, *flags, "--checkpoint", b)[0] == 130
    assert len(hvae.load(b).history_) == 3
    code, out, err = run(capsys, "train", "--checkpoint", b, "--resume", "--no-progress")
    assert code == 0, err
    assert "3 epochs done of 7" in out and "epoch 4/7" in out and "overrides" not in out
    assert "train 300" in out  # the subset, restored
    ma, mb = hvae.load(a), hvae.load(b)
    np.testing.assert_array_equal(ma.params, mb.params)
    np.testing.assert_array_equal(ma.optimizer_.m, mb.optimizer_.m)
    assert ma._rng.bit_generator.state == mb._rng.bit_generator.state
    assert ma.train_config_ == mb.train_config_
    drop = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert drop(ma.history_) == drop(mb.history_)
    assert [r["beta"] for r in ma.history_][:4] == pytest.approx([0, 0.45, 0.9, 0.9])
    # nothing left to do
    code, out, _ = run(capsys, "train", "--checkpoint", b, "--resume")
    assert code == 0 and "nothing to train" in out
    # a new value overrides the saved one and says so
    code, out, err = run(capsys, "train", "--checkpoint", b, "--resume", "--epochs", "8",
                         "--lr", "0.001", "--no-progress")
    assert code == 0, err
    assert "--epochs 8 overrides the run's 7" in out and "--lr 0.001 overrides" in out
    assert hvae.load(b).history_[-1]["lr"] == pytest.approx(0.001 * 0.5)


def test_resume_of_missing_checkpoint_starts_fresh(tmp_path, capsys):
    code, out, err = run(capsys, *TRAIN, "--epochs", "1", "--checkpoint", tmp_path / "n.npz",
                         "--resume")
    assert code == 0, err
    assert "starting a new model" in out


def test_train_architecture_flags(tmp_path, capsys):
    path = tmp_path / "m.npz"
    code, _, err = run(capsys, "train", "--data", "digits", "--max-examples", "50",
                       "--latent-dims", "6", "3", "--hidden-dims", "20,10", "none",
                       "--activation", "relu", "--kl", "analytic", "--dtype", "float64",
                       "--seed", "7", "--epochs", "1", "--batch-size", "25", "--lr", "0.002",
                       "--kl-warmup-epochs", "1", "--kl-warmup-delay", "0", "--beta", "0.5",
                       "--patience", "3", "--init", "torch", "--n-jobs", "2",
                       "--prior-variance", "learned", "--no-progress", "--checkpoint", path)
    assert code == 0, err
    m = hvae.load(path)
    assert m.hidden_dims == [[20, 10], []] and m.activation == "relu" and m.kl == "analytic"
    assert m.dtype == "float64" and m.seed == 7 and m.prior_variance == "learned"
    assert m.init == "torch"
    assert m.history_[0]["beta"] == pytest.approx(0.5)
    code, _, err = run(capsys, "train", "--data", "digits", "--max-examples", "50",
                       "--latent-dims", "6", "3", "--epochs", "2", "--batch-size", "25",
                       "--kl-warmup-epochs", "1", "--kl-warmup-delay", "1", "--no-progress",
                       "--checkpoint", tmp_path / "delay.npz")
    assert code == 0, err
    assert [r["beta"] for r in hvae.load(tmp_path / "delay.npz").history_] == [0.0, 1.0]
    code, _, err = run(capsys, "train", "--data", "digits", "--latent-dims", "6", "3",
                       "--prior-variance", "unit", "--epochs", "3", "--checkpoint", path,
                       "--resume")
    assert_clean_error(code, err, 1, "--prior-variance", "does not match")


def test_train_refuses_to_overwrite_and_checks_resume_flags(trained, tmp_path, capsys):
    code, _, err = run(capsys, *TRAIN, "--epochs", "3", "--checkpoint", trained)
    assert_clean_error(code, err, 1, "exists", "--resume", "--overwrite")
    code, _, err = run(capsys, "train", "--data", "digits", "--latent-dims", "9",
                       "--epochs", "3", "--checkpoint", trained, "--resume")
    assert_clean_error(code, err, 1, "--latent-dims", "does not match")
    assert len(hvae.load(trained).history_) == 2  # untouched


def test_train_interrupted_returns_130_and_keeps_completed_epochs(tmp_path, capsys,
                                                                  monkeypatch):
    interrupt_after(monkeypatch, 1)
    path = tmp_path / "m.npz"
    code, _, err = run(capsys, *TRAIN, "--epochs", "3", "--checkpoint", path)
    assert code == 130
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    assert len(hvae.load(path).history_) == 1


def test_train_divergence_is_a_clean_error(tmp_path, capsys, monkeypatch):
    def run_epoch(*args):
        raise FloatingPointError("non-finite loss at epoch 1, step 1 (loss=nan)")

    monkeypatch.setattr(training, "run_epoch", run_epoch)
    code, _, err = run(capsys, *TRAIN, "--epochs", "1", "--checkpoint", tmp_path / "m.npz")
    assert_clean_error(code, err, 1, "non-finite loss", "nothing was saved")


# ----------------------------------------------------------------------------------------------
# eval, sample, info


def test_eval_prints_finite_log_likelihood(trained, capsys):
    code, out, err = run(capsys, "eval", trained, "-k", "50", "--max-examples", "40")
    assert code == 0, err
    assert "data: digits test, 40 examples (binarized)" in out  # data inferred from x_dim
    ll = re.search(r"log-likelihood \(importance-sampled, k=50\): " + NUMBER, out)
    elbo = re.search(r"ELBO \(k=1\): " + NUMBER, out)
    assert ll and elbo
    ll, elbo = float(ll.group(1)), float(elbo.group(1))
    assert math.isfinite(ll) and ll < 0
    assert ll > elbo - 0.5  # the k=50 bound is above the ELBO (up to noise)
    assert "log-likelihood k=50" in err  # the progress bar
    code, out, err = run(capsys, "eval", trained, "-k", "5", "--split", "valid", "--seed", "1",
                         "--no-progress", "--batch-size", "7")
    assert code == 0 and "digits valid, 150 examples" in out and err == ""


def test_eval_passes_n_jobs(trained, capsys, monkeypatch):
    seen = []
    for name in ("elbo", "log_likelihood"):
        original = getattr(hvae.HVAE, name)

        def spy(self, *a, _original=original, _name=name, **kw):
            seen.append((_name, kw.get("n_jobs")))
            return _original(self, *a, **kw)
        monkeypatch.setattr(hvae.HVAE, name, spy)
    code, _, err = run(capsys, "eval", trained, "-k", "5", "--max-examples", "10",
                       "--no-progress", "--n-jobs", "2")
    assert code == 0, err
    assert seen == [("elbo", 2), ("log_likelihood", 2)]


def test_eval_n_jobs_gives_the_same_estimate(trained, capsys):
    """The core's noise depends on the seed and the sample's place, not on the threads or the
    batch size: --n-jobs 2 with another --batch-size prints the same numbers."""
    outs = []
    for extra in ((), ("--n-jobs", "2", "--batch-size", "13")):
        code, out, err = run(capsys, "eval", trained, "-k", "20", "--max-examples", "30",
                             "--seed", "3", "--no-progress", *extra)
        assert code == 0, err
        outs.append(re.findall(NUMBER, out))
    assert len(outs[0]) == 2 and outs[0] == outs[1], outs
    code, _, err = run(capsys, "eval", trained, "--n-jobs", "0")
    assert_clean_error(code, err, 1, "n_jobs: expected None, -1 or an integer")


def test_sample_writes_png(trained, tmp_path, capsys):
    out_png = tmp_path / "pics" / "s.png"
    code, out, err = run(capsys, "sample", trained, "-o", out_png, "--seed", "1")
    assert code == 0, err
    # 64 samples of 8x8 pixels: 8 columns x 8 rows with 1-pixel padding, enlarged 7 times
    assert png_size(out_png) == ((8 * 9 + 1) * 7,) * 2
    code, _, err = run(capsys, "sample", trained, "-n", "10", "--ncols", "5", "--scale", "1",
                       "--temperature", "0.5", "-o", out_png)
    assert code == 0, err
    assert png_size(out_png) == (5 * 9 + 1, 2 * 9 + 1)


def test_sample_seed_is_reproducible(trained, tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert run(capsys, "sample", trained, "-o", a, "--seed", "3")[0] == 0
    assert run(capsys, "sample", trained, "-o", b, "--seed", "3")[0] == 0
    assert a.read_bytes() == b.read_bytes()


def test_sample_non_square_model(tmp_path, capsys):
    path = tmp_path / "rect.npz"
    hvae.HVAE(50, [4], seed=0).save(path)
    code, _, err = run(capsys, "sample", path, "-o", tmp_path / "s.png")
    assert_clean_error(code, err, 1, "x_dim=50", "not a square image", "--image-shape")
    code, _, err = run(capsys, "sample", path, "-o", tmp_path / "s.png", "--image-shape", "5x5")
    assert_clean_error(code, err, 1, "5x5", "x_dim=50")
    code, _, err = run(capsys, "sample", path, "-n", "4", "--ncols", "4", "--scale", "1",
                       "-o", tmp_path / "s.png", "--image-shape", "5x10")
    assert code == 0, err
    assert png_size(tmp_path / "s.png") == (4 * 11 + 1, 5 + 2)


def test_info(trained, capsys):
    code, out, err = run(capsys, "info", trained)
    assert code == 0, err
    assert "HVAE(x_dim=64, latent_dims=[8, 4]" in out
    n = hvae.load(trained).n_params
    assert f"parameters: {n:,}" in out
    assert "epochs trained: 2" in out
    assert "last epoch:" in out and "val_loss:" in out
    assert re.search(r"\(\d+\.\d KiB\)", out)


# ----------------------------------------------------------------------------------------------
# errors and help


@pytest.mark.parametrize("command", ["info", "eval", "sample"])
def test_missing_checkpoint(command, tmp_path, capsys):
    code, _, err = run(capsys, command, tmp_path / "nope.npz")
    assert_clean_error(code, err, 1, "nope.npz", "no such checkpoint")


def test_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file at all")
    code, _, err = run(capsys, "info", bad)
    assert_clean_error(code, err, 1, "not a valid hvae checkpoint")


def test_missing_data(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--data", "binarized_mnist", "--epochs", "1",
                       "--checkpoint", tmp_path / "m.npz")
    assert_clean_error(code, err, 1, "binarized MNIST", "binarized_mnist.npz", "HVAE_DATA",
                       "--data-dir")
    code, _, err = run(capsys, "train", "--data", "mnist", "--data-dir", tmp_path,
                       "--epochs", "1", "--checkpoint", tmp_path / "m.npz")
    assert_clean_error(code, err, 1, "MNIST train images")
    assert not (tmp_path / "m.npz").exists()


def test_eval_data_mismatch(trained, tmp_path, capsys):
    code, _, err = run(capsys, "eval", trained, "--data", "mnist", "--data-dir", tmp_path)
    assert_clean_error(code, err, 1, "MNIST test images")


@pytest.mark.parametrize("argv, fragment", [
    ([], "choose a command"),
    (["fly"], "invalid choice"),
    (["train", "--epochs", "1"], "--checkpoint"),
    (["train", "--epochs", "0", "--checkpoint", "x.npz"], "--epochs"),
    (["train", "--lr", "-1", "--checkpoint", "x.npz"], "--lr"),
    (["train", "--lr", "nan", "--checkpoint", "x.npz"], "--lr"),
    (["train", "--beta", "abc", "--checkpoint", "x.npz"], "--beta"),
    (["train", "--hidden-dims", "200,x", "--checkpoint", "x.npz"], "--hidden-dims"),
    (["train", "--data", "digits", "--latent-dims", "4", "2", "--hidden-dims", "8", "8", "8",
      "--checkpoint", "x.npz"], "3 groups for 2 levels"),
    (["train", "--data", "cifar", "--checkpoint", "x.npz"], "--data"),
    (["train", "--kl", "exact", "--checkpoint", "x.npz"], "--kl"),
    (["train", "--resume", "--overwrite", "--checkpoint", "x.npz"], "not allowed with"),
    (["eval", "m.npz", "-k", "0"], "-k"),
    (["eval"], "CHECKPOINT"),
    (["sample", "m.npz", "-n", "-3"], "-n"),
    (["sample", "m.npz", "--image-shape", "28"], "--image-shape"),
])
def test_usage_errors(argv, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    assert_clean_error(code, err, 2, fragment, "--help")
    assert not (tmp_path / "x.npz").exists()


def test_traceback_flag_reraises(tmp_path):
    with pytest.raises(Exception, match="no such checkpoint"):
        cli.main(["--traceback", "info", str(tmp_path / "nope.npz")])


@pytest.mark.parametrize("command", [None, "train", "eval", "sample", "info"])
def test_help_explains_every_flag(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    assert out.startswith("usage: hvae")
    parser = cli.build_parser()
    if command is not None:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[command]
    for action in parser._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help"
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            assert f"default: {action.default}" in " ".join(out.split()), action.option_strings


def test_python_dash_m_hvae_help():
    proc = subprocess.run([sys.executable, "-m", "hvae", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: hvae")
    for command in ("train", "eval", "sample", "info"):
        assert command in proc.stdout


# ----------------------------------------------------------------------------------------------
# the demo


def test_demo_quick(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    assert demo.main(["--out", str(out_dir), "--quick", "--data", "digits",
                      "--no-progress"]) == 0
    out = capsys.readouterr().out
    width, height = png_size(out_dir / "loss.png", grey=False)  # matplotlib's RGBA
    assert width > 100 and height > 100
    # 64 samples in 8 columns; 32 inputs and their 32 reconstructions in 8 rows of 8
    assert png_size(out_dir / "samples.png") == ((8 * 9 + 1) * 7,) * 2
    assert png_size(out_dir / "reconstructions.png") == ((8 * 9 + 1) * 7,) * 2
    model = hvae.load(out_dir / "model.npz")
    assert model.n_levels == 2 and model.kl == "mc" and model.history_
    assert re.search(r"test ELBO \(k=1, all 297 test examples\): -\d+\.\d+", out)
    m = re.search(r"test log-likelihood \(importance-sampled, k=(\d+), on (\d+) test examples "
                  r"drawn at random\): (-\d+\.\d+)", out)
    assert m and math.isfinite(float(m.group(3)))
    assert (int(m.group(1)), int(m.group(2))) == (20, 100)


def test_demo_falls_back_to_digits_with_a_note(tmp_path, capsys):
    """--data auto without MNIST (HVAE_DATA points at an empty folder): the digits, and a note."""
    code = demo.main(["--out", str(tmp_path / "d"), "--quick", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "binarized MNIST not found" in out and "digits instead" in out
    assert os.path.exists(tmp_path / "d" / "model.npz")


def test_digits_splits_are_disjoint_and_cover_the_data():
    from sklearn.datasets import load_digits

    parts = [cli.load_split("digits", s) for s in cli.SPLITS]
    assert [len(p) for p in parts] == [1350, 150, 297]
    np.testing.assert_array_equal(np.concatenate(parts) * 16, load_digits().data)
