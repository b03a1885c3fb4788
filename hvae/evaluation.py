"""Importance-sampled evaluation: the IWAE bound log (1/k) sum_j p(x, z_j) / q(z_j | x) per example,
from exact densities, combined with a stable log-sum-exp, in bounded memory whatever k; over MPI
ranks, each scoring a shard of the examples.

The noise is the core's (``_core.Model.noise``), drawn on the core's threads inside each call:
sample j of example e (counted over the whole x) always gets row e k + j of the stream one seed
names, so the numbers do not depend on the batch size, the thread count or the ranks."""
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
        Each rank scores its shard (:func:`hvae.parallel.shard`) of the examples with rank 0's
        seed (every rank draws one, so every Generator advances alike); every rank returns all
        n, equal to one process's up to rounding. Collective; a failure on one rank ends the job
        (the others would wait for it).
    rng : numpy.random.Generator, optional
        Where the seed of the noise comes from (default: the model's Generator, which advances
        by one draw).

    Returns
    -------
    ndarray, shape (n,), float64
        Estimates of log p(x) in nats (lower bounds in expectation, tight as k grows).
    """
    if rng is None:
        with model._lock:
            seed = int(model._rng.integers(0, 2 ** 63))
    else:
        seed = int(rng.integers(0, 2 ** 63))
    if comm is not None:
        seed = comm.bcast(seed, root=0)  # every Generator drew one; rank 0's is the seed
        part = parallel.shard(len(x), comm.Get_rank(), comm.Get_size())
        try:
            local = _bound(model, x[part], k, rows, progress and comm.Get_rank() == 0, threads,
                           seed, part.start)
        except BaseException as e:
            parallel.abort(comm, e)
        return parallel.allgather_rows(comm, local, len(x))
    return _bound(model, x, k, rows, progress, threads, seed, 0)


def _bound(model, x, k, rows, progress, threads, seed, first):
    """iwae_bound of x, whose row 0 is example `first` of the whole: its noise from `seed`."""
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
                lw = _log_weights(model, x[start:start + per], k, threads, seed,
                                  (first + start) * k).reshape(-1, k)
                out[start:start + per] = log_mean_exp(lw, axis=1)
                if bar is not None:
                    bar.update(len(lw))
        else:  # one example at a time, k in chunks, streaming log-sum-exp
            for i in range(n):
                acc_max, acc_sum, done = -np.inf, 0.0, 0
                while done < k:
                    c = min(rows, k - done)
                    lw = _log_weights(model, x[i:i + 1], c, threads, seed, (first + i) * k + done)
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


def _log_weights(model, xb, k, threads, seed, first_row):
    """log p(x, z) - log q(z | x) at k samples of each row of xb, float64 (rows * k,), sample j of
    example b at b * k + j; the noise rows first_row.. of the core's stream under seed."""
    with model._lock:  # no fork or step in the middle of a core call (HVAE's Notes)
        _, _, lw = model._core.forward(model.params, xb, None, None, log_weight=True,
                                       objective="iwae", k=k, threads=threads, noise_seed=seed,
                                       noise_row=first_row)
    return lw.astype(np.float64)
