"""The HVAE estimator: architecture, the flat parameter buffer, and the core's loss and gradient."""
import os
import threading
import weakref

import numpy as np

import warnings

from . import _core, checkpoint, evaluation, parallel, training

LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_learned")
ACTIVATIONS = ("tanh", "relu", "leaky_relu")
KL_ESTIMATORS = ("analytic", "mc")
PRIOR_VARIANCES = ("unit", "learned")
INFERENCES = ("bottom_up", "top_down")
OBJECTIVES = ("elbo", "iwae")
GRADIENTS = ("standard", "dreg")
DTYPES = ("float32", "float64")
INITS = ("torch", "glorot")
MAX_ROWS = 2 ** 31 - 1  # rows of one core call


def default_hidden_dims(x_dim, latent_dims):
    """Two hidden layers per level, IWAE-style: width max(2 d_i, min(200, d_{i-1})).

    For 784 -> (100, 50) this gives [[200, 200], [100, 100]], the IWAE paper's two-level model.
    """
    dims = [x_dim, *latent_dims]
    return [[max(2 * dims[i + 1], min(200, dims[i]))] * 2 for i in range(len(latent_dims))]


def _check_seed(seed):
    """The seed as the constructor stores it (and checkpoints write): None, an int >= 0, or a
    list of them. NumPy integers and 1-D integer arrays are converted; a Generator, BitGenerator
    or SeedSequence is refused (its state would not be what the checkpoint restores)."""
    want = "None, an integer >= 0 or a list of them"
    if seed is None:
        return None
    if isinstance(seed, (np.random.Generator, np.random.BitGenerator, np.random.SeedSequence)):
        raise TypeError(f"seed: expected {want}, got a {type(seed).__name__}; pass an integer "
                        f"(the model keeps its own Generator, seeded from it, and checkpoints "
                        f"save that Generator's state)")
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, (bool, np.bool_)):
        if seed < 0:
            raise ValueError(f"seed: expected {want}, got {seed!r}")
        return int(seed)
    if isinstance(seed, (list, tuple, np.ndarray)):
        items = list(seed.ravel()) if isinstance(seed, np.ndarray) and seed.ndim == 1 else (
            None if isinstance(seed, np.ndarray) else list(seed))
        if items and all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
                         and v >= 0 for v in items):
            return [int(v) for v in items]
        raise ValueError(f"seed: expected {want}, got {seed!r}")
    raise TypeError(f"seed: expected {want}, got {type(seed).__name__}")


# live models, whose locks are taken around a fork (so no step is half done in the child) and
# made anew in the child (the threads that held them are not there)
_MODELS = weakref.WeakSet()
_FORKING = []


def _before_fork():
    _FORKING[:] = list(_MODELS)
    for m in _FORKING:
        m._lock.acquire()


def _after_fork_in_parent():
    for m in _FORKING:
        m._lock.release()
    _FORKING.clear()


def _after_fork_in_child():
    for m in _FORKING:
        m._lock = threading.RLock()
        m._fit_thread = None
    _FORKING.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


def _int_list(value, name):
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"{name}: expected a list of integers, got {value!r}") from None
    if any(not isinstance(v, (int, np.integer)) or isinstance(v, bool) for v in items):
        raise TypeError(f"{name}: expected a list of integers, got {value!r}")
    return [int(v) for v in items]


class HVAE:
    """A T-level hierarchical VAE (T = len(latent_dims); T = 1 is the plain VAE).

    Parameters
    ----------
    x_dim : int
        D, the dimension of an example.
    latent_dims : int or list of int
        d_1..d_T, the widths of the stochastic levels, bottom (next to x) first.
    hidden_dims : list of list of int, or list of int, optional
        ``hidden_dims[i-1]``: the encoder's hidden widths at level i (the decoder of level i uses
        them reversed). A flat list of ints applies to every level. Default
        :func:`hvae.model.default_hidden_dims` (the IWAE architectures).
    likelihood : {"bernoulli", "gaussian", "gaussian_learned"}
        p(x | z_1): Bernoulli with logits, unit-variance Gaussian, or Gaussian with a learned
        per-dimension log-variance.
    activation : {"tanh", "relu", "leaky_relu"}
        After every hidden layer (slope 0.01 for leaky_relu).
    kl : {"mc", "analytic"}
        The KL estimator (README, "Two estimators"): the unbiased Monte Carlo cross terms, or the
        seed documents' closed-form chain (biased for T >= 2). The two are the same for T = 1.
    dtype : {"float32", "float64"}
    seed : int, list of int, or None
        Seeds the NumPy Generator used for initialisation, noise and shuffling (integers >= 0;
        NumPy integers and integer arrays are stored as int and list). A Generator or
        SeedSequence is refused: the model keeps its own Generator, whose state checkpoints save.
    deterministic : bool
        A plain autoencoder: z_i = mu_i, no sampling, no KL.
    init : {"glorot", "torch"}
        "glorot": weights ~ U(+-sqrt(6 / (fan_in + fan_out))), zero biases (Glorot & Bengio 2010,
        the IWAE paper's choice); "torch": weights and biases ~ U(+-1/sqrt(fan_in)), as
        ``torch.nn.Linear`` (deep tanh networks then sit for hundreds of steps at the pixel
        marginals).
    prior_variance : {"unit", "learned"}, optional
        The variance of p(z_{i-1} | z_i) for the levels i >= 2: the seed's identity, or a
        diagonal learned by decoder i, whose output is then [mean, logvar] (width 2 d_{i-1}),
        as in the IWAE and Ladder VAE papers. No effect when T = 1. Default: "unit" for
        bottom-up inference, "learned" for top-down.
    inference : {"bottom_up", "top_down"}
        The approximate posterior. "bottom_up": q(z_i | z_{i-1}), encoder i reading z_{i-1}.
        "top_down" (Ladder VAE, Sønderby et al. 2016): a deterministic bottom-up pass d_i
        (encoder i's last hidden layer, reading d_{i-1}, d_0 = x) gives N(mu^_i, exp(logvar^_i));
        q(z_T | x) is that at the top, and below it q(z_i | z_{i+1}, x) is its precision-
        weighted merge with p(z_i | z_{i+1}), the decoder shared by p and q. Needs at least one
        hidden layer per level; not for a deterministic autoencoder.
    warm_start : bool
        What :meth:`fit` starts from. True (the default): the current state, so a second call
        continues training and ``hvae.load(path).fit(X, ...)`` resumes a run bit for bit.
        False: scikit-learn's default, every :meth:`fit` starts over from ``seed`` (fresh
        parameters, optimiser, random stream and history), so fitting twice equals fitting
        once. :meth:`partial_fit` always continues. (See "scikit-learn" below.)

    Attributes
    ----------
    params : ndarray, shape (n_params,)
        Every weight and bias in one contiguous buffer (see :meth:`named_params`).
    latent_dims, hidden_dims, dtype, prior_variance
        The constructor's arguments as resolved: ``latent_dims`` a list, ``hidden_dims`` one
        list per level (the default filled in), ``dtype`` a string, ``prior_variance`` "unit"
        or "learned"; the other arguments are stored under their names too.
        :meth:`get_params` returns them all exactly as passed.
    history_ : list of dict
        One record per epoch trained (see :meth:`fit`).
    train_config_ : dict
        The run's training settings (:data:`hvae.training.TRAIN_DEFAULTS`, plus what the command
        line adds: the data set and its subset), saved in checkpoints and restored by the next
        :meth:`fit`.
    optimizer_ : Adam or None
        The optimiser's state once training has begun.

    Notes
    -----
    A model may be shared between threads: each step of :meth:`fit` (noise, parameters, Adam
    moments, step counter) and each call of the core happens under the model's lock, so
    :meth:`save`, ``pickle`` or ``copy.deepcopy`` from another thread waits for the step to
    end; a second :meth:`fit` or :meth:`partial_fit` while one runs raises RuntimeError.
    ``pickle`` and ``copy.deepcopy`` go through the bytes of a checkpoint (:func:`hvae.checkpoint.dumps`), never pickling
    arbitrary objects. ``os.fork`` waits for the models' core calls in other threads to end
    (a BLAS call in flight at a fork can hang OpenBLAS), so a forked child gets every model as
    of its last completed step, usable.

    **scikit-learn.** The class follows scikit-learn's estimator protocol without importing
    it: :meth:`get_params` / :meth:`set_params` over the constructor's arguments (so
    ``sklearn.base.clone``, ``Pipeline`` and ``GridSearchCV`` work; fit parameters pass as
    ``pipe.fit(X, vae__epochs=5)``), ``fit(X, y=None)`` returning self, :meth:`transform`,
    :meth:`fit_transform`, :meth:`score_samples` and :meth:`score`. Two deliberate departures:
    the model exists from construction (``params`` is drawn by ``__init__``, so it can be
    evaluated, saved or used in ``loss_and_grad`` before any fit), and ``warm_start`` defaults
    to True, because continuing the run is how a saved run resumes exactly and how the
    command line's ``--resume`` works. scikit-learn's model-selection tools fit fresh clones,
    which are the same whichever ``warm_start``; pass ``warm_start=False`` for scikit-learn's
    fit-from-scratch semantics on repeated fits of one object (on new data, say).
    """

    def __init__(self, x_dim, latent_dims, hidden_dims=None, *, likelihood="bernoulli",
                 activation="tanh", kl="mc", dtype="float32", seed=None,
                 deterministic=False, init="glorot", prior_variance=None, inference="bottom_up",
                 warm_start=True):
        # what get_params returns: the arguments themselves (sklearn's clone checks identity)
        given = dict(x_dim=x_dim, latent_dims=latent_dims, hidden_dims=hidden_dims,
                     likelihood=likelihood, activation=activation, kl=kl, dtype=dtype, seed=seed,
                     deterministic=deterministic, init=init, prior_variance=prior_variance,
                     inference=inference, warm_start=warm_start)
        if isinstance(x_dim, bool) or not isinstance(x_dim, (int, np.integer)):
            raise TypeError(f"x_dim: expected an integer, got {x_dim!r}")
        if isinstance(latent_dims, (int, np.integer)) and not isinstance(latent_dims, bool):
            latent_dims = [latent_dims]
        latent_dims = _int_list(latent_dims, "latent_dims")
        if hidden_dims is None:
            hidden_dims = default_hidden_dims(int(x_dim), latent_dims)
        elif isinstance(hidden_dims, (int, np.integer)) or not hasattr(hidden_dims, "__len__"):
            raise TypeError(f"hidden_dims: expected a list of lists of integers (one per level), "
                            f"got {hidden_dims!r}")
        elif len(hidden_dims) and all(isinstance(h, (int, np.integer)) for h in hidden_dims):
            hidden_dims = [list(hidden_dims)] * len(latent_dims)
        hidden_dims = [_int_list(h, f"hidden_dims[{i}]") for i, h in enumerate(hidden_dims)]
        if inference not in INFERENCES:
            raise ValueError(f"inference: expected one of {INFERENCES}, got {inference!r}")
        if prior_variance is None:
            prior_variance = "learned" if inference == "top_down" else "unit"
        if inference == "top_down":
            if deterministic:
                raise ValueError("deterministic: an autoencoder has no top-down inference; use "
                                 "inference='bottom_up'")
            for i, h in enumerate(hidden_dims):
                if not h:
                    raise ValueError(f"hidden_dims[{i}]: top-down inference needs at least one "
                                     f"hidden layer at every level, got {h!r}")
        for name, value, choices in (("init", init, INITS), ("likelihood", likelihood, LIKELIHOODS),
                                     ("activation", activation, ACTIVATIONS),
                                     ("kl", kl, KL_ESTIMATORS),
                                     ("prior_variance", prior_variance, PRIOR_VARIANCES),
                                     ("dtype", str(np.dtype(dtype)) if _is_dtype(dtype) else dtype,
                                      DTYPES)):
            if value not in choices:
                raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
        if not isinstance(warm_start, (bool, np.bool_)):
            raise TypeError(f"warm_start: expected True or False, got {warm_start!r}")
        self._given = given
        self.x_dim = int(x_dim)
        self.latent_dims = latent_dims
        self.hidden_dims = hidden_dims
        self.likelihood = likelihood
        self.activation = activation
        self.kl = kl
        self.dtype = str(np.dtype(dtype))
        seed = _check_seed(seed)
        self.seed = seed
        self.deterministic = bool(deterministic)
        self.init = init
        self.prior_variance = prior_variance
        self.inference = inference
        self.warm_start = bool(warm_start)
        self._lock = threading.RLock()  # one state change at a time (see Notes)
        self._fit_thread = None         # the thread running fit, if any
        self._core = self._new_core()
        _check_memory(self._core.n_params * np.dtype(self.dtype).itemsize, "the parameters")
        self._rng = np.random.default_rng(seed)
        self.params = np.empty(self._core.n_params, dtype=self.dtype)
        self.history_ = []
        self.train_config_ = {}
        self.best_ = None  # early stopping: (val_loss, epoch, params) of the best epoch so far
        self.optimizer_ = None
        self._warned_untrained = False
        self.reset_parameters()
        _MODELS.add(self)

    # ------------------------------------------------------------------------------------------
    # scikit-learn's estimator protocol

    def get_params(self, deep=True):
        """The constructor's arguments, exactly as passed (scikit-learn's protocol).

        Parameters
        ----------
        deep : bool
            Ignored: an HVAE holds no sub-estimators.

        Returns
        -------
        dict of str to object
            ``x_dim``, ``latent_dims``, ... ``warm_start``: the objects given to ``__init__``
            (``hidden_dims=None`` stays None; the resolved values are the attributes).
        """
        return dict(self._given)

    def set_params(self, **params):
        """Change constructor arguments and rebuild the model (scikit-learn's protocol).

        The model is constructed anew from the merged arguments: parameters drawn afresh from
        ``seed``, no optimiser state, empty history. Nothing changes when the new arguments
        are refused.

        Parameters
        ----------
        **params
            Constructor arguments by name (see the class docstring).

        Returns
        -------
        self

        Raises
        ------
        ValueError
            A name that is not a constructor argument, or an argument the constructor refuses
            (TypeError likewise).
        RuntimeError
            While :meth:`fit` trains the model in another thread.
        """
        if not params:
            return self
        unknown = sorted(set(params) - set(self._given))
        if unknown:
            raise ValueError(f"set_params: {unknown[0]!r} is not a parameter of HVAE; expected "
                             f"one of {sorted(self._given)}")
        rebuilt = type(self)(**{**self._given, **params})
        with self._lock:
            if self._fit_thread is not None:
                raise RuntimeError("set_params: this model is being trained by fit in another "
                                   f"thread ({self._fit_thread}); set its parameters after")
            vars(self).clear()
            vars(self).update(vars(rebuilt))
        return self

    def __sklearn_tags__(self):
        """scikit-learn's estimator tags (called by scikit-learn only, which it imports): a
        transformer of dense, finite, real arrays, usable before fit, y ignored."""
        from sklearn.utils import InputTags, Tags, TargetTags, TransformerTags

        return Tags(estimator_type=None, target_tags=TargetTags(required=False),
                    transformer_tags=TransformerTags(preserves_dtype=[self.dtype]),
                    input_tags=InputTags(), requires_fit=False)

    # ------------------------------------------------------------------------------------------
    # parameters

    def _new_core(self):
        """A core Model of this architecture (its own workspace)."""
        return _core.Model(self.x_dim, self.latent_dims, self.hidden_dims, self.likelihood,
                           self.activation, self.kl, self.deterministic, self.dtype,
                           self.prior_variance, self.inference)

    @property
    def n_levels(self):
        """T, the number of stochastic levels."""
        return len(self.latent_dims)

    def _restart(self):
        """The state of a freshly constructed model: random stream from ``seed``, parameters
        drawn from it, no optimiser, history or run settings (``fit`` with
        ``warm_start=False``; the caller holds the lock)."""
        self._rng = np.random.default_rng(self.seed)
        self._reset_parameters()
        self.optimizer_ = None
        self.history_ = []
        self.train_config_ = {}
        self.best_ = None

    def reset_parameters(self):
        """Draw fresh parameters by the ``init`` scheme (see the class docstring). Returns self."""
        with self._lock:
            self._reset_parameters()
        return self

    def _reset_parameters(self):
        fan_in = fan_out = 1
        for _, offset, shape in self._core.param_table():
            if len(shape) == 2:  # a weight (out, in); its bias follows with the same fans
                fan_out, fan_in = shape
            n = int(np.prod(shape))
            if self.init == "torch":
                bound = 1.0 / np.sqrt(fan_in)
            else:
                bound = np.sqrt(6.0 / (fan_in + fan_out)) if len(shape) == 2 else 0.0
            for start in range(0, n, 1 << 20):  # chunks: no float64 copy of a giant layer
                stop = min(n, start + (1 << 20))
                self.params[offset + start:offset + stop] = (
                    self._rng.uniform(-bound, bound, stop - start) if bound else 0)

    def named_params(self):
        """Views into :attr:`params` by name, in buffer order.

        Returns
        -------
        dict of str to ndarray
            ``enc{i}.{j}.weight`` (out, in), ``enc{i}.{j}.bias`` (out,), then ``dec{i}...``:
            i = 1..T the level, j = 0.. the layer inside its MLP (the last is the output layer).
        """
        out = {}
        for name, offset, shape in self._core.param_table():
            n = int(np.prod(shape))
            out[name] = self.params[offset:offset + n].reshape(shape)
        return out

    @property
    def n_params(self):
        """Length of :attr:`params`."""
        return self._core.n_params

    # ------------------------------------------------------------------------------------------
    # the loss

    def _check_x(self, x, name="x", finite=True, scored=False):
        """x as a 2-D array of the model's dtype with x_dim columns, finite unless the caller
        leaves that check to the core (which names the argument the same way); with ``scored``
        (the likelihood scores it), in [0, 1] for the Bernoulli likelihood."""
        if type(x).__module__.startswith("scipy.sparse"):
            raise TypeError(f"{name}: sparse matrices are not supported; pass a dense array "
                            f"({name}.toarray()); the core skips the zeros of a sparse x itself")
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{name}: expected a 2-D numeric array, got {type(x).__name__} "
                             f"({exc})") from None
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{name}: expected a real-valued array, got dtype {arr.dtype}")
        if arr.ndim != 2 or arr.shape[1] != self.x_dim:
            raise ValueError(f"{name}: expected shape (batch, {self.x_dim}), got {arr.shape}")
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        if finite:
            rows = np.isfinite(arr).all(axis=1)
            if not rows.all():
                raise ValueError(f"{name}: expected finite values, got NaN or infinity in row "
                                 f"{int(np.argmin(rows))}")
        if scored and self.likelihood == "bernoulli" and arr.size:
            lo, hi = float(arr.min()), float(arr.max())
            if np.isfinite(lo) and np.isfinite(hi) and (lo < 0 or hi > 1):
                raise ValueError(
                    f"{name}: the bernoulli likelihood scores values in [0, 1], got min {lo:g}, "
                    f"max {hi:g}; for pixels in 0..255 divide by 255, or binarize them with "
                    f"hvae.datasets.binarize(x / 255)")
        return arr

    def draw_eps(self, batch):
        """Standard normal noise for every level, from the model's Generator.

        Returns
        -------
        list of ndarray
            T arrays of shape (batch, d_i).
        """
        with self._lock:
            return [self._rng.standard_normal((batch, d), dtype=self.dtype)
                    for d in self.latent_dims]

    @property
    def dtype_type(self):
        """The NumPy scalar type of the model's dtype."""
        return np.dtype(self.dtype).type

    def _forward(self, x, eps, target, beta, grad=None, log_weight=False, threads=1,
                 free_bits=None, objective="elbo", k=1, gradient="standard"):
        est = self.estimator(objective, k, gradient)
        free_bits = self.free_bits_per_level(free_bits)
        if free_bits is not None and objective == "iwae":
            raise ValueError("free_bits: not defined for objective='iwae' (a bound on log p(x), "
                             "not a sum of KL terms)")
        x = self._check_x(x, finite=False, scored=target is None)
        if target is not None:
            target = self._check_x(target, "target", finite=False, scored=True)
        if eps is None and not self.deterministic:
            eps = self.draw_eps(len(x) * est["k"])
        with self._lock:
            return self._core.forward(self.params, x, target,
                                      None if self.deterministic else eps, beta=beta, grad=grad,
                                      log_weight=log_weight, threads=threads,
                                      free_bits=free_bits, **est)

    def estimator(self, objective="elbo", k=1, gradient="standard"):
        """The training objective as the core takes it, checked: a dict of ``objective``, ``k``
        and ``gradient`` (see :meth:`loss_and_grad`); a ValueError / TypeError naming the
        argument otherwise."""
        if objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient: expected one of {GRADIENTS}, got {gradient!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_ROWS:
            raise ValueError(f"k: expected an integer in [1, {MAX_ROWS}], got {k!r}")
        if objective == "elbo" and k != 1:
            raise ValueError(f"k: {k} samples per example need objective='iwae' (the ELBO takes "
                             "one)")
        if objective == "elbo" and gradient != "standard":
            raise ValueError(f"gradient: {gradient!r} is a gradient of objective='iwae'")
        if objective == "iwae" and self.deterministic:
            raise ValueError("objective: 'iwae' is not defined for a deterministic autoencoder")
        if gradient == "dreg" and self.n_levels != 1:
            raise ValueError(f"gradient: 'dreg' (doubly reparameterized) is defined for one "
                             f"stochastic level, got {self.n_levels}; use gradient='standard'")
        return {"objective": objective, "k": int(k), "gradient": gradient}

    def free_bits_per_level(self, free_bits):
        """``free_bits`` (None, a number, or one number per level, in nats) as None or a list of
        T floats, each finite and >= 0; a ValueError / TypeError naming ``free_bits``."""
        if free_bits is None:
            return None
        if isinstance(free_bits, (int, float, np.integer, np.floating)) \
                and not isinstance(free_bits, bool):
            values = [free_bits] * self.n_levels
        elif isinstance(free_bits, (list, tuple, np.ndarray)):
            values = list(np.asarray(free_bits, dtype=object).ravel()) \
                if isinstance(free_bits, np.ndarray) else list(free_bits)
            if len(values) != self.n_levels:
                raise ValueError(f"free_bits: expected a number or {self.n_levels} numbers (one "
                                 f"per level), got {len(values)}")
        else:
            raise TypeError(f"free_bits: expected a number or a list of {self.n_levels} numbers, "
                            f"got {type(free_bits).__name__}")
        out = []
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise TypeError(f"free_bits: expected numbers, got {v!r}")
            if not np.isfinite(v) or v < 0:
                raise ValueError(f"free_bits: expected finite numbers >= 0 (nats), got {v!r}")
            out.append(float(v))
        return out

    def loss_and_grad(self, x, eps=None, *, target=None, beta=1.0, free_bits=None,
                      objective="elbo", k=1, gradient="standard", out=None, n_jobs=None):
        """Loss of a batch and its exact gradient with respect to :attr:`params`.

        Parameters
        ----------
        x : array_like, shape (batch, x_dim)
            Encoder input.
        eps : list of ndarray, optional
            T arrays (batch * k, d_i) of standard normal noise, sample j of example b in row
            b * k + j; drawn from the model's Generator when None. Ignored by a deterministic
            autoencoder.
        target : array_like, shape (batch, x_dim), optional
            What the likelihood scores (default x); a denoising autoencoder passes clean targets
            and corrupted inputs.
        beta : float
            Weight of the KL terms (1 for the ELBO).
        free_bits : float or list of float, optional
            Free bits (Kingma et al. 2016), in nats, one for every level or one per level:
            level i's term becomes ``beta * max(free_bits[i-1], mean_b kl_i)``, whose gradient
            is zero while the batch mean is at or under the floor. ELBO only.
        objective : {"elbo", "iwae"}
            "elbo": the negative ELBO (k = 1). "iwae": the importance-weighted bound of Burda
            et al. with k samples per example, loss = -mean_b log (1/k) sum_j w_bj, log w =
            log p(x | z) + beta (log p(z) - log q(z | x)) at the samples. What an example's
            samples share (bottom-up: encoder 1; top-down: the bottom-up pass) is computed once.
        k : int
            Samples per example (IWAE).
        gradient : {"standard", "dreg"}
            IWAE's gradient: the standard one (softmax weights of each example's k
            log-weights), or the doubly reparameterized one (Tucker et al. 2018; T = 1 only),
            whose encoder gradient has lower variance and the same mean.
        out : ndarray, shape (n_params,), optional
            Buffer for the gradient (the model's dtype); a new array when None.
        n_jobs : int, optional
            Threads of the core (see :meth:`fit`; None: 1, -1: every CPU).

        Returns
        -------
        loss : float
            Mean over the batch of the per-example negative ELBO estimate (IWAE: of the negative
            bound), in nats.
        grad : ndarray, shape (n_params,)
        """
        grad = np.empty(self.n_params, self.dtype) if out is None else out
        loss, _, _ = self._forward(x, eps, target, beta, grad=grad,
                                   threads=training.resolve_n_jobs(n_jobs), free_bits=free_bits,
                                   objective=objective, k=k, gradient=gradient)
        return loss, grad

    def elbo_terms(self, x, eps=None, *, target=None):
        """Per-example terms of the loss.

        Returns
        -------
        dict
            ``"reconstruction"`` (batch,): -log p(x | z_1); ``"kl"``: list of T arrays (batch,),
            the KL term of each level (bottom first); ``"log_weight"`` (batch,):
            log p(x, z) - log q(z | x) at the same samples (None for an autoencoder).
        """
        _, terms, lw = self._forward(x, eps, target, 1.0, log_weight=not self.deterministic)
        return {"reconstruction": terms[0], "kl": list(terms[1:]), "log_weight": lw}

    # ------------------------------------------------------------------------------------------
    # training

    def _ensure_optimizer(self):
        if self.optimizer_ is None:
            self.optimizer_ = training.Adam(self.n_params, self.dtype)

    def fit(self, X, y=None, *, epochs=None, batch_size=None, lr=None, lr_decay=None,
            validation_data=None, kl_warmup_epochs=None, kl_warmup_delay=None, beta=None,
            free_bits=None, objective=None, k=None, gradient=None, patience=None, progress=True,
            checkpoint=None, callbacks=None, n_jobs=None, comm=None):
        """Train with Adam on shuffled minibatches until the run has done ``epochs`` epochs.

        A run continues from the current state: parameters, Adam moments, the random stream,
        ``history_`` and the run's settings (``train_config_``) carry over, also through
        :meth:`save` / :func:`hvae.load`. A setting left at None takes the run's saved value,
        else the default below, so ``hvae.load(path).fit(X)`` finishes an interrupted run bit
        for bit as the uninterrupted one would have; a new value changes the run from the next
        epoch on (with a warning that says what changed). With ``warm_start=False`` every call
        starts a new run from ``seed`` instead (scikit-learn's convention): fresh parameters,
        optimiser, random stream, history and settings.

        Parameters
        ----------
        X : array_like, shape (n, x_dim)
            Training data (values in [0, 1] for the Bernoulli likelihood).
        y : None
            Ignored (scikit-learn's protocol: an unsupervised fit takes y and drops it).
        epochs : int
            The run's length in epochs, those already done included (default 50).
        batch_size : int
            Examples per Adam step (default 100).
        lr : float
            Adam's step size in the run's first epoch (default 1e-3).
        lr_decay : float
            The step size falls exponentially from ``lr`` to ``lr * lr_decay`` in the run's last
            epoch (default 0.1; 1 keeps it constant).
        validation_data : array_like, shape (m, x_dim), optional
            Scored after each epoch (``val_loss``: negative ELBO, k = 1, beta = 1).
        kl_warmup_epochs : float
            KL weight rises linearly from 0 to ``beta`` over this many epochs (Ladder VAE;
            default 20).
        kl_warmup_delay : float
            Epochs at KL weight 0 (an autoencoder's objective) before the warm-up starts
            (default 5). Keeps the upper levels of a hierarchy alive: without it they tend to
            collapse to the prior while the decoder still ignores z_1 (README, "Results").
        beta : float
            KL weight after warm-up (beta-VAE; default 1, the ELBO).
        free_bits : float or list of float
            Free bits in nats (Kingma et al. 2016), one for every level or one per level: in the
            training loss level i's KL term is ``max(free_bits[i-1], batch mean of kl_i)``, so
            no gradient pushes a level below its floor (against posterior collapse). Evaluation
            and ``val_loss`` are unaffected. Default: none.
        objective, k, gradient
            The training objective (see :meth:`loss_and_grad`): the ELBO (the default), or the
            IWAE bound with k samples per example and its standard or doubly reparameterized
            gradient. The KL warm-up's weight is the IWAE's beta. ``loss`` in the history is
            then the negative bound; ``val_loss`` stays the negative ELBO.
        patience : int
            Stop after this many epochs without a better ``val_loss`` and keep the best
            parameters (needs ``validation_data``; default 0, no early stopping).
        progress : bool
            A tqdm progress bar with loss, reconstruction and KL per level.
        checkpoint : str or os.PathLike, optional
            Saved atomically after every epoch (missing folders are created).
        callbacks : list of callable, optional
            ``cb(model, record)`` after every epoch; returning True stops training.
        n_jobs : int, optional
            Threads of the core (None: 1; -1: every CPU): each layer's matrix products,
            elementwise passes and the Adam update are split between them; meanwhile the
            OpenBLAS hvae links runs at one thread (its count is restored afterwards). Results
            are reproducible for a given n_jobs and equal the one-thread results up to
            rounding.
        comm : mpi4py communicator, optional
            Data-parallel training over MPI (``mpiexec -n N python ...``; README, "More than one
            machine"). Every rank passes the same X, settings and model (a memory map of X is
            fine); rank 0's state (parameters, Adam, random stream, history) is broadcast; each
            batch is split into disjoint rank shards, whose gradients one Allreduce sums; every
            rank takes the same Adam step, so the fit equals the one-process fit with the same
            batch size up to summation order, and the ranks stay bit for bit identical. Only
            rank 0 shows the bar, warns and writes the checkpoint; ``history_`` records gain
            ``ranks`` and ``allreduce_seconds``. Validation is not split (every rank scores all
            of ``validation_data``, drawing the noise a one-process fit draws). A bad argument
            on any rank raises on every rank. During training, an exception on one rank (of any
            kind, Ctrl-C included) ends the whole job (MPI_Abort) with that rank's traceback;
            the last checkpoint stays. Only the FloatingPointError of a non-finite step comes
            back from fit, on every rank alike.

        Returns
        -------
        self

        Raises
        ------
        FloatingPointError
            On a non-finite loss or gradient; says the epoch and step; the model keeps its last
            finite parameters.
        """
        return training.fit(self, X, epochs=epochs, batch_size=batch_size, lr=lr,
                            lr_decay=lr_decay, validation_data=validation_data,
                            kl_warmup_epochs=kl_warmup_epochs, kl_warmup_delay=kl_warmup_delay,
                            beta=beta, free_bits=free_bits, objective=objective, k=k,
                            gradient=gradient, patience=patience, progress=progress,
                            checkpoint=checkpoint, callbacks=callbacks, n_jobs=n_jobs,
                            restart=not self.warm_start, comm=comm)

    def fit_transform(self, X, y=None, **fit_params):
        """:meth:`fit` then :meth:`transform` (scikit-learn's protocol).

        Parameters
        ----------
        X : array_like, shape (n, x_dim)
        y : None
            Ignored.
        **fit_params
            Passed to :meth:`fit` (``epochs=``, ``batch_size=``, ...).

        Returns
        -------
        ndarray, shape (n, d_T)
        """
        return self.fit(X, **fit_params).transform(X)

    def partial_fit(self, X, y=None, *, batch_size=None, lr=None, beta=None, free_bits=None,
                    objective=None, k=None, gradient=None, progress=False, n_jobs=None, comm=None):
        """One more shuffled pass of minibatches over X (one epoch) of the run's schedule; the
        settings (``comm`` too) as in :meth:`fit`; always continuing, whatever ``warm_start``;
        y is ignored. Returns self."""
        return training.fit(self, X, batch_size=batch_size, lr=lr, beta=beta,
                            free_bits=free_bits, objective=objective, k=k, gradient=gradient,
                            progress=progress, n_jobs=n_jobs, stop_after=len(self.history_) + 1,
                            comm=comm)

    # ------------------------------------------------------------------------------------------
    # what was learned

    def encode(self, x, *, sample=False):
        """The approximate posterior of every level.

        Parameters
        ----------
        x : array_like, shape (n, x_dim)
        sample : bool
            False: each level is conditioned on the mean of the level it reads (bottom-up:
            q(z_{i+1} | z_i) at z_i = its mean; top-down: q(z_i | z_{i+1}, x) at z_{i+1} = its
            mean), a deterministic summary. True: on a sample drawn from the model's Generator,
            as in training.

        Returns
        -------
        list of (mu, logvar)
            T pairs of arrays (n, d_i), bottom level first.
        """
        x = self._check_x(x)
        eps = self.draw_eps(len(x)) if sample else None
        with self._lock:
            mulv, _ = self._core.encode(self.params, x, eps)
        return [(a[:, :d], a[:, d:]) for a, d in zip(mulv, self.latent_dims)]

    def transform(self, X):
        """Top-level posterior means: the embedding to plot, or the features for a downstream
        model (scikit-learn's transformer protocol).

        Parameters
        ----------
        X : array_like, shape (n, x_dim)

        Returns
        -------
        ndarray, shape (n, d_T), the model's dtype
        """
        return self.encode(X)[-1][0]

    def _mean_of_x(self, x_params):
        """Decoder-1 output -> expected x: probabilities (Bernoulli) or means."""
        if self.likelihood == "bernoulli":
            return _sigmoid(x_params)
        return x_params[:, :self.x_dim]

    def decode(self, z, *, level=None, temperature=0.0, return_latents=False):
        """Run the decoder chain from ``z`` at ``level`` down to x.

        Parameters
        ----------
        z : array_like, shape (n, d_level)
        level : int, optional
            1..T (default T, the top).
        temperature : float
            Scale of the noise of p(z_{i-1} | z_i) at each level below ``level`` (0: the means).
        return_latents : bool
            Also return the list z_1..z_{level-1}.

        Returns
        -------
        x : ndarray, shape (n, x_dim)
            Probabilities (Bernoulli) or means.
        """
        level = self.n_levels if level is None else level
        temperature = self._temperature(temperature)
        z = np.asarray(z)
        n = len(z) if z.ndim == 2 else 0
        eps = None
        if temperature > 0 and n and isinstance(level, (int, np.integer)) and level >= 2:
            _check_memory(n * sum(self.latent_dims[:level - 1]) * np.dtype(self.dtype).itemsize,
                          f"the noise of {n} rows")
            with self._lock:
                eps = [self._rng.standard_normal((n, d), dtype=self.dtype)
                       for d in self.latent_dims[:level - 1]]
        with self._lock:
            xp, zs = self._core.decode(self.params, z, level=level, eps=eps,
                                       temperature=float(temperature))
        x = self._mean_of_x(xp)
        return (x, zs) if return_latents else x

    def _temperature(self, value):
        """A temperature: a finite number >= 0, also in the model's dtype."""
        t = _number(value, "temperature")
        with np.errstate(over="ignore"):
            fits = np.isfinite(self.dtype_type(t))
        if not np.isfinite(t) or t < 0 or not fits:
            raise ValueError(f"temperature: expected a finite number >= 0 (in {self.dtype}), "
                             f"got {value!r}")
        return t

    def reconstruct(self, x):
        """Expected x given the posterior means, shape (n, x_dim)."""
        mulv = self.encode(x)
        return self.decode(mulv[0][0], level=1)

    def sample(self, n, temperature=1.0, *, return_latents=False):
        """Ancestral samples z_T ~ N(0, t^2 I), z_{i-1} ~ N(zhat_{i-1}, t^2 Sigma_{i-1}), then
        E[x | z_1] (Sigma = I, or the learned variance with ``prior_variance="learned"``).

        Parameters
        ----------
        n : int
        temperature : float
            t, the noise scale (1: the model; < 1: sharper samples).
        return_latents : bool
            Also return [z_1, ..., z_T].

        Returns
        -------
        x : ndarray, shape (n, x_dim)
            Probabilities for the Bernoulli likelihood, means otherwise.
        """
        n = _positive_int(n, "n")
        self._warn_if_untrained("sample")
        if n > MAX_ROWS:
            raise ValueError(f"n: at most {MAX_ROWS} samples per call, got {n}")
        temperature = self._temperature(temperature)
        width = 2 * sum(self.latent_dims) + self._core.x_params_dim + self.x_dim
        _check_memory(n * width * np.dtype(self.dtype).itemsize, f"n={n} samples")
        with self._lock:
            z_top = self._rng.standard_normal((n, self.latent_dims[-1]), dtype=self.dtype)
        z_top *= self.dtype_type(temperature)
        x, zs = self.decode(z_top, temperature=temperature, return_latents=True)
        return (x, [*zs, z_top]) if return_latents else x

    def interpolate(self, x_a, x_b, steps=8):
        """Decode a straight line between the top-level means of two examples.

        Returns
        -------
        ndarray, shape (steps, x_dim)
        """
        steps = _positive_int(steps, "steps")
        if steps > MAX_ROWS:
            raise ValueError(f"steps: expected at most {MAX_ROWS}, got {steps}")
        for name, v in (("x_a", x_a), ("x_b", x_b)):
            if np.ndim(v) > 2 or len(np.atleast_2d(v)) != 1:
                raise ValueError(f"{name}: expected one example, shape ({self.x_dim},) or "
                                 f"(1, {self.x_dim}), got shape {np.shape(v)}")
        za, zb = self.transform(np.atleast_2d(x_a)), self.transform(np.atleast_2d(x_b))
        t = np.linspace(0, 1, steps, dtype=self.dtype)[:, None]
        return self.decode((1 - t) * za + t * zb)

    def traverse(self, x, level, dim, values):
        """Vary one latent coordinate of one level of an example, decode the rest as means.

        Parameters
        ----------
        x : array_like, shape (x_dim,) or (1, x_dim)
        level : int
            1..T.
        dim : int
            The coordinate of z_level, 0..d_level - 1.
        values : array_like, shape (m,)
            Values for that coordinate (e.g. ``np.linspace(-3, 3, 9)``).

        Returns
        -------
        ndarray, shape (m, x_dim)
        """
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) \
                or not 1 <= level <= self.n_levels:
            raise ValueError(f"level: expected an integer in 1..{self.n_levels}, got {level!r}")
        level = int(level)
        width = self.latent_dims[level - 1]
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) \
                or not 0 <= dim < width:
            raise ValueError(f"dim: expected an integer in 0..{width - 1}, got {dim!r}")
        if np.ndim(x) > 2 or len(np.atleast_2d(x)) != 1:
            raise ValueError(f"x: expected one example, shape ({self.x_dim},) or "
                             f"(1, {self.x_dim}), got shape {np.shape(x)}")
        try:
            values = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"values: expected a 1-D array of numbers, got "
                             f"{type(values).__name__}") from None
        if values.ndim > 1 or not np.isfinite(values).all():
            raise ValueError(f"values: expected a 1-D array of finite numbers, got shape "
                             f"{values.shape}" + ("" if values.ndim > 1 else " with NaN or inf"))
        with np.errstate(over="ignore"):
            values = values.astype(self.dtype).ravel()
        if not np.isfinite(values).all():
            raise ValueError(f"values: expected numbers within the range of {self.dtype}")
        mu = self.encode(np.atleast_2d(x))[level - 1][0]
        z = np.repeat(mu[:1], len(values), axis=0)
        z[:, dim] = values
        return self.decode(z, level=level)

    # ------------------------------------------------------------------------------------------
    # evaluation

    def _check_stochastic(self, what):
        if self.deterministic:
            raise ValueError(f"{what}: not defined for a deterministic autoencoder")

    def elbo(self, x, k=1, *, n_jobs=None, comm=None):
        """Per-example importance-weighted ELBO with k samples (k = 1: the plain ELBO estimate).

        Computed from exact densities, log p(x, z) - log q(z | x), never the analytic shortcut.
        n_jobs: threads of the core (see :meth:`fit`); comm: split the examples over MPI ranks
        (see :meth:`log_likelihood`).

        Returns
        -------
        ndarray, shape (n,), float64, nats
        """
        return self._bound("elbo", x, k, n_jobs, comm)

    def log_likelihood(self, x, k=5000, *, batch_size=4096, progress=False, n_jobs=None,
                       comm=None):
        """Importance-sampled estimate of log p(x) per example (the IWAE bound with k samples).

        What an example's k samples share (bottom-up: encoder 1; top-down: the bottom-up pass)
        is computed once per example (per chunk of ``batch_size`` samples when k is larger).

        Parameters
        ----------
        x : array_like, shape (n, x_dim)
        k : int
            Importance samples per example (5000 for published tables).
        batch_size : int
            Rows (example x sample) per core call; bounds memory whatever k.
        progress : bool
            A progress bar over examples.
        n_jobs : int, optional
            Threads of the core (None: 1; -1: every CPU), as in :meth:`fit`.
        comm : mpi4py communicator, optional
            Split the examples over the MPI ranks (contiguous shards, sizes within one), each
            on its own ``n_jobs`` threads; every rank returns the whole result. Every rank
            passes the same x, k and model; every rank draws a seed from the model's Generator
            (which so advances alike everywhere) and uses rank 0's, and sample j of example e
            gets the same noise on whichever rank scores it, so the numbers equal a one-process
            run's up to rounding. A bad argument on any rank raises on every rank.

        Notes
        -----
        The noise is drawn by the core on its threads: one seed from the model's Generator per
        call, then sample j of example e (counted over the whole x) gets row e k + j of that
        seed's counter-based stream. The result depends on the seed alone, not on
        ``batch_size``, ``n_jobs`` or the ranks.

        Returns
        -------
        ndarray, shape (n,), float64, nats
        """
        return self._bound("log_likelihood", x, k, n_jobs, comm, batch_size, progress)

    def _bound(self, what, x, k, n_jobs, comm, batch_size=4096, progress=False):
        """elbo / log_likelihood: the arguments checked (on every rank, agreeing, with comm),
        then evaluation.iwae_bound."""
        if comm is not None:
            parallel.check_comm(comm)
        error = None
        try:
            self._check_stochastic(what)
            rows = batch_size
            if what == "log_likelihood":
                self._warn_if_untrained(what)
                rows = _positive_int(batch_size, "batch_size")
                _check_memory(rows * (3 * self.x_dim + 3 * sum(self.latent_dims))
                              * np.dtype(self.dtype).itemsize, f"batch_size={rows}")
            x, k, threads = self._check_x(x, scored=True), _k(k), training.resolve_n_jobs(n_jobs)
        except Exception as e:
            if comm is None:
                raise
            error = e
        if comm is not None:
            parallel.agree(comm, error, what)
            parallel.check_same(comm, x=parallel.fingerprint(x), k=k,
                                model=parallel.model_digest(self))
        return evaluation.iwae_bound(self, x, k, rows=rows, progress=progress, threads=threads,
                                     comm=comm)

    def score_samples(self, X, k=5000, *, n_jobs=None):
        """Per-example log-likelihood, importance-sampled with k samples (scikit-learn's
        protocol; :meth:`log_likelihood`).

        Parameters
        ----------
        X : array_like, shape (n, x_dim)
        k : int
            Importance samples per example.
        n_jobs : int, optional
            Threads of the core (see :meth:`fit`).

        Returns
        -------
        ndarray, shape (n,), float64, nats
        """
        return self.log_likelihood(X, k=k, n_jobs=n_jobs)

    def score(self, X, y=None, *, k=5000, n_jobs=None):
        """Mean of :meth:`score_samples` in nats (higher is better): X, k and n_jobs as there,
        y ignored (scikit-learn's protocol).

        Returns
        -------
        float
        """
        X = self._check_x(X, "X")
        if len(X) == 0:
            raise ValueError("X: expected at least one row, got an empty array")
        return float(np.mean(self.score_samples(X, k=k, n_jobs=n_jobs)))

    def _warn_if_untrained(self, what):
        """Warn once per model when it has never taken a training step."""
        steps = 0 if self.optimizer_ is None else self.optimizer_.step
        if self._warned_untrained or self.history_ or steps:
            return
        self._warned_untrained = True
        warnings.warn(f"{what}: this model was never trained (its parameters are the random "
                      f"initialisation); call fit first", UserWarning, stacklevel=3)

    # ------------------------------------------------------------------------------------------
    # persistence

    def save(self, path):
        """Write the model, its optimiser state and history to ``path`` (.npz, atomic).

        The state goes through :func:`hvae.load`'s checks first: one that would not load back
        (say ``params`` of another dtype) is a ValueError and the file is left as it was. A
        symbolic link is written through; a FIFO, device or directory is refused."""
        checkpoint.save(self, path)

    def __reduce__(self):
        """pickle and copy.deepcopy: the bytes of a checkpoint, rebuilt by the loader."""
        try:
            data = checkpoint.dumps(self)
        except ValueError as exc:
            raise ValueError(f"cannot copy or pickle this HVAE: its state would not load back "
                             f"({getattr(exc, 'why', exc)})") from None
        return (checkpoint._from_bytes, (data, type(self)))

    def __repr__(self):
        flags = (", deterministic=True" if self.deterministic else "") + \
            (", warm_start=False" if not self.warm_start else "") + \
            (f", init={self.init!r}" if self.init != "glorot" else "") + \
            (f", inference={self.inference!r}" if self.inference != "bottom_up" else "") + \
            (f", prior_variance={self.prior_variance!r}"
             if self.prior_variance != ("learned" if self.inference == "top_down" else "unit")
             else "")
        return (f"HVAE(x_dim={self.x_dim}, latent_dims={self.latent_dims}, "
                f"hidden_dims={self.hidden_dims}, likelihood={self.likelihood!r}, "
                f"activation={self.activation!r}, kl={self.kl!r}, dtype={self.dtype!r}, "
                f"seed={self.seed!r}{flags})  # {self.n_params:,} parameters")


def load(path):
    """Read a checkpoint written by :meth:`HVAE.save`.

    Parameters
    ----------
    path : str, bytes or os.PathLike

    Returns
    -------
    HVAE
        With parameters, optimiser state, random state, ``history_`` and the run's settings
        (``train_config_``) restored, so that ``fit`` continues exactly as an uninterrupted
        run would.

    Raises
    ------
    TypeError
        ``path`` is not a str, bytes or os.PathLike.
    FileNotFoundError
        No such file.
    ValueError
        The file is not a regular file (a FIFO, a device, a directory: refused before reading),
        or it is truncated, corrupted, not an hvae checkpoint, or inconsistent. The message
        starts with the path and says what is wrong.
    """
    return checkpoint.load(path, HVAE)


def _sigmoid(a):
    """Logistic function without overflow."""
    out = np.empty_like(a)
    pos = a >= 0
    out[pos] = 1 / (1 + np.exp(-a[pos]))
    e = np.exp(a[~pos])
    out[~pos] = e / (1 + e)
    return out


def _number(value, name):
    """A real number as float, or a TypeError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    return float(value)


def _k(k):
    k = _positive_int(k, "k")
    if k > MAX_ROWS:
        raise ValueError(f"k: expected an integer in [1, {MAX_ROWS}], got {k}")
    return k


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    return int(value)


def _check_memory(nbytes, what):
    """MemoryError before allocating more than the machine's physical memory."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if nbytes > total:
        raise MemoryError(f"{what} would need {nbytes / 2**30:.1f} GiB, more than this machine's "
                          f"{total / 2**30:.1f} GiB of memory")


def _is_dtype(value):
    try:
        np.dtype(value)
    except TypeError:
        return False
    return True
