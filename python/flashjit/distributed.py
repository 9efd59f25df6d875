"""Context parallelism: attention over a sequence sharded across the ranks of a
torch.distributed group (gloo for CPU tensors, NCCL for CUDA tensors).

    q_local = flashjit.distributed.shard(q, layout="zigzag")       # [B, H, S / P, D] on each rank
    o_local = flashjit.distributed.ring_attention(q_local, k_local, v_local, causal=True)
    o = flashjit.distributed.unshard(o_local)                       # the full [B, H, S, D]

Ring attention: every rank keeps its queries while the key/value shards travel around the ring
(rank r sends to r + 1 and receives from r - 1, P - 1 times); each rank attends to the shard in
hand while the next one is in flight, and the partial outputs merge exactly through their
log-sum-exps. The backward sends K/V around again with their dK/dV accumulating on the way, so
that each shard's gradients arrive back at its owner. The sequence is cut into chunks of equal
length: "contiguous" gives rank r chunk r of P; "zigzag" gives it chunks r and 2P - 1 - r of 2P,
so that under causal masking every rank has the same work. Pairs of chunks that no query sees
are skipped; pairs seen whole take no mask; the causal diagonal takes flashjit's causal kernels;
windows that cut a pair take a boolean mask of the pair. The result is the same bits on every
run (a fixed order of merges and sums).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .api import attention, attention_backward

LAYOUTS = ("zigzag", "contiguous")


def _world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("[flashjit.distributed] torch.distributed is not initialised: call "
                           "torch.distributed.init_process_group first (gloo for CPU tensors, nccl for CUDA)")
    return dist.get_rank(group), dist.get_world_size(group)


def _check_layout(op: str, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"[{op}] layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")


def chunks_of(rank: int, world: int, layout: str) -> list[int]:
    """The global chunk indices rank `rank` holds, in order (chunks of S / P or S / 2P)."""
    _check_layout("chunks_of", layout)
    return [rank] if layout == "contiguous" else [rank, 2 * world - 1 - rank]


def _chunk_count(world: int, layout: str) -> int:
    return world if layout == "contiguous" else 2 * world


def shard(x: torch.Tensor, group=None, *, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """This rank's shard of a full sequence (dimension `dim`, default the S of [B, H, S, D])."""
    rank, world = _world(group)
    _check_layout("shard", layout)
    count = _chunk_count(world, layout)
    if x.shape[dim] % count:
        raise ValueError(f"[shard] x: the sequence (dim {dim}, length {x.shape[dim]}) must split into {count} "
                         f"equal chunks for layout {layout!r} on {world} ranks")
    pieces = x.chunk(count, dim=dim)
    return torch.cat([pieces[c] for c in chunks_of(rank, world, layout)], dim=dim).contiguous()


def unshard(x: torch.Tensor, group=None, *, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """The full sequence from every rank's shard (all-gathered; the same tensor on every rank)."""
    rank, world = _world(group)
    _check_layout("unshard", layout)
    gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gathered, x.contiguous(), group=group)
    per_rank = len(chunks_of(0, world, layout))
    chunks: dict[int, torch.Tensor] = {}
    for r, piece in enumerate(gathered):
        for c, part in zip(chunks_of(r, world, layout), piece.chunk(per_rank, dim=dim)):
            chunks[c] = part
    return torch.cat([chunks[c] for c in range(len(chunks))], dim=dim)


def _pair(q_chunk: int, k_chunk: int, length: int, causal: bool, window: tuple[int, int], device):
    """How queries of chunk q_chunk see keys of chunk k_chunk: None (not at all), {} (every key),
    {'causal': True} (the diagonal), or {'attn_mask': bool [length, length]} (a window cuts them).
    Decided from the offsets key - query the pair spans; a mask is built only where it is needed."""
    left, right = window
    lowest = -left if left >= 0 else -float("inf")  # key - query, the visible range
    highest = min(right if right >= 0 else float("inf"), 0 if causal else float("inf"))
    span_low = (k_chunk - q_chunk) * length - (length - 1)
    span_high = (k_chunk - q_chunk) * length + (length - 1)
    if span_high < lowest or span_low > highest:
        return None
    if span_low >= lowest and span_high <= highest:
        return {}
    if q_chunk == k_chunk and highest == 0 and span_low >= lowest:  # the causal diagonal
        return {"causal": True}
    offsets = (k_chunk - q_chunk) * length + torch.arange(length, device=device).unsqueeze(0) \
        - torch.arange(length, device=device).unsqueeze(1)
    return {"attn_mask": (offsets >= lowest) & (offsets <= highest)}


def _pairs(rank: int, source: int, world: int, layout: str, length: int, causal: bool, window, device):
    """(i, j, how) for this rank's query chunk i and the key chunk j held by `source`, where the
    queries see some of the keys (_pair's `how`)."""
    for i, qc in enumerate(chunks_of(rank, world, layout)):
        for j, kc in enumerate(chunks_of(source, world, layout)):
            how = _pair(qc, kc, length, causal, window, device)
            if how is not None:
                yield i, j, how


def _merge(o_acc, lse_acc, o, lse):
    """The attention over both key sets from the two partial results (float accumulators)."""
    if o_acc is None:
        return o.to(torch.float64 if o.dtype == torch.float64 else torch.float32), lse.clone()
    lse_new = torch.logaddexp(lse_acc, lse)
    seen = torch.isfinite(lse_new)
    w_acc = torch.where(seen, torch.exp(lse_acc - lse_new), torch.zeros_like(lse_new)).unsqueeze(-1)
    w_new = torch.where(seen, torch.exp(lse - lse_new), torch.zeros_like(lse_new)).unsqueeze(-1)
    return o_acc * w_acc + o.to(o_acc.dtype) * w_new, lse_new


def _exchange(tensors, rank, world, group):
    """Sends `tensors` to the next rank and receives the previous rank's into new buffers;
    returns the requests and the buffers."""
    if world == 1:
        return [], tensors
    received = [torch.empty_like(t) for t in tensors]
    ops = []
    for t, r in zip(tensors, received):
        ops.append(dist.P2POp(dist.isend, t.contiguous(), (rank + 1) % world, group))
        ops.append(dist.P2POp(dist.irecv, r, (rank - 1) % world, group))
    return dist.batch_isend_irecv(ops), received


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, layout, window, softcap, scale):
        rank, world = _world(group)
        per_rank = len(chunks_of(0, world, layout))
        length = q.shape[2] // per_rank
        options = dict(softcap=softcap, scale=scale)
        q_parts = q.chunk(per_rank, dim=2)
        merged = [(None, None)] * per_rank
        k_cur, v_cur = k.contiguous(), v.contiguous()
        for step in range(world):
            source = (rank - step) % world
            requests, incoming = _exchange([k_cur, v_cur], rank, world, group) if step + 1 < world else ([], None)
            k_parts, v_parts = k_cur.chunk(per_rank, dim=2), v_cur.chunk(per_rank, dim=2)
            for i, j, how in _pairs(rank, source, world, layout, length, causal, window, q.device):
                o, lse = attention(q_parts[i], k_parts[j], v_parts[j], return_lse=True, **options, **how)
                merged[i] = _merge(*merged[i], o, lse)
            for request in requests:
                request.wait()
            if incoming is not None:
                k_cur, v_cur = incoming
        outs, lses = [], []
        for i, (o_acc, lse_acc) in enumerate(merged):
            if o_acc is None:  # no key anywhere: O = 0, LSE = -inf, as flashjit.attention gives
                shape = q_parts[i].shape[:-1] + (v.shape[-1],)
                o_acc = torch.zeros(shape, dtype=torch.float32, device=q.device)
                lse_acc = torch.full(shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
            outs.append(o_acc.to(q.dtype))
            lses.append(lse_acc)
        out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.setup = (group, causal, layout, window, softcap, scale)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, causal, layout, window, softcap, scale = ctx.setup
        rank, world = _world(group)
        per_rank = len(chunks_of(0, world, layout))
        length = q.shape[2] // per_rank
        options = dict(softcap=softcap, scale=scale)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        q_parts, o_parts = q.chunk(per_rank, dim=2), out.chunk(per_rank, dim=2)
        lse_parts, do_parts = lse.chunk(per_rank, dim=2), dout.contiguous().chunk(per_rank, dim=2)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dq_parts = dq.chunk(per_rank, dim=2)
        k_cur, v_cur = k.contiguous(), v.contiguous()
        # dK/dV of the shard in hand: this step's sums, added to what the ranks before summed
        # (arriving from the previous rank while this step computes), then sent on while the next
        # step computes; after the last step they reach the shard's owner (rank + 1 holds the shard
        # that came from rank - (P - 1)).
        sums_requests, sums_incoming = [], None
        for step in range(world):
            source = (rank - step) % world
            # K/V for the next step travel while this one is used.
            requests, incoming = _exchange([k_cur, v_cur], rank, world, group) if step + 1 < world else ([], None)
            k_parts, v_parts = k_cur.chunk(per_rank, dim=2), v_cur.chunk(per_rank, dim=2)
            dk_step = torch.zeros(k.shape, dtype=acc, device=k.device)
            dv_step = torch.zeros(v.shape, dtype=acc, device=v.device)
            dk_parts, dv_parts = dk_step.chunk(per_rank, dim=2), dv_step.chunk(per_rank, dim=2)
            for i, j, how in _pairs(rank, source, world, layout, length, causal, window, q.device):
                dq_ij, dk_ij, dv_ij = attention_backward(q_parts[i], k_parts[j], v_parts[j], o_parts[i], lse_parts[i],
                                                         do_parts[i], **options, **how)
                dq_parts[i].add_(dq_ij.to(acc))
                dk_parts[j].add_(dk_ij.to(acc))
                dv_parts[j].add_(dv_ij.to(acc))
            for request in sums_requests:
                request.wait()
            if sums_incoming is not None:
                dk_step, dv_step = sums_incoming[0] + dk_step, sums_incoming[1] + dv_step
            sums_requests, sums_incoming = _exchange([dk_step, dv_step], rank, world, group)
            for request in requests:
                request.wait()
            if incoming is not None:
                k_cur, v_cur = incoming
        for request in sums_requests:
            request.wait()
        dk_cur, dv_cur = sums_incoming
        return dq.to(q.dtype), dk_cur.to(k.dtype), dv_cur.to(v.dtype), None, None, None, None, None, None


def _check_shards(op: str, q, k, v, group, layout: str, heads_divide: bool = False) -> None:
    """Each argument named where it is not what the exchanges need: 4-d tensors, shards of one length
    on every rank (a multiple of the layout's chunks a rank), head counts that divide by the ranks
    (heads_divide: the all-to-all's)."""
    _check_layout(op, layout)
    _, world = _world(group)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"[{op}] {name}: expected a 4-d torch tensor [B, H, S_local, D], got "
                             f"{getattr(x, 'shape', type(x))}")
        if heads_divide and x.shape[1] % world:
            raise ValueError(f"[{op}] {name}: its {x.shape[1]} heads must divide by the {world} ranks "
                             "(ring_attention takes any head count)")
    if k.shape[2] != q.shape[2] or v.shape[2] != q.shape[2]:
        raise ValueError(f"[{op}] k, v: each rank's key shard must be as long as its query shard "
                         f"({q.shape[2]}), got {k.shape[2]} and {v.shape[2]}")
    per_rank = len(chunks_of(0, world, layout))
    if q.shape[2] % per_rank:
        raise ValueError(f"[{op}] q: layout {layout!r} holds {per_rank} equal chunks a rank, so S_local must be a "
                         f"multiple of {per_rank}, got {q.shape[2]}")
    lengths = torch.tensor([q.shape[2]], device=q.device)
    gathered = [torch.empty_like(lengths) for _ in range(world)]
    dist.all_gather(gathered, lengths, group=group)
    if any(int(x) != q.shape[2] for x in gathered):
        raise ValueError(f"[{op}] q: every rank must hold a shard of the same length; got "
                         f"{[int(x) for x in gathered]} on ranks 0..{world - 1}")


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, *, causal: bool = False,
                   layout: str = "zigzag", window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                   scale: float | None = None, return_lse: bool = False):
    """Attention of this rank's queries over the keys of every rank in `group`.

    q: [B, Hq, S_local, D], k and v: [B, Hkv, S_local, D] (Hq a multiple of Hkv: K/V travel as
    the smaller tensors), each rank's shard in `layout` (shard() makes them); S_local the same on
    every rank (even for zigzag). causal aligns top-left over the full sequence; window (left,
    right) counts keys around each query's position in the full sequence, -1 = unbounded.
    Returns this rank's rows of the output (and of the LSE, float32, with return_lse=True);
    differentiable through q, k and v.
    """
    _check_shards("ring_attention", q, k, v, group, layout)
    if _world(group)[1] == 1:  # the shard is the whole sequence, in order: one call, exactly attention()'s
        return attention(q, k, v, causal=causal, window=window, softcap=softcap, scale=scale, return_lse=return_lse)
    left, right = window
    out, lse = _Ring.apply(q, k, v, group, bool(causal), layout, (int(left), int(right)), float(softcap), scale)
    return (out, lse) if return_lse else out


def _layout_order(world: int, layout: str) -> list[int]:
    """The global chunks in the order the ranks hold them (rank 0's first)."""
    return [c for r in range(world) for c in chunks_of(r, world, layout)]


def _seq_to_heads(x: torch.Tensor, group, layout: str) -> torch.Tensor:
    """[B, H, S_local, D] on each rank -> [B, H / P, S, D]: this rank's heads over the whole sequence."""
    _, world = _world(group)
    b, h, length, d = x.shape
    send = x.reshape(b, world, h // world, length, d).transpose(0, 1).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    # received[r]: rank r's shard of these heads; its chunks in layout order, then in sequence order.
    per_rank = len(chunks_of(0, world, layout))
    pieces = [piece for r in range(world) for piece in received[r].chunk(per_rank, dim=2)]
    order = _layout_order(world, layout)
    return torch.cat([pieces[order.index(c)] for c in range(len(order))], dim=2)


def _heads_to_seq(x: torch.Tensor, group, layout: str) -> torch.Tensor:
    """The inverse of _seq_to_heads: [B, H / P, S, D] -> [B, H, S_local, D]."""
    _, world = _world(group)
    b, h_part, length, d = x.shape
    chunks = x.chunk(len(_layout_order(world, layout)), dim=2)
    send = torch.stack([torch.cat([chunks[c] for c in chunks_of(r, world, layout)], dim=2) for r in range(world)])
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send.contiguous(), group=group)
    # received[r]: head group r of this rank's shard.
    return received.transpose(0, 1).reshape(b, world * h_part, length // world, d)


class _Exchange(torch.autograd.Function):
    """_seq_to_heads (to_heads) or _heads_to_seq, with the other as its backward."""

    @staticmethod
    def forward(ctx, x, group, layout, to_heads):
        ctx.setup = (group, layout, to_heads)
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group, layout)

    @staticmethod
    def backward(ctx, grad):
        group, layout, to_heads = ctx.setup
        return (_heads_to_seq if to_heads else _seq_to_heads)(grad.contiguous(), group, layout), None, None, None


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, *, causal: bool = False,
                      layout: str = "zigzag", window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                      scale: float | None = None, return_lse: bool = False):
    """ring_attention's contract by all-to-all instead of a ring: heads are exchanged for sequence
    (each rank attends over the whole sequence for H / P of the heads, then the outputs go back),
    two all-to-alls each way. The query and key/value head counts must divide by the ranks."""
    _check_shards("ulysses_attention", q, k, v, group, layout, heads_divide=True)
    if _world(group)[1] == 1:
        return attention(q, k, v, causal=causal, window=window, softcap=softcap, scale=scale, return_lse=return_lse)
    full = [_Exchange.apply(x.contiguous(), group, layout, True) for x in (q, k, v)]
    out, lse = attention(*full, causal=causal, window=window, softcap=softcap, scale=scale, return_lse=True)
    out = _Exchange.apply(out, group, layout, False)
    if not return_lse:
        return out
    return out, _heads_to_seq(lse.unsqueeze(-1), group, layout).squeeze(-1)
