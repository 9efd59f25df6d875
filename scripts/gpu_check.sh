#!/usr/bin/env bash
# Everything the GPU machine checks, in one run: build, the full pytest suite on
# CUDA, compute-sanitizer memcheck, synccheck and racecheck on small cases, and
# the benchmark table.
# Logs go to $OUT (default /tmp/flashjit-gpu-check). Usage:
#   bash scripts/gpu_check.sh [--quick-bench] [--tests-only | --no-tests]
# --tests-only stops after pytest and --no-tests skips it, for machines whose
# single command must end sooner than the whole check (about 8 minutes on an H200).
# PYTEST_FILES (default tests/python) and PYTEST_WORKERS (default 8) split the pytest run over calls;
# PYTEST_PART=1 takes the forward's files (test_attention, test_split_forward, test_cuda_graphs,
# test_prepare; test_attention.py alone took 198 s on an H200 with 12 workers), PYTEST_PART=3 the
# files of the longest single tests (test_fuzz, test_gradcheck, test_bench_cli, test_compile: 80-250 s
# each on an H100), PYTEST_PART=4 the one pass's files (test_one_pass_backward.py, every test in its
# dQ orders, and test_one_pass_whole_steps.py), PYTEST_PART=2
# every other file (parts 2 and 3 together ran past ten minutes with 12 workers; part 2 with the
# one-pass file took 460 s of the call's 570 with 14 workers before its orders grew).
# --compare-forward-groups (with --no-tests) also runs test_attention.py with the
# three-consumer-warpgroup forward (FLASHJIT_CUDA_TILES=groups=3) and times the
# forward with two and with three groups in one run (gpu_attention.py --forward-only).
OUT=${OUT:-/tmp/flashjit-gpu-check}
source "$(dirname "$0")/gpu_common.sh"

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

step "build"
build
python3 -c "import flashjit; print(flashjit.__version__, flashjit.backends(), flashjit.cuda.device_info(), \
flashjit.cuda.nvrtc_version())"

if [[ " $* " != *" --no-tests "* ]]; then
  step "pytest (FLASHJIT_TEST_DEVICE=cuda)"
  # In parallel processes (kernels compile on the CPUs), each test cut off after 240 s so that a
  # slow one is named rather than eating the call; PYTEST_FILES picks files (the call's time limit).
  part1="tests/python/test_attention.py tests/python/test_split_forward.py tests/python/test_cuda_graphs.py
    tests/python/test_prepare.py"
  part3="tests/python/test_fuzz.py tests/python/test_gradcheck.py tests/python/test_bench_cli.py
    tests/python/test_compile.py"
  part4="tests/python/test_one_pass_backward.py tests/python/test_one_pass_whole_steps.py"
  case "${PYTEST_PART:-}" in
    1) PYTEST_FILES=$part1 ;;
    2) PYTEST_FILES=$(ls tests/python/test_*.py | grep -v -x -F "$(echo $part1 $part3 $part4 | tr ' ' '\n')" | tr '\n' ' ') ;;
    3) PYTEST_FILES=$part3 ;;
    4) PYTEST_FILES=$part4 ;;
  esac
  FLASHJIT_TEST_DEVICE=cuda python3 -m pytest ${PYTEST_FILES:-tests/python} -q -n "${PYTEST_WORKERS:-8}" \
    --timeout 240 -rfE --maxfail=40 --durations=10 -p no:cacheprovider 2>&1 | tee "$OUT/pytest-cuda.log" | tail -40
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  if [[ " $* " == *" --tests-only "* ]]; then
    echo "gpu_check status: $status"
    exit $status
  fi
fi

for tool in memcheck synccheck; do
  step "compute-sanitizer $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 1 python3 scripts/sanitizer_cases.py >"$OUT/$tool.log" 2>&1 \
    || status=1
  tail -3 "$OUT/$tool.log"
done
# racecheck orders shared memory by bar.sync alone: it reports the kernels' mbarrier
# handoffs (producer writes or bulk copies, consumers' reads) as hazards, and it
# reports the same for a probe whose handoffs are correct by the PTX memory model
# (scripts/racecheck_probe.cu, modes 0 and 1; bench/results/h200-racecheck-probe-*).
# Its findings are listed for reading, and fail the check only where the probe's
# correct handoffs come out clean (a racecheck that models mbarriers).
step "compute-sanitizer racecheck"
nvcc -arch=sm_90a -o "$OUT/racecheck_probe" scripts/racecheck_probe.cu
probe_clean=1
for mode in 0 1; do
  compute-sanitizer --tool racecheck --error-exitcode 1 "$OUT/racecheck_probe" "$mode" >"$OUT/racecheck-probe-$mode.log" 2>&1 \
    || probe_clean=0
done
if compute-sanitizer --tool racecheck --error-exitcode 1 python3 scripts/sanitizer_cases.py >"$OUT/racecheck.log" 2>&1; then
  echo "racecheck: no hazards"
elif ((probe_clean)); then
  echo "racecheck: hazards, and it models mbarriers (the probe is clean): failing"; status=1
else
  echo "racecheck: hazards; it flags the probe's correct mbarrier handoffs too, so these are listed, not failed:"
fi
grep -E "^========= (Error|Warning): Race" "$OUT/racecheck.log" | sed -E 's/\+0x[0-9a-f]+//' | sort | uniq -c | head -10

step "benchmark"
bench_args=()
[[ " $* " == *" --quick-bench "* ]] && bench_args+=(--quick)
python3 bench/gpu_attention.py --out "$OUT" "${bench_args[@]}" 2>&1 | tee "$OUT/bench.log" | tail -25

if [[ " $* " == *" --compare-forward-groups "* ]]; then
  step "test_attention.py with three consumer warpgroups (FLASHJIT_CUDA_TILES=groups=3)"
  FLASHJIT_CUDA_TILES=groups=3 FLASHJIT_TEST_DEVICE=cuda timeout 400 python3 -m pytest tests/python/test_attention.py \
    -q --maxfail=10 2>&1 | tee "$OUT/pytest-forward-groups-3.log" | tail -5
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  step "forward with two and three consumer warpgroups"
  timeout 300 python3 bench/gpu_attention.py --forward-only --tiles default groups=3 --label forward-groups \
    --out "$OUT" 2>&1 | tee "$OUT/bench-forward-groups.log" | grep "^| "
fi
echo "gpu_check status: $status"
exit $status
