// flashjit/cuda.h's entry points in a build without the CUDA backend
// (FLASHJIT_CUDA=OFF): each reports that clearly instead of failing to link.
#include <cstring>

#include "core/guarded.hpp"
#include "flashjit/cuda.h"
#include "flashjit/flashjit.h"

namespace {

fj_status no_cuda() {
  return flashjit::guarded([] {
    flashjit::throw_unsupported("[cuda] this build of flashjit has no CUDA backend (FLASHJIT_CUDA=OFF)");
  });
}

}  // namespace

extern "C" {

fj_kernel_config fj_kernel_config_default(void) {
  fj_kernel_config config;
  std::memset(&config, 0, sizeof config);
  return config;
}
fj_status fj_cuda_precompile(const fj_kernel_config*, int32_t) {
  return no_cuda();
}
fj_status fj_cuda_get_cache_stats(fj_cuda_cache_stats*) {
  return no_cuda();
}
fj_status fj_cuda_clear_memory_cache(void) {
  return no_cuda();
}
fj_status fj_cuda_cache_dir(int32_t, char*, size_t) {
  return no_cuda();
}
fj_status fj_cuda_nvrtc_version(int32_t*, int32_t*) {
  return no_cuda();
}
fj_status fj_cuda_tuning_key(const fj_kernel_config*, int64_t, char*, size_t) {
  return no_cuda();
}
fj_status fj_cuda_save_tuning(const char*, int32_t, const char*, char*, size_t) {
  return no_cuda();
}
fj_status fj_cuda_describe_tuning(const char*, int32_t, char*, size_t) {
  return no_cuda();
}
int32_t fj_cuda_device_count(void) {
  return 0;
}
fj_status fj_cuda_device_info(int32_t, int32_t*, int32_t*, char*, size_t) {
  return no_cuda();
}

}  // extern "C"
