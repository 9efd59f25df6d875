"""Host overhead per call of each torch entry point on tiny problems, where the
kernel is cheap and the Python/dispatcher path dominates.

    python bench/overhead.py [--out bench/results]      (writes cpu-overhead-<date>-<commit>.md)
    python bench/overhead.py --device cuda [--out ...]  (bf16 on the GPU: <gpu>-overhead-<date>-<commit>.md)
    --profile STEPS: also where a forward+backward step's time goes (torch.profiler), flashjit against torch
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import flashjit
from flashjit import _C, ops
from flashjit.bench import device_tag


def per_call_us(fns: dict, calls: int, repeats: int = 15, sync=lambda: None) -> dict:
    """Each function's median over repeats of the mean time of `calls` back-to-back calls (on a
    GPU, kernels this small finish before the host issues the next call). The functions take
    turns in every round, so that a change of the machine's load falls on all of them alike."""
    for fn in fns.values():
        for _ in range(max(10, calls // 10)):
            fn()
    sync()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(times) for name, times in samples.items()}


class _Twice(torch.autograd.Function):
    """q * 2 with its backward in Python: the cost of an autograd rule written in Python."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


def python_rule(f):
    """f with flashjit's planned calls taking the autograd rule in Python (the one used where
    flashjit._torch_ops, the rule in C++, is not built); the switch costs well under a µs."""
    def call(*args):
        native = ops._native_attention
        ops._native_attention = None
        try:
            return f(*args)
        finally:
            ops._native_attention = native
    return call


def entry_points(q, k, v):
    """(name, forward-only callable, forward+backward callable or None)."""
    o = torch.empty(*q.shape[:3], v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], device=q.device)
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
    dout = torch.randn(*q.shape[:3], v.shape[3], dtype=q.dtype, device=q.device)
    stream = ops._stream(q)

    def train(f):
        def step():
            out = f(qg, kg, vg)
            torch.autograd.backward(out, dout)
        return step

    op = torch.ops.flashjit.fwd
    native = ops._native_attention
    routed = flashjit.sdpa._routed
    buffers = (q, k, v, o, lse)  # _C reads these torch tensors in place

    def kernel_alone():
        _C.forward(*buffers, None, None, 0.0, 0, -1, -1, 0.0, 0, 0, 0, stream)

    def validation_alone():
        _C.forward(*buffers, None, None, 0.0, 0, -1, -1, 0.0, 0, 0, 0, stream, check_only=True)

    def planning_alone():
        _C.forward(*buffers, None, None, 0.0, 0, -1, -1, 0.0, 0, 0, 0, stream, prepare=True)

    def outputs_alone():
        return q.new_empty(o.shape), q.new_empty(lse.shape, dtype=lse.dtype)

    # The backward's parts on the same tensors: o and lse from a forward, dq, dk, dv preallocated.
    _C.forward(*buffers, None, None, 0.0, 0, -1, -1, 0.0, 0, 0, 0, stream)
    grads = (dout, torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    backward_buffers = buffers + grads  # q, k, v, o, lse, dout, dq, dk, dv

    def backward_validation():
        _C.backward(*backward_buffers, None, None, 0.0, 0, -1, -1, 0.0, 0, 0, 0, stream,
                    check_only=True)

    def backward_planning():
        _C.backward(*backward_buffers, None, None, 0.0, 0, -1, -1, 0.0, 0, 0, 0, stream, prepare=True)

    def backward_alone():
        _C.backward(*backward_buffers, None, None, 0.0, 0, -1, -1, 0.0, 0, 0, 0, stream)

    def gradients_alone():
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    compiled = []
    if not q.is_cuda:  # on a GPU this entry would need a Triton toolchain; the others measure the host path
        compiled_sdpa = torch.compile(flashjit.scaled_dot_product_attention, fullgraph=True, dynamic=False)
        compiled = [("torch.compile(flashjit SDPA)", lambda: compiled_sdpa(q, k, v), train(compiled_sdpa))]
    return [
        # The parts of a call, for where its host time goes: the C API's validation, its
        # choice of kernels as fj_attention_prepare_forward makes it (for a graph: no split, no
        # counter; encoding and loading, nothing enqueued), and the outputs' allocation.
        ("parts: _C validation alone (check_only)", validation_alone, None),
        ("parts: _C planning alone (prepare, nothing enqueued)", planning_alone, None),
        ("parts: the two outputs' allocation", outputs_alone, None),
        ("kernel alone: _C call, outputs preallocated", kernel_alone, None),
        # The backward's (forward column: one _C.backward call, or the three gradients' allocation).
        ("backward parts: _C validation alone (check_only)", backward_validation, None),
        ("backward parts: _C planning alone (prepare, nothing enqueued)", backward_planning, None),
        ("backward parts: the three gradients' allocation", gradients_alone, None),
        ("backward kernels alone: _C call, gradients preallocated", backward_alone, None),
        ("flashjit.attention (eager path)", lambda: flashjit.attention(q, k, v), train(flashjit.attention)),
        ("torch.ops.flashjit.fwd (custom op)", lambda: op(q, k, v, None, None, 0.0, 0, -1, -1, 0.0, None, 0),
         train(lambda q, k, v: op(q, k, v, None, None, 0.0, 0, -1, -1, 0.0, None, 0)[0])),
        ("flashjit.scaled_dot_product_attention", lambda: flashjit.scaled_dot_product_attention(q, k, v),
         train(flashjit.scaled_dot_product_attention)),
    ] + ([
        ("flashjit.scaled_dot_product_attention, autograd rule in Python", None,
         train(python_rule(flashjit.scaled_dot_product_attention))),
        # The C++ operator the autograd rule is (its outputs allocated by each call, tensors read
        # in C++), called straight from Python.
        ("torch.ops.flashjit.eager_attention (C++ op)", lambda: native(q, k, v, None, None, 0.0, 0, -1, -1, 0.0, None, 0, True),
         train(lambda q, k, v: native(q, k, v, None, None, 0.0, 0, -1, -1, 0.0, None, 0, True)[0])),
    ] if ops.native_available() else []) + [
        # What F.scaled_dot_product_attention is while flashjit.patch_sdpa() holds.
        ("torch's F.sdpa under flashjit.patch_sdpa()", lambda: routed(q, k, v), train(routed)),
    ] + compiled + [
        ("torch F.scaled_dot_product_attention", lambda: F.scaled_dot_product_attention(q, k, v),
         train(F.scaled_dot_product_attention)),
        # What any autograd rule written in Python costs beside a native one (flashjit's is one):
        # one elementwise op, as a native op and inside a torch.autograd.Function.
        ("reference: q * 2 (a native op)", lambda: q * 2, train(lambda q, k, v: q * 2)),
        ("reference: q * 2 in a Python autograd.Function", lambda: _Twice.apply(q),
         train(lambda q, k, v: _Twice.apply(q))),
    ]


def device_us(event) -> float:
    """A profiler event's device time in µs over the whole profile (the attribute's name changed
    across torch versions)."""
    total = getattr(event, "self_device_time_total", None)
    return getattr(event, "self_cuda_time_total", 0.0) if total is None else total


def split_events(events) -> tuple:
    """(host ops, the device's own events: kernels and copies) of prof.key_averages(). A host op's
    device time is that of the kernels it launched, which appear again as events of their own, and
    record_function's ranges have device copies (user annotations, left out): totals over the
    device events count each kernel once."""
    from torch.autograd import DeviceType

    ops = [e for e in events if getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU]
    kernels = [e for e in events if getattr(e, "device_type", DeviceType.CPU) != DeviceType.CPU
               and not getattr(e, "is_user_annotation", False)]
    return ops, kernels


def profile_step(step, steps: int, cuda: bool, top: int = 14) -> list:
    """Where one forward+backward step's time goes: torch.profiler over `steps` steps (after a
    warm-up), each op's self time on the host and on the device per step, the `top` ops by host
    time, and the step's wall time (the steps back to back, synchronised at the end)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(20):
        step()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall = (time.perf_counter() - start) / steps * 1e6
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    ops, kernels = split_events(prof.key_averages())

    def step_us(event):
        return device_us(event) / steps

    host_total = sum(e.self_cpu_time_total for e in ops) / steps
    device_total = sum(step_us(e) for e in kernels)
    lines = [f"wall {wall:.1f} µs a step unprofiled; profiled: host self time {host_total:.1f} µs, device "
             f"{device_total:.1f} µs a step", "",
             "| op (host) | calls a step | host self µs a step | device µs a step of its kernels |",
             "|---|---:|---:|---:|"]
    lines += [f"| `{e.key[:70]}` | {e.count / steps:.1f} | {e.self_cpu_time_total / steps:.1f} | "
              f"{step_us(e):.1f} |" for e in sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]]
    if kernels:
        lines += ["", "| device kernel or copy | calls a step | device µs a step |", "|---|---:|---:|"]
        lines += [f"| `{e.key[:70]}` | {e.count / steps:.1f} | {step_us(e):.1f} |"
                  for e in sorted(kernels, key=step_us, reverse=True)[:top]]
    return lines


def commit() -> str:
    from flashjit.bench.provenance import record_commit

    return record_commit()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for the markdown result (default: print only)")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--only", nargs="+", metavar="TEXT",
                        help="only the entry points whose name contains one of these texts")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile STEPS forward+backward steps of flashjit's and torch's SDPA on the "
                             "first problem (torch.profiler: each op's host and device time a step)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    shapes = {"B1 H1 S16 D64": (1, 1, 16, 64), "decode B1 H8 Sq1 Sk128 D128": (1, 8, 1, 128)}
    rows = []
    for label, (b, h, s, d) in shapes.items():
        torch.manual_seed(0)
        sk = 128 if s == 1 else s
        q, k, v = (torch.randn(b, h, n, d, dtype=dtype, device=args.device) for n in (s, sk, sk))
        entries = [e for e in entry_points(q, k, v) if not args.only or any(text in e[0] for text in args.only)]
        with torch.no_grad():
            forward = per_call_us({name: fwd for name, fwd, _ in entries if fwd}, args.calls, sync=sync)
        train = per_call_us({name: step for name, _, step in entries if step}, args.calls // 2, sync=sync)
        for name, _, _ in entries:
            fwd_us, train_us = forward.get(name, float("nan")), train.get(name, float("nan"))
            rows.append((label, name, fwd_us, train_us))
            print(f"{label:28} {name:42} fwd {fwd_us:8.1f} us   fwd+bwd {train_us:8.1f} us", flush=True)
    lines = [
        f"# Host overhead per call ({torch.cuda.get_device_name() + ', bf16' if cuda else 'CPU'})",
        "",
        f"- date: {datetime.date.today()}, commit: {commit()}, flashjit {flashjit.__version__}, torch {torch.__version__}",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}",
        f"- command: `python bench/overhead.py{' --device cuda' if cuda else ''}"
        f"{' --only ' + ' '.join(args.only) if args.only else ''}{' --out ' + args.out if args.out else ''}`",
        "- forward under torch.no_grad(); forward+backward with q, k, v requiring grad and autograd.backward;",
        f"  median of 15 runs of {args.calls} back-to-back calls (forward+backward: half as many), the entry",
        "  points taking turns in each round.",
        "",
        "| problem | entry point | forward µs/call | forward+backward µs/call |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {label} | {name} | {f:.1f} | {t:.1f} |" for label, name, f, t in rows]
    lines += ["", "Rows \"backward parts\" and \"backward kernels alone\" time one `_C.backward` call (or the",
              "gradients' allocation) in the forward column."]
    if args.profile:
        label, (b, h, s, d) = next(iter(shapes.items()))
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, dtype=dtype, device=args.device) for _ in range(3))
        steps = {name: step for name, _, step in entry_points(q, k, v)
                 if name in ("flashjit.scaled_dot_product_attention", "torch F.scaled_dot_product_attention")}
        lines += ["", f"## A forward+backward step under torch.profiler ({label}, {args.profile} steps)"]
        for name, step in steps.items():
            section = ["", f"### {name}", ""] + profile_step(step, args.profile, cuda)
            print("\n".join(section), flush=True)
            lines += section
    text = "\n".join(lines) + "\n"
    from gpu_attention import save_record  # bench/ is the script's folder

    save_record(args.out, device_tag({"device": "cuda", "gpu": torch.cuda.get_device_name()}) if cuda else "cpu",
                "overhead", commit(), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
