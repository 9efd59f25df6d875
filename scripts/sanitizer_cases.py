"""Small CUDA cases for compute-sanitizer memcheck: every dtype, masks, causal,
windows, GQA, dropout, softcap, odd sizes, strided inputs; forward and backward.

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/sanitizer_cases.py

Under FLASHJIT_CUDA_TILES, the cases that configuration cannot run are skipped (and say so).
"""

import os

import torch

import flashjit

torch.manual_seed(0)
cases = [
    dict(dtype=torch.float16, B=1, Hq=2, Hkv=1, Sq=7, Sk=65, D=40, Dv=40, causal=None),
    dict(dtype=torch.bfloat16, B=2, Hq=2, Hkv=2, Sq=129, Sk=63, D=128, Dv=64, causal="bottom_right"),
    dict(dtype=torch.float32, B=1, Hq=4, Hkv=2, Sq=33, Sk=33, D=72, Dv=72, causal="top_left", mask=True),
    dict(dtype=torch.bfloat16, B=1, Hq=1, Hkv=1, Sq=17, Sk=100, D=256, Dv=256, window=(8, 4), dropout=0.2,
         softcap=20.0),
    dict(dtype=torch.float64, B=1, Hq=1, Hkv=1, Sq=5, Sk=9, D=1, Dv=3, causal=None),
    # More work tiles (192) than an H100/H200 has SMs: persistent forward blocks take several each.
    dict(dtype=torch.bfloat16, B=2, Hq=32, Hkv=8, Sq=333, Sk=333, D=128, Dv=128, causal="top_left"),
    # The split forward (keys over 7 blocks, a combine kernel), forced; then a decoding
    # step that splits by itself.
    dict(dtype=torch.float16, B=2, Hq=4, Hkv=2, Sq=5, Sk=301, D=72, Dv=40, causal="bottom_right", mask=True,
         splits=7),
    dict(dtype=torch.bfloat16, B=1, Hq=8, Hkv=2, Sq=1, Sk=2049, D=128, Dv=128, causal=None),
]
for case in cases:
    dtype, B, Hq, Hkv, Sq, Sk = (case[k] for k in ("dtype", "B", "Hq", "Hkv", "Sq", "Sk"))
    q = torch.randn(B, Sq, Hq, case["D"], device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, Hkv, Sk, case["D"], device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, Sk, case["Dv"], device="cuda", dtype=dtype, requires_grad=True)
    mask = torch.rand(1, Hq, Sq, Sk, device="cuda") > 0.3 if case.get("mask") else None
    os.environ.pop("FLASHJIT_CUDA_SPLITS", None)
    if "splits" in case:
        os.environ["FLASHJIT_CUDA_SPLITS"] = str(case["splits"])
    try:
        o = flashjit.attention(q, k, v, attn_mask=mask, causal=case.get("causal") or False,
                               window=case.get("window", (-1, -1)),
                               dropout_p=case.get("dropout", 0.0), softcap=case.get("softcap", 0.0))
    except ValueError as error:
        if "FLASHJIT_CUDA_TILES" not in str(error):
            raise
        # A forced tile configuration that cannot run for this case (e.g. groups=3 above head dim 64).
        print("skipped", {k: v for k, v in case.items() if k != "dtype"}, dtype, "-", error, flush=True)
        continue
    o.backward(torch.randn_like(o))
    torch.cuda.synchronize()
    print("ok", {k: v for k, v in case.items() if k != "dtype"}, dtype, flush=True)
