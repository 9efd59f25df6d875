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

}  // namespace mma
}  // namespace flashjit
