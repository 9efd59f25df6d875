#!/usr/bin/env bash
# The sm_90a forward's tuner on the GPU machine in one call: build, then
# `flashjit tune` over the benchmark grid (bf16 and fp16, head dims 64/128/256,
# N 1k/4k/16k, causal and not). The candidates' kernels are compiled first, in
# parallel processes, so that the tuner's single process only times them. The
# tuning file it writes is copied to $OUT/tuned_sm90.txt: committed as
# src/cuda/tuned_sm90.txt, it is the built-in table. --backward: the backward's pass instead
# (`flashjit tune --backward`, head dims 64 and 128: split, one-pass, and one-pass-diagonal for
# causal classes, their kernels compiled in parallel first), on top of the built-in table's
# entries, so that the copied file is the whole new table. --head-dims D ...: the forward's classes of those
# head dims alone, likewise on top of the built-in table's other entries.
# --seqlens N ...: the forward's classes of those sequence lengths alone (flashjit tune --seqlens),
# likewise on top of the built-in table's other entries.
# --with KEYS ...: also every candidate with those FLASHJIT_CUDA_TILES keys added (flashjit tune --with),
# e.g. --with chain=tiles.
#   bash scripts/gpu_tune.sh [--backward | --head-dims D ...] [--seqlens N ...] [--with KEYS ...]
OUT=${OUT:-/tmp/flashjit-tune}
source "$(dirname "$0")/gpu_common.sh"

mode=all head_dims=(64 128 256) variants=() seqlens=()
while (($#)); do
  case $1 in
    --backward) mode=backward ;;
    --head-dims) mode=some; head_dims=(); shift
      while (($#)) && [[ $1 != --* ]]; do head_dims+=("$1"); shift; done; continue ;;
    --seqlens) mode=some; shift
      while (($#)) && [[ $1 != --* ]]; do seqlens+=("$1"); shift; done; continue ;;
    --with) shift; while (($#)) && [[ $1 != --* ]]; do variants+=("$1"); shift; done; continue ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
  shift
done

device_and_build

# The built-in tables' entries into the device's tuning file, so that tuning some classes
# leaves the others' entries as they are: the arch's, then those of the built-in table of this
# device model where there is one (src/cuda/tuned_sm90_<model>.txt, whose device line names it).
seed_with_table() {
  step "the built-in tables' entries"
  python3 -c '
import glob
import flashjit
from flashjit import _C
info = flashjit.cuda.device_info()
entries = {}
for path in ["src/cuda/tuned_sm90.txt"] + sorted(glob.glob("src/cuda/tuned_sm90_*.txt")):
    with open(path) as table:
        lines = table.read().splitlines()
    if path != "src/cuda/tuned_sm90.txt" and "device " + info["name"] not in lines:
        continue
    for line in lines:
        if line.startswith("entry "):
            key, rest = line.split(" ", 2)[1:]
            entries[key] = rest
print(_C.cuda_save_tuning(info["name"], info["arch"], "".join(f"{k} {v}\n" for k, v in entries.items())))
' || status=1
}

if [ $mode = backward ]; then
  seed_with_table
  # The passes' kernels compiled first, in parallel processes (the tuner's own process compiles
  # each candidate where it first runs it): split, one-pass, and one-pass-diagonal under causal
  # bounds, bf16 and fp16, head dims 64 and 128.
  step "compile the backward's candidates ($(nproc) processes)"
  for dtype in bfloat16 float16; do for head_dim in 64 128; do for causal in 0 1; do
    for pass in split one-pass one-pass-diagonal; do
      [ $pass = one-pass-diagonal ] && [ $causal = 0 ] && continue
      echo $dtype $head_dim $causal $pass
    done
  done; done; done >"$OUT/backward-candidates.txt"
  xargs -P "$(nproc)" -L 1 python3 -c '
import sys, torch, flashjit
dtype, head_dim, causal, name = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
from flashjit.cuda import _BACKWARD_PASSES, _apply_environment
_apply_environment(_BACKWARD_PASSES[name])
# 128 heads of 1k queries: a dQ grid of more than four blocks an SM, so that the split pass
# compiles the kernels that the tuning problems run (not the overlapped pair of small grids).
q, k, v = (torch.randn(1, 128, 1024, head_dim, device="cuda", dtype=getattr(torch, dtype), requires_grad=True)
           for _ in range(3))
flashjit.attention(q, k, v, causal=bool(causal)).sum().backward()
' <"$OUT/backward-candidates.txt" 2>&1 | tail -20
  step "flashjit tune --backward"
  timeout 500 python3 -m flashjit tune --backward --head-dims 64 128 >"$OUT/tune.log" 2>&1 || status=1
  grep -v "^\[" "$OUT/tune.log" | tail -45
  cp "$FLASHJIT_CACHE_DIR"/*/tuning/sm90-*.txt "$OUT/tuned_sm90.txt" 2>/dev/null || status=1
  echo "tune status: $status"
  exit $status
fi

step "compile the candidates ($(nproc) processes)"
VARIANTS="${variants[*]}" python3 - "${head_dims[@]}" >"$OUT/candidates.txt" <<'EOF'
import os, sys
from flashjit.cuda import _CANDIDATES
variants = os.environ["VARIANTS"].split()
for dtype in ("bfloat16", "float16"):
    for head_dim in map(int, sys.argv[1:]):
        for causal in (0, 1):
            for tiles in _CANDIDATES[head_dim]:
                for extra in [""] + variants:
                    print(dtype, head_dim, causal, tiles + ("," + extra if extra else ""))
EOF
wc -l <"$OUT/candidates.txt"
xargs -P "$(nproc)" -L 1 python3 -c '
import os, sys, torch, flashjit
from flashjit.options import AttentionOptions
from flashjit import ops
dtype, head_dim, causal, tiles = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.environ["FLASHJIT_CUDA_TILES"] = tiles
q = torch.randn(1, 1, 256, head_dim, device="cuda", dtype=getattr(torch, dtype))
try:
    ops.attention(q, q, q, AttentionOptions(causal=causal))
except (ValueError, NotImplementedError) as error:
    print(tiles, head_dim, "does not run:", error)
' <"$OUT/candidates.txt" 2>&1 | tail -20

[ $mode = some ] && seed_with_table
step "flashjit tune --head-dims ${head_dims[*]} ${seqlens[*]:+--seqlens ${seqlens[*]}} ${variants[*]:+--with ${variants[*]}}"
timeout 500 python3 -m flashjit tune --head-dims "${head_dims[@]}" ${seqlens[@]+--seqlens "${seqlens[@]}"} \
  ${variants[@]+--with "${variants[@]}"} \
  >"$OUT/tune.log" 2>&1 || status=1
grep -v "^\[" "$OUT/tune.log" | tail -45
cp "$FLASHJIT_CACHE_DIR"/*/tuning/sm90-*.txt "$OUT/tuned_sm90.txt" 2>/dev/null || status=1
echo "tune status: $status"
exit $status
