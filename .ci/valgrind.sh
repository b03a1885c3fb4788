#!/usr/bin/env bash
# .ci/valgrind.sh - valgrind memcheck on a tour of the C core (tests/valgrind_subset.py: forward,
# backward, encode, decode, Adam, _vecmath on tiny models of every kind, error paths, threads).
#
# hvae._core is rebuilt with -g (same optimisation as the normal build, only debug info added)
# in a temporary copy, so the normal in-place build is untouched. CPython, NumPy and OpenBLAS
# are not valgrind-clean on their own; the verdict counts only the errors with a frame in
# hvae/_core*.so or csrc/*, and the script fails when there is one.
#
# usage: .ci/valgrind.sh           env: PY (default .venv/bin/python), KEEP=1 keeps the logs
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
start=$SECONDS
if ! command -v valgrind >/dev/null; then
    echo "valgrind.sh: valgrind not found (Debian: apt-get install valgrind)" >&2
    exit 2
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hvae-valgrind.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then echo "valgrind.sh: keeping $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
SRC=$WORK/src
mkdir -p "$SRC/hvae"
cp -r csrc tests setup.py pyproject.toml README.md "$SRC/"
cp hvae/*.py "$SRC/hvae/"
(cd "$SRC" && HVAE_EXTRA_CFLAGS="-g" "$PY" setup.py -q build_ext --inplace \
    --build-temp "$WORK/build" 2>&1 | grep -v -E "^$|BuildBackendWarning" || true)
ls "$SRC"/hvae/_core*.so >/dev/null
build_done=$SECONDS

cd "$SRC"
export PYTHONPATH=$SRC${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import hvae._core as c; assert c.__file__.startswith('$SRC'), c.__file__"
XML=$WORK/memcheck.xml
set +e
PYTHONMALLOC=malloc OPENBLAS_NUM_THREADS=1 valgrind --tool=memcheck --error-limit=no \
    --num-callers=40 --track-origins=yes --leak-check=no --xml=yes --xml-file="$XML" \
    "$PY" tests/valgrind_subset.py
status=$?
set -e
run_done=$SECONDS
if [ $status -ne 0 ]; then
    echo "valgrind.sh: the subset failed under valgrind (exit status $status)" >&2
    exit $status
fi

"$PY" - "$XML" <<'PYEOF'
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
ours, total = [], 0
for err in root.iter("error"):
    if (err.findtext("kind") or "").startswith("Leak_"):
        continue  # leaks at exit: CPython never frees its static types; not checked here
    total += 1
    frames = [(f.findtext("obj") or "", f.findtext("fn") or "?",
               (f.findtext("dir") or "") + "/" + (f.findtext("file") or ""),
               f.findtext("line") or "") for f in err.iter("frame")]
    if any("hvae/_core" in obj or "/csrc/" in path for obj, _, path, _ in frames):
        what = err.findtext("what") or err.findtext("xwhat/text") or err.findtext("kind")
        ours.append((err.findtext("kind"), what, frames))
print(f"valgrind.sh: {total} memcheck errors (invalid reads/writes, uninitialised values, bad "
      f"frees) in all, {len(ours)} with a frame in hvae._core or csrc/")
for kind, what, frames in ours:
    print(f"\n{kind}: {what}")
    for obj, fn, path, line in frames[:15]:
        print(f"    {fn}  {path.split('/src/')[-1]}:{line}" if line else f"    {fn}  ({obj})")
sys.exit(1 if ours else 0)
PYEOF
verdict=$?
echo "valgrind.sh: build $((build_done - start)) s, valgrind run $((run_done - build_done)) s"
exit $verdict
