// Forward attention on tensor cores for float16 and bfloat16 (mma_common.cuh):
// each of FJ_WARPS warps owns 16 query rows of the block; K and V stream
// through in tiles of FJ_BLOCK_N keys, K loaded with cp.async while P V runs
// and V while Q K^T runs. Head dims are padded to FJ_HEAD_DIM_QK /
// FJ_HEAD_DIM_V (multiples of 16) with zeros in shared memory. P goes from
// the C fragments of S to the A fragments of P V without leaving registers.
//
// Macros from the prelude: those of mma_common.cuh and FJ_MASK, FJ_MASK_TYPE,
// FJ_HAS_WINDOW, FJ_DROPOUT, FJ_SOFTCAP.
#pragma once

namespace flashjit {
namespace mma {

extern "C" __global__ void __launch_bounds__(kThreads) fj_attention_forward(const KernelParams p) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  elem_t* q_tile = reinterpret_cast<elem_t*>(shared_bytes);  // [kBlockM][kPitchQk]
  elem_t* k_tile = q_tile + kBlockM * kPitchQk;                // [kBlockN][kPitchQk]
  elem_t* v_tile = k_tile + kBlockN * kPitchQk;                // [kBlockN][kPitchV]

  int block, b, h;
  block_coordinates(p.num_query_blocks, p.heads_q, &block, &b, &h);
  const int kv_head = h / p.group_size;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane / 4;  // g: row within the 8-row half of a fragment
  const int quad = lane % 4;   // t: column pair
  const long long first_query = static_cast<long long>(block) * kBlockM;
#if FJ_DROPOUT
  const long long batch_head = static_cast<long long>(b) * p.heads_q + h;
#endif
  // This thread's two rows: first_query + warp * 16 + group (+ 8).
  long long rows[2];
  rows[0] = first_query + warp * 16 + group;
  rows[1] = rows[0] + 8;

  const long long last_query = min(first_query + kBlockM, static_cast<long long>(p.seqlen_q)) - 1;
  const long long key_lo = key_begin(p, first_query);
  const long long key_hi = key_end(p, last_query);
  const elem_t* k_base = operand_row<const elem_t>(p.k, b, kv_head, 0);
  const elem_t* v_base = operand_row<const elem_t>(p.v, b, kv_head, 0);

  load_tile<kBlockM, kDimQk>(q_tile, operand_row<const elem_t>(p.q, b, h, 0), p.q.stride_seq, first_query,
                             p.seqlen_q, p.head_dim_qk);
  const long long first_tile = key_lo / kBlockN * kBlockN;
  if (first_tile < key_hi) {
    load_tile<kBlockN, kDimQk>(k_tile, k_base, p.k.stride_seq, first_tile, key_hi, p.head_dim_qk);
  }
  cp_async_commit();

  float o[kDimV / 8][4];
#pragma unroll
  for (int n = 0; n < kDimV / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float row_max[2] = {negative_infinity<float>(), negative_infinity<float>()};  // log2 domain
  float row_sum[2] = {0.0f, 0.0f};
  const elem_t* q_warp = q_tile + (warp * 16) * kPitchQk;

  for (long long tile_start = first_tile; tile_start < key_hi; tile_start += kBlockN) {
    cp_async_wait<0>();
    __syncthreads();  // K tile (and Q) in shared memory; V tile free
    load_tile<kBlockN, kDimV>(v_tile, v_base, p.v.stride_seq, tile_start, key_hi, p.head_dim_v);
    cp_async_commit();

    // S = Q K^T (16 x kBlockN per warp).
    float s[kBlockN / 8][4];
#pragma unroll
    for (int n = 0; n < kBlockN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kDimQk / 16; ++kk) {
      unsigned a[4];
      ldmatrix_x4(a, a_address(q_warp, kPitchQk, kk * 16, lane));
#pragma unroll
      for (int n = 0; n < kBlockN / 8; n += 2) {
        unsigned bk[4];
        ldmatrix_x4(bk, bt_address(k_tile, kPitchQk, n * 8, kk * 16, lane));
        mma_16816(s[n], a, bk[0], bk[1]);
        mma_16816(s[n + 1], a, bk[2], bk[3]);
      }
    }

    // Logits (scale, softcap, mask, bounds) in the log2 domain, and the row maxima.
    float tile_max[2] = {negative_infinity<float>(), negative_infinity<float>()};
#pragma unroll
    for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const long long i = rows[e / 2];
        const long long j = tile_start + n * 8 + quad * 2 + (e % 2);
        float x = negative_infinity<float>();
        if (i < p.seqlen_q && j >= key_lo && j < key_hi) {
          float unused_tanh;
          x = logit(p, s[n][e], b, h, i, j, &unused_tanh) * kLog2e;
        }
        s[n][e] = x;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], x);
      }
    }
    float scale_old[2], base_max[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float new_max = fmaxf(row_max[r], tile_max[r]);
      // A row with nothing visible yet keeps max -inf; subtract 0 instead so exp2 gives 0, not NaN.
      base_max[r] = new_max == negative_infinity<float>() ? 0.0f : new_max;
      scale_old[r] = exp2f(row_max[r] - base_max[r]);
      row_max[r] = new_max;
      row_sum[r] *= scale_old[r];
    }
#pragma unroll
    for (int n = 0; n < kDimV / 8; ++n) {
      o[n][0] *= scale_old[0];
      o[n][1] *= scale_old[0];
      o[n][2] *= scale_old[1];
      o[n][3] *= scale_old[1];
    }
    // P = exp2(S - max); the sum uses P before dropout, O uses P after.
#pragma unroll
    for (int n = 0; n < kBlockN / 8; ++n) {
#if FJ_DROPOUT
      float factor[4];
      dropout_factors(factor, p, batch_head, rows, tile_start + n * 8 + quad * 2);
#endif
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float prob = exp2f(s[n][e] - base_max[e / 2]);
        row_sum[e / 2] += prob;
#if FJ_DROPOUT
        prob *= factor[e];
#endif
        s[n][e] = prob;
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // V tile in shared memory; every warp done reading K
    if (tile_start + kBlockN < key_hi) {
      load_tile<kBlockN, kDimQk>(k_tile, k_base, p.k.stride_seq, tile_start + kBlockN, key_hi, p.head_dim_qk);
    }
    cp_async_commit();

    // O += P V.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      unsigned a[4];
      a_from_c(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int n = 0; n < kDimV / 8; n += 2) {
        unsigned bv[4];
        ldmatrix_x4_trans(bv, b_address(v_tile, kPitchV, kk * 16, n * 8, lane));
        mma_16816(o[n], a, bv[0], bv[1]);
        mma_16816(o[n + 1], a, bv[2], bv[3]);
      }
    }
    __syncthreads();  // every warp done reading V before the next tile's V load
  }
  cp_async_wait<0>();

  // O /= rowsum; LSE = ln(sum exp) = (max + log2(sum)) / log2(e).
  float totals[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float total = row_sum[r];
    total += __shfl_xor_sync(0xffffffffu, total, 1);
    total += __shfl_xor_sync(0xffffffffu, total, 2);
    totals[r] = total;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const long long i = rows[r];
    if (i >= p.seqlen_q) continue;
    const bool any_visible = totals[r] > 0.0f;
    const float inverse = any_visible ? 1.0f / totals[r] : 0.0f;
    elem_t* out_row = operand_row<elem_t>(p.o, b, h, i);
#pragma unroll
    for (int n = 0; n < kDimV / 8; ++n) {
      const int d = n * 8 + quad * 2;
      if (d < p.head_dim_v) out_row[d] = from_float<elem_t>(o[n][2 * r] * inverse);
      if (d + 1 < p.head_dim_v) out_row[d + 1] = from_float<elem_t>(o[n][2 * r + 1] * inverse);
    }
    if (quad == 0) {
      *operand_row<float>(p.lse, b, h, i) =
          any_visible ? (row_max[r] + log2f(totals[r])) / kLog2e : negative_infinity<float>();
    }
  }
}

}  // namespace mma
}  // namespace flashjit
