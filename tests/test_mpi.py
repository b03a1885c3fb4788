"""Data-parallel training and evaluation over MPI: mpiexec -n 2 and -n 3 runs of
tests/mpi_worker.py against the same fits in one process (float64, parameters within 1e-10),
the ranks bit for bit identical, a NaN on one rank, a rank that raises (the job ends, bounded by
a timeout), bad arguments on one rank, checkpoints resumed across rank counts, evaluation split
over ranks, and the command line's --mpi."""
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import hvae
from hvae import parallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpi_cases  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "mpi_worker.py")
TIMEOUT = 120  # seconds for one mpiexec run; a hang fails the test instead of the suite


def _mpiexec():
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else shutil.which("mpiexec")


def run(n, *args, timeout=TIMEOUT, check=True):
    """mpiexec -n n python args...; returns the CompletedProcess. The whole process group is
    killed if it outlives the timeout (and the test fails)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([_mpiexec(), "-n", str(n), sys.executable, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"mpiexec -n {n} {' '.join(args)} did not end within {timeout} s (a hang)")
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and proc.returncode != 0:
        pytest.fail(f"mpiexec -n {n} {' '.join(args)} failed ({proc.returncode}):\n{err[-3000:]}")
    return result


@pytest.fixture(scope="module", autouse=True)
def mpiexec_starts():
    """Skip (saying why) only where mpiexec cannot start two ranks at all."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is not installed (pip install 'hvae[mpi]'; the README's test "
                    "command installs it)")
    if _mpiexec() is None:
        pytest.skip("no mpiexec beside the Python or on PATH (pip install mpich)")
    probe = subprocess.run(
        [_mpiexec(), "-n", "2", sys.executable, "-c",
         "from mpi4py import MPI; w = MPI.COMM_WORLD; n = w.allreduce(1); "
         "w.Get_rank() or print(n)"],
        capture_output=True, text=True, timeout=60)
    if probe.returncode != 0 or probe.stdout.split() != ["2"]:
        pytest.skip(f"mpiexec cannot start 2 ranks here: {probe.stderr.strip()[-500:]}")


def worker(n, scenario, tmp_path, *extra):
    """Run a scenario of mpi_worker.py on n ranks; each rank's npz as a dict."""
    out = tmp_path / f"{scenario}-{n}"
    out.mkdir(parents=True, exist_ok=True)
    run(n, WORKER, scenario, str(out), *extra)
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(n)]


@pytest.fixture(scope="module")
def one_process():
    """Every fit case trained in this process, without MPI."""
    return {name: mpi_cases.run_case(name) for name in mpi_cases.FIT_CASES}


@pytest.mark.parametrize("n", [2, 3])
def test_fit_equals_one_process(n, tmp_path, one_process):
    ranks = worker(n, "fit", tmp_path)
    for name, ref in one_process.items():
        got = ranks[0]
        tol = 1e-10 if ref.dtype == "float64" else 2e-5  # float32: summation order shows
        np.testing.assert_allclose(got[name + "/params"], ref.params, rtol=0, atol=tol,
                                   err_msg=name)
        for key in ("loss", "reconstruction", "kl", "val_loss"):  # the whole history
            np.testing.assert_allclose(
                got[f"{name}/{key}"], np.array([r[key] for r in ref.history_], dtype=float),
                rtol=1e-12 if ref.dtype == "float64" else 1e-5, err_msg=f"{name} {key}")
        assert np.all(got[name + "/ranks"] == n), name
        # the ranks are bit for bit identical
        for r in range(1, n):
            assert np.array_equal(ranks[r][name + "/params"], got[name + "/params"]), (name, r)
    # the free-bits case is not the plain ELBO's fit, and early stopping did stop
    assert not np.allclose(one_process["free_bits"].params, one_process["bottom_up_mc"].params)
    assert len(one_process["bottom_up_analytic_patience"].history_) < 6


@pytest.mark.parametrize("where", ["gradient", "kl"])
def test_nan_on_one_rank_stops_every_rank(where, tmp_path):
    """A NaN in one rank's gradient, or in its KL terms under free bits (where the floors are
    decided on the whole batch before the backward): every rank stops at that step with the
    same FloatingPointError and the last finite parameters, as one process does."""
    ref = worker(1, "nan", tmp_path / "one", where)[0]
    assert "step 3" in str(ref["error"]) and int(ref["steps"]) == 2
    ranks = worker(3, "nan", tmp_path / "three", where)
    for r in ranks:
        assert str(r["error"]) == str(ref["error"])  # FloatingPointError, the same everywhere
        assert int(r["steps"]) == 2
        assert np.array_equal(r["params"], ranks[0]["params"])
    np.testing.assert_allclose(ranks[0]["params"], ref["params"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("scenario,rank,message", [
    ("raises", 1, "callback failed on purpose"),       # rank 1's callback, in epoch 2
    ("rank0_fails", 0, "hvae-no-such-folder"),          # rank 0 alone writes the checkpoint
])
def test_a_rank_that_fails_alone_ends_the_job(scenario, rank, message, tmp_path):
    out = tmp_path / scenario
    out.mkdir()
    res = run(3, WORKER, scenario, str(out), timeout=60, check=False)
    assert res.returncode != 0
    assert f"rank {rank} of 3 failed" in res.stderr and message in res.stderr
    assert not list(out.iterdir())  # no rank went on to finish


def test_bad_argument_on_one_rank_raises_everywhere(tmp_path):
    ranks = worker(3, "bad_args", tmp_path)
    lr, rows, batch, ll, model = zip(*[r["errors"] for r in ranks])
    assert lr[1].startswith("ValueError: lr:")
    assert all(e.startswith("RuntimeError: fit: rank 1 of 3 failed (ValueError: lr:")
               for e in (lr[0], lr[2]))
    assert all(e.startswith("ValueError: X: expected the same on every rank, but rank 1")
               for e in rows)
    assert all(e.startswith("ValueError: settings: expected the same on every rank, but rank 1")
               for e in batch)
    assert all(e.startswith("ValueError: x: expected the same on every rank, but rank 2")
               for e in ll)
    assert all(e.startswith("ValueError: model: expected the same on every rank, but rank 2")
               for e in model)


@pytest.mark.filterwarnings("ignore:fit. the run.s settings change:UserWarning")
def test_checkpoint_resumes_across_rank_counts(tmp_path):
    ckpt = str(tmp_path / "run.npz")
    ref = mpi_cases.model()  # the same three calls in one process (each sets the run's length)
    X, V = mpi_cases.data(ref)
    for epochs in (2, 4, 6):
        ref.fit(X, validation_data=V, **dict(mpi_cases.FIT, epochs=epochs))
    worker(2, "resume", tmp_path, ckpt, "2")
    assert len(hvae.load(ckpt).history_) == 2
    ranks = worker(3, "resume", tmp_path, ckpt, "4")  # 2 ranks -> 3 ranks
    assert all(int(r["epochs"]) == 4 for r in ranks)
    m = hvae.load(ckpt)  # 3 ranks -> one process
    m.fit(X, validation_data=V, **dict(mpi_cases.FIT, epochs=6))
    np.testing.assert_allclose(m.params, ref.params, rtol=0, atol=1e-10)


def test_evaluation_split_over_ranks(tmp_path):
    """Every rank takes one seed from the model's Generator and scores its shard; the noise of
    an example depends on the seed and its place in X, not on the rank: one process's numbers
    (the batch sizes differ, so GEMM rounding may)."""
    ranks = worker(3, "evaluate", tmp_path)
    m = mpi_cases.model()
    X, _ = mpi_cases.data(m)
    expected = {"ll": m.log_likelihood(X, k=7, batch_size=10), "elbo": m.elbo(X, k=2),
                "chunked": m.log_likelihood(X, k=7, batch_size=3)}
    after = int(m._rng.integers(0, 2 ** 63))  # the Generator advanced alike on every rank
    expected["skewed"] = m.log_likelihood(X, k=7, batch_size=10)
    for r in ranks:
        assert r["ll"].shape == (mpi_cases.N,) and np.all(np.isfinite(r["ll"]))
        for key in expected:
            np.testing.assert_allclose(r[key], expected[key], rtol=1e-12)
            assert np.array_equal(r[key], ranks[0][key])
        assert int(r["rng_after"]) == after


def test_shards_are_disjoint_and_cover():
    for n in (0, 1, 2, 7, 53):
        for size in (1, 2, 3, 4, 8):
            parts = [parallel.shard(n, r, size) for r in range(size)]
            rows = np.concatenate([np.arange(n)[p] for p in parts])
            assert np.array_equal(rows, np.arange(n))
            lengths = [p.stop - p.start for p in parts]
            assert max(lengths) - min(lengths) <= 1


def test_comm_must_be_a_communicator():
    m = mpi_cases.model()
    X, _ = mpi_cases.data(m)
    for bad in (3, "world", object()):
        with pytest.raises(TypeError, match="comm: expected an mpi4py intracommunicator"):
            m.fit(X, epochs=1, progress=False, comm=bad)
        with pytest.raises(TypeError, match="comm: expected an mpi4py intracommunicator"):
            m.log_likelihood(X, k=2, comm=bad)
    assert m.history_ == []


def test_cli_train_and_eval_over_mpi(tmp_path):
    ckpt = str(tmp_path / "digits.npz")
    res = run(2, "-m", "hvae", "train", "--data", "digits", "--latent-dims", "4",
              "--epochs", "2", "--batch-size", "50", "--checkpoint", ckpt, "--mpi",
              "--no-progress")
    assert res.stdout.count("epoch 2/2") == 1  # rank 0 prints, the other does not
    m = hvae.load(ckpt)
    assert len(m.history_) == 2 and m.history_[-1]["ranks"] == 2
    res = run(2, "-m", "hvae", "eval", ckpt, "-k", "20", "--max-examples", "60", "--mpi",
              "--no-progress")
    assert res.stdout.count("log-likelihood (importance-sampled, k=20)") == 1
    res = run(2, "-m", "hvae", "eval", str(tmp_path / "missing.npz"), "--mpi", check=False,
              timeout=60)
    assert res.returncode != 0 and "no such checkpoint" in res.stderr
