"""Packed variable-length batches: flashjit.varlen_attention against the same documents
padded to the longest (torch's SDPA with a padding mask, and flashjit's dense path).

Documents of lengths drawn from [--min-len, --max-len] fill --tokens tokens; causal
self-attention, forward and forward + backward. TFLOP/s count the real work only (each
document's own causal attention, docs/measurement.md), so padding shows as lost speed.
Time: on a GPU, CUDA events around 10 back-to-back calls, the implementations in turn in
each of --repeats rounds; the wall clock around a call on the CPU; medians, after a warm-up.

    python bench/varlen.py [--device cuda] [--tokens 16384] [--min-len 128] [--max-len 4096] [--out DIR]

--decode times one query token a sequence against a KV cache instead (flash-attn's
flash_attn_with_kvcache through flashjit.attention_with_kvcache): --batch sequences whose
cache lengths are drawn from [--min-len, --max-len], the cache contiguous [B, S_cache, Hkv, D]
and the same keys in shuffled pages of --page-size rows, against torch's SDPA on the cache
with a mask of each sequence's keys; microseconds a call and K/V bytes read a second.

    python bench/varlen.py --decode [--device cuda] [--batch 16] [--min-len 1024] [--max-len 8192] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import flashjit
from gpu_attention import save_record  # bench/ is the script's folder
from flashjit.bench.provenance import record_commit


def timed(fns: dict, device, repeats, calls=10) -> dict:
    """Median milliseconds a call of each function. On a GPU: CUDA events around `calls`
    back-to-back calls, the functions taken in turn in each of `repeats` rounds (so that a
    change of clocks or of the machine's load falls on all of them alike); the wall clock
    around one call on the CPU."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(calls):
                    fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / calls)
            else:
                begin = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - begin) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def record(args, device, dtype, title: str, command: str, facts: list, header: list, rows: list, kind: str):
    commit = record_commit()
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads)"
    lines = [f"# {title}: {name}", "", f"- date: {datetime.date.today().isoformat()}", f"- commit: {commit}",
             f"- command: `{command}`",
             f"- torch {torch.__version__}, flashjit {flashjit.__version__}, {str(dtype).removeprefix('torch.')}",
             *[f"- {fact}" for fact in facts], "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    save_record(args.out, "h200" if "H200" in name else ("gpu" if device == "cuda" else "cpu"), kind, commit, text)


def decode(args, device, dtype):
    """One query token a sequence against a contiguous and a paged KV cache."""
    generator = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.batch,), generator=generator).tolist()
    B, Hq, Hkv, D, page = args.batch, args.heads, args.kv_heads, args.head_dim, args.page_size
    capacity = -(-max(lengths) // page) * page
    torch.manual_seed(args.seed)
    k_cache = torch.randn(B, capacity, Hkv, D, device=device, dtype=dtype)
    v_cache = torch.randn(B, capacity, Hkv, D, device=device, dtype=dtype)
    q = torch.randn(B, 1, Hq, D, device=device, dtype=dtype)
    used = torch.tensor(lengths, dtype=torch.int32, device=device)
    pages_per_sequence = capacity // page
    order = torch.randperm(B * pages_per_sequence, generator=generator).reshape(B, pages_per_sequence)
    k_pages = torch.empty(B * pages_per_sequence, page, Hkv, D, device=device, dtype=dtype)
    v_pages = torch.empty_like(k_pages)
    for b in range(B):
        for i in range(pages_per_sequence):
            k_pages[order[b, i]] = k_cache[b, i * page:(i + 1) * page]
            v_pages[order[b, i]] = v_cache[b, i * page:(i + 1) * page]
    table = order.to(torch.int32).to(device)
    mask = (torch.arange(capacity, device=device)[None, :] < used[:, None])[:, None, None, :]  # [B, 1, 1, S]
    sdpa_q, sdpa_k, sdpa_v = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)

    impls = {
        "flashjit contiguous cache": lambda: flashjit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=used),
        "flashjit paged cache": lambda: flashjit.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=used,
                                                                        page_table=table),
        "torch SDPA, cache + mask": lambda: F.scaled_dot_product_attention(sdpa_q, sdpa_k, sdpa_v, attn_mask=mask,
                                                                           enable_gqa=True),
    }
    if device == "cuda":  # the decoding rows' blocks forced: of one warp, or of four (FLASHJIT_CUDA_DECODE_WARPS)
        def with_env(fn, name, value):
            def run():
                os.environ[name] = value
                try:
                    return fn()
                finally:
                    os.environ.pop(name)
            return run
        for name in ("flashjit contiguous cache", "flashjit paged cache"):
            impls[name + ", one-warp blocks"] = with_env(impls[name], "FLASHJIT_CUDA_DECODE_WARPS", "1")
            impls[name + ", four-warp blocks"] = with_env(impls[name], "FLASHJIT_CUDA_DECODE_WARPS", "4")
        # The cache on the sm_90a split forward (FLASHJIT_CUDA_KV_HOPPER=1; sm_90 only), and the
        # counts and table read on the host (FLASHJIT_CUDA_KV_DEVICE=0: a copy back and a wait each
        # call, and their checks) instead of left in GPU memory.
        # Pages on the sm_90a split with a key step of a page (64 keys, four stages), as before a
        # step of 128 keys loaded a TMA box a page.
        if 16 <= page < 128 and 128 % page == 0:
            impls["flashjit paged cache, a page a step"] = with_env(impls["flashjit paged cache"],
                                                                     "FLASHJIT_CUDA_TILES", f"n={page},stages=4")
        for name in ("flashjit contiguous cache", "flashjit paged cache"):
            impls[name + ", sm_90a split"] = with_env(impls[name], "FLASHJIT_CUDA_KV_HOPPER", "1")
            impls[name + ", counts read on the host"] = with_env(impls[name], "FLASHJIT_CUDA_KV_DEVICE", "0")
    paged = impls["flashjit paged cache"]()
    contiguous = impls["flashjit contiguous cache"]()
    torch.testing.assert_close(paged, contiguous, rtol=2e-2 if dtype != torch.float32 else 1e-4, atol=1e-3)
    for name in [n for n in impls if n.startswith("flashjit ") and n.endswith(("sm_90a split", "on the host", "a page a step"))]:
        torch.testing.assert_close(impls[name](), contiguous, rtol=2e-2, atol=2e-2)
    bytes_read = 2 * sum(lengths) * Hkv * D * torch.finfo(dtype).bits // 8
    with torch.no_grad():
        times = timed(impls, device, args.repeats)
    rows = [[name, f"{ms * 1e3:.0f}", f"{bytes_read / ms / 1e6:.2f}"] for name, ms in times.items()]
    command = (f"python bench/varlen.py --decode --device {device} --batch {B} --min-len {args.min_len} --max-len "
               f"{args.max_len} --heads {Hq} --kv-heads {Hkv} --head-dim {D} --page-size {page}")
    facts = [f"{B} sequences of {min(lengths)}-{max(lengths)} cached keys (mean {sum(lengths) / B:.0f}), one query "
             f"token each, {Hq} query heads sharing {Hkv} key/value heads, head dim {D}; pages of {page} keys in "
             f"shuffled order; GB/s: K and V bytes of the used keys per second"]
    record(args, device, dtype, "KV-cache decoding", command, facts, ["implementation", "µs a call", "K+V GB/s"],
           rows, "kvcache")


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
    parser.add_argument("--decode", action="store_true", help="time KV-cache decoding (see above)")
    parser.add_argument("--batch", type=int, default=16, help="--decode: sequences")
    parser.add_argument("--kv-heads", type=int, default=None, help="--decode: key/value heads (default heads / 4)")
    parser.add_argument("--page-size", type=int, default=64, help="--decode: keys a page")
    args = parser.parse_args()
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    if args.decode:
        args.kv_heads = args.kv_heads or max(1, args.heads // 4)
        decode(args, device, dtype)
        return
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

    def varlen():  # CUDA: a launch a sequence (FLASHJIT_CUDA_VARLEN=0)
        os.environ["FLASHJIT_CUDA_VARLEN"] = "0"
        try:
            return flashjit.varlen_attention(q, k, v, cu, cu, longest, longest, causal=True)
        finally:
            os.environ.pop("FLASHJIT_CUDA_VARLEN")

    def sdpa_padded():
        return F.scaled_dot_product_attention(*padded, attn_mask=causal_mask)

    def flashjit_padded():
        return flashjit.attention(*padded, attn_mask=causal_mask)

    def varlen_one_launch(offsets=cu):  # CUDA: the sequences in one launch a kernel (the default)
        os.environ["FLASHJIT_CUDA_VARLEN"] = "1"
        try:
            return flashjit.varlen_attention(q, k, v, offsets, offsets, longest, longest, causal=True)
        finally:
            os.environ.pop("FLASHJIT_CUDA_VARLEN")

    # Offsets already on the host: no copy from the device, so no wait for the GPU before each call.
    host_offsets = cu.cpu()

    # The dense kernel on the same tokens as equal documents of the mean length (its own work).
    mean = max(1, round(total / len(lengths)))
    dense = [torch.randn(total // mean, H, mean, D, device=device, dtype=dtype, requires_grad=True)
             for _ in range(3)]
    grad_dense = torch.randn(total // mean, H, mean, D, device=device, dtype=dtype)

    def dense_mean():
        return flashjit.attention(*dense, causal=True)

    impls = {"flashjit varlen" + (", a launch a sequence" if device == "cuda" else ""): (varlen, grad_packed),
             "torch SDPA padded": (sdpa_padded, grad_padded),
             "flashjit padded": (flashjit_padded, grad_padded)}
    if device == "cuda":
        impls["flashjit varlen, one launch"] = (varlen_one_launch, grad_packed)
        impls["flashjit varlen, one launch, host offsets"] = (lambda: varlen_one_launch(host_offsets), grad_packed)
    impls[f"flashjit dense, {total // mean} x {mean} tokens"] = (dense_mean, grad_dense)
    work = sum(4.0 * H * n * (n + 1) / 2 * D for n in lengths)  # each document's causal forward
    dense_work = (total // mean) * 4.0 * H * mean * (mean + 1) / 2 * D
    with torch.no_grad():
        forward = timed({name: fn for name, (fn, _) in impls.items()}, device, args.repeats)
    both = timed({name: lambda fn=fn, grad=grad: fn().backward(grad) for name, (fn, grad) in impls.items()}, device,
                 args.repeats)
    rows = []
    for name, (fn, _) in impls.items():
        flops = dense_work if fn is dense_mean else work
        rows.append((name, forward[name], both[name], flops / forward[name] / 1e9, 3.5 * flops / both[name] / 1e9))
    torch_both = next(r[2] for r in rows if r[0] == "torch SDPA padded")
    command = (f"python bench/varlen.py --device {device} --tokens {args.tokens} --min-len {args.min_len} "
               f"--max-len {args.max_len} --heads {H} --head-dim {D}")
    facts = [f"{len(lengths)} documents, {total} tokens, longest {longest} (padded: {len(lengths) * longest} tokens); "
             f"causal; TFLOP/s over the real work only"]
    header = ["implementation", "forward ms", "fwd+bwd ms", "forward TFLOP/s", "fwd+bwd TFLOP/s",
              "fwd+bwd vs torch padded"]
    table = [[r[0], f"{r[1]:.2f}", f"{r[2]:.2f}", f"{r[3]:.3f}", f"{r[4]:.3f}", f"{torch_both / r[2]:.2f}"] for r in rows]
    record(args, device, dtype, "Packed variable-length attention", command, facts, header, table, "varlen")


if __name__ == "__main__":
    main()
