"""Host overhead per call of each torch entry point on tiny problems, where the
kernel is cheap and the Python/dispatcher path dominates.

    python bench/overhead.py [--out bench/results]      (writes cpu-overhead-<date>-<commit>.md)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import flashjit
from flashjit import _C, ops


def per_call_us(fn, calls: int, repeats: int = 15) -> float:
    """Median over repeats of the mean time of `calls` back-to-back calls."""
    for _ in range(max(10, calls // 10)):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def entry_points(q, k, v):
    """(name, forward-only callable, forward+backward callable or None)."""
    o = torch.empty(*q.shape[:3], v.shape[3])
    lse = torch.empty(q.shape[:3])
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
    dout = torch.randn(*q.shape[:3], v.shape[3])
    compiled = torch.compile(flashjit.scaled_dot_product_attention, fullgraph=True, dynamic=False)

    def train(f):
        def step():
            out = f(qg, kg, vg)
            torch.autograd.backward(out, dout)
        return step

    op = torch.ops.flashjit.fwd
    buffers = (q, k, v, o, lse)  # the descriptors below point into these; the closure keeps them alive

    def kernel_alone():
        _C.forward(*map(ops._ref, buffers), None, None, 0.0, 0, -1, -1, 0.0, 0, 0, 0, 0)

    return [
        ("kernel alone: _C call, outputs preallocated", kernel_alone, None),
        ("flashjit.attention (eager path)", lambda: flashjit.attention(q, k, v), train(flashjit.attention)),
        ("torch.ops.flashjit.fwd (custom op)", lambda: op(q, k, v, None, None, 0.0, 0, -1, -1, 0.0, None, 0),
         train(lambda q, k, v: op(q, k, v, None, None, 0.0, 0, -1, -1, 0.0, None, 0)[0])),
        ("flashjit.scaled_dot_product_attention", lambda: flashjit.scaled_dot_product_attention(q, k, v),
         train(flashjit.scaled_dot_product_attention)),
        ("torch.compile(flashjit SDPA)", lambda: compiled(q, k, v), train(compiled)),
        ("torch F.scaled_dot_product_attention", lambda: F.scaled_dot_product_attention(q, k, v),
         train(F.scaled_dot_product_attention)),
    ]


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=os.path.dirname(__file__)).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for the markdown result (default: print only)")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    shapes = {"B1 H1 S16 D64": (1, 1, 16, 64), "decode B1 H8 Sq1 Sk128 D128": (1, 8, 1, 128)}
    rows = []
    for label, (b, h, s, d) in shapes.items():
        torch.manual_seed(0)
        sk = 128 if s == 1 else s
        q, k, v = torch.randn(b, h, s, d), torch.randn(b, h, sk, d), torch.randn(b, h, sk, d)
        for name, forward, train in entry_points(q, k, v):
            with torch.no_grad():
                fwd_us = per_call_us(forward, args.calls)
            train_us = per_call_us(train, args.calls // 2) if train else float("nan")
            rows.append((label, name, fwd_us, train_us))
            print(f"{label:28} {name:42} fwd {fwd_us:8.1f} us   fwd+bwd {train_us:8.1f} us", flush=True)
    lines = [
        "# Host overhead per call (CPU)",
        "",
        f"- date: {datetime.date.today()}, commit: {commit()}, flashjit {flashjit.__version__}, torch {torch.__version__}",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}",
        f"- command: `python bench/overhead.py{' --out ' + args.out if args.out else ''}`",
        "- forward under torch.no_grad(); forward+backward with q, k, v requiring grad and autograd.backward;",
        f"  median of 15 runs of {args.calls} back-to-back calls (forward+backward: half as many).",
        "",
        "| problem | entry point | forward µs/call | forward+backward µs/call |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {label} | {name} | {f:.1f} | {t:.1f} |" for label, name, f, t in rows]
    text = "\n".join(lines) + "\n"
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"cpu-overhead-{datetime.date.today()}-{commit()}.md")
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
