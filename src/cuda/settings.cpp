#include "cuda/settings.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

#include "core/error.hpp"

namespace flashjit::cuda::settings {
namespace {

// On unless set to "0".
bool switch_on(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr || std::strcmp(value, "0") != 0;
}

// The index of variable `name`'s value among `values`, or -1 where it is unset or empty; another
// value is an error naming the variable and what it takes.
int choice(const char* name, std::initializer_list<const char*> values) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return -1;
  std::string expected;
  int index = 0;
  for (const char* candidate : values) {
    if (std::strcmp(value, candidate) == 0) return index;
    expected += str_cat(index == 0 ? "" : index + 1 == int(values.size()) ? " or " : ", ", candidate);
    ++index;
  }
  throw_value_error("[cuda] ", name, ": expected ", expected, ", got '", value, "'");
}

thread_local int scopes = 0;               // EnvironmentScopes open on the thread
thread_local uint64_t scoped_version = 0;  // the outermost one's version

uint64_t current_environment_version() {
  static std::atomic<uint64_t> next{1};
  thread_local std::vector<char*> seen;
  thread_local char** seen_array = nullptr;
  thread_local uint64_t version = 0;
  char** entries = environ;
  size_t count = 0;
  if (entries != nullptr) {
    while (entries[count] != nullptr) ++count;
  }
  if (version == 0 || entries != seen_array || count != seen.size() ||
      (count > 0 && std::memcmp(seen.data(), entries, count * sizeof(char*)) != 0)) {
    seen.assign(entries, entries + count);
    seen_array = entries;
    version = next.fetch_add(1);
  }
  return version;
}
}  // namespace

uint64_t environment_version() { return scopes > 0 ? scoped_version : current_environment_version(); }

EnvironmentScope::EnvironmentScope() {
  if (scopes == 0) scoped_version = current_environment_version();
  ++scopes;
}

EnvironmentScope::~EnvironmentScope() { --scopes; }

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
  thread_local Kept<std::optional<int>> slot;
  return kept(slot, []() -> std::optional<int> {
    const char* value = std::getenv("FLASHJIT_CUDA_SPLITS");
    if (value == nullptr || *value == '\0') return std::nullopt;
    return std::max(1, std::atoi(value));
  });
}

int decode_warps() {
  thread_local Kept<int> slot;
  return kept(slot, [] {
    const int chosen = choice("FLASHJIT_CUDA_DECODE_WARPS", {"1", "4"});
    return chosen < 0 ? 0 : chosen == 0 ? 1 : 4;
  });
}

bool kv_cache_hopper() {
  thread_local Kept<bool> slot;
  return kept(slot, [] {
    const int chosen = choice("FLASHJIT_CUDA_KV_HOPPER", {"0", "1"});
    return chosen < 0 ? decode_warps() == 0 : chosen == 1;
  });
}

int overlap_launches() {
  thread_local Kept<int> slot;
  return kept(slot, [] {
    const int chosen = choice("FLASHJIT_CUDA_OVERLAP", {"0", "eager", "1"});
    return chosen < 0 ? 2 : chosen;
  });
}

int backward_overlap() {
  thread_local Kept<int> slot;
  return kept(slot, [] {
    const int chosen = choice("FLASHJIT_CUDA_BACKWARD_OVERLAP", {"0", "1", "auto"});
    return chosen == 0 || chosen == 1 ? chosen : -1;
  });
}

bool trace_tiles() {
  thread_local Kept<bool> slot;
  return kept(slot, [] { return choice("FLASHJIT_CUDA_TRACE", {"0", "1"}) == 1; });
}

int one_pass_dq() {
  const int chosen = choice("FLASHJIT_CUDA_ONE_PASS_DQ", {"ordered", "none", "unordered", "eager", "arrival", "writer",
                                                         "writer-arrival", "writer-eager", "writer-groups", "atomic",
                                                         "writer-pair", "writer-diagonal"});
  return chosen < 0 ? kDefaultOnePassDq : chosen;
}

int one_pass_whole_steps(int unset) {
  const int chosen = choice("FLASHJIT_CUDA_ONE_PASS_STEPS", {"carried", "whole", "whole-concurrent"});
  return chosen < 0 ? unset : chosen;
}

bool one_pass_dq_set() {
  const char* value = std::getenv("FLASHJIT_CUDA_ONE_PASS_DQ");
  return value != nullptr && *value != '\0';
}

std::optional<bool> one_pass_backward() {
  thread_local Kept<std::optional<bool>> slot;
  return kept(slot, []() -> std::optional<bool> {
    const int chosen = choice("FLASHJIT_CUDA_BACKWARD", {"split", "one-pass"});
    if (chosen < 0) return std::nullopt;
    return chosen == 1;
  });
}

int64_t one_pass_sums_bytes() {
  thread_local Kept<int64_t> slot;
  return kept(slot, []() -> int64_t {
    const char* value = std::getenv("FLASHJIT_CUDA_ONE_PASS_SUMS_MIB");
    if (value == nullptr || *value == '\0') return kDefaultOnePassSumsMiB << 20;
    if (std::strcmp(value, "off") == 0) return 0;
    char* end = nullptr;
    const long long mib = std::strtoll(value, &end, 10);
    if (*end != '\0' || mib < 0 || mib > (int64_t(1) << 40)) {
      throw_value_error("[cuda] FLASHJIT_CUDA_ONE_PASS_SUMS_MIB: expected a whole number of MiB (0 or off: no limit), "
                        "got '", value, "'");
    }
    return int64_t(mib) << 20;
  });
}

bool dkdv_shared_operands() {
  thread_local Kept<bool> slot;
  return kept(slot, [] { return choice("FLASHJIT_CUDA_DKDV", {"registers", "shared"}) != 0; });
}

int dkdv_parts() {
  thread_local Kept<int> slot;
  return kept(slot, [] {
    const int chosen = choice("FLASHJIT_CUDA_DKDV_PARTS", {"off", "auto", "2", "4", "8"});
    return chosen == 0 ? 0 : chosen < 0 || chosen == 1 ? -1 : 1 << (chosen - 1);
  });
}

bool varlen_single_launch() {
  thread_local Kept<bool> slot;
  return kept(slot, [] { return switch_on("FLASHJIT_CUDA_VARLEN"); });
}

}  // namespace flashjit::cuda::settings
