// Forward attention on tensor cores for float16 and bfloat16 (mma_common.cuh):
// each of FJ_WARPS warps owns FJ_ROW_TILES x 16 query rows of the block, so
// every K and V fragment read from shared memory feeds FJ_ROW_TILES mma; K and V stream
// through in tiles of FJ_BLOCK_N keys, K loaded with cp.async while P V runs
// and V while Q K^T runs. Head dims are padded to FJ_HEAD_DIM_QK /
// FJ_HEAD_DIM_V (multiples of 16) with zeros in shared memory. P goes from
// the C fragments of S to the A fragments of P V without leaving registers.
//
// With FJ_WGMMA (sm_90a, wgmma.cuh) each warpgroup of 4 warps computes its 64
// rows' S = Q K^T and O += P V with wgmma instead: Q, K and V tiles swizzled,
// head dims padded to 64; the softmax on the fragments is the same code.
//
// Macros from the prelude: those of mma_common.cuh and FJ_MASK, FJ_MASK_TYPE,
// FJ_HAS_WINDOW, FJ_DROPOUT, FJ_SOFTCAP.
#pragma once

namespace flashjit {
namespace mma {

// Row r's maximum or sum of this thread's part of a 16 x kBlockN C tile, as a
// tree: a serial chain over the row would leave the two or three warps a
// scheduler holds waiting on each step's latency.
template <bool kSum>
FJ_DEVICE float row_reduce(const float (&c)[kBlockN / 8][4], int r) {
  float part[kBlockN / 8];
#pragma unroll
  for (int n = 0; n < kBlockN / 8; ++n) part[n] = kSum ? c[n][2 * r] + c[n][2 * r + 1] : fmaxf(c[n][2 * r], c[n][2 * r + 1]);
#pragma unroll
  for (int width = kBlockN / 16; width >= 1; width /= 2) {
#pragma unroll
    for (int n = 0; n < width; ++n) part[n] = kSum ? part[n] + part[n + width] : fmaxf(part[n], part[n + width]);
  }
  return part[0];
}

// Logits of one S tile in the log2 domain (bounds checked unless kInterior).
template <bool kInterior>
FJ_DEVICE void tile_logits(float (&s)[kRowTiles][kBlockN / 8][4], const KernelParams& p,
                           const long long (&rows)[kRowTiles][2], long long tile_start, long long key_lo,
                           long long key_hi, int b, int h, int quad, float scale_log2) {
#pragma unroll
  for (int m = 0; m < kRowTiles; ++m) {
#pragma unroll
    for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const long long i = rows[m][e / 2];
        const long long j = tile_start + n * 8 + quad * 2 + (e % 2);
        float x = negative_infinity<float>();
        if (kInterior || (i < p.seqlen_q && j >= key_lo && j < key_hi)) {
          float unused_tanh;
          x = logit_log2<kInterior>(p, s[m][n][e], scale_log2, b, h, i, j, &unused_tanh);
        }
        s[m][n][e] = x;
      }
    }
  }
}

#if FJ_WGMMA
static_assert(kRowTiles == 1 && kWarps % 4 == 0, "wgmma: warpgroups of 4 warps, 16 rows a warp");
constexpr int kTileQk = kDimQk;  // elements a row takes in shared memory (swizzled, unpadded)
#else
constexpr int kTileQk = kPitchQk;
#endif

// S = Q K^T for this warp's rows: kRowTiles x 16 x kBlockN.
FJ_DEVICE void scores(float (&s)[kRowTiles][kBlockN / 8][4], const elem_t* q_tile, const elem_t* k_tile, int warp,
                      int lane) {
#if FJ_WGMMA
  // The warpgroup's 64 rows at once; the accumulator is this warp's 16 of them.
  const int warpgroup_row = (warp / 4) * 64;
  pin(s[0]);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kDimQk / 16; ++kk) {
    wgmma_ss<kBlockN>(s[0], k_major_descriptor<kBlockM, kDimQk>(q_tile, warpgroup_row, kk * 16),
                      k_major_descriptor<kBlockN, kDimQk>(k_tile, 0, kk * 16), kk == 0);
  }
  wgmma_commit();
  pin(s[0]);
  wgmma_wait_all();
  pin(s[0]);
#else
  // Each K fragment feeds every row tile.
  zero(s);
  mma_rows_by_rows<kDimQk, kBlockN, kPitchQk, kPitchQk>(s, q_tile + (warp * kRowTiles * 16) * kPitchQk, k_tile,
                                                        lane);
#endif
}

// O += P V, P (probabilities after dropout) in this warp's C fragments.
FJ_DEVICE void accumulate_output(float (&o)[kRowTiles][kDimV / 8][4], const float (&s)[kRowTiles][kBlockN / 8][4],
                                 const elem_t* v_tile, int lane) {
#if FJ_WGMMA
  // P stays in registers as the A operand; every step's fragment lives until the wait.
  unsigned a[kBlockN / 16][4];
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk) a_from_c(a[kk], s[0][2 * kk], s[0][2 * kk + 1]);
  pin(o[0]);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk) wgmma_rs<kDimV>(o[0], a[kk], mn_major_descriptor<kBlockN>(v_tile, kk * 16));
  wgmma_commit();
  pin(o[0]);
  wgmma_wait_all();
  pin(o[0]);
  pin(a);
#else
  // Each V fragment feeds every row tile.
  mma_fragments_by_rows<kBlockN, kDimV, kPitchV>(o, s, v_tile, lane);
#endif
}

// Shared memory that cp.async (or plain stores) filled, before any warp reads it.
FJ_DEVICE void tiles_ready() {
#if FJ_WGMMA
  fence_async_shared();  // the tensor cores read through the async proxy
#endif
  __syncthreads();
}

extern "C" __global__ void __launch_bounds__(kThreads) fj_attention_forward(const KernelParams p) {
#if FJ_WGMMA
  extern __shared__ __align__(1024) unsigned char shared_raw[];
  unsigned char* shared_bytes = shared_raw + ((1024 - (shared_address(shared_raw) & 1023)) & 1023);
#else
  extern __shared__ __align__(16) unsigned char shared_bytes[];
#endif
  elem_t* q_tile = reinterpret_cast<elem_t*>(shared_bytes);  // [kBlockM][kTileQk]
  elem_t* k_tile = q_tile + kBlockM * kTileQk;                 // [kBlockN][kTileQk]
  elem_t* v_tile = k_tile + kBlockN * kTileQk;                 // [kBlockN][kDimV] (swizzled) or [kBlockN][kPitchV]

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
  // This thread's rows: first_query + (warp * kRowTiles + m) * 16 + group (+ 8).
  long long rows[kRowTiles][2];
#pragma unroll
  for (int m = 0; m < kRowTiles; ++m) {
    rows[m][0] = first_query + (warp * kRowTiles + m) * 16 + group;
    rows[m][1] = rows[m][0] + 8;
  }

  const bool block_full = first_query + kBlockM <= p.seqlen_q;
  const long long last_query = min(first_query + kBlockM, static_cast<long long>(p.seqlen_q)) - 1;
  const long long key_lo = key_begin(p, first_query);
  const long long key_hi = key_end(p, last_query);
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  const elem_t* k_base = operand_row<const elem_t>(p.k, b, kv_head, 0);
  const elem_t* v_base = operand_row<const elem_t>(p.v, b, kv_head, 0);

  load_tile<kBlockM, kDimQk>(q_tile, operand_row<const elem_t>(p.q, b, h, 0), p.q.stride_seq, first_query,
                             p.seqlen_q, p.head_dim_qk);
  const long long first_tile = key_lo / kBlockN * kBlockN;
  if (first_tile < key_hi) {
    load_tile<kBlockN, kDimQk>(k_tile, k_base, p.k.stride_seq, first_tile, key_hi, p.head_dim_qk);
  }
  cp_async_commit();

  float o[kRowTiles][kDimV / 8][4];
  zero(o);
  float row_max[kRowTiles][2], row_sum[kRowTiles][2];  // max in the log2 domain
#pragma unroll
  for (int m = 0; m < kRowTiles; ++m) {
    row_max[m][0] = row_max[m][1] = negative_infinity<float>();
    row_sum[m][0] = row_sum[m][1] = 0.0f;
  }
  for (long long tile_start = first_tile; tile_start < key_hi; tile_start += kBlockN) {
    cp_async_wait<0>();
    tiles_ready();  // K tile (and Q) in shared memory; V tile free
    load_tile<kBlockN, kDimV>(v_tile, v_base, p.v.stride_seq, tile_start, key_hi, p.head_dim_v);
    cp_async_commit();

    float s[kRowTiles][kBlockN / 8][4];
    scores(s, q_tile, k_tile, warp, lane);

    // Logits (scale, softcap, mask, bounds) in the log2 domain, and the row maxima.
    const bool interior = block_full && tile_start >= key_lo && tile_start + kBlockN <= key_hi &&
                          all_visible(p, first_query, first_query + kBlockM - 1, tile_start, tile_start + kBlockN - 1);
    if (interior) {
      tile_logits<true>(s, p, rows, tile_start, key_lo, key_hi, b, h, quad, scale_log2);
    } else {
      tile_logits<false>(s, p, rows, tile_start, key_lo, key_hi, b, h, quad, scale_log2);
    }
#pragma unroll
    for (int m = 0; m < kRowTiles; ++m) {
      float scale_old[2], base_max[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float tmax = row_reduce<false>(s[m], r);
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
        const float new_max = fmaxf(row_max[m][r], tmax);
        // A row with nothing visible yet keeps max -inf; subtract 0 instead so exp2 gives 0, not NaN.
        base_max[r] = new_max == negative_infinity<float>() ? 0.0f : new_max;
        scale_old[r] = fast_exp2(row_max[m][r] - base_max[r]);
        row_max[m][r] = new_max;
      }
#pragma unroll
      for (int n = 0; n < kDimV / 8; ++n) {
        o[m][n][0] *= scale_old[0];
        o[m][n][1] *= scale_old[0];
        o[m][n][2] *= scale_old[1];
        o[m][n][3] *= scale_old[1];
      }
      // P = exp2(S - max); the sum uses P before dropout, O uses P after.
#pragma unroll
      for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[m][n][e] = fast_exp2(s[m][n][e] - base_max[e / 2]);
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) row_sum[m][r] = row_sum[m][r] * scale_old[r] + row_reduce<true>(s[m], r);
#if FJ_DROPOUT
#pragma unroll
      for (int n = 0; n < kBlockN / 8; ++n) {
        float factor[4];
        dropout_factors(factor, p, batch_head, rows[m], tile_start + n * 8 + quad * 2);
#pragma unroll
        for (int e = 0; e < 4; ++e) s[m][n][e] *= factor[e];
      }
#endif
    }

    cp_async_wait<0>();
    tiles_ready();  // V tile in shared memory; every warp done reading K
    if (tile_start + kBlockN < key_hi) {
      load_tile<kBlockN, kDimQk>(k_tile, k_base, p.k.stride_seq, tile_start + kBlockN, key_hi, p.head_dim_qk);
    }
    cp_async_commit();

    accumulate_output(o, s, v_tile, lane);
    __syncthreads();  // every warp done reading V before the next tile's V load
  }
  cp_async_wait<0>();

  // O /= rowsum; LSE = ln(sum exp) = (max + log2(sum)) / log2(e).
#pragma unroll
  for (int m = 0; m < kRowTiles; ++m) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float total = row_sum[m][r];
      total += __shfl_xor_sync(0xffffffffu, total, 1);
      total += __shfl_xor_sync(0xffffffffu, total, 2);
      const long long i = rows[m][r];
      if (i >= p.seqlen_q) continue;
      const bool any_visible = total > 0.0f;
      const float inverse = any_visible ? 1.0f / total : 0.0f;
      elem_t* out_row = operand_row<elem_t>(p.o, b, h, i);
#pragma unroll
      for (int n = 0; n < kDimV / 8; ++n) {
        const int d = n * 8 + quad * 2;
        if (d < p.head_dim_v) out_row[d] = from_float<elem_t>(o[m][n][2 * r] * inverse);
        if (d + 1 < p.head_dim_v) out_row[d + 1] = from_float<elem_t>(o[m][n][2 * r + 1] * inverse);
      }
      if (quad == 0) {
        *operand_row<float>(p.lse, b, h, i) =
            any_visible ? (row_max[m][r] + log2f(total)) / kLog2e : negative_infinity<float>();
      }
    }
  }
}

}  // namespace mma
}  // namespace flashjit
