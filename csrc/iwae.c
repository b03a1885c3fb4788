/* iwae.c - the pieces of the importance-weighted objective (DESIGN.md §7) that the chains of
 * model.c and topdown.c call: an example's row expanded to its k samples' rows and their
 * gradients summed back (what the samples share is computed once), the importance weights and
 * the bound, the per-row scaling of the loss terms' gradients by those weights, and the doubly
 * reparameterized gradient of z. Generic in `real`; compiled through f32.c and f64.c after
 * layers.c, before model.c.
 *
 * Rows: example b's sample j is row b k + j of every level's buffers (B = n k rows).
 */
#include <string.h>

#include "real.h"

/* a (n k, w) in place: row b of the first n rows copied to rows b k .. b k + k - 1 (descending,
 * so that no source row is overwritten before it is read) */
static void F(rows_expand)(real *a, int n, int k, int w) {
    if (k == 1) return;
    for (int b = n - 1; b >= 0; b--)
        for (int j = k - 1; j >= 0; j--)
            if ((size_t)b * k + j != (size_t)b)
                memcpy(a + ((size_t)b * k + j) * w, a + (size_t)b * w, sizeof(real) * w);
}

/* a (n k, w) in place: row b of the first n rows = the sum of rows b k .. b k + k - 1, in the
 * order of j (ascending b: row b is no longer read by the examples after it) */
static void F(rows_sum)(real *a, int n, int k, int w) {
    if (k == 1) return;
    for (int b = 0; b < n; b++) {
        const real *src = a + (size_t)b * k * w;
        real *dst = a + (size_t)b * w;
        for (int o = 0; o < w; o++) {
            real acc = src[o];
            for (int j = 1; j < k; j++) acc += src[(size_t)j * w + o];
            dst[o] = acc;
        }
    }
}

/* Normalised weights below this are stored as 0: each example's largest weight is at least 1/k,
 * so what the row would add to the gradient is below the rounding of the others, while weights
 * in (or products reaching) the subnormal range slow every GEMM of the backward severalfold. */
#define IW_MIN (REAL_EPSILON * REAL_EPSILON)

/* The bound of n examples with k samples each: log w_r at beta from rec_r = -log p(x | z_1) and
 * lw_r = log p(x, z) - log q(z | x) at the samples, lwb_r = -rec_r + beta (lw_r + rec_r); then
 * per example L_b = log (1/k) sum_j exp(lwb_{bk+j}) (stable) and w (n k,) the normalised
 * weights softmax_j lwb, 0 below IW_MIN (w may be lw: each row is read before it is written).
 * Returns -mean_b L_b, accumulated in double; not finite when a log-weight is not. */
static double F(iw_weights)(real *w, const real *lw, const real *rec, real beta, int n, int k) {
    double sum = 0;
    for (int b = 0; b < n; b++) {
        const size_t r0 = (size_t)b * k;
        double mx = -INFINITY, s = 0;
        for (int j = 0; j < k; j++) {
            double l = -(double)rec[r0 + j] + (double)beta * ((double)lw[r0 + j] + rec[r0 + j]);
            if (!(l <= mx)) mx = l; /* NaN propagates */
        }
        if (!isfinite(mx)) { /* -inf everywhere, +inf or NaN: no weights, a non-finite bound */
            for (int j = 0; j < k; j++) w[r0 + j] = (real)0;
            sum += isnan(mx) ? mx : -mx;
            continue;
        }
        for (int j = 0; j < k; j++) {
            double l = -(double)rec[r0 + j] + (double)beta * ((double)lw[r0 + j] + rec[r0 + j]);
            double e = exp(l - mx);
            w[r0 + j] = (real)e; /* unnormalised for now */
            s += e;
        }
        for (int j = 0; j < k; j++) {
            const real wj = (real)((double)w[r0 + j] / s);
            w[r0 + j] = wj < IW_MIN ? (real)0 : wj;
        }
        sum += -(mx + log(s / k));
    }
    return sum / n;
}

/* Row r of every buffer v[q] (B, w[q]) times w[r] * inv_n, over the current team by rows: the
 * standard IWAE gradient, each row's loss terms (computed at unit scale) weighted by its
 * normalised importance weight over the batch size. */
typedef struct {
    real *v[ZERO_MAX_BUFS];
    int w[ZERO_MAX_BUFS];
    int n_bufs, B;
    const real *iw;
    real inv_n;
} F(scale_job);

static void F(scale_part)(void *p, int part, int n_parts) {
    const F(scale_job) *j = p;
    size_t lo, hi;
    part_range((size_t)j->B, ALIGN_ROWS, part, n_parts, &lo, &hi);
    for (int q = 0; q < j->n_bufs; q++)
        for (size_t r = lo; r < hi; r++) {
            const real c = j->iw[r] * j->inv_n;
            real *row = j->v[q] + r * (size_t)j->w[q];
            for (int o = 0; o < j->w[q]; o++) row[o] *= c;
        }
}

static void F(scale_rows)(F(scale_job) *j) {
    size_t total = 0;
    for (int q = 0; q < j->n_bufs; q++) total += (size_t)j->B * j->w[q];
    hvae_team_run(team_for((double)total, (double)PAR_MIN_ELEMS), F(scale_part), j);
}

/* The doubly reparameterized gradient of z for T = 1 (Tucker et al. 2018): dz (B,d) holds the
 * likelihood's part at scale w_r / n; in place dz = rho dz + (w_r rho / n) beta (z - eps / sigma),
 * rho = (1 - beta) + beta w_r: d(-log w)/dz with q's parameters held fixed in log q (whose
 * derivative in z is -eps / sigma) and in the prior N(0, I), each row at the weight w_r rho / n
 * that the score term's reparameterization gives (w_r^2 / n at beta = 1). z (B,d), mulv (B,2d)
 * = [mu, logvar], eps (B,d), iw (B,) the normalised weights. */
HVAE_CLONES static void F(dreg_dz_backward)(real *restrict dz, const real *restrict z,
                                            const real *restrict mulv, const real *restrict eps,
                                            const real *restrict iw, real beta, real inv_n,
                                            int B, int d) {
    for (int b = 0; b < B; b++) {
        const real wt = iw[b], rho = ((real)1 - beta) + beta * wt, ce = wt * rho * inv_n * beta;
        const real *zb = z + (size_t)b * d, *lv = mulv + (size_t)b * 2 * d + d;
        const real *e = eps + (size_t)b * d;
        real *g = dz + (size_t)b * d;
        for (int j = 0; j < d; j++)
            g[j] = rho * g[j] + ce * (zb[j] - e[j] * F(vexp)((real)-0.5 * lv[j]));
    }
}
