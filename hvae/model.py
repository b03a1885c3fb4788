"""The HVAE estimator: architecture, the flat parameter buffer, and the core's loss and gradient."""
import numpy as np

from . import _core

LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_learned")
ACTIVATIONS = ("tanh", "relu", "leaky_relu")
KL_ESTIMATORS = ("analytic", "mc")
DTYPES = ("float32", "float64")


def default_hidden_dims(x_dim, latent_dims):
    """Two hidden layers per level, IWAE-style: width max(2 d_i, min(200, d_{i-1})).

    For 784 -> (100, 50) this gives [[200, 200], [100, 100]], the IWAE paper's two-level model.
    """
    dims = [x_dim, *latent_dims]
    return [[max(2 * dims[i + 1], min(200, dims[i]))] * 2 for i in range(len(latent_dims))]


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
        :func:`default_hidden_dims` (the IWAE architectures).
    likelihood : {"bernoulli", "gaussian", "gaussian_learned"}
        p(x | z_1): Bernoulli with logits, unit-variance Gaussian, or Gaussian with a learned
        per-dimension log-variance.
    activation : {"tanh", "relu", "leaky_relu"}
        After every hidden layer (slope 0.01 for leaky_relu).
    kl : {"analytic", "mc"}
        The KL estimator (README, "Two estimators"): the seed's closed-form chain, or the unbiased
        Monte Carlo cross terms.
    dtype : {"float32", "float64"}
    seed : int or None
        Seeds the NumPy Generator used for initialisation, noise and shuffling.
    deterministic : bool
        A plain autoencoder: z_i = mu_i, no sampling, no KL.

    Attributes
    ----------
    params : ndarray, shape (n_params,)
        Every weight and bias in one contiguous buffer (see :meth:`named_params`).
    """

    def __init__(self, x_dim, latent_dims, hidden_dims=None, *, likelihood="bernoulli",
                 activation="tanh", kl="analytic", dtype="float32", seed=None,
                 deterministic=False):
        if isinstance(x_dim, bool) or not isinstance(x_dim, (int, np.integer)):
            raise TypeError(f"x_dim: expected an integer, got {x_dim!r}")
        if isinstance(latent_dims, (int, np.integer)) and not isinstance(latent_dims, bool):
            latent_dims = [latent_dims]
        latent_dims = _int_list(latent_dims, "latent_dims")
        if hidden_dims is None:
            hidden_dims = default_hidden_dims(int(x_dim), latent_dims)
        elif len(hidden_dims) and all(isinstance(h, (int, np.integer)) for h in hidden_dims):
            hidden_dims = [list(hidden_dims)] * len(latent_dims)
        hidden_dims = [_int_list(h, f"hidden_dims[{i}]") for i, h in enumerate(hidden_dims)]
        for name, value, choices in (("likelihood", likelihood, LIKELIHOODS),
                                     ("activation", activation, ACTIVATIONS),
                                     ("kl", kl, KL_ESTIMATORS), ("dtype", str(np.dtype(dtype))
                                                                 if _is_dtype(dtype) else dtype,
                                                                 DTYPES)):
            if value not in choices:
                raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
        self.x_dim = int(x_dim)
        self.latent_dims = latent_dims
        self.hidden_dims = hidden_dims
        self.likelihood = likelihood
        self.activation = activation
        self.kl = kl
        self.dtype = str(np.dtype(dtype))
        self.seed = seed
        self.deterministic = bool(deterministic)
        self._core = _core.Model(self.x_dim, latent_dims, hidden_dims, likelihood, activation, kl,
                                 self.deterministic, self.dtype)
        self._rng = np.random.default_rng(seed)
        self.params = np.empty(self._core.n_params, dtype=self.dtype)
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------
    # parameters

    @property
    def n_levels(self):
        """T, the number of stochastic levels."""
        return len(self.latent_dims)

    def reset_parameters(self):
        """Initialise as ``torch.nn.Linear`` does: weight and bias ~ U(-1/sqrt(fan_in), +)."""
        fan_in = 1
        for _, offset, shape in self._core.param_table():
            if len(shape) == 2:  # a weight (out, in); its bias follows with the same fan_in
                fan_in = shape[1]
            n = int(np.prod(shape))
            bound = 1.0 / np.sqrt(fan_in)
            self.params[offset:offset + n] = self._rng.uniform(-bound, bound, n)
        return self

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

    def _check_x(self, x, name="x"):
        """x as a 2-D array of the model's dtype with x_dim columns (the core re-checks)."""
        arr = np.asarray(x)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{name}: expected a real-valued array, got dtype {arr.dtype}")
        if arr.ndim != 2 or arr.shape[1] != self.x_dim:
            raise ValueError(f"{name}: expected shape (batch, {self.x_dim}), got {arr.shape}")
        return np.ascontiguousarray(arr, dtype=self.dtype)

    def draw_eps(self, batch):
        """Standard normal noise for every level, from the model's Generator.

        Returns
        -------
        list of ndarray
            T arrays of shape (batch, d_i).
        """
        return [self._rng.standard_normal((batch, d), dtype=self.dtype) for d in self.latent_dims]

    def _forward(self, x, eps, target, beta, grad=None, log_weight=False):
        x = self._check_x(x)
        if target is not None:
            target = self._check_x(target, "target")
        if eps is None and not self.deterministic:
            eps = self.draw_eps(len(x))
        return self._core.forward(self.params, x, target, None if self.deterministic else eps,
                                  beta=beta, grad=grad, log_weight=log_weight)

    def loss_and_grad(self, x, eps=None, *, target=None, beta=1.0, out=None):
        """Loss of a batch and its exact gradient with respect to :attr:`params`.

        Parameters
        ----------
        x : array_like, shape (batch, x_dim)
            Encoder input.
        eps : list of ndarray, optional
            T arrays (batch, d_i) of standard normal noise; drawn from the model's Generator when
            None. Ignored by a deterministic autoencoder.
        target : array_like, shape (batch, x_dim), optional
            What the likelihood scores (default x); a denoising autoencoder passes clean targets
            and corrupted inputs.
        beta : float
            Weight of the KL terms (1 for the ELBO).
        out : ndarray, shape (n_params,), optional
            Buffer for the gradient (the model's dtype); a new array when None.

        Returns
        -------
        loss : float
            Mean over the batch of the per-example negative ELBO estimate, in nats.
        grad : ndarray, shape (n_params,)
        """
        grad = np.empty(self.n_params, self.dtype) if out is None else out
        loss, _, _ = self._forward(x, eps, target, beta, grad=grad)
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

    def __repr__(self):
        flags = ", deterministic=True" if self.deterministic else ""
        return (f"HVAE(x_dim={self.x_dim}, latent_dims={self.latent_dims}, "
                f"hidden_dims={self.hidden_dims}, likelihood={self.likelihood!r}, "
                f"activation={self.activation!r}, kl={self.kl!r}, dtype={self.dtype!r}, "
                f"seed={self.seed!r}{flags})  # {self.n_params:,} parameters")


def _is_dtype(value):
    try:
        np.dtype(value)
    except TypeError:
        return False
    return True
