#!/usr/bin/env bash
# PyTorch's test_transformers.py on the GPU machine, plain and under flashjit.patch_sdpa(), one
# shard a call, its record in $OUT: the patched run, then the plain run of only the tests that did
# not pass patched (--patched-first: about half the GPU time of two whole runs), one after the
# other with SUITE_WORKERS workers each (default 8: with 14 on an 80 GB H100 the float32 math
# references of batch 8 ran the GPU out of memory in 1,661 tests; at once, sharing the GPU, about
# 800 of a shard's 18,664 tests came out differently on each side, none of them reaching flashjit:
# 2026-12-06), then the tests that
# passed plain only run again alone both ways (--confirm), so that the record tells flashjit's
# differences from the runs' noise.
# The test file and the suite's site folder travel with the call: carry build/suite (made by
# scripts/suite_site.sh; the test file is PyTorch's test/test_transformers.py at the commit below,
# read from pytorch/pytorch, not part of this repository).
#   bash scripts/gpu_suite.sh K/N [KEYWORD]    (KEYWORD: pytest -k, default TestSDPACudaOnly)
OUT=${OUT:-/tmp/flashjit-suite}
source "$(dirname "$0")/gpu_common.sh"
shard=${1:?"expected a shard K/N, e.g. 1/4"}
keyword=${2:-TestSDPACudaOnly}
if [ ! -f build/suite/test_transformers.py ] || [ ! -d build/suite/site ]; then
  echo "build/suite/test_transformers.py and build/suite/site are needed (carry build/suite)"
  exit 2
fi
device_and_build
step "test_transformers.py -k '$keyword', shard $shard, patched, then plain where patched failed, differences again"
PYTHONPATH="$PWD/build/suite/site" timeout 570 python3 scripts/torch_sdpa_suite.py build/suite/test_transformers.py \
  --device cuda -k "$keyword" --shard "$shard" --patched-first --confirm --budget 560 --workers ${SUITE_WORKERS:-8} --timeout 320 --test-timeout 120 \
  --source "pytorch/pytorch test/test_transformers.py at 00030eb8e81f911c48c4d7634fa6b8bb2fae1a1b" --out "$OUT" \
  2>&1 | tail -40
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "suite status: $status"
exit $status
