#!/usr/bin/env bash
# .ci/sanitize.sh - build hvae._core with AddressSanitizer and UndefinedBehaviorSanitizer
# (UBSan fatal: -fno-sanitize-recover=all) and run the test suite under it.
#
# The build goes to a temporary copy of the sources, never over the in-place build in hvae/:
# that copy comes first on PYTHONPATH (before the editable install's finder), and libasan is
# preloaded because python itself is not instrumented. Leak detection is off (CPython's own
# allocations at exit), PYTHONMALLOC=malloc lets ASan see every Python object, and
# allocator_may_return_null=1 turns an absurd allocation into a MemoryError as without ASan.
#
# usage: .ci/sanitize.sh [pytest arguments]     e.g. .ci/sanitize.sh -x -k reliability
# env:   PY (default .venv/bin/python), KEEP=1 keeps the temporary directory
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
CC=${CC:-gcc}
start=$SECONDS

LIBASAN=$($CC -print-file-name=libasan.so)
if [ ! -e "$LIBASAN" ]; then
    echo "sanitize.sh: libasan.so not found ($CC -print-file-name=libasan.so); install gcc" >&2
    exit 2
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hvae-sanitize.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then echo "sanitize.sh: keeping $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
SRC=$WORK/src
mkdir -p "$SRC/hvae"
cp -r csrc tests setup.py pyproject.toml README.md "$SRC/"
cp hvae/*.py "$SRC/hvae/"
[ -d notebooks ] && cp -r notebooks "$SRC/"
[ -d benchmarks ] && cp -r benchmarks "$SRC/"

SAN="-fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all"
SAN="$SAN -fno-omit-frame-pointer -g"
echo "sanitize.sh: building hvae._core with $SAN"
(cd "$SRC" && HVAE_EXTRA_CFLAGS="$SAN" "$PY" setup.py -q build_ext --inplace \
    --build-temp "$WORK/build" 2>&1 | grep -v -E "^$|BuildBackendWarning" || true)
ls "$SRC"/hvae/_core*.so >/dev/null
build_done=$SECONDS

# libstdc++ too: without it ASan cannot intercept C++ exceptions thrown by other extensions
# (matplotlib's ft2font) and aborts
LD_PRELOAD=$LIBASAN
LIBSTDCXX=$($CC -print-file-name=libstdc++.so)
[ -e "$LIBSTDCXX" ] && LD_PRELOAD="$LD_PRELOAD $LIBSTDCXX"
export LD_PRELOAD
export ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONMALLOC=malloc
export PYTHONPATH=$SRC${PYTHONPATH:+:$PYTHONPATH}
export PYTHONDONTWRITEBYTECODE=1
cd "$SRC"
# the instrumented extension is the one imported
"$PY" - <<PYEOF
import hvae, hvae._core as c
assert c.__file__.startswith("$SRC"), c.__file__
assert hvae.__file__.startswith("$SRC"), hvae.__file__
print("sanitize.sh: testing", c.__file__)
PYEOF

# the whole suite except the benchmarks and notebooks (slow, and nothing of the core they do
# not also test elsewhere)
set +e
"$PY" -m pytest -q -p no:cacheprovider tests \
    --ignore-glob='tests/test_bench*' --ignore-glob='tests/*notebook*' \
    -k "not notebook and not benchmark" "$@"
status=$?
set -e
echo "sanitize.sh: build $((build_done - start)) s, tests $((SECONDS - build_done)) s," \
     "pytest exit status $status"
exit $status
