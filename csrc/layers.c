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
static void F(act_forward)(real *y, size_t n, int act) {
    switch (act) {
    case 0: /* tanh */
        for (size_t k = 0; k < n; k++) y[k] = TANH(y[k]);
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
static void F(act_backward)(real *dy, const real *y, size_t n, int act) {
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
static void F(reparam_forward)(real *z, const real *mulv, const real *eps, int B, int d) {
    for (int b = 0; b < B; b++) {
        const real *mu = mulv + (size_t)b * 2 * d, *lv = mu + d;
        real *zb = z + (size_t)b * d;
        if (eps) {
            const real *e = eps + (size_t)b * d;
            for (int j = 0; j < d; j++) zb[j] = mu[j] + EXP((real)0.5 * lv[j]) * e[j];
        } else {
            for (int j = 0; j < d; j++) zb[j] = mu[j];
        }
    }
}

/* dmulv (B,2d) +=; dz (B,d), mulv (B,2d), eps (B,d) or NULL */
static void F(reparam_backward)(real *dmulv, const real *dz, const real *mulv, const real *eps,
                                int B, int d) {
    for (int b = 0; b < B; b++) {
        const real *lv = mulv + (size_t)b * 2 * d + d, *dzb = dz + (size_t)b * d;
        real *dmu = dmulv + (size_t)b * 2 * d, *dlv = dmu + d;
        for (int j = 0; j < d; j++) dmu[j] += dzb[j];
        if (eps) {
            const real *e = eps + (size_t)b * d;
            for (int j = 0; j < d; j++) dlv[j] += dzb[j] * (real)0.5 * EXP((real)0.5 * lv[j]) * e[j];
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* closed-form KL( N(mu, diag exp(logvar)) || N(mean, I) ), mean = 0 when NULL                  */

/* acc (B,) += 0.5 * sum_j (mu - mean)^2 + exp(lv) - 1 - lv; mulv (B,2d), mean (B,d) or NULL */
static void F(gauss_kl_forward)(real *acc, const real *mulv, const real *mean, int B, int d) {
    for (int b = 0; b < B; b++) {
        const real *mu = mulv + (size_t)b * 2 * d, *lv = mu + d;
        const real *m = mean ? mean + (size_t)b * d : NULL;
        real s = 0;
        for (int j = 0; j < d; j++) {
            real diff = m ? mu[j] - m[j] : mu[j];
            s += diff * diff + EXP(lv[j]) - (real)1 - lv[j];
        }
        acc[b] += (real)0.5 * s;
    }
}

/* dmulv (B,2d) +=, dmean (B,d) += (or NULL); scale = d loss / d kl_b */
static void F(gauss_kl_backward)(real *dmulv, real *dmean, const real *mulv, const real *mean,
                                 real scale, int B, int d) {
    for (int b = 0; b < B; b++) {
        const real *mu = mulv + (size_t)b * 2 * d, *lv = mu + d;
        const real *m = mean ? mean + (size_t)b * d : NULL;
        real *dmu = dmulv + (size_t)b * 2 * d, *dlv = dmu + d;
        real *dm = dmean ? dmean + (size_t)b * d : NULL;
        for (int j = 0; j < d; j++) {
            real g = scale * (m ? mu[j] - m[j] : mu[j]);
            dmu[j] += g;
            if (dm) dm[j] -= g;
            dlv[j] += scale * (real)0.5 * (EXP(lv[j]) - (real)1);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* negative entropy of N(mu, diag exp(logvar)): -H = -0.5 * sum_j (1 + log 2pi + lv)            */

/* acc (B,) += -H; mulv (B,2d) */
static void F(gauss_negentropy_forward)(real *acc, const real *mulv, int B, int d) {
    for (int b = 0; b < B; b++) {
        const real *lv = mulv + (size_t)b * 2 * d + d;
        real s = 0;
        for (int j = 0; j < d; j++) s += (real)1 + LOG_2PI + lv[j];
        acc[b] -= (real)0.5 * s;
    }
}

/* dmulv (B,2d) += (logvar half only) */
static void F(gauss_negentropy_backward)(real *dmulv, real scale, int B, int d) {
    for (int b = 0; b < B; b++) {
        real *dlv = dmulv + (size_t)b * 2 * d + d;
        for (int j = 0; j < d; j++) dlv[j] -= (real)0.5 * scale;
    }
}

/* log q(z | .) at z = mu + exp(lv/2) eps: acc (B,) += -0.5 * sum_j (log 2pi + lv + eps^2).
 * Evaluation only (no backward). */
static void F(gauss_logq_forward)(real *acc, const real *mulv, const real *eps, int B, int d) {
    for (int b = 0; b < B; b++) {
        const real *lv = mulv + (size_t)b * 2 * d + d, *e = eps + (size_t)b * d;
        real s = 0;
        for (int j = 0; j < d; j++) s += LOG_2PI + lv[j] + e[j] * e[j];
        acc[b] -= (real)0.5 * s;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* likelihoods: negative log-densities of a target t (B,n) given decoder outputs                */

/* unit-variance Gaussian: acc (B,) += 0.5 * sum (t - mean)^2 + 0.5 n log 2pi; mean NULL = 0 */
static void F(gaussian_nll_forward)(real *acc, const real *mean, const real *t, int B, int n) {
    for (int b = 0; b < B; b++) {
        const real *m = mean ? mean + (size_t)b * n : NULL, *tb = t + (size_t)b * n;
        real s = 0;
        for (int j = 0; j < n; j++) {
            real diff = m ? tb[j] - m[j] : tb[j];
            s += diff * diff;
        }
        acc[b] += (real)0.5 * s + (real)0.5 * (real)n * LOG_2PI;
    }
}

/* dmean (B,n) += or NULL, dt (B,n) += or NULL */
static void F(gaussian_nll_backward)(real *dmean, real *dt, const real *mean, const real *t,
                                     real scale, int B, int n) {
    for (size_t k = 0; k < (size_t)B * n; k++) {
        real g = scale * (t[k] - mean[k]);
        if (dmean) dmean[k] -= g;
        if (dt) dt[k] += g;
    }
}

/* Bernoulli with logits l: acc (B,) += sum softplus(l) - t*l, softplus stable:
 * softplus(l) = max(l,0) + log1p(exp(-|l|)) */
static void F(bernoulli_nll_forward)(real *acc, const real *logits, const real *t, int B, int n) {
    for (int b = 0; b < B; b++) {
        const real *l = logits + (size_t)b * n, *tb = t + (size_t)b * n;
        real s = 0;
        for (int j = 0; j < n; j++) {
            real a = l[j] > 0 ? l[j] : -l[j];
            s += (l[j] > 0 ? l[j] : (real)0) + LOG1P(EXP(-a)) - tb[j] * l[j];
        }
        acc[b] += s;
    }
}

/* dlogits (B,n) += scale * (sigmoid(l) - t), sigmoid computed without overflow */
static void F(bernoulli_nll_backward)(real *dlogits, const real *logits, const real *t,
                                      real scale, int B, int n) {
    for (size_t k = 0; k < (size_t)B * n; k++) {
        real l = logits[k], sig;
        if (l >= 0) {
            sig = (real)1 / ((real)1 + EXP(-l));
        } else {
            real e = EXP(l);
            sig = e / ((real)1 + e);
        }
        dlogits[k] += scale * (sig - t[k]);
    }
}

/* learned-variance Gaussian, ml (B,2n) = [mean, logvar]:
 * acc (B,) += 0.5 * sum (log 2pi + lv + (t - mean)^2 exp(-lv)) */
static void F(gaussian_learned_nll_forward)(real *acc, const real *ml, const real *t, int B,
                                            int n) {
    for (int b = 0; b < B; b++) {
        const real *m = ml + (size_t)b * 2 * n, *lv = m + n, *tb = t + (size_t)b * n;
        real s = 0;
        for (int j = 0; j < n; j++) {
            real diff = tb[j] - m[j];
            s += LOG_2PI + lv[j] + diff * diff * EXP(-lv[j]);
        }
        acc[b] += (real)0.5 * s;
    }
}

/* dml (B,2n) += */
static void F(gaussian_learned_nll_backward)(real *dml, const real *ml, const real *t, real scale,
                                             int B, int n) {
    for (int b = 0; b < B; b++) {
        const real *m = ml + (size_t)b * 2 * n, *lv = m + n, *tb = t + (size_t)b * n;
        real *dm = dml + (size_t)b * 2 * n, *dlv = dm + n;
        for (int j = 0; j < n; j++) {
            real diff = tb[j] - m[j], prec = EXP(-lv[j]);
            dm[j] -= scale * diff * prec;
            dlv[j] += scale * (real)0.5 * ((real)1 - diff * diff * prec);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Adam (Kingma & Ba 2015, bias-corrected), one pass over the flat buffer; public (hvae.h)       */

int F(adam_update)(real *params, real *m1, real *m2, const real *grad, size_t n, real lr,
                   real beta1, real beta2, real eps, long t) {
    /* a non-finite gradient changes nothing: the caller keeps its last finite parameters */
    for (size_t k = 0; k < n; k++)
        if (!isfinite(grad[k])) return 0;
    real c1 = (real)1 - POW(beta1, (real)t), c2 = (real)1 - POW(beta2, (real)t);
    for (size_t k = 0; k < n; k++) {
        real g = grad[k];
        m1[k] = beta1 * m1[k] + ((real)1 - beta1) * g;
        m2[k] = beta2 * m2[k] + ((real)1 - beta2) * g * g;
        params[k] -= lr * (m1[k] / c1) / (SQRT(m2[k] / c2) + eps);
    }
    return 1;
}
