// The CUDA driver API and NVRTC, loaded at run time with dlopen so that the
// library imports and the CPU backend runs on machines without a GPU, driver or
// toolkit. Only the entry points flashjit uses are declared, with the ABI of
// cuda.h and nvrtc.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace flashjit::cuda {

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
using CUcontext = struct CUctx_st*;
using CUmodule = struct CUmod_st*;
using CUfunction = struct CUfunc_st*;
using CUstream = struct CUstream_st*;
using CUmemoryPool = struct CUmemPoolHandle_st*;
using nvrtcResult = int;
using nvrtcProgram = struct _nvrtcProgram*;

constexpr int kAttrMultiprocessorCount = 16;
constexpr int kAttrComputeCapabilityMajor = 75;
constexpr int kAttrComputeCapabilityMinor = 76;
constexpr int kAttrMaxSharedMemoryPerBlockOptin = 97;
constexpr int kFuncAttrStaticSharedSize = 1;  // CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES
constexpr int kFuncAttrMaxDynamicSharedSize = 8;
constexpr int kStreamCaptureStatusNone = 0;
// cuTensorMapEncodeTiled's enums (CUtensorMapDataType, ...Swizzle, ...L2promotion, ...FloatOOBfill).
constexpr int kTensorMapUint16 = 1;
constexpr int kTensorMapInterleaveNone = 0;
constexpr int kTensorMapSwizzle128B = 3;
constexpr int kTensorMapL2Promotion128B = 2;
constexpr int kTensorMapFillZeros = 0;

// CUmemPoolProps (cuda.h's layout; fields past location stay zero).
struct MemPoolProps {
  int allocation_type;  // CU_MEM_ALLOCATION_TYPE_PINNED = 1
  int handle_types;     // none
  int location_type;    // CU_MEM_LOCATION_TYPE_DEVICE = 1
  int location_id;      // the device ordinal
  void* win32_security_attributes;
  size_t max_size;
  unsigned short usage;
  unsigned char reserved[54];
};
static_assert(sizeof(MemPoolProps) == 88, "CUmemPoolProps is 88 bytes");

// cuLaunchKernelEx's CUlaunchAttribute and CUlaunchConfig (cuda.h's layouts), for the one
// attribute flashjit sets: CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, which lets a
// kernel start while the one before it in the stream finishes (it waits with griddepcontrol.wait
// before reading what that one wrote).
constexpr int kLaunchAttrProgrammaticStreamSerialization = 6;
struct LaunchAttribute {
  int id;
  char pad[4];
  union {
    char bytes[64];
    int programmatic_stream_serialization_allowed;
  } value;
};
static_assert(sizeof(LaunchAttribute) == 72, "CUlaunchAttribute is 72 bytes");
struct LaunchConfig {
  unsigned grid_x, grid_y, grid_z, block_x, block_y, block_z, shared_memory_bytes;
  CUstream stream;
  LaunchAttribute* attributes;
  unsigned attribute_count;
};
static_assert(sizeof(LaunchConfig) == 56, "CUlaunchConfig is 56 bytes");
constexpr int kMemPoolAttrReleaseThreshold = 4;  // CU_MEMPOOL_ATTR_RELEASE_THRESHOLD

struct Driver {
  CUresult (*cuInit)(unsigned);
  CUresult (*cuDriverGetVersion)(int*);
  CUresult (*cuDeviceGetCount)(int*);
  CUresult (*cuDeviceGet)(CUdevice*, int);
  CUresult (*cuDeviceGetName)(char*, int, CUdevice);
  CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*cuCtxGetCurrent)(CUcontext*);
  CUresult (*cuCtxSetCurrent)(CUcontext);
  CUresult (*cuModuleLoadData)(CUmodule*, const void*);
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*);
  CUresult (*cuFuncGetAttribute)(int*, int, CUfunction);
  CUresult (*cuFuncSetAttribute)(CUfunction, int, int);
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                             CUstream, void**, void**);
  CUresult (*cuStreamIsCapturing)(CUstream, int*);
  CUresult (*cuMemFreeAsync)(CUdeviceptr, CUstream);
  CUresult (*cuMemPoolCreate)(CUmemoryPool*, const struct MemPoolProps*);
  CUresult (*cuMemPoolSetAttribute)(CUmemoryPool, int, void*);
  CUresult (*cuMemPoolDestroy)(CUmemoryPool);
  CUresult (*cuMemAllocFromPoolAsync)(CUdeviceptr*, size_t, CUmemoryPool, CUstream);
  CUresult (*cuMemsetD32Async)(CUdeviceptr, unsigned, size_t, CUstream);
  CUresult (*cuGetErrorString)(CUresult, const char**);
  // Optional (nullptr where the driver has none): device memory that lives as
  // long as the process, a stream's id, unique within the process (CUDA 12.0), and
  // the copies of a variable-length batch's table and offsets.
  CUresult (*cuMemAlloc)(CUdeviceptr*, size_t);
  CUresult (*cuMemFree)(CUdeviceptr);
  CUresult (*cuMemFreeHost)(void*);
  CUresult (*cuPointerGetAttribute)(void*, int, CUdeviceptr);
  CUresult (*cuMemPoolTrimTo)(CUmemoryPool, size_t);
  CUresult (*cuStreamGetId)(CUstream, unsigned long long*);
  CUresult (*cuMemcpyHtoDAsync)(CUdeviceptr, const void*, size_t, CUstream);
  CUresult (*cuMemcpyDtoHAsync)(void*, CUdeviceptr, size_t, CUstream);
  CUresult (*cuStreamSynchronize)(CUstream);
  CUresult (*cuLaunchKernelEx)(const LaunchConfig*, CUfunction, void**, void**);  // CUDA 11.8
  // CUDA 12.0 and newer drivers; nullptr where the driver has none (no TMA kernels then).
  CUresult (*cuTensorMapEncodeTiled)(void* map, int data_type, unsigned rank, void* address,
                                     const uint64_t* sizes, const uint64_t* stride_bytes, const unsigned* box,
                                     const unsigned* element_strides, int interleave, int swizzle,
                                     int l2_promotion, int out_of_bounds_fill);
};

struct Nvrtc {
  nvrtcResult (*nvrtcVersion)(int*, int*);
  nvrtcResult (*nvrtcCreateProgram)(nvrtcProgram*, const char*, const char*, int, const char* const*,
                                    const char* const*);
  nvrtcResult (*nvrtcCompileProgram)(nvrtcProgram, int, const char* const*);
  nvrtcResult (*nvrtcGetProgramLogSize)(nvrtcProgram, size_t*);
  nvrtcResult (*nvrtcGetProgramLog)(nvrtcProgram, char*);
  nvrtcResult (*nvrtcGetCUBINSize)(nvrtcProgram, size_t*);
  nvrtcResult (*nvrtcGetCUBIN)(nvrtcProgram, char*);
  nvrtcResult (*nvrtcDestroyProgram)(nvrtcProgram*);
  const char* (*nvrtcGetErrorString)(nvrtcResult);
};

// The loaded driver, initialised (cuInit) once. Throws FJ_ERROR_UNSUPPORTED with
// a clear message when libcuda.so.1 is absent or no GPU is present.
const Driver& driver();
// NVRTC: FLASHJIT_NVRTC (a path) if set, else libnvrtc.so.13 / .12 / libnvrtc.so,
// found through the loader path or already loaded (the Python package preloads
// the copy that ships with the nvidia-cuda-nvrtc wheel).
const Nvrtc& nvrtc();
// "13.0", or throws like nvrtc().
std::string nvrtc_version();

// Throws flashjit::Error naming the call and the driver's message when status != 0.
void check(CUresult status, const char* call);

// The device's context (the primary context, shared with PyTorch and the
// runtime API), made current on this thread.
CUcontext activate_device(int device_index);

// Device memory for another framework's arrays (flashjit.mlx's outputs and workspace on MLX's
// GPU stream): from a pool of flashjit's on the device that keeps what it has reserved, the
// allocation ordered on `stream` (the stream's later work may use it). Throws like any driver
// call (FJ_ERROR_OUT_OF_MEMORY when the device has none left).
void* allocate_array_memory(size_t bytes, CUstream stream, int device_index);
// Frees such memory once nothing uses it any more (ordered on the calling thread's per-thread
// stream); never throws (a failure leaves the memory reserved).
void release_array_memory(void* pointer, size_t bytes, int device_index) noexcept;
// The same for an array whose memory the framework moved to memory of its own after flashjit
// allocated it (managed memory, or pinned host memory where the device has no managed memory):
// frees that (cuMemFree or cuMemFreeHost), never throws.
void release_moved_array_memory(void* pointer, size_t bytes, int device_index) noexcept;
// The bytes such memory holds now and at most since the last reset (of every device).
struct ArrayMemory {
  size_t active = 0, peak = 0;
};
ArrayMemory array_memory();
void reset_array_memory_peak();

struct DeviceInfo {
  int arch;  // 90 for sm_90
  int multiprocessors;
  int max_shared_memory;  // per block, opt-in
  std::string name;
};
const DeviceInfo& device_info(int device_index);

}  // namespace flashjit::cuda
