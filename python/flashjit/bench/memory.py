"""Peak memory of one forward+backward (host: VmHWM; CUDA: the allocator and
flashjit's pool), and what fits."""

from __future__ import annotations

import os

from .cases import Case, _first_line, resident_kib


class _HostPeak:
    """Peak extra resident memory of a block of work in this process (Linux)."""

    def __init__(self):
        self.reason = ""
        try:
            import ctypes

            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            self._reset()
            self._kib("VmHWM")
        except (OSError, AttributeError, RuntimeError) as error:
            self._trim = None
            self.reason = f"CPU peak memory not measurable here ({_first_line(error)})"

    @property
    def available(self) -> bool:
        return self._trim is not None

    @staticmethod
    def _reset():
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current VmRSS

    @staticmethod
    def _kib(field: str) -> int:
        return resident_kib(field)

    def start(self):
        self._trim(0)  # freed heap back to the system, so that reuse does not hide growth
        self._reset()
        self._base = self._kib("VmRSS")

    def stop(self) -> float:
        return (self._kib("VmHWM") - self._base) / 1024


class _CudaPeak:
    """torch's allocator peak plus the driver's stream-ordered pool peak (flashjit's scratch)."""

    _USED_MEM_CURRENT, _USED_MEM_HIGH = 7, 8  # CUmemPool_attribute

    def __init__(self, device_index: int):
        import ctypes

        import torch

        self.reason = ""
        self._pool = None
        if torch.cuda.get_allocator_backend() != "native":
            self.reason = "torch's allocator is not the native one; the pool peak is not added"
            return
        try:
            driver = ctypes.CDLL("libcuda.so.1")
            device, pool = ctypes.c_int(), ctypes.c_void_p()
            if driver.cuDeviceGet(ctypes.byref(device), device_index) != 0:
                raise OSError("cuDeviceGet failed")
            if driver.cuDeviceGetMemPool(ctypes.byref(pool), device) != 0:
                raise OSError("cuDeviceGetMemPool failed")
            self._driver, self._handle = driver, pool
            self._pool_attribute(self._USED_MEM_CURRENT)
            self._pool = pool
        except (OSError, AttributeError) as error:
            self.reason = f"driver pool peak not read ({_first_line(error)})"

    def _pool_attribute(self, attribute: int) -> int:
        import ctypes

        value = ctypes.c_uint64()
        if self._driver.cuMemPoolGetAttribute(self._handle, attribute, ctypes.byref(value)) != 0:
            raise OSError("cuMemPoolGetAttribute failed")
        return value.value

    def start(self):
        import ctypes

        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self._base = torch.cuda.memory_allocated()
        if self._pool is not None:
            zero = ctypes.c_uint64(0)
            self._driver.cuMemPoolSetAttribute(self._handle, self._USED_MEM_HIGH, ctypes.byref(zero))
            self._pool_base = self._pool_attribute(self._USED_MEM_CURRENT)

    def stop(self) -> float:
        import torch

        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - self._base
        if self._pool is not None:
            extra += max(0, self._pool_attribute(self._USED_MEM_HIGH) - self._pool_base)
        return extra / 2**20


def _available_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _element_size(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}[dtype]


def _materialised_bytes(impl: str, case: Case) -> int:
    """Rough peak of an implementation that holds the score matrix: about four Sq x Sk
    tensors live in forward+backward (scores, probabilities, their gradients);
    SDPA's math backend computes them in float32 for half inputs."""
    scores = case.batch * case.heads * case.queries * case.seqlen
    element = max(4, _element_size(case.dtype)) if impl == "sdpa-math" else _element_size(case.dtype)
    return 4 * scores * element
