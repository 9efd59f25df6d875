"""Packed variable-length batches: flashjit.varlen_attention against the same documents
padded to the longest (torch's SDPA with a padding mask, and flashjit's dense path).

Documents of lengths drawn from [--min-len, --max-len] fill --tokens tokens; causal
self-attention, forward and forward + backward. TFLOP/s count the real work only (each
document's own causal attention, docs/measurement.md), so padding shows as lost speed.
Time: CUDA events around back-to-back calls on a GPU, the wall clock on the CPU; median
of --repeats after a warm-up.

    python bench/varlen.py [--device cuda] [--tokens 16384] [--min-len 128] [--max-len 4096] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

import flashjit


def timed(fn, device, repeats):
    fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on a GPU")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--min-len", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory for the markdown record")
    args = parser.parse_args()
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    generator = torch.Generator().manual_seed(args.seed)
    lengths, total = [], 0
    while total < args.tokens:
        n = int(torch.randint(args.min_len, args.max_len + 1, (1,), generator=generator))
        n = min(n, args.tokens - total)
        lengths.append(n)
        total += n
    H, D = args.heads, args.head_dim
    torch.manual_seed(args.seed)
    q, k, v = (torch.randn(total, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    longest = max(lengths)
    # The same documents padded to the longest: [B, H, longest, D] and a mask of the real keys.
    padded = [torch.zeros(len(lengths), H, longest, D, device=device, dtype=dtype) for _ in range(3)]
    with torch.no_grad():
        for i, (a, n) in enumerate(zip(cu.tolist(), lengths)):
            for dst, src in zip(padded, (q, k, v)):
                dst[i, :, :n] = src[a:a + n].transpose(0, 1)
    for x in padded:
        x.requires_grad_()
    positions = torch.arange(longest, device=device)
    real = positions[None, :] < torch.tensor(lengths, device=device)[:, None]  # [B, longest]
    causal_mask = (positions[:, None] >= positions[None, :])[None, None] & real[:, None, None, :]  # [B, 1, L, L]
    grad_packed = torch.randn(total, H, D, device=device, dtype=dtype)
    grad_padded = torch.randn(len(lengths), H, longest, D, device=device, dtype=dtype)

    def varlen():
        return flashjit.varlen_attention(q, k, v, cu, cu, longest, longest, causal=True)

    def sdpa_padded():
        return F.scaled_dot_product_attention(*padded, attn_mask=causal_mask)

    def flashjit_padded():
        return flashjit.attention(*padded, attn_mask=causal_mask)

    impls = {"flashjit varlen": (varlen, grad_packed), "torch SDPA padded": (sdpa_padded, grad_padded),
             "flashjit padded": (flashjit_padded, grad_padded)}
    work = sum(4.0 * H * n * (n + 1) / 2 * D for n in lengths)  # each document's causal forward
    rows = []
    for name, (fn, grad) in impls.items():
        with torch.no_grad():
            forward_ms = timed(fn, device, args.repeats)

        def both(fn=fn, grad=grad):
            fn().backward(grad)

        both_ms = timed(both, device, args.repeats)
        rows.append((name, forward_ms, both_ms, work / forward_ms / 1e9, 3.5 * work / both_ms / 1e9))
    commit = os.environ.get("FLASHJIT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads)"
    lines = [f"# Packed variable-length attention: {name}", "",
             f"- date: {datetime.date.today().isoformat()}", f"- commit: {commit}",
             f"- command: `python bench/varlen.py --device {device} --tokens {args.tokens} --min-len {args.min_len} "
             f"--max-len {args.max_len} --heads {H} --head-dim {D}`",
             f"- torch {torch.__version__}, flashjit {flashjit.__version__}, {str(dtype).removeprefix('torch.')}",
             f"- {len(lengths)} documents, {total} tokens, longest {longest} (padded: {len(lengths) * longest} "
             f"tokens); causal; TFLOP/s over the real work only", "",
             "| implementation | forward ms | fwd+bwd ms | forward TFLOP/s | fwd+bwd TFLOP/s | fwd+bwd vs torch padded |",
             "|---|---|---|---|---|---|"]
    torch_both = next(r[2] for r in rows if r[0] == "torch SDPA padded")
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.3f} | {r[4]:.3f} | {torch_both / r[2]:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        tag = "h200" if "H200" in name else ("gpu" if device == "cuda" else "cpu")
        path = os.path.join(args.out, f"{tag}-varlen-{datetime.date.today().isoformat()}-{commit}.md")
        with open(path, "w") as file:
            file.write(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
