// The CUDA backend's host path without a GPU: the null driver (tests/null_driver) stands in
// for libcuda.so.1 as one sm_90 device of 132 multiprocessors, NVRTC compiles the kernels for
// real, and every call goes through validation, kernel choice, TMA descriptors, scratch and
// launches, which the driver records instead of running. Checked: what is launched (entries,
// grids, blocks, shared memory within the device's limits), that scratch is given back, that
// repeated calls encode no descriptor again, that planning enqueues nothing and sizes the
// workspace, and that the host never writes into the operands' memory. Run by ctest with the
// null driver first on LD_LIBRARY_PATH; elsewhere (a real driver found) the tests skip.
#include <dlfcn.h>
#include <unistd.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "cuda/kernel_spec.hpp"
#include "cuda/kernels/params.cuh"
#include "cuda/tuning.hpp"
#include "flashjit/cuda.h"
#include "flashjit/flashjit.h"
#include "harness.hpp"

namespace flashjit::testing {
namespace {

struct NullLaunch {  // null_cuda.c's null_launch
  unsigned grid[3], block[3], shared_bytes;
  unsigned programmatic;
  const char* function;
  unsigned char params[2048];
};
static_assert(sizeof(KernelParams) <= sizeof(NullLaunch::params), "the null driver records KernelParams whole");

struct NullDriver {
  void (*counts)(unsigned long long*) = nullptr;
  unsigned (*launches)(NullLaunch*, unsigned) = nullptr;
  int (*record_params)(size_t) = nullptr;
  void (*set_capturing)(int) = nullptr;

  NullDriver() {
    void* library = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (library == nullptr) return;
    counts = reinterpret_cast<decltype(counts)>(dlsym(library, "null_driver_counts"));
    launches = reinterpret_cast<decltype(launches)>(dlsym(library, "null_driver_launches"));
    record_params = reinterpret_cast<decltype(record_params)>(dlsym(library, "null_driver_record_params"));
    set_capturing = reinterpret_cast<decltype(set_capturing)>(dlsym(library, "null_driver_set_capturing"));
    if (record_params != nullptr && record_params(sizeof(KernelParams)) != 0) record_params = nullptr;
  }
  bool present() const {
    return counts != nullptr && launches != nullptr && record_params != nullptr && set_capturing != nullptr;
  }

  struct Counts {
    unsigned long long launches, encodes, allocs, frees;
  };
  Counts now() const {
    unsigned long long values[4] = {};
    counts(values);
    return {values[0], values[1], values[2], values[3]};
  }
  std::vector<NullLaunch> last(unsigned count) const {
    std::vector<NullLaunch> out(count);
    out.resize(launches(out.data(), count));
    return out;
  }
};

const NullDriver& null_driver() {
  static const NullDriver driver;
  return driver;
}

#define REQUIRE_NULL_DRIVER()                                                                      \
  do {                                                                                             \
    if (!null_driver().present()) {                                                                \
      const char* required = std::getenv("FLASHJIT_REQUIRE_NULL_DRIVER");                          \
      if (required != nullptr && std::string(required) == "1") FAIL() << "the null driver was not loaded"; \
      GTEST_SKIP() << "libcuda.so.1 here is not the null driver";                                  \
    }                                                                                              \
    int32_t major = 0, minor = 0;                                                                  \
    if (fj_cuda_nvrtc_version(&major, &minor) != FJ_SUCCESS) {                                     \
      const char* required = std::getenv("FLASHJIT_REQUIRE_NVRTC");                                \
      if (required != nullptr && std::string(required) == "1") FAIL() << fj_last_error();          \
      GTEST_SKIP() << fj_last_error();                                                             \
    }                                                                                              \
  } while (0)

// The nine tensors of a call, their views moved to the (null) GPU: host memory the driver never
// touches, whose guards and contents show whether the host wrote into it.
struct DeviceBuffers : AttentionBuffers {
  DeviceBuffers(int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q, int64_t seqlen_k,
                int64_t head_dim, fj_dtype dtype)
      : AttentionBuffers(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype) {
    for (GuardedTensor* t : all()) t->poison();
  }
  std::vector<GuardedTensor*> all() { return {&q, &k, &v, &o, &lse, &dout, &dq, &dk, &dv}; }
  fj_tensor on_gpu(GuardedTensor& t) {
    fj_tensor view = t.view();
    view.device_type = FJ_DEVICE_CUDA;
    view.device_index = 0;
    return view;
  }
  fj_status forward(const fj_attention_options& options) {
    fj_tensor tq = on_gpu(q), tk = on_gpu(k), tv = on_gpu(v), to = on_gpu(o), tlse = on_gpu(lse);
    return fj_attention_forward(&tq, &tk, &tv, &options, &to, &tlse);
  }
  fj_status backward(const fj_attention_options& options) {
    fj_tensor tq = on_gpu(q), tk = on_gpu(k), tv = on_gpu(v), to = on_gpu(o), tlse = on_gpu(lse),
              tdout = on_gpu(dout), tdq = on_gpu(dq), tdk = on_gpu(dk), tdv = on_gpu(dv);
    return fj_attention_backward(&tq, &tk, &tv, &to, &tlse, &tdout, &options, &tdq, &tdk, &tdv);
  }
  fj_status prepare_forward(const fj_attention_options& options, size_t* bytes) {
    fj_tensor tq = on_gpu(q), tk = on_gpu(k), tv = on_gpu(v), to = on_gpu(o), tlse = on_gpu(lse);
    return fj_attention_prepare_forward(&tq, &tk, &tv, &options, &to, &tlse, bytes);
  }
  fj_status prepare_backward(const fj_attention_options& options, size_t* bytes) {
    fj_tensor tq = on_gpu(q), tk = on_gpu(k), tv = on_gpu(v), to = on_gpu(o), tlse = on_gpu(lse),
              tdout = on_gpu(dout), tdq = on_gpu(dq), tdk = on_gpu(dk), tdv = on_gpu(dv);
    return fj_attention_prepare_backward(&tq, &tk, &tv, &to, &tlse, &tdout, &options, &tdq, &tdk, &tdv, bytes);
  }
  // Whether every buffer is as poison() left it: no byte in or around a view was written.
  bool untouched() {
    for (GuardedTensor* t : all()) {
      if (!t->guards_intact()) return false;
      for (double value : t->values()) {
        if (value == value) return false;  // poison() writes NaN (or 0xFF bytes, NaN in every float type)
      }
    }
    return true;
  }
};

constexpr unsigned kMaxSharedBytes = 232448;  // what the null driver reports for sm_90

// The kernel cache: FLASHJIT_NULL_DRIVER_CACHE (ctest sets one for its run, kept between the
// tests' processes), else a folder of this process's own, removed afterwards.
class CudaHostPath : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* shared = std::getenv("FLASHJIT_NULL_DRIVER_CACHE");
    own_ = shared == nullptr || *shared == '\0';
    directory_ = own_ ? std::string(std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp") +
                            "/flashjit-null-driver-" + std::to_string(getpid())
                      : std::string(shared);
    setenv("FLASHJIT_CACHE_DIR", directory_.c_str(), 1);
  }
  void TearDown() override {
    unsetenv("FLASHJIT_CACHE_DIR");
    if (own_) std::system(("rm -rf '" + directory_ + "'").c_str());
  }
  std::string directory_;
  bool own_ = true;
};

struct Problem {
  const char* what;
  int64_t batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim;
  fj_dtype dtype;
  fj_causal causal;
  double dropout_p, softcap;
  int64_t window_left;
};

// Each problem's forward and backward launch their kernels (entries in order, grids and blocks
// the device takes, shared memory within its opt-in limit), give back the scratch they took,
// and write nothing into the operands.
TEST_F(CudaHostPath, CallsLaunchWithinTheDevicesLimits) {
  REQUIRE_NULL_DRIVER();
  const Problem problems[] = {
      {"bf16 D64", 2, 4, 4, 300, 300, 64, FJ_BFLOAT16, FJ_CAUSAL_NONE, 0.0, 0.0, -1},
      {"bf16 D128 causal GQA", 1, 8, 2, 257, 257, 128, FJ_BFLOAT16, FJ_CAUSAL_TOP_LEFT, 0.0, 0.0, -1},
      {"fp16 D256 window softcap", 1, 2, 2, 200, 333, 256, FJ_FLOAT16, FJ_CAUSAL_NONE, 0.0, 30.0, 64},
      {"bf16 D64 dropout", 1, 2, 2, 128, 128, 64, FJ_BFLOAT16, FJ_CAUSAL_NONE, 0.1, 0.0, -1},
      {"fp16 D40 (mma.sync)", 1, 2, 2, 100, 100, 40, FJ_FLOAT16, FJ_CAUSAL_BOTTOM_RIGHT, 0.0, 0.0, -1},
      {"fp32 D64 (scalar)", 1, 2, 1, 50, 70, 64, FJ_FLOAT32, FJ_CAUSAL_NONE, 0.0, 0.0, -1},
      {"decode bf16 D128 GQA", 2, 32, 8, 1, 4096, 128, FJ_BFLOAT16, FJ_CAUSAL_NONE, 0.0, 0.0, -1},
  };
  long long grid_live = 0;
  for (const Problem& p : problems) {
    SCOPED_TRACE(p.what);
    DeviceBuffers buffers(p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.seqlen_k, p.head_dim, p.dtype);
    fj_attention_options options = fj_attention_options_default();
    options.causal = p.causal;
    options.dropout_p = p.dropout_p;
    options.dropout_seed = 7;
    options.softcap = p.softcap;
    options.window_left = p.window_left;
    for (bool backward : {false, true}) {
      const NullDriver::Counts before = null_driver().now();
      ASSERT_EQ(backward ? buffers.backward(options) : buffers.forward(options), FJ_SUCCESS) << fj_last_error();
      const NullDriver::Counts after = null_driver().now();
      // Scratch is given back, but for the backward's that is kept for its stream (made at its
      // first call, grown by later ones: one allocation more than frees, once).
      const long long live = (long long)(after.allocs - before.allocs) - (long long)(after.frees - before.frees);
      EXPECT_GE(live, 0);
      EXPECT_LE(live, backward ? 1 : 0) << "scratch kept after the call";
      grid_live += live;
      const unsigned launched = unsigned(after.launches - before.launches);
      ASSERT_GE(launched, 1u);
      ASSERT_LE(launched, 5u);
      const std::vector<NullLaunch> launches = null_driver().last(launched);
      std::string entries;
      for (const NullLaunch& launch : launches) {
        entries += std::string(entries.empty() ? "" : " ") + launch.function;
        EXPECT_GE(launch.grid[0], 1u);
        EXPECT_GE(launch.grid[1], 1u);
        EXPECT_EQ(launch.grid[2], 1u);
        EXPECT_EQ(launch.block[0] % 32, 0u) << launch.function;
        EXPECT_LE(launch.block[0], 1024u) << launch.function;
        EXPECT_LE(launch.shared_bytes, kMaxSharedBytes) << launch.function;
      }
      if (backward) {
        // The dQ kernel (or the one pass) and dK/dV's kernels, the sm_90a ones after their prep.
        EXPECT_NE(entries.find("fj_attention_backward_dkdv"), std::string::npos) << entries;
        if (p.dtype != FJ_FLOAT32 && p.head_dim >= 64) {
          EXPECT_EQ(std::string(launches.front().function), "fj_attention_backward_prep") << entries;
        }
      } else if (p.seqlen_q == 1) {
        // Too few query rows to fill the GPU: keys split over more blocks than there are query
        // tiles (a batch and key head's, GQA groups packed), then combined.
        EXPECT_EQ(entries, "fj_attention_forward fj_attention_forward_combine") << entries;
        EXPECT_GT(int64_t(launches.front().grid[0]) * launches.front().grid[1], p.batch * p.heads_kv);
        // On sm_90 the combine is launched while the split kernel runs (it waits for it on the GPU).
        EXPECT_EQ(launches.front().programmatic, 0u);
        EXPECT_EQ(launches.back().programmatic, 1u);
      } else {
        EXPECT_EQ(entries, "fj_attention_forward") << entries;
      }
    }
    EXPECT_TRUE(buffers.untouched()) << "the host wrote into an operand's memory";
  }
  EXPECT_LE(grid_live, 1) << "one stream: one kept scratch";
}

// The backward's scratch kept for its stream: a repeated backward takes no allocation and reuses
// the same scratch, from any thread once the previous call has enqueued its kernels; more
// scratch grows it in the stream's order (a new one, the old one freed); scratch beyond the kept
// bound (256 KiB) is taken and given back each call, and the kept one stays.
TEST_F(CudaHostPath, BackwardKeepsItsScratchForTheStream) {
  REQUIRE_NULL_DRIVER();
  DeviceBuffers buffers(1, 4, 4, 300, 300, 64, FJ_BFLOAT16);
  const fj_attention_options options = fj_attention_options_default();
  // The scratch rows' pointer of a backward's launches, and the allocations and frees it made.
  struct Seen {
    const void* delta;
    unsigned long long allocs, frees;
  };
  const auto backward = [&](DeviceBuffers& b) {
    const NullDriver::Counts before = null_driver().now();
    EXPECT_EQ(b.backward(options), FJ_SUCCESS) << fj_last_error();
    const NullDriver::Counts after = null_driver().now();
    const std::vector<NullLaunch> launches = null_driver().last(unsigned(after.launches - before.launches));
    KernelParams params;
    std::memcpy(&params, launches.back().params, sizeof params);
    return Seen{params.delta, after.allocs - before.allocs, after.frees - before.frees};
  };
  const Seen first = backward(buffers), again = backward(buffers);
  EXPECT_NE(first.delta, nullptr);
  EXPECT_EQ(again.allocs, 0u);
  EXPECT_EQ(again.frees, 0u);
  EXPECT_EQ(again.delta, first.delta);
  Seen other{};
  std::thread([&] { other = backward(buffers); }).join();
  EXPECT_EQ(other.allocs, 0u) << "the stream's scratch, free again once the last call enqueued";
  EXPECT_EQ(other.delta, first.delta);
  // 16 heads of 1,024 rows, two floats a row: 128 KiB, more than the first call's 9.6 KiB.
  DeviceBuffers medium(1, 16, 16, 1024, 64, 64, FJ_BFLOAT16);
  const Seen grown = backward(medium);
  EXPECT_EQ(grown.allocs, 1u);
  EXPECT_EQ(grown.frees, 1u) << "the smaller scratch freed in the stream's order";
  EXPECT_EQ(backward(medium).allocs, 0u);
  EXPECT_EQ(backward(buffers).allocs, 0u) << "the grown scratch serves the smaller call";
  // 16 heads of 2,176 padded rows, two floats a row: 272 KiB, past the bound.
  DeviceBuffers large(1, 16, 16, 2100, 64, 64, FJ_BFLOAT16);
  for (int call = 0; call < 2; ++call) {
    const Seen seen = backward(large);
    EXPECT_EQ(seen.allocs, 1u);
    EXPECT_EQ(seen.frees, 1u);
  }
  EXPECT_EQ(backward(buffers).allocs, 0u) << "the kept scratch still kept";
}

// A call again with the same operands reuses its TMA descriptors (none encoded); a new address
// for one operand encodes that operand's again, and nothing else.
TEST_F(CudaHostPath, RepeatedCallsEncodeNoDescriptorAgain) {
  REQUIRE_NULL_DRIVER();
  DeviceBuffers first(2, 4, 4, 256, 256, 128, FJ_BFLOAT16), second(2, 4, 4, 256, 256, 128, FJ_BFLOAT16);
  const fj_attention_options options = fj_attention_options_default();
  ASSERT_EQ(first.forward(options), FJ_SUCCESS) << fj_last_error();
  ASSERT_EQ(first.backward(options), FJ_SUCCESS) << fj_last_error();
  const NullDriver::Counts before = null_driver().now();
  for (int call = 0; call < 3; ++call) {
    ASSERT_EQ(first.forward(options), FJ_SUCCESS) << fj_last_error();
    ASSERT_EQ(first.backward(options), FJ_SUCCESS) << fj_last_error();
  }
  EXPECT_EQ(null_driver().now().encodes, before.encodes);
  // Another q: the forward's q descriptor; then the backward's q descriptors, in the dQ kernel's
  // boxes (the forward's where their rows agree, then reused) and the dK/dV kernel's; no other.
  first.q = std::move(second.q);
  const unsigned long long encodes = null_driver().now().encodes;
  ASSERT_EQ(first.forward(options), FJ_SUCCESS) << fj_last_error();
  EXPECT_EQ(null_driver().now().encodes - encodes, 1u);
  ASSERT_EQ(first.backward(options), FJ_SUCCESS) << fj_last_error();
  const unsigned long long backward_encodes = null_driver().now().encodes - encodes - 1;
  EXPECT_GE(backward_encodes, 1u);
  EXPECT_LE(backward_encodes, 2u);
}

// A call planned again for the same operands launches the same kernels with the same parameters,
// byte for byte (descriptors, scratch pointers: the null driver's pool hands the same addresses
// back); other operands change the parameters.
TEST_F(CudaHostPath, RepeatedCallsLaunchTheSameParameters) {
  REQUIRE_NULL_DRIVER();
  DeviceBuffers first(2, 8, 2, 200, 300, 128, FJ_BFLOAT16), second(2, 8, 2, 200, 300, 128, FJ_BFLOAT16);
  fj_attention_options options = fj_attention_options_default();
  options.causal = FJ_CAUSAL_BOTTOM_RIGHT;
  const auto run = [&](DeviceBuffers& buffers, bool backward) {
    const unsigned long long before = null_driver().now().launches;
    EXPECT_EQ(backward ? buffers.backward(options) : buffers.forward(options), FJ_SUCCESS) << fj_last_error();
    return null_driver().last(unsigned(null_driver().now().launches - before));
  };
  for (bool backward : {false, true}) {
    SCOPED_TRACE(backward ? "backward" : "forward");
    const std::vector<NullLaunch> once = run(first, backward), again = run(first, backward),
                                  other = run(second, backward);
    ASSERT_EQ(once.size(), again.size());
    ASSERT_EQ(once.size(), other.size());
    for (size_t i = 0; i < once.size(); ++i) {
      EXPECT_EQ(std::string(once[i].function), again[i].function);
      EXPECT_EQ(std::memcmp(once[i].grid, again[i].grid, sizeof once[i].grid), 0);
      EXPECT_EQ(std::memcmp(once[i].params, again[i].params, sizeof(KernelParams)), 0) << once[i].function;
      EXPECT_NE(std::memcmp(once[i].params, other[i].params, sizeof(KernelParams)), 0) << once[i].function;
    }
  }
}

// The same dense forward again launches the same function with the same parameters; after the
// loaded kernels are cleared a newly loaded one (the null driver hands out a new one a load), and
// under capture a block a work tile (no stream tile counter), then the persistent grid again.
TEST_F(CudaHostPath, RepeatedForwardFollowsLoadsAndCapture) {
  REQUIRE_NULL_DRIVER();
  unsetenv("FLASHJIT_CUDA_TILES");
  DeviceBuffers buffers(2, 32, 8, 512, 512, 64, FJ_BFLOAT16);  // 64 heads of 3 or 4 query blocks
  const fj_attention_options options = fj_attention_options_default();
  const auto forward = [&] {
    EXPECT_EQ(buffers.forward(options), FJ_SUCCESS) << fj_last_error();
    return null_driver().last(1).front();
  };
  const NullLaunch once = forward(), again = forward();
  EXPECT_EQ(again.function, once.function);
  EXPECT_EQ(std::memcmp(again.params, once.params, sizeof(KernelParams)), 0);
  EXPECT_EQ(once.grid[0], 132u);  // persistent blocks taking tiles from the stream's counter
  ASSERT_EQ(fj_cuda_clear_memory_cache(), FJ_SUCCESS);
  const NullLaunch reloaded = forward();
  EXPECT_NE(reloaded.function, once.function);  // loaded again, not the unloaded one
  EXPECT_EQ(std::string(reloaded.function), once.function);
  EXPECT_EQ(std::memcmp(reloaded.params, once.params, sizeof(KernelParams)), 0);
  null_driver().set_capturing(1);
  const NullLaunch captured = forward(), captured_again = forward();
  null_driver().set_capturing(0);
  EXPECT_GT(captured.grid[0], 132u);  // a block a work tile under capture (192 or 256 by the tiles)
  EXPECT_EQ(captured_again.grid[0], captured.grid[0]);
  EXPECT_EQ(forward().grid[0], 132u);  // outside capture again
}

// The kernels a call chooses are kept for the thread's next calls; a setting changed between
// calls (tests and the tuner switch them within a process) is still taken at the next call.
TEST_F(CudaHostPath, SettingsChangedBetweenCallsTakeEffect) {
  REQUIRE_NULL_DRIVER();
  DeviceBuffers buffers(1, 4, 4, 512, 512, 64, FJ_BFLOAT16);
  const fj_attention_options options = fj_attention_options_default();
  const auto forward = [&] {
    EXPECT_EQ(buffers.forward(options), FJ_SUCCESS) << fj_last_error();
    return null_driver().last(1).front();
  };
  const auto backward_launches = [&] {
    const unsigned long long before = null_driver().now().launches;
    EXPECT_EQ(buffers.backward(options), FJ_SUCCESS) << fj_last_error();
    return null_driver().now().launches - before;
  };
  unsetenv("FLASHJIT_CUDA_TILES");
  unsetenv("FLASHJIT_CUDA_BACKWARD");
  const NullLaunch chosen = forward();
  EXPECT_EQ(forward().shared_bytes, chosen.shared_bytes);
  setenv("FLASHJIT_CUDA_TILES", "n=64,stages=2,groups=2", 1);
  const NullLaunch forced = forward();
  setenv("FLASHJIT_CUDA_TILES", "n=128,stages=2,groups=2", 1);
  const NullLaunch wider = forward();
  EXPECT_NE(forced.shared_bytes, wider.shared_bytes);  // twice the keys a step in each K/V buffer
  unsetenv("FLASHJIT_CUDA_TILES");
  EXPECT_EQ(forward().shared_bytes, chosen.shared_bytes);
  EXPECT_EQ(forward().block[0], chosen.block[0]);
  // A tuning saved for the class (as `flashjit tune` does) is taken by the next call, and its
  // entry dropped again gives the built-in choice back.
  flashjit::cuda::KernelTraits traits;
  traits.dtype = FJ_BFLOAT16;
  traits.head_dim_qk = traits.head_dim_v = 64;
  traits.arch = 90;
  const std::string key = flashjit::cuda::tuning_key(traits, 512);
  flashjit::cuda::save_tuning("NVIDIA H200", 90, key + " n=64,stages=2,groups=2 100\n");
  EXPECT_EQ(forward().shared_bytes, forced.shared_bytes) << key;
  flashjit::cuda::save_tuning("NVIDIA H200", 90, key + " built-in 0\n");
  EXPECT_EQ(forward().shared_bytes, chosen.shared_bytes) << key;
  setenv("FLASHJIT_CUDA_BACKWARD", "split", 1);
  EXPECT_EQ(backward_launches(), 3u);  // prep, dQ, dK/dV
  setenv("FLASHJIT_CUDA_BACKWARD", "one-pass", 1);
  EXPECT_EQ(backward_launches(), 3u);  // prep, dK/dV with dQ's sums (writer-pair, the default), dQ from them
  setenv("FLASHJIT_CUDA_ONE_PASS_DQ", "ordered", 1);
  EXPECT_EQ(backward_launches(), 2u);  // prep, dK/dV with dQ
  // With the dQ writer, the kernel that writes dQ from its sums follows: a block a query tile of
  // the one pass's step (64 rows at head dim 64) of every head's 512 scratch rows, on the sums.
  setenv("FLASHJIT_CUDA_ONE_PASS_DQ", "writer", 1);
  EXPECT_EQ(backward_launches(), 3u);
  const NullLaunch convert = null_driver().last(1).front();
  EXPECT_EQ(std::string(convert.function), "fj_attention_backward_dq_convert");
  EXPECT_EQ(convert.grid[0], 4u * 512 / 64);
  KernelParams convert_params;
  std::memcpy(&convert_params, convert.params, sizeof convert_params);
  EXPECT_NE(convert_params.dq_accum, nullptr);
  EXPECT_NE(convert_params.dq_semaphore, nullptr);
  // writer-groups: four groups' sums and counters, the same launches.
  setenv("FLASHJIT_CUDA_ONE_PASS_DQ", "writer-groups", 1);
  EXPECT_EQ(backward_launches(), 3u);
  KernelParams grouped;
  std::memcpy(&grouped, null_driver().last(1).front().params, sizeof grouped);
  EXPECT_EQ(grouped.dq_counters, 4 * convert_params.dq_counters);
  EXPECT_EQ(reinterpret_cast<char*>(grouped.dq_semaphore) - reinterpret_cast<char*>(grouped.dq_accum),
            4 * (reinterpret_cast<char*>(convert_params.dq_semaphore) - reinterpret_cast<char*>(convert_params.dq_accum)));
  EXPECT_EQ(grouped.dq_zero_floats, 0);
  // writer-pair: the writer's sums and counters, laid out as writer's, the same launches.
  setenv("FLASHJIT_CUDA_ONE_PASS_DQ", "writer-pair", 1);
  EXPECT_EQ(backward_launches(), 3u);
  KernelParams paired;
  std::memcpy(&paired, null_driver().last(1).front().params, sizeof paired);
  EXPECT_EQ(paired.dq_counters, convert_params.dq_counters);
  EXPECT_EQ(reinterpret_cast<char*>(paired.dq_semaphore) - reinterpret_cast<char*>(paired.dq_accum),
            reinterpret_cast<char*>(convert_params.dq_semaphore) - reinterpret_cast<char*>(convert_params.dq_accum));
  EXPECT_EQ(paired.dq_zero_floats, 0);
  // atomic: one group's sums, which the prep kernel zeroes (every float of them: 4 heads x 512
  // scratch rows x 64 head dims), then the dQ kernel of its own mode (the convert function).
  setenv("FLASHJIT_CUDA_ONE_PASS_DQ", "atomic", 1);
  EXPECT_EQ(backward_launches(), 3u);
  const std::vector<NullLaunch> atomic = null_driver().last(3);
  EXPECT_EQ(std::string(atomic[0].function), "fj_attention_backward_prep");
  EXPECT_EQ(std::string(atomic[1].function), "fj_attention_backward_dkdv");
  EXPECT_EQ(std::string(atomic[2].function), "fj_attention_backward_dq_convert");
  for (const NullLaunch& launch : atomic) {
    KernelParams params;
    std::memcpy(&params, launch.params, sizeof params);
    EXPECT_EQ(params.dq_zero_floats, 4 * 512 * 64) << launch.function;
    EXPECT_EQ(params.dq_counters, convert_params.dq_counters) << launch.function;
  }
  unsetenv("FLASHJIT_CUDA_ONE_PASS_DQ");
  // Whole steps at head dim 128 (FLASHJIT_CUDA_ONE_PASS_STEPS=whole): tiles of 64 queries, so the
  // dQ kernel takes a block a 64-row tile of every head's 512 scratch rows and the counters are two
  // a tile; the carried steps' tiles are 32 rows.
  {
    DeviceBuffers wide(1, 4, 4, 512, 512, 128, FJ_BFLOAT16);
    setenv("FLASHJIT_CUDA_BACKWARD", "one-pass", 1);
    const auto launches_of = [&](const char* steps) {
      setenv("FLASHJIT_CUDA_ONE_PASS_STEPS", steps, 1);
      const unsigned long long before = null_driver().now().launches;
      EXPECT_EQ(wide.backward(options), FJ_SUCCESS) << fj_last_error();
      return null_driver().last(unsigned(null_driver().now().launches - before));
    };
    for (const auto& [steps, rows] : {std::pair{"whole", 64u}, std::pair{"carried", 32u}}) {
      const std::vector<NullLaunch> launched = launches_of(steps);
      ASSERT_EQ(launched.size(), 3u) << steps;
      EXPECT_EQ(std::string(launched[2].function), "fj_attention_backward_dq_convert");
      EXPECT_EQ(launched[2].grid[0], 4u * 512 / rows) << steps;
      KernelParams params;
      std::memcpy(&params, launched[2].params, sizeof params);
      EXPECT_EQ(params.dq_counters, int64_t(2 * 4 * 512 / rows)) << steps;
    }
    unsetenv("FLASHJIT_CUDA_ONE_PASS_STEPS");
  }
  setenv("FLASHJIT_CUDA_BACKWARD", "split", 1);
  EXPECT_EQ(backward_launches(), 3u);
  unsetenv("FLASHJIT_CUDA_BACKWARD");
}

// fj_attention_options.nondeterministic: at head dims up to 64 and at 128 on sm_90 the backward
// takes the one pass with unordered dQ adds (prep with the sums zeroed, dK/dV, dQ from the sums;
// at 128 in whole steps), whose workspace planning also sizes; at other head dims (96), and where
// FLASHJIT_CUDA_BACKWARD forces a pass, the deterministic choice; a value other than 0 or 1 is an
// error naming the field.
TEST_F(CudaHostPath, NondeterministicBackwardTakesTheUnorderedOnePass) {
  REQUIRE_NULL_DRIVER();
  unsetenv("FLASHJIT_CUDA_BACKWARD");
  unsetenv("FLASHJIT_CUDA_ONE_PASS_DQ");
  fj_attention_options options = fj_attention_options_default();
  EXPECT_EQ(options.nondeterministic, 0);
  const auto launches_of = [&](DeviceBuffers& buffers) {
    const unsigned long long before = null_driver().now().launches;
    EXPECT_EQ(buffers.backward(options), FJ_SUCCESS) << fj_last_error();
    return null_driver().last(unsigned(null_driver().now().launches - before));
  };
  DeviceBuffers d64(1, 4, 4, 512, 512, 64, FJ_BFLOAT16);
  size_t deterministic_bytes = 0, unordered_bytes = 0;
  ASSERT_EQ(d64.prepare_backward(options, &deterministic_bytes), FJ_SUCCESS) << fj_last_error();
  const std::vector<NullLaunch> split = launches_of(d64);
  ASSERT_EQ(split.size(), 3u);
  EXPECT_EQ(std::string(split[1].function), "fj_attention_backward_dq");
  options.nondeterministic = 1;
  ASSERT_EQ(d64.prepare_backward(options, &unordered_bytes), FJ_SUCCESS) << fj_last_error();
  // dQ's float32 sums (4 heads x 512 rows x 64) and their tiles' counters beside the rows' scratch.
  EXPECT_GE(unordered_bytes, deterministic_bytes + size_t(4 * 512 * 64) * sizeof(float));
  const std::vector<NullLaunch> unordered = launches_of(d64);
  ASSERT_EQ(unordered.size(), 3u);
  EXPECT_EQ(std::string(unordered[0].function), "fj_attention_backward_prep");
  EXPECT_EQ(std::string(unordered[1].function), "fj_attention_backward_dkdv");
  EXPECT_EQ(std::string(unordered[2].function), "fj_attention_backward_dq_convert");
  KernelParams params;
  std::memcpy(&params, unordered[0].params, sizeof params);
  EXPECT_EQ(params.dq_zero_floats, 4 * 512 * 64);
  // The choice is kept per call kind: a deterministic call after it takes the split kernels again.
  options.nondeterministic = 0;
  EXPECT_EQ(std::string(launches_of(d64)[1].function), "fj_attention_backward_dq");
  options.nondeterministic = 1;
  setenv("FLASHJIT_CUDA_BACKWARD", "split", 1);
  EXPECT_EQ(std::string(launches_of(d64)[1].function), "fj_attention_backward_dq");
  unsetenv("FLASHJIT_CUDA_BACKWARD");
  DeviceBuffers d128(1, 4, 4, 512, 512, 128, FJ_BFLOAT16);
  const std::vector<NullLaunch> wide = launches_of(d128);
  ASSERT_EQ(wide.size(), 3u);
  EXPECT_EQ(std::string(wide[1].function), "fj_attention_backward_dkdv");
  EXPECT_EQ(std::string(wide[2].function), "fj_attention_backward_dq_convert");
  std::memcpy(&params, wide[0].params, sizeof params);
  EXPECT_EQ(params.dq_zero_floats, 4 * 512 * 128);
  DeviceBuffers d96(1, 4, 4, 512, 512, 96, FJ_BFLOAT16);
  const std::vector<NullLaunch> other = launches_of(d96);
  ASSERT_EQ(other.size(), 3u);
  EXPECT_EQ(std::string(other[1].function), "fj_attention_backward_dq");
  std::memcpy(&params, other[0].params, sizeof params);
  EXPECT_EQ(params.dq_zero_floats, 0);
  options.nondeterministic = 2;
  EXPECT_EQ(d64.backward(options), FJ_ERROR_INVALID_VALUE);
  EXPECT_NE(std::string(fj_last_error()).find("nondeterministic: expected 0"), std::string::npos) << fj_last_error();
}

// FLASHJIT_CUDA_ONE_PASS_SUMS_MIB: a one pass whose float32 dQ sums pass the budget runs in parts,
// a prep, a dK/dV and a dQ launch each, over views of whole batch entries or (where one entry's sums
// do not fit) of a batch entry's key/value heads with their query heads, its sums its own size (the
// workspace the call asks for shrinks with them), dropout drawn as the whole draws it; under the
// budget, off or unset, one plan; another value is an error naming the variable.
TEST_F(CudaHostPath, OnePassSumsOverTheBudgetRunInParts) {
  REQUIRE_NULL_DRIVER();
  struct Unset {
    ~Unset() {
      unsetenv("FLASHJIT_CUDA_BACKWARD");
      unsetenv("FLASHJIT_CUDA_ONE_PASS_SUMS_MIB");
    }
  } unset;
  setenv("FLASHJIT_CUDA_BACKWARD", "one-pass", 1);
  unsetenv("FLASHJIT_CUDA_ONE_PASS_DQ");
  DeviceBuffers buffers(2, 8, 2, 2048, 2048, 64, FJ_BFLOAT16);  // sums: 2 x 8 x 2048 x 64 floats (8 MiB)
  fj_attention_options options = fj_attention_options_default();
  options.dropout_p = 0.25;
  options.dropout_seed = 7;
  struct Part {
    KernelParams prep, dkdv;
    size_t workspace;
  };
  const auto parts_of = [&](const char* budget) {
    if (budget == nullptr) {
      unsetenv("FLASHJIT_CUDA_ONE_PASS_SUMS_MIB");
    } else {
      setenv("FLASHJIT_CUDA_ONE_PASS_SUMS_MIB", budget, 1);
    }
    size_t workspace = 0;
    EXPECT_EQ(buffers.prepare_backward(options, &workspace), FJ_SUCCESS) << fj_last_error();
    const unsigned long long before = null_driver().now().launches;
    EXPECT_EQ(buffers.backward(options), FJ_SUCCESS) << fj_last_error();
    const std::vector<NullLaunch> launched = null_driver().last(unsigned(null_driver().now().launches - before));
    std::vector<Part> parts;
    EXPECT_EQ(launched.size() % 3, 0u);
    for (size_t index = 0; index + 2 < launched.size(); index += 3) {
      EXPECT_EQ(std::string(launched[index].function), "fj_attention_backward_prep");
      EXPECT_EQ(std::string(launched[index + 1].function), "fj_attention_backward_dkdv");
      EXPECT_EQ(std::string(launched[index + 2].function), "fj_attention_backward_dq_convert");
      Part part{};
      std::memcpy(&part.prep, launched[index].params, sizeof part.prep);
      std::memcpy(&part.dkdv, launched[index + 1].params, sizeof part.dkdv);
      part.workspace = workspace;
      parts.push_back(part);
    }
    return parts;
  };
  const std::vector<Part> whole = parts_of(nullptr);
  ASSERT_EQ(whole.size(), 1u);
  EXPECT_EQ(parts_of("off").size(), 1u);
  EXPECT_EQ(parts_of("8").size(), 1u);  // the sums fit
  const KernelParams& all = whole[0].dkdv;
  const auto bytes_between = [](const KernelOperand& part, const KernelOperand& from) {
    return static_cast<const char*>(part.data) - static_cast<const char*>(from.data);
  };
  // 4 MiB: a batch entry's sums fit, so a part a batch entry, every head.
  const std::vector<Part> batches = parts_of("4");
  ASSERT_EQ(batches.size(), 2u);
  for (size_t b = 0; b < batches.size(); ++b) {
    const KernelParams& part = batches[b].dkdv;
    EXPECT_EQ(part.batch, 1);
    EXPECT_EQ(part.heads_q, 8);
    EXPECT_EQ(part.heads_kv, 2);
    EXPECT_EQ(bytes_between(part.q, all.q), int64_t(b) * all.q.stride_batch * 2);
    EXPECT_EQ(bytes_between(part.dk, all.dk), int64_t(b) * all.dk.stride_batch * 2);
    EXPECT_EQ(part.dropout_head_base, int64_t(b) * 8);  // batch entry b's counters
    EXPECT_EQ(part.dq_counters * 2, all.dq_counters);
  }
  // About half: the rows and sums of one batch entry.
  EXPECT_LT(batches[0].workspace, whole[0].workspace * 6 / 10);
  EXPECT_GT(batches[0].workspace, whole[0].workspace * 4 / 10);
  // 2 MiB (or 3: whole heads only): a part a key/value head of a batch entry, with its group of
  // four query heads.
  for (const char* budget : {"2", "3"}) {
    const std::vector<Part> heads = parts_of(budget);
    ASSERT_EQ(heads.size(), 4u) << budget;
    for (size_t index = 0; index < heads.size(); ++index) {
      const int64_t b = int64_t(index) / 2, kv = int64_t(index) % 2;
      const KernelParams& part = heads[index].dkdv;
      EXPECT_EQ(part.batch, 1);
      EXPECT_EQ(part.heads_q, 4);
      EXPECT_EQ(part.heads_kv, 1);
      EXPECT_EQ(part.group_size, 4);
      EXPECT_EQ(bytes_between(part.q, all.q), (b * all.q.stride_batch + kv * 4 * all.q.stride_head) * 2);
      EXPECT_EQ(bytes_between(part.o, all.o), (b * all.o.stride_batch + kv * 4 * all.o.stride_head) * 2);
      EXPECT_EQ(bytes_between(part.k, all.k), (b * all.k.stride_batch + kv * all.k.stride_head) * 2);
      EXPECT_EQ(bytes_between(part.dv, all.dv), (b * all.dv.stride_batch + kv * all.dv.stride_head) * 2);
      EXPECT_EQ(static_cast<const char*>(part.lse.data) - static_cast<const char*>(all.lse.data),
                (b * all.lse.stride_batch + kv * 4 * all.lse.stride_head) * 4);
      EXPECT_EQ(part.dropout_head_base, b * 8 + kv * 4);  // the whole's counter of its first query head
      EXPECT_EQ(part.dq_counters * 4, all.dq_counters);
      EXPECT_EQ(heads[index].prep.dropout_head_base, part.dropout_head_base);
    }
    EXPECT_LT(heads[0].workspace, whole[0].workspace * 3 / 10);
  }
  // Run again as one plan once the budget is gone.
  EXPECT_EQ(parts_of(nullptr).size(), 1u);
  setenv("FLASHJIT_CUDA_ONE_PASS_SUMS_MIB", "lots", 1);
  EXPECT_NE(buffers.backward(options), FJ_SUCCESS);
  EXPECT_NE(std::string(fj_last_error()).find("FLASHJIT_CUDA_ONE_PASS_SUMS_MIB"), std::string::npos) << fj_last_error();
}

// FLASHJIT_CUDA_DKDV_PARTS: the split dK/dV kernel over a GQA group's query heads in parts. At
// batch 1 with 4 key/value heads of 8 query heads each and 2048 keys (16 key blocks a head: 64
// blocks on 132 SMs), "auto" (also unset) takes 8 parts (the smallest divisor of the group that
// reaches two blocks an SM), "2" two; a group of 7 takes 7 where that stays within four blocks an
// SM, none beyond; each part's float32 sums and a counter a key block (which the prep kernel
// zeroes) follow the rows' scratch, which planning sizes. Without a group (MHA) no parts; "off",
// none.
TEST_F(CudaHostPath, DkDvPartsSplitSmallGroupedBackwards) {
  REQUIRE_NULL_DRIVER();
  unsetenv("FLASHJIT_CUDA_BACKWARD");
  const fj_attention_options options = fj_attention_options_default();
  struct Unset {
    ~Unset() { unsetenv("FLASHJIT_CUDA_DKDV_PARTS"); }
  } unset;
  DeviceBuffers grouped(1, 32, 4, 2048, 2048, 64, FJ_BFLOAT16);
  const auto run = [&](DeviceBuffers& buffers, size_t* bytes) {
    EXPECT_EQ(buffers.prepare_backward(options, bytes), FJ_SUCCESS) << fj_last_error();
    EXPECT_EQ(buffers.backward(options), FJ_SUCCESS) << fj_last_error();
    const std::vector<NullLaunch> launches = null_driver().last(3);
    EXPECT_EQ(std::string(launches[2].function), "fj_attention_backward_dkdv");
    KernelParams prep, dkdv;
    std::memcpy(&prep, launches[0].params, sizeof prep);
    std::memcpy(&dkdv, launches[2].params, sizeof dkdv);
    EXPECT_EQ(prep.dkdv_counters, dkdv.dkdv_counters);
    EXPECT_EQ(prep.dkdv_counter_count, dkdv.dkdv_counter_count);
    return std::make_pair(launches[2].grid[0], dkdv);
  };
  size_t plain_bytes = 0, bytes = 0;
  setenv("FLASHJIT_CUDA_DKDV_PARTS", "off", 1);
  auto [plain_grid, plain] = run(grouped, &plain_bytes);
  EXPECT_EQ(plain_grid, 64u);
  EXPECT_EQ(plain.dkdv_counter_count, 0);
  // Unset: "auto", the default.
  unsetenv("FLASHJIT_CUDA_DKDV_PARTS");
  auto [default_grid, by_default] = run(grouped, &bytes);
  EXPECT_EQ(default_grid, 64u * 8);
  EXPECT_EQ(by_default.dkdv_parts, 8);
  setenv("FLASHJIT_CUDA_DKDV_PARTS", "auto", 1);
  auto [auto_grid, automatic] = run(grouped, &bytes);
  EXPECT_EQ(auto_grid, 64u * 8);
  EXPECT_EQ(automatic.dkdv_parts, 8);
  EXPECT_EQ(automatic.dkdv_counter_count, 64);
  EXPECT_NE(automatic.dkdv_partial, nullptr);
  EXPECT_EQ(reinterpret_cast<char*>(automatic.dkdv_counters) - reinterpret_cast<char*>(automatic.dkdv_partial),
            8 * 64 * 128 * (64 + 64) * int64_t(sizeof(float)));
  EXPECT_EQ(bytes, plain_bytes + size_t(8 * 64 * 128 * (64 + 64)) * sizeof(float) + 64 * sizeof(int));
  setenv("FLASHJIT_CUDA_DKDV_PARTS", "2", 1);
  auto [two_grid, two] = run(grouped, &bytes);
  EXPECT_EQ(two_grid, 64u * 2);
  EXPECT_EQ(two.dkdv_parts, 2);
  // A count asked for stays within what a small grid needs: 2 x 8 key/value heads' worth of 128
  // key blocks is 256 blocks, so "4" takes 2 (512 blocks, within four an SM), not 4.
  setenv("FLASHJIT_CUDA_DKDV_PARTS", "4", 1);
  DeviceBuffers long_keys(2, 8, 1, 256, 16384, 64, FJ_BFLOAT16);
  auto [capped_grid, capped] = run(long_keys, &bytes);
  EXPECT_EQ(capped_grid, 256u * 2);
  EXPECT_EQ(capped.dkdv_parts, 2);
  // A group no power of two divides (14 query heads on 2 key/value heads): no divisor brings 16 x 2
  // key blocks to two blocks an SM, and 7 (224 blocks) keeps them within four.
  unsetenv("FLASHJIT_CUDA_DKDV_PARTS");
  DeviceBuffers sevens(1, 14, 2, 2048, 2048, 64, FJ_BFLOAT16);
  auto [seven_grid, seven] = run(sevens, &bytes);
  EXPECT_EQ(seven_grid, 32u * 7);
  EXPECT_EQ(seven.dkdv_parts, 7);
  EXPECT_EQ(seven.dkdv_counter_count, 32);
  // ... but none where 7 parts would pass four blocks an SM (40 key blocks x 2 heads x 7: 560).
  DeviceBuffers longer_sevens(1, 14, 2, 5120, 5120, 64, FJ_BFLOAT16);
  auto [long_seven_grid, long_seven] = run(longer_sevens, &bytes);
  EXPECT_EQ(long_seven_grid, 80u);
  EXPECT_EQ(long_seven.dkdv_parts, 1);
  setenv("FLASHJIT_CUDA_DKDV_PARTS", "auto", 1);
  DeviceBuffers heads(1, 4, 4, 2048, 2048, 64, FJ_BFLOAT16);  // no group: no parts
  auto [mha_grid, mha] = run(heads, &bytes);
  EXPECT_EQ(mha_grid, 64u);
  EXPECT_EQ(mha.dkdv_parts, 1);
  EXPECT_EQ(mha.dkdv_counter_count, 0);
}

// FLASHJIT_CUDA_BACKWARD_OVERLAP=1 launches the split backward's dK/dV kernel programmatically
// after the dQ kernel (the prep and dQ kernels plainly), under stream capture too unless
// FLASHJIT_CUDA_OVERLAP says otherwise; 0, every kernel plainly; unset or auto, as 1 where the
// dQ grid is at most four blocks an SM (64 blocks here) and as 0 above (1,024 blocks on 132 SMs);
// the same parameters either way; another value is an error naming the variable.
TEST_F(CudaHostPath, BackwardOverlapLaunchesTheDkDvKernelProgrammatically) {
  REQUIRE_NULL_DRIVER();
  unsetenv("FLASHJIT_CUDA_BACKWARD");
  struct Unset {
    ~Unset() {
      unsetenv("FLASHJIT_CUDA_BACKWARD_OVERLAP");
      unsetenv("FLASHJIT_CUDA_OVERLAP");
    }
  } unset;
  const fj_attention_options options = fj_attention_options_default();
  DeviceBuffers buffers(2, 8, 8, 512, 512, 128, FJ_BFLOAT16);
  struct Seen {
    std::string entries;
    std::vector<unsigned> programmatic;
    std::vector<std::vector<unsigned char>> params;
    std::vector<const char*> functions;  // the null driver names each function it loads anew
  };
  const auto backward = [&] {
    const NullDriver::Counts before = null_driver().now();
    EXPECT_EQ(buffers.backward(options), FJ_SUCCESS) << fj_last_error();
    const NullDriver::Counts after = null_driver().now();
    Seen seen;
    for (const NullLaunch& launch : null_driver().last(unsigned(after.launches - before.launches))) {
      seen.entries += std::string(seen.entries.empty() ? "" : " ") + launch.function;
      seen.programmatic.push_back(launch.programmatic);
      seen.params.emplace_back(launch.params, launch.params + sizeof(KernelParams));
      seen.functions.push_back(launch.function);
    }
    return seen;
  };
  const std::string kernels = "fj_attention_backward_prep fj_attention_backward_dq fj_attention_backward_dkdv";
  setenv("FLASHJIT_CUDA_BACKWARD_OVERLAP", "0", 1);
  const Seen plain = backward();
  EXPECT_EQ(plain.entries, kernels);
  EXPECT_EQ(plain.programmatic, (std::vector<unsigned>{0, 0, 0}));
  unsetenv("FLASHJIT_CUDA_BACKWARD_OVERLAP");
  const Seen automatic = backward();
  setenv("FLASHJIT_CUDA_BACKWARD_OVERLAP", "auto", 1);
  const Seen automatic_named = backward();
  setenv("FLASHJIT_CUDA_BACKWARD_OVERLAP", "1", 1);
  const Seen overlapped = backward();
  EXPECT_EQ(overlapped.entries, kernels);
  EXPECT_EQ(overlapped.programmatic, (std::vector<unsigned>{0, 0, 1}));
  EXPECT_EQ(overlapped.params, plain.params);
  // The same prep kernel; dQ and dK/dV kernels of their own (built with FJ_BACKWARD_OVERLAP).
  ASSERT_EQ(overlapped.functions.size(), 3u);
  EXPECT_EQ(overlapped.functions[0], plain.functions[0]);
  EXPECT_NE(overlapped.functions[1], plain.functions[1]);
  EXPECT_NE(overlapped.functions[2], plain.functions[2]);
  for (const Seen& chosen : {automatic, automatic_named}) {  // a small grid: the overlapped pair
    EXPECT_EQ(chosen.programmatic, overlapped.programmatic);
    EXPECT_EQ(chosen.functions, overlapped.functions);
    EXPECT_EQ(chosen.params, plain.params);
  }
  {
    // No queries: the prep and dQ grids are empty (not launched) and the dK/dV kernel, which
    // zeroes dK and dV, is launched plainly (after nothing of this call's).
    DeviceBuffers no_queries(2, 8, 8, 0, 512, 128, FJ_BFLOAT16);
    unsetenv("FLASHJIT_CUDA_BACKWARD_OVERLAP");
    const NullDriver::Counts before = null_driver().now();
    EXPECT_EQ(no_queries.backward(options), FJ_SUCCESS) << fj_last_error();
    const unsigned launched = unsigned(null_driver().now().launches - before.launches);
    ASSERT_EQ(launched, 1u);
    const NullLaunch dkdv = null_driver().last(1)[0];
    EXPECT_EQ(dkdv.programmatic, 0u);
    EXPECT_EQ(std::string(dkdv.function), "fj_attention_backward_dkdv");
  }
  {
    DeviceBuffers many(8, 16, 16, 1024, 1024, 64, FJ_BFLOAT16);
    const auto launches = [&](const char* setting) {
      setenv("FLASHJIT_CUDA_BACKWARD_OVERLAP", setting, 1);
      const NullDriver::Counts before = null_driver().now();
      EXPECT_EQ(many.backward(options), FJ_SUCCESS) << fj_last_error();
      std::vector<std::tuple<const char*, unsigned, unsigned>> seen;  // function, programmatic, grid
      for (const NullLaunch& launch : null_driver().last(unsigned(null_driver().now().launches - before.launches))) {
        seen.emplace_back(launch.function, launch.programmatic, launch.grid[0]);
      }
      return seen;
    };
    const auto off = launches("0"), on = launches("1"), chosen = launches("auto");
    ASSERT_EQ(off.size(), 3u);
    EXPECT_GT(std::get<2>(off[1]), 4u * 132u);  // the dQ grid: more than four blocks an SM
    EXPECT_EQ(chosen, off);  // a large grid: the plain pair
    EXPECT_NE(on, off);
  }
  setenv("FLASHJIT_CUDA_OVERLAP", "0", 1);  // no programmatic launches at all
  EXPECT_EQ(backward().programmatic, (std::vector<unsigned>{0, 0, 0}));
  unsetenv("FLASHJIT_CUDA_OVERLAP");
  null_driver().set_capturing(1);
  const Seen captured = backward();
  setenv("FLASHJIT_CUDA_OVERLAP", "eager", 1);  // programmatic launches outside capture only
  const Seen captured_eager = backward();
  null_driver().set_capturing(0);
  EXPECT_EQ(captured.programmatic, (std::vector<unsigned>{0, 0, 1}));
  EXPECT_EQ(captured_eager.programmatic, (std::vector<unsigned>{0, 0, 0}));
  unsetenv("FLASHJIT_CUDA_OVERLAP");
  setenv("FLASHJIT_CUDA_BACKWARD_OVERLAP", "0", 1);
  EXPECT_EQ(backward().programmatic, (std::vector<unsigned>{0, 0, 0}));
  setenv("FLASHJIT_CUDA_BACKWARD_OVERLAP", "yes", 1);
  EXPECT_EQ(buffers.backward(options), FJ_ERROR_INVALID_VALUE);
  EXPECT_NE(std::string(fj_last_error()).find("FLASHJIT_CUDA_BACKWARD_OVERLAP"), std::string::npos)
      << fj_last_error();
}

// Planning enqueues nothing and reports the workspace the backward needs; a call given that
// workspace takes no scratch of its own, and one given less is refused, naming workspace_bytes.
TEST_F(CudaHostPath, PlanningSizesTheWorkspaceAndEnqueuesNothing) {
  REQUIRE_NULL_DRIVER();
  DeviceBuffers buffers(1, 4, 4, 300, 300, 64, FJ_BFLOAT16);
  fj_attention_options options = fj_attention_options_default();
  size_t bytes = 0;
  const NullDriver::Counts before = null_driver().now();
  ASSERT_EQ(buffers.prepare_backward(options, &bytes), FJ_SUCCESS) << fj_last_error();
  EXPECT_EQ(null_driver().now().launches, before.launches);
  EXPECT_EQ(null_driver().now().allocs, before.allocs);
  // Two floats a query row (delta, LSE in log2), rows padded to whole blocks of 128.
  EXPECT_EQ(bytes, size_t(4 * 384 * 2 * sizeof(float)));
  std::vector<unsigned char> workspace(bytes + 16);
  options.workspace = workspace.data();
  options.workspace_bytes = bytes;
  ASSERT_EQ(buffers.backward(options), FJ_SUCCESS) << fj_last_error();
  EXPECT_EQ(null_driver().now().allocs, before.allocs) << "scratch taken beside the workspace";
  EXPECT_EQ(null_driver().now().launches - before.launches, 3u);
  options.workspace_bytes = bytes - 16;
  EXPECT_EQ(buffers.backward(options), FJ_ERROR_INVALID_VALUE);
  EXPECT_NE(std::string(fj_last_error()).find("workspace_bytes"), std::string::npos) << fj_last_error();
}

// options.launch: a call's kernels go to the caller's launcher in the order the driver gets them
// otherwise (same functions, grids, blocks, shared memory and parameter bytes), nothing reaches the
// stream (no launch, allocation or memset through the driver); without a workspace, for a
// variable-length batch, or when the launcher fails, the call fails with an error naming launch.
struct Recorded {
  void* function;
  unsigned grid[3], block[3], shared_bytes;
  std::vector<unsigned char> params;
};
struct Launcher {
  std::vector<Recorded> kernels;
  int status = 0;
};
int record_launch(void* data, void* function, const unsigned grid[3], const unsigned block[3], unsigned shared_bytes,
                  void** arguments) {
  auto* launcher = static_cast<Launcher*>(data);
  Recorded kernel{function, {grid[0], grid[1], grid[2]}, {block[0], block[1], block[2]}, shared_bytes, {}};
  const auto* bytes = static_cast<const unsigned char*>(arguments[0]);
  kernel.params.assign(bytes, bytes + sizeof(KernelParams));
  launcher->kernels.push_back(std::move(kernel));
  return launcher->status;
}

TEST_F(CudaHostPath, LaunchesGoToTheCallersLauncher) {
  REQUIRE_NULL_DRIVER();
  for (const bool backward : {false, true}) {
    for (const int64_t seqlen_q : {int64_t(300), int64_t(1)}) {  // a dense call, and a split decoding one
      SCOPED_TRACE(std::string(backward ? "backward" : "forward") + " seqlen_q " + std::to_string(seqlen_q));
      if (backward && seqlen_q == 1) continue;
      DeviceBuffers buffers(1, 8, 2, seqlen_q, 4096, 64, FJ_BFLOAT16);
      fj_attention_options options = fj_attention_options_default();
      Launcher launcher;
      size_t bytes = 0, bytes_with_launcher = 0;
      ASSERT_EQ(backward ? buffers.prepare_backward(options, &bytes) : buffers.prepare_forward(options, &bytes),
                FJ_SUCCESS)
          << fj_last_error();
      options.launch = record_launch;  // sizing the workspace with the launcher set: the same, nothing launched
      options.launch_data = &launcher;
      ASSERT_EQ(backward ? buffers.prepare_backward(options, &bytes_with_launcher)
                         : buffers.prepare_forward(options, &bytes_with_launcher),
                FJ_SUCCESS)
          << fj_last_error();
      EXPECT_EQ(bytes_with_launcher, bytes);
      EXPECT_TRUE(launcher.kernels.empty());
      options.launch = nullptr;
      options.launch_data = nullptr;
      std::vector<unsigned char> workspace(std::max<size_t>(bytes, 16) + 16);
      options.workspace = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(workspace.data()) + 15) / 16 * 16);
      options.workspace_bytes = bytes;
      // Through the driver first: what the launcher must see.
      const NullDriver::Counts before = null_driver().now();
      ASSERT_EQ(backward ? buffers.backward(options) : buffers.forward(options), FJ_SUCCESS) << fj_last_error();
      const unsigned count = unsigned(null_driver().now().launches - before.launches);
      ASSERT_GT(count, 0u);
      const std::vector<NullLaunch> driven = null_driver().last(count);
      options.launch = record_launch;
      options.launch_data = &launcher;
      const NullDriver::Counts start = null_driver().now();
      ASSERT_EQ(backward ? buffers.backward(options) : buffers.forward(options), FJ_SUCCESS) << fj_last_error();
      const NullDriver::Counts end = null_driver().now();
      EXPECT_EQ(end.launches, start.launches);
      EXPECT_EQ(end.allocs, start.allocs);
      ASSERT_EQ(launcher.kernels.size(), driven.size());
      for (size_t i = 0; i < driven.size(); ++i) {
        const Recorded& got = launcher.kernels[i];
        EXPECT_NE(got.function, nullptr);
        for (int d = 0; d < 3; ++d) {
          EXPECT_EQ(got.grid[d], driven[i].grid[d]) << "kernel " << i << " (" << driven[i].function << ")";
          EXPECT_EQ(got.block[d], driven[i].block[d]) << "kernel " << i;
        }
        EXPECT_EQ(got.shared_bytes, driven[i].shared_bytes) << "kernel " << i;
        EXPECT_EQ(std::memcmp(got.params.data(), driven[i].params, sizeof(KernelParams)), 0) << "kernel " << i;
      }
      EXPECT_TRUE(buffers.untouched()) << "the host wrote into the operands";
      launcher.status = 7;  // a failing launcher fails the call, naming it
      EXPECT_EQ(backward ? buffers.backward(options) : buffers.forward(options), FJ_ERROR_INVALID_VALUE);
      EXPECT_NE(std::string(fj_last_error()).find("launch: returned 7"), std::string::npos) << fj_last_error();
      options.workspace = nullptr;
      options.workspace_bytes = 0;
      EXPECT_EQ(backward ? buffers.backward(options) : buffers.forward(options), FJ_ERROR_INVALID_VALUE);
      EXPECT_NE(std::string(fj_last_error()).find("launch: needs workspace"), std::string::npos) << fj_last_error();
    }
  }
}

// Decoding with a key mask on sm_90: blocks of one warp from 32k keys (or 16 batch-heads), the
// sm_90a split kernel's below that; FLASHJIT_CUDA_DECODE_WARPS forces either.
TEST_F(CudaHostPath, MaskedDecodingTakesOneWarpBlocksFromLongCaches) {
  REQUIRE_NULL_DRIVER();
  unsetenv("FLASHJIT_CUDA_DECODE_WARPS");
  const auto first_block_threads = [](int64_t keys) {
    DeviceBuffers buffers(1, 1, 1, 1, keys, 64, FJ_BFLOAT16);
    GuardedTensor mask({1, 1, 1, keys}, FJ_BOOL);
    std::vector<double> keep(size_t(keys), 1.0);
    keep[size_t(keys) - 1] = 0.0;
    mask.fill(keep);
    fj_attention_options options = fj_attention_options_default();
    options.mask = buffers.on_gpu(mask);
    const unsigned long long before = null_driver().now().launches;
    EXPECT_EQ(buffers.forward(options), FJ_SUCCESS) << fj_last_error();
    const std::vector<NullLaunch> launches = null_driver().last(unsigned(null_driver().now().launches - before));
    EXPECT_EQ(launches.size(), 2u) << "the split kernel and the combine";
    EXPECT_TRUE(buffers.untouched());
    return launches.empty() ? 0u : launches[0].block[0] * launches[0].block[1] * launches[0].block[2];
  };
  EXPECT_EQ(first_block_threads(32768), 32u);
  EXPECT_GT(first_block_threads(8192), 32u);
  setenv("FLASHJIT_CUDA_DECODE_WARPS", "4", 1);
  EXPECT_GT(first_block_threads(32768), 32u);
  setenv("FLASHJIT_CUDA_DECODE_WARPS", "1", 1);
  EXPECT_EQ(first_block_threads(8192), 32u);
  unsetenv("FLASHJIT_CUDA_DECODE_WARPS");
}

// A decoding forward (one query against many keys) splits its keys under stream capture and with
// a caller's workspace as it does otherwise: under capture into pool scratch (a graph's allocation
// node, as the backward's), with a workspace into it (fj_attention_prepare_forward sizes it), and
// with too small a workspace unsplit. Under capture too the combine is launched programmatically
// (FLASHJIT_CUDA_OVERLAP=eager: plainly there); =0 launches it plainly everywhere; another value is
// an error.
TEST_F(CudaHostPath, DecodingSplitsUnderCaptureAndIntoTheWorkspace) {
  REQUIRE_NULL_DRIVER();
  DeviceBuffers buffers(1, 32, 8, 1, 4096, 128, FJ_BFLOAT16);
  fj_attention_options options = fj_attention_options_default();
  struct Seen {
    std::string entries;
    std::vector<unsigned> programmatic;
    unsigned long long allocs, frees;
  };
  const auto forward = [&](const fj_attention_options& o) {
    const NullDriver::Counts before = null_driver().now();
    EXPECT_EQ(buffers.forward(o), FJ_SUCCESS) << fj_last_error();
    const NullDriver::Counts after = null_driver().now();
    Seen seen{"", {}, after.allocs - before.allocs, after.frees - before.frees};
    for (const NullLaunch& launch : null_driver().last(unsigned(after.launches - before.launches))) {
      seen.entries += std::string(seen.entries.empty() ? "" : " ") + launch.function;
      seen.programmatic.push_back(launch.programmatic);
    }
    return seen;
  };
  const std::string split = "fj_attention_forward fj_attention_forward_combine";
  const Seen eager = forward(options);  // compiles the kernels, which capture then finds
  EXPECT_EQ(eager.entries, split);
  EXPECT_EQ(eager.programmatic, (std::vector<unsigned>{0, 1}));

  null_driver().set_capturing(1);
  const Seen captured = forward(options);
  setenv("FLASHJIT_CUDA_OVERLAP", "eager", 1);  // the programmatic launch outside capture only
  const Seen captured_eager = forward(options);
  null_driver().set_capturing(0);
  setenv("FLASHJIT_CUDA_OVERLAP", "0", 1);  // never
  const Seen plain = forward(options);
  setenv("FLASHJIT_CUDA_OVERLAP", "soon", 1);
  EXPECT_EQ(buffers.forward(options), FJ_ERROR_INVALID_VALUE);
  EXPECT_NE(std::string(fj_last_error()).find("FLASHJIT_CUDA_OVERLAP"), std::string::npos) << fj_last_error();
  unsetenv("FLASHJIT_CUDA_OVERLAP");
  EXPECT_EQ(captured.entries, split);
  EXPECT_EQ(captured.programmatic, (std::vector<unsigned>{0, 1}));
  EXPECT_EQ(captured.allocs, 1u);
  EXPECT_EQ(captured.frees, 1u);
  EXPECT_EQ(captured_eager.programmatic, (std::vector<unsigned>{0, 0}));
  EXPECT_EQ(plain.entries, split);
  EXPECT_EQ(plain.programmatic, (std::vector<unsigned>{0, 0}));

  size_t bytes = 0;
  ASSERT_EQ(buffers.prepare_forward(options, &bytes), FJ_SUCCESS) << fj_last_error();
  EXPECT_GT(bytes, size_t(32 * 128 * sizeof(float))) << "partials of at least two splits a query row";
  std::vector<unsigned char> workspace(bytes + 16);
  options.workspace = workspace.data();
  options.workspace_bytes = bytes;
  const Seen given = forward(options);
  EXPECT_EQ(given.entries, split);
  EXPECT_EQ(given.allocs, 0u) << "scratch taken beside the workspace";
  options.workspace_bytes = bytes - 16;
  const Seen small = forward(options);
  EXPECT_EQ(small.entries, "fj_attention_forward");
  EXPECT_EQ(small.allocs, 0u);
  EXPECT_TRUE(buffers.untouched()) << "the host wrote into an operand's memory";
}

}  // namespace
}  // namespace flashjit::testing
