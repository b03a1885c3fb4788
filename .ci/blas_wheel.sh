#!/usr/bin/env bash
# .ci/blas_wheel.sh - build hvae._core against the OpenBLAS of the scipy-openblas32 wheel
# (HVAE_BLAS_PKG=scipy-openblas32: prefixed symbols, no system package) in a temporary copy of
# the sources, never over the in-place build in hvae/, and run the core's tests against it.
#
# usage: .ci/blas_wheel.sh [pytest arguments]
# env:   PY (default .venv/bin/python; scipy-openblas32 is installed into it when missing)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
"$PY" -c "import scipy_openblas32" 2>/dev/null || "$PY" -m pip install -q scipy-openblas32

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hvae-blas-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
SRC=$WORK/src
mkdir -p "$SRC/hvae"
cp -r csrc tests setup.py pyproject.toml README.md "$SRC/"
cp hvae/*.py "$SRC/hvae/"
(cd "$SRC" && HVAE_BLAS_PKG=scipy-openblas32 "$PY" setup.py -q build_ext --inplace \
    --build-temp "$WORK/build" 2>&1 | grep -v -E "^$|BetaConfiguration|warnings.warn" || true)
export PYTHONPATH=$SRC${PYTHONPATH:+:$PYTHONPATH}
export PYTHONDONTWRITEBYTECODE=1
cd "$SRC"
"$PY" - <<PYEOF
import subprocess
import hvae._core as c
assert c.__file__.startswith("$SRC"), c.__file__
linked = subprocess.run(["ldd", c.__file__], capture_output=True, text=True).stdout
assert "libscipy_openblas.so" in linked and "libopenblas" not in linked, linked
print("blas_wheel.sh: testing", c.__file__, "linked to the scipy-openblas32 wheel")
PYEOF
"$PY" -m pytest -q -p no:cacheprovider tests/test_core.py tests/test_train_step.py "$@"
