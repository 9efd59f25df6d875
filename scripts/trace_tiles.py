"""Where a work tile's time goes in the sm_90a forward, from the kernel's own clock (a diagnostic
for a GPU machine; FLASHJIT_CUDA_TRACE=1, attention_hopper.cuh's TileTrace).

Runs one forward of the benchmark's grid (bf16, B*N = 16k tokens, H = 2048 / D) once untraced
to compile and warm, then twice traced in a child process (the traced kernel prints to stderr
after the launch; the second launch is read), and reports per traced consumer warpgroup and
work tile: the wait for the producer's push, for Q, for K_0, the steps (K_0 to the last P V),
and the output; a fit of the steps' time against their count (cycles a step, cycles a tile
beyond them); and for the producer the tile counter's round trip and how early each tile's K_0
was issued against the consumers' finishing the tile before.

    python scripts/trace_tiles.py --head-dim 128 --seqlen 1024 [--causal] [--tiles T] [--json F]
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
q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))  # [B, H, N, D]
for _ in range(3):
    flashjit.attention(q, k, v, causal=causal)
torch.cuda.synchronize()
os.environ["FLASHJIT_CUDA_TRACE"] = "1"
for _ in range(2):
    flashjit.attention(q, k, v, causal=causal)
torch.cuda.synchronize()
"""

POINTS = ("pop", "popped", "q", "k0", "steps_done", "output")


def parse(text):
    """The last traced launch's rows: {(block, slot): {tile: (steps, [six points])}}."""
    runs = text.split("FJT kernel ")
    if len(runs) < 2:
        raise SystemExit("no trace in the child's output:\n" + text[-2000:])
    header, *lines = runs[-1].splitlines()
    rows = {}
    for line in lines:
        if not line.startswith("FJT "):
            continue
        block, slot, tile, steps, *points = (int(x) for x in line.split()[1:])
        rows.setdefault((block, slot), {})[tile] = (steps, points)
    return header, rows


def fit(pairs):
    """Least-squares slope and intercept of y over x."""
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return float("nan"), my
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def summarise(rows):
    consumer, producer, periods = [], {}, []
    for (block, slot), tiles in rows.items():
        if slot == 0:
            producer[block] = tiles
            continue
        for tile, (steps, p) in sorted(tiles.items()):
            after = tiles.get(tile + 1)
            # From this tile's pop to the next one's: the whole tile, also where its output is
            # written during the next tile's first step (FLASHJIT_CUDA_TILES chain=tiles).
            if tile > 0 and p[0] and after and after[1][0]:
                periods.append((steps, after[1][0] - p[0]))
            if tile == 0 or min(p) == 0:  # the first tile waits for the kernel's start; skip it
                continue
            consumer.append(dict(block=block, slot=slot, tile=tile, steps=steps, pop_wait=p[1] - p[0],
                                 q_wait=p[2] - p[1], k0_wait=p[3] - p[2], steps_time=p[4] - p[3],
                                 output=p[5] - p[4], total=p[5] - p[0]))
    report = {}
    for key in ("pop_wait", "q_wait", "k0_wait", "steps_time", "output", "total"):
        values = [row[key] for row in consumer]
        report[key] = (statistics.median(values), statistics.fmean(values)) if values else (float("nan"),) * 2
    slope, intercept = fit([(row["steps"], row["steps_time"]) for row in consumer])
    total_slope, total_intercept = fit([(row["steps"], row["total"]) for row in consumer])
    period_slope, period_intercept = fit(periods) if periods else (float("nan"), float("nan"))
    # The producer's tile counter round trip, and K_0 of tile n + 1 issued against the consumers'
    # last P V of tile n (negative: issued before they finished).
    atomic, lead = [], []
    for block, tiles in producer.items():
        for tile, (_, p) in tiles.items():
            if p[3] and p[4]:
                atomic.append(p[4] - p[3])
            after = tiles.get(tile + 1)
            # The consumers that computed the tile (a warpgroup past the queries leaves its points 0).
            done = [rows[(block, s)][tile][1][4] for s in range(1, 4) if tile in rows.get((block, s), {})]
            done = [x for x in done if x]
            if after and after[1][2] and done:
                lead.append(after[1][2] - max(done))
    return dict(tiles=len(consumer), medians_means=report, step_cycles=slope, steps_intercept=intercept,
                tile_cycles_per_step=total_slope, tile_fixed_cycles=total_intercept,
                period_cycles_per_step=period_slope, period_fixed_cycles=period_intercept,
                atomic_median=statistics.median(atomic) if atomic else float("nan"),
                k0_lead_median=statistics.median(lead) if lead else float("nan"),
                k0_late_share=sum(x > 0 for x in lead) / len(lead) if lead else float("nan"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--tiles", default=None, help="FLASHJIT_CUDA_TILES for the run")
    parser.add_argument("--json", default=None, help="also write the summary and the rows here")
    args = parser.parse_args()
    env = dict(os.environ)
    env.pop("FLASHJIT_CUDA_TRACE", None)
    if args.tiles:
        env["FLASHJIT_CUDA_TILES"] = args.tiles
    child = subprocess.run([sys.executable, "-c", CHILD, str(args.head_dim), str(args.seqlen),
                            "1" if args.causal else "0"], env=env, capture_output=True, text=True, timeout=600)
    if child.returncode != 0:
        raise SystemExit(child.stderr[-3000:])
    header, rows = parse(child.stderr)
    s = summarise(rows)
    print(f"kernel {header}")
    print(f"D {args.head_dim} N {args.seqlen} causal {args.causal} tiles {args.tiles or 'default'}: "
          f"{s['tiles']} traced consumer tiles (the first of each left out), SM cycles")
    print("| part | median | mean |")
    print("|---|---:|---:|")
    names = dict(pop_wait="wait for the tile (pop)", q_wait="wait for Q", k0_wait="wait for K_0",
                 steps_time="steps (K_0 to the last P V)", output="idle turns and the output", total="whole tile")
    for key, (median, mean) in s["medians_means"].items():
        print(f"| {names[key]} | {median:.0f} | {mean:.0f} |")
    print(f"fit of the steps' time: {s['step_cycles']:.0f} cycles a step + {s['steps_intercept']:.0f} a tile")
    print(f"fit of the whole tile: {s['tile_cycles_per_step']:.0f} cycles a step + {s['tile_fixed_cycles']:.0f} a tile")
    print(f"fit of pop to next pop: {s['period_cycles_per_step']:.0f} cycles a step + "
          f"{s['period_fixed_cycles']:.0f} a tile (with chain=tiles a tile's output falls in the next tile's)")
    print(f"producer: tile counter round trip {s['atomic_median']:.0f} cycles (median); next tile's K_0 issued "
          f"{s['k0_lead_median']:.0f} cycles after the consumers' last P V (median; negative: before), late in "
          f"{100 * s['k0_late_share']:.0f}% of tiles")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(dict(args=vars(args), header=header, summary=s,
                           rows={f"{b}:{slot}": tiles for (b, slot), tiles in rows.items()}), out)


if __name__ == "__main__":
    main()
