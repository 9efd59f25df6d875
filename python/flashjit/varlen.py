"""Attention over packed variable-length sequences, with flash-attn's layouts.

    o = flashjit.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=True)

q [total_q, Hq, D], k [total_k, Hkv, D], v [total_k, Hkv, Dv]: the sequences of a batch
one after another, sequence i being rows cu_seqlens_q[i]:cu_seqlens_q[i + 1] of q and
cu_seqlens_k[i]:cu_seqlens_k[i + 1] of k and v (int32 or int64 offsets, batch + 1 of
them, from 0 to the total). Attention never crosses a sequence boundary.

This version runs one kernel call per sequence on views of the packed tensors (no
copies; the outputs are written in place into the packed result), with the offsets
read on the host (a device synchronisation for offsets on a GPU); kernels that take the
offsets themselves are future work, and the custom op under torch.compile with them. flashjit.profile() records each sequence's call.
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


def _sequence_args(options: AttentionOptions, seed_offset: Optional[tuple[int, int]], index: int) -> tuple:
    """The ops' arguments for sequence `index`: its dropout draws from offset + index."""
    if seed_offset is None:
        return options.op_args(None, None)
    seed, offset = seed_offset
    return options.op_args(None, ops.dropout_rng(seed, offset + index))


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, offsets_q, offsets_k, options, seed_offset):
        o = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
        lse = torch.empty(q.shape[1], q.shape[0], dtype=ops.lse_dtype(q.dtype), device=q.device)
        for i in range(len(offsets_q) - 1):
            (qb, qe), (kb, ke) = offsets_q[i:i + 2], offsets_k[i:i + 2]
            if qe == qb:
                continue
            ops._run_recorded("forward", _C.forward, (_sequence(q, qb, qe), _sequence(k, kb, ke), _sequence(v, kb, ke)),
                              (_sequence(o, qb, qe), _lse_sequence(lse, qb, qe)), *_sequence_args(options, seed_offset, i))
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.offsets, ctx.options, ctx.seed_offset = (offsets_q, offsets_k), options, seed_offset
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
            ops._run_recorded("backward", _C.backward, inputs,
                              (_sequence(dq, qb, qe), _sequence(dk, kb, ke), _sequence(dv, kb, ke)),
                              *_sequence_args(ctx.options, ctx.seed_offset, i))
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
    seed_offset = None  # (seed, offset) as unsigned 64-bit integers, read once
    if dropout_p:
        seed, offset = seed_and_offset(_OP, seed, offset)
        seed_offset = ops._seed_offset(ops.dropout_rng() if seed is None else ops.dropout_rng(seed, offset))
    o, lse = _VarlenAttention.apply(q, k, v, offsets_q, offsets_k, options, seed_offset)
    return (o, lse) if return_lse else o


_KV_OP = "attention_with_kvcache"


def _cache_rows(cache: Tensor, page_table: Optional[Tensor], b: int, begin: int, end: int) -> Tensor:
    """Rows begin:end of sequence b's cache as [end - begin, H, D]: a view of a dense cache, or
    (pages [num_pages, page_size, H, D]) the rows gathered from its pages."""
    if page_table is None:
        return cache[b, begin:end]
    page_size = cache.shape[1]
    rows = torch.arange(begin, end, device=cache.device)
    pages = page_table[b].to(cache.device).long()[rows // page_size]
    return cache[pages, rows % page_size]


def attention_with_kvcache(q, k_cache, v_cache, *, cache_seqlens, page_table=None, k=None, v=None, causal=False,
                           window=(-1, -1), softcap=0.0, scale=None, return_lse=False):
    """flash-attn's flash_attn_with_kvcache: q [B, Sq, Hq, D] attends to the first
    cache_seqlens[b] (+ S_new) keys of its sequence's cache → [B, Sq, Hq, Dv] (and lse
    [B, Hq, Sq]). The cache is k_cache [B, S_cache, Hkv, D], v_cache [B, S_cache, Hkv, Dv],
    or with page_table [B, max_pages] (int32) pages [num_pages, page_size, Hkv, D]. k, v
    [B, S_new, Hkv, D] given are first written into the cache at each sequence's length (in
    place). causal=True aligns bottom-right (the last query sees the last key).

    This version runs one kernel call per sequence (on views of a dense cache; a paged one's
    rows are gathered first); not differentiable (a cache is for inference)."""
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(x, Tensor):
            raise TypeError(f"[{_KV_OP}] {name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"[{_KV_OP}] {name}: expected 4 dims, got {x.ndim}")
    batch = q.shape[0]
    lengths = _lengths("cache_seqlens", cache_seqlens, batch)
    if page_table is not None:
        if not isinstance(page_table, Tensor) or page_table.dtype not in (torch.int32, torch.int64) or \
                page_table.ndim != 2 or page_table.shape[0] != batch:
            raise ValueError(f"[{_KV_OP}] page_table: expected an int32 tensor [batch={batch}, max_pages]")
        capacity = page_table.shape[1] * k_cache.shape[1]
        pages = page_table.tolist()
        for b, row in enumerate(pages):
            used = -(-(lengths[b] + (0 if k is None else k.shape[1])) // k_cache.shape[1])
            for p in row[:used]:
                if not 0 <= p < k_cache.shape[0]:
                    raise ValueError(f"[{_KV_OP}] page_table: page {p} of sequence {b} is out of range "
                                     f"(0..{k_cache.shape[0] - 1})")
    else:
        capacity = k_cache.shape[1]
        if k_cache.shape[0] != batch:
            raise ValueError(f"[{_KV_OP}] k_cache: expected a batch of {batch} (q's), got {k_cache.shape[0]}")
    new = 0
    if (k is None) != (v is None):
        raise ValueError(f"[{_KV_OP}] k, v: give both new keys and values, or neither")
    if k is not None:
        new = k.shape[1]
        for b in range(batch):
            if lengths[b] + new > capacity:
                raise ValueError(f"[{_KV_OP}] k: sequence {b} holds {lengths[b]} keys; {new} more do not fit "
                                 f"its cache of {capacity}")
        for b in range(batch):  # appended in place before attending
            for cache, values in ((k_cache, k), (v_cache, v)):
                if page_table is None:
                    cache[b, lengths[b]:lengths[b] + new] = values[b]
                else:
                    rows = torch.arange(lengths[b], lengths[b] + new, device=cache.device)
                    page = torch.as_tensor(pages[b], device=cache.device)[rows // cache.shape[1]]
                    cache[page, rows % cache.shape[1]] = values[b]
    options = dict(scale=scale, softcap=softcap, causal="bottom_right" if causal is True else causal, window=window)
    o = q.new_empty(batch, q.shape[1], q.shape[2], v_cache.shape[-1])
    lse = torch.empty(batch, q.shape[2], q.shape[1], dtype=ops.lse_dtype(q.dtype), device=q.device)
    from .api import attention

    with torch.no_grad():
        for b in range(batch):
            keys = lengths[b] + new
            kb = _cache_rows(k_cache, page_table, b, 0, keys)
            vb = _cache_rows(v_cache, page_table, b, 0, keys)
            ob, lseb = attention(q[b:b + 1].transpose(1, 2), kb.transpose(0, 1)[None], vb.transpose(0, 1)[None],
                                 return_lse=True, **options)
            o[b] = ob[0].transpose(0, 1)
            lse[b] = lseb[0]
    return (o, lse) if return_lse else o


def _lengths(name: str, lengths, batch: int) -> list[int]:
    if not isinstance(lengths, Tensor) or lengths.dtype not in (torch.int32, torch.int64) or lengths.ndim != 1 or \
            lengths.shape[0] != batch:
        raise ValueError(f"[{_KV_OP}] {name}: expected an int32 tensor of {batch} lengths (q's batch)")
    values = lengths.tolist()
    for b, value in enumerate(values):
        if value < 0:
            raise ValueError(f"[{_KV_OP}] {name}: length {value} of sequence {b} is negative")
    return values
