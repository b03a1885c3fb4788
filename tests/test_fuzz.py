"""Property-based fuzzing of the binding hvae._core: thousands of random, mostly malformed calls
(wrong dtypes, shapes, layouts, NaN, lists, None, strings, byte order, unaligned and read-only
memory) to Model(...), forward, train_step, encode, decode, param_table, adam_update and
_vecmath.

Every call either raises TypeError / ValueError / MemoryError with a message that starts with
the name of an argument, or succeeds; a successful call gives bit for bit the result of the same
call with every array argument first converted to a plain C-contiguous array of the model's
dtype. A crash (segfault, abort) fails the run. A few seconds in all.
"""
import functools
import re
import warnings

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

from hvae import _core  # noqa: E402

FUZZ = settings(max_examples=300, deadline=None, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))
ALLOWED = (TypeError, ValueError, MemoryError)
# an error message names what was wrong: an argument (x, eps[1], hidden_dims[0][2], ...) or,
# for CPython's own argument parsing, the function
NAMED = re.compile(r"^(params|x|target|eps|beta|grad|log_weight|z|level|temperature|m|v|step|"
                   r"lr|beta1|beta2|adam_eps|threads|op|x_dim|latent_dims|hidden_dims|"
                   r"likelihood|activation|kl|dtype|deterministic)(\[\d+\])*:|argument|"
                   r"embedded null|.*keyword argument|function|.* must be |.*takes|Model\(\)|"
                   r"forward\(\)|train_step\(\)|encode\(\)|decode\(\)|adam_update\(\)|"
                   r"_vecmath\(\)")

DTYPES = [np.float64, np.float32, ">f8", ">f4", np.float16, np.int64, np.int8, np.uint32,
          np.bool_, np.complex128, "U2", "M8[s]", object]

MODELS = [
    _core.Model(4, [3], [[5]], "bernoulli", "tanh", "analytic", False, "float32"),
    _core.Model(3, [2, 1], [[4], []], "gaussian_learned", "relu", "mc", False, "float64"),
    _core.Model(5, [2, 2], [[3, 2], [2]], "gaussian", "leaky_relu", "analytic", True, "float64"),
    _core.Model(3, [2, 2, 1], [[3], [2], []], "bernoulli", "tanh", "analytic", False, "float32",
                "learned"),
]


LAYOUTS = st.sampled_from(["plain", "fortran", "reversed", "strided", "readonly", "unaligned",
                           "list"])
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
SEEDS = st.integers(0, 2 ** 32)
SPECIAL = st.sampled_from([None, None, np.nan, np.inf, -np.inf, 1e300, 1e-310])
CHOICE = st.integers(0, 3)


def layout(a, how):
    """The array a in the memory layout `how`, or as a list (same values)."""
    if how == "fortran":
        return np.asfortranarray(a)
    if how == "reversed" and a.ndim:
        return a[::-1].copy()[::-1]
    if how == "strided" and a.ndim:
        wide = np.zeros((a.shape[0] * 2,) + a.shape[1:], a.dtype)
        wide[::2] = a
        return wide[::2]
    if how == "readonly":
        b = a.copy()
        b.flags.writeable = False
        return b
    if how == "unaligned" and a.dtype.kind in "fiub" and a.dtype.itemsize > 1:
        buf = np.zeros(a.nbytes + 1, np.uint8)
        b = buf[1:].view(a.dtype).reshape(a.shape)
        b[...] = a
        return b
    if how == "list" and a.dtype.kind in "fiub":
        return a.tolist()
    return a


# Values come from a drawn seed, with an optional special value (NaN, inf, huge, subnormal)
# at a random place: drawing every value through hypothesis makes the run ten times slower,
# and what the binding looks at is dtype, shape, layout and finiteness.
@st.composite
def any_array(draw):
    dt = np.dtype(draw(st.sampled_from(DTYPES)))
    shape, special = draw(SHAPES), draw(SPECIAL)
    rng = np.random.default_rng(draw(SEEDS))
    base = np.array(rng.standard_normal(shape) * 3)
    if special is not None and base.size:
        base.flat[rng.integers(base.size)] = special
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dt.kind in "fiub":
            a = base.astype(dt)
        elif dt.kind == "c":
            a = (base + 1j).astype(dt)
        elif dt.kind == "U":
            a = np.full(shape, "ab", dt)
        elif dt.kind == "M":
            a = np.zeros(shape, dt)
        else:
            a = np.empty(shape, object)
            for k in range(a.size):
                a.flat[k] = (None, 1.5, "x")[k % 3]
    return layout(np.asarray(a), draw(LAYOUTS))  # (ufuncs turn 0-d arrays into scalars)


@functools.lru_cache(maxsize=None)
def valid_array(shape, dtype):
    """A strategy: right shape, finite values, a real dtype (mostly the model's), any layout."""
    dtypes = st.sampled_from([dtype, dtype, np.float64, np.float32, ">f8", np.int16, np.bool_])

    @st.composite
    def strategy(draw):
        dt = np.dtype(draw(dtypes))
        rng = np.random.default_rng(draw(SEEDS))
        return layout((rng.standard_normal(shape) * 3).astype(dt), draw(LAYOUTS))
    return strategy()


ANYTHING = st.one_of(st.none(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=3),
                     st.booleans(), st.lists(st.floats(), max_size=3), any_array(),
                     st.dictionaries(st.text(max_size=1), st.integers(), max_size=2))


def sometimes_bad(draw, good):
    """Mostly the valid value, sometimes anything."""
    return draw(good) if draw(CHOICE) else draw(ANYTHING)


def eps_list(draw, B, dims, dtype):
    """A list (or tuple) of valid noise arrays, one of wrong count, or anything."""
    how = draw(CHOICE)
    if how == 0:
        return draw(ANYTHING)
    if how == 1:
        return [draw(valid_array((B, 1), dtype)) for _ in range(draw(CHOICE))]
    eps = [draw(valid_array((B, d), dtype)) for d in dims]
    return tuple(eps) if how == 2 else eps


def canonical(v, dtype):
    return np.array(np.asarray(v), dtype=dtype, order="C")  # keeps 0-d arrays 0-d


def check_error(exc):
    assert isinstance(exc, ALLOWED), f"{type(exc).__name__}: {exc}"
    assert NAMED.match(str(exc)), f"message does not name the argument: {exc}"


def same(a, b):
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for u, w in zip(a, b):
            same(u, w)
    elif a is None:
        assert b is None
    else:
        a, b = np.asarray(a), np.asarray(b)
        numeric = a.dtype.kind in "biufc" and b.dtype.kind in "biufc"
        assert np.array_equal(a, b, equal_nan=numeric), (a, b)


def call(f, *args, **kwargs):
    """f(...) -> result, or None after checking the exception."""
    try:
        return f(*args, **kwargs), True
    except BaseException as exc:  # noqa: B902 - anything else than ALLOWED fails below
        check_error(exc)
        return None, False


def _latent(m):
    """d_1..d_T from the parameter table: encoder i's output layer has 2 d_i rows."""
    table = {name: shape for name, _, shape in m.param_table()}
    dims, i = [], 1
    while f"enc{i}.0.weight" in table:
        j = max(int(n.split(".")[1]) for n in table if n.startswith(f"enc{i}."))
        dims.append(table[f"enc{i}.{j}.weight"][0] // 2)
        i += 1
    return dims


INFO = [(m, m.dtype, _latent(m), m.param_table()[0][2][1], m.n_params) for m in MODELS]
PICK_MODEL = st.sampled_from(INFO)
ROWS = st.integers(0, 4)
FLAG = st.booleans()
BETAS = st.floats(-0.5, 3)
TEMPERATURES = st.floats(-0.5, 2)


@FUZZ
@given(st.data())
def test_forward_fuzz(data):
    draw = data.draw
    m, dt, lat, D, P = draw(PICK_MODEL)
    B = draw(ROWS)
    params = sometimes_bad(draw, valid_array((P,), dt))
    x = sometimes_bad(draw, valid_array((B, D), dt))
    target = None if draw(FLAG) else sometimes_bad(draw, valid_array((B, D), dt))
    eps = eps_list(draw, B, lat, dt)
    kwargs = {}
    if draw(FLAG):
        kwargs["beta"] = sometimes_bad(draw, BETAS)
    grad = None
    if draw(FLAG):
        grad = np.empty(P, dt) if draw(CHOICE) else draw(ANYTHING)
        kwargs["grad"] = grad
    if draw(FLAG):
        kwargs["log_weight"] = draw(FLAG) if draw(CHOICE) else draw(ANYTHING)
    out, ok = call(m.forward, params, x, target, eps, **kwargs)
    if not ok:
        return
    loss, terms, lw = out
    assert terms.shape == (len(lat) + 1, len(np.asarray(x)))
    g2 = None if grad is None else np.empty(P, dt)
    kw2 = dict(kwargs, grad=g2) if "grad" in kwargs else kwargs
    # a deterministic model ignores eps, whatever it is
    eps2 = [canonical(e, dt) for e in eps] if isinstance(eps, (list, tuple)) else eps
    want = m.forward(canonical(params, dt), canonical(x, dt),
                     None if target is None else canonical(target, dt), eps2, **kw2)
    same([loss, terms, lw], list(want))
    if grad is not None:
        same(grad, g2)


THREADS = st.integers(1, 3)


@FUZZ
@given(st.data())
def test_train_step_fuzz(data):
    """A failed call writes nothing; a successful one gives the result of forward + adam_update
    on plain arrays (one thread: bit for bit; with threads: the same call again)."""
    draw = data.draw
    m, dt, lat, D, P = draw(PICK_MODEL)
    B = draw(ROWS)
    outs = [np.random.default_rng(k).random(P).astype(dt) if draw(CHOICE) else draw(ANYTHING)
            for k in range(4)]  # params, m, v, grad
    x = sometimes_bad(draw, valid_array((B, D), dt))
    eps = eps_list(draw, B, lat, dt)
    step = sometimes_bad(draw, STEPS)
    kwargs = {k: sometimes_bad(draw, HYPER_VALUES)
              for k in draw(st.lists(st.sampled_from(["lr", "beta1", "beta2", "adam_eps"]),
                                     unique=True, max_size=4))}
    if draw(FLAG):
        kwargs["target"] = sometimes_bad(draw, valid_array((B, D), dt))
    if draw(FLAG):
        kwargs["beta"] = sometimes_bad(draw, BETAS)
    if draw(FLAG):
        kwargs["threads"] = sometimes_bad(draw, THREADS)
    before = [np.array(b, copy=True) if isinstance(b, np.ndarray) else None for b in outs]
    out, ok = call(m.train_step, *outs, x, eps, step, **kwargs)
    if not ok:  # nothing written
        for b, b0 in zip(outs, before):
            if b0 is not None:
                assert b.tobytes() == b0.tobytes()
        return
    loss, terms, updated = out
    p, m1, m2, g = (b.copy() for b in before)
    eps2 = [canonical(e, dt) for e in eps] if isinstance(eps, (list, tuple)) else eps
    tg = kwargs.get("target")
    x2, tg2 = canonical(x, dt), None if tg is None else canonical(tg, dt)
    if kwargs.get("threads", 1) == 1:
        want = m.forward(p, x2, tg2, eps2, beta=kwargs.get("beta", 1.0), grad=g)[:2]
        adam = {("eps" if k == "adam_eps" else k): v for k, v in kwargs.items()
                if k in ("lr", "beta1", "beta2", "adam_eps")}
        want_updated = bool(np.isfinite(want[0])) and _core.adam_update(p, m1, m2, g, step, **adam)
    else:
        want = m.train_step(p, m1, m2, g, x2, eps2, step, **dict(kwargs, target=tg2))
        want_updated = want[2]
    same([loss, terms], list(want[:2]))
    assert updated is want_updated
    same(outs[:3], [p, m1, m2])
    if np.isfinite(loss):  # else the gradient was not computed
        same(outs[3], g)


LEVELS = st.one_of(st.none(), st.integers(0, 3))


@FUZZ
@given(st.data())
def test_encode_decode_fuzz(data):
    draw = data.draw
    m, dt, lat, D, P = draw(PICK_MODEL)
    T = len(lat)
    B = draw(ROWS)
    params = sometimes_bad(draw, valid_array((P,), dt))
    if draw(FLAG):
        x = sometimes_bad(draw, valid_array((B, D), dt))
        eps = None if draw(FLAG) else eps_list(draw, B, lat, dt)
        out, ok = call(m.encode, params, x, eps)
        if ok:
            want = m.encode(canonical(params, dt), canonical(x, dt),
                            None if eps is None else [canonical(e, dt) for e in eps])
            same(out, want)
    else:
        level = sometimes_bad(draw, LEVELS)
        top = level if isinstance(level, int) and not isinstance(level, bool) and \
            1 <= level <= T else T
        z = sometimes_bad(draw, valid_array((B, lat[top - 1]), dt))
        eps = None if draw(FLAG) else eps_list(draw, B, lat[:top - 1], dt)
        kwargs = {"level": level, "eps": eps}
        if draw(FLAG):
            kwargs["temperature"] = sometimes_bad(draw, TEMPERATURES)
        out, ok = call(m.decode, params, z, **kwargs)
        if ok:
            kw2 = dict(kwargs, eps=None if eps is None else [canonical(e, dt) for e in eps])
            same(out, m.decode(canonical(params, dt), canonical(z, dt), **kw2))


GOOD_DIM = st.one_of(st.integers(1, 12), st.integers(1, 12),
                     st.integers(2 ** 24 - 1, 2 ** 24 + 1))
BAD_DIM = st.one_of(st.integers(-2 ** 70, 2 ** 70), ANYTHING)
SLOTS = [st.sampled_from(["bernoulli", "gaussian", "gaussian_learned", "poisson"]),
         st.sampled_from(["tanh", "relu", "leaky_relu", "gelu"]),
         st.sampled_from(["analytic", "mc", "exact"]), st.booleans(),
         st.sampled_from(["float32", "float64", "float16"])]


def dims(draw, min_size, max_size):
    if not draw(CHOICE):
        return draw(ANYTHING)
    size = draw(st.integers(min_size, max_size)) if draw(CHOICE) else draw(st.integers(0, 20))
    return [draw(GOOD_DIM) if draw(st.integers(0, 9)) else draw(BAD_DIM) for _ in range(size)]


@FUZZ
@given(st.data())
def test_model_constructor_fuzz(data):
    draw = data.draw
    x_dim = draw(GOOD_DIM) if draw(CHOICE) else draw(BAD_DIM)
    latent = dims(draw, 1, 4)
    n = len(latent) if isinstance(latent, list) and draw(CHOICE) else draw(st.integers(0, 4))
    hidden = [dims(draw, 0, 3) for _ in range(n)] if draw(CHOICE) else draw(ANYTHING)
    options = [sometimes_bad(draw, slot) for slot in SLOTS[:draw(st.integers(0, 5))]]
    model, ok = call(_core.Model, x_dim, latent, hidden, *options)
    if ok:  # a valid description: its table covers the buffer exactly, nothing allocated
        table = model.param_table()
        end = max(off + int(np.prod(shape)) for _, off, shape in table)
        assert end == model.n_params
        assert model.dtype in (np.float32, np.float64)
        with pytest.raises(RuntimeError, match="already initialised"):
            model.__init__(4, [2], [[3]])


SIZES = st.integers(0, 5)
REALS = st.sampled_from([np.float32, np.float64])
STEPS = st.one_of(st.integers(1, 10), st.integers(-2, 2 ** 63))
HYPER = st.lists(st.sampled_from(["lr", "beta1", "beta2", "eps"]), unique=True, max_size=4)
HYPER_VALUES = st.one_of(st.floats(1e-9, 0.999), st.floats(-1, 2))
OPS = st.sampled_from(["exp", "expm1", "log1p", "tanh", "softplus", "sigmoid", "log"])


@FUZZ
@given(st.data())
def test_adam_and_vecmath_fuzz(data):
    draw = data.draw
    n, dt = draw(SIZES), draw(REALS)
    bufs = [np.zeros(n, dt) if draw(CHOICE) else draw(ANYTHING) for _ in range(3)]
    grad = sometimes_bad(draw, valid_array((n,), dt))
    step = sometimes_bad(draw, STEPS)
    kwargs = {k: sometimes_bad(draw, HYPER_VALUES) for k in draw(HYPER)}
    before = [np.array(b, copy=True) if isinstance(b, np.ndarray) else None for b in bufs]
    out, ok = call(_core.adam_update, *bufs, grad, step, **kwargs)
    if ok:
        again = [b.copy() for b in before]
        assert _core.adam_update(*again, canonical(grad, bufs[0].dtype), step, **kwargs) == out
        same(bufs, again)
    else:  # nothing written
        for b, b0 in zip(bufs, before):
            if b0 is not None:
                assert b.tobytes() == b0.tobytes()
    op, x = sometimes_bad(draw, OPS), draw(any_array()) if draw(CHOICE) else draw(ANYTHING)
    out, ok = call(_core._vecmath, op, x)
    if ok:
        a = np.asarray(x)
        want_dt = np.float32 if isinstance(x, np.ndarray) and x.dtype.type is np.float32 \
            else np.float64  # float32 in either byte order stays float32
        same(out, _core._vecmath(op, canonical(a, want_dt)))
        assert out.shape == a.shape


# ----------------------------------------------------------------------------------------------
# hostile objects: __index__ / __float__ / __array__ that change the other arguments while the
# binding converts them (the binding converts everything, then checks the buffers it writes)


class Boom(Exception):
    """Raised by a hostile object itself: passed through unchanged (it is the caller's)."""


class Hostile:
    """An integer / float / array-like whose conversion runs ``action`` first."""

    def __init__(self, value, action):
        self.value, self.action = value, action

    def __index__(self):
        self.action()
        return int(self.value)

    def __float__(self):
        self.action()
        return float(self.value)

    def __array__(self, dtype=None, copy=None):
        self.action()
        return np.asarray(self.value, dtype=dtype)


def hostile_call(f, *args, **kwargs):
    try:
        return f(*args, **kwargs), True
    except Boom:
        return None, False
    except BaseException as exc:  # noqa: B902
        check_error(exc)
        return None, False


@st.composite
def actions(draw, victims):
    """A callable that does something nasty to one of ``victims`` (arrays and lists)."""
    v = victims[draw(st.integers(0, len(victims) - 1))]
    how = draw(st.integers(0, 5))
    if isinstance(v, list):
        return [lambda: v.clear(), lambda: v.append(3), lambda: v.pop() if v else None,
                lambda: v.insert(0, [1]), lambda: None, lambda: v.extend([2] * 40)][how]
    size = draw(st.sampled_from([0, 1, 7, 10 ** 5]))

    def resize():
        v.resize(size, refcheck=False)

    def reshape():
        if v.size:
            v.shape = (v.size,)

    def boom():
        raise Boom

    def restride():
        if v.ndim and v.shape[0] > 1:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                v.strides = (0,) + v.strides[1:]

    return [resize, reshape, boom, restride, lambda: None, resize][how]


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_hostile_conversions_fuzz(data):
    """A hostile scalar or array argument of forward / train_step / encode / decode /
    adam_update resizes, reshapes or restrides another argument: a named error or a result,
    never a crash (make sanitize runs this under ASan)."""
    draw = data.draw
    m, dt, lat, D, P = draw(PICK_MODEL)
    B = draw(st.integers(1, 3))
    bufs = [np.zeros(P, dt) for _ in range(4)]
    x = np.ones((B, D), dt)
    eps = [np.zeros((B, d), dt) for d in lat]
    act = draw(actions([*bufs, x, eps, *eps]))
    value = draw(st.sampled_from([1, 0.5, 2]))
    h = Hostile(value, act)
    which = draw(st.integers(0, 5))
    if which == 0:
        slot = draw(st.sampled_from(["beta", "lr", "beta1", "beta2", "adam_eps", "threads",
                                     "step"]))
        kw = {slot: h} if slot != "step" else {}
        hostile_call(m.train_step, *bufs, x, eps, h if slot == "step" else 1, **kw)
    elif which == 1:
        eps2 = list(eps)
        if eps2:
            eps2[draw(st.integers(0, len(eps2) - 1))] = Hostile(eps2[0], act)
        hostile_call(m.train_step, *bufs, Hostile(x, act) if draw(FLAG) else x, eps2, 1)
    elif which == 2:
        slot = draw(st.sampled_from(["beta", "threads", "log_weight"]))
        hostile_call(m.forward, bufs[0], x, None, eps, grad=bufs[3], **{slot: h})
    elif which == 3:
        hostile_call(m.forward, bufs[0], Hostile(x, act), None,
                     [Hostile(e, act) for e in eps], grad=bufs[3])
    elif which == 4:
        hostile_call(m.encode, bufs[0], x, [Hostile(e, act) for e in eps])
        hostile_call(m.decode, bufs[0], np.zeros((B, lat[-1]), dt), level=h,
                     temperature=Hostile(0.5, act))
    else:
        hostile_call(_core.adam_update, *bufs[:3], Hostile(bufs[3], act), h, lr=h)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_hostile_model_description_fuzz(data):
    """__index__ of a dimension empties, grows or changes the lists being read."""
    draw = data.draw
    latent = [2, 3, 2][:draw(st.integers(1, 3))]
    hidden = [[4] for _ in latent]
    victims = [latent, hidden, *hidden]
    act = draw(actions(victims))
    target = draw(st.integers(0, 2))
    if target == 0:
        latent[draw(st.integers(0, len(latent) - 1))] = Hostile(2, act)
    elif target == 1:
        hidden[draw(st.integers(0, len(hidden) - 1))][0] = Hostile(3, act)
    x_dim = Hostile(4, act) if target == 2 else 4
    model, ok = hostile_call(_core.Model, x_dim, latent, hidden)
    if ok:
        assert model.n_params > 0


# ----------------------------------------------------------------------------------------------
# signals at random moments of a step, concurrent saves, special files (bounded in time)

import os  # noqa: E402
import signal  # noqa: E402
import stat  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import hvae  # noqa: E402
from test_state_safety import interrupted_reference  # noqa: E402


def _binary(n, d, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, d)) < 0.4).astype(np.float32)


class UserSignal(Exception):
    pass


def _raise_user(signum, frame):
    raise UserSignal


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signals need the main thread")
def test_signals_at_random_moments_of_a_step():
    """SIGINT (KeyboardInterrupt) or SIGUSR1 with a handler that raises, at a random moment:
    the model is then exactly a model stopped cleanly after its last counted step (parameters,
    Adam moments, counter, Generator)."""
    X, fit = _binary(400, 12), dict(batch_size=20, progress=False)
    spe = 20
    rng = np.random.default_rng(0)
    main = threading.main_thread().ident
    old = signal.signal(signal.SIGUSR1, _raise_user)
    checked, t_end = 0, time.monotonic() + 4
    try:
        while time.monotonic() < t_end or checked < 3:
            sig = signal.SIGINT if rng.random() < 0.6 else signal.SIGUSR1
            m = hvae.HVAE(12, [4, 2], [[8], [5]], seed=3)
            timer = threading.Timer(float(rng.uniform(0.001, 0.04)), signal.pthread_kill,
                                    (main, sig))
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    timer.start()
                    m.fit(X, epochs=10 ** 6, **fit)
            except (KeyboardInterrupt, UserSignal):
                pass
            finally:
                timer.join()
            s = 0 if m.optimizer_ is None else m.optimizer_.step
            if s == 0:
                continue
            ref = interrupted_reference(s, X, 10 ** 6, **fit)
            np.testing.assert_array_equal(m.params, ref.params)
            np.testing.assert_array_equal(m.optimizer_.m, ref.optimizer_.m)
            np.testing.assert_array_equal(m.optimizer_.v, ref.optimizer_.v)
            assert m.optimizer_.step == ref.optimizer_.step
            if s % spe:  # mid-epoch: the Generator where the last step left it
                assert m._rng.bit_generator.state == ref._rng.bit_generator.state
                assert len(m.history_) == len(ref.history_)
            checked += 1
            if checked > 40:
                break
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_concurrent_saves_and_copies_are_whole_steps(tmp_path):
    """While fit runs in a thread, saves, deepcopies and pickles from another: each holds the
    state after some step, bit for bit."""
    import copy
    import pickle

    X, fit = _binary(300, 12, seed=1), dict(batch_size=10, progress=False)
    ref = hvae.HVAE(12, [4, 2], [[8], [5]], seed=3)
    ref._ensure_optimizer()
    real = ref.optimizer_.train_step
    trajectory = {0: (ref.params.copy(), ref.optimizer_.m.copy())}

    def recording(*a, **k):
        out = real(*a, **k)
        trajectory[ref.optimizer_.step] = (ref.params.copy(), ref.optimizer_.m.copy())
        return out

    ref.optimizer_.train_step = recording
    ref.fit(X, epochs=20, **fit)
    m = hvae.HVAE(12, [4, 2], [[8], [5]], seed=3)
    m._ensure_optimizer()
    t = threading.Thread(target=m.fit, args=(X,), kwargs=dict(epochs=20, **fit))
    rng = np.random.default_rng(0)
    got = []
    t.start()
    while t.is_alive() and len(got) < 150:
        how = rng.integers(3)
        if how == 0:
            p = tmp_path / f"s{len(got)}.npz"
            m.save(p)
            got.append(hvae.load(p))
        elif how == 1:
            got.append(copy.deepcopy(m))
        else:
            got.append(pickle.loads(pickle.dumps(m)))
    t.join(120)
    for r in got:
        params, mom = trajectory[r.optimizer_.step]
        np.testing.assert_array_equal(r.params, params)
        np.testing.assert_array_equal(r.optimizer_.m, mom)
    assert got


def test_special_files_fuzz(tmp_path):
    """save to a random kind of destination: a regular file, a new name, links (chains,
    dangling) to those, FIFOs, directories, /dev/null. Either the target is a checkpoint that
    loads and every link is still a link, or a ValueError and nothing changed."""
    m = hvae.HVAE(12, [4], [[6]], seed=0)
    rng = np.random.default_rng(0)
    kinds = ["file", "new", "fifo", "dir", "devnull"]
    for k in range(60):
        base = tmp_path / f"case{k}"
        base.mkdir()
        kind = kinds[rng.integers(len(kinds))]
        target = base / "target"
        if kind == "file":
            target.write_bytes(b"old")
        elif kind == "fifo":
            os.mkfifo(target)
        elif kind == "dir":
            target.mkdir()
        elif kind == "devnull":
            target = type(base)(os.devnull)
        links = int(rng.integers(0, 3))
        dest = target
        for j in range(links):
            link = base / f"link{j}"
            link.symlink_to(dest)
            dest = link
        before = {p: (p.is_symlink(), stat.S_IFMT(os.lstat(p).st_mode)) for p in base.iterdir()}
        try:
            m.save(dest)
        except ValueError as exc:
            assert kind in ("fifo", "dir", "devnull"), exc
            assert str(exc).startswith(f"path: {dest}"), exc
            after = {p: (p.is_symlink(), stat.S_IFMT(os.lstat(p).st_mode))
                     for p in base.iterdir()}
            assert after == before
        else:
            assert kind in ("file", "new"), kind
            np.testing.assert_array_equal(hvae.load(dest).params, m.params)
            assert os.path.isfile(target) and not os.path.islink(target)
            for p, (was_link, _) in before.items():
                assert p.is_symlink() == was_link
        assert not list(base.glob(".*.tmp"))
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
