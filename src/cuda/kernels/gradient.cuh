// The backward's per-element math on C fragments, shared by the mma.sync
// kernels (attention_mma_bwd.cuh) and the sm_90a kernels
// (attention_hopper_bwd.cuh): P rebuilt from the forward's LSE, dS from dP and
// delta = rowsum(dO * O), and the stores of the gradient rows.
//
// P is rebuilt in the log2 domain; a row that sees no key has LSE -inf and is
// given +inf here, so its P is exp2(-inf) = 0.
#pragma once

namespace flashjit {
namespace mma {

// The forward's natural-log LSE in the log2 domain; +inf for rows that see no key.
FJ_DEVICE float lse_log2(float lse) {
  return lse == negative_infinity<float>() ? -negative_infinity<float>() : lse * kLog2e;
}

// dS of one element from its raw dot product, dP and the row's LSE (log2) and
// delta; *prob_out receives P after dropout (the dV kernel's P^T dO operand).
FJ_DEVICE float score_gradient(const KernelParams& p, float dot, float dprob, float lse2, float delta,
                               float scale_log2, int b, int h, long long i, long long j, float dropout_factor,
                               float* prob_out) {
  float tanh_value = 0.0f;
  const float prob = fast_exp2(logit_log2(p, dot, scale_log2, b, h, i, j, &tanh_value) - lse2);
  *prob_out = prob * dropout_factor;
  float dscore = prob * (dprob * dropout_factor - delta);
#if FJ_SOFTCAP
  dscore *= 1.0f - tanh_value * tanh_value;
#endif
  return dscore * static_cast<float>(p.scale);
}

// dS of the dQ kernel's tile in place of S (rows queries, columns keys). Edge
// tiles (not kInterior) take each row's visible keys as a column span.
template <bool kInterior>
FJ_DEVICE void dq_tile_gradient(float (&s)[kBlockN / 8][4], const float (&dp)[kBlockN / 8][4], const KernelParams& p,
                                const long long (&rows)[2], const float (&lse2)[2], const float (&delta)[2],
                                long long tile_start, int b, int h, long long batch_head, int quad,
                                float scale_log2) {
  const ColumnSpan<kBlockN> spans[2] = {key_span<kBlockN>(p, rows[0], tile_start),
                                        key_span<kBlockN>(p, rows[1], tile_start)};
#pragma unroll
  for (int n = 0; n < kBlockN / 8; ++n) {
    const long long key_pair = tile_start + n * 8 + quad * 2;
    float factor[4] = {1.0f, 1.0f, 1.0f, 1.0f};
#if FJ_DROPOUT
    dropout_factors(factor, p, batch_head, rows, key_pair);
#endif
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int column = n * 8 + quad * 2 + (e % 2);
      float dscore = 0.0f;
      if (kInterior || spans[e / 2].contains(column)) {
        float unused_prob;
        dscore = score_gradient(p, s[n][e], dp[n][e], lse2[e / 2], delta[e / 2], scale_log2, b, h, rows[e / 2],
                                      tile_start + column, factor[e], &unused_prob);
      }
      s[n][e] = dscore;
    }
  }
}

// P^T in place of S^T and dS^T in place of dP^T for the dK/dV kernel's tile (rows
// keys, columns the queries start + column). Edge tiles (not kInterior) take
// each key's visible queries as a column span. With shared operands and no mask
// (FJ_DKDV_SHARED, whose 64-query step needs the registers), every element is computed
// and those outside the span are set to 0 after, with no branch an element (a mask would
// be read outside its rows there: masked kernels keep the branch).
template <bool kInterior>
FJ_DEVICE void dkdv_tile_gradient(float (&st)[kBlockN / 8][4], float (&dpt)[kBlockN / 8][4], const KernelParams& p,
                                  const long long (&keys)[2], const float* lse_tile, const float* delta_tile,
                                  long long start, int b, int h, long long batch_head, int quad, float scale_log2) {
  const ColumnSpan<kBlockN> spans[2] = {query_span<kBlockN>(p, keys[0], start), query_span<kBlockN>(p, keys[1], start)};
  constexpr bool kSelectAfter = FJ_DKDV_SHARED && !FJ_MASK;
#pragma unroll
  for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int column = n * 8 + quad * 2 + (e % 2);
      const long long i = start + column;
      const long long j = keys[e / 2];
      float prob = 0.0f, dscore = 0.0f;
      const bool inside = kInterior || spans[e / 2].contains(column);
      if (kSelectAfter || inside) {
        float factor = 1.0f;
#if FJ_DROPOUT
        factor = dropout_keeps(p, batch_head, i, j) ? static_cast<float>(p.dropout_keep_scale) : 0.0f;
#endif
        dscore = score_gradient(p, st[n][e], dpt[n][e], lse_tile[column], delta_tile[column], scale_log2, b, h,
                                      i, j, factor, &prob);
      }
      // A select: a NaN or infinity computed outside the span goes too.
      st[n][e] = kSelectAfter && !inside ? 0.0f : prob;
      dpt[n][e] = kSelectAfter && !inside ? 0.0f : dscore;
    }
  }
}

// A lane's columns n * 8 + 2 * quad, + 1 of row r of an accumulator, as the element type, for
// n = n0 .. n0 + count - 1: in one 4-byte store each where the row starts 4-byte aligned (any
// caller's strides may make it not), else each on its own.
template <int kDim>
FJ_DEVICE void store_lane_columns(elem_t* row, int dim, const float (&acc)[kDim / 8][4], int r, int quad, int n0,
                                  int count) {
  const bool pairs = sizeof(elem_t) == 2 && reinterpret_cast<unsigned long long>(row) % 4 == 0;
#pragma unroll
  for (int i = 0; i < count; ++i) {
    const int n = n0 + i;
    const int d = n * 8 + quad * 2;
    if constexpr (sizeof(elem_t) == 2) {
      if (pairs && d + 1 < dim) {
        *reinterpret_cast<unsigned*>(row + d) = pack2(acc[n][2 * r], acc[n][2 * r + 1]);
        continue;
      }
    }
    if (d < dim) row[d] = from_float<elem_t>(acc[n][2 * r]);
    if (d + 1 < dim) row[d + 1] = from_float<elem_t>(acc[n][2 * r + 1]);
  }
}

// Rows rows[0], rows[1] of a [16 x kDim] accumulator into a gradient operand (warp-uniform: every
// lane of the warp calls it). 16-bit types, kDim a multiple of 32: the four lanes of a quad, which
// share a row, pass their column pairs round (a 4 x 4 transpose by rotation: in round k lane q
// sends its pair of column block n0 + (q + k) % 4 and receives that of n0 + q from lane (q - k) % 4)
// so that lane q holds the eight columns of block n0 + q and stores them in one 16-byte store, where
// the row starts 16-byte aligned and dim is a multiple of 8; otherwise (or for other types and
// widths) store_lane_columns.
template <int kDim>
FJ_DEVICE void store_rows(const KernelOperand& out, int b, int h, const long long (&rows)[2], long long row_end,
                          int dim, const float (&acc)[kDim / 8][4], int quad) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    elem_t* const row = rows[r] < row_end ? operand_row<elem_t>(out, b, h, rows[r]) : nullptr;
    if constexpr (sizeof(elem_t) == 2 && kDim % 32 == 0) {
      const bool chunks = row != nullptr && dim % 8 == 0 && reinterpret_cast<unsigned long long>(row) % 16 == 0;
      const int quad_base = (threadIdx.x % 32) & ~3;
#pragma unroll
      for (int n0 = 0; n0 < kDim / 8; n0 += 4) {
        unsigned mine[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) mine[j] = pack2(acc[n0 + j][2 * r], acc[n0 + j][2 * r + 1]);
        const auto pick = [&](int j) { return j == 0 ? mine[0] : j == 1 ? mine[1] : j == 2 ? mine[2] : mine[3]; };
        unsigned got[4];  // got[k]: round k's value, lane (quad - k) % 4's pair of block n0 + quad
        got[0] = pick(quad);
#pragma unroll
        for (int k = 1; k < 4; ++k) {
          got[k] = __shfl_sync(0xffffffffu, pick((quad + k) & 3), quad_base | ((quad - k) & 3));
        }
        // Lane s's pair at position s of the chunk: round (quad - s) % 4's.
        const auto from = [&](int s) {
          const int k = (quad - s) & 3;
          return k == 0 ? got[0] : k == 1 ? got[1] : k == 2 ? got[2] : got[3];
        };
        if (chunks) {
          if ((n0 + quad) * 8 < dim) {
            *reinterpret_cast<uint4*>(row + (n0 + quad) * 8) = make_uint4(from(0), from(1), from(2), from(3));
          }
        } else if (row != nullptr) {
          store_lane_columns<kDim>(row, dim, acc, r, quad, n0, 4);
        }
      }
    } else if (row != nullptr) {
      store_lane_columns<kDim>(row, dim, acc, r, quad, 0, kDim / 8);
    }
  }
}

}  // namespace mma
}  // namespace flashjit
