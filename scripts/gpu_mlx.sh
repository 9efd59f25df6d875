#!/usr/bin/env bash
# flashjit.mlx on MLX's GPU stream, on the GPU machine (which reaches no registry). Bring
# mlx==0.32.4 and mlx-cuda-13==0.32.4 with ../shared/tools/device-wheels (two parts, calls
# back to back; or the three parts of scripts/gpu_lora.sh --pins, which hold MLX too); in the
# call that carries the last part run
#   mkdir -p /tmp/devwheels && cp .devwheels/part01 /tmp/devwheels/ && bash scripts/gpu_mlx.sh [--bench]
# It unpacks the wheels into /tmp/site, builds flashjit into the same folder (so that
# flashjit/_mlx finds libmlx at $ORIGIN/../mlx/lib and compiles eval_gpu against MLX's CUDA
# headers), runs the MLX tests (their GPU-stream tests run where cuda_available() is true)
# and, with --bench, bench/mlx_gpu.py. Logs under $OUT.
OUT=${OUT:-/tmp/flashjit-gpu-mlx}
source "$(dirname "$0")/gpu_common.sh"

site_from_devwheels
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device()); \
print(mx.fast.scaled_dot_product_attention(*(mx.ones((1, 1, 8, 64)),) * 3, scale=0.125).sum())" 2>&1 | tail -3

step "pytest (MLX)"
python3 -m pytest tests/python/test_mlx.py tests/python/test_mlx_modules.py -q -rfEs -p no:cacheprovider \
  --timeout 240 2>&1 | tee "$OUT/pytest-mlx.log" | tail -25
[ "${PIPESTATUS[0]}" = 0 ] || status=1

if [[ " $* " == *" --bench "* ]]; then
  step "bench/mlx_gpu.py"
  python3 bench/mlx_gpu.py --launch capture capture:allocator nodes nodes:allocator --out "$OUT" 2>&1 | tee "$OUT/bench-mlx.log" | tail -25
fi
echo "gpu_mlx status: $status"
exit $status
