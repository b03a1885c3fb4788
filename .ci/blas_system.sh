#!/usr/bin/env bash
# .ci/blas_system.sh - build hvae._core against Debian's OpenBLAS (HVAE_BLAS_PKG=openblas,
# through pkg-config; the default is the scipy-openblas32 wheel's) in a temporary copy of the
# sources, never over the in-place build in hvae/, and run the core's tests against it.
#
# usage: .ci/blas_system.sh [pytest arguments]      (make blas-system installs libopenblas-dev)
# env:   PY (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
pkg-config --exists openblas || {
    echo "blas_system.sh: pkg-config cannot find openblas (make blas-system installs it)" >&2
    exit 2
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hvae-blas-system.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
SRC=$WORK/src
mkdir -p "$SRC/hvae"
cp -r csrc tests setup.py pyproject.toml README.md "$SRC/"
cp hvae/*.py "$SRC/hvae/"
(cd "$SRC" && env -u HVAE_BLAS_CFLAGS -u HVAE_BLAS_LIBS HVAE_BLAS_PKG=openblas \
    "$PY" setup.py -q build_ext --inplace --build-temp "$WORK/build" 2>&1 \
    | grep -v -E "^$|BetaConfiguration|warnings.warn" || true)
export PYTHONPATH=$SRC${PYTHONPATH:+:$PYTHONPATH}
export PYTHONDONTWRITEBYTECODE=1
cd "$SRC"
"$PY" - <<PYEOF
import subprocess
import hvae._core as c
assert c.__file__.startswith("$SRC"), c.__file__
linked = subprocess.run(["ldd", c.__file__], capture_output=True, text=True).stdout
assert "libopenblas.so" in linked and "libscipy_openblas" not in linked, linked
print("blas_system.sh: testing", c.__file__, "linked to the system's OpenBLAS")
PYEOF
"$PY" -m pytest -q -p no:cacheprovider tests/test_core.py tests/test_train_step.py "$@"
