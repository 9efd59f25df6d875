#!/usr/bin/env bash
# Reliability checks on the GPU machine in one call: build; the forward tests
# that cover the persistent grid's tile counters, the tuner and NaN handling;
# whether compute-sanitizer racecheck understands mbarrier ordering
# (scripts/racecheck_probe.cu, three modes); racecheck on the sanitizer cases;
# the differential fuzzer on CUDA; and the forward timed with the stream's own
# tile counter and with a memset one (gpu_attention.py --tiles); the edge-accuracy
# cases against cuDNN, flash and FA4 (bench/edge_accuracy.py); and, given a copy of
# PyTorch's test_transformers.py (with expecttest and hypothesis importable), PyTorch's
# SDPA tests plain and under the patch (scripts/torch_sdpa_suite.py --device cuda).
#   bash scripts/gpu_reliability.sh [--cases N] [--no-bench] [--torch-suite PATH]
OUT=${OUT:-/tmp/flashjit-reliability}
source "$(dirname "$0")/gpu_common.sh"
cases=500 bench=1 torch_suite=""
while (($#)); do
  case $1 in
    --cases) shift; cases=$1 ;;
    --no-bench) bench=0 ;;
    --torch-suite) shift; torch_suite=$1 ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
  shift
done

step "device"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader

step "build"
build

step "forward tests: tile counters, tuning, NaN, split forward"
FLASHJIT_TEST_DEVICE=cuda timeout 300 python3 -m pytest tests/python/test_attention.py tests/python/test_tuning.py \
  tests/python/test_split_forward.py -q -x -n 8 -k "stream_tile or many_work or nan or tuning or stored or split" \
  2>&1 | tee "$OUT/pytest-forward.log" | tail -4
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "racecheck on the mbarrier probe (modes 0, 1: correct; 2: a planted race)"
nvcc -arch=sm_90a -o /tmp/racecheck_probe scripts/racecheck_probe.cu
for mode in 0 1 2; do
  compute-sanitizer --tool racecheck /tmp/racecheck_probe "$mode" >"$OUT/racecheck-probe-$mode.log" 2>&1
  echo "mode $mode: $(grep -m1 "^mode" "$OUT/racecheck-probe-$mode.log"); $(grep -E "RACECHECK SUMMARY|ERROR SUMMARY" \
    "$OUT/racecheck-probe-$mode.log" | tr '\n' ' ')"
done

step "racecheck on the sanitizer cases"
timeout 300 compute-sanitizer --tool racecheck --error-exitcode 1 python3 scripts/sanitizer_cases.py \
  >"$OUT/racecheck.log" 2>&1 || status=1
grep -E "RACECHECK SUMMARY|ERROR SUMMARY" "$OUT/racecheck.log"
grep -E "^========= (Error|Warning)" "$OUT/racecheck.log" | sort | uniq -c | head -10

step "fuzzer: $cases cases on CUDA"
timeout 400 python3 tests/python/fuzz.py --cases "$cases" --device cuda --jobs 8 >"$OUT/fuzz.log" 2>&1 || status=1
tail -5 "$OUT/fuzz.log"

step "edge accuracy: flashjit, cuDNN, flash, mem-efficient, FA4 against float64"
timeout 300 python3 bench/edge_accuracy.py --device cuda --out "$OUT" >"$OUT/edge.log" 2>&1 || status=1
grep "^| " "$OUT/edge.log" | head -40

if [[ -n $torch_suite ]]; then
  step "PyTorch's test_transformers.py plain and patched on CUDA"
  timeout 1500 python3 scripts/torch_sdpa_suite.py "$torch_suite" --device cuda --out "$OUT" \
    --source "pytorch/pytorch test/test_transformers.py at 00030eb8e81f911c48c4d7634fa6b8bb2fae1a1b" \
    >"$OUT/torch-suite.log" 2>&1 || status=1
  sed -n '/^plain/,/^Fail plain/p' "$OUT/torch-suite.log" | head -40
fi

if ((bench)); then
  step "forward: the stream's tile counter vs one zeroed by a memset"
  timeout 300 python3 bench/gpu_attention.py --forward-only --no-fa4 --out "$OUT" --label counter \
    --tiles default counter=memset >"$OUT/bench.log" 2>&1 || status=1
  grep "^| " "$OUT/bench.log" | head -30
fi
echo "reliability status: $status"
exit $status
