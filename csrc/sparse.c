/* sparse.c - the encoder's first layer on a sparse x, as a forward / backward pair that visits
 * only the nonzeros; generic in `real` (see real.h; compiled through f32.c and f64.c after
 * layers.c, whose team helpers and activations it uses, and before model.c, which calls it).
 *
 * A batch x (B, D) with at most a quarter of its entries nonzero (binarized MNIST: 13%) goes
 * through kernels that visit only its nonzeros: the forward sums, for each example, the rows of
 * W^T at its nonzero columns; the weight gradient sums, for each input feature, the rows of dout
 * at the examples where that feature is nonzero. Both are bound by the rate at which those rows
 * come from the cache; at 13% nonzero they take about half the time of the GEMMs. Each part of
 * the team keeps its own features (own_range), as in the dense layer.
 *
 * The sums run over chunks of up to CHUNK output features held in vector registers (GCC's vector
 * extension; no FMA contraction, so every clone gives the same numbers). Within a chunk the
 * order of a sum is that of the nonzeros, which does not depend on the team. */
#include <string.h>

#include "real.h"

typedef real F(vec) __attribute__((vector_size(32)));
#define VEC_LEN ((int)(32 / sizeof(real)))
#define CHUNK_VECS 8
#define CHUNK (CHUNK_VECS * VEC_LEN) /* 64 float32 or 32 float64 */
#define SPARSE_ALWAYS_INLINE static inline __attribute__((always_inline))

/* The nonzeros of x in the workspace, by rows (CSR) and by columns (CSC), both made by the
 * forward, and the layer's W^T by chunks. */
typedef struct {
    int *state;     /* 1: the index holds this batch's x (the forward took the sparse kernels) */
    int *row_ptr;   /* (B+1,): row b's nonzeros are [row_ptr[b], row_ptr[b+1]) of idx, val */
    int *idx;       /* (cap,): their columns, increasing within a row */
    real *val;      /* (cap,): their values */
    int *col_ptr;   /* (D+1,): column j's nonzeros are [col_ptr[j], col_ptr[j+1]) of cidx, cval */
    int *col_next;  /* (D,): the column counts while the index is made by one thread */
    int *cidx;      /* (cap,): their rows, increasing within a column */
    real *cval;     /* (cap,) */
    real *wt;       /* (O*D,): the chunk of features [o0, o0+n) at wt + o0*D is W[o0:o0+n, :]^T */
    real *dout;     /* (B*O,): the backward's d out[:, o0:o0+n] at dout + o0*B, (B, n) */
    size_t cap;     /* room for nonzeros; 0: the sparse kernels are off for this batch size */
} F(sparse_x);

/* sum (n,) = the sum over k in [k0, k1) of val[k] * rows[at[k] * ld : at[k] * ld + n], n <=
 * CHUNK; nv = n / VEC_LEN, a constant after inlining: the sums stay in registers */
SPARSE_ALWAYS_INLINE void F(gather_sum_n)(real *restrict sum, const real *restrict rows,
                                          size_t ld, const int *restrict at,
                                          const real *restrict val, int k0, int k1, int n,
                                          const int nv) {
    F(vec) acc[CHUNK_VECS];
    real tail[VEC_LEN];
    const int t0 = nv * VEC_LEN;
    for (int q = 0; q < nv; q++) acc[q] = (F(vec)){0};
    for (int c = t0; c < n; c++) tail[c - t0] = 0;
    for (int k = k0; k < k1; k++) {
        const real v = val[k], *r = rows + (size_t)at[k] * ld;
        for (int q = 0; q < nv; q++) {
            F(vec) w;
            memcpy(&w, r + q * VEC_LEN, sizeof w);
            acc[q] += v * w;
        }
        for (int c = t0; c < n; c++) tail[c - t0] += v * r[c];
    }
    /* vector by vector, so that acc stays in registers: copied whole, it got a stack slot that
     * GCC over-aligns and then reads with aligned moves, which faulted under ASan's
     * detect_stack_use_after_return (its fake stack frames need not keep that alignment; fixed
     * in LLVM's runtime by llvm/llvm-project#152819, 2025, after the libasan of GCC 12) */
    for (int q = 0; q < nv; q++) memcpy(sum + q * VEC_LEN, &acc[q], sizeof acc[q]);
    for (int c = t0; c < n; c++) sum[c] = tail[c - t0];
}

HVAE_CLONES static void F(gather_sum)(real *restrict sum, const real *restrict rows, size_t ld,
                                      const int *restrict at, const real *restrict val, int k0,
                                      int k1, int n) {
    switch (n / VEC_LEN) {
    case 8: F(gather_sum_n)(sum, rows, ld, at, val, k0, k1, n, 8); break;
    case 7: F(gather_sum_n)(sum, rows, ld, at, val, k0, k1, n, 7); break;
    case 6: F(gather_sum_n)(sum, rows, ld, at, val, k0, k1, n, 6); break;
    case 5: F(gather_sum_n)(sum, rows, ld, at, val, k0, k1, n, 5); break;
    case 4: F(gather_sum_n)(sum, rows, ld, at, val, k0, k1, n, 4); break;
    case 3: F(gather_sum_n)(sum, rows, ld, at, val, k0, k1, n, 3); break;
    case 2: F(gather_sum_n)(sum, rows, ld, at, val, k0, k1, n, 2); break;
    case 1: F(gather_sum_n)(sum, rows, ld, at, val, k0, k1, n, 1); break;
    default: F(gather_sum_n)(sum, rows, ld, at, val, k0, k1, n, 0); break;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* transposition by VEC_LEN x VEC_LEN blocks held in registers                                 */

/* integer lanes of a vector's width: comparison results */
#if defined(HVAE_DOUBLE)
typedef long long F(ivec) __attribute__((vector_size(32)));
#else
typedef int F(ivec) __attribute__((vector_size(32)));
#endif
/* lanes of a and b (indices into a then b), GCC 12+ and clang */
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)

/* d[m * ldd + k] = (accumulate: d[m * ldd + k] +) s[k * lds + m] for k, m < VEC_LEN; returns
 * whether every value written is within [-limit, limit] (NaN is not). All in registers: the
 * rows are single variables, the columns an array indexed by constants only (see gather_sum_n
 * on arrays of vectors under ASan). */
SPARSE_ALWAYS_INLINE int F(transpose_block)(real *restrict d, size_t ldd, const real *restrict s,
                                            size_t lds, int accumulate, real limit) {
    F(vec) r0, r1, r2, r3;
    memcpy(&r0, s, sizeof r0);
    memcpy(&r1, s + lds, sizeof r1);
    memcpy(&r2, s + 2 * lds, sizeof r2);
    memcpy(&r3, s + 3 * lds, sizeof r3);
#if defined(HVAE_DOUBLE)
    const F(vec) t0 = SHUF(r0, r1, 0, 4, 2, 6), t1 = SHUF(r0, r1, 1, 5, 3, 7);
    const F(vec) t2 = SHUF(r2, r3, 0, 4, 2, 6), t3 = SHUF(r2, r3, 1, 5, 3, 7);
    F(vec) c[4] = {SHUF(t0, t2, 0, 1, 4, 5), SHUF(t1, t3, 0, 1, 4, 5), SHUF(t0, t2, 2, 3, 6, 7),
                   SHUF(t1, t3, 2, 3, 6, 7)};
#else
    F(vec) r4, r5, r6, r7;
    memcpy(&r4, s + 4 * lds, sizeof r4);
    memcpy(&r5, s + 5 * lds, sizeof r5);
    memcpy(&r6, s + 6 * lds, sizeof r6);
    memcpy(&r7, s + 7 * lds, sizeof r7);
    /* pairs of rows interleaved, then pairs of pairs, then the 128-bit halves */
#define LO1 0, 8, 1, 9, 4, 12, 5, 13
#define HI1 2, 10, 3, 11, 6, 14, 7, 15
#define LO2 0, 1, 8, 9, 4, 5, 12, 13
#define HI2 2, 3, 10, 11, 6, 7, 14, 15
#define LO4 0, 1, 2, 3, 8, 9, 10, 11
#define HI4 4, 5, 6, 7, 12, 13, 14, 15
    const F(vec) t0 = SHUF(r0, r1, LO1), t1 = SHUF(r0, r1, HI1);
    const F(vec) t2 = SHUF(r2, r3, LO1), t3 = SHUF(r2, r3, HI1);
    const F(vec) t4 = SHUF(r4, r5, LO1), t5 = SHUF(r4, r5, HI1);
    const F(vec) t6 = SHUF(r6, r7, LO1), t7 = SHUF(r6, r7, HI1);
    const F(vec) u0 = SHUF(t0, t2, LO2), u1 = SHUF(t0, t2, HI2);
    const F(vec) u2 = SHUF(t1, t3, LO2), u3 = SHUF(t1, t3, HI2);
    const F(vec) u4 = SHUF(t4, t6, LO2), u5 = SHUF(t4, t6, HI2);
    const F(vec) u6 = SHUF(t5, t7, LO2), u7 = SHUF(t5, t7, HI2);
    F(vec) c[8] = {SHUF(u0, u4, LO4), SHUF(u1, u5, LO4), SHUF(u2, u6, LO4), SHUF(u3, u7, LO4),
                   SHUF(u0, u4, HI4), SHUF(u1, u5, HI4), SHUF(u2, u6, HI4), SHUF(u3, u7, HI4)};
#undef LO1
#undef HI1
#undef LO2
#undef HI2
#undef LO4
#undef HI4
#endif
    const F(vec) lim = (F(vec)){0} + limit;
    F(ivec) ok = (F(ivec)){0} - 1;
    for (int m = 0; m < VEC_LEN; m++) {
        if (accumulate) {
            F(vec) old;
            memcpy(&old, d + m * ldd, sizeof old);
            c[m] += old;
        }
        ok &= (c[m] <= lim) & (c[m] >= -lim);
        memcpy(d + m * ldd, &c[m], sizeof c[m]);
    }
    int all = 1;
    for (int l = 0; l < VEC_LEN; l++) all &= ok[l] != 0;
    return all;
}
#undef SHUF

/* One entry of the transposition, as transpose_block does it */
static inline int F(transpose_one)(real *d, const real *s, int accumulate, real limit) {
    const real v = accumulate ? *d + *s : *s;
    *d = v;
    return v <= limit && v >= -limit;
}

/* dst (cols, ldd) = src (rows, lds)^T: dst[c * ldd + r] = src[r * lds + c], or += (accumulate);
 * returns whether every value written is within [-limit, limit]. Blocks of VEC_LEN rows of src
 * are read along the rows (by_src_rows) or along the columns, so that the side that comes from
 * memory is the one read or written row by row. */
HVAE_CLONES static int F(transpose)(real *restrict dst, size_t ldd, const real *restrict src,
                                    size_t lds, size_t rows, size_t cols, int accumulate,
                                    real limit, int by_src_rows) {
    const size_t R = rows / VEC_LEN * VEC_LEN, C = cols / VEC_LEN * VEC_LEN;
    int ok = 1;
    if (by_src_rows) {
        for (size_t r = 0; r < R; r += VEC_LEN)
            for (size_t c = 0; c < C; c += VEC_LEN)
                ok &= F(transpose_block)(dst + c * ldd + r, ldd, src + r * lds + c, lds,
                                         accumulate, limit);
    } else {
        for (size_t c = 0; c < C; c += VEC_LEN)
            for (size_t r = 0; r < R; r += VEC_LEN)
                ok &= F(transpose_block)(dst + c * ldd + r, ldd, src + r * lds + c, lds,
                                         accumulate, limit);
    }
    for (size_t r = 0; r < rows; r++) /* the tails: columns C.. of every row, rows R.. */
        for (size_t c = r < R ? C : 0; c < cols; c++)
            ok &= F(transpose_one)(dst + c * ldd + r, src + r * lds + c, accumulate, limit);
    return ok;
}

/* Counts of nonzeros: returns row xb's (D,), adds each entry's to its column's count */
HVAE_CLONES static int F(count_nonzeros)(int *restrict col_count, const real *restrict xb,
                                         size_t D) {
    int count = 0;
    for (size_t c = 0; c < D; c++) {
        int nz = xb[c] != 0;
        count += nz;
        col_count[c] += nz;
    }
    return count;
}

/* The CSR and CSC of x, each part a range of rows, in two passes. Count: each row's nonzeros
 * into row_ptr[b+1], each column's among the part's rows into cols[part * D + c]. After the
 * caller's prefix sums (row_ptr; cols: where the part's rows start in each column), fill: each
 * row's columns and values, then the row into its columns (rows in increasing order within a
 * column: part 0's first). */
typedef struct {
    const F(sparse_x) *sx;
    const real *x;
    int *cols; /* (n_parts, D) */
    int B, D, fill;
} F(index_job);

static void F(index_part)(void *p, int part, int n_parts) {
    const F(index_job) *j = p;
    const F(sparse_x) *sx = j->sx;
    const size_t D = (size_t)j->D;
    int *cols = j->cols + (size_t)part * D;
    size_t lo, hi;
    part_range((size_t)j->B, 1, part, n_parts, &lo, &hi);
    if (!j->fill) {
        memset(cols, 0, sizeof(int) * D);
        for (size_t b = lo; b < hi; b++)
            sx->row_ptr[b + 1] = F(count_nonzeros)(cols, j->x + b * D, D);
        return;
    }
    for (size_t b = lo; b < hi; b++) {
        const int start = sx->row_ptr[b], end = sx->row_ptr[b + 1];
        const real *xb = j->x + b * D;
        /* branch-free: write always, advance on a nonzero; stop at the row's last nonzero, so
         * that no write reaches the next row's slots (another part's) */
        for (int at = start, c = 0; at < end; c++) {
            sx->idx[at] = c;
            sx->val[at] = xb[c];
            at += xb[c] != 0;
        }
        for (int k = start; k < end; k++) {
            const int at = cols[sx->idx[k]]++;
            sx->cidx[at] = (int)b;
            sx->cval[at] = sx->val[k];
        }
    }
}

/* Builds sx's CSR and CSC of x (B, D) over the team when it has at most sx->cap nonzeros;
 * returns whether it did. */
static int F(sparse_index)(const F(sparse_x) *sx, const real *x, int B, int D) {
    hvae_team *tm = team_for((double)B * D, (double)PAR_MIN_ELEMS);
    int n_parts = hvae_team_size(tm);
    int *cols = sx->col_next; /* one part's column counts fit there */
    if (n_parts > 1) {
        cols = hvae_team_scratch(tm, sizeof(int) * (size_t)n_parts * D);
        if (!cols) { /* no room for every part's counts: the calling thread alone */
            tm = NULL;
            n_parts = 1;
            cols = sx->col_next;
        }
    }
    F(index_job) ij = {sx, x, cols, B, D, 0};
    hvae_team_run(tm, F(index_part), &ij);
    size_t nnz = 0;
    sx->row_ptr[0] = 0;
    for (int b = 0; b < B; b++) {
        nnz += (size_t)sx->row_ptr[b + 1];
        if (nnz > sx->cap) return 0;
        sx->row_ptr[b + 1] = (int)nnz;
    }
    int at = 0;
    for (int c = 0; c < D; c++) {
        sx->col_ptr[c] = at;
        for (int k = 0; k < n_parts; k++) {
            int count = cols[(size_t)k * D + c];
            cols[(size_t)k * D + c] = at;
            at += count;
        }
    }
    sx->col_ptr[D] = at;
    ij.fill = 1;
    hvae_team_run(tm, F(index_part), &ij);
    return 1;
}

/* The forward: each part writes W[lo:hi, :]^T of its features into wt, then the output columns
 * of those features for every row. */
typedef struct {
    real *out;
    const F(sparse_x) *sx;
    const real *weight, *bias;
    int B, D, O, act;
} F(sparse_fwd_job);

static void F(sparse_forward_part)(void *p, int part, int n_parts) {
    const F(sparse_fwd_job) *j = p;
    const size_t D = (size_t)j->D, O = (size_t)j->O;
    const F(sparse_x) *sx = j->sx;
    size_t lo, hi;
    own_range(j->O, part, n_parts, &lo, &hi);
    for (size_t o0 = lo; o0 < hi; o0 += CHUNK) {
        const size_t n = hi - o0 < CHUNK ? hi - o0 : CHUNK;
        real *wt = sx->wt + o0 * D; /* (D, n) */
        F(transpose)(wt, n, j->weight + o0 * D, D, n, D, 0, REAL_MAX, 1); /* no check */
        for (int b = 0; b < j->B; b++) {
            real *ob = j->out + (size_t)b * O + o0;
            F(gather_sum)(ob, wt, n, sx->idx, sx->val, sx->row_ptr[b], sx->row_ptr[b + 1],
                          (int)n);
            F(bias_act_range)(ob, j->bias + o0, n, j->act);
        }
    }
}

/* out (B,O) = act(x @ W^T + b) as linear_forward, through the sparse kernels when x (B,D) has
 * at most sx->cap nonzeros; returns 0, computing nothing, otherwise. Records which in
 * sx->state for the backward. */
static int F(sparse_linear_forward)(real *out, const F(sparse_x) *sx, const real *x,
                                    const real *weight, const real *bias, int B, int D, int O,
                                    int act) {
    if (!sx->cap) return 0;
    *sx->state = F(sparse_index)(sx, x, B, D);
    if (!*sx->state) return 0;
    F(sparse_fwd_job) fj = {out, sx, weight, bias, B, D, O, act};
    hvae_team_run(team_for(2.0 * (double)sx->row_ptr[B] * O, PAR_MIN_FLOPS),
                  F(sparse_forward_part), &fj);
    return 1;
}

/* The weight and bias gradients: each part the rows of the features it owns, dW by chunks of
 * features: the chunk's gradient summed input by input into its free W^T chunk, (D, n), then
 * transposed into dW's rows. */
typedef struct {
    real *dweight, *dbias;
    const F(sparse_x) *sx;
    const real *dout;
    int B, D, O, accumulate;
    int *grad_ok;
} F(sparse_bwd_job);

static void F(sparse_backward_part)(void *p, int part, int n_parts) {
    const F(sparse_bwd_job) *j = p;
    const F(sparse_x) *sx = j->sx;
    const size_t D = (size_t)j->D, O = (size_t)j->O;
    size_t lo, hi;
    own_range(j->O, part, n_parts, &lo, &hi);
    if (hi <= lo) return;
    if (!j->accumulate)
        for (size_t o = lo; o < hi; o++) j->dbias[o] = 0;
    F(add_rows)(j->dbias + lo, j->dout + lo, (size_t)j->B, O, hi - lo);
    int ok = 1;
    for (size_t o0 = lo; o0 < hi; o0 += CHUNK) {
        const size_t n = hi - o0 < CHUNK ? hi - o0 : CHUNK;
        real *dwt = sx->wt + o0 * D; /* (D, n): the forward's W^T chunk, free now */
        /* the chunk's columns of d out made contiguous: read in place, rows O reals apart
         * (2 KiB for 512 float32) fell into a few sets of the L1 cache and came from L2 */
        real *dc = sx->dout + o0 * (size_t)j->B;
        for (size_t b = 0; b < (size_t)j->B; b++)
            memcpy(dc + b * n, j->dout + b * O + o0, sizeof(real) * n);
        for (size_t c = 0; c < D; c++)
            F(gather_sum)(dwt + c * n, dc, n, sx->cidx, sx->cval, sx->col_ptr[c],
                          sx->col_ptr[c + 1], (int)n);
        /* dW[o0:o0+n, :] (+)= dwt^T, written row by row, checked on the way */
        ok &= F(transpose)(j->dweight + o0 * D, D, dwt, n, D, n, j->accumulate, GRAD_LIMIT, 0);
    }
    if (j->grad_ok && !(ok && F(adam_grad_ok)(j->dbias + lo, hi - lo))) j->grad_ok[part] = 0;
}

/* dweight (O,D), dbias (O,) += (accumulate) or = (not), as linear_backward without an input
 * gradient, after sparse_linear_forward took the sparse kernels for this x; dout (B,O) */
static void F(sparse_linear_backward)(int *grad_ok, real *dweight, real *dbias,
                                      const F(sparse_x) *sx, const real *dout, int B, int D,
                                      int O, int accumulate) {
    F(sparse_bwd_job) bj = {dweight, dbias, sx, dout, B, D, O, accumulate, grad_ok};
    hvae_team_run(team_for(2.0 * (double)sx->row_ptr[B] * O + (double)B * O, PAR_MIN_FLOPS),
                  F(sparse_backward_part), &bj);
}
