"""flashjit's MLX primitives on MLX's GPU stream (MLX on CUDA) against MLX's own attention.

bf16, B 4, H 16, head dim 64 and 128, N 1024, 4000 (not a multiple of 128: MLX's unfused
backward), 4096 and 16384 (B 1 there), causal and not: forward and forward+backward
time on the GPU for flashjit.mlx.attention(stream=mx.gpu) and
mx.fast.scaled_dot_product_attention, as TFLOP/s (forward 4*B*H*N^2*D, halved for
causal; backward 2.5x), with the largest difference between the two outputs.
Timing: `--runs` evaluations of `--calls` calls each (one mx.eval a run, the outputs
summed so that every call is computed), mx.synchronize() around, median.

    python bench/mlx_gpu.py --out bench/results [--launch capture nodes capture:allocator]

--launch: flashjit's columns with each FLASHJIT_MLX_LAUNCH value, optionally with
FLASHJIT_MLX_MEMORY after a colon (`capture:allocator`: the outputs and workspace in MLX's
allocator's memory; default: flashjit's device memory); the first is the "flashjit" column, the others
"flashjit[launch=...]", in the same process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import mlx.core as mx

import flashjit
import flashjit.mlx as fm
from gpu_attention import record_commit, record_text, save_record

from flashjit.bench.provenance import device_tag


def median_ms(fn, runs, calls):
    """The median ms a call over `runs` timed runs of `calls` calls (after one warm-up run), and
    flashjit's eval_gpu host µs a node over the timed runs alone, with the allocations' share of
    it (nan where none ran)."""
    def run():
        total = None
        for _ in range(calls):
            out = fn()
            part = sum(x.astype(mx.float32).sum() for x in (out if isinstance(out, tuple) else (out,)))
            total = part if total is None else total + part
        mx.eval(total)

    run()  # warm-up: compilation, graph caches
    mx.synchronize()
    times = []
    before = flashjit._mlx.eval_gpu_host_time()
    for _ in range(runs):
        start = time.perf_counter()
        run()
        mx.synchronize()
        times.append((time.perf_counter() - start) * 1e3 / calls)
    after = flashjit._mlx.eval_gpu_host_time()
    nodes = after["calls"] - before["calls"]
    host = (after["seconds"] - before["seconds"]) / nodes * 1e6 if nodes else float("nan")
    alloc = (after["alloc_seconds"] - before["alloc_seconds"]) / nodes * 1e6 if nodes else float("nan")
    return statistics.median(times), host, alloc


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="directory for the markdown record")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="head dim 128, N 4096 only")
    parser.add_argument("--launch", nargs="+", default=["capture"],
                        choices=["capture", "nodes", "capture:allocator", "nodes:allocator"],
                        help="FLASHJIT_MLX_LAUNCH of flashjit's columns, in turn, with FLASHJIT_MLX_MEMORY after a "
                        "colon (default: capture, flashjit's device memory); a value given again is measured again as a "
                        "column of its own")
    args = parser.parse_args()
    if not flashjit._mlx.cuda_available():
        sys.exit("mlx_gpu.py: flashjit.mlx has no GPU stream here (MLX on CUDA and flashjit's eval_gpu needed)")
    mx.set_default_device(mx.gpu)
    device = flashjit.cuda.device_info()["name"]
    mx.random.seed(0)
    heads = 16
    def flashjit_with(setting):
        launch, _, memory = setting.partition(":")
        def impl(q, k, v, c):
            # Read where the nodes run (mx.eval, inside median_ms's run, still in this setting).
            os.environ["FLASHJIT_MLX_LAUNCH"] = launch
            os.environ["FLASHJIT_MLX_MEMORY"] = memory or "device"
            return fm.attention(q, k, v, causal=c, stream=mx.gpu)
        return impl

    # A value given again is a column of its own (a repeat, to see the run's spread): "flashjit[launch=nodes] #2".
    names = []
    for i, launch in enumerate(args.launch):
        name = "flashjit" if i == 0 else f"flashjit[launch={launch}]"
        repeat = sum(1 for earlier in args.launch[:i] if earlier == launch)
        names.append(f"{name} #{repeat + 1}" if repeat else name)
    impls = {name: flashjit_with(launch) for name, launch in zip(names, args.launch)}
    impls["mx.fast"] = lambda q, k, v, c: mx.fast.scaled_dot_product_attention(
        q, k, v, scale=q.shape[-1] ** -0.5, mask="causal" if c else None)
    cases = [(128, 4096)] if args.quick else [(d, n) for d in (64, 128) for n in (1024, 4000, 4096, 16384)]
    rows = []
    for head_dim, seqlen in cases:
        batch = 1 if seqlen > 4096 else 4
        for causal in (False, True):
            q, k, v = (mx.random.normal((batch, heads, seqlen, head_dim)).astype(mx.bfloat16) for _ in range(3))
            # MLX's buffer cache emptied before each row: its cached device buffers (the float32
            # temporaries of earlier rows: a D64 float32 array has a D128 bf16 output's bytes) would
            # otherwise be handed to the first column that asks MLX's allocator for that size, each
            # moved to managed memory by a blocking copy (a0f46dd's record: up to 1.3 ms a call in
            # the first column only). In a training step MLX keeps freeing such buffers, which
            # flashjit's device memory (the default) avoids; this table compares the settings
            # without them.
            mx.eval(q, k, v)
            mx.clear_cache()
            flops = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
            row = {"D": head_dim, "N": seqlen, "B": batch, "causal": causal}
            outputs, grads = {}, {}
            for name, impl in impls.items():
                def loss(q, k, v, impl=impl):
                    return impl(q, k, v, causal).astype(mx.float32).sum()
                grads[name] = mx.grad(loss, argnums=(0, 1, 2))
                # Every column's forward and gradient once before any is timed, so that the
                # shape's first allocations (new managed memory at each new size) fall on no column.
                outputs[name] = impl(q, k, v, causal).astype(mx.float32)
                mx.eval(outputs[name], *grads[name](q, k, v))  # under this column's FLASHJIT_MLX_LAUNCH
            for name, impl in impls.items():
                grad = grads[name]
                forward, forward_host, forward_alloc = median_ms(lambda: impl(q, k, v, causal), args.runs, args.calls)
                both, both_host, both_alloc = median_ms(lambda: grad(q, k, v), args.runs, args.calls)
                backward = max(both - forward, 1e-6)
                row[name] = (flops / forward / 1e9, 2.5 * flops / backward / 1e9, forward, both)
                if name != "mx.fast":  # flashjit's own host work a node: the forward's, then fwd+bwd's two kinds
                    row[name + " host"] = (forward_host, both_host, forward_alloc, both_alloc)
            row["difference"] = max(float(mx.abs(outputs[name] - outputs["mx.fast"]).max()) for name in names)
            rows.append(row)
            print(row, flush=True)

    commit = record_commit()
    facts = [f"{device}, mlx {mx.__version__}, flashjit {flashjit.__version__}",
             f"bf16, H{heads}; TFLOP/s (backward 2.5x the forward's FLOPs, its time fwd+bwd minus fwd); median of "
             f"{args.runs} runs of {args.calls} calls; difference: largest |o_flashjit - o_mx.fast|; MLX's buffer "
             "cache emptied (mx.clear_cache()) before each row",
             "host µs: flashjit's eval_gpu host time a node (flashjit._mlx.eval_gpu_host_time(): allocation, "
             "the prepare pass, recording the kernels) over the timed runs, for the forward's calls, then for "
             "fwd+bwd's (a forward and a backward node each: the mean of the two kinds), each with the "
             "allocations' share in parentheses; the rest of a call's wall time is MLX's own and the GPU's",
             "launch=X:allocator: FLASHJIT_MLX_MEMORY=allocator (the outputs and workspace in MLX's allocator's "
             "memory; otherwise flashjit's device memory)",
             "flashjit[launch=X] #n: the n-th column of that setting (a repeat, for the run's spread)"]
    header = ["D", "N", "B", "causal"] + [f"{name} fwd" for name in names] + ["mx.fast fwd"] + [
        f"{name} bwd" for name in names] + ["mx.fast bwd"] + [
        f"{name} fwd speedup" for name in names] + [f"{name} fwd+bwd speedup" for name in names] + [
        f"{name} host µs a node, fwd / fwd+bwd" for name in names] + ["difference"]
    table = [[row["D"], row["N"], row["B"], "yes" if row["causal"] else "no"]
             + [f"{row[name][0]:.0f}" for name in names + ["mx.fast"]]
             + [f"{row[name][1]:.0f}" for name in names + ["mx.fast"]]
             + [f"{row['mx.fast'][2] / row[name][2]:.2f}x" for name in names]
             + [f"{row['mx.fast'][3] / row[name][3]:.2f}x" for name in names]
             + [f"{row[name + ' host'][0]:.1f} ({row[name + ' host'][2]:.1f}) / "
                f"{row[name + ' host'][1]:.1f} ({row[name + ' host'][3]:.1f})" for name in names]
             + [f"{row['difference']:.1e}"] for row in rows]
    text = record_text("MLX GPU benchmark: flashjit.mlx on MLX's GPU stream against mx.fast", "mlx_gpu.py", commit,
                       facts, header, table, align="rrrl" + "r" * (len(header) - 4))
    print(text)
    save_record(args.out, device_tag({"device": "cuda", "gpu": device}), "mlx", commit, text)


if __name__ == "__main__":
    main()
