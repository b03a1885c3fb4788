"""Checkpoints: an HVAE with its optimiser state, random state and history in one .npz file, the
architecture as JSON, no pickle, written atomically (temporary file, fsync, rename). The model
class is the caller's: this module reads and writes its attributes but does not import it."""
import json
import os
import zipfile

import numpy as np

from .atomic import atomic_write
from .training import Adam

FORMAT = "hvae-checkpoint"
VERSION = 1
CONFIG_KEYS = ("x_dim", "latent_dims", "hidden_dims", "likelihood", "activation", "kl", "dtype",
               "seed", "deterministic", "init", "prior_variance", "inference", "warm_start")
# keys that checkpoints written before they existed lack, with the value those models had
CONFIG_DEFAULTS = {"prior_variance": "unit", "inference": "bottom_up", "warm_start": True}
MAX_META_BYTES = 1 << 26  # the JSON block of a real checkpoint is a few hundred kB at most


def save(model, path):
    """Write model to path atomically: a reader sees the old file or the new one, never half.

    Parameters
    ----------
    model : HVAE
    path : str or os.PathLike
        Destination; ``.npz`` is the conventional suffix (not added). Missing folders are
        created.
    """
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    history = getattr(model, "history_", [])
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": {k: getattr(model, k) for k in CONFIG_KEYS},
        "rng_state": model._rng.bit_generator.state,
        "history": history,
        "training": {"epochs_done": len(history), **getattr(model, "train_config_", {})},
        "optimizer": None,
    }
    arrays = {"params": model.params}
    best = getattr(model, "best_", None)
    if best is not None:  # an early-stopping run in progress: its best epoch so far
        meta["training"]["best_epoch"] = best[1]
        arrays["best_params"] = best[2]
    opt = getattr(model, "optimizer_", None)
    if opt is not None:
        meta["optimizer"] = {"step": opt.step, "lr": opt.lr, "beta1": opt.beta1,
                             "beta2": opt.beta2, "eps": opt.eps}
        arrays["adam_m"], arrays["adam_v"] = opt.m, opt.v
    blob = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, meta=blob, **arrays))


def _bad(path, why):
    return ValueError(f"{path}: not a valid hvae checkpoint ({why})")


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_history(history, path):
    """The per-epoch records: dicts of numbers, None, or lists of numbers."""
    if not isinstance(history, list):
        raise _bad(path, "history is not a list")
    for k, rec in enumerate(history):
        if not isinstance(rec, dict) or not isinstance(rec.get("epoch"), int):
            raise _bad(path, f"history[{k}] is not an epoch record")
        for key, v in rec.items():
            ok = v is None or _is_number(v) or (isinstance(v, list) and all(map(_is_number, v)))
            if not ok:
                raise _bad(path, f"history[{k}][{key!r}] = {v!r}")
    return history


def _check_optimizer(opt, path):
    """Adam's settings: a step count and hyperparameters in their ranges."""
    if not isinstance(opt, dict):
        raise _bad(path, "optimizer is not a dict")
    step, lr, b1, b2, eps = (opt.get(k) for k in ("step", "lr", "beta1", "beta2", "eps"))
    if not (isinstance(step, int) and not isinstance(step, bool) and 0 <= step <= 2 ** 62):
        raise _bad(path, f"optimizer step {step!r}")
    if not all(map(_is_number, (lr, b1, b2, eps))) or not (
            np.isfinite(lr) and lr >= 0 and 0 <= b1 < 1 and 0 <= b2 < 1
            and np.isfinite(eps) and eps > 0):
        raise _bad(path, f"optimizer settings lr={lr!r} beta1={b1!r} beta2={b2!r} eps={eps!r}")


def _check_training(training, history, path):
    """The run's settings: a dict of JSON scalars (or lists of them) whose epochs_done agrees
    with the history, and whose best epoch, if any, is one of them."""
    if not isinstance(training, dict):
        raise _bad(path, "training is not a dict")
    training = dict(training)
    for key, v in training.items():
        ok = v is None or isinstance(v, (bool, str)) or _is_number(v) or (
            isinstance(v, list) and all(map(_is_number, v)))
        if not ok:
            raise _bad(path, f"training[{key!r}] = {v!r}")
    done = training.pop("epochs_done", None)
    if done != len(history):
        raise _bad(path, f"training says {done!r} epochs done, the history holds "
                         f"{len(history)}")
    best = training.pop("best_epoch", None)
    if best is not None and not (isinstance(best, int) and 1 <= best <= len(history)
                                 and _is_number(history[best - 1].get("val_loss"))):
        raise _bad(path, f"training best_epoch {best!r}")
    return training, best


def _read_array(zf, name, path, shape, dtype):
    """Read one member after checking its header against the expected shape and dtype, so a
    hostile header cannot make us allocate more than the model needs."""
    member = name + ".npy"
    if member not in zf.namelist():
        raise _bad(path, f"missing array '{name}'")
    with zf.open(member) as f:
        try:
            version = np.lib.format.read_magic(f)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)(f)
        except ValueError as exc:
            raise _bad(path, f"array '{name}': {exc}") from None
        got_shape, fortran, got_dtype = header
        if got_shape != shape or got_dtype != np.dtype(dtype) or fortran:
            raise _bad(path, f"array '{name}': expected shape {shape} dtype {np.dtype(dtype)}, "
                             f"got shape {got_shape} dtype {got_dtype}")
        if got_dtype.hasobject:
            raise _bad(path, f"array '{name}' holds Python objects")
        data = f.read(int(np.prod(shape)) * got_dtype.itemsize + 1)
    if len(data) != int(np.prod(shape)) * got_dtype.itemsize:
        raise _bad(path, f"array '{name}' is truncated or too long")
    return np.frombuffer(data, dtype=got_dtype).reshape(shape).copy()


def load(path, model_class):
    """Read a checkpoint written by :func:`save` (the body of :func:`hvae.load`, see there for
    what is restored and raised).

    Parameters
    ----------
    path : str or os.PathLike
    model_class : type
        Built from the saved configuration as ``model_class(**config)`` (:class:`hvae.HVAE`).

    Returns
    -------
    model_class
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _bad(path, f"not a readable .npz archive: {exc}") from None
    with zf:
        try:
            info = zf.getinfo("meta.npy")
        except KeyError:
            raise _bad(path, "no 'meta' entry") from None
        if info.file_size > MAX_META_BYTES:
            raise _bad(path, f"metadata of {info.file_size} bytes")
        try:
            with zf.open("meta.npy") as f:
                blob = np.lib.format.read_array(f, allow_pickle=False)
            meta = json.loads(bytes(blob).decode("utf-8"))
            if meta.get("format") != FORMAT:
                raise _bad(path, f"format {meta.get('format')!r}")
            if meta.get("version") != VERSION:
                raise _bad(path, f"version {meta.get('version')!r}, this hvae reads {VERSION}")
            config = {**CONFIG_DEFAULTS, **meta["config"]}
            if set(config) != set(CONFIG_KEYS):
                raise _bad(path, f"config keys {sorted(config)}")
            model = model_class(**config)
            n, dtype = model.n_params, model.dtype
            model.params[:] = _read_array(zf, "params", path, (n,), dtype)
            if not np.isfinite(model.params).all():
                raise _bad(path, "params hold NaN or infinity")
            try:
                model._rng.bit_generator.state = meta["rng_state"]
            except (TypeError, ValueError, KeyError) as exc:
                raise _bad(path, f"rng_state: {exc}") from None
            model.history_ = _check_history(meta["history"], path)
            if "training" in meta:  # files written before runs remembered their settings lack it
                model.train_config_, best = _check_training(meta["training"], model.history_,
                                                            path)
                if best is not None:
                    model.best_ = (model.history_[best - 1]["val_loss"], best,
                                   _read_array(zf, "best_params", path, (n,), dtype))
            opt = meta["optimizer"]
            if opt is not None:
                _check_optimizer(opt, path)
                model.optimizer_ = Adam(n, dtype, lr=float(opt["lr"]), beta1=float(opt["beta1"]),
                                        beta2=float(opt["beta2"]), eps=float(opt["eps"]))
                model.optimizer_.step = int(opt["step"])
                model.optimizer_.m[:] = _read_array(zf, "adam_m", path, (n,), dtype)
                model.optimizer_.v[:] = _read_array(zf, "adam_v", path, (n,), dtype)
                if not (np.isfinite(model.optimizer_.m).all()
                        and np.isfinite(model.optimizer_.v).all()
                        and (model.optimizer_.v >= 0).all()):
                    raise _bad(path, "Adam moments are not finite (or v < 0)")
        except ValueError as exc:
            if str(exc).startswith(path):
                raise
            raise _bad(path, str(exc)) from None
        except (KeyError, TypeError, AttributeError, zipfile.BadZipFile, EOFError,
                UnicodeDecodeError, OSError, RecursionError) as exc:
            raise _bad(path, f"{type(exc).__name__}: {exc}") from None
    return model
