#!/usr/bin/env bash
# Build the single-file executable `callfs` (PyInstaller one-file; docs/deploy.md says why) into
# $OUT_DIR (default dist/). It carries its own Python and every extra (PostgreSQL, Redis, uvloop,
# HTTP/3), so the target machine needs no Python at all, only a glibc as new as the build
# machine's (Debian 12: 2.36).
#   bash scripts/build-exe.sh                  # -> dist/callfs
#   OUT_DIR=/tmp/out PYTHON=python3.11 bash scripts/build-exe.sh
# PYTHON must be a CPython 3.11+ built with a shared libpython (pyenv's and Debian's are).
# WHEEL=path/to/callfs-*.whl reuses a wheel already built (CI builds it once).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT_DIR="${OUT_DIR:-dist}"
PYTHON="${PYTHON:-python3}"
PYINSTALLER_VERSION="6.22.3"

mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/callfs-exe.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

echo "== build venv"
"$PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install --quiet --upgrade pip
if [ -z "${WHEEL:-}" ]; then
    "$PY" -m pip install --quiet build
    # sdist first, wheel from it (build's default): nothing is written into the checkout
    "$PY" -m build --outdir "$WORK/wheel" "$ROOT" >"$WORK/build.log" 2>&1 \
        || { cat "$WORK/build.log"; exit 1; }
    WHEEL="$(ls "$WORK"/wheel/callfs-*.whl)"
fi
"$PY" -m pip install --quiet "${WHEEL}[all]" "pyinstaller==$PYINSTALLER_VERSION"

echo "== pyinstaller --onefile"
printf 'from callfs.cli import main\n\nmain()\n' >"$WORK/callfs_main.py"
# --copy-metadata: `callfs --version` and the pysyncobj version check read package metadata.
# --collect-submodules callfs: daemon.py imports backends lazily; the tests stay out.
"$WORK/venv/bin/pyinstaller" --onefile --name callfs --noconfirm --log-level WARN --strip \
    --distpath "$OUT_DIR" --workpath "$WORK/build" --specpath "$WORK" \
    --copy-metadata callfs --copy-metadata pysyncobj \
    --collect-data callfs --collect-submodules callfs --exclude-module callfs.tests \
    "$WORK/callfs_main.py"

"$OUT_DIR/callfs" --version
ls -l "$OUT_DIR/callfs"
