"""What attention costs: flashjit.profile() records every attention call made inside it.

    with flashjit.profile() as prof:
        loss = model(batch).loss
        loss.backward()
    print(prof.table())          # also printed at exit with report=True
    prof.to_json()               # a dict: calls, per-shape summary, totals

Each call of flashjit's kernels (forward and backward, torch tensors, eager or
compiled) is one record: shapes, dtype, causal/window bounds, mask, dropout, its
time, its FLOPs (docs/measurement.md: the forward counts the visible score
entries exactly, 2 (Dqk + Dv) FLOPs each; the backward 2.5x that), the bytes it
reads and writes, and from those its TFLOP/s, GB/s and share of the device's
peak. With ``framework=True`` calls of torch's own
``scaled_dot_product_attention`` made inside the block (those flashjit does not
serve) are recorded too, as "torch": the forward, and the backward as flashjit's
is, from the gradient reaching the call's output to the gradients of its inputs
(those that require grad) computed, its FLOPs 2.5x the forward's.

Time: on a GPU, CUDA events around each call on its stream, read once at exit
(no synchronisation per call unless ``sync=True``); on the CPU, the wall clock
(its calls are synchronous). Events time the stream between them: where a step
is bound by the host (the GPU waiting for the next launch), a call's time
includes that wait. ``alone=True`` times each distinct call (direction,
implementation, shapes, features and FLOPs) by itself at the block's exit instead: the
first such call's inputs are kept, and the call runs again on them into fresh
outputs, back to back (CUDA events around the repeats; the wall clock on the
CPU), torch's random state restored after; every call of that kind counts that
time. That is the kernels' own time, free of the host's gaps. The block's own duration (synchronised at entry
and exit) gives attention's share of it. The device's peak is a matrix product
of the call's dtype measured once per device and dtype (``peak=True``) and kept
in the kernel cache directory. Off (outside every profile block) the hooks cost
one global lookup per call.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import numpy as np

# The open profile, if any (the hooks in ops.py read this one name).
_active: Optional["Profile"] = None
# Called with True when a profile block opens and False when it closes (flashjit.ops tells its C++
# autograd rule, whose backwards then take the recorded path).
_open_listeners: list = []

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}

# The layer a call is made in, per thread (the autograd engine runs a GPU's backward on a thread
# of its own): set by profile(model=...)'s module hooks in the forward, and in the backward from
# what the forward recorded (ops.py keeps it in the autograd context).
_layers = threading.local()


def current_layer() -> str:
    return getattr(_layers, "name", "")


@contextlib.contextmanager
def layer_scope(name: str):
    """Calls inside are recorded as made in layer `name`."""
    previous = current_layer()
    _layers.name = name
    try:
        yield
    finally:
        _layers.name = previous


@functools.lru_cache(maxsize=256)
def visible_pairs(seqlen_q: int, seqlen_k: int, causal: int = 0, window_left: int = -1,
                  window_right: int = -1) -> int:
    """Score entries a call computes: key j is visible from query i when
    -window_left <= j - i - shift <= window_right (src/core/bounds_core.h; causal is
    window_right = 0, shift 0 for top-left alignment (1), Sk - Sq otherwise). Cached: a
    training step repeats a few shapes."""
    if causal:
        window_right = 0
    shift = 0 if causal == 1 else seqlen_k - seqlen_q
    if window_left < 0 and window_right < 0:
        return seqlen_q * seqlen_k
    rows = np.arange(seqlen_q, dtype=np.int64) + shift
    begin = np.zeros_like(rows) if window_left < 0 else np.clip(rows - window_left, 0, seqlen_k)
    end = np.full_like(rows, seqlen_k) if window_right < 0 else np.clip(rows + window_right + 1, 0, seqlen_k)
    return int(np.maximum(end - begin, 0).sum())


@dataclass
class Call:
    """One attention call."""
    direction: str  # "forward" or "backward"
    impl: str       # "flashjit" or "torch"
    device: str
    dtype: str
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim_qk: int
    head_dim_v: int
    causal: int = 0
    window_left: int = -1
    window_right: int = -1
    mask: bool = False
    dropout_p: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0
    ms: float = float("nan")
    timed_alone: bool = False  # timed by itself at the block's exit (MLX's lazy calls; alone=True)
    layer: str = ""  # the module the call ran in (profile(model=...)), its backward the forward's
    _events: object = field(default=None, repr=False, compare=False)
    _replay: object = field(default=None, repr=False, compare=False)  # MLX: (run, q, k, v shapes, dtype)

    def shape_key(self) -> str:
        features = [f"causal={'top-left' if self.causal == 1 else 'bottom-right'}"] if self.causal else []
        if self.window_left >= 0 or (self.window_right >= 0 and not self.causal):
            features.append(f"window=({self.window_left},{self.window_right})")
        if self.mask:
            features.append("mask")
        if self.dropout_p:
            features.append(f"dropout={self.dropout_p:g}")
        heads = f"H{self.heads_q}" + (f"/{self.heads_kv}" if self.heads_kv != self.heads_q else "")
        dims = f"D{self.head_dim_qk}" + (f"/{self.head_dim_v}" if self.head_dim_v != self.head_dim_qk else "")
        return " ".join([self.dtype, f"B{self.batch}", heads, f"Sq{self.seqlen_q}", f"Sk{self.seqlen_k}", dims]
                        + features)


class Profile:
    """The records of one profile block; see the module's doc."""

    def __init__(self, sync: bool = False, framework: bool = False, peak: bool = False, alone: bool = False):
        self.sync, self.framework, self.measure_peak, self.alone = sync, framework, peak, alone
        self.calls: list[Call] = []
        # alone=True: a call of each kind (_kind: direction, impl, shape_key, FLOPs) to run again at the exit
        self._replays: dict[tuple, object] = {}
        self.elapsed_ms = float("nan")
        self.peak_memory_mib = float("nan")
        self.peaks: dict[str, float] = {}  # TFLOP/s by "device dtype"
        self._cuda = False
        self.time_mlx_alone = True  # flashjit.mlx.profile_step times MLX calls its own way

    # ---- recording (ops.py and the framework hook call these) ----------------------------------------

    def begin(self, direction: str, impl: str, q, k, v, causal=0, window_left=-1, window_right=-1, mask=None,
              dropout_p=0.0, sequences=None) -> Call:
        """A call's record (describe()), its time begun; end() records it."""
        call = self.describe(direction, impl, q, k, v, causal, window_left, window_right, mask, dropout_p, sequences)
        self.start(call)
        return call

    def describe(self, direction: str, impl: str, q, k, v, causal=0, window_left=-1, window_right=-1, mask=None,
                 dropout_p=0.0, sequences=None) -> Call:
        """A call's record without its time: shapes, features, FLOPs and bytes. sequences: a
        variable-length batch's (len_q, len_k) per sequence, with q, k, v packed [total, heads,
        head_dim]; the record's batch is their count, its lengths the longest."""
        if sequences is not None:
            heads_q, head_dim_qk, heads_kv, head_dim_v = q.shape[1], q.shape[2], k.shape[1], v.shape[2]
            batch = len(sequences)
            seqlen_q = max((a for a, _ in sequences), default=0)
            seqlen_k = max((b for _, b in sequences), default=0)
            shapes = collections.Counter(sequences)  # {(len_q, len_k): sequences of that shape}
        else:
            batch, heads_q, seqlen_q, head_dim_qk = q.shape[-4:] if q.ndim >= 4 else (1, *q.shape[-3:])
            heads_kv, seqlen_k, head_dim_v = k.shape[-3], k.shape[-2], v.shape[-1]
            shapes = {(seqlen_q, seqlen_k): int(batch)}
        dtype = str(q.dtype).removeprefix("torch.")
        call = Call(direction, impl, str(q.device), dtype, int(batch), int(heads_q), int(heads_kv), int(seqlen_q),
                    int(seqlen_k), int(head_dim_qk), int(head_dim_v), int(causal), int(window_left),
                    int(window_right), mask is not None, float(dropout_p), layer=current_layer())
        pairs = sum(count * visible_pairs(int(a), int(b), call.causal, call.window_left, call.window_right)
                    for (a, b), count in shapes.items())
        forward_flops = 2.0 * call.heads_q * pairs * (call.head_dim_qk + call.head_dim_v)
        call.flops = forward_flops * (2.5 if direction == "backward" else 1.0)
        size = _BYTES.get(dtype, 4)
        rows_q = sum(count * a for (a, _), count in shapes.items())
        rows_k = sum(count * b for (_, b), count in shapes.items())
        q_o = call.heads_q * rows_q * (call.head_dim_qk + call.head_dim_v)
        k_v = call.heads_kv * rows_k * (call.head_dim_qk + call.head_dim_v)
        lse = call.heads_q * rows_q * 4
        # forward: q, k, v read, o and lse written; backward: those read with dO, dq, dk, dv written
        call.bytes = (q_o + k_v) * size + lse if direction == "forward" else (2 * q_o + 2 * k_v) * size + lse
        return call

    def start(self, call: Call) -> None:
        """Begins a described call's time: a CUDA event on the current stream, else the wall clock
        (with alone=True: nothing, the call is timed at the exit)."""
        if self.alone:
            call.timed_alone = True
            return
        if call.device.startswith("cuda"):
            import torch
            self._cuda = True
            if self.sync:
                torch.cuda.synchronize(call.device)
                call._events = time.perf_counter()
            else:
                start = torch.cuda.Event(enable_timing=True)
                start.record()
                call._events = start
        else:
            call._events = time.perf_counter()

    def wants_replay(self, call: Call) -> bool:
        """Whether the call is the first of its kind in an alone=True block (offer_replay's)."""
        return self.alone and _kind(call) not in self._replays

    def offer_replay(self, call: Call, run) -> None:
        """run(): the call again (inputs kept, fresh outputs), timed at the exit for every call of
        its kind; kept for the first call of a kind only (see wants_replay)."""
        if self.alone:
            self._replays.setdefault(_kind(call), run)

    def end(self, call: Call) -> None:
        if call.timed_alone and not isinstance(call._replay, tuple):
            self.calls.append(call)
            return
        if isinstance(call._events, float):
            if self.sync and self._cuda and call.device.startswith("cuda"):
                import torch
                torch.cuda.synchronize(call.device)
            call.ms = (time.perf_counter() - call._events) * 1e3
            call._events = None
        else:
            import torch
            stop = torch.cuda.Event(enable_timing=True)
            stop.record()
            call._events = (call._events, stop)
        self.calls.append(call)

    def record_mlx(self, impl: str, run, q, k, v, causal=0, window_left=-1, window_right=-1, mask=None,
                   dropout_p=0.0) -> None:
        """An MLX call: MLX builds its graph lazily, so the call has no time of its own
        inside a step; `run(q, k, v)` replays it at the block's exit, timed alone
        (forward, evaluated), once per distinct call."""
        import mlx.core as mx

        dtype = str(q.dtype).removeprefix("mlx.core.")
        device = f"mlx:{'gpu' if mx.default_device() == mx.gpu else 'cpu'}"
        shape = _Shape(q.shape, dtype, device)
        call = self.begin("forward", impl, shape, _Shape(k.shape), _Shape(v.shape), causal, window_left,
                          window_right, mask, dropout_p)
        call.timed_alone = self.time_mlx_alone
        call._events = None
        call._replay = (run, tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype)
        self.calls.append(call)

    # ---- reading ---------------------------------------------------------------------------------------

    def _resolve(self) -> None:
        alone: dict[tuple, float] = {}
        replayed = {key: replay_ms(run) for key, run in self._replays.items()}
        self._replays.clear()  # the kept inputs go
        for call in self.calls:
            if call.timed_alone and isinstance(call._replay, tuple):  # MLX
                key = (call.impl, call.shape_key())
                if key not in alone:
                    alone[key] = mlx_call_ms(*call._replay)
                call.ms = alone[key]
            elif call.timed_alone:
                call.ms = replayed.get(_kind(call), float("nan"))
            elif isinstance(call._events, tuple):
                start, stop = call._events
                stop.synchronize()
                call.ms = start.elapsed_time(stop)
                call._events = None

    def attention_ms(self) -> float:
        return sum(call.ms for call in self.calls)

    def summary(self) -> list[dict]:
        """One row per (direction, implementation, shape and features)."""
        rows: dict[tuple, dict] = {}
        for call in self.calls:
            key = (call.direction, call.impl, call.shape_key())
            row = rows.setdefault(key, dict(direction=call.direction, impl=call.impl, shape=call.shape_key(),
                                            device=call.device, dtype=call.dtype, calls=0, ms=0.0, flops=0.0,
                                            bytes=0.0))
            row["calls"] += 1
            row["ms"] += call.ms
            row["flops"] += call.flops
            row["bytes"] += call.bytes
        for row in rows.values():
            seconds = row["ms"] / 1e3
            row["tflops"] = row["flops"] / seconds / 1e12 if seconds > 0 else float("nan")
            row["gbps"] = row["bytes"] / seconds / 1e9 if seconds > 0 else float("nan")
            peak = self.peaks.get(f"{row['device']} {row['dtype']}")
            row["peak_share"] = row["tflops"] / peak if peak else float("nan")
        return list(rows.values())

    def layers(self) -> list[dict]:
        """One row per layer (profile(model=...)), in the order of their first call: calls, ms
        forward and backward, FLOPs and TFLOP/s. Empty where no call has a layer."""
        rows: dict[str, dict] = {}
        for call in self.calls:
            if not call.layer:
                continue
            row = rows.setdefault(call.layer, dict(layer=call.layer, calls=0, forward_ms=0.0, backward_ms=0.0,
                                                   flops=0.0))
            row["calls"] += 1
            row["forward_ms" if call.direction == "forward" else "backward_ms"] += call.ms
            row["flops"] += call.flops
        for row in rows.values():
            seconds = (row["forward_ms"] + row["backward_ms"]) / 1e3
            row["tflops"] = row["flops"] / seconds / 1e12 if seconds > 0 else float("nan")
        return list(rows.values())

    def to_json(self) -> dict:
        calls = [{k: v for k, v in asdict(call).items() if not k.startswith("_")} for call in self.calls]
        return dict(calls=calls, summary=self.summary(), layers=self.layers(), attention_ms=self.attention_ms(),
                    elapsed_ms=self.elapsed_ms, attention_share=self.attention_ms() / self.elapsed_ms
                    if self.elapsed_ms > 0 else float("nan"), peak_memory_mib=self.peak_memory_mib,
                    peak_tflops=self.peaks)

    def table(self) -> str:
        lines = ["| pass | impl | shape | calls | ms | TFLOP/s | GB/s | of peak |", "|---|---|---|---|---|---|---|---|"]
        for row in self.summary():
            share = f"{row['peak_share']:.0%}" if row["peak_share"] == row["peak_share"] else "–"
            lines.append(f"| {row['direction']} | {row['impl']} | {row['shape']} | {row['calls']} | "
                         f"{row['ms']:.2f} | {row['tflops']:.2f} | {row['gbps']:.1f} | {share} |")
        layers = self.layers()
        if layers:
            lines += ["", "| layer | calls | forward ms | backward ms | TFLOP/s |", "|---|---|---|---|---|"]
            lines += [f"| {row['layer']} | {row['calls']} | {row['forward_ms']:.2f} | {row['backward_ms']:.2f} | "
                      f"{row['tflops']:.2f} |" for row in layers]
        attention = self.attention_ms()
        share = attention / self.elapsed_ms if self.elapsed_ms > 0 else float("nan")
        lines.append("")
        lines.append(f"attention: {attention:.2f} ms of {self.elapsed_ms:.2f} ms in the block ({share:.0%})"
                     + (f"; peak memory {self.peak_memory_mib:.0f} MiB" if self.peak_memory_mib == self.peak_memory_mib
                        else ""))
        return "\n".join(lines)


def _torch_with_cuda():
    """torch, where it is installed and has initialised CUDA in this process; else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() and torch.cuda.is_initialized() else None


class _Shape:
    """Enough of an array for Profile.begin: its shape, dtype name and device (MLX arrays)."""

    def __init__(self, shape, dtype="", device="cpu"):
        self.shape, self.dtype, self.device, self.ndim, self.is_cuda = tuple(shape), dtype, device, len(shape), False


def _kind(call: Call) -> tuple:
    """A call's kind for alone=True: direction, implementation, shapes and features, and its FLOPs
    (variable-length calls of the same longest lengths may do different work)."""
    return call.direction, call.impl, call.shape_key(), call.flops


def replay_ms(run, repeats: int = 5) -> float:
    """Milliseconds a call of run() (a torch call, CPU or CUDA) takes by itself: one call that
    may compile, then `repeats` back to back, CUDA events around them on the current stream
    (the wall clock after a synchronisation on the CPU); torch's random state (CPU and CUDA)
    restored after, so that profiling moves no generator."""
    import torch

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else []
    with torch.random.fork_rng(devices=devices):
        run()
        if devices:
            torch.cuda.synchronize()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                run()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop) / repeats
        begin = time.perf_counter()
        for _ in range(repeats):
            run()
        return (time.perf_counter() - begin) * 1e3 / repeats


def mlx_call_ms(run, q_shape, k_shape, v_shape, dtype, repeats: int = 3, backward: bool = False) -> float:
    """Milliseconds of run(q, k, v) (with backward=True: its gradients by mx.grad) evaluated
    alone on fresh inputs of those shapes, median of `repeats` after one that may compile."""
    import mlx.core as mx

    q, k, v = (mx.random.normal(shape).astype(dtype) for shape in (q_shape, k_shape, v_shape))
    fn = mx.grad(lambda q, k, v: run(q, k, v).astype(mx.float32).sum(), argnums=(0, 1, 2)) if backward else run
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        mx.eval(fn(q, k, v))
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times[1:])[len(times[1:]) // 2]


def _cached_peak(key: str, measure) -> float:
    """The TFLOP/s kept under `key` (JSON, in the kernel cache directory's parent), else
    measure()'s, kept for later processes."""
    base = os.environ.get("FLASHJIT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "flashjit")
    path = os.path.join(base, "peak_tflops.json")
    try:
        with open(path) as file:
            known = json.load(file)
    except (OSError, ValueError):
        known = {}
    if key in known:
        return float(known[key])
    tflops = measure()
    known[key] = tflops
    try:
        os.makedirs(base, exist_ok=True)
        with open(path + ".tmp", "w") as file:
            json.dump(known, file)
        os.replace(path + ".tmp", path)
    except OSError:
        pass  # a read-only cache: measured again next time
    return tflops


def device_peak_tflops(device: str, dtype: str) -> float:
    """A square matrix product's TFLOP/s on a device in a dtype, measured once (torch) and
    kept for later processes."""
    import torch
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"

    def measure() -> float:
        size = 4096 if device.startswith("cuda") else 512
        a = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
        b = torch.randn_like(a)
        for _ in range(2):
            a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        repeats, start = 10, time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        return 2.0 * size ** 3 * repeats / (time.perf_counter() - start) / 1e12

    return _cached_peak(f"{name} {dtype}", measure)


def mlx_peak_tflops(dtype: str) -> float:
    """The same for MLX's default device, without torch: on a GPU an MLX matrix product in the
    dtype, kept under the GPU's name (flashjit's CUDA device 0: the key torch's measurement uses
    too); on the CPU numpy's float32 product (BLAS; MLX's own CPU matmul is far slower than the
    CPU's peak), kept under the CPU's core count."""
    import mlx.core as mx

    if mx.default_device() != mx.gpu:
        import numpy as np

        def measure_cpu() -> float:
            size = 1024
            a, b = (np.random.default_rng(seed).random((size, size), dtype=np.float32) for seed in (0, 1))
            a @ b
            repeats, start = 5, time.perf_counter()
            for _ in range(repeats):
                a @ b
            return 2.0 * size ** 3 * repeats / (time.perf_counter() - start) / 1e12

        return _cached_peak(f"cpu x{os.cpu_count()} float32 (numpy)", measure_cpu)
    try:
        from . import cuda
        name = cuda.device_info()["name"]
    except Exception:  # noqa: BLE001 (MLX on a GPU that flashjit's CUDA backend does not see)
        name = "mlx gpu"

    def measure() -> float:
        size = 4096
        a = mx.random.normal((size, size)).astype(getattr(mx, dtype))
        b = mx.random.normal((size, size)).astype(getattr(mx, dtype))
        mx.eval(a, b)
        for _ in range(2):
            mx.eval(a @ b)
        repeats, start = 10, time.perf_counter()
        for _ in range(repeats):
            mx.eval(a @ b)
        return 2.0 * size ** 3 * repeats / (time.perf_counter() - start) / 1e12

    return _cached_peak(f"{name} {dtype}", measure)


class profile:  # noqa: N801  (used as a context manager, like torch.profiler.profile)
    """Records every attention call inside the block (module doc). ``report``
    prints the table at exit; ``json_path`` writes to_json() there."""

    def __init__(self, *, sync: bool = False, framework: bool = False, peak: bool = False, report: bool = False,
                 json_path: Optional[str] = None, alone: bool = False, model=None):
        self.profile = Profile(sync=sync, framework=framework, peak=peak, alone=alone)
        self.report, self.json_path, self.model = report, json_path, model
        self._saved_sdpa = None
        self._saved_fast = None
        self._hooks: list = []

    def __enter__(self) -> Profile:
        global _active
        if _active is not None:
            raise RuntimeError("[profile] a profile block is already open; profile blocks do not nest")
        self._sync_devices()
        self._torch_peak_reset()
        if self.model is not None:  # first: a bad model leaves nothing hooked
            self._hook_layers(self.model)
        if self.profile.framework:
            self._hook_torch_sdpa()
            self._hook_mx_fast()
        self._start = time.perf_counter()
        _active = self.profile
        for listener in _open_listeners:
            listener(True)
        return self.profile

    def __exit__(self, *exc) -> None:
        global _active
        _active = None
        for listener in _open_listeners:
            listener(False)
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        if self._saved_sdpa is not None:
            import torch.nn.functional as F
            F.scaled_dot_product_attention = self._saved_sdpa
        if self._saved_fast is not None:
            import mlx.core as mx
            mx.fast.scaled_dot_product_attention = self._saved_fast
        self._sync_devices()
        prof = self.profile
        prof.elapsed_ms = (time.perf_counter() - self._start) * 1e3
        prof.peak_memory_mib = self._torch_peak()  # the block's, before alone=True's replays allocate
        if exc and exc[0] is not None:
            prof._replays.clear()  # the block failed: nothing is run again (those calls keep no time)
        prof._resolve()
        if prof.measure_peak:
            for device, dtype in {(c.device, c.dtype) for c in prof.calls}:
                prof.peaks[f"{device} {dtype}"] = device_peak_tflops(device, dtype)
        if self.json_path:
            with open(self.json_path, "w") as file:
                json.dump(prof.to_json(), file, indent=1)
        if self.report:
            print(prof.table())

    def _sync_devices(self) -> None:
        torch = _torch_with_cuda()
        if torch is not None:
            torch.cuda.synchronize()

    def _torch_peak_reset(self) -> None:
        torch = _torch_with_cuda()
        if torch is not None:
            torch.cuda.reset_peak_memory_stats()

    def _torch_peak(self) -> float:
        torch = _torch_with_cuda()
        if torch is not None:
            return torch.cuda.max_memory_allocated() / 2 ** 20
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's high-water mark

    def _hook_layers(self, model) -> None:
        """Forward hooks on the model's attention modules (torch: the innermost modules whose class
        name has "Attention" in it, e.g. LlamaAttention), so that each call made inside one is
        recorded with its name (model.named_modules()'s); the backward takes its forward's."""
        try:
            named = list(model.named_modules())
        except AttributeError:
            raise TypeError("[profile] model: expected a torch.nn.Module") from None
        found = [(name, module) for name, module in named if "attention" in type(module).__name__.lower()]
        names = [name for name, _ in found]
        for name, module in found:
            if any(other != name and other.startswith(name + ".") for other in names):
                continue  # an outer module holding another attention module: the inner one names the calls
            label = name or type(module).__name__
            stack: list = []

            def enter(module, args, label=label, stack=stack):
                stack.append(current_layer())
                _layers.name = label

            def leave(module, args, output, stack=stack):
                _layers.name = stack.pop() if stack else ""

            self._hooks.append(module.register_forward_pre_hook(enter))
            self._hooks.append(module.register_forward_hook(leave, always_call=True))

    def _hook_mx_fast(self) -> None:
        """mx.fast.scaled_dot_product_attention's calls inside the block (where MLX is loaded)."""
        import sys
        if "mlx.core" not in sys.modules:
            return
        import mlx.core as mx
        original = mx.fast.scaled_dot_product_attention
        self._saved_fast = original
        prof = self.profile

        def recorded(q, k, v, *args, scale=None, mask=None, **kwargs):
            causal = 2 if isinstance(mask, str) and mask == "causal" else 0
            array_mask = None if isinstance(mask, str) else mask
            prof.record_mlx("mx.fast", lambda q, k, v: original(q, k, v, *args, scale=scale, mask=mask, **kwargs),
                            q, k, v, causal=causal, mask=array_mask)
            return original(q, k, v, *args, scale=scale, mask=mask, **kwargs)

        mx.fast.scaled_dot_product_attention = recorded

    def _hook_torch_sdpa(self) -> None:
        """torch's SDPA calls inside the block (those not served by flashjit), timed forward and,
        where an input requires grad, backward (_TorchBackward)."""
        try:
            import torch
            import torch.nn.functional as F
        except ImportError:
            return
        original = F.scaled_dot_product_attention
        self._saved_sdpa = original
        prof = self.profile

        def timed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *args, **kwargs):
            from . import sdpa
            if original is sdpa._routed or getattr(original, "__module__", "").startswith("flashjit"):
                return original(query, key, value, attn_mask, dropout_p, is_causal, *args, **kwargs)
            causal = 1 if is_causal else 0
            backward = None
            if torch.is_grad_enabled():
                inputs = [query, key, value, attn_mask]
                chosen = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.requires_grad]
                if chosen:
                    backward = _TorchBackward(prof.describe("backward", "torch", query, key, value, causal=causal,
                                                            mask=attn_mask, dropout_p=dropout_p))
                    marked = _end_backward_function().apply(backward, *(inputs[i] for i in chosen))
                    for i, x in zip(chosen, marked):
                        inputs[i] = x
                    query, key, value, attn_mask = inputs
            call = prof.begin("forward", "torch", query, key, value, causal=causal, mask=attn_mask,
                              dropout_p=dropout_p)
            out = original(query, key, value, attn_mask, dropout_p, is_causal, *args, **kwargs)
            if prof.alone:
                _offer_torch_replays(prof, call, backward, original, (query, key, value, attn_mask),
                                     (dropout_p, is_causal, *args), kwargs)
            prof.end(call)
            node = getattr(out, "grad_fn", None)
            if backward is not None and node is not None:
                node.register_prehook(backward.begin)
            return out

        F.scaled_dot_product_attention = timed


def _offer_torch_replays(prof: Profile, call: Call, backward, original, inputs, args, kwargs) -> None:
    """An alone=True profile's replays of a torch SDPA call (the first of its kind): the forward on
    the call's inputs (detached), and, where the call has a backward, the backward through a graph
    made once at the exit on inputs that require grad as the call's did, its gradients taken again
    (retain_graph) with a fixed random output gradient."""
    import torch

    kept = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in inputs)
    if prof.wants_replay(call):
        prof.offer_replay(call, lambda: original(*kept, *args, **kwargs))
    if backward is None or not prof.wants_replay(backward.described):
        return
    wanted = [isinstance(x, torch.Tensor) and x.requires_grad for x in inputs]
    graph = {}

    def run_backward():
        if not graph:  # the forward once, outside the timed repeats
            leaves = tuple(x.requires_grad_(True) if want else x
                           for x, want in zip((x.clone() if isinstance(x, torch.Tensor) else x for x in kept), wanted))
            with torch.enable_grad():
                out = original(*leaves, *args, **kwargs)
            graph.update(out=out, leaves=[x for x, want in zip(leaves, wanted) if want], grad=torch.randn_like(out))
        torch.autograd.grad(graph["out"], graph["leaves"], graph["grad"], retain_graph=True)

    prof.offer_replay(backward.described, run_backward)


class _TorchBackward:
    """The backward of one torch SDPA call made in a profile(framework=True) block. It begins
    when the gradient reaches the call's output (a pre-hook on the output's autograd node, which
    runs before that node: the call's own backward node, or the last of the ops of torch's math
    path) and ends when the gradients of the call's inputs that require grad are computed (the
    backward of an identity autograd.Function around those inputs, which runs once all of them
    are). Recorded by the profile block open then, if it has framework=True, as flashjit's
    backward is by the block open when it runs; each backward pass through the call (retain_graph)
    is a record of its own. Holds no tensors: the record's description is made at the forward."""

    __slots__ = ("described", "call", "profile")

    def __init__(self, described: Call):
        self.described, self.call, self.profile = described, None, None

    def begin(self, grad_outputs) -> None:
        profile = _active
        if profile is None or not profile.framework:
            return
        self.profile, self.call = profile, replace(self.described)
        profile.start(self.call)

    def end(self) -> None:
        call, self.call = self.call, None
        if call is not None:
            self.profile.end(call)


@functools.lru_cache(maxsize=None)
def _end_backward_function():
    """The identity autograd.Function whose backward ends a _TorchBackward (built on first use:
    this module imports without torch)."""
    import torch

    class EndBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, backward, *inputs):
            ctx.backward = backward
            ctx.set_materialize_grads(False)  # an input's missing gradient stays None, not zeros
            return tuple(x.view_as(x) for x in inputs)

        @staticmethod
        def backward(ctx, *grads):
            ctx.backward.end()
            return (None, *grads)

    return EndBackward
