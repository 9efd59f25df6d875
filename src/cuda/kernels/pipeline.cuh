// Producer/consumer plumbing of the sm_90a kernels: mbarriers in shared
// memory, TMA tile loads that complete on them, named barriers between
// warpgroups, and register reallocation between warpgroups.
//
// A ring of kStages buffers has a "full" and an "empty" mbarrier per buffer.
// Use j of the ring (j = 0, 1, ...) takes buffer j % kStages in phase
// (j / kStages) % 2: the producer waits until the buffer is empty (parity
// phase ^ 1, which a fresh barrier passes at once), announces the bytes the TMA
// will write and issues it; consumers wait for full (parity phase), read, and
// arrive on empty.
#pragma once

namespace flashjit {
namespace mma {

struct Ring {
  int buffer;
  unsigned phase;
};
template <int kStages>
FJ_DEVICE Ring ring_slot(int use) {
  return Ring{use % kStages, static_cast<unsigned>((use / kStages) & 1)};
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

// Named barrier `id` (1..15; 0 is __syncthreads) over `threads` threads.
FJ_DEVICE void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
FJ_DEVICE void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
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
