#!/usr/bin/env bash
# How the peers' forward kernels are shaped, on the GPU machine: Nsight Compute's launch and
# occupancy sections for one forward of torch's SDPA under cuDNN (and torch's flash backend),
# and for flashjit's, on each CASE (HEADDIM:SEQLEN[:causal], B*N = 16k, H = 2048 / D, bf16):
# kernel names (which carry the peers' tile shapes), grid, block, registers, shared memory,
# blocks an SM, duration. The table goes to stdout and $OUT/peer-kernels.txt.
# --sass: also each kernel's per-instruction page (Nsight Compute's full set: stall samples and
# executed instructions) summarised by scripts/ncu_stalls.py into $OUT/sass-<impl>-<case>.txt,
# e.g. to compare the warp instructions flashjit and cuDNN execute by opcode.
#   bash scripts/gpu_peer_kernels.sh [--no-build] [--sass] [--impls cudnn flash flashjit] CASE...
OUT=${OUT:-/tmp/flashjit-peers}
source "$(dirname "$0")/gpu_common.sh"
do_build=1 sass=0 cases=() impls=(cudnn flash flashjit)
while (($#)); do
  case $1 in
    --no-build) do_build=0 ;;
    --sass) sass=1 ;;
    --impls) shift; impls=(); while (($#)) && [[ $1 != --* ]] && [[ $1 != *:* ]]; do impls+=("$1"); shift; done; continue ;;
    *) cases+=("$1") ;;
  esac
  shift
done
((${#cases[@]})) || cases=(64:1024:causal 64:1024 128:1024)
((do_build)) && { step "build"; build; }
cat >"$OUT/peer_forward.py" <<'PY'
import sys, torch, flashjit
from torch.nn.attention import sdpa_kernel, SDPBackend
impl, dim, seqlen, causal = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
q, k, v = (torch.randn(16384 // seqlen, 2048 // dim, seqlen, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
def call():
    if impl == "flashjit":
        return flashjit.attention(q, k, v, causal=causal)
    backend = SDPBackend.CUDNN_ATTENTION if impl == "cudnn" else SDPBackend.FLASH_ATTENTION
    with sdpa_kernel(backend):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
for _ in range(3):
    call()
torch.cuda.synchronize()
PY
for case in "${cases[@]}"; do
  IFS=: read -r dim seqlen causal <<<"$case"
  for impl in "${impls[@]}"; do
    step "$impl D$dim N$seqlen ${causal:-non-causal}"
    timeout 120 ncu --kernel-name "regex:fprop|sdpa|flash_fwd|fmha|fj_attention_forward" --launch-skip 2 --launch-count 1 --section LaunchStats --section Occupancy \
      --section SpeedOfLight python3 "$OUT/peer_forward.py" $impl "$dim" "$seqlen" "$([ -n "$causal" ] && echo 1 || echo 0)" \
      >"$OUT/ncu-one.txt" 2>&1 || status=1
    cat "$OUT/ncu-one.txt" >>"$OUT/ncu-details.txt"
    if ((sass)); then
      tag="$impl-d$dim-n$seqlen${causal:+-causal}"
      timeout 200 ncu --kernel-name "regex:fprop|sdpa|flash_fwd|fmha|fj_attention_forward" --launch-skip 2 \
        --launch-count 1 --set full --import-source no -f -o "$OUT/$tag" python3 "$OUT/peer_forward.py" $impl "$dim" \
        "$seqlen" "$([ -n "$causal" ] && echo 1 || echo 0)" >/dev/null 2>&1 || status=1
      ncu --import "$OUT/$tag.ncu-rep" --page source --csv --print-source sass 2>/dev/null >"$OUT/sass.csv"
      python3 scripts/ncu_stalls.py "$OUT/sass.csv" --top 15 >"$OUT/sass-$tag.txt" 2>&1 || status=1
      rm -f "$OUT/$tag.ncu-rep" "$OUT/sass.csv"
      sed -n '/warp instructions executed/,/^--/p' "$OUT/sass-$tag.txt" | head -14
    fi
    grep -E "^  [a-zA-Z_].*\(|Duration|Grid Size|Block Size|Registers Per Thread|Dynamic Shared Memory Per Block|Static Shared Memory Per Block|Block Limit (Registers|Shared Mem)|Theoretical Occupancy|Achieved Active Warps|Compute \(SM\) Throughput" \
      "$OUT/ncu-one.txt" | sed 's/  */ /g' | tee -a "$OUT/peer-kernels.txt"
  done
done
rm -f "$OUT/ncu-one.txt" "$OUT/peer_forward.py"
exit $status
