#include "cuda/kernel_spec.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "core/dtype.hpp"
#include "core/error.hpp"
#include "cuda/embedded_sources.hpp"

namespace flashjit::cuda {
namespace {

constexpr int kSimtLanes = 8;  // threads per row in attention_simt.cuh
constexpr int kMaxSharedBytes = 64 * 1024;

int round_up(int value, int multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

const char* device_type_name(fj_dtype dtype) {
  switch (dtype) {
    case FJ_FLOAT32: return "float";
    case FJ_FLOAT16: return "half_t";
    case FJ_BFLOAT16: return "bf16_t";
    case FJ_FLOAT64: return "double";
    case FJ_BOOL: return "unsigned char";
    default: throw_type_error("[cuda] no device type for dtype ", dtype_name(dtype));
  }
}

int accumulator_size(fj_dtype dtype) {
  return dtype == FJ_FLOAT64 ? 8 : 4;
}

const char* entry_name(KernelEntry entry) {
  switch (entry) {
    case KernelEntry::kForward: return "forward";
    case KernelEntry::kBackwardDq: return "backward_dq";
    case KernelEntry::kBackwardDkDv: return "backward_dkdv";
  }
  return "?";
}

// Drops "#pragma once" lines: the program is one translation unit.
std::string without_pragma_once(const char* text) {
  std::string out;
  const char* line = text;
  while (*line != '\0') {
    const char* end = std::strchr(line, '\n');
    const size_t length = end ? size_t(end - line) : std::strlen(line);
    if (length < 12 || std::strncmp(line, "#pragma once", 12) != 0) out.append(line, length).push_back('\n');
    line += length + (end ? 1 : 0);
  }
  return out;
}

}  // namespace

std::string KernelSpec::name() const {
  std::string mask_text = "none";
  if (mask == MaskKind::kBool) mask_text = "bool";
  if (mask == MaskKind::kAdditive) mask_text = str_cat("add-", dtype_name(mask_dtype));
  return str_cat(family == KernelFamily::kMma ? "mma-" : "simt-", entry_name(entry), "_", dtype_name(dtype),
                 "_qk", head_dim_qk, "_v", head_dim_v, "_mask-", mask_text, window ? "_window" : "",
                 dropout ? "_dropout" : "", softcap ? "_softcap" : "", aligned ? "_aligned" : "", "_t",
                 threads, family == KernelFamily::kMma ? str_cat("_r", row_tiles) : std::string(),
                 dkdv_part == 1 ? "_dv-only" : (dkdv_part == 2 ? "_dk-only" : ""), wgmma ? "_wgmma" : "", "_n",
                 block_n, "_sm", arch);
}

const char* KernelSpec::function_name() const {
  switch (entry) {
    case KernelEntry::kForward: return "fj_attention_forward";
    case KernelEntry::kBackwardDq: return "fj_attention_backward_dq";
    case KernelEntry::kBackwardDkDv: return "fj_attention_backward_dkdv";
  }
  return "";
}

int KernelSpec::block_rows() const {
  return family == KernelFamily::kMma ? threads / 32 * 16 * row_tiles : threads / kSimtLanes;
}

int KernelSpec::shared_memory_bytes() const {
  if (family == KernelFamily::kMma) {
    const int pitch_qk = head_dim_qk + 8;  // 16-bit elements; rows padded by 16 bytes
    const int pitch_v = head_dim_v + 8;
    if (entry == KernelEntry::kForward && wgmma) {
      // Swizzled tiles, no padding, and 1024 bytes to align them.
      return 2 * ((block_rows() + block_n) * head_dim_qk + block_n * head_dim_v) + 1024;
    }
    if (entry == KernelEntry::kForward) return 2 * ((block_rows() + block_n) * pitch_qk + block_n * pitch_v);
    // Backward: the block's own rows of two operands, two buffers of the streamed
    // pair, and (dK/dV) two buffers of float LSE and delta.
    const int tiles = 2 * (block_rows() + 2 * block_n) * (pitch_qk + pitch_v);
    return entry == KernelEntry::kBackwardDkDv ? tiles + 2 * 2 * block_n * 4 : tiles;
  }
  const int rows_bytes = block_n * (head_dim_qk + head_dim_v) * accumulator_size(dtype);
  return entry == KernelEntry::kBackwardDkDv ? rows_bytes + 2 * block_n * accumulator_size(dtype)
                                             : rows_bytes;
}

std::vector<std::string> KernelSpec::compile_options() const {
  // wgmma needs the arch-specific target (sm_90a).
  return {str_cat("--gpu-architecture=sm_", arch, wgmma ? "a" : ""), "-std=c++17", "-lineinfo"};
}

std::string KernelSpec::source() const {
  std::string text = str_cat(
      "// flashjit kernel ", name(), "\n",
      "#ifdef __CUDACC_RTC__\n"
      "typedef unsigned int uint32_t;\n"
      "typedef unsigned long long uint64_t;\n"
      "typedef long long int64_t;\n"
      "#endif\n",
      "#define FJ_ENTRY ", int(entry), "\n", "#define FJ_ELEM ", device_type_name(dtype), "\n",
      "#define FJ_ACC ", dtype == FJ_FLOAT64 ? "double" : "float", "\n", "#define FJ_HEAD_DIM_QK ",
      head_dim_qk, "\n", "#define FJ_HEAD_DIM_V ", head_dim_v, "\n", "#define FJ_THREADS ", threads, "\n",
      "#define FJ_BLOCK_N ", block_n, "\n", "#define FJ_MASK ", int(mask), "\n", "#define FJ_MASK_TYPE ",
      mask == MaskKind::kNone ? "unsigned char" : device_type_name(mask_dtype), "\n",
      "#define FJ_HAS_WINDOW ", window ? 1 : 0, "\n", "#define FJ_DROPOUT ", dropout ? 1 : 0, "\n",
      "#define FJ_SOFTCAP ", softcap ? 1 : 0, "\n", "#define FJ_ALIGNED ", aligned ? 1 : 0, "\n",
      "#define FJ_WARPS ", threads / 32, "\n", "#define FJ_ROW_TILES ", row_tiles, "\n",
      "#define FJ_DKDV_PART ", dkdv_part, "\n", "#define FJ_WGMMA ", wgmma ? 1 : 0, "\n",
      "#define FJ_ELEM_IS_BF16 ", dtype == FJ_BFLOAT16 ? 1 : 0,
      "\n");
  std::vector<const char*> files = {"philox_core.h", "params.cuh", "common.cuh"};
  if (family == KernelFamily::kMma) {
    files.push_back("mma_common.cuh");
    if (wgmma) files.push_back("wgmma.cuh");
    files.push_back(entry == KernelEntry::kForward ? "attention_mma.cuh" : "attention_mma_bwd.cuh");
  } else {
    files.push_back("attention_simt.cuh");
  }
  for (const char* file : files) {
    text += str_cat("// ---- ", file, "\n", without_pragma_once(embedded_source(file)));
  }
  return text;
}

KernelTraits traits_of(const AttentionProblem& p, int arch) {
  KernelTraits traits;
  traits.dtype = p.dtype;
  traits.head_dim_qk = int(p.head_dim_qk);
  traits.head_dim_v = int(p.head_dim_v);
  traits.mask = p.mask_kind;
  traits.mask_dtype = p.mask_dtype;
  traits.window = p.window_left >= 0 || p.window_right >= 0;
  traits.dropout = p.has_dropout();
  traits.softcap = p.softcap > 0.0;
  const auto row_aligned = [](const Operand& x) {
    return reinterpret_cast<uintptr_t>(x.data) % 16 == 0 && x.stride_batch % 8 == 0 &&
           x.stride_head % 8 == 0 && x.stride_seq % 8 == 0;
  };
  traits.aligned = row_aligned(p.q) && row_aligned(p.k) && row_aligned(p.v) && p.head_dim_qk % 8 == 0 &&
                   p.head_dim_v % 8 == 0;
  traits.arch = arch;
  return traits;
}

// CUDA C++ Programming Guide, "Technical Specifications per Compute Capability".
int max_shared_memory_bytes(int arch) {
  if (arch == 80 || arch == 87) return 163 * 1024;
  if (arch >= 90) return 227 * 1024;
  return 99 * 1024;
}

namespace {

KernelSpec simt_spec(const KernelTraits& traits, KernelEntry entry) {
  KernelSpec spec;
  spec.entry = entry;
  spec.dtype = traits.dtype;
  spec.head_dim_qk = round_up(traits.head_dim_qk, kSimtLanes);
  spec.head_dim_v = round_up(traits.head_dim_v, kSimtLanes);
  spec.mask = traits.mask;
  spec.mask_dtype = traits.mask == MaskKind::kNone ? FJ_BOOL : traits.mask_dtype;
  spec.window = traits.window;
  spec.dropout = traits.dropout;
  spec.softcap = traits.softcap;
  spec.arch = traits.arch;
  spec.threads = 128;
  spec.block_n = 32;
  while (spec.block_n > 8 && spec.shared_memory_bytes() > kMaxSharedBytes) spec.block_n /= 2;
  return spec;
}

bool fits(const KernelSpec& spec) {
  return spec.shared_memory_bytes() <= max_shared_memory_bytes(spec.arch);
}

bool uses_tensor_cores(const KernelTraits& traits) {
  return traits.dtype == FJ_FLOAT16 || traits.dtype == FJ_BFLOAT16;
}

// Tensor cores for float16/bfloat16: 4 warps of 16 x row_tiles rows each.
// The streamed tile (block_n rows a step) shrinks with the head dim so that
// the float accumulators and score tiles stay in registers.
KernelSpec mma_spec(const KernelTraits& traits, KernelEntry entry) {
  KernelSpec spec = simt_spec(traits, entry);
  spec.family = KernelFamily::kMma;
  spec.head_dim_qk = round_up(traits.head_dim_qk, 16);
  spec.head_dim_v = round_up(traits.head_dim_v, 16);
  spec.aligned = traits.aligned;
  spec.threads = 128;
  const int head_dim = std::max(spec.head_dim_qk, spec.head_dim_v);
  // Masks, dropout and softcap need registers of their own: 32 rows a step keeps
  // those kernels from spilling (ptxas -v; bench/NOTES.md).
  const bool extras = spec.mask != MaskKind::kNone || spec.dropout || spec.softcap;
  switch (entry) {
    case KernelEntry::kForward:
      // Two row tiles a warp (128 query rows a block) up to head dim 128: each
      // K and V fragment read from shared memory then feeds two mma.
      // 64 keys a step: at head dim 128 ptxas spills about 30 bytes, yet it
      // measured 10% faster than 32 keys (bench/NOTES.md).
      spec.row_tiles = head_dim > 128 ? 1 : 2;
      spec.block_n = head_dim > 128 || extras ? 32 : 64;
      break;
    case KernelEntry::kBackwardDq:
      // Two row tiles a warp as in the forward: K and V fragments feed two mma each.
      spec.row_tiles = head_dim > 128 ? 1 : 2;
      spec.block_n = head_dim > 64 || extras ? 32 : 64;
      break;
    // 64 queries a step measured fastest up to head dim 128 on the H100, though
    // at 128 ptxas spills about 130 bytes (bench/NOTES.md).
    case KernelEntry::kBackwardDkDv:
      spec.block_n = head_dim > 128 || (head_dim > 64 && extras) ? 32 : 64;
      break;
  }
  // Smaller steps where the arch's shared memory is too small (sm_86/89: 99 KB).
  while (!fits(spec) && spec.block_n > 16) spec.block_n /= 2;
  return spec;
}

// Hopper (sm_90 exactly: wgmma is an sm_90a feature) up to head dim 64: two
// warpgroups of 64 query rows, wgmma with S = Q K^T from shared memory and
// O += P V with P from registers; head dims padded to 64 (one swizzled region).
// 126 registers a thread let two blocks share an SM. At head dim 128 (170
// registers, one block an SM) it measured slower than the mma.sync kernel
// (bench/NOTES.md), which keeps those head dims; so do head dims of 32 or less,
// which padding to 64 would cost at least twice the work.
KernelSpec wgmma_spec(const KernelTraits& traits) {
  KernelSpec spec = mma_spec(traits, KernelEntry::kForward);
  spec.wgmma = true;
  spec.head_dim_qk = round_up(traits.head_dim_qk, 64);
  spec.head_dim_v = round_up(traits.head_dim_v, 64);
  spec.threads = 256;
  spec.row_tiles = 1;
  spec.block_n = 64;
  return spec;
}

}  // namespace

KernelSpec forward_kernel(const KernelTraits& traits) {
  const int head_dim = std::max(traits.head_dim_qk, traits.head_dim_v);
  if (uses_tensor_cores(traits) && traits.arch == 90 && head_dim > 32 && head_dim <= 64) {
    const KernelSpec spec = wgmma_spec(traits);
    if (fits(spec)) return spec;
  }
  if (uses_tensor_cores(traits)) {
    const KernelSpec spec = mma_spec(traits, KernelEntry::kForward);
    if (fits(spec)) return spec;
  }
  return simt_spec(traits, KernelEntry::kForward);
}

std::vector<KernelSpec> backward_kernels(const KernelTraits& traits) {
  const KernelSpec simt_dq = simt_spec(traits, KernelEntry::kBackwardDq);
  const KernelSpec simt_dkdv = simt_spec(traits, KernelEntry::kBackwardDkDv);
  if (!uses_tensor_cores(traits)) return {simt_dq, simt_dkdv};
  const KernelSpec mma_dq = mma_spec(traits, KernelEntry::kBackwardDq);
  const KernelSpec dq = fits(mma_dq) ? mma_dq : simt_dq;
  // dK and dV accumulators of 16 keys take 8 float registers a lane per 16 head
  // dims each; above 128 they do not fit together beside the score tiles, and
  // dV and dK get a kernel each.
  const KernelSpec dkdv = mma_spec(traits, KernelEntry::kBackwardDkDv);
  if (!fits(dkdv)) return {dq, simt_dkdv};
  if (std::max(dkdv.head_dim_qk, dkdv.head_dim_v) <= 128) return {dq, dkdv};
  KernelSpec dv = dkdv, dk = dkdv;
  dv.dkdv_part = 1;
  dk.dkdv_part = 2;
  return {dq, dv, dk};
}

}  // namespace flashjit::cuda
