"""Decoding-shaped attention on the GPU: one new query per sequence against a KV
cache, flashjit (keys split over blocks by its own choice; with mma.sync blocks of one
warp, FLASHJIT_CUDA_DECODE_WARPS=1; with the usual split forward, FLASHJIT_CUDA_DECODE_WARPS=4,
on sm_90 the sm_90a kernel's; and with FLASHJIT_CUDA_SPLITS=1: no split) against
PyTorch's SDPA (its own kernel choice), all in one run, on B 1/16/64 x cached keys
1k/8k/32k/128k (B 64 up to 32k). bf16, 32 query heads sharing 8 key/value heads,
head dim 128, with no mask and with a boolean key mask (a batch of cached sequences
of unequal length). GPU time a call over back-to-back calls (CUDA events), the K/V
bytes read a second, and host time of synchronised single calls.

    python bench/decode.py --out bench/results [--sizes 1x8192 16x32768 ...] [--graphs] [--overlap-off] [--overlap-eager]
        [--kernels] [--splits N ...] [--tiles T ...]

--kernels adds each GPU kernel's own time a call (torch.profiler, CUPTI) for flashjit and torch;
--tiles adds flashjit with FLASHJIT_CUDA_TILES=T, a column each (in graphs too with --graphs),
e.g. stages=3,q=1 for a deeper K/V ring in the sm_90a split forward.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import flashjit
from flashjit.bench import device_tag
from gpu_attention import record_commit, save_record, shown_arguments, time_ms


def per_call_us(fn, calls=20, repeats=5):
    """Host microseconds of one call, each call synchronised (host time included); median of repeats."""
    fn()
    torch.cuda.synchronize()
    medians = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
            torch.cuda.synchronize()
        medians.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(medians)


def back_to_back_us(fn):
    """GPU microseconds a call over back-to-back calls (CUDA events around them; gpu_attention.time_ms)."""
    return time_ms(fn) * 1e3


def graph_us(fn, calls=20, repeats=7):
    """GPU microseconds a call of `calls` calls captured into one CUDA graph and replayed (CUDA events
    around each replay; median of repeats): the launches' host time is gone, their gaps on the GPU stay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # kernels compiled before capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def kernel_us(fn, calls=50):
    """Each GPU kernel's (or memset's, copy's) device microseconds a call over `calls` back-to-back
    calls, by name (torch.profiler's CUDA activity: CUPTI's kernel records)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        total = getattr(event, "self_device_time_total", None)
        if total is None:
            total = getattr(event, "self_cuda_time_total", 0.0)
        if total > 0:
            times[event.key] = total / calls
    return times


def with_env(fn, **variables):
    """fn run with environment variables set for the call (flashjit reads these at every call)."""
    def run():
        saved = {name: os.environ.get(name) for name in variables}
        os.environ.update(variables)
        try:
            return fn()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    return run


SIZES = [(1, 1024), (1, 8192), (1, 32768), (1, 131072), (16, 1024), (16, 8192), (16, 32768), (16, 131072),
         (64, 1024), (64, 8192), (64, 32768)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="directory for the markdown record")
    parser.add_argument("--sizes", nargs="+", default=None, metavar="BxKEYS",
                        help="batch x cached keys, e.g. 1x8192 16x32768 (default: issue's grid)")
    parser.add_argument("--splits", nargs="+", type=int, default=[], metavar="N",
                        help="also flashjit with FLASHJIT_CUDA_SPLITS=N forced, a column each (to choose the split count)")
    parser.add_argument("--tiles", nargs="+", default=[], metavar="T",
                        help="also flashjit with FLASHJIT_CUDA_TILES=T, a column each (e.g. stages=3,q=1)")
    parser.add_argument("--graphs", action="store_true",
                        help="also each call captured into a CUDA graph of 20 calls, replayed (flashjit, no split, forced "
                             "splits, torch)")
    parser.add_argument("--overlap-off", action="store_true",
                        help="also flashjit with FLASHJIT_CUDA_OVERLAP=0 (the combine launched after the split kernel ends)")
    parser.add_argument("--overlap-eager", action="store_true",
                        help="also flashjit with FLASHJIT_CUDA_OVERLAP=eager (the combine launched programmatically "
                             "outside stream capture only): a column of its own, in graphs with --graphs")
    parser.add_argument("--kernels", action="store_true",
                        help="also each GPU kernel's own time a call (torch.profiler) for flashjit (with and without "
                             "the combine's programmatic launch) and torch")
    args = parser.parse_args()
    for name in ("FLASHJIT_CUDA_SPLITS", "FLASHJIT_CUDA_DECODE_WARPS", "FLASHJIT_CUDA_OVERLAP", "FLASHJIT_CUDA_TILES"):
        os.environ.pop(name, None)
    sizes = [tuple(int(x) for x in size.split("x")) for size in args.sizes] if args.sizes else SIZES
    heads_q, heads_kv, head_dim = 32, 8, 128
    forced = [f"flashjit, splits={n}" for n in args.splits] + [f"flashjit, tiles={t}" for t in args.tiles]
    overlap = (["flashjit, overlap=0"] if args.overlap_off else []) + (
        ["flashjit, overlap=eager"] if args.overlap_eager else [])
    names = ["flashjit", "flashjit, one-warp blocks", "flashjit, warps=4", "flashjit, no split", *forced, *overlap,
             "torch"]
    graphed = ["flashjit", *overlap, "flashjit, no split", *forced, "torch"] if args.graphs else []
    rows = []
    torch.manual_seed(0)
    for batch, keys in sizes:
        q = torch.randn(batch, heads_q, 1, head_dim, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, heads_kv, keys, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        lengths = torch.randint(keys // 2, keys + 1, (batch,), device="cuda")
        mask = (torch.arange(keys, device="cuda") < lengths[:, None])[:, None, None, :]
        for masked in (False, True):
            m = mask if masked else None
            cases = {
                "flashjit": lambda: flashjit.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True),
                "torch": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True),
            }
            cases["flashjit, one-warp blocks"] = with_env(cases["flashjit"], FLASHJIT_CUDA_DECODE_WARPS="1")
            cases["flashjit, warps=4"] = with_env(cases["flashjit"], FLASHJIT_CUDA_DECODE_WARPS="4")
            cases["flashjit, no split"] = with_env(cases["flashjit"], FLASHJIT_CUDA_SPLITS="1")
            for n in args.splits:
                cases[f"flashjit, splits={n}"] = with_env(cases["flashjit"], FLASHJIT_CUDA_SPLITS=str(n))
            for t in args.tiles:
                cases[f"flashjit, tiles={t}"] = with_env(cases["flashjit"], FLASHJIT_CUDA_TILES=t)
            for name in overlap:
                cases[name] = with_env(cases["flashjit"], FLASHJIT_CUDA_OVERLAP=name.split("=")[1])
            expected = cases["torch"]().float()
            for name in names[:-1]:
                torch.testing.assert_close(cases[name]().float(), expected, rtol=2e-2, atol=2e-2)
            # K and V bytes a call reads: the whole cache, or (masked) the keys the mask keeps.
            kept = int(lengths.sum()) if masked else batch * keys
            row = {"B": batch, "keys": keys, "mask": masked, "bytes": 2 * kept * heads_kv * head_dim * 2}
            row.update({name: back_to_back_us(fn) for name, fn in cases.items()})
            row.update({name + " sync": per_call_us(fn) for name, fn in cases.items()})
            row.update({name + " graph": graph_us(cases[name]) for name in graphed})
            if args.kernels:
                # Without the programmatic launch too: there the combine's time is its own, not
                # also its wait for the split kernel.
                row["kernels"] = {name: kernel_us(fn) for name, fn in (
                    ("flashjit", cases["flashjit"]),
                    ("flashjit, overlap=0", with_env(cases["flashjit"], FLASHJIT_CUDA_OVERLAP="0")),
                    *((f"flashjit, tiles={t}, overlap=0",
                       with_env(cases[f"flashjit, tiles={t}"], FLASHJIT_CUDA_OVERLAP="0")) for t in args.tiles),
                    ("torch", cases["torch"]))}
            rows.append(row)
            print({key: round(value, 1) if isinstance(value, float) else value for key, value in row.items()},
                  flush=True)

    commit = record_commit()
    lines = [f"# Decoding benchmark: {torch.cuda.get_device_name()}", "",
             f"- date: {datetime.date.today()}", f"- commit: {commit}",
             f"- command: `python bench/decode.py{shown_arguments(sys.argv[1:])}`",
             f"- torch {torch.__version__}, flashjit {flashjit.__version__}",
             f"- bf16, one query, {heads_q} query heads, {heads_kv} key/value heads, head dim {head_dim}; "
             "mask: boolean, each sequence's cached length drawn from [keys / 2, keys]",
             "- µs: GPU time a call over back-to-back calls (CUDA events), median of 7 runs; TB/s: K and V bytes "
             "read (masked: the kept keys') over that time; sync µs: host time of one synchronised call, median "
             "of 5 x 20; one-warp blocks: FLASHJIT_CUDA_DECODE_WARPS=1; warps=4: FLASHJIT_CUDA_DECODE_WARPS=4 (on sm_90 "
             "the sm_90a split forward); no split: FLASHJIT_CUDA_SPLITS=1; splits=N: FLASHJIT_CUDA_SPLITS=N; tiles=T: "
             "FLASHJIT_CUDA_TILES=T; overlap=0: "
             "FLASHJIT_CUDA_OVERLAP=0; overlap=eager: FLASHJIT_CUDA_OVERLAP=eager; graph µs: GPU time a call of 20 calls captured into a CUDA graph and replayed, "
             "median of 7 replays", "",
             "| B | keys | mask | " + " | ".join(f"{n} µs" for n in names) + " | flashjit TB/s | torch TB/s | "
             "one-warp TB/s | flashjit vs torch | one-warp vs torch | " +
             " | ".join(f"{n} sync µs" for n in names) + "".join(f" | {n} graph µs" for n in graphed) + " |",
             "|---:|---:|---|" + "---:|" * (2 * len(names) + 5 + len(graphed))]
    for row in rows:
        tbs = {n: row["bytes"] / row[n] / 1e6 for n in names}
        lines.append(f"| {row['B']} | {row['keys']} | {'yes' if row['mask'] else 'no'} | " +
                     " | ".join(f"{row[n]:.1f}" for n in names) +
                     f" | {tbs['flashjit']:.2f} | {tbs['torch']:.2f} | {tbs['flashjit, one-warp blocks']:.2f} | "
                     f"{row['torch'] / row['flashjit']:.2f}x | {row['torch'] / row['flashjit, one-warp blocks']:.2f}x | " +
                     " | ".join(f"{row[n + ' sync']:.1f}" for n in names) +
                     "".join(f" | {row[n + ' graph']:.1f}" for n in graphed) + " |")
    if args.kernels:
        lines += ["", "Each GPU kernel's own time a call (torch.profiler over 50 back-to-back calls; names cut at 90 "
                  "characters; flashjit's combine, launched programmatically, starts while the split kernel runs and "
                  "its time includes that wait: the overlap=0 rows give each kernel's own time):", "", "| B | keys | mask | who | kernel | µs a call |", "|---:|---:|---|---|---|---:|"]
        for row in rows:
            for who, times in row["kernels"].items():
                for name, us in sorted(times.items(), key=lambda item: -item[1]):
                    lines.append(f"| {row['B']} | {row['keys']} | {'yes' if row['mask'] else 'no'} | {who} | "
                                 f"`{name[:90]}` | {us:.1f} |")
                lines.append(f"| {row['B']} | {row['keys']} | {'yes' if row['mask'] else 'no'} | {who} | all | "
                             f"{sum(times.values()):.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    save_record(args.out, device_tag({"device": "cuda", "gpu": torch.cuda.get_device_name()}), "decode", commit, text)


if __name__ == "__main__":
    main()
