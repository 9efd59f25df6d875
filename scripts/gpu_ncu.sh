#!/usr/bin/env bash
# Nsight Compute on the GPU machine, one call: build, then for each case one profiled launch of each
# kernel that matches --kernels (the second forward/backward of bench/profile_cuda.py), with the
# details page and the per-instruction warp-stall samples (SASS, CSV, gzipped) kept under $OUT, and
# scripts/ncu_stalls.py's summary of where the samples fall. Default $OUT: /tmp/flashjit-ncu.
#   bash scripts/gpu_ncu.sh [--kernels REGEX] [--tiles T] [--backward-pass split|one-pass] CASE...
# A CASE is HEADDIM:SEQLEN or HEADDIM:SEQLEN:causal, e.g. 64:1024:causal (B*N = 16k, H = 2048 / D).
# --kernels defaults to fj_attention_forward; fj_attention_backward profiles the backward's kernels
# (--backward-pass sets FLASHJIT_CUDA_BACKWARD).
OUT=${OUT:-/tmp/flashjit-ncu}
source "$(dirname "$0")/gpu_common.sh"
kernels=fj_attention_forward cases=()
while (($#)); do
  case $1 in
    --kernels) kernels=$2; shift ;;
    --tiles) export FLASHJIT_CUDA_TILES=$2; shift ;;
    --backward-pass) export FLASHJIT_CUDA_BACKWARD=$2; shift ;;
    *) cases+=("$1") ;;
  esac
  shift
done
((${#cases[@]})) || { echo "no case given (e.g. 64:1024:causal)"; exit 2; }

step "device"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader

step "build"
build

for case in "${cases[@]}"; do
  IFS=: read -r dim seqlen causal <<<"$case"
  name="d${dim}-n${seqlen}${causal:+-causal}"
  step "ncu: $name, kernels $kernels"
  # The first forward and backward compile and warm up (their launches are skipped): the forward is one
  # launch, the backward three (four above head dim 128; in one pass, up to 128, three where a kernel
  # writes dQ from the sums: the writer's orders, the default writer-pair, and atomic; two otherwise).
  skip=1
  if [[ $kernels == *backward* ]]; then
    skip=3
    ((dim > 128)) && skip=4
    if [[ ${FLASHJIT_CUDA_BACKWARD:-} == one-pass ]] && ((dim <= 128)); then
      case ${FLASHJIT_CUDA_ONE_PASS_DQ:-writer-pair} in
        ordered | eager | arrival | none | unordered) skip=2 ;;
      esac
    fi
  fi
  timeout 300 ncu --clock-control none -k "regex:$kernels" --launch-skip "$skip" -c 4 --set full --import-source yes \
    -f -o "$OUT/$name" python3 bench/profile_cuda.py --head-dim "$dim" --seqlen "$seqlen" ${causal:+--causal} \
    >"$OUT/$name.log" 2>&1 || { status=1; tail -5 "$OUT/$name.log"; continue; }
  ncu --import "$OUT/$name.ncu-rep" --page details >"$OUT/$name-details.txt" 2>&1
  ncu --import "$OUT/$name.ncu-rep" --page source --csv --print-source sass >"$OUT/$name-sass.csv" 2>"$OUT/$name-sass.err"
  python3 scripts/ncu_stalls.py "$OUT/$name-sass.csv" >"$OUT/$name-stalls.txt" 2>&1 || status=1
  gzip -f "$OUT/$name-sass.csv"
  rm -f "$OUT/$name.ncu-rep"
  grep -E "^  [a-z_]+.*Context|Duration|Registers Per|Issue Slots Busy|No Eligible" "$OUT/$name-details.txt" | head -16
  head -40 "$OUT/$name-stalls.txt"
done
echo "gpu_ncu status: $status"
exit $status
