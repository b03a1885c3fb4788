"""Never lose a checkpoint, never corrupt the model's state (issue 20): save checks what load
checks before it replaces anything; a step's state changes happen together whatever signal
arrives; one model's mutating calls are serialised or refused; what the constructor accepts,
save writes and load restores; special files are written through or refused; every failure of
load is a ValueError naming the file; the binding survives hostile __index__ / __float__; pickle,
deepcopy and fork work. The randomised versions (signals at random moments, concurrent saves)
are in test_fuzz.py."""
import copy
import io
import os
import pickle
import pickletools
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import zipfile

import numpy as np
import pytest

import hvae
from hvae import checkpoint, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data(n=120, d=12, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, d)) < 0.4).astype(np.float32)


def small(**kw):
    return hvae.HVAE(12, [4, 2], [[8], [5]], **{"seed": 3, **kw})


def state(m):
    """Everything a step changes, as plain values."""
    opt = m.optimizer_
    return (m.params.copy(), None if opt is None else opt.m.copy(),
            None if opt is None else opt.v.copy(), None if opt is None else opt.step,
            m._rng.bit_generator.state, [dict(r, seconds=0) for r in m.history_])


def assert_same_state(a, b):
    sa, sb = state(a), state(b)
    for x, y in zip(sa[:3], sb[:3]):
        np.testing.assert_array_equal(x, y)
    assert sa[3:] == sb[3:]


def run_py(code, timeout=60):
    """Run code in a fresh interpreter with this checkout importable; (returncode, output)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                           text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return "timeout", ""
    return p.returncode, p.stdout + p.stderr


# ----------------------------------------------------------------------------------------------
# save checks what load checks, and never replaces a good file with a bad one


@pytest.mark.parametrize("value", ["x", True, np.float32(1.5), {"a": 1}, [1, "b"]])
def test_callback_adding_to_the_record_never_replaces_a_good_checkpoint(tmp_path, value):
    path = tmp_path / "m.npz"
    m = small()

    def note(model, record):
        record["note"] = value

    with pytest.raises(ValueError, match=r"m\.npz: not saved.*history\[0\]\['note'\].*left as it"):
        m.fit(data(), epochs=3, batch_size=40, progress=False, checkpoint=path,
              callbacks=[note])
    good = hvae.load(path)  # epoch 1, written before the callback ran
    assert len(good.history_) == 1


def test_params_of_another_dtype_are_not_saved(tmp_path):
    path = tmp_path / "m.npz"
    m = small()
    m.fit(data(), epochs=1, batch_size=40, progress=False)
    m.save(path)
    before = path.read_bytes()
    for bad in (m.params.astype(np.float64), m.params[:-1].copy(), m.params.reshape(1, -1),
                np.full_like(m.params, np.nan)):
        m.params = bad
        with pytest.raises(ValueError, match=r"m\.npz: not saved.*params"):
            m.save(path)
        assert path.read_bytes() == before
    m.params = hvae.load(path).params
    m.optimizer_.v[0] = -1.0
    with pytest.raises(ValueError, match="Adam moments"):
        m.save(path)
    m.optimizer_.v[0] = 0.0
    m.latent_dims = [4, 3]  # a config that no longer matches the parameters
    with pytest.raises(ValueError, match="not saved"):
        m.save(path)
    assert path.read_bytes() == before and not list(tmp_path.glob(".*tmp"))


# ----------------------------------------------------------------------------------------------
# a step happens wholly or not at all


def interrupted_reference(steps_done, X, epochs, **fit):
    """A fresh model of the same run (``epochs``: its planned length, which sets the step size
    schedule) stopped cleanly after ``steps_done`` steps: a KeyboardInterrupt raised where the
    next step would draw its noise."""
    ref = small()
    calls = [0]
    draw = ref.draw_eps

    def counting(batch):
        calls[0] += 1
        if calls[0] > steps_done:
            raise KeyboardInterrupt
        return draw(batch)

    ref.draw_eps = counting
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.fit(X, epochs=epochs, **fit)
    del ref.draw_eps
    return ref


class _SignalAfterCore:
    """Stands in for a model's core: its train_step returns, then SIGINT is raised, as a signal
    that arrives while the GIL is released is raised at the first bytecode after the call."""

    def __init__(self, core, at):
        self.core, self.at, self.calls = core, at, 0

    def __getattr__(self, name):
        return getattr(self.core, name)

    def train_step(self, *a, **k):
        out = self.core.train_step(*a, **k)
        self.calls += 1
        if self.calls == self.at:
            signal.raise_signal(signal.SIGINT)
        return out


def test_keyboard_interrupt_right_after_the_core_call_is_counted():
    """Ctrl-C between the core call (which updated parameters and moments) and the step counter
    leaves the step applied and counted, with the Generator where that step left it."""
    X, fit = data(), dict(batch_size=40, progress=False)
    m = small()
    m._core = _SignalAfterCore(m._core, at=5)
    with pytest.warns(RuntimeWarning, match="fit interrupted"):
        m.fit(X, epochs=4, **fit)
    m._core = m._core.core
    assert m.optimizer_.step == 3 + 2 and len(m.history_) == 1
    assert_same_state(m, interrupted_reference(5, X, 4, **fit))


def test_sigint_from_a_thread_during_fit_keeps_counter_and_parameters_together():
    X, fit = data(n=600), dict(batch_size=20, progress=False)
    main = threading.main_thread().ident
    for delay in (0.002, 0.01, 0.03):
        m = small()
        timer = threading.Timer(delay, signal.pthread_kill, (main, signal.SIGINT))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                timer.start()
                m.fit(X, epochs=10 ** 6, **fit)
            except KeyboardInterrupt:  # landed outside fit (a loaded machine): nothing to check
                timer.join()
                continue
        timer.join()
        assert m.interrupted_
        ref = interrupted_reference(m.optimizer_.step, X, 10 ** 6, **fit)
        np.testing.assert_array_equal(m.params, ref.params)
        np.testing.assert_array_equal(m.optimizer_.m, ref.optimizer_.m)
        assert m.optimizer_.step == ref.optimizer_.step


def test_interrupt_with_patience_keeps_the_last_step_as_the_warning_says(monkeypatch):
    X, V = data(), data(40, seed=1)
    m = small()
    losses = iter([1.0, 2.0, 3.0])  # epoch 1 is the best
    monkeypatch.setattr(hvae.training, "validation_loss", lambda model, x: next(losses))
    seen = []

    def stop_at_3(model, record):
        seen.append(model.params.copy())
        if record["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.warns(RuntimeWarning, match="last completed step"):
        m.fit(X, epochs=6, batch_size=40, progress=False, validation_data=V, patience=5,
              callbacks=[stop_at_3])
    np.testing.assert_array_equal(m.params, seen[-1])


# ----------------------------------------------------------------------------------------------
# one model's mutating calls are serialised or refused


def test_second_concurrent_fit_is_refused():
    X = data()
    m = small()
    started, tried = threading.Event(), threading.Event()
    errors = []

    def hold(model, record):
        if record["epoch"] == 1:
            started.set()
            tried.wait(30)

    def train():
        try:
            m.fit(X, epochs=2, batch_size=40, progress=False, callbacks=[hold])
        except BaseException as exc:  # noqa: B902
            errors.append(exc)

    t = threading.Thread(target=train)
    t.start()
    assert started.wait(30)
    try:
        with pytest.raises(RuntimeError, match="fit: this model is being trained"):
            m.fit(X, epochs=1, progress=False)
        with pytest.raises(RuntimeError, match="fit: this model is being trained"):
            m.partial_fit(X)
    finally:
        tried.set()
        t.join(60)
    assert not errors and [r["epoch"] for r in m.history_] == [1, 2]
    m.fit(X, epochs=3, batch_size=40, progress=False)  # free again
    with pytest.raises(RuntimeError, match="being trained"):  # from inside its own fit, too
        m.fit(X, epochs=4, progress=False,
              callbacks=[lambda model, r: model.fit(X, epochs=1, progress=False)])


def test_save_from_another_thread_waits_for_the_step(tmp_path):
    """The core updates parameters with the GIL released: a save that copied them meanwhile
    would hold half an Adam step. Every file saved during fit is the state after some step."""
    X, fit = data(n=400, d=64), dict(batch_size=100, progress=False)
    ref = hvae.HVAE(64, [16, 8], seed=3)  # ~30k parameters: an Adam update takes a while
    trajectory = {}
    ref._ensure_optimizer()
    real = ref.optimizer_.train_step

    def recording(*a, **k):
        out = real(*a, **k)
        trajectory[ref.optimizer_.step] = (ref.params.copy(), ref.optimizer_.v.copy())
        return out

    ref.optimizer_.train_step = recording
    ref.fit(X, epochs=40, **fit)

    m = hvae.HVAE(64, [16, 8], seed=3)
    done = threading.Event()
    t = threading.Thread(target=lambda: (m.fit(X, epochs=40, **fit), done.set()))
    t.start()
    k = 0
    while not done.is_set() and k < 300:
        p = tmp_path / f"s{k}.npz"
        m.save(p)
        k += 1
    t.join(60)
    checked = 0
    for p in tmp_path.glob("s*.npz"):
        r = hvae.load(p)
        if r.optimizer_ is None or r.optimizer_.step == 0:
            continue
        params, v = trajectory[r.optimizer_.step]
        np.testing.assert_array_equal(r.params, params)
        np.testing.assert_array_equal(r.optimizer_.v, v)
        checked += 1
    assert checked >= 1


# ----------------------------------------------------------------------------------------------
# what the constructor accepts, save writes and load restores


@pytest.mark.parametrize("seed, stored", [
    (np.int64(3), 3), (np.uint8(7), 7), (np.int32(0), 0), (2 ** 70, 2 ** 70), ([1, 2], [1, 2]),
    ((4, 5), [4, 5]), (np.array([6, 7]), [6, 7]), (None, None)])
def test_accepted_seeds_are_saved_and_restored(tmp_path, seed, stored):
    m = small(seed=seed)
    assert m.seed == stored and type(m.seed) is type(stored)
    m.fit(data(), epochs=1, batch_size=40, progress=False, checkpoint=tmp_path / "m.npz")
    r = hvae.load(tmp_path / "m.npz")
    assert r.seed == stored
    assert_same_state(r, m)
    if seed is not None:  # the same stream as the plain form
        np.testing.assert_array_equal(small(seed=seed).params, small(seed=stored).params)


@pytest.mark.parametrize("seed, exc, words", [
    (-1, ValueError, "seed: expected None, an integer >= 0"),
    (np.random.default_rng(0), TypeError, "seed: .*Generator"),
    (np.random.SeedSequence(0), TypeError, "seed: .*SeedSequence"),
    (np.random.PCG64(0), TypeError, "seed: .*PCG64"),
    (1.5, TypeError, "seed: "), ("3", TypeError, "seed: "), (True, TypeError, "seed: "),
    ([], ValueError, "seed: "), ([1, -2], ValueError, "seed: "), ([1.5], ValueError, "seed: "),
    (np.zeros((2, 2), int), ValueError, "seed: ")])
def test_seeds_that_could_not_be_saved_are_refused_at_construction(seed, exc, words):
    with pytest.raises(exc, match=words):
        small(seed=seed)


def test_list_seed_through_the_cli(tmp_path, capsys):
    pytest.importorskip("sklearn")
    path = tmp_path / "m.npz"
    m = hvae.HVAE(64, [4], [[16]], seed=[1, 2])
    m.save(path)
    for argv in (["train", "--data", "digits", "--max-examples", "100", "--epochs", "1",
                  "--checkpoint", path, "--resume", "--no-progress"],
                 ["eval", path, "--data", "digits", "--max-examples", "20", "-k", "2",
                  "--no-progress"], ["info", path]):
        code = cli.main([str(a) for a in argv])
        out = capsys.readouterr()
        assert code == 0, out.err
    assert hvae.load(path).seed == [1, 2]


# ----------------------------------------------------------------------------------------------
# special files: written through or refused, never replaced; load never hangs


def test_save_writes_through_a_symlink(tmp_path):
    m = small()
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "m.npz"
    target.write_bytes(b"old")
    link = tmp_path / "link.npz"
    link.symlink_to(target)
    m.save(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    np.testing.assert_array_equal(hvae.load(target).params, m.params)
    chain = tmp_path / "chain.npz"
    chain.symlink_to(link)
    m.save(chain)
    assert chain.is_symlink() and link.is_symlink()
    dangling = tmp_path / "dangling.npz"
    dangling.symlink_to(tmp_path / "real" / "new.npz")
    m.save(dangling)
    assert dangling.is_symlink() and (tmp_path / "real" / "new.npz").is_file()
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_special_files_are_refused_never_replaced(tmp_path):
    m = small()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    null_link = tmp_path / "null.npz"
    null_link.symlink_to(os.devnull)
    for path in (fifo, null_link, tmp_path):
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is (a FIFO|a character "
                                             "device|a directory)"):
            m.save(path)
        with pytest.raises(ValueError, match=rf"checkpoint: {re.escape(str(path))}"):
            m.fit(data(), epochs=1, progress=False, checkpoint=path)
        assert not m.history_
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and null_link.is_symlink()
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_fit_checks_the_checkpoint_path_before_training(tmp_path):
    m = small()
    for bad, exc in (("", ValueError), (3, TypeError)):
        with pytest.raises(exc, match="checkpoint: expected a file path"):
            m.fit(data(), epochs=1, progress=False, checkpoint=bad)
    assert not m.history_ and (m.optimizer_ is None or m.optimizer_.step == 0)
    m.fit(data(), epochs=1, progress=False, checkpoint=os.fsencode(tmp_path / "b.npz"))
    assert len(hvae.load(os.fsencode(tmp_path / "b.npz")).history_) == 1


def test_load_on_a_fifo_does_not_hang(tmp_path):
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    code, out = run_py(f"""
        import hvae, sys
        try:
            hvae.load({str(fifo)!r})
        except ValueError as exc:
            print("ValueError:", exc)
        sys.exit(__import__("hvae.cli").cli.main(["info", {str(fifo)!r}]))
        """, timeout=30)
    assert code == 1, out
    assert f"ValueError: {fifo}: not a valid hvae checkpoint (a FIFO, not a regular file)" in out
    assert f"hvae: error: {fifo}" in out and "Traceback" not in out


def test_load_takes_bytes_paths_and_names_bad_ones(tmp_path):
    m = small()
    m.save(tmp_path / "m.npz")
    np.testing.assert_array_equal(hvae.load(os.fsencode(tmp_path / "m.npz")).params, m.params)
    with pytest.raises(TypeError, match="path: expected a file path"):
        hvae.load(3)


# ----------------------------------------------------------------------------------------------
# every failure of load is a ValueError naming the file


def test_central_directory_bit_flips_are_value_errors(tmp_path, capsys):
    m = small()
    good = tmp_path / "good.npz"
    m.save(good)
    raw = good.read_bytes()
    start = raw.index(b"PK\x01\x02")  # the first central directory entry (meta.npy)
    bad = tmp_path / "bad.npz"
    refused = 0
    rng = np.random.default_rng(0)
    for pos in range(start, len(raw)):
        for bit in rng.choice(8, 2, replace=False):
            flipped = bytearray(raw)
            flipped[pos] ^= 1 << int(bit)
            bad.write_bytes(bytes(flipped))
            try:
                hvae.load(bad)
            except ValueError as exc:
                assert str(exc).startswith(f"{bad}: not a valid hvae checkpoint"), exc
                refused += 1
    assert refused > 50
    # the ones that used to escape: compression method and the encryption flag
    for field, value in ((10, 99), (8, 1)):  # central header: method at +10, flags at +8
        flipped = bytearray(raw)
        flipped[start + field] = value
        bad.write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match="not a valid hvae checkpoint"):
            hvae.load(bad)
        assert cli.main(["info", str(bad)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("hvae: error: ") and "Traceback" not in err


def _rewrite_history(src, dst, history):
    import json
    with zipfile.ZipFile(src) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    meta = json.loads(bytes(np.load(io.BytesIO(members["meta.npy"]))).decode())
    meta["history"] = history
    buf = io.BytesIO()
    np.save(buf, np.frombuffer(json.dumps(meta).encode(), np.uint8))
    members["meta.npy"] = buf.getvalue()
    with zipfile.ZipFile(dst, "w") as zf:
        for n, b in members.items():
            zf.writestr(n, b)


@pytest.mark.parametrize("change", [
    {"val_loss": [1.0, 2.0]}, {"seconds": "3"}, {"epoch": True}, {"epoch": 0}, {"loss": None},
    {"kl": 3.0}, {"beta": [1]}, {"note": "x"}, {"seconds": [1]}])
def test_history_of_the_wrong_type_is_refused_and_info_never_crashes(tmp_path, capsys, change):
    m = small()
    m.fit(data(), epochs=2, batch_size=40, progress=False, validation_data=data(20, seed=1))
    m.save(tmp_path / "m.npz")
    history = [dict(r) for r in m.history_]
    history[1].update(change)
    _rewrite_history(tmp_path / "m.npz", tmp_path / "bad.npz", history)
    key = next(iter(change))
    with pytest.raises(ValueError, match=rf"bad\.npz: not a valid .*history\[1\]\['{key}'\]"):
        hvae.load(tmp_path / "bad.npz")
    assert cli.main(["info", str(tmp_path / "bad.npz")]) == 1
    assert "Traceback" not in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the binding: hostile __index__ / __float__ cannot crash the interpreter


def test_index_that_shrinks_the_dims_list_does_not_crash():
    code, out = run_py("""
        from hvae import _core
        dims = []
        class Shrink:
            def __index__(self):
                del dims[:]
                return 3
        dims.extend([Shrink(), 2, 2, 2])
        m = _core.Model(4, dims, [[], [], [], []])
        hidden = []
        class ShrinkOuter:
            def __index__(self):
                del hidden[:]
                return 3
        hidden.extend([[ShrinkOuter()], [2]])
        m = _core.Model(4, [2, 2], hidden)
        print("ok", m.n_params)
        """)
    assert code == 0 and "ok" in out, out


def test_float_that_resizes_a_buffer_is_caught_before_the_core_call():
    code, out = run_py("""
        import numpy as np
        from hvae import _core
        m = _core.Model(4, [2], [[3]])
        P = m.n_params
        bufs = [np.zeros(P, np.float32) for _ in range(4)]
        class Resize:
            def __init__(self, k):
                self.k = k
            def __float__(self):
                bufs[self.k].resize(1, refcheck=False)
                return 0.5
        x = np.ones((3, 4), np.float32)
        eps = [np.zeros((3, 2), np.float32)]
        names = ["params", "m", "v", "grad"]
        for k in range(4):
            for arg in ("beta", "lr", "beta1", "adam_eps"):
                for b in bufs:
                    b.resize(P, refcheck=False)
                try:
                    m.train_step(*bufs, x, eps, 1, **{arg: Resize(k)})
                except ValueError as exc:
                    assert str(exc).startswith(names[k] + ":"), exc
                else:
                    raise SystemExit(f"no error for {arg} resizing {names[k]}")
        # an input resized by a later argument's conversion
        class Arr:
            def __init__(self, victim):
                self.victim = victim
            def __array__(self, dtype=None, copy=None):
                self.victim.resize(1, refcheck=False)
                return np.zeros((3, 2), np.float32)
        p = np.zeros(P, np.float32)
        for call in (lambda: m.forward(p, x, eps=[Arr(p)]),
                     lambda: m.forward(p, x, eps=[Arr(x)]),
                     lambda: m.encode(p, x, eps=[Arr(x)]),
                     lambda: m.decode(p, np.ones((3, 2), np.float32), eps=None,
                                      temperature=Resize(0))):
            p.resize(P, refcheck=False); x.resize((3, 4), refcheck=False)
            bufs[0] = p
            try:
                call()
            except ValueError as exc:
                assert str(exc).split(":")[0] in ("params", "x", "z"), exc
            else:
                raise SystemExit("no error")
        print("ok")
        """)
    assert code == 0 and "ok" in out, out


# ----------------------------------------------------------------------------------------------
# fork, pickle, deepcopy


def test_fork_while_another_thread_trains_or_evaluates():
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    code, out = run_py("""
        import os, tempfile, threading, time, numpy as np, hvae, warnings
        warnings.simplefilter("ignore", DeprecationWarning)
        folder = tempfile.mkdtemp()
        rng = np.random.default_rng(0)
        X = (rng.random((2000, 64)) < 0.3).astype(np.float32)
        m = hvae.HVAE(64, [16, 8], seed=0)
        stop = threading.Event()
        def busy():
            while not stop.is_set():
                m.partial_fit(X, batch_size=500)
                m.elbo(X[:500])
        t = threading.Thread(target=busy, daemon=True)
        t.start()
        time.sleep(0.05)
        bad = 0
        for trial in range(12):
            time.sleep(0.003 * trial)
            pid = os.fork()
            if pid == 0:
                try:
                    m.elbo(X[:10]); m.partial_fit(X[:50], batch_size=25)
                    path = os.path.join(folder, f"c{os.getpid()}.npz")
                    m.save(path); hvae.load(path)
                    os._exit(0)
                except BaseException as exc:
                    print("child:", repr(exc), flush=True)
                    os._exit(3)
            deadline = time.time() + 20
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    bad += os.waitstatus_to_exitcode(status) != 0
                    break
                if time.time() > deadline:
                    os.kill(pid, 9); os.waitpid(pid, 0); bad += 1
                    print("child hung", flush=True)
                    break
                time.sleep(0.01)
        stop.set(); t.join()
        print("bad", bad)
        """, timeout=300)
    assert code == 0 and "bad 0" in out, out


def test_deepcopy_and_pickle_go_through_the_checkpoint(tmp_path):
    X = data()
    m = small(seed=[4, 2])
    m.fit(X, epochs=1, batch_size=40, progress=False)
    for other in (copy.deepcopy(m), copy.copy(m), pickle.loads(pickle.dumps(m)),
                  pickle.loads(pickle.dumps(m, protocol=0))):
        assert other is not m and other.params is not m.params
        assert_same_state(other, m)
        other.fit(X, epochs=2, batch_size=40, progress=False)
    m.fit(X, epochs=2, batch_size=40, progress=False)
    assert_same_state(other, m)
    # the pickle is one call of the loader on bytes (and the class): no object state is set
    for protocol in (3, pickle.HIGHEST_PROTOCOL):  # (0-2 encode bytes with a call of codecs)
        blob = pickle.dumps(m, protocol=protocol)
        ops = [op.name for op, _, _ in pickletools.genops(blob)]
        assert ops.count("REDUCE") == 1 and b"_from_bytes" in blob
        assert not {"BUILD", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX"} & set(ops)
    with pytest.raises(ValueError, match="not a valid hvae checkpoint"):
        checkpoint._from_bytes(b"PK\x03\x04 not really", hvae.HVAE)
    m.params = m.params.astype(np.float64)
    with pytest.raises(ValueError, match="cannot copy or pickle this HVAE.*params"):
        copy.deepcopy(m)


def test_joblib_style_process_pool_can_use_a_model():
    import multiprocessing
    m = small()
    m.fit(data(), epochs=1, batch_size=40, progress=False)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        got = pool.apply(_elbo_sum, (pickle.dumps(m), data(5)))
    assert np.isfinite(got)


def _elbo_sum(blob, x):
    return float(pickle.loads(blob).elbo(x).sum())


# ----------------------------------------------------------------------------------------------
# precision and messages


def test_values_beyond_float32_are_named():
    m = small()
    x = data(4)
    for call, name in ((lambda: m.loss_and_grad(x, beta=1e300), "beta"),
                       (lambda: m._core.forward(m.params, x, eps=m.draw_eps(4), beta=1e300),
                        "beta"),
                       (lambda: m.fit(x, epochs=1, beta=1e300, progress=False), "beta"),
                       (lambda: m.fit(x, epochs=1, lr=1e39, progress=False), "lr"),
                       (lambda: m.sample(3, temperature=1e39), "temperature"),
                       (lambda: m.decode(np.zeros((2, 2), np.float32), temperature=1e39),
                        "temperature"),
                       (lambda: m._core.decode(m.params, np.zeros((2, 2), np.float32),
                                               temperature=1e39), "temperature")):
        with pytest.raises(ValueError, match=rf"^{name}: expected a finite number"):
            call()


def test_huge_k_is_refused_at_once():
    code, out = run_py("""
        import numpy as np, hvae
        m = hvae.HVAE(12, [4, 2], [[8], [5]], seed=3)
        x = np.zeros((2, 12), np.float32)
        for f in (m.elbo, m.log_likelihood, m.score):
            try:
                f(x, k=2 ** 40)
            except ValueError as exc:
                assert str(exc).startswith("k: expected an integer in [1, 2147483647]"), exc
            else:
                raise SystemExit("no error")
        print("ok")
        """, timeout=30)
    assert code == 0 and "ok" in out, out


def test_messages_name_the_argument():
    m = small()
    x = data(2)
    cases = [(lambda: m.traverse(x[0], 1.5, 0, [0.0]), "level"),
             (lambda: m.traverse(x[0], True, 0, [0.0]), "level"),
             (lambda: m.traverse(x[0], 1, 0.5, [0.0]), "dim"),
             (lambda: m.traverse(x, 1, 0, [0.0]), "x"),
             (lambda: m.traverse(x[0], 1, 0, [np.nan]), "values"),
             (lambda: m.traverse(x[0], 1, 0, [1e39]), "values"),
             (lambda: m.interpolate(x[0], x[1], steps=0), "steps"),
             (lambda: m.interpolate(x[0], x[1], steps=2.7), "steps"),
             (lambda: m.interpolate(x, x[1]), "x_a"),
             (lambda: m.score(np.zeros((0, 12), np.float32)), "X")]
    for call, name in cases:
        with pytest.raises(ValueError, match=rf"^{name}: expected"):
            call()
    assert m.traverse(x[0], 2, 1, [0.0, 1.0]).shape == (2, 12)
    assert m.interpolate(x[0], x[1], steps=np.int64(3)).shape == (3, 12)
