"""flashjit: exact, memory-light attention with a fused backward.

    o, lse = flashjit.attention(q, k, v, causal=True)
    dq, dk, dv = flashjit.attention_backward(q, k, v, o, lse, dout, causal=True)

Tensors are numpy arrays or torch tensors in [batch, heads, seqlen, head_dim]
layout; flashjit reads and writes them in place, without copies.
"""

from ._C import version as _version
from .api import attention, attention_backward, backends, dropout_keep_mask

__version__ = _version()
__all__ = ["attention", "attention_backward", "backends", "dropout_keep_mask", "__version__"]
