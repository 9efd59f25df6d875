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
