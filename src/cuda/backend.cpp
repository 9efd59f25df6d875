// The CUDA backend: fills KernelParams from the problem, picks the kernels for
// its traits, and launches them on the caller's stream. Nothing here
// synchronises the device.
#include "core/backend.hpp"

#include <algorithm>
#include <numeric>
#include <array>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "core/dtype.hpp"
#include "core/error.hpp"
#include "cuda/driver.hpp"
#include "cuda/kernel_cache.hpp"
#include "cuda/kernel_spec.hpp"
#include "cuda/settings.hpp"
#include "cuda/tuning.hpp"
#include "cuda/kernels/params.cuh"
#include "cuda/kernels/shared_layout.h"

namespace flashjit::cuda {
namespace {

KernelOperand operand(const Operand& from) {
  return KernelOperand{from.data, from.stride_batch, from.stride_head, from.stride_seq};
}

int checked_int(int64_t value, const char* what) {
  if (value > std::numeric_limits<int>::max()) {
    throw_unsupported("[cuda] ", what, " = ", value, " is larger than the CUDA kernels support (2^31 - 1)");
  }
  return int(value);
}

KernelParams params_of(const AttentionProblem& p) {
  KernelParams params{};
  params.q = operand(p.q);
  params.k = operand(p.k);
  params.v = operand(p.v);
  params.o = operand(p.o);
  params.dout = operand(p.dout);
  params.dq = operand(p.dq);
  params.dk = operand(p.dk);
  params.dv = operand(p.dv);
  params.lse = KernelOperand{p.lse, p.lse_stride_batch, p.lse_stride_head, p.lse_stride_seq};
  params.mask = p.mask;
  for (int d = 0; d < 4; ++d) params.mask_stride[d] = p.mask_stride[d];
  params.batch = checked_int(p.batch, "batch");
  params.heads_q = checked_int(p.heads_q, "query heads");
  params.heads_kv = checked_int(p.heads_kv, "key/value heads");
  params.group_size = checked_int(p.group_size(), "group size");
  params.seqlen_q = checked_int(p.seqlen_q, "query length");
  params.seqlen_k = checked_int(p.seqlen_k, "key length");
  params.head_dim_qk = checked_int(p.head_dim_qk, "head dim");
  params.head_dim_v = checked_int(p.head_dim_v, "value head dim");
  params.scale = p.scale;
  params.softcap = p.softcap;
  params.window_left = p.window_left;
  params.window_right = p.window_right;
  params.diagonal_shift = p.diagonal_shift;
  params.dropout_seed = p.dropout_seed;
  params.dropout_offset = p.dropout_offset;
  params.dropout_seed_words = p.dropout_seed_words;
  params.dropout_threshold = p.dropout_threshold;
  params.dropout_keep_scale = p.has_dropout() ? 1.0 / (1.0 - p.dropout_p) : 1.0;
  params.dropout_head_base = p.dropout_index(0, 0);  // the kernels add b * heads_q + h
  return params;
}

struct Launch {
  CUstream stream = nullptr;
  int device_index = 0;
  bool capturing = false;  // the stream is capturing a graph: kernels not compiled yet are an error
  // The choices of a call recorded into a graph: no scratch of flashjit's own (no split
  // forward, no persistent grid's counter; the backward's scratch the caller's workspace
  // where one is given). Under capture, with a workspace, and for fj_attention_prepare_*.
  bool graph_safe = false;
  bool planning = false;  // fj_attention_prepare_*: plan, load kernels, enqueue nothing
  int arch = 0;
  // fj_attention_options.launch: the kernels go to the caller's launcher, nothing to the stream.
  decltype(AttentionProblem::launch) launcher = nullptr;
  void* launcher_data = nullptr;
};

CUmemoryPool scratch_pool(int device_index);

Launch prepare(const AttentionProblem& p) {
  const int64_t max_head_dim = std::max(p.head_dim_qk, p.head_dim_v);
  if (max_head_dim > 256) {
    throw_unsupported("[cuda] head dims up to 256 are supported, got ", max_head_dim);
  }
  Launch launch;
  launch.device_index = p.device_index;
  launch.stream = static_cast<CUstream>(p.stream);
  activate_device(p.device_index);
  launch.arch = device_info(p.device_index).arch;
  if (launch.arch < 80) {
    throw_unsupported("[cuda] flashjit needs compute capability 8.0 or newer; device ", p.device_index, " (",
                      device_info(p.device_index).name, ") is sm_", launch.arch);
  }
  int status = kStreamCaptureStatusNone;
  check(driver().cuStreamIsCapturing(launch.stream, &status), "cuStreamIsCapturing");
  launch.capturing = status != kStreamCaptureStatusNone;
  launch.launcher = p.launch;  // checked by run_parts (a call's, not its planning's)
  launch.launcher_data = p.launch_data;
  launch.graph_safe = launch.capturing || p.workspace != nullptr;
  if (!launch.graph_safe) {
    try {
      scratch_pool(launch.device_index);
    } catch (const Error&) {
      // Said where scratch is needed; the forward runs without it.
    }
  }
  return launch;
}

// A traced kernel's launch (KernelSpec::trace, FLASHJIT_CUDA_TRACE=1; a diagnostic that waits for
// the GPU): the trace buffer zeroed before, then read back and printed to stderr, a line a row of
// each traced thread: "FJT <block> <slot> <row> <fields>". The forward (attention_hopper.cuh,
// TileTrace): every kTraceEvery-th block, a row a work tile, its steps and six clock64() points,
// slot 0 the producer, 1.. the consumer warpgroups. The one pass's dK/dV kernel
// (attention_hopper_bwd.cuh, StepTrace): the first kBackwardTraceBlocks blocks, a row a step and a
// last row, eight fields each.
void run_traced(const KernelSpec& spec, CUfunction function, const Launch& launch, KernelParams& params,
                int64_t blocks, void** arguments) {
  const Driver& d = driver();
  const bool steps = spec.entry == KernelEntry::kBackwardDkDv;
  const int64_t every = steps ? 1 : kTraceEvery;
  const int64_t rows = steps ? kBackwardTraceSteps + 1 : kTraceTiles;
  const int64_t printed = steps ? kTraceFields : kTraceFields - 1;
  const int64_t traced = steps ? std::min<int64_t>(blocks, kBackwardTraceBlocks) : (blocks + every - 1) / every;
  const size_t values = size_t(traced) * kTraceSlots * rows * kTraceFields;
  CUdeviceptr buffer = 0;
  check(d.cuMemAllocFromPoolAsync(&buffer, values * sizeof(long long), scratch_pool(launch.device_index),
                                  launch.stream),
        "cuMemAllocFromPoolAsync (trace)");
  std::vector<long long> host(values, 0);
  try {
    check(d.cuMemcpyHtoDAsync(buffer, host.data(), values * sizeof(long long), launch.stream), "trace");
    params.trace = reinterpret_cast<long long*>(buffer);
    check(d.cuLaunchKernel(function, unsigned(blocks), 1, 1, unsigned(spec.threads), 1, 1,
                           unsigned(spec.shared_memory_bytes()), launch.stream, arguments, nullptr),
          spec.name().c_str());
    check(d.cuMemcpyDtoHAsync(host.data(), buffer, values * sizeof(long long), launch.stream), "trace");
  } catch (const Error&) {
    params.trace = nullptr;
    d.cuMemFreeAsync(buffer, launch.stream);
    throw;
  }
  params.trace = nullptr;
  check(d.cuMemFreeAsync(buffer, launch.stream), "trace");
  check(d.cuStreamSynchronize(launch.stream), "trace");
  std::fprintf(stderr, "FJT kernel %s blocks %lld\n", spec.name().c_str(), static_cast<long long>(blocks));
  std::string line;
  for (int64_t index = 0; index < traced * kTraceSlots * rows; ++index) {
    const long long* row = host.data() + index * kTraceFields;
    // A row not reached: the forward's first two points, any field of the one pass's.
    if (steps ? std::all_of(row, row + kTraceFields, [](long long v) { return v == 0; }) : row[1] == 0 && row[2] == 0) {
      continue;
    }
    const int64_t tile = index % rows, slot = index / rows % kTraceSlots;
    const int64_t block = index / rows / kTraceSlots * every;
    line = str_cat("FJT ", block, " ", slot, " ", tile);
    for (int64_t field = 0; field < printed; ++field) line += str_cat(" ", row[field]);
    std::fprintf(stderr, "%s\n", line.c_str());
  }
}

// programmatic: launched while the stream's previous kernel runs (programmatic dependent launch),
// for kernels that wait for it on the GPU before reading what it wrote (griddepcontrol.wait);
// a plain launch where the driver has no cuLaunchKernelEx.
void run(const KernelSpec& spec, CUfunction function, const Launch& launch, KernelParams& params,
         int64_t blocks, int blocks_y = 1, bool programmatic = false) {
  if (blocks == 0) return;
  if (blocks > std::numeric_limits<int>::max()) {
    throw_unsupported("[cuda] ", blocks, " thread blocks is more than one launch takes (2^31 - 1)");
  }
  void* arguments[] = {&params};
  if (launch.launcher != nullptr) {  // the caller's launcher records it
    const unsigned grid[3] = {unsigned(blocks), unsigned(blocks_y), 1};
    const unsigned block[3] = {unsigned(spec.threads), 1, 1};
    const int status = launch.launcher(launch.launcher_data, function, grid, block,
                                       unsigned(spec.shared_memory_bytes()), arguments);
    if (status != 0) throw_value_error("[cuda] launch: returned ", status, " for ", spec.name());
    return;
  }
  // (A grid of more than 64k blocks, a block a tile, is launched untraced: its buffer would be large.)
  if (spec.trace && blocks_y == 1 && !launch.capturing && blocks <= 65536) {
    run_traced(spec, function, launch, params, blocks, arguments);
    return;
  }
  const Driver& d = driver();
  CUresult status = 0;
  if (programmatic && d.cuLaunchKernelEx != nullptr) {
    LaunchAttribute overlap{};
    overlap.id = kLaunchAttrProgrammaticStreamSerialization;
    overlap.value.programmatic_stream_serialization_allowed = 1;
    const LaunchConfig config{unsigned(blocks),
                              unsigned(blocks_y),
                              1,
                              unsigned(spec.threads),
                              1,
                              1,
                              unsigned(spec.shared_memory_bytes()),
                              launch.stream,
                              &overlap,
                              1};
    status = d.cuLaunchKernelEx(&config, function, arguments, nullptr);
  } else {
    status = d.cuLaunchKernel(function, unsigned(blocks), unsigned(blocks_y), 1, unsigned(spec.threads), 1, 1,
                              unsigned(spec.shared_memory_bytes()), launch.stream, arguments, nullptr);
  }
  if (status != 0) check(status, spec.name().c_str());  // the name is built only on failure
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

KernelTraits traits_for_launch(const AttentionProblem& p, const Launch& launch) {
  KernelTraits traits = traits_of(p, launch.arch);
  traits.tma = traits.tma && settings::hopper_kernels();  // FLASHJIT_CUDA_HOPPER=0: the mma.sync kernels
  return traits;
}

// The TMA descriptors this thread encoded: cuTensorMapEncodeTiled (1.6 µs of host time a map
// on the H200's host) is a function of its arguments alone, and loops of calls pass the same
// ones again (decoding steps against one cache; a training step's layers, whose activations the
// caching allocators place alike from one step to the next). A call reads up to 12 maps (the
// backward's 8, the forward's 4), which differ in their addresses alone, 256-byte aligned: the
// arguments are hashed with a full avalanche, into sets of kWays maps each, the least recently
// used of a set replaced. Allocated on a thread's first encode (kSets * kWays * 256 bytes: 128 KiB).
class MapCache {
 public:
  static constexpr size_t kKeyWords = 9;  // address, sizes, stride bytes, box rows
  bool find(const uint64_t (&key)[kKeyWords], TensorMap* map) {
    Entry* set = set_of(key);
    for (int way = 0; way < kWays; ++way) {
      if (set[way].valid && std::memcmp(set[way].key, key, sizeof key) == 0) {
        *map = set[way].map;
        std::rotate(set, set + way, set + way + 1);  // most recently used first
        return true;
      }
    }
    return false;
  }
  void insert(const uint64_t (&key)[kKeyWords], const TensorMap& map) {
    Entry* set = set_of(key);
    std::rotate(set, set + kWays - 1, set + kWays);  // the least recently used comes first, replaced
    std::memcpy(set[0].key, key, sizeof key);
    set[0].map = map;
    set[0].valid = true;
  }

 private:
  static constexpr int kWays = 4;
  static constexpr size_t kSets = 128;
  struct Entry {
    TensorMap map;            // first: 128 bytes aligned to 64, then the key without padding
    uint64_t key[kKeyWords];  // compared bytewise
    bool valid = false;
  };
  static_assert(sizeof(Entry) == 256, "a descriptor, its key and a flag in 256 bytes");
  Entry* set_of(const uint64_t (&key)[kKeyWords]) {
    uint64_t hash = 0;
    for (const uint64_t word : key) {  // splitmix64's finaliser over the running hash and each word
      hash += word + 0x9e3779b97f4a7c15ull;
      hash = (hash ^ (hash >> 30)) * 0xbf58476d1ce4e5b9ull;
      hash = (hash ^ (hash >> 27)) * 0x94d049bb133111ebull;
      hash ^= hash >> 31;
    }
    return &entries_[(hash % kSets) * kWays];
  }
  std::vector<Entry> entries_ = std::vector<Entry>(kSets * kWays);
};

MapCache& map_cache() {
  thread_local std::unique_ptr<MapCache> cache;
  if (!cache) cache = std::make_unique<MapCache>();
  return *cache;
}

// The TMA descriptor of a 16-bit operand [batch, heads, seqlen, dim]: boxes of
// 64 columns (128 bytes, the wgmma swizzle's width) x box_rows rows, zeros
// outside the operand. False where TMA cannot address it (strides not
// multiples of 16 bytes, zero strides of broadcast dims, a driver without TMA).
bool encode_tensor_map(TensorMap* map, const Operand& x, int64_t batch, int64_t heads, int64_t seqlen,
                       int64_t dim, int box_rows) {
  const Driver& d = driver();
  if (d.cuTensorMapEncodeTiled == nullptr) return false;
  constexpr int64_t kElementBytes = 2;
  const uint64_t sizes[4] = {uint64_t(dim), uint64_t(seqlen), uint64_t(heads), uint64_t(batch)};
  const int64_t strides[3] = {x.stride_seq, x.stride_head, x.stride_batch};
  uint64_t stride_bytes[3];
  for (int i = 0; i < 3; ++i) {
    if (sizes[i + 1] == 1) {
      // Never stepped along: any valid stride does; take a packed layout's.
      stride_bytes[i] =
          i == 0 ? uint64_t((dim * kElementBytes + 15) / 16 * 16) : stride_bytes[i - 1] * sizes[i];
      continue;
    }
    const int64_t bytes = strides[i] * kElementBytes;
    if (bytes <= 0 || bytes % 16 != 0 || bytes >= (int64_t(1) << 40)) return false;
    stride_bytes[i] = uint64_t(bytes);
  }
  for (uint64_t size : sizes) {
    if (size == 0 || size > (uint64_t(1) << 32)) return false;
  }
  const uint64_t key[MapCache::kKeyWords] = {uint64_t(reinterpret_cast<uintptr_t>(x.data)), sizes[0], sizes[1],
                                              sizes[2], sizes[3], stride_bytes[0], stride_bytes[1], stride_bytes[2],
                                              uint64_t(box_rows)};
  const bool reuse = settings::map_cache();
  if (reuse && map_cache().find(key, map)) return true;
  const unsigned box[4] = {64, unsigned(box_rows), 1, 1};
  const unsigned element_strides[4] = {1, 1, 1, 1};
  if (d.cuTensorMapEncodeTiled(map, kTensorMapUint16, 4, x.data, sizes, stride_bytes, box, element_strides,
                               kTensorMapInterleaveNone, kTensorMapSwizzle128B, kTensorMapL2Promotion128B,
                               kTensorMapFillZeros) != 0) {
    return false;
  }
  if (reuse) map_cache().insert(key, *map);
  return true;
}

// flashjit's stream-ordered memory pool on a device, made on first use
// (prepare() makes it outside stream capture, where creating it might not be
// allowed, unless the process's first call is captured). It keeps up to kPoolKeepBytes reserved across
// synchronisations: the default pool hands its memory back at every synchronize, and reserving it again costs
// a synchronised call hundreds of microseconds. Scratch is 8 bytes a query row (backward) and 4 bytes (the
// forward's tile counter); what the pool keeps is the most that calls in flight together held, up to that
// bound. Where the pool cannot be made, each use says why.
constexpr uint64_t kPoolKeepBytes = uint64_t(64) << 20;
// A pool of pinned device memory on the device that keeps up to `keep` bytes reserved.
CUmemoryPool make_pool(int device_index, uint64_t keep) {
  MemPoolProps props{};
  props.allocation_type = 1;  // pinned device memory
  props.location_type = 1;    // on a device
  props.location_id = device_index;
  CUmemoryPool created = nullptr;
  check(driver().cuMemPoolCreate(&created, &props), "cuMemPoolCreate");
  const CUresult status = driver().cuMemPoolSetAttribute(created, kMemPoolAttrReleaseThreshold, &keep);
  if (status != 0) {
    driver().cuMemPoolDestroy(created);  // best effort: the error reported is the attribute's
    check(status, "cuMemPoolSetAttribute");
  }
  return created;
}
// A pool a device, each made on first use, keeping up to `keep` bytes.
class DevicePools {
 public:
  explicit DevicePools(uint64_t keep) : keep_(keep) {}
  CUmemoryPool of(int device_index) {
    std::lock_guard<std::mutex> lock(mutex_);
    CUmemoryPool& pool = pools_[device_index];
    if (pool == nullptr) pool = make_pool(device_index, keep_);
    return pool;
  }

 private:
  const uint64_t keep_;
  std::mutex mutex_;
  std::map<int, CUmemoryPool> pools_;
};
CUmemoryPool scratch_pool(int device_index) {
  static DevicePools pools(kPoolKeepBytes);
  return pools.of(device_index);
}

// allocate_array_memory's pool on a device: it keeps up to kArrayPoolKeepBytes reserved (as a
// framework's caching allocator keeps its blocks), so that a training step's arrays, hundreds of
// MiB, are not reserved again after each synchronisation; beyond that, what is free goes back at
// synchronisations, and all that is free when an allocation finds the device full.
constexpr uint64_t kArrayPoolKeepBytes = uint64_t(2) << 30;
CUmemoryPool array_pool(int device_index) {
  static DevicePools pools(kArrayPoolKeepBytes);
  return pools.of(device_index);
}
std::atomic<size_t> array_bytes_active{0}, array_bytes_peak{0};

constexpr uintptr_t kPerThreadStream = 0x2;  // CU_STREAM_PER_THREAD

// The driver's id of `stream` (unique in the process, never reused, unlike handles); false where
// a stream cannot have state of its own: a per-thread default stream (one handle, many streams)
// or a driver without stream ids.
bool stream_id_of(CUstream stream, unsigned long long* id) {
  const Driver& d = driver();
  return reinterpret_cast<uintptr_t>(stream) != kPerThreadStream && d.cuStreamGetId != nullptr &&
         d.cuStreamGetId(stream, id) == 0;
}

// The backward's scratch kept for a stream from one call to the next, so that a repeated
// backward takes no pool allocation (with its free, 2.7 µs of the H200 host's time a call:
// bench/results/h200-driver-calls-2026-12-05-d3887c8.md). A call holds its stream's scratch from
// its plan to its last launch; a call that finds it held (another thread enqueueing on the same
// stream at the same time, whose kernels could interleave with this call's) takes pool scratch
// instead. Once a call has enqueued its kernels, the next call on the stream may take the
// scratch: its kernels run after the previous call's (this relies on the prep kernel's plain
// launch, after the previous call's last kernel has ended: with FLASHJIT_CUDA_BACKWARD_OVERLAP
// the dK/dV kernel overlaps the dQ kernel, not the next call, and ends after it), and they set
// all of it before reading it (the prep kernel writes the rows and zeroes
// the one pass's counters, and its sums where the atomic one pass adds into them). Up to
// kKeptScratchBytes for each of kKeptStreams streams of the process (told apart by device and the
// driver's stream id, which a process never reuses); larger scratch, more streams, capture and
// workspaces take the pool as before. Grown in the stream's order; never freed (at most
// kKeptStreams * kKeptScratchBytes for the process's life, as the streams' tile counters are), so
// nothing runs at thread or process exit.
constexpr size_t kKeptScratchBytes = size_t(256) << 10;  // 32k scratch rows: the small problems whose host time counts
constexpr size_t kKeptStreams = 16;
struct KeptScratchEntry {
  int device_index = -1;
  unsigned long long stream_id = 0;
  CUdeviceptr pointer = 0;
  size_t bytes = 0;
  bool held = false;
};
std::mutex kept_scratch_mutex;
std::array<KeptScratchEntry, kKeptStreams> kept_scratch_entries;

// Device scratch from flashjit's pool, freed in stream order (under stream capture, an
// allocation node of the graph), or a stream's kept scratch (kept_scratch), held until the
// plan is gone.
class StreamScratch {
 public:
  StreamScratch(size_t bytes, CUstream stream, int device_index) : stream_(stream) {
    if (bytes > 0) {
      check(driver().cuMemAllocFromPoolAsync(&pointer_, bytes, scratch_pool(device_index), stream),
            "cuMemAllocFromPoolAsync");
    }
  }
  explicit StreamScratch(KeptScratchEntry* kept) : pointer_(kept->pointer), stream_(nullptr), kept_(kept) {}
  ~StreamScratch() {
    if (kept_ != nullptr) {
      const std::lock_guard<std::mutex> lock(kept_scratch_mutex);
      kept_->held = false;
    } else if (pointer_ != 0) {
      driver().cuMemFreeAsync(pointer_, stream_);
    }
  }
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
  void* get() const { return reinterpret_cast<void*>(pointer_); }

 private:
  CUdeviceptr pointer_ = 0;
  CUstream stream_;
  KeptScratchEntry* kept_ = nullptr;
};

// The call's stream's kept scratch of at least `bytes`, held for the caller (StreamScratch gives
// it back); nullptr where none applies (too large, a per-thread default stream, no stream ids,
// held by another call, every place taken, no memory).
KeptScratchEntry* kept_scratch(size_t bytes, const Launch& launch) {
  unsigned long long id = 0;
  if (bytes == 0 || bytes > kKeptScratchBytes || launch.graph_safe || !stream_id_of(launch.stream, &id)) {
    return nullptr;
  }
  const Driver& d = driver();
  const std::lock_guard<std::mutex> lock(kept_scratch_mutex);
  KeptScratchEntry* slot = nullptr;
  for (KeptScratchEntry& entry : kept_scratch_entries) {
    if (entry.pointer != 0 && entry.stream_id == id && entry.device_index == launch.device_index) {
      slot = &entry;
      break;
    }
    if (entry.pointer == 0 && slot == nullptr) slot = &entry;
  }
  if (slot == nullptr || slot->held) return nullptr;
  if (slot->pointer == 0 || slot->bytes < bytes) {
    // Grown in whole 16 KiB, at least twice what it had: a few steps up to the bound.
    const size_t grown = std::min(kKeptScratchBytes, std::max(slot->bytes * 2, (bytes + 0x3FFF) & ~size_t(0x3FFF)));
    CUdeviceptr pointer = 0;
    if (d.cuMemAllocFromPoolAsync(&pointer, grown, scratch_pool(launch.device_index), launch.stream) != 0) {
      return nullptr;
    }
    if (slot->pointer != 0) d.cuMemFreeAsync(slot->pointer, launch.stream);  // after the calls that used it
    slot->device_index = launch.device_index;
    slot->stream_id = id;
    slot->pointer = pointer;
    slot->bytes = grown;
  }
  slot->held = true;
  return slot;
}

// The persistent forward's tile counter of a stream: two words that the kernel
// leaves at zero (KernelParams::tile_counter_resets), so that a call needs no
// memset before its launch. Launches on one stream run one after another, so
// they can share it; streams are told apart by the driver's stream id, which a
// process never reuses (a handle can be: a destroyed stream's work may still run
// when a new stream gets its handle). nullptr where no counter of its own can
// be had: a per-thread default stream (one handle, many streams), a driver
// without stream ids, kMaxStreamCounters streams on the device already, or no
// memory; the caller then zeroes scratch before the launch.
constexpr size_t kMaxStreamCounters = 1024;
unsigned* stream_tile_counter(CUstream stream, int device_index) {
  const Driver& d = driver();
  unsigned long long id = 0;
  if (d.cuMemAlloc == nullptr || !stream_id_of(stream, &id)) return nullptr;
  static std::mutex mutex;
  static std::map<std::pair<int, unsigned long long>, CUdeviceptr> counters;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = counters.find({device_index, id});
  if (found != counters.end()) return reinterpret_cast<unsigned*>(found->second);
  if (counters.size() >= kMaxStreamCounters) return nullptr;
  CUdeviceptr counter = 0;
  if (d.cuMemAlloc(&counter, 2 * sizeof(unsigned)) != 0) return nullptr;
  // Zeroed in the stream's order, before the first launch that takes it; the
  // allocation is never freed (8 bytes a stream, for the process's life).
  if (d.cuMemsetD32Async(counter, 0, 2, stream) != 0) return nullptr;
  counters.emplace(std::make_pair(device_index, id), counter);
  return reinterpret_cast<unsigned*>(counter);
}

// Rows of the sm_90a forward's output boxes: a consumer warpgroup's share of a work tile.
constexpr int kOutputBoxRows = 64;

// The forward's q (boxes of the block's rows), k and v (boxes of a key tile).
bool encode_forward_maps(KernelParams& params, const AttentionProblem& p, const KernelSpec& spec) {
  return encode_tensor_map(&params.q_map, p.q, p.batch, p.heads_q, p.seqlen_q, p.head_dim_qk,
                           spec.block_rows()) &&
         encode_tensor_map(&params.k_map, p.k, p.batch, p.heads_kv, p.seqlen_k, p.head_dim_qk,
                           spec.block_n) &&
         encode_tensor_map(&params.v_map, p.v, p.batch, p.heads_kv, p.seqlen_k, p.head_dim_v, spec.block_n);
}

constexpr int kMaxSplits = 32;
constexpr int64_t kMaxGridY = 65535;                 // blockIdx.y picks the split
constexpr int64_t kMinSplitKeyTiles = 4;             // key tiles a split walks, at least (but sm_90a: 1)
constexpr int64_t kMaxSplitScratchBytes = 16 << 20;  // the partial outputs, at most

// How many ways the forward splits the keys: where a single query block covers
// every query (decoding, a few queries a batch and head) and the blocks cannot
// fill the GPU, each block walking all keys alone would leave most SMs idle;
// splits bring the grid to about two blocks an SM (eight of one warp; one of the
// sm_90a kernel, which fills an SM alone), each split walking at least
// kMinSplitKeyTiles key tiles. 1: no split.
int forward_splits(const AttentionProblem& p, const KernelSpec& split_spec, int multiprocessors) {
  if (!split_spec.split) return 1;
  const int64_t query_blocks = ceil_div(p.seqlen_q, split_spec.block_rows());
  const int64_t key_tiles = ceil_div(p.seqlen_k, split_spec.block_n);
  if (const std::optional<int> forced = settings::forced_splits()) {  // tests force splits
    return int(std::min<int64_t>({*forced, key_tiles, kMaxGridY}));
  }
  const int64_t blocks = query_blocks * p.batch * p.heads_q;
  if (query_blocks != 1 || blocks == 0) return 1;
  // One-warp blocks (decoding) fit several an SM: enough of them to keep loads in flight.
  const bool one_warp = split_spec.threads == 32;
  const int64_t per_sm = one_warp ? 8 : (split_spec.family == KernelFamily::kHopper ? 1 : 2);
  const int64_t most = one_warp ? 4 * kMaxSplits : kMaxSplits;
  // The sm_90a kernel (a block an SM, at most an SM's worth of blocks) splits down to one key tile a
  // block: at 1k keys 8 splits of one tile ran 20% faster than 2 of four in graphs (bench/NOTES.md,
  // 2026-12-06), the combine costing little; the other kernels keep four tiles a split.
  const int64_t min_tiles = split_spec.family == KernelFamily::kHopper ? 1 : kMinSplitKeyTiles;
  int64_t splits = std::min<int64_t>({per_sm * multiprocessors / blocks, key_tiles / min_tiles, most});
  const int64_t bytes_per_split = p.batch * p.heads_q * p.seqlen_q * (p.head_dim_v + 1) * 4;
  splits = std::min<int64_t>(splits, kMaxSplitScratchBytes / std::max<int64_t>(bytes_per_split, 1));
  return int(std::max<int64_t>(splits, 1));
}

// One kernel of a call: what it is, its compiled function, its parameters and its grid.
struct KernelLaunch {
  KernelSpec spec;
  CUfunction function = nullptr;
  KernelParams params{};
  int64_t blocks = 0;  // grid x
  int splits = 1;      // grid y: the split forward's spans of keys
  bool programmatic = false;  // launched while the plan's previous kernel runs (run's programmatic)
};

// What a call enqueues, in stream order: its kernels, chosen, with their TMA
// descriptors encoded and their functions compiled or loaded before anything
// touches the stream (under stream capture a kernel not compiled yet is an error,
// which then leaves the graph as it was), and the stream-ordered scratch they
// share (taken once the functions are loaded; freed in stream order once the plan
// is gone, after its kernels).
struct Plan {
  static constexpr size_t kMaxKernels = 5;  // a varlen table kernel and four backward kernels
  std::array<KernelLaunch, kMaxKernels> kernels;
  size_t count = 0;
  std::optional<StreamScratch> scratch;
  std::optional<StreamScratch> table;  // a variable-length batch's sequences (plan_varlen_forward)
  size_t scratch_bytes = 0;  // what the plan's kernels need (planning: reported, not taken)

  KernelLaunch& add(const KernelSpec& spec, const KernelParams& params, const Launch& launch) {
    if (count == kMaxKernels) {
      throw Error(FJ_ERROR_INTERNAL, str_cat("[cuda] more than ", kMaxKernels, " kernels in one call"));
    }
    KernelLaunch& kernel = kernels[count++];
    kernel.spec = spec;
    kernel.params = params;
    kernel.function = kernel_function(spec, launch.device_index, launch.capturing);
    return kernel;
  }
};

void enqueue(Plan& plan, const Launch& launch) {
  for (size_t index = 0; index < plan.count; ++index) {
    KernelLaunch& kernel = plan.kernels[index];
    // Programmatic only after a kernel that launched (a grid of no blocks is not launched, and the
    // kernel would then overlap whatever came before the call).
    run(kernel.spec, kernel.function, launch, kernel.params, kernel.blocks, kernel.splits,
        kernel.programmatic && index > 0 && plan.kernels[index - 1].blocks > 0);
  }
}

// Scratch of `bytes` for the plan; false (and none) where the device has no
// pool or no memory left, for callers that can do without it.
bool try_scratch(Plan& plan, size_t bytes, const Launch& launch) {
  try {
    plan.scratch.emplace(bytes, launch.stream, launch.device_index);
    return true;
  } catch (const Error&) {
    plan.scratch.reset();
    return false;
  }
}

// Whether a decoding forward splits over blocks of one warp (mma.sync, up to 16 query rows a
// batch and head) rather than the usual split forward: FLASHJIT_CUDA_DECODE_WARPS=1 or 4
// forces it; otherwise on sm_90 where they were measured faster (bench/NOTES.md, 2026-12-04
// and 2026-12-07): KV caches, and key masks, whose loads the sm_90a kernel makes in its
// softmax's path, over at least 16 batch-heads (GQA groups packed) or at least
// kOneWarpMaskedKeys keys (one sequence, 8 packed heads, on an H100: 32k keys 64.6 against 69.4
// µs, 128k 201.8 against 228.4; at 1k and 8k the four-warp blocks were faster).
constexpr int64_t kOneWarpMaskedKeys = 32768;
bool one_warp_decoding(const AttentionProblem& p, const Launch& launch, bool kv_cache) {
  const int forced = settings::decode_warps();
  if (forced != 0) return forced == 1;
  const bool masked_wide = p.mask != nullptr && (p.batch * p.heads_q >= 16 || p.seqlen_k >= kOneWarpMaskedKeys);
  return launch.arch == 90 && (kv_cache || masked_wide);
}

// The split forward: a block for each (query block, batch, head) and span of keys
// (kMma: a grid of blocks by spans; kHopper: a block a work tile, span by span)
// writes partials into scratch, then the combine kernel merges them into o and
// lse. False (an empty plan) where the scratch cannot be had.
bool plan_split_forward(Plan& plan, const AttentionProblem& p, const Launch& launch, KernelParams params,
                        const KernelSpec& spec, int splits) {
  const int64_t key_tiles = ceil_div(p.seqlen_k, spec.block_n);
  const int64_t tiles_per_split = ceil_div(key_tiles, splits);
  splits = int(ceil_div(key_tiles, tiles_per_split));  // no span past the last key
  const int64_t rows = p.batch * p.heads_q * p.seqlen_q;
  params.num_splits = splits;
  params.split_keys = checked_int(tiles_per_split * spec.block_n, "keys a split");
  params.num_query_blocks = int(ceil_div(p.seqlen_q, spec.block_rows()));
  KernelLaunch& partials = plan.add(spec, params, launch);
  partials.blocks = int64_t(params.num_query_blocks) * p.batch * p.heads_q;
  if (spec.family == KernelFamily::kHopper) {
    partials.blocks *= splits;  // no tile counter: each block runs the work tile of its index
  } else {
    partials.splits = splits;
  }
  const KernelSpec combine = combine_kernel(traits_for_launch(p, launch));
  KernelLaunch& merge = plan.add(combine, params, launch);
  merge.blocks = ceil_div(rows, combine.threads / 32);
  // On sm_90 the combine is launched while the split kernel runs (its blocks let it start once
  // they have all begun) and waits for it on the GPU: its launch and start leave the path; under
  // stream capture too, a programmatic edge in the graph (FLASHJIT_CUDA_OVERLAP=eager: not there).
  const int overlap = launch.arch >= 90 ? settings::overlap_launches() : 0;
  merge.programmatic = overlap == 2 || (overlap == 1 && !launch.capturing);
  // The partials: in the caller's workspace where one is given (fj_attention_prepare_forward
  // reports the bytes; one too small: the unsplit forward), else scratch from the pool, under
  // stream capture too (a graph's allocation node, as the backward's scratch).
  plan.scratch_bytes = size_t(splits) * size_t(rows) * size_t(p.head_dim_v + 1) * sizeof(float);
  float* partial_rows = nullptr;  // planning: sized, nothing taken
  if (!launch.planning) {
    if (p.workspace != nullptr) {
      if (p.workspace_bytes >= plan.scratch_bytes) partial_rows = static_cast<float*>(p.workspace);
    } else if (try_scratch(plan, plan.scratch_bytes, launch)) {
      partial_rows = static_cast<float*>(plan.scratch->get());
    }
    if (partial_rows == nullptr) {
      plan.count = 0;
      plan.scratch_bytes = 0;
      return false;
    }
  }
  for (KernelLaunch* kernel : {&partials, &merge}) {
    kernel->params.split_o = partial_rows;
    kernel->params.split_lse = partial_rows != nullptr ? partial_rows + int64_t(splits) * rows * p.head_dim_v : nullptr;
  }
  return true;
}

// The kernels chosen for a problem's traits and key band on a device, as the choosers give them
// (forward_kernel with the class's tuned tiles; backward_kernels with its pass), kept for the
// thread's next calls: the choice reads the tuning tables by class names and the settings from
// the environment, which a loop of calls would do again and again. Stale when the environment
// (settings::environment_version) or the tuning tables (tuning_generation) have changed.
class ChoiceMemo {
 public:
  struct Key {
    bool backward = false, nondeterministic = false;
    std::array<int32_t, kTraitsFieldCount> traits{};
    int band = 0, device_index = 0;
    uint64_t environment = 0, tuning = 0;
    bool operator==(const Key& o) const {
      return backward == o.backward && nondeterministic == o.nondeterministic && traits == o.traits &&
             band == o.band && device_index == o.device_index && environment == o.environment && tuning == o.tuning;
    }
  };
  static Key key(bool backward, const KernelTraits& traits, int64_t seqlen_k, int device_index,
                 bool nondeterministic = false) {
    return Key{backward,       nondeterministic, traits_fields(traits), tuning_band(seqlen_k), device_index,
               settings::environment_version(), tuning_generation()};
  }
  // The specs kept for key, or nullptr.
  const std::vector<KernelSpec>* find(const Key& key) const {
    for (const Entry& entry : entries_) {
      if (entry.valid && entry.key == key) return &entry.specs;
    }
    return nullptr;
  }
  const std::vector<KernelSpec>& keep(const Key& key, std::vector<KernelSpec> specs) {
    Entry& entry = entries_[next_++ % entries_.size()];
    entry = Entry{key, std::move(specs), true};
    return entry.specs;
  }

 private:
  struct Entry {
    Key key;
    std::vector<KernelSpec> specs;
    bool valid = false;
  };
  std::array<Entry, 8> entries_{};
  size_t next_ = 0;
};

ChoiceMemo& choice_memo() {
  thread_local ChoiceMemo memo;
  return memo;
}

// forward_kernel for the traits with the tiles tuned for their class on the launch's device.
const KernelSpec& chosen_forward_kernel(const KernelTraits& traits, int64_t seqlen_k, const Launch& launch) {
  const ChoiceMemo::Key key = ChoiceMemo::key(false, traits, seqlen_k, launch.device_index);
  if (const std::vector<KernelSpec>* kept = choice_memo().find(key)) return kept->front();
  const ForwardTiles tuned = hopper_applies(traits) ? tuned_forward_tiles(device_info(launch.device_index).name,
                                                                          launch.arch, tuning_key(traits, seqlen_k))
                                                    : ForwardTiles{};
  return choice_memo().keep(key, {forward_kernel(traits, tuned)}).front();
}

// backward_kernels for the traits in the pass chosen for their class on the launch's device; a
// nondeterministic call (fj_attention_options.nondeterministic) takes the one pass with unordered
// dQ adds where that measured faster (unordered_dq_applies; at head dim 128 in whole steps), unless
// FLASHJIT_CUDA_BACKWARD forces a pass.
std::vector<KernelSpec> backward_kernels_for(const KernelTraits& traits, int64_t seqlen_k, const Launch& launch,
                                             bool nondeterministic) {
  if (nondeterministic && !settings::one_pass_backward().has_value() && unordered_dq_applies(traits)) {
    return unordered_backward_kernels(traits);
  }
  const int pass = backward_pass_chosen(traits, seqlen_k, device_info(launch.device_index).name);
  return backward_kernels(traits, pass != kSplitPass, backward_dq_mode(pass));
}
const std::vector<KernelSpec>& chosen_backward_kernels(const KernelTraits& traits, int64_t seqlen_k,
                                                       const Launch& launch, bool nondeterministic) {
  const ChoiceMemo::Key key = ChoiceMemo::key(true, traits, seqlen_k, launch.device_index, nondeterministic);
  if (const std::vector<KernelSpec>* kept = choice_memo().find(key)) return *kept;
  return choice_memo().keep(key, backward_kernels_for(traits, seqlen_k, launch, nondeterministic));
}

// The unsplit forward's kernel: the sm_90a one (with the tile choice measured
// for the problem's class on this device, where any) where TMA can address the
// operands, else the mma.sync or scalar one; params gets the TMA descriptors.
KernelSpec forward_spec(const AttentionProblem& p, const Launch& launch, KernelParams& params) {
  KernelTraits traits = traits_for_launch(p, launch);
  KernelSpec spec = chosen_forward_kernel(traits, p.seqlen_k, launch);
  if (spec.family == KernelFamily::kHopper && !encode_forward_maps(params, p, spec)) {
    traits.tma = false;  // operands TMA cannot address: the mma.sync kernel
    spec = forward_kernel(traits);
  }
  // An output TMA cannot address is stored by the threads directly.
  if (spec.o_tma &&
      !encode_tensor_map(&params.o_map, p.o, p.batch, p.heads_q, p.seqlen_q, p.head_dim_v, kOutputBoxRows)) {
    spec.o_tma = false;
  }
  return spec;
}

// The sm_90a forward's grid: persistent (a block an SM, taking work tiles from a
// counter, or with FLASHJIT_CUDA_TILES "sched=static" a tile a round in a snake's order from its
// own) or a block a tile. The counter is the stream's own
// (stream_tile_counter), else scratch zeroed before the launch. Under stream
// capture the grid is a block a tile unless the schedule is static: a graph may
// be replayed on any stream, beside other work that takes the counter, and
// scratch would put allocation nodes into the graph, which then can be neither
// cloned nor instantiated twice. Without any counter (a device without memory
// pools, no memory left) it is a block a tile too.
void take_work_tiles(Plan& plan, KernelLaunch& kernel, const Launch& launch, int64_t tiles) {
  kernel.blocks = tiles;
  if (!settings::persistent_forward()) return;
  KernelParams& params = kernel.params;
  const ForwardTiles forced = forced_forward_tiles();
  const int multiprocessors = device_info(launch.device_index).multiprocessors;
  if (forced.static_tiles == 1) {
    params.static_tiles = 1;
    kernel.blocks = std::min<int64_t>(tiles, multiprocessors);
    return;
  }
  if (launch.graph_safe) return;
  params.tile_counter = forced.stream_counter == 0 ? nullptr : stream_tile_counter(launch.stream, launch.device_index);
  params.tile_counter_resets = params.tile_counter != nullptr;
  if (params.tile_counter == nullptr && try_scratch(plan, sizeof(unsigned), launch)) {
    // Zeroed before the launch in the stream's order; where that fails, a block a tile.
    unsigned* counter = static_cast<unsigned*>(plan.scratch->get());
    if (driver().cuMemsetD32Async(reinterpret_cast<CUdeviceptr>(counter), 0, 1, launch.stream) == 0) {
      params.tile_counter = counter;
    } else {
      plan.scratch.reset();
    }
  }
  if (params.tile_counter != nullptr) kernel.blocks = std::min<int64_t>(tiles, multiprocessors);
}

// The forward's plan: the split forward where the keys of a few query blocks are
// spread over the GPU and its scratch can be had (plan_split_forward), else one forward kernel.
void plan_forward(Plan& plan, const AttentionProblem& p, const Launch& launch) {
  KernelParams params = params_of(p);
  const int multiprocessors = device_info(launch.device_index).multiprocessors;
  const auto split = [&](const KernelSpec& split_spec) {
    const int splits = forward_splits(p, split_spec, multiprocessors);
    return splits > 1 && plan_split_forward(plan, p, launch, params, split_spec, splits);
  };
  const bool may_split = p.seqlen_k > 0;
  const KernelSpec mma_split = may_split ? split_forward_kernel(traits_for_launch(p, launch), p.seqlen_q,
                                                                one_warp_decoding(p, launch, false))
                                         : KernelSpec{};
  // One-warp mma.sync blocks, where they take the problem, before the unsplit kernel's choice
  // (whose TMA descriptors they do not need).
  const bool one_warp = mma_split.split && mma_split.threads == 32;
  if (one_warp && split(mma_split)) return;
  const KernelSpec spec = forward_spec(p, launch, params);
  if (may_split && !one_warp) {
    // On sm_90 the sm_90a kernel splits (its TMA pipeline streams the keys at the memory's
    // speed), without dropout; elsewhere the mma.sync one.
    const KernelSpec hopper_split = hopper_split_kernel(spec);
    if (split(hopper_split.split ? hopper_split : mma_split)) return;
  }
  params.num_query_blocks = int(ceil_div(p.seqlen_q, spec.block_rows()));
  const int64_t tiles = int64_t(params.num_query_blocks) * p.batch * p.heads_q;
  if (tiles == 0) return;
  if (spec.family == KernelFamily::kHopper && tiles > std::numeric_limits<int>::max() / 2) {
    throw_unsupported("[cuda] ", tiles, " query blocks is more than one launch takes (2^30)");
  }
  KernelLaunch& kernel = plan.add(spec, params, launch);
  if (spec.family == KernelFamily::kHopper) {
    take_work_tiles(plan, kernel, launch, tiles);
  } else {
    kernel.blocks = tiles;
  }
}

// A KV cache on the sm_90a split forward (FJ_KV_CACHE): each work tile bounded by its entry's
// key count, at least one split; in pages (p's page table), K and V through maps whose outer
// dimension is the page, a key tile within one page or (KernelSpec::page_boxes) a box a page of
// a key tile. False (an empty plan) where the sm_90a kernel does not take the operands or no
// scratch can be had.
bool plan_hopper_kv_cache(Plan& plan, const AttentionProblem& p, const AttentionProblem& dense, const Launch& launch,
                          KernelParams params, int multiprocessors) {
  if (dense.seqlen_k == 0) return false;  // no key tile to split (the mma.sync path writes the empty rows)
  const KernelSpec forward = forward_spec(dense, launch, params);
  const bool paged = p.page_table != nullptr;
  const KernelSpec spec = hopper_kv_cache_kernel(forward, paged ? p.page_size : 0);
  if (!spec.split) return false;
  // A page's box: the key step's rows, or (page_boxes > 1) the page's, several a key tile.
  const int box_rows = spec.block_n / spec.page_boxes;
  if (paged && !(encode_tensor_map(&params.k_map, dense.k, p.num_pages, dense.heads_kv, p.page_size,
                                   dense.head_dim_qk, box_rows) &&
                 encode_tensor_map(&params.v_map, dense.v, p.num_pages, dense.heads_kv, p.page_size,
                                   dense.head_dim_v, box_rows))) {
    return false;
  }
  const int splits = std::max(1, forward_splits(dense, spec, multiprocessors));
  return plan_split_forward(plan, dense, launch, params, spec, splits);
}

// A KV cache's forward in one launch of the mma.sync forward (FJ_KV_CACHE), split over the
// keys where the batch cannot fill the GPU: a variable-length call whose sequences all have
// the same number of queries and whose keys are a cache (seqused_k: each sequence's own count
// of the rows its offset starts, at one stride a sequence; or a page table), with half types,
// no mask and no dropout, outside graph capture (the counts and the table are copied to the
// device on the stream), and on sm_90 with no more queries a sequence than one block's rows
// (decoding; longer ones run the sm_90a forward a sequence). It runs as a dense batch of the
// queries against the longest count, each block bounding its keys by its entry's count. False
// (an empty plan) where it does not apply; the caller then runs the sequences one by one.
bool plan_kv_cache_forward(Plan& plan, const AttentionProblem& p, const Launch& launch) {
  if (launch.graph_safe || p.offsets_on_device || p.batch == 0 || p.mask != nullptr || p.has_dropout() ||
      p.seqused_k == nullptr || driver().cuMemcpyHtoDAsync == nullptr) {
    return false;
  }
  // The offsets start at 0 (validated): sequence b's queries are rows b * queries on, and
  // (without pages) its keys rows b * key_stride on.
  const int64_t queries = p.cu_seqlens_q[1];
  const int64_t key_stride = p.page_table != nullptr ? 0 : p.cu_seqlens_k[1];
  // Counts in device memory (kv_on_device) are not read here: their bound is seqlen_k (the
  // cache's rows, or the given maximum), and the kernels clamp each count to it.
  int64_t longest = p.kv_on_device ? p.seqlen_k : 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    if (p.cu_seqlens_q[b + 1] != (b + 1) * queries) return false;
    if (p.page_table == nullptr && p.cu_seqlens_k[b] != b * key_stride) return false;
    if (!p.kv_on_device) longest = std::max<int64_t>(longest, p.seqused_k[b]);  // the pages come with the counts
  }
  // Every sequence's rows the same (the last one's too): the kernels read `longest` rows at a
  // stride of key_stride, and a shorter last span would end before them.
  if (p.page_table == nullptr && p.batch > 0 && p.cu_seqlens_k[p.batch] != p.batch * key_stride) return false;
  if (queries == 0) return true;  // no output row: nothing to do
  // The dense batch: entry b's queries are its packed rows, its keys the cache's.
  AttentionProblem dense = p;
  dense.cu_seqlens_q = dense.cu_seqlens_k = dense.seqused_k = dense.page_table = nullptr;
  dense.seqlen_q = queries;
  dense.seqlen_k = longest;
  for (Operand* x : {&dense.q, &dense.o}) x->stride_batch = queries * x->stride_seq;
  dense.lse_stride_batch = queries * p.lse_stride_seq;
  if (p.page_table == nullptr) {
    for (Operand* x : {&dense.k, &dense.v}) x->stride_batch = key_stride * x->stride_seq;
  }
  const bool top_left = p.causal == FJ_CAUSAL_TOP_LEFT;
  dense.diagonal_shift = top_left ? 0 : longest - queries;
  dense = with_query_groups_packed(dense);
  const KernelTraits traits = traits_for_launch(dense, launch);
  KernelSpec spec = split_forward_kernel(traits, dense.seqlen_q, one_warp_decoding(dense, launch, true));
  if (!spec.split) return false;  // no mma.sync kernel for these traits
  // More queries than one block's rows (a prefill against the cache): on sm_90 the sequences'
  // own sm_90a forwards beat one mma.sync launch.
  if (hopper_applies(traits) && dense.seqlen_q > spec.block_rows()) return false;
  spec.kv_cache = p.page_table != nullptr ? 2 : 1;
  // Per-entry counts, then the pages each entry reads (its table row up to its count, rows
  // packed `width` apart whatever the caller's row stride), for the kernels in device memory;
  // or (kv_on_device) the caller's own arrays there, read in place.
  std::vector<int32_t> arrays;
  if (!p.kv_on_device) arrays.assign(p.seqused_k, p.seqused_k + p.batch);
  int64_t width = p.kv_on_device ? p.page_table_stride : 0;
  if (p.page_table != nullptr && !p.kv_on_device) {
    for (int64_t b = 0; b < p.batch; ++b) width = std::max(width, ceil_div(int64_t(p.seqused_k[b]), p.page_size));
    arrays.resize(size_t(p.batch * (1 + width)), 0);
    for (int64_t b = 0; b < p.batch; ++b) {
      const int32_t* row = p.page_table + b * p.page_table_stride;
      std::copy(row, row + ceil_div(int64_t(p.seqused_k[b]), p.page_size), arrays.begin() + p.batch + b * width);
    }
  }
  KernelParams params = params_of(dense);
  params.varlen_top_left = top_left ? 1 : 0;
  params.page_table_stride = width;
  params.page_size = p.page_table != nullptr ? checked_int(p.page_size, "page size") : 0;
  params.num_pages = p.page_table != nullptr ? checked_int(p.num_pages, "pages") : 0;
  const int multiprocessors = device_info(launch.device_index).multiprocessors;
  const bool on_hopper = settings::kv_cache_hopper() && hopper_applies(traits) &&
                         plan_hopper_kv_cache(plan, p, dense, launch, params, multiprocessors);
  if (!on_hopper) {
    const int splits = forward_splits(dense, spec, multiprocessors);
    if (splits <= 1 || !plan_split_forward(plan, dense, launch, params, spec, splits)) {
      spec.split = false;
      params.num_query_blocks = int(ceil_div(dense.seqlen_q, spec.block_rows()));
      plan.add(spec, params, launch).blocks = int64_t(params.num_query_blocks) * dense.batch * dense.heads_q;
    }
  }
  if (p.kv_on_device) {
    for (size_t index = 0; index < plan.count; ++index) {
      plan.kernels[index].params.seqused_k = p.seqused_k;
      plan.kernels[index].params.page_table = p.page_table;
    }
    return true;
  }
  // The kernels are compiled; then the arrays, or (no memory, no pool) an empty plan.
  try {
    plan.table.emplace(arrays.size() * sizeof(int32_t), launch.stream, launch.device_index);
  } catch (const Error&) {
    plan.table.reset();
  }
  int32_t* device = plan.table ? static_cast<int32_t*>(plan.table->get()) : nullptr;
  if (device == nullptr || driver().cuMemcpyHtoDAsync(reinterpret_cast<CUdeviceptr>(device), arrays.data(),
                                                      arrays.size() * sizeof(int32_t), launch.stream) != 0) {
    plan.count = 0;
    plan.scratch.reset();
    plan.table.reset();
    return false;
  }
  for (size_t index = 0; index < plan.count; ++index) {
    plan.kernels[index].params.seqused_k = device;
    if (p.page_table != nullptr) plan.kernels[index].params.page_table = device + p.batch;
  }
  return true;
}

// Whether a variable-length call may run in one launch a kernel (FJ_VARLEN):
// outside graph capture (its table is written on the stream), without masks or KV
// caches, with keys. `packed` gets the packed operands as one batch entry.
bool varlen_single_launch(const AttentionProblem& p, const Launch& launch, AttentionProblem& packed) {
  if (launch.graph_safe || p.batch == 0 || p.mask != nullptr || p.page_table != nullptr || p.seqused_k != nullptr ||
      p.cu_seqlens_k == nullptr || driver().cuMemcpyHtoDAsync == nullptr ||
      std::max(p.total_q, p.total_k) > std::numeric_limits<int32_t>::max()) {
    return false;
  }
  packed = p;
  packed.batch = 1;
  packed.seqlen_q = p.total_q;
  packed.seqlen_k = p.total_k;
  packed.cu_seqlens_q = packed.cu_seqlens_k = nullptr;
  packed.offsets_on_device = false;
  return packed.seqlen_q > 0 && packed.seqlen_k > 0;
}

// The table of a variable-length batch's sequences (KernelParams::varlen): longest
// first, so that the heavy work tiles start first; query tiles of query_rows rows
// over the query heads, key tiles of key_rows rows over the key/value heads; then
// the totals of both (the trailer the kernels read). From the host's offsets it is
// written here (`host`) and its counts are exact; from offsets in device memory the
// table kernel writes it (add_table_kernel) and the counts here are bounds: a
// sequence's last tile is partial at most once a sequence and head.
struct VarlenTable {
  std::vector<int32_t> host;  // empty: built on the device
  int64_t query_tiles = 0, key_tiles = 0;
  size_t bytes = 0;
};

VarlenTable varlen_table(const AttentionProblem& p, int query_rows, int key_rows) {
  VarlenTable table;
  table.bytes = (size_t(p.batch) * kVarlenFields + 2) * sizeof(int32_t);
  if (p.offsets_on_device) {
    table.query_tiles = (ceil_div(p.total_q, query_rows) + p.batch) * p.heads_q;
    table.key_tiles = (ceil_div(p.total_k, key_rows) + p.batch) * p.heads_kv;
  } else {
    std::vector<int64_t> order(size_t(p.batch));
    std::iota(order.begin(), order.end(), 0);
    const auto queries = [&](int64_t b) { return int64_t(p.cu_seqlens_q[b + 1]) - p.cu_seqlens_q[b]; };
    const auto keys = [&](int64_t b) { return int64_t(p.cu_seqlens_k[b + 1]) - p.cu_seqlens_k[b]; };
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return queries(a) > queries(b); });
    table.host.reserve(table.bytes / sizeof(int32_t));
    for (const int64_t b : order) {
      for (const int64_t field : {table.query_tiles, table.key_tiles, b, int64_t(p.cu_seqlens_q[b]), queries(b),
                                  int64_t(p.cu_seqlens_k[b]), keys(b)}) {
        table.host.push_back(int32_t(field));
      }
      table.query_tiles += ceil_div(queries(b), query_rows) * p.heads_q;
      table.key_tiles += ceil_div(keys(b), key_rows) * p.heads_kv;
    }
    table.host.push_back(int32_t(std::min<int64_t>(table.query_tiles, std::numeric_limits<int>::max())));
    table.host.push_back(int32_t(std::min<int64_t>(table.key_tiles, std::numeric_limits<int>::max())));
  }
  if (std::max(table.query_tiles, table.key_tiles) > std::numeric_limits<int>::max() / 2) {
    throw_unsupported("[cuda] ", std::max(table.query_tiles, table.key_tiles),
                      " blocks is more than one launch takes (2^30)");
  }
  return table;
}

// The table kernel (offsets in device memory), added to the plan before the kernels
// that read its table; its output pointer is set by place_table.
void add_table_kernel(Plan& plan, const AttentionProblem& p, const KernelTraits& traits, int query_rows,
                      int key_rows, const Launch& launch) {
  KernelParams params = params_of(p);
  params.seqlen_q = int(p.total_q);
  params.seqlen_k = int(p.total_k);
  params.cu_seqlens_q = p.cu_seqlens_q;
  params.cu_seqlens_k = p.cu_seqlens_k;
  params.varlen_query_rows = query_rows;
  params.varlen_key_rows = key_rows;
  plan.add(varlen_table_kernel(traits), params, launch).blocks = 1;
}

// The table into `device` on the stream: copied from the host (from pageable memory the
// copy has read it when the call returns), or written by the plan's table kernel.
// Every kernel of the plan then reads it. False where the copy fails.
bool place_table(Plan& plan, const VarlenTable& table, void* device, const Launch& launch) {
  if (!table.host.empty() &&
      driver().cuMemcpyHtoDAsync(reinterpret_cast<CUdeviceptr>(device), table.host.data(),
                                 table.host.size() * sizeof(int32_t), launch.stream) != 0) {
    return false;
  }
  for (size_t index = 0; index < plan.count; ++index) plan.kernels[index].params.varlen = static_cast<int*>(device);
  return true;
}

// A variable-length forward in one launch of the persistent sm_90a kernel
// (FJ_VARLEN), after the table kernel where the offsets are in device memory: TMA
// over the packed operands, the sequences' table in scratch, the work tiles of every
// sequence taken from the counter; a work tile runs with its sequence's parameters
// and stores O with TMA where a consumer's 64 rows end inside the sequence, by its
// threads where they do not (a box would write past the sequence's last row, into
// the next one). False, with nothing planned, where it cannot: the caller then
// launches a sequence at a time.
bool plan_varlen_forward(Plan& plan, const AttentionProblem& p, const Launch& launch) {
  AttentionProblem packed;
  if (!varlen_single_launch(p, launch, packed) || !settings::persistent_forward()) return false;
  const KernelTraits traits = traits_for_launch(packed, launch);
  if (!hopper_applies(traits)) return false;
  KernelSpec spec = forward_kernel(
      traits, tuned_forward_tiles(device_info(launch.device_index).name, launch.arch, tuning_key(traits, p.seqlen_k)));
  KernelParams params = params_of(p);
  if (spec.family != KernelFamily::kHopper || !encode_forward_maps(params, packed, spec)) return false;
  spec.varlen = true;
  // O by TMA for the 64-row halves that end inside their sequence, by the threads for the others.
  if (spec.o_tma && !encode_tensor_map(&params.o_map, packed.o, 1, packed.heads_q, packed.seqlen_q,
                                       packed.head_dim_v, kOutputBoxRows)) {
    spec.o_tma = false;
  }
  const VarlenTable table = varlen_table(p, spec.block_rows(), spec.block_rows());
  params.varlen_top_left = p.causal == FJ_CAUSAL_TOP_LEFT;
  plan.scratch_bytes = table.bytes;
  if (launch.planning) return true;
  if (p.offsets_on_device) add_table_kernel(plan, p, traits, spec.block_rows(), spec.block_rows(), launch);
  KernelLaunch& kernel = plan.add(spec, params, launch);  // compiled before anything touches the stream
  try {
    plan.table.emplace(table.bytes, launch.stream, launch.device_index);
  } catch (const Error&) {
    plan.count = 0;
    return false;
  }
  if (!place_table(plan, table, plan.table->get(), launch)) {
    plan.count = 0;
    plan.table.reset();
    return false;
  }
  take_work_tiles(plan, kernel, launch, table.query_tiles);
  return true;
}

// Whether a kHopper backward kernel reads TMA descriptors (the prep and dQ convert kernels do not).
bool reads_tensor_maps(const KernelSpec& spec) {
  return spec.family == KernelFamily::kHopper && spec.entry != KernelEntry::kBackwardPrep &&
         spec.entry != KernelEntry::kBackwardDqConvert;
}

// The TMA descriptors a kHopper backward kernel reads: the block's own rows
// (queries for dQ, keys for dK/dV) in boxes of block_rows, the streamed ones in
// boxes of block_n.
bool encode_backward_maps(KernelParams& params, const AttentionProblem& p, const KernelSpec& spec) {
  const bool by_queries = spec.entry == KernelEntry::kBackwardDq;
  const int query_box = by_queries ? spec.block_rows() : spec.block_n;
  const int key_box = by_queries ? spec.block_n : spec.block_rows();
  return encode_tensor_map(&params.q_map, p.q, p.batch, p.heads_q, p.seqlen_q, p.head_dim_qk, query_box) &&
         encode_tensor_map(&params.dout_map, p.dout, p.batch, p.heads_q, p.seqlen_q, p.head_dim_v,
                           query_box) &&
         encode_tensor_map(&params.k_map, p.k, p.batch, p.heads_kv, p.seqlen_k, p.head_dim_qk, key_box) &&
         encode_tensor_map(&params.v_map, p.v, p.batch, p.heads_kv, p.seqlen_k, p.head_dim_v, key_box);
}

// The backward's kernels and their TMA descriptors: the sm_90a kernels where TMA
// can address every operand, else the mma.sync or scalar ones (which read no map).
std::vector<KernelSpec> backward_specs(const AttentionProblem& p, const Launch& launch,
                                       std::array<KernelParams, Plan::kMaxKernels>& params) {
  KernelTraits traits = traits_for_launch(p, launch);
  std::vector<KernelSpec> specs = chosen_backward_kernels(traits, p.seqlen_k, launch, p.nondeterministic);
  keep_blocks_resident(dkdv_kernel(specs), ceil_div(p.seqlen_k, dkdv_kernel(specs).block_rows()),
                       device_info(launch.device_index).multiprocessors);
  keep_diagonal_off_groups(dkdv_kernel(specs), p.heads_q != p.heads_kv);
  if (specs.size() > Plan::kMaxKernels) {
    throw Error(FJ_ERROR_INTERNAL, str_cat("[cuda] ", specs.size(), " backward kernels, at most ", Plan::kMaxKernels,
                                           " expected"));
  }
  for (size_t index = 0; index < specs.size(); ++index) {
    if (reads_tensor_maps(specs[index]) && !encode_backward_maps(params[index], p, specs[index])) {
      traits.tma = false;
      return backward_kernels(traits);
    }
  }
  return specs;
}

// The one-pass backward's scratch beside the rows' (KernelParams::dq_accum): dQ's float32 sums,
// head_dim_qk floats a scratch row, then two counters a tile of block_n scratch rows (with
// writer-groups, each of them layout::kDqGroups times: group g's after group g - 1's); none for
// other kernels. The atomic sums are zeroed by the prep kernel (the others' first visitor stores).
struct OnePassScratch {
  size_t accum_floats = 0, counters = 0;
  bool zeroed = false;
  OnePassScratch(const KernelSpec& dkdv, int64_t scratch_rows) {
    if (!dkdv.one_pass) return;
    const size_t groups = size_t(layout::dq_groups(dkdv.dq_diagnostic));  // writer-groups: sums a group
    accum_floats = groups * size_t(scratch_rows) * size_t(dkdv.head_dim_qk);
    counters = groups * size_t(ceil_div(scratch_rows, dkdv.block_n)) * 2;
    zeroed = layout::dq_atomic(dkdv.dq_diagnostic);
  }
  size_t bytes() const { return accum_floats * sizeof(float) + counters * sizeof(int); }
  // Points the kernels at it, from `base` (16-byte aligned).
  void place(KernelParams& params, char* base) const {
    if (counters == 0) return;
    params.dq_accum = reinterpret_cast<float*>(base);
    params.dq_semaphore = reinterpret_cast<int*>(params.dq_accum + accum_floats);
    params.dq_counters = int64_t(counters);
    params.dq_zero_floats = zeroed ? int64_t(accum_floats) : 0;  // a multiple of 4: head dims of 64 and 128
  }
};

// The parts of a GQA group's query heads the split dK/dV kernel takes (KernelSpec::dkdv_parts;
// 1: none): FLASHJIT_CUDA_DKDV_PARTS's count, halved until it divides the group, or ("auto") the
// smallest divisor of the group that brings the grid to two blocks an SM, else the largest that
// keeps it within four (a group of 7 on 32 blocks: 7, 224 blocks; on 80: none). Their float32
// sums ([part][b][kv head][key block][128 rows][dk, dv columns]) and a counter a key block follow
// the rows' scratch.
struct DkDvParts {
  int parts = 1;
  size_t partial_floats = 0, counters = 0;
  DkDvParts(const KernelSpec& dkdv, const AttentionProblem& p, int64_t key_blocks, int multiprocessors) {
    // No query (a sequence of keys alone): no tiles to share, and a prep kernel of no blocks would
    // leave the counters unzeroed.
    if (!dkdv.takes_parts() || p.seqlen_q == 0) return;
    const int64_t group = p.heads_q / p.heads_kv, blocks = key_blocks * p.batch * p.heads_kv;
    if (blocks == 0) return;  // no key: no block to share
    const int setting = settings::dkdv_parts();
    if (setting > 0) {
      // A count asked for, within what a small grid needs (the sums' scratch grows with the grid).
      parts = setting;
      while (parts > 1 && (group % parts != 0 || blocks * parts > 4 * int64_t(multiprocessors))) parts /= 2;
    } else {
      // Divisors of the group in turn until the grid has two blocks an SM, none that would give it
      // more than four (the parts' sums are parts x the float32 dK and dV: a group of 7 on 80 key
      // blocks would hold 560 blocks' worth). Powers of two: the powers of two; 7: 7 or none.
      const int64_t enough = 2 * int64_t(multiprocessors), most = 4 * int64_t(multiprocessors);
      for (int count = 2; count <= group && blocks * parts < enough; ++count) {
        if (group % count != 0) continue;
        if (blocks * count > most) break;
        parts = count;
      }
    }
    if (parts == 1) return;
    counters = size_t(blocks);
    partial_floats = size_t(parts) * counters * size_t(dkdv.block_rows()) * size_t(dkdv.head_dim_qk + dkdv.head_dim_v);
  }
  size_t bytes() const { return partial_floats * sizeof(float) + counters * sizeof(int); }
  void place(KernelParams& params, char* base) const {
    params.dkdv_parts = parts;
    if (parts == 1) return;
    params.dkdv_partial = reinterpret_cast<float*>(base);
    params.dkdv_counters = reinterpret_cast<int*>(params.dkdv_partial + partial_floats);
    params.dkdv_counter_count = int64_t(counters);
  }
};

// FLASHJIT_CUDA_BACKWARD_OVERLAP unset (auto): the sm_90a split backward's dQ and dK/dV kernels
// built to overlap where the dQ grid is at most kOverlapDqWaves blocks an SM, so that the dK/dV
// blocks take the SMs the dQ kernel's last waves leave idle. Measured on an H100 (bf16, head dim
// 64, causal, N 2048, batch 1): +9.5% at 14/2 heads (1.7 waves), +5% at 32/4 (3.9 waves); at 15
// waves and more -4% to +3%, no gain (bench/results/h100-attention-2026-12-07-6fc1a48-overlap-gqa.md,
// h100-attention-2026-12-07-7fed972-overlap.md).
// Not where no launch is programmatic (FLASHJIT_CUDA_OVERLAP=0), nor for an empty dQ grid (not
// launched: the dK/dV kernel then launches plainly). (Stream capture under
// FLASHJIT_CUDA_OVERLAP=eager and a caller's launcher launch the pair plainly, which is correct;
// they still take it, so that a call builds what its planning pass built.)
constexpr int64_t kOverlapDqWaves = 4;
void overlap_small_grids(std::vector<KernelSpec>& specs, const AttentionProblem& p, const Launch& launch) {
  if (settings::backward_overlap() >= 0) return;  // forced on or off: backward_kernels set it
  if (settings::overlap_launches() == 0) return;
  const int multiprocessors = device_info(launch.device_index).multiprocessors;
  for (size_t index = 1; index < specs.size(); ++index) {
    if (specs[index - 1].entry != KernelEntry::kBackwardDq || specs[index].entry != KernelEntry::kBackwardDkDv) continue;
    KernelSpec dq = specs[index - 1], dkdv = specs[index];
    dq.backward_overlap = dkdv.backward_overlap = true;
    if (!dq.overlaps_launch() || !dkdv.overlaps_launch()) return;
    const int64_t blocks = ceil_div(p.seqlen_q, dq.block_rows()) * p.batch * p.heads_q;
    if (blocks == 0 || blocks > kOverlapDqWaves * multiprocessors) return;
    specs[index - 1] = dq;
    specs[index] = dkdv;
    return;
  }
}

// The parts a dense one-pass backward runs in (settings::one_pass_sums_bytes): none where its
// float32 dQ sums (`sums_bytes`, the same for each key/value head of each batch entry) fit the
// budget or cannot be cut; else runs of whole batch entries where one entry's sums fit, or each
// batch entry's key/value heads (whole GQA groups) in runs, the runs of even length, each within
// the budget (one head each at least).
std::vector<AttentionProblem> one_pass_parts(const AttentionProblem& p, size_t sums_bytes) {
  std::vector<AttentionProblem> parts;
  const int64_t budget = settings::one_pass_sums_bytes(), units = p.batch * p.heads_kv;
  if (budget == 0 || p.varlen() || units <= 1 || int64_t(sums_bytes) <= budget) return parts;
  const int64_t fitting = std::max<int64_t>(1, budget / (int64_t(sums_bytes) / units));  // heads a part
  const auto runs = [](int64_t count, int64_t most) { return ceil_div(count, ceil_div(count, most)); };
  if (fitting >= p.heads_kv) {
    const int64_t batches = runs(p.batch, fitting / p.heads_kv);
    for (int64_t b = 0; b < p.batch; b += batches) {
      parts.push_back(heads_part(p, b, std::min(batches, p.batch - b), 0, p.heads_kv));
    }
  } else {
    const int64_t heads = runs(p.heads_kv, fitting);
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t h = 0; h < p.heads_kv; h += heads) parts.push_back(heads_part(p, b, 1, h, std::min(heads, p.heads_kv - h)));
    }
  }
  return parts;
}

// The backward's plan. mma.sync / scalar: the dQ kernel, which also writes delta
// = rowsum(dO * O) into scratch, then the dK/dV kernel (or a dV and a dK kernel)
// reading it. sm_90a: a prep kernel writes delta and LSE in the log2 domain into
// scratch rows padded to whole dQ query blocks, then the dQ and the dK/dV kernels
// read them. Same stream, in order: each kernel's scratch is written by the one before.
// With `parts` given, a one-pass backward whose dQ sums pass FLASHJIT_CUDA_ONE_PASS_SUMS_MIB is
// not planned: false, and the problems to plan instead in `parts` (one_pass_parts).
bool plan_backward(Plan& plan, const AttentionProblem& p, const Launch& launch,
                   std::vector<AttentionProblem>* parts = nullptr) {
  std::array<KernelParams, Plan::kMaxKernels> params;
  params.fill(params_of(p));
  std::vector<KernelSpec> specs = backward_specs(p, launch, params);
  overlap_small_grids(specs, p, launch);
  const bool hopper = specs.front().family == KernelFamily::kHopper;
  // sm_90a: scratch rows padded to whole blocks of 128 rows (every sm_90a backward kernel's block
  // rows; the one-pass dK/dV kernel's query tiles divide them).
  const int64_t block_rows = dkdv_kernel(specs).block_rows();
  const int64_t pitch = hopper ? ceil_div(p.seqlen_q, block_rows) * block_rows : p.seqlen_q;
  const int64_t scratch_rows = p.batch * p.heads_q * pitch;
  const size_t accumulator_bytes = p.dtype == FJ_FLOAT64 ? 8 : 4;
  const OnePassScratch one_pass(dkdv_kernel(specs), scratch_rows);
  if (parts != nullptr && one_pass.accum_floats > 0) {
    *parts = one_pass_parts(p, one_pass.accum_floats * sizeof(float));
    if (!parts->empty()) return false;
  }
  const DkDvParts dkdv_parts(dkdv_kernel(specs), p, ceil_div(p.seqlen_k, dkdv_kernel(specs).block_rows()),
                             device_info(launch.device_index).multiprocessors);
  // The dK/dV kernel in parts only where the problem takes more than one: elsewhere the plain one.
  if (dkdv_parts.parts == 1) dkdv_kernel(specs).dkdv_parts = false;
  for (size_t index = 0; index < specs.size(); ++index) {
    const KernelSpec& spec = specs[index];
    KernelParams& kernel_params = params[index];
    kernel_params.scratch_pitch = pitch;
    kernel_params.num_query_blocks = int(ceil_div(p.seqlen_q, spec.block_rows()));
    kernel_params.num_key_blocks = int(ceil_div(p.seqlen_k, spec.block_rows()));
    KernelLaunch& kernel = plan.add(spec, kernel_params, launch);
    switch (spec.entry) {
      case KernelEntry::kBackwardPrep: kernel.blocks = ceil_div(scratch_rows, spec.threads / 8); break;  // 8 lanes a row
      case KernelEntry::kBackwardDq:
        kernel.blocks = int64_t(kernel_params.num_query_blocks) * p.batch * p.heads_q;
        break;
      case KernelEntry::kBackwardDqConvert: kernel.blocks = ceil_div(scratch_rows, spec.block_n); break;  // a tile
      default: kernel.blocks = int64_t(kernel_params.num_key_blocks) * p.batch * p.heads_kv * dkdv_parts.parts; break;
    }
    // FLASHJIT_CUDA_BACKWARD_OVERLAP (KernelSpec::backward_overlap, set by backward_kernels or,
    // unset, overlap_small_grids on the sm_90a dQ kernel and the dK/dV kernel right after it):
    // the dK/dV kernel starts while the dQ
    // kernel runs. Its blocks read the prep kernel's rows, finished before the dQ kernel began,
    // not the dQ kernel's output, and end only after the dQ kernel, so that what follows the
    // backward in the stream finds both done. Under stream capture as FLASHJIT_CUDA_OVERLAP allows.
    if (spec.entry == KernelEntry::kBackwardDkDv && spec.overlaps_launch()) {
      const int overlap = settings::overlap_launches();
      kernel.programmatic = overlap == 2 || (overlap == 1 && !launch.capturing);
    }
  }
  const size_t row_bytes = size_t(scratch_rows) * accumulator_bytes * (hopper ? 2 : 1);
  const size_t parts_offset = row_bytes + (one_pass.bytes() + 15) / 16 * 16;
  plan.scratch_bytes = parts_offset + dkdv_parts.bytes();
  if (launch.planning) return true;
  void* scratch = p.workspace;
  if (scratch == nullptr) {
    if (KeptScratchEntry* kept = kept_scratch(plan.scratch_bytes, launch)) {
      plan.scratch.emplace(kept);
    } else {
      plan.scratch.emplace(plan.scratch_bytes, launch.stream, launch.device_index);
    }
    scratch = plan.scratch->get();
  } else if (p.workspace_bytes < plan.scratch_bytes) {
    throw_value_error("[cuda] workspace_bytes: this backward needs ", plan.scratch_bytes, " bytes of workspace, got ",
                      p.workspace_bytes, " (fj_attention_prepare_backward reports the size)");
  }
  for (size_t index = 0; index < plan.count; ++index) {
    KernelParams& kernel_params = plan.kernels[index].params;
    kernel_params.delta = scratch;
    kernel_params.lse_log2 = hopper ? static_cast<float*>(scratch) + scratch_rows : nullptr;
    one_pass.place(kernel_params, static_cast<char*>(scratch) + row_bytes);  // row_bytes: a multiple of 16
    dkdv_parts.place(kernel_params, static_cast<char*>(scratch) + parts_offset);
  }
  return true;
}

// A variable-length backward in one launch a kernel (FJ_VARLEN), after the table
// kernel where the offsets are in device memory: the sm_90a prep, dQ and dK/dV kernels
// over every sequence, their blocks found in the sequences' table (query blocks for dQ,
// key blocks for dK/dV; blocks past the table's counts return at once), the prep's
// scratch rows entry by entry of the table (a row a query of each head, padded to whole
// dQ blocks). False, with nothing planned, where it cannot (then a launch a sequence).
bool plan_varlen_backward(Plan& plan, const AttentionProblem& p, const Launch& launch) {
  AttentionProblem packed;
  if (!varlen_single_launch(p, launch, packed)) return false;
  const KernelTraits traits = traits_for_launch(packed, launch);
  if (!hopper_applies(traits)) return false;
  // The class of the batch's longest sequence (a bound where the offsets are on the device).
  std::vector<KernelSpec> specs = backward_kernels_for(traits, p.seqlen_k, launch, p.nondeterministic);
  // Offsets in device memory: max_seqlen_k is the caller's word, not checked against them, so the
  // arrival order (whose blocks must all be resident) is not taken on it.
  keep_blocks_resident(dkdv_kernel(specs),
                       p.offsets_on_device ? std::numeric_limits<int64_t>::max()
                                           : ceil_div(p.seqlen_k, dkdv_kernel(specs).block_rows()),
                       device_info(launch.device_index).multiprocessors);
  keep_diagonal_off_groups(dkdv_kernel(specs), p.heads_q != p.heads_kv);
  if (specs.size() + (p.offsets_on_device ? 1 : 0) > Plan::kMaxKernels) return false;
  std::array<KernelParams, Plan::kMaxKernels> params;
  params.fill(params_of(p));
  const KernelSpec* dq = nullptr;
  const KernelSpec* dkdv = nullptr;
  for (size_t index = 0; index < specs.size(); ++index) {
    KernelSpec& spec = specs[index];
    if (spec.family != KernelFamily::kHopper) return false;
    if (reads_tensor_maps(spec) && !encode_backward_maps(params[index], packed, spec)) return false;
    spec.varlen = true;
    if (spec.entry == KernelEntry::kBackwardDq) dq = &spec;
    if (spec.entry == KernelEntry::kBackwardDkDv) dkdv = &spec;
  }
  if (dkdv == nullptr || (dq == nullptr && !dkdv->one_pass)) return false;
  // Query tiles of the dQ kernel's rows (the one-pass kernel's tiles divide them).
  const int query_rows = dq != nullptr ? dq->block_rows() : dkdv->block_rows();
  const VarlenTable table = varlen_table(p, query_rows, dkdv->block_rows());
  // Scratch rows a dQ tile of every sequence and head (sequence_params places an entry's).
  const int64_t scratch_rows = table.query_tiles * query_rows;
  const size_t scratch_floats = size_t(scratch_rows) * 2;  // delta, then LSE * log2(e)
  const OnePassScratch one_pass(*dkdv, scratch_rows);
  const size_t one_pass_offset = scratch_floats * sizeof(float);  // whole tiles of rows: a multiple of 16
  const size_t table_offset = (one_pass_offset + one_pass.bytes() + 15) / 16 * 16;
  plan.scratch_bytes = table_offset + table.bytes;
  if (launch.planning) return true;
  if (p.offsets_on_device) add_table_kernel(plan, p, traits, query_rows, dkdv->block_rows(), launch);
  for (size_t index = 0; index < specs.size(); ++index) {
    const KernelSpec& spec = specs[index];
    KernelParams& kernel_params = params[index];
    kernel_params.scratch_pitch = query_rows;
    kernel_params.varlen_top_left = p.causal == FJ_CAUSAL_TOP_LEFT;
    KernelLaunch& kernel = plan.add(spec, kernel_params, launch);
    switch (spec.entry) {
      case KernelEntry::kBackwardPrep: kernel.blocks = ceil_div(scratch_rows, spec.threads / 8); break;  // 8 lanes a row
      case KernelEntry::kBackwardDq: kernel.blocks = table.query_tiles; break;
      case KernelEntry::kBackwardDqConvert: kernel.blocks = ceil_div(scratch_rows, spec.block_n); break;  // a tile
      default: kernel.blocks = table.key_tiles; break;
    }
  }
  if (!try_scratch(plan, plan.scratch_bytes, launch)) {
    plan.count = 0;
    return false;
  }
  char* scratch = static_cast<char*>(plan.scratch->get());
  if (!place_table(plan, table, scratch + table_offset, launch)) {
    plan.count = 0;
    plan.scratch.reset();
    return false;
  }
  for (size_t index = 0; index < plan.count; ++index) {
    KernelParams& kernel_params = plan.kernels[index].params;
    kernel_params.delta = scratch;
    kernel_params.lse_log2 = reinterpret_cast<float*>(scratch) + scratch_rows;
    one_pass.place(kernel_params, scratch + one_pass_offset);
  }
  return true;
}

// Arrays of int32 in device memory copied into host memory on the call's stream, then a wait for
// it; not under stream capture, with a workspace or in fj_attention_prepare_*, where nothing may
// wait (the error names `what`).
struct HostCopies {
  const Launch& launch;
  HostCopies(const Launch& l, const char* what) : launch(l) {
    if (launch.graph_safe || driver().cuMemcpyDtoHAsync == nullptr || driver().cuStreamSynchronize == nullptr) {
      throw_unsupported("[cuda] ", what, " in device memory are copied to the host here, which cannot wait "
                        "under stream capture, with a workspace or in fj_attention_prepare_*: pass them in host "
                        "memory");
    }
  }
  void copy(int32_t* host, const int32_t* device, size_t count) const {
    check(driver().cuMemcpyDtoHAsync(host, reinterpret_cast<CUdeviceptr>(device), count * sizeof(int32_t),
                                     launch.stream),
          "cuMemcpyDtoHAsync");
  }
  void wait() const { check(driver().cuStreamSynchronize(launch.stream), "cuStreamSynchronize"); }
};

// Offsets in device memory where one launch does not apply: copied to the host into `storage`
// (HostCopies), checked as host offsets are, and the problem returned with them (an empty batch
// needs none).
AttentionProblem with_offsets_on_host(const AttentionProblem& p, const Launch& launch,
                                      std::vector<int32_t>& storage) {
  if (p.batch == 0) {
    AttentionProblem empty = p;
    empty.offsets_on_device = false;  // nothing reads them
    return empty;
  }
  const HostCopies copies(launch, "cu_seqlens_q: offsets");
  const size_t count = size_t(p.batch) + 1;
  storage.assign(2 * count, 0);
  copies.copy(storage.data(), p.cu_seqlens_q, count);
  copies.copy(storage.data() + count, p.cu_seqlens_k, count);
  copies.wait();
  AttentionProblem host = p;
  adopt_host_offsets("varlen_attention", host, storage.data(), storage.data() + count);
  return host;
}

// A KV cache whose counts (and pages) are in device memory where one launch does not take it:
// copied to the host into `storage` (HostCopies), checked as host ones are, and the problem
// returned with them.
AttentionProblem with_kv_cache_on_host(const AttentionProblem& p, const Launch& launch,
                                       std::vector<int32_t>& storage) {
  const HostCopies copies(launch, "seqused_k: a KV cache's counts");
  const size_t batch = size_t(p.batch);
  const size_t width = p.page_table != nullptr ? size_t(p.page_table_width) : 0;
  storage.assign(batch * (1 + width), 0);
  if (batch > 0) copies.copy(storage.data(), p.seqused_k, batch);
  for (size_t b = 0; b < batch && width > 0; ++b) {  // each row's pages, packed `width` apart
    copies.copy(storage.data() + batch + b * width, p.page_table + int64_t(b) * p.page_table_stride, width);
  }
  copies.wait();
  AttentionProblem host = p;
  adopt_host_kv_cache("varlen_attention", host, storage.data(), width > 0 ? storage.data() + batch : nullptr);
  return host;
}

// A call's plans, one a part (a variable-length batch runs as one plan a sequence,
// DenseParts), each enqueued on the stream in order; or (planning, fj_attention_prepare_*)
// each made as a call under capture would make it, its kernels compiled and loaded, nothing
// enqueued. Returns the largest scratch of the parts, which run one after another and can
// share one workspace.
size_t run_parts(const AttentionProblem& problem, bool backward, bool planning) {
  if (problem.launch != nullptr && !planning) {
    // The caller records the kernels: the call's work must be its kernels alone (no pool
    // scratch, memset or copy on the stream). Planning (fj_attention_prepare_*) needs neither.
    if (problem.workspace == nullptr) {
      throw_value_error("[cuda] launch: needs workspace (the call's scratch, fj_attention_prepare_* sizes it), got NULL");
    }
    if (problem.varlen()) throw_unsupported("[cuda] launch: a variable-length batch is launched on the stream only");
  }
  // (Planning is for graph capture, which the one-launch KV cache does not take.)
  const bool kv_forward =
      !backward && !planning && problem.varlen() && (problem.seqused_k != nullptr || problem.page_table != nullptr);
  if (kv_forward || problem.kv_on_device) {
    Launch launch = prepare(problem);
    Plan plan;
    if (kv_forward && plan_kv_cache_forward(plan, problem, launch)) {
      enqueue(plan, launch);
      return plan.scratch_bytes;
    }
    if (problem.kv_on_device) {  // where one launch did not take it: the host's copy, then as host arrays
      if (planning) launch.graph_safe = launch.planning = true;
      std::vector<int32_t> arrays;
      return run_parts(with_kv_cache_on_host(problem, launch, arrays), backward, planning);
    }
  }
  if (!backward && problem.page_table != nullptr) {
    throw_unsupported("[cuda] page_table: a paged KV cache runs on CUDA for float16/bfloat16 without mask or "
                      "dropout, outside graph capture, with the same number of queries in every sequence "
                      "(flashjit.attention_with_kvcache gathers the pages for other calls)");
  }
  size_t needed = 0;
  if (problem.varlen() && (settings::varlen_single_launch() || problem.offsets_on_device)) {
    Launch launch = prepare(problem);
    if (planning) launch.graph_safe = launch.planning = true;
    Plan plan;
    if (settings::varlen_single_launch() &&
        (backward ? plan_varlen_backward(plan, problem, launch) : plan_varlen_forward(plan, problem, launch))) {
      if (!planning) enqueue(plan, launch);
      return plan.scratch_bytes;
    }
    if (problem.offsets_on_device) {
      std::vector<int32_t> offsets;
      return run_parts(with_offsets_on_host(problem, launch, offsets), backward, planning);
    }
  }
  for (const AttentionProblem& part : DenseParts(problem)) {
    if (backward ? part.seqlen_q == 0 && part.seqlen_k == 0 : part.seqlen_q == 0) continue;
    const AttentionProblem p = backward ? part : with_query_groups_packed(part);
    Launch launch = prepare(p);
    if (planning) launch.graph_safe = launch.planning = true;
    Plan plan;
    std::vector<AttentionProblem> parts;
    if (backward && !plan_backward(plan, p, launch, &parts)) {
      // The one pass over parts of the heads (one_pass_parts), one after another: each part's plan,
      // gone before the next is made, gives its scratch back in stream order for the next to take.
      for (const AttentionProblem& piece : parts) {
        Plan piece_plan;
        plan_backward(piece_plan, piece, launch);
        if (!planning) enqueue(piece_plan, launch);
        needed = std::max(needed, piece_plan.scratch_bytes);
      }
      continue;
    }
    if (!backward) plan_forward(plan, p, launch);
    if (!planning) enqueue(plan, launch);
    needed = std::max(needed, plan.scratch_bytes);
  }
  return needed;
}

void forward(const AttentionProblem& problem) {
  const settings::EnvironmentScope scope;
  run_parts(problem, false, false);
}
void backward(const AttentionProblem& problem) {
  const settings::EnvironmentScope scope;
  run_parts(problem, true, false);
}
size_t prepare_call(const AttentionProblem& problem, bool backward) {
  const settings::EnvironmentScope scope;
  return run_parts(problem, backward, true);
}

}  // namespace

void* allocate_array_memory(size_t bytes, CUstream stream, int device_index) {
  activate_device(device_index);
  const Driver& d = driver();
  const CUmemoryPool pool = array_pool(device_index);
  CUdeviceptr pointer = 0;
  CUresult status = d.cuMemAllocFromPoolAsync(&pointer, std::max<size_t>(bytes, 1), pool, stream);
  if (status == 2 && d.cuMemPoolTrimTo != nullptr) {  // out of memory: give back what the pool keeps free, once
    d.cuMemPoolTrimTo(pool, 0);
    status = d.cuMemAllocFromPoolAsync(&pointer, std::max<size_t>(bytes, 1), pool, stream);
  }
  check(status, "cuMemAllocFromPoolAsync");
  const size_t active = array_bytes_active += bytes;
  size_t peak = array_bytes_peak.load();
  while (active > peak && !array_bytes_peak.compare_exchange_weak(peak, active)) {
  }
  return reinterpret_cast<void*>(pointer);
}

void release_array_memory(void* pointer, size_t bytes, int device_index) noexcept {
  if (pointer == nullptr) return;
  array_bytes_active -= bytes;
  try {
    activate_device(device_index);
    driver().cuMemFreeAsync(reinterpret_cast<CUdeviceptr>(pointer), reinterpret_cast<CUstream>(kPerThreadStream));
  } catch (...) {  // no driver or context left (process exit): the memory stays reserved
  }
}

void release_moved_array_memory(void* pointer, size_t bytes, int device_index) noexcept {
  array_bytes_active -= bytes;
  if (pointer == nullptr) return;
  try {
    activate_device(device_index);
    const Driver& d = driver();
    constexpr int kPointerAttributeIsManaged = 8;  // CU_POINTER_ATTRIBUTE_IS_MANAGED
    unsigned managed = 1;
    if (d.cuPointerGetAttribute != nullptr) {
      d.cuPointerGetAttribute(&managed, kPointerAttributeIsManaged, reinterpret_cast<CUdeviceptr>(pointer));
    }
    if (managed != 0 && d.cuMemFree != nullptr) {
      d.cuMemFree(reinterpret_cast<CUdeviceptr>(pointer));
    } else if (managed == 0 && d.cuMemFreeHost != nullptr) {
      d.cuMemFreeHost(pointer);
    }
  } catch (...) {  // no driver or context left (process exit)
  }
}

ArrayMemory array_memory() { return ArrayMemory{array_bytes_active.load(), array_bytes_peak.load()}; }
void reset_array_memory_peak() { array_bytes_peak = array_bytes_active.load(); }

}  // namespace flashjit::cuda

const flashjit::Backend& flashjit_backend_cuda() {
  static const flashjit::Backend backend{"cuda", FJ_DEVICE_CUDA, flashjit::cuda::forward,
                                         flashjit::cuda::backward, flashjit::cuda::prepare_call};
  return backend;
}
