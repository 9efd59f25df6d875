"""Ring attention (flashjit.distributed.ring_attention): weak and strong scaling over ranks.

Each rank count in --ranks starts that many processes (gloo on CPU ranks, NCCL with a GPU a
rank), which time forward + backward of ring attention on their shards (causal, zigzag by
default; median of --repeats after a warm-up, the slowest rank's time). Weak scaling keeps
--tokens-per-rank on each rank, so P ranks hold P times the sequence and each does P times one
rank's work: efficiency = P * T(1 rank) / T(P ranks). Strong scaling splits --strong-tokens over
the ranks: efficiency = T(1 rank) / (P * T(P ranks)). "compute only" repeats the run with the
sends left out (each rank attends to its own shard P times: the same work, no transfers), so the
difference is the communication that the overlap did not hide.

    python bench/ring.py [--device cpu|cuda] [--ranks 1 2 4] [--tokens-per-rank 2048]
        [--strong-tokens 8192] [--heads 4] [--head-dim 64] [--dtype float32] [--out DIR]

CPU ranks share the machine's cores (each takes cores / P threads), so CPU figures show the
algorithm's overheads, not a cluster's scaling; the GPU run is the one the efficiency target is for.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpu_attention import save_record  # bench/ is the script's folder
from flashjit.bench.provenance import record_commit


def run_rank(rank, world, store, args, tokens, compute_only, results):
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # no NVLink multicast (the GPU machines' rule)
    if args.device == "cpu":
        os.environ["FLASHJIT_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    else:
        torch.cuda.set_device(rank)
    import flashjit.distributed as fd

    dist.init_process_group("gloo" if args.device == "cpu" else "nccl", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        device = "cuda" if args.device == "cuda" else "cpu"
        dtype = getattr(torch, args.dtype)
        local = tokens // world
        torch.manual_seed(rank)
        q, k, v, dout = (torch.randn(1, args.heads, local, args.head_dim, device=device, dtype=dtype)
                         for _ in range(4))
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        # Compute only: a group of this rank alone (every rank creates every such group, in order).
        group = [dist.new_group(ranks=[r]) for r in range(world)][rank] if compute_only else None
        steps = world if compute_only else 1

        def step():
            for _ in range(steps):  # compute only: the ring's P attentions, each over its own shard
                o = fd.ring_attention(q, k, v, group=group, causal=args.causal, layout=args.layout)
                o.backward(dout)
            if device == "cuda":
                torch.cuda.synchronize()

        step()
        samples = []
        for _ in range(args.repeats):
            dist.barrier()
            begin = time.perf_counter()
            step()
            samples.append((time.perf_counter() - begin) * 1e3)
        times = [torch.tensor([statistics.median(samples)]) for _ in range(world)]
        mine = torch.tensor([statistics.median(samples)])
        if device == "cuda":
            times, mine = [t.cuda() for t in times], mine.cuda()
        dist.all_gather(times, mine)
        if rank == 0:
            results.put(max(float(t) for t in times))
    finally:
        dist.destroy_process_group()


def measure(args, world, tokens, compute_only=False):
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(run_rank, args=(world, os.path.join(folder, "store"), args, tokens, compute_only, results),
                           nprocs=world, join=True, start_method="spawn")
    return results.get()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens-per-rank", type=int, default=2048)
    parser.add_argument("--strong-tokens", type=int, default=0, help="total tokens of the strong-scaling run (0: none)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    parser.add_argument("--no-causal", dest="causal", action="store_false")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="directory for the markdown record")
    args = parser.parse_args()
    for world in args.ranks:
        chunk = 2 * world if args.layout == "zigzag" else world
        if args.tokens_per_rank * world % chunk or (args.strong_tokens and args.strong_tokens % chunk):
            parser.error(f"--tokens-per-rank / --strong-tokens must split into {chunk} chunks for {world} ranks")

    rows = []
    base = None
    for world in args.ranks:
        t = measure(args, world, args.tokens_per_rank * world)
        t_compute = measure(args, world, args.tokens_per_rank * world, compute_only=True) if world > 1 else t
        base = base if base is not None else (t if world == 1 else None)
        efficiency = f"{base * world / t:.2f}" if base else "–"
        rows.append(("weak", world, args.tokens_per_rank * world, t, t_compute, efficiency))
        print(rows[-1], flush=True)
    if args.strong_tokens:
        base = None
        for world in args.ranks:
            t = measure(args, world, args.strong_tokens)
            t_compute = measure(args, world, args.strong_tokens, compute_only=True) if world > 1 else t
            base = base if base is not None else (t if world == 1 else None)
            efficiency = f"{base / (world * t):.2f}" if base else "–"
            rows.append(("strong", world, args.strong_tokens, t, t_compute, efficiency))
            print(rows[-1], flush=True)

    commit = record_commit()
    name = (torch.cuda.get_device_name() if args.device == "cuda"
            else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    command = "python bench/ring.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k not in ("out", "causal")) + ("" if args.causal else " --no-causal")
    lines = [f"# Ring attention: {name}", "", f"- date: {datetime.date.today().isoformat()}", f"- commit: {commit}",
             f"- command: `{command}`",
             f"- torch {torch.__version__}, {args.dtype}, {args.heads} heads, head dim {args.head_dim}, "
             f"{'causal' if args.causal else 'not causal'}, layout {args.layout}; forward + backward, median of "
             f"{args.repeats}, the slowest rank",
             "- compute only: the same attentions without the transfers (each rank's own shard); efficiency: weak "
             "P * T(1) / T(P), strong T(1) / (P * T(P))", "",
             "| scaling | ranks | tokens | fwd+bwd ms | compute only ms | efficiency |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {kind} | {world} | {tokens} | {t:.1f} | {tc:.1f} | {eff} |" for kind, world, tokens, t, tc, eff in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    save_record(args.out, "cpu" if args.device == "cpu" else "gpu", "ring", commit, text)


if __name__ == "__main__":
    main()
