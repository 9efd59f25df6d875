"""flashjit.mlx's drop-ins: MultiHeadAttention (mlx.nn.MultiHeadAttention's parameters
and call) and the switch that routes mlx-lm's attention to flashjit and back."""

import sys

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")
fm = pytest.importorskip("flashjit.mlx")


def _close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.array(a), np.array(b), atol=tol, rtol=tol)


# On MLX's CPU stream the two modules agree to float32 rounding. On MLX's GPU stream (MLX on
# CUDA) MLX's own float32 projections round more coarsely (their gradients move by ~3e-3
# between the streams, for mlx.nn's module and this one alike: measured on an H100), so
# there the comparison allows 1e-3.
STREAMS = ["cpu"] + (["gpu"] if mx.default_device().type == mx.gpu and fm._mlx.cuda_available() else [])


@pytest.mark.parametrize("stream", STREAMS)
@pytest.mark.parametrize("mask", [None, "additive causal", "bool"])
def test_multi_head_attention_matches_mlx(mask, stream):
    with mx.stream(mx.cpu if stream == "cpu" else mx.gpu):
        _multi_head_attention_matches_mlx(mask, 1e-4 if stream == "cpu" else 1e-3)


def _multi_head_attention_matches_mlx(mask, grad_tol):
    mx.random.seed(0)
    ours = fm.MultiHeadAttention(48, 6, key_input_dims=40, value_dims=36, bias=True)
    theirs = nn.MultiHeadAttention(48, 6, key_input_dims=40, value_dims=36, bias=True)
    theirs.update(ours.parameters())  # the same parameters load into either
    queries, keys = mx.random.normal((2, 11, 48)), mx.random.normal((2, 13, 40))
    values = mx.random.normal((2, 13, 40))
    if mask == "additive causal":
        mask = nn.MultiHeadAttention.create_additive_causal_mask(13)[-11:]
    elif mask == "bool":
        mask = mx.random.uniform(shape=(2, 1, 11, 13)) > 0.3
    _close(ours(queries, keys, values, mask), theirs(queries, keys, values, mask))

    def loss(model, *inputs):
        return (model(*inputs, mask) ** 2).sum()

    ours_grads = nn.value_and_grad(ours, loss)(ours, queries, keys, values)[1]
    theirs_grads = nn.value_and_grad(theirs, loss)(theirs, queries, keys, values)[1]
    for (name, a), (_, b) in zip(sorted(_flat(ours_grads)), sorted(_flat(theirs_grads))):
        _close(a, b, grad_tol)


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flat(value, f"{prefix}{key}.")
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from _flat(value, f"{prefix}{index}.")
    else:
        yield prefix, tree


def test_mlx_lm_attention_is_routed_and_restored():
    pytest.importorskip("mlx_lm")
    from mlx_lm.models import base, llama

    original = base.scaled_dot_product_attention
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=97)
    mx.random.seed(1)
    model = llama.Model(args)
    tokens = mx.array(np.random.default_rng(0).integers(0, 97, (2, 21)))

    def loss(model):
        logits = model(tokens[:, :-1])
        return nn.losses.cross_entropy(logits, tokens[:, 1:]).mean()

    plain_loss, plain_grads = nn.value_and_grad(model, loss)(model)
    with fm.mlx_lm_attention():
        assert llama.scaled_dot_product_attention is not original and base.scaled_dot_product_attention is not original
        assert fm.mlx_lm_patched()
        routed_loss, routed_grads = nn.value_and_grad(model, loss)(model)
    assert llama.scaled_dot_product_attention is original and base.scaled_dot_product_attention is original
    assert not fm.mlx_lm_patched()
    _close(routed_loss, plain_loss, 1e-5)
    for (_, a), (_, b) in zip(sorted(_flat(routed_grads)), sorted(_flat(plain_grads))):
        _close(a, b, 1e-4)


def test_patch_mlx_lm_without_mlx_lm(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx_lm", None)
    monkeypatch.setitem(sys.modules, "mlx_lm.models", None)
    monkeypatch.setitem(sys.modules, "mlx_lm.models.base", None)
    with pytest.raises(ImportError, match="mlx-lm is not installed"):
        fm.patch_mlx_lm()


def test_varlen_attention_is_each_sequence_alone():
    lengths_q, lengths_k = [5, 0, 1, 20, 9], [6, 3, 1, 20, 0]
    offsets_q = [0] + [int(x) for x in np.cumsum(lengths_q)]
    offsets_k = [0] + [int(x) for x in np.cumsum(lengths_k)]
    mx.random.seed(2)
    q = mx.random.normal((sum(lengths_q), 4, 16))
    k, v = mx.random.normal((sum(lengths_k), 2, 16)), mx.random.normal((sum(lengths_k), 2, 8))
    o, lse = fm.varlen_attention(q, k, v, mx.array(offsets_q, dtype=mx.int32), offsets_k, causal=True, softcap=4.0,
                                 return_lse=True)
    assert o.shape == (sum(lengths_q), 4, 8) and lse.shape == (4, sum(lengths_q))
    for i in range(len(lengths_q)):
        (qb, qe), (kb, ke) = offsets_q[i:i + 2], offsets_k[i:i + 2]
        if qe == qb:
            continue
        # varlen_attention runs on a CPU stream: the dense call there runs the same code.
        alone, alone_lse = fm.attention(q[qb:qe].transpose(1, 0, 2)[None], k[kb:ke].transpose(1, 0, 2)[None],
                                        v[kb:ke].transpose(1, 0, 2)[None], causal="bottom_right", softcap=4.0,
                                        return_lse=True, stream=mx.cpu)
        assert mx.array_equal(o[qb:qe], alone[0].transpose(1, 0, 2)).item()
        assert mx.array_equal(lse[:, qb:qe], alone_lse[0], equal_nan=True).item()
    grads = mx.grad(lambda q, k, v: fm.varlen_attention(q, k, v, offsets_q, offsets_k, causal=True).sum(),
                    argnums=(0, 1, 2))(q, k, v)
    assert all(g.shape == x.shape for g, x in zip(grads, (q, k, v)))
    # The keys of sequence 1 (no queries) get no gradient.
    assert mx.all(grads[1][offsets_k[1]:offsets_k[2]] == 0).item()
    with pytest.raises(ValueError, match="cu_seqlens_k: expected 6 offsets"):
        fm.varlen_attention(q, k, v, offsets_q, [0, 6, 9, 10, 30])


def test_varlen_dropout_draws_as_the_padded_batch():
    """Equal lengths: the packed batch is the dense batch stored sequence-major, and dropout
    (drawn as the padded batch) drops the same elements: the same outputs and gradients."""
    batch, length, heads, dim = 3, 11, 2, 8
    mx.random.seed(4)
    q, k, v = (mx.random.normal((batch * length, heads, dim)) for _ in range(3))
    offsets = [i * length for i in range(batch + 1)]
    options = dict(dropout_p=0.3, seed=5, offset=2)

    def packed(q, k, v):
        return fm.varlen_attention(q, k, v, offsets, offsets, **options)

    def dense(q, k, v):
        as_batch = [x.reshape(batch, length, heads, dim).transpose(0, 2, 1, 3) for x in (q, k, v)]
        # On the CPU stream, where varlen_attention runs, so that the same code runs both.
        return fm.attention(*as_batch, **options, stream=mx.cpu).transpose(0, 2, 1, 3).reshape(
            batch * length, heads, dim)

    assert mx.array_equal(packed(q, k, v), dense(q, k, v)).item()
    grads = [mx.grad(lambda *x: (f(*x) ** 2).sum(), argnums=(0, 1, 2))(q, k, v) for f in (packed, dense)]
    for got, expected in zip(*grads):
        assert mx.allclose(got, expected, rtol=1e-6, atol=1e-6).item()


def _kv_case(page=None, seed=6):
    """Caches of three sequences (14, 0 and 31 keys of 40 rows), one query each, and their pages
    in shuffled order (page rows a page) with the page table."""
    rng = np.random.default_rng(seed)
    batch, capacity, hq, hkv, d, dv = 3, 48, 4, 2, 16, 8
    k_cache = rng.standard_normal((batch, capacity, hkv, d)).astype(np.float32)
    v_cache = rng.standard_normal((batch, capacity, hkv, dv)).astype(np.float32)
    q = rng.standard_normal((batch, 2, hq, d)).astype(np.float32)
    lengths = np.array([14, 0, 31], dtype=np.int32)
    new_k = rng.standard_normal((batch, 5, hkv, d)).astype(np.float32)
    new_v = rng.standard_normal((batch, 5, hkv, dv)).astype(np.float32)
    if page is None:
        return q, k_cache, v_cache, lengths, None, new_k, new_v
    per = capacity // page
    order = rng.permutation(batch * per + 2)[:batch * per].reshape(batch, per)
    k_pages = rng.standard_normal((batch * per + 2, page, hkv, d)).astype(np.float32)
    v_pages = rng.standard_normal((batch * per + 2, page, hkv, dv)).astype(np.float32)
    for b in range(batch):
        for i in range(per):
            k_pages[order[b, i]] = k_cache[b, i * page:(i + 1) * page]
            v_pages[order[b, i]] = v_cache[b, i * page:(i + 1) * page]
    return q, k_pages, v_pages, lengths, order.astype(np.int32), new_k, new_v


@pytest.mark.parametrize("page", [None, 16])
@pytest.mark.parametrize("append", [False, True])
def test_attention_with_kvcache_is_torchs_and_each_sequence_alone(page, append):
    torch = pytest.importorskip("torch")
    import flashjit
    q, k_cache, v_cache, lengths, table, new_k, new_v = _kv_case(page)
    extra = dict(k=mx.array(new_k), v=mx.array(new_v)) if append else {}
    k_mx, v_mx = mx.array(k_cache), mx.array(v_cache)
    options = dict(causal=True, softcap=3.0)
    o, lse = fm.attention_with_kvcache(mx.array(q), k_mx, v_mx, cache_seqlens=mx.array(lengths),
                                       page_table=None if table is None else mx.array(table), return_lse=True,
                                       **extra, **options)
    assert o.shape == (3, 2, 4, 8) and lse.shape == (3, 4, 2)
    # torch's entry on the same arrays: the same C API call, bit for bit, and the same appends.
    k_t, v_t = torch.from_numpy(k_cache.copy()), torch.from_numpy(v_cache.copy())
    extra_t = dict(k=torch.from_numpy(new_k), v=torch.from_numpy(new_v)) if append else {}
    o_t, lse_t = flashjit.attention_with_kvcache(torch.from_numpy(q), k_t, v_t, cache_seqlens=torch.from_numpy(lengths),
                                                 page_table=None if table is None else torch.from_numpy(table),
                                                 return_lse=True, **extra_t, **options)
    assert np.array_equal(np.array(o), o_t.numpy())
    assert np.array_equal(np.array(lse), lse_t.numpy(), equal_nan=True)
    assert np.array_equal(np.array(k_mx), k_t.numpy()) and np.array_equal(np.array(v_mx), v_t.numpy())
    # Each sequence alone against its keys (bottom-right causal).
    new = 5 if append else 0
    for b, n in enumerate(lengths.tolist()):
        if table is None:
            keys, values = k_mx[b, :n + new], v_mx[b, :n + new]
        else:
            rows = np.arange(n + new)
            pages = mx.array(table[b][rows // page])
            keys, values = k_mx[pages, mx.array(rows % page)], v_mx[pages, mx.array(rows % page)]
        alone = fm.attention(mx.array(q[b:b + 1]).transpose(0, 2, 1, 3), keys.transpose(1, 0, 2)[None],
                             values.transpose(1, 0, 2)[None], causal="bottom_right", softcap=3.0)
        _close(o[b], alone[0].transpose(1, 0, 2))


def test_attention_with_kvcache_checks_before_writing():
    q, k_pages, v_pages, lengths, table, new_k, new_v = _kv_case(16)
    k_mx, v_mx = mx.array(k_pages), mx.array(v_pages)
    before = np.array(k_mx)
    table[0, 1] = 99  # sequence 0's 14 keys and 5 new ones reach its second page
    with pytest.raises(ValueError, match=r"page_table: page 99 of sequence 0 is out of range \(0\.\.10\)"):
        fm.attention_with_kvcache(mx.array(q), k_mx, v_mx, cache_seqlens=lengths, page_table=table,
                                  k=mx.array(new_k), v=mx.array(new_v))
    assert np.array_equal(np.array(k_mx), before)
    # Without the new keys the second page is never read.
    fm.attention_with_kvcache(mx.array(q), k_mx, v_mx, cache_seqlens=lengths, page_table=table)
    with pytest.raises(ValueError, match="cache_seqlens: length -1 of sequence 1 is negative"):
        fm.attention_with_kvcache(mx.array(q), k_mx, v_mx, cache_seqlens=[1, -1, 2], page_table=table)
    with pytest.raises(ValueError, match="k, v: give both"):
        fm.attention_with_kvcache(mx.array(q), k_mx, v_mx, cache_seqlens=lengths, page_table=table,
                                  k=mx.array(new_k))
    q, k_cache, v_cache, lengths, _, new_k, new_v = _kv_case()
    with pytest.raises(ValueError, match="k: sequence 2 holds 44 keys; 5 more do not fit its cache of 48"):
        fm.attention_with_kvcache(mx.array(q), mx.array(k_cache), mx.array(v_cache), cache_seqlens=[14, 0, 44],
                                  k=mx.array(new_k), v=mx.array(new_v))
    with pytest.raises(ValueError, match="q: expected 4 dims"):
        fm.attention_with_kvcache(mx.array(q[0]), mx.array(k_cache), mx.array(v_cache), cache_seqlens=lengths)
    with pytest.raises(ValueError, match="not differentiable"):
        mx.grad(lambda q: fm.attention_with_kvcache(q, mx.array(k_cache), mx.array(v_cache),
                                                    cache_seqlens=lengths).sum())(mx.array(q))


def test_attention_with_kvcache_writes_nothing_when_a_check_fails():
    for page in (None, 16):
        q, k_cache, v_cache, lengths, table, new_k, new_v = _kv_case(page)
        k_mx, v_mx = mx.array(k_cache), mx.array(v_cache)
        cases = [
            (ValueError, "window", dict(window=(1,))),
            (ValueError, "head_dim 16 does not match q's 24", dict(q=mx.array(np.zeros((3, 2, 4, 24), np.float32)))),
            (ValueError, r"k: expected shape \[3, 5, 2, 16\]", dict(k=mx.array(new_k[:1]), v=mx.array(new_v[:1]))),
            (ValueError, r"k: expected shape \[3, 5, 2, 16\]", dict(k=mx.array(new_k[:, :, :1]))),
            (TypeError, "k: expected the cache's dtype", dict(k=mx.array(new_k).astype(mx.float16))),
        ]
        for kind, message, change in cases:
            args = dict(q=mx.array(q), cache_seqlens=lengths, page_table=table, k=mx.array(new_k), v=mx.array(new_v))
            args.update(change)
            with pytest.raises(kind, match=message):
                fm.attention_with_kvcache(args.pop("q"), k_mx, v_mx, **args)
            assert np.array_equal(np.array(k_mx), k_cache) and np.array_equal(np.array(v_mx), v_cache), message
