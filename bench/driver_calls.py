"""Host time of the CUDA driver calls a flashjit call makes, each alone (no GPU work waits on them).

Calls the driver (libcuda) through ctypes, each many times in a row, and subtracts the time of
a call that does nothing (cuDriverGetVersion), so that what is left is the driver's own work:
the current context, the stream's capture state and id, a TMA descriptor's encoding, a
stream-ordered allocation and its free from a memory pool, a small memset, and launches of an
empty kernel with parameters of 8 bytes and of flashjit's KernelParams size. What a call of
`_C.forward` costs beyond these is flashjit's own host code (bench/overhead.py).

    python bench/driver_calls.py [--calls 20000] [--out DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import statistics
import sys
import time

PARAM_BYTES = 1152  # about sizeof(KernelParams): five 128-byte TMA descriptors and the rest

# An empty kernel for each parameter size; the driver compiles the PTX for the device.
PTX = """
.version 8.0
.target sm_80
.address_size 64
.visible .entry empty_small(.param .u64 p) { ret; }
.visible .entry empty_large(.param .align 64 .b8 p[%d]) { ret; }
""" % PARAM_BYTES


def check(result, what):
    if result != 0:
        raise RuntimeError(f"{what} failed with CUresult {result}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None, help="folder for the markdown record (default: print only)")
    args = parser.parse_args(argv)

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        print("driver_calls.py needs the CUDA driver (libcuda.so.1), which this machine does not have")
        return 2
    check(cuda.cuInit(0), "cuInit")
    device, context = ctypes.c_int(), ctypes.c_void_p()
    check(cuda.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
    check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "cuDevicePrimaryCtxRetain")
    check(cuda.cuCtxSetCurrent(context), "cuCtxSetCurrent")
    name = ctypes.create_string_buffer(256)
    check(cuda.cuDeviceGetName(name, 256, device), "cuDeviceGetName")
    stream = ctypes.c_void_p()
    check(cuda.cuStreamCreate(ctypes.byref(stream), 1), "cuStreamCreate")  # non-blocking

    module = ctypes.c_void_p()
    check(cuda.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(PTX.encode())), "cuModuleLoadData")
    small, large = ctypes.c_void_p(), ctypes.c_void_p()
    check(cuda.cuModuleGetFunction(ctypes.byref(small), module, b"empty_small"), "cuModuleGetFunction")
    check(cuda.cuModuleGetFunction(ctypes.byref(large), module, b"empty_large"), "cuModuleGetFunction")

    # A bf16 operand [4, 8, 4096, 128] for the descriptor, and scratch for the memset.
    sizes = (ctypes.c_uint64 * 4)(128, 4096, 8, 4)
    strides = (ctypes.c_uint64 * 3)(256, 256 * 4096, 256 * 4096 * 8)
    box = (ctypes.c_uint32 * 4)(64, 128, 1, 1)
    element_strides = (ctypes.c_uint32 * 4)(1, 1, 1, 1)
    operand = ctypes.c_uint64()
    check(cuda.cuMemAlloc_v2(ctypes.byref(operand), ctypes.c_size_t(4 * 8 * 4096 * 128 * 2)), "cuMemAlloc")
    aligned = ctypes.create_string_buffer(128 + 64)  # a descriptor: 128 bytes, 64-byte aligned
    map_address = (ctypes.addressof(aligned) + 63) // 64 * 64

    pool = ctypes.c_void_p()
    check(cuda.cuDeviceGetDefaultMemPool(ctypes.byref(pool), device), "cuDeviceGetDefaultMemPool")
    small_param = ctypes.c_uint64(0)
    small_args = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.byref(small_param), ctypes.c_void_p))
    large_param = ctypes.create_string_buffer(PARAM_BYTES + 64)
    large_address = (ctypes.addressof(large_param) + 63) // 64 * 64
    large_args = (ctypes.c_void_p * 1)(ctypes.c_void_p(large_address))
    capture, stream_id, version = ctypes.c_int(), ctypes.c_ulonglong(), ctypes.c_int()
    current = ctypes.c_void_p()
    pointer = ctypes.c_uint64()

    def launch(function, arguments):
        return cuda.cuLaunchKernel(function, 1, 1, 1, 32, 1, 1, 0, stream, arguments, None)

    def alloc_and_free():
        check(cuda.cuMemAllocFromPoolAsync(ctypes.byref(pointer), ctypes.c_size_t(512 << 10), pool, stream),
              "cuMemAllocFromPoolAsync")
        return cuda.cuMemFreeAsync(pointer, stream)

    calls = {
        "nothing (cuDriverGetVersion): subtracted from the rest": lambda: cuda.cuDriverGetVersion(ctypes.byref(version)),
        "cuCtxGetCurrent": lambda: cuda.cuCtxGetCurrent(ctypes.byref(current)),
        "cuStreamIsCapturing": lambda: cuda.cuStreamIsCapturing(stream, ctypes.byref(capture)),
        "cuStreamGetId": lambda: cuda.cuStreamGetId(stream, ctypes.byref(stream_id)),
        "cuTensorMapEncodeTiled (bf16, 4-d, 128B swizzle)": lambda: cuda.cuTensorMapEncodeTiled(
            ctypes.c_void_p(map_address), 1, 4, ctypes.c_void_p(operand.value), sizes, strides, box,
            element_strides, 0, 3, 2, 0),
        "cuMemAllocFromPoolAsync + cuMemFreeAsync (512 KiB)": alloc_and_free,
        "cuMemsetD32Async (8 bytes)": lambda: cuda.cuMemsetD32Async(operand, 0, 2, stream),
        "cuLaunchKernel, empty kernel, 8-byte parameters": lambda: launch(small, small_args),
        f"cuLaunchKernel, empty kernel, {PARAM_BYTES}-byte parameters": lambda: launch(large, large_args),
    }
    for what, call in calls.items():  # each must work before it is timed
        check(call(), what)
    check(cuda.cuStreamSynchronize(stream), "cuStreamSynchronize")

    # Calls that enqueue work run a few hundred at a time, fewer than a stream's queue holds, so
    # that the host never waits for the GPU to make room (then the GPU's pace would be timed).
    queued = ("cuMemAllocFromPoolAsync", "cuMemsetD32Async", "cuLaunchKernel")
    results = {}
    for what, call in calls.items():
        count = min(args.calls, 256) if what.startswith(queued) else args.calls
        samples = []
        for _ in range(args.repeats * (args.calls // count if what.startswith(queued) else 1)):
            start = time.perf_counter()
            for _ in range(count):
                call()
            samples.append((time.perf_counter() - start) / count * 1e6)
            check(cuda.cuStreamSynchronize(stream), "cuStreamSynchronize")  # launched work drains between runs
        results[what] = statistics.median(samples)
    baseline = results.pop(next(iter(calls)))
    rows = [(what, us - baseline) for what, us in results.items()]

    from flashjit.bench.provenance import record_commit

    commit = record_commit()
    lines = [f"# CUDA driver calls' host time: {name.value.decode()}", "",
             f"- date: {datetime.date.today()}, commit: {commit}",
             f"- command: `python bench/driver_calls.py{' --out ' + args.out if args.out else ''}`",
             f"- median of runs of {args.calls} calls in a row through ctypes ({args.repeats} runs; calls that enqueue "
             f"work: runs of 256, the stream synchronised between runs), less a call that does nothing "
             f"({baseline:.2f} µs: ctypes' own cost); launches of 1 block of 32 threads on a non-blocking stream",
             "", "| driver call | µs a call |", "|---|---:|"]
    lines += [f"| {what} | {us:.2f} |" for what, us in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    from flashjit.bench import device_tag
    from gpu_attention import save_record  # bench/ is the script's folder

    save_record(args.out, device_tag({"device": "cuda", "gpu": name.value.decode()}), "driver-calls", commit, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
