"""`flashjit bench`: flashjit against naive attention, PyTorch SDPA's backends and FlexAttention.

For every case (dtype, head dim, seqlen, causal; batch and heads from a token
count and a hidden size) each implementation is timed for forward, backward and
forward+backward, its peak memory over one forward+backward is measured, and its
error against a float64 reference is taken on one small case.

- Time: median of `--repeats` runs after warm-up; CUDA events on the GPU (one
  synchronised run at a time), wall clock on the CPU. Inputs are fresh random
  normals for every case and implementation; sets small enough to sit in cache
  are rotated (several copies, used in turn). Forward runs as in training:
  the inputs require grad. Backward is `torch.autograd.grad` of one retained
  forward graph.
- TFLOP/s (docs/measurement.md): forward 4·B·H·Sq·Sk·D, halved for causal; backward
  2.5× forward; forward+backward 3.5×.
- Peak memory of one forward+backward, beyond what is allocated before it (the
  inputs), after warm-up. CUDA: `torch.cuda.max_memory_allocated` after
  `reset_peak_memory_stats`, plus the high-water mark of the driver's
  stream-ordered pool, where flashjit takes its backward scratch (the sum is an
  upper bound). CPU: the process's resident high-water mark (VmHWM) minus its
  resident size just before, after resetting the high-water mark
  (/proc/self/clear_refs) and returning freed heap to the system
  (malloc_trim). Buffers an implementation keeps between calls (flashjit's
  per-thread tiles, some hundred KiB) are part of the baseline.
- Error: max |x - ref| over the output and over (dq, dk, dv), where ref is
  naive attention in float64 on the same inputs, B2 H2 N256 for each head
  dim, dtype and causal flag (batch 2: a compile for dynamic shapes does not
  specialise on it, so FlexAttention's first compile serves the whole sweep).

    flashjit bench                       # quick CPU sweep, or the full GPU sweep
    flashjit bench --quick --out results # smaller, with CSV, JSON, markdown and PNG plots
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

# Also what other modules take from flashjit.bench (COLUMNS, FLOP_FACTOR, resident_kib, _cpu_name).
from .cases import (COLUMNS, DEFAULT_IMPLS, DEFAULTS, DTYPES, ERROR_CASE, FLOP_FACTOR,  # noqa: F401
                    IMPLS, MATERIALISING, MODES, QUICK, SUITES, Case, Row, _first_line, flops, resident_kib)
from .memory import _available_bytes, _CudaPeak, _element_size, _HostPeak, _materialised_bytes
from .output import markdown_record, plot, report, write_csv, write_json
from .provenance import CpuShare, _cpu_name, _load_average, device_tag, metadata  # noqa: F401


# ----------------------------------------------------------------------------- implementations

class Unsupported(Exception):
    """The implementation cannot run this case on this device."""


def padding_mask(case: Case, device: str):
    """The masked suite's bool mask (True = attend), or None: key padding [B, 1, 1, N], with
    the causal bound folded in ([B, 1, N, N]) for causal cases, since SDPA takes a mask or
    is_causal but not both."""
    if not case.masked:
        return None
    import torch

    mask = torch.ones(case.batch, 1, 1, case.seqlen, dtype=torch.bool, device=device)
    mask[1::2, ..., case.seqlen - case.seqlen // 4:] = False
    if case.causal:
        mask = mask & torch.ones(case.queries, case.seqlen, dtype=torch.bool, device=device).tril()
    return mask


def _is_causal(case: Case) -> bool:
    """is_causal of a call: the causal bound, unless the mask carries it."""
    return case.causal and not case.masked


def _naive(case: Case, device: str):
    from ..reference import naive_attention

    mask = padding_mask(case, device)

    def run(q, k, v):  # in the inputs' dtype: the unfused baseline (it expands grouped heads)
        return naive_attention(q, k, v, attn_mask=mask, causal=_is_causal(case), dtype=q.dtype)

    return run


def _sdpa(backend_name: str, case: Case, device: str):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        raise Unsupported(f"torch {_torch_version()} has no SDPBackend.{backend_name}")
    mask, gqa = padding_mask(case, device), bool(case.heads_kv)

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=_is_causal(case),
                                                  enable_gqa=gqa)

    return run


_compiled_flex: dict = {}


def _flex(causal: bool, seqlen: int, device: str, dynamic: bool = True):
    """FlexAttention under torch.compile. Dynamic shapes by default: one compile per head dim and
    mask kind instead of one per shape (a shape-specialised GPU sweep spends minutes compiling)."""
    import torch

    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as error:
        raise Unsupported(f"no FlexAttention in torch {_torch_version()}: {_first_line(error)}") from None
    if dynamic not in _compiled_flex:
        config = torch._dynamo.config
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(config, name):
                    setattr(config, name, max(getattr(config, name), 256))
            # The bwd timing runs one graph's backward repeatedly (retain_graph=True), which
            # compiled backwards with donated buffers refuse.
            try:
                import torch._functorch.config as functorch_config
            except ImportError:
                functorch_config = None
            if hasattr(functorch_config, "donated_buffer"):
                functorch_config.donated_buffer = False
        _compiled_flex[dynamic] = torch.compile(flex_attention, dynamic=dynamic)
    block_mask = None
    if causal:
        block_mask = create_block_mask(lambda b, h, q_index, k_index: q_index >= k_index, None, None, seqlen, seqlen,
                                       device=device)
    compiled = _compiled_flex[dynamic]

    def run(q, k, v):
        return compiled(q, k, v, block_mask=block_mask)

    return run


def _flashjit(case: Case, device: str):
    import flashjit

    mask, gqa = padding_mask(case, device), bool(case.heads_kv)

    def run(q, k, v):
        return flashjit.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=_is_causal(case),
                                                     enable_gqa=gqa)

    return run


def build(impl: str, case: Case, device: str, flex_dynamic: bool = True) -> Callable:
    """A function (q, k, v) -> o for one implementation and case."""
    if impl == "flashjit":
        return _flashjit(case, device)
    if impl == "naive":
        return _naive(case, device)
    if impl == "flex":
        if case.heads_kv or case.seqlen_q or case.masked:
            raise Unsupported("flex: timed in the prefill suite only")
        return _flex(case.causal, case.seqlen, device, flex_dynamic)
    backend = {"sdpa-math": "MATH", "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-flash": "FLASH_ATTENTION",
               "sdpa-cudnn": "CUDNN_ATTENTION"}[impl]
    return _sdpa(backend, case, device)


def _torch_version() -> str:
    import torch

    return torch.__version__


# ----------------------------------------------------------------------------- timing

def _time_ms(run: Callable[[int], object], runs: int, cuda: bool) -> list[float]:
    """Times run(i) for i in range(runs), each call on its own."""
    import torch

    times = []
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        for index in range(runs):
            start.record()
            run(index)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for index in range(runs):
            begin = time.perf_counter()
            run(index)
            times.append(1e3 * (time.perf_counter() - begin))
    return times


# ----------------------------------------------------------------------------- progress

class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line per tenth otherwise."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.done, self.enabled = max(total, 1), 0, enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self._last_tenth = -1

    def update(self, label: str):
        """Shows `label` as the item now running."""
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        clock = f"{int(elapsed // 60)}:{int(elapsed % 60):02d}"
        if self.tty:
            filled = 30 * self.done // self.total
            line = f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {clock} {label}"
            self.stream.write("\r" + line[:150].ljust(150))
            self.stream.flush()
        elif 10 * self.done // self.total > self._last_tenth:
            self._last_tenth = 10 * self.done // self.total
            print(f"bench: {self.done}/{self.total} done after {clock}; now {label}", file=self.stream, flush=True)

    def advance(self):
        self.done += 1

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\r" + " " * 150 + "\r")
            self.stream.flush()


# ----------------------------------------------------------------------------- the sweep

@dataclass
class Config:
    device: str
    dtypes: list
    head_dims: list
    seqlens: list
    causal: list
    impls: list
    modes: list
    repeats: int
    batch: int | None = None
    tokens: int | None = None
    heads: int | None = None
    hidden: int | None = None
    seed: int = 0
    flex_compile: str = "dynamic"
    suite: str = "prefill"
    notes: list = field(default_factory=list)

    def suite_fields(self, heads: int) -> dict:
        """The Case fields a suite sets (SUITES)."""
        if self.suite == "gqa":
            return {"heads_kv": max(1, heads // 4)}
        return {"masked": True} if self.suite == "masked" else {"seqlen_q": 1} if self.suite == "decode" else {}

    def cases(self) -> list[Case]:
        cases = []
        for dtype in self.dtypes:
            for head_dim in self.head_dims:
                heads = self.heads if self.heads is not None else self.hidden // head_dim
                for causal in self.causal:
                    for seqlen in self.seqlens:
                        batch = self.batch if self.batch is not None else max(1, self.tokens // seqlen)
                        cases.append(Case(dtype, batch, heads, seqlen, head_dim, causal, **self.suite_fields(heads)))
        return cases


def _inputs(case: Case, device: str, sets: int):
    import torch

    dtype = getattr(torch, case.dtype)
    q_shape = (case.batch, case.heads, case.queries, case.head_dim)
    kv_shape = (case.batch, case.kv_heads, case.seqlen, case.head_dim)
    return [(torch.randn(q_shape, device=device, dtype=dtype, requires_grad=True),
             *(torch.randn(kv_shape, device=device, dtype=dtype, requires_grad=True) for _ in range(2)),
             torch.randn(q_shape, device=device, dtype=dtype)) for _ in range(sets)]


def _input_sets(case: Case, device: str, impl: str) -> int:
    """How many input sets to rotate through so that timings do not run from cache."""
    import torch

    set_bytes = 4 * case.batch * case.heads * case.seqlen * case.head_dim * _element_size(case.dtype)
    if device == "cuda":
        cache = 2 * getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    else:
        cache = 64 * 2**20
    if set_bytes >= cache:
        return 1
    sets = min(4, math.ceil(cache / set_bytes))
    if impl in MATERIALISING and sets * _materialised_bytes(impl, case) > _available_bytes(device) // 2:
        return 1
    return sets


@dataclass
class _Probe:
    """What the small error case showed: forward and backward support, and errors."""

    forward: str = ""  # "" = runs, else why not
    backward: str = ""
    forward_status: str = "ok"  # unsupported or error when forward is set
    backward_status: str = "ok"
    err_out: float = math.nan
    err_grad: float = math.nan


def _classify(error: BaseException) -> tuple[str, str]:
    """(status, reason) of an exception raised by an implementation."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return "skipped", "out of memory"
    text = str(error)
    if (isinstance(error, (Unsupported, NotImplementedError)) or "No available kernel" in text
            or "No viable backend" in text):
        return "unsupported", _first_line(error)
    return "error", _first_line(error)


def _classify_for(impl: str, error: BaseException) -> tuple[str, str]:
    """As _classify; a FlexAttention failure other than memory is a failed compile (unsupported)."""
    status, reason = _classify(error)
    if impl == "flex" and status == "error":
        return "unsupported", f"under torch.compile: {reason}"
    return status, reason


def _warning_reason(caught: Iterable[warnings.WarningMessage]) -> str:
    """SDPA explains why a forced backend refused in warnings; keep the first."""
    for warning in caught:
        text = str(warning.message).strip()
        if text:
            return text.splitlines()[0][:200]
    return ""


def probe(impl: str, case: Case, device: str, flex_dynamic: bool = True) -> _Probe:
    """Runs the small error case; its failures say what the implementation supports."""
    import torch

    # The error case in the suite's shape: grouped heads 2 / 1 (gqa), one query (decode), the mask.
    small = Case(case.dtype, ERROR_CASE["batch"], ERROR_CASE["heads"], ERROR_CASE["seqlen"], case.head_dim,
                 case.causal, heads_kv=1 if case.heads_kv else 0, seqlen_q=case.seqlen_q, masked=case.masked)
    result = _Probe()
    generator = torch.Generator().manual_seed(1234 + case.head_dim)
    q_shape = (small.batch, small.heads, small.queries, small.head_dim)
    kv_shape = (small.batch, small.kv_heads, small.seqlen, small.head_dim)
    exact = [torch.randn(shape, generator=generator, dtype=torch.float64)
             for shape in (q_shape, kv_shape, kv_shape, q_shape)]
    leaves = [x.detach().requires_grad_() for x in exact[:3]]
    reference = _naive(small, "cpu")(*leaves)
    reference_grads = torch.autograd.grad(reference, leaves, exact[3])
    dtype = getattr(torch, case.dtype)
    q, k, v = (x.to(device=device, dtype=dtype).requires_grad_() for x in exact[:3])
    dout = exact[3].to(device=device, dtype=dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = build(impl, small, device, flex_dynamic)(q, k, v)
        except Exception as error:  # noqa: BLE001 (any failure makes the implementation unsupported)
            status, reason = _classify_for(impl, error)
            if impl.startswith("sdpa-"):
                reason = f"{reason}; {_warning_reason(caught)}".rstrip("; ")
            result.forward = result.backward = reason
            result.forward_status = result.backward_status = status
            return result
        result.err_out = (out.detach().double().cpu() - reference.detach()).abs().max().item()
        try:
            grads = torch.autograd.grad(out, (q, k, v), dout)
        except Exception as error:  # noqa: BLE001
            status, reason = _classify_for(impl, error)
            if impl.startswith("sdpa-"):
                reason = f"{reason}; {_warning_reason(caught)}".rstrip("; ")
            result.backward = reason
            result.backward_status = status
            return result
    result.err_grad = max((g.double().cpu() - r).abs().max().item() for g, r in zip(grads, reference_grads))
    return result


def _rows_for(impl: str, case: Case, config: Config, status: str = "ok", reason: str = "") -> dict[str, Row]:
    return {mode: Row(**vars(case), impl=impl, device=config.device, mode=mode, status=status, reason=reason)
            for mode in config.modes}


def measure(impl: str, case: Case, config: Config, checked: _Probe, peak) -> list[Row]:
    """Rows (one per mode) for one implementation and case."""
    device, cuda = config.device, config.device == "cuda"
    rows = _rows_for(impl, case, config)
    for row in rows.values():
        row.err_out, row.err_grad = checked.err_out, checked.err_grad
    if checked.forward:
        for row in rows.values():
            row.status, row.reason = checked.forward_status, checked.forward
        return list(rows.values())
    if checked.backward:
        for mode in ("bwd", "fwdbwd"):
            if mode in rows:
                rows[mode].status, rows[mode].reason = checked.backward_status, f"backward: {checked.backward}"
    if impl in MATERIALISING:
        needed, available = _materialised_bytes(impl, case), _available_bytes(device)
        if needed > 0.9 * available:
            reason = (f"would need about {needed / 2**30:.1f} GiB for the score matrices, "
                      f"{available / 2**30:.1f} GiB available")
            for row in rows.values():
                row.status, row.reason = "skipped", reason
            return list(rows.values())

    sets = _input_sets(case, device, impl)
    try:
        run = build(impl, case, device, config.flex_compile == "dynamic")
        inputs = _inputs(case, device, sets)
        peak_mib = _warm_up(run, inputs[0], not checked.backward, peak)
        for mode, row in rows.items():
            if row.status != "ok":
                continue
            row.peak_mib = peak_mib
            try:
                times = _time_mode(run, inputs, mode, config.repeats, cuda)
            except Exception as error:  # noqa: BLE001 (recorded in the row)
                row.status, row.reason = _classify_for(impl, error)
            if row.status == "skipped":
                _release(cuda)
                continue
            if row.status == "ok":
                row.ms, row.runs = statistics.median(times), len(times)
                row.tflops = flops(case, mode) / (row.ms * 1e-3) / 1e12
    except Exception as error:  # noqa: BLE001 (recorded in the rows)
        status, reason = _classify_for(impl, error)
        for row in rows.values():
            if row.status == "ok":
                row.status, row.reason = status, reason
    inputs = None
    _release(cuda)
    return list(rows.values())


def _warm_up(run: Callable, inputs: tuple, backward: bool, peak) -> float:
    """One forward (+backward): compiles, workspaces, autograd's first backward. Then the
    peak memory of one more forward+backward (NaN without a backward or a way to measure)."""
    import torch

    q, k, v, dout = inputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = run(q, k, v)
        if not backward:
            return math.nan
        torch.autograd.grad(out, (q, k, v), dout)
        del out
        if peak is None:
            return math.nan
        peak.start()
        torch.autograd.grad(run(q, k, v), (q, k, v), dout)
        return peak.stop()


def _time_mode(run: Callable, inputs: list, mode: str, repeats: int, cuda: bool) -> list[float]:
    """Times of one mode; forward graphs for bwd are built (and freed) here."""
    import torch

    sets = len(inputs)
    if mode == "fwd":
        def call(index):
            return run(*inputs[index % sets][:3])
    elif mode == "bwd":
        outputs = [run(*inputs[index][:3]) for index in range(sets)]

        def call(index):
            q, k, v, dout = inputs[index % sets]
            return torch.autograd.grad(outputs[index % sets], (q, k, v), dout, retain_graph=True)
    else:
        def call(index):
            q, k, v, dout = inputs[index % sets]
            return torch.autograd.grad(run(q, k, v), (q, k, v), dout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call(0)
        return _time_ms(call, repeats, cuda)


def _release(cuda: bool):
    import gc

    gc.collect()
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def add_speedups(rows: list[Row]):
    """flashjit_speedup = the peer's time / flashjit's time on the same case and mode."""
    def key(row):
        return (row.device, row.dtype, row.batch, row.heads, row.seqlen, row.head_dim, row.causal, row.mode)

    flashjit = {key(row): row.ms for row in rows if row.impl == "flashjit" and row.status == "ok"}
    for row in rows:
        base = flashjit.get(key(row))
        if row.status == "ok" and base:
            row.flashjit_speedup = row.ms / base


def run_sweep(config: Config, progress: bool = True) -> list[Row]:
    import torch

    torch.manual_seed(config.seed)
    cases = config.cases()
    if config.device == "cuda":
        peak = _CudaPeak(torch.cuda.current_device())
    else:
        peak = _HostPeak()
    if peak.reason:
        config.notes.append(peak.reason)
    if isinstance(peak, _HostPeak) and not peak.available:
        peak = None
    probes: dict[tuple, _Probe] = {}
    bar = Progress(len(cases) * len(config.impls), progress)
    rows = []
    for case in cases:
        for impl in config.impls:
            bar.update(f"{impl} {case.label()}")
            key = (impl, case.dtype, case.head_dim, case.causal)
            if key not in probes:
                probes[key] = probe(impl, case, config.device, config.flex_compile == "dynamic")
            rows += measure(impl, case, config, probes[key], peak)
            bar.advance()
    bar.close()
    add_speedups(rows)
    return rows


# ----------------------------------------------------------------------------- command line

def _int_list(name: str, minimum: int = 1):
    def parse(text: str) -> list[int]:
        values = []
        for item in text.replace(",", " ").split():
            try:
                value = int(item)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {item!r}") from None
            if value < minimum:
                raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {value}")
            values.append(value)
        return values

    parse.__name__ = name
    return parse


def _choice_list(name: str, choices: Iterable[str]):
    choices = tuple(choices)

    def parse(text: str) -> list[str]:
        values = [item for item in text.replace(",", " ").split() if item]
        for value in values:
            if value not in choices:
                raise argparse.ArgumentTypeError(f"expected some of {', '.join(choices)}; got {value!r}")
        return values

    parse.__name__ = name
    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _flatten(values):
    return None if values is None else [item for chunk in values for item in chunk]


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when torch sees a GPU, else cpu")
    parser.add_argument("--seqlens", nargs="+", type=_int_list("seqlens"), metavar="N",
                        help="sequence lengths (space or comma separated)")
    parser.add_argument("--head-dims", nargs="+", type=_int_list("head dims"), metavar="D")
    parser.add_argument("--dtypes", nargs="+", type=_choice_list("dtypes", DTYPES), metavar="DTYPE",
                        help=f"some of {', '.join(DTYPES)}")
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--batch", type=_positive_int, help="fixed batch size (default: --tokens / seqlen)")
    size.add_argument("--tokens", type=_positive_int, help="batch = max(1, tokens // seqlen); "
                      "default 16384 on the GPU, 2048 on the CPU")
    heads = parser.add_mutually_exclusive_group()
    heads.add_argument("--heads", type=_positive_int, help="fixed head count (default: --hidden / head dim)")
    heads.add_argument("--hidden", type=_positive_int, help="heads = hidden / head dim; default 2048 on the GPU, "
                       "512 on the CPU")
    parser.add_argument("--impls", nargs="+", type=_choice_list("impls", IMPLS), metavar="IMPL",
                        help=f"some of {', '.join(IMPLS)} (default: those the device has)")
    parser.add_argument("--modes", nargs="+", type=_choice_list("modes", MODES), metavar="MODE",
                        help="some of fwd, bwd, fwdbwd (default: fwd bwd on the GPU, all three on the CPU)")
    parser.add_argument("--repeats", type=_positive_int, help="timed runs per measurement, median reported "
                        "(default 20 on the GPU, 5 on the CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flex-compile", choices=["dynamic", "static"], default="dynamic",
                        help="FlexAttention compiled for dynamic shapes (one compile per head dim and mask) "
                        "or per shape (slower to compile)")
    parser.add_argument("--suite", choices=list(SUITES), default="prefill",
                        help="the problem family: " + "; ".join(f"{name}: {text}" for name, text in SUITES.items()))
    parser.add_argument("--quick", action="store_true", help="a smaller sweep (GPU: D128, N 1k and 4k; "
                        "CPU: N 256-1024, fwd and bwd, 3 runs)")
    parser.add_argument("--out", metavar="DIR", help="write CSV, JSON, a markdown record and PNG plots here")
    parser.add_argument("--name", help="file name stem in --out (default: <device>-bench-<date>-<commit>)")
    parser.add_argument("--no-plot", action="store_true", help="no PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def make_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    import torch

    import flashjit

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA device")
        if "cuda" not in flashjit.backends():
            parser.error(f"--device cuda: this flashjit build has backends {', '.join(flashjit.backends())}")
    defaults = dict(DEFAULTS[device])
    if args.quick:
        defaults.update(QUICK[device])

    def pick(name):
        value = getattr(args, name)
        return defaults[name] if value is None else value

    head_dims = sorted(set(_flatten(args.head_dims) or defaults["head_dims"]))
    heads, hidden = args.heads, None
    if heads is None:
        hidden = args.hidden or defaults["hidden"]
        bad = [d for d in head_dims if hidden % d]
        if bad:
            parser.error(f"--hidden {hidden}: not a multiple of head dim {bad[0]}; pass --heads or another --hidden")
    batch, tokens = args.batch, None
    if batch is None:
        tokens = args.tokens or defaults["tokens"]
    causal = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    modes = [mode for mode in MODES if mode in (_flatten(args.modes) or defaults["modes"])]
    if args.suite == "decode":  # one query sees every key; decoding has no backward
        if args.causal == "yes" or (args.modes and modes != ["fwd"]):
            parser.error("--suite decode: forward only and no causal mask (one query sees every key)")
        causal, modes = [False], ["fwd"]
    return Config(
        device=device,
        dtypes=list(dict.fromkeys(_flatten(args.dtypes) or defaults["dtypes"])),
        head_dims=head_dims,
        seqlens=sorted(set(_flatten(args.seqlens) or defaults["seqlens"])),
        causal=causal,
        impls=list(dict.fromkeys(_flatten(args.impls) or DEFAULT_IMPLS[device])),
        modes=modes,
        repeats=pick("repeats"),
        batch=batch, tokens=tokens, heads=heads, hidden=hidden, seed=args.seed, flex_compile=args.flex_compile,
        suite=args.suite,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="flashjit bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv), parser, argv)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    config = make_config(args, parser)
    if config.device == "cuda" and config.repeats < 20:
        config.notes.append(f"{config.repeats} timed runs per measurement (fewer than the 20 asked for on a GPU)")
    meta = metadata(config, argv)
    where = meta.get("gpu") if config.device == "cuda" else f"{meta['cpu']} ({meta['cpu_cores']} cores)"
    print(f"flashjit {meta['flashjit']} bench on {where}, torch {meta['torch']}, commit {meta['commit']}")
    print(f"{len(config.cases())} cases x {len(config.impls)} implementations x modes {', '.join(config.modes)}; "
          f"{meta['timing']}", flush=True)
    started, share = time.monotonic(), CpuShare()
    rows = run_sweep(config, progress=not args.no_progress)
    meta["cpu_share_of_others"] = share.shares()
    others = sum(meta["cpu_share_of_others"].values())
    if config.device == "cpu" and others > 0.05:
        config.notes.append(f"other processes and the hypervisor took {100 * others:.0f}% of the CPU time "
                            "during the sweep: CPU timings are skewed")
    meta["notes"] = config.notes
    meta["seconds"] = round(time.monotonic() - started, 1)
    meta["load_average_after"] = _load_average()
    print()
    print(report(rows))
    print(f"sweep took {meta['seconds']:.0f} s")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        suite = "" if args.suite == "prefill" else f"-{args.suite}"
        stem = args.name or f"{device_tag(meta)}-bench{suite}-{datetime.date.today().isoformat()}-{meta['commit']}"
        base = os.path.join(args.out, stem)
        write_csv(rows, base + ".csv")
        write_json(rows, meta, base + ".json")
        plots = []
        if not args.no_plot:
            try:
                plots = plot(rows, args.out, stem)
            except ImportError:
                print("note: matplotlib is not installed, so no plots were drawn (pip install matplotlib)")
        with open(base + ".md", "w") as out:
            out.write(markdown_record(rows, meta, plots))
        for path in [base + ".csv", base + ".json", base + ".md", *plots]:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
