"""Differential fuzzer: random attention problems through flashjit, outputs and
gradients against the float64 reference under the tolerance policy
(reference.check).

Each case draws its shapes (GQA ratios, Sq != Sk, odd and unequal head dims,
sizes at tile edges), dtype, layout (contiguous, [B, S, H, D] views, strided
slices), causal mode, window, mask (boolean or additive, broadcast), softcap,
scale and dropout from one seeded generator, so a failing case is named by its
seed and index and rerun alone with --only.

    python tests/python/fuzz.py --cases 2000 [--seed 0] [--device cuda] [--only 17] [--jobs 8]

test_fuzz.py runs a short fixed-seed sweep in CI.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flashjit  # noqa: E402
from reference import check, leaves, naive_attention  # noqa: E402

EDGE_SEQLENS = [1, 2, 7, 15, 16, 17, 63, 64, 65, 127, 128, 129, 191, 200, 257]
HEAD_DIMS = [1, 3, 8, 16, 24, 32, 40, 48, 64, 72, 80, 96, 128, 160, 192, 256]


def draw_case(rng: random.Random, device: str) -> dict:
    dtypes = ["float32", "float16", "bfloat16"] + (["float64"] if device == "cpu" else [])
    heads_kv = rng.choice([1, 1, 2, 3])
    group = rng.choice([1, 1, 2, 4])
    head_dim = rng.choice(HEAD_DIMS)
    case = dict(
        B=rng.choice([1, 1, 2, 3]), Hkv=heads_kv, Hq=heads_kv * group,
        Sq=rng.choice(EDGE_SEQLENS + [rng.randint(1, 300)]),
        Sk=rng.choice(EDGE_SEQLENS + [rng.randint(1, 300)]),
        D=head_dim, Dv=head_dim if rng.random() < 0.7 else rng.choice(HEAD_DIMS),
        dtype=rng.choice(dtypes),
        layout=rng.choice(["bhsd", "bhsd", "bshd", "strided"]),
        causal=rng.choice([False, False, True, "bottom_right"]),
        window=(-1, -1), mask=None, softcap=0.0, scale=None, dropout_p=0.0,
        seed=rng.randint(0, 2**63),
    )
    if rng.random() < 0.2:  # with a causal mask the right bound is the diagonal's
        case["window"] = (rng.choice([-1, 0, 3, 30]), rng.choice([-1, 0] if case["causal"] else [-1, 0, 5, 40]))
    if rng.random() < 0.25:
        case["mask"] = (rng.choice(["bool", "additive"]), rng.choice(["full", "per_head", "per_batch", "row"]))
    if rng.random() < 0.15:
        case["softcap"] = rng.choice([5.0, 30.0])
    if rng.random() < 0.15:
        case["scale"] = rng.choice([0.05, 0.3, 1.0])
    if rng.random() < 0.15:
        case["dropout_p"] = rng.choice([0.1, 0.5])
    # Keep the float64 reference and the CPU run quick.
    while case["B"] * case["Hq"] * case["Sq"] * case["Sk"] * max(case["D"], case["Dv"]) > 6e6:
        case["Sq"], case["Sk"] = max(1, case["Sq"] // 2), max(1, case["Sk"] // 2)
    return case


def make_tensor(gen, shape, dtype, layout):
    B, H, S, D = shape
    if layout == "bshd":  # a [B, S, H, D] buffer viewed as [B, H, S, D]
        return torch.randn(B, S, H, D, generator=gen).to(dtype).transpose(1, 2)
    if layout == "strided":  # every other row of a longer buffer, with a wider row pitch
        return torch.randn(B, H, 2 * S, D + 8, generator=gen).to(dtype)[:, :, ::2, :D]
    return torch.randn(B, H, S, D, generator=gen).to(dtype)


def make_mask(gen, kind, shape):
    """kind = (bool or additive, which dims it has); additive masks hold some -inf."""
    B, Hq, Sq, Sk = shape
    dims = {"full": (B, Hq, Sq, Sk), "per_head": (1, Hq, 1, Sk), "per_batch": (B, 1, Sq, Sk), "row": (Sk,)}[kind[1]]
    if kind[0] == "bool":
        return torch.rand(dims, generator=gen) > 0.3
    mask = torch.randn(dims, generator=gen) * 2
    return mask.masked_fill_(torch.rand(dims, generator=gen) < 0.2, float("-inf"))


def run_case(case: dict, device: str) -> None:
    """Runs one case; raises AssertionError on a mismatch."""
    dtype = getattr(torch, case["dtype"])
    gen = torch.Generator().manual_seed(case["seed"] % 2**63)
    B, Hq, Hkv, Sq, Sk, D, Dv = (case[k] for k in ("B", "Hq", "Hkv", "Sq", "Sk", "D", "Dv"))
    q = make_tensor(gen, (B, Hq, Sq, D), dtype, case["layout"])
    k = make_tensor(gen, (B, Hkv, Sk, D), dtype, case["layout"])
    v = make_tensor(gen, (B, Hkv, Sk, Dv), dtype, case["layout"])
    mask = None if case["mask"] is None else make_mask(gen, case["mask"], (B, Hq, Sq, Sk))
    if mask is not None and case["mask"][0] == "additive" and case["seed"] % 2:
        mask = mask.to(dtype)  # an additive mask in the input dtype, else float32
    options = dict(causal=case["causal"], window=case["window"], softcap=case["softcap"], scale=case["scale"])
    dropout_seed = case["seed"] % 1000003
    fq, fk, fv = (x.to(device).requires_grad_() for x in (q, k, v))
    o, lse = flashjit.attention(fq, fk, fv, attn_mask=None if mask is None else mask.to(device),
                                dropout_p=case["dropout_p"], seed=dropout_seed, return_lse=True, **options)
    dout = torch.randn(o.shape, generator=gen).to(dtype)
    o.backward(dout.to(device))

    keep = None
    if case["dropout_p"]:
        keep = torch.from_numpy(flashjit.dropout_keep_mask(B, Hq, Sq, Sk, dropout_p=case["dropout_p"],
                                                           seed=dropout_seed))
    exact = leaves(q, k, v)
    exact_o, exact_lse = naive_attention(*exact, attn_mask=mask, dropout_p=case["dropout_p"], keep=keep, **options)
    low = leaves(q, k, v)
    base_o, base_lse = naive_attention(*low, attn_mask=mask, dropout_p=case["dropout_p"], keep=keep, dtype=dtype,
                                       **options)
    check("o", o, base_o, exact_o, dtype)
    check("lse", lse, base_lse, exact_lse, torch.float32 if dtype != torch.float64 else dtype)
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(exact_lse)), "lse: -inf rows differ"
    exact_o.backward(dout.double())
    base_o.backward(dout)
    for name, got, base, ref in zip(("dq", "dk", "dv"), (fq, fk, fv), low, exact):
        check(name, got.grad, base.grad, ref.grad, dtype)


def run(cases: int, seed: int = 0, device: str = "cpu", only: int | None = None, progress: bool = False,
        shard: tuple[int, int] = (0, 1)) -> list:
    """Runs `cases` cases from `seed` (those with index % shard[1] == shard[0]); returns
    the failures as (index, case, message)."""
    rng = random.Random(seed)
    failures = []
    start = time.time()
    for index in range(cases):
        case = draw_case(rng, device)
        if (only is not None and index != only) or index % shard[1] != shard[0]:
            continue
        try:
            run_case(case, device)
        except AssertionError as error:
            failures.append((index, case, str(error)))
        except Exception as error:  # a crash of the library is a failure too
            failures.append((index, case, f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
        if progress and (index + 1) % 50 == 0:
            print(f"[{index + 1}/{cases}] {len(failures)} failed, {time.time() - start:.0f} s", file=sys.stderr,
                  flush=True)
        elif shard[1] > 1 and (index // shard[1] + 1) % 10 == 0:
            print(f"[shard {shard[0]}/{shard[1]}: case {index + 1} of {cases}] {len(failures)} failed, "
                  f"{time.time() - start:.0f} s", file=sys.stderr, flush=True)
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", type=int, default=None, help="run only case INDEX of the sweep")
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes that share the cases (each compiles its own kernels: on CUDA most of the time)")
    parser.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)  # I/N: the cases with index % N == I
    args = parser.parse_args()
    shard = tuple(int(x) for x in args.shard.split("/"))
    if args.jobs > 1:
        return run_jobs(args)
    torch.manual_seed(args.seed)
    commit = os.environ.get("FLASHJIT_COMMIT") or os.popen("git rev-parse --short HEAD 2>/dev/null").read().strip() or "unknown"
    print(f"# flashjit fuzz: {args.cases} cases, seed {args.seed}, device {args.device}\n\n"
          f"- date: {time.strftime('%Y-%m-%d')}\n- commit: {commit}\n- flashjit {flashjit.__version__}, "
          f"torch {torch.__version__}, {platform.machine()} {platform.processor() or ''}".rstrip() +
          f"\n- command: `python tests/python/fuzz.py --cases {args.cases} --seed {args.seed} "
          f"--device {args.device}`\n", flush=True)
    start = time.time()
    failures = run(args.cases, args.seed, args.device, args.only, progress=shard == (0, 1), shard=shard)
    for index, case, message in failures:
        print(f"case {index} (seed {args.seed}): {case}\n  {message}")
    ran = 1 if args.only is not None else len(range(shard[0], args.cases, shard[1]))
    print(f"fuzz: {ran} cases on {args.device}, seed {args.seed}: {len(failures)} mismatches "
          f"in {time.time() - start:.0f} s")
    return 1 if failures else 0


def run_jobs(args) -> int:
    """The sweep over args.jobs processes (--shard i/jobs each); their failures and one summary."""
    import subprocess

    start = time.time()
    base = [sys.executable, __file__, "--cases", str(args.cases), "--seed", str(args.seed), "--device", args.device]
    # The processes share the CPU: torch's own threads (the float64 references) divided among them.
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.jobs)))
    jobs = [subprocess.Popen(base + ["--shard", f"{i}/{args.jobs}"], stdout=subprocess.PIPE, text=True, env=env)
            for i in range(args.jobs)]
    outputs = [job.communicate()[0] for job in jobs]
    first = outputs[0].splitlines()
    end = next((i for i, line in enumerate(first) if line.startswith("- command:")), len(first) - 1)
    print("\n".join(first[:end + 1]).replace(f"--device {args.device}`", f"--device {args.device} --jobs {args.jobs}`"))
    mismatches, crashed = 0, 0
    for job, output in zip(jobs, outputs):
        lines = output.strip().splitlines()
        summary = lines[-1] if lines and lines[-1].startswith("fuzz:") else None
        if summary is None:
            crashed += 1
            print(f"a fuzz process ended without its summary (exit {job.returncode}):\n{output[-2000:]}")
            continue
        mismatches += int(summary.split(": ")[2].split()[0])
        end = next((i for i, line in enumerate(lines) if line.startswith("- command:")), 0)
        for line in lines[end + 1:-1]:
            if line.strip():
                print(line)
    print(f"fuzz: {args.cases} cases on {args.device}, seed {args.seed}, {args.jobs} processes: {mismatches} mismatches "
          f"in {time.time() - start:.0f} s")
    return 1 if mismatches or crashed else 0


if __name__ == "__main__":
    sys.exit(main())
