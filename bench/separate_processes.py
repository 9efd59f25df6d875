"""flashjit against torch's CPU SDPA (its flash backend), each timed alone in a process of its
own, so that neither implementation's threads or caches touch the other's timing: a
cross-check of the in-process `flashjit bench`. Wall clock of the forward and of forward +
backward, median of --repeats after two warm-up calls; B * N = 2048 tokens, H = 512 / D.

    python bench/separate_processes.py [--dtype bfloat16] [--cases 128x2048 64x4096 ...] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

IMPLS = ("torch", "flashjit")


def measure(impl: str, dtype_name: str, head_dim: int, seqlen: int, repeats: int) -> dict[str, float]:
    """One implementation's times in this process (ms)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    batch, heads = max(1, 2048 // seqlen), 512 // head_dim
    q, k, v = (torch.randn(batch, heads, seqlen, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(batch, heads, seqlen, head_dim, dtype=dtype)
    if impl == "flashjit":
        import flashjit

        def attend():
            return flashjit.attention(q, k, v)
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def attend():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v)

    def forward():
        with torch.no_grad():
            attend()

    def forward_backward():
        attend().backward(grad)

    times = {}
    for name, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
        for _ in range(2):
            fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        times[name] = statistics.median(samples) * 1e3
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--cases", nargs="+", default=["128x2048", "64x4096"], metavar="DxN")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="directory for the markdown record")
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "D", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, head_dim, seqlen = args.child[0], int(args.child[1]), int(args.child[2])
        print(json.dumps(measure(impl, args.dtype, head_dim, seqlen, args.repeats)))
        return 0
    rows = []
    for case in args.cases:
        head_dim, seqlen = (int(x) for x in case.split("x"))
        times = {}
        for impl in IMPLS:  # each in a fresh process
            out = subprocess.run([sys.executable, __file__, "--dtype", args.dtype, "--repeats", str(args.repeats),
                                  "--child", impl, str(head_dim), str(seqlen)], check=True, capture_output=True,
                                 text=True).stdout
            times[impl] = json.loads(out.strip().splitlines()[-1])
        for mode in ("fwd", "fwd+bwd"):
            rows.append((head_dim, seqlen, mode, times["flashjit"][mode], times["torch"][mode]))
    import flashjit
    import torch
    from gpu_attention import record_commit, record_text, save_record  # bench/ is the script's folder

    commit = record_commit()
    facts = [f"torch {torch.__version__}, flashjit {flashjit.__version__}, {os.cpu_count()} CPUs, "
             f"cpu kernels {flashjit._C.cpu_kernels()[0]}",
             f"B * N = 2048 tokens, H = 512 / D; wall clock, median of {args.repeats} after two warm-up calls"]
    text = record_text(f"flashjit and torch's CPU SDPA, each in its own process ({args.dtype})",
                       "separate_processes.py", commit, facts,
                       ["D", "N", "mode", "flashjit ms", "torch ms", "torch / flashjit"],
                       [(d, n, mode, f"{f:.1f}", f"{t:.1f}", f"{t / f:.2f}×") for d, n, mode, f, t in rows],
                       align="rrlrrr")
    print(text)
    save_record(args.out, "cpu", f"separate-{args.dtype}", commit, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
