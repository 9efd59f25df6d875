#!/usr/bin/env bash
# The one-pass backward on the GPU machine in one call: build; the one-pass tests, and
# test_attention.py and test_varlen.py under FLASHJIT_CUDA_BACKWARD=one-pass; compute-sanitizer
# memcheck and racecheck on small cases with it; then the backward benchmark with a one-pass column beside the
# default (split) one, cuDNN and torch-flash (and FA4 where its wheels are installed), its record
# with peak memory and which backwards were bitwise repeatable. Logs and records go to $OUT
# (default /tmp/flashjit-backward).
#   bash scripts/gpu_backward.sh [--no-tests] [--no-sanitizer] [--no-bench] [--no-fa4] [--rounds R]
#        [--head-dims D ...] [--seqlens N ...] [--modes M ...] [--diagnostics] [--registers-dkdv]
# The bench has one-pass:writer-eager, one-pass:writer-groups, one-pass:atomic and
# one-pass:writer-pair columns too (FLASHJIT_CUDA_ONE_PASS_DQ=writer-eager: the ordered sums made
# by the dQ writer's bulk copies from shared memory, each count released before the next tile's
# wait; writer-groups: a tile's visitors summing in four groups by rank, the groups added after the
# pass; atomic: every visitor adding at once, in no order, not deterministic; writer-pair: the
# block order by two writer threads on alternate tiles, each count released once its copies are
# complete; writer-diagonal: the same with tiles walked upward, the visitors adding from the highest
# block down; --modes M ... sets the columns, e.g. one-pass:eager
# one-pass:writer one-pass:writer-arrival, measured on 2026-12-06); test_one_pass_backward.py runs
# every order.
# --diagnostics: also the one pass without its ordered dQ sums (one-pass:none, one-pass:unordered:
# FLASHJIT_CUDA_ONE_PASS_DQ, timing only), to tell the ordering's cost from the kernel's shape.
# --registers-dkdv: also the split backward with FLASHJIT_CUDA_DKDV=registers (a column,
# split:registers; the default takes P^T and dS^T from shared memory); with the tests,
# test_attention.py and test_varlen.py with it instead of the one pass's tests.
# Each part fits a call of under ten minutes with the build: run them as three calls
# (--no-sanitizer --no-bench; --no-tests --no-bench; --no-tests --no-sanitizer).
OUT=${OUT:-/tmp/flashjit-backward}
source "$(dirname "$0")/gpu_common.sh"
tests=1 sanitizer=1 bench=1 bench_args=() modes=(one-pass:writer-eager one-pass:writer-groups one-pass:atomic one-pass:writer-pair one-pass:writer-diagonal) registers_dkdv=0
while (($#)); do
  case $1 in
    --no-tests) tests=0 ;;
    --no-sanitizer) sanitizer=0 ;;
    --no-bench) bench=0 ;;
    --no-fa4) bench_args+=(--no-fa4) ;;
    --diagnostics) modes+=(one-pass:none one-pass:unordered) ;;
    --registers-dkdv) modes+=(split:registers) registers_dkdv=1 ;;
    --rounds) shift; bench_args+=(--rounds "$1") ;;
    --modes) shift; modes=()
      while (($#)) && [[ $1 != --* ]]; do modes+=("$1"); shift; done; continue ;;
    --head-dims|--seqlens) flag=$1; shift; bench_args+=("$flag")
      while (($#)) && [[ $1 != --* ]]; do bench_args+=("$1"); shift; done; continue ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
  shift
done

device_and_build

if ((tests)) && ((!registers_dkdv)); then
  step "test_one_pass_backward.py"
  cuda_pytest pytest-one-pass.log 150 tests/python/test_one_pass_backward.py
  step "test_attention.py with FLASHJIT_CUDA_BACKWARD=one-pass"
  FLASHJIT_CUDA_BACKWARD=one-pass cuda_pytest pytest-attention-one-pass.log 200 tests/python/test_attention.py
  step "test_varlen.py with FLASHJIT_CUDA_BACKWARD=one-pass (a variable-length batch in one launch)"
  FLASHJIT_CUDA_BACKWARD=one-pass cuda_pytest pytest-varlen-one-pass.log 120 tests/python/test_varlen.py
fi
if ((tests)) && ((registers_dkdv)); then
  # The register operands' runs alone (the one pass's have a call of their own), without the tests
  # that only vary the forward's kernel.
  step "test_attention.py and test_varlen.py with FLASHJIT_CUDA_BACKWARD=split FLASHJIT_CUDA_DKDV=registers"
  FLASHJIT_CUDA_BACKWARD=split FLASHJIT_CUDA_DKDV=registers cuda_pytest pytest-attention-registers-dkdv.log 300 \
    tests/python/test_attention.py -k "not forced_forward_tiles and not chained_work_tiles and not static_schedule"
  FLASHJIT_CUDA_BACKWARD=split FLASHJIT_CUDA_DKDV=registers cuda_pytest pytest-varlen-registers-dkdv.log 180 \
    tests/python/test_varlen.py
fi

if ((sanitizer)); then
  step "compute-sanitizer memcheck, FLASHJIT_CUDA_BACKWARD=one-pass"
  FLASHJIT_CUDA_BACKWARD=one-pass timeout 200 compute-sanitizer --tool memcheck --error-exitcode 1 \
    python3 scripts/sanitizer_cases.py >"$OUT/memcheck-one-pass.log" 2>&1 || status=1
  tail -3 "$OUT/memcheck-one-pass.log"
  step "compute-sanitizer memcheck, one pass with the dQ writer (bulk copies, the dQ convert kernel)"
  FLASHJIT_CUDA_BACKWARD=one-pass FLASHJIT_CUDA_ONE_PASS_DQ=writer timeout 200 compute-sanitizer --tool memcheck \
    --error-exitcode 1 python3 scripts/sanitizer_cases.py >"$OUT/memcheck-one-pass-writer.log" 2>&1 || status=1
  tail -3 "$OUT/memcheck-one-pass-writer.log"
  if ((registers_dkdv)); then
    step "compute-sanitizer memcheck, FLASHJIT_CUDA_DKDV=registers"
    FLASHJIT_CUDA_BACKWARD=split FLASHJIT_CUDA_DKDV=registers timeout 200 compute-sanitizer --tool memcheck \
      --error-exitcode 1 python3 scripts/sanitizer_cases.py >"$OUT/memcheck-registers-dkdv.log" 2>&1 || status=1
    tail -3 "$OUT/memcheck-registers-dkdv.log"
  fi
  # racecheck also reports the kernels' mbarrier handoffs (scripts/gpu_check.sh says why): the
  # hazards are listed by place, to see whether any is new against the split backward's.
  racecheck_modes=(split one-pass)
  ((registers_dkdv)) && racecheck_modes+=(split:registers)
  for mode in "${racecheck_modes[@]}"; do
    step "compute-sanitizer racecheck, backward $mode"
    dkdv=shared
    [ "$mode" = split:registers ] && dkdv=registers
    FLASHJIT_CUDA_BACKWARD=${mode%%:*} FLASHJIT_CUDA_DKDV=$dkdv timeout 150 compute-sanitizer --tool racecheck \
      python3 scripts/sanitizer_cases.py >"$OUT/racecheck-${mode/:/-}.log" 2>&1 || status=1
    grep -E "^========= (Error|Warning): Race" "$OUT/racecheck-${mode/:/-}.log" | sed -E 's/\+0x[0-9a-f]+//' | sort \
      | uniq -c | head -10
  done
fi

if ((bench)); then
  step "backward benchmark: split (default) and one-pass"
  timeout 480 python3 bench/gpu_attention.py --out "$OUT" --backward-modes "${modes[@]}" "${bench_args[@]}" \
    >"$OUT/bench.log" 2>&1 || status=1
  grep -v "^{" "$OUT/bench.log" | grep -v "^wrote" | tail -40
fi
echo "backward status: $status"
exit $status
