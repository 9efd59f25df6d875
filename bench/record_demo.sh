#!/usr/bin/env bash
# Runs the CPU demo and records it under bench/results/ with the device, date,
# command and commit that produced it. Usage: bench/record_demo.sh [demo args]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
commit=$(git rev-parse --short HEAD)
dirty=$(git status --porcelain --untracked-files=no | grep -q . && echo " (with uncommitted changes)" || true)
day=$(date -u +%Y-%m-%d)
out="bench/results/cpu-demo-${day}-${commit}.md"
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
{
  echo "# CPU demo: forward + backward, flashjit vs naive attention and PyTorch SDPA"
  echo
  echo "- device: ${cpu}, $(nproc) cores, $(grep -o -m1 -w avx512f /proc/cpuinfo || echo avx2) kernels"
  echo "- date: ${day}"
  echo "- command: \`$PYTHON -m flashjit.demo $*\` (via bench/record_demo.sh)"
  echo "- commit: ${commit}${dirty}"
  echo
  echo '```'
  "$PYTHON" -m flashjit.demo "$@"
  echo '```'
} > "$out"
cat "$out"
echo "wrote $out"
