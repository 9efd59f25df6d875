#include "cuda/settings.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "core/error.hpp"

namespace flashjit::cuda::settings {
namespace {

// On unless set to "0".
bool switch_on(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr || std::strcmp(value, "0") != 0;
}

}  // namespace

bool hopper_kernels() {
  static const bool enabled = switch_on("FLASHJIT_CUDA_HOPPER");
  return enabled;
}

bool persistent_forward() {
  static const bool persistent = switch_on("FLASHJIT_CUDA_PERSISTENT");
  return persistent;
}

bool map_cache() {
  static const bool enabled = switch_on("FLASHJIT_CUDA_MAP_CACHE");
  return enabled;
}

const char* forced_tiles() { return std::getenv("FLASHJIT_CUDA_TILES"); }

std::optional<int> forced_splits() {
  const char* value = std::getenv("FLASHJIT_CUDA_SPLITS");
  if (value == nullptr || *value == '\0') return std::nullopt;
  return std::max(1, std::atoi(value));
}

int decode_warps() {
  const char* value = std::getenv("FLASHJIT_CUDA_DECODE_WARPS");
  if (value == nullptr || *value == '\0') return 0;
  if (std::strcmp(value, "4") == 0) return 4;
  if (std::strcmp(value, "1") == 0) return 1;
  throw_value_error("[cuda] FLASHJIT_CUDA_DECODE_WARPS: expected 1 or 4, got '", value, "'");
}

bool kv_cache_hopper() {
  const char* value = std::getenv("FLASHJIT_CUDA_KV_HOPPER");
  if (value == nullptr || *value == '\0') return decode_warps() == 0;
  if (std::strcmp(value, "0") == 0 || std::strcmp(value, "1") == 0) return value[0] == '1';
  throw_value_error("[cuda] FLASHJIT_CUDA_KV_HOPPER: expected 0 or 1, got '", value, "'");
}

bool trace_tiles() {
  const char* value = std::getenv("FLASHJIT_CUDA_TRACE");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "0") == 0) return false;
  if (std::strcmp(value, "1") == 0) return true;
  throw_value_error("[cuda] FLASHJIT_CUDA_TRACE: expected 0 or 1, got '", value, "'");
}

int one_pass_dq() {
  const char* value = std::getenv("FLASHJIT_CUDA_ONE_PASS_DQ");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "ordered") == 0) return 0;
  if (std::strcmp(value, "none") == 0) return 1;
  if (std::strcmp(value, "unordered") == 0) return 2;
  throw_value_error("[cuda] FLASHJIT_CUDA_ONE_PASS_DQ: expected ordered, none or unordered, got '", value, "'");
}

std::optional<bool> one_pass_backward() {
  const char* value = std::getenv("FLASHJIT_CUDA_BACKWARD");
  if (value == nullptr || *value == '\0') return std::nullopt;
  if (std::strcmp(value, "split") == 0) return false;
  if (std::strcmp(value, "one-pass") == 0) return true;
  throw_value_error("[cuda] FLASHJIT_CUDA_BACKWARD: expected one-pass or split, got '", value, "'");
}

bool dkdv_shared_operands() {
  const char* value = std::getenv("FLASHJIT_CUDA_DKDV");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "registers") == 0) return false;
  if (std::strcmp(value, "shared") == 0) return true;
  throw_value_error("[cuda] FLASHJIT_CUDA_DKDV: expected registers or shared, got '", value, "'");
}

bool varlen_single_launch() {
  const char* value = std::getenv("FLASHJIT_CUDA_VARLEN");
  return value == nullptr || std::strcmp(value, "0") != 0;
}

}  // namespace flashjit::cuda::settings
