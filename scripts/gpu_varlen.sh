#!/usr/bin/env bash
# Variable-length batches and KV caches on the GPU machine in one call: build, their CUDA
# tests (test_varlen.py, test_kvcache.py), then bench/varlen.py on CUDA: packed documents
# against the padded batch (16k tokens of documents drawn from 128-4096, D 128, bf16) and
# decoding against a contiguous and a paged cache. Records go to $OUT (default
# /tmp/flashjit-varlen), a short table last.
#   bash scripts/gpu_varlen.sh [--no-tests]
OUT=${OUT:-/tmp/flashjit-varlen}
source "$(dirname "$0")/gpu_common.sh"

step "device"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader

step "build"
build

if [[ " $* " != *" --no-tests "* ]]; then
  step "test_varlen.py, test_kvcache.py (FLASHJIT_TEST_DEVICE=cuda)"
  FLASHJIT_TEST_DEVICE=cuda timeout 300 python3 -m pytest tests/python/test_varlen.py tests/python/test_kvcache.py \
    -q -n 4 --timeout 120 2>&1 | tee "$OUT/pytest-varlen.log" | tail -5
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

step "packed documents (bench/varlen.py)"
timeout 300 python3 bench/varlen.py --device cuda --tokens 16384 --min-len 128 --max-len 4096 --heads 16 \
  --head-dim 128 --repeats 10 --out "$OUT" >"$OUT/varlen.log" 2>&1 || status=1
grep "^|" "$OUT/varlen.log"

kvcache_bench decode.log
echo "gpu_varlen status: $status"
exit $status
