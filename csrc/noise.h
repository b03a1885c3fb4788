/* noise.h - counter-based standard normal noise for the core (noise.c, noise_fill.c): the values
 * of row r are a function of (seed, r) alone, so they do not depend on how the rows are split
 * over calls, threads or MPI ranks (for a given libm: the tables and the rare branches call exp,
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

#include <stddef.h>
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

/* s (4,): the xoshiro256++ state of row `row` under `seed`. */
void hvae_noise_seed_row(uint64_t s[4], uint64_t seed, uint64_t row);

/* out (n,): the next n standard normals of the stream whose state is s (advanced). */
void hvae_noise_normals(double *out, size_t n, uint64_t s[4]);

#endif /* HVAE_NOISE_H */
