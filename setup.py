"""Build of the C extension hvae._core: links the OpenBLAS of the scipy-openblas32 wheel from PyPI
(a build and run dependency: no system package), compiles with -O3 -std=c11 -Wall -Wextra and
never with fast-math.

Override the BLAS with environment variables:
  HVAE_BLAS_PKG      "scipy-openblas32" (the default): the OpenBLAS of that wheel (symbols
                     prefixed, the build SciPy ships), found through the pkg-config data
                     the wheel carries (no pkg-config program is needed); the library is found
                     at run time beside the installed hvae ($ORIGIN/../scipy_openblas32/lib)
                     or where it was at build time (an in-place build). Any other value: the
                     pkg-config package to ask for, e.g. "openblas" for Debian's libopenblas-dev
  HVAE_BLAS_CFLAGS   compiler flags, e.g. "-I/opt/openblas/include" (skips pkg-config)
  HVAE_BLAS_LIBS     linker flags, e.g. "-L/opt/openblas/lib -lopenblas"
  HVAE_EXTRA_CFLAGS  more compiler flags (the sanitizer build uses this)
"""
import os
import re
import shlex
import subprocess

import numpy
from setuptools import Extension, setup


def pkg_config(*args):
    """Output of pkg-config split into flags, or None where pkg-config or the package is absent."""
    try:
        out = subprocess.run(["pkg-config", *args], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return shlex.split(out.stdout)


def wheel_flags():
    """(compile flags, link flags) of the scipy-openblas32 wheel, from the pkg-config text it
    carries (its Cflags define BLAS_SYMBOL_PREFIX; its Libs set an rpath to the wheel)."""
    try:
        import scipy_openblas32
    except ImportError:
        raise SystemExit("hvae: the default BLAS is the scipy-openblas32 wheel's, but the building "
                         "Python has no scipy_openblas32 module: pip install scipy-openblas32 "
                         "(or set HVAE_BLAS_PKG=openblas for a system OpenBLAS)") from None
    fields = {}
    for line in scipy_openblas32.get_pkg_config().splitlines():
        found = re.match(r"\s*([A-Za-z_.]+)\s*([=:])\s*(.*)", line)
        if found:
            name, _, value = found.groups()
            fields[name] = re.sub(r"\$\{(\w+)\}", lambda m: fields.get(m.group(1), ""), value)
    # beside the installed package first: pip builds in a throwaway environment whose path the
    # wheel's own rpath names
    libs = ["-Wl,-rpath,$ORIGIN/../scipy_openblas32/lib", *shlex.split(fields.get("Libs", ""))]
    return shlex.split(fields.get("Cflags", "")), libs


def blas_flags():
    """(compile flags, link flags) for CBLAS."""
    cflags, libs = os.environ.get("HVAE_BLAS_CFLAGS"), os.environ.get("HVAE_BLAS_LIBS")
    if cflags is not None or libs is not None:
        return shlex.split(cflags or ""), shlex.split(libs or "-lopenblas")
    pkg = os.environ.get("HVAE_BLAS_PKG", "scipy-openblas32")
    if pkg == "scipy-openblas32":
        return wheel_flags()
    found_c, found_l = pkg_config("--cflags", pkg), pkg_config("--libs", pkg)
    if found_c is None or found_l is None:
        raise SystemExit(
            f"hvae: pkg-config could not find '{pkg}'. Install OpenBLAS (Debian: "
            "apt-get install libopenblas-dev pkg-config) or set HVAE_BLAS_CFLAGS / HVAE_BLAS_LIBS."
        )
    return found_c, found_l


blas_c, blas_l = blas_flags()
extra = shlex.split(os.environ.get("HVAE_EXTRA_CFLAGS", ""))

core = Extension(
    "hvae._core",
    sources=["csrc/_core.c", "csrc/pyargs.c", "csrc/f32.c", "csrc/f64.c", "csrc/table.c",
             "csrc/team.c", "csrc/noise.c"],
    depends=["csrc/hvae.h", "csrc/pyargs.h", "csrc/real.h", "csrc/blas.h", "csrc/noise.h",
             "csrc/vecmath.c", "csrc/layers.c", "csrc/noise_fill.c", "csrc/sparse.c",
             "csrc/iwae.c", "csrc/model.c", "csrc/topdown.c", "csrc/step.c"],
    include_dirs=["csrc", numpy.get_include()],
    extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-fno-fast-math",
                        # let GCC vectorise the branch-free clamps of vecmath.c and sqrt in
                        # Adam; they change no result (nothing reads FP exception flags or
                        # errno) and, unlike fast-math, touch no process-wide FP state
                        "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off",
                        "-pthread", *blas_c, *extra],
    extra_link_args=["-pthread", *blas_l, *extra],
)

setup(ext_modules=[core])
