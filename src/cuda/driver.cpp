#include "cuda/driver.hpp"

#include <dlfcn.h>

#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>

#include "core/error.hpp"

namespace flashjit::cuda {
namespace {

template <typename Fn>
void resolve(void* library, const char* library_name, const char* symbol, Fn*& target) {
  target = reinterpret_cast<Fn*>(dlsym(library, symbol));
  if (target == nullptr) throw_unsupported("[cuda] ", library_name, " has no symbol ", symbol, ": too old?");
}

#define FJ_RESOLVE(library, name, table, symbol) resolve(library, name, #symbol, table.symbol)

struct LoadedDriver {
  Driver table{};
  std::string error;  // why the driver is unusable; empty when it is usable

  LoadedDriver() {
    void* library = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (library == nullptr) {
      error =
          "[cuda] no NVIDIA driver found (libcuda.so.1 could not be loaded): this machine has no usable GPU";
      return;
    }
    try {
      FJ_RESOLVE(library, "libcuda", table, cuInit);
      FJ_RESOLVE(library, "libcuda", table, cuDriverGetVersion);
      FJ_RESOLVE(library, "libcuda", table, cuDeviceGetCount);
      FJ_RESOLVE(library, "libcuda", table, cuDeviceGet);
      FJ_RESOLVE(library, "libcuda", table, cuDeviceGetName);
      FJ_RESOLVE(library, "libcuda", table, cuDeviceGetAttribute);
      FJ_RESOLVE(library, "libcuda", table, cuDevicePrimaryCtxRetain);
      FJ_RESOLVE(library, "libcuda", table, cuCtxGetCurrent);
      FJ_RESOLVE(library, "libcuda", table, cuCtxSetCurrent);
      FJ_RESOLVE(library, "libcuda", table, cuModuleLoadData);
      FJ_RESOLVE(library, "libcuda", table, cuModuleGetFunction);
      FJ_RESOLVE(library, "libcuda", table, cuFuncGetAttribute);
      FJ_RESOLVE(library, "libcuda", table, cuFuncSetAttribute);
      FJ_RESOLVE(library, "libcuda", table, cuLaunchKernel);
      FJ_RESOLVE(library, "libcuda", table, cuStreamIsCapturing);
      FJ_RESOLVE(library, "libcuda", table, cuMemFreeAsync);
      FJ_RESOLVE(library, "libcuda", table, cuMemPoolCreate);
      FJ_RESOLVE(library, "libcuda", table, cuMemPoolSetAttribute);
      FJ_RESOLVE(library, "libcuda", table, cuMemPoolDestroy);
      FJ_RESOLVE(library, "libcuda", table, cuMemAllocFromPoolAsync);
      FJ_RESOLVE(library, "libcuda", table, cuMemsetD32Async);
      FJ_RESOLVE(library, "libcuda", table, cuGetErrorString);
      table.cuMemAlloc = reinterpret_cast<decltype(table.cuMemAlloc)>(dlsym(library, "cuMemAlloc_v2"));
      table.cuMemFree = reinterpret_cast<decltype(table.cuMemFree)>(dlsym(library, "cuMemFree_v2"));
      table.cuMemFreeHost = reinterpret_cast<decltype(table.cuMemFreeHost)>(dlsym(library, "cuMemFreeHost"));
      table.cuPointerGetAttribute =
          reinterpret_cast<decltype(table.cuPointerGetAttribute)>(dlsym(library, "cuPointerGetAttribute"));
      table.cuMemPoolTrimTo = reinterpret_cast<decltype(table.cuMemPoolTrimTo)>(dlsym(library, "cuMemPoolTrimTo"));
      table.cuStreamGetId = reinterpret_cast<decltype(table.cuStreamGetId)>(dlsym(library, "cuStreamGetId"));
      table.cuMemcpyHtoDAsync =
          reinterpret_cast<decltype(table.cuMemcpyHtoDAsync)>(dlsym(library, "cuMemcpyHtoDAsync_v2"));
      table.cuMemcpyDtoHAsync =
          reinterpret_cast<decltype(table.cuMemcpyDtoHAsync)>(dlsym(library, "cuMemcpyDtoHAsync_v2"));
      table.cuStreamSynchronize =
          reinterpret_cast<decltype(table.cuStreamSynchronize)>(dlsym(library, "cuStreamSynchronize"));
      table.cuLaunchKernelEx =
          reinterpret_cast<decltype(table.cuLaunchKernelEx)>(dlsym(library, "cuLaunchKernelEx"));
      table.cuTensorMapEncodeTiled =
          reinterpret_cast<decltype(table.cuTensorMapEncodeTiled)>(dlsym(library, "cuTensorMapEncodeTiled"));
    } catch (const Error& e) {
      error = e.what();
      return;
    }
    const CUresult status = table.cuInit(0);
    int count = 0;
    if (status != 0 || table.cuDeviceGetCount(&count) != 0 || count == 0) {
      const char* text = nullptr;
      if (status != 0) table.cuGetErrorString(status, &text);
      error = str_cat("[cuda] no GPU found: the driver is installed but reports no usable device",
                      text ? str_cat(" (", text, ")") : std::string());
    }
  }
};

struct LoadedNvrtc {
  Nvrtc table{};
  std::string error;

  LoadedNvrtc() {
    void* library = nullptr;
    std::string tried;
    if (const char* path = std::getenv("FLASHJIT_NVRTC"); path != nullptr && *path != '\0') {
      library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
      tried = path;
    } else {
      for (const char* name : {"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"}) {
        library = dlopen(name, RTLD_NOW | RTLD_LOCAL);
        tried += (tried.empty() ? "" : ", ") + std::string(name);
        if (library != nullptr) break;
      }
    }
    if (library == nullptr) {
      error = str_cat("[cuda] NVRTC not found (tried ", tried,
                      "): install the nvidia-cuda-nvrtc wheel or the CUDA toolkit, or set FLASHJIT_NVRTC "
                      "to the library's path");
      return;
    }
    try {
      FJ_RESOLVE(library, "libnvrtc", table, nvrtcVersion);
      FJ_RESOLVE(library, "libnvrtc", table, nvrtcCreateProgram);
      FJ_RESOLVE(library, "libnvrtc", table, nvrtcCompileProgram);
      FJ_RESOLVE(library, "libnvrtc", table, nvrtcGetProgramLogSize);
      FJ_RESOLVE(library, "libnvrtc", table, nvrtcGetProgramLog);
      FJ_RESOLVE(library, "libnvrtc", table, nvrtcGetCUBINSize);
      FJ_RESOLVE(library, "libnvrtc", table, nvrtcGetCUBIN);
      FJ_RESOLVE(library, "libnvrtc", table, nvrtcDestroyProgram);
      FJ_RESOLVE(library, "libnvrtc", table, nvrtcGetErrorString);
    } catch (const Error& e) {
      error = e.what();
      return;
    }
    preload_builtins();
  }

  // NVRTC opens libnvrtc-builtins.so.<major>.<minor> by name when it compiles.
  // Both are opened RTLD_LOCAL: NVRTC carries its own C++ runtime, whose symbols
  // must not interpose on the host's (seen crashing inside a torch process).
  // Where NVRTC came from a directory off the loader path (a Python wheel, an
  // explicit FLASHJIT_NVRTC), load the builtins from that same directory first.
  void preload_builtins() const {
    int major = 0, minor = 0;
    Dl_info info{};
    if (table.nvrtcVersion(&major, &minor) != 0 ||
        dladdr(reinterpret_cast<void*>(table.nvrtcVersion), &info) == 0 || info.dli_fname == nullptr) {
      return;
    }
    std::string directory = info.dli_fname;
    const size_t slash = directory.rfind('/');
    directory = slash == std::string::npos ? "." : directory.substr(0, slash);
    dlopen(str_cat(directory, "/libnvrtc-builtins.so.", major, ".", minor).c_str(), RTLD_NOW | RTLD_LOCAL);
  }
};

const LoadedDriver& loaded_driver() {
  static const LoadedDriver instance;
  return instance;
}

}  // namespace

const Driver& driver() {
  const LoadedDriver& loaded = loaded_driver();
  if (!loaded.error.empty()) throw_unsupported(loaded.error);
  return loaded.table;
}

const Nvrtc& nvrtc() {
  static const LoadedNvrtc instance;
  if (!instance.error.empty()) throw_unsupported(instance.error);
  return instance.table;
}

std::string nvrtc_version() {
  int major = 0, minor = 0;
  nvrtc().nvrtcVersion(&major, &minor);
  return str_cat(major, ".", minor);
}

void check(CUresult status, const char* call) {
  if (status == 0) return;
  const char* text = nullptr;
  driver().cuGetErrorString(status, &text);
  const fj_status kind = status == 2 ? FJ_ERROR_OUT_OF_MEMORY : FJ_ERROR_INTERNAL;
  throw Error(kind, str_cat("[cuda] ", call, " failed: ", text ? text : "unknown error", " (", status, ")"));
}

CUcontext activate_device(int device_index) {
  const Driver& d = driver();
  static std::mutex mutex;
  static std::map<int, CUcontext> contexts;
  CUcontext context = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto found = contexts.find(device_index);
    if (found == contexts.end()) {
      int count = 0;
      check(d.cuDeviceGetCount(&count), "cuDeviceGetCount");
      if (device_index < 0 || device_index >= count) {
        throw_value_error("[cuda] device index ", device_index, " is out of range: ", count,
                          " device(s) present");
      }
      CUdevice device = 0;
      check(d.cuDeviceGet(&device, device_index), "cuDeviceGet");
      check(d.cuDevicePrimaryCtxRetain(&context, device), "cuDevicePrimaryCtxRetain");
      contexts.emplace(device_index, context);
    } else {
      context = found->second;
    }
  }
  CUcontext current = nullptr;
  check(d.cuCtxGetCurrent(&current), "cuCtxGetCurrent");
  if (current != context) check(d.cuCtxSetCurrent(context), "cuCtxSetCurrent");
  return context;
}

const DeviceInfo& device_info(int device_index) {
  static std::mutex mutex;
  static std::map<int, std::unique_ptr<DeviceInfo>> infos;
  std::lock_guard<std::mutex> lock(mutex);
  std::unique_ptr<DeviceInfo>& info = infos[device_index];
  if (!info) {
    const Driver& d = driver();
    CUdevice device = 0;
    check(d.cuDeviceGet(&device, device_index), "cuDeviceGet");
    int major = 0, minor = 0;
    auto next = std::make_unique<DeviceInfo>();
    check(d.cuDeviceGetAttribute(&major, kAttrComputeCapabilityMajor, device), "cuDeviceGetAttribute");
    check(d.cuDeviceGetAttribute(&minor, kAttrComputeCapabilityMinor, device), "cuDeviceGetAttribute");
    check(d.cuDeviceGetAttribute(&next->multiprocessors, kAttrMultiprocessorCount, device),
          "cuDeviceGetAttribute");
    check(d.cuDeviceGetAttribute(&next->max_shared_memory, kAttrMaxSharedMemoryPerBlockOptin, device),
          "cuDeviceGetAttribute");
    char name[256] = {};
    check(d.cuDeviceGetName(name, sizeof name, device), "cuDeviceGetName");
    next->arch = major * 10 + minor;
    next->name = name;
    info = std::move(next);
  }
  return *info;
}

}  // namespace flashjit::cuda
