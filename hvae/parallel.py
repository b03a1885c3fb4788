"""Data-parallel loss and gradient over threads: a minibatch split into n_jobs contiguous parts,
each part on its own core Model (own workspace) in its own thread, the GIL released in the core,
BLAS at one thread per part; the parts' gradients are combined weighted by their sizes.

The result equals the one-thread gradient up to floating-point rounding (the sum over the batch
is split), and is reproducible for a given n_jobs.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def resolve_n_jobs(n_jobs):
    """scikit-learn's convention: None -> 1, -1 -> every CPU, k >= 1 -> k."""
    if n_jobs is None:
        return 1
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs == 0 \
            or n_jobs < -1:
        raise ValueError(f"n_jobs: expected None, -1 or an integer >= 1, got {n_jobs!r}")
    return os.cpu_count() or 1 if n_jobs == -1 else int(n_jobs)


class SplitForward:
    """``forward(params, x, eps, beta, grad)`` like ``_core.Model.forward`` over n_jobs threads.

    Parameters
    ----------
    model : HVAE
    n_jobs : int
        Parts of each minibatch, >= 2.
    """

    def __init__(self, model, n_jobs):
        self.cores = [model._core] + [model._new_core() for _ in range(n_jobs - 1)]
        self.grads = [np.empty(model.n_params, model.dtype) for _ in range(n_jobs - 1)]
        self.pool = ThreadPoolExecutor(n_jobs - 1, thread_name_prefix="hvae")
        self.deterministic = model.deterministic

    def forward(self, params, x, eps, beta, grad):
        """Returns (loss, terms (T+1, B), None) and fills grad (P,), as the core does."""
        B = len(x)
        bounds = np.linspace(0, B, len(self.cores) + 1).round().astype(int)
        parts = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

        def run(j):
            a, b = parts[j]
            e = None if self.deterministic else [v[a:b] for v in eps]
            return self.cores[j].forward(params, x[a:b], None, e, beta=beta,
                                         grad=grad if j == 0 else self.grads[j - 1])

        futures = [self.pool.submit(run, j) for j in range(1, len(parts))]
        results = [run(0)] + [f.result() for f in futures]
        weights = [(b - a) / B for a, b in parts]
        grad *= grad.dtype.type(weights[0])
        for j in range(1, len(parts)):
            grad += grad.dtype.type(weights[j]) * self.grads[j - 1]
        loss = sum(w * r[0] for w, r in zip(weights, results))
        return loss, np.concatenate([r[1] for r in results], axis=1), None

    def close(self):
        self.pool.shutdown()
