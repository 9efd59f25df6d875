// Compiled kernels, cached in memory and on disk.
//
// Disk layout: <dir>/<spec name>-<key>.cubin beside the generated .cu and the
// NVRTC log, where <dir> is $FLASHJIT_CACHE_DIR or ~/.cache/flashjit, then
// <library version>/sm_<arch>. The key hashes the library version, the NVRTC
// version, the arch, the options and the full source. Entries are written to a
// temporary file and renamed (atomic); a per-entry file lock with a second look
// after taking it makes concurrent processes compile a key once; an entry whose
// header, size or checksum is wrong is recompiled, never trusted.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "cuda/driver.hpp"
#include "cuda/kernel_spec.hpp"

namespace flashjit::cuda {

struct CacheStats {
  int64_t compiles = 0;     // NVRTC runs in this process
  int64_t disk_loads = 0;   // cubins read from the disk cache
  int64_t memory_hits = 0;  // lookups answered from memory
  double last_compile_seconds = 0;
  double last_disk_load_seconds = 0;
};

// The base cache directory (without the version and arch parts).
std::string cache_base_directory();
// <base>/<version>/sm_<arch>
std::string cache_directory(int arch);

// The cubin for a spec: memory, then disk, then NVRTC. With capturing set, a
// needed compile is refused with a clear error (a stream is capturing a graph).
std::shared_ptr<const std::string> kernel_binary(const KernelSpec& spec, bool capturing);

// The loaded function for a spec on a device (its context must be current).
CUfunction kernel_function(const KernelSpec& spec, int device_index, bool capturing);

CacheStats cache_stats();

// Helpers of the files under the cache directory (kernel_cache.cpp).
uint64_t fnv1a(const std::string& text, uint64_t hash = 0xcbf29ce484222325ULL);
// Creates a directory and its parents; an error names it and says to set FLASHJIT_CACHE_DIR.
void make_directories(const std::string& path);
// Writes to a temporary name in the same directory, then renames over the target.
void write_atomically(const std::string& path, const std::string& contents);
// Forgets compiled binaries and loaded modules held in memory (the disk cache stays).
void clear_memory_cache();

}  // namespace flashjit::cuda
