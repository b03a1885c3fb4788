/* noise.h - counter-based standard normal noise for the core (noise.c, noise_fill.c): the values
 * of row r are a function of (seed, r) alone, so they do not depend on how the rows are split
 * over calls, threads or MPI ranks (for a given libm: the tables and the wedge test call exp,
 * log, erfc). Precision-independent; C11 (with GCC's 128-bit integers where they exist), no
 * Python.
 *
 * Row r's stream: Philox4x64-10 (Salmon et al. 2011) of the counter (r, 0, 0, 0) under the key
 * (seed, 0) gives the 256-bit state of a xoshiro256++ generator (Blackman & Vigna 2021), whose
 * 64-bit outputs feed Marsaglia and Tsang's (2000) ziggurat with 256 layers: bits 0-7 pick the
 * layer, bit 8 the sign, bits 11-63 the uniform. Normals are computed in double; float32 noise
 * is the float64 noise rounded.
 */
#ifndef HVAE_NOISE_H
#define HVAE_NOISE_H

#include <math.h>
#include <stdint.h>

#define HVAE_ZIG_LAYERS 256

/* The ziggurat's layer edges x[0..256] (x[0] = v / f(r), x[1] = r, x[256] = 0) and the density
 * f(x) = exp(-x^2 / 2) at them; filled on the first call of hvae_noise_tables (thread safe; the
 * binding calls it when the module loads). */
typedef struct {
    double x[HVAE_ZIG_LAYERS + 1];
    double f[HVAE_ZIG_LAYERS + 1];
} hvae_zig_tables;

const hvae_zig_tables *hvae_noise_tables(void);

/* Philox4x64-10 of counter ctr (4 words) under key (2 words), into out (4 words). */
void hvae_philox4x64(uint64_t out[4], const uint64_t ctr[4], const uint64_t key[2]);

typedef struct {
    uint64_t s[4]; /* xoshiro256++ state */
    const hvae_zig_tables *t;
} hvae_noise_stream;

/* The stream of row `row` under `seed`. */
static inline void hvae_noise_stream_init(hvae_noise_stream *st, uint64_t seed, uint64_t row) {
    const uint64_t ctr[4] = {row, 0, 0, 0}, key[2] = {seed, 0};
    hvae_philox4x64(st->s, ctr, key);
    if (!(st->s[0] | st->s[1] | st->s[2] | st->s[3])) st->s[0] = 1; /* xoshiro's one bad state */
    st->t = hvae_noise_tables();
}

static inline uint64_t hvae_rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

/* xoshiro256++: the next 64 random bits. */
static inline uint64_t hvae_noise_bits(hvae_noise_stream *st) {
    uint64_t *s = st->s;
    const uint64_t out = hvae_rotl64(s[0] + s[3], 23) + s[0], t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = hvae_rotl64(s[3], 45);
    return out;
}

/* A uniform on [0, 1) (open: (0, 1]) from the top 53 bits. */
static inline double hvae_noise_uniform(hvae_noise_stream *st, int open) {
    return (double)(int64_t)((hvae_noise_bits(st) >> 11) + (uint64_t)(open != 0)) * 0x1p-53;
}

/* One standard normal. Layer i >= 1 is the rectangle of width x[i] between heights f(x[i]) and
 * f(x[i+1]); layer 0 the base strip of width x[0] under f(r) plus the tail beyond r. A point
 * inside x[i+1] is under the curve; otherwise it is kept when under f (layers >= 1) or replaced
 * by a draw from the tail (Marsaglia 1964). */
static inline double hvae_noise_normal(hvae_noise_stream *st) {
    const hvae_zig_tables *t = st->t;
    for (;;) {
        const uint64_t u = hvae_noise_bits(st);
        const int i = (int)(u & 0xff);
        const double sign = (u >> 8) & 1 ? -1.0 : 1.0;
        const double z = (double)(int64_t)(u >> 11) * 0x1p-53 * t->x[i];
        if (z < t->x[i + 1]) return sign * z;
        if (i == 0) { /* the tail beyond r */
            const double r = t->x[1];
            double a, b;
            do {
                a = -log(hvae_noise_uniform(st, 1)) / r;
                b = -log(hvae_noise_uniform(st, 1));
            } while (b + b < a * a);
            return sign * (r + a);
        }
        const double y = t->f[i] + hvae_noise_uniform(st, 0) * (t->f[i + 1] - t->f[i]);
        if (y < exp(-0.5 * z * z)) return sign * z;
    }
}

#endif /* HVAE_NOISE_H */
