"""Pure-NumPy float64 reference for the importance-weighted objective (DESIGN.md section 7).

Written from the math, not from csrc/; built on the model twin in tests/reference.py (its
forward pass, MLP backward and parameter layout are imported, not copied).

Objective
---------
k samples per example, eps row ``b*k + j`` = sample ``j`` of example ``b``:

    log w_bj = log p(x_b | z_bj) + beta * (log p(z_bj) - log q(z_bj | x_b)),

every term evaluated at the samples (including the top level's ``log N(z_T; 0, I)``; the model's
``kl`` estimator plays no part), and

    loss = -mean_b log (1/k) sum_j w_bj.

Gradients
---------
* ``"standard"``: ``-(1/B) sum_bj w~_bj d log w_bj / d params``, ``w~_b = softmax_j log w_bj``.
* ``"dreg"`` (Tucker et al. 2018, T = 1): decoder blocks as standard; encoder blocks
  ``-(1/B) sum_bj c_bj (d log w_bj / d z_bj)(d z_bj / d phi)``, where ``d log w / d z`` holds
  q's parameters fixed inside ``log q`` (``d log q(z) / dz = -(z - mu) / sigma^2``) and
  ``c = w~ ((1 - beta) + beta w~)``.

Derivation of ``c``. With ``z_j = z(eps_j, phi)``, the total derivative of ``L = log (1/k)
sum_j w_j`` is ``sum_j w~_j [(d log w_j/dz_j)(dz_j/dphi) - beta d_phi log q_phi(z_j)]``, the
second part the explicit (score) dependence of ``log q`` on phi.  Its expectation, for each
``j`` with the other samples fixed, is ``-beta E_{z_j ~ q}[w~_j d_phi log q(z_j)]`` and, by the
reparameterization identity ``E_q[f(z) d_phi log q(z)] = E_eps[(df/dz)(dz/dphi)]`` applied to
``f = w~_j`` (a function of ``z_j`` through ``log w_j`` with phi fixed), equals
``-beta E[(dw~_j/dz_j)(dz_j/dphi)]`` with ``dw~_j/dz_j = w~_j (1 - w~_j) d log w_j/dz_j``.  So
the encoder gradient of ``E[L]`` is ``E[sum_j (w~_j - beta w~_j (1 - w~_j)) (d log w_j/dz_j)
(dz_j/dphi)]`` and ``w~ - beta w~ (1 - w~) = w~ ((1 - beta) + beta w~)``: ``w~^2`` at beta = 1.

The gradient of ``sum_r u_r log w_r`` for arbitrary per-row weights ``u`` is
:func:`log_weight_and_grad` (both inference families); the objective's gradients are that at
``u = -w~/B`` (standard) and, for the DReG encoder blocks, at ``u = -c/B`` with ``stop_q``.
"""

import numpy as np

import reference as ref

GRADIENTS = ("standard", "dreg")


def _check_k(k):
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k: expected an integer >= 1, got {k!r}")
    return int(k)


def _forward_rows(params, x_rows, target_rows, eps, cfg):
    """The model twin's forward pass on expanded rows (one row per sample): result and cache.

    ``kl`` is irrelevant to the log weights; "analytic" is passed only because the twin needs
    a value.
    """
    return ref._forward_impl(params, x_rows, target_rows, eps, cfg["x_dim"],
                             cfg["latent_dims"], cfg["hidden_dims"], cfg["likelihood"],
                             cfg["activation"], "analytic", False, 1.0,
                             cfg.get("prior_variance", "unit"),
                             cfg.get("inference", "bottom_up"), None)


def _log_densities(result, cache, inference):
    """Per-row ``log p(x | z_1)``, ``log p(z)`` and ``log q(z | x)`` at the samples, each (R,)."""
    T = len(result["z"])
    zs, mus, lvs = result["z"], result["mu"], result["logvar"]
    log_px = -result["reconstruction"]
    log_pz = ref._log_normal_unit(zs[T - 1], 0.0)
    for i in range(T - 1):
        m = result["prior_mean"][i]
        if inference == "top_down":
            s = cache["prior_lvs"][i]           # zeros under "unit"
        else:
            s = result["prior_logvar"][i]       # None under "unit"
        if s is None:
            log_pz = log_pz + ref._log_normal_unit(zs[i], m)
        else:
            log_pz = log_pz + ref._log_normal_diag(zs[i], m, s)
    log_qz = np.zeros_like(log_px)
    for i in range(T):
        log_qz = log_qz + ref._log_normal_diag(zs[i], mus[i], lvs[i])
    return log_px, log_pz, log_qz


def log_weight_and_grad(params, x_rows, eps, row_weight=None, *, target_rows=None, beta=1.0,
                        stop_q=False, x_dim, latent_dims, hidden_dims, likelihood, activation,
                        prior_variance="unit", inference="bottom_up", kl=None):
    """Per-row log importance weights at ``beta`` and the gradient of their weighted sum.

    Parameters
    ----------
    params : ndarray, shape (P,)
        Flat parameters in the :func:`reference.param_shapes` layout.
    x_rows : ndarray, shape (R, D)
        One row per sample (an example repeated for each of its samples).
    eps : list of T ndarrays, shapes (R, d_i)
    row_weight : ndarray, shape (R,), optional
        ``u_r``; when None only the log weights are returned (grad None).
    target_rows : ndarray, shape (R, D), optional
        What the likelihood scores (default ``x_rows``).
    beta : float
        ``log w = log p(x|z) + beta (log p(z) - log q(z|x))``.
    stop_q : bool
        Hold q's parameters fixed inside ``log q`` (drop its partial derivatives with respect to
        q's mean and log-variance, keep the one with respect to ``z``): the DReG path gradient.
    x_dim, latent_dims, hidden_dims, likelihood, activation, prior_variance, inference
        As in :func:`reference.forward`; ``kl`` is accepted and ignored.

    Returns
    -------
    log_w : ndarray, shape (R,)
    grad : ndarray, shape (P,) or None
        ``d/d params sum_r u_r log w_r`` (z reparameterized, eps fixed).
    parts : dict
        ``"log_px"``, ``"log_pz"``, ``"log_qz"`` (R,) and the twin's forward ``"result"``.
    """
    beta = float(beta)
    cfg = dict(x_dim=x_dim, latent_dims=[int(d) for d in latent_dims], hidden_dims=hidden_dims,
               likelihood=likelihood, activation=activation, prior_variance=prior_variance,
               inference=inference)
    x_rows = np.asarray(x_rows, dtype=np.float64)
    target_rows = x_rows if target_rows is None else np.asarray(target_rows, dtype=np.float64)
    result, cache = _forward_rows(params, x_rows, target_rows, eps, cfg)
    log_px, log_pz, log_qz = _log_densities(result, cache, inference)
    log_w = log_px + beta * (log_pz - log_qz)
    parts = {"log_px": log_px, "log_pz": log_pz, "log_qz": log_qz, "result": result}
    if row_weight is None:
        return log_w, None, parts
    u = np.asarray(row_weight, dtype=np.float64).reshape(-1, 1)
    if u.shape[0] != x_rows.shape[0]:
        raise ValueError(f"row_weight: expected {x_rows.shape[0]} values, got {u.shape[0]}")
    if inference == "top_down":
        grad = _grad_topdown(result, cache, u, beta, stop_q, activation)
    else:
        grad = _grad_bottomup(result, cache, u, beta, stop_q, activation)
    return log_w, grad, parts


def _log_q_partials(z, mu, lv, ub, stop_q):
    """Gradient of ``-beta u log N(z; mu, e^lv)`` (``ub = beta u``) w.r.t. z, mu, lv.

    With ``rho = z - mu``, ``v = e^-lv``: ``d/dz = ub rho v``, ``d/dmu = -ub rho v``,
    ``d/dlv = ub 0.5 (1 - rho^2 v)``; the last two are zero under ``stop_q``.
    """
    rho = z - mu
    v = np.exp(-lv)
    dz = ub * rho * v
    if stop_q:
        return dz, 0.0, 0.0
    return dz, -ub * rho * v, ub * 0.5 * (1.0 - rho * rho * v)


def _grad_bottomup(result, cache, u, beta, stop_q, activation):
    """``d/d params sum_r u_r log w_r`` for the bottom-up chain (see the module docstring).

    Per row, with ``ub = beta u``:

    * ``log p(x|z_1)``: ``dx_params = -u drec`` (``drec = d rec / d x_params``);
    * top prior ``log N(z_T; 0, I)``: ``dz_T += -ub z_T``;
    * ``log p(z_i | z_{i+1})``, ``r = z_i - m``, ``w = e^-s`` (``w = 1``, no ``s`` under
      "unit"): ``dz_i += -ub r w``, ``dm += ub r w``, ``ds += -ub 0.5 (1 - r^2 w)``;
    * ``-log q``: :func:`_log_q_partials`;

    then decoders, and the encoders top-down through ``z = mu + e^{lv/2} eps``.
    """
    p, shapes, T, eps = cache["p"], cache["shapes"], cache["T"], cache["eps"]
    learned = cache["learned"]
    mus, lvs, zs = result["mu"], result["logvar"], result["z"]
    zhats, prior_lvs = cache["zhats"], cache["prior_lvs"]
    grad = np.zeros(ref.num_params(shapes))
    g = ref.unflatten(grad, shapes)
    ub = beta * u

    dmu = [np.zeros_like(m) for m in mus]
    dlv = [np.zeros_like(m) for m in mus]
    dz = [np.zeros_like(m) for m in mus]
    dm = [np.zeros_like(m) for m in zhats]
    ds = [np.zeros_like(m) for m in zhats]

    dz[T - 1] += -ub * zs[T - 1]
    for i in range(T - 1):
        r = zs[i] - zhats[i]
        w = np.exp(-prior_lvs[i]) if learned else 1.0
        dz[i] += -ub * r * w
        dm[i] += ub * r * w
        if learned:
            ds[i] += -ub * 0.5 * (1.0 - r * r * w)
    for i in range(T):
        a, b, c = _log_q_partials(zs[i], mus[i], lvs[i], ub, stop_q)
        dz[i] += a
        dmu[i] += b
        dlv[i] += c

    dx_params = -u * cache["drec"]
    for i in range(T):
        if i == 0:
            dout = dx_params
        elif learned:
            dout = np.concatenate([dm[i - 1], ds[i - 1]], axis=1)
        else:
            dout = dm[i - 1]
        dz[i] += ref._mlp_backward(p, g, f"dec{i + 1}", cache["dec_caches"][i], dout, activation)

    for i in reversed(range(T)):
        dmu[i] += dz[i]
        dlv[i] += dz[i] * eps[i] * 0.5 * np.exp(0.5 * lvs[i])
        dout = np.concatenate([dmu[i], dlv[i]], axis=1)
        dinp = ref._mlp_backward(p, g, f"enc{i + 1}", cache["enc_caches"][i], dout, activation)
        if i > 0:
            dz[i - 1] += dinp
    return grad


def _grad_topdown(result, cache, u, beta, stop_q, activation):
    """``d/d params sum_r u_r log w_r`` for the top-down chain.

    The same per-row partials as :func:`_grad_bottomup` (q's mean and log-variance are the
    merged ``mu_q``, ``log var_q`` below the top, ``mu^_T``, ``logvar^_T`` at it), pushed through
    the reparameterization and the precision-weighted merge (its derivatives are listed in
    :func:`reference._backward_topdown`), levels processed bottom-up, then the encoders from the
    top, encoder ``i+1``'s input gradient joining encoder ``i`` at ``d_i``.
    """
    p, shapes, T, eps = cache["p"], cache["shapes"], cache["T"], cache["eps"]
    learned = cache["learned"]
    mus, lvs, zs = result["mu"], result["logvar"], result["z"]
    m_, s_ = cache["prior_means"], cache["prior_lvs"]
    mu_hat, lv_hat = cache["mu_hat"], cache["lv_hat"]
    grad = np.zeros(ref.num_params(shapes))
    g = ref.unflatten(grad, shapes)
    ub = beta * u

    dmu_hat = [np.zeros_like(x) for x in mu_hat]
    dlv_hat = [np.zeros_like(x) for x in mu_hat]
    dz = [np.zeros_like(x) for x in zs]

    dz[0] += ref._mlp_backward(p, g, "dec1", cache["dec_caches"][0], -u * cache["drec"],
                               activation)
    for i in range(T):
        dqz, dmu_q, dlv_q = _log_q_partials(zs[i], mus[i], lvs[i], ub, stop_q)
        dz[i] += dqz
        if i == T - 1:
            dz[i] += -ub * zs[i]
            dmu_hat[i] += dmu_q + dz[i]
            dlv_hat[i] += dlv_q + dz[i] * eps[i] * 0.5 * np.exp(0.5 * lv_hat[i])
            break
        m, s = m_[i], s_[i]
        r = zs[i] - m
        w = np.exp(-s)
        dz[i] += -ub * r * w
        dm = ub * r * w
        ds = -ub * 0.5 * (1.0 - r * r * w)
        dmu_q = dmu_q + dz[i]
        dlv_q = dlv_q + dz[i] * eps[i] * 0.5 * np.exp(0.5 * lvs[i])
        ra, rb = cache["merge"][i]
        dmu_hat[i] += dmu_q * ra
        dlv_hat[i] += dmu_q * ra * (mus[i] - mu_hat[i]) + dlv_q * ra
        dm = dm + dmu_q * rb
        ds = ds + dmu_q * rb * (mus[i] - m) + dlv_q * rb
        dout = np.concatenate([dm, ds], axis=1) if learned else dm
        dz[i + 1] += ref._mlp_backward(p, g, f"dec{i + 2}", cache["dec_caches"][i + 1], dout,
                                       activation)

    dtap = None
    for i in reversed(range(T)):
        dout = np.concatenate([dmu_hat[i], dlv_hat[i]], axis=1)
        dtap = ref._mlp_backward(p, g, f"enc{i + 1}", cache["enc_caches"][i], dout, activation,
                                 dlast_input=dtap)
    return grad


def softmax_rows(a):
    """Row-wise softmax of a (B, k) array, stable."""
    a = a - np.max(a, axis=1, keepdims=True)
    e = np.exp(a)
    return e / np.sum(e, axis=1, keepdims=True)


def log_mean_exp_rows(a):
    """Row-wise ``log mean exp`` of a (B, k) array, stable."""
    m = np.max(a, axis=1, keepdims=True)
    return (np.log(np.mean(np.exp(a - m), axis=1, keepdims=True)) + m)[:, 0]


def dreg_coefficients(wt, beta):
    """``c = w~ ((1 - beta) + beta w~)`` (see the module docstring), same shape as ``wt``."""
    return wt * ((1.0 - beta) + beta * wt)


def encoder_mask(shapes):
    """Boolean (P,) mask of the encoder (``enc*``) entries of the flat layout."""
    return np.concatenate([np.full(int(np.prod(s)), name.startswith("enc"))
                           for name, s in shapes])


def iwae(params, x, eps, *, k, gradient="standard", beta=1.0, target=None, x_dim, latent_dims,
         hidden_dims, likelihood, activation, prior_variance="unit", inference="bottom_up",
         kl=None, with_grad=True, _coefficients=None):
    """IWAE loss, its gradient and the per-row log weights.

    Parameters
    ----------
    params : ndarray, shape (P,)
    x : ndarray, shape (B, D)
        Examples (not repeated).
    eps : list of T ndarrays, shapes (B*k, d_i)
        Row ``b*k + j``: sample ``j`` of example ``b``.
    k : int
        Samples per example.
    gradient : {"standard", "dreg"}
        "dreg" is defined for T = 1 only (ValueError naming ``gradient`` otherwise).
    beta : float
    target : ndarray, shape (B, D), optional
    x_dim, latent_dims, hidden_dims, likelihood, activation, prior_variance, inference
        The model (``kl`` accepted and ignored: every term is at the samples).
    with_grad : bool
        False: loss and log weights only (grad None).
    _coefficients : callable, optional
        Test hook: ``(w~, beta) -> c`` replacing :func:`dreg_coefficients`.

    Returns
    -------
    loss : float
        ``-mean_b log (1/k) sum_j w_bj``.
    grad : ndarray, shape (P,) or None
    log_w : ndarray, shape (B*k,)
        At ``beta``.
    """
    k = _check_k(k)
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient: expected one of {GRADIENTS}, got {gradient!r}")
    T = len(latent_dims)
    if gradient == "dreg" and T != 1:
        raise ValueError(f"gradient: 'dreg' is defined for T = 1, got T = {T}")
    x = np.asarray(x, dtype=np.float64)
    B = x.shape[0]
    eps = [np.asarray(e, dtype=np.float64) for e in eps]
    for i, e in enumerate(eps):
        if e.shape[0] != B * k:
            raise ValueError(f"eps[{i}]: expected {B * k} rows (B*k), got {e.shape[0]}")
    x_rows = np.repeat(x, k, axis=0)
    t_rows = None if target is None else np.repeat(np.asarray(target, np.float64), k, axis=0)
    model = dict(x_dim=x_dim, latent_dims=latent_dims, hidden_dims=hidden_dims,
                 likelihood=likelihood, activation=activation, prior_variance=prior_variance,
                 inference=inference)
    log_w, _, _ = log_weight_and_grad(params, x_rows, eps, None, target_rows=t_rows, beta=beta,
                                      **model)
    lw = log_w.reshape(B, k)
    loss = float(-np.mean(log_mean_exp_rows(lw)))
    if not with_grad:
        return loss, None, log_w
    wt = softmax_rows(lw)
    _, grad, _ = log_weight_and_grad(params, x_rows, eps, -(wt / B).ravel(), target_rows=t_rows,
                                     beta=beta, **model)
    if gradient == "dreg":
        c = (_coefficients or dreg_coefficients)(wt, float(beta))
        _, g_path, _ = log_weight_and_grad(params, x_rows, eps, -(c / B).ravel(),
                                           target_rows=t_rows, beta=beta, stop_q=True, **model)
        shapes = ref.param_shapes(x_dim, latent_dims, hidden_dims, likelihood,
                                  prior_variance=prior_variance, inference=inference)
        enc = encoder_mask(shapes)
        grad = grad.copy()
        grad[enc] = g_path[enc]
    return loss, grad, log_w
