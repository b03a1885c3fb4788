"""The models, data and fit settings that tests/test_mpi.py trains both over MPI ranks (in
tests/mpi_worker.py, under mpiexec) and in one process, to compare."""
import numpy as np

import hvae

N, X_DIM = 53, 12  # 53 rows in batches of 7: a last batch of 4, shards of 1 / 1 / 2 on 3 ranks
FIT = dict(epochs=3, batch_size=7, progress=False, kl_warmup_epochs=1, kl_warmup_delay=0.5)

# name -> (HVAE arguments beyond model()'s, fit arguments beyond FIT)
FIT_CASES = {
    "bottom_up_mc": ({}, {}),
    "bottom_up_analytic_patience": (dict(kl="analytic", prior_variance="learned"),
                                    dict(patience=1, epochs=6)),
    "top_down_gaussian_learned": (dict(inference="top_down", likelihood="gaussian_learned",
                                       kl="analytic"), {}),
    "iwae_top_down": (dict(inference="top_down", kl="analytic"), dict(objective="iwae", k=3)),
    "iwae_dreg": (dict(latent_dims=[3], hidden_dims=[[8]]),
                  dict(objective="iwae", k=4, gradient="dreg")),
    # floors near the levels' KL: the whole batch is above them in some steps, not in others
    "free_bits": ({}, dict(free_bits=[1.7, 0.8])),
    "autoencoder": (dict(deterministic=True, likelihood="gaussian"), {}),
    "batch_of_two": ({}, dict(batch_size=2, epochs=2)),  # a rank of 3 has no row in a step
    "free_bits_batch_of_two": ({}, dict(free_bits=[1.7, 0.8], batch_size=2, epochs=2)),
    "float32_top_down": (dict(dtype="float32", inference="top_down", kl="analytic"), {}),
    "partial_fit": ({}, dict(partial=True, batch_size=7)),
}


def model(**kwargs):
    """A small float64 two-level model (kwargs override)."""
    args = dict(latent_dims=[3, 2], hidden_dims=[[8], [5]], dtype="float64", seed=3)
    args.update(kwargs)
    return hvae.HVAE(X_DIM, **args)


def data(m):
    """(train, validation) arrays for model m: binary for a Bernoulli likelihood, else real."""
    rng = np.random.default_rng(1)
    X = rng.random((N + 20, X_DIM))
    if m.likelihood == "bernoulli":
        X = (X < 0.4).astype(np.float64)
    return X[:N], X[N:]


def run_case(name, comm=None):
    """FIT_CASES[name] trained over comm's ranks (None: in one process); returns the model."""
    model_kw, fit_kw = FIT_CASES[name]
    fit_kw = dict(fit_kw)
    m = model(**model_kw)
    X, V = data(m)
    if fit_kw.pop("partial", False):
        for _ in range(3):
            m.partial_fit(X, comm=comm, **fit_kw)
    else:
        m.fit(X, comm=comm, validation_data=V, **dict(FIT, **fit_kw))
    return m
