/* blas.h - the names of the BLAS functions hvae calls. A BLAS whose symbols carry a prefix (the
 * scipy-openblas32 wheel's: scipy_cblas_sgemm, ...) is built with -DBLAS_SYMBOL_PREFIX=<prefix>,
 * as its pkg-config file says, and the names below gain it; otherwise they are the plain CBLAS
 * and OpenBLAS names. Names only, no declarations: real.h includes <cblas.h> after this, and the
 * binding declares the OpenBLAS thread functions itself (weak, so another BLAS links too). */
#ifndef HVAE_BLAS_H
#define HVAE_BLAS_H

#ifdef BLAS_SYMBOL_PREFIX
#define HVAE_BLAS_JOIN_(prefix, name) prefix##name
#define HVAE_BLAS_JOIN(prefix, name) HVAE_BLAS_JOIN_(prefix, name)
#define cblas_sgemm HVAE_BLAS_JOIN(BLAS_SYMBOL_PREFIX, cblas_sgemm)
#define cblas_dgemm HVAE_BLAS_JOIN(BLAS_SYMBOL_PREFIX, cblas_dgemm)
#define openblas_get_num_threads HVAE_BLAS_JOIN(BLAS_SYMBOL_PREFIX, openblas_get_num_threads)
#define openblas_set_num_threads HVAE_BLAS_JOIN(BLAS_SYMBOL_PREFIX, openblas_set_num_threads)
#endif

#endif
