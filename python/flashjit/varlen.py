"""Attention over packed variable-length sequences, with flash-attn's layouts.

    o = flashjit.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=True)

q [total_q, Hq, D], k [total_k, Hkv, D], v [total_k, Hkv, Dv]: the sequences of a batch
one after another, sequence i being rows cu_seqlens_q[i]:cu_seqlens_q[i + 1] of q and
cu_seqlens_k[i]:cu_seqlens_k[i + 1] of k and v (int32 or int64 offsets, batch + 1 of
them, from 0 to the total). Attention never crosses a sequence boundary.

This version runs one kernel call per sequence on views of the packed tensors (no
copies; the outputs are written in place into the packed result), with the offsets
read on the host (a device synchronisation for offsets on a GPU); kernels that take the
offsets themselves are future work, and the custom op under torch.compile with them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _C, ops
from .arrays import check_dense
from .options import AttentionOptions, seed_and_offset

_OP = "varlen_attention"


def _offsets(name: str, offsets, total: int, batch: Optional[int]) -> list[int]:
    """The offsets as a host list, checked: 1-d integers, batch + 1 of them, from 0 to the
    total, never decreasing."""
    if not isinstance(offsets, Tensor):
        raise TypeError(f"[{_OP}] {name}: expected a torch.Tensor of int32 offsets, got {type(offsets).__name__}")
    if offsets.dtype not in (torch.int32, torch.int64) or offsets.ndim != 1 or offsets.numel() < 1:
        raise ValueError(f"[{_OP}] {name}: expected a 1-d int32 (or int64) tensor of batch + 1 offsets, got "
                         f"{str(offsets.dtype).removeprefix('torch.')} of shape {list(offsets.shape)}")
    values = offsets.tolist()
    if batch is not None and len(values) != batch + 1:
        raise ValueError(f"[{_OP}] {name}: expected {batch + 1} offsets (those of cu_seqlens_q), got {len(values)}")
    if values[0] != 0:
        raise ValueError(f"[{_OP}] {name}: expected the first offset to be 0, got {values[0]}")
    for i in range(len(values) - 1):
        if values[i + 1] < values[i]:
            raise ValueError(f"[{_OP}] {name}: offsets must not decrease; offset {i + 1} is {values[i + 1]} after "
                             f"{values[i]}")
    if values[-1] != total:
        raise ValueError(f"[{_OP}] {name}: expected the last offset to be the number of rows ({total}), got "
                         f"{values[-1]}")
    return values


def _sequence(x: Tensor, begin: int, end: int) -> Tensor:
    """Rows begin:end of a packed [total, H, D] tensor as a [1, H, end - begin, D] view."""
    return x[begin:end].transpose(0, 1).unsqueeze(0)


def _lse_sequence(lse: Tensor, begin: int, end: int) -> Tensor:
    """Columns begin:end of lse [H, total] as a [1, H, end - begin] view."""
    return lse[:, begin:end].unsqueeze(0)


def _sequence_args(options: AttentionOptions, rng: Optional[Tensor], index: int) -> tuple:
    """The ops' arguments for sequence `index`: its dropout draws from offset + index."""
    if rng is None:
        return options.op_args(None, None)
    seed, offset = ops._seed_offset(rng)
    return options.op_args(None, ops.dropout_rng(seed, offset + index))


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, offsets_q, offsets_k, options, rng):
        o = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
        lse = torch.empty(q.shape[1], q.shape[0], dtype=ops.lse_dtype(q.dtype), device=q.device)
        for i in range(len(offsets_q) - 1):
            (qb, qe), (kb, ke) = offsets_q[i:i + 2], offsets_k[i:i + 2]
            if qe == qb:
                continue
            ops._run(_C.forward, (_sequence(q, qb, qe), _sequence(k, kb, ke), _sequence(v, kb, ke)),
                     (_sequence(o, qb, qe), _lse_sequence(lse, qb, qe)), *_sequence_args(options, rng, i))
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.offsets, ctx.options, ctx.rng = (offsets_q, offsets_k), options, rng
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, grad_o, grad_lse):
        q, k, v, o, lse = ctx.saved_tensors
        offsets_q, offsets_k = ctx.offsets
        grad_o = grad_o.contiguous() if grad_o.stride(-1) != 1 else grad_o
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for i in range(len(offsets_q) - 1):
            (qb, qe), (kb, ke) = offsets_q[i:i + 2], offsets_k[i:i + 2]
            if qe == qb or ke == kb:
                continue
            inputs = (_sequence(q, qb, qe), _sequence(k, kb, ke), _sequence(v, kb, ke), _sequence(o, qb, qe),
                      _lse_sequence(lse, qb, qe), _sequence(grad_o, qb, qe))
            ops._run(_C.backward, inputs, (_sequence(dq, qb, qe), _sequence(dk, kb, ke), _sequence(dv, kb, ke)),
                     *_sequence_args(ctx.options, ctx.rng, i))
        return dq, dk, dv, None, None, None, None


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *, causal=False,
                     window=(-1, -1), softcap=0.0, dropout_p=0.0, scale=None, seed=None, offset=0,
                     return_lse=False):
    """o [total_q, Hq, Dv] (and with return_lse=True lse [Hq, total_q], float32) of each
    sequence's own attention; see the module's doc for the layouts.

    causal: False, True or 'bottom_right' (as flash-attn: the last query of a sequence sees
    its last key), 'top_left'. window, softcap, scale, dropout_p as flashjit.attention;
    sequence i draws its dropout from (seed, offset + i) as a batch of one (the keep mask of
    flashjit.dropout_keep_mask(1, Hq, len_q, len_k, seed=seed, offset=offset + i)); without a
    seed it is drawn from torch's generator. max_seqlen_q/k, where given, must bound the
    lengths. Differentiable through q, k and v.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"[{_OP}] {name}: expected a torch.Tensor, got {type(x).__name__}")
        check_dense(_OP, name, x)
        if x.ndim != 3:
            raise ValueError(f"[{_OP}] {name}: expected 3 dims [total, heads, head_dim], got {x.ndim}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"[{_OP}] v: expected {k.shape[0]} rows (those of k), got {v.shape[0]}")
    offsets_q = _offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0], None)
    offsets_k = _offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0], len(offsets_q) - 1)
    for name, bound, offsets in (("max_seqlen_q", max_seqlen_q, offsets_q), ("max_seqlen_k", max_seqlen_k, offsets_k)):
        longest = max((b - a for a, b in zip(offsets, offsets[1:])), default=0)
        if bound is not None and int(bound) < longest:
            raise ValueError(f"[{_OP}] {name}: {bound} is less than the longest sequence ({longest})")
    options = AttentionOptions.make(_OP, scale=scale, softcap=softcap,
                                    causal="bottom_right" if causal is True else causal, window=window,
                                    dropout_p=dropout_p)
    rng = None
    if dropout_p:
        seed, offset = seed_and_offset(_OP, seed, offset)
        rng = ops.dropout_rng(seed, offset) if seed is not None else ops.dropout_rng()
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        o, lse = _VarlenAttention.apply(q, k, v, offsets_q, offsets_k, options, rng)
    else:
        with torch.no_grad():
            o, lse = _VarlenAttention.forward(_NoContext(), q, k, v, offsets_q, offsets_k, options, rng)
    return (o, lse) if return_lse else o


class _NoContext:
    """Stands in for autograd's context where nothing is differentiated."""

    def save_for_backward(self, *tensors):
        pass

    def mark_non_differentiable(self, *tensors):
        pass
