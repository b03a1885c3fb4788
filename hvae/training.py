"""The training loop behind HVAE.fit / partial_fit: Adam on the flat buffer, KL warm-up, early
stopping, progress bar, per-epoch history, checkpoints, safe stops (NaN, Ctrl-C), threads, and
data-parallel training over MPI (through :mod:`hvae.parallel`)."""
import os
import signal
import threading
import time
import warnings

import numpy as np

from . import _core, parallel
from .atomic import destination

try:  # the C function behind signal.signal, without its enum conversions (a step pays twice)
    from _signal import signal as _set_handler
except ImportError:  # pragma: no cover
    _set_handler = signal.signal


def resolve_n_jobs(n_jobs):
    """scikit-learn's convention: None -> 1, -1 -> every CPU (at most _core.MAX_THREADS),
    k >= 1 -> k."""
    if n_jobs is None:
        return 1
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs == 0 \
            or n_jobs < -1 or n_jobs > _core.MAX_THREADS:
        raise ValueError(f"n_jobs: expected None, -1 or an integer in [1, {_core.MAX_THREADS}], "
                         f"got {n_jobs!r}")
    return min(os.cpu_count() or 1, _core.MAX_THREADS) if n_jobs == -1 else int(n_jobs)




class _Deferred:
    """Signals held back: inside ``with _Deferred(signums):`` the Python handlers of those signals
    only record what arrives; on exit the handlers are put back and each recorded signal is
    passed to its handler (so a KeyboardInterrupt from Ctrl-C is raised after the block, never
    inside it). Outside the main thread, where Python runs no signal handler, it does nothing.
    """

    def __init__(self, signums):
        self.signums = signums
        self.saved = []
        self.pending = {}

    def _record(self, signum, frame):
        self.pending.setdefault(signum, frame)

    def __enter__(self):
        if not self.signums or threading.current_thread() is not threading.main_thread():
            return self
        try:
            for s in self.signums:
                old = _set_handler(s, self._record)
                self.saved.append((s, old))
        except BaseException:
            self._restore()
            raise
        return self

    def _restore(self):
        while self.saved:
            s, old = self.saved.pop()
            _set_handler(s, old)

    def __exit__(self, *exc):
        handlers = dict(self.saved)
        self._restore()
        pending, self.pending = self.pending, {}
        for signum, frame in pending.items():
            handler = handlers.get(signum)
            if callable(handler):
                handler(signum, frame)
        return False


def handled_signals():
    """The signals that have a Python handler now (which can raise in the middle of Python
    code): those a step of training defers."""
    if threading.current_thread() is not threading.main_thread():
        return ()
    out = []
    for s in signal.valid_signals():
        try:
            if callable(signal.getsignal(s)):
                out.append(int(s))
        except (ValueError, OSError):
            pass
    return tuple(out)


class NonFiniteStep(FloatingPointError):
    """A step whose loss or gradient is not finite (fit stops, keeping the last finite
    parameters). Under MPI every rank raises it alike: it comes from the reduced numbers."""


class Adam:
    """Bias-corrected Adam state over a flat parameter vector (the update runs in C).

    Attributes
    ----------
    m, v : ndarray, shape (n_params,)
        First and second moment estimates.
    step : int
        Updates done so far.
    """

    def __init__(self, n, dtype, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
        self.m = np.zeros(n, dtype)
        self.v = np.zeros(n, dtype)
        self.step = 0
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps

    def update(self, params, grad):
        """One step in place; returns False (changing nothing) when grad is not finite."""
        ok = _core.adam_update(params, self.m, self.v, grad, self.step + 1, lr=self.lr,
                               beta1=self.beta1, beta2=self.beta2, eps=self.eps)
        if ok:
            self.step += 1
        return ok

    def train_step(self, core, params, grad, x, eps, beta, threads=1, free_bits=None,
                   estimator=None):
        """Loss, gradient (into grad) and this update in one core call
        (``_core.Model.train_step``): the numbers of ``core.forward`` then :meth:`update`.
        free_bits: None or T floats; estimator: None (the ELBO) or HVAE.estimator's dict (see
        HVAE.fit). Returns (loss, terms, updated); nothing changes when the loss or gradient is
        not finite."""
        loss, terms, ok = core.train_step(params, self.m, self.v, grad, x, eps, self.step + 1,
                                          beta=beta, lr=self.lr, beta1=self.beta1,
                                          beta2=self.beta2, adam_eps=self.eps, threads=threads,
                                          free_bits=free_bits, **(estimator or {}))
        if ok:
            self.step += 1
        return loss, terms, ok


def warmup_beta(beta, warmup_epochs, step, steps_per_epoch, delay_epochs=0):
    """KL weight at an optimiser step: 0 for ``delay_epochs``, then linear from 0 to beta over
    ``warmup_epochs`` (Sonderby et al.)."""
    done = step + 1 - delay_epochs * steps_per_epoch  # steps of the warm-up, this one included
    if done <= 0:
        return 0.0
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, done / (warmup_epochs * steps_per_epoch))


class _Bar:
    """A tqdm bar over optimiser steps, or nothing."""

    def __init__(self, total, enabled, desc):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=True)

    def update(self, n, **postfix):
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def set_description(self, desc):
        if self.bar is not None:
            self.bar.set_description(desc, refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_epoch(model, X, batch_size, beta, warmup_epochs, warmup_delay, bar, epoch, n_jobs,
              free_bits=None, estimator=None, signums=(), step=None):
    """One shuffled pass of minibatches, each step one core call on n_jobs threads (free_bits:
    None or T floats; estimator: None or HVAE.estimator's dict). Returns the epoch's mean loss
    and terms.

    With ``step`` (a :class:`hvae.parallel.DataParallelStep`) the steps are data-parallel: every
    rank draws the same order and the whole batch's noise, and ``step`` does this rank's rows.

    A step (its noise from the model's Generator, the update of parameters and Adam moments, the
    step counter) happens under the model's lock with the signals ``signums`` deferred, so it
    is done wholly or not at all: a step that raises leaves the Generator as it was.

    Raises FloatingPointError on a non-finite loss or gradient (parameters untouched by that step).
    """
    n = len(X)
    with model._lock, _Deferred(signums):
        order = model._rng.permutation(n)
    steps = (n + batch_size - 1) // batch_size
    grad = np.empty(model.n_params, model.dtype)
    opt = model.optimizer_
    T = model.n_levels
    sums = np.zeros(T + 2)  # loss, rec, kl_1..kl_T, weighted by batch size
    k = estimator["k"] if estimator else 1
    part = slice(None)
    for s in range(steps):
        idx = order[s * batch_size:(s + 1) * batch_size]
        if step is not None:  # this rank's rows of the batch
            part = parallel.shard(len(idx), step.comm.Get_rank(), step.comm.Get_size())
        xb = X[idx[part]]
        with model._lock, _Deferred(signums):
            state = model._rng.bit_generator.state
            try:
                eps = model.draw_eps(len(idx) * k)  # the whole batch's, on every rank
                b = warmup_beta(beta, warmup_epochs, opt.step, steps, warmup_delay)
                if model.deterministic:
                    eps = None
                if step is None:
                    loss, terms, ok = opt.train_step(model._core, model.params, grad, xb, eps, b,
                                                     n_jobs, free_bits, estimator)
                    means = terms.mean(axis=1)
                else:
                    if eps is not None:
                        eps = [e[part.start * k:part.stop * k] for e in eps]
                    loss, means, ok = step(xb, eps, len(idx), b, n_jobs, free_bits, estimator)
                if not ok:
                    model._rng.bit_generator.state = state
            except BaseException:
                model._rng.bit_generator.state = state
                raise
        if not ok:
            what = "loss" if not np.isfinite(loss) else "gradient"
            raise NonFiniteStep(
                f"non-finite {what} at epoch {epoch + 1}, step {s + 1} (loss={loss}); training "
                "stopped and the model keeps its last finite parameters. Try a lower lr, "
                "float64, or check the data.")
        sums += len(idx) * np.r_[loss, means]
        if bar.bar is not None:
            bar.update(1, loss=f"{loss:.2f}", rec=f"{means[0]:.2f}",
                       kl="/".join(f"{k:.2f}" for k in means[1:]))
    sums /= n
    return {"loss": float(sums[0]), "reconstruction": float(sums[1]),
            "kl": [float(k) for k in sums[2:]], "beta": float(b)}


def validation_loss(model, X, rows=4096):
    """Mean per-example loss at beta = 1: the negative ELBO (k = 1, from the densities) of a VAE,
    the reconstruction plus chain terms of an autoencoder."""
    if not model.deterministic:
        return float(-np.mean(model.elbo(X)))
    total = 0.0
    for start in range(0, len(X), rows):
        with model._lock:
            _, terms, _ = model._core.forward(model.params, X[start:start + rows])
        total += float(terms.sum())
    return total / len(X)


# The settings of a training run that its checkpoint remembers (``HVAE.train_config_``) and the
# next fit restores: name -> the value a new run gets. A new setting of fit is one entry here.
TRAIN_DEFAULTS = {
    "epochs": 50,             # the run's length, epochs already done included
    "batch_size": 100,
    "lr": 1e-3,               # Adam's step size in the first epoch ...
    "lr_decay": 0.1,          # ... falling exponentially to lr * lr_decay in the run's last one
    "kl_warmup_epochs": 20.0,
    "kl_warmup_delay": 5.0,
    "beta": 1.0,
    "free_bits": None,        # nats per level (None: none)
    "objective": "elbo",      # or "iwae", with k samples and its gradient estimator
    "k": 1,
    "gradient": "standard",
    "patience": 0,            # 0: no early stopping
}


def _check_number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")


def resolve_settings(model, given, saved=None):
    """The settings of a fit call: each of :data:`TRAIN_DEFAULTS` from ``given`` when it is
    not None, else the run's saved value (``model.train_config_``), else the default.

    Parameters
    ----------
    model : HVAE
    given : dict
        Setting name -> the value passed to fit (None: not passed).
    saved : dict, optional
        The run's settings to fall back on instead of ``model.train_config_`` (a new run: {}).

    Returns
    -------
    settings : dict
        Every setting of :data:`TRAIN_DEFAULTS`, checked.
    overrides : dict
        Setting name -> (saved value, new value) for each given value that changes the saved
        one.
    """
    saved = model.train_config_ if saved is None else saved
    settings, overrides = {}, {}
    for key, default in TRAIN_DEFAULTS.items():
        value = given.get(key)
        if key == "free_bits" and value is not None:  # as stored: one float per level
            value = model.free_bits_per_level(value)
        if value is None:
            value = saved.get(key, default)
        elif key in saved and saved[key] != value:
            overrides[key] = (saved[key], value)
        settings[key] = value
    _check_int("epochs", settings["epochs"], 0)
    _check_int("batch_size", settings["batch_size"], 1)
    _check_int("patience", settings["patience"], 0)
    for name in ("lr", "lr_decay", "kl_warmup_epochs", "kl_warmup_delay", "beta"):
        _check_number(name, settings[name])
    if settings["lr_decay"] <= 0:
        raise ValueError(f"lr_decay: expected a number > 0, got {settings['lr_decay']!r}")
    model.estimator(settings["objective"], settings["k"], settings["gradient"])
    if settings["free_bits"] is not None and settings["objective"] == "iwae":
        raise ValueError("free_bits: not defined for objective='iwae' (a bound on log p(x), not "
                         "a sum of KL terms)")
    for key, value in settings.items():  # plain Python numbers: the checkpoint stores JSON
        if isinstance(TRAIN_DEFAULTS[key], (int, float)):
            settings[key] = int(value) if isinstance(TRAIN_DEFAULTS[key], int) else float(value)
    return settings, overrides


def epoch_lr(settings, epoch):
    """Adam's step size in epoch ``epoch`` (0-based) of the run: lr * lr_decay ** (epoch /
    (epochs - 1)), from lr in the first epoch to lr * lr_decay in the last."""
    span = max(1, settings["epochs"] - 1)
    return float(settings["lr"] * settings["lr_decay"] ** (min(epoch, span) / span))


def notes(model, settings, overrides, whole_run=True):
    """What a fit call with these settings should tell its caller before it trains: changed
    settings of a run in progress, nothing left to train, a run that ends inside its KL
    warm-up. Returns a list of sentences."""
    done, epochs = len(model.history_), settings["epochs"]
    out = []
    if overrides and done:
        out.append(f"the run's settings change from epoch {done + 1}: " + ", ".join(
            f"{k} {old!r} -> {new!r}" for k, (old, new) in overrides.items()))
    if whole_run and epochs <= done:
        out.append(f"nothing to train: the model has done {done} epochs and epochs={epochs} "
                   f"counts them (pass a larger epochs to train more)")
    full_kl = settings["kl_warmup_delay"] + settings["kl_warmup_epochs"]
    if not model.deterministic and done < epochs < full_kl:
        out.append(f"the run ends after {epochs} epochs, before the KL warm-up does "
                   f"(kl_warmup_delay {settings['kl_warmup_delay']:g} + kl_warmup_epochs "
                   f"{settings['kl_warmup_epochs']:g}): its loss is not the ELBO; shorten the "
                   f"warm-up for a short run")
    return out


def fit(model, X, *, validation_data=None, progress=True, checkpoint=None, callbacks=None,
        n_jobs=None, stop_after=None, restart=False, comm=None, **given):
    """The body of HVAE.fit (see there); ``given`` holds the settings of
    :data:`TRAIN_DEFAULTS` as passed (None: the run's saved value). ``stop_after``: end this
    call after that many epochs in all (partial_fit), without ending the run; a run that
    reaches its planned epochs so grows by one. ``restart``: a new run from the seed, begun
    once the arguments are checked (``warm_start=False``). ``comm``: an mpi4py communicator
    for data-parallel training (DESIGN.md §8); every rank's arguments are checked, and a bad
    one on any rank raises on every rank before any training starts."""
    if comm is not None:
        parallel.check_comm(comm)
    error = checked = None
    try:
        checked = _check(model, X, validation_data, checkpoint, callbacks, n_jobs, stop_after,
                         restart, given)
    except Exception as e:
        if comm is None:
            raise
        error = e
    if comm is not None:
        try:
            parallel.agree(comm, error, "fit")
            settings, _, X, X_val = checked[:4]
            parallel.check_same(
                comm, X=parallel.fingerprint(X),
                validation_data=None if X_val is None else parallel.fingerprint(X_val),
                settings=settings, stop_after=stop_after, restart=restart,
                model=sorted((k, repr(v)) for k, v in model.get_params().items() if k != "seed"))
        except BaseException:
            if checked is not None:
                model._fit_thread = None
            raise
    try:
        return _fit(model, *checked, progress, checkpoint, stop_after, restart, comm)
    except NonFiniteStep:
        raise  # decided on the reduced numbers: every rank raises it alike
    except BaseException as e:
        if comm is not None:  # this rank alone: the others would wait for it forever
            parallel.abort(comm, e)
        raise
    finally:
        model._fit_thread = None


def _check(model, X, validation_data, checkpoint, callbacks, n_jobs, stop_after, restart, given):
    """fit's arguments checked, and the model claimed for this call (``_fit_thread``).
    Returns (settings, overrides, X, X_val, callbacks, n_jobs)."""
    settings, overrides = resolve_settings(model, given, {} if restart else None)
    if stop_after is not None:
        settings["epochs"] = max(settings["epochs"], stop_after)
    X = model._check_x(X, "X", scored=True)
    X_val = None if validation_data is None else model._check_x(validation_data,
                                                                "validation_data", scored=True)
    if len(X) == 0:
        raise ValueError("X: expected at least one row, got an empty array")
    if X_val is not None and len(X_val) == 0:
        raise ValueError("validation_data: expected at least one row, got an empty array")
    for name in ("lr", "beta"):  # also within the model's precision (1e300 is inf in float32)
        with np.errstate(over="ignore"):
            fits = np.isfinite(model.dtype_type(settings[name]))
        if not fits:
            raise ValueError(f"{name}: expected a finite number >= 0 (in {model.dtype}), got "
                             f"{settings[name]!r}")
    if checkpoint is not None:
        path = os.fsdecode(os.fspath(checkpoint)) if isinstance(
            checkpoint, (str, bytes, os.PathLike)) else checkpoint
        if isinstance(path, str) and path and os.path.isdir(path):
            raise ValueError(f"checkpoint: {path} is a directory; expected a file path")
        destination(path, "checkpoint")  # not "", not a FIFO, a device...
    if callbacks is not None:
        given_cbs = callbacks
        callbacks = list(given_cbs) if isinstance(given_cbs, (list, tuple)) else None
        if callbacks is None or not all(callable(cb) for cb in callbacks):
            raise TypeError(f"callbacks: expected a list of callables, got {given_cbs!r}")
    if settings["patience"] and X_val is None:
        raise ValueError("patience: early stopping needs validation_data")
    n_jobs = resolve_n_jobs(n_jobs)
    with model._lock:
        if model._fit_thread is not None:
            raise RuntimeError(
                "fit: this model is being trained by another call of fit or partial_fit (thread "
                f"{model._fit_thread}); one model trains in one call at a time (copy.deepcopy "
                "it to train a copy)")
        model._fit_thread = threading.get_ident()
    return settings, overrides, X, X_val, callbacks, n_jobs


def _fit(model, settings, overrides, X, X_val, callbacks, n_jobs, progress, checkpoint,
         stop_after, restart, comm):
    patience = settings["patience"]
    lead = comm is None or comm.Get_rank() == 0  # shows the bar, warns, writes checkpoints
    if restart:
        with model._lock:  # a new run's state, all of it at once
            model._restart()
    model._ensure_optimizer()
    step = None
    if comm is not None:
        parallel.broadcast_state(comm, model)
        step = parallel.DataParallelStep(model, comm)
    done = len(model.history_)
    last = settings["epochs"] if stop_after is None else stop_after
    for message in notes(model, settings, overrides, stop_after is None) if lead else ():
        warnings.warn(f"fit: {message}", UserWarning, stacklevel=3)
    model.train_config_.update(settings)
    estimator = model.estimator(settings["objective"], settings["k"], settings["gradient"])
    if checkpoint is not None and lead:
        os.makedirs(os.path.dirname(destination(checkpoint, "checkpoint")), exist_ok=True)
    batch_size = min(int(settings["batch_size"]), len(X))
    steps = (len(X) + batch_size - 1) // batch_size
    best = model.best_ if patience else None  # (val_loss, epoch, params) of the best epoch
    if not patience:
        model.best_ = None
    bar = _Bar(max(0, last - done) * steps, progress and lead, "epoch")
    model.interrupted_ = False
    ended = True  # the run is over when this call returns (plan done, early stop, callback)
    try:
        for epoch in range(done, last):
            bar.set_description(f"epoch {epoch + 1}")
            model.optimizer_.lr = epoch_lr(settings, epoch)
            t0 = time.perf_counter()
            signums = handled_signals()  # once an epoch: a callback may install a handler
            waited = 0.0 if step is None else step.seconds
            record = run_epoch(model, X, batch_size, settings["beta"],
                               settings["kl_warmup_epochs"], settings["kl_warmup_delay"], bar,
                               epoch, n_jobs, settings["free_bits"], estimator, signums, step)
            record["epoch"] = epoch + 1
            record["lr"] = model.optimizer_.lr
            record["val_loss"] = None if X_val is None else validation_loss(model, X_val)
            if comm is not None:
                parallel.check_identical(comm, model)
                record["ranks"] = comm.Get_size()
                record["allreduce_seconds"] = step.seconds - waited
            record["seconds"] = time.perf_counter() - t0
            if comm is not None:  # rank 0's record (its timings, its val_loss, which may differ
                record = comm.bcast(record)  # by rounding where n_jobs does) on every rank
            stop = False
            with _Deferred(signums):  # Ctrl-C waits for the record and its checkpoint
                model.history_.append(record)
                if patience:
                    if best is None or record["val_loss"] < best[0]:
                        best = (record["val_loss"], epoch + 1, model.params.copy())
                    model.best_ = best
                    if epoch + 1 - best[1] >= patience:  # early stop: the run ends here
                        stop = True
                        model.train_config_["epochs"] = epoch + 1
                if checkpoint is not None and lead:
                    model.save(checkpoint)
            for cb in callbacks or ():
                stop = cb(model, record) is True or stop
            if comm is not None:  # one rank's callback stops every rank
                stop = any(comm.allgather(stop))
            if stop:
                break
        else:
            ended = stop_after is None or last >= settings["epochs"]
    except KeyboardInterrupt:
        if comm is not None:  # one rank's Ctrl-C: fit (above) ends the whole job
            raise
        ended = False
        model.interrupted_ = True
        warnings.warn(f"fit interrupted in epoch {len(model.history_) + 1}: the model keeps the "
                      "parameters of its last completed step", RuntimeWarning, stacklevel=3)
    finally:
        bar.close()
    if ended and best is not None:
        model.params[:] = best[2]  # early stopping keeps the best validation loss
        model.best_ = None
        if checkpoint is not None and lead:
            model.save(checkpoint)
    return model
