"""bench/gpu_attention.py's helpers on made-up rows (no GPU): the work tile's fixed cost of its
records, and the switches a column may set."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
gpu_attention = pytest.importorskip("gpu_attention")

pytestmark = pytest.mark.cpu_only


def test_tile_cost_inverts_the_model():
    for x in (0.0, 0.5, 1.45, 3.6):
        for s1, s2 in ((8.0, 128.0), (4.5, 64.5)):
            r = (s1 / (x + s1)) / (s2 / (x + s2))
            assert gpu_attention.tile_cost(r, s1, s2) == pytest.approx(x, abs=1e-9)
    assert math.isnan(gpu_attention.tile_cost(float("nan"), 8, 128))
    assert math.isnan(gpu_attention.tile_cost(0.05, 8, 128))  # below the model's range


def test_tile_cost_lines_from_the_forward_rows():
    def row(d, n, causal, ours, cudnn):
        return {"D": d, "N": n, "causal": causal, "tflops": {"flashjit": (ours, 0.0), "cuDNN": (cudnn, 0.0)}}
    rows = [row(64, 1024, True, 280, 343), row(64, 16384, True, 476, 435), row(64, 4096, True, 434, 408),
            row(128, 1024, False, 548, 603)]  # no 16k row for D128: no line
    lines = gpu_attention.tile_cost_lines(rows, ["flashjit", "cuDNN"])
    assert lines[-1] == "| 64 | yes | 3.57 | 1.32 |"  # the twenty-fourth session's NOTES figures
    assert sum(line.startswith("| 64") or line.startswith("| 128") for line in lines) == 1
    assert gpu_attention.tile_cost_lines(rows[2:], ["flashjit"]) == []


def test_a_column_with_a_switch_outside_the_list_is_refused():
    with pytest.raises(ValueError, match="not in SWITCHES"):
        gpu_attention.Impl("flashjit[x]", None, env={"FLASHJIT_CUDA_SOMETHING": "1"})
    assert "FLASHJIT_CUDA_DKDV_PARTS" in gpu_attention.SWITCHES


# Each one-pass column and the switches it runs with (FLASHJIT_CUDA_BACKWARD=one-pass besides).
ONE_PASS_COLUMNS = {
    "one-pass:whole": {"FLASHJIT_CUDA_ONE_PASS_STEPS": "whole"},
    "one-pass:writer-diagonal+whole": {"FLASHJIT_CUDA_ONE_PASS_STEPS": "whole",
                                       "FLASHJIT_CUDA_ONE_PASS_DQ": "writer-diagonal"},
    "one-pass:atomic+whole": {"FLASHJIT_CUDA_ONE_PASS_STEPS": "whole", "FLASHJIT_CUDA_ONE_PASS_DQ": "atomic"},
    "one-pass:writer-pair": {"FLASHJIT_CUDA_ONE_PASS_DQ": "writer-pair"},
    "one-pass:whole-concurrent": {"FLASHJIT_CUDA_ONE_PASS_STEPS": "whole-concurrent"},
    "one-pass:atomic+whole-concurrent": {"FLASHJIT_CUDA_ONE_PASS_STEPS": "whole-concurrent",
                                         "FLASHJIT_CUDA_ONE_PASS_DQ": "atomic"},
    "one-pass:budget": {"FLASHJIT_CUDA_ONE_PASS_SUMS_MIB": "32"},
    "one-pass:whole+budget": {"FLASHJIT_CUDA_ONE_PASS_STEPS": "whole", "FLASHJIT_CUDA_ONE_PASS_SUMS_MIB": "32"},
}


def test_one_pass_columns_set_their_switches():
    impls = {impl.name: impl.env
             for impl in gpu_attention.implementations(["default"], backward_modes=list(ONE_PASS_COLUMNS))}
    for mode, switches in ONE_PASS_COLUMNS.items():
        assert impls[f"flashjit[{mode}]"] == {"FLASHJIT_CUDA_BACKWARD": "one-pass", **switches}, mode


def test_backward_kernels_runs_on_the_cpu_and_refuses_bad_shapes(tmp_path, capsys):
    # bench/backward_kernels.py's steps on the CPU (host ops for kernels): a record with a section
    # a problem and flashjit's table; a shape whose heads do not group is an error naming --shapes.
    backward_kernels = pytest.importorskip("backward_kernels")
    assert backward_kernels.main(["--device", "cpu", "--shapes", "1:4:2:64:32:causal", "--steps", "2",
                                  "--out", str(tmp_path)]) == 0
    (record,) = tmp_path.iterdir()
    text = record.read_text()
    assert "## B1 4/2 N64 D32 causal" in text and "**flashjit**:" in text and "| kernel |" in text
    assert "backward-kernels" in record.name
    with pytest.raises(SystemExit):
        backward_kernels.main(["--device", "cpu", "--shapes", "1:3:2:64:32"])
    assert "--shapes" in capsys.readouterr().err
