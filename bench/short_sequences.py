"""Where the time of short problems goes: flashjit against PyTorch's flash backend.

bf16, B*N = 16k tokens, hidden 2048, head dims 64 and 128, N from 1k to 8k,
causal and not. Each case is timed two ways with CUDA events:
  synced   one call between two events, then a synchronize (gpu_attention.py's
           method: the host's per-call work shows as idle GPU time);
  stream   ten calls back to back between two events (the host runs ahead, so
           the figure is the GPU's time alone).
A fit of stream time against FLOPs over N gives each implementation's fixed
cost per call at equal work (the time short problems lose). Then one profiled
forward+backward per implementation at D64 N2k causal lists the kernels.

    python bench/short_sequences.py [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashjit
from gpu_attention import flops  # docs/measurement.md's counts, as the main benchmark


def impls():
    def ours(q, k, v, causal):
        return flashjit.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def flash(q, k, v, causal):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return {"flashjit": ours, "flash": flash}


def timed(fn, calls, repeats=7):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / calls)
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    lines = ["| D | N | causal | impl | fwd synced ms | fwd stream ms | bwd synced ms | bwd stream ms | "
             "fwd TFLOP/s (stream) | bwd TFLOP/s (stream) |", "|---|---|---|---|---|---|---|---|---|---|"]
    fits = []
    for d in (64, 128):
        for causal in (False, True):
            points = {name: [] for name in impls()}
            for n in (1024, 2048, 4096, 8192):
                b, h = 16384 // n, 2048 // d
                q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                grad = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
                for name, impl in impls().items():
                    fwd = lambda: impl(q, k, v, causal)
                    out = fwd()
                    bwd = lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
                    row = [timed(fwd, 1), timed(fwd, 10), timed(bwd, 1), timed(bwd, 10)]
                    ff, fb = flops(b, h, n, d, causal, False), flops(b, h, n, d, causal, True)
                    points[name].append((ff, row[1], fb, row[3]))
                    lines.append(f"| {d} | {n} | {causal} | {name} | " + " | ".join(f"{t:.3f}" for t in row) +
                                 f" | {ff / row[1] / 1e9:.0f} | {fb / row[3] / 1e9:.0f} |")
                    print(lines[-1], flush=True)
            for name, pts in points.items():
                for label, fi, ti in (("fwd", 0, 1), ("bwd", 2, 3)):
                    xs, ys = [p[fi] for p in pts], [p[ti] for p in pts]
                    mx, my = statistics.mean(xs), statistics.mean(ys)
                    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
                    fits.append(f"| {d} | {causal} | {name} | {label} | {1 / slope / 1e9:.0f} | "
                                f"{(my - slope * mx) * 1e3:.0f} |")
    lines += ["", "Fit of stream time = FLOPs / rate + fixed over N (B*N fixed):", "",
              "| D | causal | impl | pass | marginal TFLOP/s | fixed µs |", "|---|---|---|---|---|---|"] + fits

    # Kernels of one forward+backward at D64 N2k causal.
    b, h, n, d = 8, 32, 2048, 64
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    for name, impl in impls().items():
        for _ in range(3):
            impl(q, k, v, True).backward(grad)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                impl(q, k, v, True).backward(grad)
            torch.cuda.synchronize()
        lines += ["", f"Kernels of 5 forward+backward, {name}, D64 N2k causal:", "", "```",
                  prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), "```"]
    commit = os.environ.get("FLASHJIT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    text = "\n".join([f"# Short-sequence study: {torch.cuda.get_device_name()}", "",
                      f"- date: {datetime.date.today()}", f"- commit: {commit}",
                      "- command: `python bench/short_sequences.py`", ""] + lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"h200-short-{datetime.date.today()}-{commit}.md"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
