#!/usr/bin/env bash
# Host time per call on the GPU machine in one call: build, bench/overhead.py --device cuda (each
# entry point beside torch's SDPA, the parts of a _C forward and backward call, and a training
# step of flashjit's and torch's SDPA under torch.profiler: each op's host and device time),
# bench/driver_calls.py (each CUDA driver call alone), and the parts again with every TMA
# descriptor encoded anew (FLASHJIT_CUDA_MAP_CACHE=0). Logs and records go to $OUT (default
# /tmp/flashjit-host).
#   bash scripts/gpu_host.sh
OUT=${OUT:-/tmp/flashjit-host}
source "$(dirname "$0")/gpu_common.sh"

step "build"
build

step "host time per call (bench/overhead.py --device cuda)"
timeout 300 python3 bench/overhead.py --device cuda --calls 1000 --profile 200 --out "$OUT" >"$OUT/overhead.log" 2>&1 \
  || status=1
grep -E "fwd .* us|^wall|^\| \`" "$OUT/overhead.log" | head -80

step "the CUDA driver calls' host time (bench/driver_calls.py)"
timeout 60 python3 bench/driver_calls.py --out "$OUT" 2>&1 | grep "^|" || status=1

step "the parts of a call with every TMA descriptor encoded anew (FLASHJIT_CUDA_MAP_CACHE=0)"
FLASHJIT_CUDA_MAP_CACHE=0 timeout 120 python3 bench/overhead.py --device cuda --calls 1000 --only parts kernel \
  2>&1 | grep -E "fwd .* us" || status=1
echo "gpu_host status: $status"
exit $status
