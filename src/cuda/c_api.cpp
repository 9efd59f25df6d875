// C entry points of the CUDA backend: precompilation, cache and device queries.
#include <algorithm>
#include <cstring>
#include <optional>
#include <string>

#include "core/guarded.hpp"
#include "cuda/driver.hpp"
#include "cuda/kernel_cache.hpp"
#include "cuda/kernel_spec.hpp"
#include "cuda/settings.hpp"
#include "cuda/tuning.hpp"
#include "flashjit/cuda.h"
#include "flashjit/flashjit.h"

namespace {

using namespace flashjit;

void copy_text(const std::string& text, char* buffer, size_t size, const char* what) {
  if (buffer == nullptr || size == 0) throw_value_error("[", what, "] buffer: expected a non-null buffer");
  if (text.size() + 1 > size)
    throw_value_error("[", what, "] buffer: needs ", text.size() + 1, " bytes, got ", size);
  std::memcpy(buffer, text.c_str(), text.size() + 1);
}

cuda::KernelTraits traits_of(const fj_kernel_config& config, int index) {
  const auto name = [&](const char* field) { return str_cat("configs[", index, "].", field); };
  // Enum fields are read as their int32 codes: a caller may store any value there.
  const auto code = [](const fj_dtype& field) {
    int32_t value;
    std::memcpy(&value, &field, sizeof value);
    return value;
  };
  const int32_t dtype = code(config.dtype);
  if (dtype != FJ_FLOAT32 && dtype != FJ_FLOAT16 && dtype != FJ_BFLOAT16 && dtype != FJ_FLOAT64) {
    throw_type_error("[precompile] ", name("dtype"), ": expected float32, float16, bfloat16 or float64 (codes ",
                     int(FJ_FLOAT32), ", ", int(FJ_FLOAT16), ", ", int(FJ_BFLOAT16), ", ", int(FJ_FLOAT64),
                     "), got code ", dtype);
  }
  const int32_t mask_dtype = code(config.mask_dtype);
  for (auto [field, value] :
       {std::pair{"head_dim_qk", config.head_dim_qk}, {"head_dim_v", config.head_dim_v}}) {
    if (value < 1 || value > 256)
      throw_value_error("[precompile] ", name(field), ": expected 1..256, got ", value);
  }
  if (config.mask < 0 || config.mask > 2) {
    throw_value_error("[precompile] ", name("mask"), ": expected 0 (none), 1 (boolean) or 2 (additive), got ",
                      config.mask);
  }
  if (config.mask == 2 && mask_dtype != FJ_FLOAT32 && mask_dtype != dtype) {
    throw_type_error("[precompile] ", name("mask_dtype"), ": an additive mask is float32 or the input dtype, got code ",
                     mask_dtype);
  }
  if (config.arch != 0 && config.arch < 80) {
    throw_value_error("[precompile] ", name("arch"), ": expected 80 or newer (or 0 for the device's), got ",
                      config.arch);
  }
  cuda::KernelTraits traits;
  traits.dtype = config.dtype;
  traits.head_dim_qk = config.head_dim_qk;
  traits.head_dim_v = config.head_dim_v;
  traits.mask = config.mask == 0 ? MaskKind::kNone : config.mask == 1 ? MaskKind::kBool : MaskKind::kAdditive;
  traits.mask_dtype = config.mask == 1 ? FJ_BOOL : config.mask_dtype;
  traits.window = config.window != 0;
  traits.dropout = config.dropout != 0;
  traits.softcap = config.softcap != 0;
  traits.arch = config.arch != 0 ? config.arch : cuda::device_info(config.device_index).arch;
  return traits;
}

}  // namespace

extern "C" {

fj_kernel_config fj_kernel_config_default(void) {
  fj_kernel_config config;
  std::memset(&config, 0, sizeof config);
  config.dtype = FJ_FLOAT16;
  config.head_dim_qk = 128;
  config.head_dim_v = 128;
  config.mask_dtype = FJ_FLOAT32;
  return config;
}

fj_status fj_cuda_precompile(const fj_kernel_config* configs, int32_t count) {
  return guarded([&] {
    if (count < 0) throw_value_error("[precompile] count: expected 0 or more configs, got ", count);
    if (count > 0 && configs == nullptr) {
      throw_value_error("[precompile] configs: expected ", count, " configs, got a null pointer");
    }
    for (int32_t index = 0; index < count; ++index) {
      const cuda::KernelTraits traits = traits_of(configs[index], index);
      const std::string device =
          configs[index].arch == 0 ? cuda::device_info(configs[index].device_index).name : std::string();
      if (configs[index].nondeterministic != 0 && configs[index].nondeterministic != 1) {
        throw_value_error("[precompile] nondeterministic: expected 0 or 1, got ", configs[index].nondeterministic);
      }
      if (configs[index].backward) {
        // The kernels FLASHJIT_CUDA_BACKWARD forces; unforced, the split ones, and the one-pass
        // ones too where a class of the config (a key length band) is tuned to them.
        const std::optional<bool> forced = cuda::settings::one_pass_backward();
        // And the unordered one pass a nondeterministic call takes (unforced, where it applies).
        if (configs[index].nondeterministic && !forced && cuda::unordered_dq_applies(traits)) {
          for (const cuda::KernelSpec& spec : cuda::unordered_backward_kernels(traits)) cuda::kernel_binary(spec, false);
        }
        // FLASHJIT_CUDA_BACKWARD_OVERLAP unset (auto): the split dQ and dK/dV kernels built to
        // overlap too, which problems of small grids run.
        const bool both_launches = cuda::settings::backward_overlap() < 0;
        const auto build = [](const cuda::KernelSpec& spec) {
          cuda::kernel_binary(spec, false);
          if (spec.takes_parts()) {  // and the plain dK/dV kernel, which problems of one part run
            cuda::KernelSpec plain = spec;
            plain.dkdv_parts = false;
            cuda::kernel_binary(plain, false);
          }
        };
        for (const cuda::KernelSpec& spec : cuda::backward_kernels(traits, forced.value_or(false))) {
          build(spec);
          cuda::KernelSpec overlapped = spec;
          overlapped.backward_overlap = true;
          if (both_launches && overlapped.overlaps_launch()) build(overlapped);
        }
        for (int64_t seqlen_k : {int64_t(1024), int64_t(4096), int64_t(16384)}) {
          const int pass = forced ? cuda::kSplitPass : cuda::backward_pass_chosen(traits, seqlen_k, device);
          if (pass == cuda::kSplitPass) continue;
          for (const cuda::KernelSpec& spec : cuda::backward_kernels(traits, true, cuda::backward_dq_mode(pass))) {
            cuda::kernel_binary(spec, false);
          }
          if (pass == cuda::kOnePassDiagonal) {  // and the one pass grouped heads run (keep_diagonal_off_groups)
            for (const cuda::KernelSpec& spec : cuda::backward_kernels(traits, true)) cuda::kernel_binary(spec, false);
          }
        }
      } else {
        cuda::kernel_binary(cuda::forward_kernel(traits), false);
        // And the tile choices of the config's classes (each key length band):
        // tuned on this device, or (for a named arch: no device) the built-in table's.
        if (cuda::hopper_applies(traits)) {
          for (int64_t seqlen_k : {int64_t(1024), int64_t(4096), int64_t(16384)}) {
            const cuda::ForwardTiles tuned =
                cuda::tuned_forward_tiles(device, traits.arch, cuda::tuning_key(traits, seqlen_k));
            if (tuned.forced() || tuned.sets_keys_on_top()) {
              cuda::kernel_binary(cuda::forward_kernel(traits, tuned), false);
            }
          }
        }
      }
    }
  });
}

fj_status fj_cuda_get_cache_stats(fj_cuda_cache_stats* stats) {
  return guarded([&] {
    if (stats == nullptr) throw_value_error("[cache_stats] stats: expected a non-null pointer");
    const cuda::CacheStats current = cuda::cache_stats();
    stats->compiles = current.compiles;
    stats->disk_loads = current.disk_loads;
    stats->memory_hits = current.memory_hits;
    stats->last_compile_seconds = current.last_compile_seconds;
    stats->last_disk_load_seconds = current.last_disk_load_seconds;
  });
}

fj_status fj_cuda_clear_memory_cache(void) {
  return guarded([] { cuda::clear_memory_cache(); });
}

fj_status fj_cuda_cache_dir(int32_t arch, char* buffer, size_t size) {
  return guarded([&] {
    copy_text(arch == 0 ? cuda::cache_base_directory() : cuda::cache_directory(arch), buffer, size,
              "cache_dir");
  });
}

fj_status fj_cuda_tuning_key(const fj_kernel_config* config, int64_t seqlen_k, char* buffer, size_t size) {
  return guarded([&] {
    if (config == nullptr) throw_value_error("[tuning_key] config: expected a non-null pointer");
    if (seqlen_k < 1) throw_value_error("[tuning_key] seqlen_k: expected >= 1, got ", seqlen_k);
    const cuda::KernelTraits traits = traits_of(*config, 0);
    copy_text(config->backward ? cuda::backward_tuning_key(traits, seqlen_k) : cuda::tuning_key(traits, seqlen_k),
              buffer, size, "tuning_key");
  });
}

fj_status fj_cuda_save_tuning(const char* device_name, int32_t arch, const char* entries, char* path,
                              size_t path_size) {
  return guarded([&] {
    if (device_name == nullptr || *device_name == '\0') {
      throw_value_error("[save_tuning] device_name: expected a device's name");
    }
    if (entries == nullptr) throw_value_error("[save_tuning] entries: expected a non-null pointer");
    const std::string written = cuda::save_tuning(device_name, arch, entries);
    if (path != nullptr) copy_text(written, path, path_size, "save_tuning");
  });
}

fj_status fj_cuda_describe_tuning(const char* device_name, int32_t arch, char* buffer, size_t size) {
  return guarded([&] {
    if (device_name == nullptr) throw_value_error("[describe_tuning] device_name: expected a device's name");
    copy_text(cuda::describe_tuning(device_name, arch), buffer, size, "describe_tuning");
  });
}

fj_status fj_cuda_nvrtc_version(int32_t* major, int32_t* minor) {
  return guarded([&] {
    if (major == nullptr || minor == nullptr) throw_value_error("[nvrtc_version] expected non-null pointers");
    int a = 0, b = 0;
    cuda::nvrtc().nvrtcVersion(&a, &b);
    *major = a;
    *minor = b;
  });
}

int32_t fj_cuda_device_count(void) {
  int count = 0;
  try {
    if (cuda::driver().cuDeviceGetCount(&count) != 0) count = 0;
  } catch (...) {
    count = 0;
  }
  return count;
}

fj_status fj_cuda_device_info(int32_t device_index, int32_t* arch, int32_t* multiprocessors, char* name,
                              size_t name_size) {
  return guarded([&] {
    const int count = fj_cuda_device_count();
    if (device_index < 0 || device_index >= count) {
      if (count == 0) cuda::driver();  // throws the reason there is no device
      throw_value_error("[device_info] device_index: expected 0..", count - 1, ", got ", device_index);
    }
    const cuda::DeviceInfo& info = cuda::device_info(device_index);
    if (arch) *arch = info.arch;
    if (multiprocessors) *multiprocessors = info.multiprocessors;
    if (name) copy_text(info.name, name, name_size, "device_info");
  });
}

}  // extern "C"
