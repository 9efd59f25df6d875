// FJ_HOST_DEVICE: how the headers shared verbatim by the host and the CUDA
// kernels (philox_core.h, bounds_core.h) declare their functions. The CUDA
// backend embeds this file first in every kernel source; under NVRTC there are
// no includes and the kernel prelude defines the fixed-width integer types.
#pragma once

#if defined(__CUDACC_RTC__)
#define FJ_HOST_DEVICE __device__ __forceinline__
#elif defined(__CUDACC__)
#include <cstdint>
#define FJ_HOST_DEVICE __host__ __device__ __forceinline__
#else
#include <cstdint>
#define FJ_HOST_DEVICE inline
#endif
