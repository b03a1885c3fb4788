/* topdown.c - the top-down (Ladder VAE) inference chain of DESIGN.md §6 over model.c's buffers:
 * a deterministic bottom-up pass d_i = encoder i's last hidden layer (d_0 = x) giving
 * [mu^_i, logvar^_i], then from the top q(z_T | x) = N(mu^_T, exp(logvar^_T)) and, for i < T,
 * q(z_i | z_{i+1}, x) the precision-weighted merge of N(mu^_i, exp(logvar^_i)) with
 * p(z_i | z_{i+1}) = decoder i+1 (z_{i+1}), shared by p and q. The loss terms are model.c's.
 * Generic in `real`; compiled through f32.c and f64.c after model.c.
 *
 * Levels are 1-based in the math and 0-based in arrays: level i lives at index i-1.
 */
#include "hvae.h"
#include "real.h"

/* gauss_merge_forward into q (dq NULL), or gauss_merge_backward from dq into dmulv, dms, over
 * the current team, each part a range of rows. q, dq, mulv, dmulv (B, 2d); ms, dms (B, 2d)
 * when learned, else (B, d). */
typedef struct {
    real *q, *dmulv, *dms;
    const real *dq, *mulv, *ms;
    int learned, B, d;
} F(merge_job);

static void F(merge_part)(void *p, int part, int n_parts) {
    const F(merge_job) *j = p;
    size_t lo, hi, d = (size_t)j->d, w = j->learned ? 2 * d : d;
    part_range((size_t)j->B, ALIGN_ROWS, part, n_parts, &lo, &hi);
    if (hi <= lo) return;
    const real *mulv = j->mulv + lo * 2 * d, *ms = j->ms + lo * w;
    if (j->dq)
        F(gauss_merge_backward)(j->dmulv + lo * 2 * d, j->dms + lo * w, j->dq + lo * 2 * d, mulv,
                                ms, j->learned, (int)(hi - lo), j->d);
    else
        F(gauss_merge_forward)(j->q + lo * 2 * d, mulv, ms, j->learned, (int)(hi - lo), j->d);
}

static void F(merge_over_team)(F(merge_job) *j) {
    hvae_team_run(team_for((double)j->B * j->d, (double)PAR_MIN_ELEMS), F(merge_part), j);
}

/* d_i, the input of encoder i+1 (0-based i): encoder i's last hidden layer */
static real *F(hidden_top)(real *const *outs, const hvae_mlp *mlp) {
    return outs[mlp->n_layers - 2];
}

static void F(topdown_pass)(F(buffers) *bf, const hvae_model *m, const real *params,
                            const real *x, const real *const *eps, int B, int n_x) {
    const hvae_config *c = &m->cfg;
    const int T = c->n_levels;
    /* bottom-up, once per example: d_i and [mu^_i, logvar^_i] = the outputs of encoder i, the
     * latter expanded to the example's B / n_x rows */
    const real *in = x;
    for (int i = 0; i < T; i++) {
        F(mlp_forward)(bf->enc[i], &m->enc[i], params, in, i == 0 ? &bf->sx : NULL, n_x,
                       c->activation);
        in = F(hidden_top)(bf->enc[i], &m->enc[i]);
    }
    for (int i = 0; i < T; i++)
        F(rows_expand)(bf->enc[i][m->enc[i].n_layers - 1], n_x, B / n_x, 2 * c->z_dim[i]);
    /* top-down: z_T ~ q(z_T | x); then p(z_i | z_{i+1}), the merge, z_i ~ q(z_i | z_{i+1}, x) */
    for (int i = T - 1; i >= 0; i--) {
        if (i < T - 1) {
            const real *prior = F(decoder)(bf, m, params, i + 1, bf->z[i + 1], B);
            F(merge_job) mj = {bf->q[i], NULL, NULL, NULL, F(last)(bf->enc[i], &m->enc[i]), prior,
                               F(learned_prior)(c, i + 1), B, c->z_dim[i]};
            F(merge_over_team)(&mj);
        }
        F(reparam_job) rj = {bf->z[i], NULL, NULL, bf->q[i], eps ? eps[i] : NULL, B, c->z_dim[i]};
        F(reparam_over_team)(&rj);
    }
}

/* After the loss terms: bf->dz[0] and decoder 1's output gradient hold the likelihood's part,
 * bf->dq, bf->dz and decoders 2..T's output gradients the KL terms' (all summed into). */
static void F(topdown_backward)(real *grad, int *grad_ok, int accumulate, F(buffers) *bf,
                                const hvae_model *m, const real *params, const real *x,
                                const real *const *eps, int B, int n_x) {
    const hvae_config *c = &m->cfg;
    const int T = c->n_levels, act = c->activation;
    /* decoder 1 -> d z_1; then up: z_i -> q_i -> (mu^_i, logvar^_i) and p(z_i | z_{i+1}) ->
     * decoder i+1 -> d z_{i+1}, complete by then */
    F(mlp_backward)(grad, bf->dz[0], grad_ok, bf->ddec[0], bf->dec[0], &m->dec[0], params,
                    bf->z[0], NULL, B, act, accumulate, 0);
    for (int i = 0; i < T; i++) {
        const hvae_mlp *enc = &m->enc[i];
        F(reparam_job) rj = {NULL, bf->dq[i], bf->dz[i], bf->q[i], eps ? eps[i] : NULL, B,
                             c->z_dim[i]};
        F(reparam_over_team)(&rj);
        if (i == T - 1) break; /* q_T is encoder T's output: dq[T-1] is its gradient */
        const hvae_mlp *dec = &m->dec[i + 1];
        F(merge_job) mj = {NULL, bf->denc[i][enc->n_layers - 1], bf->ddec[i + 1][dec->n_layers - 1],
                           bf->dq[i], F(last)(bf->enc[i], enc), F(last)(bf->dec[i + 1], dec),
                           F(learned_prior)(c, i + 1), B, c->z_dim[i]};
        F(merge_over_team)(&mj);
        F(mlp_backward)(grad, bf->dz[i + 1], grad_ok, bf->ddec[i + 1], bf->dec[i + 1], dec,
                        params, bf->z[i + 1], NULL, B, act, accumulate, 0);
    }
    /* the bottom-up pass, top first, once per example (its rows' gradients summed): encoder i+1
     * adds d d_i into encoder i's last hidden layer */
    for (int i = T - 1; i >= 0; i--) {
        F(rows_sum)(bf->denc[i][m->enc[i].n_layers - 1], n_x, B / n_x, 2 * c->z_dim[i]);
        F(mlp_backward)(grad, i > 0 ? F(hidden_top)(bf->denc[i - 1], &m->enc[i - 1]) : NULL,
                        grad_ok, bf->denc[i], bf->enc[i], &m->enc[i], params,
                        i > 0 ? F(hidden_top)(bf->enc[i - 1], &m->enc[i - 1]) : x,
                        i > 0 ? NULL : &bf->sx, n_x, act, accumulate, i < T - 1);
    }
}
