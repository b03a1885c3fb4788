/* _core.c - the CPython / NumPy binding hvae._core: parse, validate (naming the argument,
 * expected vs got; the conversions are pyargs.c's), release the GIL, call the C core, map status
 * codes to exceptions, clean up. With pyargs.c, the only files that include Python.h. */
#define HVAE_PYARGS_IMPORTS_ARRAY /* this file's module init calls import_array */
#include "pyargs.h"

#include <pythread.h>

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "blas.h"
#include "hvae.h"
#include "noise.h"

/* ------------------------------------------------------------------------------------------ */
/* the Model type: a validated description, its parameter table and a reusable workspace        */

typedef struct {
    PyObject_HEAD
    hvae_model model;
    hvae_workspace ws;
    int typenum; /* NPY_FLOAT32 or NPY_FLOAT64 */
    PyThread_type_lock lock; /* one core call at a time on ws */
    pid_t lock_pid;          /* the process that lock and ws belong to (fork_recover) */
    hvae_team *team;         /* threads of the last call with threads > 1, or NULL */
    pid_t team_pid;          /* the process that made it */
    int ready;               /* __init__ succeeded */
} ModelObject;

static const char *const LIKELIHOODS[] = {"bernoulli", "gaussian", "gaussian_learned", NULL};
static const char *const ACTIVATIONS[] = {"tanh", "relu", "leaky_relu", NULL};
static const char *const KLS[] = {"analytic", "mc", NULL};
static const char *const PRIOR_VARIANCES[] = {"unit", "learned", NULL};
static const char *const DTYPES[] = {"float32", "float64", NULL};
static const char *const INFERENCES[] = {"bottom_up", "top_down", NULL};
static const char *const OBJECTIVES[] = {"elbo", "iwae", NULL};
static const char *const GRADIENTS[] = {"standard", "dreg", NULL};
static const char *const NOISE_NAMES[2] = {"seed", "first_row"};
static const char *const FORWARD_NOISE_NAMES[2] = {"noise_seed", "noise_row"};

/* The length of a sized sequence, -1 when it has none (e.g. an iterator): checked before
 * PySequence_Tuple, which would copy a huge one (range(10**10)) into a tuple first. */
static Py_ssize_t sized_len(PyObject *seq) {
    if (!PySequence_Check(seq)) return -1;
    Py_ssize_t len = PySequence_Size(seq);
    if (len < 0) PyErr_Clear();
    return len;
}

/* A sequence of at most max integers in [1, HVAE_MAX_WIDTH] into out[0..*n-1]. The items are
 * read from a tuple copy that owns them: an item's __index__ may change the caller's list. */
static int parse_dims(PyObject *seq, const char *name, int *out, int max, int *n) {
    if (sized_len(seq) > max) {
        PyErr_Format(PyExc_ValueError, "%s: expected at most %d entries, got %zd", name, max,
                     sized_len(seq));
        return -1;
    }
    PyObject *items = PySequence_Tuple(seq);
    if (!items) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: expected a sequence of integers, got %R", name,
                     (PyObject *)Py_TYPE(seq));
        return -1;
    }
    Py_ssize_t len = PyTuple_GET_SIZE(items);
    if (len > max) {
        PyErr_Format(PyExc_ValueError, "%s: expected at most %d entries, got %zd", name, max, len);
        Py_DECREF(items);
        return -1;
    }
    for (Py_ssize_t k = 0; k < len; k++) {
        char item[96];
        snprintf(item, sizeof item, "%s[%zd]", name, k);
        if (as_int(PyTuple_GET_ITEM(items, k), item, 1, HVAE_MAX_WIDTH, &out[k]) < 0) {
            Py_DECREF(items);
            return -1;
        }
    }
    *n = (int)len;
    Py_DECREF(items);
    return 0;
}

static int Model_init(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"x_dim", "latent_dims", "hidden_dims", "likelihood", "activation",
                             "kl", "deterministic", "dtype", "prior_variance", "inference", NULL};
    PyObject *x_dim_obj, *latent_obj, *hidden_obj, *lik = NULL, *act = NULL, *kl = NULL,
             *dtype = NULL, *det_obj = NULL, *pvar = NULL, *inf = NULL;
    int deterministic = 0;
    if (self->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Model: already initialised; create a new Model");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|OOOOOOO", kwlist, &x_dim_obj, &latent_obj,
                                     &hidden_obj, &lik, &act, &kl, &det_obj, &dtype, &pvar, &inf))
        return -1;
    if (det_obj && as_flag(det_obj, "deterministic", &deterministic) < 0) return -1;
    hvae_config cfg;
    memset(&cfg, 0, sizeof cfg);
    int v, n;
    if (as_int(x_dim_obj, "x_dim", 1, HVAE_MAX_WIDTH, &cfg.x_dim) < 0) return -1;
    if (parse_dims(latent_obj, "latent_dims", cfg.z_dim, HVAE_MAX_LEVELS, &cfg.n_levels) < 0)
        return -1;
    if (cfg.n_levels < 1) {
        PyErr_SetString(PyExc_ValueError, "latent_dims: expected at least one level, got none");
        return -1;
    }
    if (sized_len(hidden_obj) > cfg.n_levels) {
        PyErr_Format(PyExc_ValueError, "hidden_dims: expected %d lists (one per level), got %zd",
                     cfg.n_levels, sized_len(hidden_obj));
        return -1;
    }
    PyObject *fast = PySequence_Tuple(hidden_obj); /* owns its items (see parse_dims) */
    if (!fast) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "hidden_dims: expected a sequence of sequences, got %R",
                     (PyObject *)Py_TYPE(hidden_obj));
        return -1;
    }
    if (PyTuple_GET_SIZE(fast) != cfg.n_levels) {
        PyErr_Format(PyExc_ValueError, "hidden_dims: expected %d lists (one per level), got %zd",
                     cfg.n_levels, PyTuple_GET_SIZE(fast));
        Py_DECREF(fast);
        return -1;
    }
    for (int i = 0; i < cfg.n_levels; i++) {
        char name[48];
        snprintf(name, sizeof name, "hidden_dims[%d]", i);
        if (parse_dims(PyTuple_GET_ITEM(fast, i), name, cfg.hidden[i], HVAE_MAX_HIDDEN,
                       &n) < 0) {
            Py_DECREF(fast);
            return -1;
        }
        cfg.n_hidden[i] = n;
    }
    Py_DECREF(fast);
    v = 0; /* the defaults are the first choices */
    if (lik && pick(lik, "likelihood", LIKELIHOODS, &v) < 0) return -1;
    cfg.likelihood = (hvae_likelihood)v;
    v = 0;
    if (act && pick(act, "activation", ACTIVATIONS, &v) < 0) return -1;
    cfg.activation = (hvae_activation)v;
    v = 0;
    if (kl && pick(kl, "kl", KLS, &v) < 0) return -1;
    cfg.kl = (hvae_kl)v;
    v = 0;
    if (pvar && pick(pvar, "prior_variance", PRIOR_VARIANCES, &v) < 0) return -1;
    cfg.prior_var = (hvae_prior_var)v;
    v = 0;
    if (dtype && pick(dtype, "dtype", DTYPES, &v) < 0) return -1;
    self->typenum = v == 0 ? NPY_FLOAT32 : NPY_FLOAT64;
    v = 0;
    if (inf && pick(inf, "inference", INFERENCES, &v) < 0) return -1;
    cfg.inference = (hvae_inference)v;
    cfg.deterministic = deterministic;
    if (cfg.inference == HVAE_TOP_DOWN) {
        if (deterministic) {
            PyErr_SetString(PyExc_ValueError, "deterministic: an autoencoder has no top-down "
                            "inference; use inference='bottom_up'");
            return -1;
        }
        for (int i = 0; i < cfg.n_levels; i++)
            if (cfg.n_hidden[i] < 1) {
                PyErr_Format(PyExc_ValueError, "hidden_dims[%d]: top-down inference needs at "
                             "least one hidden layer at every level, got none", i);
                return -1;
            }
    }
    hvae_status st = hvae_model_init(&self->model, &cfg);
    if (st != HVAE_OK) return set_status_error(st);
    if (!self->lock) {
        self->lock = PyThread_allocate_lock();
        if (!self->lock) {
            PyErr_NoMemory();
            return -1;
        }
        self->lock_pid = getpid();
    }
    self->ready = 1;
    return 0;
}

/* In a process forked from the one that made the lock (with the GIL held): a core call that was
 * running in another thread of the parent at the fork left the lock taken, forever, and the
 * workspace in an unknown state (maybe between free and malloc). Then both are abandoned
 * (leaked, never waited on or freed) for a new lock and an empty workspace. 0, or -1 (no
 * exception set) when no new lock could be allocated. */
static int fork_recover(ModelObject *self) {
    pid_t now = getpid();
    if (!self->lock || self->lock_pid == now) return 0;
    if (PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        PyThread_release_lock(self->lock);
    } else {
        PyThread_type_lock fresh = PyThread_allocate_lock();
        if (!fresh) return -1;
        self->lock = fresh;
        memset(&self->ws, 0, sizeof self->ws);
    }
    self->lock_pid = now;
    return 0;
}

/* Called first by every method: 1 with an exception when the Model cannot be used. */
static int not_ready(ModelObject *self) {
    if (!self->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Model: not initialised (call Model(...))");
        return 1;
    }
    if (fork_recover(self) == 0) return 0;
    PyErr_NoMemory();
    return 1;
}

static void Model_dealloc(ModelObject *self) {
    if (fork_recover(self) == 0) hvae_workspace_free(&self->ws); /* else leaked (see there) */
    if (self->team_pid == getpid()) hvae_team_free(self->team); /* not in a forked child */
    if (self->lock) PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Run stmt, a core call, with the GIL released, the model's lock held and hvae's OpenBLAS at
 * one thread (blas_single_begin below). */
#define CORE_CALL(self, stmt)                                 \
    do {                                                      \
        Py_BEGIN_ALLOW_THREADS                                \
        PyThread_acquire_lock((self)->lock, WAIT_LOCK);       \
        blas_single_begin();                                  \
        stmt;                                                 \
        blas_single_end();                                    \
        PyThread_release_lock((self)->lock);                  \
        Py_END_ALLOW_THREADS                                  \
    } while (0)

static PyArrayObject *params_arg(ModelObject *self, PyObject *obj) {
    PyArrayObject *p = input_array(obj, "params", self->typenum);
    if (!p) return NULL;
    if (PyArray_NDIM(p) != 1 || (size_t)PyArray_DIM(p, 0) != self->model.n_params) {
        PyErr_Format(PyExc_ValueError, "params: expected shape (%zu,), got an array of %d "
                     "dimensions and %zd elements", self->model.n_params, PyArray_NDIM(p),
                     (Py_ssize_t)PyArray_SIZE(p));
        Py_DECREF(p);
        return NULL;
    }
    return p;
}

/* eps: a list of T arrays (B, d_i), converted into arrs[0..T-1]. 0 or -1. */
static int eps_arg(ModelObject *self, PyObject *obj, const char *name, int count,
                   npy_intp B, PyArrayObject **arrs) {
    if (!PyList_Check(obj) && !PyTuple_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a list of %d arrays, got %R", name, count,
                     (PyObject *)Py_TYPE(obj));
        return -1;
    }
    PyObject *items = PySequence_Tuple(obj); /* owns them: a conversion may change obj */
    if (!items) return -1;
    if (PyTuple_GET_SIZE(items) != count) {
        PyErr_Format(PyExc_ValueError, "%s: expected a list of %d arrays (one per level), got %zd",
                     name, count, PyTuple_GET_SIZE(items));
        Py_DECREF(items);
        return -1;
    }
    for (int i = 0; i < count; i++) {
        char item[64];
        snprintf(item, sizeof item, "%s[%d]", name, i);
        arrs[i] = input_2d(PyTuple_GET_ITEM(items, i), item, self->typenum, B,
                           self->model.cfg.z_dim[i]);
        if (!arrs[i]) {
            Py_DECREF(items);
            return -1;
        }
    }
    Py_DECREF(items);
    return 0;
}

/* After every argument of a call is converted: an array converted and checked earlier still has
 * the shape (rows < 0: any number >= 1 of rows; cols < 0: 1-D of n = rows) and layout it was
 * checked for. A later conversion runs Python code (__array__, __float__, __index__, ...) that
 * can resize, reshape or restride an array the caller passed. 0, or -1 with a ValueError. */
static int unchanged(PyArrayObject *a, const char *name, int typenum, npy_intp rows,
                     npy_intp cols) {
    int ok = PyArray_TYPE(a) == typenum && PyArray_IS_C_CONTIGUOUS(a) && PyArray_ISALIGNED(a);
    if (cols < 0)
        ok = ok && PyArray_NDIM(a) == 1 && PyArray_DIM(a, 0) == rows;
    else
        ok = ok && PyArray_NDIM(a) == 2 && PyArray_DIM(a, 1) == cols && PyArray_DIM(a, 0) >= 1 &&
             (rows < 0 || PyArray_DIM(a, 0) == rows);
    if (ok) return 0;
    PyErr_Format(PyExc_ValueError, "%s: changed shape, dtype or layout while the other "
                 "arguments were converted", name);
    return -1;
}

static void release_all(PyArrayObject **arrs, int n) {
    for (int i = 0; i < n; i++) Py_XDECREF(arrs[i]);
}

/* A batch's inputs: x (B, D), target (B, D) (x itself when None), eps (T arrays (B k, d_i),
 * k samples per example; none for a deterministic model). */
typedef struct {
    PyArrayObject *x, *target, *eps[HVAE_MAX_LEVELS];
    npy_intp B;
} batch_args;

/* The estimator from optional objective, k and gradient objects, checked against the model
 * and free bits: 0, or -1 with a ValueError / TypeError naming the argument. */
static int estimator_args(PyObject *obj_obj, PyObject *k_obj, PyObject *grad_obj,
                          const hvae_config *c, int has_free_bits, hvae_estimator *est) {
    int v = 0;
    *est = (hvae_estimator){HVAE_ELBO, 1, HVAE_GRAD_STANDARD};
    if (obj_obj && pick(obj_obj, "objective", OBJECTIVES, &v) < 0) return -1;
    est->objective = (hvae_objective)v;
    if (k_obj && as_int(k_obj, "k", 1, INT_MAX, &est->k) < 0) return -1;
    v = 0;
    if (grad_obj && pick(grad_obj, "gradient", GRADIENTS, &v) < 0) return -1;
    est->gradient = (hvae_gradient)v;
    const char *err = NULL;
    if (est->objective == HVAE_ELBO && est->k != 1)
        err = "k: the ELBO takes one sample per example (k = 1); use objective='iwae'";
    else if (est->objective == HVAE_ELBO && est->gradient == HVAE_GRAD_DREG)
        err = "gradient: 'dreg' is a gradient of objective='iwae'";
    else if (est->objective == HVAE_IWAE && c->deterministic)
        err = "objective: 'iwae' is not defined for a deterministic autoencoder";
    else if (est->objective == HVAE_IWAE && has_free_bits)
        err = "free_bits: not defined for objective='iwae' (a bound on log p(x), not a sum of "
              "KL terms)";
    if (err) {
        PyErr_SetString(PyExc_ValueError, err);
        return -1;
    }
    if (est->gradient == HVAE_GRAD_DREG && c->n_levels != 1) {
        PyErr_Format(PyExc_ValueError, "gradient: 'dreg' is defined for one stochastic level "
                     "(T = 1), got T = %d; use gradient='standard'", c->n_levels);
        return -1;
    }
    return 0;
}

static void batch_release(batch_args *a, int T) {
    Py_XDECREF(a->x);
    Py_XDECREF(a->target);
    release_all(a->eps, T);
}

/* The converted inputs of a batch still have their checked shapes (see unchanged); eps has
 * B * k rows. */
static int batch_unchanged(ModelObject *self, const batch_args *a, int k) {
    const hvae_model *m = &self->model;
    const int tn = self->typenum;
    if (unchanged(a->x, "x", tn, a->B, m->cfg.x_dim) < 0 ||
        unchanged(a->target, "target", tn, a->B, m->cfg.x_dim) < 0)
        return -1;
    for (int i = 0; i < m->cfg.n_levels; i++)
        if (a->eps[i] && unchanged(a->eps[i], "eps", tn, a->B * k, m->cfg.z_dim[i]) < 0)
            return -1;
    return 0;
}

/* Convert and check x, target, eps into *a (zeroed first); with `draw`, eps_obj is None and
 * a->eps new arrays for the core to fill (noise_args checked the rest). 0, or -1 with an
 * exception (the caller still calls batch_release). */
static int batch_parse(ModelObject *self, PyObject *x_obj, PyObject *target_obj,
                       PyObject *eps_obj, int k, int draw, batch_args *a) {
    const hvae_model *m = &self->model;
    memset(a, 0, sizeof *a);
    if (!(a->x = input_2d(x_obj, "x", self->typenum, -1, m->cfg.x_dim))) return -1;
    a->B = PyArray_DIM(a->x, 0);
    if (target_obj == Py_None) {
        Py_INCREF(a->x);
        a->target = a->x;
    } else if (!(a->target = input_2d(target_obj, "target", self->typenum, a->B, m->cfg.x_dim))) {
        return -1;
    }
    if (m->cfg.deterministic) return batch_unchanged(self, a, k);
    if (a->B > INT_MAX / k) {
        PyErr_Format(PyExc_ValueError, "x: %zd examples of k = %d samples are more rows than a "
                     "call takes (%d)", (Py_ssize_t)a->B, k, INT_MAX);
        return -1;
    }
    if (draw) {
        for (int i = 0; i < m->cfg.n_levels; i++) {
            npy_intp dims[2] = {a->B * k, m->cfg.z_dim[i]};
            if (!(a->eps[i] = (PyArrayObject *)PyArray_SimpleNew(2, dims, self->typenum)))
                return -1;
        }
        return batch_unchanged(self, a, k);
    }
    if (eps_obj == Py_None) {
        PyErr_Format(PyExc_ValueError, "eps: expected a list of %d noise arrays (or noise_seed "
                     "for the core to draw them), got None", m->cfg.n_levels);
        return -1;
    }
    if (eps_arg(self, eps_obj, "eps", m->cfg.n_levels, a->B * k, a->eps) < 0) return -1;
    return batch_unchanged(self, a, k);
}

/* An array the core writes must share no memory with the batch's inputs. */
static int check_not_batch(PyArrayObject *out, const char *name, const batch_args *a, int T) {
    const char *shared = overlaps(out, a->x) ? "x" : overlaps(out, a->target) ? "target" : NULL;
    for (int i = 0; i < T && !shared; i++)
        if (a->eps[i] && overlaps(out, a->eps[i])) shared = "eps";
    if (shared) {
        PyErr_Format(PyExc_ValueError, "%s: must not share memory with %s", name, shared);
        return -1;
    }
    return 0;
}

/* The core's eps pointers of a batch: NULL for a deterministic model. */
static const void *const *batch_eps(const batch_args *a, const hvae_model *m,
                                    const void *ptrs[HVAE_MAX_LEVELS]) {
    for (int i = 0; i < m->cfg.n_levels; i++) ptrs[i] = a->eps[i] ? PyArray_DATA(a->eps[i]) : NULL;
    return m->cfg.deterministic ? NULL : ptrs;
}

/* BLAS runs single-threaded inside a core call (hvae.h), one of one thread too: while any
 * call is in flight, the linked OpenBLAS is set to one thread; the last such call to end
 * restores the count it had. A BLAS left at several threads would put its own threads beside
 * the team's (2-3x slower), and a call asked to run on one thread would take every core
 * (on a busy machine its spinning threads made a training step twice as slow). Another BLAS
 * is left alone. Called with the GIL released. */
extern int openblas_get_num_threads(void) __attribute__((weak)); /* NULL: not OpenBLAS */
extern void openblas_set_num_threads(int) __attribute__((weak));
static pthread_mutex_t blas_mutex = PTHREAD_MUTEX_INITIALIZER;
static int blas_calls, blas_saved_threads; /* core calls in flight; the count before them */

static int blas_fork_saved; /* in a child forked during a call: the count to restore, else 0 */

/* pthread_atfork's child handler: the calls counted were the parent's threads' (the mutex may
 * have been held by one of them); the child starts with none, and when one was in flight its
 * OpenBLAS is still at one thread: the next call takes the parent's count as the one to
 * restore (set lazily: calling OpenBLAS inside the fork handler could hang). */
static void blas_after_fork_child(void) {
    pthread_mutex_init(&blas_mutex, NULL);
    blas_fork_saved = blas_calls > 0 ? blas_saved_threads : 0;
    blas_calls = 0;
}

/* Before a core call (CORE_CALL): hvae's OpenBLAS at one thread, its count saved by the first
 * of the calls in flight. A count set by the user while a call runs is overwritten at its end. */
static void blas_single_begin(void) {
    if (!openblas_get_num_threads || !openblas_set_num_threads) return;
    pthread_mutex_lock(&blas_mutex);
    if (blas_calls++ == 0) {
        blas_saved_threads = blas_fork_saved ? blas_fork_saved : openblas_get_num_threads();
        blas_fork_saved = 0;
        if (blas_saved_threads != 1) openblas_set_num_threads(1);
    }
    pthread_mutex_unlock(&blas_mutex);
}

/* After a core call: BLAS back to its count when the last one in flight ends */
static void blas_single_end(void) {
    if (!openblas_get_num_threads || !openblas_set_num_threads) return;
    pthread_mutex_lock(&blas_mutex);
    if (--blas_calls == 0 && blas_saved_threads != 1)
        openblas_set_num_threads(blas_saved_threads);
    pthread_mutex_unlock(&blas_mutex);
}

/* Before a core call: the model's team of `threads` threads (NULL for one thread), made or
 * remade on first use; called inside CORE_CALL. 0, or -1 when the threads could not be started. */
static int team_begin(ModelObject *self, int threads, hvae_team **team) {
    if (self->team && self->team_pid != getpid())
        self->team = NULL; /* a forked child: the workers stayed in the parent (leaked here) */
    if (threads != hvae_team_size(self->team)) {
        hvae_team_free(self->team);
        self->team = threads > 1 ? hvae_team_create(threads) : NULL;
        self->team_pid = getpid();
        if (threads > 1 && !self->team) return -1;
    }
    *team = self->team;
    return 0;
}

/* A core call on the model's team of `threads` threads: CORE_CALL, the team made (team_failed
 * set to 1 when its threads could not start, the statements then skipped) and current (see
 * hvae_team_set_current) while the statements run; they see it as `team`. */
#define TEAM_CALL(self, threads, team_failed, ...)                  \
    CORE_CALL(self, {                                               \
        hvae_team *team;                                            \
        if (team_begin(self, threads, &team) < 0) {                 \
            team_failed = 1;                                        \
        } else {                                                    \
            hvae_team_set_current(team);                            \
            __VA_ARGS__;                                            \
            hvae_team_set_current(NULL);                            \
        }                                                           \
    })

/* After a core call on a batch of B rows of x: an exception when the team could not start or
 * the status is not HVAE_OK, and -1; else 0. */
static int batch_call_error(int team_failed, int threads, hvae_status st, const hvae_model *m,
                            int typenum, npy_intp B) {
    if (team_failed) {
        PyErr_Format(PyExc_RuntimeError, "threads: could not start %d threads", threads);
        return -1;
    }
    return st == HVAE_OK ? 0 : batch_status_error(st, m, typenum, B, "x");
}

/* A Python list of the n arrays (steals the references in arrs, which are set to NULL), or NULL
 * with an exception (arrs untouched). */
static PyObject *list_of(PyArrayObject **arrs, int n) {
    PyObject *list = PyList_New(n);
    if (!list) return NULL;
    for (int i = 0; i < n; i++) {
        PyList_SET_ITEM(list, i, (PyObject *)arrs[i]);
        arrs[i] = NULL;
    }
    return list;
}

/* The seed and first row of a call whose core draws its noise (named `names`: forward's
 * noise_seed and noise_row, or noise's seed and first_row): integers in [0, LONG_MAX]; eps must
 * be None and the model stochastic. 0, or -1 with an exception naming the argument. */
static int noise_args(ModelObject *self, PyObject *seed_obj, PyObject *row_obj,
                      PyObject *eps_obj, const char *const names[2], long *seed,
                      long *first_row) {
    if (as_long(seed_obj, names[0], 0, LONG_MAX, seed) < 0 ||
        (row_obj && as_long(row_obj, names[1], 0, LONG_MAX, first_row) < 0))
        return -1;
    if (self->model.cfg.deterministic) {
        PyErr_Format(PyExc_ValueError, "%s: a deterministic autoencoder draws no noise",
                     names[0]);
        return -1;
    }
    if (eps_obj != Py_None) {
        PyErr_Format(PyExc_ValueError, "eps: must be None when %s is given (the core draws the "
                     "noise)", names[0]);
        return -1;
    }
    return 0;
}

/* The core's noise into eps (T pointers to (rows, d_i) of the dtype tn), on the current team. */
static hvae_status draw_noise(int tn, void *const *eps, const hvae_model *m, int rows, long seed,
                              long first_row) {
    return tn == NPY_FLOAT32
               ? hvae_noise_f32((float *const *)eps, m, rows, (uint64_t)seed, (uint64_t)first_row)
               : hvae_noise_f64((double *const *)eps, m, rows, (uint64_t)seed,
                                (uint64_t)first_row);
}

PyDoc_STRVAR(noise_doc,
"noise(rows, seed, first_row=0, threads=1)\n"
"--\n\n"
"The core's standard normal noise: a list of T arrays (rows, d_i) of the model's dtype, row r\n"
"of every level from the stream of row first_row + r under seed (Philox4x64-10 keys a\n"
"xoshiro256++ stream, Marsaglia and Tsang's ziggurat): the same numbers however the rows are\n"
"split over calls and threads; float32 noise is the float64 noise rounded. seed, first_row:\n"
"integers in [0, 2**63 - 1].");

static PyObject *Model_noise(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"rows", "seed", "first_row", "threads", NULL};
    PyObject *rows_obj, *seed_obj, *row_obj = NULL, *threads_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|OO", kwlist, &rows_obj, &seed_obj, &row_obj,
                                     &threads_obj))
        return NULL;
    int rows, threads = 1, team_failed = 0;
    long seed, first_row = 0;
    if (as_int(rows_obj, "rows", 0, INT_MAX, &rows) < 0 ||
        (threads_obj && as_int(threads_obj, "threads", 1, HVAE_MAX_THREADS, &threads) < 0))
        return NULL;
    if (not_ready(self) ||
        noise_args(self, seed_obj, row_obj, Py_None, NOISE_NAMES, &seed, &first_row) < 0)
        return NULL;
    const hvae_model *m = &self->model;
    const int T = m->cfg.n_levels, tn = self->typenum;
    PyArrayObject *eps[HVAE_MAX_LEVELS] = {0};
    void *ptr[HVAE_MAX_LEVELS];
    for (int i = 0; i < T; i++) {
        npy_intp dims[2] = {rows, m->cfg.z_dim[i]};
        if (!(eps[i] = (PyArrayObject *)PyArray_SimpleNew(2, dims, tn))) {
            release_all(eps, T);
            return NULL;
        }
        ptr[i] = PyArray_DATA(eps[i]);
    }
    hvae_status st = HVAE_OK;
    TEAM_CALL(self, threads, team_failed, st = draw_noise(tn, ptr, m, rows, seed, first_row));
    if (team_failed || st != HVAE_OK) {
        if (team_failed)
            PyErr_Format(PyExc_RuntimeError, "threads: could not start %d threads", threads);
        else
            set_status_error(st);
        release_all(eps, T);
        return NULL;
    }
    PyObject *list = list_of(eps, T);
    if (!list) release_all(eps, T);
    return list;
}

PyDoc_STRVAR(forward_doc,
"forward(params, x, target=None, eps=None, beta=1.0, grad=None, log_weight=False, threads=1,\n"
"        free_bits=None, objective='elbo', k=1, gradient='standard', noise_seed=None,\n"
"        noise_row=0)\n"
"--\n\n"
"Loss terms of a batch, and optionally the gradient and the log importance weights.\n\n"
"params: (P,); x: (B, D) encoder input; target: (B, D) what the likelihood scores (default x);\n"
"eps: list of T arrays (B, d_i) of standard normal noise (required unless deterministic);\n"
"beta: weight of the KL terms; free_bits: None or T numbers >= 0 (or -inf: never floored),\n"
"the floor of each level's batch-mean KL in the loss (its gradient is zero below it); grad:\n"
"None or a (P,) array of the model's dtype, overwritten with the gradient of the loss;\n"
"log_weight: when true, also return log p(x,z) - log q(z|x);\n"
"threads: the model's team of threads splits the work (the same numbers up to rounding; the\n"
"linked OpenBLAS runs at one thread meanwhile).\n\n"
"objective, k, gradient: 'elbo' (k = 1), or 'iwae' with k samples per example, eps then of\n"
"B k rows (sample j of example b in row b k + j), the gradient 'standard' or (T = 1) 'dreg'.\n\n"
"noise_seed, noise_row: with eps None, the core draws eps itself on the team, equal to\n"
"noise(B k, noise_seed, noise_row) (row r from the stream of row noise_row + r).\n\n"
"Returns (loss, terms, log_weight): loss the batch mean of rec + beta * sum(kl) (IWAE: minus\n"
"the batch mean of the bound), terms (T+1, B k) with row 0 the reconstruction term\n"
"-log p(x|z_1) and row i the KL term of level i, log_weight (B k,) or None.");

static PyObject *Model_forward(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"params", "x", "target", "eps", "beta", "grad", "log_weight",
                             "threads", "free_bits", "objective", "k", "gradient", "noise_seed",
                             "noise_row", NULL};
    PyObject *params_obj, *x_obj, *target_obj = Py_None, *eps_obj = Py_None, *grad_obj = Py_None;
    PyObject *beta_obj = NULL, *lw_obj = NULL, *threads_obj = NULL, *fb_obj = NULL;
    PyObject *objective_obj = NULL, *k_obj = NULL, *gradient_obj = NULL;
    PyObject *seed_obj = Py_None, *row_obj = NULL;
    double beta = 1.0, fb[HVAE_MAX_LEVELS];
    int want_lw = 0, threads = 1, team_failed = 0, has_fb = 0;
    long seed = 0, first_row = 0;
    hvae_estimator est;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|OOOOOOOOOOOO", kwlist, &params_obj, &x_obj,
                                     &target_obj, &eps_obj, &beta_obj, &grad_obj, &lw_obj,
                                     &threads_obj, &fb_obj, &objective_obj, &k_obj,
                                     &gradient_obj, &seed_obj, &row_obj))
        return NULL;
    if (lw_obj && as_flag(lw_obj, "log_weight", &want_lw) < 0) return NULL;
    if (threads_obj && as_int(threads_obj, "threads", 1, HVAE_MAX_THREADS, &threads) < 0)
        return NULL;
    if (not_ready(self)) return NULL;
    const int draw = seed_obj != Py_None;
    if (!draw && row_obj) {
        PyErr_SetString(PyExc_ValueError, "noise_row: given without noise_seed");
        return NULL;
    }
    if (draw && noise_args(self, seed_obj, row_obj, eps_obj, FORWARD_NOISE_NAMES, &seed,
                            &first_row) < 0)
        return NULL;
    const hvae_model *m = &self->model;
    const int T = m->cfg.n_levels, tn = self->typenum;
    PyArrayObject *params = NULL, *terms = NULL, *lw = NULL;
    batch_args in;
    PyObject *result = NULL;
    hvae_status st = HVAE_OK;

    memset(&in, 0, sizeof in);
    if (beta_obj && beta_arg(beta_obj, tn, &beta) < 0) return NULL;
    float fb32[HVAE_MAX_LEVELS];
    if (free_bits_arg(fb_obj, T, tn, fb, fb32, &has_fb) < 0 ||
        estimator_args(objective_obj, k_obj, gradient_obj, &m->cfg, has_fb, &est) < 0)
        return NULL;
    if (!(params = params_arg(self, params_obj))) goto done;
    if (batch_parse(self, x_obj, target_obj, eps_obj, est.k, draw, &in) < 0) goto done;
    if (unchanged(params, "params", tn, (npy_intp)m->n_params, -1) < 0) goto done;
    npy_intp B = in.B, R = in.B * est.k;
    if (m->cfg.deterministic && want_lw) {
        PyErr_SetString(PyExc_ValueError,
                        "log_weight: not defined for a deterministic autoencoder");
        goto done;
    }
    if (grad_obj != Py_None) { /* the core writes grad, then reads the inputs */
        if (check_output(grad_obj, "grad", tn, (npy_intp)m->n_params) < 0) goto done;
        PyArrayObject *g = (PyArrayObject *)grad_obj;
        if (overlaps(g, params)) {
            PyErr_SetString(PyExc_ValueError, "grad: must not share memory with params");
            goto done;
        }
        if (check_not_batch(g, "grad", &in, T) < 0) goto done;
    }
    if (check_workspace(m, tn, R, "x") < 0) goto done;
    npy_intp tdims[2] = {T + 1, R};
    if (!(terms = (PyArrayObject *)PyArray_SimpleNew(2, tdims, tn))) goto done;
    if (want_lw && !(lw = (PyArrayObject *)PyArray_SimpleNew(1, &R, tn))) goto done;

    const void *eps_ptr[HVAE_MAX_LEVELS];
    const void *const *ep = batch_eps(&in, m, eps_ptr);
    void *drawn[HVAE_MAX_LEVELS]; /* with draw: the arrays batch_parse made, for the core to fill */
    for (int i = 0; draw && i < T; i++) drawn[i] = PyArray_DATA(in.eps[i]);
    void *gp = grad_obj == Py_None ? NULL : PyArray_DATA((PyArrayObject *)grad_obj);
    const void *pp = PyArray_DATA(params), *xp = PyArray_DATA(in.x), *tp = PyArray_DATA(in.target);
    size_t P = m->n_params;
    double loss = 0;
    TEAM_CALL(self, threads, team_failed, {
        if (draw) st = draw_noise(tn, drawn, m, (int)R, seed, first_row);
        if (st == HVAE_OK && tn == NPY_FLOAT32) {
            float lossf = 0;
            st = hvae_forward_f32(PyArray_DATA(terms), lw ? PyArray_DATA(lw) : NULL, &lossf,
                                  &self->ws, m, pp, xp, tp, (const float *const *)ep, (int)B,
                                  (float)beta, has_fb ? fb32 : NULL, &est);
            if (st == HVAE_OK && gp) {
                memset(gp, 0, P * sizeof(float));
                st = hvae_backward_f32(gp, &self->ws, m, pp, xp, tp,
                                       (const float *const *)ep, (int)B, (float)beta,
                                       has_fb ? fb32 : NULL, &est);
            }
            loss = lossf;
        } else if (st == HVAE_OK) {
            st = hvae_forward_f64(PyArray_DATA(terms), lw ? PyArray_DATA(lw) : NULL, &loss,
                                  &self->ws, m, pp, xp, tp, (const double *const *)ep, (int)B,
                                  beta, has_fb ? fb : NULL, &est);
            if (st == HVAE_OK && gp) {
                memset(gp, 0, P * sizeof(double));
                st = hvae_backward_f64(gp, &self->ws, m, pp, xp, tp,
                                       (const double *const *)ep, (int)B, beta,
                                       has_fb ? fb : NULL, &est);
            }
        }
    });
    if (batch_call_error(team_failed, threads, st, m, tn, R) < 0) goto done;
    result = Py_BuildValue("dOO", loss, (PyObject *)terms, lw ? (PyObject *)lw : Py_None);
done:
    Py_XDECREF(params);
    batch_release(&in, T);
    Py_XDECREF(terms);
    Py_XDECREF(lw);
    return result;
}

/* Adam's hyperparameters from optional objects (NULL: the default), checked in the working
 * precision tn: lr finite >= 0, beta1 and beta2 in [0, 1) (a bias correction 1 - beta^t of 0
 * divides by zero), eps > 0 (0 / (sqrt(0) + 0) is NaN). 0, or -1 with an exception naming the
 * argument (eps_name: the name of eps). */
static int adam_args(PyObject *step_obj, PyObject *lr_obj, PyObject *b1_obj, PyObject *b2_obj,
                     PyObject *eps_obj, const char *eps_name, int tn, hvae_adam *opt) {
    *opt = (hvae_adam){1e-3, 0.9, 0.999, 1e-8, 1};
    if (as_long(step_obj, "step", 1, LONG_MAX, &opt->step) < 0 ||
        (lr_obj && as_bounded_double(lr_obj, "lr", 0, 0, INFINITY, 0, &opt->lr) < 0) ||
        (b1_obj && as_bounded_double(b1_obj, "beta1", 0, 0, 1, 1, &opt->beta1) < 0) ||
        (b2_obj && as_bounded_double(b2_obj, "beta2", 0, 0, 1, 1, &opt->beta2) < 0) ||
        (eps_obj && as_bounded_double(eps_obj, eps_name, 0, 1, INFINITY, 0, &opt->eps) < 0))
        return -1;
    const char *name = NULL, *want = NULL;
    int f32 = tn == NPY_FLOAT32;
    if (f32 ? (float)opt->beta1 >= 1.0f : opt->beta1 >= 1.0)
        name = "beta1", want = "a number < 1";
    else if (f32 ? (float)opt->beta2 >= 1.0f : opt->beta2 >= 1.0)
        name = "beta2", want = "a number < 1";
    else if (f32 && !((float)opt->eps > 0))
        name = eps_name, want = "a number > 0";
    else if (f32 && !isfinite((float)opt->lr))
        name = "lr", want = "a finite number";
    if (name) {
        PyErr_Format(PyExc_ValueError, "%s: expected %s in the precision of params (%s)", name,
                     want, f32 ? "float32" : "float64");
        return -1;
    }
    return 0;
}

/* The core's pointers are restrict: no two of the n arrays may overlap. */
static int check_disjoint(PyArrayObject **arr, const char *const *names, int n) {
    for (int i = 1; i < n; i++)
        for (int j = 0; j < i; j++)
            if (overlaps(arr[i], arr[j])) {
                PyErr_Format(PyExc_ValueError, "%s: must not share memory with %s", names[i],
                             names[j]);
                return -1;
            }
    return 0;
}

PyDoc_STRVAR(train_step_doc,
"train_step(params, m, v, grad, x, eps, step, target=None, beta=1.0, lr=1e-3, beta1=0.9,\n"
"           beta2=0.999, adam_eps=1e-8, threads=1, free_bits=None, objective='elbo', k=1,\n"
"           gradient='standard')\n"
"--\n\n"
"One training step in one call: forward(params, x, target, eps, beta, grad, free_bits=) then,\n"
"when the loss\n"
"and every gradient are finite, adam_update(params, m, v, grad, step, lr, beta1, beta2,\n"
"adam_eps), with the same numbers as those two calls. params, m, v, grad: (P,) arrays of the\n"
"model's dtype, C-contiguous and writeable, sharing no memory; grad is overwritten with the\n"
"gradient (unspecified when the loss is not finite). threads: the model's team of threads\n"
"splits the work (the same numbers up to rounding; the linked OpenBLAS runs at one thread\n"
"meanwhile).\n\n"
"Returns (loss, terms, updated): loss and terms as forward's, updated False when the step was\n"
"not taken (params, m, v untouched).");

static PyObject *Model_train_step(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"params", "m", "v", "grad", "x", "eps", "step", "target", "beta",
                             "lr", "beta1", "beta2", "adam_eps", "threads", "free_bits",
                             "objective", "k", "gradient", NULL};
    PyObject *p_obj, *m_obj, *v_obj, *g_obj, *x_obj, *eps_obj, *step_obj, *target_obj = Py_None;
    PyObject *beta_obj = NULL, *lr_obj = NULL, *b1_obj = NULL, *b2_obj = NULL,
             *aeps_obj = NULL, *threads_obj = NULL, *fb_obj = NULL, *objective_obj = NULL,
             *k_obj = NULL, *gradient_obj = NULL;
    hvae_estimator est;
    double beta = 1.0, fb[HVAE_MAX_LEVELS];
    float fb32[HVAE_MAX_LEVELS];
    int threads = 1, team_failed = 0, updated = 0, has_fb = 0;
    hvae_adam opt;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOO|OOOOOOOOOOO", kwlist, &p_obj, &m_obj,
                                     &v_obj, &g_obj, &x_obj, &eps_obj, &step_obj, &target_obj,
                                     &beta_obj, &lr_obj, &b1_obj, &b2_obj, &aeps_obj,
                                     &threads_obj, &fb_obj, &objective_obj, &k_obj,
                                     &gradient_obj))
        return NULL;
    if (not_ready(self)) return NULL;
    const hvae_model *m = &self->model;
    const int T = m->cfg.n_levels, tn = self->typenum;
    const npy_intp P = (npy_intp)m->n_params;
    /* every conversion (which may run Python code) before the buffers are checked */
    if (adam_args(step_obj, lr_obj, b1_obj, b2_obj, aeps_obj, "adam_eps", tn, &opt) < 0 ||
        (beta_obj && beta_arg(beta_obj, tn, &beta) < 0) ||
        (threads_obj && as_int(threads_obj, "threads", 1, HVAE_MAX_THREADS, &threads) < 0) ||
        free_bits_arg(fb_obj, T, tn, fb, fb32, &has_fb) < 0 ||
        estimator_args(objective_obj, k_obj, gradient_obj, &m->cfg, has_fb, &est) < 0)
        return NULL;
    PyArrayObject *terms = NULL;
    PyObject *result = NULL;
    batch_args in;
    hvae_status st = HVAE_OK;
    PyArrayObject *outs[4] = {(PyArrayObject *)p_obj, (PyArrayObject *)m_obj,
                              (PyArrayObject *)v_obj, (PyArrayObject *)g_obj};
    static const char *const names[4] = {"params", "m", "v", "grad"};
    if (batch_parse(self, x_obj, target_obj, eps_obj, est.k, 0, &in) < 0) goto done;
    if (check_output(p_obj, "params", tn, P) < 0 || check_output(m_obj, "m", tn, P) < 0 ||
        check_output(v_obj, "v", tn, P) < 0 || check_output(g_obj, "grad", tn, P) < 0)
        goto done;
    if (check_disjoint(outs, names, 4) < 0) goto done;
    for (int k = 0; k < 4; k++)
        if (check_not_batch(outs[k], names[k], &in, T) < 0) goto done;
    npy_intp B = in.B, R = in.B * est.k;
    if (check_workspace(m, tn, R, "x") < 0) goto done;
    npy_intp tdims[2] = {T + 1, R};
    if (!(terms = (PyArrayObject *)PyArray_SimpleNew(2, tdims, tn))) goto done;

    const void *eps_ptr[HVAE_MAX_LEVELS];
    const void *const *ep = batch_eps(&in, m, eps_ptr);
    void *pp = PyArray_DATA(outs[0]), *mp = PyArray_DATA(outs[1]), *vp = PyArray_DATA(outs[2]),
         *gp = PyArray_DATA(outs[3]);
    const void *xp = PyArray_DATA(in.x), *tp = PyArray_DATA(in.target);
    double loss = 0;
    TEAM_CALL(self, threads, team_failed, {
        if (tn == NPY_FLOAT32) {
            float lossf = 0;
            st = hvae_train_step_f32(PyArray_DATA(terms), &lossf, &updated, gp, pp, mp, vp,
                                     &self->ws, m, xp, tp, (const float *const *)ep, (int)B,
                                     (float)beta, has_fb ? fb32 : NULL, &est, &opt, team);
            loss = lossf;
        } else {
            st = hvae_train_step_f64(PyArray_DATA(terms), &loss, &updated, gp, pp, mp, vp,
                                     &self->ws, m, xp, tp, (const double *const *)ep,
                                     (int)B, beta, has_fb ? fb : NULL, &est, &opt, team);
        }
    });
    if (batch_call_error(team_failed, threads, st, m, tn, R) < 0) goto done;
    result = Py_BuildValue("dON", loss, (PyObject *)terms, PyBool_FromLong(updated));
done:
    batch_release(&in, T);
    Py_XDECREF(terms);
    return result;
}

PyDoc_STRVAR(encode_doc,
"encode(params, x, eps=None)\n"
"--\n\n"
"The inference chain alone (top-down: mulv is q after the merge). x: (B, D); eps: list of T arrays (B, d_i), or None for z_i = mu_i.\n"
"Returns (mulv, z): lists of T arrays, mulv[i-1] (B, 2 d_i) = [mu_i, logvar_i], z[i-1] (B, d_i).");

static PyObject *Model_encode(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"params", "x", "eps", NULL};
    PyObject *params_obj, *x_obj, *eps_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|O", kwlist, &params_obj, &x_obj, &eps_obj))
        return NULL;
    if (not_ready(self)) return NULL;
    const hvae_model *m = &self->model;
    const int T = m->cfg.n_levels, tn = self->typenum;
    PyArrayObject *params = NULL, *x = NULL, *eps[HVAE_MAX_LEVELS] = {0};
    PyArrayObject *mulv[HVAE_MAX_LEVELS] = {0}, *z[HVAE_MAX_LEVELS] = {0};
    PyObject *result = NULL, *l1 = NULL, *l2 = NULL;
    hvae_status st;

    if (!(params = params_arg(self, params_obj))) goto done;
    if (!(x = input_2d(x_obj, "x", tn, -1, m->cfg.x_dim))) goto done;
    npy_intp B = PyArray_DIM(x, 0);
    if (eps_obj != Py_None && eps_arg(self, eps_obj, "eps", T, B, eps) < 0) goto done;
    if (unchanged(params, "params", tn, (npy_intp)m->n_params, -1) < 0 ||
        unchanged(x, "x", tn, B, m->cfg.x_dim) < 0)
        goto done;
    if (check_workspace(m, tn, B, "x") < 0) goto done;
    void *mp[HVAE_MAX_LEVELS], *zp[HVAE_MAX_LEVELS];
    const void *ep[HVAE_MAX_LEVELS];
    for (int i = 0; i < T; i++) {
        npy_intp d1[2] = {B, 2 * m->cfg.z_dim[i]}, d2[2] = {B, m->cfg.z_dim[i]};
        if (!(mulv[i] = (PyArrayObject *)PyArray_SimpleNew(2, d1, tn))) goto done;
        if (!(z[i] = (PyArrayObject *)PyArray_SimpleNew(2, d2, tn))) goto done;
        mp[i] = PyArray_DATA(mulv[i]);
        zp[i] = PyArray_DATA(z[i]);
        ep[i] = eps[i] ? PyArray_DATA(eps[i]) : NULL;
    }
    const void *const *epp = eps_obj == Py_None ? NULL : ep;
    if (tn == NPY_FLOAT32)
        CORE_CALL(self, st = hvae_encode_f32((float *const *)mp, (float *const *)zp, &self->ws, m,
                                             PyArray_DATA(params), PyArray_DATA(x),
                                             (const float *const *)epp, (int)B));
    else
        CORE_CALL(self, st = hvae_encode_f64((double *const *)mp, (double *const *)zp, &self->ws,
                                             m, PyArray_DATA(params), PyArray_DATA(x),
                                             (const double *const *)epp, (int)B));
    if (st != HVAE_OK) {
        batch_status_error(st, m, tn, B, "x");
        goto done;
    }
    if (!(l1 = list_of(mulv, T)) || !(l2 = list_of(z, T))) goto done;
    result = PyTuple_Pack(2, l1, l2);
done:
    Py_XDECREF(l1);
    Py_XDECREF(l2);
    Py_XDECREF(params);
    Py_XDECREF(x);
    release_all(eps, T);
    release_all(mulv, T);
    release_all(z, T);
    return result;
}

PyDoc_STRVAR(decode_doc,
"decode(params, z, level=T, eps=None, temperature=1.0)\n"
"--\n\n"
"The decoder chain from z_level (B, d_level) down to x. eps: None (means of p(z_{i-1}|z_i))\n"
"or a list of level-1 arrays (B, d_i) for i = 1..level-1 of unit noise, scaled by temperature.\n"
"Returns (x_params, zs): decoder 1's output (B, D) or (B, 2D) (logits, mean, or [mean, logvar])\n"
"and the list of level-1 arrays z_1..z_{level-1}.");

static PyObject *Model_decode(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"params", "z", "level", "eps", "temperature", NULL};
    PyObject *params_obj, *z_obj, *level_obj = Py_None, *eps_obj = Py_None, *temp_obj = NULL;
    double temperature = 1.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|OOO", kwlist, &params_obj, &z_obj,
                                     &level_obj, &eps_obj, &temp_obj))
        return NULL;
    if (not_ready(self)) return NULL;
    const hvae_model *m = &self->model;
    const int T = m->cfg.n_levels, tn = self->typenum;
    int level = T;
    PyArrayObject *params = NULL, *ztop = NULL, *xp = NULL;
    PyArrayObject *eps[HVAE_MAX_LEVELS] = {0}, *zs[HVAE_MAX_LEVELS] = {0};
    PyObject *result = NULL, *zl = NULL;
    hvae_status st;

    if (level_obj != Py_None && as_int(level_obj, "level", 1, T, &level) < 0) return NULL;
    if (temp_obj &&
        as_bounded_double(temp_obj, "temperature", 0, 0, INFINITY, 0, &temperature) < 0)
        return NULL;
    if (tn == NPY_FLOAT32 && !isfinite((float)temperature)) {
        PyErr_Format(PyExc_ValueError, "temperature: expected a finite number in the precision "
                     "of params (float32), got %R", temp_obj);
        return NULL;
    }
    if (!(params = params_arg(self, params_obj))) goto done;
    if (!(ztop = input_2d(z_obj, "z", tn, -1, m->cfg.z_dim[level - 1]))) goto done;
    npy_intp B = PyArray_DIM(ztop, 0);
    if (eps_obj != Py_None && eps_arg(self, eps_obj, "eps", level - 1, B, eps) < 0) goto done;
    if (unchanged(params, "params", tn, (npy_intp)m->n_params, -1) < 0 ||
        unchanged(ztop, "z", tn, B, m->cfg.z_dim[level - 1]) < 0)
        goto done;
    if (check_workspace(m, tn, B, "z") < 0) goto done;
    npy_intp xd[2] = {B, hvae_x_params_dim(&m->cfg)};
    if (!(xp = (PyArrayObject *)PyArray_SimpleNew(2, xd, tn))) goto done;
    void *zp[HVAE_MAX_LEVELS];
    const void *ep[HVAE_MAX_LEVELS];
    for (int i = 0; i < level - 1; i++) {
        npy_intp d[2] = {B, m->cfg.z_dim[i]};
        if (!(zs[i] = (PyArrayObject *)PyArray_SimpleNew(2, d, tn))) goto done;
        zp[i] = PyArray_DATA(zs[i]);
        ep[i] = eps[i] ? PyArray_DATA(eps[i]) : NULL;
    }
    const void *const *epp = eps_obj == Py_None ? NULL : ep;
    if (tn == NPY_FLOAT32)
        CORE_CALL(self, st = hvae_decode_f32(PyArray_DATA(xp), (float *const *)zp, &self->ws, m,
                                             PyArray_DATA(params), PyArray_DATA(ztop), level,
                                             (const float *const *)epp, (float)temperature,
                                             (int)B));
    else
        CORE_CALL(self, st = hvae_decode_f64(PyArray_DATA(xp), (double *const *)zp, &self->ws, m,
                                             PyArray_DATA(params), PyArray_DATA(ztop), level,
                                             (const double *const *)epp, temperature, (int)B));
    if (st != HVAE_OK) {
        batch_status_error(st, m, tn, B, "z");
        goto done;
    }
    if (!(zl = list_of(zs, level - 1))) goto done;
    result = PyTuple_Pack(2, (PyObject *)xp, zl);
done:
    Py_XDECREF(zl);
    Py_XDECREF(params);
    Py_XDECREF(ztop);
    Py_XDECREF(xp);
    release_all(eps, T);
    release_all(zs, T);
    return result;
}

PyDoc_STRVAR(param_table_doc,
"param_table()\n"
"--\n\n"
"The layout of the flat parameter buffer: a list of (name, offset, shape) in buffer order,\n"
"names enc{i}.{j}.weight / .bias then dec{i}.{j}.weight / .bias (DESIGN.md §4).");

static PyObject *Model_param_table(ModelObject *self, PyObject *Py_UNUSED(ignored)) {
    if (not_ready(self)) return NULL;
    const hvae_model *m = &self->model;
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    for (int side = 0; side < 2; side++)
        for (int i = 0; i < m->cfg.n_levels; i++) {
            const hvae_mlp *mlp = side == 0 ? &m->enc[i] : &m->dec[i];
            for (int j = 0; j < mlp->n_layers; j++) {
                const hvae_linear *l = &mlp->layer[j];
                const char *s = side == 0 ? "enc" : "dec";
                PyObject *w = Py_BuildValue("(Nn(ii))", PyUnicode_FromFormat("%s%d.%d.weight", s, i + 1, j),
                                            (Py_ssize_t)l->weight, l->out, l->in);
                PyObject *b = Py_BuildValue("(Nn(i))", PyUnicode_FromFormat("%s%d.%d.bias", s, i + 1, j),
                                            (Py_ssize_t)l->bias, l->out);
                if (!w || !b || PyList_Append(list, w) < 0 || PyList_Append(list, b) < 0) {
                    Py_XDECREF(w);
                    Py_XDECREF(b);
                    Py_DECREF(list);
                    return NULL;
                }
                Py_DECREF(w);
                Py_DECREF(b);
            }
        }
    return list;
}

static PyObject *Model_get_n_params(ModelObject *self, void *Py_UNUSED(closure)) {
    return PyLong_FromSize_t(self->model.n_params);
}

static PyObject *Model_get_dtype(ModelObject *self, void *Py_UNUSED(closure)) {
    return (PyObject *)PyArray_DescrFromType(self->typenum);
}

static PyObject *Model_get_x_params_dim(ModelObject *self, void *Py_UNUSED(closure)) {
    return PyLong_FromLong(hvae_x_params_dim(&self->model.cfg));
}

static PyMethodDef Model_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))Model_forward, METH_VARARGS | METH_KEYWORDS, forward_doc},
    {"train_step", (PyCFunction)(void (*)(void))Model_train_step, METH_VARARGS | METH_KEYWORDS,
     train_step_doc},
    {"encode", (PyCFunction)(void (*)(void))Model_encode, METH_VARARGS | METH_KEYWORDS, encode_doc},
    {"noise", (PyCFunction)(void (*)(void))Model_noise, METH_VARARGS | METH_KEYWORDS, noise_doc},
    {"decode", (PyCFunction)(void (*)(void))Model_decode, METH_VARARGS | METH_KEYWORDS, decode_doc},
    {"param_table", (PyCFunction)Model_param_table, METH_NOARGS, param_table_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Model_getset[] = {
    {"n_params", (getter)Model_get_n_params, NULL, "length of the flat parameter buffer", NULL},
    {"dtype", (getter)Model_get_dtype, NULL, "the numpy dtype of every array of the model", NULL},
    {"x_params_dim", (getter)Model_get_x_params_dim, NULL, "width of decoder 1's output", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(Model_doc,
"Model(x_dim, latent_dims, hidden_dims, likelihood='bernoulli', activation='tanh', kl='analytic',\n"
"      deterministic=False, dtype='float32', prior_variance='unit')\n"
"--\n\n"
"A validated model description with its parameter table and a reusable workspace. Calls on one\n"
"Model are serialised; different Models run in parallel (the GIL is released).");

static PyTypeObject ModelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hvae._core.Model",
    .tp_basicsize = sizeof(ModelObject),
    .tp_dealloc = (destructor)Model_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = Model_doc,
    .tp_methods = Model_methods,
    .tp_getset = Model_getset,
    .tp_init = (initproc)Model_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------------------------------ */
/* module functions                                                                             */

PyDoc_STRVAR(adam_doc,
"adam_update(params, m, v, grad, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)\n"
"--\n\n"
"One bias-corrected Adam step in place on params, m, v (1-D, same length and float dtype,\n"
"C-contiguous, writeable); grad of the same length and dtype; step >= 1 counts this update.\n"
"Returns True, or False without changing anything when grad holds a NaN or infinity.");

static PyObject *adam_update(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"params", "m", "v", "grad", "step", "lr", "beta1", "beta2", "eps", NULL};
    PyObject *p, *m1, *m2, *g, *step_obj, *lr_obj = NULL, *b1_obj = NULL, *b2_obj = NULL,
             *eps_obj = NULL;
    hvae_adam opt;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO|OOOO", kwlist, &p, &m1, &m2, &g,
                                     &step_obj, &lr_obj, &b1_obj, &b2_obj, &eps_obj))
        return NULL;
    if (!PyArray_Check(p)) {
        PyErr_Format(PyExc_TypeError, "params: expected a numpy.ndarray, got %R",
                     (PyObject *)Py_TYPE(p));
        return NULL;
    }
    int tn = PyArray_TYPE((PyArrayObject *)p);
    if (tn != NPY_FLOAT32 && tn != NPY_FLOAT64) {
        PyErr_Format(PyExc_TypeError, "params: expected dtype float32 or float64, got %R",
                     (PyObject *)PyArray_DESCR((PyArrayObject *)p));
        return NULL;
    }
    if (adam_args(step_obj, lr_obj, b1_obj, b2_obj, eps_obj, "eps", tn, &opt) < 0) return NULL;
    PyArrayObject *grad = input_array(g, "grad", tn); /* converted before the buffers' checks */
    if (!grad) return NULL;
    npy_intp n = PyArray_SIZE((PyArrayObject *)p);
    if (check_output(p, "params", tn, n) < 0 || check_output(m1, "m", tn, n) < 0 ||
        check_output(m2, "v", tn, n) < 0) {
        Py_DECREF(grad);
        return NULL;
    }
    if (PyArray_NDIM(grad) != 1 || PyArray_DIM(grad, 0) != n) {
        PyErr_Format(PyExc_ValueError, "grad: expected shape (%zd,), got %zd elements in %d "
                     "dimensions", (Py_ssize_t)n, (Py_ssize_t)PyArray_SIZE(grad), PyArray_NDIM(grad));
        Py_DECREF(grad);
        return NULL;
    }
    PyArrayObject *arr[4] = {(PyArrayObject *)p, (PyArrayObject *)m1, (PyArrayObject *)m2, grad};
    static const char *const names[4] = {"params", "m", "v", "grad"};
    if (check_disjoint(arr, names, 4) < 0) {
        Py_DECREF(grad);
        return NULL;
    }
    void *pp = PyArray_DATA((PyArrayObject *)p), *a = PyArray_DATA((PyArrayObject *)m1),
         *b = PyArray_DATA((PyArrayObject *)m2), *gp = PyArray_DATA(grad);
    int done;
    Py_BEGIN_ALLOW_THREADS
    if (tn == NPY_FLOAT32)
        done = adam_update_f32(pp, a, b, gp, (size_t)n, (float)opt.lr, (float)opt.beta1,
                               (float)opt.beta2, (float)opt.eps, opt.step);
    else
        done = adam_update_f64(pp, a, b, gp, (size_t)n, opt.lr, opt.beta1, opt.beta2, opt.eps,
                               opt.step);
    Py_END_ALLOW_THREADS
    Py_DECREF(grad);
    return PyBool_FromLong(done);
}

PyDoc_STRVAR(vecmath_doc,
"_vecmath(op, x)\n"
"--\n\n"
"The core's elementwise math on a float32 or float64 array, for accuracy tests: op is one of\n"
"'exp', 'expm1', 'log1p' (x in [0, 1]), 'tanh', 'softplus', 'sigmoid'.");

static PyObject *vecmath(PyObject *Py_UNUSED(mod), PyObject *args) {
    static const char *const OPS[] = {"exp", "expm1", "log1p", "tanh", "softplus", "sigmoid", NULL};
    PyObject *op_obj, *x_obj;
    int op;
    if (!PyArg_ParseTuple(args, "OO", &op_obj, &x_obj) || pick(op_obj, "op", OPS, &op) < 0)
        return NULL;
    int tn = PyArray_Check(x_obj) && PyArray_TYPE((PyArrayObject *)x_obj) == NPY_FLOAT32
                 ? NPY_FLOAT32 : NPY_FLOAT64;
    PyArrayObject *x = input_array(x_obj, "x", tn);
    if (!x) return NULL;
    PyArrayObject *out = (PyArrayObject *)PyArray_NewLikeArray(x, NPY_CORDER, NULL, 0);
    if (!out) {
        Py_DECREF(x);
        return NULL;
    }
    size_t n = (size_t)PyArray_SIZE(x);
    if (tn == NPY_FLOAT32)
        hvae_vecmath_f32(PyArray_DATA(out), PyArray_DATA(x), n, op);
    else
        hvae_vecmath_f64(PyArray_DATA(out), PyArray_DATA(x), n, op);
    Py_DECREF(x);
    return (PyObject *)out;
}

static PyMethodDef module_methods[] = {
    {"_vecmath", (PyCFunction)vecmath, METH_VARARGS, vecmath_doc},
    {"adam_update", (PyCFunction)(void (*)(void))adam_update, METH_VARARGS | METH_KEYWORDS, adam_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "hvae._core",
    "The C core of hvae: loss, exact gradients, encoder and decoder chains, Adam.", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__core(void) {
    import_array();
    (void)hvae_noise_tables(); /* built now, not lazily in a core call a fork might interrupt */
    if (PyType_Ready(&ModelType) < 0) return NULL;
    static int atfork_done;
    if (!atfork_done) {
        if (pthread_atfork(NULL, NULL, blas_after_fork_child) != 0) {
            PyErr_SetString(PyExc_RuntimeError, "hvae._core: pthread_atfork failed");
            return NULL;
        }
        atfork_done = 1;
    }
    PyObject *mod = PyModule_Create(&module);
    if (!mod) return NULL;
    Py_INCREF(&ModelType);
    if (PyModule_AddObject(mod, "Model", (PyObject *)&ModelType) < 0 ||
        PyModule_AddIntConstant(mod, "MAX_LEVELS", HVAE_MAX_LEVELS) < 0 ||
        PyModule_AddIntConstant(mod, "MAX_HIDDEN", HVAE_MAX_HIDDEN) < 0 ||
        PyModule_AddIntConstant(mod, "MAX_WIDTH", HVAE_MAX_WIDTH) < 0 ||
        PyModule_AddIntConstant(mod, "MAX_THREADS", HVAE_MAX_THREADS) < 0 ||
        PyModule_AddIntConstant(mod, "SPARSE_MIN_BATCH", HVAE_SPARSE_MIN_BATCH) < 0) {
        Py_DECREF(&ModelType);
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
