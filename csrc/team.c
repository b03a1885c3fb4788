/* team.c - a small persistent thread team for the core: the calling thread plus n-1 workers that
 * run one function at a time (fork-join), and the team the current thread's core calls split
 * their work over. Precision-independent; POSIX threads and C11 atomics.
 *
 * A worker waits for the next job by spinning for a while (during a training step a job follows
 * the last within microseconds), then sleeps on a condition variable, so an idle team costs no
 * CPU. The caller runs part 0 of every job itself, then spins briefly and yields the CPU until
 * the workers are done (on a busy machine a worker may be waiting for a CPU). Which part a
 * thread runs depends only on its index: results do not depend on timing.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#include "hvae.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#define SPIN_WAIT_NS 300000L /* a worker spins this long for the next job, then sleeps */
#define SPIN_JOIN_NS 5000L   /* the caller spins this long for the workers, then yields */
#define SPIN_CHECK 64        /* pause loops between two readings of the clock */

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* Spin while *word == value (a pause loop) for up to `ns` nanoseconds; the last value read. */
static unsigned long spin_while(atomic_ulong *word, unsigned long value, long ns) {
    long deadline = now_ns() + ns;
    unsigned long v;
    for (int k = 1; (v = atomic_load(word)) == value; k++) {
        CPU_RELAX();
        if (k % SPIN_CHECK == 0 && now_ns() > deadline) break;
    }
    return v;
}

struct hvae_team {
    int n; /* threads, the caller included */
    pthread_t *threads;
    void (*fn)(void *ctx, int part, int n_parts);
    void *ctx;
    atomic_ulong generation; /* bumped once per job */
    atomic_int pending;      /* workers still running the current job */
    atomic_int sleepers;     /* workers blocked on `wake` */
    atomic_int stop;
    pthread_mutex_t mutex;
    pthread_cond_t wake;
    void *scratch; /* hvae_team_scratch's buffer, grow-only */
    size_t scratch_bytes;
};

typedef struct {
    hvae_team *team;
    int index;
} worker_arg;

static void *worker_main(void *p) {
    worker_arg arg = *(worker_arg *)p;
    free(p);
    hvae_team *tm = arg.team;
    unsigned long seen = 0;
    for (;;) {
        if (spin_while(&tm->generation, seen, SPIN_WAIT_NS) == seen) {
            /* sleepers is raised before generation is read again under the mutex; the caller
             * bumps generation before it reads sleepers: one of the two sees the other */
            pthread_mutex_lock(&tm->mutex);
            atomic_fetch_add(&tm->sleepers, 1);
            while (atomic_load(&tm->generation) == seen) pthread_cond_wait(&tm->wake, &tm->mutex);
            atomic_fetch_sub(&tm->sleepers, 1);
            pthread_mutex_unlock(&tm->mutex);
        }
        seen = atomic_load(&tm->generation);
        if (atomic_load(&tm->stop)) return NULL;
        tm->fn(tm->ctx, arg.index, tm->n);
        atomic_fetch_sub(&tm->pending, 1);
    }
}

static void team_post(hvae_team *tm) {
    atomic_fetch_add(&tm->generation, 1);
    if (atomic_load(&tm->sleepers) > 0) {
        pthread_mutex_lock(&tm->mutex);
        pthread_cond_broadcast(&tm->wake);
        pthread_mutex_unlock(&tm->mutex);
    }
}

hvae_team *hvae_team_create(int n_threads) {
    if (n_threads < 2 || n_threads > HVAE_MAX_THREADS) return NULL;
    hvae_team *tm = calloc(1, sizeof *tm);
    if (!tm) return NULL;
    tm->threads = calloc((size_t)n_threads - 1, sizeof *tm->threads);
    if (!tm->threads || pthread_mutex_init(&tm->mutex, NULL) != 0) {
        free(tm->threads);
        free(tm);
        return NULL;
    }
    if (pthread_cond_init(&tm->wake, NULL) != 0) {
        pthread_mutex_destroy(&tm->mutex);
        free(tm->threads);
        free(tm);
        return NULL;
    }
    atomic_init(&tm->generation, 0);
    atomic_init(&tm->pending, 0);
    atomic_init(&tm->sleepers, 0);
    atomic_init(&tm->stop, 0);
    tm->n = 1;
    /* the workers take no signals: they stay with the threads that handle them */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (int k = 1; k < n_threads; k++) {
        worker_arg *arg = malloc(sizeof *arg);
        if (!arg) break;
        arg->team = tm;
        arg->index = k;
        if (pthread_create(&tm->threads[k - 1], NULL, worker_main, arg) != 0) {
            free(arg);
            break;
        }
        tm->n = k + 1;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (tm->n < n_threads) { /* a thread could not start: stop those that did */
        hvae_team_free(tm);
        return NULL;
    }
    return tm;
}

void hvae_team_free(hvae_team *tm) {
    if (!tm) return;
    atomic_store(&tm->stop, 1);
    team_post(tm);
    for (int k = 1; k < tm->n; k++) pthread_join(tm->threads[k - 1], NULL);
    pthread_cond_destroy(&tm->wake);
    pthread_mutex_destroy(&tm->mutex);
    free(tm->scratch);
    free(tm->threads);
    free(tm);
}

void *hvae_team_scratch(hvae_team *tm, size_t bytes) {
    if (!tm || bytes == 0) return NULL;
    if (tm->scratch_bytes < bytes) {
        void *buf = malloc(bytes);
        if (!buf) return NULL;
        free(tm->scratch);
        tm->scratch = buf;
        tm->scratch_bytes = bytes;
    }
    return tm->scratch;
}

int hvae_team_size(const hvae_team *tm) { return tm ? tm->n : 1; }

void hvae_team_run(hvae_team *tm, void (*fn)(void *ctx, int part, int n_parts), void *ctx) {
    if (!tm) {
        fn(ctx, 0, 1);
        return;
    }
    tm->fn = fn;
    tm->ctx = ctx;
    atomic_store(&tm->pending, tm->n - 1);
    team_post(tm);
    fn(ctx, 0, tm->n);
    long deadline = now_ns() + SPIN_JOIN_NS;
    int yielding = 0;
    for (int k = 1; atomic_load(&tm->pending) != 0; k++) {
        if (yielding) {
            sched_yield();
        } else {
            CPU_RELAX();
            if (k % SPIN_CHECK == 0) yielding = now_ns() > deadline;
        }
    }
}

/* The team of the calling thread: core calls made on this thread split their work over it. */
static _Thread_local hvae_team *current_team;

hvae_team *hvae_team_current(void) { return current_team; }

void hvae_team_set_current(hvae_team *tm) { current_team = tm; }
