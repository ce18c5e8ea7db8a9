#!/usr/bin/env bash
# Build, here (with a network), what the GPU check carries to a machine without one:
#   gpu-bundle/wheels/          the wheels of scripts/gpu/bundle.txt, for CPython 3.12 manylinux x86_64
#   gpu-bundle/cifar10-slices/  the real CIFAR-10 slices (../shared does not travel)
# gpu-bundle/ is git-ignored: name it in the device tool's `carry`. Then it checks that the wheels are
# complete against the device image's package list and prints the size of everything that travels.
#
#   bash scripts/gpu/build_bundle.sh
#   BUNDLE=DIR DATA_SRC=DIR PY=python3 bash scripts/gpu/build_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}  # any Python with pip: it only downloads, for the device's Python
BUNDLE=${BUNDLE:-gpu-bundle}
DATA_SRC=${DATA_SRC:-../shared/data/cifar10-slices}
LIMIT_MIB=64   # the device tool's limit on what travels (tree + carried paths)
TARGET_MIB=50  # the project's own ceiling, leaving room for the tree to grow

mkdir -p "$BUNDLE"
# a fresh wheel folder each time, so a changed pin never leaves a second version behind
# (pip's cache makes the re-download cheap)
rm -rf "$BUNDLE/wheels.tmp"
mkdir -p "$BUNDLE/wheels.tmp"
grep -v '^\s*#' scripts/gpu/bundle.txt | grep -v '^\s*$' > "$BUNDLE/wheels.tmp/requirements.txt"
# manylinux up to glibc 2.35: the device's image accepts newer ones, but the rehearsal here (Debian 12,
# glibc 2.36) must install the very same files
plats=()
for p in manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 \
  manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  plats+=(--platform "$p")
done
echo "bundle: downloading $(wc -l < "$BUNDLE/wheels.tmp/requirements.txt") wheels for CPython 3.12 manylinux x86_64" >&2
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --abi abi3 --abi none "${plats[@]}" -d "$BUNDLE/wheels.tmp" -r "$BUNDLE/wheels.tmp/requirements.txt" 2>&1 \
  | grep -v "^WARNING: Location" || true
rm -f "$BUNDLE/wheels.tmp/requirements.txt"
n_want=$(grep -v '^\s*#' scripts/gpu/bundle.txt | grep -vc '^\s*$')
n_got=$(find "$BUNDLE/wheels.tmp" -name '*.whl' | wc -l)
if [ "$n_got" != "$n_want" ]; then
  echo "bundle: got $n_got wheels of $n_want (see pip's messages above); the old bundle is kept" >&2
  exit 1
fi
rm -rf "$BUNDLE/wheels"
mv "$BUNDLE/wheels.tmp" "$BUNDLE/wheels"

if [ -d "$DATA_SRC" ]; then
  mkdir -p "$BUNDLE/cifar10-slices"
  cp "$DATA_SRC"/*.npz "$BUNDLE/cifar10-slices/"
  [ -f "$DATA_SRC/README.md" ] && cp "$DATA_SRC/README.md" "$BUNDLE/cifar10-slices/"
  chmod u+w "$BUNDLE/cifar10-slices"/*
  (cd "$BUNDLE/cifar10-slices" && sha256sum ./*.npz > SHA256SUMS)
else
  echo "bundle: no data at $DATA_SRC: the check's CIFAR-10 steps will be skipped (set DATA_SRC)" >&2
fi

# the manifest travels with the bundle: the check prints it, so a run says what it installed
(cd "$BUNDLE/wheels" && for w in *.whl; do printf '%s %s %s\n' "$(sha256sum "$w" | cut -c1-16)" \
  "$(stat -c %s "$w")" "$w"; done) > "$BUNDLE/MANIFEST.txt"

"$PY" scripts/gpu/bundle_deps.py check "$BUNDLE/wheels" || {
  echo "bundle: incomplete for the device (see PROBLEM lines); fix scripts/gpu/bundle.txt" >&2
  exit 1
}

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo
echo "wheel sizes:"
sort -k2 -n -r "$BUNDLE/MANIFEST.txt" | awk '{ printf "  %8.2f MiB  %s\n", $2 / 1048576, $3 }'
wheels=$(du -cb "$BUNDLE"/wheels/*.whl | tail -1 | cut -f1)
data=$( (du -cb "$BUNDLE"/cifar10-slices/* 2>/dev/null || echo "0 total") | tail -1 | cut -f1)
# the tree as it travels: tracked and untracked-not-ignored files
tree=$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
total=$((wheels + data + tree))
echo "bundle wheels: $(mib "$wheels") ($(find "$BUNDLE/wheels" -name '*.whl' | wc -l) files)"
echo "data slices:   $(mib "$data")"
echo "working tree:  $(mib "$tree")"
echo "travels:       $(mib "$total") of the device's $LIMIT_MIB MiB (project ceiling about $TARGET_MIB MiB)"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "bundle: over the device's $LIMIT_MIB MiB: it would not travel" >&2
  exit 1
elif [ "$total" -gt $((TARGET_MIB * 1048576)) ]; then
  echo "bundle: warning: over the project's ceiling of about $TARGET_MIB MiB" >&2
fi
echo "carry: $BUNDLE   (device: bash scripts/gpu/check.sh; it finds $BUNDLE/ by itself)"
