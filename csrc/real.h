/* real.h - precision selection for the generic kernels: layers.c, sparse.c, model.c and step.c
 * are written once in terms of `real` and F(name), and compiled twice, by f32.c and f64.c. */
#ifndef HVAE_REAL_H
#define HVAE_REAL_H

#include <float.h>
#include <math.h>

#include "blas.h"
#include <cblas.h>

#if defined(HVAE_DOUBLE)
typedef double real;
#define F(name) name##_f64
#define GEMM cblas_dgemm
#define REAL_MAX DBL_MAX
#define REAL_EPSILON DBL_EPSILON
#define EXP exp
#define LOG log
#define LOG1P log1p
#define TANH tanh
#define SQRT sqrt
#define POW pow
#else
typedef float real;
#define F(name) name##_f32
#define GEMM cblas_sgemm
#define REAL_MAX FLT_MAX
#define REAL_EPSILON FLT_EPSILON
#define EXP expf
#define LOG logf
#define LOG1P log1pf
#define TANH tanhf
#define SQRT sqrtf
#define POW powf
#endif

/* The elementwise kernels get clones for AVX2 and AVX-512 machines, chosen when the library
 * loads (GCC on x86-64 Linux, through ifunc). Each clone gives the same numbers: no FMA
 * contraction (-ffp-contract=off) and no reassociation. HVAE_NO_CLONES turns this off. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(HVAE_NO_CLONES)
#define HVAE_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define HVAE_CLONES
#endif

#define LOG_2PI ((real)1.8378770664093454835606594728112)

#endif /* HVAE_REAL_H */
