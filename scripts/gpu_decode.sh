#!/usr/bin/env bash
# Decoding on the GPU machine in one call: build, the split-forward and KV-cache tests on CUDA
# (test_split_forward.py, test_kvcache.py: one-warp blocks, forced splits, pages), then
# bench/decode.py (the decoding grid against torch's SDPA) and the KV-cache batch of
# bench/varlen.py --decode. The host time per call: scripts/gpu_host.sh. Logs and records go to $OUT (default /tmp/flashjit-decode).
#   bash scripts/gpu_decode.sh [--no-tests] [--no-grid] [--sizes 1x8192 16x32768 ...] [--splits N ...]
# Tests, grid and KV-cache batch can together pass a call's ten minutes: --no-grid (tests and the
# KV-cache batch), then --no-tests (the grid and the batch).
OUT=${OUT:-/tmp/flashjit-decode}
source "$(dirname "$0")/gpu_common.sh"
tests=1 grid=1 sizes=() splits=()
while (($#)); do
  case $1 in
    --no-tests) tests=0 ;;
    --no-grid) grid=0 ;;
    --sizes) shift; while (($#)) && [[ $1 != --* ]]; do sizes+=("$1"); shift; done; continue ;;
    --splits) shift; while (($#)) && [[ $1 != --* ]]; do splits+=("$1"); shift; done; continue ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
  shift
done

step "build"
build

if ((tests)); then
  step "test_split_forward.py, test_kvcache.py (FLASHJIT_TEST_DEVICE=cuda)"
  FLASHJIT_TEST_DEVICE=cuda timeout 300 python3 -m pytest tests/python/test_split_forward.py \
    tests/python/test_kvcache.py -q -x -n 8 2>&1 | tee "$OUT/pytest-decode.log" | tail -5
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if ((grid)); then
  step "decoding grid (bench/decode.py)"
  timeout 300 python3 bench/decode.py --out "$OUT" ${sizes[@]+--sizes "${sizes[@]}"} \
    ${splits[@]+--splits "${splits[@]}"} >"$OUT/decode.log" 2>&1 || status=1
  grep "^|" "$OUT/decode.log" | cut -d'|' -f1-13
fi

kvcache_bench kvcache.log

echo "gpu_decode status: $status"
exit $status
