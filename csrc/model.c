/* model.c - the T-level model over one flat parameter buffer: forward (per-example loss terms,
 * log-weights), backward (exact gradient of the batch-mean loss), the inference and generative
 * chains alone; the bottom-up inference chain here, the top-down one in topdown.c (sharing the
 * buffers, MLPs and loss terms of this file); the k samples of an importance-weighted call
 * share what they can through iwae.c. Generic in `real`; compiled through f32.c and f64.c
 * after layers.c, sparse.c and iwae.c, before topdown.c.
 *
 * Levels are 1-based in the math and 0-based in arrays: level i lives at index i-1.
 */
#include <limits.h>
#include <string.h>

#include "hvae.h"
#include "real.h"

/* The workspace carved into named activation buffers (all row-major, batch first). */
typedef struct {
    real *enc[HVAE_MAX_LEVELS][HVAE_MAX_HIDDEN + 1];  /* layer outputs of encoder i, (B, out) */
    real *dec[HVAE_MAX_LEVELS][HVAE_MAX_HIDDEN + 1];  /* layer outputs of decoder i, (B, out) */
    real *z[HVAE_MAX_LEVELS];                         /* (B, d_i) */
    real *denc[HVAE_MAX_LEVELS][HVAE_MAX_HIDDEN + 1]; /* their gradients, same shapes */
    real *ddec[HVAE_MAX_LEVELS][HVAE_MAX_HIDDEN + 1];
    real *dz[HVAE_MAX_LEVELS];
    real *q[HVAE_MAX_LEVELS];  /* [mu, logvar] of q(z_i | .), (B, 2 d_i): encoder i's output, or
                                * top-down below the top the merge's own buffer */
    real *dq[HVAE_MAX_LEVELS]; /* their gradients */
    real *grads;       /* start of the gradient half */
    real *iw;          /* (B,): the importance weights of the rows (IWAE), or scratch */
    F(sparse_x) sx;    /* x's nonzeros for encoder 1's first layer (sparse.c) */
} F(buffers);

/* The buffers of a call over B rows (every level), of which n_x rows of x (B / samples per
 * example): encoder 1 (bottom-up) or every encoder (top-down) runs on the first n_x rows of its
 * buffers, and the sparse first layer is sized by n_x. */
static hvae_status F(carve)(F(buffers) *bf, hvae_workspace *ws, const hvae_model *m, int B,
                            int n_x) {
    hvae_status st = hvae_workspace_reserve(ws, hvae_workspace_bytes(m, B, sizeof(real)));
    if (st != HVAE_OK) return st;
    real *p = (real *)ws->buf;
    size_t half = m->act_per_example * (size_t)B;
    for (int i = 0; i < m->cfg.n_levels; i++) {
        for (int j = 0; j < m->enc[i].n_layers; j++) {
            bf->enc[i][j] = p;
            bf->denc[i][j] = p + half;
            p += (size_t)B * m->enc[i].layer[j].out;
        }
        for (int j = 0; j < m->dec[i].n_layers; j++) {
            bf->dec[i][j] = p;
            bf->ddec[i][j] = p + half;
            p += (size_t)B * m->dec[i].layer[j].out;
        }
        bf->z[i] = p;
        bf->dz[i] = p + half;
        p += (size_t)B * m->cfg.z_dim[i];
        const hvae_mlp *enc = &m->enc[i];
        bf->q[i] = bf->enc[i][enc->n_layers - 1];
        bf->dq[i] = bf->denc[i][enc->n_layers - 1];
        if (m->cfg.inference == HVAE_TOP_DOWN && i < m->cfg.n_levels - 1) {
            bf->q[i] = p;
            bf->dq[i] = p + half;
            p += (size_t)B * 2 * m->cfg.z_dim[i];
        }
    }
    bf->grads = (real *)ws->buf + half;
    bf->iw = (real *)ws->buf + 2 * half;
    /* then the sparse first layer's buffers, as hvae_workspace_bytes counts them for B rows */
    F(sparse_x) *sx = &bf->sx;
    sx->cap = hvae_sparse_capacity(m, B) ? hvae_sparse_capacity(m, n_x) : 0;
    if (sx->cap) {
        const size_t D = (size_t)m->cfg.x_dim, O = (size_t)m->enc[0].layer[0].out;
        real *r = bf->iw + B;
        sx->wt = r;
        sx->dout = r + D * O;
        sx->val = sx->dout + (size_t)B * O;
        sx->cval = sx->val + sx->cap;
        int *ip = (int *)(sx->cval + sx->cap);
        sx->state = ip;
        sx->row_ptr = ip + 1;
        sx->col_ptr = sx->row_ptr + B + 1;
        sx->col_next = sx->col_ptr + D + 1;
        sx->idx = sx->col_next + D;
        sx->cidx = sx->idx + sx->cap;
    }
    return HVAE_OK;
}

static const real *F(last)(real *const *outs, const hvae_mlp *mlp) { return outs[mlp->n_layers - 1]; }

/* ------------------------------------------------------------------------------------------ */
/* an MLP: linear layers, the activation after every hidden one                                 */

/* outs[j] (B, out_j); in (B, in_0); sx: NULL, or the sparse buffers for a sparse `in` (x) */
static void F(mlp_forward)(real *const *outs, const hvae_mlp *mlp, const real *params,
                           const real *in, const F(sparse_x) *sx, int B, int act) {
    for (int j = 0; j < mlp->n_layers; j++) {
        const hvae_linear *l = &mlp->layer[j];
        const int layer_act = j < mlp->n_layers - 1 ? act : ACT_NONE;
        if (!(j == 0 && sx &&
              F(sparse_linear_forward)(outs[j], sx, in, params + l->weight, params + l->bias, B,
                                       l->in, l->out, layer_act)))
            F(linear_forward)(outs[j], in, params + l->weight, params + l->bias, B, l->in,
                              l->out, layer_act);
        in = outs[j];
    }
}

/* grad (P,) += (accumulate) or = (not), din (B, in_0) += or NULL; douts[last] holds d output,
 * the rest are overwritten, but for douts[last - 1] when hidden_acc: it holds a gradient of the
 * last hidden layer's output from elsewhere (top-down: the encoder above), added to; outs, in,
 * sx as in the forward (din NULL when the forward took the sparse kernels); grad_ok as in
 * linear_backward */
static void F(mlp_backward)(real *grad, real *din, int *grad_ok, real *const *douts,
                            real *const *outs, const hvae_mlp *mlp, const real *params,
                            const real *in, const F(sparse_x) *sx, int B, int act,
                            int accumulate, int hidden_acc) {
    for (int j = mlp->n_layers - 1; j >= 0; j--) {
        const hvae_linear *l = &mlp->layer[j];
        if (j == 0 && sx && sx->cap && *sx->state && !din) {
            F(sparse_linear_backward)(grad_ok, grad + l->weight, grad + l->bias, sx, douts[0], B,
                                      l->in, l->out, accumulate);
            continue;
        }
        /* d outs[j-1] through layer j, times the derivative of the activation that made it */
        const int din_acc = j == 0 || (hidden_acc && j == mlp->n_layers - 1);
        F(linear_backward)(j > 0 ? douts[j - 1] : din, grad_ok, grad + l->weight, grad + l->bias,
                           douts[j], j > 0 ? outs[j - 1] : in, params + l->weight, B, l->in,
                           l->out, accumulate, din_acc, j > 0 ? outs[j - 1] : NULL, act);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* the chains                                                                                   */

/* reparam_forward into z (dmulv NULL), or reparam_backward into dmulv, over the current team,
 * each part a range of rows. z, dz (B, d); mulv, dmulv (B, 2d); eps (B, d) or NULL. */
typedef struct {
    real *z, *dmulv;
    const real *dz, *mulv, *eps;
    int B, d;
} F(reparam_job);

static void F(reparam_part)(void *p, int part, int n_parts) {
    const F(reparam_job) *j = p;
    size_t lo, hi, d = (size_t)j->d;
    part_range((size_t)j->B, ALIGN_ROWS, part, n_parts, &lo, &hi);
    if (hi <= lo) return;
    const real *mulv = j->mulv + lo * 2 * d, *eps = j->eps ? j->eps + lo * d : NULL;
    if (j->dmulv)
        F(reparam_backward)(j->dmulv + lo * 2 * d, j->dz + lo * d, mulv, eps, (int)(hi - lo),
                            j->d);
    else
        F(reparam_forward)(j->z + lo * d, mulv, eps, (int)(hi - lo), j->d);
}

static void F(reparam_over_team)(F(reparam_job) *j) {
    hvae_team_run(team_for((double)j->B * j->d, (double)PAR_MIN_ELEMS), F(reparam_part), j);
}

/* Encoders 1..T with reparameterization over B rows; eps NULL (or a NULL entry) means
 * z_i = mu_i. Encoder 1 runs on the n_x rows of x, its output expanded to B / n_x rows each. */
static void F(encode_pass)(F(buffers) *bf, const hvae_model *m, const real *params, const real *x,
                           const real *const *eps, int B, int n_x) {
    const hvae_config *c = &m->cfg;
    const real *in = x;
    for (int i = 0; i < c->n_levels; i++) {
        F(mlp_forward)(bf->enc[i], &m->enc[i], params, in, i == 0 ? &bf->sx : NULL,
                       i == 0 ? n_x : B, c->activation);
        if (i == 0) F(rows_expand)(bf->q[0], n_x, B / n_x, 2 * c->z_dim[0]);
        F(reparam_job) rj = {bf->z[i], NULL, NULL, F(last)(bf->enc[i], &m->enc[i]),
                             eps ? eps[i] : NULL, B, c->z_dim[i]};
        F(reparam_over_team)(&rj);
        in = bf->z[i];
    }
}

/* Decoder i (0-based) on z_i: gives zhat_{i-1} (or x's parameters for i = 0). */
static const real *F(decoder)(F(buffers) *bf, const hvae_model *m, const real *params, int i,
                              const real *z, int B) {
    F(mlp_forward)(bf->dec[i], &m->dec[i], params, z, NULL, B, m->cfg.activation);
    return F(last)(bf->dec[i], &m->dec[i]);
}

/* dxp: NULL, or (Bernoulli only, see fuses_likelihood) where the gradient goes, written */
static void F(likelihood_forward)(real *acc, real *scratch, real *dxp, const hvae_config *c,
                                  const real *xp, const real *target, real scale, int B) {
    switch (c->likelihood) {
    case HVAE_BERNOULLI:
        F(bernoulli_nll_forward)(acc, dxp, xp, target, scale, B, c->x_dim);
        break;
    case HVAE_GAUSSIAN: F(gaussian_nll_forward)(acc, scratch, xp, target, B, c->x_dim); break;
    default: F(gaussian_learned_nll_forward)(acc, scratch, xp, target, B, c->x_dim); break;
    }
}

static void F(likelihood_backward)(real *dxp, const hvae_config *c, const real *xp,
                                   const real *target, real scale, int B) {
    switch (c->likelihood) {
    case HVAE_BERNOULLI: F(bernoulli_nll_backward)(dxp, xp, target, scale, B, c->x_dim); break;
    case HVAE_GAUSSIAN: F(gaussian_nll_backward)(dxp, NULL, xp, target, scale, B, c->x_dim); break;
    default: F(gaussian_learned_nll_backward)(dxp, NULL, xp, target, scale, B, c->x_dim); break;
    }
}

/* Does the forward of train_step give the likelihood's gradient too, from the same pass over
 * the decoder's output (sharing exp(-|l|))? For Bernoulli; the others leave it to the backward. */
static int F(fuses_likelihood)(const hvae_config *c) { return c->likelihood == HVAE_BERNOULLI; }

/* Either over the current team, each part a range of rows (an example's term is the same
 * whichever thread computes it): the forward when acc is given (scratch (B, D): rows [lo, hi)
 * use row lo), also writing the gradient into dxp when that is given (fuses_likelihood), else
 * the backward into dxp. Row r scores target row r / k (k samples per example). */
typedef struct {
    real *acc, *scratch, *dxp;
    const hvae_config *c;
    const real *xp, *target;
    real scale;
    int B, k;
} F(likelihood_job);

static void F(likelihood_part)(void *p, int part, int n_parts) {
    const F(likelihood_job) *j = p;
    size_t lo, hi, w = (size_t)hvae_x_params_dim(j->c), D = (size_t)j->c->x_dim;
    part_range((size_t)j->B, ALIGN_ROWS, part, n_parts, &lo, &hi);
    /* all of [lo, hi) at once when k = 1, else row by row (row r's target is row r / k) */
    for (size_t r0 = lo, r1; r0 < hi; r0 = r1) {
        r1 = j->k == 1 ? hi : r0 + 1;
        const real *xp = j->xp + r0 * w, *t = j->target + (r0 / (size_t)j->k) * D;
        if (j->acc)
            F(likelihood_forward)(j->acc + r0, j->scratch + lo * D,
                                  j->dxp ? j->dxp + r0 * w : NULL, j->c, xp, t, j->scale,
                                  (int)(r1 - r0));
        else
            F(likelihood_backward)(j->dxp + r0 * w, j->c, xp, t, j->scale, (int)(r1 - r0));
    }
}

static void F(likelihood_over_team)(F(likelihood_job) *j) {
    hvae_team_run(team_for((double)j->B * j->c->x_dim, (double)PAR_MIN_ELEMS),
                  F(likelihood_part), j);
}

/* Is p(z_i | z_{i+1}) (level i, 1-based) a learned-variance Gaussian? p(z_T) is N(0, I). */
static int F(learned_prior)(const hvae_config *c, int i) {
    return c->prior_var == HVAE_PRIOR_LEARNED && i < c->n_levels;
}

/* acc (B,) += -log p(z_i | z_{i+1}) at z (B,d); prior: zhat (B,d), [mean, logvar] (B,2d) when
 * learned, or NULL for N(0, I); scratch (d,) */
static void F(prior_nll_forward)(real *acc, real *scratch, const hvae_config *c, int i,
                                 const real *prior, const real *z, int B, int d) {
    if (F(learned_prior)(c, i))
        F(gaussian_learned_nll_forward)(acc, scratch, prior, z, B, d);
    else
        F(gaussian_nll_forward)(acc, scratch, prior, z, B, d);
}

/* dprior (same shape as prior) +=, dz (B,d) += or NULL */
static void F(prior_nll_backward)(real *dprior, real *dz, const hvae_config *c, int i,
                                  const real *prior, const real *z, real scale, int B, int d) {
    if (F(learned_prior)(c, i))
        F(gaussian_learned_nll_backward)(dprior, dz, prior, z, scale, B, d);
    else
        F(gaussian_nll_backward)(dprior, dz, prior, z, scale, B, d);
}

/* The KL part of the loss over the current team, each part a range of rows of every level (an
 * example's terms are the same whichever thread computes them): the forward into terms when
 * terms is given (scratch: rows [lo, hi) use row lo), else the backward into dmulv, dprior, dz.
 * Level i (1-based) reads mulv[i-1] (B, 2 d_i), prior[i] (the parameters of p(z_i | z_{i+1}),
 * NULL for N(0, I)) and z[i-1]. */
typedef struct {
    const hvae_config *c;
    real *terms, *scratch;
    real *dmulv[HVAE_MAX_LEVELS], *dprior[HVAE_MAX_LEVELS + 1], *dz[HVAE_MAX_LEVELS];
    const real *mulv[HVAE_MAX_LEVELS], *prior[HVAE_MAX_LEVELS + 1], *z[HVAE_MAX_LEVELS];
    real ks[HVAE_MAX_LEVELS]; /* d loss / d kl_b of each level */
    int B;
    int at_samples; /* backward: every level's term at the samples, -log p(z_i | .) + log q(z_i |
                     * .) (whose gradient in q's parameters is the negative entropy's), the top
                     * level's too (IWAE) */
} F(kl_job);

static void F(kl_part)(void *p, int part, int n_parts) {
    const F(kl_job) *j = p;
    const hvae_config *c = j->c;
    const int T = c->n_levels;
    size_t lo, hi;
    part_range((size_t)j->B, ALIGN_ROWS, part, n_parts, &lo, &hi);
    if (hi <= lo) return;
    const int n = (int)(hi - lo);
    for (int i = 1; i <= T; i++) {
        const size_t d = (size_t)c->z_dim[i - 1], w = F(learned_prior)(c, i) ? 2 * d : d;
        const real *mulv = j->mulv[i - 1] + lo * 2 * d, *z = j->z[i - 1] + lo * d;
        const real *prior = j->prior[i] ? j->prior[i] + lo * w : NULL;
        const int di = (int)d;
        if (j->terms) {
            real *kl = j->terms + (size_t)i * j->B + lo, *scratch = j->scratch + lo * d;
            if (c->deterministic) {
                if (i < T) F(prior_nll_forward)(kl, scratch, c, i, prior, z, n, di);
            } else if (c->kl == HVAE_KL_ANALYTIC && F(learned_prior)(c, i)) {
                F(gauss_kl_learned_forward)(kl, scratch, mulv, prior, n, di);
            } else if (c->kl == HVAE_KL_ANALYTIC || i == T) {
                F(gauss_kl_forward)(kl, scratch, mulv, prior, n, di);
            } else { /* mc: -log p(z_i | z_{i+1}) at the sample, minus the entropy of q */
                F(prior_nll_forward)(kl, scratch, c, i, prior, z, n, di);
                F(gauss_negentropy_forward)(kl, mulv, n, di);
            }
            continue;
        }
        real *dmulv = j->dmulv[i - 1] + lo * 2 * d, *dz = j->dz[i - 1] + lo * d;
        real *dprior = j->dprior[i] ? j->dprior[i] + lo * w : NULL;
        const real ks = j->ks[i - 1];
        if (ks == 0) continue; /* free bits: the level is under its floor */
        if (c->deterministic) {
            if (i < T) F(prior_nll_backward)(dprior, dz, c, i, prior, z, ks, n, di);
        } else if (j->at_samples) {
            F(prior_nll_backward)(dprior, dz, c, i, prior, z, ks, n, di);
            F(gauss_negentropy_backward)(dmulv, ks, n, di);
        } else if (c->kl == HVAE_KL_ANALYTIC && F(learned_prior)(c, i)) {
            F(gauss_kl_learned_backward)(dmulv, dprior, mulv, prior, ks, n, di);
        } else if (c->kl == HVAE_KL_ANALYTIC || i == T) {
            F(gauss_kl_backward)(dmulv, dprior, mulv, prior, ks, n, di);
        } else {
            F(prior_nll_backward)(dprior, dz, c, i, prior, z, ks, n, di);
            F(gauss_negentropy_backward)(dmulv, ks, n, di);
        }
    }
}

static void F(kl_over_team)(F(kl_job) *j) {
    size_t per = 0;
    for (int i = 0; i < j->c->n_levels; i++) per += (size_t)j->c->z_dim[i];
    hvae_team_run(team_for((double)j->B * per, (double)PAR_MIN_ELEMS), F(kl_part), j);
}

/* The top-down chain (topdown.c): the inference pass over B rows (n_x of x), which leaves z_i,
 * q(z_i | z_{i+1}, x) in bf->q and p(z_i | z_{i+1}) (decoders 2..T) in bf->dec; and its
 * backward once the loss terms have put their gradients into bf->dz, bf->dq and the decoders'
 * outputs. */
static void F(topdown_pass)(F(buffers) *bf, const hvae_model *m, const real *params,
                            const real *x, const real *const *eps, int B, int n_x);
static void F(topdown_backward)(real *grad, int *grad_ok, int accumulate, F(buffers) *bf,
                                const hvae_model *m, const real *params, const real *x,
                                const real *const *eps, int B, int n_x);

/* q: z_1 .. z_T by the model's inference chain over B rows, n_x of them of x; eps NULL means
 * the means */
static void F(inference_pass)(F(buffers) *bf, const hvae_model *m, const real *params,
                              const real *x, const real *const *eps, int B, int n_x) {
    if (m->cfg.inference == HVAE_TOP_DOWN)
        F(topdown_pass)(bf, m, params, x, eps, B, n_x);
    else
        F(encode_pass)(bf, m, params, x, eps, B, n_x);
}

/* ------------------------------------------------------------------------------------------ */
/* public entry points                                                                          */

/* The samples per example of an estimator (1 for the ELBO), or 0 when it is not valid for this
 * model and these arguments; n_x examples must give at most INT_MAX rows. */
static int F(samples_per_example)(const hvae_estimator *est, const hvae_config *c, int n_x,
                                  const void *free_bits) {
    if (!est) return 1;
    if ((unsigned)est->objective > HVAE_IWAE || (unsigned)est->gradient > HVAE_GRAD_DREG ||
        est->k < 1)
        return 0;
    if (est->objective == HVAE_ELBO) return est->k == 1 && est->gradient == HVAE_GRAD_STANDARD;
    if (c->deterministic || free_bits || (est->gradient == HVAE_GRAD_DREG && c->n_levels != 1))
        return 0;
    return (long long)n_x * est->k <= INT_MAX ? est->k : 0;
}

static int F(is_iwae)(const hvae_estimator *est) { return est && est->objective == HVAE_IWAE; }

/* hvae_forward over n_x examples; lik_done non-NULL (and fuses_likelihood, ELBO, no
 * log_weight): also the likelihood's gradient into the workspace, *lik_done = 1 then (0
 * otherwise), for backward_pass */
static hvae_status F(forward_pass)(real *terms, real *log_weight, real *loss, hvae_workspace *ws,
                                   const hvae_model *m, const real *params, const real *x,
                                   const real *target, const real *const *eps, int n_x, real beta,
                                   const real *free_bits, const hvae_estimator *est,
                                   int *lik_done) {
    const hvae_config *c = &m->cfg;
    const int T = c->n_levels, k = F(samples_per_example)(est, c, n_x, free_bits);
    const int iwae = F(is_iwae)(est), B = n_x * k;
    F(buffers) bf;
    if (n_x < 1 || k < 1 || (log_weight && c->deterministic) || (!eps && !c->deterministic))
        return HVAE_EINVAL;
    hvae_status st = F(carve)(&bf, ws, m, B, n_x);
    if (st != HVAE_OK) return st;
    if (c->deterministic) eps = NULL;

    F(inference_pass)(&bf, m, params, x, eps, B, n_x);
    /* p: zhat_{i-1} = dec_i(z_i) (top-down: computed by the inference pass for i >= 2), x's
     * parameters from dec_1(z_1); zhat[i]: the mean of p(z_i | z_{i+1}) (1-based), [mean, logvar]
     * when learned */
    const real *zhat[HVAE_MAX_LEVELS + 1];
    for (int i = 0; i < T; i++)
        zhat[i] = i == 0 || c->inference != HVAE_TOP_DOWN
                      ? F(decoder)(&bf, m, params, i, bf.z[i], B)
                      : F(last)(bf.dec[i], &m->dec[i]);
    zhat[T] = NULL; /* p(z_T) = N(0, I) */

    memset(terms, 0, sizeof(real) * (size_t)B * (T + 1));
    real *scratch = bf.grads; /* (B, max(D, d_i)): the gradient half is free during the forward */
    F(kl_job) kj = {.c = c, .terms = terms, .scratch = scratch, .B = B};
    for (int i = 1; i <= T; i++) {
        kj.mulv[i - 1] = bf.q[i - 1];
        kj.z[i - 1] = bf.z[i - 1];
        kj.prior[i] = zhat[i];
    }
    F(kl_over_team)(&kj);
    /* after the KL terms, whose scratch may overlap the gradient the likelihood then writes */
    real *dxp = lik_done && !log_weight && !iwae && F(fuses_likelihood)(c)
                    ? bf.ddec[0][m->dec[0].n_layers - 1] : NULL;
    if (lik_done) *lik_done = dxp != NULL;
    F(likelihood_job) lj = {terms, scratch, dxp, c, zhat[0], target, (real)1 / (real)B, B, k};
    F(likelihood_over_team)(&lj);
    double sum = 0;
    for (int b = 0; b < B; b++) {
        double klsum = 0;
        for (int i = 1; i <= T; i++) klsum += terms[(size_t)i * B + b];
        sum += terms[b] + (double)beta * klsum;
    }
    for (int i = 1; i <= T; i++) { /* the batch means, for free bits here and in the backward */
        double kl = 0;
        for (int b = 0; b < B; b++) kl += terms[(size_t)i * B + b];
        ws->kl_mean[i - 1] = kl / B;
    }
    if (free_bits) { /* rec + beta * sum_i max(free_bits_i, mean kl_i) */
        sum = 0;
        for (int b = 0; b < B; b++) sum += terms[b];
        sum /= B;
        for (int i = 0; i < T; i++)
            sum += (double)beta * fmax((double)free_bits[i], ws->kl_mean[i]);
        sum *= B;
    }
    *loss = (real)(sum / B);

    real *lw = log_weight ? log_weight : iwae ? bf.iw : NULL;
    if (lw) { /* -(log p(x,z) - log q(z|x)) accumulated, then negated */
        memcpy(lw, terms, sizeof(real) * (size_t)B);
        for (int i = 1; i <= T; i++) {
            F(prior_nll_forward)(lw, scratch, c, i, zhat[i], bf.z[i - 1], B, c->z_dim[i - 1]);
            F(gauss_logq_forward)(lw, scratch, bf.q[i - 1], eps[i - 1], B, c->z_dim[i - 1]);
        }
        for (int b = 0; b < B; b++) lw[b] = -lw[b];
    }
    if (iwae) /* the bound, and the weights for the backward */
        *loss = (real)F(iw_weights)(bf.iw, lw, terms, beta, n_x, k);
    return HVAE_OK;
}

hvae_status F(hvae_forward)(real *terms, real *log_weight, real *loss, hvae_workspace *ws,
                            const hvae_model *m, const real *params, const real *x,
                            const real *target, const real *const *eps, int batch, real beta,
                            const real *free_bits, const hvae_estimator *est) {
    return F(forward_pass)(terms, log_weight, loss, ws, m, params, x, target, eps, batch, beta,
                           free_bits, est, NULL);
}

/* The gradient buffers the backward adds into, set to zero: d z_i, d [mu_i, logvar_i] and d of
 * each decoder's output (the inner layers' gradients are overwritten), but for decoder 1's
 * output when the forward wrote its gradient (lik_done); top-down below the top also d q_i
 * after the merge and d d_i, which encoder i+1 passes down. */
static void F(zero_sums)(F(buffers) *bf, const hvae_model *m, int B, int lik_done) {
    F(zero_job) j = {.n_bufs = 0};
    const int T = m->cfg.n_levels, top_down = m->cfg.inference == HVAE_TOP_DOWN;
    for (int i = 0; i < T; i++) {
        const hvae_mlp *enc = &m->enc[i], *dec = &m->dec[i];
        const int n = enc->n_layers, below = top_down && i < T - 1;
        real *v[5] = {bf->dz[i], bf->denc[i][n - 1], bf->ddec[i][dec->n_layers - 1],
                      below ? bf->dq[i] : NULL, below ? bf->denc[i][n - 2] : NULL};
        int w[5] = {m->cfg.z_dim[i], enc->layer[n - 1].out, dec->layer[dec->n_layers - 1].out,
                    2 * m->cfg.z_dim[i], n > 1 ? enc->layer[n - 2].out : 0};
        for (int k = 0; k < 5; k++) {
            if ((k == 2 && i == 0 && lik_done) || !v[k]) continue;
            j.v[j.n_bufs] = v[k];
            j.n[j.n_bufs++] = (size_t)B * w[k];
        }
    }
    F(zero)(&j);
}

/* IWAE's standard gradient: every gradient the loss terms left (at unit scale per row) times
 * the row's normalised importance weight over n_x: d z_i, d q_i and each decoder's output. */
static void F(weigh_rows)(F(buffers) *bf, const hvae_model *m, int B, int n_x) {
    F(scale_job) j = {.n_bufs = 0, .B = B, .iw = bf->iw, .inv_n = (real)1 / (real)n_x};
    for (int i = 0; i < m->cfg.n_levels; i++) {
        const hvae_mlp *dec = &m->dec[i];
        real *v[3] = {bf->dz[i], bf->dq[i], bf->ddec[i][dec->n_layers - 1]};
        int w[3] = {m->cfg.z_dim[i], 2 * m->cfg.z_dim[i], dec->layer[dec->n_layers - 1].out};
        for (int q = 0; q < 3; q++) {
            j.v[j.n_bufs] = v[q];
            j.w[j.n_bufs++] = w[q];
        }
    }
    F(scale_rows)(&j);
}

/* The doubly reparameterized IWAE gradient of a one-level model, after the likelihood's
 * gradient at unit scale in decoder 1's output: decoder 1 at the weights w_r / n_x, the encoder
 * through z alone (dreg_dz_backward), its k rows of an example summed. */
static void F(dreg_backward)(real *grad, int *grad_ok, int accumulate, F(buffers) *bf,
                             const hvae_model *m, const real *params, const real *x,
                             const real *const *eps, int B, int n_x, real beta) {
    const hvae_config *c = &m->cfg;
    const hvae_mlp *dec = &m->dec[0], *enc = &m->enc[0];
    F(scale_job) sj = {.v = {bf->ddec[0][dec->n_layers - 1]}, .w = {dec->layer[dec->n_layers - 1].out},
                       .n_bufs = 1, .B = B, .iw = bf->iw, .inv_n = (real)1 / (real)n_x};
    F(scale_rows)(&sj);
    F(mlp_backward)(grad, bf->dz[0], grad_ok, bf->ddec[0], bf->dec[0], dec, params, bf->z[0],
                    NULL, B, c->activation, accumulate, 0);
    F(dreg_dz_backward)(bf->dz[0], bf->z[0], bf->q[0], eps[0], bf->iw, beta,
                        (real)1 / (real)n_x, B, c->z_dim[0]);
    F(reparam_job) rj = {NULL, bf->dq[0], bf->dz[0], bf->q[0], eps[0], B, c->z_dim[0]};
    F(reparam_over_team)(&rj);
    F(rows_sum)(bf->dq[0], n_x, B / n_x, 2 * c->z_dim[0]);
    F(mlp_backward)(grad, NULL, grad_ok, bf->denc[0], bf->enc[0], enc, params, x, &bf->sx, n_x,
                    c->activation, accumulate, 0);
}

/* hvae_backward, or with accumulate 0 the gradient written into grad instead of added to it;
 * grad_ok: NULL, or HVAE_MAX_THREADS flags set to 1, of which part p of the team is cleared
 * when a gradient it computed fails Adam's check (adam_grad_ok); lik_done: the forward_pass
 * before wrote the likelihood's gradient already (its *lik_done) */
static hvae_status F(backward_pass)(real *grad, int *grad_ok, int accumulate, int lik_done,
                                    hvae_workspace *ws, const hvae_model *m, const real *params,
                                    const real *x, const real *target, const real *const *eps,
                                    int n_x, real beta, const real *free_bits,
                                    const hvae_estimator *est) {
    const hvae_config *c = &m->cfg;
    const int T = c->n_levels, k = F(samples_per_example)(est, c, n_x, free_bits);
    const int iwae = F(is_iwae)(est), B = n_x * k;
    F(buffers) bf;
    if (n_x < 1 || k < 1 || (!eps && !c->deterministic)) return HVAE_EINVAL;
    /* the forward already reserved this size: carving does not reallocate */
    hvae_status st = F(carve)(&bf, ws, m, B, n_x);
    if (st != HVAE_OK) return st;
    if (c->deterministic) eps = NULL;
    F(zero_sums)(&bf, m, B, lik_done);
    /* IWAE: the terms of each row at unit scale, weighed afterwards */
    const real rs = iwae ? (real)1 : (real)1 / (real)B;

    /* likelihood -> d decoder-1 output */
    if (!lik_done) {
        F(likelihood_job) lj = {NULL, NULL, bf.ddec[0][m->dec[0].n_layers - 1], c,
                                F(last)(bf.dec[0], &m->dec[0]), target, rs, B, k};
        F(likelihood_over_team)(&lj);
    }
    if (iwae && est->gradient == HVAE_GRAD_DREG) {
        F(dreg_backward)(grad, grad_ok, accumulate, &bf, m, params, x, eps, B, n_x, beta);
        return HVAE_OK;
    }
    /* KL terms -> d mulv_i, d zhat_i, d z_i; a level under its free bits contributes nothing */
    F(kl_job) kj = {.c = c, .B = B, .at_samples = iwae};
    for (int i = 1; i <= T; i++) {
        const int floored = free_bits && !(ws->kl_mean[i - 1] > (double)free_bits[i - 1]);
        kj.ks[i - 1] = floored ? (real)0 : iwae ? beta : beta / (real)B;
        kj.mulv[i - 1] = bf.q[i - 1];
        kj.dmulv[i - 1] = bf.dq[i - 1];
        kj.prior[i] = i < T ? F(last)(bf.dec[i], &m->dec[i]) : NULL;
        kj.dprior[i] = i < T ? bf.ddec[i][m->dec[i].n_layers - 1] : NULL;
        kj.z[i - 1] = bf.z[i - 1];
        kj.dz[i - 1] = bf.dz[i - 1];
    }
    F(kl_over_team)(&kj);
    if (iwae) F(weigh_rows)(&bf, m, B, n_x);
    if (c->inference == HVAE_TOP_DOWN) {
        F(topdown_backward)(grad, grad_ok, accumulate, &bf, m, params, x, eps, B, n_x);
        return HVAE_OK;
    }
    /* decoders: d z_i from dec_i's input */
    for (int i = T - 1; i >= 0; i--)
        F(mlp_backward)(grad, bf.dz[i], grad_ok, bf.ddec[i], bf.dec[i], &m->dec[i], params,
                        bf.z[i], NULL, B, c->activation, accumulate, 0);
    /* encoders top down: d z_i is complete once encoder i+1 has passed it back; encoder 1 ran
     * once per example: its k rows' gradients summed */
    for (int i = T - 1; i >= 0; i--) {
        const hvae_mlp *enc = &m->enc[i];
        F(reparam_job) rj = {NULL, bf.dq[i], bf.dz[i], bf.q[i], eps ? eps[i] : NULL, B,
                             c->z_dim[i]};
        F(reparam_over_team)(&rj);
        if (i == 0) F(rows_sum)(bf.dq[0], n_x, k, 2 * c->z_dim[0]);
        F(mlp_backward)(grad, i > 0 ? bf.dz[i - 1] : NULL, grad_ok, bf.denc[i], bf.enc[i], enc,
                        params, i > 0 ? bf.z[i - 1] : x, i > 0 ? NULL : &bf.sx,
                        i > 0 ? B : n_x, c->activation, accumulate, 0);
    }
    return HVAE_OK;
}

hvae_status F(hvae_backward)(real *grad, hvae_workspace *ws, const hvae_model *m,
                             const real *params, const real *x, const real *target,
                             const real *const *eps, int batch, real beta, const real *free_bits,
                             const hvae_estimator *est) {
    return F(backward_pass)(grad, NULL, 1, 0, ws, m, params, x, target, eps, batch, beta,
                            free_bits, est);
}

hvae_status F(hvae_encode)(real *const *mulv, real *const *z, hvae_workspace *ws,
                           const hvae_model *m, const real *params, const real *x,
                           const real *const *eps, int B) {
    F(buffers) bf;
    if (B < 1) return HVAE_EINVAL;
    hvae_status st = F(carve)(&bf, ws, m, B, B);
    if (st != HVAE_OK) return st;
    F(inference_pass)(&bf, m, params, x, eps, B, B);
    for (int i = 0; i < m->cfg.n_levels; i++) {
        size_t d = (size_t)m->cfg.z_dim[i];
        if (mulv && mulv[i]) memcpy(mulv[i], bf.q[i], sizeof(real) * (size_t)B * 2 * d);
        if (z && z[i]) memcpy(z[i], bf.z[i], sizeof(real) * (size_t)B * d);
    }
    return HVAE_OK;
}

hvae_status F(hvae_decode)(real *x_params, real *const *z, hvae_workspace *ws,
                           const hvae_model *m, const real *params, const real *z_top, int level,
                           const real *const *eps, real temperature, int B) {
    F(buffers) bf;
    if (B < 1 || level < 1 || level > m->cfg.n_levels) return HVAE_EINVAL;
    hvae_status st = F(carve)(&bf, ws, m, B, B);
    if (st != HVAE_OK) return st;
    const real *zi = z_top;
    for (int i = level - 1; i >= 1; i--) { /* z_{i} from p(z_i | z_{i+1}), 0-based i */
        const real *zhat = F(decoder)(&bf, m, params, i, zi, B);
        const int d = m->cfg.z_dim[i - 1], learned = F(learned_prior)(&m->cfg, i);
        const int w = learned ? 2 * d : d; /* row stride of zhat */
        real *out = bf.z[i - 1];
        const real *e = eps ? eps[i - 1] : NULL;
        for (int b = 0; b < B; b++) {
            const real *mean = zhat + (size_t)b * w, *lv = mean + d;
            real *ob = out + (size_t)b * d;
            const real *eb = e ? e + (size_t)b * d : NULL;
            for (int j = 0; j < d; j++) {
                real sd = learned ? F(vexp)((real)0.5 * lv[j]) : (real)1;
                ob[j] = eb ? mean[j] + temperature * sd * eb[j] : mean[j];
            }
        }
        if (z && z[i - 1]) memcpy(z[i - 1], out, sizeof(real) * (size_t)B * d);
        zi = out;
    }
    const real *xp = F(decoder)(&bf, m, params, 0, zi, B);
    memcpy(x_params, xp, sizeof(real) * (size_t)B * hvae_x_params_dim(&m->cfg));
    return HVAE_OK;
}
