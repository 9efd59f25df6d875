// Hopper warpgroup matrix multiply (wgmma, sm_90a) for the forward kernel:
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
FJ_DEVICE void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
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

#define FJ_ACC8(n) \
  "+f"(d[n][0]), "+f"(d[n][1]), "+f"(d[n][2]), "+f"(d[n][3]), "+f"(d[n + 1][0]), "+f"(d[n + 1][1]), \
      "+f"(d[n + 1][2]), "+f"(d[n + 1][3])
#define FJ_ACC32 FJ_ACC8(0), FJ_ACC8(2), FJ_ACC8(4), FJ_ACC8(6)
#define FJ_REGS32                                                                                           \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"

// d[64 x kN] (+)= A B, A and B K-major in shared memory; accumulate unless first.
// Only kN = 64 is written out: the kernel takes 64 keys a step and head dims
// padded to 64 (kernel_spec.cpp).
template <int kN>
FJ_DEVICE void wgmma_ss(float (&d)[kN / 8][4], unsigned long long a, unsigned long long b, bool first);

template <>
FJ_DEVICE void wgmma_ss<64>(float (&d)[8][4], unsigned long long a, unsigned long long b, bool first) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16." FJ_WGMMA_TYPES " " FJ_REGS32 ", %32, %33, p, 1, 1, 0, 0;\n}\n"
      : FJ_ACC32
      : "l"(a), "l"(b), "r"(first ? 0 : 1));
}

// d[64 x kN] += A B, A (16 deep) in registers as an mma.m16n8k16 A fragment per
// warp, B MN-major in shared memory.
template <int kN>
FJ_DEVICE void wgmma_rs(float (&d)[kN / 8][4], const unsigned (&a)[4], unsigned long long b);

template <>
FJ_DEVICE void wgmma_rs<64>(float (&d)[8][4], const unsigned (&a)[4], unsigned long long b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16." FJ_WGMMA_TYPES " " FJ_REGS32 ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : FJ_ACC32
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

#undef FJ_ACC8
#undef FJ_ACC32
#undef FJ_REGS32

}  // namespace mma
}  // namespace flashjit
