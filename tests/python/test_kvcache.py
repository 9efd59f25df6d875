"""flashjit.attention_with_kvcache (flash-attn's flash_attn_with_kvcache): a dense or paged
cache, per-sequence lengths, new keys appended in place before attending."""

import pytest
import torch

import flashjit
from conftest import DEVICE
from reference import check, naive_attention

B, HQ, HKV, D, DV, PAGE = 3, 4, 2, 16, 8, 16


def _dense(lengths, capacity=64, dtype=torch.float32):
    torch.manual_seed(0)
    k_cache = torch.randn(B, capacity, HKV, D, device=DEVICE, dtype=dtype)
    v_cache = torch.randn(B, capacity, HKV, DV, device=DEVICE, dtype=dtype)
    return k_cache, v_cache, torch.tensor(lengths, dtype=torch.int32, device=DEVICE)


def _paged(k_cache, v_cache, pages_per_sequence):
    """The same caches as shuffled pages and their page table."""
    num_pages = B * pages_per_sequence + 2
    order = torch.randperm(num_pages)[:B * pages_per_sequence].reshape(B, pages_per_sequence)
    k_pages = torch.randn(num_pages, PAGE, HKV, D, device=DEVICE, dtype=k_cache.dtype)
    v_pages = torch.randn(num_pages, PAGE, HKV, DV, device=DEVICE, dtype=v_cache.dtype)
    for b in range(B):
        for i in range(pages_per_sequence):
            k_pages[order[b, i]] = k_cache[b, i * PAGE:(i + 1) * PAGE]
            v_pages[order[b, i]] = v_cache[b, i * PAGE:(i + 1) * PAGE]
    return k_pages, v_pages, order.to(torch.int32).to(DEVICE)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq", [1, 5])
def test_dense_cache_against_each_sequence(causal, sq):
    k_cache, v_cache, lengths = _dense([17, 0, 40])
    q = torch.randn(B, sq, HQ, D, device=DEVICE)
    o, lse = flashjit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, causal=causal,
                                             return_lse=True)
    for b, n in enumerate(lengths.tolist()):
        inputs = (q[b:b + 1].transpose(1, 2), k_cache[b:b + 1, :n].transpose(1, 2), v_cache[b:b + 1, :n].transpose(1, 2))
        exact_o, exact_lse = naive_attention(*(x.cpu().double() for x in inputs), causal="bottom_right" if causal else False)
        base_o, base_lse = naive_attention(*(x.cpu() for x in inputs), causal="bottom_right" if causal else False,
                                           dtype=torch.float32)
        check("o", o[b:b + 1].transpose(1, 2), base_o, exact_o, torch.float32)
        check("lse", lse[b:b + 1], base_lse, exact_lse, torch.float32)


def test_paged_cache_equals_dense_and_appends_cross_pages():
    k_cache, v_cache, lengths = _dense([14, 0, 31])
    k_pages, v_pages, table = _paged(k_cache, v_cache, 4)
    q = torch.randn(B, 3, HQ, D, device=DEVICE)
    k_new, v_new = torch.randn(B, 5, HKV, D, device=DEVICE), torch.randn(B, 5, HKV, DV, device=DEVICE)
    dense = flashjit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, k=k_new, v=v_new, causal=True)
    paged = flashjit.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=lengths, page_table=table, k=k_new,
                                            v=v_new, causal=True)
    # The CPU reads a paged cache in blocks that end at page boundaries: the same sums in
    # another order (float32 rounding); the CUDA path gathers the pages first (the same blocks).
    tolerance = dict(rtol=0, atol=0) if DEVICE == "cuda" else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(paged, dense, **tolerance)
    for b, n in enumerate(lengths.tolist()):  # appended in place, across page boundaries (14 + 5, 31 + 5)
        torch.testing.assert_close(k_cache[b, n:n + 5], k_new[b], rtol=0, atol=0)
        rows = torch.arange(n, n + 5)
        pages = table[b].long().cpu()[rows // PAGE]
        torch.testing.assert_close(k_pages[pages, rows % PAGE], k_new[b], rtol=0, atol=0)
        torch.testing.assert_close(v_pages[pages, rows % PAGE], v_new[b], rtol=0, atol=0)


def test_errors(monkeypatch):
    # Counts and tables in GPU memory are checked where the host reads them (FLASHJIT_CUDA_KV_DEVICE=0;
    # by default a call without new keys leaves them there unchecked, test_counts_and_pages_in_gpu_memory).
    monkeypatch.setenv("FLASHJIT_CUDA_KV_DEVICE", "0")
    k_cache, v_cache, lengths = _dense([14, 0, 31], capacity=32)
    q = torch.randn(B, 1, HQ, D, device=DEVICE)
    with pytest.raises(ValueError, match=r"k: sequence 2 holds 31 keys; 5 more do not fit its cache of 32"):
        flashjit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths,
                                        k=torch.randn(B, 5, HKV, D, device=DEVICE),
                                        v=torch.randn(B, 5, HKV, DV, device=DEVICE))
    with pytest.raises(ValueError, match=r"cache_seqlens: length -1 of sequence 1 is negative"):
        flashjit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([1, -1, 2], dtype=torch.int32))
    k_pages, v_pages, table = _paged(k_cache, v_cache, 2)
    table[0, 0] = 99
    with pytest.raises(ValueError, match=r"page_table: page 99 of sequence 0 is out of range"):
        flashjit.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=lengths, page_table=table)
    with pytest.raises(ValueError, match="k, v: give both"):
        flashjit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, k=q)


def test_page_table_entries_past_a_sequences_keys_are_never_read(monkeypatch):
    monkeypatch.setenv("FLASHJIT_CUDA_KV_DEVICE", "0")  # the host's checks of the table (test_errors)
    k_cache, v_cache, lengths = _dense([14, 0, 31], capacity=32)
    q = torch.randn(B, 1, HQ, D, device=DEVICE)
    k_pages, v_pages, table = _paged(k_cache, v_cache, 2)
    expected = flashjit.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=lengths, page_table=table)
    table[0, 1] = -1  # sequence 0's 14 keys lie in its first page
    table[1, :] = 1 << 20  # sequence 1 has none
    got = flashjit.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=lengths, page_table=table)
    assert torch.equal(got, expected)
    # Five new keys take sequence 0 into its second page, which is then checked (and nothing written).
    before = k_pages.clone()
    new = dict(k=torch.randn(B, 5, HKV, D, device=DEVICE), v=torch.randn(B, 5, HKV, DV, device=DEVICE))
    lengths[2] = 20
    with pytest.raises(ValueError, match=r"page_table: page -1 of sequence 0 is out of range \(0\.\.7\)"):
        flashjit.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=lengths, page_table=table, **new)
    assert torch.equal(k_pages, before)
    # Of several bad pages, the first in the table's row-major order is named.
    table[0, 1], table[2, 1], table[2, 0] = 0, 99, 98
    with pytest.raises(ValueError, match=r"page_table: page 98 of sequence 2 is out of range"):
        flashjit.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=lengths, page_table=table)
    # An int64 table: a page past int32's range is named as it is, not as its wrapped value.
    table64 = table.to(torch.int64)
    table64[2, 0] = (1 << 32) + 1
    with pytest.raises(ValueError, match=rf"page_table: page {(1 << 32) + 1} of sequence 2 is out of range"):
        flashjit.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=lengths, page_table=table64)


def test_gathered_pages_are_each_sequences_keys_in_order():
    """The CUDA path's gather (no paged kernels there yet): the used rows of each sequence's
    pages, packed in order."""
    from flashjit.varlen import _gather_pages

    k_cache, v_cache, _ = _dense([14, 0, 31])
    k_pages, _, table = _paged(k_cache, v_cache, 4)
    used = [19, 0, 36]
    gathered = _gather_pages(k_pages, table, used)
    expected = torch.cat([k_cache[b, :n] for b, n in enumerate(used)])
    assert torch.equal(gathered, expected)


def _shuffled_pages(cache, page_size, generator):
    """cache [B, S, H, D] as pages [B * S / page_size + 3, page_size, H, D] in shuffled order
    (three pages of noise that no table entry names) and the page table [B, S / page_size]."""
    batch, capacity = cache.shape[:2]
    per_sequence = capacity // page_size
    num_pages = batch * per_sequence + 3
    order = torch.randperm(num_pages, generator=generator)[:batch * per_sequence].reshape(batch, per_sequence)
    pages = torch.randn(num_pages, page_size, *cache.shape[2:], generator=generator).to(cache.device, cache.dtype)
    for b in range(batch):
        pages[order[b].to(cache.device)] = cache[b].reshape(per_sequence, page_size, *cache.shape[2:])
    return pages, order.to(device=cache.device, dtype=torch.int32)


# Half types with the query heads of a group (on CUDA: the whole batch in one launch of the
# mma.sync forward, each block bounded by its sequence's own key count, split over the keys
# or not, the pages read in place): each sequence against the float64 reference of its
# used keys alone; the paged cache (pages of 16 and 64 keys, shuffled) bit for bit the dense
# cache's result on CUDA, where both run the same arithmetic.
def _each_sequence(dtype, D, sq, causal, window, softcap):
    """A half cache of four sequences (one empty, one of a single key, one nearly full; NaN past
    each count) through
    attention_with_kvcache, each sequence checked against the float64 reference of its used keys
    alone; returns what the check needs to go on (the cache, q, lengths, options, o and LSE)."""
    generator = torch.Generator().manual_seed(D * 10 + sq)
    batch, heads_q, heads_kv, capacity = 4, 8, 2, 320
    lengths = [200, 0, 1, 317]
    k_cache, v_cache = (torch.randn(batch, capacity, heads_kv, D, generator=generator).to(DEVICE, dtype)
                        for _ in range(2))
    for b, n in enumerate(lengths):  # rows past a count hold anything (NaN here): never read into O
        k_cache[b, n:] = float("nan")
        v_cache[b, n:] = float("nan")
    q = torch.randn(batch, sq, heads_q, D, generator=generator).to(DEVICE, dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    options = dict(causal=causal, window=window, softcap=softcap)
    o, lse = flashjit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, return_lse=True, **options)
    alignment = "top_left" if causal == "top_left" else ("bottom_right" if causal else False)
    for b, n in enumerate(lengths):
        inputs = [x.transpose(1, 2).cpu() for x in (q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n])]
        inputs[1:] = [x.repeat_interleave(heads_q // heads_kv, dim=1) for x in inputs[1:]]
        exact_o, exact_lse = naive_attention(*(x.double() for x in inputs), causal=alignment, window=window,
                                             softcap=softcap)
        base_o, base_lse = naive_attention(*inputs, causal=alignment, window=window, softcap=softcap, dtype=dtype)
        check(f"o[{b}]", o[b:b + 1].transpose(1, 2), base_o, exact_o, dtype)
        check(f"lse[{b}]", lse[b:b + 1], base_lse, exact_lse, dtype)
    return generator, k_cache, v_cache, q, seqlens, options, o, lse


CACHE_CASES = [(1, False, (-1, -1), 0.0), (1, True, (-1, -1), 0.0), (4, True, (-1, -1), 0.0),
               (4, "top_left", (-1, -1), 0.0), (1, False, (-1, -1), 5.0), (3, True, (40, -1), 0.0)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("sq,causal,window,softcap", CACHE_CASES)
@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("warps", [4, 1])  # FLASHJIT_CUDA_DECODE_WARPS: blocks of one warp for up to 16 rows
def test_half_cache_each_sequence_and_pages(dtype, D, sq, causal, window, softcap, splits, warps, monkeypatch):
    if splits is not None:
        monkeypatch.setenv("FLASHJIT_CUDA_SPLITS", str(splits))
    monkeypatch.setenv("FLASHJIT_CUDA_DECODE_WARPS", str(warps))
    generator, k_cache, v_cache, q, seqlens, options, o, lse = _each_sequence(dtype, D, sq, causal, window, softcap)
    batch, heads_kv = k_cache.shape[0], k_cache.shape[2]
    for page_size in (16, 64):
        k_pages, table = _shuffled_pages(k_cache, page_size, generator)
        v_pages = torch.empty_like(k_pages)
        for b in range(batch):
            v_pages[table[b].long()] = v_cache[b].reshape(-1, page_size, heads_kv, D)
        o_paged, lse_paged = flashjit.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens,
                                                             page_table=table, return_lse=True, **options)
        tolerance = dict(rtol=0, atol=0) if DEVICE == "cuda" else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(o_paged, o, **tolerance)
        torch.testing.assert_close(lse_paged, lse, **tolerance)


# FLASHJIT_CUDA_KV_HOPPER=1: the cache in place on sm_90's sm_90a split forward, each work tile
# bounded by its sequence's count (elsewhere the switch changes nothing: CUDA only).
@pytest.mark.skipif(DEVICE != "cuda", reason="a switch of the CUDA backend")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("sq,causal,window,softcap", CACHE_CASES)
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_half_cache_on_the_sm90a_split(dtype, D, sq, causal, window, softcap, splits, monkeypatch):
    monkeypatch.setenv("FLASHJIT_CUDA_KV_HOPPER", "1")
    monkeypatch.delenv("FLASHJIT_CUDA_DECODE_WARPS", raising=False)
    if splits is not None:
        monkeypatch.setenv("FLASHJIT_CUDA_SPLITS", str(splits))
    generator, k_cache, v_cache, q, seqlens, options, o, lse = _each_sequence(dtype, D, sq, causal, window, softcap)
    # Pages (the forward's key step, a TMA box a page of 16 or 64 keys, the boxes past a count not
    # loaded; in pages of 48, no whole pages a step: the one-warp blocks), within half-precision
    # rounding of the cache in place.
    batch, heads_kv = k_cache.shape[0], k_cache.shape[2]
    for page_size in (16, 48, 64):
        if k_cache.shape[1] % page_size:
            k_used, v_used = (x[:, :k_cache.shape[1] // page_size * page_size] for x in (k_cache, v_cache))
        else:
            k_used, v_used = k_cache, v_cache
        k_pages, table = _shuffled_pages(k_used, page_size, generator)
        v_pages = torch.empty_like(k_pages)
        for b in range(batch):
            v_pages[table[b].long()] = v_used[b].reshape(-1, page_size, heads_kv, D)
        lengths = seqlens.clamp(max=k_used.shape[1])
        o_paged, lse_paged = flashjit.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=lengths,
                                                             page_table=table, return_lse=True, **options)
        o_here, lse_here = flashjit.attention_with_kvcache(q, k_used, v_used, cache_seqlens=lengths,
                                                           return_lse=True, **options)
        torch.testing.assert_close(o_paged, o_here, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(lse_paged, lse_here, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("paged", [False, True])
def test_half_cache_with_no_key_anywhere(paged):
    # Every sequence empty: O = 0 and LSE = -inf (on CUDA through the one-launch path, which
    # then reads no page), as for an empty sequence among others.
    q = torch.randn(2, 1, 8, 64, device=DEVICE, dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(2, 32, 2, 64, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    seqlens = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    table = None
    if paged:
        k_cache, v_cache = (c.reshape(4, 16, 2, 64) for c in (k_cache, v_cache))
        table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=DEVICE)
    o, lse = flashjit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, page_table=table,
                                             return_lse=True)
    assert torch.equal(o, torch.zeros_like(o))
    assert torch.isinf(lse).all() and (lse < 0).all()


def test_nothing_is_written_when_a_check_fails():
    k_cache, v_cache, lengths = _dense([14, 0, 20], capacity=32)
    q = torch.randn(B, 1, HQ, D, device=DEVICE)
    new = dict(k=torch.randn(B, 5, HKV, D, device=DEVICE), v=torch.randn(B, 5, HKV, DV, device=DEVICE))
    k_pages, v_pages, table = _paged(k_cache, v_cache, 2)
    before = [x.clone() for x in (k_cache, v_cache, k_pages, v_pages)]
    cases = [
        (ValueError, "window", dict(window=(1,))),  # checked by the options, before the writes
        (ValueError, "head_dim 16 does not match q.s 24", dict(q=torch.randn(B, 1, HQ, D + 8, device=DEVICE))),  # by the C API's check
        (ValueError, r"k: expected shape \[3, 5, 2, 16\]", dict(k=new["k"][:1], v=new["v"][:1])),
        (ValueError, r"k: expected shape \[3, 5, 2, 16\]", dict(k=new["k"][:, :, :1])),
        (ValueError, r"v: expected shape \[3, 5, 2, 8\]", dict(v=new["v"][:, :4])),
        (TypeError, "k: expected the cache's dtype", dict(k=new["k"].double())),
    ]
    for kind, message, change in cases:
        for paged in (False, True):
            args = dict(q=q, k_cache=k_pages if paged else k_cache, v_cache=v_pages if paged else v_cache,
                        cache_seqlens=lengths, page_table=table if paged else None, **new)
            args.update(change)
            with pytest.raises(kind, match=message):
                flashjit.attention_with_kvcache(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), **args)
            for x, y in zip(before, (k_cache, v_cache, k_pages, v_pages)):
                assert torch.equal(x, y), (message, paged)
    with pytest.raises(ValueError, match=r"v_cache: expected k_cache's first two dims \[3, 32\]"):
        flashjit.attention_with_kvcache(q, k_cache, v_cache[:, :16], cache_seqlens=lengths, **new)
    assert torch.equal(before[0], k_cache)


def test_a_default_device_does_not_stick_to_the_offsets():
    k_cache, v_cache, lengths = _dense([14, 0, 20], capacity=32)
    q = torch.randn(B, 1, HQ, D, device=DEVICE)
    expected = flashjit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths)
    with torch.device("meta"):  # the offsets and counts are host arrays whatever the default device
        inside = flashjit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths)
    after = flashjit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths)
    assert torch.equal(inside, expected) and torch.equal(after, expected)


@pytest.mark.skipif(DEVICE != "cuda", reason="counts in GPU memory")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("hopper", ["0", "1"])  # FLASHJIT_CUDA_KV_HOPPER: the sm_90a split (sm_90) or mma.sync
@pytest.mark.parametrize("sq,causal,window,softcap", CACHE_CASES[:3])
def test_counts_and_pages_in_gpu_memory(dtype, hopper, sq, causal, window, softcap, monkeypatch):
    # By default (FLASHJIT_CUDA_KV_DEVICE unset or 1) the counts and the table stay on the GPU (the
    # host reads neither); the same results as with the host path (FLASHJIT_CUDA_KV_DEVICE=0; float32:
    # the backend's host copy, then its paths).
    generator = torch.Generator().manual_seed(sq)
    batch, heads_q, heads_kv, capacity, dim = 4, 8, 2, 256, 64
    k_cache, v_cache = (torch.randn(batch, capacity, heads_kv, dim, generator=generator).to(DEVICE, dtype)
                        for _ in range(2))
    q = torch.randn(batch, sq, heads_q, dim, generator=generator).to(DEVICE, dtype)
    lengths = torch.tensor([200, 0, 1, 256], dtype=torch.int32, device=DEVICE)
    options = dict(causal=causal, window=window, softcap=softcap, return_lse=True)
    monkeypatch.setenv("FLASHJIT_CUDA_KV_HOPPER", hopper)
    monkeypatch.setenv("FLASHJIT_CUDA_KV_DEVICE", "0")
    k_pages, table = _shuffled_pages(k_cache, 64, generator)
    v_pages = torch.empty_like(k_pages)
    for b in range(batch):
        v_pages[table[b].long()] = v_cache[b].reshape(-1, 64, heads_kv, dim)
    expected = [flashjit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, **options),
                flashjit.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=lengths, page_table=table,
                                                **options)]
    monkeypatch.delenv("FLASHJIT_CUDA_KV_DEVICE")
    got = [flashjit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, **options),
           flashjit.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=lengths, page_table=table, **options)]
    for (o, lse), (o_ref, lse_ref) in zip(got, expected):
        torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
        torch.testing.assert_close(lse, lse_ref, rtol=0, atol=0)
    # Values the host would reject are clamped on the GPU, never read past the cache: a count past
    # the cache is the cache's rows, a negative one none, a page index past the pages the last page.
    bad = torch.tensor([200, -5, 1, 999], dtype=torch.int32, device=DEVICE)
    if dtype == torch.float32:  # no one launch for float32: the backend's host copy checks the counts
        with pytest.raises(ValueError, match="seqused_k: sequence 1 uses -5 keys"):
            flashjit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=bad, **options)
        return
    o, _ = flashjit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=bad, **options)
    clamped = bad.clamp(0, capacity)
    monkeypatch.setenv("FLASHJIT_CUDA_KV_DEVICE", "0")
    torch.testing.assert_close(o, flashjit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=clamped,
                                                                  **options)[0], rtol=0, atol=0)
    monkeypatch.setenv("FLASHJIT_CUDA_KV_DEVICE", "1")
    wild = table.clone()
    wild[3, 3] = 1 << 20
    o, _ = flashjit.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=lengths, page_table=wild, **options)
    torch.cuda.synchronize()
    assert torch.equal(o[:3], got[1][0][:3])  # the other sequences unchanged; no fault
