"""Attention over packed variable-length sequences, with flash-attn's layouts.

    o = flashjit.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=True)

q [total_q, Hq, D], k [total_k, Hkv, D], v [total_k, Hkv, Dv]: the sequences of a batch
one after another, sequence i being rows cu_seqlens_q[i]:cu_seqlens_q[i + 1] of q and
cu_seqlens_k[i]:cu_seqlens_k[i + 1] of k and v (int32 or int64 offsets, batch + 1 of
them, from 0 to the total). Attention never crosses a sequence boundary.

The whole batch is one call of the C API's variable-length entry (fj_attention_varlen_*),
whose offsets live in host memory: offsets on a GPU are copied to the host first (a
synchronisation). On the CPU the sequences share one pool of tasks; on a GPU each sequence
is a launch of its own on the caller's stream, or, on sm_90 (unless FLASHJIT_CUDA_VARLEN=0), the
batch is one launch a kernel, and offsets on the GPU with both maxima given stay there (a
kernel builds the sequences' table; their values are then not checked, only clamped into
the packed rows). Dropout drops what it drops in the padded
batch [batch, Hq, max_q, max_k] at the same (sequence, head, row, key).
"""

from __future__ import annotations

import functools
import itertools
import os
from typing import Optional

import torch
from torch import Tensor

from . import _C, ops
from . import profiler as _profiler
from .arrays import check_dense, check_kv_cache, check_kv_ranks
from .options import AttentionOptions, seed_and_offset

_OP = "varlen_attention"


def _offsets(name: str, offsets, on_device: bool = False) -> Tensor:
    """The offsets as the C API reads them: a contiguous int32 tensor in host memory (one
    device-to-host copy for offsets on a GPU), whose values the call checks; or, on_device
    (_offsets_stay_on_device), left on the GPU as int32, their values read by the kernels
    only (never checked; raised to never decrease and clamped into the packed rows; int64
    offsets are narrowed without a check)."""
    if not isinstance(offsets, Tensor):
        raise TypeError(f"[{_OP}] {name}: expected a torch.Tensor of int32 offsets, got {type(offsets).__name__}")
    if offsets.dtype not in (torch.int32, torch.int64) or offsets.ndim != 1 or offsets.numel() < 1:
        raise ValueError(f"[{_OP}] {name}: expected a 1-d int32 (or int64) tensor of batch + 1 offsets, got "
                         f"{str(offsets.dtype).removeprefix('torch.')} of shape {list(offsets.shape)}")
    if on_device:
        return offsets.to(dtype=torch.int32).contiguous()
    if offsets.dtype == torch.int64 and offsets.numel() and int(offsets.abs().max()) >= 2**31:
        raise ValueError(f"[{_OP}] {name}: offsets must fit int32, got {int(offsets.abs().max())}")
    return offsets.to(device="cpu", dtype=torch.int32).contiguous()


def _offsets_stay_on_device(q: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q, max_seqlen_k) -> bool:
    """Whether the offsets go to the C API in GPU memory (no wait for the GPU before the call):
    CUDA operands and offsets, both maxima given, and the one-launch path not switched off
    (FLASHJIT_CUDA_VARLEN=0; where one launch does not apply the backend copies them to the
    host itself)."""
    return (q.is_cuda and cu_seqlens_q.device == q.device and cu_seqlens_k.device == q.device
            and bool(max_seqlen_q) and bool(max_seqlen_k) and os.environ.get("FLASHJIT_CUDA_VARLEN") != "0")


_INT32 = _C.INDEX_DTYPES["int32"]


def _index_ref(x: Optional[Tensor]):
    """An int32 array of a variable-length call (offsets, counts, a page table) as _C reads it:
    a descriptor tuple (ops._ref's form) for a tensor on the CPU or a CUDA device, else the tensor
    (DLPack), whose dtype or device _C then names."""
    if x is not None and x.dtype == torch.int32:
        if x.is_cpu:
            return (x.data_ptr(), _INT32, ops._CPU, 0, x.shape, x.stride())
        if x.is_cuda and ops._CUDA is not None:
            return (x.data_ptr(), _INT32, ops._CUDA, x.get_device(), x.shape, x.stride())
    return x


# The offsets of a batch of `batch` sequences of `step` rows each (0, step, 2 * step, ...): read
# only, so made once a shape (host time per decoding call).
@functools.lru_cache(maxsize=64)
def _even_offsets(batch: int, step: int) -> Tensor:
    return torch.arange(batch + 1, dtype=torch.int32, device="cpu") * step  # whatever the default device


def _lengths_of(offsets: Tensor) -> list[int]:
    return (offsets[1:] - offsets[:-1]).tolist()


def _run(direction: str, kernel, offsets_q: Tensor, offsets_k: Optional[Tensor], max_q: int, max_k: int, inputs,
         outputs, options: tuple, key_lengths: Optional[list] = None, record: bool = True):
    """One call of the C API's varlen entry for the whole batch (offsets as _offsets gives
    them; options: the ops' trailing arguments), recorded by an open flashjit.profile() with
    each sequence's work (key_lengths: the keys each uses, where not the offsets' spans);
    record false: not recorded (a call that only checks)."""

    def call(*tensors, **kwargs):
        # The tensors stay referenced here while the descriptors point into them.
        kernel(_index_ref(offsets_q), _index_ref(offsets_k), max_q, max_k, *tensors, **kwargs)

    profile = _profiler._active
    if profile is None or not record:
        ops._run(call, inputs, outputs, *options)
        return
    opt, _, _ = AttentionOptions.from_op_args(options)
    sequences = list(zip(_lengths_of(offsets_q), key_lengths or _lengths_of(offsets_k)))
    record = profile.begin(direction, "flashjit", *inputs[:3], opt.causal, opt.window_left, opt.window_right, None,
                           opt.dropout_p, sequences=sequences)
    ops._run(call, inputs, outputs, *options)
    ops.offer_replay(profile, record, ops._run, call, inputs, outputs, options)
    profile.end(record)


def _outputs(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    o = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    return o, torch.empty(q.shape[1], q.shape[0], dtype=ops.lse_dtype(q.dtype), device=q.device)


# Custom ops, so that torch.compile traces through a call (their fake kernels give the
# shapes) and autograd reaches the backward. The offsets go to the host inside the ops (or stay
# on the device: _offsets).
@torch.library.custom_op("flashjit::varlen_fwd", mutates_args=())
def varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
               max_seqlen_k: int, mask: Optional[Tensor], scale: Optional[float], softcap: float, causal: int,
               window_left: int, window_right: int, dropout_p: float, rng: Optional[Tensor],
               num_threads: int, deterministic: bool = True) -> tuple[Tensor, Tensor]:
    """o [total_q, Hq, Dv] and lse [Hq, total_q] (float32; float64 for float64)."""
    o, lse = _outputs(q, v)
    on_device = _offsets_stay_on_device(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _run("forward", _C.varlen_forward, _offsets("cu_seqlens_q", cu_seqlens_q, on_device),
         _offsets("cu_seqlens_k", cu_seqlens_k, on_device), max_seqlen_q, max_seqlen_k, (q, k, v), (o, lse),
         (mask, scale, softcap, causal, window_left, window_right, dropout_p, rng, num_threads, deterministic))
    return o, lse


@varlen_fwd.register_fake
def _varlen_fwd_fake(q, k, v, *rest):
    return _outputs(q, v)


@torch.library.custom_op("flashjit::varlen_bwd", mutates_args=())
def varlen_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, cu_seqlens_q: Tensor,
               cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, mask: Optional[Tensor],
               scale: Optional[float], softcap: float, causal: int, window_left: int, window_right: int,
               dropout_p: float, rng: Optional[Tensor], num_threads: int,
               deterministic: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of the packed q, k, v (dk, dv summed over each GQA group; bitwise repeatable
    unless deterministic is False)."""
    dout = dout.contiguous() if dout.stride(-1) != 1 else dout
    dq, dk, dv = ops._gradient_like(q), ops._gradient_like(k), ops._gradient_like(v)
    on_device = _offsets_stay_on_device(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _run("backward", _C.varlen_backward, _offsets("cu_seqlens_q", cu_seqlens_q, on_device),
         _offsets("cu_seqlens_k", cu_seqlens_k, on_device), max_seqlen_q, max_seqlen_k, (q, k, v, o, lse, dout),
         (dq, dk, dv),
         (mask, scale, softcap, causal, window_left, window_right, dropout_p, rng, num_threads, deterministic))
    return dq, dk, dv


@varlen_bwd.register_fake
def _varlen_bwd_fake(dout, q, k, v, *rest):
    return ops._gradient_like(q), ops._gradient_like(k), ops._gradient_like(v)


def _setup_varlen_fwd(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k = inputs[:7]
    ctx.lengths = (max_q, max_k)
    ctx.options = inputs[7:]
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
    ctx.mark_non_differentiable(lse)


def _varlen_fwd_backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = varlen_bwd(grad_o, q, k, v, o, lse, cu_q, cu_k, *ctx.lengths, *ctx.options)
    return (dq, dk, dv) + (None,) * (4 + AttentionOptions.OP_ARG_COUNT)


varlen_fwd.register_autograd(_varlen_fwd_backward, setup_context=_setup_varlen_fwd)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *, causal=False,
                     window=(-1, -1), softcap=0.0, dropout_p=0.0, scale=None, seed=None, offset=0,
                     return_lse=False):
    """o [total_q, Hq, Dv] (and with return_lse=True lse [Hq, total_q], float32) of each
    sequence's own attention; see the module's doc for the layouts.

    causal: False, True or 'bottom_right' (as flash-attn: the last query of a sequence sees
    its last key), 'top_left'. window, softcap, scale, dropout_p as flashjit.attention;
    sequence i keeps what flashjit.dropout_keep_mask(batch, Hq, max_q, max_k, seed=seed,
    offset=offset)[i, :, :len_q, :len_k] keeps (a padded batch's mask); without a seed it is
    drawn from torch's generator. max_seqlen_q/k, where given, must bound the lengths.
    Differentiable through q, k and v.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"[{_OP}] {name}: expected a torch.Tensor, got {type(x).__name__}")
        check_dense(_OP, name, x)
        if x.ndim != 3:
            raise ValueError(f"[{_OP}] {name}: expected 3 dims [total, heads, head_dim], got {x.ndim}")
    for name, offsets in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(offsets, Tensor):
            raise TypeError(f"[{_OP}] {name}: expected a torch.Tensor of int32 offsets, got {type(offsets).__name__}")
    # The C API reads the offsets on the host unless they stay on the device: copied there once
    # (a no-op for host offsets), so that the backward, which gets the same tensors, needs no
    # second device-to-host copy.
    if not _offsets_stay_on_device(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.to("cpu"), cu_seqlens_k.to("cpu")
    options = AttentionOptions.make(_OP, scale=scale, softcap=softcap,
                                    causal="bottom_right" if causal is True else causal, window=window,
                                    dropout_p=dropout_p)
    rng = None
    if dropout_p:
        seed, offset = seed_and_offset(_OP, seed, offset)
        rng = ops.dropout_rng(seed, offset)
    o, lse = varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q or 0), int(max_seqlen_k or 0),
                        *options.op_args(None, rng))
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

    One call of the C API's varlen entry for the batch: the cache as packed rows with each
    sequence's key count (seqused_k), or its pages through the page table, read in place (on
    CUDA in one launch for float16/bfloat16; for float32 each sequence's used rows are gathered
    first). Not differentiable (a cache is for inference).

    Counts and a page table in the GPU's memory (CUDA, no new keys) stay there: the host never
    reads them, so a decoding loop does not wait for the GPU each call, and their values are not
    checked; the kernels clamp each count into its cache and each page index into the pages, so
    nothing outside the cache is read. Counts and tables on the CPU, calls with new keys, and
    FLASHJIT_CUDA_KV_DEVICE=0 have them checked, with errors naming the sequence and value."""
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(x, Tensor):
            raise TypeError(f"[{_KV_OP}] {name}: expected a torch.Tensor, got {type(x).__name__}")
    check_kv_ranks(_KV_OP, q, k_cache, v_cache)
    batch = q.shape[0]
    if _counts_stay_on_device(q, cache_seqlens, page_table, k, v):
        try:
            return _kvcache_on_device(q, k_cache, v_cache, cache_seqlens, page_table, causal, window, softcap, scale,
                                      return_lse)
        except NotImplementedError:  # a paged float32 cache on CUDA: the host path gathers its pages
            pass
    lengths = _lengths("cache_seqlens", cache_seqlens, batch)
    host_table = None
    if page_table is not None:
        if not isinstance(page_table, Tensor) or page_table.dtype not in (torch.int32, torch.int64) or \
                page_table.ndim != 2 or page_table.shape[0] != batch:
            raise ValueError(f"[{_KV_OP}] page_table: expected an int32 tensor [batch={batch}, max_pages]")
        host_table = page_table.to("cpu")  # one copy: the C API reads the table on the host
    new = check_kv_cache(_KV_OP, q, k_cache, v_cache, lengths, None if host_table is None else host_table.numpy(),
                         k, v)
    call = _KvCall(q, k_cache, v_cache, page_table is not None, scale, softcap, causal, window)
    used = [lengths[b] + new for b in range(batch)]
    seqused = torch.tensor(used, dtype=torch.int32, device="cpu")  # whatever the default device
    table = None if host_table is None else host_table.to(torch.int32).contiguous()
    if new:
        # The whole call's checks (dtypes, heads, dims, counts, pages) before the caches are written.
        call.run(seqused, table, used, check_only=True)
        for b in range(batch):  # appended in place before attending
            for cache, added in ((k_cache, k), (v_cache, v)):
                if page_table is None:
                    cache[b, lengths[b]:lengths[b] + new] = added[b]
                else:
                    rows = torch.arange(lengths[b], lengths[b] + new, device=cache.device)
                    page = page_table[b].to(device=cache.device, dtype=torch.long)[rows // cache.shape[1]]
                    cache[page, rows % cache.shape[1]] = added[b]
    # CUDA reads the pages in place where it can (half types, outside graph capture); otherwise
    # each sequence's used rows are gathered and packed first.
    gather = table is not None and q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16)
    if not gather:
        try:
            call.run(seqused, table, used)
        except NotImplementedError:
            if table is None or not q.is_cuda:
                raise
            gather = True
    if gather:
        keys, values = (_gather_pages(c, page_table, used) for c in (k_cache, v_cache))
        offsets = torch.tensor([0] + list(itertools.accumulate(used)), dtype=torch.int32, device="cpu")
        call.run(None, None, used, keys=keys, values=values, offsets_k=offsets)
    return call.result(return_lse)


class _KvCall:
    """attention_with_kvcache's one call of the C API's varlen entry: q as rows, the cache as
    packed rows (sequence b's from row b * S_cache) or as its pages, and the outputs."""

    def __init__(self, q, k_cache, v_cache, paged: bool, scale, softcap, causal, window):
        self.options = AttentionOptions.make(_KV_OP, scale=scale, softcap=softcap,
                                             causal="bottom_right" if causal is True else causal, window=window)
        batch, sq, heads_q = self.shape = q.shape[0], q.shape[1], q.shape[2]
        self.q_rows = q.reshape(batch * sq, heads_q, q.shape[3])
        self.offsets_q = _even_offsets(batch, sq)
        self.keys, self.values, self.offsets_k = k_cache, v_cache, None
        if not paged:
            self.keys, self.values = (c.reshape(batch * c.shape[1], c.shape[2], c.shape[3]) for c in (k_cache, v_cache))
            self.offsets_k = _even_offsets(batch, k_cache.shape[1])
        self.o = q.new_empty(batch * sq, heads_q, v_cache.shape[-1])
        self.lse = torch.empty(heads_q, batch * sq, dtype=ops.lse_dtype(q.dtype), device=q.device)

    def run(self, seqused, table, key_lengths=None, *, keys=None, values=None, offsets_k=None, check_only=False):
        """The call with these counts and page table (host or GPU memory), or (keys given) over
        gathered rows at offsets_k; check_only: the C API's checks alone."""
        if keys is None:
            keys, values, offsets_k = self.keys, self.values, self.offsets_k
        def kernel(*args, **kwargs):
            # The counts' and the table's descriptors made at each call from the tensors this
            # closure holds (a profile's replay runs it again after the call: flashjit.profile).
            return _C.varlen_forward(*args, seqused_k=_index_ref(seqused), page_table=_index_ref(table),
                                     check_only=check_only, **kwargs)

        with torch.no_grad():
            _run("forward", kernel, self.offsets_q,
                 offsets_k, 0, 0, (self.q_rows, keys, values), (self.o, self.lse), self.options.op_args(None, None),
                 key_lengths=key_lengths, record=not check_only)

    def result(self, return_lse: bool):
        batch, sq, heads_q = self.shape
        o = self.o.view(batch, sq, heads_q, -1)
        return (o, self.lse.view(heads_q, batch, sq).permute(1, 0, 2).contiguous()) if return_lse else o


def _counts_stay_on_device(q, cache_seqlens, page_table, k, v) -> bool:
    """Whether attention_with_kvcache passes the counts (and the page table) to the C API in the
    GPU's memory, where the host never reads them (no wait for the GPU before the call): CUDA
    operands, the counts and any table on q's device, no new keys to write, no flashjit.profile()
    recording (it records each sequence's keys), unless FLASHJIT_CUDA_KV_DEVICE=0 (which has the
    host copy and check them, at the price of a wait for the GPU each call)."""
    def on_q_device(x, ndim):
        return (isinstance(x, Tensor) and x.device == q.device and x.dtype in (torch.int32, torch.int64)
                and x.ndim == ndim and x.shape[0] == q.shape[0])

    return (q.is_cuda and k is None and v is None and _profiler._active is None
            and os.environ.get("FLASHJIT_CUDA_KV_DEVICE") != "0" and on_q_device(cache_seqlens, 1)
            and (page_table is None or on_q_device(page_table, 2)))


def _kvcache_on_device(q, k_cache, v_cache, cache_seqlens, page_table, causal, window, softcap, scale, return_lse):
    """attention_with_kvcache with the counts and the page table left in GPU memory (see
    _counts_stay_on_device): their values are not checked; the kernels clamp each count into
    its sequence's cache and each page index into the pages."""
    check_kv_cache(_KV_OP, q, k_cache, v_cache, [], None, None, None, paged=page_table is not None)
    call = _KvCall(q, k_cache, v_cache, page_table is not None, scale, softcap, causal, window)
    call.run(cache_seqlens.to(torch.int32).contiguous(),
             None if page_table is None else page_table.to(torch.int32).contiguous())
    return call.result(return_lse)


def _gather_pages(pages: Tensor, table: Tensor, used: list) -> Tensor:
    """The first used[b] keys of each sequence, in order, from pages [num_pages, page_size, H, D]
    through the page table [B, max_pages]: packed rows [sum(used), H, D], indexed on the pages'
    device (no per-key Python work)."""
    page_size, device = pages.shape[1], pages.device
    keys = torch.arange(max(used, default=0), device=device)
    rows = table.to(device=device, dtype=torch.long)[:, keys // page_size] * page_size + keys % page_size
    kept = keys[None, :] < torch.tensor(used, device=device)[:, None]  # [B, longest]: row-major = sequence order
    return pages.reshape(-1, pages.shape[2], pages.shape[3])[rows[kept]]


def _lengths(name: str, lengths, batch: int) -> list[int]:
    """The key counts as ints (check_kv_cache checks their values)."""
    if not isinstance(lengths, Tensor) or lengths.dtype not in (torch.int32, torch.int64) or lengths.ndim != 1 or \
            lengths.shape[0] != batch:
        raise ValueError(f"[{_KV_OP}] {name}: expected an int32 tensor of {batch} lengths (q's batch)")
    return lengths.tolist()
