"""The thin array front end over the C API (numpy arrays and torch tensors)."""

from __future__ import annotations

import sys

import numpy as np

from . import _C
from .arrays import check_dense, output_shapes
from .options import INT64_MAX, U64_MAX, AttentionOptions, integer, seed_and_offset


def backends() -> list[str]:
    """Names of the backends compiled into this build."""
    return _C.backends().split(",")


_TORCH_TYPES: set = set()  # the torch types seen so far (host time per call: no module-name test)
_STRIDED: list = []  # torch.strided, once a torch type was seen


def _is_torch(x) -> bool:
    if type(x) in _TORCH_TYPES:
        return True
    if type(x).__module__.split(".")[0] == "torch":
        _TORCH_TYPES.add(type(x))
        if not _STRIDED:
            _STRIDED.append(sys.modules["torch"].strided)
        return True
    return False


def _library(op: str, name: str, x, like=None) -> str:
    if type(x) in _TORCH_TYPES:
        kind = "torch"
        check_dense(op, name, x)
    elif isinstance(x, np.ndarray):
        kind = "numpy"
    elif _is_torch(x):
        kind = "torch"
        check_dense(op, name, x)
    else:
        raise TypeError(f"[{op}] {name}: expected a numpy.ndarray or torch.Tensor, got {type(x).__name__}")
    if like is not None and kind != like:
        expected = "numpy.ndarray" if like == "numpy" else "torch.Tensor"
        raise TypeError(f"[{op}] {name}: expected a {expected} like q, got {type(x).__module__}.{type(x).__name__}")
    return kind


def _torch_qkv(q, k, v) -> bool:
    """Whether q, k, v are torch tensors of types seen before, strided and not nested: what
    _library_of checks for them, in fewer steps (host time per call)."""
    return (type(q) in _TORCH_TYPES and type(k) in _TORCH_TYPES and type(v) in _TORCH_TYPES
            and q.layout is _STRIDED[0] and k.layout is _STRIDED[0] and v.layout is _STRIDED[0]
            and not (q.is_nested or k.is_nested or v.is_nested))


def _library_of(op: str, q, **others) -> str:
    """The array library of q; every other argument must come from the same one."""
    kind = _library(op, "q", q)
    for name, x in others.items():
        _library(op, name, x, kind)
    return kind


def _prepare_mask(op: str, mask, kind: str):
    """Prepends size-1 dims so that a mask broadcastable from the right becomes 4-d."""
    if mask is None:
        return None
    _library(op, "mask", mask, kind)
    if mask.ndim > 4:
        raise ValueError(f"[{op}] mask: expected at most 4 dims broadcastable to "
                         f"[batch, heads_q, seqlen_q, seqlen_k], got {mask.ndim}")
    return mask[(None,) * (4 - mask.ndim)]


def _numpy_call(op: str, attn_mask, options: AttentionOptions, dropout_p, seed, offset) -> dict:
    """The C API's keyword arguments for numpy arrays (a seed is required for dropout)."""
    seed, offset = seed_and_offset(op, seed, offset)
    if dropout_p and seed is None:
        raise ValueError(f"[{op}] seed: required when dropout_p > 0 with numpy arrays; pass the same seed and "
                         "offset to attention_backward to drop the same elements")
    return options.c_kwargs(_prepare_mask(op, attn_mask, "numpy"), seed or 0, offset)


_NO_TENSORS = {"mask": None, "rng": None}


def _torch_ops():
    """flashjit.ops (imported with torch, on the first torch call)."""
    if not _OPS:
        from . import ops

        _OPS.append(ops)
    return _OPS[0]


_OPS: list = []


def _torch_tensors(op: str, attn_mask, options: AttentionOptions, seed, offset) -> dict:
    """The torch ops' per-call tensors: the mask, and the dropout seed as a tensor."""
    if seed is None and offset.__class__ is int and offset == 0 and not options.dropout_p and attn_mask is None:
        return _NO_TENSORS  # the common call, nothing to check (host time per call); read only
    from . import ops

    seed, offset = seed_and_offset(op, seed, offset)
    rng = ops.dropout_rng(seed, offset) if options.dropout_p else None
    return dict(mask=_prepare_mask(op, attn_mask, "torch"), rng=rng)


def attention(q, k, v, *, attn_mask=None, scale=None, softcap=0.0, causal=False, window=(-1, -1),
              dropout_p=0.0, seed=None, offset=0, return_lse=False, num_threads=0, deterministic=True):
    """Scaled dot-product attention with the options SDPA cannot express.

    q: [B, Hq, Sq, Dqk]; k: [B, Hkv, Sk, Dqk]; v: [B, Hkv, Sk, Dv], Hq a multiple of Hkv
    (grouped-query attention without copies); any strides with a unit-stride last dim.
    attn_mask: bool (True = attend) or additive float, broadcastable to [B, Hq, Sq, Sk].
    scale: default 1/sqrt(Dqk). softcap: score = softcap * tanh(score / softcap), 0 = off.
    causal: False, True or 'top_left' (SDPA's is_causal), 'bottom_right' (flash-attn's:
    the last query sees the last key).
    window: (left, right) keys around the diagonal, -1 = unbounded.
    dropout_p, seed, offset: dropout on the probabilities. With torch tensors and no seed,
    the seed is drawn from torch's default generator (torch.manual_seed makes it repeatable);
    numpy arrays need a seed.
    Returns o [B, Hq, Sq, Dv] in q's dtype, and with return_lse=True also lse [B, Hq, Sq] in
    float32 (float64 for float64 inputs). Rows that see no key give o = 0, lse = -inf.
    torch tensors are differentiable through q, k and v (not lse, not the mask).
    deterministic: True (default): the backward is bitwise repeatable. False lets it sum dq in
    no fixed order where that is faster (CUDA, sm_90, head dims up to 64 and 128), so dq may differ in
    its last bits between runs (dk, dv stay repeatable); ignored while
    torch.use_deterministic_algorithms(True) is in force, and on the CPU.
    """
    op = "attention"
    kind = "torch" if _torch_qkv(q, k, v) else _library_of(op, q, k=k, v=v)
    options = AttentionOptions.make(op, scale=scale, softcap=softcap, causal=causal, window=window,
                                    dropout_p=dropout_p, num_threads=num_threads, deterministic=deterministic)
    if kind == "torch":
        ops = _torch_ops()
        o, lse = ops.attention(q, k, v, options, **_torch_tensors(op, attn_mask, options, seed, offset),
                               with_lse=return_lse)
    else:
        call = _numpy_call(op, attn_mask, options, dropout_p, seed, offset)
        o_shape, lse_shape = output_shapes(op, q, v)
        o = np.empty(o_shape, dtype=q.dtype)
        # Without return_lse no log-sum-exp is allocated or written (no backward for arrays).
        lse = np.empty(lse_shape, dtype=np.float64 if q.dtype == np.float64 else np.float32) if return_lse else None
        _C.forward(q, k, v, o, lse, **call)
    return (o, lse) if return_lse else o


def attention_backward(q, k, v, o, lse, dout, *, attn_mask=None, scale=None, softcap=0.0, causal=False,
                       window=(-1, -1), dropout_p=0.0, seed=None, offset=0, num_threads=0, deterministic=True):
    """Gradients (dq, dk, dv) of attention() given its o, lse and the output gradient dout.

    Takes the same options as attention() (with dropout, the same seed and offset);
    dk and dv sum over each group of query heads. Deterministic: the same inputs give
    bit-identical gradients, unless deterministic=False (see attention()). With torch
    tensors, autograd through attention() does this for you.
    """
    op = "attention_backward"
    kind = _library_of(op, q, k=k, v=v, o=o, lse=lse, dout=dout)
    options = AttentionOptions.make(op, scale=scale, softcap=softcap, causal=causal, window=window,
                                    dropout_p=dropout_p, num_threads=num_threads, deterministic=deterministic)
    if kind == "torch":
        from . import ops

        if dropout_p and seed is None:
            raise ValueError(f"[{op}] seed: required when dropout_p > 0; pass the seed and offset given to "
                             "attention()")
        tensors = _torch_tensors(op, attn_mask, options, seed, offset)
        return ops.bwd(dout, q, k, v, o, lse, *options.op_args(tensors["mask"], tensors["rng"]))
    call = _numpy_call(op, attn_mask, options, dropout_p, seed, offset)
    dq, dk, dv = (np.empty(x.shape, dtype=q.dtype) for x in (q, k, v))
    _C.backward(q, k, v, o, lse, dout, dq, dk, dv, **call)
    return dq, dk, dv


def dropout_keep_mask(batch: int, heads: int, seqlen_q: int, seqlen_k: int, *, dropout_p: float, seed: int,
                      offset: int = 0) -> np.ndarray:
    """The keep mask (True = kept) that attention() uses for these sizes, seed and offset."""
    op = "dropout_keep_mask"
    sizes = [integer(op, name, value, 0, INT64_MAX, ">= 0")
             for name, value in (("batch", batch), ("heads", heads), ("seqlen_q", seqlen_q), ("seqlen_k", seqlen_k))]
    seed = integer(op, "seed", seed, 0, U64_MAX, "0..2^64-1")
    offset = integer(op, "offset", offset, 0, U64_MAX, "0..2^64-1")
    keep = np.empty(sizes, dtype=np.uint8)
    _C.dropout_keep_mask(seed, offset, float(dropout_p), keep)
    return keep.astype(bool)
