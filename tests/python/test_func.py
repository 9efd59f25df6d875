"""torch.func transforms over flashjit's ops: vmap (a batching rule that folds the
mapped dim into the batch), grad, vjp and jacrev, and gradcheck's batched
gradients, each against torch's own attention in float64."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import flashjit
from conftest import DEVICE


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE)


def torch_attention(q, k, v, **options):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **options)


@pytest.mark.parametrize("mapped", ["q", "kv", "all", "mask"])
def test_vmap_matches_a_loop(mapped):
    torch.manual_seed(0)
    n = 3
    q, k, v = randn(n, 2, 4, 7, 16), randn(n, 2, 2, 9, 16), randn(n, 2, 2, 9, 16)
    mask = torch.rand(n, 2, 1, 7, 9, device=DEVICE) > 0.3
    mask[..., 0] = True
    if mapped == "q":
        got = torch.func.vmap(lambda a: flashjit.attention(a, k[0], v[0], causal="bottom_right"))(q)
        want = [torch_attention(q[i], k[0], v[0], attn_mask=torch.ones(7, 9, dtype=torch.bool,
                                                                        device=DEVICE).tril(2)) for i in range(n)]
    elif mapped == "kv":
        got = torch.func.vmap(lambda b, c: flashjit.attention(q[0], b, c), in_dims=(1, 1))(k.movedim(0, 1),
                                                                                           v.movedim(0, 1))
        want = [torch_attention(q[0], k[i], v[i]) for i in range(n)]
    elif mapped == "all":
        got = torch.func.vmap(lambda a, b, c, m: flashjit.attention(a, b, c, attn_mask=m))(q, k, v, mask)
        want = [torch_attention(q[i], k[i], v[i], attn_mask=mask[i]) for i in range(n)]
    else:  # a mask of batch 1 mapped over, inputs not
        got = torch.func.vmap(lambda m: flashjit.attention(q[0], k[0], v[0], attn_mask=m))(mask[:, :1])
        want = [torch_attention(q[0], k[0], v[0], attn_mask=mask[i, :1]) for i in range(n)]
    assert (got - torch.stack(want)).abs().max() < 1e-12


def test_grad_vjp_and_jacrev_match_torch():
    torch.manual_seed(1)
    q, k, v = randn(2, 4, 6, 8), randn(2, 2, 5, 8), randn(2, 2, 5, 8)

    def ours(a, b, c):
        return flashjit.attention(a, b, c, causal=True)

    def theirs(a, b, c):
        return torch_attention(a, b, c, is_causal=True)

    for argnums in (0, 1, 2):
        got = torch.func.grad(lambda *x: ours(*x).pow(2).sum(), argnums=argnums)(q, k, v)
        want = torch.func.grad(lambda *x: theirs(*x).pow(2).sum(), argnums=argnums)(q, k, v)
        assert (got - want).abs().max() < 1e-12
    dout = randn(2, 4, 6, 8)
    got = torch.func.vjp(ours, q, k, v)[1](dout)
    want = torch.func.vjp(theirs, q, k, v)[1](dout)
    assert all((g - w).abs().max() < 1e-12 for g, w in zip(got, want))
    small = (q[:1, :1, :3, :4], k[:1, :1, :4, :4], v[:1, :1, :4, :4])
    got = torch.func.jacrev(ours)(*small)
    want = torch.func.jacrev(theirs)(*small)
    assert (got - want).abs().max() < 1e-12
    # Per-sample gradients: vmap over grad.
    got = torch.func.vmap(torch.func.grad(lambda a: ours(a, k[:1], v[:1]).sum()))(q[:, None])
    want = torch.func.vmap(torch.func.grad(lambda a: theirs(a, k[:1], v[:1]).sum()))(q[:, None])
    assert (got - want).abs().max() < 1e-12


@pytest.mark.parametrize("options", [{}, dict(causal="bottom_right"), dict(softcap=3.0)],
                         ids=["plain", "causal", "softcap"])
def test_gradcheck_with_batched_gradients(options):
    torch.manual_seed(2)
    inputs = tuple(x.requires_grad_() for x in (randn(1, 2, 5, 8), randn(1, 1, 6, 8), randn(1, 1, 6, 8)))
    assert gradcheck(lambda *x: flashjit.attention(*x, **options), inputs, check_batched_grad=True)
    assert gradgradcheck(lambda *x: flashjit.attention(*x, **options), inputs, check_batched_grad=True)


def test_gradcheck_through_the_sdpa_patch():
    torch.manual_seed(3)
    inputs = tuple(x.requires_grad_() for x in (randn(2, 3, 4, 8), randn(2, 3, 5, 8), randn(2, 3, 5, 8)))
    with flashjit.sdpa_patched():
        assert gradcheck(lambda *x: F.scaled_dot_product_attention(*x), inputs, check_batched_grad=True)


def test_vmap_dropout_randomness():
    q, k, v = randn(3, 1, 2, 5, 8), randn(1, 2, 6, 8), randn(1, 2, 6, 8)

    def f(a):
        return flashjit.attention(a, k, v, dropout_p=0.5, seed=11)

    same = torch.func.vmap(f, randomness="same")(q[:1].expand(3, -1, -1, -1, -1))
    assert torch.equal(same[0], same[2])
    assert torch.equal(same[0], f(q[0]))  # the mask a plain call with that seed draws
    different = torch.func.vmap(f, randomness="different")(q[:1].expand(3, -1, -1, -1, -1))
    assert not torch.equal(different[0], different[2])
    with pytest.raises(RuntimeError, match="random"):
        torch.func.vmap(f)(q)
