"""Locates NVRTC for the CUDA backend.

The C++ library loads NVRTC with dlopen on first compile: FLASHJIT_NVRTC if set,
else the loader's search path. Pip installs NVRTC (the nvidia-cuda-nvrtc wheel,
a dependency of CUDA builds of torch) outside that path, so at import the
package points FLASHJIT_NVRTC at the wheel's copy when one exists. Nothing is
loaded here. Run as a script, prints the path found (or nothing).
"""

from __future__ import annotations

import glob
import importlib.util
import os

_LIBRARY_GLOBS = ("cu13/lib/libnvrtc.so.13", "cuda_nvrtc/lib/libnvrtc.so.13", "cu12/lib/libnvrtc.so.12",
                  "cuda_nvrtc/lib/libnvrtc.so.12")


def find_nvrtc() -> str | None:
    """Path of the NVRTC library of an installed nvidia wheel, or None."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for pattern in _LIBRARY_GLOBS:
            found = sorted(glob.glob(os.path.join(root, pattern)))
            if found:
                return found[-1]
    return None


def configure() -> None:
    """Sets FLASHJIT_NVRTC to the wheel's NVRTC unless the caller chose one."""
    if os.environ.get("FLASHJIT_NVRTC"):
        return
    path = find_nvrtc()
    if path is not None:
        os.environ["FLASHJIT_NVRTC"] = path


if __name__ == "__main__":
    print(find_nvrtc() or "")
