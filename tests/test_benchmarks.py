"""The benchmark scripts run end to end on tiny budgets, so they cannot rot."""
import importlib.util
import json
import os

import numpy as np
import pytest

import hvae
from hvae import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "..", "benchmarks",
                                                                     f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mnist_benchmark_quick(tmp_path, capsys):
    if not (datasets.data_dir() / "binarized_mnist.npz").exists():
        pytest.skip(f"binarized_mnist.npz not found in {datasets.data_dir()} (set HVAE_DATA)")
    mnist = load_script("mnist")
    out = tmp_path / "mnist.md"
    assert mnist.main(["--vae1", "--hvae2-mc", "--hvae2-topdown", "--vae1-iwae5", "--vae1-iwae50",
                       "--hvae2-topdown-iwae", "--hvae2-iwae", "--hvae5-topdown", "--free-bits",
                       "0.1", "--average", "0.5", "--seed", "3", "--quick", "--output", str(out),
                       "--checkpoint-dir", str(tmp_path)]) == 0
    text = out.read_text()
    assert "| vae1 |" in text and "| hvae2-mc |" in text and "| hvae2-topdown |" in text
    assert "| vae1-iwae5 |" in text and "objective=iwae, k=5" in text
    assert "| vae1-iwae50 |" in text and "objective=iwae, k=50" in text
    assert "| hvae2-topdown-iwae |" in text and "| hvae5-topdown |" in text
    assert "| hvae2-iwae |" in text
    rows = json.loads((tmp_path / "mnist.md.json").read_text())
    assert len(rows) == 8
    for r in rows.values():
        assert r["epochs"] == 2 and -800 < r["test_ll"] < 0 and r["test_ll"] >= r["test_elbo"] - 5
        assert len(r["kl_levels"]) == len(r["active_units"]) == len(r["latent_dims"])
        assert all(0 <= a <= d for a, d in zip(r["active_units"], r["latent_dims"]))
        assert r["clock"] == "CPU"
    assert rows["hvae5-topdown"]["latent_dims"] == [64, 32, 16, 8, 4]
    assert all("parameters averaged (decay 0.5 per epoch), seed 3" in r["kl"]
               for r in rows.values())
    # free bits go to the ELBO's models only (the IWAE bound has no per-level KL to floor)
    assert "free bits 0.1" in rows["hvae5-topdown"]["kl"]
    assert "free bits" not in rows["vae1-iwae5"]["kl"]
    assert "free bits" not in rows["hvae2-iwae"]["kl"]
    assert "top-down" not in rows["hvae2-iwae"]["architecture"]
    assert "learned variance" in rows["hvae2-iwae"]["architecture"]
    assert (tmp_path / "vae1.npz").exists() and (tmp_path / "hvae2-mc.npz").exists()
    # the two-level model is the IWAE architecture (learned variance of p(z1|z2)) and waits
    # before its KL warm-up
    assert hvae.load(tmp_path / "hvae2-mc.npz").prior_variance == "learned"
    assert hvae.load(tmp_path / "hvae2-topdown.npz").inference == "top_down"
    assert rows["hvae2-mc"]["warmup"] == "0.5 + 1" and rows["vae1"]["warmup"] == "0.5 + 1"
    assert "test log-likelihood" in capsys.readouterr().out
    # --level-stats fills in the columns of a row written before they existed
    store = tmp_path / "mnist.md.json"
    rows = json.loads(store.read_text())
    kl, active = rows["hvae2-mc"].pop("kl_levels"), rows["hvae2-mc"].pop("active_units")
    store.write_text(json.dumps(rows))
    assert mnist.main(["--level-stats", "--output", str(out), "--checkpoint-dir",
                       str(tmp_path)]) == 0
    again = json.loads(store.read_text())["hvae2-mc"]
    assert again["active_units"] == active and np.allclose(again["kl_levels"], kl, rtol=1e-6)


def test_mnist_benchmark_averages_parameters(monkeypatch):
    """--average: each epoch's end folds the parameters into an exponential average, which is
    validated every epoch, the parameters themselves every RAW_EVERY epochs; the best of either
    kind is the model that comes back."""
    mnist = load_script("mnist")
    rng = np.random.default_rng(0)
    X = (rng.random((60, 784)) < 0.3).astype(np.float32)
    args = mnist.parse_args(["--vae1-iwae5", "--quick", "--average", "0.75"])
    args.max_epochs = 4
    monkeypatch.setattr(mnist, "RAW_EVERY", 2)
    scored = []
    bounds = {("val_loss", 3): 5.0, ("val_loss_raw", 4): 6.0}  # the best: the average at 3

    def fake_bound(m, params, X_val, k):
        assert k == 5 and X_val is X  # the training k, not the ELBO's
        epoch, key = len(m.history_), "val_loss_raw" if params is m.params else "val_loss"
        scored.append((key, epoch, params.copy(), m.params.copy()))
        return bounds.get((key, epoch), 10.0 + epoch)

    monkeypatch.setattr(mnist, "validation_bound", fake_bound)
    m, epochs, best_epoch, _ = mnist.train("vae1-iwae5", X, X, args, lambda msg: None)
    assert [(key, e) for key, e, _, _ in scored] == [
        ("val_loss", 1), ("val_loss", 2), ("val_loss_raw", 2), ("val_loss", 3), ("val_loss", 4),
        ("val_loss_raw", 4)]
    average = None
    for key, epoch, params, current in scored:
        if key == "val_loss":
            expected = current.copy() if average is None else 0.75 * average + 0.25 * current
            np.testing.assert_allclose(params, expected, rtol=1e-6, atol=1e-7)
            average = params
            assert not np.array_equal(params, current) or epoch == 1
    assert (epochs, best_epoch) == (4, 3)
    np.testing.assert_array_equal(m.params, scored[3][2])
    assert [r.get("val_loss_raw") for r in m.history_] == [None, 12.0, None, 6.0]
    assert [r["val_loss"] for r in m.history_] == [11.0, 12.0, 5.0, 14.0]
    for bad in ("1", "-0.1", "nan"):
        with pytest.raises(SystemExit):
            mnist.parse_args(["--vae1", "--average", bad])


def test_speed_iwae_quick(tmp_path):
    """benchmarks/speed_iwae.py --quick: the guard (both torch twins against hvae's IWAE loss
    and gradient), a timed step, the k = 1000 evaluation and the extrapolated test split."""
    pytest.importorskip("torch")
    bench = load_script("speed_iwae")
    out = tmp_path / "speed_iwae.md"
    assert bench.main(["--quick", "--models", "vae", "--skip", "breakdown", "phases",
                       "--output", str(out)]) == 0
    text = out.read_text()
    assert "| vae | 5 | 100 | 1 |" in text
    assert "| hvae: HVAE.log_likelihood | 1 |" in text
    assert "EXTRAPOLATION from 4 of" in text and "(extrapolated)" in text


def test_scaling_quick(tmp_path, capsys):
    """benchmarks/scaling.py --quick: the three configurations at two batches (the 2-rank one
    under mpiexec), the bare Allreduce, and the model's table."""
    if not (datasets.data_dir() / "binarized_mnist.npz").exists():
        pytest.skip(f"binarized_mnist.npz not found in {datasets.data_dir()} (set HVAE_DATA)")
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'hvae[mpi]')")
    scaling = load_script("scaling")
    out = tmp_path / "scaling.md"
    assert scaling.main(["--quick", "--batches", "100", "400", "--output", str(out)]) == 0
    text = out.read_text()
    for batch in (100, 400):
        for config in ("1 x 1", "1 x 2", "2 x 1"):
            assert f"| {batch} | {config} |" in text
    assert text.count("| 10 Gb Ethernet |") == len(scaling.NODES)
    assert text.count("| 100 Gb InfiniBand |") == len(scaling.NODES)
    assert "bare Allreduce" in capsys.readouterr().out


def test_gemm_ceiling_quick(tmp_path):
    """benchmarks/gemm_ceiling.py on a small batch: every GEMM of the step timed, the table
    written."""
    bench = load_script("gemm_ceiling")
    out = tmp_path / "gemm_ceiling.md"
    assert bench.main(["--models", "hvae2-topdown", "--batch", "64", "--threads", "1",
                       "--repeats", "1", "--gemm-size", "128", "--output", str(out)]) == 0
    m = load_script("speed").make_model("hvae2-topdown", "float32", 0)
    assert len(bench.step_gemms(m, 64)) == 3 * 12 - 1  # 12 layers, no input gradient of x
    assert "| hvae2-topdown | 64 | 1 | 35 |" in out.read_text()
