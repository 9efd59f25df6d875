#include "cuda/kernel_spec.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <iterator>

#include "core/dtype.hpp"
#include "core/error.hpp"
#include "cuda/embedded_sources.hpp"
#include "cuda/kernels/shared_layout.h"
#include "cuda/settings.hpp"

namespace flashjit::cuda {
namespace {

constexpr int kSimtLanes = 8;  // threads per row in attention_simt.cuh
constexpr int kMaxSharedBytes = 64 * 1024;
constexpr int kProducerWarps = 4;  // kHopper: the TMA warpgroup (attention_hopper.cuh)

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

// Every entry's names: in kernel names, the C function, the source's macro.
struct EntryNames {
  KernelEntry entry;
  const char* name;
  const char* function;
  const char* macro;
};
constexpr EntryNames kEntries[] = {
    {KernelEntry::kForward, "forward", "fj_attention_forward", "FJ_FORWARD"},
    {KernelEntry::kBackwardDq, "backward_dq", "fj_attention_backward_dq", "FJ_BACKWARD_DQ"},
    {KernelEntry::kBackwardDkDv, "backward_dkdv", "fj_attention_backward_dkdv", "FJ_BACKWARD_DKDV"},
    {KernelEntry::kBackwardPrep, "backward_prep", "fj_attention_backward_prep", "FJ_BACKWARD_PREP"},
    {KernelEntry::kForwardCombine, "forward_combine", "fj_attention_forward_combine", "FJ_FORWARD_COMBINE"},
    {KernelEntry::kVarlenTable, "varlen_table", "fj_varlen_table", "FJ_VARLEN_TABLE"},
    {KernelEntry::kBackwardDqConvert, "backward_dq_convert", "fj_attention_backward_dq_convert",
     "FJ_BACKWARD_DQ_CONVERT"},
};

const EntryNames& entry_names(KernelEntry entry) {
  for (const EntryNames& names : kEntries) {
    if (names.entry == entry) return names;
  }
  throw_value_error("[cuda] kernel entry ", int(entry), " has no names");
}

// FJ_FORWARD ... FJ_FORWARD_COMBINE: 1 for this kernel's entry, 0 for the others.
std::string entry_macros(KernelEntry entry) {
  std::string text;
  for (const EntryNames& names : kEntries) text += str_cat("#define ", names.macro, " ", int(names.entry == entry), "\n");
  return text;
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

const char* family_name(KernelFamily family) {
  switch (family) {
    case KernelFamily::kSimt: return "simt-";
    case KernelFamily::kMma: return "mma-";
    case KernelFamily::kHopper: return "hopper-";
  }
  return "?";
}

// The wgmma.mma_async specialisations a kHopper kernel uses (wgmma.cuh declares
// the templates): PTX takes one instruction text per N, with N / 2 accumulator
// registers, so they are written out here for the widths the kernel needs.
// SS: A and B K-major in shared memory; RS: A in registers, B MN-major; SS with A
// MN-major (transposed; the one-pass backward's dQ^T = K^T dS^T).
std::string wgmma_instructions(std::vector<int> ss_widths, std::vector<int> rs_widths,
                               std::vector<int> ss_transposed_a_widths = {},
                               std::vector<int> ss_transposed_b_widths = {}) {
  const auto accumulators = [](int n) {
    std::string registers = "{", constraints;
    for (int i = 0; i < n / 2; ++i) {
      registers += str_cat(i ? ", " : "", "%", i);
      constraints += str_cat(i ? ", " : "", "\"+f\"(d[", i / 4, "][", i % 4, "])");
    }
    return std::pair{registers + "}", constraints};
  };
  const auto unique = [](std::vector<int>& widths) {
    std::sort(widths.begin(), widths.end());
    widths.erase(std::unique(widths.begin(), widths.end()), widths.end());
  };
  unique(ss_widths);
  unique(rs_widths);
  unique(ss_transposed_a_widths);
  unique(ss_transposed_b_widths);
  std::string text;
  const auto shared_shared = [&](const char* name, int n, int transpose_a, int transpose_b = 0) {
    const auto [registers, constraints] = accumulators(n);
    const int next = n / 2;  // first operand after the accumulators
    text += str_cat("template <>\nFJ_DEVICE void ", name, "<", n, ">(float (&d)[", n / 8,
                    "][4], unsigned long long a, unsigned long long b, bool first) {\n"
                    "  asm volatile(\"{\\n.reg .pred p;\\nsetp.ne.b32 p, %",
                    next + 2, ", 0;\\n\"\n    \"wgmma.mma_async.sync.aligned.m64n", n,
                    "k16.\" FJ_WGMMA_TYPES \" ", registers, ", %", next, ", %", next + 1,
                    ", p, 1, 1, ", transpose_a, ", ", transpose_b, ";\\n}\\n\"\n    : ", constraints,
                    "\n    : \"l\"(a), \"l\"(b), \"r\"(first ? 0 : 1));\n}\n");
  };
  for (int n : ss_widths) shared_shared("wgmma_ss", n, 0);
  for (int n : ss_transposed_a_widths) shared_shared("wgmma_ss_mn_a", n, 1);
  for (int n : ss_transposed_b_widths) shared_shared("wgmma_ss_mn_b", n, 0, 1);
  for (int n : rs_widths) {
    const auto [registers, constraints] = accumulators(n);
    const int next = n / 2;
    text += str_cat("template <>\nFJ_DEVICE void wgmma_rs<", n, ">(float (&d)[", n / 8,
                    "][4], const unsigned (&a)[4], unsigned long long b) {\n"
                    "  asm volatile(\"{\\n.reg .pred p;\\nsetp.ne.b32 p, %",
                    next + 5, ", 0;\\n\"\n    \"wgmma.mma_async.sync.aligned.m64n", n,
                    "k16.\" FJ_WGMMA_TYPES \" ", registers, ", {%", next, ", %", next + 1, ", %", next + 2,
                    ", %", next + 3, "}, %", next + 4, ", p, 1, 1, 1;\\n}\\n\"\n    : ", constraints,
                    "\n    : \"r\"(a[0]), \"r\"(a[1]), \"r\"(a[2]), \"r\"(a[3]), \"l\"(b), \"n\"(1));\n}\n");
  }
  return text;
}

}  // namespace

std::string KernelSpec::name() const {
  std::string mask_text = "none";
  if (mask == MaskKind::kBool) mask_text = "bool";
  if (mask == MaskKind::kAdditive) mask_text = str_cat("add-", dtype_name(mask_dtype));
  return str_cat(family_name(family), entry_names(entry).name, "_", dtype_name(dtype), "_qk", head_dim_qk, "_v",
                 head_dim_v, "_mask-", mask_text, window ? "_window" : "", dropout ? "_dropout" : "",
                 softcap ? "_softcap" : "", aligned ? "_aligned" : "", split ? "_split" : "", varlen ? "_varlen" : "",
                 kv_cache == 1 ? "_kvcache" : kv_cache == 2 ? "_paged" : "", edge_general ? "_edgegen" : "",
                 block_span ? "_blockspan" : "", chains_tiles() ? "_chain" : "", takes_next_early() ? "_earlynext" : "",
                 sets_up_in_producer() ? "_psetup" : "",
                 poly_groups() > 0 ? str_cat("_poly", poly_groups()) : std::string(),
                 suspends_producer() ? "_psusp" : "", trace ? "_trace" : "",
                 page_boxes > 1 ? str_cat("_pb", page_boxes) : std::string(),
                 "_t", threads,
                 family == KernelFamily::kSimt ? std::string() : str_cat("_r", row_tiles),
                 dkdv_part == DkDvPart::kDvOnly ? "_dv-only" : (dkdv_part == DkDvPart::kDkOnly ? "_dk-only" : ""),
                 one_pass ? "_one-pass" : "", takes_whole_steps() == 1 ? "_whole" : takes_whole_steps() == 2 ? "_whole-concurrent" : "", dkdv_shared ? "_shared-ops" : "", takes_parts() ? "_parts" : "",
                 overlaps_launch() ? "_pdl" : "",
                 dq_diagnostic == 1   ? "_dq-none"
                 : dq_diagnostic == 2 ? "_dq-unordered"
                 : dq_diagnostic == 3 ? "_dq-eager"
                 : dq_diagnostic == 4 ? "_dq-arrival"
                 : dq_diagnostic == 5 ? "_dq-writer"
                 : dq_diagnostic == 6 ? "_dq-writer-arrival"
                 : dq_diagnostic == 7 ? "_dq-writer-eager"
                 : dq_diagnostic == 8 ? "_dq-writer-groups"
                 : dq_diagnostic == 9 ? "_dq-atomic"
                 : dq_diagnostic == 10 ? "_dq-writer-pair"
                 : dq_diagnostic == 11 ? "_dq-writer-diagonal"
                                      : "",
                 takes_dq_slots() != layout::kDqStagingSlots ? str_cat("_slots", takes_dq_slots()) : std::string(),
                 "_n", block_n,
                 family == KernelFamily::kHopper ? str_cat("_s", stages) : std::string(),
                 q_buffers > 1 ? str_cat("_q", q_buffers) : std::string(), o_tma ? "_otma" : "",
                 fold_scale ? "_fold" : "", lazy_rescale ? "_lazy" : "", "_sm", arch,
                 family == KernelFamily::kHopper ? "a" : "");
}

namespace {
// How many fields an aggregate has: T{AnyField x n} compiles for n up to its field count only.
struct AnyField {
  template <class U>
  constexpr operator U() const {
    return U{};
  }
};
template <class T, class... Fields>
constexpr auto braces_take(int) -> decltype(T{Fields{}...}, true) {
  return true;
}
template <class T, class... Fields>
constexpr bool braces_take(...) {
  return false;
}
template <size_t>
using AnyFieldAt = AnyField;
template <class T, size_t... I>
constexpr bool has_fields(std::index_sequence<I...>) {
  return braces_take<T, AnyFieldAt<I>...>(0) && !braces_take<T, AnyField, AnyFieldAt<I>...>(0);
}
template <class T, size_t N>
constexpr bool has_fields() {
  return has_fields<T>(std::make_index_sequence<N>{});
}
static_assert(has_fields<KernelSpec, KernelSpec::kFieldCount>(),
              "KernelSpec has a field KernelSpec::fields() (and the ctest's changes) do not list");
static_assert(has_fields<KernelTraits, kTraitsFieldCount>(), "KernelTraits has a field traits_fields() does not list");

// An array of exactly N fields as integers (a field left out is a compile error, not a 0).
template <size_t N, class... Values>
std::array<int32_t, N> fields_of(Values... values) {
  static_assert(sizeof...(Values) == N, "every field listed once");
  return std::array<int32_t, N>{int32_t(values)...};
}
}  // namespace

KernelSpec::Fields KernelSpec::fields() const {
  return fields_of<kFieldCount>(entry,        family,      dtype,          head_dim_qk,   head_dim_v,   mask,
                                mask_dtype,   window,      dropout,        softcap,       aligned,      split,
                                varlen,       kv_cache,    edge_general,   block_span,    chains_tiles(), takes_next_early(), sets_up_in_producer(), poly_groups(), suspends_producer(), trace,
                                dq_diagnostic, page_boxes, threads,        row_tiles,     dkdv_part,    one_pass,
                                takes_whole_steps(), dkdv_shared,  takes_parts(), overlaps_launch(), stages, q_buffers, o_tma,     fold_scale,
                                lazy_rescale, block_n,      arch,           takes_dq_slots());
}

const char* KernelSpec::function_name() const { return entry_names(entry).function; }

int KernelSpec::row_warps() const {
  return family == KernelFamily::kHopper ? threads / 32 - kProducerWarps : threads / 32;
}

int KernelSpec::block_rows() const {
  return family == KernelFamily::kSimt ? threads / kSimtLanes : row_warps() * 16 * row_tiles;
}

int KernelSpec::shared_memory_bytes() const {
  // The kernels' own layouts (kernels/shared_layout.h), for the sizes compiled in.
  if (entry == KernelEntry::kForwardCombine || entry == KernelEntry::kVarlenTable) return 0;
  const int qk = head_dim_qk, v = head_dim_v, rows = block_rows(), n = block_n;
  switch (family) {
    case KernelFamily::kHopper:
      switch (entry) {
        case KernelEntry::kForward: {
          const int q_row = o_tma ? std::max(qk, v) : qk;  // O is staged in the Q buffer
          return layout::kHopperBaseAlignment +
                 layout::hopper_forward(rows, q_row, n, qk, v, q_buffers, stages,
                                        sets_up_in_producer() ? layout::kTileSlotInts : 1)
                     .bytes;
        }
        case KernelEntry::kBackwardDq:
          return layout::kHopperBaseAlignment + layout::hopper_backward_dq(rows, n, qk, v, stages).bytes;
        case KernelEntry::kBackwardDkDv:
          return layout::kHopperBaseAlignment +
                 layout::hopper_backward_dkdv(rows, n, qk, v, stages,
                                              layout::dkdv_ds_buffers(one_pass, dkdv_shared, takes_whole_steps() != 0),
                                              layout::dkdv_walk_blocks(one_pass && layout::dq_in_arrival_order(dq_diagnostic)),
                                              layout::dkdv_dq_staging_buffers(one_pass && layout::dq_by_writer(dq_diagnostic),
                                                                              row_warps() / 4, takes_dq_slots()))
                     .bytes;
        case KernelEntry::kBackwardPrep:
        case KernelEntry::kForwardCombine:
        case KernelEntry::kVarlenTable:
        case KernelEntry::kBackwardDqConvert: return 0;  // (its tile is static shared memory)
      }
      return 0;
    case KernelFamily::kMma:
      if (entry == KernelEntry::kForward) return layout::mma_forward(rows, n, qk + 8, v + 8).bytes;
      return layout::mma_backward(rows, n, qk + 8, v + 8, entry == KernelEntry::kBackwardDkDv).bytes;
    case KernelFamily::kSimt:
      return layout::simt(n, qk, v, int(accumulator_size(dtype)), entry == KernelEntry::kBackwardDkDv).bytes;
  }
  return 0;
}

std::vector<std::string> KernelSpec::compile_options() const {
  // wgmma and setmaxnreg need the arch-specific target (sm_90a).
  return {str_cat("--gpu-architecture=sm_", arch, family == KernelFamily::kHopper ? "a" : ""), "-std=c++17",
          "-lineinfo"};
}

std::string KernelSpec::source() const {
  const bool hopper = family == KernelFamily::kHopper;
  std::string text = str_cat(
      "// flashjit kernel ", name(), "\n",
      "#ifdef __CUDACC_RTC__\n"
      "typedef unsigned int uint32_t;\n"
      "typedef unsigned long long uint64_t;\n"
      "typedef long long int64_t;\n"
      "#endif\n",
      entry_macros(entry), "#define FJ_ELEM ", device_type_name(dtype), "\n",
      "#define FJ_ACC ", dtype == FJ_FLOAT64 ? "double" : "float", "\n", "#define FJ_HEAD_DIM_QK ",
      head_dim_qk, "\n", "#define FJ_HEAD_DIM_V ", head_dim_v, "\n", "#define FJ_THREADS ", threads, "\n",
      "#define FJ_BLOCK_N ", block_n, "\n", "#define FJ_MASK ", int(mask), "\n", "#define FJ_MASK_TYPE ",
      mask == MaskKind::kNone ? "unsigned char" : device_type_name(mask_dtype), "\n",
      "#define FJ_HAS_WINDOW ", window ? 1 : 0, "\n", "#define FJ_DROPOUT ", dropout ? 1 : 0, "\n",
      "#define FJ_SOFTCAP ", softcap ? 1 : 0, "\n", "#define FJ_ALIGNED ", aligned ? 1 : 0, "\n",
      "#define FJ_SPLIT ", split ? 1 : 0, "\n", "#define FJ_VARLEN ", varlen ? 1 : 0, "\n", "#define FJ_KV_CACHE ", kv_cache, "\n", "#define FJ_EDGE_GENERAL ", edge_general ? 1 : 0, "\n",
      "#define FJ_BLOCK_SPAN ", block_span ? 1 : 0, "\n", "#define FJ_CHAIN_TILES ", chains_tiles() ? 1 : 0, "\n", "#define FJ_EARLY_NEXT ", takes_next_early() ? 1 : 0, "\n", "#define FJ_PRODUCER_SETUP ", sets_up_in_producer() ? 1 : 0, "\n", "#define FJ_EXP_POLY ", poly_groups(), "\n", "#define FJ_PRODUCER_SUSPEND ", suspends_producer() ? 1 : 0, "\n", "#define FJ_TRACE ", trace ? 1 : 0, "\n", "#define FJ_PAGE_BOXES ", page_boxes, "\n", "#define FJ_WARPS ", row_warps(), "\n",
      "#define FJ_ROW_TILES ", row_tiles, "\n", "#define FJ_ONE_PASS ", one_pass ? 1 : 0, "\n",
      "#define FJ_WHOLE_STEPS ", takes_whole_steps(), "\n",
      "#define FJ_DQ_DIAGNOSTIC ", dq_diagnostic, "\n", "#define FJ_DQ_SLOTS ", takes_dq_slots(), "\n", "#define FJ_DKDV_SHARED ", dkdv_shared ? 1 : 0, "\n",
      "#define FJ_DKDV_PARTS ", takes_parts() ? 1 : 0, "\n",
      "#define FJ_BACKWARD_OVERLAP ", overlaps_launch() ? 1 : 0, "\n",
      "#define FJ_WITH_DV ",
      int(dkdv_part != DkDvPart::kDkOnly), "\n", "#define FJ_WITH_DK ", int(dkdv_part != DkDvPart::kDvOnly), "\n", "#define FJ_WGMMA ",
      hopper ? 1 : 0, "\n", "#define FJ_STAGES ", stages, "\n", "#define FJ_Q_BUFFERS ", q_buffers, "\n",
      "#define FJ_O_TMA ", o_tma ? 1 : 0, "\n", "#define FJ_FOLD_SCALE ", fold_scale ? 1 : 0, "\n",
      "#define FJ_LAZY_RESCALE ", lazy_rescale ? 1 : 0, "\n",
      "#define FJ_ELEM_IS_BF16 ",
      dtype == FJ_BFLOAT16 ? 1 : 0, "\n");
  const auto append = [&](const char* file) {
    text += str_cat("// ---- ", file, "\n", without_pragma_once(embedded_source(file)));
  };
  for (const char* file : {"host_device.h", "philox_core.h", "bounds_core.h", "shared_layout.h", "params.cuh", "common.cuh"}) {
    append(file);
  }
  if (entry == KernelEntry::kForwardCombine || entry == KernelEntry::kVarlenTable) {
    append(entry == KernelEntry::kForwardCombine ? "combine.cuh" : "varlen_table.cuh");
    return text;
  }
  if (family == KernelFamily::kSimt) {
    append("attention_simt.cuh");
    return text;
  }
  append("mma_common.cuh");
  if (hopper) {
    append("wgmma.cuh");
    // S (dP, S^T, dP^T) are block_n wide; the products from registers are as wide as
    // the output they accumulate (O and dV: head_dim_v; dQ and dK: head_dim_qk).
    std::vector<int> from_registers;
    if (entry == KernelEntry::kForward || entry == KernelEntry::kBackwardDkDv)
      from_registers.push_back(head_dim_v);
    if (entry == KernelEntry::kBackwardDq || entry == KernelEntry::kBackwardDkDv)
      from_registers.push_back(head_dim_qk);
    // The one-pass backward's dQ^T product: N is the queries of a step (head dim 128: each
    // consumer takes 64 of dQ's columns) or half of them (64: each takes the 64 columns of half the queries).
    std::vector<int> transposed_a;
    if (one_pass) transposed_a.push_back(head_dim_qk == 64 ? block_n / 2 : block_n);
    // dV and dK from P^T and dS^T in shared memory (dkdv_shared): SS with B (dO, Q) MN-major.
    std::vector<int> transposed_b;
    if (dkdv_shared) transposed_b = {head_dim_v, head_dim_qk};
    text += str_cat("// ---- wgmma instructions\nnamespace flashjit {\nnamespace mma {\n",
                    wgmma_instructions({block_n}, dkdv_shared ? std::vector<int>{} : from_registers, transposed_a,
                                       transposed_b),
                    "}  // namespace mma\n}  // namespace flashjit\n");
    append("pipeline.cuh");
  }
  if (entry == KernelEntry::kForward) {
    append("softmax.cuh");
    append(hopper ? "attention_hopper.cuh" : "attention_mma.cuh");
  } else {
    append("gradient.cuh");
    append(hopper ? "attention_hopper_bwd.cuh" : "attention_mma_bwd.cuh");
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
  // As the kernels form it: scale * log2(e) in float, a normal positive number.
  const float scale_log2 = float(p.scale) * 1.4426950408889634f;
  traits.positive_scale = std::isnormal(scale_log2) && scale_log2 > 0.0f;
  const auto row_aligned = [](const Operand& x) {
    return reinterpret_cast<uintptr_t>(x.data) % 16 == 0 && x.stride_batch % 8 == 0 &&
           x.stride_head % 8 == 0 && x.stride_seq % 8 == 0;
  };
  traits.aligned = row_aligned(p.q) && row_aligned(p.k) && row_aligned(p.v) && p.head_dim_qk % 8 == 0 &&
                   p.head_dim_v % 8 == 0;
  traits.tma = traits.aligned;
  traits.arch = arch;
  return traits;
}

std::array<int32_t, kTraitsFieldCount> traits_fields(const KernelTraits& t) {
  return fields_of<kTraitsFieldCount>(t.dtype, t.head_dim_qk, t.head_dim_v, t.mask, t.mask_dtype, t.window,
                                      t.dropout, t.softcap, t.positive_scale, t.aligned, t.tma, t.arch);
}

// CUDA C++ Programming Guide, "Technical Specifications per Compute Capability".
int max_shared_memory_bytes(int arch) {
  if (arch == 80 || arch == 87) return 163 * 1024;
  if (arch >= 90) return 227 * 1024;
  return 99 * 1024;
}

ForwardTiles parse_forward_tiles(const char* text) {
  // The keys of two values: the first sets the field to 1, the second to 0.
  struct TwoWay {
    const char* key;
    const char* on;
    const char* off;
    int ForwardTiles::*field;
  };
  static constexpr TwoWay kTwoWay[] = {
      {"o", "tma", "direct", &ForwardTiles::o_tma},           {"softmax", "fast", "plain", &ForwardTiles::fast_softmax},
      {"counter", "stream", "memset", &ForwardTiles::stream_counter},
      {"edges", "general", "right", &ForwardTiles::edge_general}, {"span", "block", "own", &ForwardTiles::block_span},
      {"sched", "static", "counter", &ForwardTiles::static_tiles}, {"chain", "tiles", "none", &ForwardTiles::chain_tiles},
      {"next", "early", "late", &ForwardTiles::early_next},
      {"setup", "producer", "consumer", &ForwardTiles::producer_setup},
      {"wait", "suspend", "spin", &ForwardTiles::producer_suspend},
  };
  ForwardTiles tiles;
  std::string rest = text == nullptr ? "" : text;
  const auto fail = [&](const std::string& item, const std::string& expected) {
    throw_value_error("[cuda] FLASHJIT_CUDA_TILES: '", item, "' is not valid; expected ", expected,
                      " (keys n, stages, q, o, groups, softmax, counter, edges, span, sched, chain, next, setup, poly, wait; e.g. \"n=128,q=2,o=tma\")");
  };
  const auto number = [&](const std::string& item, const std::string& value, int lo, int hi, const char* expected) {
    char* end = nullptr;
    const long parsed = std::strtol(value.c_str(), &end, 10);
    if (value.empty() || *end != '\0' || parsed < lo || parsed > hi) fail(item, expected);
    return int(parsed);
  };
  while (!rest.empty()) {
    const size_t comma = rest.find(',');
    const std::string item = rest.substr(0, comma);
    rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
    if (item.empty()) continue;
    const size_t equals = item.find('=');
    if (equals == std::string::npos) fail(item, "key=value");
    const std::string key = item.substr(0, equals), value = item.substr(equals + 1);
    const TwoWay* two_way = std::find_if(std::begin(kTwoWay), std::end(kTwoWay),
                                         [&](const TwoWay& entry) { return key == entry.key; });
    if (two_way != std::end(kTwoWay)) {
      if (value != two_way->on && value != two_way->off) {
        fail(item, str_cat(key, "=", two_way->on, " or ", key, "=", two_way->off));
      }
      tiles.*(two_way->field) = value == two_way->on ? 1 : 0;
    } else if (key == "n") {
      tiles.block_n = number(item, value, 16, 256, "n=16..256, a multiple of 16");
      if (tiles.block_n % 16 != 0) fail(item, "n=16..256, a multiple of 16");
    } else if (key == "stages") {
      tiles.stages = number(item, value, 1, 4, "stages=1..4");
    } else if (key == "q") {
      tiles.q_buffers = number(item, value, 1, 2, "q=1 or q=2");
    } else if (key == "groups") {
      tiles.groups = number(item, value, 2, 3, "groups=2 or groups=3");
    } else if (key == "poly") {
      tiles.exp_poly = number(item, value, 0, 8, "poly=0..8");
    } else {
      fail(item, "one of the keys n, stages, q, o, groups, softmax, counter, edges, span, sched, chain, next, setup, poly, wait");
    }
  }
  return tiles;
}

ForwardTiles forced_forward_tiles() {
  thread_local settings::Kept<ForwardTiles> tiles;  // parsed again when the environment changes
  return settings::kept(tiles, [] { return parse_forward_tiles(settings::forced_tiles()); });
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
    case KernelEntry::kBackwardPrep:
    case KernelEntry::kForwardCombine:
    case KernelEntry::kVarlenTable:
    case KernelEntry::kBackwardDqConvert: break;  // kHopper only; no tiles
  }
  // Smaller steps where the arch's shared memory is too small (sm_86/89: 99 KB).
  while (!fits(spec) && spec.block_n > 16) spec.block_n /= 2;
  return spec;
}

// The forward spec with the fields FLASHJIT_CUDA_TILES forces; a forced
// configuration that cannot run raises an error naming it.
KernelSpec with_forced_tiles(KernelSpec spec, const ForwardTiles& forced) {
  const int head_dim = std::max(spec.head_dim_qk, spec.head_dim_v);
  if (forced.groups == 3) {
    if (head_dim > 64) throw_value_error("[cuda] FLASHJIT_CUDA_TILES: groups=3 needs head dims up to 64, got ", head_dim);
    spec.threads = (12 + kProducerWarps) * 32;
    spec.block_n = std::min(spec.block_n, 96);  // 160 registers a thread: S and P of up to 96 keys
  } else if (forced.groups == 2) {
    spec.threads = (8 + kProducerWarps) * 32;
  }
  if (forced.block_n) spec.block_n = forced.block_n;
  if (forced.stages) spec.stages = forced.stages;
  if (forced.q_buffers) spec.q_buffers = forced.q_buffers;
  if (forced.o_tma >= 0) spec.o_tma = forced.o_tma == 1;
  if (forced.fast_softmax == 0) spec.fold_scale = spec.lazy_rescale = false;
  if (forced.edge_general >= 0) spec.edge_general = forced.edge_general == 1;
  if (forced.block_span >= 0) spec.block_span = forced.block_span == 1;
  if (spec.threads > (8 + kProducerWarps) * 32 && spec.block_n > 128) {
    throw_value_error("[cuda] FLASHJIT_CUDA_TILES: groups=3 takes at most n=96, got n=", spec.block_n);
  }
  if (!fits(spec)) {
    throw_value_error("[cuda] FLASHJIT_CUDA_TILES: ", spec.name(), " needs ", spec.shared_memory_bytes(),
                      " bytes of shared memory; sm_", spec.arch, " has ", max_shared_memory_bytes(spec.arch));
  }
  return spec;
}

// sm_90 (the sm_90a target: wgmma, setmaxnreg), float16/bfloat16, head dims
// 33-256 padded to multiples of 64, operands TMA can address: a producer
// warpgroup and two consumer warpgroups of 64 rows (three in the variant above;
// attention_hopper*.cuh). The streamed tile (block_n rows a step) is sized so
// that the consumers' accumulators and score tiles fit in their registers (240,
// or 160) and the rings in shared memory. Head dims of 32 or less stay on
// mma.sync: padding them to 64 would double the work.
KernelSpec hopper_spec(const KernelTraits& traits, KernelEntry entry, const ForwardTiles& tuned = ForwardTiles{}) {
  KernelSpec spec = mma_spec(traits, entry == KernelEntry::kBackwardPrep ? KernelEntry::kBackwardDq : entry);
  spec.entry = entry;
  spec.family = KernelFamily::kHopper;
  spec.head_dim_qk = round_up(traits.head_dim_qk, 64);
  spec.head_dim_v = round_up(traits.head_dim_v, 64);
  spec.threads = (8 + kProducerWarps) * 32;
  spec.row_tiles = 1;
  spec.stages = 2;
  const int head_dim = std::max(spec.head_dim_qk, spec.head_dim_v);
  switch (entry) {
    case KernelEntry::kForward:  // S (block_n / 2 floats a thread), P and O (head_dim_v / 2)
      spec.block_n = head_dim <= 128 ? 128 : (head_dim <= 192 ? 96 : 64);
      spec.o_tma = true;
      spec.fold_scale = traits.positive_scale && !traits.softcap && traits.mask != MaskKind::kAdditive;
      spec.lazy_rescale = !traits.dropout;
      break;
    case KernelEntry::kBackwardDq:  // S, dP, dS and dQ
      spec.block_n = head_dim <= 64 ? 128 : head_dim <= 128 ? 64 : 32;
      break;
    case KernelEntry::kBackwardDkDv:  // S^T, dP^T, P^T, dS^T, dK and dV (above 128: dK or dV)
      spec.block_n = head_dim <= 64 ? 64 : 32;
      break;
    case KernelEntry::kBackwardPrep: spec.block_n = 64; break;
    case KernelEntry::kForwardCombine:
    case KernelEntry::kVarlenTable:
    case KernelEntry::kBackwardDqConvert: break;  // not kHopper kernels; the convert's: dq_convert_kernel
  }
  // Masks, dropout and softcap hold more per element: half the rows a step keeps
  // those kernels from spilling (scripts/kernel_resources.py).
  const bool extras = spec.mask != MaskKind::kNone || spec.dropout || spec.softcap;
  if (extras) spec.block_n /= 2;
  if (entry == KernelEntry::kForward) {
    // Above head dim 192 the plain forward takes 80 keys a step: measured 5-13%
    // faster than 64 on the H200 (bench/NOTES.md); halved, 40 is no whole number of 16-deep steps.
    if (head_dim > 192 && !extras) spec.block_n = 80;
    // A second Q buffer where shared memory has room for it.
    KernelSpec doubled = spec;
    doubled.q_buffers = 2;
    if (fits(doubled)) spec = doubled;
    const ForwardTiles forced = forced_forward_tiles();
    if (forced.forced()) {
      spec = with_forced_tiles(spec, forced);
    } else if (tuned.forced()) {
      try {
        spec = with_forced_tiles(spec, tuned);
      } catch (const Error&) {
        // A tuned choice that cannot run for these traits (another feature set): the built-in one.
      }
    }
    // Keys on top of the tiles in force (chains_tiles() and takes_next_early() say where they
    // apply): forced, else tuned where the tuned tiles are in force (forced tiles replace the
    // choice whole).
    // (A switch's 1 / 0 become true / false; a count is taken as it is.)
    const auto on_top = [&](int ForwardTiles::*key, auto KernelSpec::*field) {
      using Field = std::remove_reference_t<decltype(spec.*field)>;
      if (forced.*key >= 0) {
        spec.*field = static_cast<Field>(forced.*key);
      } else if (!forced.forced() && tuned.*key >= 0) {
        spec.*field = static_cast<Field>(tuned.*key);
      }
    };
    on_top(&ForwardTiles::chain_tiles, &KernelSpec::chain_tiles);
    on_top(&ForwardTiles::early_next, &KernelSpec::early_next);
    on_top(&ForwardTiles::producer_setup, &KernelSpec::producer_setup);
    on_top(&ForwardTiles::producer_suspend, &KernelSpec::producer_suspend);
    on_top(&ForwardTiles::exp_poly, &KernelSpec::exp_poly);
  }
  return spec;
}

// The prep kernel takes sizes at run time and no feature: one kernel per dtype
// and arch serves every head dim, mask, window, dropout and softcap.
KernelTraits prep_traits(const KernelTraits& traits) {
  KernelTraits plain;
  plain.dtype = traits.dtype;
  plain.head_dim_qk = plain.head_dim_v = 64;
  plain.arch = traits.arch;
  return plain;
}

}  // namespace

bool hopper_applies(const KernelTraits& traits) {
  const int head_dim = std::max(traits.head_dim_qk, traits.head_dim_v);
  return uses_tensor_cores(traits) && traits.arch == 90 && traits.tma && head_dim > 32 && head_dim <= 256;
}

KernelSpec forward_kernel(const KernelTraits& traits, const ForwardTiles& tuned) {
  if (hopper_applies(traits)) {
    KernelSpec spec = hopper_spec(traits, KernelEntry::kForward, tuned);
    spec.trace = settings::trace_tiles();
    if (fits(spec)) return spec;
  }
  if (uses_tensor_cores(traits)) {
    const KernelSpec spec = mma_spec(traits, KernelEntry::kForward);
    if (fits(spec)) return spec;
  }
  return simt_spec(traits, KernelEntry::kForward);
}

KernelSpec split_forward_kernel(const KernelTraits& traits, int64_t query_rows, bool one_warp) {
  KernelSpec spec;
  if (!uses_tensor_cores(traits) || traits.dropout) return spec;
  spec = mma_spec(traits, KernelEntry::kForward);
  if (one_warp && query_rows > 0 && query_rows <= 16) {
    // Decoding: a block's other warps would hold rows past the queries; one warp a block,
    // and many blocks an SM, each streaming its own span of keys.
    spec.threads = 32;
    spec.row_tiles = 1;
  }
  spec.split = fits(spec);
  return spec;
}

KernelSpec hopper_split_kernel(const KernelSpec& forward) {
  KernelSpec spec = forward;
  spec.split = forward.family == KernelFamily::kHopper && forward.entry == KernelEntry::kForward &&
               !forward.dropout && !forward.varlen && forward.kv_cache == 0;
  if (spec.split) spec.o_tma = false;  // the partials are floats in scratch
  return spec;
}

KernelSpec hopper_kv_cache_kernel(const KernelSpec& forward, int64_t page_size) {
  KernelSpec spec = hopper_split_kernel(forward);
  spec.kv_cache = page_size > 0 ? 2 : 1;
  if (page_size > 0 && page_size % spec.block_n != 0) {
    if (page_size % 16 != 0 || spec.block_n % page_size != 0) {
      spec.split = false;  // neither whole pages a key tile nor whole key tiles a page
    } else {
      // Pages shorter than the key step: a key tile of block_n keys loads one TMA box a page,
      // so the step keeps its length.
      spec.page_boxes = spec.block_n / int(page_size);
    }
  }
  return spec;
}

// The combine kernel takes sizes at run time: one per dtype and arch.
KernelSpec combine_kernel(const KernelTraits& traits) {
  KernelSpec spec;
  spec.entry = KernelEntry::kForwardCombine;
  spec.family = KernelFamily::kSimt;
  spec.dtype = traits.dtype;
  spec.arch = traits.arch;
  spec.threads = 128;  // a warp a row
  spec.block_n = 0;
  return spec;
}

// The device-side table of a variable-length batch (varlen_table.cuh): one block, sizes at run time.
KernelSpec varlen_table_kernel(const KernelTraits& traits) {
  KernelSpec spec = combine_kernel(traits);
  spec.entry = KernelEntry::kVarlenTable;
  spec.dtype = FJ_FLOAT16;  // reads no operand: one kernel for every dtype
  spec.threads = 1024;
  return spec;
}

void keep_blocks_resident(KernelSpec& dkdv, int64_t key_blocks_a_head, int multiprocessors) {
  if (dkdv.one_pass && layout::dq_in_arrival_order(dkdv.dq_diagnostic) &&
      key_blocks_a_head > std::min(multiprocessors, layout::kArrivalWalkBlocks)) {
    dkdv.dq_diagnostic = dkdv.dq_diagnostic == 4 ? 3 : 5;  // the block order, eager (by the writer for 6)
  }
}

void keep_diagonal_off_groups(KernelSpec& dkdv, bool grouped) {
  if (dkdv.one_pass && grouped && dkdv.dq_diagnostic == settings::kDiagonalOnePassDq && !settings::one_pass_dq_set()) {
    dkdv.dq_diagnostic = settings::kDefaultOnePassDq;
  }
}

// The one pass's dQ from its writer's sums (attention_hopper_bwd.cuh, FJ_BACKWARD_DQ_CONVERT): a
// block of the dK/dV kernel's threads a query tile of its step (block_n scratch rows), in the
// order of its consumers' accumulators; one kernel for every feature of the dK/dV kernel.
KernelSpec dq_convert_kernel(const KernelSpec& dkdv) {
  KernelSpec spec;
  spec.entry = KernelEntry::kBackwardDqConvert;
  spec.family = KernelFamily::kHopper;
  spec.dtype = dkdv.dtype;
  spec.head_dim_qk = dkdv.head_dim_qk;
  spec.head_dim_v = dkdv.head_dim_v;
  spec.varlen = dkdv.varlen;
  spec.threads = dkdv.threads;
  spec.row_tiles = dkdv.row_tiles;
  spec.stages = dkdv.stages;
  spec.block_n = dkdv.block_n;
  spec.arch = dkdv.arch;
  // Its sums in groups (writer-groups) are added in the kernel, and the atomic sums have no
  // counts: the dK/dV kernel's mode then.
  if (layout::dq_groups(dkdv.dq_diagnostic) > 1 || layout::dq_atomic(dkdv.dq_diagnostic)) {
    spec.dq_diagnostic = dkdv.dq_diagnostic;
  }
  return spec;
}

const KernelSpec& dkdv_kernel(const std::vector<KernelSpec>& specs) {
  for (auto spec = specs.rbegin(); spec != specs.rend(); ++spec) {
    if (spec->entry == KernelEntry::kBackwardDkDv) return *spec;
  }
  throw Error(FJ_ERROR_INTERNAL, "[cuda] a backward without a dK/dV kernel");
}
KernelSpec& dkdv_kernel(std::vector<KernelSpec>& specs) {
  return const_cast<KernelSpec&>(dkdv_kernel(static_cast<const std::vector<KernelSpec>&>(specs)));
}

bool unordered_dq_applies(const KernelTraits& traits) {
  return hopper_applies(traits) && (std::max(traits.head_dim_qk, traits.head_dim_v) <= 64 ||
                                    (traits.head_dim_qk == 128 && traits.head_dim_v == 128));
}

std::vector<KernelSpec> unordered_backward_kernels(const KernelTraits& traits) {
  return backward_kernels(traits, true, kUnorderedDq, kUnorderedWholeSteps);
}

std::vector<KernelSpec> backward_kernels(const KernelTraits& traits, bool one_pass, int dq_mode, int whole_steps) {
  if (hopper_applies(traits)) {
    const KernelSpec prep = hopper_spec(prep_traits(traits), KernelEntry::kBackwardPrep);
    KernelSpec dkdv = hopper_spec(traits, KernelEntry::kBackwardDkDv);
    if (one_pass && std::max(dkdv.head_dim_qk, dkdv.head_dim_v) <= 128) {
      dkdv.one_pass = true;
      dkdv.dq_diagnostic = dq_mode >= 0 ? dq_mode : settings::one_pass_dq();
      // Whole steps of twice the queries at head dim 128 (FLASHJIT_CUDA_ONE_PASS_STEPS=whole, or the
      // caller's whole_steps), where the consumers stage dQ for the writer or add it at once, and
      // shared memory has room.
      const int steps = settings::one_pass_whole_steps(whole_steps);
      if (steps && dkdv.head_dim_qk == 128 &&
          (layout::dq_by_writer(dkdv.dq_diagnostic) || layout::dq_atomic(dkdv.dq_diagnostic))) {
        KernelSpec whole = dkdv;
        whole.whole_steps = steps;
        whole.block_n *= 2;
        // Two Q/dO buffers ahead of the step's own where shared memory has room (atomic: no dQ
        // staging), else one.
        whole.stages = 2;
        // A writer pair's sums: one staging slot where two would leave room for one buffer ahead.
        if (!fits(whole) && layout::dq_by_writer_pair(whole.dq_diagnostic)) {
          whole.dq_slots = 1;
          if (!fits(whole)) whole.dq_slots = layout::kDqStagingSlots;
        }
        if (!fits(whole)) whole.stages = 1;
        // FLASHJIT_CUDA_TRACE=1: the step trace (scripts/trace_backward.py), concurrent steps only.
        whole.trace = steps == 2 && settings::trace_tiles();
        if (fits(whole)) dkdv = whole;
      }
      if (fits(dkdv)) {
        if (layout::dq_converted(dkdv.dq_diagnostic)) return {prep, dkdv, dq_convert_kernel(dkdv)};
        return {prep, dkdv};
      }
      dkdv.one_pass = false;
      dkdv.dq_diagnostic = 0;
    }
    std::vector<KernelSpec> specs = {prep, hopper_spec(traits, KernelEntry::kBackwardDq)};
    if (std::max(dkdv.head_dim_qk, dkdv.head_dim_v) <= 128) {
      if (settings::dkdv_shared_operands()) {
        // P^T and dS^T through shared memory: the registers they held let twice the queries a
        // step fit (head dim 128: 64; 64: 128; with a mask, dropout or softcap: 32 and 64).
        KernelSpec shared = dkdv;
        shared.dkdv_shared = true;
        shared.block_n *= 2;
        // Whole 64-query regions (a swizzled row): masks, dropout and softcap keep their steps.
        if (shared.block_n % 64 == 0 && fits(shared)) dkdv = shared;
      }
      dkdv.dkdv_parts = settings::dkdv_parts() != 0;
      // FLASHJIT_CUDA_BACKWARD_OVERLAP=1: the dQ kernel and this one built to overlap (the plan
      // launches this one programmatically); here, so that precompile builds what calls run.
      // Unset (auto), the plan sets it where the dQ grid is small (overlap_small_grids in
      // backend.cpp), and precompile builds both pairs.
      specs.back().backward_overlap = dkdv.backward_overlap = settings::backward_overlap() == 1;
      specs.push_back(dkdv);
    } else {  // dV and dK each in a kernel of its own, as in the mma.sync backward
      KernelSpec dv = dkdv, dk = dkdv;
      dv.dkdv_part = DkDvPart::kDvOnly;
      dk.dkdv_part = DkDvPart::kDkOnly;
      specs.push_back(dv);
      specs.push_back(dk);
    }
    if (std::all_of(specs.begin(), specs.end(), fits)) return specs;
  }
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
  dv.dkdv_part = DkDvPart::kDvOnly;
  dk.dkdv_part = DkDvPart::kDkOnly;
  return {dq, dv, dk};
}

}  // namespace flashjit::cuda
