"""The program tests/test_mpi.py runs under mpiexec: one scenario of data-parallel training or
evaluation, each rank writing what it saw to OUTDIR/rank<r>.npz (or raising, where that is what
is tested).

    mpiexec -n 3 python tests/mpi_worker.py SCENARIO OUTDIR
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpi_cases  # noqa: E402  (beside this file)

import hvae  # noqa: E402
from mpi4py import MPI  # noqa: E402

comm = MPI.COMM_WORLD
rank = comm.Get_rank()


class NaNOnRank:
    """model._core with one step on one rank made NaN: its gradient, or (kl=True) the KL terms
    of the forward that free bits do first."""

    def __init__(self, core, rank, step, kl=False):
        self.core, self.rank, self.step, self.kl, self.calls = core, rank, step, kl, 0

    def __getattr__(self, name):
        return getattr(self.core, name)

    def forward(self, *args, **kwargs):
        out = self.core.forward(*args, **kwargs)
        grad = kwargs.get("grad", args[5] if len(args) > 5 else None)
        if (grad is None) == self.kl:
            self.calls += 1
            if rank == self.rank and self.calls == self.step:
                if self.kl:
                    out[1][1, 0] = np.nan
                else:
                    grad[0] = np.nan
        return out


def fit_cases(out):
    """Every case of mpi_cases.FIT_CASES, fit over the ranks: parameters and losses."""
    res = {}
    for name in mpi_cases.FIT_CASES:
        m = mpi_cases.run_case(name, comm)
        res[name + "/params"] = m.params
        for key in ("loss", "reconstruction", "kl", "val_loss"):
            res[f"{name}/{key}"] = np.array([r[key] for r in m.history_], dtype=float)
        res[name + "/ranks"] = np.array([r["ranks"] for r in m.history_])
    np.savez(out, **res)


def nan(out, where="gradient"):
    """NaN in the last rank's step 3 (its gradient, or its KL under free bits): every rank
    stops with the same error."""
    m = mpi_cases.model()
    X, _ = mpi_cases.data(m)
    kl = where == "kl"
    m._core = NaNOnRank(m._core, comm.Get_size() - 1, 3, kl)
    try:
        m.fit(X, comm=comm, free_bits=[1.7, 0.8] if kl else None, **mpi_cases.FIT)
        error = ""
    except FloatingPointError as e:
        error = str(e)
    np.savez(out, params=m.params, error=error, steps=m.optimizer_.step)


def raises(out):
    """Rank 1's callback raises in epoch 2: the job must end, not hang."""
    m = mpi_cases.model()
    X, _ = mpi_cases.data(m)

    def cb(model, record):
        if rank == 1 and record["epoch"] == 2:
            raise RuntimeError("callback failed on purpose")

    m.fit(X, comm=comm, callbacks=[cb], **mpi_cases.FIT)
    np.savez(out, finished=True)


def rank0_fails(out):
    """Rank 0 cannot create the checkpoint's folder (only rank 0 writes): the job must end."""
    m = mpi_cases.model()
    X, _ = mpi_cases.data(m)
    m.fit(X, comm=comm, checkpoint="/proc/hvae-no-such-folder/run.npz", **mpi_cases.FIT)
    np.savez(out, finished=True)


def bad_args(out):
    """A bad argument on one rank (before training): every rank raises, none hangs."""
    m = mpi_cases.model()
    X, _ = mpi_cases.data(m)
    errors = []
    for kwargs in (dict(lr=-1.0 if rank == 1 else 1e-3), dict(X=X[:-1] if rank == 1 else X),
                   dict(batch_size=7 if rank == 0 else 8)):
        Xr = kwargs.pop("X", X)
        try:
            m.fit(Xr, comm=comm, epochs=1, progress=False, **kwargs)
            errors.append("")
        except (ValueError, RuntimeError) as e:
            errors.append(f"{type(e).__name__}: {e}")
    for what in ("x", "model"):
        other = mpi_cases.model(seed=4) if what == "model" and rank == 2 else m
        try:
            other.log_likelihood(X[:5] if what == "x" and rank == 2 else X[:6], k=3, comm=comm)
            errors.append("")
        except (ValueError, RuntimeError) as e:
            errors.append(f"{type(e).__name__}: {e}")
    np.savez(out, errors=np.array(errors))


def resume(out, ckpt, epochs):
    """Continue the checkpoint (or start it) up to ``epochs`` epochs over the ranks."""
    m = hvae.load(ckpt) if os.path.exists(ckpt) else mpi_cases.model()
    X, V = mpi_cases.data(m)
    fit = dict(mpi_cases.FIT, epochs=int(epochs))
    m.fit(X, comm=comm, validation_data=V, checkpoint=ckpt, **fit)
    np.savez(out, params=m.params, epochs=len(m.history_))


def evaluate(out):
    """elbo and log_likelihood split over the ranks, whole on every rank."""
    m = mpi_cases.model()
    X, _ = mpi_cases.data(m)
    ll = m.log_likelihood(X, k=7, batch_size=10, comm=comm)
    elbo = m.elbo(X, k=2, comm=comm)
    chunked = m.log_likelihood(X, k=7, batch_size=3, comm=comm)  # k > batch_size
    rng_after = m._rng.integers(0, 2 ** 63)
    if rank == 1:
        m._rng.random()  # this rank's Generator out of step: rank 0's seed is still used
    skewed = m.log_likelihood(X, k=7, batch_size=10, comm=comm)
    np.savez(out, ll=ll, elbo=elbo, chunked=chunked, skewed=skewed, rng_after=rng_after)


if __name__ == "__main__":
    scenario, outdir, *rest = sys.argv[1:]
    path = os.path.join(outdir, f"rank{rank}.npz")
    {"fit": fit_cases, "nan": nan, "raises": raises, "rank0_fails": rank0_fails,
     "bad_args": bad_args, "resume": resume, "evaluate": evaluate}[scenario](path, *rest)
