// Hopper warpgroup matrix multiply (wgmma, sm_90a) for the sm_90a kernels:
// operand tiles in shared memory with the 128-byte swizzle, their matrix
// descriptors, the asynchronous mma with A from shared memory or from
// registers, and the fences around it.
//
// Shared-memory tile of R rows x D columns (D a multiple of 64): D / 64
// regions of R x 128 bytes, row r at r * 128 bytes in its region, and the
// 16-byte unit u of a row stored at unit u ^ (r % 8) (the 128-byte swizzle
// the descriptors name; tile_offset in mma_common.cuh). Regions start
// 1024-byte aligned.
//
// Accumulator layout (PTX ISA, wgmma .m64nNk16 D fragment): warp w of the
// warpgroup holds rows 16w..16w+15 as the C fragments of mma.m16n8k16, one
// [4] per 8 columns; the A fragment from registers of a 16-deep step is the
// A fragment of mma.m16n8k16, so a_from_c turns S into P in registers.
#pragma once

namespace flashjit {
namespace mma {

#if FJ_ELEM_IS_BF16
#define FJ_WGMMA_TYPES "f32.bf16.bf16"
#else
#define FJ_WGMMA_TYPES "f32.f16.f16"
#endif

constexpr int kSwizzleBytes = kSwizzleElems * static_cast<int>(sizeof(elem_t));  // one row of a region

// Matrix descriptor of a swizzled tile (PTX ISA, "Matrix Descriptor Format"):
// start address, leading and stride byte offsets (all >> 4), 128-byte swizzle.
FJ_DEVICE unsigned long long matrix_descriptor(const void* start, int leading_bytes, int stride_bytes) {
  const unsigned long long address = shared_address(start);
  return ((address & 0x3FFFF) >> 4) | (static_cast<unsigned long long>((leading_bytes >> 4) & 0x3FFF) << 16) |
         (static_cast<unsigned long long>((stride_bytes >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

// K-major operand (rows are M or N, columns the reduction): 16 columns from
// `column` (a multiple of 16) of a tile of kRows rows, from row `row` on.
template <int kRows, int kDim>
FJ_DEVICE unsigned long long k_major_descriptor(const elem_t* tile, int row, int column) {
  return matrix_descriptor(tile + tile_offset<kRows, kDim>(row, column), 16, 8 * kSwizzleBytes);
}

// MN-major operand (rows are the reduction, columns N): rows `row`..row+15 of
// a tile of kRows rows, every column; consecutive 64-column regions are
// kRows * 128 bytes apart.
template <int kRows>
FJ_DEVICE unsigned long long mn_major_descriptor(const elem_t* tile, int row) {
  return matrix_descriptor(tile + row * kSwizzleElems, kRows * kSwizzleBytes, 8 * kSwizzleBytes);
}

FJ_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
FJ_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most kPending of this warpgroup's committed groups are in flight.
template <int kPending>
FJ_DEVICE void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// wgmma_wait<0> placed after the work before it: ptxas schedules a wait (it has no
// operands) early in its basic block, so register math written before it (the
// softmax meant to run beside P V) can end up after it, the products no longer
// overlapped. A branch on a warp-uniform value from that work gives the wait a
// block of its own; the two texts differ so that the compiler cannot merge them
// back above the branch.
FJ_DEVICE void wgmma_wait_all_after(bool uniform) {
  if (uniform) {
    asm volatile("wgmma.wait_group.sync.aligned 0; // after\n" ::: "memory");
  } else {
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  }
}
// Shared memory written through the generic proxy (cp.async, stores) before the
// tensor cores read it: each writer fences, then the block synchronises.
FJ_DEVICE void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Keeps the compiler from moving accumulator or A-fragment registers across an
// asynchronous mma.
FJ_DEVICE void pin_register(float& value) { asm volatile("" : "+f"(value)::"memory"); }
FJ_DEVICE void pin_register(unsigned& value) { asm volatile("" : "+r"(value)::"memory"); }

template <typename T, int kN>
FJ_DEVICE void pin(T (&values)[kN][4]) {
#pragma unroll
  for (int n = 0; n < kN; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) pin_register(values[n][e]);
  }
}

// d[64 x kN] (+)= A B, A and B K-major in shared memory; accumulate unless first.
template <int kN>
FJ_DEVICE void wgmma_ss(float (&d)[kN / 8][4], unsigned long long a, unsigned long long b, bool first);

// d[64 x kN] (+)= A B, A MN-major (its 64 rows are columns of a swizzled tile) and B
// K-major in shared memory; accumulate unless first.
template <int kN>
FJ_DEVICE void wgmma_ss_mn_a(float (&d)[kN / 8][4], unsigned long long a, unsigned long long b, bool first);

// d[64 x kN] (+)= A B, A K-major and B MN-major (its rows are the reduction) in shared memory;
// accumulate unless first.
template <int kN>
FJ_DEVICE void wgmma_ss_mn_b(float (&d)[kN / 8][4], unsigned long long a, unsigned long long b, bool first);

// d[64 x kN] += A B, A (16 deep) in registers as an mma.m16n8k16 A fragment per
// warp, B MN-major in shared memory.
template <int kN>
FJ_DEVICE void wgmma_rs(float (&d)[kN / 8][4], const unsigned (&a)[4], unsigned long long b);

// Descriptors of consecutive 16-deep steps differ by a constant in the start
// address field: each step's is built from the first by an add. The first goes
// through an empty asm so that the compiler cannot hoist every step's
// descriptor out of the caller's loop and hold them all in registers (at head
// dim 256 that is 64 registers).
FJ_DEVICE unsigned long long fresh(unsigned long long descriptor) {
  asm volatile("" : "+l"(descriptor));
  return descriptor;
}
// The start-address field (bytes >> 4) of step kk of a K-major tile of kRows rows:
// 64-column regions kRows * 128 bytes apart, 16 columns (32 bytes) a step within one.
template <int kRows>
FJ_DEVICE constexpr unsigned long long k_major_step(int kk) {
  return static_cast<unsigned long long>(((kk * 16) / kSwizzleElems) * kRows * kSwizzleBytes + (kk % 4) * 32) >> 4;
}

// d[64 x kN] = X Y^T for a warpgroup, issued (not waited for): X's rows
// row..row + 63 (row a multiple of 8) of a swizzled tile of kRowsX rows and Y's
// kN rows, both kDepth columns deep (K-major).
template <int kRowsX, int kN, int kDepth>
FJ_DEVICE void wgmma_rows_by_rows(float (&d)[kN / 8][4], const elem_t* x_tile, int row, const elem_t* y_tile) {
  const unsigned long long x = fresh(k_major_descriptor<kRowsX, kDepth>(x_tile, row, 0));
  const unsigned long long y = fresh(k_major_descriptor<kN, kDepth>(y_tile, 0, 0));
#pragma unroll
  for (int kk = 0; kk < kDepth / 16; ++kk) wgmma_ss<kN>(d, x + k_major_step<kRowsX>(kk), y + k_major_step<kN>(kk), kk == 0);
}

// d[64 x kN] += A Y for a warpgroup, issued: A (64 x kDepth) as the A fragments
// of its 16-deep steps in registers, Y a swizzled tile of kDepth rows x kN
// columns (MN-major; a step is 16 rows, 2048 bytes).
template <int kDepth, int kN>
FJ_DEVICE void wgmma_fragments_by_rows(float (&d)[kN / 8][4], const unsigned (&a)[kDepth / 16][4],
                                       const elem_t* y_tile) {
  const unsigned long long y = fresh(mn_major_descriptor<kDepth>(y_tile, 0));
#pragma unroll
  for (int kk = 0; kk < kDepth / 16; ++kk) wgmma_rs<kN>(d, a[kk], y + static_cast<unsigned long long>(kk * 16 * kSwizzleBytes >> 4));
}

// d[64 x kN] += X Y for a warpgroup, issued: X's rows row..row + 63 of a swizzled tile of kRowsX
// rows, kDepth columns deep (K-major), Y a swizzled tile of kDepth rows x kN columns (MN-major).
template <int kRowsX, int kDepth, int kN>
FJ_DEVICE void wgmma_rows_by_mn_rows(float (&d)[kN / 8][4], const elem_t* x_tile, int row, const elem_t* y_tile) {
  const unsigned long long x = fresh(k_major_descriptor<kRowsX, kDepth>(x_tile, row, 0));
  const unsigned long long y = fresh(mn_major_descriptor<kDepth>(y_tile, 0));
#pragma unroll
  for (int kk = 0; kk < kDepth / 16; ++kk) {
    wgmma_ss_mn_b<kN>(d, x + k_major_step<kRowsX>(kk), y + static_cast<unsigned long long>(kk * 16 * kSwizzleBytes >> 4),
                      false);
  }
}

// d[64 x kN] = X^T Y for a warpgroup, issued: X's 64 columns of region `region` of a
// swizzled tile of kDepth rows (MN-major A: the product's rows are X's columns), Y's kN
// rows from `row` (a multiple of 8) of a tile of kRowsY rows, kDepth columns deep (K-major).
template <int kRowsY, int kN, int kDepth>
FJ_DEVICE void wgmma_columns_by_rows(float (&d)[kN / 8][4], const elem_t* x_tile, int region, const elem_t* y_tile,
                                     int row) {
  const unsigned long long x = fresh(mn_major_descriptor<kDepth>(x_tile + region * kDepth * kSwizzleElems, 0));
  const unsigned long long y = fresh(k_major_descriptor<kRowsY, kDepth>(y_tile, row, 0));
#pragma unroll
  for (int kk = 0; kk < kDepth / 16; ++kk) {
    wgmma_ss_mn_a<kN>(d, x + static_cast<unsigned long long>(kk * 16 * kSwizzleBytes >> 4),
                      y + k_major_step<kRowsY>(kk), kk == 0);
  }
}

// C fragments (float) of a 64 x kN result -> the A fragments of its kN / 16 steps.
template <int kN>
FJ_DEVICE void to_fragments(unsigned (&a)[kN / 16][4], const float (&c)[kN / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk) a_from_c(a[kk], c[2 * kk], c[2 * kk + 1]);
}

// The specialisations for the N a kernel uses follow this file: PTX needs one
// instruction text per N, with N / 2 accumulator operands, so kernel_spec.cpp
// writes them out (wgmma_instructions).

}  // namespace mma
}  // namespace flashjit
