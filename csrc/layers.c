/* layers.c - the operations of the model, one <op>_forward / <op>_backward pair each, generic in
 * `real` (see real.h; compiled through f32.c and f64.c together with model.c).
 *
 * Conventions (after llm.c): outputs first, then inputs, then sizes; inputs are const; gradient
 * buffers are named d<thing>; backward ADDS into gradient buffers. Per-example loss kernels ADD
 * their value into an accumulator `acc` (B,). `scale` is d loss / d (per-example term), e.g.
 * beta / B for a KL term of the batch-mean loss.
 * A Gaussian parameter block `mulv` is (B, 2d): row b holds mu (d values) then logvar (d values).
 */
#include "real.h"
/* F(vexp), F(vtanh), ... come from vecmath.c, included before this file */

/* ------------------------------------------------------------------------------------------ */
/* dense layer: out = in @ W^T + b                                                              */

/* out (B,O), in (B,I), weight (O,I), bias (O,); I and O are n_in and n_out */
static void F(linear_forward)(real *out, const real *in, const real *weight, const real *bias,
                              int B, int n_in, int n_out) {
    for (int b = 0; b < B; b++) {
        real *row = out + (size_t)b * n_out;
        for (int o = 0; o < n_out; o++) row[o] = bias[o];
    }
    GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, B, n_out, n_in, (real)1, in, n_in, weight, n_in,
         (real)1, out, n_out);
}

/* din (B,I) or NULL, dweight (O,I), dbias (O,) += ; dout (B,O), in (B,I), weight (O,I) */
static void F(linear_backward)(real *din, real *dweight, real *dbias, const real *dout,
                               const real *in, const real *weight, int B, int n_in, int n_out) {
    /* dW += dout^T @ in */
    GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, n_out, n_in, B, (real)1, dout, n_out, in, n_in,
         (real)1, dweight, n_in);
    for (int b = 0; b < B; b++) {
        const real *row = dout + (size_t)b * n_out;
        for (int o = 0; o < n_out; o++) dbias[o] += row[o];
    }
    /* din += dout @ W */
    if (din)
        GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, B, n_in, n_out, (real)1, dout, n_out,
             weight, n_in, (real)1, din, n_in);
}

/* ------------------------------------------------------------------------------------------ */
/* activations, applied in place on n values; backward needs only the output y                  */

#define LEAKY_SLOPE ((real)0.01)

/* y (n,) = act(y) in place */
HVAE_CLONES static void F(act_forward)(real *y, size_t n, int act) {
    switch (act) {
    case 0: /* tanh */
        for (size_t k = 0; k < n; k++) y[k] = F(vtanh)(y[k]);
        break;
    case 1: /* relu */
        for (size_t k = 0; k < n; k++) y[k] = y[k] > 0 ? y[k] : (real)0;
        break;
    default: /* leaky relu */
        for (size_t k = 0; k < n; k++) y[k] = y[k] > 0 ? y[k] : LEAKY_SLOPE * y[k];
        break;
    }
}

/* dy (n,) *= act'(pre) in place, written through the output y (same sign as pre for relus) */
HVAE_CLONES static void F(act_backward)(real *dy, const real *y, size_t n, int act) {
    switch (act) {
    case 0:
        for (size_t k = 0; k < n; k++) dy[k] *= (real)1 - y[k] * y[k];
        break;
    case 1:
        for (size_t k = 0; k < n; k++) dy[k] = y[k] > 0 ? dy[k] : (real)0;
        break;
    default:
        for (size_t k = 0; k < n; k++) dy[k] = y[k] > 0 ? dy[k] : LEAKY_SLOPE * dy[k];
        break;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* reparameterization: z = mu + exp(logvar / 2) * eps                                          */

/* z (B,d); mulv (B,2d); eps (B,d) or NULL for z = mu */
HVAE_CLONES static void F(reparam_forward)(real *z, const real *mulv, const real *eps, int B, int d) {
    for (int b = 0; b < B; b++) {
        const real *mu = mulv + (size_t)b * 2 * d, *lv = mu + d;
        real *zb = z + (size_t)b * d;
        if (eps) {
            const real *e = eps + (size_t)b * d;
            for (int j = 0; j < d; j++) zb[j] = mu[j] + F(vexp)((real)0.5 * lv[j]) * e[j];
        } else {
            for (int j = 0; j < d; j++) zb[j] = mu[j];
        }
    }
}

/* dmulv (B,2d) +=; dz (B,d), mulv (B,2d), eps (B,d) or NULL */
HVAE_CLONES static void F(reparam_backward)(real *dmulv, const real *dz, const real *mulv, const real *eps,
                                int B, int d) {
    for (int b = 0; b < B; b++) {
        const real *lv = mulv + (size_t)b * 2 * d + d, *dzb = dz + (size_t)b * d;
        real *dmu = dmulv + (size_t)b * 2 * d, *dlv = dmu + d;
        for (int j = 0; j < d; j++) dmu[j] += dzb[j];
        if (eps) {
            const real *e = eps + (size_t)b * d;
            for (int j = 0; j < d; j++)
                dlv[j] += dzb[j] * (real)0.5 * F(vexp)((real)0.5 * lv[j]) * e[j];
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* per-example sums: the summands go to a scratch row (a loop that vectorises), then are added in
 * 8 interleaved partial sums (vectorises too, in a fixed order: no reassociation by the compiler) */

static inline real F(lane_sum)(const real *restrict v, int n) {
    real part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) part[l] += v[j + l];
    for (; j < n; j++) part[0] += v[j];
    return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

/* ------------------------------------------------------------------------------------------ */
/* closed-form KL( N(mu, diag exp(logvar)) || N(mean, I) ), mean = 0 when NULL                  */

/* acc (B,) += 0.5 * sum_j (mu - mean)^2 + exp(lv) - 1 - lv; mulv (B,2d), mean (B,d) or NULL;
 * scratch (d,) */
HVAE_CLONES static void F(gauss_kl_forward)(real *restrict acc, real *restrict scratch,
                                const real *restrict mulv, const real *restrict mean, int B,
                                int d) {
    for (int b = 0; b < B; b++) {
        const real *mu = mulv + (size_t)b * 2 * d, *lv = mu + d;
        for (int j = 0; j < d; j++) scratch[j] = F(vexpm1)(lv[j]) - lv[j];
        if (mean) {
            const real *m = mean + (size_t)b * d;
            for (int j = 0; j < d; j++) scratch[j] += (mu[j] - m[j]) * (mu[j] - m[j]);
        } else {
            for (int j = 0; j < d; j++) scratch[j] += mu[j] * mu[j];
        }
        acc[b] += (real)0.5 * F(lane_sum)(scratch, d);
    }
}

/* dmulv (B,2d) +=, dmean (B,d) += (or NULL); scale = d loss / d kl_b */
HVAE_CLONES static void F(gauss_kl_backward)(real *restrict dmulv, real *restrict dmean,
                                 const real *restrict mulv, const real *restrict mean, real scale,
                                 int B, int d) {
    for (int b = 0; b < B; b++) {
        const real *mu = mulv + (size_t)b * 2 * d, *lv = mu + d;
        real *dmu = dmulv + (size_t)b * 2 * d, *dlv = dmu + d;
        if (mean) {
            const real *m = mean + (size_t)b * d;
            real *dm = dmean + (size_t)b * d;
            for (int j = 0; j < d; j++) {
                real g = scale * (mu[j] - m[j]);
                dmu[j] += g;
                dm[j] -= g;
            }
        } else {
            for (int j = 0; j < d; j++) dmu[j] += scale * mu[j];
        }
        for (int j = 0; j < d; j++) dlv[j] += scale * (real)0.5 * F(vexpm1)(lv[j]);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* closed-form KL( N(mu, diag exp(lv)) || N(m, diag exp(s)) ), prior block ms (B,2d) = [m, s]    */

/* acc (B,) += 0.5 * sum_j s - lv + (exp(lv) + (mu - m)^2) exp(-s) - 1; mulv, ms (B,2d);
 * scratch (d,) */
HVAE_CLONES static void F(gauss_kl_learned_forward)(real *restrict acc, real *restrict scratch,
                                                    const real *restrict mulv,
                                                    const real *restrict ms, int B, int d) {
    for (int b = 0; b < B; b++) {
        const real *mu = mulv + (size_t)b * 2 * d, *lv = mu + d;
        const real *m = ms + (size_t)b * 2 * d, *s = m + d;
        for (int j = 0; j < d; j++) {
            real diff = mu[j] - m[j];
            /* exp(lv - s) - 1 - (lv - s) stays exact where the two variances agree */
            scratch[j] = F(vexpm1)(lv[j] - s[j]) - (lv[j] - s[j]) + diff * diff * F(vexp)(-s[j]);
        }
        acc[b] += (real)0.5 * F(lane_sum)(scratch, d);
    }
}

/* dmulv (B,2d) +=, dms (B,2d) +=; scale = d loss / d kl_b */
HVAE_CLONES static void F(gauss_kl_learned_backward)(real *restrict dmulv, real *restrict dms,
                                                     const real *restrict mulv,
                                                     const real *restrict ms, real scale, int B,
                                                     int d) {
    for (int b = 0; b < B; b++) {
        const real *mu = mulv + (size_t)b * 2 * d, *lv = mu + d;
        const real *m = ms + (size_t)b * 2 * d, *s = m + d;
        real *dmu = dmulv + (size_t)b * 2 * d, *dlv = dmu + d;
        real *dm = dms + (size_t)b * 2 * d, *ds = dm + d;
        for (int j = 0; j < d; j++) {
            real diff = mu[j] - m[j], prec = F(vexp)(-s[j]);
            real ratm1 = F(vexpm1)(lv[j] - s[j]); /* exp(lv - s) - 1 */
            real g = scale * diff * prec;
            dmu[j] += g;
            dm[j] -= g;
            dlv[j] += scale * (real)0.5 * ratm1;
            ds[j] -= scale * (real)0.5 * (ratm1 + diff * diff * prec);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* negative entropy of N(mu, diag exp(logvar)): -H = -0.5 * sum_j (1 + log 2pi + lv)            */

/* acc (B,) += -H; mulv (B,2d) */
static void F(gauss_negentropy_forward)(real *restrict acc, const real *restrict mulv, int B,
                                        int d) {
    for (int b = 0; b < B; b++) {
        const real *lv = mulv + (size_t)b * 2 * d + d;
        acc[b] -= (real)0.5 * (F(lane_sum)(lv, d) + (real)d * ((real)1 + LOG_2PI));
    }
}

/* dmulv (B,2d) += (logvar half only) */
static void F(gauss_negentropy_backward)(real *dmulv, real scale, int B, int d) {
    for (int b = 0; b < B; b++) {
        real *dlv = dmulv + (size_t)b * 2 * d + d;
        for (int j = 0; j < d; j++) dlv[j] -= (real)0.5 * scale;
    }
}

/* log q(z | .) at z = mu + exp(lv/2) eps: acc (B,) += -0.5 * sum_j (log 2pi + lv + eps^2);
 * scratch (d,). Evaluation only (no backward). */
HVAE_CLONES static void F(gauss_logq_forward)(real *restrict acc, real *restrict scratch,
                                  const real *restrict mulv, const real *restrict eps, int B,
                                  int d) {
    for (int b = 0; b < B; b++) {
        const real *lv = mulv + (size_t)b * 2 * d + d, *e = eps + (size_t)b * d;
        for (int j = 0; j < d; j++) scratch[j] = lv[j] + e[j] * e[j];
        acc[b] -= (real)0.5 * (F(lane_sum)(scratch, d) + (real)d * LOG_2PI);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* likelihoods: negative log-densities of a target t (B,n) given decoder outputs                */

/* unit-variance Gaussian: acc (B,) += 0.5 * sum (t - mean)^2 + 0.5 n log 2pi; mean NULL = 0;
 * scratch (n,) */
HVAE_CLONES static void F(gaussian_nll_forward)(real *restrict acc, real *restrict scratch,
                                    const real *restrict mean, const real *restrict t, int B,
                                    int n) {
    for (int b = 0; b < B; b++) {
        const real *tb = t + (size_t)b * n;
        if (mean) {
            const real *m = mean + (size_t)b * n;
            for (int j = 0; j < n; j++) scratch[j] = (tb[j] - m[j]) * (tb[j] - m[j]);
        } else {
            for (int j = 0; j < n; j++) scratch[j] = tb[j] * tb[j];
        }
        acc[b] += (real)0.5 * F(lane_sum)(scratch, n) + (real)0.5 * (real)n * LOG_2PI;
    }
}

/* dmean (B,n) += or NULL, dt (B,n) += or NULL */
HVAE_CLONES static void F(gaussian_nll_backward)(real *restrict dmean, real *restrict dt,
                                     const real *restrict mean, const real *restrict t,
                                     real scale, int B, int n) {
    size_t len = (size_t)B * n;
    if (dmean)
        for (size_t k = 0; k < len; k++) dmean[k] -= scale * (t[k] - mean[k]);
    if (dt)
        for (size_t k = 0; k < len; k++) dt[k] += scale * (t[k] - mean[k]);
}

/* Bernoulli with logits l: acc (B,) += sum softplus(l) - t*l, softplus stable:
 * softplus(l) = max(l,0) + log1p(exp(-|l|)) (vecmath.c); scratch (n,) */
HVAE_CLONES static void F(bernoulli_nll_forward)(real *restrict acc, real *restrict scratch,
                                     const real *restrict logits, const real *restrict t, int B,
                                     int n) {
    for (int b = 0; b < B; b++) {
        const real *l = logits + (size_t)b * n, *tb = t + (size_t)b * n;
        for (int j = 0; j < n; j++) scratch[j] = F(vsoftplus)(l[j]) - tb[j] * l[j];
        acc[b] += F(lane_sum)(scratch, n);
    }
}

/* dlogits (B,n) += scale * (sigmoid(l) - t), sigmoid computed without overflow */
HVAE_CLONES static void F(bernoulli_nll_backward)(real *restrict dlogits, const real *restrict logits,
                                      const real *restrict t, real scale, int B, int n) {
    for (size_t k = 0; k < (size_t)B * n; k++)
        dlogits[k] += scale * (F(vsigmoid)(logits[k]) - t[k]);
}

/* learned-variance Gaussian, ml (B,2n) = [mean, logvar]:
 * acc (B,) += 0.5 * sum (log 2pi + lv + (t - mean)^2 exp(-lv)); scratch (n,) */
HVAE_CLONES static void F(gaussian_learned_nll_forward)(real *restrict acc, real *restrict scratch,
                                            const real *restrict ml, const real *restrict t,
                                            int B, int n) {
    for (int b = 0; b < B; b++) {
        const real *m = ml + (size_t)b * 2 * n, *lv = m + n, *tb = t + (size_t)b * n;
        for (int j = 0; j < n; j++) {
            real diff = tb[j] - m[j];
            scratch[j] = lv[j] + diff * diff * F(vexp)(-lv[j]);
        }
        acc[b] += (real)0.5 * (F(lane_sum)(scratch, n) + (real)n * LOG_2PI);
    }
}

/* dml (B,2n) +=, dt (B,n) += or NULL (the target is a latent sample for p(z_{i-1} | z_i)) */
HVAE_CLONES static void F(gaussian_learned_nll_backward)(real *restrict dml, real *restrict dt,
                                                         const real *restrict ml,
                                                         const real *restrict t, real scale,
                                                         int B, int n) {
    for (int b = 0; b < B; b++) {
        const real *m = ml + (size_t)b * 2 * n, *lv = m + n, *tb = t + (size_t)b * n;
        real *dm = dml + (size_t)b * 2 * n, *dlv = dm + n;
        for (int j = 0; j < n; j++) {
            real diff = tb[j] - m[j], prec = F(vexp)(-lv[j]);
            dm[j] -= scale * diff * prec;
            dlv[j] += scale * (real)0.5 * ((real)1 - diff * diff * prec);
        }
        if (dt) {
            real *dtb = dt + (size_t)b * n;
            for (int j = 0; j < n; j++) dtb[j] += scale * (tb[j] - m[j]) * F(vexp)(-lv[j]);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Adam (Kingma & Ba 2015, bias-corrected), one pass over the flat buffer; public (hvae.h)       */

HVAE_CLONES int F(adam_update)(real *restrict params, real *restrict m1, real *restrict m2,
                   const real *restrict grad, size_t n, real lr, real beta1, real beta2, real eps,
                   long t) {
    /* A gradient that is not finite, or so large that g*g overflows the second moment, changes
     * nothing: the caller keeps its last finite parameters (fit then stops with a message). */
    if (!F(all_below)(grad, n, SQRT(REAL_MAX) * (real)0.5)) return 0;
    real c1 = (real)1 - POW(beta1, (real)t), sc2 = SQRT((real)1 - POW(beta2, (real)t));
    for (size_t k = 0; k < n; k++) {
        real g = grad[k];
        m1[k] = beta1 * m1[k] + ((real)1 - beta1) * g;
        m2[k] = beta2 * m2[k] + ((real)1 - beta2) * g * g;
        params[k] -= lr * (m1[k] / c1) / (SQRT(m2[k]) / sc2 + eps);
    }
    return 1;
}
