/* vecmath.c - exp, expm1, log1p, tanh, softplus and sigmoid written so that loops calling them
 * auto-vectorise (inline, branch-free, no libm calls), generic in `real` (see real.h; included
 * by f32.c and f64.c before layers.c). No fast-math: every operation is IEEE; the accuracy comes
 * from range reduction and polynomials, measured against libm by tests/test_vecmath.py (a few
 * ulp in float32 and float64).
 *
 * exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln2 / 2, exp(r) by its Taylor polynomial
 * (degree 7 in float32, 13 in float64), 2^n built in the exponent bits. exp never returns inf
 * or NaN for finite input: it saturates near FLT_MAX / DBL_MAX, and results below the smallest
 * normal number are flushed to 0 (an absolute error under 1.2e-38 / 2.3e-308).
 */
#include <stdint.h>
#include <string.h>

#include "hvae.h"
#include "real.h"

#if defined(HVAE_DOUBLE)
typedef uint64_t ruint_t;
#define ROUND_MAGIC 6755399441055744.0
#define EXP_MAX 709.0
#define EXP_MIN -708.39641853226410 /* log(DBL_MIN) */
#define MANT_BITS 52
#define EXP_BIAS 1023
#define LN2_HI 6.93147180369123816490e-01
#define LN2_LO 1.90821492927058770002e-10
#else
typedef uint32_t ruint_t;
#define ROUND_MAGIC 12582912.0f
#define EXP_MAX 88.0f
#define EXP_MIN -87.336544750553102f /* log(FLT_MIN) */
#define MANT_BITS 23
#define EXP_BIAS 127
#define LN2_HI 0.693145751953125f
#define LN2_LO 1.428606765330187045e-06f
#endif
#define LOG2E ((real)1.44269504088896340736)
#define LN2 ((real)0.693147180559945309417)

static inline real F(bits_to_real)(ruint_t u) {
    real r;
    memcpy(&r, &u, sizeof r);
    return r;
}

/* exp(r) - 1 for |r| <= ln2/2 (Horner form of the Taylor series, alternating-free) */
static inline real F(expm1_small)(real r) {
#if defined(HVAE_DOUBLE)
    real p = 1.0 / 6227020800.0;     /* 1/13! */
    p = p * r + 1.0 / 479001600.0;   /* 1/12! */
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
#else
    real p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
#endif
    return r + r * r * p;
}

/* Rounding to an integer by adding 1.5 * 2^MANT_BITS: the sum's low mantissa bits hold n (valid
 * in the default round-to-nearest mode, which is why fast-math must never be used here). */
static inline real F(vexp)(real x) {
    real under = x < (real)EXP_MIN ? (real)0 : (real)1; /* results below the normal range: 0 */
    x = x > (real)EXP_MAX ? (real)EXP_MAX : x;
    x = x < (real)EXP_MIN ? (real)EXP_MIN : x;
    real t = x * LOG2E + (real)ROUND_MAGIC;
    real fn = t - (real)ROUND_MAGIC;
    real r = (x - fn * (real)LN2_HI) - fn * (real)LN2_LO;
    ruint_t u;
    memcpy(&u, &t, sizeof u);
    ruint_t scale = (u + (ruint_t)EXP_BIAS) << MANT_BITS; /* 2^n, n + bias in [1, 2 bias] */
    return ((real)1 + F(expm1_small)(r)) * F(bits_to_real)(scale) * under;
}

/* exp(x) - 1, accurate also near 0 */
static inline real F(vexpm1)(real x) {
    real small = F(expm1_small)(x);
    real big = F(vexp)(x) - (real)1;
    real ax = x >= 0 ? x : -x;
    return ax <= (real)0.34657359027997264 ? small : big;
}

/* log(u) for u in [1, 2]: u = 2^k m with m in [sqrt(1/2), sqrt(2)], log m = 2 atanh(s),
 * s = (m - 1) / (m + 1), |s| <= 0.1716 */
static inline real F(log_1_2)(real u) {
    int up = u > (real)1.41421356237309504880;
    real m = up ? u * (real)0.5 : u;
    real s = (m - (real)1) / (m + (real)1), s2 = s * s;
#if defined(HVAE_DOUBLE)
    real p = 1.0 / 21;
    p = p * s2 + 1.0 / 19;
    p = p * s2 + 1.0 / 17;
    p = p * s2 + 1.0 / 15;
    p = p * s2 + 1.0 / 13;
    p = p * s2 + 1.0 / 11;
    p = p * s2 + 1.0 / 9;
    p = p * s2 + 1.0 / 7;
    p = p * s2 + 1.0 / 5;
    p = p * s2 + 1.0 / 3;
#else
    real p = 1.0f / 9;
    p = p * s2 + 1.0f / 7;
    p = p * s2 + 1.0f / 5;
    p = p * s2 + 1.0f / 3;
#endif
    return (up ? LN2 : (real)0) + (real)2 * (s + s * s2 * p);
}

/* log(1 + t) for t in [0, 1], relatively accurate for small t (Goldberg: the rounding of 1 + t
 * is corrected by t / (u - 1)) */
static inline real F(vlog1p_01)(real t) {
    real u = (real)1 + t, d = u - (real)1;
    real l = F(log_1_2)(u);
    return d == 0 ? t : l * (t / d);
}

/* tanh(x) = expm1(2|x|) / (expm1(2|x|) + 2), odd-symmetric, saturating to +-1. expm1(y), y >= 0,
 * from one range reduction: y = n ln2 + r, expm1(y) = 2^n expm1(r) + (2^n - 1), a sum of two
 * non-negative terms, so accurate for small y too (for n = 0 it is expm1_small(r) itself). */
static inline real F(vtanh)(real x) {
    real ax = x >= 0 ? x : -x;
    ax = ax > (real)30 ? (real)30 : ax; /* tanh(30) rounds to 1; 2^n stays in range */
    const real y = (real)2 * ax;
    const real t = y * LOG2E + (real)ROUND_MAGIC;
    const real fn = t - (real)ROUND_MAGIC;
    const real r = (y - fn * (real)LN2_HI) - fn * (real)LN2_LO;
    ruint_t u;
    memcpy(&u, &t, sizeof u);
    const real s = F(bits_to_real)((u + (ruint_t)EXP_BIAS) << MANT_BITS); /* 2^n, n in [0, 87] */
    const real e = s * F(expm1_small)(r) + (s - (real)1);
    const real th = e / (e + (real)2);
    return x >= 0 ? th : -th;
}

/* softplus(l) = log(1 + exp(l)) = max(l, 0) + log1p(exp(-|l|)) */
static inline real F(vsoftplus)(real l) {
    real al = l >= 0 ? l : -l;
    return (l > 0 ? l : (real)0) + F(vlog1p_01)(F(vexp)(-al));
}

/* sigmoid(l) = 1 / (1 + exp(-l)), from exp(-|l|) so nothing overflows */
static inline real F(vsigmoid)(real l) {
    real al = l >= 0 ? l : -l;
    real e = F(vexp)(-al);
    real s = (real)1 / ((real)1 + e);
    return l >= 0 ? s : e * s;
}

/* 1 when every |v[k]| <= limit (NaN fails the comparison): a loop that vectorises */
static inline int F(all_below)(const real *restrict v, size_t n, real limit) {
    int bad = 0;
    for (size_t k = 0; k < n; k++) bad |= !(v[k] <= limit && v[k] >= -limit);
    return !bad;
}

/* Public for the accuracy tests (hvae.h): out (n,) = op(in) with op 0 exp, 1 expm1, 2 log1p on
 * [0, 1], 3 tanh, 4 softplus, 5 sigmoid. HVAE_EINVAL for another op. */
HVAE_CLONES hvae_status F(hvae_vecmath)(real *out, const real *in, size_t n, int op) {
    switch (op) {
    case 0: for (size_t k = 0; k < n; k++) out[k] = F(vexp)(in[k]); break;
    case 1: for (size_t k = 0; k < n; k++) out[k] = F(vexpm1)(in[k]); break;
    case 2: for (size_t k = 0; k < n; k++) out[k] = F(vlog1p_01)(in[k]); break;
    case 3: for (size_t k = 0; k < n; k++) out[k] = F(vtanh)(in[k]); break;
    case 4: for (size_t k = 0; k < n; k++) out[k] = F(vsoftplus)(in[k]); break;
    case 5: for (size_t k = 0; k < n; k++) out[k] = F(vsigmoid)(in[k]); break;
    default: return HVAE_EINVAL;
    }
    return HVAE_OK;
}

#undef EXP_MAX
#undef ROUND_MAGIC
#undef EXP_MIN
#undef MANT_BITS
#undef EXP_BIAS
#undef LN2_HI
#undef LN2_LO
#undef LOG2E
#undef LN2
