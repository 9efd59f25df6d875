"""scripts/ncu_stalls.py on a small made-up source page: the sections it prints and their sums."""

from __future__ import annotations

import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "ncu_stalls.py"

HEADER = ('"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)",'
          '"Instructions Executed"')


def page(rows: list[tuple[str, str, int, int]]) -> str:
    lines = ['"Kernel Name","fj_example",', HEADER]
    lines += [f'"{address}","      {source}","{samples}","0","{executed}"' for address, source, samples, executed in rows]
    return "\n".join(lines) + "\n"


def test_groups_by_execution_count_and_opcode(tmp_path):
    # A "loop body" of three instructions run 1000 times, an epilogue of two run 10 times.
    rows = [("0x10", "HGMMA.64x32x16.F32.BF16 R152, gdesc[UR16], RZ, !UPT", 30, 1000),
            ("0x20", "FENCE.VIEW.ASYNC.S", 50, 1000),
            ("0x30", "@!P0  BRA 0x10", 10, 1000),
            ("0x40", "STG.E [R2.64], R4", 7, 10),
            ("0x50", "EXIT", 3, 10)]
    path = tmp_path / "page.csv"
    path.write_text(page(rows))
    out = subprocess.run([sys.executable, str(SCRIPT), str(path), "--top", "3"], capture_output=True, text=True,
                         check=True).stdout
    assert "== Kernel Name fj_example: 5 instructions, 100 samples" in out
    assert "FENCE.VIEW" in out.split("-- samples by opcode")[1].splitlines()[1]  # the most sampled opcode
    assert "3020 in all" in out  # warp instructions executed: 3 x 1000 + 2 x 10
    groups = out.split("-- instructions by execution count")[1].splitlines()
    assert "1000 times:     3 instructions,       90 samples (90.0%)" in groups[1]
    assert "10 times:     2 instructions,       10 samples (10.0%)" in groups[2]


def test_a_page_without_a_source_table_fails(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text('"==ERROR== Could not open report file"\n')
    result = subprocess.run([sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "no table with a Source column" in result.stdout
