"""The fine-tuning examples (examples/finetune/) on the tiny model on the CPU: with and
without --use-flash-attention they give the same losses, which fall. Plain SGD at a high
learning rate, so that the loss falls within a few steps: rounding differences between two
attention implementations grow through such training, so the losses are compared over the
first steps and both runs must fall."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples", "finetune"))

ARGS = ["--model", "tiny", "--steps", "12", "--learning-rate", "1.0", "--optimizer", "sgd", "--seq-len", "64"]


def _check(plain, flash, tolerance):
    assert flash["flash_attention"] and not plain["flash_attention"]
    for a, b in zip(plain["history"][:3], flash["history"][:3]):
        assert a["loss"] == pytest.approx(b["loss"], rel=tolerance, abs=tolerance)
    for run in (plain, flash):
        assert run["last_loss"] < run["first_loss"] - 0.05
        assert run["tokens_per_second"] > 0 and run["peak_memory_mib"] > 0


def test_mlx_lora(tmp_path):
    pytest.importorskip("mlx_lm")
    pytest.importorskip("flashjit.mlx")
    import mlx_lora

    plain = mlx_lora.main(ARGS)
    flash = mlx_lora.main(ARGS + ["--use-flash-attention", "--profile-attention", "--json-out",
                                  str(tmp_path / "mlx.json")])
    _check(plain, flash, 2e-3)
    (row,) = flash["attention"]["rows"]
    assert row["impl"] == "flashjit" and row["calls"] == 2 and 0 < flash["attention"]["share"] < 1
    assert 0 < row["peak_share"] < 1  # its TFLOP/s over a matrix product's on the same device
    assert (tmp_path / "mlx.json").exists()
    # Each step's diagnostics: flashjit's eval_gpu calls (none on the CPU stream), memory held.
    for step in flash["history"]:
        assert step["flashjit_calls"] == 0 and step["flashjit_host_ms"] == 0 and step["mlx_active_mib"] > 0


def test_torch_lora():
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    import torch_lora

    plain = torch_lora.main(ARGS + ["--profile-attention"])
    flash = torch_lora.main(ARGS + ["--use-flash-attention", "--profile-attention"])
    _check(plain, flash, 2e-3)
    impls = {(row["impl"], row["direction"]) for row in flash["attention"]["summary"]}
    assert impls == {("flashjit", "forward"), ("flashjit", "backward")}
    rows = plain["attention"]["summary"]
    assert {(row["impl"], row["direction"]) for row in rows} == {("torch", "forward"), ("torch", "backward")}
    calls = {row["direction"]: row["calls"] for row in rows}
    assert calls == {"forward": 2, "backward": 2}  # a call a layer, each way, as flashjit's
    assert calls == {row["direction"]: row["calls"] for row in flash["attention"]["summary"]}


@pytest.mark.parametrize("seconds,warmup,expected", [
    ([9.0, 5.0, 1.0, 3.0, 2.0, 100.0], 2, 2.5),  # the median of the steps after two warm-ups
    ([9.0, 5.0, 2.0], 2, 2.0),
    ([9.0, 2.0], 1, 2.0),  # a run too short for two: one timed step is kept
    ([2.0], 0, 2.0)])
def test_tokens_per_second_leaves_out_warmups(seconds, warmup, expected):
    import argparse

    import common

    args = argparse.Namespace(model="tiny", device="cpu", dtype="float32", use_flash_attention=False, seq_len=64,
                              batch_size=2, steps=len(seconds), json_out=None)
    history = [dict(step=i + 1, loss=1.0, seconds=s, tokens_per_second=128 / s, peak_memory_mib=1.0)
               for i, s in enumerate(seconds)]
    summary = common.summarize(args, history, 0, 128, None)
    assert summary["warmup_steps"] == warmup and summary["timed_steps"] == len(seconds) - warmup
    assert summary["step_seconds"] == expected and summary["tokens_per_second"] == 128 / expected
