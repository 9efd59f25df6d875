"""Reference attention and the tolerance policy.

naive_attention in float64 is the oracle; the same code in the input dtype is
the baseline an unfused implementation reaches (PyTorch's math path does the
same matmul-softmax-matmul). flashjit's error against the oracle must be at most
2x the baseline's plus a rounding floor, for outputs and for gradients.
"""

import math

import torch

from flashjit import reference

FLOOR = {torch.float32: 1e-5, torch.float16: 2**-9, torch.bfloat16: 2**-6, torch.float64: 1e-12}


def naive_attention(q, k, v, *, attn_mask=None, scale=None, softcap=0.0, causal=False, window=(-1, -1),
                    dropout_p=0.0, keep=None, dtype=torch.float64):
    """o, lse computed in `dtype` (differentiable): flashjit.reference's naive attention.
    keep: bool [B, Hq, Sq, Sk] dropout mask."""
    return reference.naive_attention(q, k, v, attn_mask=attn_mask, scale=scale, softcap=softcap, causal=causal,
                                     window=window, dropout_p=dropout_p, keep=keep, dtype=dtype, return_lse=True)


def max_err(a, b):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    finite = torch.isfinite(b)
    return (a - b)[finite].abs().max().item() if finite.any() else 0.0


def check(name, actual, baseline, exact, dtype):
    """actual vs the float64 `exact`, within 2x the `baseline` error plus the floor."""
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)}, expected {tuple(exact.shape)}"
    err = max_err(actual, exact)
    base = max_err(baseline, exact)
    if math.isnan(base):  # the unfused baseline broke down (NaN where the exact value is finite): the floor alone
        base = 0.0
    finite = exact.detach()[torch.isfinite(exact.detach())]
    magnitude = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    tol = 2 * base + FLOOR[dtype] * magnitude
    assert err <= tol, f"{name}: error {err:.3g} > tolerance {tol:.3g} (baseline {base:.3g})"


def leaves(*tensors, dtype=None, device=None):
    """Fresh leaf copies that require grad."""
    return [x.detach().to(device=device, dtype=dtype).clone().requires_grad_() for x in tensors]
