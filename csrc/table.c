/* table.c - precision-independent bookkeeping: validating a model description, laying the
 * parameter table over the flat buffer, and sizing / owning the workspace. */
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>

#include "hvae.h"

int hvae_x_params_dim(const hvae_config *cfg) {
    return cfg->likelihood == HVAE_GAUSSIAN_LEARNED ? 2 * cfg->x_dim : cfg->x_dim;
}

int hvae_z_params_dim(const hvae_config *cfg, int level) {
    int d = cfg->z_dim[level - 2];
    return cfg->prior_var == HVAE_PRIOR_LEARNED ? 2 * d : d;
}

static int width_ok(int w) { return w >= 1 && w <= HVAE_MAX_WIDTH; }

/* Lay out one MLP in -> widths[0..n-1] (reversed when `reverse`) -> out, starting at *offset. */
static void mlp_init(hvae_mlp *mlp, size_t *offset, int in, const int *widths, int n, int reverse,
                     int out) {
    mlp->n_layers = n + 1;
    for (int j = 0; j <= n; j++) {
        hvae_linear *l = &mlp->layer[j];
        l->in = in;
        l->out = j < n ? widths[reverse ? n - 1 - j : j] : out;
        l->weight = *offset;
        l->bias = *offset + (size_t)l->out * (size_t)l->in;
        *offset = l->bias + (size_t)l->out;
        in = l->out;
    }
}

hvae_status hvae_model_init(hvae_model *m, const hvae_config *cfg) {
    int T = cfg->n_levels;
    if (T < 1 || T > HVAE_MAX_LEVELS || !width_ok(cfg->x_dim)) return HVAE_EINVAL;
    if ((unsigned)cfg->likelihood > HVAE_GAUSSIAN_LEARNED || (unsigned)cfg->activation > HVAE_LEAKY_RELU ||
        (unsigned)cfg->kl > HVAE_KL_MC || (unsigned)cfg->prior_var > HVAE_PRIOR_LEARNED ||
        (unsigned)cfg->inference > HVAE_TOP_DOWN)
        return HVAE_EINVAL;
    const int top_down = cfg->inference == HVAE_TOP_DOWN;
    if (top_down && cfg->deterministic) return HVAE_EINVAL;
    for (int i = 0; i < T; i++) {
        if (!width_ok(cfg->z_dim[i]) || cfg->n_hidden[i] < 0 || cfg->n_hidden[i] > HVAE_MAX_HIDDEN)
            return HVAE_EINVAL;
        if (top_down && cfg->n_hidden[i] < 1) return HVAE_EINVAL; /* d_i is a hidden layer */
        for (int j = 0; j < cfg->n_hidden[i]; j++)
            if (!width_ok(cfg->hidden[i][j])) return HVAE_EINVAL;
    }
    m->cfg = *cfg;
    size_t offset = 0, acts = 0;
    for (int i = 0; i < T; i++) { /* top-down: encoder i reads d_{i-1}, the last hidden layer below */
        int in = i == 0 ? cfg->x_dim
                 : top_down ? cfg->hidden[i - 1][cfg->n_hidden[i - 1] - 1]
                            : cfg->z_dim[i - 1];
        mlp_init(&m->enc[i], &offset, in, cfg->hidden[i], cfg->n_hidden[i], 0, 2 * cfg->z_dim[i]);
    }
    for (int i = 0; i < T; i++) {
        int out = i == 0 ? hvae_x_params_dim(cfg) : hvae_z_params_dim(cfg, i + 1);
        mlp_init(&m->dec[i], &offset, cfg->z_dim[i], cfg->hidden[i], cfg->n_hidden[i], 1, out);
    }
    for (int i = 0; i < T; i++) {
        for (int j = 0; j < m->enc[i].n_layers; j++) acts += (size_t)m->enc[i].layer[j].out;
        for (int j = 0; j < m->dec[i].n_layers; j++) acts += (size_t)m->dec[i].layer[j].out;
        acts += (size_t)cfg->z_dim[i];
        if (top_down && i < T - 1) acts += 2 * (size_t)cfg->z_dim[i]; /* q after the merge */
    }
    m->n_params = offset;
    m->act_per_example = acts;
    return HVAE_OK;
}

size_t hvae_sparse_capacity(const hvae_model *m, int batch) {
    if (batch < HVAE_SPARSE_MIN_BATCH) return 0;
    size_t cap = (size_t)batch * (size_t)m->cfg.x_dim / 4;
    return cap <= (size_t)INT_MAX ? cap : 0;
}

size_t hvae_workspace_bytes(const hvae_model *m, int batch, size_t real_size) {
    if (batch < 1) return 0;
    /* activations and their gradients */
    size_t per = 2 * m->act_per_example * real_size;
    if ((size_t)batch > SIZE_MAX / per) return 0;
    size_t bytes = per * (size_t)batch;
    if ((size_t)batch > (SIZE_MAX - bytes) / real_size) return 0;
    bytes += (size_t)batch * real_size; /* the importance weights of the rows */
    size_t cap = hvae_sparse_capacity(m, batch);
    if (cap) { /* the sparse first layer (model.c carves these in this order) */
        size_t D = (size_t)m->cfg.x_dim, O = (size_t)m->enc[0].layer[0].out;
        if (D > SIZE_MAX / 4 / O) return 0;
        size_t reals = D * O + (size_t)batch * O + 2 * cap; /* W^T, d out by chunks, values
                                                                * by rows and by columns */
        size_t ints = 1 + ((size_t)batch + 1) + (D + 1) + D + 2 * cap;
        if (reals > (SIZE_MAX - bytes) / real_size) return 0;
        bytes += reals * real_size;
        if (ints > (SIZE_MAX - bytes) / sizeof(int)) return 0;
        bytes += ints * sizeof(int);
    }
    return bytes;
}

hvae_status hvae_workspace_reserve(hvae_workspace *ws, size_t bytes) {
    if (bytes == 0) return HVAE_ENOMEM;
    if (ws->bytes >= bytes) return HVAE_OK;
    void *buf = malloc(bytes);
    if (!buf) return HVAE_ENOMEM;
    free(ws->buf);
    ws->buf = buf;
    ws->bytes = bytes;
    return HVAE_OK;
}

void hvae_workspace_free(hvae_workspace *ws) {
    free(ws->buf);
    ws->buf = NULL;
    ws->bytes = 0;
}
