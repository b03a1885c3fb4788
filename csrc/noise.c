/* noise.c - the precision-independent half of the core's noise (noise.h): Philox4x64-10 and the
 * ziggurat's tables. */
#define _POSIX_C_SOURCE 200809L
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
