"""scripts/trace_backward.py on a made-up trace of the one pass's dK/dV kernel: which launch it reads,
each part of a step and of a writer's tile in microseconds, and the figures by key block."""

from __future__ import annotations

import importlib.util
import math
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "trace_backward.py"
spec = importlib.util.spec_from_file_location("trace_backward", SCRIPT)
trace_backward = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trace_backward)

GHZ = 2.0  # cycles a nanosecond
CONSUMER_CYCLES = (200, 1600, 400, 2000, 600, 1000)  # the six parts of a step, later steps
WRITER_CYCLES = (3000, 100, 400, 1400, 60)


BEFORE, AFTER = 3000, 2000  # cycles before the first step (K, V) and after the last (dK, dV stored)


def made_up_trace(heads=2, key_blocks=4, tiles=20):
    """Blocks of `heads` heads, each key block starting 1 us after the one below; the first step's
    dQ staging 4000 cycles longer, the first tile's count wait 1000 cycles a key block. Lines in
    the host's order (block, slot, row), after another kernel's launch."""
    rows = []
    for block in range(heads * key_blocks):
        head, key_block = divmod(block, key_blocks)
        start_ns, clock0 = 10_000 + 1000 * key_block, 7_000_000 + 12_345 * block
        for slot in (1, 2):
            clock = clock0 + BEFORE
            for t in range(tiles):
                points = [clock]
                for i, cycles in enumerate(CONSUMER_CYCLES):
                    points.append(points[-1] + cycles + (4000 if t == 0 and i == 4 else 0))
                rows.append((block, slot, t, [0] + points))
                clock = points[-1]
            clock += AFTER
            end_ns = start_ns + round((clock - clock0) / GHZ)
            rows.append((block, slot, 64, [key_block, 0, head, tiles, start_ns, end_ns, clock0, clock]))
        clock = clock0
        for t in range(tiles):
            points = [clock]
            for i, cycles in enumerate(WRITER_CYCLES):
                points.append(points[-1] + cycles + (1000 * key_block if t == 0 and i == 1 else 0))
            rows.append((block, 0, t, [0] + points + [key_block]))
            clock = points[-1]
        rows.append((block, 0, 64, [key_block, 0, 0, tiles, start_ns, start_ns + 1, clock0, clock]))
    rows.sort(key=lambda row: row[:3])
    lines = ["FJT kernel hopper-forward_other_trace blocks 9", "FJT 0 1 0 1 2 3 4 5 6 7",  # another kernel's
             f"FJT kernel hopper-backward_dkdv_made_up_trace blocks {heads * key_blocks}"]
    lines += [f"FJT {block} {slot} {row} " + " ".join(map(str, fields)) for block, slot, row, fields in rows]
    return "child's noise\n" + "\n".join(lines) + "\nmore noise\n"


def test_reads_the_last_dkdv_launch_and_times_each_part():
    tiles = 20
    kernel, rows = trace_backward.parse(made_up_trace(tiles=tiles))
    assert kernel == "hopper-backward_dkdv_made_up_trace"
    summary = trace_backward.summarise(rows)
    assert math.isclose(summary["clock_ghz"], GHZ, rel_tol=1e-3)
    assert summary["blocks"] == 8
    us = lambda cycles: cycles / GHZ / 1000
    for part, cycles in zip(trace_backward.CONSUMER_PARTS, CONSUMER_CYCLES):
        early, late, count = summary["consumer"][part]
        assert math.isclose(late, us(cycles), rel_tol=1e-6), part
        assert count == 8 * 2 * (tiles - 2)  # blocks x consumers x steps after the first two
        extra = 4000 / 2 if part == "dQ staged/added" else 0  # the first step's, over two steps
        assert math.isclose(early, us(cycles + extra), rel_tol=1e-6), part
    assert math.isclose(summary["consumer"]["step"][1], us(sum(CONSUMER_CYCLES)), rel_tol=1e-6)
    assert math.isclose(summary["edges"]["before steps"], us(BEFORE), rel_tol=1e-6)
    assert math.isclose(summary["edges"]["after steps"], us(AFTER), rel_tol=1e-6)
    for part, cycles in zip(trace_backward.WRITER_PARTS, WRITER_CYCLES):
        assert math.isclose(summary["writer"][part][1], us(cycles), rel_tol=1e-6), part
    by_key = summary["by_key_block"]
    assert sorted(by_key) == [0, 1, 2, 3]
    block_us = us(BEFORE + AFTER + tiles * sum(CONSUMER_CYCLES) + 4000)
    for key_block, entry in by_key.items():
        assert math.isclose(entry["start_us"], key_block * 1.0, abs_tol=1e-9)
        assert math.isclose(entry["counts_us"], us(WRITER_CYCLES[1] + 1000 * key_block), rel_tol=1e-6)
        assert math.isclose(entry["staged_us"], us(tiles * CONSUMER_CYCLES[4] + 4000), rel_tol=1e-6)
        assert math.isclose(entry["block_us"], block_us, abs_tol=1e-3)
    assert math.isclose(summary["traced_block_us"], block_us, abs_tol=1e-3)
    assert math.isclose(summary["traced_span_us"], 3.0 + block_us, abs_tol=1e-3)
    trace_backward.report("writer-pair", kernel, 1.0, summary)  # prints without error


def test_no_dkdv_launch_is_an_error():
    try:
        trace_backward.parse("FJT kernel hopper-forward_trace blocks 1\nFJT 0 1 0 1 2 3 4 5 6 7\n")
    except SystemExit as error:
        assert "no dK/dV trace" in str(error)
    else:
        raise AssertionError("parse accepted a trace without the dK/dV kernel")
