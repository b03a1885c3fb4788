/* step.c - one training step in one call: forward, backward and Adam over the model's team
 * (hvae.h), no round trip to the caller between them. Generic in `real`; compiled through
 * f32.c and f64.c after model.c, whose static forward_pass and backward_pass it calls. */
#include "hvae.h"
#include "real.h"

/* Adam over the team: every part updates the parameters it owns (the rows and bias entries of
 * the features own_range gives it in every layer), whose gradient it computed and checked. */
typedef struct {
    real *params, *m1, *m2;
    const real *grad;
    const hvae_model *m;
    F(adam_consts) consts;
} F(adam_job);

static void F(adam_part)(void *p, int part, int n_parts) {
    const F(adam_job) *j = p;
    const hvae_model *m = j->m;
    for (int i = 0; i < 2 * m->cfg.n_levels; i++) {
        const hvae_mlp *mlp = i < m->cfg.n_levels ? &m->enc[i] : &m->dec[i - m->cfg.n_levels];
        for (int k = 0; k < mlp->n_layers; k++) {
            const hvae_linear *l = &mlp->layer[k];
            size_t lo, hi;
            own_range(l->out, part, n_parts, &lo, &hi);
            if (hi <= lo) continue;
            size_t at = l->weight + lo * (size_t)l->in, n = (hi - lo) * (size_t)l->in;
            F(adam_range)(j->params + at, j->m1 + at, j->m2 + at, j->grad + at, n, &j->consts);
            at = l->bias + lo;
            F(adam_range)(j->params + at, j->m1 + at, j->m2 + at, j->grad + at, hi - lo,
                          &j->consts);
        }
    }
}

hvae_status F(hvae_train_step)(real *terms, real *loss, int *updated, real *grad, real *params,
                               real *m1, real *m2, hvae_workspace *ws, const hvae_model *m,
                               const real *x, const real *target, const real *const *eps, int B,
                               real beta, const real *free_bits, const hvae_estimator *est,
                               const hvae_adam *opt, hvae_team *team) {
    hvae_team *caller_team = hvae_team_current();
    hvae_team_set_current(team);
    *updated = 0;
    int lik_done = 0;
    hvae_status st =
        F(forward_pass)(terms, NULL, loss, ws, m, params, x, target, eps, B, beta, free_bits, est,
                        &lik_done);
    int ok[HVAE_MAX_THREADS], all_ok = 1;
    for (int k = 0; k < HVAE_MAX_THREADS; k++) ok[k] = 1;
    if (st == HVAE_OK && isfinite(*loss))
        st = F(backward_pass)(grad, ok, 0, lik_done, ws, m, params, x, target, eps, B, beta,
                              free_bits, est);
    for (int k = 0; k < HVAE_MAX_THREADS; k++) all_ok &= ok[k];
    if (st == HVAE_OK && isfinite(*loss) && all_ok) {
        F(adam_job) j = {params, m1, m2, grad, m,
                         F(adam_consts_at)((real)opt->lr, (real)opt->beta1, (real)opt->beta2,
                                           (real)opt->eps, opt->step)};
        hvae_team_run(team_for((double)m->n_params, (double)PAR_MIN_ELEMS), F(adam_part), &j);
        *updated = 1;
    }
    hvae_team_set_current(caller_team);
    return st;
}
