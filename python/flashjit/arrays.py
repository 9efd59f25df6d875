"""Facts about the arrays a call takes, shared by the front ends (api.py, ops.py,
sdpa.py) without importing one another."""

from __future__ import annotations


def check_dense(op: str, name: str, x) -> None:
    """Rejects torch tensors whose elements flashjit cannot address: nested and sparse ones."""
    if getattr(x, "is_nested", False):
        raise TypeError(f"[{op}] {name}: nested tensors are not supported; pad the sequences into one tensor "
                        "and mask the padding")
    if str(getattr(x, "layout", "torch.strided")) != "torch.strided":
        raise TypeError(f"[{op}] {name}: expected a dense (strided) tensor, got layout {x.layout}")


def output_shapes(op: str, q, v):
    """Shapes of o and lse; names the argument when a rank is wrong."""
    for name, x in (("q", q), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"[{op}] {name}: expected 4 dims [batch, heads, seqlen, head_dim], got {x.ndim}")
    return (*q.shape[:3], v.shape[3]), tuple(q.shape[:3])


def check_kv_ranks(op: str, q, k_cache, v_cache) -> None:
    """attention_with_kvcache's (torch's and MLX's) first check: q and the caches have 4 dims."""
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.ndim != 4:
            raise ValueError(f"[{op}] {name}: expected 4 dims, got {x.ndim}")


def check_kv_cache(op: str, q, k_cache, v_cache, lengths: list, page_table, k, v, paged=None) -> int:
    """attention_with_kvcache's (torch's and MLX's) checks after check_kv_ranks, before anything
    is written: each sequence's key count (lengths, ints), the page table (an integer numpy array
    [batch, max_pages] on the host, or None) up to each sequence's keys with the new ones, or the
    cache's batch, new keys and values given together and fitting each cache. paged: whether the
    caches are pages (default: a page table given; True without one for a table the host does
    not read). Returns the new keys' count (0 without k)."""
    import numpy as np

    paged = page_table is not None if paged is None else paged
    batch = q.shape[0]
    if lengths and min(lengths) < 0:
        b = next(b for b, value in enumerate(lengths) if value < 0)
        raise ValueError(f"[{op}] cache_seqlens: length {lengths[b]} of sequence {b} is negative")
    if (k is None) != (v is None):
        raise ValueError(f"[{op}] k, v: give both new keys and values, or neither")
    if tuple(v_cache.shape[:2]) != tuple(k_cache.shape[:2]):
        raise ValueError(f"[{op}] v_cache: expected k_cache's first two dims {list(k_cache.shape[:2])}, got "
                         f"{list(v_cache.shape[:2])}")
    new = 0 if k is None else k.shape[1]
    for name, x, cache in () if k is None else (("k", k, k_cache), ("v", v, v_cache)):
        expected = [batch, new, cache.shape[2], cache.shape[3]]  # written into the cache as they are
        if list(x.shape) != expected:
            raise ValueError(f"[{op}] {name}: expected shape {expected} (q's batch, k's new keys, the cache's heads "
                             f"and head dim), got {list(x.shape)}")
        if x.dtype != cache.dtype:
            raise TypeError(f"[{op}] {name}: expected the cache's dtype {cache.dtype}, got {x.dtype}")
    page_size, num_pages = k_cache.shape[1], k_cache.shape[0]
    capacity = k_cache.shape[1]
    if paged and page_table is not None:
        capacity = page_table.shape[1] * page_size
        # Each sequence's pages up to its keys, the new ones included: a few array operations
        # (host time per decoding call), the first bad page in row-major order named.
        needed = (np.asarray(lengths, dtype=np.int64) + new + page_size - 1) // page_size
        in_use = np.arange(page_table.shape[1])[None, :] < needed[:, None]
        bad = in_use & ((page_table < 0) | (page_table >= num_pages))
        if bad.any():
            b, i = (int(x) for x in np.argwhere(bad)[0])
            raise ValueError(f"[{op}] page_table: page {int(page_table[b, i])} of sequence {b} is out of range "
                             f"(0..{num_pages - 1})")
    elif not paged:
        if k_cache.shape[0] != batch:
            raise ValueError(f"[{op}] k_cache: expected a batch of {batch} (q's), got {k_cache.shape[0]}")
    if new and lengths and max(lengths) + new > capacity:
        b = next(b for b, value in enumerate(lengths) if value + new > capacity)
        raise ValueError(f"[{op}] k: sequence {b} holds {lengths[b]} keys; {new} more do not fit its cache of "
                         f"{capacity}")
    return new
