#!/usr/bin/env bash
# Installs what building and testing flashjit needs on Debian: GoogleTest, a compiler
# (and Python's venv module where it is missing) from apt; torch (CPU build), nanobind,
# MLX, transformers and the build/test tools from PyPI, into the virtual environment
# $VENV (made from $BASE_PYTHON) when PYTHON is its interpreter, as `make` has it, so
# that the system's Python stays untouched. PYTHON=python3 installs into that instead.
set -euo pipefail
VENV=${VENV:-.venv}
BASE_PYTHON=${BASE_PYTHON:-python3}
PYTHON=${PYTHON:-$VENV/bin/python}
start=$SECONDS
say() { echo "setup [$((SECONDS - start)) s]: $*"; }

sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

make_venv=0
[ "$PYTHON" = "$VENV/bin/python" ] && [ ! -x "$PYTHON" ] && make_venv=1
missing=()
dpkg -s libgtest-dev >/dev/null 2>&1 || missing+=(libgtest-dev)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v objdump >/dev/null 2>&1 || missing+=(binutils)
if ((make_venv)) && ! "$BASE_PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=("python3-venv")  # Debian's python3 has no ensurepip without it
fi
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} with apt-get"
  sudo_if_needed apt-get update -q
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
if ((make_venv)); then
  say "creating the virtual environment $VENV from $BASE_PYTHON ($("$BASE_PYTHON" --version 2>&1))"
  "$BASE_PYTHON" -m venv "$VENV"
  "$PYTHON" -m pip install -q --disable-pip-version-check --upgrade pip
fi
say "installing Python packages into $("$PYTHON" -c 'import sys; print(sys.prefix)') (about a minute on a fresh environment)"

# nvidia-cuda-nvrtc: NVRTC alone, so that CI compiles the CUDA kernels without a GPU.
# matplotlib: the plots of `flashjit bench`. transformers (Python 3.11+; its tests skip
# without it): the tests of flashjit's transformers attention backend.
extra=()
# peft: the LoRA fine-tuning example on torch (examples/finetune/torch_lora.py) and its test.
if "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then extra+=("transformers==5.24.0" "peft==0.18.0"); fi
# nanobind is pinned to the one whose type registry mlx.core's bindings share (flashjit.mlx).
"$PYTHON" -m pip install -q --disable-pip-version-check \
  "torch==2.13.0" "nvidia-cuda-nvrtc==13.0.*" "nanobind==3.1.0" numpy pytest "scikit-build-core>=0.10" "cmake>=3.21" \
  ninja matplotlib "${extra[@]}"
# MLX (CPU build) before flashjit is built, which then adds its MLX primitives (flashjit.mlx).
# Its wheels need glibc 2.35+ on Linux; where none installs, the MLX tests skip.
"$PYTHON" -m pip install -q --disable-pip-version-check "mlx[cpu]==0.32.4" ||
  echo "setup: no mlx wheel for this machine; flashjit.mlx is not built and its tests skip"
# mlx-lm (with transformers): the tests of flashjit.mlx's switch for mlx-lm's attention.
if "$PYTHON" -c 'import mlx.core, transformers' 2>/dev/null; then
  "$PYTHON" -m pip install -q --disable-pip-version-check "mlx-lm==0.32.2" ||
    echo "setup: mlx-lm did not install; its tests skip"
fi
say "done"
