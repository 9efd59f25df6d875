"""flashjit's MLX primitives against MLX's own attention on MLX's CPU stream.

float32, B1, H 8, head dim 64 and 128, N 256-2048, causal and not: forward and
forward+backward time (median of repeated evaluations, each mx.eval'd), for
flashjit.mlx.attention and mx.fast.scaled_dot_product_attention (which on the CPU
forms the score matrix), with the largest error of each against a float64 numpy
reference on the same inputs.

    python bench/mlx_cpu.py --out bench/results
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import mlx.core as mx
import numpy as np

import flashjit
import flashjit.mlx as fm
from gpu_attention import record_commit, record_text, save_record


def median_ms(fn, runs):
    mx.eval(fn())
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        mx.eval(fn())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def reference(q, k, v, causal):
    q, k, v = (np.array(x).astype(np.float64) for x in (q, k, v))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    if causal:
        n = s.shape[-1]
        s = np.where(np.tril(np.ones((n, n), dtype=bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="directory for the markdown record")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    mx.random.seed(0)
    heads = 8
    impls = {
        "flashjit": lambda q, k, v, c: fm.attention(q, k, v, causal=c),
        "mx.fast": lambda q, k, v, c: mx.fast.scaled_dot_product_attention(
            q, k, v, scale=q.shape[-1] ** -0.5, mask="causal" if c else None),
    }
    rows = []
    for head_dim in (64, 128):
        for seqlen in (256, 1024, 2048):
            for causal in (False, True):
                q, k, v = (mx.random.normal((1, heads, seqlen, head_dim)) for _ in range(3))
                exact = reference(q, k, v, causal)
                row = {"D": head_dim, "N": seqlen, "causal": causal}
                for name, impl in impls.items():
                    def loss(q, k, v, impl=impl):
                        return impl(q, k, v, causal).sum()
                    grad = mx.grad(loss, argnums=(0, 1, 2))
                    error = float(np.abs(np.array(impl(q, k, v, causal)) - exact).max())
                    row[name] = (median_ms(lambda: impl(q, k, v, causal), args.runs),
                                 median_ms(lambda: grad(q, k, v), args.runs), error)
                rows.append(row)
                print(row, flush=True)

    commit = record_commit()
    facts = [f"mlx {mx.__version__}, flashjit {flashjit.__version__}, Python {platform.python_version()}",
             f"float32, B1, H{heads}; milliseconds, median of {args.runs} evaluations; max error of the forward "
             "against float64"]
    header = ["D", "N", "causal", "flashjit fwd", "mx.fast fwd", "flashjit fwd+bwd", "mx.fast fwd+bwd", "fwd speedup",
              "fwd+bwd speedup", "flashjit error", "mx.fast error"]
    table = [[row["D"], row["N"], "yes" if row["causal"] else "no", f"{row['flashjit'][0]:.2f}",
              f"{row['mx.fast'][0]:.2f}", f"{row['flashjit'][1]:.2f}", f"{row['mx.fast'][1]:.2f}",
              f"{row['mx.fast'][0] / row['flashjit'][0]:.2f}x", f"{row['mx.fast'][1] / row['flashjit'][1]:.2f}x",
              f"{row['flashjit'][2]:.1e}", f"{row['mx.fast'][2]:.1e}"] for row in rows]
    text = record_text(f"MLX CPU benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                       "mlx_cpu.py", commit, facts, header, table, align="rrl" + "r" * 8)
    print(text)
    save_record(args.out, "cpu", "mlx", commit, text)


if __name__ == "__main__":
    main()
