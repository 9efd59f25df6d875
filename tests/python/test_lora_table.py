"""bench/lora_table.py's attention figures on made-up summaries: time by direction, and a
speedup only over the directions both runs recorded."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))

import lora_table  # noqa: E402

pytestmark = pytest.mark.cpu_only


def _torch_run(forward_ms, backward_ms=None, tokens=1000.0, peak=100.0):
    rows = [dict(direction="forward", impl="torch", ms=forward_ms, flops=1e9)]
    if backward_ms is not None:
        rows.append(dict(direction="backward", impl="torch", ms=backward_ms, flops=2.5e9))
    total = forward_ms + (backward_ms or 0.0)
    return dict(tokens_per_second=tokens, peak_memory_mib=peak,
                attention=dict(attention_ms=total, attention_share=total / 100.0, summary=rows))


def test_speedup_over_the_directions_both_recorded():
    framework, flashjit = _torch_run(3.0, 6.0), _torch_run(2.0, 1.0, peak=70.0)
    assert lora_table.attention_by_direction(framework) == {"forward": 3.0, "backward": 6.0}
    speedup, common = lora_table.attention_speedup(lora_table.attention_by_direction(framework),
                                                   lora_table.attention_by_direction(flashjit))
    assert speedup == pytest.approx(3.0) and common == ["forward", "backward"]
    row = lora_table.table_row(dict(model="tiny", seq_len=64, plain=framework, flash=flashjit),
                               ["forward", "backward"])
    assert row[7:13] == ["3.0 / 2.0", "6.0 / 1.0", "3.00x", "1", "–", "yes"] and row[13] == "yes"


def test_a_run_without_backward_records_compares_forward_only():
    """A framework run that recorded only its forward is not set against flashjit's
    forward and backward: the speedup is the forward's, and says so."""
    framework, flashjit = _torch_run(3.0), _torch_run(2.0, 10.0)
    row = lora_table.table_row(dict(model="tiny", seq_len=64, plain=framework, flash=flashjit),
                               ["forward", "backward"])
    assert row[7:10] == ["3.0 / 2.0", "– / 10.0", "1.50x (forward only)"] and row[12] == "no"


def test_no_shared_direction_gives_no_ratio():
    mlx_rows = dict(tokens_per_second=1.0, peak_memory_mib=1.0,
                    attention=dict(attention_ms=4.0, share=0.1, rows=[dict(impl="mx.fast", ms=4.0, tflops=1.0)]))
    assert lora_table.attention_by_direction(mlx_rows) == {"forward+backward": 4.0}
    speedup, common = lora_table.attention_speedup(lora_table.attention_by_direction(mlx_rows),
                                                   lora_table.attention_by_direction(_torch_run(2.0, 1.0)))
    assert math.isnan(speedup) and common == []
    row = lora_table.table_row(dict(model="tiny", seq_len=64, plain=mlx_rows, flash=_torch_run(2.0, 1.0)),
                               ["forward", "backward", "forward+backward"])
    assert row[7:11] == ["– / 2.0", "– / 1.0", "4.0 / –", "–"] and row[13] == "–"


def test_an_error_row_has_every_column():
    row = lora_table.table_row(dict(model="tiny", seq_len=64, plain=dict(error="timed out"), flash=_torch_run(1.0)),
                               ["forward", "backward"])
    assert len(row) == 14 and row[2:4] == ["timed out", "ok"]


def test_attention_share_is_of_the_median_step():
    """The share is attention's ms over the steady steps' median (step_seconds), not over the
    profiled step (which carries the profiler's own work); without step_seconds, the profile's."""
    run = _torch_run(3.0, 6.0)
    assert lora_table.attention_figures(run)[1] == pytest.approx(9.0 / 100.0)
    run["step_seconds"] = 0.030
    ms, share, _, _ = lora_table.attention_figures(run)
    assert ms == 9.0 and share == pytest.approx(9.0 / 30.0)
