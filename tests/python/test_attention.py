"""flashjit.attention forward and autograd backward against the float64
reference (docs/tolerance.md), over a feature x shape matrix, on FLASHJIT_TEST_DEVICE."""

import numpy as np
import pytest
import torch

import flashjit
from conftest import DEVICE
from reference import check, leaves, naive_attention

HEAD_DIMS = [1, 8, 40, 64, 72, 96, 128, 160, 192, 256]
DTYPES = [torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if DEVICE == "cpu" else [])


def run(B=2, Hq=4, Hkv=2, Sq=70, Sk=90, D=32, Dv=None, dtype=torch.float32, layout="bhsd", mask=None,
        dropout_p=0.0, **options):
    """Runs flashjit forward + autograd backward on DEVICE and checks o, lse, dq, dk, dv."""
    Dv = Dv or D

    def make(H, S, d):
        if layout == "bshd":  # a [B, S, H, D] buffer viewed as [B, H, S, D]
            return torch.randn(B, S, H, d).to(dtype).transpose(1, 2)
        return torch.randn(B, H, S, d).to(dtype)

    q, k, v = make(Hq, Sq, D), make(Hkv, Sk, D), make(Hkv, Sk, Dv)
    fq, fk, fv = (x.to(DEVICE).requires_grad_() for x in (q, k, v))
    assert fq.stride() == q.stride()
    seed = 1234
    o, lse = flashjit.attention(fq, fk, fv, attn_mask=None if mask is None else mask.to(DEVICE),
                                dropout_p=dropout_p, seed=seed, return_lse=True, **options)
    dout = torch.randn(o.shape).to(dtype)
    o.backward(dout.to(DEVICE))

    keep = None
    if dropout_p:
        keep = torch.from_numpy(flashjit.dropout_keep_mask(B, Hq, Sq, Sk, dropout_p=dropout_p, seed=seed))
    exact = leaves(q, k, v)
    exact_o, exact_lse = naive_attention(*exact, attn_mask=mask, dropout_p=dropout_p, keep=keep, **options)
    low = leaves(q, k, v)
    base_o, base_lse = naive_attention(*low, attn_mask=mask, dropout_p=dropout_p, keep=keep, dtype=dtype, **options)
    assert o.dtype == dtype and o.shape == (B, Hq, Sq, Dv) and o.device == fq.device
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not lse.requires_grad
    check("o", o, base_o, exact_o, dtype)
    check("lse", lse, base_lse, exact_lse, torch.float32)
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(exact_lse))

    exact_o.backward(dout.double())
    base_o.backward(dout)
    for name, got, base, ref in zip(("dq", "dk", "dv"), (fq, fk, fv), low, exact):
        assert got.grad.dtype == dtype and got.grad.shape == got.shape
        check(name, got.grad, base.grad, ref.grad, dtype)
    return o.detach().cpu(), lse.cpu(), tuple(x.grad.cpu() for x in (fq, fk, fv))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_head_dims_and_dtypes(dtype, D):
    run(D=D, dtype=dtype, Sq=65, Sk=63)


@pytest.mark.parametrize("Dqk,Dv", [(64, 32), (40, 128), (256, 8)])
def test_value_head_dim_differs(Dqk, Dv):
    run(D=Dqk, Dv=Dv, dtype=torch.bfloat16)


@pytest.mark.parametrize("Sq,Sk", [(1, 1), (7, 7), (63, 63), (65, 65), (127, 127), (129, 129), (1000, 1000),
                                   (63, 65), (127, 129), (7, 129), (129, 7), (1, 1000), (1000, 1)])
def test_seqlens(Sq, Sk):
    run(B=1, Hq=2, Hkv=1, Sq=Sq, Sk=Sk)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (8, 1)])
def test_gqa(Hq, Hkv):
    run(Hq=Hq, Hkv=Hkv, dtype=torch.bfloat16)


# One query with grouped heads, as in decoding (the CUDA forward runs a group's heads
# as rows of one key/value head where no bound depends on the row).
@pytest.mark.parametrize("options", [{}, dict(causal="bottom_right"), dict(causal="top_left"),
                                     dict(causal="bottom_right", window=(50, 0)), dict(softcap=6.0),
                                     dict(dropout_p=0.3)],
                         ids=["plain", "bottom_right", "top_left", "window", "softcap", "dropout"])
@pytest.mark.parametrize("mask", [None, "per_head", "per_batch"])
def test_one_query_grouped_heads(options, mask):
    B, Hq, Sk = 2, 8, 300
    shape = {None: None, "per_head": (B, Hq, 1, Sk), "per_batch": (B, 1, 1, Sk)}[mask]
    attn_mask = None if shape is None else torch.rand(shape) > 0.3
    if attn_mask is not None:
        attn_mask[..., 0] = attn_mask[..., -1] = True
    run(B=B, Hq=Hq, Hkv=2, Sq=1, Sk=Sk, D=128, dtype=torch.bfloat16, mask=attn_mask, **options)


@pytest.mark.parametrize("causal", [True, "top_left", "bottom_right"])
@pytest.mark.parametrize("Sq,Sk", [(64, 64), (40, 100), (100, 40), (129, 1000)])
def test_causal(causal, Sq, Sk):
    run(B=1, Sq=Sq, Sk=Sk, causal=causal, dtype=torch.float16)


@pytest.mark.parametrize("causal,D", [("bottom_right", 64), (False, 128)])
def test_many_work_tiles_per_block(causal, D):
    # 320 query blocks of 128 rows, more than a GPU has SMs: each persistent forward
    # block takes several; bottom-right causal with Sq > Sk leaves the first block
    # with no visible key.
    run(B=4, Hq=16, Hkv=4, Sq=600, Sk=400, D=D, dtype=torch.bfloat16, causal=causal)


@pytest.mark.skipif(DEVICE != "cuda", reason="the persistent forward's tile counters are CUDA's")
def test_stream_tile_counters_reset_between_launches(monkeypatch):
    # The persistent forward takes work tiles from a counter of its stream's own,
    # which each launch must leave at zero: calls with different numbers of work
    # tiles, interleaved over three streams and repeated, give bitwise what
    # launches with a counter zeroed before each (counter=memset) give.
    shapes = [(4, 16, 600, 64), (1, 3, 200, 128), (2, 8, 1000, 64), (3, 5, 129, 256)]
    inputs = [tuple(torch.randn(shape, device=DEVICE, dtype=torch.bfloat16) for _ in range(3)) for shape in shapes]
    monkeypatch.setenv("FLASHJIT_CUDA_TILES", "counter=memset")
    expected = [flashjit.attention(*x, causal=i % 2 == 1) for i, x in enumerate(inputs)]
    monkeypatch.setenv("FLASHJIT_CUDA_TILES", "counter=stream")
    streams = [torch.cuda.Stream() for _ in range(3)]
    torch.cuda.synchronize()
    outputs = []
    for repeat in range(4):
        for i, x in enumerate(inputs):
            stream = streams[(i + repeat) % 3]
            with torch.cuda.stream(stream):
                outputs.append((i, flashjit.attention(*x, causal=i % 2 == 1), stream))
    torch.cuda.synchronize()
    for i, o, _ in outputs:
        assert torch.equal(o, expected[i]), f"shape {shapes[i]}"
    # The default stream as well, and once more after the other streams' launches.
    monkeypatch.delenv("FLASHJIT_CUDA_TILES")
    for i, x in enumerate(inputs):
        assert torch.equal(flashjit.attention(*x, causal=i % 2 == 1), expected[i])


def _forward_tiles_agree(monkeypatch, causal, settings, shapes):
    """The forward under each FLASHJIT_CUDA_TILES setting (run checks it, and its gradients,
    against float64), bitwise the same output."""
    for shape in shapes:
        outputs = []
        for tiles in settings:
            monkeypatch.setenv("FLASHJIT_CUDA_TILES", tiles)
            torch.manual_seed(7)
            outputs.append(run(dtype=torch.bfloat16, causal=causal, **shape)[0])
        assert all(torch.equal(outputs[0], other) for other in outputs[1:]), f"{shape} causal={causal} {settings}"


@pytest.mark.skipif(DEVICE != "cuda", reason="the persistent forward's schedules are CUDA's")
@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
def test_static_schedule_matches_counter(monkeypatch, causal):
    # sched=static: each persistent block takes a work tile a round (a snake's order), with no
    # counter; bitwise the counter's output (a tile's result does not depend on the block that
    # runs it), with several tiles a block (320 and 48 query blocks against 132 SMs) and,
    # bottom-right, a first block with no key.
    _forward_tiles_agree(monkeypatch, causal, ("sched=static", "sched=counter"),
                         (dict(B=4, Hq=16, Hkv=4, Sq=600, Sk=400, D=64), dict(B=1, Hq=3, Hkv=3, Sq=2000, Sk=2000, D=128)))


@pytest.mark.skipif(DEVICE != "cuda", reason="the persistent forward's schedules are CUDA's")
@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
def test_early_next_tile_matches_late(monkeypatch, causal):
    # next=early: the producer takes its next work tile and loads that tile's Q once the last K
    # of a tile longer than the K/V rings is issued; by default (next=late), after the last V.
    # Bitwise the late order's output, with several tiles a block (320 and 288 query blocks
    # against 132 SMs), 4 and 9 key tiles a work tile, and, bottom-right, work tiles with no key
    # between ones with keys.
    _forward_tiles_agree(monkeypatch, causal, ("next=early", "next=late"),
                         (dict(B=4, Hq=16, Hkv=4, Sq=600, Sk=400, D=64), dict(B=2, Hq=16, Hkv=8, Sq=1100, Sk=1100, D=128)))


@pytest.mark.skipif(DEVICE != "cuda", reason="the persistent forward's schedules are CUDA's")
@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
def test_producer_setup_matches_consumer(monkeypatch, causal, tmp_path):
    # setup=producer: the producer works out each work tile's block once and hands it to the
    # consumers with the tile; bitwise the consumers' own setup, with several tiles a block and,
    # bottom-right, work tiles with no key between ones with keys; and its kernel was the one run.
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(tmp_path))
    flashjit.cuda.clear_memory_cache()
    _forward_tiles_agree(monkeypatch, causal, ("setup=producer", "setup=consumer"),
                         (dict(B=4, Hq=16, Hkv=4, Sq=600, Sk=400, D=64), dict(B=2, Hq=16, Hkv=8, Sq=1100, Sk=1100, D=128)))
    compiled = [path.name for path in tmp_path.rglob("*") if path.is_file()]
    assert any("hopper-forward" in name and "_psetup_" in name for name in compiled), compiled


@pytest.mark.skipif(DEVICE != "cuda", reason="the sm_90a forward's exps are CUDA's")
@pytest.mark.parametrize("tiles", ["poly=3", "poly=8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_polynomial_exps(tiles, dtype, monkeypatch, tmp_path):
    # poly=k: exp2 of k of every 16 eight-column groups of P from a polynomial on the FMA units
    # instead of the MUFU. Against float64 (run: O, LSE and the gradients) with causal edge
    # tiles, with a boolean mask whose fully masked rows must give O = 0 and LSE = -inf (a
    # masked logit is -inf: the polynomial's 2^x must be exactly 0 there), and with a NaN in a
    # query row, which must leave that row NaN as the MUFU's exp does. Its kernel was the one
    # compiled (on sm_90; elsewhere the key has no effect and the checks still run).
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(tmp_path))
    flashjit.cuda.clear_memory_cache()
    monkeypatch.setenv("FLASHJIT_CUDA_TILES", tiles)
    torch.manual_seed(11)
    for D in (64, 128):
        run(B=2, Hq=4, Hkv=2, Sq=300, Sk=333, D=D, dtype=dtype, causal="bottom_right")
        mask = torch.rand(2, 1, 200, 260) > 0.3
        mask[:, :, 5] = False
        mask[1, :, 150:170] = False
        o, lse, _ = run(B=2, Hq=4, Hkv=2, Sq=200, Sk=260, D=D, dtype=dtype, mask=mask)
        assert torch.all(o[:, :, 5] == 0) and torch.all(torch.isneginf(lse[:, :, 5]))
    q, k, v = (torch.randn(1, 2, 256, 64, dtype=dtype, device=DEVICE) for _ in range(3))
    q[0, 1, 77, 3] = float("nan")
    outputs = {}
    for setting in (tiles, "poly=0"):
        monkeypatch.setenv("FLASHJIT_CUDA_TILES", setting)
        outputs[setting] = flashjit.attention(q, k, v).cpu()
    nan_rows = torch.isnan(outputs["poly=0"]).any(-1)
    assert nan_rows[0, 1, 77] and nan_rows.sum() == 1
    assert torch.equal(torch.isnan(outputs[tiles]).any(-1), nan_rows)
    if torch.cuda.get_device_capability() == (9, 0):
        compiled = [path.name for path in tmp_path.rglob("*") if path.is_file()]
        assert any("hopper-forward" in name and f"_poly{tiles[5:]}_" in name for name in compiled), compiled


# Tile configurations of the sm_90a forward forced through FLASHJIT_CUDA_TILES
# (the benchmark and the tuner choose among them): each must compute the same
# function. Elsewhere the variable has no effect and the cases still run.
@pytest.mark.parametrize("tiles", ["o=direct,q=1", "o=direct,q=2", "o=tma,q=1", "n=64", "n=96,stages=3",
                                   "n=160,q=1", "groups=3", "softmax=plain", "stages=4", "edges=general",
                                   "span=block", "groups=3,n=112", "chain=tiles", "chain=tiles,groups=3",
                                   "next=early", "setup=producer", "poly=8", "wait=suspend",
                                   # the H100's built-in N 1k choices (src/cuda/tuned_sm90_h100.txt)
                                   "groups=3,n=128,setup=producer", "softmax=fast,setup=producer",
                                   "n=64,setup=producer"])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_forced_forward_tiles(tiles, D, causal, monkeypatch):
    if (D > 64 and ("groups=3" in tiles or tiles == "stages=4")) or (
            D == 256 and tiles in ("o=direct,q=2", "n=96,stages=3", "n=160,q=1")):
        pytest.skip("no room for this configuration at this head dim")
    monkeypatch.setenv("FLASHJIT_CUDA_TILES", tiles)
    # 3 x 3 work tiles of 128 rows, the last partly past the sequence.
    run(B=3, Hq=3, Hkv=1, Sq=300, Sk=333, D=D, dtype=torch.bfloat16, causal=causal)


# chain=tiles: a work tile's last P V goes with the next tile's first S, its output after
# them. Enough work tiles that each persistent block runs several in a row (320 query blocks
# of 128 rows against 132 SMs; 256 at 9k keys, where the tuned D128 kernel takes 160 keys a
# step), with features, causal both ways with more queries than keys (blocks with no key
# between others: the carried tile then has a turn of its own), windows, three warpgroups
# (whose last block's rows lie past the queries: not carried), every warpgroup over all tiles
# (span=block), float16 with a narrower V, other steps and rings, the plain softmax and the
# static schedule. Checked against float64, bitwise against the same tiles unchained (the same
# sums in the same order), and the chained kernel was the one compiled (its name in the cache).
_CHAINED_CASES = {
    "plain": ({}, ""),
    "bottom_right": (dict(causal="bottom_right"), ""),
    "top_left": (dict(causal="top_left"), ""),
    "window": (dict(Sk=600, causal=True, window=(200, 0)), ""),
    "extras": (dict(dropout_p=0.1, softcap=5.0), ""),  # and a mask (below)
    "groups3": (dict(D=64), "groups=3"),
    "span_block": (dict(D=64, Sq=700), "span=block,groups=3"),
    "float16_narrow_v": (dict(D=128, Dv=64, dtype=torch.float16), ""),
    "n64_stages3": ({}, "n=64,stages=3"),
    "plain_softmax": (dict(causal=True, Sk=600), "softmax=plain"),
    "static": ({}, "sched=static"),
    "long_keys": (dict(B=1, Hq=32, Hkv=8, Sq=1024, Sk=9000), ""),  # the forward alone (below)
}


@pytest.mark.skipif(DEVICE != "cuda", reason="the sm_90a forward's option")
@pytest.mark.parametrize("case", list(_CHAINED_CASES))
def test_chained_work_tiles(case, monkeypatch, tmp_path):
    extra, more_tiles = _CHAINED_CASES[case]
    options = {**dict(B=4, Hq=16, Hkv=4, Sq=600, Sk=400, D=128, dtype=torch.bfloat16), **extra}
    if case == "extras":
        mask = torch.rand(options["B"], 1, options["Sq"], options["Sk"]) > 0.2
        mask[..., 0] = True
        options["mask"] = mask
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(tmp_path))
    flashjit.cuda.clear_memory_cache()
    outputs = []
    for chain in ("tiles", "none"):
        monkeypatch.setenv("FLASHJIT_CUDA_TILES", ",".join(x for x in (f"chain={chain}", more_tiles) if x))
        torch.manual_seed(11)
        if case == "long_keys":  # a float64 reference of 9k keys would take gigabytes: bitwise alone
            q = torch.randn(1, 32, 1024, 128, device=DEVICE, dtype=torch.bfloat16)
            k, v = (torch.randn(1, 8, 9000, 128, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
            o, lse = flashjit.attention(q, k, v, return_lse=True)
            assert torch.isfinite(o).all() and torch.isfinite(lse).all()
            outputs.append((o, lse))
        else:
            outputs.append(run(**options)[:2])
    for got, want in zip(*outputs):
        assert torch.equal(got, want), case
    compiled = [path.name for path in tmp_path.rglob("*") if path.is_file()]
    assert any("hopper-forward" in name and "_chain_" in name for name in compiled), compiled


# FLASHJIT_CUDA_DKDV: the split sm_90a dK/dV kernel takes P^T and dS^T from shared memory, 64
# queries a step at head dims 64 and 128 (shared, the default), or from registers. Each way:
# gradients against float64 with causal bounds both ways, a window, GQA, lengths that end inside
# a step and a narrower V; bitwise the same on a second run; and the asked-for kernel was the one
# compiled (its name in the cache).
_DKDV_CASES = {
    "d128": dict(D=128),
    "d64_gqa": dict(D=64, Hq=8, Hkv=2),
    "causal_bottom_right": dict(D=128, Sq=300, Sk=333, causal="bottom_right"),
    "causal_top_left": dict(D=128, Sq=333, Sk=300, causal="top_left"),
    "window": dict(D=128, Sq=400, Sk=400, causal=True, window=(100, 0)),
    "narrow_v": dict(D=128, Dv=64, dtype=torch.float16),
    "d64_dropout_softcap": dict(D=64, Sq=300, Sk=333, causal="bottom_right", dropout_p=0.1, softcap=4.0),
    "d64_mask": dict(D=64, Sq=260, Sk=300),  # and a boolean mask (below)
}


@pytest.mark.skipif(DEVICE != "cuda", reason="the sm_90a backward's option")
@pytest.mark.parametrize("operands", ["shared", "registers"])
@pytest.mark.parametrize("case", list(_DKDV_CASES))
def test_dkdv_operands(case, operands, monkeypatch, tmp_path):
    options = {**dict(B=2, Hq=4, Hkv=2, Sq=250, Sk=270, dtype=torch.bfloat16), **_DKDV_CASES[case]}
    if case == "d64_mask":
        mask = torch.rand(2, 4, options["Sq"], options["Sk"]) > 0.3
        mask[..., 0] = True
        options["mask"] = mask
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FLASHJIT_CUDA_BACKWARD", "split")  # the split backward's kernel, whatever the run's
    monkeypatch.setenv("FLASHJIT_CUDA_DKDV", operands)
    flashjit.cuda.clear_memory_cache()
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(run(**options))
    for first, second in zip(runs[0][2], runs[1][2]):
        assert torch.equal(first, second), case
    dkdv = [path.name for path in tmp_path.rglob("*.cubin") if "backward_dkdv" in path.name]
    assert dkdv and all(("_shared-ops_" in name) == (operands == "shared") for name in dkdv), dkdv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Sq,Sk", [(70, 90), (1, 300), (300, 40)])
def test_nan_propagates_like_the_math_definition(dtype, Sq, Sk):
    # A NaN in a query row makes that row's output and LSE NaN (not 0 and -inf);
    # a NaN in a key makes every row that sees the key NaN; the other rows are exact.
    q, k, v = (torch.randn(2, 2, S, 64).to(dtype) for S in (Sq, Sk, Sk))  # batch 1 holds no NaN
    q[0, 0, Sq // 2, 5] = float("nan")
    k[0, 1, Sk // 3, 7] = float("nan")
    o, lse = flashjit.attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), return_lse=True)
    o, lse = o.cpu().float(), lse.cpu()
    ref_o, ref_lse = naive_attention(q, k, v)
    assert torch.equal(torch.isnan(o), torch.isnan(ref_o.float())) and torch.isnan(o[0, 0, Sq // 2]).all()
    assert torch.equal(torch.isnan(lse), torch.isnan(ref_lse)) and torch.isnan(lse[0, 1]).all()
    finite = ~torch.isnan(ref_lse)
    assert (lse[finite] - ref_lse[finite]).abs().max() < 1e-2


@pytest.mark.parametrize("window", [(16, 0), (8, 8), (-1, 4), (4, -1), (0, 0)])
def test_window(window):
    run(Sq=120, Sk=150, window=window)


def test_causal_window():
    run(Sq=130, Sk=130, causal="bottom_right", window=(32, -1), dtype=torch.bfloat16)


def test_softcap_and_scale():
    run(softcap=3.0, scale=0.7, dtype=torch.bfloat16)


@pytest.mark.parametrize("scale", [-0.3, 0.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_scale_of_any_sign(scale, dtype):
    # A positive scale folds into the exponent on sm_90a; zero and negative ones cannot.
    run(B=1, Hq=2, Hkv=1, Sq=200, Sk=300, D=64, scale=scale, dtype=dtype)


@pytest.mark.parametrize("growth", [0.02, 0.5])
def test_row_maxima_growing_along_the_keys(growth):
    # Scores that rise key after key: each key tile raises every row's maximum,
    # by less (0.02) or more (0.5) than the forward lets a row's base lag behind.
    B, H, S, D = 1, 2, 700, 64
    # q . u is about sqrt(D) = 8 for every query, so the scaled score grows by
    # about `growth` nats per 8 keys: 1.75 nats over the sequence, or 44.
    q = torch.randn(B, H, S, D) + 1.0
    u = torch.ones(D) / D**0.5
    k = torch.randn(B, H, S, D) * 0.3 + growth * torch.arange(S).view(1, 1, S, 1) / 8 * u
    v = torch.randn(B, H, S, D)
    dtype = torch.bfloat16
    fq, fk, fv = (x.to(dtype).to(DEVICE) for x in (q, k, v))
    o, lse = flashjit.attention(fq, fk, fv, return_lse=True)
    exact_o, exact_lse = naive_attention(*leaves(*(x.to(dtype) for x in (q, k, v))))
    base_o, base_lse = naive_attention(*leaves(*(x.to(dtype) for x in (q, k, v))), dtype=dtype)
    check("o", o, base_o, exact_o, dtype)
    check("lse", lse, base_lse, exact_lse, torch.float32)


@pytest.mark.parametrize("shape", [(70, 90), (1, 90), (70, 1), (4, 1, 90), (2, 1, 70, 90), (1, 4, 70, 90),
                                   (2, 4, 1, 90), (2, 4, 70, 90)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_broadcast(shape, kind):
    if kind == "bool":
        mask = torch.rand(shape) > 0.3
    else:
        mask = torch.randn(shape).masked_fill(torch.rand(shape) > 0.8, float("-inf"))
    run(mask=mask)


def test_expanded_mask_is_read_through_zero_strides():
    mask = (torch.rand(1, 1, 70, 90) > 0.5).expand(2, 4, 70, 90)
    assert mask.stride()[:2] == (0, 0)
    run(mask=mask)


def test_float32_mask_with_half_inputs():
    run(mask=torch.randn(70, 90), dtype=torch.float16)


def test_fully_masked_rows_give_zero_output_and_gradient():
    mask = torch.rand(2, 4, 70, 90) > 0.3
    mask[:, :, ::7] = False
    o, lse, (dq, _, _) = run(mask=mask)
    assert torch.all(o[:, :, ::7] == 0)
    assert torch.all(lse[:, :, ::7] == float("-inf"))
    assert torch.all(dq[:, :, ::7] == 0)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_matches_reference_with_same_keep_mask(p):
    run(dropout_p=p, dtype=torch.bfloat16)


TENSOR_CORE_FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "bottom_right": {"causal": "bottom_right", "dtype": torch.float16},
    "window": {"window": (100, 20)},
    "bool_mask": {"mask": "bool"},
    "additive_mask": {"mask": "additive"},
    "dropout": {"dropout_p": 0.2},
    "softcap": {"softcap": 5.0, "scale": 0.3},
    "gqa_transposed": {"Hq": 4, "Hkv": 1, "layout": "bshd", "dtype": torch.float16},
}


@pytest.mark.parametrize("feature", list(TENSOR_CORE_FEATURES))
@pytest.mark.parametrize("D", [64, 128, 256])
def test_features_at_tensor_core_head_dims(D, feature):
    """Every feature at the head dims the tensor-core kernels specialise on (on
    sm_90 the TMA/wgmma kernels), over several query blocks and key tiles with
    partial ones at both ends."""
    options = dict(TENSOR_CORE_FEATURES[feature])
    Sq, Sk = 300, 333
    if options.get("mask") == "bool":
        options["mask"] = torch.rand(1, 2, Sq, Sk) > 0.2
    elif options.get("mask") == "additive":
        options["mask"] = torch.randn(Sq, Sk).masked_fill(torch.rand(Sq, Sk) > 0.9, float("-inf"))
    run(B=1, Hq=options.pop("Hq", 2), Hkv=options.pop("Hkv", 1), Sq=Sq, Sk=Sk, D=D,
        dtype=options.pop("dtype", torch.bfloat16), **options)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_transposed_layout_is_zero_copy(dtype):
    run(layout="bshd", dtype=dtype, Dv=24)


def test_gradients_take_the_layout_of_their_inputs():
    q = torch.randn(2, 50, 4, 32, device=DEVICE).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(2, 4, 60, 32, device=DEVICE, requires_grad=True) for _ in range(2))
    flashjit.attention(q, k, v).sum().backward()
    assert q.grad.stride() == q.stride() and k.grad.is_contiguous()


def test_non_unit_last_dim_stride_and_expanded_gradient():
    base = torch.randn(2, 4, 30, 64, device=DEVICE)
    q = base[..., ::2].detach().requires_grad_()  # last-dim stride 2
    k, v = (torch.randn(2, 4, 30, 32, device=DEVICE, requires_grad=True) for _ in range(2))
    flashjit.attention(q, k, v).sum().backward()  # .sum() hands back a stride-0 gradient
    ref = leaves(q, k, v, device="cpu", dtype=torch.float64)
    naive_attention(*ref)[0].sum().backward()
    for got, want in zip((q, k, v), ref):
        assert torch.allclose(got.grad.cpu().double(), want.grad, atol=1e-5)


def test_gradients_of_dense_inputs_whose_last_dim_is_not_innermost():
    """q, k, v views of [B, H, D, S] memory (dense, the last dim's stride S): the forward reads
    their rows through copies, and the gradients come back contiguous (a gradient in the input's
    own layout would have rows the kernels cannot write)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 32, s, device=DEVICE).transpose(-1, -2).requires_grad_() for s in (30, 41, 41))
    dout = torch.randn(2, 4, 30, 32, device=DEVICE)
    flashjit.attention(q, k, v, causal="bottom_right").backward(dout)
    ref = leaves(q, k, v, device="cpu", dtype=torch.float64)
    naive_attention(*ref, causal="bottom_right")[0].backward(dout.cpu().double())
    for got, want in zip((q, k, v), ref):
        assert got.grad.shape == got.shape
        assert torch.allclose(got.grad.cpu().double(), want.grad, atol=1e-5)


@pytest.mark.cpu_only
def test_numpy_arrays():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 33, 16)).astype(np.float32) for _ in range(3))
    o, lse = flashjit.attention(q, k, v, causal=True, return_lse=True)
    assert isinstance(o, np.ndarray) and o.dtype == np.float32 and lse.dtype == np.float32
    ref, _ = naive_attention(*(torch.from_numpy(x) for x in (q, k, v)), causal=True)
    assert np.abs(o - ref.numpy()).max() < 1e-5
    dq, dk, dv = flashjit.attention_backward(q, k, v, o, lse, np.ones_like(o), causal=True)
    assert dq.shape == q.shape and np.isfinite(dq).all()


def test_explicit_backward_matches_autograd():
    q, k, v = (torch.randn(2, 4, 40, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    o, lse = flashjit.attention(q, k, v, causal=True, dropout_p=0.2, seed=9, return_lse=True)
    dout = torch.randn_like(o)
    o.backward(dout)
    explicit = flashjit.attention_backward(q.detach(), k.detach(), v.detach(), o.detach(), lse, dout, causal=True,
                                           dropout_p=0.2, seed=9)
    assert all(torch.equal(a, x.grad) for a, x in zip(explicit, (q, k, v)))


def test_no_grad_inputs_give_no_graph():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    assert not flashjit.attention(q, q, q).requires_grad


def test_backward_is_deterministic():
    q, k, v = (torch.randn(2, 4, 150, 40, dtype=torch.bfloat16, device=DEVICE) for _ in range(3))
    o, lse = flashjit.attention(q, k, v, dropout_p=0.1, seed=5, return_lse=True)
    dout = torch.randn_like(o)
    first = flashjit.attention_backward(q, k, v, o, lse, dout, dropout_p=0.1, seed=5)
    for _ in range(3):
        again = flashjit.attention_backward(q, k, v, o, lse, dout, dropout_p=0.1, seed=5)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.cpu_only
def test_cpu_backward_is_identical_across_thread_counts():
    q, k, v = (torch.randn(2, 4, 150, 40, dtype=torch.bfloat16) for _ in range(3))
    o, lse = flashjit.attention(q, k, v, dropout_p=0.1, seed=5, return_lse=True)
    dout = torch.randn_like(o)
    first = flashjit.attention_backward(q, k, v, o, lse, dout, dropout_p=0.1, seed=5, num_threads=1)
    for threads in (2, 3, 0):
        again = flashjit.attention_backward(q, k, v, o, lse, dout, dropout_p=0.1, seed=5, num_threads=threads)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_dropout_seed_from_torch_generator_is_repeatable():
    q = torch.randn(1, 2, 20, 16, device=DEVICE)
    torch.manual_seed(3)
    a = flashjit.attention(q, q, q, dropout_p=0.3)
    torch.manual_seed(3)
    b = flashjit.attention(q, q, q, dropout_p=0.3)
    c = flashjit.attention(q, q, q, dropout_p=0.3)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _gradients(q, k, v, dout, **options):
    fq, fk, fv = leaves(q, k, v, device=DEVICE)
    o = flashjit.attention(fq, fk, fv, **options)
    o.backward(dout.to(DEVICE))
    return o.detach().cpu(), tuple(x.grad.cpu() for x in (fq, fk, fv))


@pytest.mark.parametrize("D", [64, 96, 128])
def test_nondeterministic_backward(D, monkeypatch, tmp_path):
    # deterministic=False lets the backward sum dq in no fixed order where that measured faster
    # (the sm_90a one pass with unordered adds at head dims up to 64, and at 128 in whole steps):
    # checked against float64 like every backward, and it was the kernel compiled there. Elsewhere
    # (the CPU, other GPUs, head dim 96) and under torch.use_deterministic_algorithms(True) the gradients are bitwise
    # the deterministic ones. Anything but a bool is refused, naming the argument.
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(tmp_path))
    if DEVICE == "cuda":
        flashjit.cuda.clear_memory_cache()
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    torch.manual_seed(5)
    q, k, v = torch.randn(2, 8, 300, D).to(dtype), torch.randn(2, 2, 300, D).to(dtype), torch.randn(2, 2, 300, D).to(dtype)
    dout = torch.randn(2, 8, 300, D).to(dtype)
    o, grads = _gradients(q, k, v, dout, causal=True)
    o_free, grads_free = _gradients(q, k, v, dout, causal=True, deterministic=False)
    assert torch.equal(o, o_free)  # the forward is the same call
    exact = leaves(q, k, v)
    exact_o, _ = naive_attention(*exact, causal=True)
    exact_o.backward(dout.double())
    low = leaves(q, k, v)
    base_o, _ = naive_attention(*low, causal=True, dtype=dtype)
    base_o.backward(dout)
    for name, got, base, ref in zip(("dq", "dk", "dv"), grads_free, low, exact):
        check(name, got, base.grad, ref.grad, dtype)
    unordered = (DEVICE == "cuda" and torch.cuda.get_device_capability() == (9, 0) and D in (64, 128))
    if not unordered:
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_free))
    else:
        compiled = [path.name for path in tmp_path.rglob("*") if path.is_file()]
        assert any("_dq-atomic" in name and ("_whole-concurrent" in name) == (D == 128) for name in compiled), compiled
    with _deterministic_algorithms():
        _, forced = _gradients(q, k, v, dout, causal=True, deterministic=False)
    assert all(torch.equal(a, b) for a, b in zip(grads, forced))
    with pytest.raises(TypeError, match=r"\[attention\] deterministic: expected True"):
        flashjit.attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), deterministic="no")
    with pytest.raises(TypeError, match=r"\[attention_backward\] deterministic: expected True"):
        flashjit.attention_backward(*(x.to(DEVICE) for x in (q, k, v)), o.to(DEVICE),
                                    torch.zeros(2, 8, 300, device=DEVICE), dout.to(DEVICE), deterministic=1)


class _deterministic_algorithms:
    """torch.use_deterministic_algorithms(True) for a block, restored after it."""

    def __enter__(self):
        self.before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.before)


@pytest.mark.skipif(DEVICE != "cuda", reason="the sm_90a backward's parts are CUDA's")
@pytest.mark.parametrize("parts", ["auto", "2", "8"])
@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
def test_dkdv_parts(parts, causal, monkeypatch):
    # FLASHJIT_CUDA_DKDV_PARTS: the split dK/dV kernel over a GQA group's query heads in parts,
    # their float32 sums added in part order by the key block's last part to finish. Against
    # float64 (run), bitwise the same on a second run (the order is fixed whichever part ends
    # last), dq bitwise the unparted backward's (its kernel is untouched), with a mask, dropout
    # and softcap, groups of 8 and 7 at batch 1 (few key blocks: "auto" takes parts), head dims 64 and
    # 128. The kernels come from the run's shared disk cache (test_dkdv_parts_kernel_is_the_one_compiled
    # checks, from an empty cache, that the parts kernel is built), so that the nine cases do not
    # each compile them all.
    for shape, extras in ((dict(B=1, Hq=16, Hkv=2, Sq=700, Sk=700, D=64), {}),
                          # a group of 7: "auto" takes 7 parts, "2" and "8" none
                          (dict(B=1, Hq=14, Hkv=2, Sq=600, Sk=640, D=64), {}),
                          (dict(B=1, Hq=16, Hkv=2, Sq=500, Sk=650, D=128), {}),
                          (dict(B=2, Hq=8, Hkv=1, Sq=300, Sk=333, D=64),
                           dict(mask=torch.rand(2, 1, 300, 333) > 0.2, softcap=20.0, dropout_p=0.1))):
        results = []
        for setting in (parts, parts, "off"):
            monkeypatch.setenv("FLASHJIT_CUDA_DKDV_PARTS", setting)
            torch.manual_seed(3)
            results.append(run(dtype=torch.bfloat16, causal=causal, **shape, **extras))
        (o, lse, grads), (o2, lse2, grads2), (_, _, plain) = results
        assert torch.equal(o, o2) and all(torch.equal(a, b) for a, b in zip(grads, grads2)), shape
        assert torch.equal(grads[0], plain[0]), shape


@pytest.mark.skipif(DEVICE != "cuda", reason="the sm_90a backward's parts are CUDA's")
@pytest.mark.parametrize("parts, shape, extras", [
    ("auto", dict(B=1, Hq=14, Hkv=2, Sq=600, Sk=640, D=64), dict(causal=True)),  # a group of 7: 7 parts
    ("8", dict(B=2, Hq=8, Hkv=1, Sq=300, Sk=333, D=128), dict(softcap=20.0, dropout_p=0.1)),  # 8 parts
], ids=["auto-7", "8-features"])
def test_dkdv_parts_kernel_is_the_one_compiled(parts, shape, extras, monkeypatch, tmp_path):
    # The dK/dV kernel in parts is the one compiled (on sm_90) into an empty cache for a batch-1
    # group of 7 by default and for a group of 8 asked for 8 parts with softcap, dropout and a
    # mask at head dim 128, and its gradients match float64 (run).
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FLASHJIT_CUDA_DKDV_PARTS", parts)
    flashjit.cuda.clear_memory_cache()
    torch.manual_seed(3)
    mask = torch.rand(shape["B"], 1, shape["Sq"], shape["Sk"]) > 0.2 if "dropout_p" in extras else None
    run(dtype=torch.bfloat16, mask=mask, **shape, **extras)
    if torch.cuda.get_device_capability() == (9, 0):
        compiled = [path.name for path in tmp_path.rglob("*") if path.is_file()]
        assert any("backward_dkdv" in name and "_parts_" in name for name in compiled), compiled


@pytest.mark.skipif(DEVICE != "cuda", reason="programmatic launches of the sm_90a backward are CUDA's")
@pytest.mark.parametrize("causal", [False, True])
def test_backward_overlap_gives_the_same_bits(causal, monkeypatch, tmp_path):
    # FLASHJIT_CUDA_BACKWARD_OVERLAP=1: the dK/dV kernel launched while the dQ kernel runs gives
    # the default backward's bits (the kernels compute the same; only their launch overlaps), at
    # head dims 64 and 128, in GQA groups (in parts at batch 1) and with a mask, dropout and softcap;
    # on sm_90 its own dQ and dK/dV kernels are the ones built (into an empty cache).
    monkeypatch.setenv("FLASHJIT_CUDA_BACKWARD", "split")
    for shape, extras in ((dict(B=2, Hq=8, Hkv=8, Sq=700, Sk=700, D=64), {}),
                          (dict(B=1, Hq=16, Hkv=2, Sq=500, Sk=650, D=128), {}),
                          (dict(B=2, Hq=8, Hkv=2, Sq=300, Sk=333, D=64),
                           dict(mask=torch.rand(2, 1, 300, 333) > 0.2, softcap=20.0, dropout_p=0.1))):
        results = []
        for setting in ("0", "1"):
            monkeypatch.setenv("FLASHJIT_CUDA_BACKWARD_OVERLAP", setting)
            torch.manual_seed(5)
            results.append(run(dtype=torch.bfloat16, causal=causal, **shape, **extras))
        (o, lse, grads), (o2, lse2, grads2) = results
        assert torch.equal(o, o2) and torch.equal(lse, lse2), shape
        assert all(torch.equal(a, b) for a, b in zip(grads, grads2)), shape
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FLASHJIT_CUDA_BACKWARD_OVERLAP", "1")
    flashjit.cuda.clear_memory_cache()
    run(dtype=torch.bfloat16, causal=causal, B=2, Hq=4, Hkv=4, Sq=256, Sk=256, D=64)
    if torch.cuda.get_device_capability() == (9, 0):
        compiled = [path.name for path in tmp_path.rglob("*.cubin")]
        for kernel in ("backward_dq", "backward_dkdv"):
            assert any(kernel in name and "_pdl_" in name for name in compiled), compiled


def test_output_takes_the_layout_of_a_transposed_q():
    # A q that is a [B, S, H, D] buffer viewed as [B, H, S, D] gets an o laid out the same way (as
    # torch's fused SDPA kernels do), so that transposing it back copies nothing; its values and
    # gradients are those of contiguous inputs; a repeated (planned) call keeps the layout; a
    # contiguous q keeps a contiguous o.
    torch.manual_seed(2)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    B, S, Hq, Hkv, D = 2, 70, 4, 2, 32
    q, k, v = (torch.randn(B, S, h, D, dtype=dtype, device=DEVICE).transpose(1, 2) for h in (Hq, Hkv, Hkv))
    for _ in range(2):  # the second call from the first one's plan
        o = flashjit.attention(q, k, v, causal=True)
        assert o.shape == (B, Hq, S, D) and o.transpose(1, 2).is_contiguous()
    assert torch.equal(o, flashjit.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True))
    leaves_t = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = flashjit.attention(*leaves_t, causal=True)
    assert out.transpose(1, 2).is_contiguous()
    dout = torch.randn(B, S, Hq, D, dtype=dtype, device=DEVICE)
    out.transpose(1, 2).backward(dout)
    plain = [x.detach().contiguous().requires_grad_() for x in (q, k, v)]
    flashjit.attention(*plain, causal=True).transpose(1, 2).backward(dout)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(leaves_t, plain))
    assert flashjit.attention(*(x.contiguous() for x in (q, k, v))).is_contiguous()
