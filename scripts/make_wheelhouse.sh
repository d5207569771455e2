#!/usr/bin/env bash
# Make .wheelhouse/: the wheels gpu_check.sh installs (offline, --no-deps) on a GPU image that has
# CUDA torch and triton but not NeMo & co. Run here, where pip reaches a package index:
#
#   scripts/make_wheelhouse.sh            # -> .wheelhouse/ (about 42 MB), ignored by git
#
# Versions are the local .venv's (what the tests pass with); wheels are for the image's Python
# (GPU_PYTHON_VERSION, default 3.12) on manylinux x86-64. antlr4-python3-runtime 4.9.3 (omegaconf's)
# only exists as an sdist: it is built into a pure wheel here. Then, for the device runner:
#   carry [".wheelhouse"] and run scripts/gpu_check.sh (the repo plus wheels must stay under 64 MiB).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PIP="${PIP:-$ROOT/.venv/bin/pip}"
DEST="${1:-$ROOT/.wheelhouse}"
PYV="${GPU_PYTHON_VERSION:-3.12}"
mkdir -p "$DEST"
grep -qxF "/.wheelhouse/" .git/info/exclude 2>/dev/null || echo "/.wheelhouse/" >> .git/info/exclude
pins="$(mktemp)"
trap 'rm -f "$pins"' EXIT
"$PIP" freeze --exclude-editable 2>/dev/null | python3 -c '
import re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
wanted = {norm(l.strip()) for l in open(sys.argv[1]) if l.strip() and not l.startswith("#")}
for line in sys.stdin:
    name = line.split("==")[0].strip()
    if "==" in line and norm(name) in wanted:
        print(line.strip())
' scripts/gpu_wheels.txt > "$pins"
echo "wheelhouse: $(wc -l < "$pins") packages for Python $PYV -> $DEST"
grep -v '^antlr4-python3-runtime==' "$pins" > "$pins.bin" || true
"$PIP" download -q --no-deps --dest "$DEST" --python-version "$PYV" --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform any -r "$pins.bin"
if grep -q '^antlr4-python3-runtime==' "$pins"; then
  "$PIP" wheel -q --no-deps -w "$DEST" "$(grep '^antlr4-python3-runtime==' "$pins")"
fi
rm -f "$pins.bin"
echo "wheelhouse: $(ls "$DEST" | wc -l) wheels, $(du -sh "$DEST" | cut -f1)"
