"""Pure-Python reference of the core's noise (csrc/noise.h), written from the papers, not from
csrc/: Philox4x64-10 from NumPy's own ``numpy.random.Philox`` (Salmon et al. 2011), xoshiro256++
(Blackman & Vigna 2021) and the 256-layer ziggurat (Marsaglia & Tsang 2000) with Marsaglia's
tail (1964).

Row r of a seed: Philox4x64-10 of the counter (r, 0, 0, 0) under the key (seed, 0) is the state
of a xoshiro256++ generator; each 64-bit output u gives one ziggurat attempt: layer u & 255,
sign bit 8, uniform (u >> 11) / 2**53. The row's normals are drawn in order, level 1's units
first.
"""
import math

import numpy as np

MASK = (1 << 64) - 1
R = 3.6541528853610088  # the base strip's right edge for 256 layers (Marsaglia & Tsang)
LAYERS = 256


def _tables():
    """Layer edges x[0..256] of equal area v and f(x) = exp(-x^2/2) at them."""
    f = lambda t: math.exp(-0.5 * t * t)  # noqa: E731
    v = R * f(R) + math.sqrt(math.pi / 2) * math.erfc(R / math.sqrt(2))
    x = [v / f(R), R]
    for i in range(1, LAYERS - 1):  # layer i: width x[i], heights f(x[i]) .. f(x[i+1])
        x.append(math.sqrt(-2 * math.log(v / x[i] + f(x[i]))))
    x.append(0.0)
    return x, [f(t) for t in x]


X, FX = _tables()


def philox_state(seed, row):
    """Philox4x64-10 of counter (row, 0, 0, 0), key (seed, 0), by NumPy (whose generator adds
    one to its counter before each block). The counter goes in through the state as uint64
    words: Philox(counter=...) loses the low bits of counters above 2**53 (it converts them
    through float64)."""
    counter = (row - 1) % (1 << 256)
    bg = np.random.Philox(key=[seed, 0])
    state = bg.state
    state["state"]["counter"] = np.array([(counter >> (64 * w)) & MASK for w in range(4)],
                                         dtype=np.uint64)
    state["buffer_pos"] = 4  # the buffer used up: the next output starts a new block
    bg.state = state
    s = [int(v) for v in bg.random_raw(4)]
    return s if any(s) else [1, 0, 0, 0]


class Xoshiro256pp:
    def __init__(self, state):
        self.s = list(state)

    def next(self):
        s = self.s
        rotl = lambda v, k: ((v << k) | (v >> (64 - k))) & MASK  # noqa: E731
        out = (rotl((s[0] + s[3]) & MASK, 23) + s[0]) & MASK
        t = (s[1] << 17) & MASK
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = rotl(s[3], 45)
        return out


def normal(gen, counts=None):
    """One standard normal by the ziggurat; counts (a dict), when given, counts the branches
    taken: 'tail' entries and 'tail_retry' rejections beyond R, 'wedge' tests and
    'wedge_reject' rejections."""
    count = (lambda key: counts.__setitem__(key, counts.get(key, 0) + 1)) if counts is not None \
        else (lambda key: None)
    while True:
        u = gen.next()
        i, sign = u & 255, -1.0 if (u >> 8) & 1 else 1.0
        z = (u >> 11) * 2.0 ** -53 * X[i]
        if z < X[i + 1]:
            return sign * z
        if i == 0:  # beyond R: Marsaglia's tail
            count("tail")
            while True:
                a = -math.log(((gen.next() >> 11) + 1) * 2.0 ** -53) / R
                b = -math.log(((gen.next() >> 11) + 1) * 2.0 ** -53)
                if b + b >= a * a:
                    return sign * (R + a)
                count("tail_retry")
        count("wedge")
        y = FX[i] + (gen.next() >> 11) * 2.0 ** -53 * (FX[i + 1] - FX[i])
        if y < math.exp(-0.5 * z * z):
            return sign * z
        count("wedge_reject")


def noise(dims, rows, seed, first_row=0, counts=None):
    """The core's noise: T float64 arrays (rows, d_i); counts as in :func:`normal`."""
    out = [np.empty((rows, d)) for d in dims]
    for r in range(rows):
        gen = Xoshiro256pp(philox_state(seed, first_row + r))
        for a in out:
            for c in range(a.shape[1]):
                a[r, c] = normal(gen, counts)
    return out
