# Sourced by the GPU machine's scripts (gpu_check.sh, gpu_forward_study.sh) after
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
build() {
  python3 -m pip install -q --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
}
