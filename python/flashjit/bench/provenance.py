"""What a record says about where it was measured: CPU, GPU, versions, commit, command, load."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from typing import TYPE_CHECKING


from .cases import ERROR_CASE, _first_line


if TYPE_CHECKING:
    from . import Config

def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> tuple[str, bool | None]:
    """FLASHJIT_COMMIT, else the commit of the flashjit checkout in the working directory."""
    commit = os.environ.get("FLASHJIT_COMMIT", "").strip()
    if commit:
        return commit, None

    def git(*args):
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        top = git("rev-parse", "--show-toplevel")
        if not top or not os.path.exists(os.path.join(top, "python", "flashjit", "__init__.py")):
            return "", None
        return git("rev-parse", "--short", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "", None


def record_commit() -> str:
    """What a record's name and header say it was measured at: FLASHJIT_COMMIT (a GPU machine
    may get the tree without its history), else the checkout's commit, else (an installed
    package outside a checkout) the version, as "v0.1.0"."""
    import flashjit

    commit, _ = _git_commit()
    return commit or f"v{flashjit.__version__}"


def metadata(config: Config, argv: list[str]) -> dict:
    import torch

    import flashjit

    commit, dirty = _git_commit()
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["flashjit", "bench", *argv]),
        "argv": sys.argv,
        "flashjit": flashjit.__version__,
        "commit": commit or f"v{flashjit.__version__}",
        "worktree_modified": dirty,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": config.device,
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "flashjit_threads": int(os.environ.get("FLASHJIT_NUM_THREADS", "0") or 0) or os.cpu_count(),
        "config": {key: value for key, value in asdict(config).items() if key != "notes"},
        "timing": ("CUDA events, one synchronised run at a time" if config.device == "cuda" else "wall clock")
                  + f", median of {config.repeats} runs after warm-up",
        "flops": "forward 4*B*H*N*N*D (halved for causal), backward 2.5x, fwdbwd 3.5x",
        "error_case": ERROR_CASE,
        "load_average_before": _load_average(),
        "notes": config.notes,
    }
    if config.device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        meta.update(gpu=props.name, gpu_arch=f"sm_{props.major}{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
        try:
            meta["nvrtc"] = ".".join(map(str, flashjit.cuda.nvrtc_version()))
        except Exception as error:  # noqa: BLE001
            meta["nvrtc"] = _first_line(error)
        if "flex" in config.impls:
            meta["flex"] = (f"torch.compile(flex_attention, dynamic={config.flex_compile == 'dynamic'}); "
                            "causal through a block mask")
    return meta


class CpuShare:
    """The share of the machine's CPU time that other processes (and the hypervisor, as steal
    time) took while the sweep ran: work beside a CPU benchmark skews its timings."""

    def __init__(self):
        self._start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as stat:
                fields = [int(x) for x in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
        times = os.times()
        return time.monotonic(), busy, fields[7], times.user + times.system

    def shares(self) -> dict:
        end = self._sample()
        if self._start is None or end is None:
            return {}
        ticks = os.sysconf("SC_CLK_TCK")
        wall = (end[0] - self._start[0]) * (os.cpu_count() or 1)
        others = (end[1] - self._start[1]) / ticks - (end[3] - self._start[3])
        steal = (end[2] - self._start[2]) / ticks
        return {"other_processes": round(max(0.0, others - steal) / wall, 3), "steal": round(steal / wall, 3)}


def _load_average() -> float | None:
    """The system's 1-minute load average: other work on the machine skews CPU timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def device_tag(meta: dict) -> str:
    """'cpu', or a short GPU name ('h100') for file names."""
    if meta["device"] != "cuda":
        return "cpu"
    import re

    found = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", meta.get("gpu", ""))
    return found.group(1).lower() if found else "cuda"
