"""GPU benchmark of flashjit against PyTorch SDPA's flash and cuDNN backends.

bf16, B*N = 16k tokens, hidden 2048 (H = 2048 / D), D in {64, 128, 256},
N in {2k, 8k}, causal and not: forward and backward TFLOP/s (DESIGN.md §5
FLOP counts), CUDA-event timing, median of repeated runs after warm-up, fresh
random inputs. Also the peak extra memory of forward+backward at B1 H16 N8192
D128, and the kernel compile and disk-load times.

    python bench/gpu_attention.py --out bench/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashjit
from flashjit.bench import device_tag


def flops(batch, heads, seqlen, head_dim, causal, backward):
    forward = 4 * batch * heads * seqlen * seqlen * head_dim
    if causal:
        forward //= 2
    return forward * (2.5 if backward else 1.0)


def time_ms(fn, min_runs=5, max_runs=30, budget_ms=1500.0):
    """Median of CUDA-event timings; the run count adapts to the cost of one call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    runs = int(min(max_runs, max(min_runs, budget_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(runs):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def implementations():
    def flashjit_sdpa(q, k, v, causal):
        return flashjit.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def torch_backend(backend):
        def run(q, k, v, causal):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run

    return {"flashjit": flashjit_sdpa, "torch-flash": torch_backend(SDPBackend.FLASH_ATTENTION),
            "torch-cudnn": torch_backend(SDPBackend.CUDNN_ATTENTION)}


def measure(impl, batch, heads, seqlen, head_dim, causal, forward_only=False):
    shape = (batch, heads, seqlen, head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    forward_ms = time_ms(lambda: impl(q, k, v, causal))
    if forward_only:
        return forward_ms, float("nan")
    out = impl(q, k, v, causal)
    backward_ms = time_ms(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True))
    return forward_ms, backward_ms


def peak_memory_mib(impl):
    shape = (1, 16, 8192, 128)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    impl(q, k, v, False).backward(grad)  # warm-up: compile, workspaces
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    impl(q, k, v, False).backward(grad)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def compile_times():
    """Cold compile of one kernel in a fresh cache, then a load from that warm disk cache."""
    code = ("import flashjit, json; from flashjit.cuda import KernelConfig as K; "
            "flashjit.precompile([K(dtype='bfloat16', head_dim=128)]); "
            "stats = flashjit.cuda.cache_stats(); "
            "assert stats['compiles'] + stats['disk_loads'] == 1, stats; "
            "print(json.dumps(stats))")
    with tempfile.TemporaryDirectory() as directory:
        env = dict(os.environ, FLASHJIT_CACHE_DIR=directory)
        cold = json.loads(subprocess.check_output([sys.executable, "-c", code], env=env, text=True))
        warm = json.loads(subprocess.check_output([sys.executable, "-c", code], env=env, text=True))
    assert cold["compiles"] == 1 and warm["disk_loads"] == 1, (cold, warm)
    return cold["last_compile_seconds"], warm["last_disk_load_seconds"]


def shown_arguments(argv):
    """The command line for the record, less the output folder."""
    shown, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--out="):
            skip = False
            continue
        if arg == "--out":
            skip = True
            continue
        shown.append(arg)
    return "".join(" " + arg for arg in shown)


def record_commit():
    """The commit a record names: FLASHJIT_COMMIT (the GPU machine may receive a working tree
    without its git history), else git's HEAD."""
    return os.environ.get("FLASHJIT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"


def save_record(out, tag, kind, commit, text, label=""):
    """Writes out/<tag>-<kind>-<date>-<commit>[-label].md."""
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    suffix = f"-{label}" if label else ""
    path = os.path.join(out, f"{tag}-{kind}-{datetime.date.today()}-{commit}{suffix}.md")
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="directory for the markdown record")
    parser.add_argument("--quick", action="store_true", help="D=128, N=2k only")
    parser.add_argument("--forward-only", action="store_true",
                        help="time the forward alone (no backward, memory or compile figures)")
    parser.add_argument("--label", default="", help="a tag for the record's file name and title")
    args = parser.parse_args()
    torch.manual_seed(0)
    impls = implementations()
    rows = []
    head_dims = (128,) if args.quick else (64, 128, 256)
    seqlens = (2048,) if args.quick else (2048, 8192)
    for head_dim in head_dims:
        for seqlen in seqlens:
            for causal in (False, True):
                batch, heads = 16384 // seqlen, 2048 // head_dim
                row = {"D": head_dim, "N": seqlen, "causal": causal}
                for name, impl in impls.items():
                    try:
                        forward_ms, backward_ms = measure(impl, batch, heads, seqlen, head_dim, causal,
                                                          args.forward_only)
                    except RuntimeError as error:
                        print(f"{name} D{head_dim} N{seqlen} causal={causal}: {error}", file=sys.stderr)
                        row[name] = None
                        continue
                    row[name] = (flops(batch, heads, seqlen, head_dim, causal, False) / forward_ms / 1e9,
                                 flops(batch, heads, seqlen, head_dim, causal, True) / backward_ms / 1e9)
                rows.append(row)
                print(row, flush=True)
    memory = {} if args.forward_only else {name: peak_memory_mib(impl) for name, impl in impls.items()}
    cold, warm = (None, None) if args.forward_only else compile_times()

    commit = record_commit()
    names = list(impls)
    lines = [f"# GPU attention benchmark: {torch.cuda.get_device_name()}", "",
             f"- date: {datetime.date.today()}", f"- commit: {commit}",
             f"- command: `{' '.join(f'{k}={v}' for k, v in os.environ.items() if k.startswith('FLASHJIT_CUDA_'))}"
             f"{' ' if any(k.startswith('FLASHJIT_CUDA_') for k in os.environ) else ''}"
             f"python bench/gpu_attention.py{shown_arguments(sys.argv[1:])}`",
             f"- torch {torch.__version__}, flashjit {flashjit.__version__}, NVRTC "
             f"{'.'.join(map(str, flashjit.cuda.nvrtc_version()))}",
             "- bf16, B*N = 16384, hidden 2048 (H = 2048 / D); TFLOP/s forward / backward, "
             "CUDA events, median", "",
             "| D | N | causal | " + " | ".join(f"{n} fwd | {n} bwd" for n in names) + " |",
             "|---|---|---|" + "---|---|" * len(names)]
    for row in rows:
        cells = []
        for name in names:
            value = row[name]
            cells += ["n/a", "n/a"] if value is None else [f"{x:.0f}" if x == x else "n/a" for x in value]
        lines.append(f"| {row['D']} | {row['N']} | {row['causal']} | " + " | ".join(cells) + " |")
    if not args.forward_only:
        lines += ["", "Peak extra memory of forward+backward, B1 H16 N8192 D128 bf16 (MiB): " +
                  ", ".join(f"{name} {value:.0f}" for name, value in memory.items()), "",
                  f"Kernel compile (cold, bf16 D128 forward): {cold:.2f} s; load from a warm disk cache: "
                  f"{warm * 1e3:.1f} ms"]
    text = "\n".join(lines) + "\n"
    print(text)
    save_record(args.out, device_tag({"device": "cuda", "gpu": torch.cuda.get_device_name()}), "attention", commit,
                text, args.label)


if __name__ == "__main__":
    main()
