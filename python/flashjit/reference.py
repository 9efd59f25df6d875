"""Naive attention in torch: matmul, softmax, matmul, with every option flashjit has.

It materialises the [B, Hq, Sq, Sk] scores, so it serves as the slow, obviously
right version: the double backward recomputes attention with it (ops.py), the
benchmark and the demo time it as the unfused baseline, and the tests compare
flashjit with it in float64 and in the input dtype (the tolerance rule's baseline).
"""

from __future__ import annotations

import math

import torch

from .options import causal_code


def _code(causal) -> int:
    return causal if type(causal) is int else causal_code("naive_attention", causal)


def visible(seqlen_q: int, seqlen_k: int, causal, window=(-1, -1), device=None) -> torch.Tensor:
    """Bool [Sq, Sk]: the keys each query may see through the causal and window bounds
    (causal: 0/False, 1/True/'top_left' or 2/'bottom_right'; window (left, right), -1 = unbounded,
    around the diagonal that ends at the last key unless the causal bound is top-left)."""
    code = _code(causal)
    left, right = window
    if code:
        right = 0
    shift = 0 if code == 1 else seqlen_k - seqlen_q  # windows without a causal bound align bottom-right
    rel = (torch.arange(seqlen_k, device=device)[None, :] - torch.arange(seqlen_q, device=device)[:, None] - shift)
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= rel >= -left
    if right >= 0:
        keep &= rel <= right
    return keep


def naive_attention(q, k, v, *, attn_mask=None, scale=None, softcap=0.0, causal=False, window=(-1, -1),
                    dropout_p=0.0, keep=None, dtype=None, return_lse=False):
    """o (and with return_lse=True the float64 log-sum-exp) of [B, Hq, S, D] tensors,
    differentiable, computed in `dtype` (default: q's dtype promoted to at least float32).
    Hq may be a multiple of the key/value heads. attn_mask: bool (True = attend) or added.
    keep: bool [B, Hq, Sq, Sk], the dropout mask (dropout_p > 0). Rows that see no key give
    0 and zero gradients: their softmax is taken over a finite stand-in row, then zeroed,
    which keeps NaN out of both passes (and of a second differentiation)."""
    dtype = dtype or torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    group = q.shape[-3] // k.shape[-3]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.to(dtype)
    seqlen_q, seqlen_k = q.shape[-2], k.shape[-2]
    code, window = _code(causal), tuple(window)
    if code or window != (-1, -1):
        s = s.masked_fill(~visible(seqlen_q, seqlen_k, code, window, q.device), float("-inf"))
    # Rows can see no key only through a mask, a window, or bottom-right bounds over fewer keys.
    may_be_empty = attn_mask is not None or window != (-1, -1) or (code == 2 and seqlen_q > seqlen_k)
    if may_be_empty:
        empty = torch.isneginf(s).all(dim=-1, keepdim=True)
        p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    else:
        p = torch.softmax(s, dim=-1)
    if dropout_p:
        p = p * keep.to(dtype) / (1.0 - dropout_p)
    o = p @ v
    return (o, torch.logsumexp(s.to(torch.float64), dim=-1)) if return_lse else o
