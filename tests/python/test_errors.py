"""Bad input raises a Python exception naming the argument and what was expected."""

import numpy as np
import pytest
import torch

import flashjit


def tensors(B=2, Hq=4, Hkv=2, Sq=8, Sk=12, D=16, dtype=torch.float32):
    return (torch.randn(B, Hq, Sq, D, dtype=dtype), torch.randn(B, Hkv, Sk, D, dtype=dtype),
            torch.randn(B, Hkv, Sk, D, dtype=dtype))


def forward_raises(exc, match, q=None, k=None, v=None, **kwargs):
    dq, dk, dv = tensors()
    with pytest.raises(exc, match=match):
        flashjit.attention(dq if q is None else q, dk if k is None else k, dv if v is None else v, **kwargs)


BAD_FORWARD = [
    ("q rank 3", ValueError, r"\[attention\] q: expected 4 dims \[batch, heads, seqlen, head_dim\], got 3",
     dict(q=torch.randn(4, 8, 16))),
    ("k rank 5", ValueError, r"k: expected 4 dims", dict(k=torch.randn(1, 2, 2, 12, 16))),
    ("batch mismatch", ValueError, r"k: batch size 1 does not match q's 2",
     dict(k=torch.randn(1, 2, 12, 16), v=torch.randn(1, 2, 12, 16))),
    ("head_dim mismatch", ValueError, r"k: head_dim 8 does not match q's 16", dict(k=torch.randn(2, 2, 12, 8))),
    ("v seqlen", ValueError, r"v: expected shape \[2, 2, 12, 16\]", dict(v=torch.randn(2, 2, 11, 16))),
    ("Hq % Hkv", ValueError, r"query heads \(4\) must be a multiple of key/value heads \(3\)",
     dict(k=torch.randn(2, 3, 12, 16), v=torch.randn(2, 3, 12, 16))),
    ("mixed dtypes", TypeError, r"k: expected dtype float32 \(the dtype of q\), got float16",
     dict(k=torch.randn(2, 2, 12, 16).half())),
    ("integer q", TypeError, r"q: expected dtype float32, float16, bfloat16 or float64, got int32",
     dict(q=torch.ones(2, 4, 8, 16, dtype=torch.int32))),
    ("unsigned q", TypeError, r"q: unsupported dtype uint8", dict(q=torch.ones(2, 4, 8, 16, dtype=torch.uint8))),
    ("numpy last dim strided", ValueError, r"q: expected the last dim to be contiguous \(stride 1\), got stride 2",
     dict(q=np.zeros((2, 4, 8, 32), np.float32)[..., ::2], k=np.zeros((2, 2, 12, 16), np.float32),
          v=np.zeros((2, 2, 12, 16), np.float32))),
    ("mask not broadcastable", ValueError, r"mask: dim 3 \(seqlen_k\) has size 5, expected 1 or 12",
     dict(attn_mask=torch.ones(8, 5, dtype=torch.bool))),
    ("mask 5 dims", ValueError, r"mask: expected at most 4 dims", dict(attn_mask=torch.ones(1, 1, 1, 8, 12, dtype=torch.bool))),
    ("integer mask", TypeError, r"mask: expected a bool \(true = attend\) or float \(additive\) mask, got int64",
     dict(attn_mask=torch.ones(8, 12, dtype=torch.int64))),
    ("float64 mask with float32 q", TypeError, r"mask: expected dtype bool or float32, got float64",
     dict(attn_mask=torch.zeros(8, 12, dtype=torch.float64))),
    ("window < -1", ValueError, r"window_left: expected -1 \(unbounded\) or 0..2\^63-1, got -2", dict(window=(-2, 0))),
    ("window not a pair", ValueError, r"window: expected a pair", dict(window=3)),
    ("causal string", ValueError, r"causal: expected False, True, 'top_left' or 'bottom_right', got 'upper'",
     dict(causal="upper")),
    ("causal with right window", ValueError, r"window_right: expected -1 or 0 with a causal mask, got 2",
     dict(causal=True, window=(4, 2))),
    ("dropout 1", ValueError, r"dropout_p: expected a value in \[0, 1\), got 1", dict(dropout_p=1.0, seed=0)),
    ("dropout negative", ValueError, r"dropout_p: expected a value in \[0, 1\), got -0.5", dict(dropout_p=-0.5, seed=0)),
    ("numpy dropout without seed", ValueError, r"seed: required when dropout_p > 0 with numpy arrays",
     dict(q=np.zeros((2, 4, 8, 16), np.float32), k=np.zeros((2, 2, 12, 16), np.float32),
          v=np.zeros((2, 2, 12, 16), np.float32), dropout_p=0.1)),
    ("mask requiring grad", NotImplementedError, r"mask: gradients into a float mask are not supported",
     dict(attn_mask=torch.zeros(8, 12, requires_grad=True))),
    ("softcap negative", ValueError, r"softcap: expected a finite value >= 0", dict(softcap=-1.0)),
    ("scale nan", ValueError, r"scale: expected a finite number, got nan", dict(scale=float("nan"))),
    ("num_threads", ValueError, r"num_threads: expected 0 \(default\) to 1024, got -1", dict(num_threads=-1)),
    ("num_threads float", TypeError, r"num_threads: expected an integer \(0 \(default\) to 1024\), got 2.5",
     dict(num_threads=2.5)),
    ("num_threads text", TypeError, r"num_threads: expected an integer .*, got 'x'", dict(num_threads="x")),
    ("window float", TypeError, r"window_left: expected an integer .*, got 1.7", dict(window=(1.7, 0.2))),
    ("window beyond int64", ValueError, r"window_right: expected -1 \(unbounded\) or 0..2\^63-1, got \d+",
     dict(window=(0, 2**70))),
    ("window bool", TypeError, r"window_left: expected an integer", dict(window=(True, 0))),
    ("seed float", TypeError, r"seed: expected an integer \(0..2\^64-1\), got 1.5", dict(dropout_p=0.1, seed=1.5)),
    ("seed 2^64", ValueError, r"seed: expected 0..2\^64-1, got 18446744073709551616",
     dict(dropout_p=0.1, seed=2**64)),
    ("offset negative", ValueError, r"offset: expected 0..2\^64-1, got -1", dict(dropout_p=0.1, seed=1, offset=-1)),
    ("sparse q", TypeError, r"q: expected a dense \(strided\) tensor, got layout torch.sparse_coo",
     dict(q=torch.randn(2, 4, 8, 16).to_sparse())),
    ("float8 q", TypeError, r"q: unsupported dtype float8",
     dict(q=torch.randn(2, 4, 8, 16).to(torch.float8_e4m3fn), k=torch.randn(2, 2, 12, 16).to(torch.float8_e4m3fn),
          v=torch.randn(2, 2, 12, 16).to(torch.float8_e4m3fn))),
    ("float16 mask with float32 q", TypeError, r"mask: expected dtype bool or float32, got float16",
     dict(attn_mask=torch.zeros(8, 12, dtype=torch.float16))),
    ("mask over one query", ValueError, r"mask: dim 2 \(seqlen_q\) has size 3, expected 1 to broadcast",
     dict(q=torch.randn(2, 4, 1, 16), attn_mask=torch.zeros(2, 4, 3, 12))),
    ("not an array", TypeError, r"q: expected a numpy.ndarray or torch.Tensor, got list", dict(q=[[1.0]])),
    ("numpy k with torch q", TypeError, r"k: expected a torch.Tensor like q, got numpy.ndarray",
     dict(k=np.zeros((2, 2, 12, 16), np.float32))),
]


@pytest.mark.parametrize("name,exc,match,kwargs", BAD_FORWARD, ids=[c[0] for c in BAD_FORWARD])
def test_forward_rejects(name, exc, match, kwargs):
    forward_raises(exc, match, **kwargs)


def test_nested_tensors_are_named():
    q, k, v = tensors()
    nested = torch.nested.nested_tensor([q[0], q[1]], layout=torch.jagged)
    with pytest.raises(TypeError, match=r"\[attention\] q: nested tensors are not supported"):
        flashjit.attention(nested, k, v)
    with pytest.raises(TypeError, match=r"\[scaled_dot_product_attention\] query: nested tensors"):
        flashjit.scaled_dot_product_attention(nested, k, v)


def test_meta_tensors_give_meta_outputs_of_the_right_shape():
    # As torch's own operators do on the meta device: shapes, no data.
    q, k, v = (x.to("meta") for x in tensors())
    o, lse = flashjit.attention(q, k, v, return_lse=True)
    assert o.is_meta and o.shape == (2, 4, 8, 16) and lse.is_meta and lse.shape == (2, 4, 8)
    out = flashjit.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    assert out.is_meta and out.shape == (2, 4, 8, 16)


def test_dropout_keep_mask_rejects_bad_sizes_and_seeds():
    with pytest.raises(ValueError, match=r"\[dropout_keep_mask\] batch: expected >= 0, got -1"):
        flashjit.dropout_keep_mask(-1, 2, 3, 4, dropout_p=0.1, seed=0)
    with pytest.raises(TypeError, match=r"\[dropout_keep_mask\] seed: expected an integer"):
        flashjit.dropout_keep_mask(1, 2, 3, 4, dropout_p=0.1, seed=None)
    with pytest.raises(ValueError, match=r"\[dropout_keep_mask\] seed: expected 0..2\^64-1"):
        flashjit.dropout_keep_mask(1, 2, 3, 4, dropout_p=0.1, seed=2**64)


def test_sdpa_errors_use_sdpa_names():
    q, k, v = tensors(Hkv=4)
    with pytest.raises(ValueError, match=r"^\[scaled_dot_product_attention\] scale: expected a finite number"):
        flashjit.scaled_dot_product_attention(q, k, v, scale=float("nan"))


def test_at_least_twenty_distinct_bad_inputs():
    assert len(BAD_FORWARD) >= 20


def test_backward_rejects_mismatched_gradient_shapes():
    q, k, v = tensors()
    o, lse = flashjit.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match=r"\[attention_backward\] dout: expected shape \[2, 4, 8, 16\]"):
        flashjit.attention_backward(q, k, v, o, lse, torch.randn(2, 4, 8, 15))
    with pytest.raises(TypeError, match=r"\[attention_backward\] lse: expected dtype float32, got float16"):
        flashjit.attention_backward(q, k, v, o, lse.half(), torch.randn_like(o))
    with pytest.raises(ValueError, match=r"\[attention_backward\] lse: expected shape \[2, 4, 8\]"):
        flashjit.attention_backward(q, k, v, o, lse[:, :2], torch.randn_like(o))


def test_errors_leave_the_process_usable():
    q, k, v = tensors()
    for _ in range(3):
        with pytest.raises(ValueError):
            flashjit.attention(q, k[:1], v)
    assert torch.isfinite(flashjit.attention(q, k, v)).all()


def test_malformed_tensor_descriptors_are_named():
    """The descriptor tuples the torch front end hands the binding (data pointer, dtype, device
    type, device index, shape, strides): a malformed one raises TypeError naming the operand;
    integers of other types that say they are integers (numpy's) are taken."""
    from flashjit import _C

    q, o = torch.randn(1, 1, 4, 8), torch.empty(1, 1, 4, 8)
    f32 = _C.DTYPES["float32"]

    def ref(t):
        return (t.data_ptr(), f32, 0, 0, tuple(t.shape), t.stride())

    def call(q_ref):
        _C.forward(q_ref, ref(q), ref(q), ref(o), None, None, None, 0.0, 0, -1, -1, 0.0, 0, 0, 0, 0)

    bad = {
        "a 6-tuple": (q.data_ptr(), f32, 0),
        "non-negative integer": (-16, f32, 0, 0, (1, 1, 4, 8), (32, 32, 8, 1)),
        "out of range": (q.data_ptr(), 2**40, 0, 0, (1, 1, 4, 8), (32, 32, 8, 1)),
        "as many as its dims": (q.data_ptr(), f32, 0, 0, (1, 1, 4, 8), (32, 32, 8)),
        "holds integers": (q.data_ptr(), "float32", 0, 0, (1, 1, 4, 8), (32, 32, 8, 1)),
        "are tuples": (q.data_ptr(), f32, 0, 0, [1, 1, 4, 8], (32, 32, 8, 1)),
    }
    for match, descriptor in bad.items():
        with pytest.raises(TypeError, match=r"\[attention\] q: .*" + match):
            call(descriptor)
    o.fill_(float("nan"))
    call((q.data_ptr(), np.int64(f32), np.int32(0), np.int8(0), (1, 1, 4, 8), (32, 32, 8, 1)))
    assert torch.isfinite(o).all()


def test_torch_tensors_read_in_place_match_their_descriptors():
    """_C reads torch tensors in place (data pointer, dtype, device, shape and strides) as it
    reads the descriptors the front end builds: the same output for strided views, tensors that
    require grad and subclasses; a dtype or device without a code goes through DLPack, which
    names the operand."""
    from flashjit import _C, ops

    torch.manual_seed(3)
    q = torch.randn(2, 3, 5, 8)
    k = torch.randn(2, 5, 3, 8).transpose(1, 2)  # strided: heads and rows swapped
    v = torch.nn.Parameter(torch.randn(2, 3, 5, 8))  # a subclass that requires grad
    scalars = (None, None, 0.0, 0, -1, -1, 0.0, 0, 0, 0, 0)
    outputs = []
    for read in (ops._ref, lambda t: t):
        o, lse = torch.full((2, 3, 5, 8), float("nan")), torch.full((2, 3, 5), float("nan"))
        _C.forward(*map(read, (q, k, v, o, lse)), *scalars)
        outputs.append((o, lse))
    assert torch.isfinite(outputs[1][0]).all() and torch.isfinite(outputs[1][1]).all()
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    expected = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8**0.5, -1) @ v.detach().double()
    assert torch.allclose(outputs[1][0].double(), expected, atol=1e-5)
    o, lse = outputs[1]
    with pytest.raises(TypeError, match=r"\[attention\] k: .*int64"):
        _C.forward(q, k.long(), v, o, lse, *scalars)
    with pytest.raises(TypeError, match=r"\[attention\] k: a tensor of torch.float32 on meta, which flashjit cannot read"):
        _C.forward(q, k.to("meta"), v, o, lse, *scalars)
    with pytest.raises(TypeError, match=r"\[attention\] k: a lazily negated view"):
        _C.forward(q, torch._neg_view(k), v, o, lse, *scalars)

    class Watched(torch.Tensor):  # counts the copies _C would make to read it through DLPack
        detached = 0

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.Tensor.detach:
                cls.detached += 1
            return super().__torch_function__(func, types, args, kwargs or {})

    o.fill_(float("nan"))
    _C.forward(q.as_subclass(Watched), k, v, o, lse, *scalars)
    assert Watched.detached == 0 and torch.equal(o, outputs[0][0])


def test_option_checks_hold_after_equal_looking_options_were_made():
    """AttentionOptions.make keeps what it made for arguments of exact builtin types: a value that
    only compares equal to a good one (1 for True, 1.0 for the int 1, a numpy float) is still checked
    and refused or converted as on its first call, and each cached set is the one its arguments give."""
    from flashjit.options import AttentionOptions

    make = AttentionOptions.make
    good = make("attention", scale=0.5, causal=True, window=(3, 0), num_threads=1, deterministic=False)
    assert good == AttentionOptions(scale=0.5, causal=1, window_left=3, window_right=0, num_threads=1,
                                    deterministic=False)
    assert make("attention", scale=0.5, causal=True, window=(3, 0), num_threads=1, deterministic=False) is good
    with pytest.raises(ValueError, match="causal"):
        make("attention", scale=0.5, causal=1, window=(3, 0), num_threads=1, deterministic=False)
    with pytest.raises(TypeError, match="deterministic"):
        make("attention", scale=0.5, causal=True, window=(3, 0), num_threads=1, deterministic=0)
    with pytest.raises((TypeError, ValueError), match="num_threads"):
        make("attention", scale=0.5, causal=True, window=(3, 0), num_threads=1.0, deterministic=False)
    assert make("attention", scale=np.float32(0.5), causal=True, window=(3, 0), num_threads=1,
                deterministic=False).scale.__class__ is float
    assert make("attention", causal="bottom_right").causal == 2
    with pytest.raises(ValueError, match="causal"):
        make("attention", causal="bottom-right")
    # A scale of -0.0 is never served by 0.0's options (the core names the value it got).
    assert str(make("attention", scale=-0.0).scale) == "-0.0"
    assert str(make("attention", scale=0.0).scale) == "0.0"
