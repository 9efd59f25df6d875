// Device helpers shared by every kernel: element types and conversions, the
// score transform (scale, softcap, mask, causal/window bounds) and lane
// reductions. The generated prelude defines the FJ_* specialisation macros
// (kernel_spec.cpp) before this file.
#pragma once

namespace flashjit {

#define FJ_DEVICE __device__ __forceinline__

// Programmatic dependent launch (sm_90; no-ops before it, and where the launch was a plain one).
// A kernel whose successor backend.cpp launches programmatically lets it start once all of the
// kernel's blocks have said so (or ended); the successor waits until the kernel has ended and its
// writes are visible before it reads them.
FJ_DEVICE void let_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
FJ_DEVICE void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// 16-bit floating point storage, converted with PTX cvt (round to nearest even).
struct half_t {
  unsigned short bits;
};
struct bf16_t {
  unsigned short bits;
};

FJ_DEVICE float to_float(float x) { return x; }
FJ_DEVICE double to_float(double x) { return x; }
FJ_DEVICE float to_float(half_t x) {
  float result;
  asm("cvt.f32.f16 %0, %1;" : "=f"(result) : "h"(x.bits));
  return result;
}
FJ_DEVICE float to_float(bf16_t x) { return __uint_as_float(static_cast<unsigned>(x.bits) << 16); }
FJ_DEVICE float to_float(unsigned char x) { return x != 0 ? 1.0f : 0.0f; }

template <typename T>
FJ_DEVICE T from_float(float x);
template <>
FJ_DEVICE float from_float<float>(float x) { return x; }
template <>
FJ_DEVICE half_t from_float<half_t>(float x) {
  half_t result;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(result.bits) : "f"(x));
  return result;
}
template <>
FJ_DEVICE bf16_t from_float<bf16_t>(float x) {
  bf16_t result;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(result.bits) : "f"(x));
  return result;
}

// Accumulator-typed loads and stores: float for every storage type but double.
template <typename Acc, typename T>
FJ_DEVICE Acc load_as(const T* address) {
  return static_cast<Acc>(to_float(*address));
}
template <typename T, typename Acc>
FJ_DEVICE void store_as(T* address, Acc value) {
  *address = from_float<T>(static_cast<float>(value));
}
template <>
FJ_DEVICE void store_as<double, double>(double* address, double value) {
  *address = value;
}

template <typename Acc>
FJ_DEVICE Acc negative_infinity();
template <>
FJ_DEVICE float negative_infinity<float>() { return __int_as_float(0xff800000); }
template <>
FJ_DEVICE double negative_infinity<double>() { return __longlong_as_double(0xfff0000000000000ULL); }

FJ_DEVICE float exp_of(float x) { return expf(x); }
FJ_DEVICE double exp_of(double x) { return exp(x); }
FJ_DEVICE float log_of(float x) { return logf(x); }
FJ_DEVICE double log_of(double x) { return log(x); }
FJ_DEVICE float tanh_of(float x) { return tanhf(x); }
FJ_DEVICE double tanh_of(double x) { return tanh(x); }

template <typename T>
FJ_DEVICE T* operand_row(const KernelOperand& operand, int b, int h, long long s) {
  return static_cast<T*>(operand.data) + b * operand.stride_batch + h * operand.stride_head +
         s * operand.stride_seq;
}

// The causal/window bounds of the call's options (bounds_core.h).
FJ_DEVICE long long key_begin(const KernelParams& p, long long query) {
  return visible_key_begin(query, p.diagonal_shift, p.window_left, p.seqlen_k);
}
FJ_DEVICE long long key_end(const KernelParams& p, long long query) {
  return visible_key_end(query, p.diagonal_shift, p.window_right, p.seqlen_k);
}
FJ_DEVICE long long query_begin(const KernelParams& p, long long key) {
  return visible_query_begin(key, p.diagonal_shift, p.window_right, p.seqlen_q);
}
FJ_DEVICE long long query_end(const KernelParams& p, long long key) {
  return visible_query_end(key, p.diagonal_shift, p.window_left, p.seqlen_q);
}

// [begin, end) as columns of a tile that starts at tile_start and is kColumns
// wide: per-row bounds checked in int arithmetic on edge tiles.
template <int kColumns>
struct ColumnSpan {
  int first, last;
  FJ_DEVICE ColumnSpan(long long begin, long long end, long long tile_start) {
    const long long lo = begin - tile_start, hi = end - tile_start;
    first = static_cast<int>(lo < 0 ? 0 : (lo > kColumns ? kColumns : lo));
    last = static_cast<int>(hi < first ? first : (hi > kColumns ? kColumns : hi));
  }
  FJ_DEVICE bool contains(int column) const { return column >= first && column < last; }
};

// Query row i's visible keys, and key j's visible queries, as column spans of a
// tile (nothing for rows past the sequence).
template <int kColumns>
FJ_DEVICE ColumnSpan<kColumns> key_span(const KernelParams& p, long long i, long long tile_start) {
  const bool valid = i < p.seqlen_q;
  return ColumnSpan<kColumns>(valid ? key_begin(p, i) : 0, valid ? key_end(p, i) : 0, tile_start);
}
template <int kColumns>
FJ_DEVICE ColumnSpan<kColumns> query_span(const KernelParams& p, long long j, long long tile_start) {
  const bool valid = j < p.seqlen_k;
  return ColumnSpan<kColumns>(valid ? query_begin(p, j) : 0, valid ? query_end(p, j) : 0, tile_start);
}

FJ_DEVICE bool visible(const KernelParams& p, long long query, long long key) {
  return key_visible(query, key, p.diagonal_shift, p.window_left, p.window_right);
}

#if FJ_MASK != 0
FJ_DEVICE const FJ_MASK_TYPE* mask_element(const KernelParams& p, int b, int h, long long i, long long j) {
  return static_cast<const FJ_MASK_TYPE*>(p.mask) + b * p.mask_stride[0] + h * p.mask_stride[1] +
         i * p.mask_stride[2] + j * p.mask_stride[3];
}
#endif
#if FJ_MASK == 1
// The line of global memory holding *address, toward L1 (no fault for any address the
// caller forms from valid rows and keys).
FJ_DEVICE void prefetch_l1(const void* address) {
  asm volatile("prefetch.global.L1 [%0];\n" ::"l"(address));
}
// Whether the boolean mask hides key j from query i (false: not attended).
FJ_DEVICE bool mask_hides(const KernelParams& p, int b, int h, long long i, long long j) {
  return *mask_element(p, b, h, i, j) == 0;
}
#endif

// The score of (b, h, i, j) from the raw dot product, in the order of the CPU
// backend: scale, softcap, mask. With softcap, *tanh_out receives
// tanh(score / softcap) for the backward's derivative. kBoolMask false: a boolean mask is left
// to the caller (which reads it along a row, tile_logits), an additive one still added.
template <typename Acc, bool kBoolMask = true>
FJ_DEVICE Acc masked_score(const KernelParams& p, Acc dot, int b, int h, long long i, long long j, Acc* tanh_out) {
  Acc x = dot * static_cast<Acc>(p.scale);
#if FJ_SOFTCAP
  const Acc t = tanh_of(x / static_cast<Acc>(p.softcap));
  *tanh_out = t;
  x = static_cast<Acc>(p.softcap) * t;
#endif
#if FJ_MASK == 1
  if (kBoolMask && mask_hides(p, b, h, i, j)) x = negative_infinity<Acc>();
#elif FJ_MASK == 2
  x += load_as<Acc>(mask_element(p, b, h, i, j));
#endif
  return x;
}

// The logit: the masked score, -inf outside the causal/window bounds.
template <typename Acc>
FJ_DEVICE Acc logit(const KernelParams& p, Acc dot, int b, int h, long long i, long long j, Acc* tanh_out) {
  Acc x = masked_score(p, dot, b, h, i, j, tanh_out);
#if FJ_HAS_WINDOW
  if (!visible(p, i, j)) x = negative_infinity<Acc>();
#endif
  return x;
}

// Whether every (query, key) of the rectangle [query_first, query_last] x
// [key_first, key_last] is inside the causal/window bounds.
FJ_DEVICE bool all_visible(const KernelParams& p, long long query_first, long long query_last, long long key_first,
                           long long key_last) {
  return (p.window_left < 0 || key_first - query_last - p.diagonal_shift >= -p.window_left) &&
         (p.window_right < 0 || key_last - query_first - p.diagonal_shift <= p.window_right);
}

// The dropout seed and offset of a call: its words in device memory where given
// (read when the kernel runs: a replayed graph draws what they hold then), else the
// values in the parameters.
FJ_DEVICE unsigned long long dropout_seed_of(const KernelParams& p) {
  if (p.dropout_seed_words == nullptr) return p.dropout_seed;
  return p.dropout_seed_words[0] | (static_cast<unsigned long long>(p.dropout_seed_words[1]) << 32);
}
FJ_DEVICE unsigned long long dropout_offset_of(const KernelParams& p) {
  if (p.dropout_seed_words == nullptr) return p.dropout_offset;
  return p.dropout_seed_words[2] | (static_cast<unsigned long long>(p.dropout_seed_words[3]) << 32);
}

// Dropout keep decision for (batch-head bh, query i, key j): the shared Philox rule.
FJ_DEVICE bool dropout_keeps(const KernelParams& p, long long bh, long long i, long long j) {
  return dropout_keep(dropout_seed_of(p), dropout_offset_of(p), p.dropout_threshold, p.dropout_head_base + bh, i, j);
}

// Linear block index (or work tile) -> (block, batch, head). Under causal
// bounds late query blocks see the most keys and early key blocks the most
// queries: the heavy blocks start first (late_first for query blocks).
FJ_DEVICE void block_coordinates(int linear, int num_blocks, int heads, int* block, int* b, int* h,
                                 bool late_first = true) {
  const int batch_head = linear / num_blocks;
  const int index = linear - batch_head * num_blocks;
  *block = late_first ? num_blocks - 1 - index : index;
  *b = batch_head / heads;
  *h = batch_head - *b * heads;
}
// The thread block's own coordinates.
FJ_DEVICE void block_coordinates(int num_blocks, int heads, int* block, int* b, int* h, bool late_first = true) {
  block_coordinates(static_cast<int>(blockIdx.x), num_blocks, heads, block, b, h, late_first);
}

}  // namespace flashjit
