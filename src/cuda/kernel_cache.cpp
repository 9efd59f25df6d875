#include "cuda/kernel_cache.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <utility>

#include "core/error.hpp"
#include "flashjit/flashjit.h"

namespace flashjit::cuda {

// FNV-1a, 64 bits; two bases give the 128-bit key.
uint64_t fnv1a(const std::string& text, uint64_t hash) {
  for (unsigned char c : text) {
    hash ^= c;
    hash *= 0x100000001b3ULL;
  }
  return hash;
}

void make_directories(const std::string& path) {
  std::string partial;
  std::stringstream parts(path);
  std::string part;
  if (!path.empty() && path[0] == '/') partial = "/";
  while (std::getline(parts, part, '/')) {
    if (part.empty()) continue;
    partial += part + "/";
    if (mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST) {
      throw_unsupported("[cuda] cannot create the kernel cache directory ", partial, ": ",
                        std::strerror(errno), " (set FLASHJIT_CACHE_DIR to a writable directory)");
    }
  }
}

// Writes to a temporary name in the same directory, then renames over the target.
void write_atomically(const std::string& path, const std::string& contents) {
  const std::string temporary = str_cat(path, ".tmp.", getpid());
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    out.write(contents.data(), std::streamsize(contents.size()));
    if (!out) {
      out.close();
      std::remove(temporary.c_str());
      throw_unsupported("[cuda] cannot write the kernel cache file ", temporary);
    }
  }
  if (std::rename(temporary.c_str(), path.c_str()) != 0) {
    std::remove(temporary.c_str());
    throw_unsupported("[cuda] cannot rename ", temporary, " to ", path, ": ", std::strerror(errno));
  }
}

namespace {

// Entry format 2: magic, the entry's key (32 hex digits), cubin size, checksum, cubin.
constexpr char kMagic[8] = {'F', 'J', 'C', 'U', 'B', 'I', 'N', '2'};
constexpr size_t kKeyLength = 32;

std::string hex(uint64_t value) {
  char buffer[17];
  std::snprintf(buffer, sizeof buffer, "%016llx", static_cast<unsigned long long>(value));
  return buffer;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

std::string cache_entry(const std::string& key, const std::string& cubin) {
  std::string entry(kMagic, sizeof kMagic);
  entry += key;
  const uint64_t size = cubin.size();
  const uint64_t checksum = fnv1a(cubin, 0xcbf29ce484222325ULL);
  entry.append(reinterpret_cast<const char*>(&size), sizeof size);
  entry.append(reinterpret_cast<const char*>(&checksum), sizeof checksum);
  return entry + cubin;
}

// The cubin of a disk entry, or nothing when absent, truncated, corrupt, or the
// entry of another key (a file copied or renamed into place).
std::shared_ptr<const std::string> read_entry(const std::string& path, const std::string& key) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return nullptr;
  std::string entry((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  constexpr size_t kHeader = sizeof kMagic + kKeyLength + 2 * sizeof(uint64_t);
  if (entry.size() < kHeader || std::memcmp(entry.data(), kMagic, sizeof kMagic) != 0) return nullptr;
  if (key.size() != kKeyLength || entry.compare(sizeof kMagic, kKeyLength, key) != 0) return nullptr;
  uint64_t size = 0, checksum = 0;
  std::memcpy(&size, entry.data() + sizeof kMagic + kKeyLength, sizeof size);
  std::memcpy(&checksum, entry.data() + sizeof kMagic + kKeyLength + sizeof size, sizeof checksum);
  if (entry.size() - kHeader != size) return nullptr;
  auto cubin = std::make_shared<std::string>(entry.substr(kHeader));
  if (fnv1a(*cubin, 0xcbf29ce484222325ULL) != checksum) return nullptr;
  return cubin;
}

// An exclusive advisory lock on <path>.lock, released on destruction.
class FileLock {
 public:
  explicit FileLock(const std::string& path) : fd_(open((path + ".lock").c_str(), O_RDWR | O_CREAT, 0644)) {
    if (fd_ < 0)
      throw_unsupported("[cuda] cannot open the lock file ", path, ".lock: ", std::strerror(errno));
    while (flock(fd_, LOCK_EX) != 0) {
      if (errno != EINTR) throw_unsupported("[cuda] cannot lock ", path, ".lock: ", std::strerror(errno));
    }
  }
  ~FileLock() {
    flock(fd_, LOCK_UN);
    close(fd_);
  }
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;

 private:
  int fd_;
};

// The first time the disk cache cannot be written, says so on stderr (once a
// process): kernels are then compiled in memory by each process.
void warn_once_unwritable(const char* why) {
  static std::once_flag once;
  std::call_once(once, [why] {
    std::fprintf(stderr, "flashjit: warning: the kernel cache on disk is not used (%s); kernels are compiled in memory\n",
                 why);
  });
}

struct Compiled {
  std::string cubin;
  std::string log;
};

Compiled compile(const KernelSpec& spec, const std::string& source) {
  const Nvrtc& api = nvrtc();
  nvrtcProgram program = nullptr;
  const std::string file_name = spec.name() + ".cu";
  if (int status = api.nvrtcCreateProgram(&program, source.c_str(), file_name.c_str(), 0, nullptr, nullptr)) {
    throw Error(FJ_ERROR_INTERNAL,
                str_cat("[cuda] nvrtcCreateProgram failed: ", api.nvrtcGetErrorString(status)));
  }
  const std::vector<std::string> options = spec.compile_options();
  std::vector<const char*> option_pointers;
  for (const std::string& option : options) option_pointers.push_back(option.c_str());
  const int status = api.nvrtcCompileProgram(program, int(option_pointers.size()), option_pointers.data());
  Compiled result;
  size_t log_size = 0;
  api.nvrtcGetProgramLogSize(program, &log_size);
  if (log_size > 1) {
    result.log.resize(log_size);
    api.nvrtcGetProgramLog(program, result.log.data());
    result.log.resize(log_size - 1);
  }
  if (status == 0) {
    size_t cubin_size = 0;
    api.nvrtcGetCUBINSize(program, &cubin_size);
    result.cubin.resize(cubin_size);
    api.nvrtcGetCUBIN(program, result.cubin.data());
  }
  api.nvrtcDestroyProgram(&program);
  if (status != 0) {
    throw Error(FJ_ERROR_INTERNAL, str_cat("[cuda] NVRTC failed to compile ", spec.name(), ": ",
                                           api.nvrtcGetErrorString(status), "\n", result.log));
  }
  return result;
}

struct Cache {
  std::mutex mutex;
  std::map<std::string, std::shared_ptr<const std::string>> binaries;  // key -> cubin
  std::map<std::pair<KernelSpec::Fields, int>, CUfunction> functions;  // (spec's fields, device) -> function
  CacheStats stats;
};

Cache& cache() {
  static Cache* instance = new Cache();  // never destroyed: modules outlive static destruction order
  return *instance;
}

struct KeyedSpec {
  std::string source;
  std::string key;   // 32 hex digits
  std::string path;  // cubin path on disk
};

KeyedSpec keyed(const KernelSpec& spec) {
  KeyedSpec result;
  result.source = spec.source();
  std::string material = str_cat(fj_version(), "\n", nvrtc_version(), "\nsm_", spec.arch, "\n");
  for (const std::string& option : spec.compile_options()) material += option + "\n";
  material += result.source;
  result.key = hex(fnv1a(material, 0xcbf29ce484222325ULL)) + hex(fnv1a(material, 0x84222325cbf29ce4ULL));
  result.path = str_cat(cache_directory(spec.arch), "/", spec.name(), "-", result.key, ".cubin");
  return result;
}

}  // namespace

std::string cache_base_directory() {
  if (const char* dir = std::getenv("FLASHJIT_CACHE_DIR"); dir != nullptr && *dir != '\0') return dir;
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg != nullptr && *xdg != '\0') {
    return str_cat(xdg, "/flashjit");
  }
  const char* home = std::getenv("HOME");
  return str_cat(home != nullptr && *home != '\0' ? home : "/tmp", "/.cache/flashjit");
}

std::string cache_directory(int arch) {
  return str_cat(cache_base_directory(), "/", fj_version(), "/sm_", arch);
}

std::shared_ptr<const std::string> kernel_binary(const KernelSpec& spec, bool capturing) {
  const KeyedSpec entry = keyed(spec);
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    auto found = c.binaries.find(entry.key);
    if (found != c.binaries.end()) {
      ++c.stats.memory_hits;
      return found->second;
    }
  }
  const auto start = std::chrono::steady_clock::now();
  std::shared_ptr<const std::string> cubin = read_entry(entry.path, entry.key);
  bool compiled = false;
  if (!cubin) {
    const auto compile_here = [&] {
      if (capturing) {
        throw_unsupported("[cuda] kernel ", spec.name(),
                          " is not compiled yet and the stream is capturing a CUDA graph; run the call once "
                          "before capture or compile it ahead with flashjit.precompile()");
      }
      Compiled result = compile(spec, entry.source);
      compiled = true;
      return result;
    };
    std::optional<FileLock> file_lock;
    try {
      make_directories(cache_directory(spec.arch));
      file_lock.emplace(entry.path);
    } catch (const Error& error) {
      // A cache directory that cannot be written (read-only, full, not a
      // directory): compile in memory; the disk cache is skipped.
      warn_once_unwritable(error.what());
    }
    if (file_lock) {
      cubin = read_entry(entry.path, entry.key);  // another process may have finished while we waited
      if (!cubin) {
        Compiled result = compile_here();
        const std::string stem = entry.path.substr(0, entry.path.size() - 6);
        try {
          write_atomically(stem + ".cu", entry.source);
          write_atomically(stem + ".log", result.log);
          write_atomically(entry.path, cache_entry(entry.key, result.cubin));
        } catch (const Error& error) {
          warn_once_unwritable(error.what());
        }
        cubin = std::make_shared<const std::string>(std::move(result.cubin));
      }
    } else {
      cubin = std::make_shared<const std::string>(compile_here().cubin);
    }
  }
  std::lock_guard<std::mutex> lock(c.mutex);
  if (compiled) {
    ++c.stats.compiles;
    c.stats.last_compile_seconds = seconds_since(start);
  } else {
    ++c.stats.disk_loads;
    c.stats.last_disk_load_seconds = seconds_since(start);
  }
  return c.binaries.emplace(entry.key, cubin).first->second;
}

namespace {
std::atomic<uint64_t> g_memory_generation{1};

// The functions this thread found last, before the shared map and its lock: a call's one to four
// kernels, again and again in a loop of calls. Emptied when the memory cache is cleared.
struct RecentFunction {
  KernelSpec::Fields fields{};
  int device_index = -1;
  uint64_t generation = 0;
  CUfunction function = nullptr;
};
constexpr size_t kRecentFunctions = 8;
thread_local std::array<RecentFunction, kRecentFunctions> t_recent;
thread_local size_t t_recent_next = 0;
}  // namespace

CUfunction kernel_function(const KernelSpec& spec, int device_index, bool capturing) {
  // Within a process the spec fixes the source (the embedded files are constant), so loaded
  // functions are found by its fields, without building its name or source.
  const KernelSpec::Fields fields = spec.fields();
  const uint64_t generation = g_memory_generation.load(std::memory_order_relaxed);
  for (const RecentFunction& recent : t_recent) {
    if (recent.function != nullptr && recent.generation == generation && recent.device_index == device_index &&
        recent.fields == fields) {
      return recent.function;
    }
  }
  const auto remember = [&](CUfunction function) {
    t_recent[t_recent_next++ % kRecentFunctions] = RecentFunction{fields, device_index, generation, function};
    return function;
  };
  Cache& c = cache();
  std::pair<KernelSpec::Fields, int> loaded_key{fields, device_index};
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    auto found = c.functions.find(loaded_key);
    if (found != c.functions.end()) return remember(found->second);
  }
  std::shared_ptr<const std::string> cubin = kernel_binary(spec, capturing);
  const Driver& d = driver();
  CUmodule module = nullptr;
  check(d.cuModuleLoadData(&module, cubin->data()), "cuModuleLoadData");
  CUfunction function = nullptr;
  check(d.cuModuleGetFunction(&function, module, spec.function_name()), "cuModuleGetFunction");
  // A block's static and dynamic shared memory together are bounded by the device's opt-in maximum.
  int static_bytes = 0;
  check(d.cuFuncGetAttribute(&static_bytes, kFuncAttrStaticSharedSize, function), "cuFuncGetAttribute");
  check(d.cuFuncSetAttribute(function, kFuncAttrMaxDynamicSharedSize,
                             std::max(0, device_info(device_index).max_shared_memory - static_bytes)),
        "cuFuncSetAttribute");
  std::lock_guard<std::mutex> lock(c.mutex);
  return remember(c.functions.emplace(std::move(loaded_key), function).first->second);
}

CacheStats cache_stats() {
  std::lock_guard<std::mutex> lock(cache().mutex);
  return cache().stats;
}

void clear_memory_cache() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.binaries.clear();
  c.functions.clear();
  g_memory_generation.fetch_add(1);
}

}  // namespace flashjit::cuda
