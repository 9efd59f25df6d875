"""Where a backward's GPU time goes: each kernel's device time a backward, flashjit against cuDNN.

For each problem (B:HQ:HKV:N:D[:causal], bf16) one forward is run and kept, then `--steps`
backward passes (torch.autograd.grad with the graph retained) are profiled with torch.profiler
after a warm-up: every kernel's device µs a backward, its share of the backward's kernel time, and
the backward's TFLOP/s over all its kernels (2.5x the forward's 4*B*HQ*N^2*D, halved when causal).
flashjit's kernels are its prep, dQ, dK/dV (and convert) kernels; cuDNN's are torch's SDPA with
the cuDNN backend. Says which kernel a backward change has to shorten.

    python bench/backward_kernels.py --shapes 1:14:2:2048:64:causal 4:16:16:4096:128:causal --out DIR

`--device cpu` runs the same steps on the CPU (host ops only: for testing the script).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F

import flashjit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_attention import save_record, shape_case  # noqa: E402
from overhead import commit, device_us, split_events  # noqa: E402

from flashjit.bench.provenance import device_tag  # noqa: E402


def implementations(cuda: bool):
    """(name, attention(q, k, v, causal)): flashjit and, on CUDA, torch's SDPA on cuDNN."""
    def flashjit_sdpa(q, k, v, causal):
        return flashjit.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])

    impls = [("flashjit", flashjit_sdpa)]
    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def cudnn(q, k, v, causal):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])

        impls.append(("cuDNN", cudnn))
    return impls


def kernel_times(backward, steps: int, cuda: bool) -> list:
    """[(kernel or op name, calls a backward, device µs a backward)], longest first: the device's
    own events on CUDA, the host ops' self time on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        backward()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            backward()
        sync()
    ops, kernels = split_events(prof.key_averages())
    timed = [(e, device_us(e)) for e in kernels] if cuda else [(e, e.self_cpu_time_total) for e in ops]
    rows = [(e.key, e.count / steps, total / steps) for e, total in timed if total > 0]
    return sorted(rows, key=lambda row: row[2], reverse=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", required=True, metavar="B:HQ:HKV:N:D[:causal]")
    parser.add_argument("--steps", type=int, default=20, help="backward passes profiled (default 20)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--top", type=int, default=8, help="kernels listed an implementation (default 8)")
    parser.add_argument("--out", default=None, help="folder for the markdown record (default: print only)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.top < 1:
        parser.error("--steps and --top: expected at least 1")
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu to try the script)")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = [shape_case(parser, text)[1:] for text in args.shapes]
    gpu = torch.cuda.get_device_name() if cuda else "CPU"
    lines = [
        f"# Backward kernels ({gpu}, {'bf16' if cuda else 'float32'})",
        "",
        f"- date: {datetime.date.today()}, commit: {commit()}, flashjit {flashjit.__version__}, torch {torch.__version__}",
        f"- command: `python bench/backward_kernels.py --shapes {' '.join(args.shapes)} --steps {args.steps}"
        f"{' --device cpu' if not cuda else ''}`",
        f"- torch.profiler over {args.steps} backward passes (torch.autograd.grad, graph retained) after 3 "
        "warm-up passes; µs a backward of each kernel's device time"
        + ("" if cuda else " (on the CPU: host ops' self time)") + "; TFLOP/s over all of them (2.5x the "
        "forward's FLOPs, halved when causal)",
    ]
    for batch, heads_q, heads_kv, seqlen, head_dim, causal in shapes:
        torch.manual_seed(0)
        q = torch.randn(batch, heads_q, seqlen, head_dim, dtype=dtype, device=args.device, requires_grad=True)
        k, v = (torch.randn(batch, heads_kv, seqlen, head_dim, dtype=dtype, device=args.device, requires_grad=True)
                for _ in range(2))
        grad = torch.randn_like(q)
        flops = 2.5 * 4 * batch * heads_q * seqlen * seqlen * head_dim / (2 if causal else 1)
        label = f"B{batch} {heads_q}/{heads_kv} N{seqlen} D{head_dim}{' causal' if causal else ''}"
        lines += ["", f"## {label}", ""]
        print(f"## {label}", flush=True)
        for name, attention in implementations(cuda):
            out = attention(q, k, v, causal)

            def backward():
                torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)

            rows = kernel_times(backward, args.steps, cuda)
            total = sum(row[2] for row in rows)
            tflops = flops / (total * 1e-6) / 1e12 if total > 0 else float("nan")
            section = [f"**{name}**: {total:.1f} µs a backward in {len(rows)} kernels, {tflops:.0f} TFLOP/s", "",
                       "| kernel | calls a backward | µs a backward | share |", "|---|---:|---:|---:|"]
            section += [f"| `{key[:80]}` | {calls:.1f} | {us:.1f} | {us / total:.0%} |"
                        for key, calls, us in rows[:args.top]]
            section.append("")
            print("\n".join(section), flush=True)
            lines += section
            del out
    text = "\n".join(lines) + "\n"
    save_record(args.out, device_tag({"device": "cuda", "gpu": gpu}) if cuda else "cpu", "backward-kernels",
                commit(), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
