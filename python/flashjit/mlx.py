"""flashjit attention as MLX primitives.

    import mlx.core as mx
    import flashjit.mlx
    o = flashjit.mlx.attention(q, k, v, causal=True)               # lazy, like any MLX op
    grads = mx.grad(lambda q, k, v: flashjit.mlx.attention(q, k, v).sum(), argnums=(0, 1, 2))(q, k, v)

q [B, Hq, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv] (Hq a multiple of Hkv: grouped-query
attention without copies). The forward (o and the log-sum-exp) and the fused backward are
primitives of MLX's graph, so mx.eval, mx.grad, mx.vjp and mx.compile treat them like MLX's
own; they run on a CPU stream (MLX on Linux; a Metal backend is not there yet).
"""

from __future__ import annotations

import mlx.core as mx

from .options import AttentionOptions

try:
    from . import _mlx
except ImportError as error:  # built only where MLX was installed at build time
    raise ImportError("flashjit.mlx: this flashjit build has no MLX primitives; install mlx "
                      "(pip install 'mlx[cpu]' on Linux) and reinstall flashjit") from error

__all__ = ["attention", "scaled_dot_product_attention"]


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


def attention(q, k, v, *, mask=None, scale=None, softcap=0.0, causal=False, window=(-1, -1), dropout_p=0.0,
              seed=None, offset=0, return_lse=False):
    """o (and with return_lse=True the log-sum-exp, float32) as lazy MLX arrays.

    mask: bool (True = attend) or additive float32 / q-dtype, broadcastable to
    [B, Hq, Sq, Sk] (fewer dims broadcast from the right). causal: False, True or 'top_left', 'bottom_right'.
    window: (left, right) keys around the diagonal, -1 = unbounded. softcap: 0 = off.
    dropout_p, seed, offset: dropout on the probabilities, dropping the elements
    flashjit.dropout_keep_mask names for that seed and offset; without a seed it is drawn
    from MLX's random state. The backward drops the same elements.
    Rows that see no key give o = 0 and lse = -inf. Differentiable through q, k and v
    (not the mask; lse is returned through mx.stop_gradient).
    """
    op = "flashjit.mlx.attention"
    options = AttentionOptions.make(op, scale=scale, softcap=softcap, causal=causal, window=window,
                                    dropout_p=dropout_p)
    if mask is not None and mask.ndim < 4:
        mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    o, lse = _mlx.attention(q, k, v, mask, options.scale, options.softcap, options.causal, options.window_left,
                            options.window_right, options.dropout_p, _rng(dropout_p, seed, offset))
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
