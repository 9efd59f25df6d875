"""Where a step of the one-pass backward's time goes, from the kernel's own clock (a diagnostic for a
GPU machine; FLASHJIT_CUDA_TRACE=1 with the one pass in whole-concurrent steps at head dim 128,
attention_hopper_bwd.cuh's StepTrace).

For each dQ sum mode named, a child process runs the benchmark's problem (bf16, B*N = 16k tokens,
H = 2048 / D) forward and backward untraced to compile and warm, times the untraced backward, then
runs it traced; the traced dK/dV launch prints, for the first 512 blocks and their first 64 steps,
clock64() at seven points of each consumer warpgroup's step and of each dQ writer thread's tile.
Reported per mode: each part of a consumer's step (the wait for Q and dO, the first products and
the gradient, the wait for the other consumer's dS, dV and dQ's products, the staging or adds of
dQ, dK's product) and of a writer's tile (the wait for both shares, for the earlier visitors'
counts and the copies' issue, for the copies to read the slot, for them to complete), in
microseconds a step, over the first two steps and the rest; and by key block, the blocks' start
against their head's first, the first tile's wait for its earlier visitors, and the whole block's
dQ staging time (the chain of a tile's visitors, seen from the blocks that wait on it).

    python scripts/trace_backward.py --seqlen 4096 [--causal] [--modes atomic writer-pair] [--json F]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import os, sys, torch, flashjit
d, n, causal = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
b, h = max(1, 16384 // n), 2048 // d
q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
dout = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
def step():
    o = flashjit.attention(q, k, v, causal=causal)
    return torch.autograd.grad(o, (q, k, v), dout)
for _ in range(3):
    step()
torch.cuda.synchronize()
o = flashjit.attention(q, k, v, causal=causal)
times = []
for _ in range(10):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.autograd.grad(o, (q, k, v), dout, retain_graph=True)
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end))
times.sort()
print("FJB untraced backward ms", times[len(times) // 2], file=sys.stderr, flush=True)
os.environ["FLASHJIT_CUDA_TRACE"] = "1"
for _ in range(2):
    step()
torch.cuda.synchronize()
"""

CONSUMER_PARTS = ("Q/dO wait", "S,dP + gradient", "dS wait", "dV,dQ products", "dQ staged/added", "dK product")
WRITER_PARTS = ("shares wait", "counts wait + issue", "copies read", "copies complete", "release")


def parse(text):
    """The last traced dK/dV launch: (kernel name, {(block, slot): {row: [8 fields]}})."""
    runs = [run for run in text.split("FJT kernel ")[1:] if "backward_dkdv" in run.split(None, 1)[0]]
    if not runs:
        raise SystemExit("no dK/dV trace in the child's output (is the one pass in whole-concurrent steps?):\n" +
                         text[-2000:])
    header, *lines = runs[-1].splitlines()
    rows = {}
    for line in lines:
        if not line.startswith("FJT "):
            continue
        block, slot, row, *fields = (int(x) for x in line.split()[1:])
        rows.setdefault((block, slot), {})[row] = fields
    return header.split()[0], rows


def mean(values):
    return statistics.fmean(values) if values else float("nan")


def summarise(rows, steps_per_row=64):
    """Per-part means in microseconds (first two steps, the rest), per key block figures."""
    last = steps_per_row  # the header row's index
    rates = []
    for (block, slot), table in rows.items():
        header = table.get(last)
        # Cycles a nanosecond, from blocks of 50 us and more (the global timer may tick by the microsecond).
        if slot in (1, 2) and header and header[5] - header[4] >= 50_000 and header[7] > header[6]:
            rates.append((header[7] - header[6]) / (header[5] - header[4]))
    if not rates:
        raise SystemExit("no consumer's start and end 50 us or more apart in the trace")
    ghz = statistics.median(rates)
    us = lambda cycles: cycles / ghz / 1000.0
    consumer = {part: ([], []) for part in CONSUMER_PARTS + ("step",)}
    writer = {part: ([], []) for part in WRITER_PARTS}
    edges = {"before steps": [], "after steps": []}
    per_block = {}
    for (block, slot), table in rows.items():
        header = table.get(last)
        if header is None:
            continue
        key_block, tiles = header[0], header[3]
        info = per_block.setdefault(block, {})  # (the host prints a block's writer rows first)
        if slot in (1, 2):
            info.update(key_block=key_block, head=(header[1], header[2]), tiles=tiles)
            info["start_ns"] = min(info.get("start_ns", header[4]), header[4])
            info["end_ns"] = max(info.get("end_ns", 0), header[5])
            staged = 0.0
            walked = min(tiles, steps_per_row)
            for t in range(walked):
                f = table.get(t)
                if f is None:
                    continue
                which = 0 if t < 2 else 1
                for i, part in enumerate(CONSUMER_PARTS):
                    consumer[part][which].append(us(f[i + 2] - f[i + 1]))
                following = table.get(t + 1) if t + 1 < walked else None
                if following is not None:
                    consumer["step"][which].append(us(following[1] - f[1]))
                staged += us(f[6] - f[5])
            info["staged_us"] = info.get("staged_us", 0.0) + staged / 2  # a consumer's mean
            # Before the first step (K and V, the first Q and dO) and, where every step was
            # traced, after the last (dK and dV stored).
            if table.get(0) is not None:
                edges["before steps"].append(us(table[0][1] - header[6]))
            if tiles <= steps_per_row and table.get(tiles - 1) is not None:
                edges["after steps"].append(us(header[7] - table[tiles - 1][7]))
        elif slot in (0, 3):
            for t in range(min(tiles, steps_per_row)):
                f = table.get(t)
                if f is None or f[1] == 0:
                    continue
                which = 0 if t < 2 else 1
                for i, part in enumerate(WRITER_PARTS):
                    writer[part][which].append(us(f[i + 2] - f[i + 1]))
                if t == 0:
                    info["first_counts_us"] = us(f[3] - f[2])
                    info["first_rank"] = f[7]
    # By key block: the start against the head's earliest block, the first tile's count wait, the
    # block's dQ staging time.
    heads = {}
    for info in per_block.values():
        if "head" in info:
            heads.setdefault(info["head"], []).append(info)
    by_key = {}
    for members in heads.values():
        first = min(m["start_ns"] for m in members)
        for m in members:
            entry = by_key.setdefault(m["key_block"], {"start_us": [], "counts_us": [], "staged_us": [],
                                                       "block_us": []})
            entry["start_us"].append((m["start_ns"] - first) / 1000.0)
            entry["block_us"].append((m["end_ns"] - m["start_ns"]) / 1000.0)
            entry["staged_us"].append(m.get("staged_us", 0.0))
            if "first_counts_us" in m:
                entry["counts_us"].append(m["first_counts_us"])
    spans = [(m["start_ns"], m["end_ns"]) for m in per_block.values() if "start_ns" in m]
    return {
        "clock_ghz": ghz,
        "blocks": len(per_block),
        # The traced blocks' span (the first start to the last end) and mean length: the traced
        # kernel's own pace, beside the untraced backward's time.
        "traced_span_us": (max(e for _, e in spans) - min(s for s, _ in spans)) / 1000.0 if spans else float("nan"),
        "traced_block_us": mean([(e - s) / 1000.0 for s, e in spans]),
        "edges": {name: mean(values) for name, values in edges.items()},
        "consumer": {part: [mean(a), mean(b), len(b)] for part, (a, b) in consumer.items()},
        "writer": {part: [mean(a), mean(b), len(b)] for part, (a, b) in writer.items()},
        "by_key_block": {key: {name: mean(values) for name, values in entry.items()}
                         for key, entry in sorted(by_key.items())},
    }


def report(mode, kernel, untraced_ms, summary):
    print(f"\n## {mode}: {kernel}")
    print(f"untraced backward {untraced_ms:.3f} ms; clock {summary['clock_ghz']:.2f} GHz; {summary['blocks']} blocks "
          f"traced, spanning {summary['traced_span_us']:.0f} us, {summary['traced_block_us']:.1f} us a block; before "
          f"the first step {summary['edges']['before steps']:.2f} us, after the last {summary['edges']['after steps']:.2f} us")
    print("\n| consumer step part | first two steps (us) | later steps (us) |\n|---|---:|---:|")
    for part, (early, late, _) in summary["consumer"].items():
        print(f"| {part} | {early:.2f} | {late:.2f} |")
    print("(the first thread of each consumer warpgroup; \"dS wait\" includes its own warpgroup's slower warps)")
    if any(count for _, _, count in summary["writer"].values()):
        print("\n| dQ writer tile part | first two tiles (us) | later tiles (us) |\n|---|---:|---:|")
        for part, (early, late, _) in summary["writer"].items():
            print(f"| {part} | {early:.2f} | {late:.2f} |")
    keys = summary["by_key_block"]
    if keys:
        print("\n| key blocks | start after the head's first (us) | first tile's count wait (us) | "
              "dQ staging a block (us) | block (us) |\n|---|---:|---:|---:|---:|")
        ordered = sorted(keys)
        group = max(1, len(ordered) // 8)
        for i in range(0, len(ordered), group):
            chunk = ordered[i:i + group]
            pick = lambda name: mean([keys[k][name] for k in chunk if keys[k][name] == keys[k][name]])
            print(f"| {chunk[0]}-{chunk[-1]} | {pick('start_us'):.1f} | {pick('counts_us'):.2f} | "
                  f"{pick('staged_us'):.1f} | {pick('block_us'):.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=128, choices=[128])
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--modes", nargs="+", default=["atomic", "writer-pair"],
                        help="FLASHJIT_CUDA_ONE_PASS_DQ values (default: atomic writer-pair)")
    parser.add_argument("--json", help="write the summaries here")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a mode's child may take (default 600)")
    args = parser.parse_args()
    results, failed = {}, []
    for mode in args.modes:
        env = dict(os.environ, FLASHJIT_CUDA_BACKWARD="one-pass", FLASHJIT_CUDA_ONE_PASS_STEPS="whole-concurrent",
                   FLASHJIT_CUDA_ONE_PASS_DQ=mode)
        env.pop("FLASHJIT_CUDA_TRACE", None)
        try:
            child = subprocess.run([sys.executable, "-c", CHILD, str(args.head_dim), str(args.seqlen),
                                    "1" if args.causal else "0"], env=env, capture_output=True, text=True,
                                   timeout=args.timeout)
            if child.returncode != 0:
                raise RuntimeError(f"the child failed ({child.returncode}):\n{child.stderr[-3000:]}")
            untraced = [line for line in child.stderr.splitlines() if line.startswith("FJB untraced backward ms")]
            untraced_ms = float(untraced[-1].split()[-1]) if untraced else float("nan")
            kernel, rows = parse(child.stderr)
            summary = summarise(rows)
        except (RuntimeError, SystemExit, subprocess.TimeoutExpired) as error:
            print(f"\n## {mode}: no trace: {error}", file=sys.stderr)
            failed.append(mode)
            continue
        report(mode, kernel, untraced_ms, summary)
        results[mode] = {"kernel": kernel, "untraced_backward_ms": untraced_ms, **summary}
        if args.json:  # after each mode: a later one's failure keeps what came before
            with open(args.json, "w") as f:
                json.dump({"head_dim": args.head_dim, "seqlen": args.seqlen, "causal": args.causal, "modes": results},
                          f, indent=1)
    if failed:
        raise SystemExit(f"no trace for {', '.join(failed)}")


if __name__ == "__main__":
    main()
