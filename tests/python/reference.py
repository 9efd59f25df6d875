"""Reference attention and the tolerance policy.

naive_attention in float64 is the oracle; the same code in the input dtype is
the baseline an unfused implementation reaches (PyTorch's math path does the
same matmul-softmax-matmul). flashjit's error against the oracle must be at most
2x the baseline's plus a rounding floor, for outputs and for gradients.
"""

import math

import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 2**-9, torch.bfloat16: 2**-6, torch.float64: 1e-12}


def visible(seqlen_q, seqlen_k, causal, window):
    """Bool [Sq, Sk]: keys each query may see through the causal and window bounds."""
    left, right = window
    if causal:
        right = 0
    shift = 0 if causal in (True, "top_left") else seqlen_k - seqlen_q
    i = torch.arange(seqlen_q)[:, None]
    j = torch.arange(seqlen_k)[None, :]
    rel = j - i - shift
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    if left >= 0:
        keep &= rel >= -left
    if right >= 0:
        keep &= rel <= right
    return keep


def naive_attention(q, k, v, *, attn_mask=None, scale=None, softcap=0.0, causal=False, window=(-1, -1),
                    dropout_p=0.0, keep=None, dtype=torch.float64):
    """o, lse computed in `dtype` (differentiable). keep: bool [B, Hq, Sq, Sk] dropout mask."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.to(dtype)
    s = s.masked_fill(~visible(q.shape[2], k.shape[2], causal, window), float("-inf"))
    lse = torch.logsumexp(s.to(torch.float64), dim=-1)
    # Rows with no visible key: probabilities 0 (SDPA semantics), not NaN.
    empty = torch.isinf(lse) & (lse < 0)
    p = torch.softmax(s, dim=-1).masked_fill(empty[..., None], 0.0)
    if dropout_p:
        p = p * keep.to(dtype) / (1.0 - dropout_p)
    return p @ v, lse


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
