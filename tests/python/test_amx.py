"""bfloat16 attention on the amx CPU kernels (AMX tiles for Q K^T and P V, K and V packed once
per call): the block edges they add (key blocks aligned to 64 that windows and causal bounds cut,
head dims padded to 32 and 16, query blocks padded to 16 rows) and every feature, against the
float64 reference. On processors without AMX the same cases run on the widest variant there."""

import pytest
import torch

import flashjit

from conftest import DEVICE
from test_attention import run

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the CPU's kernels")

CASES = {
    "plain": {},
    "causal-top-left": {"causal": True},
    "causal-bottom-right": {"causal": "bottom_right"},
    "window": {"window": (70, 5)},
    "window-left-only": {"window": (100, -1)},
    "gqa": {"Hq": 6, "Hkv": 2},
    "head-dims-72-40": {"D": 72, "Dv": 40},
    "head-dim-16": {"D": 16},
    "head-dim-256": {"D": 256},
    "softcap": {"softcap": 5.0},
    "scale": {"scale": 0.05},
    "negative-scale": {"scale": -0.3},
    "dropout": {"dropout_p": 0.3},
    "bool-mask": {"mask": "bool"},
    "additive-mask": {"mask": "additive"},
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("Sq,Sk", [(150, 333), (64, 64), (17, 200), (300, 70)])
def test_bfloat16_blocks_and_features(name, Sq, Sk):
    options = dict(CASES[name])
    options.setdefault("D", 64)
    mask = options.pop("mask", None)
    B, Hq = 2, options.pop("Hq", 2)
    Hkv = options.pop("Hkv", Hq)
    if mask == "bool":
        options["mask"] = torch.rand(B, Hq, Sq, Sk) > 0.3
    elif mask == "additive":
        options["mask"] = torch.randn(B, Hq, Sq, Sk).to(torch.bfloat16)
    run(B=B, Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, dtype=torch.bfloat16, **options)


def test_rows_that_see_nothing_and_nan_scores():
    # Bottom-right causal bounds that leave the first rows without a key (O = 0, LSE = -inf), and
    # a NaN in a key that every later row sees: those rows come out NaN, the others finite.
    run(B=1, Hq=2, Hkv=2, Sq=200, Sk=90, D=64, dtype=torch.bfloat16, causal="bottom_right")
    q, k, v = (torch.randn(1, 2, 130, 64).to(torch.bfloat16) for _ in range(3))
    k[0, 0, 100, 3] = float("nan")
    o, lse = flashjit.attention(q, k, v, causal=True, return_lse=True)
    assert torch.isnan(o[0, 0, 100:]).all() and torch.isnan(lse[0, 0, 100:]).all()
    assert not torch.isnan(o[0, 0, :100]).any() and not torch.isnan(o[0, 1]).any()


def test_keys_outside_the_window_take_no_part():
    # Key blocks start at multiples of 64, so a window's first block can hold keys that no row of
    # a query block sees: an infinite value there must not reach those rows (0 * inf would be
    # NaN). Rows 64-127 see keys 54 on; rows 0-63 share a block with key 5, where a masked key
    # still multiplies its zero probability into the sum (NaN, as in the unfused reference).
    q, k, v = (torch.randn(1, 2, 200, 64).to(torch.bfloat16) for _ in range(3))
    v_inf = v.clone()
    v_inf[0, :, 5] = float("inf")
    v_zero = v.clone()
    v_zero[0, :, 5] = 0
    got = flashjit.attention(q, k, v_inf, window=(10, 0))
    want = flashjit.attention(q, k, v_zero, window=(10, 0))
    assert torch.equal(got[:, :, 64:], want[:, :, 64:])
    assert not torch.isfinite(got[:, :, 5:16]).all()


@pytest.mark.parametrize("causal", [False, True])
def test_backward_one_pass_and_two_passes_agree_bit_for_bit(causal):
    # With as many key/value heads as workers the backward takes one pass a head (dQ summed in the
    # task); with fewer, a dQ pass and a dK/dV pass over blocks. Both add the same products in
    # the same order.
    torch.manual_seed(3)
    q = torch.randn(1, 3, 300, 64).to(torch.bfloat16)
    k, v = (torch.randn(1, 1, 333, 64).to(torch.bfloat16) for _ in range(2))
    dout = torch.randn(1, 3, 300, 64).to(torch.bfloat16)
    o, lse = flashjit.attention(q, k, v, causal=causal, return_lse=True)
    one = flashjit.attention_backward(q, k, v, o, lse, dout, causal=causal, num_threads=1)
    two = flashjit.attention_backward(q, k, v, o, lse, dout, causal=causal, num_threads=2)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
