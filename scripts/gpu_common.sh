# Sourced by the GPU machine's scripts (scripts/gpu_*.sh) after
# they set OUT's default: the repository root as working directory, $OUT for
# logs, a kernel cache of its own, unbuffered Python, a status and step headings;
# build builds and installs the package or stops the script.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export FLASHJIT_CACHE_DIR=${FLASHJIT_CACHE_DIR:-/tmp/flashjit-cache}
status=0
step() { echo; echo "==== $* ($(date +%T))"; }
# The working tree's contents as one digest: every tracked and untracked (not ignored) file's
# bytes, so that an edit anywhere gives another stamp (the index may be older than the tree);
# the wheel parts a call carries (.devwheels) are not the tree.
tree_stamp() {
  git ls-files -co --exclude-standard -z -- . ':(exclude).devwheels' 2>/dev/null | xargs -0 md5sum 2>/dev/null |
    md5sum | cut -d' ' -f1
}
# A warm machine keeps the installed package between calls: the same tree is not built twice.
build() {
  local stamp
  stamp="tree $(tree_stamp)"
  if [ -f /tmp/flashjit-built ] && [ "$(cat /tmp/flashjit-built)" = "$stamp" ] && python3 -c "import flashjit._C" 2>/dev/null; then
    echo "already built and installed: $stamp"
    return
  fi
  python3 -m pip install -q --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
  echo "$stamp" >/tmp/flashjit-built
}
# The first steps of a study: the device with its clocks, then the build.
device_and_build() {
  step "device"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
  step "build"
  build
}
# cuda_pytest LOG SECONDS ARGS...: pytest on CUDA (8 workers, stop at the first failure) within
# SECONDS, its log in $OUT/LOG and its tail shown; a failure fails the script. Switches set before
# the call (FLASHJIT_CUDA_...=value cuda_pytest ...) reach the tests.
cuda_pytest() {
  local log=$1 seconds=$2
  shift 2
  FLASHJIT_TEST_DEVICE=cuda timeout "$seconds" python3 -m pytest "$@" -q -x -n 8 2>&1 | tee "$OUT/$log" | tail -8
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
}
# The KV-cache decoding batch of bench/varlen.py --decode (16 sequences of 1k-8k keys, GQA 32/8,
# D 128, 64-key pages), its log in $OUT/$1 and its table printed.
kvcache_bench() {
  step "KV-cache decoding (bench/varlen.py --decode)"
  timeout 300 python3 bench/varlen.py --device cuda --decode --batch 16 --min-len 1024 --max-len 8192 --heads 32 \
    --kv-heads 8 --head-dim 128 --page-size 64 --repeats 20 --out "$OUT" >"$OUT/$1" 2>&1 || status=1
  grep "^|" "$OUT/$1"
}
# Wheels that ../shared/tools/device-wheels packed, carried over in parts into /tmp/devwheels by
# back-to-back calls: unpacked into /tmp/site, which goes first on PYTHONPATH; then flashjit is
# built into the same folder (flashjit.mlx then finds MLX's libmlx at $ORIGIN/../mlx/lib and is
# compiled against MLX's CUDA headers, with eval_gpu), its log in $OUT/build-site.log. A warm
# machine that built the site from the same tree and the same wheel parts keeps it; a rebuild
# replaces the package there (pip --target leaves an existing one in place without --upgrade).
site_from_devwheels() {
  local stamp
  stamp="tree $(tree_stamp) wheels $(cat /tmp/devwheels/part* 2>/dev/null | md5sum | cut -d' ' -f1)"
  export PYTHONPATH=/tmp/site
  if [ -f /tmp/site-built ] && [ "$(cat /tmp/site-built)" = "$stamp" ] && python3 -c "import flashjit._mlx" 2>/dev/null; then
    echo "site already built: $stamp"
    return
  fi
  step "wheels"
  ls /tmp/devwheels
  cat /tmp/devwheels/part* | tar -x -C /tmp || { echo "a part is missing: start again from the first"; exit 1; }
  mkdir -p /tmp/site
  for wheel in /tmp/wheels/*.whl; do python3 -m zipfile -e "$wheel" /tmp/site; done
  export PYTHONPATH=/tmp/site
  step "build (into /tmp/site)"
  python3 -m pip install -v --upgrade --no-build-isolation --no-deps --target /tmp/site . >"$OUT/build-site.log" 2>&1 \
    || { tail -40 "$OUT/build-site.log"; exit 1; }
  grep -h "flashjit.mlx" "$OUT/build-site.log" | head -3
  python3 -c "import flashjit, flashjit._mlx as m; print(flashjit.__file__, 'mlx cuda_available', m.cuda_available())" \
    2>&1 | tail -1
  echo "$stamp" >/tmp/site-built
}
