// The CUDA backend's environment switches, each read here and nowhere else.
//
// Read once a process (they pick kernel families and grids a process keeps):
//   FLASHJIT_CUDA_HOPPER=0      no sm_90a kernels: the mma.sync ones run instead
//   FLASHJIT_CUDA_PERSISTENT=0  the sm_90a forward runs a block a work tile
//   FLASHJIT_CUDA_MAP_CACHE=0   every TMA descriptor encoded anew (for comparisons of host time)
// Read at every kernel choice (tests and the tuner switch them within a process); a thread keeps
// its recent choices (backend.cpp's ChoiceMemo), and the values it read, until the environment
// changes (environment_version):
//   FLASHJIT_CUDA_TILES         the sm_90a forward's tiles (kernel_spec.hpp, ForwardTiles)
//   FLASHJIT_CUDA_SPLITS        the split forward's key splits, forced (0 or 1: never)
//   FLASHJIT_CUDA_VARLEN=0      a variable-length call as a launch a sequence (default: one launch where it applies)
//   FLASHJIT_CUDA_DECODE_WARPS  the split forward's warps a block for up to 16 query rows (1 or 4), forced
//   FLASHJIT_CUDA_KV_HOPPER=0   a KV cache (in place or paged) on the mma.sync blocks (default on sm_90: the sm_90a split)
//   FLASHJIT_CUDA_TRACE=1       the sm_90a forward prints its work tiles' timestamps (scripts/trace_tiles.py),
//                               the one pass in whole-concurrent steps its steps' (scripts/trace_backward.py)
//   FLASHJIT_CUDA_ONE_PASS_DQ   none or unordered: the one-pass backward without its ordered dQ sums,
//                               for timing only (no dQ is written); eager: ordered sums whose
//                               counts are released at once, by one thread a warpgroup; arrival:
//                               sums in the order the blocks reach a tile (where a head's key
//                               blocks fit the GPU at once; eager elsewhere); writer: the eager
//                               order's sums made by a thread of the producer warpgroup in bulk
//                               copies from dQ staged in shared memory, off the consumers' path;
//                               writer-arrival: arrival's sums by the writer (eager's where
//                               arrival does not apply); writer-eager: the writer's block order,
//                               each count released before the next tile's wait (not after its
//                               copies); writer-groups: the writer's block order, a tile's
//                               visitors summing in four groups by rank (its own bits); atomic:
//                               every visitor adds at once, in no order, into sums the prep kernel
//                               zeroed, dQ then written from them (a real backward, not deterministic);
//                               writer-pair: the writer's block order by two threads taking
//                               alternate tiles, each count released once its copies are complete;
//                               writer-diagonal: writer-pair with tiles walked upward and a tile's
//                               visitors adding from the highest block down; ordered: the
//                               consumers' own adds in block order; unset: writer-pair
//   FLASHJIT_CUDA_ONE_PASS_STEPS whole: the one pass at head dim 128 in steps of 64 queries (32
//                               with a mask, dropout or softcap) whose products take two turns
//                               of their own; carried (default): 32 queries a step (16), its
//                               second products carried into the next step's turn
//   FLASHJIT_CUDA_BACKWARD      one-pass: the sm_90a backward in one pass (dQ formed by the dK/dV
//                               kernel) where it applies; split: dQ and dK/dV kernels; unset: the
//                               tuned choice of the class, else split
//   FLASHJIT_CUDA_OVERLAP=0     a split forward's combine kernel launched after the split kernel
//                               ends (default on sm_90: launched while it runs, waiting for it
//                               on the GPU, under stream capture too; =eager: outside capture only)
//   FLASHJIT_CUDA_DKDV          shared (default): the split sm_90a dK/dV kernel takes P^T and dS^T
//                               from shared memory and twice the queries a step, up to head dim 128;
//                               registers: from registers
//   FLASHJIT_CUDA_DKDV_PARTS    auto (default): a small grouped backward's dK/dV grid takes the
//                               group's query heads in parts; 2, 4, 8: that many; off: none
// FLASHJIT_NVRTC and FLASHJIT_CACHE_DIR are read where NVRTC is loaded (driver.cpp)
// and where the kernel cache finds its directory (kernel_cache.cpp).
#pragma once

#include <cstdint>
#include <optional>

namespace flashjit::cuda::settings {

// A number that changes when the process environment has changed since this thread last asked:
// the environ array and its entries' addresses, compared (setenv, unsetenv and putenv replace an
// entry or the array; Python's os.environ calls them), the strings unread; about 400
// instructions with 40 variables. Values are unique in the process. Not seen: a variable's text
// edited in place through a string given to putenv, and (with a C library whose setenv frees the
// string it replaces, as musl's does; glibc keeps them) a new string at a freed one's address.
uint64_t environment_version();

// While one is open on a thread (a call of the backend, during which the environment does not
// change), environment_version() gives the version found when the outermost one opened: the
// settings and choices a call reads then cost it one look at the environment (about 400
// instructions with 40 variables), not one each.
class EnvironmentScope {
 public:
  EnvironmentScope();
  ~EnvironmentScope();
  EnvironmentScope(const EnvironmentScope&) = delete;
  EnvironmentScope& operator=(const EnvironmentScope&) = delete;
};

// A value read from the environment at each kernel choice, kept by the thread until the
// environment changes (environment_version, once a call: a getenv scans every variable). A read
// that throws (a value the setting does not take) keeps nothing, so the next call throws again.
template <class T>
struct Kept {
  uint64_t version = 0;
  T value{};
};
template <class T, class Read>
T kept(Kept<T>& slot, Read read) {
  const uint64_t now = environment_version();
  if (slot.version != now) {
    slot.value = read();
    slot.version = now;
  }
  return slot.value;
}

bool hopper_kernels();
bool persistent_forward();
// Whether a thread's recently encoded TMA descriptors are reused for the same arguments (default).
bool map_cache();
// The text of FLASHJIT_CUDA_TILES, or nullptr when unset.
const char* forced_tiles();
// FLASHJIT_CUDA_SPLITS as a count of at least 1; nullopt when unset or empty.
std::optional<int> forced_splits();
// A variable-length call in one launch a kernel where the sm_90a kernels take it (the default;
// FLASHJIT_CUDA_VARLEN=0: a launch a sequence, for comparisons).
bool varlen_single_launch();
// FLASHJIT_CUDA_DECODE_WARPS: 1 (mma.sync blocks of one warp over 16 query rows, many blocks
// an SM) or 4 (the split forward's usual blocks: on sm_90 the sm_90a kernel's) where the split
// forward has up to 16 query rows a batch and head; 0 when unset (the backend chooses). Any
// other value raises an error naming the variable.
int decode_warps();
// Whether decoding over a KV cache (in place, or in pages that whole key steps fit) on sm_90 runs
// the sm_90a split forward rather than the mma.sync blocks: yes unless FLASHJIT_CUDA_KV_HOPPER=0,
// or FLASHJIT_CUDA_DECODE_WARPS forces the mma.sync blocks' shape (then only with KV_HOPPER=1);
// another value raises an error naming the variable.
bool kv_cache_hopper();
// Whether a kernel that reads what the kernel before it wrote may be launched while that one
// runs, waiting for it on the GPU (programmatic dependent launch, sm_90): 2 (the default, =1) also
// under stream capture (a programmatic edge in the graph), 1 (=eager) outside stream capture only,
// 0 (=0) never; another value raises an error naming the variable.
int overlap_launches();
// FLASHJIT_CUDA_BACKWARD_OVERLAP: whether the sm_90a split backward's dK/dV kernel is launched
// while its dQ kernel runs (programmatic dependent launch; the two read only the prep kernel's
// rows, so the dK/dV blocks start on the SMs the dQ kernel's last wave leaves idle), within
// FLASHJIT_CUDA_OVERLAP's rule for stream capture. 1: always (1); 0: never (0); unset, empty or
// auto: where the dQ grid is small (-1; the plan decides, kOverlapDqWaves in backend.cpp);
// another value raises an error naming the variable.
int backward_overlap();
// FLASHJIT_CUDA_TRACE=1: the sm_90a forward kernels are built with FJ_TRACE (a diagnostic: a few
// threads of every 16th block keep clock64() at the points of each work tile and print them), and
// so is the one pass's dK/dV kernel in whole-concurrent steps (the first 512 blocks' steps);
// unset, empty or 0: not; another value raises an error naming the variable.
bool trace_tiles();
// FLASHJIT_CUDA_ONE_PASS_DQ (how the one-pass backward sums dQ; "none" and "unordered" are
// timing diagnostics, which write no dQ): "none" (1) skips the dQ sums, "unordered" (2) has every
// block add its share at once, with no order and no count; "ordered" (0) the real backward, each
// block's adds made by its consumers in block order; "eager" (3) the real
// backward with each add's count released right after the adds by one thread (a barrier, then
// a release) rather than at the block's next add; "arrival" (4) the real backward with the adds
// in the order the blocks reach each tile (KeyBlockSpans' arrival order; the plan falls back to 3
// where a head's key blocks cannot all be resident); "writer" (5), "writer-arrival" (6) and
// "writer-eager" (7) those sums by the dQ writer's bulk copies (attention_hopper_bwd.cuh);
// "writer-groups" (8) the writer's sums in four groups by rank; "atomic" (9) the real backward
// with every block's adds made at once, in no order (not deterministic); "writer-pair" (10) the
// writer's block order by two threads taking alternate tiles, each count released as soon as its
// tile's copies are complete; "writer-diagonal" (11) as writer-pair with each block's tiles walked
// upward and a tile's visitors adding from the highest block down. Unset or empty: writer-pair
// (kDefaultOnePassDq; ordered's bits, measured the fastest of them on an H100:
// bench/results/h100-attention-2026-12-07-7691e0f-writers.md). Another value is an error.
constexpr int kDefaultOnePassDq = 10;
constexpr int kDiagonalOnePassDq = 11;
int one_pass_dq();
// FLASHJIT_CUDA_ONE_PASS_STEPS: "whole" (1) gives the one-pass backward at head dim 128 steps
// of twice the queries (64; 32 with a mask, dropout or softcap), each step's products issued in
// two turns of its own (KernelSpec::whole_steps), where its dQ sums are the writer's or atomic and
// shared memory has room; "whole-concurrent" (2) the same steps with no turns between the two
// consumers (dV, then dQ^T, then dK); "carried" (0): each step's second products carried into the
// next step's turn; unset or empty: unset (carried for the deterministic backward; the unordered
// one at head dim 128 asks for whole-concurrent). Another value is an error naming the variable.
int one_pass_whole_steps(int unset = 0);
// FLASHJIT_CUDA_ONE_PASS_SUMS_MIB: the most MiB of float32 dQ sums one launch of the one-pass
// backward holds; a dense problem whose sums pass it runs in parts of whole batch entries or, within
// one, of key/value heads (with their query heads), one after another in the same scratch (the
// backward's peak memory falls by what the parts leave out). Unset or empty: kDefaultOnePassSumsMiB;
// "0" or "off": no limit. Another value is an error naming the variable.
constexpr int64_t kDefaultOnePassSumsMiB = 0;
int64_t one_pass_sums_bytes();
// Whether FLASHJIT_CUDA_ONE_PASS_DQ is set (not empty): a set value wins over a tuned class's
// one-pass-diagonal choice and over the rule that keeps the diagonal order off grouped heads.
bool one_pass_dq_set();
// FLASHJIT_CUDA_BACKWARD=one-pass (true): the sm_90a backward's dK/dV kernel also forms dQ (five
// products a tile instead of seven); "split" (false): the dQ and dK/dV kernels; nullopt when unset
// or empty (the tuned choice, else split, until the one pass is measured on a GPU). Any other
// value raises an error naming the variable.
std::optional<bool> one_pass_backward();
// FLASHJIT_CUDA_DKDV unset or "shared" (true): the split sm_90a dK/dV kernel's P^T and dS^T
// operands go through shared memory (KernelSpec::dkdv_shared; a 2-16% faster backward on an H100,
// bench/NOTES.md); "registers": from registers. Another value is an error.
bool dkdv_shared_operands();
// FLASHJIT_CUDA_DKDV_PARTS: the split sm_90a dK/dV kernel over a GQA group's query heads in parts
// (KernelSpec::dkdv_parts), for grids of fewer key blocks than the GPU has room for (batch 1 with few
// key/value heads): "auto" (-1) as many parts (the smallest divisor of the group) as bring the grid
// to two blocks an SM, none past four, the default (unset; on an H100 the batch-1 backward of a
// 32/4 group at 2k and 4k keys went from 0.54 and 0.69x cuDNN to 0.79 and 0.88x, bench/NOTES.md);
// "2", "4", "8" that many where they divide the group; "off" (0): none. Another value is an error.
int dkdv_parts();

}  // namespace flashjit::cuda::settings
