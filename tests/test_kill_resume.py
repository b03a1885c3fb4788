"""No work lost: a training subprocess that checkpoints after every epoch is killed with SIGKILL
at random moments (several times, often in the middle of writing a checkpoint). Every time, the
checkpoint on disk loads (never a half-written file), holds exactly the parameters an
uninterrupted run had after that many epochs, and resuming from it continues training; the
finished, four-times-killed run equals the uninterrupted one bit for bit. A reader loading the
checkpoint while it is being rewritten always gets a complete file."""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import hvae

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

EPOCHS = 150  # about 10 ms each, most of it writing the checkpoint
STEPS = 2  # per epoch: 8 examples, batches of 4
SETUP = textwrap.dedent("""
    import numpy as np
    import hvae

    def data():
        return (np.random.default_rng(0).random((8, 64)) < 0.4).astype(np.float32)

    def new_model():  # 177k parameters: each checkpoint is 2.1 MB, written with fsync, so
        # that a kill often lands in the middle of a write
        return hvae.HVAE(64, [16], [[256, 256]], kl="mc", seed=0)

    FIT = dict(batch_size=4, progress=False)
""")
TRAIN = SETUP + textwrap.dedent("""
    import os, sys
    path, total = sys.argv[1], int(sys.argv[2])
    model = hvae.load(path) if os.path.exists(path) else new_model()
    print("start", len(model.history_), flush=True)
    model.fit(data(), epochs=total, checkpoint=path, **FIT)
    print("done", len(model.history_), flush=True)
""")


@pytest.fixture(scope="module")
def reference():
    """Parameters after every epoch of an uninterrupted run (in this process)."""
    ns = {}
    exec(SETUP, ns)
    snapshots = []
    ns["new_model"]().fit(ns["data"](), epochs=EPOCHS, **ns["FIT"],
                          callbacks=[lambda m, r: snapshots.append(m.params.copy())])
    return snapshots


def start(script, path):
    return subprocess.Popen([sys.executable, str(script), str(path), str(EPOCHS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_new_checkpoint(path, proc, after, timeout=60):
    """Until the checkpoint's mtime is newer than `after` (a new epoch was saved)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.stat(path).st_mtime_ns > after:
                return
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()}")
        time.sleep(0.002)
    raise AssertionError("no checkpoint written in time")


def check_checkpoint(path, reference):
    m = hvae.load(path)  # never half-written
    k = len(m.history_)
    assert 1 <= k <= EPOCHS and m.optimizer_.step == k * STEPS
    np.testing.assert_array_equal(m.params, reference[k - 1])  # exactly the work of k epochs
    assert [r["epoch"] for r in m.history_] == list(range(1, k + 1))
    return k


def test_sigkill_at_random_moments_loses_no_work(tmp_path, reference):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    path = tmp_path / "run.npz"
    rnd = random.Random(os.environ.get("HVAE_KILL_SEED"))
    epochs_seen, mtime = [], -1
    for kill in range(4):
        proc = start(script, path)
        try:
            wait_for_new_checkpoint(path, proc, mtime)
            if kill == 0:  # a reader racing the writer: every load sees a complete file
                t_end = time.monotonic() + 0.3
                while time.monotonic() < t_end:
                    check_checkpoint(path, reference)
            # a few epochs at most: four runs must stay short of EPOCHS on a fast disk too
            time.sleep(rnd.uniform(0.0, 0.04))
        finally:
            proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, (out, err)
        assert out.startswith("start"), (out, err)
        assert int(out.split()[1]) == (epochs_seen[-1] if epochs_seen else 0)  # resumed there
        epochs_seen.append(check_checkpoint(path, reference))
        mtime = os.stat(path).st_mtime_ns
    assert epochs_seen == sorted(epochs_seen) and epochs_seen[-1] < EPOCHS, epochs_seen
    # left-overs of a write cut short are temporary files beside the checkpoint, never the
    # checkpoint itself; they do not disturb loading
    litter = [f for f in os.listdir(tmp_path) if f.startswith(".hvae-")]
    print("epochs at the kills:", epochs_seen, "temporary files left:", len(litter))
    assert all(f.endswith(".tmp") for f in litter), litter
    # resume to the end: the same parameters as the uninterrupted run
    proc = start(script, path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.split() == ["start", str(epochs_seen[-1]), "done", str(EPOCHS)]
    final = hvae.load(path)
    assert len(final.history_) == EPOCHS
    np.testing.assert_array_equal(final.params, reference[-1])
