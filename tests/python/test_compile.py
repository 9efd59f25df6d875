"""flashjit under torch.compile(fullgraph=True): a small transformer block runs
forward and backward through the flashjit ops with no graph break and matches
eager mode."""

import pytest
import torch
import torch.nn.functional as F

import flashjit
from conftest import DEVICE


class Block(torch.nn.Module):
    """Pre-norm transformer block: causal self-attention (GQA) + MLP."""

    def __init__(self, dim=64, heads=4, kv_heads=2, attention=flashjit.scaled_dot_product_attention):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.out = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))
        self.attention = attention

    def forward(self, x):
        b, s, d = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(b, s, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = self.attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.out(o.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.norm2(x))


def train_step(model, x):
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()] + [x.grad]
    model.zero_grad()
    return y.detach(), grads


def flashjit_ops_run(fn):
    """Names of the flashjit ops that ran inside fn (through the dispatcher)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("flashjit::")}


@pytest.mark.parametrize("dynamic", [False, True])
def test_block_compiles_without_graph_breaks_and_matches_eager(dynamic):
    torch._dynamo.reset()
    model = Block().to(DEVICE)
    x = torch.randn(2, 45, 64, device=DEVICE)
    eager_y, eager_grads = train_step(model, x)
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)
    ran = flashjit_ops_run(lambda: train_step(compiled, x))
    assert ran == {"flashjit::fwd", "flashjit::bwd"}
    y, grads = train_step(compiled, x)
    assert torch.allclose(y, eager_y, atol=1e-5)
    for a, b in zip(grads, eager_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    if dynamic:  # another sequence length reuses the graph
        train_step(compiled, torch.randn(2, 70, 64, device=DEVICE))


def test_patched_torch_sdpa_compiles_to_flashjit():
    torch._dynamo.reset()
    model = Block(attention=lambda *a, **kw: F.scaled_dot_product_attention(*a, **kw)).to(DEVICE)
    x = torch.randn(2, 33, 64, device=DEVICE)
    unpatched_y, _ = train_step(model, x)
    with flashjit.sdpa_patched():
        compiled = torch.compile(model, fullgraph=True)
        assert flashjit_ops_run(lambda: train_step(compiled, x)) == {"flashjit::fwd", "flashjit::bwd"}
        y, _ = train_step(compiled, x)
    assert torch.allclose(y, unpatched_y, atol=1e-5)


def test_dropout_under_compile_draws_a_new_seed_each_call():
    torch._dynamo.reset()
    q = torch.randn(1, 2, 16, 16, device=DEVICE)
    f = torch.compile(lambda q: flashjit.scaled_dot_product_attention(q, q, q, dropout_p=0.5), fullgraph=True)
    first, second = f(q), f(q)
    assert not torch.equal(first, second)


def test_dropout_seeds_under_compile_are_drawn_apart_and_need_no_generated_kernel():
    # The seeds come from flashjit's own draw op, which the compiled code calls as it is: no kernel
    # is generated for them (none needs a C++ toolchain, on a GPU model too), two dropouts of one
    # graph draw two seeds, and the backward reuses the forward's (a draw is never recomputed).
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    q = torch.randn(1, 2, 16, 16, device=DEVICE)

    def twice(q):
        return (flashjit.scaled_dot_product_attention(q, q, q, dropout_p=0.5),
                flashjit.scaled_dot_product_attention(q, q, q, dropout_p=0.5))

    (first, second), code = run_and_get_code(torch.compile(twice, fullgraph=True), q)
    source = "\n".join(code)
    assert "draw_rng" in source and "randint" not in source and "cpp_fused" not in source, source
    assert not torch.equal(first, second)
    draws = flashjit.ops._COMPILED_DRAWS.item()
    x = torch.randn(1, 2, 16, 16, device=DEVICE, requires_grad=True)
    torch.compile(lambda x: flashjit.scaled_dot_product_attention(x, x, x, dropout_p=0.5),
                  fullgraph=True)(x).sum().backward()
    assert flashjit.ops._COMPILED_DRAWS.item() == draws + 1 and torch.isfinite(x.grad).all()


def test_attention_with_extra_options_compiles():
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 4, 40, 32, device=DEVICE, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return flashjit.attention(q, k, v, causal="bottom_right", window=(8, 0), softcap=20.0)

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    assert torch.allclose(eager, compiled)
    compiled.sum().backward()


def test_torch_jit_trace_records_the_op():
    q, k, v = (torch.randn(2, 4, 20, 16, device=DEVICE) for _ in range(3))
    with torch.no_grad():
        traced = torch.jit.trace(lambda q, k, v: flashjit.scaled_dot_product_attention(q, k, v, is_causal=True),
                                 (q, k, v), check_trace=False)
    assert "flashjit::fwd" in str(traced.graph)
    q2, k2, v2 = (torch.randn(2, 4, 20, 16, device=DEVICE) for _ in range(3))
    assert torch.allclose(traced(q2, k2, v2), F.scaled_dot_product_attention(q2, k2, v2, is_causal=True),
                          atol=1e-5)


def test_patched_fallback_compiles_without_graph_breaks():
    torch._dynamo.reset()
    q = torch.randn(1, 2, 8, 16, device=DEVICE, requires_grad=True)
    mask = torch.randn(8, 8, device=DEVICE, requires_grad=True)  # flashjit gives no mask gradient: torch serves
    with flashjit.sdpa_patched():
        f = torch.compile(lambda q, m: F.scaled_dot_product_attention(q, q, q, attn_mask=m), fullgraph=True)
        f(q, mask).sum().backward()
    assert mask.grad is not None
