"""A few decoding calls of flashjit on CUDA and nothing else, for a profiler to attach to
(Nsight Compute: `ncu -k regex:combine --launch-skip 2 --launch-count 1 python3 bench/decode_calls.py`).

    python bench/decode_calls.py [--batch 1] [--keys 8192] [--calls 4]

One query token, 32 query heads sharing 8 key/value heads, head dim 128, bf16 (bench/decode.py's
problem), no mask.
"""

import argparse

import torch

import flashjit


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--keys", type=int, default=8192)
    parser.add_argument("--calls", type=int, default=4)
    args = parser.parse_args()
    q = torch.randn(args.batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(args.batch, 8, args.keys, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(args.calls):
        flashjit.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
