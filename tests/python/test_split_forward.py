"""The split forward on CUDA: with few query blocks (decoding) the keys are split
over blocks and a combine kernel merges the parts. FLASHJIT_CUDA_SPLITS=n forces n
splits wherever a split applies (float16/bfloat16, no dropout), so that every
feature runs through it; outputs, LSE and gradients (whose backward reads the merged
LSE) against the float64 reference, as in test_attention.py."""

import pytest
import torch

from conftest import DEVICE
from test_attention import run

pytestmark = pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available(),
                                reason="the split forward is a CUDA kernel")


@pytest.fixture
def splits(monkeypatch):
    def set_splits(n):
        monkeypatch.setenv("FLASHJIT_CUDA_SPLITS", str(n))
    return set_splits


@pytest.mark.parametrize("n", [2, 3, 64])  # 64: more splits than key tiles, clamped
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D,Dv", [(64, 64), (128, 128), (256, 256), (72, 40)])
def test_head_dims_and_split_counts(splits, n, dtype, D, Dv):
    splits(n)
    run(B=2, Hq=4, Hkv=2, Sq=3, Sk=300, D=D, Dv=Dv, dtype=dtype)


# More than 32 splits: the combine reads the LSEs and weights 32 splits at a time (a chunk of the
# warp's lanes), here with a partial last chunk; 16-byte columns (128) and 4-byte ones (40).
@pytest.mark.parametrize("n", [33, 70])
@pytest.mark.parametrize("D,Dv", [(128, 128), (72, 40)])
def test_more_than_32_splits(splits, n, D, Dv):
    splits(n)
    run(B=2, Hq=4, Hkv=2, Sq=1, Sk=9000, D=D, Dv=Dv, dtype=torch.bfloat16)


@pytest.mark.parametrize("Sq,Sk", [(1, 1), (1, 65), (1, 1000), (7, 129), (129, 1000), (200, 70)])
def test_seqlens(splits, Sq, Sk):
    splits(5)
    run(B=1, Hq=2, Hkv=1, Sq=Sq, Sk=Sk, D=128, dtype=torch.bfloat16)


@pytest.mark.parametrize("options", [dict(causal="top_left"), dict(causal="bottom_right"), dict(window=(40, 7)),
                                     dict(window=(3, 0), causal="bottom_right"), dict(softcap=8.0)],
                         ids=["top_left", "bottom_right", "window", "narrow_window", "softcap"])
def test_bounds_and_softcap(splits, options):
    # Top-left causal with fewer queries than keys leaves late spans with no visible key.
    splits(6)
    run(B=2, Hq=4, Hkv=4, Sq=9, Sk=500, D=64, dtype=torch.float16, **options)


@pytest.mark.parametrize("kind", ["bool", "additive", "fully_masked_rows"])
def test_masks(splits, kind):
    splits(4)
    Sq, Sk = 5, 400
    if kind == "additive":
        mask = torch.randn(2, 1, Sq, Sk)
    else:
        mask = torch.rand(2, 1, 1, Sk) > 0.4
        if kind == "fully_masked_rows":
            mask = mask.expand(2, 1, Sq, Sk).clone()
            mask[1, :, 2] = False  # one row sees no key: o = 0, lse = -inf
    run(B=2, Hq=8, Hkv=2, Sq=Sq, Sk=Sk, D=128, dtype=torch.bfloat16, mask=mask)


def test_decoding_shape_splits_by_itself(monkeypatch):
    """No forced count: a decoding step (one query, few batch-heads, many keys) splits
    by the backend's own choice."""
    monkeypatch.delenv("FLASHJIT_CUDA_SPLITS", raising=False)
    run(B=2, Hq=16, Hkv=4, Sq=1, Sk=3000, D=128, dtype=torch.bfloat16)


@pytest.fixture
def one_warp(monkeypatch):
    """One-warp blocks, split n ways (None: the backend's own count)."""
    def use(splits):
        monkeypatch.setenv("FLASHJIT_CUDA_DECODE_WARPS", "1")
        if splits is None:
            monkeypatch.delenv("FLASHJIT_CUDA_SPLITS", raising=False)
        else:
            monkeypatch.setenv("FLASHJIT_CUDA_SPLITS", str(splits))
    return use


# Blocks of one warp over up to 16 query rows (FLASHJIT_CUDA_DECODE_WARPS=1): the same
# function, split by the backend's choice or forced, with every feature the split takes.
@pytest.mark.parametrize("case", [
    dict(B=2, Hq=16, Hkv=4, Sq=1, Sk=3000, D=128),
    dict(B=3, Hq=4, Hkv=2, Sq=3, Sk=300, D=64),
    dict(B=1, Hq=2, Hkv=2, Sq=16, Sk=1000, D=256),
    dict(B=2, Hq=4, Hkv=2, Sq=7, Sk=129, D=72, Dv=40),
    dict(B=2, Hq=8, Hkv=2, Sq=2, Sk=500, D=128, causal="bottom_right"),
    dict(B=2, Hq=4, Hkv=4, Sq=9, Sk=500, D=64, causal="top_left"),
    dict(B=2, Hq=4, Hkv=4, Sq=5, Sk=400, D=64, window=(40, 7), softcap=8.0),
    dict(B=1, Hq=32, Hkv=8, Sq=1, Sk=40000, D=128)])
@pytest.mark.parametrize("forced", [None, 5])
def test_one_warp_blocks(one_warp, case, forced):
    one_warp(forced)
    run(dtype=torch.bfloat16, **case)


def test_decode_warps_switch_is_checked(monkeypatch):
    import flashjit
    monkeypatch.setenv("FLASHJIT_CUDA_DECODE_WARPS", "2")
    q = torch.randn(1, 2, 1, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="FLASHJIT_CUDA_DECODE_WARPS"):
        flashjit.attention(q, q, q)


def test_dropout_does_not_split(splits):
    splits(4)
    run(B=1, Hq=2, Hkv=1, Sq=3, Sk=300, D=64, dtype=torch.float16, dropout_p=0.2)


# A boolean mask whose entries do not depend on the query row lets the one-warp blocks pass over
# the key tiles it hides entirely (their K and V are not loaded). Whole hidden tiles at the start,
# in the middle and at the end of the keys, a tile cut by the sequence's end, a sequence with no
# visible key; spans of more than 32 tiles (two splits of 5000 keys: more than one chunk of the
# search) and a span that starts inside a tile (a left window); against the float64 reference,
# and bit for bit against the same mask given per query head (whose entries may differ by row,
# so that no tile is passed over), also where the mask's keys are not contiguous or start off
# 16-byte alignment.
def _key_mask(pattern, B, Sk):
    keep = torch.ones(B, Sk, dtype=torch.bool)
    if pattern == "prefix":
        keep[0, :700] = False
        keep[1, :1500] = False
    elif pattern == "suffix":
        keep[0, 333:] = False
        keep[1, 1100:] = False
    elif pattern == "holes":
        keep[:, 100:900] = False
        keep[1, 1200:1999] = False
        keep[0, 1300:1301] = False
    elif pattern == "none_visible":
        keep[0, :1000] = False
        keep[1] = False
    return keep


@pytest.mark.parametrize("pattern", ["prefix", "suffix", "holes", "none_visible"])
@pytest.mark.parametrize("forced", [None, 3])
def test_one_warp_blocks_pass_over_hidden_key_tiles(one_warp, pattern, forced):
    import flashjit
    one_warp(forced)
    B, Hq, Hkv, Sk = 2, 8, 2, 2000
    keep = _key_mask(pattern, B, Sk)
    run(B=B, Hq=Hq, Hkv=Hkv, Sq=1, Sk=Sk, D=64, dtype=torch.bfloat16, mask=keep[:, None, None, :])

    q = torch.randn(B, Hq, 1, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hkv, Sk, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    device_keep = keep.cuda()
    strided = torch.zeros(B, 2 * Sk, dtype=torch.bool, device="cuda")
    strided[:, ::2] = device_keep
    shifted = torch.zeros(B, Sk + 3, dtype=torch.bool, device="cuda")
    shifted[:, 3:] = device_keep
    masks = {
        "keys": device_keep[:, None, None, :],
        "strided": strided[:, ::2][:, None, None, :],
        "shifted": shifted[:, 3:][:, None, None, :],
        "per head": device_keep[:, None, None, :].expand(B, Hq, 1, Sk).clone(),
    }
    assert masks["strided"].stride(-1) == 2 and masks["shifted"].data_ptr() % 16 == 3
    results = {name: flashjit.attention(q, k, v, attn_mask=mask, return_lse=True) for name, mask in masks.items()}
    for name, (o, lse) in results.items():
        assert torch.equal(o, results["per head"][0]), name
        assert torch.equal(lse, results["per head"][1]), name
    if pattern == "none_visible":
        assert torch.all(results["keys"][0][1] == 0) and torch.all(torch.isinf(results["keys"][1][1]))


@pytest.mark.parametrize("pattern", ["prefix", "holes"])
def test_one_warp_blocks_pass_over_hidden_tiles_of_long_spans_and_windows(one_warp, pattern):
    one_warp(2)
    keep = _key_mask(pattern, 2, 5000)
    keep[:, 3000:4100] = False
    run(B=2, Hq=8, Hkv=2, Sq=1, Sk=5000, D=64, dtype=torch.bfloat16, mask=keep[:, None, None, :])
    # Five queries of a window of 1500 keys back from the bottom-right diagonal: the blocks' keys
    # start at 3495, inside a tile.
    run(B=2, Hq=4, Hkv=4, Sq=5, Sk=5000, D=64, dtype=torch.bfloat16, mask=keep[:, None, None, :],
        causal="bottom_right", window=(1500, 0))
