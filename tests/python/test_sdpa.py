"""flashjit.scaled_dot_product_attention has the semantics of
torch.nn.functional.scaled_dot_product_attention: outputs and gradients against
torch's math path in float64 (oracle) and in the input dtype (baseline)."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashjit
from conftest import DEVICE
from reference import check, leaves, naive_attention


def torch_math(q, k, v, **kwargs):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def compare(q_shape, k_shape, v_shape, dtype=torch.float32, attn_mask=None, **kwargs):
    """flashjit on DEVICE against torch's math SDPA; returns flashjit's output and input grads."""
    q, k, v = (torch.randn(shape).to(dtype) for shape in (q_shape, k_shape, v_shape))
    flash = leaves(q, k, v, device=DEVICE)
    mask_dev = None if attn_mask is None else attn_mask.to(DEVICE)
    o = flashjit.scaled_dot_product_attention(*flash, attn_mask=mask_dev, **kwargs)
    exact = leaves(q, k, v, dtype=torch.float64)
    exact_mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.double()
    exact_o = torch_math(*exact, attn_mask=exact_mask, **kwargs)
    low = leaves(q, k, v)
    base_o = torch_math(*low, attn_mask=attn_mask, **kwargs)
    assert o.shape == exact_o.shape and o.dtype == dtype and o.device == flash[0].device
    check("o", o, base_o, exact_o, dtype)
    dout = torch.randn(o.shape).to(dtype)
    o.backward(dout.to(DEVICE))
    exact_o.backward(dout.double())
    base_o.backward(dout)
    for name, got, base, ref in zip(("dq", "dk", "dv"), flash, low, exact):
        check(name, got.grad, base.grad, ref.grad, dtype)
    return o.detach().cpu(), [x.grad.cpu() for x in flash]


SHAPES = {
    "4d": ((2, 4, 33, 16), (2, 4, 40, 16), (2, 4, 40, 16)),
    "3d": ((4, 33, 16), (4, 40, 16), (4, 40, 16)),
    "2d": ((33, 16), (40, 16), (40, 8)),
    "5d": ((2, 3, 2, 33, 16), (2, 3, 2, 40, 16), (2, 3, 2, 40, 16)),
    "batch_broadcast": ((2, 3, 4, 33, 16), (1, 3, 4, 40, 16), (1, 3, 4, 40, 16)),
    "rank_broadcast": ((2, 4, 33, 16), (4, 40, 16), (4, 40, 16)),
    "value_head_dim_differs": ((2, 4, 33, 64), (2, 4, 40, 64), (2, 4, 40, 24)),
    "kv_heads_broadcast": ((2, 4, 33, 16), (2, 1, 40, 16), (2, 1, 40, 16)),
    "query_heads_broadcast": ((2, 1, 33, 16), (2, 4, 40, 16), (2, 4, 40, 16)),
    "one_query": ((2, 4, 1, 64), (2, 4, 129, 64), (2, 4, 129, 64)),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_shapes(name):
    compare(*SHAPES[name])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["4d", "value_head_dim_differs", "5d"])
def test_half_precision(name, dtype):
    compare(*SHAPES[name], dtype=dtype)


@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (8, 1), (6, 6)])
def test_enable_gqa(Hq, Hkv):
    compare((2, Hq, 33, 32), (2, Hkv, 40, 32), (2, Hkv, 40, 32), dtype=torch.bfloat16, enable_gqa=True)


MASKS = {
    "bool_2d": lambda: torch.rand(33, 40) > 0.3,
    "float_2d": lambda: torch.randn(33, 40),
    "bool_per_batch": lambda: torch.rand(2, 1, 33, 40) > 0.3,
    "float_per_head_row": lambda: torch.randn(4, 1, 40),
    "bool_full": lambda: torch.rand(2, 4, 33, 40) > 0.5,
    "float_with_minus_inf": lambda: torch.randn(33, 40).masked_fill(torch.rand(33, 40) > 0.7, float("-inf")),
    "bool_key_padding": lambda: (torch.arange(40) < torch.tensor([25, 40])[:, None])[:, None, None, :],
}


@pytest.mark.parametrize("name", list(MASKS))
def test_masks(name):
    compare(*SHAPES["4d"], attn_mask=MASKS[name]())


def test_float32_mask_with_bfloat16_inputs():
    compare(*SHAPES["4d"], dtype=torch.bfloat16, attn_mask=torch.randn(33, 40))


def test_mask_with_5d_inputs():
    compare(*SHAPES["5d"], attn_mask=torch.rand(3, 1, 33, 40) > 0.3)


def test_fully_masked_rows_are_zero_with_zero_gradient():
    mask = torch.rand(2, 4, 33, 40) > 0.3
    mask[:, :, 5] = False
    o, (dq, _, _) = compare(*SHAPES["4d"], attn_mask=mask)
    assert torch.all(o[:, :, 5] == 0) and torch.all(dq[:, :, 5] == 0)


@pytest.mark.parametrize("Sq,Sk", [(33, 33), (20, 40), (40, 20)])
def test_is_causal_is_top_left(Sq, Sk):
    compare((2, 4, Sq, 32), (2, 4, Sk, 32), (2, 4, Sk, 32), dtype=torch.float16, is_causal=True)


@pytest.mark.parametrize("scale", [None, 0.3, 2.0])
def test_scale(scale):
    compare(*SHAPES["4d"], scale=scale)


def keep_mask_after_seed(torch_seed, shape, p):
    """The keep mask an SDPA call right after torch.manual_seed(torch_seed) uses."""
    torch.manual_seed(torch_seed)
    seed, offset = (int(x) & ((1 << 64) - 1) for x in flashjit.ops.dropout_rng())
    return torch.from_numpy(flashjit.dropout_keep_mask(*shape, dropout_p=p, seed=seed, offset=offset))


def test_dropout_uses_the_torch_generator_and_the_documented_keep_mask():
    q, k, v = (torch.randn(2, 4, 33, 16, device=DEVICE) for _ in range(3))
    keep = keep_mask_after_seed(11, (2, 4, 33, 33), 0.3)
    torch.manual_seed(11)
    o = flashjit.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    ref, _ = naive_attention(q.cpu(), k.cpu(), v.cpu(), dropout_p=0.3, keep=keep)
    assert torch.allclose(o.cpu().double(), ref, atol=1e-5)
    assert 0.6 < keep.float().mean() < 0.8
    assert not torch.equal(o, flashjit.scaled_dot_product_attention(q, k, v, dropout_p=0.3))


def test_dropout_gradients_use_the_same_keep_mask():
    q, k, v = (torch.randn(1, 2, 20, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.manual_seed(4)
    o = flashjit.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
    torch.manual_seed(4)
    o_again = flashjit.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
    assert torch.equal(o, o_again)
    grads = torch.autograd.grad(o.sum(), (q, k, v))
    ref = leaves(q, k, v)
    naive_attention(*ref, dropout_p=0.4, keep=keep_mask_after_seed(4, (1, 2, 20, 20), 0.4))[0].sum().backward()
    for got, want in zip(grads, ref):
        assert torch.allclose(got, want.grad, atol=1e-10)


def test_enable_gqa_with_unequal_key_and_value_heads():
    compare((2, 4, 33, 16), (2, 2, 40, 16), (2, 1, 40, 8), enable_gqa=True)


@pytest.mark.parametrize("q_shape,k_shape", [((2, 4, 0, 16), (2, 4, 7, 16)), ((2, 4, 5, 16), (2, 4, 0, 16)),
                                             ((0, 4, 5, 16), (0, 4, 7, 16))])
def test_empty_sizes_match_torch_with_sum_backward(q_shape, k_shape):
    q = torch.randn(q_shape, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(k_shape, device=DEVICE, requires_grad=True) for _ in range(2))
    o = flashjit.scaled_dot_product_attention(q, k, v)
    expected = F.scaled_dot_product_attention(*(x.detach().cpu() for x in (q, k, v)))
    assert o.shape == expected.shape
    assert torch.allclose(o.detach().cpu(), expected.nan_to_num(0.0))  # torch's math gives NaN rows for S = 0
    o.sum().backward()  # a stride-0 gradient of an empty tensor
    assert all(x.grad.shape == x.shape and torch.all(x.grad == 0) for x in (q, k, v))


def test_empty_head_dim_matches_torch():
    q, k = torch.randn(2, 4, 5, 0), torch.randn(2, 4, 7, 0)
    v = torch.randn(2, 4, 7, 8)
    assert torch.allclose(flashjit.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_dropout_p_one_gives_zeros_and_zero_gradients():
    q, k, v = (torch.randn(2, 4, 9, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    o = flashjit.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    assert torch.all(o == 0)
    o.sum().backward()
    assert all(torch.all(x.grad == 0) for x in (q, k, v))


def test_matches_torch_exactly_in_float64_on_cpu():
    q, k, v = (torch.randn(2, 4, 50, 24, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(50, 50) > 0.2
    assert torch.allclose(flashjit.scaled_dot_product_attention(q, k, v, mask), torch_math(q, k, v, attn_mask=mask),
                          atol=1e-12)


def test_keyword_only_arguments_match_torch():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(TypeError):
        flashjit.scaled_dot_product_attention(q, q, q, None, 0.0, False, 0.5)
    o = flashjit.scaled_dot_product_attention(query=q, key=q, value=q, attn_mask=None, dropout_p=0.0,
                                              is_causal=False, scale=0.5, enable_gqa=False)
    assert o.shape == q.shape


def q_k_v(Hq=4, Hkv=4, dtype=torch.float32, E=16, Ev=16, L=8, S=12):
    return (torch.randn(2, Hq, L, E, dtype=dtype), torch.randn(2, Hkv, S, E, dtype=dtype),
            torch.randn(2, Hkv, S, Ev, dtype=dtype))


OP = r"\[scaled_dot_product_attention\]"
BAD = [
    ("mask and is_causal", ValueError, OP + r" attn_mask: must be None when is_causal=True",
     q_k_v(), dict(attn_mask=torch.ones(8, 12, dtype=torch.bool), is_causal=True)),
    ("integer mask", TypeError, OP + r" attn_mask: expected a bool \(true = attend\) or float \(additive\) mask, got int32",
     q_k_v(dtype=torch.float16), dict(attn_mask=torch.ones(8, 12, dtype=torch.int32))),
    ("float64 mask with float32 query", TypeError, r"attn_mask: expected dtype .* got float64",
     q_k_v(), dict(attn_mask=torch.zeros(8, 12, dtype=torch.float64))),
    ("mask not broadcastable", ValueError, r"attn_mask: shape \[8, 5\] does not broadcast to the scores' "
     r"\[2, 4, 8, 12\]", q_k_v(), dict(attn_mask=torch.ones(8, 5, dtype=torch.bool))),
    ("mask with more dims than the scores", ValueError, r"attn_mask: shape \[1, 1, 1, 8, 12\] does not broadcast",
     q_k_v(), dict(attn_mask=torch.ones(1, 1, 1, 8, 12, dtype=torch.bool))),
    ("gqa without enable_gqa", ValueError, r"key: 2 heads \(value 2\) do not broadcast with query's 4; pass "
     r"enable_gqa=True", q_k_v(Hkv=2), {}),
    ("gqa heads not a multiple", ValueError, r"key: query heads \(4\) must be a multiple of key heads \(3\) "
     r"with enable_gqa=True", q_k_v(Hkv=3), dict(enable_gqa=True)),
    ("dropout_p above 1", ValueError, OP + r" dropout_p: expected a value in \[0, 1\], got 1.5", q_k_v(),
     dict(dropout_p=1.5)),
    ("key dtype", TypeError, OP + r" key: expected dtype float32 \(the dtype of query\), got float16",
     (torch.randn(2, 4, 8, 16), torch.randn(2, 4, 12, 16).half(), torch.randn(2, 4, 12, 16)), {}),
    ("integer inputs", TypeError, OP + r" query: expected dtype float32, float16, bfloat16 or float64, got int64",
     tuple(torch.ones(2, 4, 8, 16, dtype=torch.int64) for _ in range(3)), {}),
    ("1-d query", ValueError, OP + r" query: expected at least 2 dims \(..., seqlen, head_dim\), got 1",
     (torch.randn(16), torch.randn(12, 16), torch.randn(12, 16)), {}),
    ("head dim mismatch", ValueError, OP + r" key: head_dim 8 does not match query's 16",
     (torch.randn(2, 4, 8, 16), torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 16)), {}),
    ("key/value seqlen mismatch", ValueError, OP + r" value: expected shape \[2, 4, 12, 16\] \(batch, heads and seqlen of key\), got \[2, 4, 11, 16\]",
     (torch.randn(2, 4, 8, 16), torch.randn(2, 4, 12, 16), torch.randn(2, 4, 11, 16)), {}),
    ("batch dims", ValueError, OP + r" key: batch dims \[3\] do not broadcast with query's \[2\]",
     (torch.randn(2, 4, 8, 16), torch.randn(3, 4, 12, 16), torch.randn(3, 4, 12, 16)), {}),
    ("not a tensor", TypeError, OP + r" value: expected a torch.Tensor, got list",
     (torch.randn(2, 4, 8, 16), torch.randn(2, 4, 12, 16), [[1.0]]), {}),
    ("float mask requiring grad", NotImplementedError, r"mask: gradients into a float mask are not supported",
     q_k_v(), dict(attn_mask=torch.zeros(8, 12, requires_grad=True))),
]


@pytest.mark.parametrize("name,exc,match,tensors,kwargs", BAD, ids=[c[0] for c in BAD])
def test_rejects(name, exc, match, tensors, kwargs):
    with pytest.raises(exc, match=match):
        flashjit.scaled_dot_product_attention(*tensors, **kwargs)
