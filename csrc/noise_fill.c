/* noise_fill.c - standard normal noise for every level of a batch (noise.h's streams) over the
 * current team, generic in `real` (compiled through f32.c and f64.c after layers.c). */
#include "noise.h"

#define NOISE_CHUNK 256 /* normals drawn into a stack buffer at a time */

/* eps[i] (rows, d_{i+1}): row r of every level, level 1 first, from the stream of row
 * first_row + r under seed; each part of the team a range of rows. */
typedef struct {
    real *const *eps;
    const hvae_model *m;
    int rows;
    uint64_t seed, first_row;
} F(noise_job);

static void F(noise_part)(void *p, int part, int n_parts) {
    const F(noise_job) *j = p;
    const int T = j->m->cfg.n_levels;
    size_t lo, hi;
    part_range((size_t)j->rows, 1, part, n_parts, &lo, &hi);
    double buf[NOISE_CHUNK];
    for (size_t r = lo; r < hi; r++) {
        uint64_t s[4];
        hvae_noise_seed_row(s, j->seed, j->first_row + r);
        for (int i = 0; i < T; i++) {
            const size_t d = (size_t)j->m->cfg.z_dim[i];
            real *row = j->eps[i] + r * d;
            for (size_t c0 = 0; c0 < d; c0 += NOISE_CHUNK) {
                const size_t len = d - c0 < NOISE_CHUNK ? d - c0 : NOISE_CHUNK;
                hvae_noise_normals(buf, len, s);
                for (size_t c = 0; c < len; c++) row[c0 + c] = (real)buf[c];
            }
        }
    }
}

hvae_status F(hvae_noise)(real *const *eps, const hvae_model *m, int rows, uint64_t seed,
                          uint64_t first_row) {
    if (rows < 0 || !eps) return HVAE_EINVAL;
    size_t per_row = 0;
    for (int i = 0; i < m->cfg.n_levels; i++) {
        if (!eps[i]) return HVAE_EINVAL;
        per_row += (size_t)m->cfg.z_dim[i];
    }
    F(noise_job) j = {eps, m, rows, seed, first_row};
    hvae_team_run(team_for((double)rows * (double)per_row, (double)PAR_MIN_ELEMS), F(noise_part),
                  &j);
    return HVAE_OK;
}
