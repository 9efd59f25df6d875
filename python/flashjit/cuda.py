"""The CUDA backend's compiler and kernel cache.

Kernels are compiled by NVRTC the first time a problem needs them and cached in
memory and on disk (``$FLASHJIT_CACHE_DIR``, else ``~/.cache/flashjit``).
``precompile`` compiles ahead of time: before capturing a CUDA graph (compiling
during capture is an error) or to warm a cache; with ``arch`` given it needs
NVRTC only, no GPU.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import Iterable

from . import _C
from .options import AttentionOptions

_DTYPES = _C.DTYPES
_MASKS = {None: 0, "none": 0, "bool": 1, "additive": 2}


@dataclass(frozen=True)
class KernelConfig:
    """What a kernel is specialised on (sizes and pointers are run-time values)."""

    dtype: str = "bfloat16"  # float32, float16, bfloat16 or float64
    head_dim: int = 128
    head_dim_v: int | None = None  # defaults to head_dim
    backward: bool = False  # the backward's kernels instead of the forward's
    mask: str | None = None  # None, "bool" or "additive"
    mask_dtype: str = "float32"  # additive masks: float32 or dtype
    window: bool = False  # causal or sliding-window bounds
    dropout: bool = False
    softcap: bool = False
    # backward: False also compiles what a backward with deterministic=False takes
    # (flashjit.attention's keyword), where that differs
    deterministic: bool = True

    def _tuple(self, arch: int, device_index: int) -> tuple:
        if self.dtype not in ("float32", "float16", "bfloat16", "float64"):
            raise TypeError(f"[precompile] dtype: expected float32, float16, bfloat16 or float64, got {self.dtype!r}")
        if self.mask not in _MASKS:
            raise ValueError(f"[precompile] mask: expected None, 'bool' or 'additive', got {self.mask!r}")
        if self.mask_dtype not in _DTYPES:
            raise TypeError(f"[precompile] mask_dtype: expected float32 or the dtype, got {self.mask_dtype!r}")
        if not isinstance(self.deterministic, bool):
            raise TypeError(f"[precompile] deterministic: expected True or False, got {self.deterministic!r}")
        head_dim_v = self.head_dim if self.head_dim_v is None else self.head_dim_v
        return (self.backward, _DTYPES[self.dtype], self.head_dim, head_dim_v, _MASKS[self.mask],
                _DTYPES[self.mask_dtype], self.window, self.dropout, self.softcap, arch, device_index,
                not self.deterministic)


def common_configs() -> list[KernelConfig]:
    """Forward and backward of the usual training and inference problems."""
    configs = []
    for dtype in ("bfloat16", "float16"):
        for head_dim in (64, 128):
            for window in (False, True):
                for backward in (False, True):
                    configs.append(KernelConfig(dtype=dtype, head_dim=head_dim, window=window, backward=backward))
    return configs


def precompile(configs: Iterable[KernelConfig] | None = None, *, arch: int = 0, device: int = 0,
               progress: bool = False) -> int:
    """Compiles (or finds cached) the kernels of each config; returns how many configs.

    ``arch`` (e.g. 90) compiles for that target without a GPU; 0 uses the arch of
    ``device``. ``progress`` prints one line per config to stderr.
    """
    configs = list(common_configs() if configs is None else configs)
    for index, config in enumerate(configs):
        if progress:
            print(f"[{index + 1}/{len(configs)}] {config}", file=sys.stderr, flush=True)
        _C.cuda_precompile([config._tuple(arch, device)])
    return len(configs)


def device_count() -> int:
    """CUDA devices visible to the driver (0 without a driver or GPU)."""
    return _C.cuda_device_count()


def is_available() -> bool:
    return "cuda" in _C.backends().split(",") and device_count() > 0


def device_info(device: int = 0) -> dict:
    arch, multiprocessors, name = _C.cuda_device_info(device)
    return {"name": name, "arch": arch, "multiprocessors": multiprocessors}


def nvrtc_version() -> tuple[int, int]:
    return _C.cuda_nvrtc_version()


def cache_dir(arch: int = 0) -> str:
    """The disk cache's base directory, or the directory of one arch's kernels."""
    return _C.cuda_cache_dir(arch)


def cache_stats() -> dict:
    """Compiles, disk loads and memory hits in this process, and the last timings."""
    return _C.cuda_cache_stats()


def clear_memory_cache() -> None:
    _C.cuda_clear_memory_cache()


# Files the kernel cache writes in <base>/<version>/sm_<arch>/: the cubin entry,
# its generated source and NVRTC log, their lock files and temporary files.
_CACHE_FILE = re.compile(r"^(simt|mma|hopper)-[A-Za-z0-9_.+-]+-[0-9a-f]{32}\.(cubin|cu|log)(\.lock|\.tmp\.\d+)?$")
_ARCH_DIR = re.compile(r"^sm_\d+$")


def remove_cache_files(version: str | None = None) -> dict:
    """Deletes flashjit's kernel files from the disk cache: one version's (a
    version string) or every version's (None). Files flashjit did not write stay,
    and so do the folders holding them. Returns what was removed: {"files",
    "bytes", "folders"} (folders: the ones left empty and removed), and "kept"
    (other files found in the cache's arch folders, left in place)."""
    base = cache_dir()
    removed = {"files": 0, "bytes": 0, "folders": [], "kept": []}
    if not os.path.isdir(base):
        return removed
    versions = [version] if version is not None else sorted(os.listdir(base))
    for name in versions:
        version_dir = os.path.join(base, name)
        if not os.path.isdir(version_dir) or os.path.islink(version_dir):
            continue
        arch_dirs = [d for d in sorted(os.listdir(version_dir)) if _ARCH_DIR.match(d)]
        for arch in arch_dirs:
            arch_dir = os.path.join(version_dir, arch)
            if not os.path.isdir(arch_dir) or os.path.islink(arch_dir):
                continue
            for entry in sorted(os.listdir(arch_dir)):
                path = os.path.join(arch_dir, entry)
                if _CACHE_FILE.match(entry) and os.path.isfile(path) and not os.path.islink(path):
                    size = os.lstat(path).st_size
                    os.remove(path)
                    removed["files"] += 1
                    removed["bytes"] += size
                else:
                    removed["kept"].append(path)
            if not os.listdir(arch_dir):
                os.rmdir(arch_dir)
                removed["folders"].append(arch_dir)
        if arch_dirs and not os.listdir(version_dir):
            os.rmdir(version_dir)
            removed["folders"].append(version_dir)
    return removed


def clear_cache() -> dict:
    """Deletes flashjit's kernel files from the disk cache (every version and arch;
    files flashjit did not write stay) and forgets what memory holds. Returns what
    was removed (remove_cache_files)."""
    removed = remove_cache_files(None)
    clear_memory_cache()
    return removed


# ---- tile choices measured on the device ------------------------------------------------------

# Candidate FLASHJIT_CUDA_TILES settings per padded head dim; "softmax=fast" forces
# nothing beyond the built-in choice (it stands for it while tuning, whatever a
# tuning file says).
# The hand-set choice of every class (a forced configuration that changes nothing),
# always a candidate; the tuner stores it by this name where it wins, so that the
# device's file, not the built-in table, decides the class.
_HAND_SET = "softmax=fast"
_CANDIDATES = {
    64: [_HAND_SET, "groups=3", "groups=3,n=112", "groups=3,n=128", "groups=3,stages=3", "stages=3,q=1", "n=96",
         "n=160", "n=176", "n=192,q=1"],
    128: [_HAND_SET, "n=96", "n=160", "n=176,q=1", "stages=3,q=1", "n=192,q=1"],
    192: [_HAND_SET, "n=64", "n=112,q=1"],
    256: [_HAND_SET, "n=64", "n=48,q=2"],
}


def tuning_key(config: KernelConfig, seqlen_k: int, arch: int = 90) -> str:
    """The problem class a tuned choice applies to (the tuning file's first column)."""
    return _C.cuda_tuning_key(config._tuple(arch, 0), int(seqlen_k))


def tuning_info(device: int = 0) -> str:
    """The device's tuning file and the choices it holds, or why it is ignored."""
    info = device_info(device)
    return _C.cuda_describe_tuning(info["name"], info["arch"])


# The backward's passes the tuner times, as the settings that run them; split is the hand-set one.
# one-pass-diagonal (the one pass with the diagonal order, FLASHJIT_CUDA_ONE_PASS_DQ=writer-diagonal)
# only under causal bounds, where its walk differs from the one pass's.
_BACKWARD_PASSES = {
    "split": {"FLASHJIT_CUDA_BACKWARD": "split", "FLASHJIT_CUDA_ONE_PASS_DQ": None,
              "FLASHJIT_CUDA_ONE_PASS_STEPS": None},
    "one-pass": {"FLASHJIT_CUDA_BACKWARD": "one-pass", "FLASHJIT_CUDA_ONE_PASS_DQ": None,
                 "FLASHJIT_CUDA_ONE_PASS_STEPS": None},
    "one-pass-diagonal": {"FLASHJIT_CUDA_BACKWARD": "one-pass", "FLASHJIT_CUDA_ONE_PASS_DQ": "writer-diagonal",
                          "FLASHJIT_CUDA_ONE_PASS_STEPS": None},
}


def _apply_environment(values: dict) -> None:
    """Sets each variable to its value, unsets those whose value is None."""
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def tune(head_dims=(64, 128, 256), seqlens=(1024, 4096, 16384), causal=(False, True),
         dtype: str | tuple = ("bfloat16", "float16"), candidates: dict | None = None, device: int = 0,
         margin: float = 0.02, progress: bool = True, backward: bool = False, variants: tuple = ()) -> dict:
    """Times candidate tile configurations of the sm_90a forward on this GPU, per problem
    class (dtype, head dim, causal bounds, key length band), and stores each class's
    fastest in the device's tuning file, which later forwards take before the built-in
    table (classes measured before and not now keep their entries); a candidate must
    beat the hand-set choice by `margin` to be stored instead of it. With backward=True,
    the backward's passes instead (split, the hand-set one; one-pass; and for causal classes
    one-pass-diagonal, the one pass's diagonal order; at head dims 33-128; `candidates` plays no
    part), stored under the classes' backward keys. variants: FLASHJIT_CUDA_TILES keys added to each forward candidate as a
    candidate of its own (e.g. ("chain=tiles",): every candidate also chained). Problems:
    B*N = 16k tokens, H = 2048 / D. Returns {class key: {"tiles": chosen, "tflops":
    {candidate: TFLOP/s}}}. Needs torch and an sm_90 GPU."""
    import statistics

    import torch

    from . import api, ops

    dtypes = (dtype,) if isinstance(dtype, str) else tuple(dtype)
    if not dtypes or any(d not in ("bfloat16", "float16") for d in dtypes):
        raise ValueError(f"[tune] dtype: expected 'bfloat16', 'float16' or both, got {dtype!r}")
    for name, values in (("head_dims", head_dims), ("seqlens", seqlens)):
        if not values or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in values):
            raise ValueError(f"[tune] {name}: expected positive integers, got {values!r}")
    if backward and variants:
        raise ValueError("[tune] variants: FLASHJIT_CUDA_TILES keys of the forward; the backward tunes its pass")
    for variant in variants:
        if not isinstance(variant, str) or "=" not in variant:
            raise ValueError(f"[tune] variants: expected FLASHJIT_CUDA_TILES keys such as 'chain=tiles', got {variant!r}")
    info = device_info(device)
    if info["arch"] != 90:
        raise NotImplementedError(f"[tune] the tuned kernels are sm_90a ones; device {device} ({info['name']}) is "
                                  f"sm_{info['arch']}")
    candidates = candidates or _CANDIDATES
    hand_set = "split" if backward else _HAND_SET

    def choices(head_dim, is_causal):
        padded = -(-head_dim // 64) * 64
        if backward:
            return [name for name in _BACKWARD_PASSES if is_causal or name != "one-pass-diagonal"]
        base = candidates.get(padded, [_HAND_SET])
        return base + [f"{choice},{variant}" for variant in variants for choice in base]

    def settings_of(choice):  # the environment a candidate runs under
        return _BACKWARD_PASSES[choice] if backward else {"FLASHJIT_CUDA_TILES": choice}

    if backward:  # the one pass runs at head dims 33-128 (32 or less: mma.sync, one backward)
        head_dims = [d for d in head_dims if 32 < d <= 128]
    problems = [(t, d, n, c) for t in dtypes for d in head_dims for n in seqlens for c in causal]
    variables = tuple(_BACKWARD_PASSES["split"]) if backward else ("FLASHJIT_CUDA_TILES",)
    results, saved = {}, {name: os.environ.get(name) for name in variables}
    with torch.cuda.device(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        for index, (dtype, head_dim, seqlen, is_causal) in enumerate(problems):
            batch, heads = max(1, 16384 // seqlen), max(1, 2048 // head_dim)
            q, k, v = (torch.randn(batch, heads, seqlen, head_dim, device=f"cuda:{device}",
                                   dtype=getattr(torch, dtype)) for _ in range(3))
            flops = 4 * batch * heads * seqlen * seqlen * head_dim // (2 if is_causal else 1)
            key = tuning_key(KernelConfig(dtype=dtype, head_dim=head_dim, window=bool(is_causal), backward=backward),
                             seqlen)
            options = AttentionOptions(causal=1 if is_causal else 0)
            if backward:
                flops = flops * 5 // 2
                o, lse = ops.attention(q, k, v, options)
                dout = torch.randn_like(o)
                call = lambda: api.attention_backward(q, k, v, o, lse, dout, causal=bool(is_causal))  # noqa: E731
            else:
                call = lambda: ops.attention(q, k, v, options)  # noqa: E731
            measured = {}
            for choice in choices(head_dim, is_causal):
                _apply_environment(settings_of(choice))
                try:
                    call()
                    torch.cuda.synchronize(device)
                    samples = []
                    stream = torch.cuda.current_stream(device)
                    for _ in range(5):
                        start.record(stream)
                        for _ in range(5):
                            call()
                        end.record(stream)
                        end.synchronize()
                        samples.append(start.elapsed_time(end) / 5)
                    measured[choice] = flops / statistics.median(samples) / 1e9
                except (ValueError, NotImplementedError) as error:
                    if "is not valid" in str(error):
                        raise  # a malformed setting (a variant's keys): not a candidate without room
                    continue  # no room for this candidate here
            if not measured:
                continue  # no candidate could run here
            best = max(measured, key=measured.get)
            if measured[best] < measured.get(hand_set, 0.0) * (1 + margin):
                best = hand_set
            results[key] = {"tiles": best, "tflops": measured}
            if progress:
                print(f"[{index + 1}/{len(problems)}] {key}: {best} "
                      + ", ".join(f"{t} {x:.0f}" for t, x in measured.items()), file=sys.stderr, flush=True)
    finally:
        _apply_environment(saved)
    entries = "".join(f"{key} {r['tiles']} {r['tflops'][r['tiles']]:.1f}\n" for key, r in results.items())
    results_path = _C.cuda_save_tuning(info["name"], info["arch"], entries)
    if progress:
        print(f"tuning file: {results_path}", file=sys.stderr)
    return results
