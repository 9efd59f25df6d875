"""Accuracy at the edges: gradients of flashjit and of the other fused attentions
against a float64 reference, on the cases where a stored-O backward is weakest.

    python bench/edge_accuracy.py [--device cpu|cuda] [--out bench/results]

Cases (each with fresh random inputs from a fixed seed):
  few-keys f32   float32, causal (top-left) S = 64: rows 0 and 1 see one and two keys
  decode f32     float32, Sq = 1 and 2 against 300 keys, inputs scaled by 4
  two-keys bf16  bfloat16, one query row over two keys whose probabilities are 0.93 / 0.07
  decode bf16    bfloat16, Sq = 1 against 300 keys, inputs scaled by 4

For each implementation and gradient: the largest absolute error against the float64
reference and its ratio to the error of naive attention computed in the same dtype
(torch's math backend), the README's yardstick. On CUDA the peers are PyTorch SDPA's
cuDNN, flash and memory-efficient backends and, where it imports, FlashAttention-4
(flash_attn.cute), each where it takes the case.
"""

import argparse
import datetime
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashjit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))
from reference import FLOOR  # noqa: E402  the rounding floor of the README's tolerance rule, per dtype


def cases():
    """(name, dtype, q, k, v, dout, causal) with inputs in [B, H, S, D] float64 (rounded to dtype)."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    out = []
    q, k, v = randn(1, 2, 64, 64), randn(1, 2, 64, 64), randn(1, 2, 64, 64)
    out.append(("few-keys f32", torch.float32, q, k, v, randn(1, 2, 64, 64), True))
    for sq in (1, 2):
        q, k, v = randn(2, 4, sq, 64, scale=4), randn(2, 4, 300, 64, scale=4), randn(2, 4, 300, 64, scale=4)
        out.append((f"decode f32 Sq={sq}", torch.float32, q, k, v, randn(2, 4, sq, 64), False))
    # One query against two keys: logits differ by ln(0.93 / 0.07), so P = 0.93 / 0.07.
    d = 64
    q = randn(1, 1, 1, d)
    k = randn(1, 1, 2, d)
    gap = math.log(0.93 / 0.07)
    direction = q / (q.norm() ** 2) * math.sqrt(d)  # q . direction * scale = 1
    base = k[..., 1:2, :] - (k[..., 1:2, :] * q).sum() / (q.norm() ** 2) * q  # q . base = 0
    k = torch.cat([base + gap * direction, base], dim=2)
    out.append(("two-keys bf16", torch.bfloat16, q, k, randn(1, 1, 2, d), randn(1, 1, 1, d), False))
    q, k, v = randn(2, 8, 1, 128, scale=4), randn(2, 8, 300, 128, scale=4), randn(2, 8, 300, 128, scale=4)
    out.append(("decode bf16", torch.bfloat16, q, k, v, randn(2, 8, 1, 128), False))
    return out


def gradients(fn, q, k, v, dout, dtype, device):
    """o, dq, dk, dv of fn on the inputs rounded to dtype, as float64 on the CPU."""
    leaves = [x.detach().to(dtype).to(device).clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves)
    o.backward(dout.to(dtype).to(device))
    return [t.detach().double().cpu() for t in (o, *(x.grad for x in leaves))]


def implementations(device, dtype, causal):
    impls = {"flashjit": lambda q, k, v: flashjit.attention(q, k, v, causal="top_left" if causal else None)}

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run

    if device == "cuda":
        impls["cuDNN"] = sdpa(SDPBackend.CUDNN_ATTENTION)
        impls["flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
        impls["mem-efficient"] = sdpa(SDPBackend.EFFICIENT_ATTENTION)
        try:
            from flash_attn.cute import flash_attn_func

            def fa4(q, k, v):
                o = flash_attn_func(*(x.transpose(1, 2) for x in (q, k, v)), causal=causal)[0]
                return o.transpose(1, 2)
            impls["FA4"] = fa4
        except Exception:  # not installed here
            pass
    return impls


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None, help="directory for the markdown record")
    args = parser.parse_args()
    names = ("o", "dq", "dk", "dv")
    lines = ["| case | implementation | " + " | ".join(f"{n} error (× naive)" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for case, dtype, q, k, v, dout, causal in cases():
        exact = gradients(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal),
                          q, k, v, dout, torch.float64, "cpu")
        with sdpa_kernel(SDPBackend.MATH):
            naive = gradients(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal),
                              q, k, v, dout, dtype, "cpu")
        naive_error = [(x - e).abs().max().item() for x, e in zip(naive, exact)]
        lines.append(f"| {case} | naive {str(dtype).removeprefix('torch.')} | "
                     + " | ".join(f"{x:.2e}" for x in naive_error) + " |")
        for name, fn in implementations(args.device, dtype, causal).items():
            try:
                got = gradients(fn, q, k, v, dout, dtype, args.device)
            except Exception as error:  # a peer that does not take this case
                print(f"{case} {name}: {type(error).__name__}: {str(error).splitlines()[0][:120]}", file=sys.stderr)
                continue
            cells = []
            for x, e, base in zip(got, exact, naive_error):
                err = (x - e).abs().max().item()
                # The README's rule (tests/python/reference.py): 2x naive's error plus the dtype's floor.
                within = err <= 2 * base + FLOOR[dtype] * max(1.0, e.abs().max().item())
                cells.append((f"{err:.2e} ({err / base:.1f})" if base > 0 else f"{err:.2e}") + ("" if within else " ✗"))
            lines.append(f"| {case} | {name} | " + " | ".join(cells) + " |")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    from flashjit.bench.provenance import record_commit

    commit = record_commit()
    text = "\n".join([f"# Accuracy at the edges: {device_name}", "", f"- date: {datetime.date.today()}",
                      f"- commit: {commit}", f"- command: `python bench/edge_accuracy.py --device {args.device}`",
                      f"- torch {torch.__version__}, flashjit {flashjit.__version__}",
                      "- largest absolute error against float64; in brackets, its ratio to naive attention's "
                      "error in the same dtype (torch's math backend on the CPU); ✗: outside the README's rule "
                      "(2x naive's error plus the dtype's floor times max(1, |reference|))", ""] + lines) + "\n"
    print(text)
    if args.out:
        tag = "cpu" if args.device == "cpu" else device_name.split()[-1].lower()
        path = os.path.join(args.out, f"{tag}-edge-accuracy-{datetime.date.today()}-{commit}.md")
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
