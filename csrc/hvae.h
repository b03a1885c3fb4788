/* hvae.h - the public C API of the hierarchical VAE core: model description, parameter table,
 * status codes, and the float32 / float64 entry points. Pure C11, no Python.
 *
 * Notation (DESIGN.md §1): T levels, x in R^D, z_i in R^{d_i}, batch B.
 * Bottom-up inference: encoder i maps z_{i-1} -> hidden -> [mu_i, logvar_i] (width 2*d_i),
 * z_0 = x. Top-down inference (DESIGN.md §6): encoder i maps d_{i-1} -> hidden -> [mu^_i,
 * logvar^_i], d_0 = x and d_i its last hidden layer's output; q(z_i | z_{i+1}, x) merges
 * [mu^_i, logvar^_i] with p(z_i | z_{i+1}) by precision.
 * Decoder i maps z_i -> reversed hidden -> parameters of p(z_{i-1} | z_i):
 *   i >= 2: zhat_{i-1} (width d_{i-1}) with unit variance, or [mean, logvar] (width 2 d_{i-1})
 *           with prior_var = HVAE_PRIOR_LEARNED;
 *   i = 1:  logits or mean (D), or [mean, logvar] (2D).
 */
#ifndef HVAE_H
#define HVAE_H

#include <stddef.h>
#include <stdint.h>

#define HVAE_MAX_LEVELS 16 /* T at most */
#define HVAE_MAX_HIDDEN 8  /* hidden layers in one MLP at most */
#define HVAE_MAX_WIDTH (1 << 24)
#define HVAE_MAX_THREADS 64 /* threads of one team at most */

typedef enum {
    HVAE_OK = 0,
    HVAE_EINVAL = 1, /* a size or option out of range */
    HVAE_ENOMEM = 2, /* an allocation failed */
} hvae_status;

typedef enum { HVAE_BERNOULLI = 0, HVAE_GAUSSIAN = 1, HVAE_GAUSSIAN_LEARNED = 2 } hvae_likelihood;
typedef enum { HVAE_TANH = 0, HVAE_RELU = 1, HVAE_LEAKY_RELU = 2 } hvae_activation;
typedef enum { HVAE_KL_ANALYTIC = 0, HVAE_KL_MC = 1 } hvae_kl;
/* The variance of p(z_{i-1} | z_i), i >= 2: the seed's identity, or learned by decoder i. */
typedef enum { HVAE_PRIOR_UNIT = 0, HVAE_PRIOR_LEARNED = 1 } hvae_prior_var;
/* q(z_i | z_{i-1}) (the seeds' chain), or the Ladder VAE's q(z_i | z_{i+1}, x). */
typedef enum { HVAE_BOTTOM_UP = 0, HVAE_TOP_DOWN = 1 } hvae_inference;

/* The training objective (DESIGN.md §7): the ELBO, or the importance-weighted bound
 * L_k = log (1/k) sum_j w_j (Burda et al.) with k samples per example, log w_j =
 * log p(x | z_j) + beta (log p(z_j) - log q(z_j | x)) at the samples; its gradient the standard
 * one (softmax weights over the k log-weights) or, for T = 1, the doubly reparameterized one
 * (Tucker et al. 2018). */
typedef enum { HVAE_ELBO = 0, HVAE_IWAE = 1 } hvae_objective;
typedef enum { HVAE_GRAD_STANDARD = 0, HVAE_GRAD_DREG = 1 } hvae_gradient;
typedef struct {
    hvae_objective objective;
    int k; /* samples per example, >= 1 (1 with HVAE_ELBO) */
    hvae_gradient gradient;
} hvae_estimator;

/* What the user chooses. */
typedef struct {
    int n_levels;                                  /* T, 1..HVAE_MAX_LEVELS */
    int x_dim;                                     /* D */
    int z_dim[HVAE_MAX_LEVELS];                    /* d_i at [i-1] */
    int n_hidden[HVAE_MAX_LEVELS];                 /* hidden layers of level i's MLPs at [i-1] */
    int hidden[HVAE_MAX_LEVELS][HVAE_MAX_HIDDEN];  /* encoder widths; the decoder reverses them */
    hvae_likelihood likelihood;
    hvae_activation activation;
    hvae_kl kl;
    hvae_prior_var prior_var;
    int deterministic; /* 1: autoencoder, z_i = mu_i, no sampling and no KL (bottom-up only) */
    hvae_inference inference; /* top-down: every level needs at least one hidden layer */
} hvae_config;

/* One dense layer inside the flat parameter buffer: weight (out, in) then bias (out,). */
typedef struct {
    int in, out;
    size_t weight, bias; /* offsets into the flat buffer, in elements */
} hvae_linear;

typedef struct {
    int n_layers; /* hidden layers + the output layer */
    hvae_linear layer[HVAE_MAX_HIDDEN + 1];
} hvae_mlp;

/* The parameter table: enc[0..T-1] first, then dec[0..T-1], layers in order. */
typedef struct {
    hvae_config cfg;
    hvae_mlp enc[HVAE_MAX_LEVELS];
    hvae_mlp dec[HVAE_MAX_LEVELS];
    size_t n_params;
    size_t act_per_example; /* reals of activations one example needs in the workspace */
} hvae_model;

/* A grow-only scratch buffer for one model, reused between calls (no allocation on the hot
 * path). Not thread safe: one workspace serves one call at a time. */
typedef struct {
    void *buf;
    size_t bytes;
    double kl_mean[HVAE_MAX_LEVELS]; /* batch means of the KL terms of the last forward */
} hvae_workspace;

/* Validate cfg and build the parameter table. HVAE_EINVAL on any size or option out of range. */
hvae_status hvae_model_init(hvae_model *m, const hvae_config *cfg);

/* Bytes of workspace a call with this batch needs, for reals of real_size bytes; 0 on overflow.
 * batch counts rows of every level: examples times samples per example. */
size_t hvae_workspace_bytes(const hvae_model *m, int batch, size_t real_size);

/* A batch of at least HVAE_SPARSE_MIN_BATCH rows whose x has at most hvae_sparse_capacity
 * nonzeros (a quarter of its entries) goes through the encoder's first layer by sparse kernels:
 * the workspace of such batch sizes also holds the nonzeros' positions and values, the
 * layer's weights transposed and a copy of its output gradient (B x its width). */
#define HVAE_SPARSE_MIN_BATCH 64

/* Nonzeros of x the workspace of this batch size has room for: B * D / 4, or 0 (the sparse
 * kernels off) below HVAE_SPARSE_MIN_BATCH rows or where the count would not fit an int. */
size_t hvae_sparse_capacity(const hvae_model *m, int batch);

/* Make ws hold at least `bytes` (keeps the buffer when large enough). */
hvae_status hvae_workspace_reserve(hvae_workspace *ws, size_t bytes);
void hvae_workspace_free(hvae_workspace *ws);

/* Width of decoder 1's output: D, or 2D for the learned-variance Gaussian. */
int hvae_x_params_dim(const hvae_config *cfg);

/* Width of decoder i's output for level i >= 2 (1-based): d_{i-1}, or 2 d_{i-1} when learned. */
int hvae_z_params_dim(const hvae_config *cfg, int level);

/* A team of threads (team.c): the caller plus n_threads - 1 workers, 2 <= n_threads <=
 * HVAE_MAX_THREADS; NULL when it cannot be made. hvae_team_run runs fn(ctx, part, n_parts) for
 * part 0 on the caller and parts 1.. on the workers, and returns when all are done (a NULL team
 * runs fn(ctx, 0, 1)). Core calls split their GEMMs, elementwise passes and Adam over the
 * current team of the calling thread (NULL: none); each part of the work is done by the same
 * thread index every time, so results do not depend on timing. One team serves one call at a
 * time; BLAS must run single-threaded inside a team (the Python binding sets OpenBLAS so). */
typedef struct hvae_team hvae_team;
hvae_team *hvae_team_create(int n_threads);
void hvae_team_free(hvae_team *tm);
int hvae_team_size(const hvae_team *tm);
void hvae_team_run(hvae_team *tm, void (*fn)(void *ctx, int part, int n_parts), void *ctx);
hvae_team *hvae_team_current(void);
/* A grow-only scratch buffer of at least `bytes` owned by the team (freed with it), for the
 * caller to hand to a job; NULL when it cannot be had (the caller then splits its work another
 * way). Allocates only when a larger buffer than ever before is asked for. */
void *hvae_team_scratch(hvae_team *tm, size_t bytes);
void hvae_team_set_current(hvae_team *tm);

/* Adam's hyperparameters and the number of this update (step >= 1). */
typedef struct {
    double lr, beta1, beta2, eps;
    long step;
} hvae_adam;

#define HVAE_DECLARE(real, sfx)                                                                   \
    /* Forward pass over B examples with K samples each (est: NULL for the ELBO, K = 1; R = BK  \
     * rows, sample j of example b in row bK + j). terms (T+1, R): row 0 the reconstruction term \
     * -log p(x|z_1), row i the KL term of level i (the model's estimator); log_weight (R,) or   \
     * NULL: log p(x,z) - log q(z|x) at the samples (stochastic only). loss, ELBO: mean over the \
     * batch of rec + beta * sum_i K_i, K_i the batch mean of kl_i, or with free_bits (T,)       \
     * (Kingma et al. 2016; NULL: none) max(free_bits[i-1], K_i), whose gradient is zero while   \
     * K_i <= free_bits[i-1]; IWAE: -mean_b L_k(x_b) (no free bits). x (B, D) is the encoder     \
     * input, target (B, D) what the likelihood scores; eps: T pointers to (R, d_i), ignored     \
     * when deterministic (an autoencoder has only the ELBO). What the K samples of an example   \
     * share (bottom-up: encoder 1; top-down: the bottom-up pass) is computed once. Keeps the    \
     * activations (and a sparse x's index, the importance weights) in ws for hvae_backward. */  \
    hvae_status hvae_forward_##sfx(real *terms, real *log_weight, real *loss, hvae_workspace *ws, \
                                   const hvae_model *m, const real *params, const real *x,        \
                                   const real *target, const real *const *eps, int batch,         \
                                   real beta, const real *free_bits, const hvae_estimator *est);  \
    /* Backward pass after hvae_forward with the same arguments: ADDS the gradient of the loss   \
     * to grad (P,). */                                                                           \
    hvae_status hvae_backward_##sfx(real *grad, hvae_workspace *ws, const hvae_model *m,          \
                                    const real *params, const real *x, const real *target,        \
                                    const real *const *eps, int batch, real beta,                 \
                                    const real *free_bits, const hvae_estimator *est);            \
    /* Inference chain only. mulv: T pointers to (B, 2 d_i) outputs [mu_i, logvar_i] of q (top-  \
     * down: after the merge with p(z_i | z_{i+1})); z: T pointers to (B, d_i) outputs; eps as in  \
     * forward, or NULL for z_i = mu_i. */                                                       \
    hvae_status hvae_encode_##sfx(real *const *mulv, real *const *z, hvae_workspace *ws,          \
                                  const hvae_model *m, const real *params, const real *x,         \
                                  const real *const *eps, int batch);                             \
    /* Decoder chain from level `level` (1..T) down to x. z_top (B, d_level) is z_level; z: the   \
     * outputs z_{level-1}..z_1 at z[level-2]..z[0] (entries may be NULL); eps: pointers at the   \
     * same indices (B, d_i) of unit noise, or NULL for the means; the noise is scaled by          \
     * temperature. x_params (B, hvae_x_params_dim): decoder 1's output (logits or mean(s)). */   \
    hvae_status hvae_decode_##sfx(real *x_params, real *const *z, hvae_workspace *ws,             \
                                  const hvae_model *m, const real *params, const real *z_top,     \
                                  int level, const real *const *eps, real temperature, int batch); \
    /* One bias-corrected Adam step (Kingma & Ba) on n parameters, step t >= 1. Returns 1, or 0   \
     * without touching anything when grad holds a NaN or infinity. */                           \
    /* Elementwise math of the core, for accuracy tests: op 0 exp, 1 expm1, 2 log1p on [0, 1],    \
     * 3 tanh, 4 softplus, 5 sigmoid. */                                                         \
    hvae_status hvae_vecmath_##sfx(real *out, const real *in, size_t n, int op);                  \
    /* Standard normal noise (noise.h) over the current team: eps[i] (rows, d_{i+1}) for every    \
     * level, row r's values (level 1 first) a function of seed and first_row + r alone.         \
     * HVAE_EINVAL for rows < 0 or a NULL pointer. */                                            \
    hvae_status hvae_noise_##sfx(real *const *eps, const hvae_model *m, int rows, uint64_t seed,  \
                                 uint64_t first_row);                                             \
    int adam_update_##sfx(real *params, real *m1, real *m2, const real *grad, size_t n,          \
                           real lr, real beta1, real beta2, real eps, long t);                  \
    /* One training step over `team` (NULL: the calling thread alone): hvae_forward (no         \
     * log_weight), then, when the loss is finite, the gradient into grad (P,) (overwritten, not \
     * added to), then, when every gradient is finite, one Adam step on params, m1, m2 (P,),    \
     * equal to adam_update. *updated says whether the step was taken (params, m1, m2 are       \
     * untouched otherwise). With a NULL team the numbers are hvae_forward + hvae_backward +   \
     * adam_update's bit for bit; a team changes them by rounding (OpenBLAS picks its kernels by \
     * size), the same for a given team size. */                                               \
    hvae_status hvae_train_step_##sfx(real *terms, real *loss, int *updated, real *grad,         \
                                      real *params, real *m1, real *m2, hvae_workspace *ws,       \
                                      const hvae_model *m, const real *x, const real *target,     \
                                      const real *const *eps, int batch, real beta,               \
                                      const real *free_bits, const hvae_estimator *est,           \
                                      const hvae_adam *opt, hvae_team *team);

HVAE_DECLARE(float, f32)
HVAE_DECLARE(double, f64)
#undef HVAE_DECLARE

#endif /* HVAE_H */
