// The CUDA backend without a GPU: NVRTC compiles representative kernels for
// sm_80 and sm_90 (a broken template fails here), and the disk cache behaves:
// compile -> disk -> reload, corrupt entry -> recompile, concurrent processes on
// a cold key -> one compile. Needs NVRTC (FLASHJIT_NVRTC or the loader path);
// without it the tests skip, unless FLASHJIT_REQUIRE_NVRTC=1 (as in CI).
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "cuda/kernel_cache.hpp"
#include "cuda/kernel_spec.hpp"
#include "cuda/kernels/shared_layout.h"
#include "cuda/settings.hpp"
#include "cuda/tuning.hpp"
#include "flashjit/cuda.h"
#include "flashjit/flashjit.h"

namespace {

namespace fs = std::filesystem;

bool have_nvrtc() {
  int32_t major = 0, minor = 0;
  return fj_cuda_nvrtc_version(&major, &minor) == FJ_SUCCESS;
}

#define REQUIRE_NVRTC()                                                                   \
  do {                                                                                    \
    if (!have_nvrtc()) {                                                                  \
      const char* required = std::getenv("FLASHJIT_REQUIRE_NVRTC");                       \
      if (required != nullptr && std::string(required) == "1") FAIL() << fj_last_error(); \
      GTEST_SKIP() << fj_last_error();                                                    \
    }                                                                                     \
  } while (0)

// A fresh cache directory per test, removed afterwards (kept, to read the generated
// sources and cubins, with FLASHJIT_TEST_KEEP_CACHE=1).
class CudaCompile : public ::testing::Test {
 protected:
  void SetUp() override {
    directory_ =
        fs::temp_directory_path() / ("flashjit-cache-test-" + std::to_string(getpid()) + "-" +
                                     ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(directory_);
    setenv("FLASHJIT_CACHE_DIR", directory_.c_str(), 1);
    ASSERT_EQ(fj_cuda_clear_memory_cache(), FJ_SUCCESS);
  }
  void TearDown() override {
    if (std::getenv("FLASHJIT_TEST_KEEP_CACHE") == nullptr) fs::remove_all(directory_);
    unsetenv("FLASHJIT_CACHE_DIR");
  }

  static fj_cuda_cache_stats stats() {
    fj_cuda_cache_stats s{};
    EXPECT_EQ(fj_cuda_get_cache_stats(&s), FJ_SUCCESS);
    return s;
  }

  std::vector<fs::path> cubins() const {
    std::vector<fs::path> found;
    for (const auto& entry : fs::recursive_directory_iterator(directory_)) {
      if (entry.path().extension() == ".cubin") found.push_back(entry.path());
    }
    return found;
  }

  fs::path directory_;
};

// Traits of a half-precision problem for sm_90 without features.
// With environment variable `name` set to `value`, read(): an error naming the variable. The
// variable is unset afterwards.
template <class Read>
void expect_setting_error(const char* name, const char* value, Read read) {
  setenv(name, value, 1);
  try {
    read();
    ADD_FAILURE() << "no error for " << name << "=" << value;
  } catch (const flashjit::Error& error) {
    EXPECT_NE(std::string(error.what()).find(name), std::string::npos) << error.what();
  }
  unsetenv(name);
}

flashjit::cuda::KernelTraits sm90_traits(fj_dtype dtype, int head_dim) {
  flashjit::cuda::KernelTraits traits;
  traits.dtype = dtype;
  traits.head_dim_qk = traits.head_dim_v = head_dim;
  traits.arch = 90;
  return traits;
}

// Unsets an environment variable when it goes out of scope, so that a test that stops midway
// leaves the next one the default.
struct UnsetOnExit {
  const char* name;
  ~UnsetOnExit() { unsetenv(name); }
};

// The forward kernel the traits get with FLASHJIT_CUDA_TRACE=1 (scripts/trace_tiles.py) and, where
// given, FLASHJIT_CUDA_TILES=tiles; both unset after.
flashjit::cuda::KernelSpec traced_forward(const flashjit::cuda::KernelTraits& traits, const char* tiles = nullptr) {
  if (tiles != nullptr) setenv("FLASHJIT_CUDA_TILES", tiles, 1);
  setenv("FLASHJIT_CUDA_TRACE", "1", 1);
  const flashjit::cuda::KernelSpec spec = flashjit::cuda::forward_kernel(traits);
  unsetenv("FLASHJIT_CUDA_TRACE");
  unsetenv("FLASHJIT_CUDA_TILES");
  return spec;
}

// The tuning file's checksum of a text (FNV-1a 64, hex).
std::string checksum_of(const std::string& text) {
  char buffer[17];
  std::snprintf(buffer, sizeof buffer, "%016llx", static_cast<unsigned long long>(flashjit::cuda::fnv1a(text)));
  return buffer;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

fj_kernel_config config(fj_dtype dtype, int head_dim, int arch) {
  fj_kernel_config c = fj_kernel_config_default();
  c.dtype = dtype;
  c.head_dim_qk = head_dim;
  c.head_dim_v = head_dim;
  c.arch = arch;
  return c;
}

// One list covering every template path: each dtype, forward and backward,
// odd and large head dims, Dqk != Dv, every mask kind, window, dropout, softcap.
std::vector<fj_kernel_config> representative_configs(int arch) {
  std::vector<fj_kernel_config> configs;
  for (fj_dtype dtype : {FJ_FLOAT16, FJ_BFLOAT16, FJ_FLOAT32, FJ_FLOAT64}) {
    for (int backward : {0, 1}) {
      fj_kernel_config plain = config(dtype, 128, arch);
      plain.backward = backward;
      configs.push_back(plain);
      fj_kernel_config everything = config(dtype, 72, arch);
      everything.head_dim_v = 40;
      everything.backward = backward;
      everything.mask = 2;
      everything.mask_dtype = dtype;
      everything.window = 1;
      everything.dropout = 1;
      everything.softcap = 1;
      configs.push_back(everything);
    }
  }
  // Head dims 33-256 take the sm_90a kernels on sm_90: every tile width they use.
  for (fj_dtype dtype : {FJ_FLOAT16, FJ_BFLOAT16}) {
    for (int head_dim : {64, 160, 256}) configs.push_back(config(dtype, head_dim, arch));
    fj_kernel_config everything = config(dtype, 64, arch);
    everything.head_dim_v = 40;
    everything.mask = 1;
    everything.window = 1;
    everything.dropout = 1;
    everything.softcap = 1;
    configs.push_back(everything);
  }
  for (int head_dim : {1, 256}) {
    for (int backward : {0, 1}) {
      fj_kernel_config c = config(FJ_BFLOAT16, head_dim, arch);
      c.backward = backward;
      c.mask = 1;
      configs.push_back(c);
    }
  }
  return configs;
}

TEST_F(CudaCompile, RepresentativeKernelsCompileForSm80AndSm90) {
  REQUIRE_NVRTC();
  // The split backward's overlapping pair, which precompile also builds by default, has tests of
  // its own (BackwardOverlapKernelsCompile, DkDvPartsCompileWhereTheyApply): left out here.
  const UnsetOnExit unset{"FLASHJIT_CUDA_BACKWARD_OVERLAP"};
  setenv("FLASHJIT_CUDA_BACKWARD_OVERLAP", "0", 1);
  for (int arch : {80, 90}) {
    const std::vector<fj_kernel_config> configs = representative_configs(arch);
    for (size_t i = 0; i < configs.size(); ++i) {
      ASSERT_EQ(fj_cuda_precompile(&configs[i], 1), FJ_SUCCESS)
          << "sm_" << arch << " config " << i << ": " << fj_last_error();
    }
  }
  EXPECT_GT(stats().compiles, 0);
  // Each cubin sits beside its generated source and NVRTC log.
  for (const fs::path& cubin : cubins()) {
    fs::path stem = cubin;
    stem.replace_extension("");
    EXPECT_TRUE(fs::exists(stem.string() + ".cu")) << cubin;
    EXPECT_TRUE(fs::exists(stem.string() + ".log")) << cubin;
  }
}

// The three-consumer-warpgroup variant of the sm_90a forward at head dim 64
// (FLASHJIT_CUDA_TILES=groups=3): 512 threads, 192 query rows a work tile.
TEST_F(CudaCompile, ThreeConsumerGroupForwardCompilesForSm90) {
  REQUIRE_NVRTC();
  setenv("FLASHJIT_CUDA_TILES", "groups=3", 1);
  const flashjit::cuda::KernelTraits traits = sm90_traits(FJ_BFLOAT16, 64);
  const flashjit::cuda::KernelSpec spec = flashjit::cuda::forward_kernel(traits);
  EXPECT_EQ(spec.threads, 512);
  EXPECT_EQ(spec.block_rows(), 192);
  std::vector<fj_kernel_config> configs = {config(FJ_BFLOAT16, 64, 90), config(FJ_FLOAT16, 64, 90)};
  configs[1].window = 1;
  configs[1].mask = 1;
  configs[1].dropout = 1;
  configs[1].softcap = 1;
  for (const fj_kernel_config& c : configs)
    EXPECT_EQ(fj_cuda_precompile(&c, 1), FJ_SUCCESS) << fj_last_error();
  unsetenv("FLASHJIT_CUDA_TILES");
  EXPECT_EQ(stats().compiles, 2);
  EXPECT_EQ(flashjit::cuda::forward_kernel(traits).threads, 384);  // the default again
}

// The variable-length forward and backward in one launch a kernel (FJ_VARLEN: blocks
// of every sequence found in a table; the forward stores O by its threads) compile
// for sm_90a at every padded head dim, plain and with windows, dropout and softcap.
TEST_F(CudaCompile, VarlenKernelsCompileForSm90) {
  REQUIRE_NVRTC();
  using namespace flashjit::cuda;
  for (int head_dim : {64, 128, 256}) {
    for (bool extras : {false, true}) {
      KernelTraits traits = sm90_traits(FJ_BFLOAT16, head_dim);
      traits.window = traits.dropout = traits.softcap = extras;
      KernelSpec spec = forward_kernel(traits);
      spec.varlen = true;
      for (bool o_tma : {false, true}) {  // O by TMA inside a sequence, or by the threads only
        spec.o_tma = o_tma;
        EXPECT_NE(spec.name().find("_varlen"), std::string::npos) << spec.name();
        ASSERT_NO_THROW(kernel_binary(spec, false)) << spec.name();
      }
      ASSERT_NO_THROW(kernel_binary(varlen_table_kernel(traits), false));  // the table built on the device
      for (KernelSpec backward : backward_kernels(traits)) {
        ASSERT_EQ(backward.family, KernelFamily::kHopper) << backward.name();
        backward.varlen = true;
        ASSERT_NO_THROW(kernel_binary(backward, false)) << backward.name();
      }
    }
  }
}

// The one-pass backward (FLASHJIT_CUDA_BACKWARD=one-pass): the prep kernel and a dK/dV kernel
// that also forms dQ, for head dims up to 128 with every feature; above 128 the split kernels.
TEST_F(CudaCompile, OnePassBackwardCompilesForSm90) {
  REQUIRE_NVRTC();
  using namespace flashjit::cuda;
  for (fj_dtype dtype : {FJ_FLOAT16, FJ_BFLOAT16}) {
    for (int head_dim : {64, 96, 128}) {
      for (bool extras : {false, true}) {
        KernelTraits traits = sm90_traits(dtype, head_dim);
        traits.window = traits.dropout = traits.softcap = extras;
        if (extras) {
          traits.mask = flashjit::MaskKind::kBool;
          traits.mask_dtype = FJ_BOOL;
        }
        // prep, dK/dV with dQ's sums (writer-pair, the default), dQ from them
        std::vector<KernelSpec> specs = backward_kernels(traits, true);
        ASSERT_EQ(specs.size(), 3u);
        EXPECT_EQ(specs[2].entry, KernelEntry::kBackwardDqConvert);
        if (head_dim == 64) {  // and a wider V: 16 queries a step with the extras, 8 a consumer
          KernelTraits wide_v = traits;
          wide_v.head_dim_v = 128;
          specs.push_back(dkdv_kernel(backward_kernels(wide_v, true)));
          EXPECT_TRUE(specs.back().one_pass) << specs.back().name();
        }
        EXPECT_EQ(specs[0].entry, KernelEntry::kBackwardPrep);
        EXPECT_TRUE(specs[1].one_pass) << specs[1].name();
        EXPECT_NE(specs[1].name().find("_one-pass"), std::string::npos) << specs[1].name();
        KernelSpec split = specs[1];
        split.one_pass = false;  // the same kernel without its dS tiles
        EXPECT_GT(specs[1].shared_memory_bytes(), split.shared_memory_bytes());
        for (KernelSpec spec : specs) {
          ASSERT_NO_THROW(kernel_binary(spec, false)) << spec.name();
          spec.varlen = true;  // a variable-length batch in one launch
          ASSERT_NO_THROW(kernel_binary(spec, false)) << spec.name();
        }
      }
    }
  }
  const std::vector<KernelSpec> wide = backward_kernels(sm90_traits(FJ_BFLOAT16, 256), true);
  for (const KernelSpec& spec : wide) EXPECT_FALSE(spec.one_pass) << spec.name();
  EXPECT_EQ(wide.size(), 4u);  // prep, dQ, dV, dK
}

// FLASHJIT_CUDA_BACKWARD: one-pass or split (the default); anything else is an error naming it.
TEST(KernelSelection, BackwardSettingIsCheckedAndChoosesTheKernels) {
  using namespace flashjit::cuda;
  unsetenv("FLASHJIT_CUDA_BACKWARD");
  EXPECT_FALSE(settings::one_pass_backward().has_value());
  setenv("FLASHJIT_CUDA_BACKWARD", "split", 1);
  EXPECT_EQ(settings::one_pass_backward(), std::optional<bool>(false));
  setenv("FLASHJIT_CUDA_BACKWARD", "one-pass", 1);
  EXPECT_EQ(settings::one_pass_backward(), std::optional<bool>(true));
  expect_setting_error("FLASHJIT_CUDA_BACKWARD", "fast", [] { settings::one_pass_backward(); });
  // The one pass is sm_90a's: elsewhere the usual kernels.
  KernelTraits ampere = sm90_traits(FJ_BFLOAT16, 128);
  ampere.arch = 80;
  for (const KernelSpec& spec : backward_kernels(ampere, true)) EXPECT_FALSE(spec.one_pass) << spec.name();
  const std::vector<KernelSpec> split = backward_kernels(sm90_traits(FJ_BFLOAT16, 128));
  ASSERT_EQ(split.size(), 3u);  // prep, dQ, dK/dV
  EXPECT_FALSE(split[2].one_pass);
}

// FLASHJIT_CUDA_DKDV: registers, the split dK/dV kernel takes P^T and dS^T from registers
// (32 queries a step at head dim 128, 64 at 64); unset or shared, from shared memory with twice
// the queries a step (D128 with a mask, dropout or softcap keeps its 16: no whole 64-query
// region); another value is an error naming it. The shared kernels compile for sm_90a.
TEST_F(CudaCompile, DkDvSharedOperandsSettingChoosesAndCompiles) {
  REQUIRE_NVRTC();
  using namespace flashjit::cuda;
  const auto dkdv_of = [](const KernelTraits& traits) { return backward_kernels(traits).back(); };
  setenv("FLASHJIT_CUDA_DKDV", "registers", 1);
  EXPECT_FALSE(settings::dkdv_shared_operands());
  EXPECT_FALSE(dkdv_of(sm90_traits(FJ_BFLOAT16, 128)).dkdv_shared);
  EXPECT_EQ(dkdv_of(sm90_traits(FJ_BFLOAT16, 128)).block_n, 32);
  unsetenv("FLASHJIT_CUDA_DKDV");
  EXPECT_TRUE(settings::dkdv_shared_operands());
  EXPECT_TRUE(dkdv_of(sm90_traits(FJ_BFLOAT16, 128)).dkdv_shared);
  setenv("FLASHJIT_CUDA_DKDV", "shared", 1);
  for (int head_dim : {64, 128}) {
    KernelTraits traits = sm90_traits(FJ_BFLOAT16, head_dim);
    const KernelSpec shared = dkdv_of(traits);
    EXPECT_TRUE(shared.dkdv_shared) << shared.name();
    EXPECT_EQ(shared.block_n, head_dim == 64 ? 128 : 64) << shared.name();
    ASSERT_NO_THROW(kernel_binary(shared, false)) << shared.name();
    traits.window = true;
    ASSERT_NO_THROW(kernel_binary(dkdv_of(traits), false)) << dkdv_of(traits).name();
    traits.dropout = true;
    traits.mask = flashjit::MaskKind::kBool;
    const KernelSpec extras = dkdv_of(traits);
    EXPECT_EQ(extras.dkdv_shared, head_dim == 64) << extras.name();  // D64: 64 queries; D128 would be 32
    if (extras.dkdv_shared) ASSERT_NO_THROW(kernel_binary(extras, false)) << extras.name();
  }
  EXPECT_FALSE(dkdv_of(sm90_traits(FJ_BFLOAT16, 256)).dkdv_shared);  // dV and dK kernels of their own
  unsetenv("FLASHJIT_CUDA_DKDV");
  expect_setting_error("FLASHJIT_CUDA_DKDV", "smem", [] { settings::dkdv_shared_operands(); });
}

// FLASHJIT_CUDA_KV_HOPPER: unset, the sm_90a split for KV caches unless FLASHJIT_CUDA_DECODE_WARPS
// forces the mma.sync blocks; 0 or 1 choose; another value is an error naming it.
TEST(KernelSelection, KvCacheSettingIsChecked) {
  using namespace flashjit::cuda;
  unsetenv("FLASHJIT_CUDA_KV_HOPPER");
  unsetenv("FLASHJIT_CUDA_DECODE_WARPS");
  EXPECT_TRUE(settings::kv_cache_hopper());
  setenv("FLASHJIT_CUDA_DECODE_WARPS", "1", 1);
  EXPECT_FALSE(settings::kv_cache_hopper());
  setenv("FLASHJIT_CUDA_KV_HOPPER", "1", 1);
  EXPECT_TRUE(settings::kv_cache_hopper());
  unsetenv("FLASHJIT_CUDA_DECODE_WARPS");
  setenv("FLASHJIT_CUDA_KV_HOPPER", "0", 1);
  EXPECT_FALSE(settings::kv_cache_hopper());
  expect_setting_error("FLASHJIT_CUDA_KV_HOPPER", "yes", [] { settings::kv_cache_hopper(); });
}

// FLASHJIT_CUDA_ONE_PASS_DQ: none or unordered (timing only), eager (ordered sums released at
// once), arrival (in the order blocks reach a tile), writer, writer-eager, writer-groups and
// writer-arrival (eager's and arrival's orders, their sums made by the dQ writer in bulk copies,
// after which a kernel of its own writes dQ), and atomic (every block's adds at once, in no order,
// dQ by that kernel too; at head dim 128 alone, its adds being unordered's) give one-pass kernels
// of their own names, which
// compile (at head dim 128; the consumers' own adds (eager), writer-pair (the default) and
// writer-diagonal (a tuned choice) also at head dim 64, with every feature and
// for variable-length batches, the writer's dQ kernel too; the other orders, measured and left
// as diagnostics, at head dim 128 alone, their features on the GPU's own tests);
// ordered the consumers' own adds; unset writer-pair; another value is an error naming it.
TEST_F(CudaCompile, OnePassDqDiagnosticsAreCheckedAndCompile) {
  REQUIRE_NVRTC();
  using namespace flashjit::cuda;
  struct Unset {  // also when an assertion ends the test early
    ~Unset() { unsetenv("FLASHJIT_CUDA_ONE_PASS_DQ"); }
  } unset;
  const KernelTraits traits = sm90_traits(FJ_BFLOAT16, 128);
  unsetenv("FLASHJIT_CUDA_ONE_PASS_DQ");
  EXPECT_FALSE(settings::one_pass_dq_set());
  const std::vector<KernelSpec> defaults = backward_kernels(traits, true);
  ASSERT_EQ(defaults.size(), 3u);  // writer-pair's sums: dQ written from them by a kernel of its own
  EXPECT_EQ(dkdv_kernel(defaults).dq_diagnostic, settings::kDefaultOnePassDq);
  EXPECT_EQ(settings::kDefaultOnePassDq, 10);
  setenv("FLASHJIT_CUDA_ONE_PASS_DQ", "ordered", 1);
  EXPECT_TRUE(settings::one_pass_dq_set());
  const std::string real = backward_kernels(traits, true).back().name();
  EXPECT_EQ(backward_kernels(traits, true).back().dq_diagnostic, 0);
  const std::vector<std::string> values = {"none",           "unordered",    "eager",         "arrival", "writer",
                                           "writer-arrival", "writer-eager", "writer-groups", "atomic",
                                           "writer-pair",    "writer-diagonal"};
  for (size_t index = 0; index < values.size(); ++index) {
    setenv("FLASHJIT_CUDA_ONE_PASS_DQ", values[index].c_str(), 1);
    const std::vector<KernelSpec> specs = backward_kernels(traits, true);
    const KernelSpec spec = dkdv_kernel(specs);
    const bool writer = index >= 4;  // and atomic: dQ from the sums by a kernel of its own
    ASSERT_EQ(specs.size(), writer ? 3u : 2u);
    EXPECT_EQ(specs.back().entry, writer ? KernelEntry::kBackwardDqConvert : KernelEntry::kBackwardDkDv);
    EXPECT_TRUE(spec.one_pass);
    EXPECT_EQ(spec.dq_diagnostic, int(index) + 1);
    EXPECT_NE(spec.name(), real);
    if (values[index] == "writer-pair") EXPECT_EQ(spec.name(), dkdv_kernel(defaults).name());
    ASSERT_NO_THROW(kernel_binary(spec, false)) << spec.name();
    if (writer) ASSERT_NO_THROW(kernel_binary(specs.back(), false)) << specs.back().name();
    EXPECT_EQ(backward_kernels(traits, false).back().dq_diagnostic, 0);  // the split backward: unaffected
  }
  KernelTraits extras = sm90_traits(FJ_BFLOAT16, 64);
  extras.window = extras.dropout = extras.softcap = true;
  extras.mask = flashjit::MaskKind::kBool;
  const std::vector<std::pair<const char*, int>> ordered = {
      {"eager", 3}, {"writer-pair", 10}, {"writer-diagonal", 11}};
  for (const auto& [value, diagnostic] : ordered) {
    setenv("FLASHJIT_CUDA_ONE_PASS_DQ", value, 1);
    for (const KernelTraits& other : {sm90_traits(FJ_BFLOAT16, 64), extras}) {
      const std::vector<KernelSpec> specs = backward_kernels(other, true);
      const KernelSpec spec = dkdv_kernel(specs);
      EXPECT_TRUE(spec.one_pass && spec.dq_diagnostic == diagnostic) << spec.name();
      for (KernelSpec kernel : specs) {
        ASSERT_NO_THROW(kernel_binary(kernel, false)) << kernel.name();
        kernel.varlen = true;  // a variable-length batch in one launch
        ASSERT_NO_THROW(kernel_binary(kernel, false)) << kernel.name();
      }
    }
  }
  // The arrival order only where every key block of a head can be resident at once, else the
  // block order (eager; by the dQ writer for writer-arrival). The walks' table (16 bytes a key
  // block) sizes the launch and bounds the key blocks too; the writer's staging buffers (two for
  // each consumer, 8 KiB each at head dim 128, and their two mbarriers) size it as well.
  size_t eager_bytes = 0;
  for (const auto& [value, arrival, block_order] : {std::tuple{"arrival", 4, 3}, std::tuple{"writer-arrival", 6, 5}}) {
    SCOPED_TRACE(value);
    setenv("FLASHJIT_CUDA_ONE_PASS_DQ", value, 1);
    KernelSpec fits = dkdv_kernel(backward_kernels(traits, true)), too_many = fits, past_table = fits;
    keep_blocks_resident(fits, 132, 132);
    keep_blocks_resident(too_many, 133, 132);
    keep_blocks_resident(past_table, flashjit::layout::kArrivalWalkBlocks + 1, 1000);
    EXPECT_EQ(fits.dq_diagnostic, arrival);
    EXPECT_EQ(too_many.dq_diagnostic, block_order);
    EXPECT_EQ(past_table.dq_diagnostic, block_order);
    EXPECT_EQ(fits.shared_memory_bytes(), too_many.shared_memory_bytes() + 16 * flashjit::layout::kArrivalWalkBlocks);
    if (block_order == 3) eager_bytes = too_many.shared_memory_bytes();
    if (block_order == 5) EXPECT_EQ(too_many.shared_memory_bytes(), eager_bytes + 4 * 8192 + 2 * 4 * 8);
  }
  KernelSpec split = backward_kernels(traits, false).back();
  keep_blocks_resident(split, 1000, 132);
  EXPECT_EQ(split.dq_diagnostic, 0);
  setenv("FLASHJIT_CUDA_ONE_PASS_DQ", "ordered", 1);
  EXPECT_EQ(backward_kernels(traits, true).back().name(), real);
  expect_setting_error("FLASHJIT_CUDA_ONE_PASS_DQ", "fast", [] { settings::one_pass_dq(); });
}

// FLASHJIT_CUDA_ONE_PASS_STEPS=whole: the one pass at head dim 128 in steps of twice the queries
// (64; 32 with the extras), one or two Q/dO buffers ahead, two dS buffers, where its dQ sums are
// the writer's or atomic; it fits shared memory and compiles for sm_90a with the dQ convert kernel,
// dense and varlen; elsewhere (head dim 64, the consumers' own ordered adds) the carried steps;
// unset or carried: those, except that the unordered backward (deterministic=False) asks for
// whole-concurrent steps when it is unset; whole-concurrent: the same steps with no turns, a kernel
// of its own; another value is an error naming the variable.
TEST_F(CudaCompile, WholeStepOnePassIsChosenAndCompiles) {
  REQUIRE_NVRTC();
  using namespace flashjit::cuda;
  struct Unset {
    ~Unset() {
      unsetenv("FLASHJIT_CUDA_ONE_PASS_STEPS");
      unsetenv("FLASHJIT_CUDA_ONE_PASS_DQ");
    }
  } unset;
  unsetenv("FLASHJIT_CUDA_ONE_PASS_DQ");
  unsetenv("FLASHJIT_CUDA_ONE_PASS_STEPS");
  EXPECT_FALSE(settings::one_pass_whole_steps());
  const KernelSpec carried = dkdv_kernel(backward_kernels(sm90_traits(FJ_BFLOAT16, 128), true));
  EXPECT_FALSE(carried.whole_steps);
  EXPECT_EQ(carried.block_n, 32);
  {
    // The unordered backward's own choice: whole-concurrent steps, two tiles ahead, compiled.
    const std::vector<KernelSpec> specs = unordered_backward_kernels(sm90_traits(FJ_BFLOAT16, 128));
    ASSERT_EQ(specs.size(), 3u);
    const KernelSpec& dkdv = dkdv_kernel(specs);
    EXPECT_TRUE(flashjit::layout::dq_atomic(dkdv.dq_diagnostic)) << dkdv.name();
    EXPECT_EQ(dkdv.takes_whole_steps(), 2) << dkdv.name();
    EXPECT_EQ(dkdv.stages, 2) << dkdv.name();
    for (const KernelSpec& spec : specs) ASSERT_NO_THROW(kernel_binary(spec, false)) << spec.name();
  }
  setenv("FLASHJIT_CUDA_ONE_PASS_STEPS", "carried", 1);
  EXPECT_FALSE(settings::one_pass_whole_steps());
  EXPECT_FALSE(settings::one_pass_whole_steps(kUnorderedWholeSteps));  // set: the variable's choice
  setenv("FLASHJIT_CUDA_ONE_PASS_STEPS", "whole-concurrent", 1);
  EXPECT_EQ(settings::one_pass_whole_steps(), 2);
  {
    // Concurrent whole steps: the same tiles, their own kernel (no turns), compiled for sm_90a.
    const std::vector<KernelSpec> specs = backward_kernels(sm90_traits(FJ_BFLOAT16, 128), true);
    ASSERT_EQ(specs.size(), 3u);
    const KernelSpec& dkdv = dkdv_kernel(specs);
    EXPECT_EQ(dkdv.takes_whole_steps(), 2) << dkdv.name();
    EXPECT_NE(dkdv.name().find("_whole-concurrent"), std::string::npos) << dkdv.name();
    EXPECT_EQ(dkdv.block_n, 64);
    for (const KernelSpec& spec : specs) ASSERT_NO_THROW(kernel_binary(spec, false)) << spec.name();
  }
  setenv("FLASHJIT_CUDA_ONE_PASS_STEPS", "whole", 1);
  EXPECT_EQ(settings::one_pass_whole_steps(), 1);
  for (const char* dq : {"writer-pair", "writer-diagonal", "writer", "writer-eager", "atomic"}) {
    setenv("FLASHJIT_CUDA_ONE_PASS_DQ", dq, 1);
    for (fj_dtype dtype : {FJ_BFLOAT16, FJ_FLOAT16}) {
      for (bool extras : {false, true}) {
        KernelTraits traits = sm90_traits(dtype, 128);
        if (extras) {
          traits.window = traits.dropout = traits.softcap = true;
          traits.mask = flashjit::MaskKind::kBool;
          traits.mask_dtype = FJ_BOOL;
        }
        std::vector<KernelSpec> specs = backward_kernels(traits, true);
        ASSERT_EQ(specs.size(), 3u) << dq;
        const KernelSpec& dkdv = dkdv_kernel(specs);
        EXPECT_TRUE(dkdv.one_pass && dkdv.takes_whole_steps() == 1) << dkdv.name();
        EXPECT_NE(dkdv.name().find("_whole_"), std::string::npos) << dkdv.name();
        EXPECT_EQ(dkdv.block_n, extras ? 32 : 64) << dkdv.name();
        // Two Q/dO buffers ahead where there is room (atomic: no dQ staging; extras: steps of 32
        // queries; a writer pair's order: with one staging slot a consumer); one where the
        // writer's staging of 64-query steps takes it.
        const bool pair = std::string(dq) == "writer-pair" || std::string(dq) == "writer-diagonal";
        EXPECT_EQ(dkdv.stages, std::string(dq) == "atomic" || extras || pair ? 2 : 1) << dkdv.name();
        EXPECT_EQ(dkdv.takes_dq_slots(), pair && !extras ? 1 : 2) << dkdv.name();
        EXPECT_EQ(dkdv.name().find("_slots1") != std::string::npos, pair && !extras) << dkdv.name();
        EXPECT_EQ(specs.back().block_n, dkdv.block_n);  // the convert kernel's tiles are the step's
        if (dtype == FJ_FLOAT16 && std::string(dq) != "writer-pair") continue;  // (compile time)
        for (KernelSpec spec : specs) {
          ASSERT_NO_THROW(kernel_binary(spec, false)) << spec.name();
          spec.varlen = true;
          ASSERT_NO_THROW(kernel_binary(spec, false)) << spec.name();
        }
      }
    }
  }
  // writer-arrival's walks table leaves whole steps no room: carried steps.
  setenv("FLASHJIT_CUDA_ONE_PASS_DQ", "writer-arrival", 1);
  const KernelSpec arrival = dkdv_kernel(backward_kernels(sm90_traits(FJ_BFLOAT16, 128), true));
  EXPECT_TRUE(arrival.one_pass && !arrival.whole_steps && arrival.block_n == 32) << arrival.name();
  setenv("FLASHJIT_CUDA_ONE_PASS_DQ", "ordered", 1);  // the consumers' own adds: carried steps
  EXPECT_FALSE(dkdv_kernel(backward_kernels(sm90_traits(FJ_BFLOAT16, 128), true)).whole_steps);
  unsetenv("FLASHJIT_CUDA_ONE_PASS_DQ");
  EXPECT_FALSE(dkdv_kernel(backward_kernels(sm90_traits(FJ_BFLOAT16, 64), true)).whole_steps);  // head dim 64
  EXPECT_FALSE(backward_kernels(sm90_traits(FJ_BFLOAT16, 128), false).back().whole_steps);      // the split pass
  expect_setting_error("FLASHJIT_CUDA_ONE_PASS_STEPS", "fast", [] { settings::one_pass_whole_steps(); });
}

// The diagonal order chosen by a tuned class stays off grouped heads (writer-pair's block order
// instead, one kernel name apart), unless FLASHJIT_CUDA_ONE_PASS_DQ asks for it; other modes and
// ungrouped heads keep theirs.
TEST(OnePassOrder, DiagonalStaysOffGroupedHeadsUnlessSet) {
  using namespace flashjit::cuda;
  struct Unset {
    ~Unset() { unsetenv("FLASHJIT_CUDA_ONE_PASS_DQ"); }
  } unset;
  unsetenv("FLASHJIT_CUDA_ONE_PASS_DQ");
  const KernelTraits traits = sm90_traits(FJ_BFLOAT16, 64);
  const KernelSpec diagonal = dkdv_kernel(backward_kernels(traits, true, backward_dq_mode(kOnePassDiagonal)));
  ASSERT_TRUE(diagonal.one_pass);
  ASSERT_EQ(diagonal.dq_diagnostic, 11);
  KernelSpec grouped = diagonal, ungrouped = diagonal;
  keep_diagonal_off_groups(grouped, true);
  keep_diagonal_off_groups(ungrouped, false);
  EXPECT_EQ(grouped.dq_diagnostic, 10);
  EXPECT_EQ(grouped.name(), dkdv_kernel(backward_kernels(traits, true)).name());
  EXPECT_EQ(ungrouped.dq_diagnostic, 11);
  KernelSpec other = dkdv_kernel(backward_kernels(traits, true, 5));
  keep_diagonal_off_groups(other, true);
  EXPECT_EQ(other.dq_diagnostic, 5);
  setenv("FLASHJIT_CUDA_ONE_PASS_DQ", "writer-diagonal", 1);
  KernelSpec forced = dkdv_kernel(backward_kernels(traits, true));
  keep_diagonal_off_groups(forced, true);
  EXPECT_EQ(forced.dq_diagnostic, 11);
}

// Every forward epilogue and Q ring the tile override can pick compiles for
// sm_90a, and the default takes two Q buffers and TMA stores where they fit.
TEST_F(CudaCompile, ForwardTileVariantsCompileForSm90) {
  REQUIRE_NVRTC();
  using namespace flashjit::cuda;
  for (int head_dim : {64, 128, 256}) {
    const KernelTraits traits = sm90_traits(FJ_FLOAT16, head_dim);
    const KernelSpec spec = forward_kernel(traits);
    EXPECT_TRUE(spec.o_tma) << spec.name();
    EXPECT_EQ(spec.q_buffers, head_dim <= 128 ? 2 : 1) << spec.name();
    for (const std::string tiles : {"o=direct,q=1", "o=direct", "q=1", "n=64,stages=3"}) {
      if (head_dim == 256 && tiles == "n=64,stages=3") continue;  // no room for three stages
      setenv("FLASHJIT_CUDA_TILES", tiles.c_str(), 1);
      const KernelSpec forced = forward_kernel(traits);
      unsetenv("FLASHJIT_CUDA_TILES");
      EXPECT_EQ(forced.o_tma, tiles.find("o=direct") == std::string::npos) << tiles;
      ASSERT_NO_THROW(kernel_binary(forced, false)) << tiles << ": " << forced.name();
    }
  }
}

// FLASHJIT_CUDA_TILES chain=tiles: work tiles that run on into each other, on top of the tiles
// in force (tuned or forced), where O leaves by TMA from two Q buffers (head dims up to 128 by
// default); a kernel of its own name, which compiles, also with three warpgroups and with
// every feature. Elsewhere (one Q buffer, a split) the kernel is the unchained one.
TEST_F(CudaCompile, ChainedForwardCompilesForSm90) {
  REQUIRE_NVRTC();
  using namespace flashjit::cuda;
  for (const char* tiles : {"chain=tiles", "chain=tiles,groups=3"}) {
    for (int head_dim : {64, 128, 256}) {
      if (head_dim > 64 && std::string(tiles).find("groups=3") != std::string::npos) continue;
      KernelTraits traits = sm90_traits(FJ_BFLOAT16, head_dim);
      const KernelSpec plain = forward_kernel(traits);
      setenv("FLASHJIT_CUDA_TILES", tiles, 1);
      const KernelSpec chained = forward_kernel(traits);
      traits.window = traits.dropout = traits.softcap = true;
      traits.mask = flashjit::MaskKind::kBool;
      const KernelSpec extras = forward_kernel(traits);
      unsetenv("FLASHJIT_CUDA_TILES");
      EXPECT_EQ(chained.chains_tiles(), head_dim <= 128) << chained.name();
      EXPECT_EQ(chained.name() != plain.name(), chained.chains_tiles() || chained.threads != plain.threads) << tiles;
      EXPECT_FALSE(hopper_split_kernel(chained).chains_tiles());
      if (!chained.chains_tiles()) continue;
      ASSERT_NO_THROW(kernel_binary(chained, false)) << chained.name();
      ASSERT_NO_THROW(kernel_binary(extras, false)) << extras.name();
    }
  }
  // On top of a tuned choice: the built-in table's D128 long-key kernel (160 keys a step).
  setenv("FLASHJIT_CUDA_TILES", "chain=tiles", 1);
  const KernelSpec tuned = forward_kernel(sm90_traits(FJ_BFLOAT16, 128), parse_forward_tiles("n=160"));
  unsetenv("FLASHJIT_CUDA_TILES");
  EXPECT_TRUE(tuned.chains_tiles());
  EXPECT_EQ(tuned.block_n, 160);
  ASSERT_NO_THROW(kernel_binary(tuned, false)) << tuned.name();
  // With the tile trace (scripts/trace_tiles.py --tiles chain=tiles).
  const KernelSpec traced = traced_forward(sm90_traits(FJ_BFLOAT16, 128), "chain=tiles");
  EXPECT_TRUE(traced.chains_tiles() && traced.trace) << traced.name();
  ASSERT_NO_THROW(kernel_binary(traced, false)) << traced.name();
}

// The next work tile taken early (FJ_EARLY_NEXT), FLASHJIT_CUDA_TILES next=early on the tiles in
// force: a kernel of its own name in the dense unsplit forward with two Q buffers, not with
// chained tiles, in splits or with one Q buffer; by default (and with next=late) the tile is
// taken after the last V. It compiles, with every feature and with the tile trace.
TEST_F(CudaCompile, EarlyNextTileCompilesWhereItApplies) {
  REQUIRE_NVRTC();
  using namespace flashjit::cuda;
  for (int head_dim : {64, 128, 256}) {
    KernelTraits traits = sm90_traits(FJ_BFLOAT16, head_dim);
    const KernelSpec late = forward_kernel(traits);
    EXPECT_FALSE(late.takes_next_early()) << late.name();
    setenv("FLASHJIT_CUDA_TILES", "next=late", 1);
    EXPECT_EQ(forward_kernel(traits).name(), late.name());
    setenv("FLASHJIT_CUDA_TILES", "next=early", 1);
    const KernelSpec early = forward_kernel(traits);
    EXPECT_FALSE(hopper_split_kernel(early).takes_next_early());
    traits.window = traits.dropout = traits.softcap = true;
    traits.mask = flashjit::MaskKind::kBool;
    const KernelSpec early_extras = forward_kernel(traits);
    setenv("FLASHJIT_CUDA_TILES", "next=early,chain=tiles", 1);
    EXPECT_FALSE(forward_kernel(sm90_traits(FJ_BFLOAT16, head_dim)).takes_next_early());
    setenv("FLASHJIT_CUDA_TILES", "next=early,q=1,o=direct", 1);
    EXPECT_FALSE(forward_kernel(sm90_traits(FJ_BFLOAT16, head_dim)).takes_next_early());
    unsetenv("FLASHJIT_CUDA_TILES");
    EXPECT_EQ(early.takes_next_early(), early.q_buffers == 2) << early.name();
    EXPECT_EQ(early.name() != late.name(), early.takes_next_early()) << early.name();
    if (!early.takes_next_early()) continue;
    EXPECT_NE(early.name().find("_earlynext"), std::string::npos) << early.name();
    ASSERT_NO_THROW(kernel_binary(early, false)) << early.name();
    ASSERT_NO_THROW(kernel_binary(early_extras, false)) << early_extras.name();
  }
  // A tuned choice's next=early (flashjit tune --with next=early), as chain's.
  const KernelSpec tuned = forward_kernel(sm90_traits(FJ_BFLOAT16, 128), parse_forward_tiles("n=160,next=early"));
  EXPECT_TRUE(tuned.takes_next_early() && tuned.block_n == 160) << tuned.name();
  setenv("FLASHJIT_CUDA_TILES", "next=late", 1);  // forced wins
  EXPECT_FALSE(forward_kernel(sm90_traits(FJ_BFLOAT16, 128), parse_forward_tiles("n=160,next=early")).takes_next_early());
  const KernelSpec traced = traced_forward(sm90_traits(FJ_BFLOAT16, 128), "next=early");
  EXPECT_TRUE(traced.takes_next_early() && traced.trace) << traced.name();
  ASSERT_NO_THROW(kernel_binary(traced, false)) << traced.name();
}

// The producer's setup (FJ_PRODUCER_SETUP), FLASHJIT_CUDA_TILES setup=producer on the tiles in
// force: a kernel of its own name, whose launch takes the larger tile queue, in every variant of
// the sm_90a forward (splits, variable-length batches, KV caches, chained tiles, the next tile
// early, three consumer warpgroups, every feature); by default (and setup=consumer) not. Each
// compiles.
TEST_F(CudaCompile, ProducerSetupCompilesInEveryForwardVariant) {
  REQUIRE_NVRTC();
  using namespace flashjit::cuda;
  const UnsetOnExit unset{"FLASHJIT_CUDA_TILES"};
  for (int head_dim : {64, 128}) {  // (256 shares the producer's code)
    unsetenv("FLASHJIT_CUDA_TILES");
    KernelTraits traits = sm90_traits(FJ_BFLOAT16, head_dim);
    const KernelSpec plain = forward_kernel(traits);
    EXPECT_FALSE(plain.sets_up_in_producer()) << plain.name();
    setenv("FLASHJIT_CUDA_TILES", "setup=consumer", 1);
    EXPECT_EQ(forward_kernel(traits).name(), plain.name());
    setenv("FLASHJIT_CUDA_TILES", "setup=producer", 1);
    std::vector<KernelSpec> specs = {forward_kernel(traits)};
    EXPECT_TRUE(specs[0].sets_up_in_producer() && specs[0].name().find("_psetup") != std::string::npos)
        << specs[0].name();
    EXPECT_EQ(specs[0].shared_memory_bytes(), plain.shared_memory_bytes() + 2 * 4 * (8 - 1));
    specs.push_back(hopper_split_kernel(specs[0]));
    KernelSpec varlen = specs[0];
    varlen.varlen = true;
    specs.push_back(varlen);
    specs.push_back(hopper_kv_cache_kernel(specs[0], 64));
    specs.push_back(hopper_kv_cache_kernel(specs[0], 0));  // a cache in place
    KernelTraits extras = traits;
    extras.window = extras.dropout = extras.softcap = true;
    extras.mask = flashjit::MaskKind::kBool;
    specs.push_back(forward_kernel(extras));
    setenv("FLASHJIT_CUDA_TILES", "setup=producer,chain=tiles", 1);
    specs.push_back(forward_kernel(traits));
    setenv("FLASHJIT_CUDA_TILES", "setup=producer,next=early", 1);
    specs.push_back(forward_kernel(traits));
    EXPECT_EQ(specs.back().takes_next_early(), specs.back().q_buffers == 2) << specs.back().name();
    specs.push_back(traced_forward(traits, "setup=producer,next=early"));
    EXPECT_TRUE(specs.back().trace) << specs.back().name();
    if (head_dim == 64) {
      setenv("FLASHJIT_CUDA_TILES", "setup=producer,groups=3", 1);
      specs.push_back(forward_kernel(traits));
    }
    for (const KernelSpec& spec : specs) {
      if (spec.family != KernelFamily::kHopper && spec.kv_cache != 0) continue;  // caches off the split forward
      EXPECT_TRUE(spec.sets_up_in_producer()) << spec.name();
      ASSERT_NO_THROW(kernel_binary(spec, false)) << spec.name();
    }
  }
  EXPECT_EQ(parse_forward_tiles("setup=producer").producer_setup, 1);
  EXPECT_EQ(parse_forward_tiles("setup=consumer").producer_setup, 0);
  EXPECT_FALSE(parse_forward_tiles("setup=producer").forced());  // on the tiles in force
}

// Polynomial exps (FJ_EXP_POLY), FLASHJIT_CUDA_TILES poly=k on the tiles in force: a kernel of
// its own name in the sm_90a forward's variants (splits, variable-length batches and KV caches,
// which share the step's code, named; three consumer warpgroups, every feature, an additive mask
// compiled), at head dims 64 and 128 (256 shares the code); poly=0 and the default are the usual
// kernel; the tuned key applies unless tiles are forced; out-of-range values are refused naming the
// key.
TEST_F(CudaCompile, PolynomialExpsCompileInEveryForwardVariant) {
  REQUIRE_NVRTC();
  using namespace flashjit::cuda;
  const UnsetOnExit unset{"FLASHJIT_CUDA_TILES"};
  for (int head_dim : {64, 128}) {
    unsetenv("FLASHJIT_CUDA_TILES");
    const KernelTraits traits = sm90_traits(FJ_BFLOAT16, head_dim);
    const KernelSpec plain = forward_kernel(traits);
    EXPECT_EQ(plain.poly_groups(), 0) << plain.name();
    setenv("FLASHJIT_CUDA_TILES", "poly=0", 1);
    EXPECT_EQ(forward_kernel(traits).name(), plain.name());
    setenv("FLASHJIT_CUDA_TILES", "poly=5", 1);
    std::vector<KernelSpec> specs = {forward_kernel(traits)};
    EXPECT_NE(specs[0].name().find("_poly5_t"), std::string::npos) << specs[0].name();
    EXPECT_EQ(specs[0].shared_memory_bytes(), plain.shared_memory_bytes());
    specs.push_back(hopper_split_kernel(specs[0]));
    KernelSpec varlen = specs[0];
    varlen.varlen = true;
    EXPECT_GT(varlen.poly_groups(), 0);
    EXPECT_GT(hopper_kv_cache_kernel(specs[0], 64).poly_groups(), 0);
    KernelTraits extras = traits;
    extras.window = extras.dropout = extras.softcap = true;
    extras.mask = flashjit::MaskKind::kBool;
    specs.push_back(forward_kernel(extras));
    KernelTraits additive = traits;
    additive.mask = flashjit::MaskKind::kAdditive;
    additive.mask_dtype = FJ_FLOAT32;
    specs.push_back(forward_kernel(additive));
    if (head_dim == 64) {
      setenv("FLASHJIT_CUDA_TILES", "poly=8,groups=3", 1);
      specs.push_back(forward_kernel(traits));
    }
    for (const KernelSpec& spec : specs) {
      EXPECT_GT(spec.poly_groups(), 0) << spec.name();
      ASSERT_NO_THROW(kernel_binary(spec, false)) << spec.name();
    }
    unsetenv("FLASHJIT_CUDA_TILES");
    EXPECT_EQ(forward_kernel(traits, parse_forward_tiles("poly=4")).poly_groups(), 4);
    setenv("FLASHJIT_CUDA_TILES", "n=64", 1);  // forced tiles replace the tuned choice whole
    EXPECT_EQ(forward_kernel(traits, parse_forward_tiles("poly=4")).poly_groups(), 0);
  }
  EXPECT_EQ(parse_forward_tiles("poly=8").exp_poly, 8);
  // wait=suspend: the producer's waits suspended, on the tiles in force, in the forward's variants.
  EXPECT_EQ(parse_forward_tiles("wait=suspend").producer_suspend, 1);
  EXPECT_EQ(parse_forward_tiles("wait=spin").producer_suspend, 0);
  EXPECT_FALSE(parse_forward_tiles("wait=suspend").forced());
  setenv("FLASHJIT_CUDA_TILES", "wait=suspend", 1);
  const KernelSpec suspended = forward_kernel(sm90_traits(FJ_BFLOAT16, 64));
  EXPECT_TRUE(suspended.suspends_producer() && suspended.name().find("_psusp") != std::string::npos)
      << suspended.name();
  ASSERT_NO_THROW(kernel_binary(suspended, false)) << suspended.name();
  ASSERT_NO_THROW(kernel_binary(hopper_split_kernel(suspended), false));
  unsetenv("FLASHJIT_CUDA_TILES");
  EXPECT_FALSE(forward_kernel(sm90_traits(FJ_BFLOAT16, 64)).suspends_producer());
  EXPECT_EQ(parse_forward_tiles("n=128").exp_poly, -1);
  EXPECT_FALSE(parse_forward_tiles("poly=3").forced());  // on the tiles in force
  for (const char* bad : {"poly=9", "poly=-1", "poly=x", "poly="}) {
    try {
      parse_forward_tiles(bad);
      ADD_FAILURE() << bad << " was accepted";
    } catch (const flashjit::Error& error) {
      EXPECT_NE(std::string(error.what()).find("poly=0..8"), std::string::npos) << error.what();
    }
  }
}

// KernelSpec::backward_overlap (FLASHJIT_CUDA_BACKWARD_OVERLAP, set by the backward's plan): the
// sm_90a dQ and dK/dV kernels built to overlap have names of their own and compile, at head dims 64
// and 128, plain and with every feature, with the dK/dV kernel in parts too; not for the one pass,
// variable-length batches, the prep kernel or the dV/dK kernels above 128.
TEST_F(CudaCompile, BackwardOverlapKernelsCompile) {
  REQUIRE_NVRTC();
  using namespace flashjit::cuda;
  for (int head_dim : {64, 128}) {
    KernelTraits extras = sm90_traits(FJ_BFLOAT16, head_dim);
    extras.window = extras.dropout = extras.softcap = true;
    extras.mask = flashjit::MaskKind::kBool;
    for (const KernelTraits& t : {sm90_traits(FJ_BFLOAT16, head_dim), extras}) {
      std::vector<KernelSpec> specs = backward_kernels(t);
      KernelSpec unparted = dkdv_kernel(specs);
      unparted.dkdv_parts = false;  // the kernel problems of one part run
      specs.push_back(unparted);
      for (KernelSpec spec : specs) {
        spec.backward_overlap = false;
        const std::string plain = spec.name();
        EXPECT_NE(spec.source().find("#define FJ_BACKWARD_OVERLAP 0"), std::string::npos) << plain;
        spec.backward_overlap = true;
        const bool applies = spec.entry == KernelEntry::kBackwardDq || spec.entry == KernelEntry::kBackwardDkDv;
        EXPECT_EQ(spec.overlaps_launch(), applies) << plain;
        EXPECT_EQ(spec.name() != plain, applies) << plain;
        EXPECT_EQ(spec.source().find("#define FJ_BACKWARD_OVERLAP 1") != std::string::npos, applies) << plain;
        if (applies) ASSERT_NO_THROW(kernel_binary(spec, false)) << spec.name();
        KernelSpec varlen = spec;
        varlen.varlen = true;
        EXPECT_FALSE(varlen.overlaps_launch());
      }
      KernelSpec one_pass = dkdv_kernel(backward_kernels(t, true));
      one_pass.backward_overlap = true;
      EXPECT_FALSE(one_pass.overlaps_launch());
    }
  }
  KernelSpec dv = dkdv_kernel(backward_kernels(sm90_traits(FJ_BFLOAT16, 256)));
  dv.backward_overlap = true;
  EXPECT_FALSE(dv.overlaps_launch()) << dv.name();
  // The switch reaches the kernels backward_kernels chooses (what precompile builds), and only the
  // dQ and dK/dV kernels; unset, none.
  const UnsetOnExit unset{"FLASHJIT_CUDA_BACKWARD_OVERLAP"};
  setenv("FLASHJIT_CUDA_BACKWARD_OVERLAP", "1", 1);
  for (const KernelSpec& spec : backward_kernels(sm90_traits(FJ_BFLOAT16, 64))) {
    EXPECT_EQ(spec.overlaps_launch(), spec.entry != KernelEntry::kBackwardPrep) << spec.name();
  }
  for (const KernelSpec& spec : backward_kernels(sm90_traits(FJ_BFLOAT16, 64), true)) {
    EXPECT_FALSE(spec.overlaps_launch()) << spec.name();  // the one pass: no dQ kernel to overlap
  }
  unsetenv("FLASHJIT_CUDA_BACKWARD_OVERLAP");
  for (const KernelSpec& spec : backward_kernels(sm90_traits(FJ_BFLOAT16, 64))) {
    EXPECT_FALSE(spec.overlaps_launch()) << spec.name();
  }
}

// FLASHJIT_CUDA_DKDV_PARTS: the split sm_90a dK/dV kernel over a GQA group in parts, a kernel of
// its own name at head dims 64 and 128 (plain and with every feature), which compiles; not for the
// one pass, variable-length batches or the dV/dK kernels above 128; "off", the usual kernel (unset
// is "auto": the problem then decides, backend.cpp, where one part keeps the usual kernel).
// Precompiling a backward config builds those kernels, and with nondeterministic set also the
// unordered one pass (checked here, where the split ones are already built).
TEST_F(CudaCompile, DkDvPartsCompileWhereTheyApply) {
  REQUIRE_NVRTC();
  using namespace flashjit::cuda;
  const UnsetOnExit unset{"FLASHJIT_CUDA_DKDV_PARTS"};
  for (int head_dim : {64, 128, 256}) {
    KernelTraits traits = sm90_traits(FJ_BFLOAT16, head_dim);
    setenv("FLASHJIT_CUDA_DKDV_PARTS", "off", 1);
    const KernelSpec plain = dkdv_kernel(backward_kernels(traits));
    EXPECT_FALSE(plain.takes_parts()) << plain.name();
    unsetenv("FLASHJIT_CUDA_DKDV_PARTS");
    EXPECT_EQ(dkdv_kernel(backward_kernels(traits)).takes_parts(), head_dim <= 128);
    setenv("FLASHJIT_CUDA_DKDV_PARTS", "auto", 1);
    KernelTraits extras = traits;
    extras.window = extras.dropout = extras.softcap = true;
    extras.mask = flashjit::MaskKind::kBool;
    for (const KernelTraits& t : {traits, extras}) {
      const KernelSpec parts = dkdv_kernel(backward_kernels(t));
      EXPECT_EQ(parts.takes_parts(), head_dim <= 128) << parts.name();
      EXPECT_EQ(parts.name().find("_parts") != std::string::npos, head_dim <= 128) << parts.name();
      if (head_dim <= 128) ASSERT_NO_THROW(kernel_binary(parts, false)) << parts.name();
      EXPECT_FALSE(dkdv_kernel(backward_kernels(t, true)).takes_parts());  // the one pass
      KernelSpec varlen = parts;
      varlen.varlen = true;
      EXPECT_FALSE(varlen.takes_parts());
    }
  }
  setenv("FLASHJIT_CUDA_DKDV_PARTS", "3", 1);
  EXPECT_THROW(backward_kernels(sm90_traits(FJ_BFLOAT16, 64)), flashjit::Error);
  // Precompiling a backward (parts by default) compiles the plain dK/dV kernel too, which problems
  // that take one part (most) run; with FLASHJIT_CUDA_BACKWARD_OVERLAP unset (auto) each also in
  // its overlapping variant (`_pdl`), which problems of small grids run.
  unsetenv("FLASHJIT_CUDA_DKDV_PARTS");
  const UnsetOnExit unset_overlap{"FLASHJIT_CUDA_BACKWARD_OVERLAP"};
  unsetenv("FLASHJIT_CUDA_BACKWARD_OVERLAP");
  const auto dkdv_cubins = [&](bool with_parts, bool overlapping) {
    int count = 0;
    for (const fs::path& cubin : cubins()) {
      const std::string name = cubin.filename().string();
      count += name.find("backward_dkdv") != std::string::npos && name.find("_qk64_") != std::string::npos &&
               (name.find("_parts") != std::string::npos) == with_parts &&
               (name.find("_pdl") != std::string::npos) == overlapping;
    }
    return count;
  };
  const int parts_before = dkdv_cubins(true, false);
  EXPECT_EQ(dkdv_cubins(false, false), 0);
  EXPECT_EQ(dkdv_cubins(false, true), 0);
  fj_kernel_config c = config(FJ_BFLOAT16, 64, 90);
  c.backward = 1;
  ASSERT_EQ(fj_cuda_precompile(&c, 1), FJ_SUCCESS) << fj_last_error();
  EXPECT_GE(dkdv_cubins(true, false), std::max(parts_before, 1));
  EXPECT_GE(dkdv_cubins(true, true), 1);
  EXPECT_EQ(dkdv_cubins(false, false), 1);
  EXPECT_EQ(dkdv_cubins(false, true), 1);
  // nondeterministic: also the unordered one pass a deterministic=False backward takes (its dK/dV
  // kernel and the kernel that writes dQ from the sums); another value is an error naming it.
  const auto unordered_cubins = [&] {
    int count = 0;
    for (const fs::path& cubin : cubins()) count += cubin.filename().string().find("_dq-atomic") != std::string::npos;
    return count;
  };
  const int unordered_before = unordered_cubins();
  c.nondeterministic = 1;
  ASSERT_EQ(fj_cuda_precompile(&c, 1), FJ_SUCCESS) << fj_last_error();
  EXPECT_EQ(unordered_cubins(), unordered_before + 2);
  c.nondeterministic = 2;
  EXPECT_EQ(fj_cuda_precompile(&c, 1), FJ_ERROR_INVALID_VALUE);
  EXPECT_NE(std::string(fj_last_error()).find("[precompile] nondeterministic: expected 0 or 1, got 2"), std::string::npos)
      << fj_last_error();
}

// FLASHJIT_CUDA_TRACE=1 (scripts/trace_tiles.py): the sm_90a forward with its tile trace, a
// kernel of its own name, which compiles; unset, the usual kernel.
TEST_F(CudaCompile, TracedForwardCompilesForSm90) {
  REQUIRE_NVRTC();
  using namespace flashjit::cuda;
  for (int head_dim : {64, 128}) {
    const KernelTraits traits = sm90_traits(FJ_BFLOAT16, head_dim);
    const KernelSpec traced = traced_forward(traits);
    const KernelSpec plain = forward_kernel(traits);
    EXPECT_TRUE(traced.trace);
    EXPECT_FALSE(plain.trace);
    EXPECT_NE(traced.name(), plain.name());
    ASSERT_NO_THROW(kernel_binary(traced, false)) << traced.name();
  }
  expect_setting_error("FLASHJIT_CUDA_TRACE", "yes", [] { settings::trace_tiles(); });
}

// FLASHJIT_CUDA_TRACE=1 with the one pass in whole-concurrent steps (scripts/trace_backward.py):
// the dK/dV kernel with its step trace, a kernel of its own name, compiles with the dQ writer pair
// (one staging slot) and with the atomic sums; the dQ convert kernel and other steps stay untraced.
TEST_F(CudaCompile, TracedOnePassCompilesForSm90) {
  REQUIRE_NVRTC();
  using namespace flashjit::cuda;
  UnsetOnExit unset_steps{"FLASHJIT_CUDA_ONE_PASS_STEPS"}, unset_trace{"FLASHJIT_CUDA_TRACE"};
  const KernelTraits traits = sm90_traits(FJ_BFLOAT16, 128);
  for (int mode : {settings::kDefaultOnePassDq, kUnorderedDq}) {  // writer-pair, atomic
    setenv("FLASHJIT_CUDA_ONE_PASS_STEPS", "whole-concurrent", 1);
    unsetenv("FLASHJIT_CUDA_TRACE");
    const std::vector<KernelSpec> plain = backward_kernels(traits, true, mode);
    setenv("FLASHJIT_CUDA_TRACE", "1", 1);
    const std::vector<KernelSpec> traced = backward_kernels(traits, true, mode);
    ASSERT_EQ(traced.size(), 3u);
    const KernelSpec& dkdv = dkdv_kernel(traced);
    EXPECT_TRUE(dkdv.trace) << dkdv.name();
    EXPECT_EQ(dkdv.takes_whole_steps(), 2) << dkdv.name();
    EXPECT_NE(dkdv.name(), dkdv_kernel(plain).name());
    EXPECT_FALSE(dkdv_kernel(plain).trace);
    EXPECT_FALSE(traced.back().trace) << traced.back().name();  // the dQ convert kernel
    ASSERT_NO_THROW(kernel_binary(dkdv, false)) << dkdv.name();
    setenv("FLASHJIT_CUDA_ONE_PASS_STEPS", "whole", 1);  // in turns: no trace
    EXPECT_FALSE(dkdv_kernel(backward_kernels(traits, true, mode)).trace);
  }
}

// The built-in table of a device model (tuned_sm90_h100.txt: the N 1k classes measured on an H100
// 80GB HBM3) comes before the arch's (tuned_sm90.txt, an H200's) on that model only; classes it
// does not name take the arch's; the device's own tuning file comes before both.
TEST_F(CudaCompile, BuiltInTableOfADeviceModelServesThatModel) {
  using namespace flashjit::cuda;
  const std::string h100 = "NVIDIA H100 80GB HBM3";
  KernelTraits traits = sm90_traits(FJ_BFLOAT16, 64);
  traits.window = true;  // causal bounds
  const std::string short_key = tuning_key(traits, 1024), long_key = tuning_key(traits, 16384);
  EXPECT_EQ(short_key, "bfloat16_qk64_v64_mask-none_window_keys-2k");
  const ForwardTiles model = tuned_forward_tiles(h100, 90, short_key);
  EXPECT_EQ(model.groups, 3);
  EXPECT_EQ(model.block_n, 128);
  EXPECT_EQ(model.producer_setup, 1);
  const ForwardTiles arch = tuned_forward_tiles("NVIDIA H200", 90, short_key);
  EXPECT_NE(arch.producer_setup, 1);  // the arch's table: the H200's choice
  EXPECT_EQ(tuned_forward_tiles("NVIDIA H100 PCIe", 90, short_key).producer_setup, arch.producer_setup);
  const ForwardTiles long_h100 = tuned_forward_tiles(h100, 90, long_key), long_arch = tuned_forward_tiles("", 90, long_key);
  EXPECT_EQ(long_h100.groups, long_arch.groups);  // a class the model's table leaves to the arch's
  EXPECT_EQ(long_h100.block_n, long_arch.block_n);
  const std::string described = describe_tuning(h100, 90);
  EXPECT_NE(described.find("built-in for this device model (measured on NVIDIA H100 80GB HBM3): 12 classes"),
            std::string::npos)
      << described;
  EXPECT_NE(described.find(short_key + " groups=3,n=128,setup=producer (built-in, " + h100 + ")"), std::string::npos)
      << described;
  save_tuning(h100, 90, short_key + " n=96 300\n");  // the device's own file first
  EXPECT_EQ(tuned_forward_tiles(h100, 90, short_key).block_n, 96);
  clear_tuning();
}

// Tuned choices: saved, read back and taken for their class; a file with a
// wrong checksum, or measured on another device, is ignored (not trusted);
// FLASHJIT_CUDA_TILES wins over a tuned choice.
TEST_F(CudaCompile, TunedChoicesAreUsedAndBadTuningFilesIgnored) {
  using namespace flashjit::cuda;
  // A class the built-in table (tuned_sm90.txt) leaves alone: the tuner measures no softcap kernels.
  KernelTraits traits = sm90_traits(FJ_BFLOAT16, 64);
  traits.softcap = true;
  const std::string key = tuning_key(traits, 16384);
  EXPECT_EQ(key, "bfloat16_qk64_v64_mask-none_softcap_keys-more");
  EXPECT_FALSE(tuned_forward_tiles("NVIDIA H200", 90, key).forced());  // nothing tuned yet
  const std::string path = save_tuning("NVIDIA H200", 90, key + " groups=3 464.1\n");
  const ForwardTiles tuned = tuned_forward_tiles("NVIDIA H200", 90, key);
  EXPECT_EQ(tuned.groups, 3);
  EXPECT_EQ(forward_kernel(traits, tuned).threads, 512);
  EXPECT_FALSE(tuned_forward_tiles("NVIDIA H200", 90, tuning_key(traits, 1024)).forced());  // another class
  EXPECT_FALSE(tuned_forward_tiles("NVIDIA H100", 90, key).forced());                       // another device
  setenv("FLASHJIT_CUDA_TILES", "groups=2", 1);
  EXPECT_EQ(forward_kernel(traits, tuned).threads, 384);
  unsetenv("FLASHJIT_CUDA_TILES");

  const std::string text = read_text(path);
  const auto rewrite = [&](const std::string& contents) {
    std::ofstream(path, std::ios::trunc) << contents;
    clear_tuning();
  };
  std::string corrupt = text;
  corrupt.replace(corrupt.find("groups=3"), 8, "groups=2");  // edited without a new checksum
  rewrite(corrupt);
  EXPECT_FALSE(tuned_forward_tiles("NVIDIA H200", 90, key).forced());
  EXPECT_NE(describe_tuning("NVIDIA H200", 90).find("ignored: its checksum does not match"), std::string::npos)
      << describe_tuning("NVIDIA H200", 90);
  // Another device's file under this device's name, with a valid checksum of its own.
  const std::string foreign = save_tuning("NVIDIA H100 80GB HBM3", 90, key + " groups=3 400\n");
  rewrite(read_text(foreign));
  EXPECT_FALSE(tuned_forward_tiles("NVIDIA H200", 90, key).forced());
  EXPECT_NE(describe_tuning("NVIDIA H200", 90).find("measured on NVIDIA H100 80GB HBM3"), std::string::npos);
  rewrite("not a tuning file\n");
  EXPECT_NE(describe_tuning("NVIDIA H200", 90).find("not a flashjit tuning file"), std::string::npos);
  // A configuration that does not parse is refused when saving.
  EXPECT_THROW(save_tuning("NVIDIA H200", 90, key + " n=100 1\n"), std::exception);
  // A file that does not say which device, arch and version it is for is ignored.
  std::string unnamed = "flashjit tuning 1\nentry " + key + " groups=3 1\n";
  rewrite(unnamed + "checksum " + checksum_of(unnamed) + "\n");
  EXPECT_NE(describe_tuning("NVIDIA H200", 90).find("does not name its device"), std::string::npos)
      << describe_tuning("NVIDIA H200", 90);
  // Saving merges: classes measured before and not now stay; "built-in" drops one.
  std::remove(path.c_str());
  clear_tuning();
  const std::string short_key = tuning_key(traits, 1024);
  save_tuning("NVIDIA H200", 90, key + " groups=3 464\n" + short_key + " n=96 300\n");
  save_tuning("NVIDIA H200", 90, short_key + " built-in 310\n");
  EXPECT_EQ(tuned_forward_tiles("NVIDIA H200", 90, key).groups, 3);
  EXPECT_FALSE(tuned_forward_tiles("NVIDIA H200", 90, short_key).forced());
  clear_tuning();
}

// The backward's pass, tuned per class ("bwd_" keys: one-pass or split) beside the forward's
// tiles in the same file; FLASHJIT_CUDA_BACKWARD wins; a bad value is refused when saving.
TEST_F(CudaCompile, TunedBackwardPassIsUsedAndForcedBySetting) {
  using namespace flashjit::cuda;
  unsetenv("FLASHJIT_CUDA_BACKWARD");
  KernelTraits traits = sm90_traits(FJ_BFLOAT16, 128);
  traits.softcap = true;  // a class the built-in table leaves alone
  const std::string key = backward_tuning_key(traits, 4096);
  EXPECT_EQ(key, "bwd_" + tuning_key(traits, 4096));
  EXPECT_EQ(tuned_one_pass("NVIDIA H200", 90, key), -1);
  EXPECT_FALSE(one_pass_backward_chosen(traits, 4096, "NVIDIA H200"));  // untuned: split
  const std::string forward_key = tuning_key(traits, 4096);
  save_tuning("NVIDIA H200", 90, key + " one-pass 401.5\n" + forward_key + " n=96 600\n");
  EXPECT_EQ(tuned_one_pass("NVIDIA H200", 90, key), 1);
  EXPECT_EQ(tuned_forward_tiles("NVIDIA H200", 90, forward_key).block_n, 96);  // the forward's class apart
  EXPECT_TRUE(one_pass_backward_chosen(traits, 4096, "NVIDIA H200"));
  EXPECT_FALSE(one_pass_backward_chosen(traits, 1024, "NVIDIA H200"));  // another class
  EXPECT_FALSE(one_pass_backward_chosen(traits, 4096, "NVIDIA H100"));  // another device
  KernelTraits ampere = traits;
  ampere.arch = 80;
  EXPECT_FALSE(one_pass_backward_chosen(ampere, 4096, "NVIDIA H200"));  // no sm_90a kernels
  setenv("FLASHJIT_CUDA_BACKWARD", "split", 1);
  EXPECT_FALSE(one_pass_backward_chosen(traits, 4096, "NVIDIA H200"));
  unsetenv("FLASHJIT_CUDA_BACKWARD");
  save_tuning("NVIDIA H200", 90, key + " split 390\n");
  EXPECT_EQ(tuned_one_pass("NVIDIA H200", 90, key), 0);
  EXPECT_NE(describe_tuning("NVIDIA H200", 90).find(key + " split"), std::string::npos)
      << describe_tuning("NVIDIA H200", 90);
  // The diagonal order: a one pass whose dK/dV kernel takes writer-diagonal's sums, unless
  // FLASHJIT_CUDA_ONE_PASS_DQ says otherwise; FLASHJIT_CUDA_BACKWARD=one-pass forces the plain one.
  save_tuning("NVIDIA H200", 90, key + " one-pass-diagonal 420\n");
  EXPECT_EQ(tuned_one_pass("NVIDIA H200", 90, key), kOnePassDiagonal);
  EXPECT_EQ(backward_pass_chosen(traits, 4096, "NVIDIA H200"), kOnePassDiagonal);
  EXPECT_TRUE(one_pass_backward_chosen(traits, 4096, "NVIDIA H200"));
  unsetenv("FLASHJIT_CUDA_ONE_PASS_DQ");
  EXPECT_EQ(backward_dq_mode(kOnePassDiagonal), 11);
  EXPECT_EQ(backward_dq_mode(kOnePass), -1);
  EXPECT_EQ(dkdv_kernel(backward_kernels(traits, true, backward_dq_mode(kOnePassDiagonal))).dq_diagnostic, 11);
  setenv("FLASHJIT_CUDA_ONE_PASS_DQ", "writer", 1);
  EXPECT_EQ(backward_dq_mode(kOnePassDiagonal), -1);
  unsetenv("FLASHJIT_CUDA_ONE_PASS_DQ");
  setenv("FLASHJIT_CUDA_BACKWARD", "one-pass", 1);
  EXPECT_EQ(backward_pass_chosen(traits, 4096, "NVIDIA H200"), kOnePass);
  unsetenv("FLASHJIT_CUDA_BACKWARD");
  try {
    save_tuning("NVIDIA H200", 90, key + " n=96 1\n");
    ADD_FAILURE() << "a backward class took tiles";
  } catch (const flashjit::Error& error) {
    EXPECT_NE(std::string(error.what()).find("one-pass, one-pass-diagonal or split"), std::string::npos)
        << error.what();
  }
  EXPECT_THROW(save_tuning("NVIDIA H200", 90, forward_key + " one-pass 1\n"), std::exception);  // not tiles
  clear_tuning();
}

// FLASHJIT_CUDA_TILES: every key parsed, bad values named in the error.
TEST(ForwardTiles, ParsesKeysAndRejectsBadValues) {
  using flashjit::cuda::parse_forward_tiles;
  const flashjit::cuda::ForwardTiles tiles = parse_forward_tiles("n=176,stages=3,q=1,o=direct,groups=2");
  EXPECT_EQ(tiles.block_n, 176);
  EXPECT_EQ(tiles.stages, 3);
  EXPECT_EQ(tiles.q_buffers, 1);
  EXPECT_EQ(tiles.o_tma, 0);
  EXPECT_EQ(tiles.groups, 2);
  EXPECT_FALSE(parse_forward_tiles("").forced());
  EXPECT_FALSE(parse_forward_tiles(nullptr).forced());
  EXPECT_TRUE(parse_forward_tiles("o=tma").forced());
  EXPECT_EQ(parse_forward_tiles("counter=memset").stream_counter, 0);
  EXPECT_EQ(parse_forward_tiles("counter=stream").stream_counter, 1);
  // Launch choices leave the kernel (the tuned tiles) as it is.
  EXPECT_FALSE(parse_forward_tiles("counter=stream").forced());
  EXPECT_EQ(parse_forward_tiles("sched=static").static_tiles, 1);
  EXPECT_EQ(parse_forward_tiles("sched=counter").static_tiles, 0);
  EXPECT_EQ(parse_forward_tiles("").static_tiles, -1);
  EXPECT_FALSE(parse_forward_tiles("sched=static,counter=memset").forced());
  EXPECT_TRUE(parse_forward_tiles("sched=static,n=128").forced());
  EXPECT_EQ(parse_forward_tiles("chain=tiles").chain_tiles, 1);
  EXPECT_EQ(parse_forward_tiles("chain=none").chain_tiles, 0);
  EXPECT_FALSE(parse_forward_tiles("chain=tiles").forced());  // on top of the tiles in force
  EXPECT_EQ(parse_forward_tiles("edges=general").edge_general, 1);
  EXPECT_EQ(parse_forward_tiles("edges=right").edge_general, 0);
  EXPECT_EQ(parse_forward_tiles("span=block").block_span, 1);
  EXPECT_EQ(parse_forward_tiles("span=own").block_span, 0);
  EXPECT_EQ(parse_forward_tiles("next=late").early_next, 0);
  EXPECT_EQ(parse_forward_tiles("next=early").early_next, 1);
  EXPECT_FALSE(parse_forward_tiles("next=early").forced());  // on the tiles in force
  EXPECT_TRUE(parse_forward_tiles("span=own").forced());
  for (const char* bad : {"n=100", "n=0", "n=272", "n=12x", "stages=0", "q=3", "o=smem", "groups=4", "tiles=2", "n",
                          "counter=zero", "poly=9", "exps=5", "wait=sleep", "turn=s", "edges=left", "span=rows", "sched=dynamic", "chain=yes",
                          "next=soon"}) {
    try {
      parse_forward_tiles(bad);
      ADD_FAILURE() << bad << " was accepted";
    } catch (const std::exception& error) {
      const std::string item = std::string(bad);
      EXPECT_NE(std::string(error.what()).find("FLASHJIT_CUDA_TILES"), std::string::npos) << error.what();
      EXPECT_NE(std::string(error.what()).find(item), std::string::npos) << error.what();
    }
  }
}

// A forced configuration that cannot run says so instead of falling back silently.
TEST(ForwardTiles, ForcedConfigurationThatDoesNotFitIsAnError) {
  using namespace flashjit::cuda;
  const KernelTraits traits = sm90_traits(FJ_BFLOAT16, 256);
  setenv("FLASHJIT_CUDA_TILES", "n=128,q=2", 1);
  EXPECT_THROW(forward_kernel(traits), std::exception);
  setenv("FLASHJIT_CUDA_TILES", "groups=3", 1);
  EXPECT_THROW(forward_kernel(traits), std::exception);  // head dim 256
  unsetenv("FLASHJIT_CUDA_TILES");
  EXPECT_NO_THROW(forward_kernel(traits));
}

// The split forward (decoding: keys split over blocks) and its combine kernel,
// for each half type, with and without the extras a split allows; none with dropout.
TEST_F(CudaCompile, SplitForwardAndCombineCompileForSm80AndSm90) {
  REQUIRE_NVRTC();
  using namespace flashjit::cuda;
  int compiled = 0;
  for (int arch : {80, 90}) {
    for (fj_dtype dtype : {FJ_FLOAT16, FJ_BFLOAT16}) {
      for (int head_dim : {64, 128, 256}) {
        for (int extras : {0, 1}) {
          KernelTraits traits;
          traits.dtype = dtype;
          traits.head_dim_qk = head_dim;
          traits.head_dim_v = extras ? head_dim / 2 : head_dim;
          traits.mask = extras ? flashjit::MaskKind::kBool : flashjit::MaskKind::kNone;
          traits.window = extras;
          traits.softcap = extras;
          traits.arch = arch;
          const KernelSpec split = split_forward_kernel(traits);
          ASSERT_TRUE(split.split) << split.name();
          EXPECT_EQ(split.family, KernelFamily::kMma);
          EXPECT_NE(split.name().find("_split"), std::string::npos);
          ASSERT_NO_THROW(kernel_binary(split, false)) << split.name();
          ++compiled;
          traits.dropout = true;
          EXPECT_FALSE(split_forward_kernel(traits).split);
        }
      }
      KernelTraits traits;
      traits.dtype = dtype;
      traits.arch = arch;
      ASSERT_NO_THROW(kernel_binary(combine_kernel(traits), false));
      ++compiled;
    }
  }
  EXPECT_EQ(stats().compiles, compiled);
  KernelTraits float32;
  float32.dtype = FJ_FLOAT32;
  float32.arch = 90;
  EXPECT_FALSE(split_forward_kernel(float32).split);
}

// The sm_90a forward as a split forward (decoding on sm_90): at each head dim, plain and with
// the extras, for both half types and the three-warpgroup D64 variant; none with dropout.
TEST_F(CudaCompile, HopperSplitForwardCompilesForSm90) {
  REQUIRE_NVRTC();
  using namespace flashjit::cuda;
  int compiled = 0;
  for (int head_dim : {64, 128, 256}) {
    for (int extras : {0, 1}) {
      KernelTraits traits;
      traits.dtype = extras ? FJ_FLOAT16 : FJ_BFLOAT16;
      traits.head_dim_qk = traits.head_dim_v = head_dim;
      traits.mask = extras ? flashjit::MaskKind::kBool : flashjit::MaskKind::kNone;
      traits.window = extras;
      traits.softcap = extras;
      traits.arch = 90;
      ForwardTiles tuned;
      if (head_dim == 64 && !extras) tuned.groups = 3;
      const KernelSpec forward = forward_kernel(traits, tuned);
      ASSERT_EQ(forward.family, KernelFamily::kHopper) << forward.name();
      const KernelSpec split = hopper_split_kernel(forward);
      ASSERT_TRUE(split.split) << split.name();
      EXPECT_FALSE(split.o_tma);
      EXPECT_NE(split.name().find("_split"), std::string::npos);
      ASSERT_NO_THROW(kernel_binary(split, false)) << split.name();
      ++compiled;
      if (!extras) {  // over a KV cache (FLASHJIT_CUDA_KV_HOPPER), in place and in pages: no mask there
        const KernelSpec in_place = hopper_kv_cache_kernel(forward, 0);
        const KernelSpec paged = hopper_kv_cache_kernel(forward, 16);
        ASSERT_TRUE(in_place.split) << in_place.name();
        ASSERT_TRUE(paged.split) << paged.name();
        EXPECT_NE(in_place.name().find("_kvcache"), std::string::npos);
        EXPECT_EQ(in_place.block_n, forward.block_n);
        // Pages of 16 keys: the forward's key step kept, a TMA box a page.
        EXPECT_EQ(paged.block_n, forward.block_n);
        EXPECT_EQ(paged.page_boxes, forward.block_n / 16);
        EXPECT_NE(paged.name().find("_pb"), std::string::npos);
        EXPECT_EQ(paged.stages, forward.stages);
        EXPECT_LE(paged.shared_memory_bytes(), forward.shared_memory_bytes()) << paged.name();
        EXPECT_EQ(hopper_kv_cache_kernel(forward, forward.block_n).page_boxes, 1);
        EXPECT_EQ(hopper_kv_cache_kernel(forward, 16 * forward.block_n).block_n, forward.block_n);
        EXPECT_FALSE(hopper_kv_cache_kernel(forward, 40).split);  // no whole tiles in a page
        EXPECT_FALSE(hopper_kv_cache_kernel(forward, forward.block_n + 16).split);
        for (const KernelSpec& cache : {in_place, paged}) {
          ASSERT_NO_THROW(kernel_binary(cache, false)) << cache.name();
          ++compiled;
        }
      }
      traits.dropout = true;
      EXPECT_FALSE(hopper_split_kernel(forward_kernel(traits)).split);
    }
  }
  EXPECT_EQ(stats().compiles, compiled);
  KernelTraits traits;
  traits.arch = 80;
  traits.dtype = FJ_BFLOAT16;
  traits.head_dim_qk = traits.head_dim_v = 128;
  EXPECT_FALSE(hopper_split_kernel(forward_kernel(traits)).split);  // a kMma forward
}

// The KV-cache forward (FJ_KV_CACHE: each batch entry's own key count, and 2: its keys
// through a page table), split and not, with and without the extras, for sm_80 and sm_90.
TEST_F(CudaCompile, KvCacheForwardCompilesForSm80AndSm90) {
  REQUIRE_NVRTC();
  using namespace flashjit::cuda;
  int compiled = 0;
  for (int arch : {80, 90}) {
    for (int head_dim : {64, 128}) {
      for (int extras : {0, 1}) {
        for (int kv_cache : {1, 2}) {
          for (bool split : {true, false}) {
            KernelTraits traits;
            traits.dtype = extras ? FJ_FLOAT16 : FJ_BFLOAT16;
            traits.head_dim_qk = traits.head_dim_v = head_dim;
            traits.window = extras;
            traits.softcap = extras;
            traits.aligned = !(extras && kv_cache == 2);  // the element-wise loads too
            traits.arch = arch;
            KernelSpec spec = split_forward_kernel(traits);
            ASSERT_TRUE(spec.split) << spec.name();
            spec.split = split;
            spec.kv_cache = kv_cache;
            EXPECT_NE(spec.name().find(kv_cache == 1 ? "_kvcache" : "_paged"), std::string::npos);
            ASSERT_NO_THROW(kernel_binary(spec, false)) << spec.name();
            ++compiled;
          }
        }
      }
    }
  }
  EXPECT_EQ(stats().compiles, compiled);
}

// Blocks of one warp for decoding (up to 16 query rows): the split forward, plain and over a
// KV cache, compiles at each head dim; more rows keep the four-warp blocks. The switch
// FLASHJIT_CUDA_DECODE_WARPS reads 1, 4 or unset (0: the backend chooses); any other value
// is an error naming the variable.
TEST_F(CudaCompile, OneWarpDecodeBlocksCompile) {
  REQUIRE_NVRTC();
  using namespace flashjit::cuda;
  int compiled = 0;
  for (int arch : {80, 90}) {
    for (int head_dim : {64, 128, 256}) {
      for (int kv_cache : {0, 2}) {
        KernelTraits traits;
        traits.dtype = FJ_BFLOAT16;
        traits.head_dim_qk = traits.head_dim_v = head_dim;
        traits.arch = arch;
        KernelSpec spec = split_forward_kernel(traits, 16, true);
        ASSERT_TRUE(spec.split) << spec.name();
        EXPECT_EQ(spec.threads, 32);
        EXPECT_EQ(spec.block_rows(), 16);
        spec.kv_cache = kv_cache;
        ASSERT_NO_THROW(kernel_binary(spec, false)) << spec.name();
        ++compiled;
        EXPECT_EQ(split_forward_kernel(traits, 17, true).threads, 128);
        EXPECT_EQ(split_forward_kernel(traits, 16, false).threads, 128);
      }
    }
  }
  EXPECT_EQ(stats().compiles, compiled);
  unsetenv("FLASHJIT_CUDA_DECODE_WARPS");
  EXPECT_EQ(settings::decode_warps(), 0);
  for (const char* value : {"1", "4"}) {
    setenv("FLASHJIT_CUDA_DECODE_WARPS", value, 1);
    EXPECT_EQ(settings::decode_warps(), std::atoi(value));
  }
  setenv("FLASHJIT_CUDA_DECODE_WARPS", "3", 1);
  try {
    settings::decode_warps();
    ADD_FAILURE() << "FLASHJIT_CUDA_DECODE_WARPS=3 was taken";
  } catch (const std::exception& error) {
    EXPECT_NE(std::string(error.what()).find("FLASHJIT_CUDA_DECODE_WARPS"), std::string::npos) << error.what();
  }
  unsetenv("FLASHJIT_CUDA_DECODE_WARPS");
}

// Kernel selection alone (no NVRTC): every kernel chosen for a problem fits the
// opt-in shared memory of the arch it is for, so no launch fails on sm_86/89
// (99 KB) where the H100's choice (227 KB) would not fit.
TEST(KernelSelection, SharedMemoryFitsEveryArch) {
  using namespace flashjit::cuda;
  EXPECT_EQ(max_shared_memory_bytes(80), 163 * 1024);
  EXPECT_EQ(max_shared_memory_bytes(86), 99 * 1024);
  EXPECT_EQ(max_shared_memory_bytes(90), 227 * 1024);
  int checked = 0;
  for (int arch : {80, 86, 89, 90}) {
    for (fj_dtype dtype : {FJ_FLOAT16, FJ_BFLOAT16, FJ_FLOAT32, FJ_FLOAT64}) {
      for (int head_dim : {1, 40, 64, 72, 128, 200, 256}) {
        for (int extras : {0, 1}) {
          KernelTraits traits;
          traits.dtype = dtype;
          traits.head_dim_qk = head_dim;
          traits.head_dim_v = extras ? std::max(1, head_dim / 2) : head_dim;
          traits.mask = extras ? flashjit::MaskKind::kAdditive : flashjit::MaskKind::kNone;
          traits.mask_dtype = FJ_FLOAT32;
          traits.window = extras;
          traits.dropout = extras;
          traits.softcap = extras;
          traits.arch = arch;
          std::vector<KernelSpec> specs = backward_kernels(traits);
          specs.push_back(forward_kernel(traits));
          for (const KernelSpec& spec : specs) {
            EXPECT_LE(spec.shared_memory_bytes(), max_shared_memory_bytes(arch)) << spec.name();
            EXPECT_GE(spec.block_n, 8) << spec.name();
            ++checked;
          }
        }
      }
    }
  }
  EXPECT_GT(checked, 400);
}

// Loaded functions are found by a spec's fields (KernelSpec::fields, on every call) where the
// kernel cache names a spec by name(): specs of different names must have different fields, or
// a call would be handed another kernel. Checked over the specs the choosers make for a grid of
// traits and forced tiles, each also with every field changed on its own (a field left out of
// fields() then shows as a changed name with the same fields); and equal fields, equal names.
TEST(KernelSelection, SpecFieldsTellApartWhatNamesDo) {
  using namespace flashjit::cuda;
  using flashjit::MaskKind;
  std::map<KernelSpec::Fields, std::string> name_of;
  size_t specs = 0, changes = 0;
  const auto add = [&](const KernelSpec& spec) {
    const std::string name = spec.name();
    const auto by_fields = name_of.emplace(spec.fields(), name).first;
    EXPECT_EQ(by_fields->second, name) << "equal fields, different names";
    ++specs;
  };
  // Each field of KernelSpec, changed to another value than it has.
  const std::vector<void (*)(KernelSpec&)> change_one = {
      [](KernelSpec& s) { s.entry = s.entry == KernelEntry::kForward ? KernelEntry::kBackwardDq : KernelEntry::kForward; },
      [](KernelSpec& s) { s.family = s.family == KernelFamily::kHopper ? KernelFamily::kMma : KernelFamily::kHopper; },
      [](KernelSpec& s) { s.dtype = s.dtype == FJ_FLOAT16 ? FJ_BFLOAT16 : FJ_FLOAT16; },
      [](KernelSpec& s) { s.head_dim_qk += 64; },
      [](KernelSpec& s) { s.head_dim_v += 64; },
      [](KernelSpec& s) { s.mask = s.mask == MaskKind::kBool ? MaskKind::kNone : MaskKind::kBool; },
      [](KernelSpec& s) {
        s.mask = MaskKind::kAdditive;  // a mask dtype is spelled where the mask is additive
        s.mask_dtype = FJ_FLOAT32;
      },
      [](KernelSpec& s) { s.window = !s.window; },
      [](KernelSpec& s) { s.dropout = !s.dropout; },
      [](KernelSpec& s) { s.softcap = !s.softcap; },
      [](KernelSpec& s) { s.aligned = !s.aligned; },
      [](KernelSpec& s) { s.split = !s.split; },
      [](KernelSpec& s) { s.varlen = !s.varlen; },
      [](KernelSpec& s) { s.kv_cache = (s.kv_cache + 1) % 3; },
      [](KernelSpec& s) { s.edge_general = !s.edge_general; },
      [](KernelSpec& s) { s.block_span = !s.block_span; },
      [](KernelSpec& s) {  // chain_tiles where it applies
        s.family = KernelFamily::kHopper, s.entry = KernelEntry::kForward, s.o_tma = true, s.q_buffers = 2;
        s.split = s.varlen = false, s.kv_cache = 0;
        s.chain_tiles = !s.chain_tiles;
      },
      [](KernelSpec& s) {  // early_next where it applies
        s.family = KernelFamily::kHopper, s.entry = KernelEntry::kForward, s.q_buffers = 2;
        s.split = s.varlen = s.chain_tiles = false, s.kv_cache = 0;
        s.early_next = !s.early_next;
      },
      [](KernelSpec& s) { s.trace = !s.trace; },
      [](KernelSpec& s) {  // producer_setup where it applies
        s.family = KernelFamily::kHopper, s.entry = KernelEntry::kForward;
        s.producer_setup = !s.producer_setup;
      },
      [](KernelSpec& s) {  // producer_suspend where it applies
        s.family = KernelFamily::kHopper, s.entry = KernelEntry::kForward;
        s.producer_suspend = !s.producer_suspend;
      },
      [](KernelSpec& s) {  // exp_poly where it applies
        s.family = KernelFamily::kHopper, s.entry = KernelEntry::kForward;
        s.exp_poly = s.exp_poly == 0 ? 4 : 0;
      },
      [](KernelSpec& s) {  // whole_steps where it applies
        s.family = KernelFamily::kHopper, s.entry = KernelEntry::kBackwardDkDv, s.one_pass = true;
        s.whole_steps = !s.whole_steps;
      },
      [](KernelSpec& s) {  // dq_slots where it applies
        s.family = KernelFamily::kHopper, s.entry = KernelEntry::kBackwardDkDv, s.one_pass = true;
        s.dq_diagnostic = 10;
        s.dq_slots = 3 - s.dq_slots;
      },
      [](KernelSpec& s) {  // dkdv_parts where it applies
        s.family = KernelFamily::kHopper, s.entry = KernelEntry::kBackwardDkDv, s.threads = 384;
        s.one_pass = s.varlen = false, s.dkdv_part = DkDvPart::kBoth;
        s.dkdv_parts = !s.dkdv_parts;
      },
      [](KernelSpec& s) {  // backward_overlap where it applies
        s.family = KernelFamily::kHopper, s.entry = KernelEntry::kBackwardDq;
        s.one_pass = s.varlen = false, s.dkdv_part = DkDvPart::kBoth;
        s.backward_overlap = !s.backward_overlap;
      },
      [](KernelSpec& s) { s.dq_diagnostic = (s.dq_diagnostic + 1) % 9; },
      [](KernelSpec& s) { s.page_boxes = s.page_boxes == 1 ? 2 : 1; },
      [](KernelSpec& s) { s.threads += 128; },
      [](KernelSpec& s) {  // row tiles are spelled outside the scalar kernels
        if (s.family == KernelFamily::kSimt) s.family = KernelFamily::kMma;
        s.row_tiles += 1;
      },
      [](KernelSpec& s) { s.dkdv_part = s.dkdv_part == DkDvPart::kBoth ? DkDvPart::kDvOnly : DkDvPart::kBoth; },
      [](KernelSpec& s) { s.one_pass = !s.one_pass; },
      [](KernelSpec& s) { s.dkdv_shared = !s.dkdv_shared; },
      [](KernelSpec& s) {  // stages are spelled for the sm_90a kernels
        s.family = KernelFamily::kHopper;
        s.stages += 1;
      },
      [](KernelSpec& s) { s.q_buffers = s.q_buffers == 1 ? 2 : 1; },
      [](KernelSpec& s) { s.o_tma = !s.o_tma; },
      [](KernelSpec& s) { s.fold_scale = !s.fold_scale; },
      [](KernelSpec& s) { s.lazy_rescale = !s.lazy_rescale; },
      [](KernelSpec& s) { s.block_n += 16; },
      [](KernelSpec& s) { s.arch = s.arch == 90 ? 80 : 90; },
  };
  EXPECT_EQ(change_one.size(), KernelSpec::kFieldCount);  // a new field needs a change here too
  const auto add_variants = [&](const KernelSpec& spec) {
    add(spec);
    for (const auto& change : change_one) {
      KernelSpec changed = spec;
      change(changed);
      add(changed);
      if (changed.name() != spec.name()) {
        EXPECT_TRUE(changed.fields() != spec.fields()) << spec.name() << " and " << changed.name() << ": same fields";
        ++changes;
      }
    }
  };
  const char* tiles[] = {"", "n=64", "groups=3", "o=direct", "q=1,o=direct", "stages=3", "softmax=plain",
                         "edges=general", "span=block", "chain=tiles", "n=176,chain=tiles", "next=early",
                         "setup=producer"};
  for (const char* forced : tiles) {
    if (*forced) {
      setenv("FLASHJIT_CUDA_TILES", forced, 1);
    } else {
      unsetenv("FLASHJIT_CUDA_TILES");
    }
    for (int arch : {80, 90}) {
      for (fj_dtype dtype : {FJ_FLOAT16, FJ_BFLOAT16, FJ_FLOAT32}) {
        for (int head_dim : {40, 64, 128, 256}) {
          for (int extras = 0; extras < 4; ++extras) {
            KernelTraits traits;
            traits.dtype = dtype;
            traits.head_dim_qk = head_dim;
            traits.head_dim_v = extras == 3 ? head_dim / 2 : head_dim;
            traits.mask = extras == 1   ? flashjit::MaskKind::kBool
                          : extras == 2 ? flashjit::MaskKind::kAdditive
                                        : flashjit::MaskKind::kNone;
            traits.mask_dtype = extras == 2 ? dtype : FJ_BOOL;
            traits.window = extras >= 1;
            traits.dropout = extras == 2;
            traits.softcap = extras == 3;
            traits.aligned = extras != 1 || head_dim != 40;
            traits.arch = arch;
            KernelSpec forward;
            try {
              forward = forward_kernel(traits);
            } catch (const flashjit::Error&) {
              continue;  // forced tiles that do not fit this head dim
            }
            add_variants(forward);
            add_variants(hopper_split_kernel(forward));
            add_variants(hopper_kv_cache_kernel(forward, 0));
            add_variants(hopper_kv_cache_kernel(forward, 64));
            add_variants(split_forward_kernel(traits));
            add_variants(split_forward_kernel(traits, 8, true));
            add_variants(combine_kernel(traits));
            add_variants(varlen_table_kernel(traits));
            for (bool one_pass : {false, true}) {
              for (const KernelSpec& spec : backward_kernels(traits, one_pass)) add_variants(spec);
            }
          }
        }
      }
    }
  }
  unsetenv("FLASHJIT_CUDA_TILES");
  EXPECT_GT(specs, 10000u);
  EXPECT_GT(name_of.size(), 1000u);  // distinct specs
  EXPECT_GT(changes, 10000u);        // single-field changes that changed the name
}

// The sm_90a forward is for sm_90, half types, head dims 33-256 and operands TMA can address.
TEST(KernelSelection, HopperForwardOnlyWhereItIsMeant) {
  using namespace flashjit::cuda;
  const auto forward = [](fj_dtype dtype, int head_dim_qk, int head_dim_v, int arch, bool tma = true) {
    KernelTraits traits;
    traits.dtype = dtype;
    traits.head_dim_qk = head_dim_qk;
    traits.head_dim_v = head_dim_v;
    traits.arch = arch;
    traits.tma = tma;
    return forward_kernel(traits);
  };
  const auto is_hopper = [](const KernelSpec& spec) { return spec.family == KernelFamily::kHopper; };
  const KernelSpec chosen = forward(FJ_BFLOAT16, 64, 64, 90);
  EXPECT_TRUE(is_hopper(chosen));
  EXPECT_EQ(chosen.block_rows(), 128);
  EXPECT_EQ(chosen.threads, 384);
  EXPECT_NE(chosen.compile_options()[0].find("sm_90a"), std::string::npos);
  for (int head_dim : {40, 128, 200, 256})
    EXPECT_TRUE(is_hopper(forward(FJ_FLOAT16, head_dim, 64, 90))) << head_dim;
  EXPECT_EQ(forward(FJ_FLOAT16, 72, 72, 90).head_dim_qk, 128);
  EXPECT_FALSE(is_hopper(forward(FJ_BFLOAT16, 64, 64, 80)));
  EXPECT_FALSE(is_hopper(forward(FJ_BFLOAT16, 64, 64, 90, false)));
  EXPECT_FALSE(is_hopper(forward(FJ_BFLOAT16, 32, 32, 90)));
  EXPECT_FALSE(is_hopper(forward(FJ_FLOAT32, 64, 64, 90)));
  EXPECT_EQ(forward(FJ_BFLOAT16, 64, 64, 80).compile_options()[0], "--gpu-architecture=sm_80");
}

// A config of one kernel: softcap, a class the built-in tuning table (whose
// choices precompile also compiles) does not name.
fj_kernel_config one_kernel_config(fj_dtype dtype, int head_dim, int arch) {
  fj_kernel_config c = config(dtype, head_dim, arch);
  c.softcap = 1;
  return c;
}

TEST_F(CudaCompile, SecondRequestIsAMemoryHitThenADiskLoadAfterClearing) {
  REQUIRE_NVRTC();
  const fj_kernel_config c = one_kernel_config(FJ_BFLOAT16, 64, 90);
  const fj_cuda_cache_stats start = stats();
  ASSERT_EQ(fj_cuda_precompile(&c, 1), FJ_SUCCESS) << fj_last_error();
  const fj_cuda_cache_stats compiled = stats();
  EXPECT_EQ(compiled.compiles, start.compiles + 1);
  EXPECT_GT(compiled.last_compile_seconds, 0.0);

  ASSERT_EQ(fj_cuda_precompile(&c, 1), FJ_SUCCESS);
  EXPECT_EQ(stats().compiles, compiled.compiles);
  EXPECT_EQ(stats().memory_hits, compiled.memory_hits + 1);

  ASSERT_EQ(fj_cuda_clear_memory_cache(), FJ_SUCCESS);
  ASSERT_EQ(fj_cuda_precompile(&c, 1), FJ_SUCCESS);
  EXPECT_EQ(stats().compiles, compiled.compiles);
  EXPECT_EQ(stats().disk_loads, compiled.disk_loads + 1);
}

TEST_F(CudaCompile, CorruptOrTruncatedEntriesAreRecompiled) {
  REQUIRE_NVRTC();
  const fj_kernel_config c = config(FJ_FLOAT16, 64, 80);
  ASSERT_EQ(fj_cuda_precompile(&c, 1), FJ_SUCCESS) << fj_last_error();
  ASSERT_EQ(cubins().size(), 1u);
  const fs::path cubin = cubins()[0];
  const auto size = fs::file_size(cubin);

  for (const char* damage : {"flip", "truncate"}) {
    if (std::string(damage) == "flip") {
      std::fstream file(cubin, std::ios::in | std::ios::out | std::ios::binary);
      file.seekp(std::streamoff(size / 2));
      file.put('\x5a');
    } else {
      fs::resize_file(cubin, size / 3);
    }
    const int64_t compiles = stats().compiles;
    ASSERT_EQ(fj_cuda_clear_memory_cache(), FJ_SUCCESS);
    ASSERT_EQ(fj_cuda_precompile(&c, 1), FJ_SUCCESS) << damage << ": " << fj_last_error();
    EXPECT_EQ(stats().compiles, compiles + 1) << damage;
    EXPECT_EQ(fs::file_size(cubin), size) << damage;
  }
}

// A valid entry of another kernel put in an entry's place is not loaded as that
// kernel: each entry records its own key.
TEST_F(CudaCompile, AnotherKernelsEntryInPlaceIsRecompiled) {
  REQUIRE_NVRTC();
  const fj_kernel_config a = config(FJ_FLOAT16, 64, 80), b = config(FJ_FLOAT16, 128, 80);
  ASSERT_EQ(fj_cuda_precompile(&a, 1), FJ_SUCCESS) << fj_last_error();
  const fs::path entry_a = cubins()[0];
  ASSERT_EQ(fj_cuda_precompile(&b, 1), FJ_SUCCESS) << fj_last_error();
  fs::path entry_b;
  for (const fs::path& path : cubins())
    if (path != entry_a) entry_b = path;
  ASSERT_FALSE(entry_b.empty());
  fs::copy_file(entry_b, entry_a, fs::copy_options::overwrite_existing);
  const int64_t compiles = stats().compiles;
  ASSERT_EQ(fj_cuda_clear_memory_cache(), FJ_SUCCESS);
  ASSERT_EQ(fj_cuda_precompile(&a, 1), FJ_SUCCESS) << fj_last_error();
  EXPECT_EQ(stats().compiles, compiles + 1);  // a, compiled again
  ASSERT_EQ(fj_cuda_precompile(&b, 1), FJ_SUCCESS) << fj_last_error();
  EXPECT_EQ(stats().compiles, compiles + 1);  // b, loaded from its own entry
  EXPECT_NE(fs::file_size(entry_a), fs::file_size(entry_b));
}

// A cache directory that cannot be written still serves kernels: compiled in memory.
TEST_F(CudaCompile, UnwritableCacheDirectoryCompilesInMemory) {
  REQUIRE_NVRTC();
  const fs::path blocker = directory_ / "a-file";
  fs::create_directories(directory_);
  std::ofstream(blocker) << "not a directory";
  setenv("FLASHJIT_CACHE_DIR", (blocker / "cache").c_str(), 1);  // mkdir fails, even as root
  const fj_kernel_config c = config(FJ_FLOAT16, 64, 80);
  ASSERT_EQ(fj_cuda_precompile(&c, 1), FJ_SUCCESS) << fj_last_error();
  EXPECT_EQ(stats().compiles, 1);
  ASSERT_EQ(fj_cuda_precompile(&c, 1), FJ_SUCCESS) << fj_last_error();
  EXPECT_EQ(stats().compiles, 1);  // the memory cache serves it
  EXPECT_EQ(stats().memory_hits, 1);
}

TEST_F(CudaCompile, ConcurrentProcessesCompileAColdKeyOnce) {
  REQUIRE_NVRTC();
  constexpr int kProcesses = 4;
  int pipes[kProcesses][2];
  pid_t children[kProcesses];
  for (int i = 0; i < kProcesses; ++i) {
    ASSERT_EQ(pipe(pipes[i]), 0);
    children[i] = fork();
    ASSERT_GE(children[i], 0);
    if (children[i] == 0) {
      const fj_kernel_config c = one_kernel_config(FJ_BFLOAT16, 96, 90);
      const fj_status status = fj_cuda_precompile(&c, 1);
      fj_cuda_cache_stats s{};
      fj_cuda_get_cache_stats(&s);
      const int64_t result = status == FJ_SUCCESS ? s.compiles : -1;
      if (write(pipes[i][1], &result, sizeof result) != sizeof result) _exit(2);
      _exit(0);
    }
  }
  int64_t total_compiles = 0;
  for (int i = 0; i < kProcesses; ++i) {
    int64_t compiles = -1;
    ASSERT_EQ(read(pipes[i][0], &compiles, sizeof compiles), ssize_t(sizeof compiles));
    int status = 0;
    waitpid(children[i], &status, 0);
    ASSERT_GE(compiles, 0) << "process " << i << " failed";
    total_compiles += compiles;
  }
  EXPECT_EQ(total_compiles, 1);
  EXPECT_EQ(cubins().size(), 1u);
}

TEST_F(CudaCompile, BadConfigsNameTheField) {
  fj_kernel_config c = config(FJ_BFLOAT16, 300, 90);
  EXPECT_EQ(fj_cuda_precompile(&c, 1), FJ_ERROR_INVALID_VALUE);
  EXPECT_NE(std::string(fj_last_error()).find("configs[0].head_dim_qk"), std::string::npos)
      << fj_last_error();
  c = config(FJ_INT32, 64, 90);
  EXPECT_EQ(fj_cuda_precompile(&c, 1), FJ_ERROR_INVALID_TYPE);
  c = config(FJ_BFLOAT16, 64, 75);
  EXPECT_EQ(fj_cuda_precompile(&c, 1), FJ_ERROR_INVALID_VALUE);
  EXPECT_NE(std::string(fj_last_error()).find("arch"), std::string::npos) << fj_last_error();
  // A code outside the enum, stored as the C API's users might.
  c = config(FJ_BFLOAT16, 64, 90);
  const int32_t unknown = 99;
  std::memcpy(&c.dtype, &unknown, sizeof unknown);
  EXPECT_EQ(fj_cuda_precompile(&c, 1), FJ_ERROR_INVALID_TYPE);
  EXPECT_NE(std::string(fj_last_error()).find("configs[0].dtype"), std::string::npos) << fj_last_error();
  EXPECT_NE(std::string(fj_last_error()).find("got code 99"), std::string::npos) << fj_last_error();
  EXPECT_EQ(fj_cuda_precompile(&c, -1), FJ_ERROR_INVALID_VALUE);
  EXPECT_EQ(std::string(fj_last_error()), "[precompile] count: expected 0 or more configs, got -1");
  EXPECT_EQ(fj_cuda_precompile(nullptr, 2), FJ_ERROR_INVALID_VALUE);
  EXPECT_NE(std::string(fj_last_error()).find("null pointer"), std::string::npos) << fj_last_error();
}

TEST(CudaWithoutGpu, CallsSayNoGpuWasFound) {
  if (fj_cuda_device_count() > 0) GTEST_SKIP() << "a GPU is present";
  std::vector<float> data(2 * 8 * 16, 1.0f);
  fj_tensor t{};
  t.data = data.data();
  t.dtype = FJ_FLOAT32;
  t.device_type = FJ_DEVICE_CUDA;
  t.ndim = 4;
  const int64_t shape[4] = {1, 2, 8, 16}, strides[4] = {256, 128, 16, 1};
  for (int d = 0; d < 4; ++d) t.shape[d] = shape[d], t.strides[d] = strides[d];
  fj_tensor o = t, lse = t;
  std::vector<float> o_data(data.size()), lse_data(16);
  o.data = o_data.data();
  lse.data = lse_data.data();
  lse.ndim = 3;
  lse.strides[0] = 16, lse.strides[1] = 8, lse.strides[2] = 1;
  const fj_attention_options options = fj_attention_options_default();
  EXPECT_EQ(fj_attention_forward(&t, &t, &t, &options, &o, &lse), FJ_ERROR_UNSUPPORTED);
  const std::string message = fj_last_error();
  EXPECT_TRUE(message.find("no NVIDIA driver found") != std::string::npos ||
              message.find("no GPU found") != std::string::npos)
      << message;
}

}  // namespace
