"""Decoding-shaped attention on the GPU: one new query per sequence against a KV
cache, flashjit (keys split over blocks by its own choice, and with
FLASHJIT_CUDA_SPLITS=1: no split) against PyTorch's SDPA (its own kernel choice),
all in one run. bf16, 32 query heads sharing 8 key/value heads, head dim 128, with
no mask and with a boolean key mask (a batch of cached sequences of unequal length).
Microseconds per call, each call synchronised; median of repeated timings.

    python bench/decode.py --out bench/results
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import flashjit
from flashjit.bench import device_tag
from gpu_attention import record_commit, save_record, shown_arguments


def per_call_us(fn, calls=50, repeats=5):
    fn()
    torch.cuda.synchronize()
    medians = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
            torch.cuda.synchronize()
        medians.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(medians)


def no_split(fn):
    def run():
        os.environ["FLASHJIT_CUDA_SPLITS"] = "1"
        try:
            return fn()
        finally:
            del os.environ["FLASHJIT_CUDA_SPLITS"]
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="directory for the markdown record")
    args = parser.parse_args()
    os.environ.pop("FLASHJIT_CUDA_SPLITS", None)
    heads_q, heads_kv, head_dim = 32, 8, 128
    rows = []
    for batch in (1, 8):
        for keys in (512, 2048, 8192, 32768):
            q = torch.randn(batch, heads_q, 1, head_dim, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(batch, heads_kv, keys, head_dim, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2))
            lengths = torch.randint(keys // 2, keys + 1, (batch,), device="cuda")
            mask = (torch.arange(keys, device="cuda") < lengths[:, None])[:, None, None, :]
            for masked in (False, True):
                m = mask if masked else None
                cases = {
                    "flashjit": lambda: flashjit.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True),
                    "torch": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True),
                }
                cases["flashjit, no split"] = no_split(cases["flashjit"])
                row = {"B": batch, "keys": keys, "mask": masked}
                row.update({name: per_call_us(fn) for name, fn in cases.items()})
                rows.append(row)
                print(row, flush=True)

    commit = record_commit()
    names = ["flashjit", "flashjit, no split", "torch"]
    lines = [f"# Decoding benchmark: {torch.cuda.get_device_name()}", "",
             f"- date: {datetime.date.today()}", f"- commit: {commit}",
             f"- command: `python bench/decode.py{shown_arguments(sys.argv[1:])}`",
             f"- torch {torch.__version__}, flashjit {flashjit.__version__}",
             f"- bf16, one query, {heads_q} query heads, {heads_kv} key/value heads, head dim {head_dim}; "
             "mask: boolean, each sequence's cached length drawn from [keys / 2, keys]",
             "- microseconds per synchronised call (host time included), median of 5 x 50 calls", "",
             "| B | keys | mask | " + " | ".join(names) + " | flashjit vs torch |",
             "|---:|---:|---|" + "---:|" * (len(names) + 1)]
    for row in rows:
        lines.append(f"| {row['B']} | {row['keys']} | {'yes' if row['mask'] else 'no'} | " +
                     " | ".join(f"{row[n]:.1f}" for n in names) + f" | {row['torch'] / row['flashjit']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    save_record(args.out, device_tag({"device": "cuda", "gpu": torch.cuda.get_device_name()}), "decode", commit, text)


if __name__ == "__main__":
    main()
