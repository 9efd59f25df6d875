"""Finite differences against flashjit's autograd in float64 on the CPU: checks
the gradients (and the double backward) without any reference implementation."""

import pytest
import torch

import flashjit

pytestmark = pytest.mark.cpu_only

GEN = torch.Generator().manual_seed(1)
OPTIONS = {
    "plain": {},
    "causal_top_left": {"causal": True},
    "causal_bottom_right": {"causal": "bottom_right"},
    "window": {"window": (3, 2)},
    "softcap_scale": {"softcap": 1.5, "scale": 0.8},
    "bool_mask": {"attn_mask": torch.rand(1, 1, 6, 9, generator=GEN) > 0.3},
    "bool_mask_per_head": {"attn_mask": torch.rand(2, 4, 1, 9, generator=GEN) > 0.3},
    "float_mask": {"attn_mask": torch.randn(6, 9, dtype=torch.float64, generator=GEN)},
    "dropout": {"dropout_p": 0.3, "seed": 7},
}


def inputs(heads_kv=2):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(2, heads_kv, 9, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(2, heads_kv, 9, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("name", list(OPTIONS))
def test_gradcheck_attention(name):
    assert torch.autograd.gradcheck(lambda q, k, v: flashjit.attention(q, k, v, **OPTIONS[name]), inputs())


@pytest.mark.parametrize("heads_kv", [1, 2, 4])
def test_gradcheck_gqa(heads_kv):
    assert torch.autograd.gradcheck(lambda q, k, v: flashjit.attention(q, k, v, causal=True), inputs(heads_kv))


@pytest.mark.parametrize("mask,is_causal", [("none", False), ("none", True), ("bool", False), ("float", False)])
def test_gradcheck_sdpa(mask, is_causal):
    attn_mask = {"none": None, "bool": torch.rand(6, 9, generator=GEN) > 0.4,
                 "float": torch.randn(2, 1, 6, 9, dtype=torch.float64, generator=GEN)}[mask]
    q, k, v = inputs(heads_kv=2)
    assert torch.autograd.gradcheck(
        lambda q, k, v: flashjit.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=is_causal,
                                                               enable_gqa=True), (q, k, v))


@pytest.mark.parametrize("name", ["plain", "causal_bottom_right", "softcap_scale", "bool_mask", "float_mask"])
def test_gradgradcheck(name):
    assert torch.autograd.gradgradcheck(lambda q, k, v: flashjit.attention(q, k, v, **OPTIONS[name]), inputs())


def test_gradgradcheck_with_rows_that_see_no_key():
    mask = torch.rand(6, 9, generator=GEN) > 0.3
    mask[2] = False
    assert torch.autograd.gradgradcheck(lambda q, k, v: flashjit.attention(q, k, v, attn_mask=mask), inputs())
    # bottom-right causal with Sq > Sk leaves the first rows without keys
    q, k, v = inputs()
    assert torch.autograd.gradgradcheck(lambda q, k, v: flashjit.attention(q, k[:, :, :4], v[:, :, :4],
                                                                           causal="bottom_right"), (q, k, v))


def test_double_backward_with_dropout_says_so():
    q, k, v = inputs()
    o = flashjit.attention(q, k, v, dropout_p=0.2, seed=1)
    (dq,) = torch.autograd.grad(o.sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match=r"double backward: not supported with dropout_p > 0"):
        dq.sum().backward()
