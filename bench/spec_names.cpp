// Host time of the kernel choice's string work on every CUDA call (no GPU needed): the
// kernel's name (the loaded-function cache's key), the tuning key and the tuned-tile lookup.
// Build against the core library of a `make build-cpp` tree and run:
//   g++ -O2 -std=c++17 -I src -I include bench/spec_names.cpp build/cpp/libflashjit_core.a -ldl -lpthread \
//     -o /tmp/spec_names && /tmp/spec_names
#include <chrono>
#include <cstdio>

#include "cuda/kernel_spec.hpp"
#include "cuda/tuning.hpp"

using namespace flashjit::cuda;

int main() {
  KernelTraits traits;
  traits.dtype = FJ_BFLOAT16;
  traits.head_dim_qk = traits.head_dim_v = 128;
  traits.arch = 90;
  traits.window = true;
  constexpr int kCalls = 20000;
  const auto time = [&](const char* what, auto fn) {
    const auto start = std::chrono::steady_clock::now();
    size_t sink = 0;
    for (int i = 0; i < kCalls; ++i) sink += fn();
    const auto end = std::chrono::steady_clock::now();
    std::printf("%-34s %.3f us a call (%zu)\n", what,
                std::chrono::duration<double, std::micro>(end - start).count() / kCalls, sink % 7);
  };
  time("forward_kernel(traits)", [&] { return size_t(forward_kernel(traits).block_n); });
  const KernelSpec spec = forward_kernel(traits);
  time("KernelSpec::name()", [&] { return spec.name().size(); });
  time("tuning_key()", [&] { return tuning_key(traits, 4096).size(); });
  time("tuned_forward_tiles() (built-in)", [&] { return size_t(tuned_forward_tiles("", 90, tuning_key(traits, 4096)).block_n); });
  return 0;
}
