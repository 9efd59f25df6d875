#!/usr/bin/env bash
# Context parallelism on the GPU machine in one call: build, the distributed tests that run on one
# GPU (a world of one over NCCL, bit for bit against flashjit.attention), and bench/ring.py with
# one rank a GPU for every GPU the machine has (weak and strong scaling, bf16, causal zigzag).
# Logs and records go to $OUT (default /tmp/flashjit-ring), a short table last.
#   bash scripts/gpu_ring.sh [--tokens-per-rank 16384] [--strong-tokens 131072]
OUT=${OUT:-/tmp/flashjit-ring}
source "$(dirname "$0")/gpu_common.sh"
export NCCL_NVLS_ENABLE=0
tokens=16384 strong=0
while (($#)); do
  case $1 in
    --tokens-per-rank) tokens=$2; shift ;;
    --strong-tokens) strong=$2; shift ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
  shift
done

step "device"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)

step "build"
build

step "test_distributed.py (FLASHJIT_TEST_DEVICE=cuda)"
FLASHJIT_TEST_DEVICE=cuda timeout 300 python3 -m pytest tests/python/test_distributed.py -q -rfE 2>&1 \
  | tee "$OUT/pytest-distributed.log" | tail -5
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "bench/ring.py on 1..$gpus GPUs"
ranks=1; r=2; while ((r <= gpus)); do ranks="$ranks $r"; r=$((r * 2)); done
timeout 420 python3 bench/ring.py --device cuda --ranks $ranks --tokens-per-rank "$tokens" --strong-tokens "$strong" \
  --heads 16 --head-dim 128 --dtype bfloat16 --repeats 5 --out "$OUT" >"$OUT/ring.log" 2>&1 || status=1
grep "^|" "$OUT/ring.log"
echo "gpu_ring status: $status"
exit $status
