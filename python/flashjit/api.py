"""The thin array front end over the C API (numpy arrays and torch tensors)."""

from __future__ import annotations

import numpy as np

from . import _C

_CAUSAL_MODES = {"none": 0, "top_left": 1, "bottom_right": 2}


def backends() -> list[str]:
    """Names of the backends compiled into this build."""
    return _C.backends().split(",")


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _library(op: str, name: str, x, like=None) -> str:
    if isinstance(x, np.ndarray):
        kind = "numpy"
    elif _is_torch(x):
        kind = "torch"
    else:
        raise TypeError(f"[{op}] {name}: expected a numpy.ndarray or torch.Tensor, got {type(x).__name__}")
    if like is not None and kind != like:
        expected = "numpy.ndarray" if like == "numpy" else "torch.Tensor"
        raise TypeError(f"[{op}] {name}: expected a {expected} like q, got {type(x).__module__}.{type(x).__name__}")
    return kind


def _library_of(op: str, q, **others) -> str:
    """The array library of q; every other argument must come from the same one."""
    kind = _library(op, "q", q)
    for name, x in others.items():
        _library(op, name, x, kind)
    return kind


def _plain(x):
    """A view that exports through DLPack: torch tensors lose autograd tracking."""
    return x.detach() if _is_torch(x) else x


def _empty(kind: str, like, shape, float_dtype=None):
    if kind == "numpy":
        return np.empty(shape, dtype=float_dtype or like.dtype)
    import torch

    return torch.empty(shape, dtype=float_dtype or like.dtype, device=like.device)


def _lse_dtype(kind: str, q):
    wide = str(q.dtype).endswith("float64")
    if kind == "numpy":
        return np.float64 if wide else np.float32
    import torch

    return torch.float64 if wide else torch.float32


def _causal_code(op: str, causal) -> int:
    if causal is None or causal is False:
        return 0
    if causal is True:
        return 1
    if isinstance(causal, str) and causal in _CAUSAL_MODES:
        return _CAUSAL_MODES[causal]
    raise ValueError(f"[{op}] causal: expected False, True, 'top_left' or 'bottom_right', got {causal!r}")


def _prepare_mask(op: str, mask, kind: str):
    """Prepends size-1 dims so that a mask broadcastable from the right becomes 4-d."""
    if mask is None:
        return None
    _library(op, "mask", mask, kind)
    if mask.ndim > 4:
        raise ValueError(f"[{op}] mask: expected at most 4 dims broadcastable to "
                         f"[batch, heads_q, seqlen_q, seqlen_k], got {mask.ndim}")
    return _plain(mask[(None,) * (4 - mask.ndim)])


def _options(op, kind, attn_mask, scale, softcap, causal, window, dropout_p, seed, offset, num_threads):
    try:
        window_left, window_right = window
    except (TypeError, ValueError):
        raise ValueError(f"[{op}] window: expected a pair (left, right), got {window!r}") from None
    if dropout_p and seed is None:
        raise ValueError(f"[{op}] seed: required when dropout_p > 0; pass the same seed and offset "
                         "to attention_backward to drop the same elements")
    return dict(
        mask=_prepare_mask(op, attn_mask, kind),
        scale=None if scale is None else float(scale),
        softcap=float(softcap),
        causal=_causal_code(op, causal),
        window_left=int(window_left),
        window_right=int(window_right),
        dropout_p=float(dropout_p),
        seed=int(seed or 0) & 0xFFFFFFFFFFFFFFFF,
        offset=int(offset) & 0xFFFFFFFFFFFFFFFF,
        num_threads=int(num_threads),
    )


def attention(q, k, v, *, attn_mask=None, scale=None, softcap=0.0, causal=False, window=(-1, -1),
              dropout_p=0.0, seed=None, offset=0, num_threads=0):
    """Scaled dot-product attention; returns (o, lse).

    q: [B, Hq, Sq, Dqk]; k: [B, Hkv, Sk, Dqk]; v: [B, Hkv, Sk, Dv], Hq a multiple of Hkv.
    attn_mask: bool (True = attend) or additive float, broadcastable to [B, Hq, Sq, Sk].
    scale: default 1/sqrt(Dqk). softcap: score = softcap * tanh(score / softcap), 0 = off.
    causal: False, True or 'top_left' (SDPA's is_causal), 'bottom_right' (flash-attn's).
    window: (left, right) keys around the diagonal, -1 = unbounded.
    dropout_p, seed, offset: dropout on the probabilities (see flashjit.h for the rule).
    Returns o [B, Hq, Sq, Dv] in q's dtype and lse [B, Hq, Sq] in float32
    (float64 for float64 inputs); rows that see no key give o = 0, lse = -inf.
    """
    op = "attention"
    kind = _library_of(op, q, k=k, v=v)
    options = _options(op, kind, attn_mask, scale, softcap, causal, window, dropout_p, seed, offset, num_threads)
    if q.ndim != 4 or v.ndim != 4:
        # Let the C API name the bad rank; outputs need a shape first.
        o_shape, lse_shape = (0, 0, 0, 0), (0, 0, 0)
    else:
        o_shape, lse_shape = (*q.shape[:3], v.shape[3]), tuple(q.shape[:3])
    o = _empty(kind, q, o_shape)
    lse = _empty(kind, q, lse_shape, _lse_dtype(kind, q))
    _C.forward(_plain(q), _plain(k), _plain(v), o, lse, **options)
    return o, lse


def attention_backward(q, k, v, o, lse, dout, *, attn_mask=None, scale=None, softcap=0.0, causal=False,
                       window=(-1, -1), dropout_p=0.0, seed=None, offset=0, num_threads=0):
    """Gradients (dq, dk, dv) of attention() given its o, lse and the output gradient dout.

    Takes the same options as attention(); dk and dv sum over each group of query heads.
    Deterministic: the same inputs give bit-identical gradients.
    """
    op = "attention_backward"
    kind = _library_of(op, q, k=k, v=v, o=o, lse=lse, dout=dout)
    options = _options(op, kind, attn_mask, scale, softcap, causal, window, dropout_p, seed, offset, num_threads)
    dq = _empty(kind, q, tuple(q.shape))
    dk = _empty(kind, q, tuple(k.shape))
    dv = _empty(kind, q, tuple(v.shape))
    _C.backward(_plain(q), _plain(k), _plain(v), _plain(o), _plain(lse), _plain(dout), dq, dk, dv, **options)
    return dq, dk, dv


def dropout_keep_mask(batch: int, heads: int, seqlen_q: int, seqlen_k: int, *, dropout_p: float, seed: int,
                      offset: int = 0) -> np.ndarray:
    """The keep mask (True = kept) that attention() uses for these sizes, seed and offset."""
    keep = np.empty((batch, heads, seqlen_q, seqlen_k), dtype=np.uint8)
    _C.dropout_keep_mask(int(seed) & 0xFFFFFFFFFFFFFFFF, int(offset) & 0xFFFFFFFFFFFFFFFF, float(dropout_p), keep)
    return keep.astype(bool)
