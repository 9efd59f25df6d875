"""The one-pass sm_90a backward (FLASHJIT_CUDA_BACKWARD=one-pass): the dK/dV kernel also forms
dQ, summing each query tile's dQ over the key blocks in float32 in a fixed order. Gradients
against the float64 reference for every feature, dQ rows written even where no key block sees
them (outputs poisoned first), bitwise equal across runs (but for dQ of the atomic adds), and the
plan really is the one-pass one (its workspace holds the float32 dQ sums). Runs on an sm_90 GPU;
skipped elsewhere."""

import os

import pytest
import torch

import flashjit
from flashjit import _C
from conftest import DEVICE
from test_attention import run
import test_varlen

sm90 = pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available()
                          or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm_90 GPU")
pytestmark = sm90


# Each test with the counts of the ordered sums released at the block's next add (ordered, the
# default), right after the adds (eager, FLASHJIT_CUDA_ONE_PASS_DQ=eager), the eager order's adds
# made by the dQ writer's bulk copies from shared memory (writer; writer-eager: each count released
# before the next tile's wait), and with the adds in the order the blocks reach each tile (arrival:
# its own fixed order, so its own bits; writer-arrival: by the writer), and with a tile's visitors
# summing in four groups by rank (writer-groups: its own fixed order too); the block order's sums
# by two writer threads taking alternate tiles (writer-pair), and by them with each block's tiles
# walked upward and a tile's visitors adding from the highest block down (writer-diagonal: its own
# fixed order, so its own bits); and with every visitor adding at once in no order (atomic: not
# deterministic, so not compared bit for bit).
@pytest.fixture(autouse=True, params=["ordered", "eager", "writer", "writer-eager", "arrival", "writer-arrival",
                                      "writer-groups", "atomic", "writer-pair", "writer-diagonal"])
def one_pass(monkeypatch, request):
    monkeypatch.setenv("FLASHJIT_CUDA_BACKWARD", "one-pass")
    monkeypatch.setenv("FLASHJIT_CUDA_ONE_PASS_DQ", request.param)


def options(causal=0, window_left=-1, window_right=-1, dropout_p=0.0, seed=0):
    if causal:
        window_right = 0
    return dict(mask=None, scale=None, softcap=0.0, causal=causal, window_left=window_left,
                window_right=window_right, dropout_p=dropout_p, seed=seed, offset=0, num_threads=0)


def poisoned_backward(q, k, v, dout, **kw):
    """_C.forward then _C.backward into NaN-filled gradients; returns (workspace bytes, dq, dk, dv)."""
    B, Hq, Sq, _ = q.shape
    o = torch.full((B, Hq, Sq, v.shape[-1]), float("nan"), device=DEVICE, dtype=q.dtype)
    lse = torch.full((B, Hq, Sq), float("nan"), device=DEVICE, dtype=torch.float32)
    stream = torch.cuda.current_stream().cuda_stream
    _C.forward(q, k, v, o, lse, stream=stream, **kw)
    grads = [torch.full_like(x, float("nan")) for x in (q, k, v)]
    size = _C.backward(q, k, v, o, lse, dout, *grads, prepare=True, stream=stream, **kw)
    _C.backward(q, k, v, o, lse, dout, *grads, stream=stream, **kw)
    torch.cuda.synchronize()
    return size, grads


def plan_is_one_pass(B, Hq, Hkv, Sq, Sk, D, Dv):
    """Whether the backward of these shapes (bf16) plans the one pass: its workspace holds dQ's
    float32 sums, at least 4 bytes a query row a head dim (the split plan's: 8 bytes a row)."""
    q = torch.empty(B, Hq, Sq, D, device=DEVICE, dtype=torch.bfloat16)
    k = torch.empty(B, Hkv, Sk, D, device=DEVICE, dtype=torch.bfloat16)
    v = torch.empty(B, Hkv, Sk, Dv, device=DEVICE, dtype=torch.bfloat16)
    o = torch.empty(B, Hq, Sq, Dv, device=DEVICE, dtype=torch.bfloat16)
    lse = torch.empty(B, Hq, Sq, device=DEVICE)
    size = _C.backward(q, k, v, o, lse, torch.empty_like(o), torch.empty_like(q), torch.empty_like(k),
                       torch.empty_like(v), prepare=True, stream=torch.cuda.current_stream().cuda_stream, **options())
    return size >= 4 * B * Hq * Sq * D


def workspace_bytes(q, k, v, o, lse, dout):
    """The workspace the backward of these tensors asks for (options())."""
    return _C.backward(q, k, v, o, lse, dout, torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                       prepare=True, stream=torch.cuda.current_stream().cuda_stream, **options())


@pytest.mark.parametrize("D", [64, 96, 128])
@pytest.mark.parametrize("case", [
    dict(),
    dict(causal="top_left"),
    dict(causal="bottom_right", Sq=300, Sk=700),
    dict(causal="bottom_right", Sq=700, Sk=300),  # the first 400 rows see no key
    dict(window=(64, 0)),
    dict(window=(40, 90), Sq=500, Sk=450),
    dict(Hq=8, Hkv=2, causal="top_left"),
    dict(mask="bool", dropout_p=0.2, softcap=5.0, scale=0.3),
    dict(Dv=128, dropout_p=0.1),  # at D 64: 16 queries a step, 8 a consumer
    dict(causal="top_left", Sq=100, Sk=1000),  # key blocks no query sees walk nothing
], ids=lambda case: ",".join(f"{key}={value}" for key, value in case.items()) or "plain")
def test_gradients_match_the_reference(D, case):
    case = dict(case)
    Sq, Sk = case.pop("Sq", 520), case.pop("Sk", 650)  # several key blocks, partial tiles at the ends
    if case.get("mask") == "bool":
        case["mask"] = torch.rand(1, 2, Sq, Sk) > 0.2
    Hq, Hkv = case.pop("Hq", 2), case.pop("Hkv", 1)
    assert plan_is_one_pass(2, Hq, Hkv, Sq, Sk, D, case.get("Dv", D))
    run(B=2, Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D, dtype=torch.bfloat16, **case)


@pytest.mark.parametrize("block_order,arrival_order", [("eager", "arrival"), ("writer", "writer-arrival")])
def test_arrival_order_runs_only_where_a_heads_key_blocks_fit(monkeypatch, block_order, arrival_order):
    # The arrival order sums each tile in another order than the block order, so its bits differ
    # where it runs; with more key blocks a head than multiprocessors (blocks that wait on higher
    # ones could then wait on one never resident) the plan runs the eager block order instead,
    # bit for bit (by the dQ writer: the writer's block order). The arrival order's two ways give
    # the same bits, as the block order's do.
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bound = min(sms, 256)  # and the kernel's table of walks holds 256
    torch.manual_seed(4)
    q = torch.randn(1, 2, 256, 64, device=DEVICE, dtype=torch.bfloat16)
    for key_blocks, arrival_runs in ((bound - 4, True), (bound + 1, False)):
        k, v = (torch.randn(1, 1, key_blocks * 128 - 40, 64, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
        o, lse = flashjit.attention(q, k, v, return_lse=True)
        dout = torch.randn_like(o)
        results = {}
        for mode in ("eager", "arrival", block_order, arrival_order):
            monkeypatch.setenv("FLASHJIT_CUDA_ONE_PASS_DQ", mode)
            results[mode] = flashjit.attention_backward(q, k, v, o, lse, dout)
        same = all(torch.equal(a, b) for a, b in zip(results[block_order], results[arrival_order]))
        assert same != arrival_runs, f"{key_blocks} key blocks a head on {sms} multiprocessors"
        assert all(torch.equal(a, b) for a, b in zip(results["eager"], results[block_order]))
        assert all(torch.equal(a, b) for a, b in zip(results["arrival"], results[arrival_order]))


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("options", [dict(causal=True), dict(window=(6, 2)), dict(dropout_p=0.25, seed=11, offset=3)])
def test_variable_length_batch_in_one_launch(D, options, monkeypatch):
    # Every sequence's key blocks in one grid, each sequence's sums in its own scratch rows (and,
    # with the dQ writer, dQ written from them by a block a tile of every sequence's rows): each
    # sequence against float64 alone, a sequence without keys and one without queries among them.
    test_varlen.test_matches_each_sequence_alone(torch.bfloat16, options, D, D, "one", monkeypatch)


def test_more_key_blocks_a_head_than_multiprocessors():
    # Where a head's key blocks cannot all be resident at once, the arrival order gives way to
    # the block order: still the one pass, still right.
    torch.manual_seed(3)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    Sk = (sms + 1) * 128 + 40
    assert plan_is_one_pass(1, 2, 1, 96, Sk, 64, 64)
    for causal in (False, "bottom_right"):
        run(B=1, Hq=2, Hkv=1, Sq=96, Sk=Sk, D=64, dtype=torch.bfloat16, causal=causal)


def test_plan_is_one_pass_and_every_row_is_written():
    torch.manual_seed(0)
    B, H, Sq, Sk, D = 2, 3, 700, 300, 128
    q = torch.randn(B, H, Sq, D, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(B, H, Sk, D, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    dout = torch.randn_like(q)
    for causal in (0, 2):  # none, and bottom-right: rows 0..399 see no key
        size, (dq, dk, dv) = poisoned_backward(q, k, v, dout, **options(causal))
        assert size >= 4 * B * H * Sq * D, "the one-pass plan's workspace holds dQ's float32 sums"
        for name, x in (("dq", dq), ("dk", dk), ("dv", dv)):
            assert not torch.isnan(x).any(), f"{name} has rows the backward left unwritten"
        if causal:
            assert torch.count_nonzero(dq[:, :, :Sq - Sk]) == 0


def repeated_backwards(causal, atomic):
    """A grouped problem's backward, run four times under the settings in force: bit for bit the
    same each time (dK and dV only, and dQ within 1%, where dQ's adds are atomic and land in any
    order). Returns the inputs (q, k, v, o, lse, dout) and the first gradients. 16 key blocks a
    head over 6 heads of 3 groups: blocks wait on one another for each tile."""
    torch.manual_seed(1)
    q = torch.randn(2, 6, 2048, 128, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 3, 2048, 128, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    o, lse = flashjit.attention(q, k, v, causal=causal, return_lse=True)
    dout = torch.randn_like(o)
    first = flashjit.attention_backward(q, k, v, o, lse, dout, causal=causal)
    for _ in range(3):
        again = flashjit.attention_backward(q, k, v, o, lse, dout, causal=causal)
        if atomic:
            assert torch.equal(first[1], again[1]) and torch.equal(first[2], again[2])  # dK, dV: no atomics
            assert (first[0].float() - again[0].float()).abs().max().item() <= 0.01 * first[0].float().abs().max().item()
        else:
            assert all(torch.equal(a, b) for a, b in zip(first, again))
    return (q, k, v, o, lse, dout), first


def assert_gradients_close(ours, theirs, fraction):
    """dQ, dK and dV within `fraction` of the largest magnitude of the other's, each."""
    for name, a, b in zip(("dq", "dk", "dv"), ours, theirs):
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= fraction * scale, name


@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_bitwise_reproducible_and_close_to_the_split_backward(causal, monkeypatch):
    (q, k, v, o, lse, dout), first = repeated_backwards(causal, os.environ["FLASHJIT_CUDA_ONE_PASS_DQ"] == "atomic")
    monkeypatch.setenv("FLASHJIT_CUDA_BACKWARD", "split")
    assert_gradients_close(first, flashjit.attention_backward(q, k, v, o, lse, dout, causal=causal), 0.02)


def test_eager_release_and_the_writer_give_the_same_bits(monkeypatch):
    # The same adds in the same order: only when each block says it is done, and (writer) which
    # threads make them, differ.
    torch.manual_seed(2)
    q = torch.randn(2, 8, 1500, 64, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 1700, 64, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    o, lse = flashjit.attention(q, k, v, causal="bottom_right", return_lse=True)
    dout = torch.randn_like(o)
    results = []
    for mode in ("ordered", "eager", "writer", "writer-eager", "writer-pair"):
        monkeypatch.setenv("FLASHJIT_CUDA_ONE_PASS_DQ", mode)
        results.append(flashjit.attention_backward(q, k, v, o, lse, dout, causal="bottom_right"))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# FLASHJIT_CUDA_ONE_PASS_SUMS_MIB: past the budget the one pass runs over parts of the heads, each
# head's blocks and adds as in one plan, so the gradients are the same bits (dQ of the atomic adds
# aside); 2 MiB: a part a batch entry; 1 MiB: a part a key/value head (four query heads) of an entry,
# with a mask and dropout, whose counters name the whole problem's heads.
@pytest.mark.parametrize("budget", ["2", "1"])
def test_parts_over_the_sums_budget_give_the_same_bits(monkeypatch, budget):
    torch.manual_seed(3)
    B, Hq, Hkv, Sq, Sk, D = 2, 8, 2, 1000, 1100, 64  # sums: 2 x 8 x 1024 padded rows x 64 floats, 4 MiB
    q = torch.randn(B, Hq, Sq, D, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hkv, Sk, D, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    kw = dict(attn_mask=torch.rand(B, Hq, Sq, Sk, device=DEVICE) > 0.2, causal="bottom_right", dropout_p=0.2,
              seed=5)
    o, lse = flashjit.attention(q, k, v, return_lse=True, **kw)
    dout = torch.randn_like(o)
    whole_bytes = workspace_bytes(q, k, v, o, lse, dout)
    whole = flashjit.attention_backward(q, k, v, o, lse, dout, **kw)
    monkeypatch.setenv("FLASHJIT_CUDA_ONE_PASS_SUMS_MIB", budget)
    assert workspace_bytes(q, k, v, o, lse, dout) <= whole_bytes * (0.6 if budget == "2" else 0.3)  # a part's sums
    parts = flashjit.attention_backward(q, k, v, o, lse, dout, **kw)
    if os.environ["FLASHJIT_CUDA_ONE_PASS_DQ"] == "atomic":
        assert torch.equal(whole[1], parts[1]) and torch.equal(whole[2], parts[2])
        assert_gradients_close(parts, whole, 0.01)
    else:
        assert all(torch.equal(a, b) for a, b in zip(whole, parts))
    monkeypatch.setenv("FLASHJIT_CUDA_BACKWARD", "split")
    assert_gradients_close(parts, flashjit.attention_backward(q, k, v, o, lse, dout, **kw), 0.02)


@pytest.mark.parametrize("variable", ["FLASHJIT_CUDA_BACKWARD", "FLASHJIT_CUDA_ONE_PASS_STEPS",
                                      "FLASHJIT_CUDA_ONE_PASS_SUMS_MIB"])
def test_bad_setting_is_named(monkeypatch, variable):
    q = torch.randn(1, 2, 64, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    o = flashjit.attention(q, q, q)
    monkeypatch.setenv(variable, "fast")
    with pytest.raises(ValueError, match=variable):
        o.sum().backward()
