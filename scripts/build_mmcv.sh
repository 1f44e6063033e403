#!/usr/bin/env bash
# mmcv 2.1.0 with its C++ ops, built once from the sdist and cached as a wheel; prints the wheel's path.
#
#   bash scripts/build_mmcv.sh .venv/bin/python      # -> ~/.cache/rmix/mmcv/<key>/mmcv-2.1.0-...whl
#
# Why a source build: the package registry has no compiled mmcv 2.1.0 wheel, mmdet 3.3.0 / mmseg 1.2.2
# assert mmcv<2.2.0, and ATSS (NMS) and mmseg need mmcv.ops, so mmcv-lite is not enough.
# How: the sdist's setup.py imports pkg_resources (setuptools<81) and needs torch at build time (no build
# isolation); it forces -std=c++17, which torch 2.14's ATen headers refuse ("C++20 or later compatible
# compiler is required"), so the flag is patched to c++20, and -g0 added (no debug info: half the compile
# time). CPU ops by default; FORCE_CUDA=1 builds the CUDA ops instead (needs nvcc), cached under its own key.
#
# The cache key is mmcv version x torch version x python version x cpu/cuda; RMIX_CACHE moves the cache
# (default ${XDG_CACHE_HOME:-~/.cache}/rmix). Messages go to stderr, the wheel path alone to stdout.
set -euo pipefail

PY=${1:-.venv/bin/python}
MMCV_VERSION=2.1.0
say() { echo "mmcv: $*" >&2; }

read -r TORCH_V PY_V < <("$PY" -c 'import sys, torch; print(torch.__version__, "%d.%d" % sys.version_info[:2])')
VARIANT=cpu
[ "${FORCE_CUDA:-0}" = "1" ] && VARIANT=cuda
CACHE_ROOT=${RMIX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rmix}
KEY_DIR="$CACHE_ROOT/mmcv/mmcv-$MMCV_VERSION-torch-$TORCH_V-py$PY_V-$VARIANT"

shopt -s nullglob
cached=("$KEY_DIR"/mmcv-"$MMCV_VERSION"-*.whl)
if [ ${#cached[@]} -gt 0 ]; then
    say "using the cached wheel ${cached[0]}"
    echo "${cached[0]}"
    exit 0
fi

JOBS=${MAX_JOBS:-$(nproc)}
mkdir -p "$KEY_DIR"
LOG="$KEY_DIR/build.log"
say "building mmcv $MMCV_VERSION from source with ops ($VARIANT, torch $TORCH_V, python $PY_V, $JOBS jobs):"
say "about 20 min on 2 cores the first time; cached at $KEY_DIR, later installs take seconds."
say "log: $LOG"

# Build-time helpers in the same environment: setuptools<81 (pkg_resources) and ninja (parallel compile).
"$PY" -m pip install -q "setuptools<81" ninja >&2
export PATH="$(dirname "$PY"):$PATH"   # torch's cpp_extension looks for `ninja` on PATH

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mmcv-build.XXXXXX")
trap 'rm -rf "$WORK"; [ -n "${BEAT:-}" ] && kill "$BEAT" 2>/dev/null || true' EXIT

# The sdist alone; pip prepares its metadata, which imports torch, hence --no-build-isolation.
"$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation "mmcv==$MMCV_VERSION" -d "$WORK" >"$LOG" 2>&1 \
    || { tail -n 20 "$LOG" >&2; say "could not download the mmcv $MMCV_VERSION sdist (log above)"; exit 1; }
tar -xzf "$WORK/mmcv-$MMCV_VERSION.tar.gz" -C "$WORK"
SRC="$WORK/mmcv-$MMCV_VERSION"
# -g0 after Python's -g: no debug info, half the compile time (36 s -> 15 s of CPU for roi_align.cpp).
sed -i -e "s/extra_compile_args\['cxx'\] = \['-std=c++17'\]/extra_compile_args['cxx'] = ['-std=c++17', '-g0']/" \
       -e 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
grep -q -- "'-std=c++20', '-g0'" "$SRC/setup.py" || { say "setup.py changed: the -std=c++17 patch no longer applies"; exit 1; }

# A line a minute, so the build is never silent: elapsed time and ninja's [done/total] counter.
start=$(date +%s)
( while sleep 60; do
      step=$(grep -o '\[[0-9]*/[0-9]*\]' "$LOG" 2>/dev/null | tail -n 1 || true)
      say "still building: $(( ($(date +%s) - start) / 60 )) min, compiled ${step:-[starting]}"
  done ) &
BEAT=$!

build_env=(MMCV_WITH_OPS=1 FORCE_CUDA="${FORCE_CUDA:-0}" MAX_JOBS="$JOBS")
[ "$VARIANT" = cpu ] && build_env+=(CUDA_VISIBLE_DEVICES=)   # CPU ops even where a GPU is visible
if ! env "${build_env[@]}" "$PY" -m pip wheel -v --no-deps --no-build-isolation -w "$WORK/dist" "$SRC" >>"$LOG" 2>&1; then
    tail -n 30 "$LOG" >&2
    say "build failed after $(( ($(date +%s) - start) / 60 )) min; full log: $LOG"
    exit 1
fi
kill "$BEAT" 2>/dev/null || true
BEAT=

built=("$WORK"/dist/mmcv-"$MMCV_VERSION"-*.whl)
[ ${#built[@]} -eq 1 ] || { say "pip wheel produced no mmcv wheel (see $LOG)"; exit 1; }
name=$(basename "${built[0]}")
cp "${built[0]}" "$KEY_DIR/$name.partial" && mv "$KEY_DIR/$name.partial" "$KEY_DIR/$name"   # atomic: no half wheel in the cache
say "built in $(( ($(date +%s) - start) / 60 )) min: $KEY_DIR/$name"
echo "$KEY_DIR/$name"
