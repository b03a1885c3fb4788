/* pyargs.c - the binding's argument conversion and checks: Python objects to C values and NumPy
 * arrays, each refusal a Python exception naming the argument, what was expected and what came;
 * core status codes to exceptions (declared in pyargs.h). */
#include "pyargs.h"

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

int set_status_error(hvae_status st) {
    if (st == HVAE_ENOMEM)
        PyErr_SetString(PyExc_MemoryError, "hvae core: could not allocate the workspace");
    else
        PyErr_Format(PyExc_ValueError, "hvae core: invalid arguments (status %d)", (int)st);
    return -1;
}

/* set_status_error for a core call on a batch of B rows of argument `name`: a MemoryError says
 * how much workspace the batch needs. */
int batch_status_error(hvae_status st, const hvae_model *m, int typenum, npy_intp B,
                       const char *name) {
    if (st != HVAE_ENOMEM) return set_status_error(st);
    size_t bytes = hvae_workspace_bytes(m, (int)B, typenum == NPY_FLOAT32 ? 4 : 8);
    if (bytes == 0)
        PyErr_Format(PyExc_MemoryError, "%s: a batch of %zd rows needs more workspace than "
                     "can be addressed", name, (Py_ssize_t)B);
    else
        PyErr_Format(PyExc_MemoryError, "%s: a batch of %zd rows needs %zu MiB of workspace, "
                     "which could not be allocated; use smaller batches", name, (Py_ssize_t)B,
                     (bytes >> 20) + 1);
    return -1;
}

/* Before a core call on B rows: a MemoryError (naming the argument) when the workspace would
 * be larger than the machine's physical memory. malloc alone does not catch this: with
 * overcommit it succeeds, and the core writing into the buffer gets the process OOM-killed. */
int check_workspace(const hvae_model *m, int typenum, npy_intp B, const char *name) {
    size_t bytes = hvae_workspace_bytes(m, (int)B, typenum == NPY_FLOAT32 ? 4 : 8);
    size_t phys = 0;
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGE_SIZE)
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    if (pages > 0 && page > 0 && (size_t)pages <= SIZE_MAX / (size_t)page)
        phys = (size_t)pages * (size_t)page;
#endif
    if (bytes == 0 || (phys && bytes > phys))
        return batch_status_error(HVAE_ENOMEM, m, typenum, B, name);
    return 0;
}

const char *kind_name(char kind) {
    switch (kind) {
    case 'c': return "complex";
    case 'O': return "object";
    case 'U': case 'S': return "string";
    case 'M': case 'm': return "datetime";
    case 'V': return "void/structured";
    default: return "non-numeric";
    }
}

/* Convert obj to a C-contiguous, aligned, native-order array of typenum (a read-only input).
 * Booleans, integers and floats are cast; anything else is a TypeError. New reference or NULL. */
PyArrayObject *input_array(PyObject *obj, const char *name, int typenum) {
    PyArrayObject *raw = (PyArrayObject *)PyArray_FROM_O(obj);
    if (!raw) {
        if (PyErr_ExceptionMatches(PyExc_ValueError) || PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: expected a numeric array, got %R", name,
                         (PyObject *)Py_TYPE(obj));
        }
        return NULL;
    }
    char kind = PyArray_DESCR(raw)->kind;
    if (kind != 'b' && kind != 'i' && kind != 'u' && kind != 'f') {
        PyErr_Format(PyExc_TypeError, "%s: expected a real (float, integer or bool) array, got %s dtype %R",
                     name, kind_name(kind), (PyObject *)PyArray_DESCR(raw));
        Py_DECREF(raw);
        return NULL;
    }
    PyArrayObject *arr = (PyArrayObject *)PyArray_FROM_OTF(
        (PyObject *)raw, typenum, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    Py_DECREF(raw);
    return arr;
}

/* An array the core writes into: exactly typenum, C-contiguous, aligned, writeable, not
 * byte-swapped, 1-D of length n. Borrowed check; returns 0 or -1 with an exception. */
int check_output(PyObject *obj, const char *name, int typenum, npy_intp n) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a numpy.ndarray, got %R", name,
                     (PyObject *)Py_TYPE(obj));
        return -1;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != typenum || !PyArray_ISNBO(PyArray_DESCR(a)->byteorder)) {
        PyArray_Descr *want = PyArray_DescrFromType(typenum);
        PyErr_Format(PyExc_TypeError, "%s: expected dtype %R (native byte order), got %R", name,
                     (PyObject *)want, (PyObject *)PyArray_DESCR(a));
        Py_DECREF(want);
        return -1;
    }
    if (PyArray_NDIM(a) != 1 || PyArray_DIM(a, 0) != n) {
        PyErr_Format(PyExc_ValueError, "%s: expected shape (%zd,), got an array of %d dimensions "
                     "and %zd elements", name, (Py_ssize_t)n, PyArray_NDIM(a),
                     (Py_ssize_t)PyArray_SIZE(a));
        return -1;
    }
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a) || !PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous, aligned, writeable array",
                     name);
        return -1;
    }
    return 0;
}

int check_2d(PyArrayObject *a, const char *name, npy_intp rows, npy_intp cols) {
    if (PyArray_NDIM(a) != 2) {
        PyErr_Format(PyExc_ValueError, "%s: expected a 2-D array (batch, %zd), got %d dimensions",
                     name, (Py_ssize_t)cols, PyArray_NDIM(a));
        return -1;
    }
    npy_intp r = PyArray_DIM(a, 0), c = PyArray_DIM(a, 1);
    if (c != cols || (rows >= 0 && r != rows)) {
        if (rows >= 0)
            PyErr_Format(PyExc_ValueError, "%s: expected shape (%zd, %zd), got (%zd, %zd)", name,
                         (Py_ssize_t)rows, (Py_ssize_t)cols, (Py_ssize_t)r, (Py_ssize_t)c);
        else
            PyErr_Format(PyExc_ValueError, "%s: expected shape (batch, %zd), got (%zd, %zd)", name,
                         (Py_ssize_t)cols, (Py_ssize_t)r, (Py_ssize_t)c);
        return -1;
    }
    if (r < 1) {
        PyErr_Format(PyExc_ValueError, "%s: expected at least one row, got an empty batch", name);
        return -1;
    }
    if (r > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: batch of %zd rows is too large (at most %d)", name,
                     (Py_ssize_t)r, INT_MAX);
        return -1;
    }
    return 0;
}

int check_finite(PyArrayObject *a, const char *name) {
    npy_intp n = PyArray_SIZE(a), cols = PyArray_NDIM(a) == 2 ? PyArray_DIM(a, 1) : 1;
    int bad = 0; /* a loop without an early exit: it vectorises */
    if (PyArray_TYPE(a) == NPY_FLOAT32) {
        const float *p = (const float *)PyArray_DATA(a);
        for (npy_intp k = 0; k < n; k++) bad |= !isfinite(p[k]);
    } else {
        const double *p = (const double *)PyArray_DATA(a);
        for (npy_intp k = 0; k < n; k++) bad |= !isfinite(p[k]);
    }
    if (!bad) return 0;
    /* find the first row again for the message */
    npy_intp k = 0;
    if (PyArray_TYPE(a) == NPY_FLOAT32) {
        const float *p = (const float *)PyArray_DATA(a);
        while (isfinite(p[k])) k++;
    } else {
        const double *p = (const double *)PyArray_DATA(a);
        while (isfinite(p[k])) k++;
    }
    PyErr_Format(PyExc_ValueError, "%s: expected finite values, got NaN or infinity in row %zd",
                 name, (Py_ssize_t)(k / cols));
    return -1;
}

/* A 2-D input of `cols` columns (and `rows` rows unless rows < 0), finite. New ref or NULL. */
PyArrayObject *input_2d(PyObject *obj, const char *name, int typenum, npy_intp rows,
                        npy_intp cols) {
    PyArrayObject *a = input_array(obj, name, typenum);
    if (!a) return NULL;
    if (check_2d(a, name, rows, cols) < 0 || check_finite(a, name) < 0) {
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

int as_long(PyObject *obj, const char *name, long lo, long hi, long *out) {
    if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected an integer, got %R", name,
                     (PyObject *)Py_TYPE(obj));
        return -1;
    }
    PyObject *num = PyNumber_Index(obj);
    if (!num) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: expected an integer, got %R", name,
                         (PyObject *)Py_TYPE(obj));
        }
        return -1;
    }
    int overflow = 0;
    long v = PyLong_AsLongAndOverflow(num, &overflow);
    if ((v == -1 && PyErr_Occurred()) || overflow || v < lo || v > hi) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: expected an integer in [%ld, %ld], got %S", name, lo,
                     hi, num);
        Py_DECREF(num);
        return -1;
    }
    Py_DECREF(num);
    *out = v;
    return 0;
}

int as_int(PyObject *obj, const char *name, long lo, long hi, int *out) {
    long v;
    if (as_long(obj, name, lo, hi, &v) < 0) return -1;
    *out = (int)v;
    return 0;
}

/* A Python number (float, int, NumPy scalar) as a double; a TypeError naming the argument for
 * anything else, a ValueError for an int too large for a double. */
int as_double(PyObject *obj, const char *name, double *out) {
    PyNumberMethods *num = Py_TYPE(obj)->tp_as_number;
    if (PyBool_Check(obj) ||
        (!PyFloat_Check(obj) && !PyIndex_Check(obj) && !(num && num->nb_float))) {
        PyErr_Format(PyExc_TypeError, "%s: expected a number, got %R", name,
                     (PyObject *)Py_TYPE(obj));
        return -1;
    }
    double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred()) {
        int overflow = PyErr_ExceptionMatches(PyExc_OverflowError);
        PyErr_Clear();
        if (overflow)
            PyErr_Format(PyExc_ValueError, "%s: expected a finite number, got %R", name, obj);
        else
            PyErr_Format(PyExc_TypeError, "%s: expected a number, got %R", name,
                         (PyObject *)Py_TYPE(obj));
        return -1;
    }
    *out = v;
    return 0;
}

/* as_double, then finite and lo <= v (lo < v when lo_open), v <= hi (v < hi when hi_open; no
 * upper bound when hi is infinite); the message shows the value. */
int as_bounded_double(PyObject *obj, const char *name, double lo, int lo_open, double hi,
                      int hi_open, double *out) {
    if (as_double(obj, name, out) < 0) return -1;
    double v = *out;
    if (!isfinite(v) || v < lo || (lo_open && v == lo) || v > hi || (hi_open && v == hi)) {
        PyObject *f = PyFloat_FromDouble(v), *l = PyFloat_FromDouble(lo),
                 *h = PyFloat_FromDouble(hi);
        if (f && l && h) {
            if (isfinite(hi))
                PyErr_Format(PyExc_ValueError, "%s: expected a number in %s%R, %R%s, got %R",
                             name, lo_open ? "(" : "[", l, h, hi_open ? ")" : "]", f);
            else
                PyErr_Format(PyExc_ValueError, "%s: expected a finite number %s %R, got %R",
                             name, lo_open ? ">" : ">=", l, f);
        }
        Py_XDECREF(f);
        Py_XDECREF(l);
        Py_XDECREF(h);
        return -1;
    }
    return 0;
}

/* The truth value of obj (a flag); an object without one (e.g. a NumPy array of several
 * values) is a TypeError naming the argument. */
int as_flag(PyObject *obj, const char *name, int *out) {
    int v = PyObject_IsTrue(obj);
    if (v < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: expected True or False, got %R", name,
                     (PyObject *)Py_TYPE(obj));
        return -1;
    }
    *out = v;
    return 0;
}

/* Whether two C-contiguous arrays share any byte. */
int overlaps(PyArrayObject *a, PyArrayObject *b) {
    const char *pa = PyArray_BYTES(a), *pb = PyArray_BYTES(b);
    npy_intp na = PyArray_NBYTES(a), nb = PyArray_NBYTES(b);
    return na > 0 && nb > 0 && pa < pb + nb && pb < pa + na;
}

int pick(PyObject *obj, const char *name, const char *const *choices, int *out) {
    char expected[160] = "";
    for (int k = 0; choices[k]; k++) {
        size_t len = strlen(expected);
        snprintf(expected + len, sizeof expected - len, "%s'%s'", k ? ", " : "", choices[k]);
    }
    if (!PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected one of %s, got %R", name, expected,
                     (PyObject *)Py_TYPE(obj));
        return -1;
    }
    Py_ssize_t size;
    const char *value = PyUnicode_AsUTF8AndSize(obj, &size);
    if (!value) PyErr_Clear(); /* e.g. a lone surrogate: no choice matches */
    for (int k = 0; value && choices[k]; k++) {
        if ((size_t)size == strlen(choices[k]) && strcmp(value, choices[k]) == 0) {
            *out = k;
            return 0;
        }
    }
    PyErr_Format(PyExc_ValueError, "%s: expected one of %s, got %R", name, expected, obj);
    return -1;
}

/* beta: finite >= 0 in the working precision tn too (1e300 is inf in float32). 0 or -1. */
int beta_arg(PyObject *obj, int tn, double *beta) {
    if (as_bounded_double(obj, "beta", 0, 0, INFINITY, 0, beta) < 0) return -1;
    if (tn == NPY_FLOAT32 && !isfinite((float)*beta)) {
        PyErr_Format(PyExc_ValueError, "beta: expected a finite number in the precision of "
                     "params (float32), got %R", obj);
        return -1;
    }
    return 0;
}

/* free_bits: None (-> *present 0), or a sequence of T numbers >= 0, finite in the precision tn,
 * or -inf (a level never floored: what the data-parallel step gives a level whose whole batch
 * is above its floor), into out (T,) and out32 (T,). A tuple copy is read, so an item's
 * conversion cannot change what is being read. 0, or -1. */
int free_bits_arg(PyObject *obj, int T, int tn, double *out, float *out32, int *present) {
    *present = 0;
    if (!obj || obj == Py_None) return 0;
    PyObject *tup = PySequence_Check(obj) ? PySequence_Tuple(obj) : NULL;
    if (!tup) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "free_bits: expected a sequence of %d numbers (one per "
                     "level), got %R", T, (PyObject *)Py_TYPE(obj));
        return -1;
    }
    if (PyTuple_GET_SIZE(tup) != T) {
        PyErr_Format(PyExc_ValueError, "free_bits: expected %d numbers (one per level), got %zd",
                     T, PyTuple_GET_SIZE(tup));
        Py_DECREF(tup);
        return -1;
    }
    for (int i = 0; i < T; i++) {
        char item[32];
        snprintf(item, sizeof item, "free_bits[%d]", i);
        if (as_double(PyTuple_GET_ITEM(tup, i), item, &out[i]) < 0 ||
            (out[i] != -INFINITY &&
             as_bounded_double(PyTuple_GET_ITEM(tup, i), item, 0, 0, INFINITY, 0, &out[i]) < 0)) {
            Py_DECREF(tup);
            return -1;
        }
        out32[i] = (float)out[i];
        if (tn == NPY_FLOAT32 && out[i] != -INFINITY && !isfinite(out32[i])) {
            PyErr_Format(PyExc_ValueError, "%s: expected a number finite in float32, got %R",
                         item, PyTuple_GET_ITEM(tup, i));
            Py_DECREF(tup);
            return -1;
        }
    }
    Py_DECREF(tup);
    *present = 1;
    return 0;
}
