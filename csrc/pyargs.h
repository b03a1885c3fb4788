/* pyargs.h - the binding's argument conversion and checks (pyargs.c): Python objects to C
 * values and NumPy arrays, each refusal a Python exception naming the argument, what was
 * expected and what came; core status codes to exceptions. Hidden symbols of hvae._core. */
#ifndef HVAE_PYARGS_H
#define HVAE_PYARGS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL hvae_ARRAY_API /* one NumPy API table for both files */
#ifndef HVAE_PYARGS_IMPORTS_ARRAY
#define NO_IMPORT_ARRAY /* _core.c's module init calls import_array */
#endif
#include <numpy/arrayobject.h>

#include "hvae.h"

#define PYARGS_API __attribute__((visibility("hidden")))

PYARGS_API int set_status_error(hvae_status st);
PYARGS_API int batch_status_error(hvae_status st, const hvae_model *m, int typenum, npy_intp B,
                                  const char *name);
PYARGS_API int check_workspace(const hvae_model *m, int typenum, npy_intp B, const char *name);
PYARGS_API const char *kind_name(char kind);
PYARGS_API PyArrayObject *input_array(PyObject *obj, const char *name, int typenum);
PYARGS_API int check_output(PyObject *obj, const char *name, int typenum, npy_intp n);
PYARGS_API int check_2d(PyArrayObject *a, const char *name, npy_intp rows, npy_intp cols);
PYARGS_API int check_finite(PyArrayObject *a, const char *name);
PYARGS_API PyArrayObject *input_2d(PyObject *obj, const char *name, int typenum, npy_intp rows,
                                   npy_intp cols);
PYARGS_API int as_long(PyObject *obj, const char *name, long lo, long hi, long *out);
PYARGS_API int as_int(PyObject *obj, const char *name, long lo, long hi, int *out);
PYARGS_API int as_double(PyObject *obj, const char *name, double *out);
PYARGS_API int as_bounded_double(PyObject *obj, const char *name, double lo, int lo_open, double hi,
                                 int hi_open, double *out);
PYARGS_API int as_flag(PyObject *obj, const char *name, int *out);
PYARGS_API int overlaps(PyArrayObject *a, PyArrayObject *b);
PYARGS_API int pick(PyObject *obj, const char *name, const char *const *choices, int *out);
PYARGS_API int beta_arg(PyObject *obj, int tn, double *beta);
PYARGS_API int free_bits_arg(PyObject *obj, int T, int tn, double *out, float *out32, int *present);

#endif
