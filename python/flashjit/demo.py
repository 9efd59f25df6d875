"""flashjit forward + backward against naive attention (and PyTorch SDPA) on the CPU.

For each sequence length, each implementation runs in a fresh process so that
its peak memory is its own: peak = the process's high-water resident memory
minus its resident memory just before the first forward + backward. Time is the
median of several forward + backward passes. Error is the largest absolute
difference from naive attention in float64, computed in one more process that
runs every implementation against a single float64 reference.

    python -m flashjit.demo [--seqlens 512 1024 2048 4096] [--heads 8] [--head-dim 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from .bench import _cpu_name, resident_kib

IMPLEMENTATIONS = ("flashjit", "naive", "sdpa")


def _naive(q, k, v, causal):
    from .reference import naive_attention

    return naive_attention(q, k, v, causal=causal, dtype=q.dtype)


def _forward_backward(impl, q, k, v, dout, causal):
    """o, (dq, dk, dv) for one implementation."""
    import torch

    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    if impl == "flashjit":
        import flashjit

        o = flashjit.scaled_dot_product_attention(*leaves, is_causal=causal)
    elif impl == "naive":
        o = _naive(*leaves, causal)
    else:
        o = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=causal)
    o.backward(dout)
    return o.detach(), tuple(x.grad for x in leaves)


def _inputs(seqlen: int, heads: int, head_dim: int, dtype_name: str):
    import torch

    gen = torch.Generator().manual_seed(seqlen)
    dtype = getattr(torch, dtype_name)
    return [torch.randn(1, heads, seqlen, head_dim, generator=gen).to(dtype) for _ in range(4)]


def _measure(impl: str, seqlen: int, heads: int, head_dim: int, dtype_name: str, causal: bool, repeats: int):
    """Runs in a child process: time and peak memory of one implementation."""
    q, k, v, dout = _inputs(seqlen, heads, head_dim, dtype_name)
    before = resident_kib("VmRSS")
    _forward_backward(impl, q, k, v, dout, causal)
    peak = resident_kib("VmHWM") - before
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _forward_backward(impl, q, k, v, dout, causal)
        times.append(time.perf_counter() - start)
    return {"time_ms": 1e3 * statistics.median(times), "peak_mib": peak / 1024}


def _errors(seqlen: int, heads: int, head_dim: int, dtype_name: str, causal: bool):
    """Runs in a child process: errors of every implementation against one float64 reference."""
    inputs = _inputs(seqlen, heads, head_dim, dtype_name)
    exact_o, exact_grads = _forward_backward("naive", *(x.double() for x in inputs), causal)
    errors = {}
    for impl in IMPLEMENTATIONS:
        o, grads = _forward_backward(impl, *inputs, causal)
        errors[impl] = {
            "err_o": (o.double() - exact_o).abs().max().item(),
            "err_grad": max((g.double() - e).abs().max().item() for g, e in zip(grads, exact_grads)),
        }
    return errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "SEQLEN"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        impl, seqlen = args.child[0], int(args.child[1])
        if impl == "errors":
            result = _errors(seqlen, args.heads, args.head_dim, args.dtype, args.causal)
        else:
            result = _measure(impl, seqlen, args.heads, args.head_dim, args.dtype, args.causal, args.repeats)
        print(json.dumps(result))
        return 0

    import torch

    import flashjit

    threads = torch.get_num_threads()
    print(f"flashjit {flashjit.__version__} demo: forward + backward on {_cpu_name()} ({os.cpu_count()} cores, "
          f"torch {torch.__version__} with {threads} threads)")
    print(f"batch 1, heads {args.heads}, head_dim {args.head_dim}, {args.dtype}, causal={args.causal}; "
          f"median of {args.repeats} runs; error = max |x - float64 naive| over o and (dq, dk, dv)")
    header = f"{'seqlen':>7} {'impl':>9} {'time ms':>9} {'TFLOP/s':>8} {'peak MiB':>9} {'err o':>9} {'err grad':>9} {'vs naive':>9}"
    print(header)
    print("-" * len(header))
    for seqlen in args.seqlens:
        flops = 3.5 * 4 * args.heads * seqlen * seqlen * args.head_dim / (2 if args.causal else 1)
        results = {}
        for child in (*IMPLEMENTATIONS, "errors"):
            command = [sys.executable, "-m", "flashjit.demo", "--child", child, str(seqlen), "--heads", str(args.heads),
                       "--head-dim", str(args.head_dim), "--dtype", args.dtype, "--repeats", str(args.repeats)]
            if args.causal:
                command.append("--causal")
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{seqlen:>7} {child:>9} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            results[child] = json.loads(done.stdout.strip().splitlines()[-1])
        errors = results.pop("errors", {})
        nan = {"err_o": float("nan"), "err_grad": float("nan")}
        for impl, r in results.items():
            e = errors.get(impl, nan)
            speedup = results["naive"]["time_ms"] / r["time_ms"] if "naive" in results else float("nan")
            print(f"{seqlen:>7} {impl:>9} {r['time_ms']:>9.1f} {flops / r['time_ms'] / 1e9:>8.3f} "
                  f"{r['peak_mib']:>9.1f} {e['err_o']:>9.2e} {e['err_grad']:>9.2e} {speedup:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
