"""Pure-NumPy float64 reference for the hierarchical VAE loss and its exact, hand-derived gradient.

This module is written from the mathematical specification only and is meant
to be used by the test-suite to check an independent (C) implementation.  It
favours clarity over speed: loops over levels and layers, no vectorisation
tricks, every intermediate kept in float64.

Model summary
-------------
``T`` levels, data ``x`` in ``R^D`` and latents ``z_i`` in ``R^{d_i}``,
``i = 1..T``, with ``z_0 = x_in``.

* Encoder ``i``: MLP ``z_{i-1} -> hidden_dims[i-1] -> 2*d_i`` giving
  ``(mu_i, logvar_i)``; ``z_i = mu_i + exp(0.5*logvar_i) * eps_i``
  (or ``z_i = mu_i`` in deterministic mode).
* Decoder ``i``: MLP ``z_i -> reversed(hidden_dims[i-1]) -> out`` where
  ``out`` is the likelihood parameters of ``x`` (width ``D`` or ``2*D``) for
  ``i = 1`` and, for ``i >= 2``, the parameters of ``p(z_{i-1} | z_i)``:
  ``zhat_{i-1}`` (width ``d_{i-1}``, ``p = N(zhat, I)``) with
  ``prior_variance="unit"``, or ``[m, s]`` (width ``2*d_{i-1}``,
  ``p = N(m, diag exp(s))``) with ``prior_variance="learned"``.
  ``p(z_T) = N(0, I)`` in both cases.
* Loss ``= mean_b(rec_b + beta * sum_i kl_{i,b})``.

Parameters live in one flat vector: all encoders (level 1..T, layer by layer,
weight then bias) followed by all decoders in the same order; weights have
the ``torch.nn.Linear`` shape ``(out, in)`` and are stored row-major.

Top-down (ladder) inference, ``inference="top_down"`` (DESIGN.md section 6)
--------------------------------------------------------------------------
* Deterministic bottom-up pass: ``d_0 = x_in``; the hidden layers of encoder
  ``i`` map ``d_{i-1}`` to ``d_i`` (the activation of its last hidden layer,
  so every level needs at least one hidden layer) and its output layer maps
  ``d_i`` to ``(mu^_i, logvar^_i)``.  Encoder ``i``'s first weight is
  ``(h, width of d_{i-1})``.
* Decoders exactly as bottom-up; decoder ``i >= 2`` gives ``(m_{i-1}, s_{i-1})``
  (``s = 0`` under ``prior_variance="unit"``).
* ``q(z_T | x) = N(mu^_T, exp(logvar^_T))``; for ``i = T-1..1``, with
  ``(m_i, s_i) = dec_{i+1}(z_{i+1})``: ``prec = exp(-logvar^_i) + exp(-s_i)``,
  ``var_q = 1/prec``, ``mu_q = (mu^_i exp(-logvar^_i) + m_i exp(-s_i)) var_q``,
  ``z_i = mu_q + sqrt(var_q) eps_i``.
* KL terms: ``KL(q(z_T|x) || N(0, I))``; for ``i < T`` ``KL(N(mu_q, var_q) ||
  N(m_i, e^{s_i}))`` in closed form (``kl="analytic"``) or
  ``-log N(z_i; m_i, e^{s_i}) - H[N(mu_q, var_q)]`` (``kl="mc"``).

Free bits (both families): with ``free_bits = (lambda_1..lambda_T)`` the loss is
``mean_b rec_b + beta * sum_i max(lambda_i, mean_b kl_{i,b})``; level ``i``'s
term has zero gradient unless ``mean_b kl_{i,b} > lambda_i``.
"""

import numpy as np

LOG2PI = float(np.log(2.0 * np.pi))
LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_learned")
ACTIVATIONS = ("tanh", "relu", "leaky_relu")
KL_ESTIMATORS = ("analytic", "mc")
PRIOR_VARIANCES = ("unit", "learned")
INFERENCES = ("bottom_up", "top_down")
LEAKY_SLOPE = 0.01


# ---------------------------------------------------------------------------
# Parameter layout
# ---------------------------------------------------------------------------

def _encoder_widths(level, x_dim, latent_dims, hidden_dims, inference="bottom_up"):
    """Layer widths of encoder ``level`` (1-based), input first.

    Parameters
    ----------
    level : int
        Level index ``i`` in ``1..T``.
    x_dim : int
        Data dimension ``D``.
    latent_dims : sequence of int, length T
        Latent dimensions ``d_1..d_T``.
    hidden_dims : sequence of sequence of int, length T
        Hidden widths per level.
    inference : {"bottom_up", "top_down"}, optional
        Sets the input width for ``i >= 2``: ``d_{i-1}`` (the latent) for
        bottom-up, the last hidden width of level ``i-1`` for top-down.

    Returns
    -------
    list of int
        ``[in_dim, *hidden_dims[i-1], 2*d_i]``.
    """
    if level == 1:
        in_dim = x_dim
    elif inference == "top_down":
        in_dim = int(hidden_dims[level - 2][-1])
    else:
        in_dim = latent_dims[level - 2]
    return [in_dim] + [int(h) for h in hidden_dims[level - 1]] + [2 * latent_dims[level - 1]]


def _decoder_widths(level, x_dim, latent_dims, hidden_dims, likelihood,
                    prior_variance="unit"):
    """Layer widths of decoder ``level`` (1-based), input first.

    Parameters
    ----------
    level : int
        Level index ``i`` in ``1..T``.
    x_dim : int
        Data dimension ``D``.
    latent_dims : sequence of int, length T
        Latent dimensions ``d_1..d_T``.
    hidden_dims : sequence of sequence of int, length T
        Hidden widths per level (used reversed).
    likelihood : str
        One of ``LIKELIHOODS``; sets the output width of decoder 1.
    prior_variance : {"unit", "learned"}, optional
        Sets the output width of decoders ``i >= 2``: ``d_{i-1}`` for
        ``"unit"``, ``2*d_{i-1}`` (mean, then log-variance) for ``"learned"``.

    Returns
    -------
    list of int
        ``[d_i, *reversed(hidden_dims[i-1]), out_dim]``.
    """
    if level == 1:
        out_dim = 2 * x_dim if likelihood == "gaussian_learned" else x_dim
    elif prior_variance == "learned":
        out_dim = 2 * latent_dims[level - 2]
    else:
        out_dim = latent_dims[level - 2]
    hidden = [int(h) for h in hidden_dims[level - 1]][::-1]
    return [latent_dims[level - 1]] + hidden + [out_dim]


def _check_config(x_dim, latent_dims, hidden_dims, likelihood, activation=None, kl=None,
                  prior_variance="unit", inference="bottom_up"):
    """Validate the model configuration, raising ``ValueError`` if inconsistent."""
    if len(latent_dims) < 1:
        raise ValueError("need at least one level (latent_dims non-empty)")
    if len(hidden_dims) != len(latent_dims):
        raise ValueError("hidden_dims must have one entry per level")
    if x_dim < 1 or any(d < 1 for d in latent_dims):
        raise ValueError("dimensions must be positive")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}")
    if kl is not None and kl not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl estimator {kl!r}")
    if not isinstance(prior_variance, str) or prior_variance not in PRIOR_VARIANCES:
        raise ValueError(f"unknown prior_variance {prior_variance!r} "
                         f"(expected one of {PRIOR_VARIANCES})")
    if not isinstance(inference, str) or inference not in INFERENCES:
        raise ValueError(f"unknown inference {inference!r} (expected one of {INFERENCES})")
    if inference == "top_down":
        for i, h in enumerate(hidden_dims, start=1):
            if len(h) < 1:
                raise ValueError(f"hidden_dims: top-down inference needs at least one hidden "
                                 f"layer per level, level {i} has none")


def _check_free_bits(free_bits, T):
    """Validate ``free_bits`` (None, a number, or T numbers, each finite and >= 0).

    Returns
    -------
    None or list of float, length T
    """
    if free_bits is None:
        return None
    if isinstance(free_bits, (str, bytes)):
        raise TypeError(f"free_bits: expected None, a number or {T} numbers, "
                        f"got {free_bits!r}")
    try:
        values = list(free_bits)
    except TypeError:
        values = [free_bits] * T
    if len(values) != T:
        raise ValueError(f"free_bits: expected {T} values (one per level), got {len(values)}")
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer,
                                                                  np.floating)):
            raise TypeError(f"free_bits: expected numbers, got {v!r}")
        v = float(v)
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"free_bits: expected finite values >= 0, got {v!r}")
        out.append(v)
    return out


def param_shapes(x_dim, latent_dims, hidden_dims, likelihood, *, prior_variance="unit",
                 inference="bottom_up"):
    """Names and shapes of all parameters, in flat-vector layout order.

    Parameters
    ----------
    x_dim : int
        Data dimension ``D``.
    latent_dims : sequence of int, length T
        Latent dimensions ``d_1..d_T``.
    hidden_dims : sequence of sequence of int, length T
        ``hidden_dims[i-1]`` are the hidden widths of level ``i`` (may be empty).
    likelihood : {"bernoulli", "gaussian", "gaussian_learned"}
        Observation model; decoder 1 outputs ``2*D`` values for
        ``"gaussian_learned"`` and ``D`` otherwise.
    prior_variance : {"unit", "learned"}, optional
        Variance of ``p(z_{i-1} | z_i)``, ``i >= 2``; decoders ``2..T`` output
        ``d_{i-1}`` values for ``"unit"`` and ``2*d_{i-1}`` (mean, then
        log-variance) for ``"learned"``.  Decoder 1 is unaffected.
    inference : {"bottom_up", "top_down"}, optional
        Top-down: encoder ``i >= 2`` reads the last hidden activation of
        encoder ``i-1`` (not ``z_{i-1}``); every level needs a hidden layer.

    Returns
    -------
    list of (str, tuple of int)
        ``("enc{i}.{j}.weight", (out, in))``, ``("enc{i}.{j}.bias", (out,))``
        for every layer ``j`` of every encoder ``i = 1..T``, then the same for
        the decoders ``"dec{i}.{j}.*"``.
    """
    _check_config(x_dim, latent_dims, hidden_dims, likelihood, prior_variance=prior_variance,
                  inference=inference)
    T = len(latent_dims)
    shapes = []
    for i in range(1, T + 1):
        w = _encoder_widths(i, x_dim, latent_dims, hidden_dims, inference)
        for j in range(len(w) - 1):
            shapes.append((f"enc{i}.{j}.weight", (w[j + 1], w[j])))
            shapes.append((f"enc{i}.{j}.bias", (w[j + 1],)))
    for i in range(1, T + 1):
        w = _decoder_widths(i, x_dim, latent_dims, hidden_dims, likelihood, prior_variance)
        for j in range(len(w) - 1):
            shapes.append((f"dec{i}.{j}.weight", (w[j + 1], w[j])))
            shapes.append((f"dec{i}.{j}.bias", (w[j + 1],)))
    return shapes


def num_params(shapes):
    """Total number of scalars described by ``shapes`` (list of (name, shape))."""
    return int(sum(int(np.prod(s)) for _, s in shapes))


def unflatten(flat, shapes):
    """Split a flat parameter vector into named arrays.

    Parameters
    ----------
    flat : ndarray, shape (P,)
        Flat parameter vector; if it is a contiguous ndarray the returned
        arrays are views into it (writing to them writes into ``flat``).
    shapes : list of (str, tuple of int)
        Layout as returned by :func:`param_shapes`.

    Returns
    -------
    dict of str -> ndarray
        ``name -> array of the given shape``.
    """
    flat = np.asarray(flat)
    if flat.ndim != 1 or flat.size != num_params(shapes):
        raise ValueError(f"flat vector has size {flat.size}, expected {num_params(shapes)}")
    out = {}
    offset = 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        out[name] = flat[offset:offset + n].reshape(shape)
        offset += n
    return out


def flatten(params, shapes):
    """Concatenate named arrays into a flat float64 vector in layout order.

    Parameters
    ----------
    params : dict of str -> array_like
        Arrays with the shapes given in ``shapes``.
    shapes : list of (str, tuple of int)
        Layout as returned by :func:`param_shapes`.

    Returns
    -------
    ndarray, shape (P,)
        Row-major concatenation of all arrays.
    """
    parts = []
    for name, shape in shapes:
        a = np.asarray(params[name], dtype=np.float64)
        if a.shape != tuple(shape):
            raise ValueError(f"{name}: shape {a.shape}, expected {tuple(shape)}")
        parts.append(a.reshape(-1))
    if not parts:
        return np.zeros(0)
    return np.concatenate(parts)


# ---------------------------------------------------------------------------
# Elementary pieces
# ---------------------------------------------------------------------------

def _act(a, activation):
    """Apply the activation elementwise to pre-activations ``a`` (any shape)."""
    if activation == "tanh":
        return np.tanh(a)
    if activation == "relu":
        return np.where(a > 0, a, 0.0)
    if activation == "leaky_relu":
        return np.where(a > 0, a, LEAKY_SLOPE * a)
    raise ValueError(f"unknown activation {activation!r}")


def _act_grad(a, activation):
    """Derivative of the activation w.r.t. its pre-activation ``a`` (same shape)."""
    if activation == "tanh":
        t = np.tanh(a)
        return 1.0 - t * t
    if activation == "relu":
        return np.where(a > 0, 1.0, 0.0)
    if activation == "leaky_relu":
        return np.where(a > 0, 1.0, LEAKY_SLOPE)
    raise ValueError(f"unknown activation {activation!r}")


def _sigmoid(l):
    """Numerically stable logistic function, ``exp(-softplus(-l))``."""
    return np.exp(-np.logaddexp(0.0, -l))


def _kl_diag_to_unit(mu, logvar, prior_mean):
    """Analytic ``KL(N(mu, diag exp(logvar)) || N(prior_mean, I))``.

    Parameters
    ----------
    mu, logvar : ndarray, shape (B, d)
        Posterior mean and log-variance.
    prior_mean : ndarray or float, broadcastable to (B, d)
        Mean of the unit-variance prior (0 for the top level).

    Returns
    -------
    ndarray, shape (B,)
        ``0.5 * sum(( mu - m)^2 + exp(logvar) - 1 - logvar)``.
    """
    r = mu - prior_mean
    return 0.5 * np.sum(r * r + np.exp(logvar) - 1.0 - logvar, axis=-1)


def _kl_diag_to_diag(mu, logvar, prior_mean, prior_logvar):
    """Analytic ``KL(N(mu, diag exp(logvar)) || N(prior_mean, diag exp(prior_logvar)))``.

    Parameters
    ----------
    mu, logvar : ndarray, shape (B, d)
        Posterior mean and log-variance.
    prior_mean, prior_logvar : ndarray, shape (B, d)
        Prior mean ``m`` and log-variance ``s``.

    Returns
    -------
    ndarray, shape (B,)
        ``0.5 * sum(s - logvar + (exp(logvar) + (mu - m)^2) * exp(-s) - 1)``,
        summed in an order that reproduces :func:`_kl_diag_to_unit` bit for
        bit when ``s == 0``.
    """
    r = mu - prior_mean
    inv_var = np.exp(-prior_logvar)
    return 0.5 * np.sum(r * r * inv_var + np.exp(logvar) * inv_var - 1.0 - logvar
                        + prior_logvar, axis=-1)


def _log_normal_unit(z, mean):
    """``log N(z; mean, I)`` summed over the last axis, shape (B,)."""
    r = z - mean
    d = z.shape[-1]
    return -0.5 * np.sum(r * r, axis=-1) - 0.5 * d * LOG2PI


def _log_normal_diag(z, mu, logvar):
    """``log N(z; mu, diag exp(logvar))`` summed over the last axis, shape (B,)."""
    r = z - mu
    return -0.5 * np.sum(LOG2PI + logvar + r * r * np.exp(-logvar), axis=-1)


def _mlp_forward(p, prefix, n_layers, h, activation):
    """Run an MLP, keeping what backprop needs.

    Parameters
    ----------
    p : dict of str -> ndarray
        Named parameters (see :func:`unflatten`).
    prefix : str
        ``"enc{i}"`` or ``"dec{i}"``.
    n_layers : int
        Number of linear layers; all but the last are followed by the activation.
    h : ndarray, shape (B, in)
        Input.
    activation : str
        Hidden activation name.

    Returns
    -------
    out : ndarray, shape (B, out)
        Output of the last linear layer (no activation).
    cache : list of (ndarray, ndarray)
        Per layer ``(layer_input (B, in_j), pre_activation (B, out_j))``.
    """
    cache = []
    for j in range(n_layers):
        W = p[f"{prefix}.{j}.weight"]
        b = p[f"{prefix}.{j}.bias"]
        a = h @ W.T + b
        cache.append((h, a))
        h = a if j == n_layers - 1 else _act(a, activation)
    return h, cache


def _mlp_backward(p, g, prefix, cache, dout, activation, dlast_input=None):
    """Backpropagate through an MLP run by :func:`_mlp_forward`.

    Parameters
    ----------
    p : dict of str -> ndarray
        Named parameters.
    g : dict of str -> ndarray
        Named gradient arrays (views of the flat gradient); accumulated into.
    prefix : str
        ``"enc{i}"`` or ``"dec{i}"``.
    cache : list of (ndarray, ndarray)
        As returned by :func:`_mlp_forward`.
    dout : ndarray, shape (B, out)
        Gradient of the loss w.r.t. the MLP output.
    activation : str
        Hidden activation name.
    dlast_input : ndarray, shape (B, in of the last layer), optional
        Extra gradient w.r.t. the input of the last linear layer (the last
        hidden activation), added before backpropagating further; used for
        the top-down chain, whose ``d_i`` also feeds encoder ``i+1``.

    Returns
    -------
    ndarray, shape (B, in)
        Gradient of the loss w.r.t. the MLP input.
    """
    n_layers = len(cache)
    dh = dout
    for j in reversed(range(n_layers)):
        h_in, a = cache[j]
        if j == n_layers - 1:
            da = dh
        else:
            da = dh * _act_grad(a, activation)
        W = p[f"{prefix}.{j}.weight"]
        g[f"{prefix}.{j}.weight"] += da.T @ h_in
        g[f"{prefix}.{j}.bias"] += np.sum(da, axis=0)
        dh = da @ W
        if j == n_layers - 1 and dlast_input is not None:
            dh = dh + dlast_input
    return dh


def _reconstruction(x_params, target, likelihood):
    """Per-example ``-log p(x | z_1)`` and its gradient w.r.t. ``x_params``.

    Parameters
    ----------
    x_params : ndarray, shape (B, D) or (B, 2D)
        Decoder-1 output: logits, mean, or ``[mean, logvar]``.
    target : ndarray, shape (B, D)
        Data ``x`` being reconstructed.
    likelihood : str
        One of ``LIKELIHOODS``.

    Returns
    -------
    rec : ndarray, shape (B,)
        Negative log-likelihood in nats (constants included).
    drec : ndarray, same shape as ``x_params``
        ``d rec_b / d x_params_b`` for each example ``b`` (not averaged).
    """
    D = target.shape[1]
    if likelihood == "bernoulli":
        l = x_params
        rec = np.sum(np.logaddexp(0.0, l) - target * l, axis=1)
        drec = _sigmoid(l) - target
    elif likelihood == "gaussian":
        r = target - x_params
        rec = 0.5 * np.sum(r * r, axis=1) + 0.5 * D * LOG2PI
        drec = -r
    elif likelihood == "gaussian_learned":
        m = x_params[:, :D]
        s = x_params[:, D:]
        r = target - m
        inv_var = np.exp(-s)
        rec = 0.5 * np.sum(LOG2PI + s + r * r * inv_var, axis=1)
        drec = np.concatenate([-r * inv_var, 0.5 * (1.0 - r * r * inv_var)], axis=1)
    else:
        raise ValueError(f"unknown likelihood {likelihood!r}")
    return rec, drec


# ---------------------------------------------------------------------------
# Forward pass
# ---------------------------------------------------------------------------

def _free_bits_loss(rec, kls, beta, free_bits):
    """Loss and per-level KL weights (1 or 0) under free bits.

    Returns
    -------
    loss : float
        ``mean_b rec_b + beta * sum_i K_i``; ``K_i = mean_b kl_{i,b}``, or
        ``max(lambda_i, mean_b kl_{i,b})`` with free bits.  Without free bits
        it is computed as ``mean_b(rec_b + beta * sum_i kl_{i,b})``.
    active : list of float, length T
        1.0 where level ``i``'s KL term carries a gradient
        (``mean_b kl_{i,b} > lambda_i``, or no free bits), else 0.0.
    """
    T = len(kls)
    if free_bits is None:
        return float(np.mean(rec + beta * sum(kls))), [1.0] * T
    means = [float(np.mean(k)) for k in kls]
    active = [1.0 if means[i] > free_bits[i] else 0.0 for i in range(T)]
    terms = [max(free_bits[i], means[i]) for i in range(T)]
    return float(np.mean(rec)) + beta * sum(terms), active


def _check_eps(eps, B, latent_dims):
    """``eps`` as T float64 arrays of shapes (B, d_i); ValueError otherwise."""
    T = len(latent_dims)
    if eps is None or len(eps) != T:
        raise ValueError("eps must be a list of T arrays")
    eps = [np.asarray(e, dtype=np.float64) for e in eps]
    for i in range(T):
        if eps[i].shape != (B, latent_dims[i]):
            raise ValueError(f"eps[{i}] has shape {eps[i].shape}, "
                             f"expected {(B, latent_dims[i])}")
    return eps


def _forward_impl(params, x_in, target, eps, x_dim, latent_dims, hidden_dims,
                  likelihood, activation, kl, deterministic, beta, prior_variance,
                  inference="bottom_up", free_bits=None):
    """Forward pass returning the public result dict plus a backprop cache."""
    _check_config(x_dim, latent_dims, hidden_dims, likelihood, activation, kl, prior_variance,
                  inference)
    latent_dims = [int(d) for d in latent_dims]
    T = len(latent_dims)
    free_bits = _check_free_bits(free_bits, T)
    if inference == "top_down":
        if deterministic:
            raise ValueError("deterministic: not defined for top-down inference")
        return _forward_topdown(params, x_in, target, eps, x_dim, latent_dims, hidden_dims,
                                likelihood, activation, kl, beta, prior_variance, free_bits)
    learned = prior_variance == "learned"
    shapes = param_shapes(x_dim, latent_dims, hidden_dims, likelihood,
                          prior_variance=prior_variance)
    params = np.ascontiguousarray(np.asarray(params, dtype=np.float64))
    p = unflatten(params, shapes)

    x_in = np.asarray(x_in, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if x_in.ndim != 2 or x_in.shape[1] != x_dim or target.shape != x_in.shape:
        raise ValueError("x_in and target must both have shape (B, x_dim)")
    B = x_in.shape[0]
    if deterministic:
        eps = [None] * T
    else:
        eps = _check_eps(eps, B, latent_dims)

    # Encoders, bottom-up: z_0 = x_in, z_i sampled from q(z_i | z_{i-1}).
    mus, logvars, zs, enc_caches = [], [], [], []
    h = x_in
    for i in range(T):
        level = i + 1
        d = latent_dims[i]
        n_layers = len(_encoder_widths(level, x_dim, latent_dims, hidden_dims)) - 1
        out, cache = _mlp_forward(p, f"enc{level}", n_layers, h, activation)
        mu = out[:, :d].copy()
        lv = out[:, d:].copy()
        if deterministic:
            z = mu.copy()
        else:
            z = mu + np.exp(0.5 * lv) * eps[i]
        mus.append(mu)
        logvars.append(lv)
        zs.append(z)
        enc_caches.append(cache)
        h = z

    # Decoders: decoder i maps z_i to the parameters of p(z_{i-1} | z_i)
    # (i >= 2) or x_params (i = 1).  zhats[i] (0-based) is the prior mean of
    # z_{i+1} (1-based), from decoder i+2; prior_lvs[i] its log-variance
    # (second half of that decoder's output) under "learned", None under "unit".
    dec_outs, dec_caches = [], []
    for i in range(T):
        level = i + 1
        n_layers = len(_decoder_widths(level, x_dim, latent_dims, hidden_dims, likelihood,
                                       prior_variance)) - 1
        out, cache = _mlp_forward(p, f"dec{level}", n_layers, zs[i], activation)
        dec_outs.append(out)
        dec_caches.append(cache)
    x_params = dec_outs[0]
    if learned:
        zhats = [dec_outs[i + 1][:, :latent_dims[i]].copy() for i in range(T - 1)]
        prior_lvs = [dec_outs[i + 1][:, latent_dims[i]:].copy() for i in range(T - 1)]
    else:
        zhats = [dec_outs[i + 1] for i in range(T - 1)]
        prior_lvs = [None] * (T - 1)

    rec, drec = _reconstruction(x_params, target, likelihood)

    kls = []
    for i in range(T):
        d = latent_dims[i]
        top = i == T - 1
        if deterministic:
            if top:
                kls.append(np.zeros(B))
            elif learned:
                # -log N(mu_i; m, diag exp(s))
                kls.append(-_log_normal_diag(mus[i], zhats[i], prior_lvs[i]))
            else:
                r = mus[i] - zhats[i]
                kls.append(0.5 * np.sum(r * r, axis=1) + 0.5 * d * LOG2PI)
        elif top:
            kls.append(_kl_diag_to_unit(mus[i], logvars[i], 0.0))
        elif kl == "analytic":
            if learned:
                kls.append(_kl_diag_to_diag(mus[i], logvars[i], zhats[i], prior_lvs[i]))
            else:
                kls.append(_kl_diag_to_unit(mus[i], logvars[i], zhats[i]))
        else:  # "mc": -log p(z_i | z_{i+1}) - H(q(z_i | z_{i-1})), the log(2 pi) cancel
            r = zs[i] - zhats[i]
            if learned:
                s = prior_lvs[i]
                kls.append(0.5 * np.sum(r * r * np.exp(-s) - 1.0 - logvars[i] + s, axis=1))
            else:
                kls.append(0.5 * np.sum(r * r - 1.0 - logvars[i], axis=1))

    loss, active = _free_bits_loss(rec, kls, beta, free_bits)

    if deterministic:
        log_weight = None
    else:
        log_p = -rec + _log_normal_unit(zs[T - 1], 0.0)
        for i in range(T - 1):
            if learned:
                log_p = log_p + _log_normal_diag(zs[i], zhats[i], prior_lvs[i])
            else:
                log_p = log_p + _log_normal_unit(zs[i], zhats[i])
        log_q = np.zeros(B)
        for i in range(T):
            log_q = log_q + _log_normal_diag(zs[i], mus[i], logvars[i])
        log_weight = log_p - log_q

    result = {
        "loss": loss,
        "reconstruction": rec,
        "kl": kls,
        "log_weight": log_weight,
        "mu": mus,
        "logvar": logvars,
        "z": zs,
        "x_params": x_params,
        "prior_mean": zhats,
        "prior_logvar": prior_lvs,
    }
    cache = {
        "p": p, "shapes": shapes, "B": B, "T": T, "eps": eps, "zhats": zhats,
        "prior_lvs": prior_lvs, "learned": learned, "drec": drec, "enc_caches": enc_caches,
        "dec_caches": dec_caches,
        "latent_dims": latent_dims, "active": active,
    }
    return result, cache


def _forward_topdown(params, x_in, target, eps, x_dim, latent_dims, hidden_dims,
                     likelihood, activation, kl, beta, prior_variance, free_bits):
    """Top-down (ladder) forward pass (DESIGN.md section 6): result dict and backprop cache."""
    T = len(latent_dims)
    learned = prior_variance == "learned"
    shapes = param_shapes(x_dim, latent_dims, hidden_dims, likelihood,
                          prior_variance=prior_variance, inference="top_down")
    params = np.ascontiguousarray(np.asarray(params, dtype=np.float64))
    p = unflatten(params, shapes)

    x_in = np.asarray(x_in, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if x_in.ndim != 2 or x_in.shape[1] != x_dim or target.shape != x_in.shape:
        raise ValueError("x_in and target must both have shape (B, x_dim)")
    B = x_in.shape[0]
    eps = _check_eps(eps, B, latent_dims)

    # Deterministic bottom-up pass: d_0 = x_in; encoder i maps d_{i-1} through
    # its hidden layers to d_i (the input of its output layer, cache[-1][0])
    # and on to [mu^_i, logvar^_i].
    mu_hat, lv_hat, enc_caches = [], [], []
    h = x_in
    for i in range(T):
        level = i + 1
        d = latent_dims[i]
        n_layers = len(_encoder_widths(level, x_dim, latent_dims, hidden_dims, "top_down")) - 1
        out, cache = _mlp_forward(p, f"enc{level}", n_layers, h, activation)
        mu_hat.append(out[:, :d].copy())
        lv_hat.append(out[:, d:].copy())
        enc_caches.append(cache)
        h = cache[-1][0]  # d_{level}

    # Top-down: z_T from q(z_T | x); then z_i from the precision-weighted merge
    # of (mu^_i, logvar^_i) with the prior (m_i, s_i) = dec_{i+1}(z_{i+1}).
    mus = [None] * T      # mu_q
    logvars = [None] * T  # log var_q
    zs = [None] * T
    prior_means = [None] * (T - 1)
    prior_lvs = [None] * (T - 1)   # s_i (zeros under "unit")
    merge = [None] * (T - 1)       # (ra, rb): exp(-logvar^) var_q, exp(-s) var_q
    dec_outs = [None] * T
    dec_caches = [None] * T
    mus[T - 1] = mu_hat[T - 1]
    logvars[T - 1] = lv_hat[T - 1]
    zs[T - 1] = mu_hat[T - 1] + np.exp(0.5 * lv_hat[T - 1]) * eps[T - 1]
    for i in reversed(range(T)):
        level = i + 1
        n_layers = len(_decoder_widths(level, x_dim, latent_dims, hidden_dims, likelihood,
                                       prior_variance)) - 1
        out, cache = _mlp_forward(p, f"dec{level}", n_layers, zs[i], activation)
        dec_outs[i] = out
        dec_caches[i] = cache
        if i == 0:
            break
        d = latent_dims[i - 1]
        m = out[:, :d].copy()
        s = out[:, d:].copy() if learned else np.zeros_like(m)
        prior_means[i - 1] = m
        prior_lvs[i - 1] = s
        a = np.exp(-lv_hat[i - 1])
        b = np.exp(-s)
        prec = a + b
        var_q = 1.0 / prec
        mu_q = (mu_hat[i - 1] * a + m * b) * var_q
        mus[i - 1] = mu_q
        logvars[i - 1] = -np.log(prec)
        merge[i - 1] = (a * var_q, b * var_q)
        zs[i - 1] = mu_q + np.sqrt(var_q) * eps[i - 1]
    x_params = dec_outs[0]

    rec, drec = _reconstruction(x_params, target, likelihood)

    kls = []
    for i in range(T):
        if i == T - 1:
            kls.append(_kl_diag_to_unit(mus[i], logvars[i], 0.0))
        elif kl == "analytic":
            kls.append(_kl_diag_to_diag(mus[i], logvars[i], prior_means[i], prior_lvs[i]))
        else:  # "mc": -log N(z_i; m_i, e^s_i) - H(N(mu_q, var_q)), the log(2 pi) cancel
            r = zs[i] - prior_means[i]
            s = prior_lvs[i]
            kls.append(0.5 * np.sum(r * r * np.exp(-s) - 1.0 - logvars[i] + s, axis=1))

    loss, active = _free_bits_loss(rec, kls, beta, free_bits)

    log_p = -rec + _log_normal_unit(zs[T - 1], 0.0)
    for i in range(T - 1):
        log_p = log_p + _log_normal_diag(zs[i], prior_means[i], prior_lvs[i])
    log_q = np.zeros(B)
    for i in range(T):
        log_q = log_q + _log_normal_diag(zs[i], mus[i], logvars[i])
    log_weight = log_p - log_q

    result = {
        "loss": loss,
        "reconstruction": rec,
        "kl": kls,
        "log_weight": log_weight,
        "mu": mus,
        "logvar": logvars,
        "z": zs,
        "x_params": x_params,
        "prior_mean": prior_means,
        "prior_logvar": prior_lvs if learned else [None] * (T - 1),
        "mu_hat": mu_hat,
        "logvar_hat": lv_hat,
    }
    cache = {
        "p": p, "shapes": shapes, "B": B, "T": T, "eps": eps, "learned": learned,
        "drec": drec, "enc_caches": enc_caches, "dec_caches": dec_caches,
        "latent_dims": latent_dims, "active": active, "merge": merge,
        "prior_means": prior_means, "prior_lvs": prior_lvs,
        "mu_hat": mu_hat, "lv_hat": lv_hat,
    }
    return result, cache


def forward(params, x_in, target, eps, *, x_dim, latent_dims, hidden_dims,
            likelihood, activation, kl, deterministic=False, beta=1.0,
            prior_variance="unit", inference="bottom_up", free_bits=None):
    """Hierarchical VAE forward pass and loss.

    Parameters
    ----------
    params : ndarray, shape (P,)
        Flat parameter vector in the :func:`param_shapes` layout.
    x_in : ndarray, shape (B, D)
        Encoder input ``z_0``.
    target : ndarray, shape (B, D)
        Reconstruction target ``x`` (equals ``x_in`` unless denoising).
    eps : list of T ndarrays, shapes (B, d_i), or None
        Standard-normal noise for the reparameterization; ignored (may be
        ``None``) when ``deterministic``.
    x_dim : int
        ``D``.
    latent_dims : sequence of int, length T
        ``d_1..d_T``.
    hidden_dims : sequence of sequence of int, length T
        Hidden widths per level.
    likelihood : {"bernoulli", "gaussian", "gaussian_learned"}
    activation : {"tanh", "relu", "leaky_relu"}
    kl : {"analytic", "mc"}
        Estimator of the KL terms of levels ``i < T`` (level ``T`` is always
        analytic).
    deterministic : bool, optional
        Autoencoder mode: ``z_i = mu_i``, logvar outputs unused.
    beta : float, optional
        Weight of the KL terms.
    prior_variance : {"unit", "learned"}, optional
        ``p(z_i | z_{i+1})`` for ``i < T``: ``N(zhat_i, I)`` (``"unit"``) or
        ``N(m_i, diag exp(s_i))`` with ``[m_i, s_i]`` the output of decoder
        ``i+1`` (``"learned"``).  Under ``"learned"`` the term of level
        ``i < T`` is ``KL(q || N(m, e^s))`` in closed form (analytic),
        ``-log N(z_i; m, e^s) - H(q)`` (mc), or ``-log N(mu_i; m, e^s)``
        (deterministic), and ``log_weight`` uses ``log N(z_i; m, e^s)``.
    inference : {"bottom_up", "top_down"}, optional
        ``"top_down"``: the ladder chain of the module docstring (every level
        needs a hidden layer; ``deterministic=True`` raises ``ValueError``).
    free_bits : None, float or sequence of T floats, optional
        Free-bits floors ``lambda_i`` in nats: the loss is
        ``mean_b rec_b + beta * sum_i max(lambda_i, mean_b kl_{i,b})``.  The
        returned ``"kl"`` terms are unaffected.

    Returns
    -------
    dict
        ``"loss"`` : float, ``mean_b(rec + beta * sum_i kl_i)``;
        ``"reconstruction"`` : ndarray (B,);
        ``"kl"`` : list of T ndarrays (B,), level 1 first;
        ``"log_weight"`` : ndarray (B,) ``log p(x,z) - log q(z|x)``, or None
        when ``deterministic``;
        ``"mu"``, ``"logvar"``, ``"z"`` : lists of T ndarrays (B, d_i);
        ``"x_params"`` : ndarray (B, D) or (B, 2D), decoder-1 output;
        ``"prior_mean"`` : list of T-1 ndarrays (B, d_i), the mean of
        ``p(z_i | z_{i+1})`` (``zhat_i`` or ``m_i``), level 1 first;
        ``"prior_logvar"`` : list of T-1 entries, the log-variance ``s_i``
        (ndarray (B, d_i)) under ``"learned"``, None under ``"unit"``.

        For top-down, ``"mu"`` / ``"logvar"`` are those of ``q``: ``mu_q`` and
        ``log var_q`` for ``i < T``, ``mu^_T`` and ``logvar^_T`` at ``T``;
        ``"mu_hat"`` / ``"logvar_hat"`` (lists of T) are the encoders'
        ``mu^_i`` / ``logvar^_i``; ``"prior_mean"`` is ``m_i`` from decoder
        ``i+1`` at the sampled ``z_{i+1}``.
    """
    result, _ = _forward_impl(params, x_in, target, eps, x_dim, latent_dims, hidden_dims,
                              likelihood, activation, kl, deterministic, float(beta),
                              prior_variance, inference, free_bits)
    return result


# ---------------------------------------------------------------------------
# Backward pass
# ---------------------------------------------------------------------------

def loss_and_grad(params, x_in, target, eps, *, x_dim, latent_dims, hidden_dims,
                  likelihood, activation, kl, deterministic=False, beta=1.0,
                  prior_variance="unit", inference="bottom_up", free_bits=None):
    """Loss and its exact gradient by manual backpropagation.

    Parameters
    ----------
    params, x_in, target, eps, x_dim, latent_dims, hidden_dims, likelihood,
    activation, kl, deterministic, beta, prior_variance, inference, free_bits
        As in :func:`forward`.

    Returns
    -------
    loss : float
        Same value as ``forward(...)["loss"]``.
    grad : ndarray, shape (P,)
        ``d loss / d params`` in the flat layout.

    Notes
    -----
    With ``c = beta / B`` the per-example output gradients are:

    * reconstruction: ``d rec / d x_params`` divided by ``B``;
    * top level (stochastic): ``dmu_T += c*mu_T``,
      ``dlv_T += c*0.5*(exp(lv_T) - 1)``;
    * level ``i < T``, analytic: ``r = mu_i - zhat_i``, ``dmu_i += c*r``,
      ``dzhat_i -= c*r``, ``dlv_i += c*0.5*(exp(lv_i) - 1)``;
    * level ``i < T``, mc: ``r = z_i - zhat_i``, ``dz_i += c*r``,
      ``dzhat_i -= c*r``, ``dlv_i -= 0.5*c``;
    * level ``i < T``, deterministic: ``r = mu_i - zhat_i`` with
      ``z_i = mu_i``, ``dz_i += c*r``, ``dzhat_i -= c*r``.

    With ``prior_variance="learned"`` the prior of level ``i < T`` is
    ``N(m_i, diag exp(s_i))``; with ``w = exp(-s_i)``:

    * analytic: ``r = mu_i - m_i``, ``dmu_i += c*r*w``, ``dm_i -= c*r*w``,
      ``dlv_i += c*0.5*(exp(lv_i)*w - 1)``,
      ``ds_i += c*0.5*(1 - (exp(lv_i) + r^2)*w)``;
    * mc: ``r = z_i - m_i``, ``dz_i += c*r*w``, ``dm_i -= c*r*w``,
      ``ds_i += c*0.5*(1 - r^2*w)``, ``dlv_i -= 0.5*c``;
    * deterministic: ``r = mu_i - m_i`` with ``z_i = mu_i``,
      ``dz_i += c*r*w``, ``dm_i -= c*r*w``, ``ds_i += c*0.5*(1 - r^2*w)``.

    The decoders are then backpropagated (``dzhat_{i-1}``, ``[dm_{i-1},
    ds_{i-1}]`` or ``dx_params`` into decoder ``i`` gives a contribution to
    ``dz_i``).  Finally the
    encoders are processed top-down so that ``dz_i`` is complete (kl term,
    decoder ``i`` and encoder ``i+1`` input) before it is pushed through the
    reparameterization: ``dmu_i += dz_i``,
    ``dlv_i += dz_i * eps_i * 0.5*exp(0.5*lv_i)`` (no ``dlv`` in
    deterministic mode).

    Free bits multiply ``c`` of level ``i`` by 0 when that level is under its
    floor (``mean_b kl_{i,b} <= lambda_i``).  The top-down backward is
    :func:`_backward_topdown`.
    """
    beta = float(beta)
    result, cache = _forward_impl(params, x_in, target, eps, x_dim, latent_dims, hidden_dims,
                                  likelihood, activation, kl, deterministic, beta,
                                  prior_variance, inference, free_bits)
    if inference == "top_down":
        return result["loss"], _backward_topdown(result, cache, kl, beta, activation)
    p = cache["p"]
    shapes = cache["shapes"]
    B = cache["B"]
    T = cache["T"]
    eps = cache["eps"]
    zhats = cache["zhats"]
    prior_lvs = cache["prior_lvs"]
    learned = cache["learned"]
    mus, logvars, zs = result["mu"], result["logvar"], result["z"]

    grad = np.zeros(num_params(shapes))
    g = unflatten(grad, shapes)  # views into grad

    c = beta / B
    dmu = [np.zeros_like(m) for m in mus]
    dlv = [np.zeros_like(m) for m in mus]
    dz = [np.zeros_like(m) for m in mus]
    dzhat = [np.zeros_like(zh) for zh in zhats]
    dprior_lv = [None if s is None else np.zeros_like(s) for s in prior_lvs]

    # KL terms (c of a level under its free-bits floor is 0).
    c_all = c
    for i in range(T):
        c = c_all * cache["active"][i]
        top = i == T - 1
        if learned and not top:
            # prior N(m, diag exp(s)), m = zhats[i], s = prior_lvs[i]
            w = np.exp(-prior_lvs[i])
            if deterministic:
                r = mus[i] - zhats[i]
                dz[i] += c * r * w
                dzhat[i] -= c * r * w
                dprior_lv[i] += c * 0.5 * (1.0 - r * r * w)
            elif kl == "analytic":
                r = mus[i] - zhats[i]
                e = np.exp(logvars[i])
                dmu[i] += c * r * w
                dzhat[i] -= c * r * w
                dlv[i] += c * 0.5 * (e * w - 1.0)
                dprior_lv[i] += c * 0.5 * (1.0 - (e + r * r) * w)
            else:  # "mc"
                r = zs[i] - zhats[i]
                dz[i] += c * r * w
                dzhat[i] -= c * r * w
                dprior_lv[i] += c * 0.5 * (1.0 - r * r * w)
                dlv[i] += -0.5 * c
        elif deterministic:
            if not top:
                r = mus[i] - zhats[i]
                dz[i] += c * r
                dzhat[i] -= c * r
        elif top:
            dmu[i] += c * mus[i]
            dlv[i] += c * 0.5 * (np.exp(logvars[i]) - 1.0)
        elif kl == "analytic":
            r = mus[i] - zhats[i]
            dmu[i] += c * r
            dzhat[i] -= c * r
            dlv[i] += c * 0.5 * (np.exp(logvars[i]) - 1.0)
        else:  # "mc"
            r = zs[i] - zhats[i]
            dz[i] += c * r
            dzhat[i] -= c * r
            dlv[i] += -0.5 * c

    # Reconstruction term.
    dx_params = cache["drec"] / B

    # Decoders: decoder level i+1 (0-based i) takes z_i.
    for i in range(T):
        if i == 0:
            dout = dx_params
        elif learned:
            dout = np.concatenate([dzhat[i - 1], dprior_lv[i - 1]], axis=1)
        else:
            dout = dzhat[i - 1]
        dz[i] += _mlp_backward(p, g, f"dec{i + 1}", cache["dec_caches"][i], dout, activation)

    # Encoders, top-down; z_i also feeds encoder i+1 (processed before it).
    for i in reversed(range(T)):
        dmu[i] += dz[i]
        if not deterministic:
            dlv[i] += dz[i] * eps[i] * 0.5 * np.exp(0.5 * logvars[i])
        dout = np.concatenate([dmu[i], dlv[i]], axis=1)
        dinp = _mlp_backward(p, g, f"enc{i + 1}", cache["enc_caches"][i], dout, activation)
        if i > 0:
            dz[i - 1] += dinp

    return result["loss"], grad


def _backward_topdown(result, cache, kl, beta, activation):
    """Hand-derived gradient of the top-down loss (flat layout).

    Notation per level ``i < T``: ``a = exp(-logvar^)``, ``b = exp(-s)``,
    ``v = var_q = 1/(a + b)``, ``ra = a v``, ``rb = b v`` (``ra + rb = 1``).
    The merge ``mu_q = (mu^ a + m b) v``, ``log var_q = -log(a + b)`` has

    * ``d mu_q / d mu^ = ra``, ``d mu_q / d m = rb``,
    * ``d mu_q / d logvar^ = ra (mu_q - mu^)``, ``d mu_q / d s = rb (mu_q - m)``,
    * ``d log var_q / d logvar^ = ra``, ``d log var_q / d s = rb``.

    With ``c_i = beta / B`` (0 under a free-bits floor), ``w = exp(-s)``:

    * top level: ``dmu^_T += c mu^_T``, ``dlogvar^_T += c 0.5 (exp(logvar^_T) - 1)``;
    * analytic, ``r = mu_q - m``: ``dmu_q += c r w``, ``dm -= c r w``,
      ``dlv_q += c 0.5 (var_q w - 1)``, ``ds += c 0.5 (1 - (var_q + r^2) w)``;
    * mc, ``r = z - m``: ``dz += c r w``, ``dm -= c r w``,
      ``dlv_q -= 0.5 c``, ``ds += c 0.5 (1 - r^2 w)``.

    The reparameterization gives ``dmu_q += dz``,
    ``dlv_q += dz eps 0.5 exp(0.5 lv_q)``.  Levels are processed bottom-up
    (``z_1`` first: its gradient comes from decoder 1 and its KL term; the
    merge then gives ``dm_1, ds_1`` which decoder 2 turns into a part of
    ``dz_2``, and so on); ``ds`` is dropped under ``prior_variance="unit"``
    (``s = 0`` is a constant).  Finally the encoders are backpropagated from
    ``T`` down to 1, encoder ``i+1``'s input gradient joining encoder ``i``
    at its last hidden activation ``d_i``.
    """
    p = cache["p"]
    shapes = cache["shapes"]
    B = cache["B"]
    T = cache["T"]
    eps = cache["eps"]
    learned = cache["learned"]
    mus, logvars, zs = result["mu"], result["logvar"], result["z"]
    m_, s_ = cache["prior_means"], cache["prior_lvs"]
    mu_hat, lv_hat = cache["mu_hat"], cache["lv_hat"]

    grad = np.zeros(num_params(shapes))
    g = unflatten(grad, shapes)

    dmu_hat = [np.zeros_like(x) for x in mu_hat]
    dlv_hat = [np.zeros_like(x) for x in mu_hat]
    dz = [np.zeros_like(x) for x in zs]

    # Reconstruction: decoder 1 takes z_1.
    dz[0] += _mlp_backward(p, g, "dec1", cache["dec_caches"][0], cache["drec"] / B, activation)

    for i in range(T):
        c = beta / B * cache["active"][i]
        if i == T - 1:
            dmu_hat[i] += c * mu_hat[i] + dz[i]
            dlv_hat[i] += (c * 0.5 * (np.exp(lv_hat[i]) - 1.0)
                           + dz[i] * eps[i] * 0.5 * np.exp(0.5 * lv_hat[i]))
            break
        m, s = m_[i], s_[i]
        w = np.exp(-s)
        dmu_q = np.zeros_like(mus[i])
        dlv_q = np.zeros_like(mus[i])
        dm = np.zeros_like(m)
        ds = np.zeros_like(m)
        if kl == "analytic":
            r = mus[i] - m
            var_q = np.exp(logvars[i])
            dmu_q += c * r * w
            dm -= c * r * w
            dlv_q += c * 0.5 * (var_q * w - 1.0)
            ds += c * 0.5 * (1.0 - (var_q + r * r) * w)
        else:  # "mc"
            r = zs[i] - m
            dz[i] += c * r * w
            dm -= c * r * w
            dlv_q += -0.5 * c
            ds += c * 0.5 * (1.0 - r * r * w)
        # reparameterization z = mu_q + exp(0.5 lv_q) eps
        dmu_q += dz[i]
        dlv_q += dz[i] * eps[i] * 0.5 * np.exp(0.5 * logvars[i])
        # precision-weighted merge
        ra, rb = cache["merge"][i]
        dmu_hat[i] += dmu_q * ra
        dlv_hat[i] += dmu_q * ra * (mus[i] - mu_hat[i]) + dlv_q * ra
        dm += dmu_q * rb
        ds += dmu_q * rb * (mus[i] - m) + dlv_q * rb
        dout = np.concatenate([dm, ds], axis=1) if learned else dm
        dz[i + 1] += _mlp_backward(p, g, f"dec{i + 2}", cache["dec_caches"][i + 1], dout,
                                   activation)

    # Encoders, top level first: encoder i+1 reads d_i, the input of encoder i's
    # output layer.
    dtap = None
    for i in reversed(range(T)):
        dout = np.concatenate([dmu_hat[i], dlv_hat[i]], axis=1)
        dtap = _mlp_backward(p, g, f"enc{i + 1}", cache["enc_caches"][i], dout, activation,
                             dlast_input=dtap)
    return grad
