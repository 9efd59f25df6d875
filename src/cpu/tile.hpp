// Building blocks of the CPU kernels: packed tiles in the accumulation type,
// a register-blocked GEMM on GCC/Clang vector extensions, a vectorised exp, and
// the score transform (scale, softcap, masks) shared by forward and backward.
//
// The kernels are compiled once per instruction-set variant (src/cpu/CMakeLists.txt),
// each in a namespace of its own so that no function of one variant stands in for
// another's: a variant's translation unit defines FJ_CPU_ISA (the namespace),
// FJ_CPU_TARGET (what GCC may use in every function from the end of these includes
// to the end of the unit; the headers before it keep the build's baseline flags) and
// FJ_CPU_VECTOR_BYTES. Without them there is one variant, `native`, built with the
// build's own flags (FLASHJIT_NATIVE).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/dtype.hpp"
#include "core/error.hpp"
#include "core/philox.hpp"
#include "core/problem.hpp"

#ifndef FJ_CPU_ISA
#define FJ_CPU_ISA native
#endif
#ifdef FJ_CPU_TARGET
#define FJ_CPU_PRAGMA_(x) _Pragma(#x)
#define FJ_CPU_TARGET_PRAGMA_(features) FJ_CPU_PRAGMA_(GCC target(features))
FJ_CPU_TARGET_PRAGMA_(FJ_CPU_TARGET)
#endif

namespace flashjit::cpu::FJ_CPU_ISA {

#if defined(FJ_CPU_VECTOR_BYTES)
inline constexpr int kVectorBytes = FJ_CPU_VECTOR_BYTES;
#elif defined(__AVX512F__)
inline constexpr int kVectorBytes = 64;
#else
inline constexpr int kVectorBytes = 32;
#endif

// Query rows and keys per tile. Tiles of 64 keep Q, K^T, V and S for head_dim 256
// within a core's L2, and no buffer depends on the sequence lengths.
inline constexpr int64_t kBlockQ = 64;
inline constexpr int64_t kBlockK = 64;

// The forward takes the scores of a block of at most kFewRows queries (decoding,
// or a sequence's last few rows) as row-by-row dot products (gemm_abt_rows),
// whose order of additions differs from gemm's. The backward recomputes those
// rows' scores the same way, so that P = exp(S - LSE) matches the forward's LSE
// to the last bit instead of to the rounding of a differently ordered sum.
inline constexpr int64_t kFewRows = 4;
// The first query row of a sequence of seqlen_q the forward takes that way (seqlen_q: none).
inline int64_t first_few_row(int64_t seqlen_q) {
  const int64_t last_block = seqlen_q > 0 ? (seqlen_q - 1) / kBlockQ * kBlockQ : 0;
  return seqlen_q - last_block <= kFewRows ? last_block : seqlen_q;
}

// Calls fn(T{}) with T the storage type of a floating dtype.
template <typename Fn>
void dispatch_float_dtype(fj_dtype dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case FJ_FLOAT32: return fn(float{});
    case FJ_FLOAT16: return fn(Half{});
    case FJ_BFLOAT16: return fn(BFloat16{});
    case FJ_FLOAT64: return fn(double{});
    default: throw_type_error("[", op, "] q: unsupported dtype ", dtype_name(dtype));
  }
}

template <typename Acc>
struct VectorOf;
template <>
struct VectorOf<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
  typedef int32_t int_type __attribute__((vector_size(kVectorBytes)));
};
template <>
struct VectorOf<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
};

template <typename Acc>
inline constexpr int64_t kLanes = kVectorBytes / int64_t(sizeof(Acc));

template <typename V, typename Acc>
inline V load_vector(const Acc* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V, typename Acc>
inline void store_vector(Acc* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

inline int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

template <typename Acc>
inline constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();

// C[Rows x Vecs*lanes] (+)= A[Rows x depth] * B[depth x Vecs*lanes], accumulators in registers.
template <typename Acc, int Rows, int Vecs>
inline void gemm_block(int64_t depth, const Acc* a, int64_t lda, const Acc* b, int64_t ldb, Acc* c,
                       int64_t ldc, bool accumulate) {
  using V = typename VectorOf<Acc>::type;
  constexpr int64_t L = kLanes<Acc>;
  V acc[Rows][Vecs];
  for (int r = 0; r < Rows; ++r)
    for (int v = 0; v < Vecs; ++v) acc[r][v] = V{};
  for (int64_t d = 0; d < depth; ++d) {
    V bv[Vecs];
    for (int v = 0; v < Vecs; ++v) bv[v] = load_vector<V>(b + d * ldb + v * L);
    for (int r = 0; r < Rows; ++r) {
      const Acc av = a[r * lda + d];
      for (int v = 0; v < Vecs; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < Rows; ++r) {
    for (int v = 0; v < Vecs; ++v) {
      Acc* out = c + r * ldc + v * L;
      store_vector(out, accumulate ? acc[r][v] + load_vector<V>(out) : acc[r][v]);
    }
  }
}

template <typename Acc, int Rows>
inline void gemm_row_strip(int64_t cols, int64_t depth, const Acc* a, int64_t lda, const Acc* b, int64_t ldb,
                           Acc* c, int64_t ldc, bool accumulate) {
  constexpr int64_t L = kLanes<Acc>;
  int64_t j = 0;
  for (; j + 2 * L <= cols; j += 2 * L)
    gemm_block<Acc, Rows, 2>(depth, a, lda, b + j, ldb, c + j, ldc, accumulate);
  for (; j < cols; j += L) gemm_block<Acc, Rows, 1>(depth, a, lda, b + j, ldb, c + j, ldc, accumulate);
}

// C[rows x cols] (+)= A[rows x depth] * B[depth x cols], all row-major.
// cols must be a multiple of kLanes<Acc>; B and C hold that many columns.
template <typename Acc>
inline void gemm(int64_t rows, int64_t cols, int64_t depth, const Acc* a, int64_t lda, const Acc* b,
                 int64_t ldb, Acc* c, int64_t ldc, bool accumulate) {
  constexpr int kRows = kVectorBytes == 64 ? 8 : 6;  // fills the vector register file
  int64_t i = 0;
  for (; i + kRows <= rows; i += kRows)
    gemm_row_strip<Acc, kRows>(cols, depth, a + i * lda, lda, b, ldb, c + i * ldc, ldc, accumulate);
  for (; i < rows; ++i)
    gemm_row_strip<Acc, 1>(cols, depth, a + i * lda, lda, b, ldb, c + i * ldc, ldc, accumulate);
}

// C[rows x cols] = A[rows x depth] * B[cols x depth]^T by dot products of rows:
// for a few rows of A this beats transposing B for gemm(). depth must be a
// multiple of kLanes<Acc>, with A and B zero-padded up to it (B may be the
// caller's rows in place when they need no padding). Four columns at a time keep
// four independent accumulator chains in flight instead of one.
// v with lanes i and i ^ Width exchanged.
template <int64_t Width, typename V, size_t... I>
inline V swap_lanes(V v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, (I ^ Width)...);
}

// A vector's lanes combined by `op` (on whole vectors) as a tree in registers: log2(lanes)
// steps of a lane exchange and one `op`, lane 0 keeping ((x0 op x8) op (x4 op x12)) op ...
// (a running scalar waits on each step's latency, 16 of them a row at AVX-512; a tree
// through memory stalls on reloading what was just stored).
template <typename Acc, typename Op>
inline Acc lane_tree(typename VectorOf<Acc>::type v, Op op) {
  constexpr int64_t L = kLanes<Acc>;
  using Lanes = std::make_index_sequence<size_t(L)>;
  if constexpr (L >= 16) v = op(v, swap_lanes<8>(v, Lanes{}));
  if constexpr (L >= 8) v = op(v, swap_lanes<4>(v, Lanes{}));
  if constexpr (L >= 4) v = op(v, swap_lanes<2>(v, Lanes{}));
  if constexpr (L >= 2) v = op(v, swap_lanes<1>(v, Lanes{}));
  return v[0];
}

template <typename Acc>
inline Acc lane_sum(typename VectorOf<Acc>::type v) {
  return lane_tree<Acc>(v, [](auto a, auto b) { return a + b; });
}

template <typename Acc>
inline void gemm_abt_rows(int64_t rows, int64_t cols, int64_t depth, const Acc* a, int64_t lda, const Acc* b,
                          int64_t ldb, Acc* c, int64_t ldc) {
  using V = typename VectorOf<Acc>::type;
  constexpr int64_t L = kLanes<Acc>;
  for (int64_t i = 0; i < rows; ++i) {
    const Acc* a_row = a + i * lda;
    int64_t j = 0;
    for (; j + 4 <= cols; j += 4) {
      const Acc* b0 = b + j * ldb;
      V s0{}, s1{}, s2{}, s3{};
      for (int64_t d = 0; d < depth; d += L) {
        const V x = load_vector<V>(a_row + d);
        s0 += x * load_vector<V>(b0 + d);
        s1 += x * load_vector<V>(b0 + ldb + d);
        s2 += x * load_vector<V>(b0 + 2 * ldb + d);
        s3 += x * load_vector<V>(b0 + 3 * ldb + d);
      }
      c[i * ldc + j] = lane_sum<Acc>(s0);
      c[i * ldc + j + 1] = lane_sum<Acc>(s1);
      c[i * ldc + j + 2] = lane_sum<Acc>(s2);
      c[i * ldc + j + 3] = lane_sum<Acc>(s3);
    }
    for (; j < cols; ++j) {
      V sum{};
      for (int64_t d = 0; d < depth; d += L)
        sum += load_vector<V>(a_row + d) * load_vector<V>(b + j * ldb + d);
      c[i * ldc + j] = lane_sum<Acc>(sum);
    }
  }
}

// sum over c < n of a[c] * b[c], a packed in the accumulation type and b a caller's row (any
// element type): two vector accumulators and a tree of the lanes (a running scalar waits an
// add's latency for every element).
template <typename T, typename Acc>
inline Acc dot_row(const Acc* a, const T* b, int64_t n) {
  using V = typename VectorOf<Acc>::type;
  constexpr int64_t L = kLanes<Acc>;
  V even{}, odd{};
  int64_t c = 0;
  for (; c + 2 * L <= n; c += 2 * L) {
    V x, y;
    if constexpr (std::is_same_v<T, Acc>) {
      x = load_vector<V>(b + c), y = load_vector<V>(b + c + L);
    } else {
      Acc converted[2 * L];
      for (int64_t l = 0; l < 2 * L; ++l) converted[l] = to_acc<Acc>(b[c + l]);
      x = load_vector<V>(converted), y = load_vector<V>(converted + L);
    }
    even += load_vector<V>(a + c) * x;
    odd += load_vector<V>(a + c + L) * y;
  }
  Acc total = lane_sum<Acc>(even + odd);
  for (; c < n; ++c) total += a[c] * to_acc<Acc>(b[c]);
  return total;
}

// The largest of x[0..n) (n a multiple of the lanes), NaN skipped; -inf where there is no
// number. Four vector accumulators: a scalar chain (std::max_element) waits a compare's
// latency for every element, which cost as much as the tile's two GEMMs.
template <typename Acc>
inline Acc row_max_of(const Acc* x, int64_t n) {
  using V = typename VectorOf<Acc>::type;
  constexpr int64_t L = kLanes<Acc>;
  V m0 = V{} + kNegInf<Acc>, m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 4 * L <= n; j += 4 * L) {
    const V a = load_vector<V>(x + j), b = load_vector<V>(x + j + L);
    const V c = load_vector<V>(x + j + 2 * L), d = load_vector<V>(x + j + 3 * L);
    m0 = a > m0 ? a : m0;  // a NaN compares false and leaves the maximum as it was
    m1 = b > m1 ? b : m1;
    m2 = c > m2 ? c : m2;
    m3 = d > m3 ? d : m3;
  }
  for (; j < n; j += L) {
    const V a = load_vector<V>(x + j);
    m0 = a > m0 ? a : m0;
  }
  m0 = m1 > m0 ? m1 : m0;
  m2 = m3 > m2 ? m3 : m2;
  m0 = m2 > m0 ? m2 : m0;
  return lane_tree<Acc>(m0, [](auto a, auto b) { return b > a ? b : a; });
}

// exp(arg) on a vector of floats: Cephes-style range reduction and degree-6
// polynomial (about 1 ulp); arguments below -87 (and -inf) give exactly 0, above 88
// they saturate at e^88; NaN stays NaN.
inline VectorOf<float>::type exp_vector(VectorOf<float>::type arg) {
  using V = VectorOf<float>::type;
  using VI = VectorOf<float>::int_type;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2High = 0.693359375f;
  constexpr float kLn2Low = -2.12194440e-4f;
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kUnderflow = -87.0f;
  constexpr float kOverflow = 88.0f;
  const V low_clamped = arg < kUnderflow ? V{} + kUnderflow : arg;
  const V clamped = low_clamped > kOverflow ? V{} + kOverflow : low_clamped;  // inf, not garbage
  const V n_float = (clamped * kLog2e + kRoundMagic) - kRoundMagic;
  V r = clamped - n_float * kLn2High;
  r = r - n_float * kLn2Low;
  V poly = V{} + 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const V mantissa = poly * r * r + r + 1.0f;
  const VI exponent_bits = (__builtin_convertvector(n_float, VI) + 127) << 23;
  V two_to_n;
  std::memcpy(&two_to_n, &exponent_bits, sizeof two_to_n);
  return arg < kUnderflow ? V{} : mantissa * two_to_n;
}

// x[j] = exp(x[j] - shift) for j < n (n a multiple of the lanes); returns the sum.
inline float exp_shifted_sum(float* x, int64_t n, float shift) {
  using V = VectorOf<float>::type;
  constexpr int64_t L = kLanes<float>;
  V total = V{};
  for (int64_t j = 0; j < n; j += L) {
    const V value = exp_vector(load_vector<V>(x + j) - shift);
    store_vector(x + j, value);
    total += value;
  }
  return lane_sum<float>(total);
}

inline double exp_shifted_sum(double* x, int64_t n, double shift) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

// dst[r][c] = src[r * stride + c] for c < cols, 0 for cols <= c < ld.
template <typename T, typename Acc>
inline void pack_rows(const T* src, int64_t stride, int64_t rows, int64_t cols, Acc* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = src + r * stride;
    Acc* out = dst + r * ld;
    for (int64_t c = 0; c < cols; ++c) out[c] = to_acc<Acc>(in[c]);
    for (int64_t c = cols; c < ld; ++c) out[c] = Acc(0);
  }
}

// dst[c][r] = src[r][c] for an 8 x 8 float tile in registers: pairs, then 64-bit pairs,
// then 128-bit halves interleaved (a scalar transpose stores each element to its own cache
// line, which cost a third of a GEMM on the same tile).
typedef float Float8 __attribute__((vector_size(32)));
inline Float8 load_float8(const float* p) { return load_vector<Float8>(p); }
// bfloat16 is a float's upper half: widened and shifted, 8 at a time.
inline Float8 load_float8(const BFloat16* p) {
  typedef uint16_t Bits16x8 __attribute__((vector_size(16)));
  typedef uint32_t Bits32x8 __attribute__((vector_size(32)));
  const Bits32x8 wide = __builtin_convertvector(load_vector<Bits16x8>(reinterpret_cast<const uint16_t*>(p)), Bits32x8)
                        << 16;
  Float8 out;
  std::memcpy(&out, &wide, sizeof out);
  return out;
}

template <typename T>
inline void transpose_8x8(const T* src, int64_t stride, float* dst, int64_t ld) {
  Float8 r[8];
  for (int i = 0; i < 8; ++i) r[i] = load_float8(src + i * stride);
  Float8 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = __builtin_shufflevector(r[2 * i], r[2 * i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[2 * i + 1] = __builtin_shufflevector(r[2 * i], r[2 * i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      u[4 * i + 2 * j] = __builtin_shufflevector(t[4 * i + j], t[4 * i + j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[4 * i + 2 * j + 1] = __builtin_shufflevector(t[4 * i + j], t[4 * i + j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  }
  // u[c] holds column c of rows 0-3 (low half) and column c + 4 (high half); u[4 + c] those of rows 4-7.
  for (int c = 0; c < 4; ++c) {
    store_vector(dst + c * ld, __builtin_shufflevector(u[c], u[4 + c], 0, 1, 2, 3, 8, 9, 10, 11));
    store_vector(dst + (c + 4) * ld, __builtin_shufflevector(u[c], u[4 + c], 4, 5, 6, 7, 12, 13, 14, 15));
  }
}

// dst[c][r] = src[r * stride + c] for r < rows, 0 for rows <= r < ld.
template <typename T, typename Acc>
inline void pack_transposed(const T* src, int64_t stride, int64_t rows, int64_t cols, Acc* dst, int64_t ld) {
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = rows; r < ld; ++r) dst[c * ld + r] = Acc(0);
  }
  int64_t first_row = 0;
  if constexpr ((std::is_same_v<T, float> || std::is_same_v<T, BFloat16>) && std::is_same_v<Acc, float>) {
    // whole 8 x 8 tiles in registers
    for (; first_row + 8 <= rows; first_row += 8) {
      int64_t c = 0;
      for (; c + 8 <= cols; c += 8) transpose_8x8(src + first_row * stride + c, stride, dst + c * ld + first_row, ld);
      for (; c < cols; ++c) {
        for (int64_t r = first_row; r < first_row + 8; ++r) dst[c * ld + r] = to_acc<Acc>(src[r * stride + c]);
      }
    }
  }
  for (int64_t r = first_row; r < rows; ++r) {
    const T* in = src + r * stride;
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = to_acc<Acc>(in[c]);
  }
}

// dst[c][r] = src[r][c] for a rows x cols tile.
template <typename Acc>
inline void transpose(const Acc* src, int64_t ld_src, int64_t rows, int64_t cols, Acc* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
}

template <typename T, typename Acc>
inline void store_row(const Acc* src, int64_t cols, Acc factor, T* dst) {
  for (int64_t c = 0; c < cols; ++c) dst[c] = from_acc<T, Acc>(src[c] * factor);
}

template <typename M>
inline float mask_value(const void* base, int64_t index) {
  return to_acc<float>(static_cast<const M*>(base)[index]);
}

// Turns raw dot products S[r][c] = q_i . k_j (i = query0 + r, j = key0 + c) into
// logits: scale, softcap, then -inf where masked (window, causal, bool mask,
// past the tile) or + the additive mask. Columns [cols, ld) are set to -inf.
// If softcap_grad is given it receives d(logit)/d(scaled score) = 1 - tanh^2.
template <typename Acc>
void compute_logits(const AttentionProblem& p, int64_t b, int64_t h, int64_t query0, int64_t rows,
                    int64_t key0, int64_t cols, int64_t ld, Acc* s, Acc* softcap_grad) {
  const Acc scale = Acc(p.scale);
  const Acc cap = Acc(p.softcap);
  for (int64_t r = 0; r < rows; ++r) {
    Acc* row = s + r * ld;
    if (cap > Acc(0)) {
      const Acc inv_cap = Acc(1) / cap;
      for (int64_t c = 0; c < cols; ++c) row[c] = std::tanh(row[c] * scale * inv_cap);
      if (softcap_grad != nullptr) {
        Acc* grad = softcap_grad + r * ld;
        for (int64_t c = 0; c < cols; ++c) grad[c] = Acc(1) - row[c] * row[c];
      }
      for (int64_t c = 0; c < cols; ++c) row[c] *= cap;
    } else {
      for (int64_t c = 0; c < cols; ++c) row[c] *= scale;
    }
    const int64_t query = query0 + r;
    if (p.mask_kind != MaskKind::kNone) {
      const int64_t elem = dtype_size(p.mask_dtype);
      const char* base =
          static_cast<const char*>(p.mask) +
          (b * p.mask_stride[0] + h * p.mask_stride[1] + query * p.mask_stride[2] + key0 * p.mask_stride[3]) *
              elem;
      const int64_t step = p.mask_stride[3];
      switch (p.mask_dtype) {
        case FJ_BOOL:
          for (int64_t c = 0; c < cols; ++c)
            if (!reinterpret_cast<const uint8_t*>(base)[c * step]) row[c] = kNegInf<Acc>;
          break;
        case FJ_FLOAT32:
          for (int64_t c = 0; c < cols; ++c) row[c] += Acc(mask_value<float>(base, c * step));
          break;
        case FJ_FLOAT16:
          for (int64_t c = 0; c < cols; ++c) row[c] += Acc(mask_value<Half>(base, c * step));
          break;
        case FJ_BFLOAT16:
          for (int64_t c = 0; c < cols; ++c) row[c] += Acc(mask_value<BFloat16>(base, c * step));
          break;
        case FJ_FLOAT64:
          for (int64_t c = 0; c < cols; ++c) row[c] += Acc(reinterpret_cast<const double*>(base)[c * step]);
          break;
        default: break;
      }
    }
    // Window / causal bounds and the tile edge.
    const int64_t visible_begin = p.key_begin(query) - key0;
    const int64_t visible_end = p.key_end(query) - key0;
    for (int64_t c = 0; c < ld; ++c) {
      if (c < visible_begin || c >= visible_end || c >= cols) row[c] = kNegInf<Acc>;
    }
  }
}

// Whether a row's probabilities in a tile (their sum `mass` over `count` keys) are the whole of
// its attention: a row whose keys the tile holds all of sums to 1, to rounding. It does not where
// the LSE given is that of a larger attention (a ring's parts: flashjit.distributed); then
// D = rowsum(dO * O) must come from O, not from the tile.
template <typename Acc>
inline bool holds_whole_row(Acc mass, int64_t count) {
  return std::abs(mass - Acc(1)) <= Acc(16) * std::numeric_limits<Acc>::epsilon() * Acc(count + 16);
}

// keep[c] = 1 when element (b, h, query, key0 + c) survives dropout.
inline void dropout_keep_row(const AttentionProblem& p, int64_t b, int64_t h, int64_t query, int64_t key0,
                             int64_t cols, uint8_t* keep) {
  const int64_t batch_head = p.dropout_index(b, h);
  const int64_t key_end = key0 + cols;
  for (int64_t quad = key0 >> 2; quad * 4 < key_end; ++quad) {
    const Philox4x32 words = dropout_words(p.dropout_seed, p.dropout_offset, batch_head, query, quad);
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t key = quad * 4 + lane;
      if (key >= key0 && key < key_end) keep[key - key0] = words.word[lane] >= p.dropout_threshold;
    }
  }
}

// The tasks of a call over its dense parts (DenseParts: the problem, or each sequence of a
// variable-length batch): part i owns tasks [first[i], first[i + 1]), count(part) of them.
// One part (a dense call) keeps only its count.
class PartTasks {
 public:
  template <typename Count>
  PartTasks(const DenseParts& parts, Count count) {
    if (parts.size() == 1) {
      single_ = count(parts[0]);
      return;
    }
    first_.assign(parts.size() + 1, 0);
    for (size_t i = 0; i < parts.size(); ++i) first_[i + 1] = first_[i] + count(parts[i]);
  }
  int64_t total() const { return first_.empty() ? single_ : first_.back(); }
  // The part of a task and the task's index within it.
  std::pair<size_t, int64_t> locate(int64_t task) const {
    if (first_.empty()) return {0, task};
    const size_t part = size_t(std::upper_bound(first_.begin(), first_.end(), task) - first_.begin()) - 1;
    return {part, task - first_[part]};
  }

 private:
  int64_t single_ = 0;
  std::vector<int64_t> first_;
};

}  // namespace flashjit::cpu::FJ_CPU_ISA
