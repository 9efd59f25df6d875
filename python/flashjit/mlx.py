"""flashjit attention as MLX primitives.

    import mlx.core as mx
    import flashjit.mlx
    o = flashjit.mlx.attention(q, k, v, causal=True)               # lazy, like any MLX op
    grads = mx.grad(lambda q, k, v: flashjit.mlx.attention(q, k, v).sum(), argnums=(0, 1, 2))(q, k, v)

q [B, Hq, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv] (Hq a multiple of Hkv: grouped-query
attention without copies). The forward (o and the log-sum-exp) and the fused backward are
primitives of MLX's graph, so mx.eval, mx.grad, mx.vjp and mx.compile treat them like MLX's
own. They run on a CPU stream wherever MLX runs on Linux, through flashjit's C API; where MLX
runs on CUDA (mlx-cuda installed, and flashjit built with MLX's CUDA headers beside the CUDA
toolkit's: flashjit._mlx.cuda_available()), attention also runs on MLX's GPU stream, its CUDA
kernels recorded into MLX's command encoder (new, not yet run on a GPU). varlen_attention and
attention_with_kvcache run on a CPU stream only; a Metal backend is not there yet.
"""

from __future__ import annotations

import contextlib
import math
import sys

try:
    import mlx.core as mx
    import mlx.nn as nn
except ImportError:
    raise ImportError("flashjit.mlx needs mlx, which is not installed: pip install 'mlx[cpu]' (Linux) or "
                      "pip install mlx (macOS), then rebuild flashjit with it in a flashjit checkout: "
                      "pip install --no-build-isolation --force-reinstall --no-deps .") from None

from . import profiler as _profiler
from .options import AttentionOptions

try:
    from . import _mlx
except ImportError:  # built only where MLX was importable at build time
    raise ImportError(
        "flashjit.mlx: this flashjit build has no MLX primitives (mlx was not importable while it was built; "
        "pip's isolated builds never see it). With mlx installed, build from a flashjit checkout without "
        "isolation: pip install nanobind==3.1.0 'scikit-build-core>=0.10' && "
        "pip install --no-build-isolation --force-reinstall --no-deps .") from None

__all__ = ["attention", "scaled_dot_product_attention", "MultiHeadAttention", "patch_mlx_lm", "unpatch_mlx_lm",
           "mlx_lm_patched", "mlx_lm_attention", "profile_step", "varlen_attention", "attention_with_kvcache",
           "peak_memory", "reset_peak_memory"]


def _check_bindings():
    """mlx.core.array must pass into flashjit's module as itself, which needs the nanobind
    both were built with to share one type registry. A graph node only: nothing runs."""
    probe = mx.zeros((1, 1, 1, 1))
    try:
        _mlx.attention(probe, probe, probe, None, None, 0.0, 0, -1, -1, 0.0, None)
    except TypeError as error:
        raise ImportError("flashjit.mlx: mlx.core.array does not reach flashjit's MLX module; flashjit was "
                          "built with a nanobind whose type registry differs from mlx's (rebuild flashjit "
                          f"with the nanobind mlx {mx.__version__} was built with): {error}") from error


_check_bindings()


def _rng(dropout_p, seed, offset):
    """The dropout seed and offset as 4 uint32: given, or drawn from MLX's random state
    (so mx.random.seed makes it repeatable and mx.compile can carry the state)."""
    if not dropout_p:
        return None
    if seed is None:  # eight 16-bit draws (exact in randint's float32 sampling) make four words
        halves = mx.random.randint(0, 1 << 16, (8,), dtype=mx.uint32)
        return halves[0::2] | (halves[1::2] << 16)
    seed, offset = (int(x) & 0xFFFFFFFFFFFFFFFF for x in (seed, offset))  # as unsigned 64-bit, as elsewhere
    return mx.array([seed & 0xFFFFFFFF, seed >> 32, offset & 0xFFFFFFFF, offset >> 32], dtype=mx.uint32)


def _target(stream):
    """Where a call's nodes go, as the extension takes it: the Stream given, or a Device (its
    default stream) for stream=mx.gpu or mx.cpu or a Device of either, of any index (a Device
    compares equal to mx.gpu only with index 0, so its type is what tells); by default MLX's
    default device where flashjit can run there (MLX on CUDA), else None: the CPU's stream."""
    if stream is None:
        device = mx.default_device()
        return device if device.type == mx.gpu and _mlx.cuda_available() else None
    if isinstance(stream, mx.DeviceType):
        return mx.Device(stream)
    if isinstance(stream, (mx.Device, mx.Stream)):
        return stream
    raise TypeError(f"flashjit.mlx: stream: expected mx.cpu, mx.gpu, a Device or a Stream, got {stream!r}")


def attention(q, k, v, *, mask=None, scale=None, softcap=0.0, causal=False, window=(-1, -1), dropout_p=0.0,
              seed=None, offset=0, return_lse=False, stream=None):
    """o (and with return_lse=True the log-sum-exp, float32) as lazy MLX arrays.

    mask: bool (True = attend) or additive float32 / q-dtype, broadcastable to
    [B, Hq, Sq, Sk] (fewer dims broadcast from the right). causal: False, True or 'top_left', 'bottom_right'.
    window: (left, right) keys around the diagonal, -1 = unbounded. softcap: 0 = off.
    dropout_p, seed, offset: dropout on the probabilities, dropping the elements
    flashjit.dropout_keep_mask names for that seed and offset; without a seed it is drawn
    from MLX's random state. The backward drops the same elements.
    Rows that see no key give o = 0 and lse = -inf. Differentiable through q, k and v
    (not the mask; lse is returned through mx.stop_gradient).
    stream: mx.cpu or mx.gpu, a Device (its default stream) or a Stream (MLX on CUDA: on a GPU,
    flashjit's CUDA kernels recorded into MLX's command encoder); default: MLX's default device
    where flashjit runs there, else the CPU.
    """
    op = "flashjit.mlx.attention"
    options = AttentionOptions.make(op, scale=scale, softcap=softcap, causal=causal, window=window,
                                    dropout_p=dropout_p)
    target = _target(stream)
    if mask is not None and mask.ndim < 4:
        mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    if _profiler._active is not None:  # flashjit.profile(): replayed alone at the block's exit
        _profiler._active.record_mlx(
            "flashjit", lambda q, k, v: attention(q, k, v, mask=mask, scale=scale, softcap=softcap, causal=causal,
                                                  window=window, dropout_p=dropout_p, seed=seed, offset=offset,
                                                  stream=stream),
            q, k, v, options.causal, options.window_left, options.window_right, mask, options.dropout_p)
    o, lse = _mlx.attention(q, k, v, mask, options.scale, options.softcap, options.causal, options.window_left,
                            options.window_right, options.dropout_p, _rng(dropout_p, seed, offset), target)
    return (o, mx.stop_gradient(lse)) if return_lse else o  # the log-sum-exp carries no gradient


def scaled_dot_product_attention(q, k, v, *, scale=None, mask=None):
    """mlx.core.fast.scaled_dot_product_attention's arguments: mask may also be "causal"
    (aligned to the bottom right, as there: the last query sees every key)."""
    causal = False
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"[flashjit.mlx.scaled_dot_product_attention] mask: expected an array, None or "
                             f"'causal', got {mask!r}")
        mask, causal = None, "bottom_right"
    return attention(q, k, v, mask=mask, scale=scale, causal=causal)


class MultiHeadAttention(nn.MultiHeadAttention):
    """mlx.nn.MultiHeadAttention computed by flashjit: the same parameters (weights load
    into either), the same call (queries, keys, values, mask=None: an additive or bool
    array broadcastable to [B, heads, L, S], or "causal")."""

    def __call__(self, queries, keys, values, mask=None):
        queries, keys, values = self.query_proj(queries), self.key_proj(keys), self.value_proj(values)
        heads = self.num_heads
        queries, keys, values = (mx.unflatten(x, -1, (heads, -1)).transpose(0, 2, 1, 3)
                                 for x in (queries, keys, values))
        out = scaled_dot_product_attention(queries, keys, values, scale=1 / math.sqrt(queries.shape[-1]), mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).flatten(-2, -1))


# ---- routing mlx-lm's attention here ----------------------------------------------------------------------

_mlx_lm = {"original": None}


def _mlx_lm_attention(queries, keys, values, cache, scale, mask, sinks=None):
    """mlx_lm.models.base.scaled_dot_product_attention's signature: flashjit serves it,
    except a quantized cache and attention sinks, which go to mlx-lm's own function."""
    if sinks is not None or hasattr(cache, "bits"):
        return _mlx_lm["original"](queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    return scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


def _mlx_lm_modules():
    """mlx_lm.models.base and the loaded model modules (each imports the function by name)."""
    return [module for name, module in list(sys.modules.items())
            if module is not None and (name == "mlx_lm.models.base" or name.startswith("mlx_lm.models."))]


def patch_mlx_lm() -> None:
    """Routes mlx-lm's attention (mlx_lm.models.base.scaled_dot_product_attention, in the
    base module and in every model module) to flashjit; models imported later take it too.
    unpatch_mlx_lm() puts mlx-lm's function back."""
    try:
        import mlx_lm.models.base as base
    except ImportError as error:
        raise ImportError("flashjit.mlx.patch_mlx_lm: mlx-lm is not installed (pip install mlx-lm)") from error
    if _mlx_lm["original"] is None:
        _mlx_lm["original"] = base.scaled_dot_product_attention
    for module in _mlx_lm_modules():
        if getattr(module, "scaled_dot_product_attention", None) is _mlx_lm["original"]:
            module.scaled_dot_product_attention = _mlx_lm_attention


def unpatch_mlx_lm() -> None:
    original = _mlx_lm["original"]
    if original is None:
        return
    for module in _mlx_lm_modules():
        if getattr(module, "scaled_dot_product_attention", None) is _mlx_lm_attention:
            module.scaled_dot_product_attention = original


def mlx_lm_patched() -> bool:
    base = sys.modules.get("mlx_lm.models.base")
    return base is not None and base.scaled_dot_product_attention is _mlx_lm_attention


@contextlib.contextmanager
def mlx_lm_attention():
    """with flashjit.mlx.mlx_lm_attention(): ... (patched inside, as it was after)."""
    was = mlx_lm_patched()
    patch_mlx_lm()
    try:
        yield
    finally:
        if not was:
            unpatch_mlx_lm()


# ---- attention's share of a step ----------------------------------------------------------------------

def profile_step(step, repeats: int = 5, peak: bool = False) -> dict:
    """Attention's cost in one MLX step: runs `step()` (which must evaluate its work) once
    inside flashjit.profile(framework=True), which records every attention call through
    flashjit.mlx or mx.fast.scaled_dot_product_attention (MLX builds its graph lazily, so a
    call has no time of its own inside the step); then times each distinct call alone,
    forward and backward (mx.grad), median of `repeats`, on fresh inputs of its shapes with
    its own mask. Returns the step's time, the calls' estimated total, the share, a row per
    distinct call with its TFLOP/s (the call's exact FLOPs, forward + backward 3.5x the
    forward's, docs/measurement.md), and "table". peak=True: each row's share of the device's
    peak too ("peak_share": its TFLOP/s over a square matrix product's in its dtype on MLX's
    default device, measured once and kept: profiler.mlx_peak_tflops)."""
    import time as _time

    with _profiler.profile(framework=True) as prof:
        prof.time_mlx_alone = False
        start = _time.perf_counter()
        step()
        step_ms = (_time.perf_counter() - start) * 1e3
    groups: dict[tuple, list] = {}
    for call in prof.calls:
        if call._replay is not None:
            groups.setdefault((call.impl, call.shape_key()), []).append(call)
    rows = []
    for (impl, shape), calls in groups.items():
        ms = _profiler.mlx_call_ms(*calls[0]._replay, repeats=repeats, backward=True)
        row = dict(impl=impl, shape=shape, calls=len(calls), ms_per_call=ms, ms=ms * len(calls),
                   tflops=3.5 * calls[0].flops / (ms / 1e3) / 1e12)
        if peak:
            row["peak_share"] = row["tflops"] / _profiler.mlx_peak_tflops(calls[0].dtype)
        rows.append(row)
    attention_ms = sum(row["ms"] for row in rows)
    lines = ["| impl | shape | calls | ms a call (fwd+bwd) | TFLOP/s |" + (" of peak |" if peak else ""),
             "|---|---|---|---|---|" + ("---|" if peak else "")]
    lines += [f"| {r['impl']} | {r['shape']} | {r['calls']} | {r['ms_per_call']:.2f} | {r['tflops']:.3f} |"
              + (f" {r['peak_share']:.0%} |" if peak else "") for r in rows]
    lines.append(f"\nattention: about {attention_ms:.1f} ms of a {step_ms:.1f} ms step "
                 f"({attention_ms / step_ms:.0%}; each call timed alone, forward and backward)")
    return dict(step_ms=step_ms, attention_ms=attention_ms, share=attention_ms / step_ms, rows=rows,
                table="\n".join(lines))


def peak_memory() -> int:
    """Bytes: MLX's peak memory (mx.get_peak_memory()) plus the peak of flashjit's own device
    memory that MLX arrays hold (on MLX's GPU stream unless FLASHJIT_MLX_MEMORY=allocator; else 0),
    since the last reset_peak_memory(). The two peaks need not fall together: the sum bounds the
    process's peak from above."""
    return mx.get_peak_memory() + _mlx.device_memory()["peak"]


def reset_peak_memory() -> None:
    """Starts both peaks of peak_memory() again (mx.reset_peak_memory() and flashjit's)."""
    mx.reset_peak_memory()
    _mlx.device_memory(reset_peak=True)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *, causal=False,
                     window=(-1, -1), softcap=0.0, dropout_p=0.0, scale=None, seed=None, offset=0,
                     return_lse=False):
    """flashjit.varlen_attention for MLX arrays: packed q [total_q, Hq, D], k [total_k, Hkv, D],
    v [total_k, Hkv, Dv] and batch + 1 int32 offsets (arrays or lists) → o [total_q, Hq, Dv]
    (and lse [Hq, total_q]); causal=True aligns bottom-right as flash-attn's; dropout drops what
    the padded batch drops (as flashjit.varlen_attention). One primitive for the batch
    (the C API's varlen entry), differentiable through q, k and v."""
    op = "flashjit.mlx.varlen_attention"
    options = AttentionOptions.make(op, scale=scale, softcap=softcap,
                                    causal="bottom_right" if causal is True else causal, window=window,
                                    dropout_p=dropout_p)
    offsets = [x if isinstance(x, mx.array) else mx.array(list(x), dtype=mx.int32) for x in (cu_seqlens_q, cu_seqlens_k)]
    o, lse = _mlx.varlen_attention(q, k, v, *offsets, int(max_seqlen_q or 0), int(max_seqlen_k or 0), options.scale,
                                   options.softcap, options.causal, options.window_left, options.window_right,
                                   options.dropout_p, _rng(dropout_p, seed, offset))
    return (o, mx.stop_gradient(lse)) if return_lse else o


def attention_with_kvcache(q, k_cache, v_cache, *, cache_seqlens, page_table=None, k=None, v=None, causal=False,
                           window=(-1, -1), softcap=0.0, scale=None, return_lse=False):
    """flashjit.attention_with_kvcache for MLX arrays (flash-attn's flash_attn_with_kvcache): q
    [B, Sq, Hq, D] attends to the first cache_seqlens[b] (+ S_new) keys of its sequence's cache →
    [B, Sq, Hq, Dv] (and lse [B, Hq, Sq]). The cache is k_cache [B, S_cache, Hkv, D], v_cache
    [B, S_cache, Hkv, Dv], or with page_table [B, max_pages] (int32) pages [num_pages, page_size,
    Hkv, D]. k, v [B, S_new, Hkv, D] given are first written into the cache arrays at each
    sequence's length (the arrays passed in are updated, as MLX's slice assignment updates them).
    causal=True aligns bottom-right. cache_seqlens and page_table are arrays or lists (read on the
    host). One primitive for the batch on a CPU stream (the C API's varlen entry, the cache read
    in place); not differentiable (a cache is for inference)."""
    import numpy as np

    from .arrays import check_kv_cache, check_kv_ranks

    op = "flashjit.mlx.attention_with_kvcache"
    given = (("q", q), ("k_cache", k_cache), ("v_cache", v_cache))
    for name, x in given + ((("k", k), ("v", v)) if k is not None and v is not None else ()):
        if not isinstance(x, mx.array):
            raise TypeError(f"[{op}] {name}: expected an mlx.core.array, got {type(x).__name__}")
    check_kv_ranks(op, q, k_cache, v_cache)
    batch, sq, heads_q = q.shape[0], q.shape[1], q.shape[2]
    lengths = np.asarray(cache_seqlens)
    if lengths.dtype.kind not in "iu" or lengths.shape != (batch,):
        raise ValueError(f"[{op}] cache_seqlens: expected an int32 array of {batch} lengths (q's batch)")
    lengths = lengths.tolist()
    table = None
    if page_table is not None:
        table = np.asarray(page_table)
        if table.dtype.kind not in "iu" or table.ndim != 2 or table.shape[0] != batch:
            raise ValueError(f"[{op}] page_table: expected an int32 array [batch={batch}, max_pages]")
    new = check_kv_cache(op, q, k_cache, v_cache, lengths, table, k, v)
    options = AttentionOptions.make(op, scale=scale, softcap=softcap,
                                    causal="bottom_right" if causal is True else causal, window=window)
    used = mx.array([n + new for n in lengths], dtype=mx.int32)
    pages = None if table is None else mx.array(table.astype(np.int32))

    def call():  # a graph node over the caches as they are now; making it checks the whole call
        if table is None:  # sequence b's keys start at row b * S_cache of the caches as packed rows
            keys, values = (c.reshape(batch * c.shape[1], c.shape[2], c.shape[3]) for c in (k_cache, v_cache))
            offsets_k = mx.arange(batch + 1, dtype=mx.int32) * k_cache.shape[1]
        else:
            keys, values, offsets_k = k_cache, v_cache, None
        return _mlx.varlen_attention(q.reshape(batch * sq, heads_q, q.shape[3]), keys, values,
                                     mx.arange(batch + 1, dtype=mx.int32) * sq, offsets_k, sq, 0, options.scale,
                                     options.softcap, options.causal, options.window_left, options.window_right, 0.0,
                                     None, seqused_k=used, page_table=pages)

    if new:
        call()  # checked before the caches are written; the node is never evaluated
    page_size = k_cache.shape[1]
    for b in range(batch if new else 0):  # appended into the caches before attending
        for cache, added in ((k_cache, k), (v_cache, v)):
            if table is None:
                cache[b, lengths[b]:lengths[b] + new] = added[b]
            else:
                rows = np.arange(lengths[b], lengths[b] + new)
                cache[mx.array(table[b][rows // page_size].astype(np.int32)), mx.array(rows % page_size)] = added[b]
    o, lse = call()
    o = o.reshape(batch, sq, heads_q, o.shape[-1])
    if not return_lse:
        return o
    return o, mx.stop_gradient(lse.reshape(heads_q, batch, sq).transpose(1, 0, 2))
