/* layers.c - the operations of the model, one <op>_forward / <op>_backward pair each, generic in
 * `real` (see real.h; compiled through f32.c and f64.c together with model.c).
 *
 * Conventions (after llm.c): outputs first, then inputs, then sizes; inputs are const; gradient
 * buffers are named d<thing>; backward ADDS into gradient buffers. Per-example loss kernels ADD
 * their value into an accumulator `acc` (B,). `scale` is d loss / d (per-example term), e.g.
 * beta / B for a KL term of the batch-mean loss.
 * A Gaussian parameter block `mulv` is (B, 2d): row b holds mu (d values) then logvar (d values).
 */
#include <string.h>

#include "real.h"
/* F(vexp), F(vtanh), ... come from vecmath.c, included before this file */

/* ------------------------------------------------------------------------------------------ */
/* work split over the current team (hvae.h)                                                    */

/* Work below these sizes runs on the calling thread alone: a fork-join costs about a
 * microsecond. */
#define PAR_MIN_FLOPS ((double)(1 << 20)) /* of one GEMM */
#define PAR_MIN_ELEMS ((size_t)1 << 13)  /* of one elementwise pass */
#define ALIGN_ROWS 4  /* parts of a batch: OpenBLAS's sgemm kernels take 4 rows at a time */
#define ALIGN_ELEMS 8 /* parts of a row or of a vector: 32 bytes, whole vector registers */
/* Adam takes no step when a gradient is not below this: not finite, or g*g would overflow */
#define GRAD_LIMIT (SQRT(REAL_MAX) * (real)0.5)

/* The start of part `part` of n_parts of len items: the multiple of align nearest to an equal
 * share (part n_parts starts at len). */
static size_t part_start(size_t len, size_t align, int part, int n_parts) {
    if (part >= n_parts) return len;
    size_t at = (len * (size_t)part / (size_t)n_parts + align / 2) / align * align;
    return at < len ? at : len;
}

/* [*lo, *hi): part `part` of n_parts of len items (a part may be empty) */
static void part_range(size_t len, size_t align, int part, int n_parts, size_t *lo, size_t *hi) {
    *lo = part_start(len, align, part, n_parts);
    *hi = part_start(len, align, part + 1, n_parts);
}

/* Ownership: part k of a team owns the output features [lo, hi) of every layer (its weight
 * rows, bias entries, gradient rows, Adam moments, and its columns of the layer's output). The
 * backward and Adam (and the forward, for batches smaller than the layer is wide) give each
 * part the same features, so a parameter and its gradient and moments stay in the caches of
 * one thread from step to step: on a machine whose cores share no cache (this project's 2-vCPU
 * VM, some of the time), moving them between cores every step cost more than the arithmetic:
 * two threads were 3-4x slower than one. */
static void own_range(int n_out, int part, int n_parts, size_t *lo, size_t *hi) {
    part_range((size_t)n_out, ALIGN_ELEMS, part, n_parts, lo, hi);
}

/* The team a pass of `work` units (FLOPs or elements) above `min` runs on: the current one, or
 * NULL (the calling thread alone). */
static hvae_team *team_for(double work, double min) {
    return work >= min ? hvae_team_current() : NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* activations, applied in place on n values; backward needs only the output y                  */

#define LEAKY_SLOPE ((real)0.01)
#define ACT_NONE (-1) /* a layer without activation (the last of an MLP) */

/* y (n,) = act(y + bias) in place (act ACT_NONE: y + bias); bias (n,) */
HVAE_CLONES static void F(bias_act_range)(real *restrict y, const real *restrict bias, size_t n,
                                          int act) {
    switch (act) {
    case ACT_NONE:
        for (size_t k = 0; k < n; k++) y[k] += bias[k];
        break;
    case 0: /* tanh */
        for (size_t k = 0; k < n; k++) y[k] = F(vtanh)(y[k] + bias[k]);
        break;
    case 1: /* relu */
        for (size_t k = 0; k < n; k++) {
            real a = y[k] + bias[k];
            y[k] = a > 0 ? a : (real)0;
        }
        break;
    default: /* leaky relu */
        for (size_t k = 0; k < n; k++) {
            real a = y[k] + bias[k];
            y[k] = a > 0 ? a : LEAKY_SLOPE * a;
        }
        break;
    }
}

/* dy (n,) *= act'(pre) in place, written through the output y (same sign as pre for relus) */
HVAE_CLONES static void F(act_backward_range)(real *dy, const real *y, size_t n, int act) {
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

/* n_bufs buffers v[k] (n[k],) = 0 in one pass over the current team, each part a range of
 * each (one fork-join for all) */
#define ZERO_MAX_BUFS (5 * HVAE_MAX_LEVELS)
typedef struct {
    real *v[ZERO_MAX_BUFS];
    size_t n[ZERO_MAX_BUFS];
    int n_bufs;
} F(zero_job);

static void F(zero_part)(void *p, int part, int n_parts) {
    const F(zero_job) *j = p;
    for (int k = 0; k < j->n_bufs; k++) {
        size_t lo, hi;
        part_range(j->n[k], ALIGN_ELEMS, part, n_parts, &lo, &hi);
        if (hi > lo) memset(j->v[k] + lo, 0, sizeof(real) * (hi - lo));
    }
}

static void F(zero)(F(zero_job) *j) {
    size_t total = 0;
    for (int k = 0; k < j->n_bufs; k++) total += j->n[k];
    hvae_team_run(team_for((double)total, (double)PAR_MIN_ELEMS), F(zero_part), j);
}

/* acc (n,) += the sum of the `rows` rows of m (leading dimension ld), row by row */
HVAE_CLONES static void F(add_rows)(real *restrict acc, const real *restrict m, size_t rows,
                                    size_t ld, size_t n) {
    for (size_t b = 0; b < rows; b++)
        for (size_t o = 0; o < n; o++) acc[o] += m[b * ld + o];
}

/* ------------------------------------------------------------------------------------------ */
/* Adam's check of a gradient, done by the backward on the rows it has just computed           */

/* A gradient that is not finite, or so large that g*g overflows the second moment, changes
 * nothing: the caller keeps its last finite parameters (fit then stops with a message). */
HVAE_CLONES static int F(adam_grad_ok)(const real *grad, size_t n) {
    return F(all_below)(grad, n, GRAD_LIMIT);
}

/* ------------------------------------------------------------------------------------------ */
/* dense layer: out = act(in @ W^T + b); each part computes the output columns of the features it
 * owns, or, for a batch at least as large as the layer is wide, a range of output rows (then
 * reading all of W costs less than reading the whole input in every part) */

typedef struct {
    real *out;
    const real *in, *weight, *bias;
    int B, n_in, n_out, act;
} F(linear_fwd_job);

static void F(linear_forward_part)(void *p, int part, int n_parts) {
    const F(linear_fwd_job) *j = p;
    size_t lo = 0, hi = (size_t)j->n_out, r0 = 0, r1 = (size_t)j->B, n_out = (size_t)j->n_out;
    if (j->B >= j->n_out)
        part_range((size_t)j->B, ALIGN_ROWS, part, n_parts, &r0, &r1);
    else
        own_range(j->n_out, part, n_parts, &lo, &hi);
    if (hi <= lo || r1 <= r0) return;
    real *out = j->out + r0 * n_out + lo;
    /* out[r0:r1, lo:hi] = in[r0:r1, :] @ W[lo:hi, :]^T, then act(out + bias[lo:hi]) row by row
     * while the row is in the cache */
    GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)(r1 - r0), (int)(hi - lo), j->n_in,
         (real)1, j->in + r0 * (size_t)j->n_in, j->n_in, j->weight + lo * (size_t)j->n_in,
         j->n_in, (real)0, out, j->n_out);
    for (size_t b = 0; b < r1 - r0; b++)
        F(bias_act_range)(out + b * n_out, j->bias + lo, hi - lo, j->act);
}

/* out (B,O), in (B,I), weight (O,I), bias (O,); I and O are n_in and n_out; act: the
 * activation applied to the output, or ACT_NONE */
static void F(linear_forward)(real *out, const real *in, const real *weight, const real *bias,
                              int B, int n_in, int n_out, int act) {
    F(linear_fwd_job) j = {out, in, weight, bias, B, n_in, n_out, act};
    hvae_team_run(team_for(2.0 * B * n_in * n_out, PAR_MIN_FLOPS), F(linear_forward_part), &j);
}

/* The backward: each part computes the bias and weight gradient rows of the features it owns.
 * The input gradient din += dout @ W is split one of two ways: by the features it sums over
 * (each part reads only its own rows of W; parts 1.. write partial sums to the team's scratch,
 * added in a second pass) when the batch is small next to the layer, else by batch rows. The
 * activation derivative of the layer below is applied to din on the way (act_y non-NULL). */
typedef struct {
    real *din, *dweight, *dbias, *partial;
    const real *dout, *in, *weight, *act_y;
    int B, n_in, n_out, accumulate, din_accumulate, act;
    int *grad_ok; /* NULL, or per part: 0 once a gradient the part wrote is not finite */
} F(linear_bwd_job);

static void F(linear_backward_part)(void *p, int part, int n_parts) {
    const F(linear_bwd_job) *j = p;
    const int B = j->B, n_in = j->n_in, n_out = j->n_out;
    size_t lo, hi;
    own_range(n_out, part, n_parts, &lo, &hi);
    if (hi > lo) {
        if (!j->accumulate)
            for (size_t o = lo; o < hi; o++) j->dbias[o] = 0;
        F(add_rows)(j->dbias + lo, j->dout + lo, (size_t)B, (size_t)n_out, hi - lo);
        /* dW[lo:hi, :] (hi-lo, I) (+)= dout[:, lo:hi]^T @ in (B, I) */
        GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, (int)(hi - lo), n_in, B, (real)1,
             j->dout + lo, n_out, j->in, n_in, (real)j->accumulate,
             j->dweight + lo * (size_t)n_in, n_in);
        /* Adam's check of these rows while they are in this core's cache */
        if (j->grad_ok && !(F(adam_grad_ok)(j->dweight + lo * (size_t)n_in, (hi - lo) * n_in) &&
                            F(adam_grad_ok)(j->dbias + lo, hi - lo)))
            j->grad_ok[part] = 0;
    }
    if (!j->din) return;
    if (j->partial) { /* part 0 adds dout[:, lo:hi] @ W[lo:hi, :] to din, part k > 0 writes it */
        real *C = part ? j->partial + (size_t)(part - 1) * B * n_in : j->din;
        if (hi > lo)
            GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, B, n_in, (int)(hi - lo), (real)1,
                 j->dout + lo, n_out, j->weight + lo * (size_t)n_in, n_in,
                 (real)(part == 0 && j->din_accumulate), C, n_in);
        else if (part || !j->din_accumulate)
            memset(C, 0, sizeof(real) * (size_t)B * n_in);
        return;
    }
    size_t r0, r1; /* din[r0:r1, :] (+)= dout[r0:r1, :] @ W */
    part_range((size_t)B, ALIGN_ROWS, part, n_parts, &r0, &r1);
    if (r1 <= r0) return;
    GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)(r1 - r0), n_in, n_out, (real)1,
         j->dout + r0 * n_out, n_out, j->weight, n_in, (real)j->din_accumulate,
         j->din + r0 * n_in, n_in);
    if (j->act_y)
        F(act_backward_range)(j->din + r0 * n_in, j->act_y + r0 * n_in, (r1 - r0) * n_in, j->act);
}

/* din += partial sums of parts 1.., then the activation derivative; each part a range */
static void F(linear_reduce_part)(void *p, int part, int n_parts) {
    const F(linear_bwd_job) *j = p;
    const size_t n = (size_t)j->B * j->n_in;
    size_t lo, hi;
    part_range(n, ALIGN_ELEMS, part, n_parts, &lo, &hi);
    for (int k = 1; k < n_parts; k++) {
        const real *s = j->partial + (size_t)(k - 1) * n;
        for (size_t e = lo; e < hi; e++) j->din[e] += s[e];
    }
    if (j->act_y && hi > lo) F(act_backward_range)(j->din + lo, j->act_y + lo, hi - lo, j->act);
}

/* din (B,I) += (din_accumulate) or = (not), or NULL; dweight (O,I), dbias (O,) += (accumulate)
 * or = (not); dout (B,O), in (B,I), weight (O,I); act_y (B,I) or NULL: the output of the
 * activation `act` that made `in`, whose derivative din is then multiplied by; grad_ok: NULL,
 * or HVAE_MAX_THREADS flags, of which part p clears flag p when a gradient row it wrote (as
 * the owner of those features, see own_range) fails Adam's check (adam_grad_ok) */
static void F(linear_backward)(real *din, int *grad_ok, real *dweight, real *dbias,
                               const real *dout, const real *in, const real *weight, int B,
                               int n_in, int n_out, int accumulate, int din_accumulate,
                               const real *act_y, int act) {
    F(linear_bwd_job) j = {din, dweight, dbias, NULL, dout, in, weight, act_y, B, n_in, n_out,
                           accumulate, din_accumulate, act, grad_ok};
    double flops = 2.0 * B * n_in * n_out * (din ? 2 : 1);
    hvae_team *tm = team_for(flops, PAR_MIN_FLOPS);
    int n_parts = hvae_team_size(tm);
    if (din && n_parts > 1 && B <= n_out)
        j.partial = hvae_team_scratch(tm, sizeof(real) * (size_t)(n_parts - 1) * B * n_in);
    hvae_team_run(tm, F(linear_backward_part), &j);
    if (j.partial)
        hvae_team_run(tm, F(linear_reduce_part), &j);
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
/* precision-weighted merge (Ladder VAE): N(mu_q, e^lq) proportional to N(mu^, e^a) N(m, e^s)     */
/*   lq = -log(e^-a + e^-s) = min(a, s) - log1p(e^-|a-s|),  mu_q = m + w (mu^ - m),              */
/*   w = e^-a / (e^-a + e^-s) = sigmoid(s - a), both from one e^-|a-s| (no overflow)              */

/* w = sigmoid(s - a) and wc = 1 - w; returns e^-|a-s| */
static inline real F(merge_weights)(real a, real s, real *w, real *wc) {
    const real diff = s - a, e = F(vexp)(-(diff >= 0 ? diff : -diff)), r = (real)1 / ((real)1 + e);
    *w = diff >= 0 ? r : e * r;
    *wc = diff >= 0 ? e * r : r;
    return e;
}

/* out (B,2d) = [mu_q, lq]; mulv (B,2d) = [mu^, a]; ms: [m, s] (B,2d) when learned, else m (B,d)
 * with s = 0 */
HVAE_CLONES static void F(gauss_merge_forward)(real *restrict out, const real *restrict mulv,
                                               const real *restrict ms, int learned, int B,
                                               int d) {
    const size_t w_ms = learned ? 2 * (size_t)d : (size_t)d;
    for (int b = 0; b < B; b++) {
        const real *mu = mulv + (size_t)b * 2 * d, *a = mu + d;
        const real *m = ms + (size_t)b * w_ms, *s = learned ? m + d : NULL;
        real *mq = out + (size_t)b * 2 * d, *lq = mq + d;
        for (int j = 0; j < d; j++) {
            const real sj = s ? s[j] : (real)0;
            real w, wc;
            const real e = F(merge_weights)(a[j], sj, &w, &wc);
            mq[j] = m[j] + w * (mu[j] - m[j]);
            lq[j] = (sj >= a[j] ? a[j] : sj) - F(vlog1p_01)(e);
        }
    }
}

/* dmulv (B,2d) +=, dms (same shape as ms) +=; dout (B,2d) = d [mu_q, lq] */
HVAE_CLONES static void F(gauss_merge_backward)(real *restrict dmulv, real *restrict dms,
                                                const real *restrict dout,
                                                const real *restrict mulv,
                                                const real *restrict ms, int learned, int B,
                                                int d) {
    const size_t w_ms = learned ? 2 * (size_t)d : (size_t)d;
    for (int b = 0; b < B; b++) {
        const real *mu = mulv + (size_t)b * 2 * d, *a = mu + d;
        const real *m = ms + (size_t)b * w_ms, *s = learned ? m + d : NULL;
        const real *dmq = dout + (size_t)b * 2 * d, *dlq = dmq + d;
        real *dmu = dmulv + (size_t)b * 2 * d, *da = dmu + d;
        real *dm = dms + (size_t)b * w_ms, *ds = learned ? dm + d : NULL;
        for (int j = 0; j < d; j++) {
            real w, wc;
            F(merge_weights)(a[j], s ? s[j] : (real)0, &w, &wc);
            const real g = dmq[j] * (mu[j] - m[j]) * (w * wc); /* d loss / d (s - a) via w */
            dmu[j] += dmq[j] * w;
            dm[j] += dmq[j] * wc;
            da[j] += dlq[j] * w - g;
            if (ds) ds[j] += dlq[j] * wc + g;
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

/* dmean (B,n) += or NULL, dt (B,n) += or NULL; mean NULL = 0 (then dmean NULL) */
HVAE_CLONES static void F(gaussian_nll_backward)(real *restrict dmean, real *restrict dt,
                                     const real *restrict mean, const real *restrict t,
                                     real scale, int B, int n) {
    size_t len = (size_t)B * n;
    if (dmean)
        for (size_t k = 0; k < len; k++) dmean[k] -= scale * (t[k] - mean[k]);
    if (dt && mean)
        for (size_t k = 0; k < len; k++) dt[k] += scale * (t[k] - mean[k]);
    else if (dt)
        for (size_t k = 0; k < len; k++) dt[k] += scale * t[k];
}

/* Bernoulli with logits l: acc (B,) += sum softplus(l) - t*l, softplus stable:
 * softplus(l) = max(l,0) + log1p(exp(-|l|)) (vecmath.c); and, when dlogits (B,n) is not NULL,
 * dlogits = scale * (sigmoid(l) - t) from the same exp(-|l|) (sigmoid as vsigmoid computes it:
 * the numbers of bernoulli_nll_backward into zeros). A row's summands go through a stack
 * buffer of BERNOULLI_CHUNK (a multiple of 8) and are added as lane_sum adds a whole row. */
#define BERNOULLI_CHUNK 256
HVAE_CLONES static void F(bernoulli_nll_forward)(real *restrict acc, real *restrict dlogits,
                                                 const real *restrict logits,
                                                 const real *restrict t, real scale, int B,
                                                 int n) {
    real sc[BERNOULLI_CHUNK];
    for (int b = 0; b < B; b++) {
        const real *l = logits + (size_t)b * n, *tb = t + (size_t)b * n;
        real *dl = dlogits ? dlogits + (size_t)b * n : NULL;
        real part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int c0 = 0; c0 < n; c0 += BERNOULLI_CHUNK) {
            const int len = n - c0 < BERNOULLI_CHUNK ? n - c0 : BERNOULLI_CHUNK;
            const real *lc = l + c0, *tc = tb + c0;
            if (dl) {
                real *dc = dl + c0;
                for (int j = 0; j < len; j++) {
                    const real al = lc[j] >= 0 ? lc[j] : -lc[j], e = F(vexp)(-al);
                    sc[j] = (lc[j] > 0 ? lc[j] : (real)0) + F(vlog1p_01)(e) - tc[j] * lc[j];
                    const real s = (real)1 / ((real)1 + e);
                    dc[j] = scale * ((lc[j] >= 0 ? s : e * s) - tc[j]);
                }
            } else {
                for (int j = 0; j < len; j++) sc[j] = F(vsoftplus)(lc[j]) - tc[j] * lc[j];
            }
            int j = 0;
            for (; j + 8 <= len; j += 8)
                for (int q = 0; q < 8; q++) part[q] += sc[j + q];
            for (; j < len; j++) part[0] += sc[j]; /* the row's tail: only in its last chunk */
        }
        acc[b] += ((part[0] + part[4]) + (part[1] + part[5])) +
                  ((part[2] + part[6]) + (part[3] + part[7]));
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

/* The constants of update t: beta1, beta2, eps, step = lr / (1 - beta1^t) and
 * inv_sc2 = 1 / sqrt(1 - beta2^t) (the bias corrections). */
typedef struct {
    real beta1, beta2, eps, step, inv_sc2;
} F(adam_consts);

static F(adam_consts) F(adam_consts_at)(real lr, real beta1, real beta2, real eps, long t) {
    F(adam_consts) a = {beta1, beta2, eps, lr / ((real)1 - POW(beta1, (real)t)),
                        (real)1 / SQRT((real)1 - POW(beta2, (real)t))};
    return a;
}

/* The update of n parameters without the finiteness check, one division each:
 * p -= step * (m / (sqrt(v) * inv_sc2 + eps)), PyTorch's order of operations except for the
 * reciprocal; eps > 0 keeps the denominator positive. */
HVAE_CLONES static void F(adam_range)(real *restrict params, real *restrict m1,
                                      real *restrict m2, const real *restrict grad, size_t n,
                                      const F(adam_consts) *a) {
    const real beta1 = a->beta1, beta2 = a->beta2, eps = a->eps, step = a->step,
               inv_sc2 = a->inv_sc2;
    for (size_t k = 0; k < n; k++) {
        real g = grad[k];
        m1[k] = beta1 * m1[k] + ((real)1 - beta1) * g;
        m2[k] = beta2 * m2[k] + ((real)1 - beta2) * g * g;
        params[k] -= step * (m1[k] / (SQRT(m2[k]) * inv_sc2 + eps));
    }
}

int F(adam_update)(real *restrict params, real *restrict m1, real *restrict m2,
                   const real *restrict grad, size_t n, real lr, real beta1, real beta2, real eps,
                   long t) {
    if (!F(adam_grad_ok)(grad, n)) return 0;
    F(adam_consts) a = F(adam_consts_at)(lr, beta1, beta2, eps, t);
    F(adam_range)(params, m1, m2, grad, n, &a);
    return 1;
}
