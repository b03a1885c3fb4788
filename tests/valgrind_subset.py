"""A small tour of the C core for valgrind (.ci/valgrind.sh): forward, backward, encode, decode,
the core's noise, Adam, the fused training step (on one thread and on a team of two, with and
without free bits) and the elementwise math on tiny models of every kind, both inference chains, both precisions,
odd layouts, the error paths (after conversions), a grow-and-reuse of the workspace, the sparse
first layer, two threads. Prints "ok".

Not a pytest file (no test_ prefix): run it as `python tests/valgrind_subset.py`.
"""
import itertools
import threading

import numpy as np

from hvae import _core

LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_learned")
ACTIVATIONS = ("tanh", "relu", "leaky_relu")


def tour(m, rng, B, density=0.5, iwae=True):
    dt = m.dtype
    table = {name: shape for name, _, shape in m.param_table()}
    D = table["enc1.0.weight"][1]
    lat = []
    i = 1
    while f"enc{i}.0.weight" in table:
        j = max(int(n.split(".")[1]) for n in table if n.startswith(f"enc{i}."))
        lat.append(table[f"enc{i}.{j}.weight"][0] // 2)
        i += 1
    p = (rng.standard_normal(m.n_params) * 0.5).astype(dt)
    x = (rng.random((B, D)) < density).astype(dt)
    eps = [rng.standard_normal((B, d)).astype(dt) for d in lat]
    g = np.empty(m.n_params, dt)
    try:
        m.forward(p, x, None, eps, grad=g, log_weight=True)
    except ValueError:  # deterministic: no log weight
        m.forward(p, x, None, eps, grad=g)
    m.forward(p, np.asfortranarray(x), x[::-1].copy(), [e.tolist() for e in eps], beta=0.3,
              grad=g)
    m.encode(p, x, eps)
    m.encode(p, x.astype(">f8"))
    T = len(lat)
    for level in range(1, T + 1):
        z = rng.standard_normal((B, lat[level - 1])).astype(dt)
        m.decode(p, z, level=level, eps=eps[:level - 1], temperature=0.8)
        m.decode(p, z, level=level)
    opt = [np.zeros(m.n_params, dt) for _ in range(2)]
    for step in (1, 2, 3):
        _core.adam_update(p, opt[0], opt[1], g, step)
    for threads in (1, 2):
        m.train_step(p, opt[0], opt[1], g, x, eps, 4, beta=0.5, threads=threads)
    fb = [0.0] * len(lat)  # free bits: level 1 under its floor, the others above
    fb[0] = 1e6
    m.forward(p, x, None, eps, grad=g, free_bits=fb)
    m.train_step(p, opt[0], opt[1], g, x, eps, 5, free_bits=fb, threads=2)
    if iwae:  # k samples per example: shared rows expanded and summed back
        k = 3
        eps_k = [rng.standard_normal((B * k, d)).astype(dt) for d in lat]
        grads = ("standard", "dreg") if len(lat) == 1 else ("standard",)
        for gradient in grads:
            m.forward(p, x, None, eps_k, grad=g, log_weight=True, objective="iwae", k=k,
                      gradient=gradient, beta=0.7)
            for threads in (1, 2):
                m.train_step(p, opt[0], opt[1], g, x, eps_k, 6, objective="iwae", k=k,
                             gradient=gradient, threads=threads)
        for threads in (1, 2):  # the core drawing the noise itself
            m.noise(B * k, 5, 2 ** 62, threads=threads)
            m.forward(p, x, None, None, log_weight=True, objective="iwae", k=k,
                      noise_seed=11, noise_row=7, threads=threads)
    g[0] = np.nan
    _core.adam_update(p, opt[0], opt[1], g, 6)  # refused: non-finite gradient
    for bad in (lambda: m.forward(p, x, None, [eps[0][:, :0]] + eps[1:], grad=g),
                lambda: m.forward(p[:-1], x, None, eps),
                lambda: m.encode(p, x * np.nan),
                lambda: m.decode(p, x, level=T + 1),
                lambda: m.forward(p, x, None, eps, grad=p)):
        try:
            bad()
        except (TypeError, ValueError):
            pass


def main():
    rng = np.random.default_rng(0)
    archs = [([3], [[4]]), ([3, 2], [[4], []]), ([2, 2, 1], [[3, 2], [3], [2]])]
    models, autoencoders = [], []
    for (lat, hid), lik, act, kl, det, dt in itertools.product(
            archs, LIKELIHOODS, ACTIVATIONS, ("analytic", "mc"), (False, True),
            ("float32", "float64")):
        if det and kl == "mc":
            continue
        if dt == "float32" and LIKELIHOODS.index(lik) != ACTIVATIONS.index(act):
            continue  # keep the tour short: float32 with three (likelihood, activation) pairs
        kind = autoencoders if det else models  # an autoencoder has only the ELBO
        kind.append(_core.Model(5, lat, hid, lik, act, kl, det, dt))
        if len(lat) > 1 and dt == "float64" and act == "tanh":  # learned prior variances
            kind.append(_core.Model(5, lat, hid, lik, act, kl, det, dt, "learned"))
    # the top-down chain (a hidden layer per level), both prior variances
    top_down = []
    for (lat, hid), lik, kl, pvar, dt in itertools.product(
            [([3], [[4]]), ([3, 2], [[4], [3]]), ([2, 2, 1], [[3, 2], [3], [2]])], LIKELIHOODS,
            ("analytic", "mc"), ("unit", "learned"), ("float32", "float64")):
        if dt == "float32" and (kl == "mc") != (pvar == "unit"):
            continue  # keep the tour short: float32 with two (kl, prior variance) pairs
        act = ACTIVATIONS[(len(lat) + LIKELIHOODS.index(lik)) % 3]
        top_down.append(_core.Model(5, lat, hid, lik, act, kl, False, dt, pvar, "top_down"))
    # the IWAE path on every third model (and on the larger ones below)
    for k, m in enumerate(models):
        tour(m, rng, B=1 + k % 4, iwae=k % 3 == 0)
    for k, m in enumerate(autoencoders):
        tour(m, rng, B=1 + k % 4, iwae=False)
    for k, m in enumerate(top_down):
        tour(m, rng, B=1 + k % 4, iwae=k % 3 == 1)
    # the workspace grows and is reused
    m = models[0]
    for B in (1, 50, 3, 200, 7):
        tour(m, rng, B)
    # wide enough for the team to split each layer: a layer's input gradient over its features
    # (partial products in the team's scratch, B = 16) and over the batch (B = 320)
    wide = _core.Model(300, [40, 10], [[256], [64]], "bernoulli", "tanh", "analytic", False,
                       "float32")
    wide_td = _core.Model(300, [40, 10], [[256], [64]], "bernoulli", "tanh", "analytic", False,
                          "float32", "learned", "top_down")
    for mm, B in itertools.product((wide, wide_td), (16, 320)):
        tour(mm, rng, B)
    # the sparse first layer (64+ rows, at most a quarter of x nonzero), alone and on the team's
    # splits, and a dense batch of the same size after it
    for mm, B, density in ((models[0], 64, 0.2), (models[5], 70, 0.1), (wide, 64, 0.1),
                           (wide, 96, 0.05), (wide, 96, 0.6), (top_down[-1], 64, 0.2),
                           (wide_td, 96, 0.05), (wide_td, 96, 0.6)):
        tour(mm, rng, B, density)
    # two threads on two models, and two threads on one model (serialised by its lock)
    pairs = [(models[1], models[2]), (models[3], models[3])]
    for a, b in pairs:
        ts = [threading.Thread(target=tour, args=(mm, np.random.default_rng(s), 9))
              for s, mm in enumerate((a, b))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    for op in ("exp", "expm1", "log1p", "tanh", "softplus", "sigmoid"):
        for dt in (np.float32, np.float64):
            v = np.linspace(-100, 100, 37).astype(dt)
            _core._vecmath(op, v)
            _core._vecmath(op, v[::3])
    hostile(_core.Model(4, [2, 2], [[3], []]))
    print("ok", len(models) + len(autoencoders) + len(top_down), "models")


class _Resizes:
    """A number whose __float__ / __index__ resizes an array first (refused, never read)."""

    def __init__(self, victim, value):
        self.victim, self.value = victim, value

    def __float__(self):
        self.victim.resize(1, refcheck=False)
        return float(self.value)

    def __index__(self):
        self.victim.resize(1, refcheck=False)
        return int(self.value)


def hostile(m):
    """Conversions that change other arguments: dims lists emptied by __index__, buffers
    resized by __float__ (train_step, adam_update), x resized by eps's conversion."""
    dims = []

    class Shrink:
        def __index__(self):
            dims.clear()
            return 2

    dims.extend([Shrink(), 2])
    _core.Model(4, dims, [[], []])
    P, dt, D = m.n_params, m.dtype, 4
    for k in range(4):
        bufs = [np.zeros(P, dt) for _ in range(4)]
        x = np.ones((3, D), dt)
        eps = [np.zeros((3, 2), dt), np.zeros((3, 2), dt)]
        for call in (lambda: m.train_step(*bufs, x, eps, 1, beta=_Resizes(bufs[k], 0.5)),
                     lambda: m.train_step(*bufs, x, eps, _Resizes(bufs[k], 1)),
                     lambda: _core.adam_update(*bufs[:3], bufs[3], 1, lr=_Resizes(bufs[k], 0)),
                     lambda: m.forward(bufs[0], x, None, [_Resizes(x, 0)], grad=bufs[3])):
            try:
                call()
            except (TypeError, ValueError):
                pass
            for b in bufs:
                b.resize(P, refcheck=False)
            x.resize((3, D), refcheck=False)


if __name__ == "__main__":
    main()
