#!/usr/bin/env bash
# The forward kernel's work on the GPU machine in one call: build, the forward
# tests on CUDA (test_attention.py, including every forced tile configuration),
# compute-sanitizer memcheck on small cases (once per --tiles value), the forward benchmark with several
# FLASHJIT_CUDA_TILES settings as columns, and (--ncu) Nsight Compute on one
# D128 forward through scripts/gpu_ncu.sh, and (--trace D:N[:causal] ...) where the work tiles' time
# goes by the kernel's own clock (scripts/trace_tiles.py). Logs and records go to $OUT (default
# /tmp/flashjit-forward-study).
#   bash scripts/gpu_forward_study.sh [--no-tests] [--no-memcheck] [--no-bench] [--ncu] [--tiles T1 T2 ...]
#        [--head-dims D ...] [--trace D:N[:causal] ...]
OUT=${OUT:-/tmp/flashjit-forward-study}
source "$(dirname "$0")/gpu_common.sh"
tests=1 memcheck=1 bench=1 ncu=0 tiles=() head_dims=() traces=()
while (($#)); do
  case $1 in
    --no-tests) tests=0 ;;
    --no-memcheck) memcheck=0 ;;
    --no-bench) bench=0 ;;
    --trace) shift; while (($#)) && [[ $1 != --* ]]; do traces+=("$1"); shift; done; continue ;;
    --ncu) ncu=1 ;;
    --tiles) shift; while (($#)) && [[ $1 != --* ]]; do tiles+=("$1"); shift; done; continue ;;
    --head-dims) shift; while (($#)) && [[ $1 != --* ]]; do head_dims+=("$1"); shift; done; continue ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
  shift
done
((${#tiles[@]})) || tiles=(default)

device_and_build

# The traces first (a minute or two): the tests after them take the call's remaining time.
for case in "${traces[@]}"; do
  IFS=: read -r d n c <<<"$case"
  for t in "${tiles[@]}"; do
    step "trace of the work tiles: D $d N $n ${c:-} tiles $t"
    name="trace-d$d-n$n${c:+-$c}-${t//[=,]/_}"
    timeout 120 python3 scripts/trace_tiles.py --head-dim "$d" --seqlen "$n" ${c:+--causal} \
      $([ "$t" = default ] || echo "--tiles $t") --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.txt" || status=1
  done
done

if ((tests)); then
  step "test_attention.py (FLASHJIT_TEST_DEVICE=cuda)"
  cuda_pytest pytest-attention.log 360 tests/python/test_attention.py
fi

if ((memcheck)); then
  step "compute-sanitizer memcheck"
  timeout 240 compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/sanitizer_cases.py \
    >"$OUT/memcheck.log" 2>&1 || status=1
  tail -3 "$OUT/memcheck.log"
  for t in "${tiles[@]}"; do
    [ "$t" = default ] && continue
    step "compute-sanitizer memcheck, FLASHJIT_CUDA_TILES=$t"
    FLASHJIT_CUDA_TILES=$t timeout 240 compute-sanitizer --tool memcheck --error-exitcode 1 \
      python3 scripts/sanitizer_cases.py >"$OUT/memcheck-$t.log" 2>&1 || status=1
    tail -3 "$OUT/memcheck-$t.log"
  done
fi

if ((bench)); then
  step "forward benchmark, tiles: ${tiles[*]}"
  timeout 420 python3 bench/gpu_attention.py --forward-only --no-fa4 --out "$OUT" --tiles "${tiles[@]}" \
    ${head_dims[@]+--head-dims "${head_dims[@]}"} >"$OUT/bench.log" 2>&1 || status=1
  grep -v "^{" "$OUT/bench.log" | grep -v "^wrote" | tail -40
fi

if ((ncu)); then
  step "ncu: D128 N4096 forward (scripts/gpu_ncu.sh)"
  OUT=$OUT/ncu timeout 300 bash scripts/gpu_ncu.sh 128:4096 || status=1
fi
echo "forward study status: $status"
exit $status
