"""flashjit's own host time per CUDA call, on a machine without a GPU: the null driver
(tests/null_driver/null_cuda.c, built here with cc) stands in for libcuda.so.1 as one sm_90
device, NVRTC compiles the kernels for real, and `_C.forward` / `_C.backward` run with CUDA
descriptors through validation, kernel choice, TMA descriptors, scratch and launches, which the
driver counts instead of running. What it measures leaves out the driver's own time (a launch,
an encode, a pool allocation: bench/driver_calls.py times those on a GPU) and torch's.

    python bench/null_host.py [--calls N] [--callgrind]

--callgrind reruns each call kind under valgrind's callgrind and prints instructions a call and
the functions that take most of them (valgrind must be installed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "..", "tests", "null_driver", "null_cuda.c")


def build_driver(folder: str) -> str:
    """Compiles the null driver into folder/libcuda.so.1; returns the folder."""
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", os.path.join(folder, "libcuda.so.1"), SOURCE], check=True)
    return folder


# The child: runs under the null driver (LD_LIBRARY_PATH), prints a line a call kind.
CHILD = r'''
import ctypes, statistics, sys, time
import numpy as np
from flashjit import _C

calls, which = int(sys.argv[1]), sys.argv[2]
CUDA, BF16, F32 = _C.DEVICES["cuda"], _C.DTYPES["bfloat16"], _C.DTYPES["float32"]
keep = []

def descriptor(shape, dtype=BF16, size=2):
    count = int(np.prod(shape))
    memory = np.empty(count * size + 256, np.uint8)
    keep.append(memory)
    strides, stride = [], 1
    for dim in reversed(shape):
        strides.append(stride)
        stride *= dim
    return ((memory.ctypes.data + 255) // 256 * 256, dtype, CUDA, 0, tuple(shape), tuple(reversed(strides)))

shape = (1, 1, 16, 64)
q, k, v, o, dout, dq, dk, dv = (descriptor(shape) for _ in range(8))
lse = descriptor(shape[:3], F32, 4)
scalars = (None, None, 0.0, 0, -1, -1, 0.0, 0, 0, 0, 7)
kinds = {
    "forward: validation (check_only)": lambda: _C.forward(q, k, v, o, lse, *scalars, check_only=True),
    "forward: planning (prepare)": lambda: _C.forward(q, k, v, o, lse, *scalars, prepare=True),
    "forward: call": lambda: _C.forward(q, k, v, o, lse, *scalars),
    "forward: call without LSE": lambda: _C.forward(q, k, v, o, None, *scalars),
    "backward: validation (check_only)": lambda: _C.backward(q, k, v, o, lse, dout, dq, dk, dv, *scalars,
                                                             check_only=True),
    "backward: planning (prepare)": lambda: _C.backward(q, k, v, o, lse, dout, dq, dk, dv, *scalars, prepare=True),
    "backward: call": lambda: _C.backward(q, k, v, o, lse, dout, dq, dk, dv, *scalars),
}
driver = ctypes.CDLL("libcuda.so.1")
counts = (ctypes.c_ulonglong * 4)()
for fn in kinds.values():  # compiles (or loads) the kernels, encodes the descriptors
    fn()
for name, fn in kinds.items():
    if which != "all" and name != which:
        continue
    driver.null_driver_counts(counts)
    before = list(counts)
    samples = []
    for _ in range(7 if which == "all" else 1):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    driver.null_driver_counts(counts)
    done = calls * len(samples)
    per_call = [(after - first) / done for first, after in zip(before, counts)]
    print(f"{name}\t{statistics.median(samples):.2f}\t{per_call[0]:.2f}\t{per_call[1]:.2f}\t{per_call[2]:.2f}",
          flush=True)
'''


def run_child(folder: str, calls: int, which: str, callgrind: str | None = None) -> str:
    env = dict(os.environ, LD_LIBRARY_PATH=folder + os.pathsep + os.environ.get("LD_LIBRARY_PATH", ""))
    command = [sys.executable, "-c", CHILD, str(calls), which]
    if callgrind:
        command = ["valgrind", "--tool=callgrind", "--toggle-collect=nanobind::detail::nb_func_vectorcall*",
                   f"--callgrind-out-file={callgrind}"] + command
    return subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--callgrind", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        build_driver(folder)
        print("| call (B1 H1 S16 D64 bf16, null sm_90 driver) | µs a call | launches | descriptors encoded | "
              "scratch allocations |")
        print("|---|---:|---:|---:|---:|")
        kinds = []
        for line in run_child(folder, args.calls, "all").splitlines():
            name, us, launches, encodes, allocs = line.split("\t")
            kinds.append(name)
            print(f"| {name} | {us} | {launches} | {encodes} | {allocs} |", flush=True)
        if args.callgrind:
            print("\n| call | instructions a call (callgrind) |\n|---|---:|")
            for name in kinds:
                totals = []
                for calls in (1000, 3000):  # the difference leaves out the first calls' compiles and loads
                    out = os.path.join(folder, "callgrind.out")
                    run_child(folder, calls, name, callgrind=out)
                    text = subprocess.run(["callgrind_annotate", out], capture_output=True, text=True).stdout
                    total = next(line for line in text.splitlines() if "PROGRAM TOTALS" in line)
                    totals.append(int(total.split()[0].replace(",", "")))
                print(f"| {name} | {(totals[1] - totals[0]) / 2000:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
