"""One flashjit forward and backward for Nsight Compute to profile.

    ncu --clock-control none -k regex:fj_attention --launch-skip 3 -c 3 \\
        python bench/profile_cuda.py --head-dim 128 --seqlen 8192 [--causal]

A first forward+backward (the three launches skipped above) compiles and warms
the kernels; the second is the one profiled. bf16, B*N = 16k, hidden 2048.
"""

from __future__ import annotations

import argparse

import torch

import flashjit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=8192)
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()
    heads, batch = 2048 // args.head_dim, 16384 // args.seqlen
    shape = (batch, heads, args.seqlen, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        out = flashjit.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
        torch.autograd.grad(out, (q, k, v), grad)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
