// Producer/consumer plumbing of the sm_90a kernels: mbarriers in shared
// memory, TMA loads that complete on them, rings of tile buffers, turns
// between the consumer warpgroups, and register reallocation.
//
// The kernels' roles: warpgroup 0 produces (one thread issues TMA loads),
// warpgroups 1 and 2 consume (wgmma), kThreads threads together.
#pragma once

namespace flashjit {
namespace mma {

constexpr int kStages = FJ_STAGES;
constexpr int kProducerThreads = 128;
// 24 + 2 x 240 registers a thread fit the 64K of the SM that the launch bounds
// (384 threads at 168 registers each) reserve.
constexpr int kProducerRegisters = 24;
constexpr int kConsumerRegisters = 240;
// Consumer w issues its wgmma after named barrier kTurnBarrier + w, then passes
// the turn, so that one consumer's softmax runs beside the other's products.
constexpr int kTurnBarrier = 1;

// The first 1024-byte boundary of dynamic shared memory: swizzled tiles start there.
FJ_DEVICE unsigned char* aligned_for_swizzle(unsigned char* shared) {
  return shared + ((1024 - (shared_address(shared) & 1023)) & 1023);
}

FJ_DEVICE void mbarrier_init(unsigned long long* barrier, unsigned arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(barrier)), "r"(arrivals));
}
// Makes initialised mbarriers visible to the async proxy (TMA) before use.
FJ_DEVICE void mbarrier_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

FJ_DEVICE void mbarrier_arrive(unsigned long long* barrier) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(shared_address(barrier)) : "memory");
}
// Arrives and announces `bytes` that asynchronous copies will complete.
FJ_DEVICE void mbarrier_expect_bytes(unsigned long long* barrier, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(shared_address(barrier)), "r"(bytes)
               : "memory");
}
FJ_DEVICE void mbarrier_wait(unsigned long long* barrier, unsigned parity) {
  unsigned done = 0;
  do {
    asm volatile(
        "{\n.reg .pred ready;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 ready, [%1], %2;\n"
        "selp.u32 %0, 1, 0, ready;\n}\n"
        : "=r"(done)
        : "r"(shared_address(barrier)), "r"(parity)
        : "memory");
  } while (!done);
}

FJ_DEVICE void prefetch_tensor_map(const TensorMap& map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<unsigned long long>(&map)) : "memory");
}

// One TMA box (64 columns x the map's box rows) of operand `map` at column
// `column`, row `row` of (batch b, head h) into shared memory, completing on
// `barrier`. Rows past the sequence and columns past the head dim read as 0.
FJ_DEVICE void tma_load(void* shared, const TensorMap& map, int column, int row, int h, int b,
                        unsigned long long* barrier) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(shared_address(shared)),
      "l"(reinterpret_cast<unsigned long long>(&map)), "r"(column), "r"(row), "r"(h), "r"(b),
      "r"(shared_address(barrier))
      : "memory");
}

// A tile of kRows rows x kDim columns (kDim a multiple of 64) as kDim / 64 boxes,
// one per swizzled region (wgmma.cuh).
template <int kRows, int kDim>
FJ_DEVICE void tma_load_tile(elem_t* tile, const TensorMap& map, long long row, int h, int b,
                             unsigned long long* barrier) {
#pragma unroll
  for (int region = 0; region < kDim / kSwizzleElems; ++region) {
    tma_load(tile + region * kRows * kSwizzleElems, map, region * kSwizzleElems, static_cast<int>(row), h, b, barrier);
  }
}
template <int kRows, int kDim>
constexpr unsigned kTileBytes = kRows * kDim * sizeof(elem_t);

// `bytes` (a multiple of 16) from 16-byte aligned global memory, completing on `barrier`.
FJ_DEVICE void bulk_load(void* shared, const void* global, unsigned bytes, unsigned long long* barrier) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          shared_address(shared)),
      "l"(global), "r"(bytes), "r"(shared_address(barrier))
      : "memory");
}

// A ring of kBuffers tile buffers between the producer thread and the kWarps
// consumer warps, with a "full" and an "empty" mbarrier per buffer. Use j
// (j = 0, 1, ...) takes buffer j % kBuffers in phase (j / kBuffers) % 2: the
// producer waits until the buffer is empty (parity phase ^ 1, which a fresh
// barrier passes at once) and announces the bytes its copies will write;
// consumers wait for full (parity phase), read, and each warp arrives on empty.
template <int kBuffers>
struct Ring {
  static constexpr int kBarriers = 2 * kBuffers;
  unsigned long long* full;   // [kBuffers]
  unsigned long long* empty;  // [kBuffers]

  FJ_DEVICE static Ring at(unsigned long long* barriers) { return Ring{barriers, barriers + kBuffers}; }
  // By one thread, before the block synchronises.
  FJ_DEVICE void init() const {
#pragma unroll
    for (int buffer = 0; buffer < kBuffers; ++buffer) {
      mbarrier_init(&full[buffer], 1);
      mbarrier_init(&empty[buffer], kWarps);
    }
  }
  // Producer: the buffer of use j once it is empty, its full barrier told to expect `bytes`.
  FJ_DEVICE int produce(int use, unsigned bytes) const {
    const int buffer = use % kBuffers;
    mbarrier_wait(&empty[buffer], ((use / kBuffers) & 1) ^ 1);
    mbarrier_expect_bytes(&full[buffer], bytes);
    return buffer;
  }
  // Consumer: the buffer of use j once its bytes arrived.
  FJ_DEVICE int consume(int use) const {
    const int buffer = use % kBuffers;
    mbarrier_wait(&full[buffer], (use / kBuffers) & 1);
    return buffer;
  }
  // Consumer warp: done with the buffer of use j (after the wgmma that read it).
  FJ_DEVICE void release(int use, int lane) const {
    if (lane == 0) mbarrier_arrive(&empty[use % kBuffers]);
  }
};

// Named barrier `id` (1..15; 0 is __syncthreads) over `threads` threads.
FJ_DEVICE void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
FJ_DEVICE void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Turns between the two consumer warpgroups. Consumer 1 gives consumer 0 the
// first turn (first_turn); each then alternates wait_turn, issue, pass_turn;
// consumer 0 takes the last pass (last_turn), so both barriers end balanced.
FJ_DEVICE void first_turn(int consumer) {
  if (consumer == 1) named_barrier_arrive(kTurnBarrier, kThreads);
}
FJ_DEVICE void wait_turn(int consumer) { named_barrier_sync(kTurnBarrier + consumer, kThreads); }
FJ_DEVICE void pass_turn(int consumer) { named_barrier_arrive(kTurnBarrier + (consumer ^ 1), kThreads); }
FJ_DEVICE void last_turn(int consumer) {
  if (consumer == 0) wait_turn(0);
}

// Register reallocation between warpgroups (the kernel's launch bounds cap the
// registers at entry; each warpgroup then releases or claims its share).
template <int kRegisters>
FJ_DEVICE void release_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
FJ_DEVICE void claim_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

}  // namespace mma
}  // namespace flashjit
