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
    ("not an array", TypeError, r"q: expected a numpy.ndarray or torch.Tensor, got list", dict(q=[[1.0]])),
    ("numpy k with torch q", TypeError, r"k: expected a torch.Tensor like q, got numpy.ndarray",
     dict(k=np.zeros((2, 2, 12, 16), np.float32))),
]


@pytest.mark.parametrize("name,exc,match,kwargs", BAD_FORWARD, ids=[c[0] for c in BAD_FORWARD])
def test_forward_rejects(name, exc, match, kwargs):
    forward_raises(exc, match, **kwargs)


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
