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

void hvae_philox4x64(uint64_t out[4], const uint64_t ctr[4], const uint64_t key[2]) {
    uint64_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3], k0 = key[0], k1 = key[1];
    for (int round = 0; round < PHILOX_ROUNDS; round++) {
        if (round > 0) k0 += PHILOX_W0, k1 += PHILOX_W1;
        const unsigned __int128 p0 = (unsigned __int128)PHILOX_M0 * c0;
        const unsigned __int128 p1 = (unsigned __int128)PHILOX_M1 * c2;
        const uint64_t hi0 = (uint64_t)(p0 >> 64), lo0 = (uint64_t)p0;
        const uint64_t hi1 = (uint64_t)(p1 >> 64), lo1 = (uint64_t)p1;
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
    const double v = r * fr + sqrt(acos(-1.0) / 2) * erfc(r / sqrt(2.0));
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
