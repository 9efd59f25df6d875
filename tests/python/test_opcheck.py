"""torch.library.opcheck on flashjit::fwd and flashjit::bwd: schema, fake
tensors, autograd registration and AOT dispatch with dynamic shapes, with
inputs that require grad."""

import pytest
import torch
from torch.library import opcheck

import flashjit  # noqa: F401  (registers the ops)
from conftest import DEVICE

# Positional arguments after q, k, v: mask, scale, softcap, causal, window_left, window_right, dropout_p,
# rng, num_threads.
CASES = {
    "plain": lambda: (None, None, 0.0, 0, -1, -1, 0.0, None, 0, True),
    "bool_mask_bottom_right": lambda: (torch.rand(1, 4, 17, 23, device=DEVICE) > 0.3, 0.5, 0.0, 2, -1, -1, 0.0,
                                       None, 0, True),
    "float_mask_softcap_window": lambda: (torch.randn(1, 1, 17, 23, device=DEVICE), None, 2.0, 1, 4, -1, 0.0,
                                          None, 0, True),
    "dropout": lambda: (None, None, 0.0, 0, -1, -1, 0.2, flashjit.ops.dropout_rng(3, 0), 0, True),
    # deterministic=False: the backward may sum dq in no fixed order (CUDA sm_90, head dims <= 64 and 128)
    "nondeterministic_causal": lambda: (None, None, 0.0, 1, -1, -1, 0.0, None, 0, False),
}


def qkv(dtype=torch.float32):
    return [torch.randn(*shape, dtype=dtype, device=DEVICE, requires_grad=True)
            for shape in ((2, 4, 17, 16), (2, 2, 23, 16), (2, 2, 23, 8))]


@pytest.mark.parametrize("case", list(CASES))
def test_opcheck_fwd(case):
    opcheck(torch.ops.flashjit.fwd.default, (*qkv(), *CASES[case]()))


def test_opcheck_fwd_transposed_bfloat16():
    q, k, v = (x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in qkv(torch.bfloat16))
    opcheck(torch.ops.flashjit.fwd.default, (q, k, v, *CASES["plain"]()))


@pytest.mark.parametrize("case", [c for c in CASES if c != "dropout"])
def test_opcheck_bwd(case):
    q, k, v = qkv()
    options = CASES[case]()
    o, lse = torch.ops.flashjit.fwd(q, k, v, *options)
    dout = torch.randn_like(o, requires_grad=True)
    opcheck(torch.ops.flashjit.bwd.default, (dout, q, k, v, o.detach(), lse, *options))


def test_opcheck_bwd_with_dropout_without_double_backward():
    q, k, v = (x.detach() for x in qkv())
    options = CASES["dropout"]()
    o, lse = torch.ops.flashjit.fwd(q, k, v, *options)
    opcheck(torch.ops.flashjit.bwd.default, (torch.randn_like(o), q, k, v, o, lse, *options))


def test_fake_outputs_have_exact_shapes_strides_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = (x.detach() for x in qkv(torch.float16))
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # gradients keep this layout
    real = torch.ops.flashjit.fwd(q, k, v, *CASES["plain"]())
    real_grads = torch.ops.flashjit.bwd(torch.randn_like(real[0]), q, k, v, *real, *CASES["plain"]())
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(x) for x in (q, k, v))
        fake = torch.ops.flashjit.fwd(fq, fk, fv, *CASES["plain"]())
        fake_grads = torch.ops.flashjit.bwd(torch.empty_like(fake[0]), fq, fk, fv, *fake, *CASES["plain"]())
    for r, f in zip((*real, *real_grads), (*fake, *fake_grads)):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)
    assert real[1].dtype == torch.float32 and real_grads[0].stride() == q.stride()


@pytest.mark.parametrize("bad", ["head_dim", "heads", "dtype", "window"])
def test_fake_kernels_raise_the_calls_errors(bad):
    # The fake (shape) kernels validate through the C API on descriptors alone, so meta
    # tensors and torch.compile's tracing meet the same errors as the call itself.
    q = torch.empty(2, 4, 8, 16, device="meta")
    k = {"head_dim": torch.empty(2, 2, 10, 8, device="meta"), "heads": torch.empty(2, 3, 10, 16, device="meta"),
         "dtype": torch.empty(2, 2, 10, 16, device="meta", dtype=torch.float64)}.get(bad, q)
    window = (-2, -1) if bad == "window" else (-1, -1)
    message = {"head_dim": r"k: head_dim 8 does not match q's 16",
               "heads": r"k: query heads \(4\) must be a multiple of key/value heads \(3\)",
               "dtype": r"k: expected dtype float32", "window": r"window_left"}[bad]
    message = r"\[attention(_backward)?\] " + message
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.flashjit.fwd(q, k, k, None, None, 0.0, 0, *window, 0.0, None, 0)
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.flashjit.bwd(q, q, k, k, q, torch.empty(2, 4, 8, device="meta"), None, None, 0.0, 0, *window,
                               0.0, None, 0)
