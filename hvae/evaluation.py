"""Importance-sampled evaluation: the IWAE bound log (1/k) sum_j p(x, z_j) / q(z_j | x) per example,
from exact densities, combined with a stable log-sum-exp, in bounded memory whatever k; over MPI
ranks, each scoring a shard of the examples."""
import numpy as np

from . import parallel


def log_mean_exp(a, axis=-1):
    """log(mean(exp(a))) along axis without overflow, in float64."""
    a = np.asarray(a, dtype=np.float64)
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    out = np.log(np.mean(np.exp(a - m), axis=axis, keepdims=True)) + m
    return np.squeeze(out, axis=axis)


def iwae_bound(model, x, k, rows=4096, progress=False, threads=1, comm=None, rng=None):
    """Per-example importance-weighted bound with k samples (k = 1: the ELBO estimate), through
    the core's IWAE path: what an example's samples share is computed once per core call.

    Parameters
    ----------
    model : HVAE
    x : ndarray, shape (n, x_dim)
    k : int
        Importance samples per example.
    rows : int
        At most this many (example, sample) rows per core call: memory is O(rows), not O(n k).
    progress : bool
        Show a progress bar over examples.
    threads : int
        The core's threads.
    comm : mpi4py communicator, optional
        Each rank scores its shard (:func:`hvae.parallel.shard`) with noise from the rank-th of
        ``comm.size`` seeds drawn from the model's Generator; every rank returns all n.
        Collective; a failure on one rank ends the job (the others would wait for it).
    rng : numpy.random.Generator, optional
        Where the noise comes from (default: the model's Generator).

    Returns
    -------
    ndarray, shape (n,), float64
        Estimates of log p(x) in nats (lower bounds in expectation, tight as k grows).
    """
    if comm is not None:
        rank, size = comm.Get_rank(), comm.Get_size()
        with model._lock:
            seeds = model._rng.integers(0, 2 ** 63, size=size)
        try:
            local = iwae_bound(model, x[parallel.shard(len(x), rank, size)], k, rows,
                               progress and rank == 0, threads,
                               rng=np.random.default_rng(seeds[rank]))
        except BaseException as e:
            parallel.abort(comm, e)
        return parallel.allgather_rows(comm, local, len(x))
    n = len(x)
    out = np.empty(n)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc=f"log-likelihood k={k}", unit="ex", dynamic_ncols=True)
    try:
        if k <= rows:  # several examples per call, k rows each
            per = max(1, rows // k)
            for start in range(0, n, per):
                lw = _log_weights(model, x[start:start + per], k, threads, rng).reshape(-1, k)
                out[start:start + per] = log_mean_exp(lw, axis=1)
                if bar is not None:
                    bar.update(len(lw))
        else:  # one example at a time, k in chunks, streaming log-sum-exp
            for i in range(n):
                acc_max, acc_sum, done = -np.inf, 0.0, 0
                while done < k:
                    c = min(rows, k - done)
                    lw = _log_weights(model, x[i:i + 1], c, threads, rng)
                    m = max(acc_max, float(lw.max()))
                    acc_sum = acc_sum * np.exp(acc_max - m) + np.exp(lw - m).sum()
                    acc_max, done = m, done + c
                out[i] = acc_max + np.log(acc_sum / k)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


def _log_weights(model, xb, k, threads, rng=None):
    """log p(x, z) - log q(z | x) at k fresh samples of each row of xb, float64 (rows * k,),
    sample j of example b at b * k + j; the noise from rng (None: the model's Generator)."""
    with model._lock:  # no fork or step in the middle of a core call (HVAE's Notes)
        eps = model.draw_eps(len(xb) * k) if rng is None else [
            rng.standard_normal((len(xb) * k, d), dtype=model.dtype) for d in model.latent_dims]
        _, _, lw = model._core.forward(model.params, xb, None, eps, log_weight=True,
                                       objective="iwae", k=k, threads=threads)
    return lw.astype(np.float64)
