"""The one-pass sm_90a backward in whole steps (FLASHJIT_CUDA_ONE_PASS_STEPS=whole): at head dim
128 a step of 64 queries (32 with a mask, dropout or softcap) whose products take two turns of
their own; and the same steps with no turns between the consumers (whole-concurrent). Gradients against the float64 reference, bitwise equal across runs (but for dQ of the
atomic adds), dQ the same bits as the carried steps' (the same products and the same order of adds;
dK and dV add the queries in another order), and the plan really compiles the whole-step kernel.
Runs on an sm_90 GPU; skipped elsewhere."""

import pathlib

import pytest
import torch

import flashjit
from conftest import DEVICE
from test_attention import run
from test_one_pass_backward import assert_gradients_close, repeated_backwards
import test_varlen

sm90 = pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available()
                          or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm_90 GPU")
pytestmark = sm90


# Whole steps in turns (whole) and with no turns between the consumers (whole-concurrent).
@pytest.fixture(autouse=True, params=["whole", "whole-concurrent"])
def steps(monkeypatch, request):
    monkeypatch.setenv("FLASHJIT_CUDA_ONE_PASS_STEPS", request.param)
    return request.param


# The dQ sums whole steps take: the two writer threads in block order (the default) and in the
# diagonal order, one writer thread, and every visitor's adds at once (atomic).
@pytest.fixture(autouse=True, params=["writer-pair", "writer-diagonal", "writer", "atomic"])
def whole_steps(monkeypatch, request, steps):
    monkeypatch.setenv("FLASHJIT_CUDA_BACKWARD", "one-pass")
    monkeypatch.setenv("FLASHJIT_CUDA_ONE_PASS_DQ", request.param)
    return request.param


@pytest.mark.parametrize("case", [
    dict(),
    dict(causal="top_left"),
    dict(causal="bottom_right", Sq=300, Sk=700),
    dict(causal="bottom_right", Sq=700, Sk=300),  # the first 400 rows see no key
    dict(window=(40, 90), Sq=500, Sk=450),
    dict(Hq=8, Hkv=2, causal="top_left"),
    dict(mask="bool", dropout_p=0.2, softcap=5.0, scale=0.3),  # 32 queries a step
    dict(Dv=64, causal="top_left"),
    dict(causal="top_left", Sq=100, Sk=1000),  # key blocks no query sees walk nothing
    dict(D=96),  # padded to 128
], ids=lambda case: ",".join(f"{key}={value}" for key, value in case.items()) or "plain")
def test_gradients_match_the_reference(case):
    case = dict(case)
    Sq, Sk = case.pop("Sq", 520), case.pop("Sk", 650)  # several key blocks, partial tiles at the ends
    if case.get("mask") == "bool":
        case["mask"] = torch.rand(1, 2, Sq, Sk) > 0.2
    Hq, Hkv = case.pop("Hq", 2), case.pop("Hkv", 1)
    run(B=2, Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, D=case.pop("D", 128), dtype=torch.bfloat16, **case)


def test_the_whole_step_kernel_is_what_runs(tmp_path, monkeypatch, steps):
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(tmp_path))
    flashjit.cuda.clear_memory_cache()
    q = torch.randn(1, 2, 300, 128, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    flashjit.attention(q, q, q, causal=True).sum().backward()
    names = [path.name for path in pathlib.Path(tmp_path).rglob("*") if path.is_file()]
    assert any(f"_one-pass_{steps}_" in name and "_n64_" in name for name in names), names
    monkeypatch.setenv("FLASHJIT_CUDA_ONE_PASS_STEPS", "carried")
    flashjit.cuda.clear_memory_cache()
    flashjit.attention(q, q, q, causal=True).sum().backward()
    names = [path.name for path in pathlib.Path(tmp_path).rglob("*") if path.is_file()]
    assert any("_one-pass_" in name and "_whole_" not in name and "backward_dkdv" in name for name in names), names


@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_bitwise_reproducible_and_dq_as_the_carried_steps(causal, monkeypatch, whole_steps):
    (q, k, v, o, lse, dout), first = repeated_backwards(causal, whole_steps == "atomic")
    monkeypatch.setenv("FLASHJIT_CUDA_ONE_PASS_STEPS", "carried")
    carried = flashjit.attention_backward(q, k, v, o, lse, dout, causal=causal)
    if whole_steps != "atomic":
        assert torch.equal(first[0], carried[0])  # dQ: each block's share and the adds' order are the same
    assert_gradients_close(first, carried, 0.01)
    monkeypatch.setenv("FLASHJIT_CUDA_BACKWARD", "split")
    assert_gradients_close(first, flashjit.attention_backward(q, k, v, o, lse, dout, causal=causal), 0.02)


@pytest.mark.parametrize("options", [dict(causal=True), dict(dropout_p=0.25, seed=11, offset=3)])
def test_variable_length_batch_in_one_launch(options, monkeypatch):
    # Every sequence's key blocks in one grid, each against float64 alone (a sequence without keys
    # and one without queries among them).
    test_varlen.test_matches_each_sequence_alone(torch.bfloat16, options, 128, 128, "one", monkeypatch)
