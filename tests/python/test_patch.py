"""flashjit.patch_sdpa() routes torch.nn.functional.scaled_dot_product_attention
to flashjit, falls back (warning once per reason) where flashjit cannot serve,
and unpatch_sdpa() puts the original object back."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashjit
import flashjit.sdpa
from conftest import DEVICE

ORIGINAL = F.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def _restore():
    yield
    flashjit.unpatch_sdpa()
    assert F.scaled_dot_product_attention is ORIGINAL


@pytest.fixture
def calls(monkeypatch):
    """Counts calls that reach flashjit's SDPA."""
    count = {"n": 0}
    real = flashjit.sdpa.scaled_dot_product_attention

    def counted(*args, **kwargs):
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(flashjit.sdpa, "scaled_dot_product_attention", counted)
    return count


class SelfAttention(torch.nn.Module):
    """Looks F.scaled_dot_product_attention up at call time, as transformers does."""

    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.out(o.transpose(1, 2).reshape(b, s, d))


def run_module(module, x, mask=None):
    x = x.detach().clone().requires_grad_()
    y = module(x, mask)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in module.parameters()] + [x.grad]
    module.zero_grad()
    return y.detach(), grads


@pytest.mark.parametrize("masked", [False, True])
def test_patched_module_matches_unpatched(calls, masked):
    module = SelfAttention().to(DEVICE)
    x = torch.randn(2, 37, 64, device=DEVICE)
    mask = (torch.rand(37, 37, device=DEVICE) > 0.2) if masked else None
    y0, g0 = run_module(module, x, mask)
    assert calls["n"] == 0
    flashjit.patch_sdpa()
    assert F.scaled_dot_product_attention is not ORIGINAL
    y1, g1 = run_module(module, x, mask)
    assert calls["n"] == 1
    assert torch.allclose(y0, y1, atol=1e-5)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_unpatch_restores_the_original_object():
    flashjit.patch_sdpa()
    flashjit.patch_sdpa()  # idempotent
    flashjit.unpatch_sdpa()
    assert F.scaled_dot_product_attention is ORIGINAL
    flashjit.unpatch_sdpa()  # idempotent
    assert F.scaled_dot_product_attention is ORIGINAL


def test_context_manager(calls):
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with flashjit.sdpa_patched():
        assert flashjit.sdpa.is_sdpa_patched()
        F.scaled_dot_product_attention(q, q, q)
        with flashjit.sdpa_patched():  # nested: the outer block keeps the patch
            pass
        assert flashjit.sdpa.is_sdpa_patched()
    assert F.scaled_dot_product_attention is ORIGINAL
    assert calls["n"] == 1


def test_multihead_attention_module_is_routed(calls):
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=True).to(DEVICE)
    x = torch.randn(2, 20, 64, device=DEVICE)
    expected, _ = mha(x, x, x, need_weights=False)
    with flashjit.sdpa_patched():
        got, _ = mha(x, x, x, need_weights=False)
    assert calls["n"] == 1
    assert torch.allclose(expected, got, atol=1e-5)


def fallback_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if "flashjit" in str(w.message)]


def test_unsupported_device_falls_back_with_one_warning(calls):
    flashjit.sdpa._warned.clear()
    q = torch.randn(1, 2, 8, 16, device="meta")
    flashjit.patch_sdpa()
    first = fallback_warnings(lambda: F.scaled_dot_product_attention(q, q, q))
    again = fallback_warnings(lambda: F.scaled_dot_product_attention(q, q, q))
    assert len(first) == 1 and "device meta" in first[0] and again == []
    assert calls["n"] == 0


def test_a_choice_of_torch_backends_is_honoured(calls):
    # torch.nn.attention.sdpa_kernel picks among torch's own kernels: under the patch such
    # a call goes to torch's function, which runs the chosen kernel or raises as it would.
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with flashjit.sdpa_patched(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning, once a process
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
            expected = ORIGINAL(q, q, q, is_causal=True)
        assert calls["n"] == 0
        assert torch.equal(out, expected)
        with sdpa_kernel([SDPBackend.ERROR]), pytest.raises(RuntimeError, match="No viable backend"):
            F.scaled_dot_product_attention(q, q, q)
        assert calls["n"] == 0
        F.scaled_dot_product_attention(q, q, q)  # outside the block: flashjit's again
        assert calls["n"] == 1


def test_float_mask_requiring_grad_falls_back_and_gets_its_gradient(calls):
    flashjit.sdpa._warned.clear()
    q = torch.randn(1, 2, 8, 16, device=DEVICE, requires_grad=True)
    mask = torch.randn(8, 8, device=DEVICE, requires_grad=True)
    flashjit.patch_sdpa()
    messages = fallback_warnings(lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=mask).sum().backward())
    assert len(messages) == 1 and "float attn_mask that requires grad" in messages[0]
    assert mask.grad is not None and calls["n"] == 0
    assert fallback_warnings(lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=mask)) == []
    with torch.no_grad():  # no gradient wanted: flashjit serves it
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert calls["n"] == 1


def test_tensor_subclass_falls_back():
    flashjit.sdpa._warned.clear()

    class Tagged(torch.Tensor):
        pass

    q = torch.randn(1, 2, 8, 16).as_subclass(Tagged)
    flashjit.patch_sdpa()
    messages = fallback_warnings(lambda: F.scaled_dot_product_attention(q, q, q))
    assert len(messages) == 1 and "tensor subclass Tagged" in messages[0]


def test_bad_input_raises_flashjit_error_when_patched():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    flashjit.patch_sdpa()
    with pytest.raises(ValueError, match=r"\[scaled_dot_product_attention\] key: head_dim 8 does not match query"):
        F.scaled_dot_product_attention(q, q[..., :8], q)


def _bad_sdpa_inputs():
    """(name, args, kwargs) that torch's scaled_dot_product_attention refuses."""
    q = torch.randn(2, 3, 5, 8, device=DEVICE)
    mask = torch.ones(5, 5, dtype=torch.bool, device=DEVICE)
    return [
        ("mask and is_causal", (q, q, q), dict(attn_mask=mask, is_causal=True)),
        ("1-d inputs", (q[0, 0, 0], q[0, 0, 0], q[0, 0, 0]), {}),
        ("mixed dtypes", (q, q.double(), q), {}),
        ("integer dtype", (q.long(), q.long(), q.long()), {}),
        ("head dims differ", (q, q[..., :4], q), {}),
        ("heads not a multiple", (q, q[:, :2], q[:, :2]), dict(enable_gqa=True)),
        ("mask shape", (q, q, q), dict(attn_mask=torch.ones(4, 5, dtype=torch.bool, device=DEVICE))),
    ]


@pytest.mark.parametrize("case", range(len(_bad_sdpa_inputs())),
                         ids=[name for name, _, _ in _bad_sdpa_inputs()])
def test_errors_are_of_the_kind_torch_raises(case):
    # Code written against torch catches what torch raises (RuntimeError); flashjit's
    # errors are that and a ValueError/TypeError with flashjit's message.
    name, args, kwargs = _bad_sdpa_inputs()[case]
    # The math backend is torch's reference (its CPU flash kernel lets a mask with is_causal pass).
    with pytest.raises(Exception) as torch_error, sdpa_kernel(SDPBackend.MATH):
        ORIGINAL(*args, **kwargs)
    with pytest.raises(Exception) as ours:
        flashjit.scaled_dot_product_attention(*args, **kwargs)
    assert isinstance(ours.value, type(torch_error.value)), (name, ours.value, torch_error.value)
    assert "[scaled_dot_product_attention]" in str(ours.value)
    flashjit.patch_sdpa()
    with pytest.raises(type(torch_error.value)):
        F.scaled_dot_product_attention(*args, **kwargs)


def _scripted_sdpa(q):
    return F.scaled_dot_product_attention(q, q, q, is_causal=True)


def test_scripted_modules_run_flashjit(calls):
    # TorchScript cannot compile the router; it is registered as the builtin operator
    # flashjit::sdpa (torch's SDPA schema), so scripted code calls flashjit as eager code does,
    # with the same dropout stream.
    torch.manual_seed(0)
    flashjit.patch_sdpa()
    x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True, device=DEVICE)
    scripted = torch.jit.script(mha)
    y = scripted(x, x, x, need_weights=False)[0]
    assert calls["n"] == 1
    assert (y - mha(x, x, x, need_weights=False)[0]).abs().max() < 1e-5
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, device=DEVICE)  # dropout 0.1
    scripted = torch.jit.script(layer)
    torch.manual_seed(42)
    want = layer(x)
    torch.manual_seed(42)
    assert (scripted(x) - want).abs().max() < 1e-5
    kinds = [node.kind() for node in torch.jit.script(_scripted_sdpa).graph.nodes()]
    assert "flashjit::sdpa" in kinds


@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
@pytest.mark.parametrize("L,S", [(5, 5), (4, 9), (9, 4)])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_causal_bias_is_served_as_a_causal_bound(variant, L, S, compiled, calls):
    # torch.nn.attention.bias.causal_upper_left / causal_lower_right are flashjit's two
    # causal alignments: served natively (no mask), eager and under torch.compile.
    from torch.nn.attention import bias as attention_bias

    make = getattr(attention_bias, f"causal_{variant}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that lower-right rows past the keys see nothing
        bias = make(L, S)
    torch.manual_seed(L * S)
    q, k, v = (torch.randn(2, 3, n, 8, device=DEVICE) for n in (L, S, S))
    want = ORIGINAL(q, k, v, attn_mask=bias._materialize(DEVICE))
    flashjit.patch_sdpa()

    def f(q, k, v, b):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=b)

    if compiled:
        torch._dynamo.reset()
        f = torch.compile(f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        got = f(q, k, v, bias)
    assert calls["n"] >= (0 if compiled else 1)
    finite = torch.isfinite(want)  # torch gives NaN where a lower-right row sees no key; flashjit 0
    assert (got[finite] - want[finite]).abs().max() < 1e-5
    assert torch.equal(got[~finite], torch.zeros_like(got[~finite]))


def test_causal_bias_errors_and_fallback():
    from torch.nn.attention.bias import causal_lower_right

    q, k, v = (torch.randn(2, 3, n, 8, device=DEVICE) for n in (4, 9, 9))
    flashjit.patch_sdpa()
    with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(4, 9), is_causal=True)
    with pytest.raises(RuntimeError, match="a CausalBias of 4 x 8 for 4 queries and 9 keys"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(4, 8))
    # Where flashjit cannot serve (the meta device), the bias's own __torch_function__ takes
    # over as it does for torch's function, and torch computes.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o = F.scaled_dot_product_attention(*(x.to("meta") for x in (q, k, v)), attn_mask=causal_lower_right(4, 9))
    assert o.shape == (2, 3, 4, 8) and o.device.type == "meta"
