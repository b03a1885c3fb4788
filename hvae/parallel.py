"""Data-parallel training and evaluation over MPI through mpi4py (DESIGN.md §8): rank 0's state on
every rank, checks that the ranks agree before any collective, each global batch split into
disjoint rank shards, the gradient and the batch's sums reduced by one Allreduce, and the end of
the whole job when one rank fails."""
import hashlib
import sys
import time
import traceback
import warnings

import numpy as np


def mpi():
    """The mpi4py.MPI module, or an ImportError that says how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - the test suite installs the mpi group
        raise ImportError("comm: training or evaluating over MPI needs mpi4py and an MPI: "
                          "pip install 'hvae[mpi]' (mpi4py and MPICH from PyPI)") from e
    return MPI


def check_comm(comm):
    """comm, checked: an mpi4py intracommunicator other than COMM_NULL. Returns it.

    Raises
    ------
    TypeError
        For anything else (naming what came).
    """
    MPI = mpi()
    if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
        raise TypeError("comm: expected an mpi4py intracommunicator such as MPI.COMM_WORLD, got "
                        f"{comm!r}")
    return comm


def shard(n, rank, size):
    """Rank ``rank``'s share of n rows as a slice: contiguous, disjoint from the other ranks',
    together covering all n, sizes within one of each other (a rank may get none)."""
    return slice(n * rank // size, n * (rank + 1) // size)


def agree(comm, error, what):
    """Collective: every rank tells whether its part failed (``error``: an exception or None).
    When any did, every rank raises (its own exception, or a RuntimeError naming the first rank
    that failed and why), so that no rank goes on to wait for the others."""
    said = comm.allgather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for rank, message in enumerate(said):
        if message is not None:
            raise RuntimeError(f"{what}: rank {rank} of {comm.Get_size()} failed ({message}); "
                               "every rank stops")


def fingerprint(X):
    """A cheap digest of an array that tells different data apart: shape, dtype and the bytes of
    up to 257 rows spread over it (the whole array is not read: it may be a large memory map)."""
    X = np.asarray(X)
    rows = X[::max(1, len(X) // 256)] if X.ndim else X
    h = hashlib.blake2b(repr((X.shape, X.dtype.str)).encode(), digest_size=16)
    h.update(np.ascontiguousarray(rows).tobytes())
    if len(X):
        h.update(np.ascontiguousarray(X[-1]).tobytes())
    return h.hexdigest()


def model_digest(model):
    """A digest of a model's architecture (its constructor's arguments but the seed) and
    parameters: what must be the same on every rank for evaluation to be one model's."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(sorted((k, repr(v)) for k, v in model.get_params().items()
                         if k != "seed")).encode())
    h.update(np.ascontiguousarray(model.params).data)
    return h.hexdigest()


def check_same(comm, **values):
    """Collective: a ValueError on every rank when one of ``values`` (name -> a picklable
    value or digest) differs between the ranks, naming it and the first rank that differs."""
    everyone = comm.allgather(values)
    for name, value in values.items():
        for rank, theirs in enumerate(everyone):
            if theirs[name] != everyone[0][name]:
                raise ValueError(f"{name}: expected the same on every rank, but rank {rank} "
                                 f"differs from rank 0 (every rank passes the same data, model "
                                 "and settings)")


def broadcast_state(comm, model):
    """Rank 0's training state on every rank: parameters and Adam's moments (Bcast), the random
    stream, Adam's step, history, run settings and early-stopping state (bcast). The model has
    an optimiser on every rank."""
    opt = model.optimizer_
    small = (model._rng.bit_generator.state, opt.step, model.history_, model.train_config_,
             model.best_) if comm.Get_rank() == 0 else None
    rng_state, opt.step, model.history_, model.train_config_, model.best_ = comm.bcast(small)
    model._rng.bit_generator.state = rng_state
    for a in (model.params, opt.m, opt.v):
        comm.Bcast(a, root=0)


def check_identical(comm, model):
    """Collective, at the end of an epoch: parameters and Adam's moments bit for bit the same on
    every rank. They are, when the MPI's Allreduce gives every rank the same sum (MPICH and Open
    MPI do); if one ever does not, rank 0's state is broadcast again, with a warning."""
    opt = model.optimizer_
    h = hashlib.blake2b(digest_size=16)
    for a in (model.params, opt.m, opt.v):
        h.update(a.data)
    digests = comm.allgather(h.digest())
    if len(set(digests)) > 1:
        if comm.Get_rank() == 0:
            warnings.warn("fit: the ranks' parameters differed after an epoch (the MPI's "
                          "Allreduce did not give every rank the same sum); rank 0's were "
                          "broadcast", RuntimeWarning, stacklevel=3)
        for a in (model.params, opt.m, opt.v):
            comm.Bcast(a, root=0)


# how long a failing rank waits between writing why and MPI_Abort: the launcher forwards a rank's
# output through a pipe it polls, and MPI_Abort tears the job down without draining it, so a
# message written just before can be lost (mpiexec then ends with no word of what failed)
ABORT_GRACE_SECONDS = 1.0


def end_job(comm, code):
    """MPI_Abort(comm, code) once this rank's stdout and stderr have reached the launcher: the
    buffers flushed, then ``ABORT_GRACE_SECONDS`` for mpiexec to forward them. The other ranks
    are blocked in a collective until then, so the wait costs the job nothing."""
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(ABORT_GRACE_SECONDS)
    comm.Abort(code)


def abort(comm, exc):
    """End the whole MPI job after ``exc`` on this rank: its traceback on stderr, then
    MPI_Abort, which makes mpiexec end every rank (instead of the others waiting forever)."""
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    sys.stderr.write(f"hvae: rank {comm.Get_rank()} of {comm.Get_size()} failed; ending the "
                     "MPI job\n" + "".join(lines))
    end_job(comm, 1)


class DataParallelStep:
    """One rank's part of data-parallel training steps.

    Each step: the core's forward and backward on this rank's rows of the global batch (the
    gradient of their mean, scaled by rows / global rows), one Allreduce (sum) of the gradient
    together with the batch's loss and term sums, then :meth:`hvae.training.Adam.update` with the
    reduced gradient, the same on every rank. Free bits need the batch-mean KL of the whole batch
    before the backward: a forward without gradient and an Allreduce of T numbers come first.

    Attributes
    ----------
    seconds : float
        Time spent in Allreduce (waiting for the other ranks included).
    """

    def __init__(self, model, comm):
        P, T = model.n_params, model.n_levels
        self.model, self.comm, self.MPI = model, comm, mpi()
        self.buf = np.zeros(P + T + 2, model.dtype)  # gradient, then loss and term sums
        self.grad = self.buf[:P]
        self.seconds = 0.0

    def _allreduce(self, a):
        t0 = time.perf_counter()
        self.comm.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)  # mpi4py releases the GIL
        self.seconds += time.perf_counter() - t0

    def _floors(self, x, eps, n_global, beta, threads, free_bits):
        """The free-bits floors that make this rank's backward weigh each level as the whole
        batch's mean KL says: -inf (never floored) for a level above its floor, a number above
        every local KL term for a level at or under it. Collective."""
        T = self.model.n_levels
        sums, top = np.zeros(T), np.zeros(T)
        if len(x):
            _, terms, _ = self.model._core.forward(self.model.params, x, None, eps, beta,
                                                   threads=threads)
            kl = terms[1:].astype(np.float64)
            sums, top = kl.sum(axis=1), np.abs(kl).max(axis=1)
        self._allreduce(sums)
        means = sums / n_global
        # a non-finite KL anywhere makes the reduced loss non-finite, and the step is skipped on
        # every rank: any valid floor will do then
        big = float(np.finfo(self.model.dtype).max)
        floors = [min(2 * t + 1, big) if not (K > lam) and np.isfinite(t) else -np.inf
                  for t, K, lam in zip(top, means, free_bits)]
        return floors, means

    def __call__(self, x, eps, n_global, beta, threads, free_bits=None, estimator=None):
        """One step; collective.

        Parameters
        ----------
        x : ndarray, shape (n, x_dim)
            This rank's rows of the global batch (n may be 0).
        eps : list of ndarray or None
            Their noise: T arrays (n k, d_i), cut from the whole batch's draw.
        n_global : int
            Rows of the global batch.
        beta, threads, free_bits, estimator
            As in :meth:`hvae.training.Adam.train_step`.

        Returns
        -------
        loss : float
            The whole batch's loss.
        means : ndarray, shape (T + 1,)
            The whole batch's mean reconstruction and KL terms.
        ok : bool
            False when the reduced loss or gradient is not finite: nothing changed, on any rank.
        """
        model, buf, P = self.model, self.buf, self.model.n_params
        est = estimator or {}
        k = est.get("k", 1)
        floors = means_kl = None
        if free_bits is not None:
            floors, means_kl = self._floors(x, eps, n_global, beta, threads, free_bits)
        buf[:] = 0
        if len(x):
            loss, terms, _ = model._core.forward(model.params, x, None, eps, beta, self.grad,
                                                 threads=threads, free_bits=floors, **est)
            self.grad *= model.dtype_type(len(x) / n_global)
            buf[P] = loss * len(x)
            buf[P + 1:] = terms.sum(axis=1, dtype=np.float64) / k
        self._allreduce(buf)
        means = buf[P + 1:].astype(np.float64) / n_global
        loss = float(buf[P]) / n_global
        if free_bits is not None:  # rec + beta sum_i max(lam_i, K_i) of the whole batch
            loss = float(means[0] + beta * np.sum(np.maximum(free_bits, means_kl)))
        ok = bool(np.isfinite(loss)) and model.optimizer_.update(model.params, self.grad)
        return loss, means, ok


def allgather_rows(comm, local, n):
    """Collective: the rank shards (:func:`shard`) of a float64 array of n rows, whole on every
    rank."""
    MPI = mpi()
    size = comm.Get_size()
    counts = [shard(n, r, size).stop - shard(n, r, size).start for r in range(size)]
    displs = [shard(n, r, size).start for r in range(size)]
    out = np.empty(n, np.float64)
    comm.Allgatherv(np.ascontiguousarray(local, np.float64), [out, counts, displs, MPI.DOUBLE])
    return out
