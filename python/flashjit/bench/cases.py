"""The benchmark's cases, result rows and FLOP counts (docs/measurement.md), and
small helpers the other parts share."""

from __future__ import annotations

import math
from dataclasses import dataclass


IMPLS = ("flashjit", "naive", "sdpa-math", "sdpa-efficient", "sdpa-flash", "sdpa-cudnn", "flex")
DEFAULT_IMPLS = {"cpu": ("flashjit", "naive", "sdpa-math", "sdpa-flash"), "cuda": IMPLS}
MODES = ("fwd", "bwd", "fwdbwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}
DTYPES = ("float32", "float16", "bfloat16", "float64")
# Implementations that hold the Sq x Sk score matrix (checked against free memory first).
MATERIALISING = ("naive", "sdpa-math")
COLUMNS = ("impl", "device", "dtype", "batch", "heads", "seqlen", "head_dim", "causal", "mode", "ms", "tflops",
           "flashjit_speedup", "peak_mib", "err_out", "err_grad", "runs", "status", "reason")
ERROR_CASE = {"batch": 2, "heads": 2, "seqlen": 256}

# Sweeps sized to the device. CPU: a couple of minutes on two cores. GPU: the
# training shapes (B·N tokens, hidden = H·D; docs/measurement.md), a few minutes on an H100.
DEFAULTS = {
    "cpu": dict(dtypes=["float32"], head_dims=[64], seqlens=[256, 512, 1024, 2048], tokens=2048, hidden=512,
                modes=["fwd", "bwd", "fwdbwd"], repeats=5),
    "cuda": dict(dtypes=["bfloat16"], head_dims=[64, 128, 256], seqlens=[512, 1024, 2048, 4096, 8192, 16384],
                 tokens=16384, hidden=2048, modes=["fwd", "bwd"], repeats=20),
}
QUICK = {
    "cpu": dict(seqlens=[256, 512, 1024], modes=["fwd", "bwd"], repeats=3),
    "cuda": dict(head_dims=[128], seqlens=[1024, 4096]),
}


@dataclass(unsafe_hash=True)  # not frozen: Row extends it
class Case:
    dtype: str
    batch: int
    heads: int
    seqlen: int
    head_dim: int
    causal: bool

    def label(self) -> str:
        return (f"{self.dtype} B{self.batch} H{self.heads} N{self.seqlen} D{self.head_dim}"
                f"{' causal' if self.causal else ''}")


@dataclass
class Row(Case):
    """One result: a case, measured by one implementation in one mode (COLUMNS orders the fields in records)."""
    impl: str = ""
    device: str = ""
    mode: str = ""
    ms: float = math.nan
    tflops: float = math.nan
    flashjit_speedup: float = math.nan
    peak_mib: float = math.nan
    err_out: float = math.nan
    err_grad: float = math.nan
    runs: int = 0
    status: str = "ok"
    reason: str = ""


def flops(case: Case, mode: str) -> float:
    """docs/measurement.md: forward 4·B·H·Sq·Sk·D, halved for causal; backward 2.5×, both 3.5×."""
    forward = 4.0 * case.batch * case.heads * case.seqlen * case.seqlen * case.head_dim
    if case.causal:
        forward /= 2
    return forward * FLOP_FACTOR[mode]


def resident_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]
