"""Finite differences against flashjit's backward in float64: checks the
gradients without any reference implementation."""

import pytest
import torch

import flashjit


class Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, options):
        o, lse = flashjit.attention(q, k, v, **options)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.options = options
        return o

    @staticmethod
    def backward(ctx, dout):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flashjit.attention_backward(q, k, v, o, lse, dout.contiguous(), **ctx.options)
        return dq, dk, dv, None


OPTIONS = {
    "plain": {},
    "causal_bottom_right": {"causal": "bottom_right"},
    "window": {"window": (3, 2)},
    "softcap_scale": {"softcap": 1.5, "scale": 0.8},
    "bool_mask": {"attn_mask": torch.rand(1, 1, 6, 9, generator=torch.Generator().manual_seed(1)) > 0.3},
    "float_mask": {"attn_mask": torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))},
    "dropout": {"dropout_p": 0.3, "seed": 7},
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_gradcheck_float64(name):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(2, 2, 9, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(2, 2, 9, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: Attention.apply(q, k, v, OPTIONS[name]), (q, k, v))
