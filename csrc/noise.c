/* noise.c - the precision-independent half of the core's noise (noise.h): Philox4x64-10, the
 * xoshiro256++ streams and the ziggurat. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>

#include "noise.h"

/* Philox4x64's multipliers and key increments (Salmon et al. 2011, Random123) */
#define PHILOX_M0 UINT64_C(0xD2E7470EE14C6C93)
#define PHILOX_M1 UINT64_C(0xCA5A826395121157)
#define PHILOX_W0 UINT64_C(0x9E3779B97F4A7C15)
#define PHILOX_W1 UINT64_C(0xBB67AE8584CAA73B)
#define PHILOX_ROUNDS 10

/* *hi, *lo = the 128-bit product a * b */
static void mul128(uint64_t a, uint64_t b, uint64_t *hi, uint64_t *lo) {
#if defined(__SIZEOF_INT128__)
    const unsigned __int128 p = (unsigned __int128)a * b;
    *hi = (uint64_t)(p >> 64);
    *lo = (uint64_t)p;
#else /* four 32 x 32 -> 64 products */
    const uint64_t a0 = a & 0xffffffffu, a1 = a >> 32, b0 = b & 0xffffffffu, b1 = b >> 32;
    const uint64_t p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
    const uint64_t mid = (p00 >> 32) + (p01 & 0xffffffffu) + (p10 & 0xffffffffu);
    *lo = (mid << 32) | (p00 & 0xffffffffu);
    *hi = p11 + (p01 >> 32) + (p10 >> 32) + (mid >> 32);
#endif
}

void hvae_philox4x64(uint64_t out[4], const uint64_t ctr[4], const uint64_t key[2]) {
    uint64_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3], k0 = key[0], k1 = key[1];
    for (int round = 0; round < PHILOX_ROUNDS; round++) {
        if (round > 0) k0 += PHILOX_W0, k1 += PHILOX_W1;
        uint64_t hi0, lo0, hi1, lo1;
        mul128(PHILOX_M0, c0, &hi0, &lo0);
        mul128(PHILOX_M1, c2, &hi1, &lo1);
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
    }
    out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}

/* The right edge of the base strip for 256 layers (Marsaglia & Tsang 2000); the layer area v
 * follows from it: r f(r) + the tail's mass sqrt(pi / 2) erfc(r / sqrt 2). */
#define ZIG_R 3.6541528853610088

static hvae_zig_tables tables;
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;

static void build_tables(void) {
    const double r = ZIG_R, fr = exp(-0.5 * r * r);
    const double v = r * fr + sqrt(3.14159265358979323846 / 2) * erfc(r / sqrt(2.0));
    tables.x[0] = v / fr;
    tables.x[1] = r;
    for (int i = 1; i < HVAE_ZIG_LAYERS - 1; i++)
        tables.x[i + 1] = sqrt(-2.0 * log(v / tables.x[i] + exp(-0.5 * tables.x[i] * tables.x[i])));
    tables.x[HVAE_ZIG_LAYERS] = 0.0;
    for (int i = 0; i <= HVAE_ZIG_LAYERS; i++)
        tables.f[i] = exp(-0.5 * tables.x[i] * tables.x[i]);
}

const hvae_zig_tables *hvae_noise_tables(void) {
    pthread_once(&tables_once, build_tables);
    return &tables;
}

void hvae_noise_seed_row(uint64_t s[4], uint64_t seed, uint64_t row) {
    const uint64_t ctr[4] = {row, 0, 0, 0}, key[2] = {seed, 0};
    hvae_philox4x64(s, ctr, key);
    if (!(s[0] | s[1] | s[2] | s[3])) s[0] = 1; /* xoshiro's one state that stays 0 */
}

static uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

/* xoshiro256++ on the state in four variables: u = the next 64 bits */
#define XOSHIRO_NEXT(u, s0, s1, s2, s3)                                                           \
    do {                                                                                          \
        const uint64_t t_ = (s1) << 17;                                                           \
        (u) = rotl64((s0) + (s3), 23) + (s0);                                                     \
        (s2) ^= (s0);                                                                             \
        (s3) ^= (s1);                                                                             \
        (s1) ^= (s2);                                                                             \
        (s0) ^= (s3);                                                                             \
        (s2) ^= t_;                                                                               \
        (s3) = rotl64((s3), 45);                                                                  \
    } while (0)

static uint64_t next_bits(uint64_t s[4]) {
    uint64_t u;
    XOSHIRO_NEXT(u, s[0], s[1], s[2], s[3]);
    return u;
}

/* A uniform on [0, 1) (open: (0, 1]) from the top 53 bits. */
static double uniform(uint64_t s[4], int open) {
    return (double)(int64_t)((next_bits(s) >> 11) + (uint64_t)(open != 0)) * 0x1p-53;
}

/* The ziggurat's rare branches for the draw u whose point z = |candidate| fell outside the
 * rectangle x[i+1] of its layer i: from layer 0, a draw from the tail beyond r (Marsaglia
 * 1964); from layer i >= 1, the point kept when under f (its height uniform between f(x[i])
 * and f(x[i+1])). 1 with *out set, or 0: draw again. Kept out of line so that the fast path
 * holds the state in registers. */
static __attribute__((noinline)) int slow_draw(double *out, uint64_t s[4], uint64_t u, double z,
                                               const hvae_zig_tables *t) {
    const int i = (int)(u & 0xff);
    const double sign = (u >> 8) & 1 ? -1.0 : 1.0;
    if (i == 0) {
        const double r = t->x[1];
        double a, b;
        do {
            a = -log(uniform(s, 1)) / r;
            b = -log(uniform(s, 1));
        } while (b + b < a * a);
        *out = sign * (r + a);
        return 1;
    }
    const double y = t->f[i] + uniform(s, 0) * (t->f[i + 1] - t->f[i]);
    if (!(y < exp(-0.5 * z * z))) return 0;
    *out = sign * z;
    return 1;
}

/* Layer i >= 1 is the rectangle of width x[i] between heights f(x[i]) and f(x[i+1]); layer 0
 * the base strip of width x[0] under f(r) plus the tail beyond r. A point inside x[i+1] is
 * under the curve (about 99% of draws); the rest go to slow_draw. */
void hvae_noise_normals(double *out, size_t n, uint64_t s[4]) {
    const hvae_zig_tables *t = hvae_noise_tables();
    uint64_t s0 = s[0], s1 = s[1], s2 = s[2], s3 = s[3];
    for (size_t c = 0; c < n; c++) {
        for (;;) {
            uint64_t u;
            XOSHIRO_NEXT(u, s0, s1, s2, s3);
            const int i = (int)(u & 0xff);
            const double z = (double)(int64_t)(u >> 11) * 0x1p-53 * t->x[i];
            if (z < t->x[i + 1]) {
                out[c] = (u >> 8) & 1 ? -z : z;
                break;
            }
            uint64_t st[4] = {s0, s1, s2, s3};
            const int done = slow_draw(out + c, st, u, z, t);
            s0 = st[0], s1 = st[1], s2 = st[2], s3 = st[3];
            if (done) break;
        }
    }
    s[0] = s0, s[1] = s1, s[2] = s2, s[3] = s3;
}
