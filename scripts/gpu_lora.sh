#!/usr/bin/env bash
# The README's LoRA table on the GPU machine (which reaches no registry): bench/lora_table.py for
# torch (transformers + peft, flashjit's transformers backend) and for MLX (mlx-lm on MLX's GPU
# stream), TinyLlama-1.1B and Qwen2.5-0.5B configurations with random weights, sequences of 2048
# and 4096, with and without --use-flash-attention. Bring the packages with
# ../shared/tools/device-wheels (the pins of `scripts/gpu_lora.sh --pins`, three parts, calls back
# to back); in the call that carries the last part run
#   mkdir -p /tmp/devwheels && cp .devwheels/part02 /tmp/devwheels/ && bash scripts/gpu_lora.sh [torch] [mlx] [tests]
# (default: torch and mlx; tests: the MLX test files first, mlx-lm's routing included). The same
# parts serve scripts/gpu_mlx.sh. Records and logs under $OUT. LORA_FLASH_ENV="NAME=VALUE ..."
# sets those variables in the flashjit runs only (bench/lora_table.py --flash-env), e.g.
# LORA_FLASH_ENV="FLASHJIT_MLX_LAUNCH=nodes". LORA_STEPS=N: training steps a run (default: the
# table's 8).
if [ "${1:-}" = "--pins" ]; then
  # transformers, peft and mlx-lm with what they import that torch's environment lacks or holds
  # too old (pydantic and anyio need typing_extensions 4.16; the versions setup.sh installs here),
  # and MLX for CUDA.
  echo "transformers==5.24.0 peft==0.18.0 accelerate==1.16.0 huggingface_hub==2.4.0 hf-xet==1.8.0" \
    "tokenizers==0.23.3 safetensors==0.8.0 regex==2026.12.2 PyYAML==6.0.4 tqdm==4.70.1 psutil==7.2.2" \
    "typer==0.29.2 click==8.5.1 rich==15.0.0 shellingham==1.5.4 annotated-doc==0.0.7 markdown-it-py==4.3.0" \
    "mdurl==0.1.2 Pygments==2.21.0 httpx2==2.17.0 httpcore2==2.17.0 h11==0.16.0 anyio==4.16.0 idna==3.21" \
    "truststore==0.10.5 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0" \
    "typing-inspection==0.4.5 typing_extensions==4.16.0 mlx-lm==0.32.2 sentencepiece==0.2.3 protobuf==7.36.2" \
    "mlx==0.32.4" \
    "mlx-cuda-13==0.32.4"
  exit 0
fi
OUT=${OUT:-/tmp/flashjit-gpu-lora}
source "$(dirname "$0")/gpu_common.sh"
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(torch mlx)

site_from_devwheels
python3 -c "import transformers, peft, mlx.core as mx, mlx_lm; print('transformers', transformers.__version__, \
'peft', peft.__version__, 'mlx', mx.__version__, mx.default_device())" 2>&1 | tail -1

for part in "${parts[@]}"; do
  case $part in
    tests)
      step "pytest (MLX, with mlx-lm)"
      python3 -m pytest tests/python/test_mlx.py tests/python/test_mlx_modules.py -q -rfEs -p no:cacheprovider \
        --timeout 240 2>&1 | tee "$OUT/pytest-mlx.log" | tail -8
      [ "${PIPESTATUS[0]}" = 0 ] || status=1 ;;
    torch)
      step "LoRA, torch (bench/lora_table.py)"
      timeout 540 python3 bench/lora_table.py --framework torch --device cuda --dtype bfloat16 --timeout 200 \
        ${LORA_STEPS:+--steps $LORA_STEPS} ${LORA_FLASH_ENV:+--flash-env $LORA_FLASH_ENV} --out "$OUT" 2>&1 | tee "$OUT/lora-torch.log" | grep "^|\|error\|Error" | tail -12
      [ "${PIPESTATUS[0]}" = 0 ] || status=1 ;;
    mlx)
      step "LoRA, MLX on the GPU (bench/lora_table.py)"
      timeout 540 python3 bench/lora_table.py --framework mlx --device gpu --dtype bfloat16 --timeout 200 \
        ${LORA_STEPS:+--steps $LORA_STEPS} ${LORA_FLASH_ENV:+--flash-env $LORA_FLASH_ENV} --out "$OUT" 2>&1 | tee "$OUT/lora-mlx.log" | grep "^|\|error\|Error" | tail -12
      [ "${PIPESTATUS[0]}" = 0 ] || status=1 ;;
    *) echo "unknown part $part: expected torch, mlx or tests"; exit 2 ;;
  esac
done
echo "gpu_lora status: $status"
exit $status
