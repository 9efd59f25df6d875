"""Plans of plain calls (ops.find_plan): from a signature's third call on, a call takes the plan
its second call left (its first only remembers the signature), and gives what the general path
gives, with the same autograd, errors, profilers and transforms."""

import pytest
import torch
import torch.nn.functional as F

import flashjit
from conftest import DEVICE
from flashjit import ops
from reference import check, leaves, naive_attention


def naive(q, k, v, causal=False, dtype=torch.float64):
    """The reference output, computed in dtype."""
    return naive_attention(q, k, v, causal=causal, dtype=dtype)[0]

ENTRIES = {
    "attention": lambda q, k, v, causal: flashjit.attention(q, k, v, causal=causal),
    "sdpa": lambda q, k, v, causal: flashjit.scaled_dot_product_attention(q, k, v, is_causal=causal),
}


# Each test starts and ends without plans (conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_plans")


def inputs(shape_q, shape_kv, dtype, requires_grad=False):
    q, k, v = (torch.randn(shape).to(dtype) for shape in (shape_q, shape_kv, shape_kv))
    return leaves(q, k, v, device=DEVICE) if requires_grad else [x.to(DEVICE) for x in (q, k, v)]


def planned_count():
    return len(ops._PLANS)


def plan_left(call, *args):
    """Two calls without grad: the second leaves the signature's plan."""
    with torch.no_grad():
        for _ in range(2):
            call(*args)
    assert planned_count() == 1


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_a_repeated_call_takes_the_plan_and_matches_the_general_path(entry, dtype, causal):
    call = ENTRIES[entry]
    with torch.no_grad():
        call(*inputs((2, 4, 33, 64), (2, 4, 40, 64), dtype), causal)  # remembers the signature
        assert planned_count() == 0
        call(*inputs((2, 4, 33, 64), (2, 4, 40, 64), dtype), causal)  # leaves the plan
        assert planned_count() == 1
        q, k, v = inputs((2, 4, 33, 64), (2, 4, 40, 64), dtype)  # fresh values, same signature
        o = call(q, k, v, causal)
        assert planned_count() == 1
        options = flashjit.options.AttentionOptions(causal=int(causal))
        general, _ = ops._forward(q, k, v, *options.op_args(None, None))
    assert torch.equal(o, general)  # the same kernels on the same inputs: bitwise
    exact = naive(q, k, v, causal)
    base = naive(q, k, v, causal, dtype)
    check("o", o, base, exact, dtype)


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("dout_kind", ["dense", "expanded"])
def test_gradients_through_a_plan(entry, dout_kind):
    call = ENTRIES[entry]
    dtype = torch.float32
    for _ in range(2):
        first = inputs((2, 4, 33, 64), (2, 2 if entry == "attention" else 4, 40, 64), dtype, requires_grad=True)
        call(*first, True).sum().backward()
    assert planned_count() == 1
    q, k, v = inputs((2, 4, 33, 64), (2, 2 if entry == "attention" else 4, 40, 64), dtype, requires_grad=True)
    o = call(q, k, v, True)
    assert o.grad_fn is not None
    # An expanded gradient (stride 0: .sum()) takes the general backward, which makes its rows readable.
    dout = torch.randn(o.shape, device=DEVICE) if dout_kind == "dense" else torch.ones((), device=DEVICE).expand(o.shape)
    o.backward(dout)
    options = flashjit.options.AttentionOptions(causal=1)
    with torch.no_grad():
        general_o, lse = ops._forward(q, k, v, *options.op_args(None, None))
        general = ops._backward(dout.contiguous(), q, k, v, general_o, lse, *options.op_args(None, None))
    for name, got, expected in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), general):
        assert torch.equal(got, expected), name
    exact = leaves(q.detach(), k.detach(), v.detach(), dtype=torch.float64)
    exact_o = naive(*exact, True)
    exact_o.backward(dout.double())
    base = leaves(q.detach(), k.detach(), v.detach())
    naive(*base, True, dtype).backward(dout)
    for name, got, low, ref in zip(("dq", "dk", "dv"), (q, k, v), base, exact):
        check(name, got.grad, low.grad, ref.grad, dtype)


def test_a_plan_per_signature_and_none_for_rows_that_need_a_copy():
    with torch.no_grad():
        q, k, v = inputs((2, 4, 16, 32), (2, 4, 16, 32), torch.float32)
        flashjit.attention(q, k, v)
        flashjit.attention(q, k, v)
        # The same shapes in [B, S, H, D] memory: other strides, another plan.
        qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
        flashjit.attention(qt, kt, vt)
        assert torch.allclose(flashjit.attention(qt, kt, vt), flashjit.attention(q, k, v))
        assert planned_count() == 2
        # Rows without unit stride are copied by the general path, every call, and never planned.
        qs = torch.randn(2, 4, 32, 16, device=DEVICE).transpose(2, 3)
        for _ in range(3):
            o = flashjit.attention(qs, k, v)
        assert planned_count() == 2
        check("o", o, naive(qs, k, v, dtype=torch.float32), naive(qs, k, v), torch.float32)


def test_plans_are_bounded():
    with torch.no_grad():
        for length in range(1, ops._MAX_PLANS + 10):
            for _ in range(2):
                flashjit.attention(*inputs((1, 1, length, 8), (1, 1, 1, 8), torch.float32))
    assert 0 < planned_count() <= ops._MAX_PLANS


def test_signatures_called_once_build_no_plan():
    # A growing KV cache (a new key count every call) never repeats a signature: no plan is built,
    # only the signatures are remembered, within their bound.
    with torch.no_grad():
        q = torch.randn(1, 2, 1, 16, device=DEVICE)
        for length in range(1, ops._MAX_SEEN + 50):
            k = torch.randn(1, 2, length, 16, device=DEVICE)
            flashjit.scaled_dot_product_attention(q, k, k)
    assert planned_count() == 0 and 0 < len(ops._SEEN) <= ops._MAX_SEEN


def test_sdpa_checks_its_own_arguments_where_attention_left_a_plan():
    # flashjit.attention takes grouped-query heads as they are; torch's SDPA needs enable_gqa=True.
    q, k, v = inputs((1, 4, 8, 16), (1, 2, 8, 16), torch.float32)
    with torch.no_grad():
        flashjit.attention(q, k, v)
        flashjit.attention(q, k, v)
        with pytest.raises(RuntimeError, match="enable_gqa"):
            flashjit.scaled_dot_product_attention(q, k, v)
        o = flashjit.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        again = flashjit.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert torch.equal(o, again)
    with pytest.raises(RuntimeError):  # as torch's own function does
        F.scaled_dot_product_attention(q, k, v)


def test_profilers_see_planned_calls():
    q, k, v = inputs((1, 2, 8, 16), (1, 2, 8, 16), torch.float32)
    plan_left(flashjit.scaled_dot_product_attention, q, k, v)
    with torch.no_grad(), flashjit.profile() as profile:
        flashjit.scaled_dot_product_attention(q, k, v)
        flashjit.attention(q, k, v)
    assert len(profile.calls) == 2


def test_planned_gradients_under_a_torch_profiler_are_named():
    q, k, v = inputs((1, 2, 8, 16), (1, 2, 8, 16), torch.float32, requires_grad=True)
    for _ in range(2):
        flashjit.scaled_dot_product_attention(q, k, v).sum().backward()
    assert planned_count() == 1
    with torch.profiler.profile() as prof:
        flashjit.scaled_dot_product_attention(q, k, v).sum().backward()
    names = {event.key for event in prof.key_averages()}
    assert "flashjit::fwd" in names and "flashjit::bwd" in names


def test_transforms_and_dispatch_modes_after_a_plan():
    q, k, v = inputs((1, 2, 8, 16), (1, 2, 8, 16), torch.float64)
    plan_left(flashjit.scaled_dot_product_attention, q, k, v)

    def loss(q):
        return flashjit.scaled_dot_product_attention(q, k, v).square().sum()

    grad = torch.func.grad(loss)(q)
    expected = torch.func.grad(lambda q: naive(q, k, v).square().sum())(q)
    assert torch.allclose(grad, expected, atol=1e-10)
    batched = torch.func.vmap(lambda q: flashjit.scaled_dot_product_attention(q, k, v))(q.unsqueeze(0).expand(3, *q.shape))
    assert torch.allclose(batched[1], naive(q, k, v), atol=1e-10)

    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Seen() as seen:
        flashjit.scaled_dot_product_attention(q, k, v)
    assert any("flashjit.fwd" in op for op in seen.ops)


def test_the_patched_router_takes_plans_and_honours_torchs_backend_choice():
    q, k, v = inputs((1, 2, 8, 16), (1, 2, 8, 16), torch.float32)
    flashjit.patch_sdpa()
    try:
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v)
            first = F.scaled_dot_product_attention(q, k, v)
            assert planned_count() == 1
            with flashjit.profile() as profile:
                again = F.scaled_dot_product_attention(q, k, v)
            assert torch.equal(first, again) and len(profile.calls) == 1
            from torch.nn.attention import SDPBackend, sdpa_kernel

            flashjit.sdpa._warned.clear()
            with sdpa_kernel(SDPBackend.MATH), flashjit.profile() as profile, pytest.warns(UserWarning):
                F.scaled_dot_product_attention(q, k, v)
            assert len(profile.calls) == 0  # torch's own kernels, as chosen
    finally:
        flashjit.unpatch_sdpa()


def test_saved_tensor_hooks_that_change_layouts_take_the_general_backward():
    # A hook may hand saved tensors back as copies of another layout (here contiguous, where the
    # inputs were transposed views): the plan's descriptors would then describe other memory.
    def grads(q, k, v, dout):
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.contiguous(), lambda t: t):
            o = flashjit.attention(*(x.transpose(1, 2) for x in (q, k, v)))
        o.backward(dout)
        return q.grad, k.grad, v.grad

    q, k, v = (torch.randn(1, 16, 2, 8, dtype=torch.float64, device=DEVICE) for _ in range(3))
    dout = torch.randn(1, 2, 16, 8, dtype=torch.float64, device=DEVICE)
    first = grads(q, k, v, dout)
    grads(q, k, v, dout)
    assert planned_count() == 1
    second = grads(q, k, v, dout)  # through the plan's forward and the general backward
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    qe, ke, ve = leaves(q, k, v)
    naive(*(x.transpose(1, 2) for x in (qe, ke, ve))).backward(dout)
    for got, ref in zip(second, (qe.grad, ke.grad, ve.grad)):
        assert torch.allclose(got, ref, atol=1e-10)


def test_calls_with_dropout_leave_no_plan():
    q, k, v = inputs((1, 2, 8, 16), (1, 2, 8, 16), torch.float32)
    options = flashjit.options.AttentionOptions(dropout_p=0.5)
    with torch.no_grad():
        first, _ = ops.attention(q, k, v, options)
        second, _ = ops.attention(q, k, v, options)
        ops.attention(q, k, v, options)
        for _ in range(2):
            plain, _ = ops.attention(q, k, v, flashjit.options.AttentionOptions())
    assert planned_count() == 1  # the plain call's alone
    assert torch.equal(first, second) and not torch.equal(first, plain)  # the same seed, dropout both times


# bfloat16: on sm_90 the sm_90a kernels (and, for the one-query shape, the split forward and its
# combine) with their LSE stores skipped.
@pytest.mark.parametrize("shapes", [((2, 4, 33, 64), (2, 4, 40, 64)), ((1, 8, 1, 64), (1, 8, 3000, 64))],
                         ids=["prefill", "decode"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_planned_calls_without_autograd_compute_no_lse(entry, dtype, shapes, monkeypatch):
    # SDPA and flashjit.attention without return_lse take their plan with no LSE (neither
    # allocated nor written: lse None through the C API); the output is the one with it, bit for
    # bit, and a call that asks for the LSE still gets it. (The plans' Python forward: the C++ one,
    # flashjit._torch_ops's, is test_native_autograd's.)
    monkeypatch.setattr(ops, "_native_forward", None)
    call = ENTRIES[entry]
    q, k, v = inputs(*shapes, dtype)
    causal = q.shape[2] > 1  # (one query: every key, so that the keys split over blocks)
    with torch.no_grad():
        plan_left(call, q, k, v, causal)
        seen = []
        real_forward = ops._C.forward
        monkeypatch.setattr(ops._C, "forward", lambda *args, **kwargs: seen.append(args[4]) or real_forward(*args,
                                                                                                          **kwargs))
        o = call(q, k, v, causal)
        assert seen == [None]
        plan = next(iter(ops._PLANS.values()))
        o_full, lse = ops.planned_attention(plan, q, k, v)
        assert seen[-1] is not None and lse is not None
    assert torch.equal(o, o_full)
    if entry == "attention":
        o2, lse2 = flashjit.attention(q, k, v, causal=causal, return_lse=True)
        assert torch.equal(o2, o) and torch.equal(lse2, lse)
    exact = naive(q, k, v, causal)
    check("o", o, naive(q, k, v, causal, dtype), exact, dtype)


def test_arrays_without_return_lse_compute_no_lse():
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, 9, 16)).astype(np.float32) for _ in range(3))
    o = flashjit.attention(q, k, v, causal=True)
    o2, lse = flashjit.attention(q, k, v, causal=True, return_lse=True)
    assert np.array_equal(o, o2) and lse.shape == (1, 2, 9)


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_backward_fills_no_gradient_for_lse(entry):
    """lse has no gradient: a backward, planned or not, makes no zero tensor for it (on a GPU
    that would be an allocation and a kernel launch every step); the gradients stay right."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 2, 16, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, 2, 16, 32, device=DEVICE)
    for call in range(4):  # the first calls take the general path, the later ones the plan
        for x in (q, k, v):
            x.grad = None
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ENTRIES[entry](q, k, v, False).backward(dout)
        names = [event.key for event in prof.key_averages()]
        assert not any(name in ("aten::zeros", "aten::zeros_like") for name in names), (call, names)
    exact = leaves(q.detach(), k.detach(), v.detach(), dtype=torch.float64)
    naive(*exact).backward(dout.double())
    base = leaves(q.detach(), k.detach(), v.detach())
    naive(*base, dtype=torch.float32).backward(dout)
    for name, got, low, ref in zip(("dq", "dk", "dv"), (q, k, v), base, exact):
        check(name, got.grad, low.grad, ref.grad, torch.float32)


def test_a_planned_backward_reads_layouts_again_only_where_the_saved_tensors_may_differ(monkeypatch):
    """Without saved-tensor hooks the saved tensors come back as saved (same data pointers): the
    planned backward trusts its descriptors without reading every layout again. Under hooks that
    hand back copies of another layout (or a `.data` swap onto other memory) it reads them and
    takes the general path where they differ; the gradients are the general path's either way.
    (The Python autograd rule's: the rule in C++, flashjit._torch_ops, reads every call's layouts.)"""
    monkeypatch.setattr(ops, "_native_attention", None)
    dtype = torch.float32
    for _ in range(2):
        first = inputs((2, 4, 33, 64), (2, 4, 40, 64), dtype, requires_grad=True)
        flashjit.attention(*first, causal=True).sum().backward()
    assert planned_count() == 1
    reads = []
    layout = ops._layout
    monkeypatch.setattr(ops, "_layout", lambda x: reads.append(1) or layout(x))

    def grads(pack=None, swap=False):
        torch.manual_seed(3)
        q, k, v = inputs((2, 4, 33, 64), (2, 4, 40, 64), dtype, requires_grad=True)
        dout = torch.randn(2, 4, 33, 64, device=DEVICE)
        if pack is None:
            o = flashjit.attention(q, k, v, causal=True)
        else:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                o = flashjit.attention(q, k, v, causal=True)
        if swap:  # q's data onto other memory of another layout: the same values, transposed storage
            q.data = q.data.transpose(-1, -2).contiguous().transpose(-1, -2)
        reads.clear()
        o.backward(dout)
        return [x.grad for x in (q, k, v)], len(reads)

    plain, plain_reads = grads()
    assert plain_reads == 0
    # Hooks that hand back copies in other layouts ([B, S, H, D] memory; rows not unit-stride):
    # their layouts read, the general path taken, which makes the latter's rows readable and its
    # gradients contiguous.
    relaid, relaid_reads = grads(pack=lambda x: x.transpose(1, 2).contiguous().transpose(1, 2)
                                 if x.ndim == 4 else x.clone())
    assert relaid_reads > 0
    strided, _ = grads(pack=lambda x: x.transpose(-1, -2).contiguous().transpose(-1, -2)
                       if x.ndim == 4 else x.clone())
    swapped, swapped_reads = grads(swap=True)
    assert swapped_reads > 0
    for a, b, c, d in zip(plain, relaid, strided, swapped):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
