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
COLUMNS = ("impl", "device", "dtype", "batch", "heads", "seqlen", "head_dim", "causal", "heads_kv", "seqlen_q",
           "masked", "mode", "ms", "tflops", "flashjit_speedup", "peak_mib", "err_out", "err_grad", "runs", "status",
           "reason")
# Problem families (`flashjit bench --suite`): prefill (self-attention, Sq = Sk = N), gqa (key/value
# heads H / 4), masked (a boolean key-padding mask: odd batch entries lose their last N / 4 keys),
# decode (one query against N keys; forward only, no causal mask).
SUITES = {
    "prefill": "self-attention, Sq = Sk = N",
    "gqa": "grouped-query attention, H / 4 key/value heads (enable_gqa)",
    "masked": "a boolean key-padding mask [B, 1, 1, N]: odd batch entries lose their last N / 4 keys",
    "decode": "one query token against N keys (Sq = 1), forward only, no causal mask",
}
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
    heads_kv: int = 0    # 0: heads (no grouping)
    seqlen_q: int = 0    # 0: seqlen (self-attention); 1: decoding
    masked: bool = False  # a key-padding mask (SUITES["masked"])

    @property
    def kv_heads(self) -> int:
        return self.heads_kv or self.heads

    @property
    def queries(self) -> int:
        return self.seqlen_q or self.seqlen

    def label(self) -> str:
        return (f"{self.dtype} B{self.batch} H{self.heads}" + (f"/{self.heads_kv}" if self.heads_kv else "")
                + (f" Sq{self.seqlen_q}" if self.seqlen_q else "") + f" N{self.seqlen} D{self.head_dim}"
                + (" causal" if self.causal else "") + (" masked" if self.masked else ""))


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
    """docs/measurement.md: forward 4·B·H·Sq·Sk·D, halved for causal; backward 2.5×, both 3.5×
    (a padding mask's hidden keys are counted: the work of the dense problem)."""
    forward = 4.0 * case.batch * case.heads * case.queries * case.seqlen * case.head_dim
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
