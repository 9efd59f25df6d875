// KernelSpec: everything baked into one compiled kernel. Its name() spells every
// field; its source() is the full NVRTC program (a prelude of FJ_* macros and the
// embedded .cuh files), and the cache key hashes that source, so changing a .cuh
// file or a field gives a new key by itself.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "core/problem.hpp"
#include "cuda/kernels/shared_layout.h"

namespace flashjit::cuda {

// kBackwardPrep (kHopper only): delta = rowsum(dO * O) and LSE * log2(e) into
// scratch for the dQ and dK/dV kernels. kForwardCombine: merges the partial
// outputs of a split forward (KernelParams::split_o) into O and LSE. kBackwardDqConvert
// (kHopper only): dQ from the float32 sums of the one pass with a dQ writer.
// Each entry is named in the kernel source by a macro of its own (FJ_FORWARD,
// FJ_BACKWARD_DQ, ...: 1 for the kernel's entry, 0 for the others).
enum class KernelEntry {
  kForward,
  kBackwardDq,
  kBackwardDkDv,
  kBackwardPrep,
  kForwardCombine,
  kVarlenTable,
  kBackwardDqConvert
};

// The gradients a dK/dV kernel computes (FJ_WITH_DK, FJ_WITH_DV in its source):
// above head dim 128 dK and dV take a kernel each.
enum class DkDvPart { kBoth, kDvOnly, kDkOnly };

// kSimt: scalar arithmetic in the accumulator type (attention_simt.cuh): float32,
// float64, any alignment. kMma: tensor cores through mma.sync, float16/bfloat16
// (mma_common.cuh, attention_mma.cuh, attention_mma_bwd.cuh). kHopper: sm_90a,
// float16/bfloat16, TMA loads by a producer warpgroup and wgmma by two consumer
// warpgroups (pipeline.cuh, wgmma.cuh, attention_hopper*.cuh); needs TMA
// descriptors of the operands (16-byte aligned rows and strides).
enum class KernelFamily { kSimt, kMma, kHopper };

struct KernelSpec {
  KernelEntry entry = KernelEntry::kForward;
  KernelFamily family = KernelFamily::kSimt;
  fj_dtype dtype = FJ_FLOAT32;
  int head_dim_qk = 0;  // padded sizes compiled in; the true sizes are parameters
  int head_dim_v = 0;
  MaskKind mask = MaskKind::kNone;
  fj_dtype mask_dtype = FJ_BOOL;
  bool window = false;  // causal or sliding-window bounds
  bool dropout = false;
  bool softcap = false;
  bool aligned = false;  // 16-byte aligned rows: cp.async loads (kMma)
  bool split = false;    // kMma or kHopper forward over spans of keys, writing partials (KernelParams::split_o)
  // kHopper forward over a variable-length batch in one launch (KernelParams::varlen; O by the threads).
  bool varlen = false;
  // kMma forward over a KV cache in one launch (FJ_KV_CACHE): 1, each batch entry's own key
  // count (KernelParams::seqused_k); 2, and its keys through a page table. 0: neither.
  int kv_cache = 0;
  // Edge tiles of kernels with bounds take the two-sided column test even where the left bound
  // is absent (FJ_EDGE_GENERAL; FLASHJIT_CUDA_TILES "edges=general", for comparisons).
  bool edge_general = false;
  // Every consumer warpgroup of a kHopper forward work tile runs all the block's key tiles, also
  // those past its own rows' last visible key (FJ_BLOCK_SPAN; FLASHJIT_CUDA_TILES "span=block",
  // for comparisons); by default a warpgroup stops at its own last tile and only takes turns.
  bool block_span = false;
  // kHopper forward whose work tiles run on into each other (FJ_CHAIN_TILES; FLASHJIT_CUDA_TILES
  // "chain=tiles"): a tile's last P V is issued with the next tile's S_0 and its output written
  // after them. Only where O leaves by TMA from two Q buffers, unsplit, dense (chains_tiles()).
  bool chain_tiles = false;
  // kHopper forward whose producer takes its next work tile, and loads that tile's Q, once it has
  // issued the last K of a tile of more key tiles than K/V buffers (FJ_EARLY_NEXT;
  // FLASHJIT_CUDA_TILES "next=early"), so that Q and the tile counter's round trip are off the
  // path between two work tiles; by default after the tile's last V. Not yet run on a GPU.
  bool early_next = false;
  // kHopper forward whose producer works out each work tile's block (batch, head, query rows,
  // visible keys: QueryBlock) once and hands it to the consumers with the tile (FJ_PRODUCER_SETUP;
  // FLASHJIT_CUDA_TILES "setup=producer"), so that their ~150 instructions of setup between two
  // tiles (three integer divisions among them) leave the path between them. Measured on an H100:
  // 1.02-1.07x the default at head dim 64 N 1k, 0.91-0.95x at 128 (bench/NOTES.md).
  bool producer_setup = false;
  // kHopper forward whose softmax takes exp2 of exp_poly of every 16 eight-column groups of P from
  // a polynomial on the FMA units instead of the MUFU (FJ_EXP_POLY, softmax.cuh poly_exp2;
  // FLASHJIT_CUDA_TILES "poly=k", 0..8): at head dim 64 a step's exps keep the MUFU as busy as
  // its products keep the tensor cores. 0, the default: every exp on the MUFU.
  int exp_poly = 0;
  // kHopper forward whose producer waits for free buffers suspended (a try_wait suspend-time hint,
  // FJ_PRODUCER_SUSPEND; FLASHJIT_CUDA_TILES "wait=suspend") instead of retrying.
  bool producer_suspend = false;
  // kHopper forward with FJ_TRACE: timestamps of each work tile printed (settings::trace_tiles).
  bool trace = false;
  // The one-pass backward's dQ sums (FJ_DQ_DIAGNOSTIC; settings::one_pass_dq): 0 the ordered adds;
  // 1 none; 2 every block adds at once, in no order (1 and 2 for timing only: they write no dQ);
  // 3 the ordered adds, each count released right after them (FLASHJIT_CUDA_ONE_PASS_DQ=eager);
  // 4 as 3, in the arrival order (=arrival; only where a head's key blocks are resident at once);
  // 5 as 3, the adds, waits and counts made by a writer thread of the producer warpgroup in bulk
  // copies from dQ staged in shared memory, each count released after the next tile's copies
  // (=writer); 6 as 4, by the writer (=writer-arrival; 5 where 4 would be 3); 7 as 5, each count
  // released before the next tile's wait (=writer-eager); 8 as 5, a tile's visitors summing in
  // layout::kDqGroups groups by rank, added together by the convert kernel (=writer-groups); 9
  // every block adds at once, in no order, into sums the prep kernel zeroed, dQ then written by the
  // convert kernel (=atomic: a real backward, not deterministic); 10 as 5 by two writer threads
  // taking alternate tiles, each count released once the tile's copies are complete (=writer-pair);
  // 11 as 10 with tiles walked upward and a tile's visitors adding from the highest block down
  // (=writer-diagonal).
  int dq_diagnostic = 0;
  // kHopper forward over a paged KV cache (kv_cache 2) whose pages are shorter than a key step:
  // TMA boxes a key tile, one a page (FJ_PAGE_BOXES; 1: a key tile lies in one page).
  int page_boxes = 1;
  int threads = 128;
  int row_tiles = 1;  // kMma: 16-row tiles each warp owns
  DkDvPart dkdv_part = DkDvPart::kBoth;  // dK/dV (kMma, kHopper)
  // kHopper dK/dV that also forms dQ (FJ_ONE_PASS; attention_hopper_bwd.cuh): five products a
  // tile pair, dQ summed in float32 in a fixed order (KernelParams::dq_accum, dq_semaphore).
  bool one_pass = false;
  // kHopper one-pass dK/dV at head dim 128 whose steps are whole (FJ_WHOLE_STEPS;
  // settings::one_pass_whole_steps): S^T and dP^T in one turn, then dV, dK and dQ^T of the same
  // step in a second, nothing carried into the next step's turn, so that the registers of a step
  // of twice the queries fit (block_n 64), with one or two Q/dO buffers ahead and two dS buffers; 0: not,
  // 1: in turns, 2: concurrent (no turns between the consumers).
  int whole_steps = 0;
  // kHopper one-pass dK/dV whose dQ a pair of writers adds (writer-pair, writer-diagonal): the
  // staging slots of each consumer (FJ_DQ_SLOTS); 2 (a writer thread a slot, on alternate tiles), or
  // 1 where that gives whole steps room for two Q/dO buffers ahead (one writer thread, each tile's
  // slot freed once its copies have read it).
  int dq_slots = layout::kDqStagingSlots;
  // kHopper split dK/dV (both parts, head dims up to 128) whose dV and dK products read P^T and
  // dS^T from shared memory (written by each warp after its gradient) instead of registers, so
  // that twice the queries a step fit (FJ_DKDV_SHARED; settings::dkdv_shared_operands).
  bool dkdv_shared = false;
  // kHopper split dK/dV (both parts, two consumer warpgroups, dense) over a GQA group's query
  // heads in parts, KernelParams::dkdv_parts blocks a key block, their float32 sums added in part
  // order by the last to finish (FJ_DKDV_PARTS; settings::dkdv_parts). Where it does not apply: 0.
  bool dkdv_parts = false;
  // kHopper split backward's dQ and dK/dV kernels of a FLASHJIT_CUDA_BACKWARD_OVERLAP call
  // (FJ_BACKWARD_OVERLAP; settings::backward_overlap): the dQ kernel lets the dK/dV kernel, launched
  // programmatically after it, start once all its blocks have begun, and the dK/dV kernel's blocks
  // end only after the dQ kernel has.
  bool backward_overlap = false;
  int stages = 1;     // kHopper: buffers in each ring of streamed tiles
  int q_buffers = 1;  // kHopper forward: Q tile buffers (2: the next work tile's Q loads during this one)
  bool o_tma = false; // kHopper forward: O leaves through shared memory (the Q buffer) by TMA stores
  // kHopper forward without softcap or additive mask, for a positive scale: the
  // scale multiplies inside the exponent (softmax.cuh, kFoldScale).
  bool fold_scale = false;
  // kHopper forward without dropout: a row's base moves only when its maximum
  // grows past a slack, so O is rarely rescaled (softmax.cuh, kRebaseSlack).
  bool lazy_rescale = false;
  int block_n = 32;   // rows of the streamed operand per step
  int arch = 0;       // 90 for sm_90

  std::string name() const;
  // Every field above as integers, in order (chain_tiles where it applies): what name() spells,
  // without building a string (the loaded functions are found by it on every call). Specs of
  // different names have different fields (ctest KernelSelection.SpecFieldsTellApartWhatNamesDo
  // changes each field of each spec the choosers make, one at a time); fields may tell apart a
  // little more than names do (a mask dtype without a mask), which costs a module load at most.
  static constexpr size_t kFieldCount = 40;
  using Fields = std::array<int32_t, kFieldCount>;
  Fields fields() const;
  const char* function_name() const;
  std::string source() const;
  std::vector<std::string> compile_options() const;
  // Rows of q (forward, dQ) or of k (dK/dV) one block owns.
  int block_rows() const;
  // Warps that hold rows (kHopper: the consumer warps; threads also counts the producer).
  int row_warps() const;
  int shared_memory_bytes() const;
  bool chains_tiles() const {
    return chain_tiles && family == KernelFamily::kHopper && entry == KernelEntry::kForward && o_tma &&
           q_buffers == 2 && !split && !varlen && kv_cache == 0;
  }
  // Where the next work tile can be taken early: a dense unsplit kHopper forward with two Q
  // buffers whose tiles do not chain (a chained tile frees its Q buffer only after its last P V).
  bool next_early_applies() const {
    return family == KernelFamily::kHopper && entry == KernelEntry::kForward && q_buffers == 2 && !chains_tiles() &&
           !split && !varlen && kv_cache == 0;
  }
  // early_next where it applies (what name() spells and fields() holds).
  bool takes_next_early() const { return next_early_applies() && early_next; }
  // producer_setup where it applies: the kHopper forward, whatever its tiles and variant.
  bool sets_up_in_producer() const {
    return producer_setup && family == KernelFamily::kHopper && entry == KernelEntry::kForward;
  }
  // whole_steps where it applies: the kHopper one-pass dK/dV kernel (what name() spells and
  // fields() holds).
  int takes_whole_steps() const {
    return one_pass && family == KernelFamily::kHopper && entry == KernelEntry::kBackwardDkDv ? whole_steps : 0;
  }
  // dq_slots where it applies: the kHopper one-pass dK/dV kernel with a writer pair's sums (what
  // name() spells and fields() holds).
  int takes_dq_slots() const {
    return one_pass && family == KernelFamily::kHopper && entry == KernelEntry::kBackwardDkDv &&
                   layout::dq_by_writer_pair(dq_diagnostic)
               ? dq_slots
               : layout::kDqStagingSlots;
  }
  // dkdv_parts where it applies (what name() spells and fields() holds).
  bool takes_parts() const {
    return dkdv_parts && family == KernelFamily::kHopper && entry == KernelEntry::kBackwardDkDv && !one_pass &&
           !varlen && dkdv_part == DkDvPart::kBoth && threads == (8 + 4) * 32;
  }
  // backward_overlap where it applies: the kHopper split backward's dQ kernel and its dK/dV kernel
  // of both parts (what name() spells and fields() holds).
  bool overlaps_launch() const {
    return backward_overlap && family == KernelFamily::kHopper && !one_pass && !varlen &&
           dkdv_part == DkDvPart::kBoth && (entry == KernelEntry::kBackwardDq || entry == KernelEntry::kBackwardDkDv);
  }
  // producer_suspend where it applies: the kHopper forward, whatever its tiles and variant.
  bool suspends_producer() const {
    return producer_suspend && family == KernelFamily::kHopper && entry == KernelEntry::kForward;
  }
  // exp_poly where it applies: the kHopper forward, whatever its tiles and variant.
  int poly_groups() const { return family == KernelFamily::kHopper && entry == KernelEntry::kForward ? exp_poly : 0; }
};

// What a call needs compiled, independent of sizes and pointers.
struct KernelTraits {
  fj_dtype dtype = FJ_FLOAT32;
  int head_dim_qk = 0;
  int head_dim_v = 0;
  MaskKind mask = MaskKind::kNone;
  fj_dtype mask_dtype = FJ_BOOL;
  bool window = false;
  bool dropout = false;
  bool softcap = false;
  bool positive_scale = true;  // scale * log2(e) a normal positive float (kernels may fold it into the exponent)
  // Every q/k/v row starts 16-byte aligned and head dims are multiples of 8.
  bool aligned = true;
  // TMA descriptors can address q, k, v (and dout): kHopper kernels may be chosen.
  bool tma = true;
  int arch = 0;
};

KernelTraits traits_of(const AttentionProblem& problem, int arch);
// Every field of KernelTraits as integers, in order (for comparing traits whole).
constexpr size_t kTraitsFieldCount = 12;
std::array<int32_t, kTraitsFieldCount> traits_fields(const KernelTraits& traits);

// A forced tile configuration of the sm_90a forward, from FLASHJIT_CUDA_TILES
// ("n=128,stages=2,q=2,o=tma,groups=2,softmax=fast"; any subset of the keys, for
// comparisons and the tuner). Zero or -1 fields are not forced. Read at every
// kernel choice, so that a benchmark can switch it between calls; a malformed
// value raises an error naming the key and what it accepts.
struct ForwardTiles {
  int block_n = 0;    // keys a step: a multiple of 16, 16..256
  int stages = 0;     // K and V ring buffers: 1..4
  int q_buffers = 0;  // 1 or 2
  int o_tma = -1;     // 1: O by TMA stores ("o=tma"); 0: direct stores ("o=direct")
  int groups = 0;     // consumer warpgroups: 2, or 3 (head dims up to 64)
  int fast_softmax = -1;  // 0 ("softmax=plain"): neither fold_scale nor lazy_rescale; 1: where they apply
  // The persistent grid's tile counter, a launch choice rather than a tile: 1
  // ("counter=stream"): the stream's own, which the kernel leaves at zero; 0
  // ("counter=memset"): scratch zeroed before each launch.
  int stream_counter = -1;
  int edge_general = -1;  // 1 ("edges=general"): the two-sided edge test (KernelSpec::edge_general)
  int block_span = -1;    // 1 ("span=block"): every warpgroup the block's tiles (KernelSpec::block_span)
  // The persistent grid's schedule, a launch choice too: 1 ("sched=static"): block i takes one
  // tile a round of grid tiles in a snake's order, with no counter (next_tile; also under
  // stream capture, where a counter cannot be had); 0 ("sched=counter"): from the counter.
  int static_tiles = -1;
  // 1 ("chain=tiles"): work tiles run on into each other (KernelSpec::chain_tiles), on top of
  // the tiles in force (tuned or forced), where the kernel can (o=tma, two Q buffers, unsplit).
  int chain_tiles = -1;
  // 1 ("next=early"): the next work tile taken once a tile's last K is issued
  // (KernelSpec::early_next), on top of the tiles in force; 0 ("next=late"): after its last V,
  // the default.
  int early_next = -1;
  // 1 ("setup=producer"): each work tile's block worked out by the producer and handed over
  // (KernelSpec::producer_setup), on top of the tiles in force; 0 ("setup=consumer"): each
  // consumer warpgroup works it out, the default.
  int producer_setup = -1;
  // k ("poly=k", 0..8): exp2 of k of every 16 eight-column groups of P by a polynomial
  // (KernelSpec::exp_poly), on top of the tiles in force; "poly=0": every exp on the MUFU.
  int exp_poly = -1;
  // 1 ("wait=suspend"): the producer's waits suspended (KernelSpec::producer_suspend), on top of the
  // tiles in force; 0 ("wait=spin"): retried, the default.
  int producer_suspend = -1;
  // Whether any key that applies on top of the tiles in force is set.
  bool sets_keys_on_top() const {
    return chain_tiles >= 0 || early_next >= 0 || producer_setup >= 0 || exp_poly >= 0 || producer_suspend >= 0;
  }
  // Whether a kernel's tiles are forced (they then replace the tuned choice whole); the
  // launch choices (counter, sched) and chain leave the tiles as they are.
  bool forced() const {
    return block_n || stages || q_buffers || o_tma >= 0 || groups || fast_softmax >= 0 || edge_general >= 0 ||
           block_span >= 0;
  }
};
ForwardTiles parse_forward_tiles(const char* text);
ForwardTiles forced_forward_tiles();
// The kernels for a problem's traits; each fits the opt-in shared memory of traits.arch.
// Whether the traits take the sm_90a (kHopper) kernels: sm_90, half types, head
// dims 33-256, operands TMA can address.
bool hopper_applies(const KernelTraits& traits);
// tuned: a measured tile choice for the problem's class (tuning.hpp), taken for
// the sm_90a forward unless FLASHJIT_CUDA_TILES forces one; ignored where it cannot run.
KernelSpec forward_kernel(const KernelTraits& traits, const ForwardTiles& tuned = ForwardTiles{});
// The split forward and its combine kernel, for problems with too few query
// blocks to fill the GPU. split_forward_kernel's is a kMma kernel without dropout
// (hopper_split_kernel below makes sm_90's); where the traits allow none (other
// dtypes, dropout, no fit), the returned spec has split == false.
// With one_warp, query_rows (a batch and head's, GQA groups packed), where given and at
// most 16, takes blocks of one warp and one 16-row tile.
KernelSpec split_forward_kernel(const KernelTraits& traits, int64_t query_rows = 0, bool one_warp = false);
// The sm_90a forward `forward` (forward_kernel's kHopper spec) as a split forward: its work
// tiles split by split, float partials for the combine kernel, no output TMA. split ==
// false for another family or with dropout.
KernelSpec hopper_split_kernel(const KernelSpec& forward);
// hopper_split_kernel's spec over a KV cache (FJ_KV_CACHE): in place (page_size 0), or in pages
// of page_size keys, whose key tiles must each lie in one page (block_n lowered to the page
// size where that divides it). split == false where neither holds.
KernelSpec hopper_kv_cache_kernel(const KernelSpec& forward, int64_t page_size);
KernelSpec combine_kernel(const KernelTraits& traits);
KernelSpec varlen_table_kernel(const KernelTraits& traits);
// The backward's kernels in launch order. one_pass: where the sm_90a kernels apply at head dims
// up to 128, the prep kernel and a dK/dV kernel that also forms dQ (KernelSpec::one_pass), and
// with a dQ writer or atomic adds (layout::dq_converted) the kernel that writes dQ from its sums
// after it. dq_mode: the one pass's dQ sums (KernelSpec::dq_diagnostic); -1, FLASHJIT_CUDA_ONE_PASS_DQ's.
// whole_steps: the steps at head dim 128 (KernelSpec::whole_steps) where FLASHJIT_CUDA_ONE_PASS_STEPS
// is unset.
std::vector<KernelSpec> backward_kernels(const KernelTraits& traits, bool one_pass = false, int dq_mode = -1,
                                         int whole_steps = 0);
// The one pass's unordered dQ adds (dq_diagnostic 9) where they measured faster than the
// deterministic backward chosen otherwise: the sm_90a kernels at head dims up to 64 (on the H100
// +6-17% in every head-dim-64 problem of bench/gpu_attention.py), and at head dim 128 in whole
// steps with two Q/dO tiles ahead (kUnorderedWholeSteps; on the H100 +10-14% over the split
// backward at N 4k/16k, bench/results/h100-attention-2026-12-07-4c22410-writer-red.md; in carried
// steps no faster).
bool unordered_dq_applies(const KernelTraits& traits);
constexpr int kUnorderedWholeSteps = 2;
// The kernels of that backward (where unordered_dq_applies).
std::vector<KernelSpec> unordered_backward_kernels(const KernelTraits& traits);
constexpr int kUnorderedDq = 9;
// The dK/dV kernel of backward_kernels' list (the last one: dK alone where dV and dK take two).
const KernelSpec& dkdv_kernel(const std::vector<KernelSpec>& specs);
KernelSpec& dkdv_kernel(std::vector<KernelSpec>& specs);
// The one pass's arrival order (dq_diagnostic 4, or 6 by the dQ writer) has a head's key blocks
// wait on one another in both directions, so they must all be resident at once: where a head (of
// the longest sequence) has more key blocks than the GPU has multiprocessors (one such block an
// SM), the kernel becomes the eager block-order one (3, or 5 by the writer), whose blocks wait only
// on blocks launched before them.
void keep_blocks_resident(KernelSpec& dkdv, int64_t key_blocks_a_head, int multiprocessors);
// The diagonal order (dq_diagnostic 11) chosen by a class's tuning (FLASHJIT_CUDA_ONE_PASS_DQ
// unset) becomes writer-pair (10) where query heads share key/value heads: a grouped block walks
// its group's heads at each tile, so the highest-first launch leaves the longest chains for the
// last wave (on an H100 20-29% slower than writer-pair at GQA 32/8,
// bench/results/h100-attention-2026-12-07-7691e0f-writers.md).
void keep_diagonal_off_groups(KernelSpec& dkdv, bool grouped);
// Opt-in shared memory a block may use on a compute capability (80 for sm_80).
int max_shared_memory_bytes(int arch);

}  // namespace flashjit::cuda
