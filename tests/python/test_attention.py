"""flashjit on torch CPU tensors against the float64 reference. Tolerance: at
most 2x the error of naive attention in the input dtype, plus a rounding floor."""

import numpy as np
import pytest
import torch

import flashjit
from reference import naive_attention

FLOOR = {torch.float32: 1e-5, torch.float16: 2**-9, torch.bfloat16: 2**-6, torch.float64: 1e-12}


def max_err(a, b):
    finite = torch.isfinite(b)
    return (a.double() - b.double())[finite].abs().max().item() if finite.any() else 0.0


def check(name, actual, baseline, exact, dtype):
    err = max_err(actual, exact)
    base = max_err(baseline, exact)
    tol = 2 * base + FLOOR[dtype] * max(1.0, exact[torch.isfinite(exact)].abs().max().item() if exact.numel() else 1.0)
    assert err <= tol, f"{name}: error {err:.3g} > tolerance {tol:.3g} (baseline {base:.3g})"


def run(B=2, Hq=4, Hkv=2, Sq=70, Sk=90, D=32, Dv=None, dtype=torch.float32, layout="bhsd", mask=None,
        dropout_p=0.0, **options):
    Dv = Dv or D

    def make(H, S, d):
        if layout == "bshd":  # a [B, S, H, D] buffer viewed as [B, H, S, D]
            return torch.randn(B, S, H, d).to(dtype).transpose(1, 2)
        return torch.randn(B, H, S, d).to(dtype)

    q, k, v = make(Hq, Sq, D), make(Hkv, Sk, D), make(Hkv, Sk, Dv)
    seed = 1234
    o, lse = flashjit.attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, seed=seed, **options)
    keep = None
    if dropout_p:
        keep = torch.from_numpy(flashjit.dropout_keep_mask(B, Hq, Sq, Sk, dropout_p=dropout_p, seed=seed))
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    exact_o, exact_lse = naive_attention(*leaves, attn_mask=mask, dropout_p=dropout_p, keep=keep, **options)
    low = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    base_o, base_lse = naive_attention(*low, attn_mask=mask, dropout_p=dropout_p, keep=keep, dtype=dtype, **options)
    assert o.dtype == dtype and o.shape == (B, Hq, Sq, Dv)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    check("o", o, base_o, exact_o, dtype)
    check("lse", lse, base_lse, exact_lse, torch.float32)
    assert torch.equal(torch.isinf(lse), torch.isinf(exact_lse))

    dout = torch.randn_like(o)
    dq, dk, dv = flashjit.attention_backward(q, k, v, o, lse, dout, attn_mask=mask, dropout_p=dropout_p, seed=seed,
                                             **options)
    exact_o.backward(dout.double())
    base_o.backward(dout)
    for name, got, base, exact in zip(("dq", "dk", "dv"), (dq, dk, dv), low, leaves):
        assert got.dtype == dtype
        check(name, got, base.grad, exact.grad, dtype)
    return o, lse, (dq, dk, dv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("D", [1, 8, 40, 64, 72, 128, 256])
def test_head_dims_and_dtypes(dtype, D):
    run(D=D, dtype=dtype, Sq=65, Sk=63)


@pytest.mark.parametrize("Sq,Sk", [(1, 1), (7, 7), (63, 65), (127, 129), (1000, 1000), (7, 129), (129, 7)])
def test_seqlens(Sq, Sk):
    run(B=1, Hq=1, Hkv=1, Sq=Sq, Sk=Sk)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (8, 1)])
def test_gqa(Hq, Hkv):
    run(Hq=Hq, Hkv=Hkv, dtype=torch.bfloat16)


@pytest.mark.parametrize("causal", [True, "top_left", "bottom_right"])
@pytest.mark.parametrize("Sq,Sk", [(64, 64), (40, 100), (100, 40)])
def test_causal(causal, Sq, Sk):
    run(Sq=Sq, Sk=Sk, causal=causal, dtype=torch.float16)


@pytest.mark.parametrize("window", [(16, 0), (8, 8), (-1, 4), (4, -1)])
def test_window(window):
    run(Sq=120, Sk=150, window=window)


def test_softcap_and_scale():
    run(softcap=3.0, scale=0.7, dtype=torch.bfloat16)


@pytest.mark.parametrize("shape", [(70, 90), (1, 90), (4, 1, 90), (2, 1, 70, 90), (1, 4, 70, 90), (2, 4, 1, 90)])
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


def test_strided_layout_is_zero_copy():
    run(layout="bshd", dtype=torch.float16, Dv=24)


def test_numpy_arrays():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 33, 16)).astype(np.float32) for _ in range(3))
    o, lse = flashjit.attention(q, k, v, causal=True)
    assert isinstance(o, np.ndarray) and o.dtype == np.float32 and lse.dtype == np.float32
    ref, _ = naive_attention(*(torch.from_numpy(x) for x in (q, k, v)), causal=True)
    assert np.abs(o - ref.numpy()).max() < 1e-5
    dq, dk, dv = flashjit.attention_backward(q, k, v, o, lse, np.ones_like(o), causal=True)
    assert dq.shape == q.shape and np.isfinite(dq).all()


def test_tensors_requiring_grad_are_accepted():
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    o, _ = flashjit.attention(q, q, q)
    assert not o.requires_grad


def test_backward_is_deterministic():
    q, k, v = (torch.randn(2, 4, 150, 40, dtype=torch.bfloat16) for _ in range(3))
    o, lse = flashjit.attention(q, k, v, dropout_p=0.1, seed=5)
    dout = torch.randn_like(o)
    first = flashjit.attention_backward(q, k, v, o, lse, dout, dropout_p=0.1, seed=5, num_threads=1)
    for threads in (1, 2, 0):
        again = flashjit.attention_backward(q, k, v, o, lse, dout, dropout_p=0.1, seed=5, num_threads=threads)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
