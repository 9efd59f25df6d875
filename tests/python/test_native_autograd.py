"""The autograd rule in C++ (flashjit._torch_ops, flashjit::eager_attention): a planned eager call
with gradients takes it where this install built it against the torch in use, and gives the
Python rule's outputs and gradients bitwise, with every autograd feature the Python rule has
(double backward, saved-tensor hooks, profilers, inference mode)."""

import os

import pytest
import torch

import flashjit
from conftest import DEVICE
from flashjit import ops
from reference import check, leaves, naive_attention

BUILT = os.path.exists(os.path.join(os.path.dirname(ops.__file__), "_torch_ops.txt"))
needs_native = pytest.mark.skipif(not ops.native_available(), reason="flashjit._torch_ops not built for this torch")


# Each test starts and ends without plans (conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_plans")


@pytest.fixture
def python_rule(monkeypatch):
    """Within the test: planned calls take the Python autograd rule."""
    def use():
        monkeypatch.setattr(ops, "_native_attention", None)
    return use


def test_built_wherever_torch_was_there_at_install():
    """An install with torch's headers (pip install --no-build-isolation, as `make install` does)
    builds the operator, and flashjit loads it under the torch it was built against."""
    if not BUILT:
        pytest.skip("this install was built without torch (an isolated build)")
    with open(os.path.join(os.path.dirname(ops.__file__), "_torch_ops.txt")) as f:
        built_with = f.read().split()
    assert built_with == [torch.__version__, str(torch.version.git_version)], \
        "the operator was built against another torch: reinstall flashjit"
    assert ops.native_available() == (os.environ.get("FLASHJIT_TORCH_NATIVE", "1") != "0")


def run(entry, q, k, v, causal, dout, retain=False):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = entry(q, k, v, causal)
    o.backward(dout)
    return o.detach(), q.grad, k.grad, v.grad, o.grad_fn


ENTRIES = {
    "sdpa": lambda q, k, v, causal: flashjit.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                          enable_gqa=k.shape[1] != q.shape[1]),
    "attention": lambda q, k, v, causal: flashjit.attention(q, k, v, causal=causal),
}


@needs_native
@pytest.mark.parametrize("entry", sorted(ENTRIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_the_cpp_rule_gives_the_python_rules_bits(entry, dtype, causal, python_rule):
    if dtype == torch.float64 and DEVICE != "cpu":
        pytest.skip("float64 runs on the CPU only")
    call = ENTRIES[entry]
    shapes = ((2, 4, 33, 64), (2, 2, 40, 64))
    q, k, v = (torch.randn(s, device=DEVICE).to(dtype) for s in (shapes[0], shapes[1], shapes[1]))
    dout = torch.randn(2, 4, 33, 64, device=DEVICE).to(dtype)
    for _ in range(2):
        run(call, q, k, v, causal, dout)
    assert len(ops._PLANS) == 1
    native = run(call, q, k, v, causal, dout)
    assert "Attention" in native[4].name(), native[4].name()  # the C++ node
    python_rule()
    python = run(call, q, k, v, causal, dout)
    # (The Python rule's node by its type: torch 2.11 refuses name() on some Python Function nodes.)
    assert "Eager" in type(python[4]).__name__
    for name, a, b in zip(("o", "dq", "dk", "dv"), native[:4], python[:4]):
        assert torch.equal(a, b), name
    exact = leaves(q, k, v, dtype=torch.float64)
    o_exact = naive_attention(*exact, causal=causal, dtype=torch.float64)[0]
    o_exact.backward(dout.double())
    base = leaves(q, k, v)
    naive_attention(*base, causal=causal, dtype=dtype)[0].backward(dout)
    check("o", native[0], o_exact.detach().to(dtype), o_exact.detach(), dtype)
    for name, got, low, ref in zip(("dq", "dk", "dv"), native[1:4], base, exact):
        check(name, got, low.grad, ref.grad, dtype)


@needs_native
def test_layouts_the_cpp_rule_takes():
    """q, k, v viewed from [B, S, H, D] buffers (o then laid out as q, so that its transpose back is
    free), and an expanded output gradient (stride 0 rows: made readable)."""
    q, k, v = (torch.randn(2, 40, 4, 32, device=DEVICE).transpose(1, 2) for _ in range(3))
    for _ in range(3):
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        o = flashjit.scaled_dot_product_attention(qg, kg, vg)
        o.sum().backward()
    assert "Attention" in o.grad_fn.name()
    assert o.stride(1) < o.stride(2)  # [B, S, H, D] memory
    exact = leaves(q, k, v, dtype=torch.float64)
    naive_attention(*exact, dtype=torch.float64)[0].sum().backward()
    for name, got, ref in zip(("dq", "dk", "dv"), (qg, kg, vg), exact):
        check(name, got.grad, ref.grad.float(), ref.grad, torch.float32)


@needs_native
def test_double_backward_through_the_cpp_rule():
    if DEVICE != "cpu":
        pytest.skip("float64 runs on the CPU only")
    q, k, v = (torch.randn(1, 2, 12, 16, dtype=torch.float64) for _ in range(3))
    for _ in range(2):
        flashjit.scaled_dot_product_attention(*leaves(q, k, v), is_causal=True).sum().backward()
    x = leaves(q, k, v)
    o = flashjit.scaled_dot_product_attention(*x, is_causal=True)
    assert "Attention" in o.grad_fn.name()
    first = torch.autograd.grad(o.square().sum(), x, create_graph=True)
    second = torch.autograd.grad(first[0].square().sum(), x)
    e = leaves(q, k, v)
    oe = naive_attention(*e, causal=True, dtype=torch.float64)[0]
    fe = torch.autograd.grad(oe.square().sum(), e, create_graph=True)
    se = torch.autograd.grad(fe[0].square().sum(), e)
    for got, ref in zip(first + second, fe + se):
        assert torch.allclose(got, ref, atol=1e-9), (got - ref).abs().max()


@needs_native
def test_saved_tensor_hooks_and_profilers_with_the_cpp_rule():
    q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float32, device=DEVICE) for _ in range(3))
    dout = torch.randn(1, 2, 16, 8, device=DEVICE)
    plain = run(ENTRIES["sdpa"], q, k, v, False, dout)
    plain = run(ENTRIES["sdpa"], q, k, v, False, dout)
    packed = []
    # Hooks that keep the saved tensors elsewhere (copies of another layout) and hand them back.
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: packed.append(1) or t.transpose(-1, -2).contiguous(), lambda t: t.transpose(-1, -2)):
        hooked = run(ENTRIES["sdpa"], q, k, v, False, dout)
    assert "Attention" in hooked[4].name() and packed
    for a, b in zip(plain[:4], hooked[:4]):
        assert torch.equal(a, b)
    # A flashjit.profile opened between the forward and the backward records the backward.
    x = [t.detach().requires_grad_() for t in (q, k, v)]
    o = flashjit.scaled_dot_product_attention(*x)
    assert "Attention" in o.grad_fn.name()
    with flashjit.profile() as profile:
        o.backward(dout)
    assert [call.direction for call in profile.calls] == ["backward"]
    assert torch.equal(x[0].grad, plain[1])
    # torch's profiler names the C++ rule's work as it names the Python rule's.
    with torch.profiler.profile() as prof:
        o = flashjit.scaled_dot_product_attention(*x)
        o.backward(dout)
    names = {event.key for event in prof.key_averages()}
    assert "flashjit::fwd" in names and "flashjit::bwd" in names


@needs_native
def test_the_operator_under_inference_mode_and_its_errors():
    q, k, v = (torch.randn(1, 2, 16, 8, device=DEVICE) for _ in range(3))
    op = torch.ops.flashjit.eager_attention
    with torch.inference_mode():
        o, lse = op(q, k, v, None, None, 0.0, 1, -1, -1, 0.0, None, 0, True)
    expected, expected_lse = ops._forward(q, k, v, *flashjit.options.AttentionOptions(causal=1).op_args(None, None))
    assert torch.equal(o, expected) and torch.equal(lse, expected_lse)
    with pytest.raises(ValueError, match="4 dims"):
        op(q[0], k[0], v[0], None, None, 0.0, 0, -1, -1, 0.0, None, 0, True)
    with pytest.raises(ValueError, match="head_dim 4 does not match"):
        op(q, k[..., :4], v, None, None, 0.0, 0, -1, -1, 0.0, None, 0, True)
    with pytest.raises(TypeError, match="dtype"):
        op(q.to(torch.int32), k, v, None, None, 0.0, 0, -1, -1, 0.0, None, 0, True)
    with pytest.raises(ValueError, match="at most 4 dims, got 5"):
        op(q, k, v, torch.ones(1, 1, 1, 16, 16, dtype=torch.bool, device=DEVICE), None, 0.0, 0, -1, -1, 0.0, None, 0,
           True)
    with pytest.raises(ValueError, match="must have 4 dims"):
        ops._native_forward(q[0], k[0], v[0], True, None, 0.0, 0, -1, -1, 0)
    with pytest.raises(TypeError, match="expected 13 arguments, got 3"):
        ops._native_apply(q, k, v)


@needs_native
def test_the_operator_passes_opcheck_and_takes_meta_tensors():
    q, k, v = (torch.randn(1, 2, 16, 8, device=DEVICE, requires_grad=True) for _ in range(3))
    args = (q, k, v, None, None, 0.0, 1, -1, -1, 0.0, None, 0, True)
    torch.library.opcheck(torch.ops.flashjit.eager_attention.default, args)
    o, lse = torch.ops.flashjit.eager_attention(*(x.to("meta") for x in (q, k, v)), None, None, 0.0, 1, -1, -1, 0.0,
                                                 None, 0, True)
    assert o.shape == (1, 2, 16, 8) and lse.shape == (1, 2, 16) and lse.dtype == torch.float32
    with pytest.raises(ValueError, match="head_dim 4 does not match"):
        torch.ops.flashjit.eager_attention(q.to("meta"), k[..., :4].to("meta"), v.to("meta"), None, None, 0.0, 0, -1,
                                           -1, 0.0, None, 0, True)


@needs_native
def test_retained_graphs_and_inputs_from_other_nodes():
    """A graph kept for a second backward, and q, k, v computed by other ops (edges to their nodes)."""
    x = torch.randn(1, 16, 32, device=DEVICE, requires_grad=True)
    weight = torch.randn(32, 3 * 32, device=DEVICE) / 6

    def project(x):
        q, k, v = (x @ weight).view(1, 16, 3, 2, 16).permute(2, 0, 3, 1, 4)
        return q, k, v

    for _ in range(2):
        flashjit.scaled_dot_product_attention(*project(x.detach())).sum()
    o = flashjit.scaled_dot_product_attention(*project(x), is_causal=True)
    assert "Attention" in o.grad_fn.name()
    dout = torch.randn_like(o)
    first, = torch.autograd.grad(o, x, dout, retain_graph=True)
    second, = torch.autograd.grad(o, x, dout)
    assert torch.equal(first, second)
    xe = x.detach().double().requires_grad_()
    qe, ke, ve = ((xe @ weight.double()).view(1, 16, 3, 2, 16).permute(2, 0, 3, 1, 4))
    naive_attention(qe, ke, ve, causal=True, dtype=torch.float64)[0].backward(dout.double())
    check("dx", first, xe.grad.float(), xe.grad, torch.float32)


@needs_native
def test_c_reads_torch_tensors_through_the_library_as_through_their_attributes():
    """flashjit._torch_ops's reader gives _C what the tensors' attributes give: the same outputs
    bitwise for views, parameters, bool and float masks, and the same errors where it leaves a
    tensor to _C (meta, a negated view, int64)."""
    from flashjit import _C

    q = torch.randn(2, 33, 4, 32, device=DEVICE).transpose(1, 2)  # [B, S, H, D] memory
    k = torch.nn.Parameter(torch.randn(2, 2, 40, 32, device=DEVICE))
    v = torch.randn(2, 2, 40, 64, device=DEVICE)[..., ::2]  # rows not unit-stride: read through a copy
    masks = (torch.rand(2, 1, 33, 40, device=DEVICE) > 0.3, torch.randn(1, 4, 33, 40, device=DEVICE))
    options = (0.3, 0.0, 2, 7, -1, 0.0, None, 0)  # scale, softcap, causal, windows, dropout_p, rng, threads
    outputs = []
    try:
        for reader in (ops._tensor_reader, 0):
            _C.set_tensor_reader(reader)
            for mask in masks:
                o, lse = torch.empty(2, 4, 33, 32, device=DEVICE), torch.empty(2, 4, 33, device=DEVICE)
                ops._run(_C.forward, (q, k, v), (o, lse), mask, *options)
                outputs.append((o, lse))
            for bad, pattern in ((k.to("meta"), "on meta, which flashjit cannot read"),
                                 (torch.randn(2, 2, 40, 32, device=DEVICE)._neg_view(), "a lazily negated view"),
                                 (k.detach().to(torch.int64), "int64")):
                with pytest.raises((TypeError, ValueError), match=pattern):
                    _C.forward(q.contiguous(), bad, v.contiguous(), o, lse, None, None, 0.0, 0, -1, -1, 0.0, 0, 0, 0,
                               ops._stream(q))
    finally:
        _C.set_tensor_reader(ops._tensor_reader)
    for (a, la), (b, lb) in zip(outputs[:2], outputs[2:]):
        assert torch.equal(a, b) and torch.equal(la, lb)
    exact = naive_attention(*(x.detach().double() for x in (q, k, v)), attn_mask=masks[0], scale=0.3, causal=2,
                            window=(7, -1), dtype=torch.float64)[0]
    assert torch.allclose(outputs[0][0].double(), exact, atol=2e-5)


@needs_native
def test_plan_keys_from_cpp_tell_every_field_apart():
    """The plan key made in C++ (ops._native_signature) differs wherever a shape, stride, dtype or
    device differs, is equal for equal layouts, and is None for tensors it does not read (no
    storage, negated views, sparse): those calls take the general path."""
    sign = ops._native_signature
    q = torch.randn(2, 4, 16, 32, device=DEVICE)
    base = sign(q, q, q)
    assert isinstance(base, bytes) and base == sign(q.clone(), q.clone(), q.clone())
    others = [
        torch.randn(2, 4, 17, 32, device=DEVICE),  # a shape
        torch.randn(2, 16, 4, 32, device=DEVICE).transpose(1, 2),  # strides alone
        q.to(torch.float64),  # a dtype
        q[0],  # the rank
    ]
    if torch.cuda.is_available():
        others.append(q.to("cpu" if q.is_cuda else "cuda"))  # a device
    keys = {base}
    for position in range(3):
        for other in others:
            operands = [q, q, q]
            operands[position] = other
            keys.add(sign(*operands))
    assert len(keys) == 1 + 3 * len(others)
    # (Tensor subclasses never reach it: find_plan takes plain types alone.)
    for unread in (q.to("meta"), q._neg_view(), torch.randn(4, 4).to_sparse()):
        assert sign(q, unread, q) is None
    with pytest.raises(TypeError, match="3 arguments"):
        sign(q, q)
    assert sign(q, 1, q) is None
    # A plan under a C++ key serves the next call of the same signature, bitwise.
    with torch.no_grad():
        outputs = [flashjit.scaled_dot_product_attention(q, q, q) for _ in range(3)]
    assert len(ops._PLANS) == 1 and next(iter(ops._PLANS))[2] == base
    assert torch.equal(outputs[0], outputs[2])


@needs_native
@pytest.mark.parametrize("case", ["bool mask", "float mask", "dropout", "softcap and window"])
def test_calls_without_a_plan_take_the_cpp_rule_with_the_python_rules_bits(case, python_rule):
    """Calls that leave no plan (a mask, dropout) and a signature's first calls take the C++ rule
    too, with the same outputs and gradients bitwise as the Python rule's."""
    q, k, v = (torch.randn(2, 4, 24, 32, device=DEVICE) for _ in range(3))
    dout = torch.randn(2, 4, 24, 32, device=DEVICE)
    kwargs = {
        "bool mask": {"attn_mask": torch.rand(2, 1, 24, 24, device=DEVICE) > 0.2},
        "float mask": {"attn_mask": torch.randn(1, 4, 24, 24, device=DEVICE).expand(2, 4, 24, 24)},
        "dropout": {"dropout_p": 0.3, "seed": 1234, "offset": 7},
        "softcap and window": {"softcap": 5.0, "window": (6, 0), "causal": "bottom_right"},
    }[case]

    def grads():
        x = [t.detach().requires_grad_() for t in (q, k, v)]
        o = flashjit.attention(*x, **kwargs)
        node = o.grad_fn.name()
        o.backward(dout)
        return [o.detach()] + [t.grad for t in x], node

    native, native_node = grads()
    assert "Attention" in native_node and "Eager" not in native_node
    python_rule()
    python, python_node = grads()
    assert "Eager" in python_node
    for name, a, b in zip(("o", "dq", "dk", "dv"), native, python):
        assert torch.equal(a, b), name
    if case != "dropout":  # dropout's reference is test_attention's
        exact = leaves(q, k, v, dtype=torch.float64)
        mask = kwargs.get("attn_mask")
        o_exact = naive_attention(*exact, attn_mask=mask, softcap=kwargs.get("softcap", 0.0),
                                  causal=2 if kwargs.get("causal") else False, window=kwargs.get("window", (-1, -1)),
                                  dtype=torch.float64)[0]
        o_exact.backward(dout.double())
        check("o", native[0], o_exact.detach().float(), o_exact.detach(), torch.float32)
        for name, got, ref in zip(("dq", "dk", "dv"), native[1:], exact):
            check(name, got, ref.grad.float(), ref.grad, torch.float32)


@needs_native
def test_a_mask_that_wants_a_gradient_is_refused_by_the_cpp_rule():
    q, k, v = (torch.randn(1, 2, 8, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    mask = torch.randn(1, 2, 8, 8, device=DEVICE, requires_grad=True)
    with pytest.raises(NotImplementedError, match="attn_mask.detach"):
        flashjit.attention(q, k, v, attn_mask=mask)
    with pytest.raises(NotImplementedError, match="attn_mask.detach"):
        torch.ops.flashjit.eager_attention(q, k, v, mask, None, 0.0, 0, -1, -1, 0.0, None, 0, True)


@needs_native
def test_compiled_autograd_and_a_negated_output_gradient():
    """The C++ node under compiled autograd (its backward traced through flashjit::bwd's fake
    kernel, then run), and an output gradient that is a lazily negated view (its values taken)."""
    from torch._dynamo import compiled_autograd

    q, k, v = (torch.randn(1, 2, 16, 32, device=DEVICE) for _ in range(3))
    dout = torch.randn(1, 2, 16, 32, device=DEVICE)
    expected = run(ENTRIES["attention"], q, k, v, True, dout)
    assert "Attention" in expected[4].name()
    x = [t.detach().requires_grad_() for t in (q, k, v)]
    o = flashjit.attention(*x, causal=True)
    assert "Attention" in o.grad_fn.name()
    with compiled_autograd._enable(torch.compile(backend="eager")):
        o.backward(dout)
    for a, b in zip(x, expected[1:4]):
        assert torch.allclose(a.grad, b, atol=1e-6)
    x = [t.detach().requires_grad_() for t in (q, k, v)]
    o = flashjit.attention(*x, causal=True)
    o.backward((-dout)._neg_view())
    for a, b in zip(x, expected[1:4]):
        assert torch.equal(a.grad, b)


@needs_native
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_planned_calls_without_autograd_take_the_cpp_forward(layout, monkeypatch):
    """A plan's call without autograd allocates its outputs and calls the C API in C++
    (flashjit._torch_ops's forward): the Python forward's o and lse bitwise, o laid out as q,
    no lse where none is asked for, and the C API's errors as _C raises them."""
    shape = (2, 4, 33, 32) if layout == "bhsd" else (2, 33, 4, 32)
    q, k, v = (torch.randn(shape, device=DEVICE) for _ in range(3))
    if layout == "bshd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    with torch.no_grad():
        for _ in range(2):
            flashjit.attention(q, k, v, causal=True)
        plan = next(iter(ops._PLANS.values()))
        assert plan.native_forward is not None
        calls = []
        native = ops._native_forward
        monkeypatch.setattr(ops, "_native_forward", lambda *args: calls.append(args[3]) or native(*args))
        o = flashjit.attention(q, k, v, causal=True)
        o_full, lse = ops.planned_attention(plan, q, k, v)
        assert calls == [False, True]
        monkeypatch.setattr(ops, "_native_forward", None)
        o_python, lse_python = ops.planned_attention(plan, q, k, v)
    assert torch.equal(o, o_python) and torch.equal(o_full, o_python) and torch.equal(lse, lse_python)
    assert o.stride() == o_python.stride()
    with pytest.raises(ValueError, match="head_dim"):
        native(q, k[..., :8], v, True, None, 0.0, 0, -1, -1, 0)
    with pytest.raises(TypeError, match="torch tensors"):
        native(q.numpy() if DEVICE == "cpu" else None, k, v, True, None, 0.0, 0, -1, -1, 0)


@needs_native
def test_the_direct_entry_keeps_the_dispatchers_choices():
    """flashjit's eager calls reach the C++ rule without the operator's binding, yet behave as
    the operator would: under inference mode with grad enabled, and below autograd, no node is
    recorded (torch's own ops give the plain kernel's output there); an active TorchFunctionMode
    sees the operator."""
    from torch.overrides import TorchFunctionMode

    q, k, v = (torch.randn(1, 2, 8, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    args = (q, k, v, None, None, 0.0, 0, -1, -1, 0.0, None, 0, True)
    expected = ops._native_attention(*args)[0].detach()
    with torch.inference_mode(), torch.enable_grad():
        o = ops._native_apply(*args)[0]
        assert o.grad_fn is None and torch.equal(o, expected)
        assert flashjit.scaled_dot_product_attention(q, k, v).grad_fn is None
    with torch._C._AutoDispatchBelowAutograd():
        o = ops._native_apply(*args)[0]
        assert o.grad_fn is None and torch.equal(o, expected)
    seen = []

    class Seen(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen():
        for _ in range(3):  # the plan's calls too
            flashjit.scaled_dot_product_attention(q, k, v)
    assert sum("eager_attention" in name for name in seen) == 3, seen
