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


def test_errors():
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
