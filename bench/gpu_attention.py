"""GPU benchmark of flashjit against the attention a Hopper user can pick instead.

Peers, measured in the same process: PyTorch SDPA with its cuDNN backend (what
torch runs by default on sm_90) and its flash backend, and FlashAttention-4's
sm_90 kernels (`flash_attn.cute.flash_attn_func`, plus `deterministic=True` for
the backward) where the `flash-attn-4` package imports.

Grid: bf16, B*N = 16k tokens, H = 2048 / D, D in {64, 128, 256}, N in {1k, 4k,
16k}, causal and not; plus GQA model shapes (32 query heads sharing 8 key/value
heads, D 128, causal, N 1k/4k/16k). Forward and backward TFLOP/s (docs/measurement.md
FLOP counts) and the ratios to cuDNN and FA4.

Timing: each sample is a run of calls back to back between two CUDA events (the
host enqueues ahead of the GPU, so the figure is the GPU's time per call; the
host's own time per call is bench/overhead.py's subject), median of samples
after warm-up, fresh random inputs per case. Also the peak extra memory of
forward+backward at B1 H16 N8192 D128 causal, and the kernel compile and disk-load times.

    python bench/gpu_attention.py --out bench/results
    python bench/gpu_attention.py --forward-only --tiles default n=160 "o=direct,q=1"

--tiles runs flashjit once per FLASHJIT_CUDA_TILES value ("default": unset),
each as a column of its own, to compare tile configurations in one process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashjit
from flashjit.bench import device_tag


def flops(batch, heads, seqlen, head_dim, causal, backward):
    forward = 4 * batch * heads * seqlen * seqlen * head_dim
    if causal:
        forward //= 2
    return forward * (2.5 if backward else 1.0)


def time_ms(fn, budget_ms=400.0, samples=7):
    """GPU milliseconds per call: median over samples, each a run of back-to-back calls."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    calls = int(min(50, max(2, budget_ms / samples / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(samples):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def fa4_function():
    """FlashAttention-4's entry point, or None where the package does not import."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as error:  # the package, the CuTe DSL or its libraries missing
        print(f"FA4 not measured: {type(error).__name__}: {error}", file=sys.stderr)
        return None
    return flash_attn_func


# The environment switches a flashjit column may set; a column leaves the others unset.
SWITCHES = ("FLASHJIT_CUDA_TILES", "FLASHJIT_CUDA_BACKWARD", "FLASHJIT_CUDA_ONE_PASS_DQ", "FLASHJIT_CUDA_DKDV",
            "FLASHJIT_CUDA_DKDV_PARTS", "FLASHJIT_CUDA_BACKWARD_OVERLAP", "FLASHJIT_CUDA_ONE_PASS_STEPS",
            "FLASHJIT_CUDA_ONE_PASS_SUMS_MIB")


class Impl:
    """One implementation: its inputs' layout, a forward, and (flashjit's columns) the
    switches it runs with."""

    def __init__(self, name, forward, layout="bhsd", env=None):
        self.name, self.forward, self.layout, self.env = name, forward, layout, env or {}
        # A switch outside SWITCHES would never be set (and a column would silently measure the default).
        unknown = sorted(set(self.env) - set(SWITCHES))
        if unknown:
            raise ValueError(f"column {name}: environment switches {unknown} are not in SWITCHES")

    def __enter__(self):
        self.saved = {key: os.environ.get(key) for key in SWITCHES}
        if self.name.startswith("flashjit"):
            for key in SWITCHES:
                if key in self.env:
                    os.environ[key] = self.env[key]
                else:
                    os.environ.pop(key, None)
        return self

    def __exit__(self, *exc):
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def implementations(tiles, fa4=None, backward_modes=(), nondeterministic=False):
    def flashjit_sdpa(q, k, v, causal):
        return flashjit.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])

    def torch_backend(backend):
        def run(q, k, v, causal):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])
        return run

    impls = []
    for setting in tiles:
        name = "flashjit" if setting == "default" else f"flashjit[{setting}]"
        impls.append(Impl(name, flashjit_sdpa, env={} if setting == "default" else {"FLASHJIT_CUDA_TILES": setting}))
    for mode in backward_modes:
        # one-pass:none / one-pass:unordered (FLASHJIT_CUDA_ONE_PASS_DQ): timing only, no dQ written;
        # one-pass:eager: the ordered sums, each count released at once (a real backward);
        # one-pass:arrival: the sums in the order the blocks reach each tile (a real backward);
        # one-pass:writer, one-pass:writer-arrival, one-pass:writer-eager: the block order's and the
        # arrival order's sums made by the dQ writer's bulk copies from shared memory (writer-eager:
        # the block order, each count released before the next tile's wait; writer-groups: the block
        # order's visitors of a tile summing in four groups by rank, added after the pass; writer-pair: the
        # block order by two writer threads on alternate tiles, each count released once its copies
        # are complete; writer-diagonal: the same with tiles walked upward and the visitors adding
        # from the highest block down) (real backwards);
        # one-pass:atomic: every visitor adds at once, in no order (a real backward, not deterministic);
        # one-pass:whole, one-pass:<sums>+whole: FLASHJIT_CUDA_ONE_PASS_STEPS=whole (head dim 128 in
        # steps of 64 queries, each step's products in two turns of its own); one-pass:whole-concurrent,
        # one-pass:<sums>+whole-concurrent: the same steps with no turns between the consumers;
        # one-pass:budget, one-pass:<...>+budget: FLASHJIT_CUDA_ONE_PASS_SUMS_MIB=32 (the one pass
        # over parts of the heads whose dQ sums are at most 32 MiB each);
        # split:shared / split:registers: the split backward with FLASHJIT_CUDA_DKDV set so
        # (shared is the default); split:parts: with FLASHJIT_CUDA_DKDV_PARTS=auto (a GQA group's
        # query heads over several dK/dV blocks where the grid is small; the default), split:no-parts
        # with it off; split:overlap: FLASHJIT_CUDA_BACKWARD_OVERLAP=1 (the dK/dV kernel launched
        # while the dQ kernel runs), split:no-overlap with it 0 (the default, auto, overlaps where
        # the dQ grid is small).
        backward, _, option = mode.partition(":")
        env = {"FLASHJIT_CUDA_BACKWARD": backward}
        if option == "budget" or option.endswith("+budget"):
            env["FLASHJIT_CUDA_ONE_PASS_SUMS_MIB"] = "32"
            option = option.removesuffix("budget").removesuffix("+")
        for steps in ("whole-concurrent", "whole"):
            if option == steps or option.endswith("+" + steps):
                env["FLASHJIT_CUDA_ONE_PASS_STEPS"] = steps
                option = option.removesuffix(steps).removesuffix("+")
                break
        if option in ("parts", "no-parts"):
            env["FLASHJIT_CUDA_DKDV_PARTS"] = "auto" if option == "parts" else "off"
        elif option in ("overlap", "no-overlap"):
            env["FLASHJIT_CUDA_BACKWARD_OVERLAP"] = "1" if option == "overlap" else "0"
        elif option:
            env["FLASHJIT_CUDA_DKDV" if backward == "split" else "FLASHJIT_CUDA_ONE_PASS_DQ"] = option
        impls.append(Impl(f"flashjit[{mode}]", flashjit_sdpa, env=env))
    if nondeterministic:  # flashjit.attention(..., deterministic=False): dQ summed in no fixed order where faster
        impls.append(Impl("flashjit nondet", lambda q, k, v, causal: flashjit.attention(q, k, v, causal=causal,
                                                                                        deterministic=False)))
    impls += [Impl("cuDNN", torch_backend(SDPBackend.CUDNN_ATTENTION)),
              Impl("torch-flash", torch_backend(SDPBackend.FLASH_ATTENTION))]
    if fa4 is not None:
        impls.append(Impl("FA4", lambda q, k, v, causal: fa4(q, k, v, causal=causal)[0], layout="bshd"))
        impls.append(Impl("FA4 det", lambda q, k, v, causal: fa4(q, k, v, causal=causal, deterministic=True)[0],
                          layout="bshd"))
    return impls


DTYPE = torch.bfloat16  # --dtype


def measure(impl, batch, heads_q, heads_kv, seqlen, head_dim, causal, forward_only=False, backward=True):
    """(forward ms, backward ms); NaN for what is not measured."""
    def make(heads):
        shape = (batch, seqlen, heads, head_dim) if impl.layout == "bshd" else (batch, heads, seqlen, head_dim)
        return torch.randn(shape, device="cuda", dtype=DTYPE, requires_grad=True)

    q, k, v = make(heads_q), make(heads_kv), make(heads_kv)
    with impl:
        forward_ms = float("nan")
        if impl.name != "FA4 det":  # the same forward as FA4's
            forward_ms = time_ms(lambda: impl.forward(q, k, v, causal))
        if forward_only or not backward:
            return forward_ms, float("nan")
        out = impl.forward(q, k, v, causal)
        grad = torch.randn_like(out)
        backward_ms = time_ms(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True))
    return forward_ms, backward_ms


def cases(quick, only_head_dims=None, only_seqlens=None):
    """(label, batch, heads_q, heads_kv, seqlen, head_dim, causal) of the grid; only_head_dims
    and only_seqlens keep those head dims and lengths (the GQA rows are head dim 128)."""
    head_dims = (128,) if quick else (64, 128, 256)
    if only_head_dims:
        head_dims = tuple(d for d in head_dims if d in only_head_dims)
    seqlens = (1024, 4096) if quick else (1024, 4096, 16384)
    if only_seqlens:
        seqlens = tuple(n for n in seqlens if n in only_seqlens)
    grid = []
    for head_dim in head_dims:
        for seqlen in seqlens:
            for causal in (False, True):
                heads = 2048 // head_dim
                grid.append((str(head_dim), 16384 // seqlen, heads, heads, seqlen, head_dim, causal))
    for seqlen in seqlens if 128 in head_dims else ():
        grid.append(("GQA 32/8, 128", 16384 // seqlen, 32, 8, seqlen, 128, True))
    return grid


def shape_case(parser, text):
    """A --shapes problem, B:HQ:HKV:N:D[:causal], as cases() gives its rows."""
    parts = text.split(":")
    try:
        batch, heads_q, heads_kv, seqlen, head_dim = (int(x) for x in parts[:5])
    except ValueError:
        parser.error(f"--shapes: expected B:HQ:HKV:N:D[:causal], got {text!r}")
    if len(parts) not in (5, 6) or (len(parts) == 6 and parts[5] != "causal") or heads_q % heads_kv:
        parser.error(f"--shapes: expected B:HQ:HKV:N:D[:causal] with HQ a multiple of HKV, got {text!r}")
    return (f"B{batch} {heads_q}/{heads_kv}, {head_dim}", batch, heads_q, heads_kv, seqlen, head_dim,
            len(parts) == 6)


def ratio(a, b):
    return f"{a / b:.2f}" if a == a and b == b and b > 0 else "–"


def table(rows, names, forward_only):
    """Markdown: TFLOP/s of every implementation, then flashjit's ratios to cuDNN and FA4."""
    passes = ("fwd",) if forward_only else ("fwd", "bwd")
    header = ["D", "N", "causal"] + [f"{name} {pas}" for pas in passes for name in names]
    variants = [name for name in names if name.startswith("flashjit[")]
    for pas in passes:
        header += [f"{pas} vs cuDNN", f"{pas} vs FA4"] + [f"{name} {pas} vs cuDNN" for name in variants]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["D"], str(row["N"]), "yes" if row["causal"] else "no"]
        for index, pas in enumerate(passes):
            for name in names:
                value = row["tflops"].get(name, (float("nan"),) * 2)[index]
                cells.append(f"{value:.0f}" if value == value else "–")
        for index, pas in enumerate(passes):
            ours = row["tflops"].get("flashjit", (float("nan"),) * 2)[index]
            cudnn = row["tflops"].get("cuDNN", (float("nan"),) * 2)[index]
            fa4 = row["tflops"].get("FA4", (float("nan"),) * 2)[index]
            cells += [ratio(ours, cudnn), ratio(ours, fa4)]
            cells += [ratio(row["tflops"].get(name, (float("nan"),) * 2)[index], cudnn) for name in variants]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def tile_cost(ratio_short_long: float, steps_short: float, steps_long: float) -> float:
    """x = T0 / Ts of a model where a work tile of s key steps takes T0 + s * Ts, from TFLOP/s at a
    short length over a long one with the same number of work tiles (no tail enters):
    r = [s1 / (x + s1)] / [s2 / (x + s2)]; nan where the ratio leaves the model's range."""
    r, s1, s2 = ratio_short_long, steps_short, steps_long
    denominator = r * s2 - s1
    if not (r == r) or denominator <= 0:
        return float("nan")
    x = s1 * s2 * (1 - r) / denominator
    return x if x >= 0 else float("nan")


def tile_cost_lines(rows, names) -> list:
    """Markdown: each implementation's fixed cost of a work tile in key steps (tile_cost), from the
    forward's N 1k and 16k rows of each head dim and mask (B*N fixed, so both have the same number
    of work tiles; 128-row tiles of 128-key steps assumed: 8 and 128 steps a tile, 4.5 and 64.5
    causal). Empty where the run has no such pair."""
    by_key = {(row["D"], row["causal"], row["N"]): row for row in rows}
    out = []
    for (label, causal, seqlen), short in by_key.items():
        long = by_key.get((label, causal, 16384))
        if seqlen != 1024 or long is None:
            continue
        steps = (4.5, 64.5) if causal else (8.0, 128.0)
        cells = []
        for name in names:
            a = short["tflops"].get(name, (float("nan"),))[0]
            b = long["tflops"].get(name, (float("nan"),))[0]
            x = tile_cost(a / b if b == b and b > 0 else float("nan"), *steps)
            cells.append(f"{x:.2f}" if x == x else "–")
        out.append(f"| {label} | {'yes' if causal else 'no'} | " + " | ".join(cells) + " |")
    if not out:
        return []
    return (["", "A work tile's fixed cost in key steps (T0/Ts of a model where a tile of s steps takes "
             "T0 + s Ts, from the forward's N 1k over N 16k TFLOP/s; 128-row tiles of 128-key steps "
             "assumed):", "", "| D | causal | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
            + out)


def peak_memory_mib(impl):
    """Peak extra memory of a forward+backward: torch's allocator's peak above the inputs, and for
    flashjit the backward's scratch from its own pool, which torch does not count (the size the
    call reports through prepare)."""
    shape = (1, 16, 8192, 128)
    q, k, v = (torch.randn(shape, device="cuda", dtype=DTYPE, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=DTYPE)
    pool_bytes = 0
    with impl:
        impl.forward(q, k, v, True).backward(grad)  # warm-up: compile, workspaces
        q.grad = k.grad = v.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = impl.forward(q, k, v, True)
        torch.cuda.synchronize()
        after_forward = (torch.cuda.memory_allocated() - base, torch.cuda.max_memory_allocated() - base)
        out.backward(grad)
        del out
        torch.cuda.synchronize()
        # Where the peak arises (the log, not the record): what the forward left and its peak, then the whole.
        # The peak before the workspace query below, whose own buffers (three gradient-sized ones
        # beside the held gradients) raised it by 64 MiB at this shape until 2026-12-06.
        peak = torch.cuda.max_memory_allocated() - base
        print(f"{impl.name} memory MiB: after the forward {after_forward[0] / 2**20:.1f} (peak "
              f"{after_forward[1] / 2**20:.1f}), peak of forward+backward {peak / 2**20:.1f}", file=sys.stderr)
        if impl.name.startswith("flashjit"):
            from flashjit import _C

            x = q.detach()
            lse = torch.empty(shape[:3], device="cuda")
            # (the unordered backward's workspace for the deterministic=False column)
            unordered = {"nondeterministic": True} if impl.name == "flashjit nondet" else {}
            pool_bytes = _C.backward(x, x, x, x, lse, x, *(torch.empty_like(x) for _ in range(3)), prepare=True,
                                     mask=None, scale=None, softcap=0.0, causal=1, window_left=-1, window_right=0,
                                     dropout_p=0.0, seed=0, offset=0, num_threads=0,
                                     stream=torch.cuda.current_stream().cuda_stream, **unordered)
    return (peak + pool_bytes) / 2**20


def bitwise_repeatable(impl, causal):
    """Whether two backward passes on the same inputs (B1 H16 N4096 D128) give equal bits."""
    shape = (1, 4096, 16, 128) if impl.layout == "bshd" else (1, 16, 4096, 128)
    q, k, v = (torch.randn(shape, device="cuda", dtype=DTYPE, requires_grad=True) for _ in range(3))
    with impl:
        out = impl.forward(q, k, v, causal)
        grad = torch.randn_like(out)
        first = torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
        second = torch.autograd.grad(out, (q, k, v), grad)
    return all(torch.equal(a, b) for a, b in zip(first, second))


def compile_times():
    """Cold compile of one kernel in a fresh cache, then a load from that warm disk cache."""
    code = ("import flashjit, json; from flashjit.cuda import KernelConfig as K; "
            "flashjit.precompile([K(dtype='bfloat16', head_dim=128)]); "
            "stats = flashjit.cuda.cache_stats(); "
            "assert stats['compiles'] + stats['disk_loads'] == 1, stats; "
            "print(json.dumps(stats))")
    with tempfile.TemporaryDirectory() as directory:
        # The hand-set kernel alone (precompile also compiles a class's tuned or built-in choices).
        env = dict(os.environ, FLASHJIT_CACHE_DIR=directory, FLASHJIT_CUDA_TILES="softmax=fast")
        cold = json.loads(subprocess.check_output([sys.executable, "-c", code], env=env, text=True))
        warm = json.loads(subprocess.check_output([sys.executable, "-c", code], env=env, text=True))
    assert cold["compiles"] == 1 and warm["disk_loads"] == 1, (cold, warm)
    return cold["last_compile_seconds"], warm["last_disk_load_seconds"]


def shown_arguments(argv):
    """The command line for the record, less the output folder."""
    shown, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--out="):
            skip = False
            continue
        if arg == "--out":
            skip = True
            continue
        shown.append(arg)
    return "".join(" " + arg for arg in shown)


from flashjit.bench.provenance import record_commit  # noqa: E402,F401  (the bench scripts import it from here)


def record_text(title, script, commit, facts, header, rows, align=None):
    """A record: title, date, commit, the command (`python bench/<script>` and this run's
    arguments, less --out), one line a fact, then the table (align: one of "l", "r" a column)."""
    align = align or "l" * len(header)
    lines = [f"# {title}", "", f"- date: {datetime.date.today()}", f"- commit: {commit}",
             f"- command: `python bench/{script}{shown_arguments(sys.argv[1:])}`", *[f"- {fact}" for fact in facts], "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def save_record(out, tag, kind, commit, text, label=""):
    """Writes out/<tag>-<kind>-<date>-<commit>[-label].md."""
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    suffix = f"-{label}" if label else ""
    path = os.path.join(out, f"{tag}-{kind}-{datetime.date.today()}-{commit}{suffix}.md")
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


def _diagnostic(impl) -> bool:
    """Whether impl is a timing diagnostic of the one pass that writes no dQ."""
    return impl.env.get("FLASHJIT_CUDA_ONE_PASS_DQ") in ("none", "unordered")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="directory for the markdown record")
    parser.add_argument("--quick", action="store_true", help="D=128, N=1k and 4k only")
    parser.add_argument("--head-dims", type=int, nargs="+", choices=(64, 128, 256), default=None,
                        help="only these head dims of the grid (default: all)")
    parser.add_argument("--seqlens", type=int, nargs="+", choices=(1024, 4096, 16384), default=None,
                        help="only these sequence lengths of the grid (default: all)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every implementation this many times a case, in rotating order, and report "
                             "the median (an A/B of two tile settings then does not depend on which ran first)")
    parser.add_argument("--forward-only", action="store_true",
                        help="time the forward alone (no backward, memory or compile figures)")
    parser.add_argument("--tiles", nargs="+", default=["default"],
                        help="FLASHJIT_CUDA_TILES values to run flashjit with, each a column ('default': unset)")
    parser.add_argument("--backward-modes", nargs="+", default=[],
                        choices=["split", "one-pass", "one-pass:none", "one-pass:unordered", "one-pass:eager",
                                 "one-pass:arrival", "one-pass:writer", "one-pass:writer-arrival",
                                 "one-pass:writer-eager", "one-pass:writer-groups", "one-pass:atomic", "one-pass:writer-pair",
                                 "one-pass:writer-diagonal", "one-pass:whole", "one-pass:writer-diagonal+whole",
                                 "one-pass:writer+whole", "one-pass:atomic+whole", "one-pass:whole-concurrent",
                                 "one-pass:atomic+whole-concurrent", "one-pass:budget",
                                 "one-pass:whole+budget", "one-pass:writer-diagonal+budget",
                                 "split:shared", "split:registers", "split:parts", "split:no-parts", "split:overlap",
                                 "split:no-overlap"],
                        help="FLASHJIT_CUDA_BACKWARD values to run flashjit with, each a column of its own "
                             "(the default column runs with it unset); one-pass:none, one-pass:unordered, "
                             "one-pass:eager, one-pass:arrival, one-pass:writer, one-pass:writer-arrival and "
                             "one-pass:writer-eager, one-pass:writer-groups, one-pass:atomic, one-pass:writer-pair and "
                             "one-pass:writer-diagonal also set "
                             "FLASHJIT_CUDA_ONE_PASS_DQ (the first "
                             "two a timing diagnostic whose dQ is not written); one-pass:whole and a '+whole' "
                             "suffix set FLASHJIT_CUDA_ONE_PASS_STEPS=whole (and whole-concurrent so); one-pass:budget and a '+budget' suffix "
                             "FLASHJIT_CUDA_ONE_PASS_SUMS_MIB=32")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="B:HQ:HKV:N:D[:causal]",
                        help="these problems instead of the grid, e.g. 1:32:4:2048:64:causal (a LoRA step of "
                             "TinyLlama at batch 1)")
    parser.add_argument("--no-fa4", action="store_true", help="leave FlashAttention-4 out even if it imports")
    parser.add_argument("--nondeterministic", action="store_true",
                        help="add a column 'flashjit nondet': flashjit.attention(..., deterministic=False)")
    parser.add_argument("--label", default="", help="a tag for the record's file name and title")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16",
                        help="the inputs' dtype (default bfloat16)")
    parser.add_argument("--render", metavar="LOG",
                        help="print the table of a run's JSON rows (its log) instead of measuring: for a run that "
                        "ended before its record was written")
    args = parser.parse_args()
    if args.render:
        with open(args.render) as log:
            rows = [json.loads(line) for line in log if line.startswith("{")]
        names = list(dict.fromkeys(name for row in rows for name in row["tflops"]))
        print("\n".join(table(rows, names, args.forward_only)))
        return
    global DTYPE
    DTYPE = getattr(torch, args.dtype)
    torch.manual_seed(0)
    impls = implementations(args.tiles, None if args.no_fa4 else fa4_function(), args.backward_modes,
                            args.nondeterministic)
    rows = []
    problems = (cases(args.quick, args.head_dims, args.seqlens) if args.shapes is None
                else [shape_case(parser, text) for text in args.shapes])
    for label, batch, heads_q, heads_kv, seqlen, head_dim, causal in problems:
        row = {"D": label, "N": seqlen, "causal": causal, "tflops": {}}
        rounds = {}  # name -> [(forward, backward) TFLOP/s of each round]
        failed = set()
        for round_index in range(max(1, args.rounds)):
            shift = round_index % len(impls)
            for impl in impls[shift:] + impls[:shift]:
                if impl.name in failed:
                    continue
                try:
                    forward_ms, backward_ms = measure(impl, batch, heads_q, heads_kv, seqlen, head_dim, causal,
                                                      args.forward_only)
                except Exception as error:  # a peer that does not take this case
                    print(f"{impl.name} D{head_dim} N{seqlen} causal={causal}: {type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}", file=sys.stderr)
                    failed.add(impl.name)
                    continue
                rounds.setdefault(impl.name, []).append(
                    (flops(batch, heads_q, seqlen, head_dim, causal, False) / forward_ms / 1e9,
                     flops(batch, heads_q, seqlen, head_dim, causal, True) / backward_ms / 1e9))
        for name, values in rounds.items():
            row["tflops"][name] = tuple(statistics.median(v[i] for v in values) for i in range(2))
            if len(values) > 1:
                row.setdefault("rounds", {})[name] = [round(v[0], 1) for v in values]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items()}, default=lambda x: round(x, 1)), flush=True)
    # The timing diagnostics (FLASHJIT_CUDA_ONE_PASS_DQ none / unordered) write no dQ: no memory or
    # repeatability figures.
    plain = [impl for impl in impls if (impl.name in ("flashjit", "flashjit nondet", "cuDNN", "torch-flash")
                                        or impl.env.get("FLASHJIT_CUDA_BACKWARD"))
             and not _diagnostic(impl)]
    memory = {} if args.forward_only else {impl.name: peak_memory_mib(impl) for impl in plain}
    repeatable = {}
    if not args.forward_only:
        for impl in impls:
            if _diagnostic(impl):
                continue
            try:
                repeatable[impl.name] = {causal: bitwise_repeatable(impl, causal) for causal in (False, True)}
            except Exception as error:
                print(f"{impl.name} determinism check: {type(error).__name__}: {error}", file=sys.stderr)
    cold, warm = (None, None) if args.forward_only else compile_times()

    commit = record_commit()
    names = [impl.name for impl in impls]
    tiles_env = os.environ.get("FLASHJIT_CUDA_TILES")
    lines = [f"# GPU attention benchmark: {torch.cuda.get_device_name()}", "",
             f"- date: {datetime.date.today()}", f"- commit: {commit}",
             f"- command: `{'FLASHJIT_CUDA_TILES=' + tiles_env + ' ' if tiles_env else ''}"
             f"python bench/gpu_attention.py{shown_arguments(sys.argv[1:])}`",
             f"- torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, flashjit {flashjit.__version__}, "
             f"NVRTC {'.'.join(map(str, flashjit.cuda.nvrtc_version()))}"
             + ("" if "FA4" not in names else f", flash-attn-4 {fa4_version()}"),
             f"- {'bf16' if DTYPE == torch.bfloat16 else 'fp16'}, "
             + ("B*N = 16384, H = 2048 / D (GQA: 32 query heads, 8 key/value heads)" if args.shapes is None
                else "the problems given (B, query/key-value heads, head dim in the first column)")
             + "; TFLOP/s "
             "(backward 2.5x the forward's FLOPs); GPU time per call of back-to-back calls (CUDA events), median"
             + (f"; each the median of {args.rounds} rounds with the implementations in rotating order (every "
                "round's forward figure in the run's log)" if args.rounds > 1 else ""),
             ""] + table(rows, names, args.forward_only) + tile_cost_lines(rows, names)
    if not args.forward_only:
        lines += ["", f"Peak extra memory of forward+backward, B1 H16 N8192 D128 causal {args.dtype} (MiB; flashjit's with "
                  "its pool scratch): " +
                  ", ".join(f"{name} {value:.0f}" for name, value in memory.items()), "",
                  f"Kernel compile (cold, bf16 D128 forward): {cold:.2f} s; load from a warm disk cache: "
                  f"{warm * 1e3:.1f} ms", "",
                  "Backward bitwise equal over two passes on the same inputs (B1 H16 N4096 D128; non-causal, "
                  "causal): " + ", ".join(f"{name} {'/'.join('yes' if same else 'no' for same in by.values())}"
                                          for name, by in repeatable.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    label = "-".join(x for x in (args.label, "fp16" if args.dtype == "float16" else "") if x)
    save_record(args.out, device_tag({"device": "cuda", "gpu": torch.cuda.get_device_name()}), "attention", commit,
                text, label)


def fa4_version():
    try:
        from importlib.metadata import version
        return version("flash-attn-4")
    except Exception:
        return "?"


if __name__ == "__main__":
    main()
