// The softmax steps of blocks whose keys every row sees, on AVX-512 (the avx512 and amx
// variants of the CPU kernels): 2^x from a polynomial and VSCALEFPS, the scale folded into
// the exponent's multiply-add, a row's base moved only past a slack, row sums in vector
// lanes. The float32 kernels write P over S; the AMX kernels write it as bfloat16 rows.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/tile.hpp"

// GCC 12 reports the undefined pass-through operand of its own AVX-512 intrinsics
// (_mm512_max_ps and others) as maybe uninitialized where they inline here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace flashjit::cpu::FJ_CPU_ISA {

// Whether a block of rows [query0, query0 + rows) and keys [key0, key0 + cols) takes the fused
// steps below: no mask, softcap or dropout, every row sees every key, cols a multiple of 16.
inline bool fused_block(const AttentionProblem& p, int64_t query0, int64_t rows, int64_t key0, int64_t cols) {
  return p.mask_kind == MaskKind::kNone && !(p.softcap > 0) && !p.has_dropout() && cols % 16 == 0 &&
         p.key_begin(query0 + rows - 1) <= key0 && p.key_end(query0) >= key0 + cols;
}

// P written over S (rows of ld floats).
struct FloatInPlace {
  float* s;
  int64_t ld;
  void put(int64_t r, int64_t c, __m512 v) const { _mm512_storeu_ps(s + r * ld + c, v); }
  void end_row(int64_t, int64_t) const {}
};

// No work between rows.
inline void no_work(int64_t) {}

// 2^t on 16 floats: t = n + f with n an integer and |f| <= 1/2, 2^f from a degree-5
// polynomial (fitted for relative error 2.3e-7 in float32), scaled by 2^n with VSCALEFPS
// (no integer exponent arithmetic). t below -160 (and -inf) gives exactly 0; NaN stays NaN.
inline __m512 exp2_vector(__m512 t) {
  t = _mm512_max_ps(_mm512_set1_ps(-160.0f), t);  // NaN t is the second operand: kept
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 poly = _mm512_set1_ps(1.3276467e-3f);
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(9.6755410e-3f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(5.5507135e-2f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(2.4022120e-1f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(6.9314694e-1f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(1.0000001f));
  return _mm512_scalef_ps(poly, n);
}

// Rows whose maximum grows by at most this much keep their base (the maximum their
// probabilities are taken against), so that O is rescaled rarely; P then stays below
// e^kRebaseSlack. Exact either way: O, the sums and the LSE share the base.
inline constexpr float kRebaseSlack = 8.0f;

// The online-softmax step of a block whose keys every row sees, without a mask,
// softcap or dropout, for scale > 0: from raw dot products S (rows of ld_k floats,
// ld_k of 16), P = exp(scale * S - base) goes out through `out` (BfloatRows: bfloat16 rows
// of kBlockK for AMX tiles; FloatInPlace: over S), each row's sum grows in its 16 lanes of
// sum_lanes (folded into the row sums by fold_row_sums), and rows whose base moved
// have O and their sums rescaled. A row's maximum is taken across lanes only when
// some lane passes base + kRebaseSlack. Returns false, changing nothing, where a row
// without a base yet has no number to take one from (all NaN or -inf): the general
// path handles that.
// between(r) runs after every 16 rows of the exponentials (r rows done) and after the last.
template <typename Out, typename Between>
inline bool softmax_visible_block(const float* s, int64_t ld_k, int64_t rows, float scale,
                                  float* row_max, float* row_sum, float* sum_lanes, float* o, int64_t ld_v,
                                  const Out& out, Between between) {
  using V = VectorOf<float>::type;
  constexpr int64_t L = kLanes<float>;
  constexpr float kLog2e = 1.44269504088896341f;
  static_assert(L == 16, "AVX-512 vectors of 16 floats");
  float new_base[kBlockQ];
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = s + r * ld_k;
    V m = V{} + kNegInf<float>;
    for (int64_t c = 0; c < ld_k; c += L) {
      const V x = load_vector<V>(in + c);
      m = x > m ? x : m;  // a NaN compares false and leaves the maximum as it was
    }
    m *= scale;
    const __mmask16 passes = _mm512_cmp_ps_mask(__m512(m), _mm512_set1_ps(row_max[r] + kRebaseSlack), _CMP_GT_OQ);
    if (passes == 0) {
      if (row_max[r] == kNegInf<float>) return false;
      new_base[r] = row_max[r];
    } else {
      new_base[r] = lane_tree<float>(m, [](auto a, auto b) { return b > a ? b : a; });
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* lanes = sum_lanes + r * L;
    if (new_base[r] != row_max[r]) {
      const float correction = std::exp(row_max[r] - new_base[r]);  // 0 from -inf
      row_sum[r] *= correction;
      store_vector(lanes, load_vector<V>(lanes) * correction);
      float* o_row = o + r * ld_v;
      for (int64_t c = 0; c < ld_v; c += L) store_vector(o_row + c, load_vector<V>(o_row + c) * correction);
      row_max[r] = new_base[r];
    }
    const float* in = s + r * ld_k;
    // P = 2^(S * scale * log2(e) - base * log2(e)): one fused multiply-add before the exponential.
    const __m512 factor = _mm512_set1_ps(scale * kLog2e), shift = _mm512_set1_ps(-row_max[r] * kLog2e);
    __m512 total = _mm512_loadu_ps(lanes);
    for (int64_t c = 0; c < ld_k; c += L) {
      const __m512 prob = exp2_vector(_mm512_fmadd_ps(_mm512_loadu_ps(in + c), factor, shift));
      total = _mm512_add_ps(total, prob);
      out.put(r, c, prob);
    }
    _mm512_storeu_ps(lanes, total);
    out.end_row(r, ld_k);
    if ((r + 1) % 16 == 0 || r + 1 == rows) between(r + 1);
  }
  return true;
}

// The backward's P and dS of a block every row sees whole, without mask, softcap or
// dropout, in place of S (raw dot products) and dP: P = exp(scale * S - lse) and
// dS = P * (dP - D) * scale, one pass over the tile (ld_k floats a row, ld_k of 16).
// D is delta[r], or sum_j P_ij dP_ij where the row sees keys of this block only and its
// probabilities here sum to 1 (as softmax_gradient takes it). Returns false, changing nothing, where a row has no
// finite LSE: the general path handles that.
inline bool gradient_visible_block(const AttentionProblem& p, int64_t query0, int64_t rows, int64_t key0, int64_t cols,
                                   float* s, float* dp, int64_t ld_k, const float* lse, const float* delta) {
  constexpr float kLog2e = 1.44269504088896341f;
  for (int64_t r = 0; r < rows; ++r) {
    if (!(lse[r] > kNegInf<float>)) return false;
  }
  const float scale = float(p.scale);
  const __m512 factor = _mm512_set1_ps(scale * kLog2e), scale_v = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < rows; ++r) {
    float* s_row = s + r * ld_k;
    float* dp_row = dp + r * ld_k;
    const __m512 shift = _mm512_set1_ps(-lse[r] * kLog2e);
    for (int64_t c = 0; c < ld_k; c += 16) {
      _mm512_storeu_ps(s_row + c, exp2_vector(_mm512_fmadd_ps(_mm512_loadu_ps(s_row + c), factor, shift)));
    }
    float row_delta = delta[r];
    const int64_t first_key = p.key_begin(query0 + r), end_key = p.key_end(query0 + r);
    if (first_key / kBlockK == (end_key - 1) / kBlockK && first_key >= key0 && end_key <= key0 + cols) {
      __m512 sum = _mm512_setzero_ps(), mass = _mm512_setzero_ps();
      for (int64_t c = 0; c < ld_k; c += 16) {
        const __m512 prob = _mm512_loadu_ps(s_row + c);
        sum = _mm512_fmadd_ps(prob, _mm512_loadu_ps(dp_row + c), sum);
        mass = _mm512_add_ps(mass, prob);
      }
      if (holds_whole_row(lane_sum<float>(VectorOf<float>::type(mass)), cols)) {
        row_delta = lane_sum<float>(VectorOf<float>::type(sum));
      }
    }
    const __m512 d = _mm512_set1_ps(row_delta);
    for (int64_t c = 0; c < ld_k; c += 16) {
      const __m512 prob = _mm512_loadu_ps(s_row + c);
      _mm512_storeu_ps(dp_row + c,
                       _mm512_mul_ps(_mm512_mul_ps(prob, _mm512_sub_ps(_mm512_loadu_ps(dp_row + c), d)), scale_v));
    }
  }
  return true;
}

// Adds each row's lanes of sum_lanes into its row sum and clears them.
inline void fold_row_sums(int64_t rows, float* row_sum, float* sum_lanes) {
  using V = VectorOf<float>::type;
  constexpr int64_t L = kLanes<float>;
  for (int64_t r = 0; r < rows; ++r) {
    row_sum[r] += lane_sum<float>(load_vector<V>(sum_lanes + r * L));
    std::fill(sum_lanes + r * L, sum_lanes + (r + 1) * L, 0.0f);
  }
}

}  // namespace flashjit::cpu::FJ_CPU_ISA

#pragma GCC diagnostic pop
