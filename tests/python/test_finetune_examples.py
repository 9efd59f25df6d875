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
    assert (tmp_path / "mlx.json").exists()


def test_torch_lora():
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    import torch_lora

    plain = torch_lora.main(ARGS + ["--profile-attention"])
    flash = torch_lora.main(ARGS + ["--use-flash-attention", "--profile-attention"])
    _check(plain, flash, 2e-3)
    impls = {(row["impl"], row["direction"]) for row in flash["attention"]["summary"]}
    assert impls == {("flashjit", "forward"), ("flashjit", "backward")}
    assert {row["impl"] for row in plain["attention"]["summary"]} == {"torch"}
