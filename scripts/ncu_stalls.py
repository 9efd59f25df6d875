"""Where a kernel's warps wait, from Nsight Compute's per-instruction samples.

Reads the CSV of `ncu --import R.ncu-rep --page source --csv --print-source sass` (one table per
profiled kernel) and prints, per kernel: the sampled total, the instructions with the most samples
(with the stall reasons the CSV breaks them into, where it does), the samples by opcode, the warp
instructions executed by opcode and the instructions grouped by how often they ran (a loop body's
instructions a pass; where the CSV has the counts), and the hottest stretches of 24
consecutive instructions, so that a wait can be read in its context.

    python scripts/ncu_stalls.py SASS.csv[.gz] [--top 30]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import re
import sys


def tables(text: str):
    """(title, header, rows) for each table in the CSV: a header row names the Source column."""
    title, header, rows = "", None, []
    for row in csv.reader(io.StringIO(text)):
        if not row:
            continue
        if any(cell.strip() == "Source" for cell in row):
            if header is not None and rows:
                yield title, header, rows
            header, rows = [cell.strip() for cell in row], []
        elif header is None or len(row) != len(header):
            if header is not None and rows:
                yield title, header, rows
                header, rows = None, []
            title = " ".join(cell for cell in row if cell).strip() or title
        else:
            rows.append(row)
    if header is not None and rows:
        yield title, header, rows


def number(cell: str) -> float:
    try:
        return float(cell.replace(",", ""))
    except ValueError:
        return 0.0


def opcode(source: str) -> str:
    match = re.match(r"\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)?)", source)
    return match.group(1) if match else "?"


def summarise(title: str, header: list[str], rows: list[list[str]], top: int) -> None:
    column = {name: i for i, name in enumerate(header)}
    source = column["Source"]
    address = next((i for name, i in column.items() if "Address" in name), None)
    samples = next((i for name, i in column.items() if name.startswith("Warp Stall Sampling (All")), None)
    if samples is None:
        print(f"{title}: no 'Warp Stall Sampling (All Samples)' column; columns: {header}")
        return
    # Per-reason columns, where the CSV has them (stall_* metrics or '... Stall ...' names).
    reasons = [i for name, i in column.items()
               if i not in (samples,) and ("stall" in name.lower() and "Sampling" not in name)]
    values = [number(row[samples]) for row in rows]
    total = sum(values) or 1.0
    print(f"== {title or 'kernel'}: {len(rows)} instructions, {total:.0f} samples")
    print(f"-- top {top} instructions (samples, % of the kernel's)")
    order = sorted(range(len(rows)), key=lambda i: -values[i])[:top]
    for i in order:
        where = rows[i][address] if address is not None else str(i)
        detail = ""
        if reasons:
            parts = sorted(((number(rows[i][r]), header[r]) for r in reasons), reverse=True)[:3]
            detail = "  [" + ", ".join(f"{name} {value:.0f}" for value, name in parts if value) + "]"
        print(f"{values[i]:8.0f} {100 * values[i] / total:5.1f}%  {where:>6}  {rows[i][source].strip()[:70]}{detail}")
    print("-- samples by opcode")
    by_opcode: dict[str, float] = {}
    for row, value in zip(rows, values):
        key = opcode(row[source])
        by_opcode[key] = by_opcode.get(key, 0.0) + value
    for key, value in sorted(by_opcode.items(), key=lambda kv: -kv[1])[:20]:
        print(f"{value:8.0f} {100 * value / total:5.1f}%  {key}")
    # What the warps executed, by opcode (the SourceCounters section's per-instruction counts):
    # comparable between two kernels of the same problem, e.g. flashjit's and a peer's.
    executed = column.get("Instructions Executed")
    if executed is not None:
        counts: dict[str, float] = {}
        for row in rows:
            key = opcode(row[source]).split(".")[0]
            counts[key] = counts.get(key, 0.0) + number(row[executed])
        everything = sum(counts.values()) or 1.0
        print(f"-- warp instructions executed by opcode: {everything:.0f} in all")
        for key, value in sorted(counts.items(), key=lambda kv: -kv[1])[:30]:
            print(f"{value:12.0f} {100 * value / everything:5.1f}%  {key}")
        # Instructions that ran the same number of times: the straight-line stretches of one loop
        # body share a count (e.g. blocks x warps x steps), so a group's size is that body's
        # instructions a pass and its samples the share of the time spent there.
        groups: dict[float, list[float]] = {}
        for row, value in zip(rows, values):
            group = groups.setdefault(number(row[executed]), [0, 0.0])
            group[0] += 1
            group[1] += value
        print("-- instructions by execution count (the 8 groups with the most samples)")
        for count, (size, value) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:8]:
            print(f"{count:12.0f} times: {size:5d} instructions, {value:8.0f} samples ({100 * value / total:4.1f}%)")
    window = 24
    print(f"-- hottest stretches of {window} instructions")
    sums = [sum(values[i:i + window]) for i in range(max(1, len(values) - window + 1))]
    taken: list[int] = []
    for start in sorted(range(len(sums)), key=lambda i: -sums[i]):
        if all(abs(start - other) >= window for other in taken):
            taken.append(start)
        if len(taken) == 4:
            break
    for start in taken:
        print(f"   stretch at {rows[start][address] if address is not None else start}: "
              f"{sums[start]:.0f} samples ({100 * sums[start] / total:.1f}%)")
        for i in range(start, min(start + window, len(rows))):
            print(f"   {values[i]:7.0f}  {rows[i][source].strip()[:90]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", help="ncu --page source --csv --print-source sass output (.csv or .csv.gz)")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    opener = gzip.open if args.csv.endswith(".gz") else open
    with opener(args.csv, "rt", errors="replace") as handle:
        text = handle.read()
    found = False
    for title, header, rows in tables(text):
        found = True
        summarise(title, header, rows, args.top)
    if not found:
        print(f"{args.csv}: no table with a Source column (first line: {text.splitlines()[:1]})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
