// Backward attention on tensor cores for float16 and bfloat16 (mma_common.cuh),
// split in two kernels so that every gradient has one writer and the sums run
// in a fixed order: no atomics, bitwise deterministic.
//
//   dQ kernel (FJ_ENTRY 1): each warp owns 16 query rows; K and V stream through
//     in double-buffered tiles of FJ_BLOCK_N keys. Per tile: S = Q K^T,
//     dP = dO V^T, dS = P (dP - delta) scale, dQ += dS K. It also writes
//     delta = rowsum(dO * O) for its rows, which the dK/dV kernel reads.
//   dK/dV kernel (FJ_ENTRY 2): each warp owns 16 keys of one kv head; Q, dO,
//     LSE and delta of every query head of the group stream through in
//     double-buffered tiles of FJ_BLOCK_N queries. Per tile, transposed:
//     S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q. Above head dim
//     128 the dK and dV accumulators do not both fit in registers: FJ_DKDV_PART
//     1 builds a kernel for dV alone (no dP^T), 2 one for dK alone.
//
// P is rebuilt from the forward's LSE in the log2 domain; a row that sees no
// key has LSE -inf and is given +inf here, so its P is exp2(-inf) = 0.
//
// Macros from the prelude: those of mma_common.cuh and FJ_ENTRY, FJ_MASK,
// FJ_MASK_TYPE, FJ_HAS_WINDOW, FJ_DROPOUT, FJ_SOFTCAP.
#pragma once

namespace flashjit {
namespace mma {

// The forward's natural-log LSE in the log2 domain; +inf for rows that see no key.
FJ_DEVICE float lse_log2(float lse) {
  return lse == negative_infinity<float>() ? -negative_infinity<float>() : lse * kLog2e;
}

// dS of one element from its raw dot product, dP and the row's LSE (log2) and
// delta; *prob_out receives P after dropout (the dV kernel's P^T dO operand).
template <bool kInterior>
FJ_DEVICE float score_gradient(const KernelParams& p, float dot, float dprob, float lse2, float delta,
                               float scale_log2, int b, int h, long long i, long long j, float dropout_factor,
                               float* prob_out) {
  float tanh_value = 0.0f;
  const float prob = fast_exp2(logit_log2<kInterior>(p, dot, scale_log2, b, h, i, j, &tanh_value) - lse2);
  *prob_out = prob * dropout_factor;
  float dscore = prob * (dprob * dropout_factor - delta);
#if FJ_SOFTCAP
  dscore *= 1.0f - tanh_value * tanh_value;
#endif
  return dscore * static_cast<float>(p.scale);
}

// dS of the dQ kernel's tile in place of S (rows queries, columns keys); bounds
// checked unless kInterior.
template <bool kInterior>
FJ_DEVICE void dq_tile_gradient(float (&s)[kBlockN / 8][4], const float (&dp)[kBlockN / 8][4], const KernelParams& p,
                                const long long (&rows)[2], const float (&lse2)[2], const float (&delta)[2],
                                long long tile_start, long long key_lo, long long key_hi, int b, int h,
                                long long batch_head, int quad, float scale_log2) {
#pragma unroll
  for (int n = 0; n < kBlockN / 8; ++n) {
    const long long key_pair = tile_start + n * 8 + quad * 2;
    float factor[4] = {1.0f, 1.0f, 1.0f, 1.0f};
#if FJ_DROPOUT
    dropout_factors(factor, p, batch_head, rows, key_pair);
#endif
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const long long i = rows[e / 2];
      const long long j = key_pair + (e % 2);
      float dscore = 0.0f;
      if (kInterior || (i < p.seqlen_q && j >= key_lo && j < key_hi)) {
        float unused_prob;
        dscore = score_gradient<kInterior>(p, s[n][e], dp[n][e], lse2[e / 2], delta[e / 2], scale_log2, b, h, i, j,
                                           factor[e], &unused_prob);
      }
      s[n][e] = dscore;
    }
  }
}

// P^T in place of S^T and dS^T in place of dP^T for a dK/dV tile of kN columns
// (rows keys, columns the queries start + first_column + ...); bounds checked
// unless kInterior.
template <bool kInterior, int kN>
FJ_DEVICE void dkdv_tile_gradient(float (&st)[kN / 8][4], float (&dpt)[kN / 8][4], const KernelParams& p,
                                  const long long (&keys)[2], const float* lse_tile, const float* delta_tile,
                                  long long start, int first_column, long long query_lo, long long query_hi, int b,
                                  int h, long long batch_head, int quad, float scale_log2) {
#pragma unroll
  for (int n = 0; n < kN / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int column = first_column + n * 8 + quad * 2 + (e % 2);
      const long long i = start + column;
      const long long j = keys[e / 2];
      float prob = 0.0f, dscore = 0.0f;
      if (kInterior || (j < p.seqlen_k && i >= query_lo && i < query_hi)) {
        float factor = 1.0f;
#if FJ_DROPOUT
        factor = dropout_keeps(p, batch_head, i, j) ? static_cast<float>(p.dropout_keep_scale) : 0.0f;
#endif
        dscore = score_gradient<kInterior>(p, st[n][e], dpt[n][e], lse_tile[column], delta_tile[column], scale_log2,
                                           b, h, i, j, factor, &prob);
      }
      st[n][e] = prob;
      dpt[n][e] = dscore;
    }
  }
}

// Rows rows[0], rows[1] of a [16 x kDim] accumulator into columns first_column..
// of a gradient operand.
template <int kDim>
FJ_DEVICE void store_rows(const KernelOperand& out, int b, int h, const long long (&rows)[2], long long row_end,
                          int dim, const float (&acc)[kDim / 8][4], int quad, int first_column = 0) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= row_end) continue;
    elem_t* row = operand_row<elem_t>(out, b, h, rows[r]);
#pragma unroll
    for (int n = 0; n < kDim / 8; ++n) {
      const int d = first_column + n * 8 + quad * 2;
      if (d < dim) row[d] = from_float<elem_t>(acc[n][2 * r]);
      if (d + 1 < dim) row[d + 1] = from_float<elem_t>(acc[n][2 * r + 1]);
    }
  }
}

#if FJ_ENTRY == 1
extern "C" __global__ void __launch_bounds__(kThreads) fj_attention_backward_dq(const KernelParams p) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  elem_t* q_tile = reinterpret_cast<elem_t*>(shared_bytes);  // [kBlockM][kPitchQk]
  elem_t* dout_tile = q_tile + kBlockM * kPitchQk;             // [kBlockM][kPitchV]
  elem_t* k_tiles = dout_tile + kBlockM * kPitchV;             // 2 x [kBlockN][kPitchQk]
  elem_t* v_tiles = k_tiles + 2 * kBlockN * kPitchQk;          // 2 x [kBlockN][kPitchV]

  int block, b, h;
  block_coordinates(p.num_query_blocks, p.heads_q, &block, &b, &h);
  const int kv_head = h / p.group_size;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane / 4;
  const int quad = lane % 4;
  const long long first_query = static_cast<long long>(block) * kBlockM;
  const long long batch_head = static_cast<long long>(b) * p.heads_q + h;
  // This thread's rows: first_query + (warp * kRowTiles + m) * 16 + group (+ 8).
  long long rows[kRowTiles][2];
#pragma unroll
  for (int m = 0; m < kRowTiles; ++m) {
    rows[m][0] = first_query + (warp * kRowTiles + m) * 16 + group;
    rows[m][1] = rows[m][0] + 8;
  }

  const bool block_full = first_query + kBlockM <= p.seqlen_q;
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  const long long last_query = min(first_query + kBlockM, static_cast<long long>(p.seqlen_q)) - 1;
  const long long key_lo = key_begin(p, first_query);
  const long long key_hi = key_end(p, last_query);
  const elem_t* k_base = operand_row<const elem_t>(p.k, b, kv_head, 0);
  const elem_t* v_base = operand_row<const elem_t>(p.v, b, kv_head, 0);
  load_tile<kBlockM, kDimQk>(q_tile, operand_row<const elem_t>(p.q, b, h, 0), p.q.stride_seq, first_query,
                             p.seqlen_q, p.head_dim_qk);
  load_tile<kBlockM, kDimV>(dout_tile, operand_row<const elem_t>(p.dout, b, h, 0), p.dout.stride_seq, first_query,
                            p.seqlen_q, p.head_dim_v);
  const long long first_tile = key_lo / kBlockN * kBlockN;
  if (first_tile < key_hi) {
    load_tile<kBlockN, kDimQk>(k_tiles, k_base, p.k.stride_seq, first_tile, key_hi, p.head_dim_qk);
    load_tile<kBlockN, kDimV>(v_tiles, v_base, p.v.stride_seq, first_tile, key_hi, p.head_dim_v);
  }
  cp_async_commit();

  // delta = rowsum(dO * O) for the warp's rows, two lanes a row, while the tiles load.
  float delta[kRowTiles][2], lse2[kRowTiles][2];
#pragma unroll
  for (int m = 0; m < kRowTiles; ++m) {
    const long long i = first_query + (warp * kRowTiles + m) * 16 + lane / 2;
    float partial = 0.0f;
    if (i < p.seqlen_q) {
      const elem_t* o_row = operand_row<const elem_t>(p.o, b, h, i);
      const elem_t* dout_row = operand_row<const elem_t>(p.dout, b, h, i);
      for (int d = lane % 2; d < p.head_dim_v; d += 2) partial += to_float(o_row[d]) * to_float(dout_row[d]);
    }
    partial += __shfl_xor_sync(0xffffffffu, partial, 1);
    if (i < p.seqlen_q && lane % 2 == 0) static_cast<float*>(p.delta)[batch_head * p.seqlen_q + i] = partial;
    delta[m][0] = __shfl_sync(0xffffffffu, partial, 2 * group);
    delta[m][1] = __shfl_sync(0xffffffffu, partial, 2 * group + 16);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      lse2[m][r] = rows[m][r] < p.seqlen_q ? lse_log2(*operand_row<const float>(p.lse, b, h, rows[m][r]))
                                           : -negative_infinity<float>();
    }
  }

  float dq[kRowTiles][kDimQk / 8][4];
  zero(dq);
  const elem_t* q_warp = q_tile + warp * kRowTiles * 16 * kPitchQk;
  const elem_t* dout_warp = dout_tile + warp * kRowTiles * 16 * kPitchV;
  int buffer = 0;
  for (long long tile_start = first_tile; tile_start < key_hi; tile_start += kBlockN, buffer ^= 1) {
    const elem_t* k_tile = k_tiles + buffer * kBlockN * kPitchQk;
    const elem_t* v_tile = v_tiles + buffer * kBlockN * kPitchV;
    const long long next = tile_start + kBlockN;
    if (next < key_hi) {
      load_tile<kBlockN, kDimQk>(k_tiles + (buffer ^ 1) * kBlockN * kPitchQk, k_base, p.k.stride_seq, next, key_hi,
                                 p.head_dim_qk);
      load_tile<kBlockN, kDimV>(v_tiles + (buffer ^ 1) * kBlockN * kPitchV, v_base, p.v.stride_seq, next, key_hi,
                                p.head_dim_v);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // this tile (and Q, dO) in shared memory

    float s[kRowTiles][kBlockN / 8][4], dp[kRowTiles][kBlockN / 8][4];
    zero(s);
    zero(dp);
    mma_rows_by_rows<kDimQk, kBlockN, kPitchQk, kPitchQk>(s, q_warp, k_tile, lane);
    mma_rows_by_rows<kDimV, kBlockN, kPitchV, kPitchV>(dp, dout_warp, v_tile, lane);

    const bool interior = block_full && tile_start >= key_lo && tile_start + kBlockN <= key_hi &&
                          all_visible(p, first_query, first_query + kBlockM - 1, tile_start, tile_start + kBlockN - 1);
#pragma unroll
    for (int m = 0; m < kRowTiles; ++m) {
      if (interior) {
        dq_tile_gradient<true>(s[m], dp[m], p, rows[m], lse2[m], delta[m], tile_start, key_lo, key_hi, b, h,
                               batch_head, quad, scale_log2);
      } else {
        dq_tile_gradient<false>(s[m], dp[m], p, rows[m], lse2[m], delta[m], tile_start, key_lo, key_hi, b, h,
                                batch_head, quad, scale_log2);
      }
    }
    mma_fragments_by_rows<kBlockN, kDimQk, kPitchQk>(dq, s, k_tile, lane);
    __syncthreads();  // every warp done with this buffer before it is refilled
  }
  cp_async_wait<0>();
#pragma unroll
  for (int m = 0; m < kRowTiles; ++m) store_rows<kDimQk>(p.dq, b, h, rows[m], p.seqlen_q, p.head_dim_qk, dq[m], quad);
}
#endif  // FJ_ENTRY == 1

#if FJ_ENTRY == 2 && !FJ_STAGED
static_assert(kRowTiles == 1, "the dK/dV kernel gives each warp one 16-key tile");

extern "C" __global__ void __launch_bounds__(kThreads) fj_attention_backward_dkdv(const KernelParams p) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  elem_t* k_tile = reinterpret_cast<elem_t*>(shared_bytes);  // [kBlockM][kPitchQk]: the block's keys
  elem_t* v_tile = k_tile + kBlockM * kPitchQk;                // [kBlockM][kPitchV]
  elem_t* q_tiles = v_tile + kBlockM * kPitchV;                // 2 x [kBlockN][kPitchQk]
  elem_t* dout_tiles = q_tiles + 2 * kBlockN * kPitchQk;       // 2 x [kBlockN][kPitchV]
  float* lse_tiles = reinterpret_cast<float*>(dout_tiles + 2 * kBlockN * kPitchV);  // 2 x [kBlockN], log2
  float* delta_tiles = lse_tiles + 2 * kBlockN;                                       // 2 x [kBlockN]

  int block, b, kv_head;
  block_coordinates(p.num_key_blocks, p.heads_kv, &block, &b, &kv_head, false);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane / 4;
  const int quad = lane % 4;
  const long long first_key = static_cast<long long>(block) * kBlockM;
  long long keys[2];
  keys[0] = first_key + warp * 16 + group;
  keys[1] = keys[0] + 8;

  const bool keys_full = first_key + kBlockM <= p.seqlen_k;
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  const long long last_key = min(first_key + kBlockM, static_cast<long long>(p.seqlen_k)) - 1;
  const long long query_lo = query_begin(p, first_key);
  const long long query_hi = query_end(p, last_key);
  load_tile<kBlockM, kDimQk>(k_tile, operand_row<const elem_t>(p.k, b, kv_head, 0), p.k.stride_seq, first_key,
                             p.seqlen_k, p.head_dim_qk);
  load_tile<kBlockM, kDimV>(v_tile, operand_row<const elem_t>(p.v, b, kv_head, 0), p.v.stride_seq, first_key,
                            p.seqlen_k, p.head_dim_v);

  // The query tiles of every head of the group, one sequence: tile t is head
  // member t / tiles_per_head, queries first_tile + (t % tiles_per_head) * kBlockN.
  const long long first_tile = query_lo / kBlockN * kBlockN;
  const int tiles_per_head = query_hi > first_tile ? static_cast<int>((query_hi - first_tile + kBlockN - 1) / kBlockN) : 0;
  const int tiles = tiles_per_head * p.group_size;
  const auto load_queries = [&](int t, int into) {
    const int h = kv_head * p.group_size + t / tiles_per_head;
    const long long start = first_tile + static_cast<long long>(t % tiles_per_head) * kBlockN;
    load_tile<kBlockN, kDimQk>(q_tiles + into * kBlockN * kPitchQk, operand_row<const elem_t>(p.q, b, h, 0),
                               p.q.stride_seq, start, query_hi, p.head_dim_qk);
    load_tile<kBlockN, kDimV>(dout_tiles + into * kBlockN * kPitchV, operand_row<const elem_t>(p.dout, b, h, 0),
                              p.dout.stride_seq, start, query_hi, p.head_dim_v);
    const long long batch_head = static_cast<long long>(b) * p.heads_q + h;
    for (int r = threadIdx.x; r < kBlockN; r += kThreads) {
      const long long i = start + r;
      const bool valid = i >= query_lo && i < query_hi;
      lse_tiles[into * kBlockN + r] =
          valid ? lse_log2(*operand_row<const float>(p.lse, b, h, i)) : -negative_infinity<float>();
      delta_tiles[into * kBlockN + r] = valid ? static_cast<const float*>(p.delta)[batch_head * p.seqlen_q + i] : 0.0f;
    }
  };
  if (tiles > 0) load_queries(0, 0);
  cp_async_commit();

#if FJ_DKDV_PART != 2
  float dv[1][kDimV / 8][4];
  zero(dv);
#endif
#if FJ_DKDV_PART != 1
  float dk[1][kDimQk / 8][4];
  zero(dk);
#endif
  const elem_t* k_warp = k_tile + warp * 16 * kPitchQk;
  const elem_t* v_warp = v_tile + warp * 16 * kPitchV;
  int buffer = 0;
  for (int t = 0; t < tiles; ++t, buffer ^= 1) {
    if (t + 1 < tiles) load_queries(t + 1, buffer ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // this tile (and K, V) in shared memory
    const elem_t* q_tile = q_tiles + buffer * kBlockN * kPitchQk;
    const elem_t* dout_tile = dout_tiles + buffer * kBlockN * kPitchV;
    const float* lse_tile = lse_tiles + buffer * kBlockN;
    const float* delta_tile = delta_tiles + buffer * kBlockN;
    const int h = kv_head * p.group_size + t / tiles_per_head;
    const long long start = first_tile + static_cast<long long>(t % tiles_per_head) * kBlockN;
    const long long batch_head = static_cast<long long>(b) * p.heads_q + h;

    float st[1][kBlockN / 8][4], dpt[1][kBlockN / 8][4];  // S^T and dP^T: rows keys, columns queries
    zero(st);
    zero(dpt);
    mma_rows_by_rows<kDimQk, kBlockN, kPitchQk, kPitchQk>(st, k_warp, q_tile, lane);
#if FJ_DKDV_PART != 1
    mma_rows_by_rows<kDimV, kBlockN, kPitchV, kPitchV>(dpt, v_warp, dout_tile, lane);
#endif

    const bool interior = keys_full && start >= query_lo && start + kBlockN <= query_hi &&
                          all_visible(p, start, start + kBlockN - 1, first_key, first_key + kBlockM - 1);
    if (interior) {
      dkdv_tile_gradient<true, kBlockN>(st[0], dpt[0], p, keys, lse_tile, delta_tile, start, 0, query_lo, query_hi, b,
                                        h, batch_head, quad, scale_log2);
    } else {
      dkdv_tile_gradient<false, kBlockN>(st[0], dpt[0], p, keys, lse_tile, delta_tile, start, 0, query_lo, query_hi,
                                         b, h, batch_head, quad, scale_log2);
    }
#if FJ_DKDV_PART != 2
    mma_fragments_by_rows<kBlockN, kDimV, kPitchV>(dv, st, dout_tile, lane);
#endif
#if FJ_DKDV_PART != 1
    mma_fragments_by_rows<kBlockN, kDimQk, kPitchQk>(dk, dpt, q_tile, lane);
#endif
    __syncthreads();  // every warp done with this buffer before it is refilled
  }
  cp_async_wait<0>();
#if FJ_DKDV_PART != 1
  store_rows<kDimQk>(p.dk, b, kv_head, keys, p.seqlen_k, p.head_dim_qk, dk[0], quad);
#endif
#if FJ_DKDV_PART != 2
  store_rows<kDimV>(p.dv, b, kv_head, keys, p.seqlen_k, p.head_dim_v, dv[0], quad);
#endif
}
#endif  // FJ_ENTRY == 2 && !FJ_STAGED

#if FJ_ENTRY == 2 && FJ_STAGED
// dK/dV with a 2-D warp layout: 8 warps, 128 keys a block, 64 queries a step.
// Products of keys by queries (S^T, dP^T) split the 128 x 64 tile 4 x 2, 32 x 32
// a warp; P^T and dS^T then go through shared memory (in the element type, as
// the mma operands they become), and the products into dV and dK split the
// 128 x D outputs 4 x 2, 32 keys x D/2 a warp. Every fragment read from shared
// memory feeds two or more mma, against one in the 16-keys-a-warp kernel.
constexpr int kKeys = 128;
constexpr int kQueries = kBlockN;
constexpr int kPitchP = kQueries + 8;
constexpr int kHalfQk = kDimQk / 2;
constexpr int kHalfV = kDimV / 2;
static_assert(kWarps == 8 && kRowTiles == 2 && kQueries == 64, "the staged dK/dV kernel is laid out for 8 warps");
static_assert(kDimQk % 32 == 0 && kDimV % 32 == 0, "the staged dK/dV kernel splits head dims in halves of 16s");
static_assert(FJ_DKDV_PART == 0, "the staged dK/dV kernel computes both gradients");

// acc[kTiles x 16 x kN] += A X for a warp: A's kTiles x 16 rows at `a_tile` (pitch
// kPitchA, kDepth columns), X's kDepth rows at `x_tile` (pitch kPitchX, kN columns).
template <int kDepth, int kN, int kPitchA, int kPitchX, int kTiles>
FJ_DEVICE void mma_rows_by_krows(float (&acc)[kTiles][kN / 8][4], const elem_t* a_tile, const elem_t* x_tile,
                                 int lane) {
#pragma unroll
  for (int kk = 0; kk < kDepth / 16; ++kk) {
    unsigned a[kTiles][4];
#pragma unroll
    for (int m = 0; m < kTiles; ++m) ldmatrix_x4(a[m], a_address(a_tile + m * 16 * kPitchA, kPitchA, kk * 16, lane));
#pragma unroll
    for (int n = 0; n < kN / 8; n += 2) {
      unsigned b[4];
      ldmatrix_x4_trans(b, b_address(x_tile, kPitchX, kk * 16, n * 8, lane));
#pragma unroll
      for (int m = 0; m < kTiles; ++m) {
        mma_16816(acc[m][n], a[m], b[0], b[1]);
        mma_16816(acc[m][n + 1], a[m], b[2], b[3]);
      }
    }
  }
}

// A warp's C fragments (rows row0.., columns column0..) into a [kKeys][kPitchP] tile.
FJ_DEVICE void stage(elem_t* tile, const float (&c)[2][4][4], int row0, int column0, int group, int quad) {
#pragma unroll
  for (int m = 0; m < 2; ++m) {
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      elem_t* at = tile + (row0 + m * 16 + group) * kPitchP + column0 + n * 8 + quad * 2;
      *reinterpret_cast<unsigned*>(at) = pack2(c[m][n][0], c[m][n][1]);
      *reinterpret_cast<unsigned*>(at + 8 * kPitchP) = pack2(c[m][n][2], c[m][n][3]);
    }
  }
}

extern "C" __global__ void __launch_bounds__(kThreads) fj_attention_backward_dkdv(const KernelParams p) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  elem_t* k_tile = reinterpret_cast<elem_t*>(shared_bytes);  // [kKeys][kPitchQk]: the block's keys
  elem_t* v_tile = k_tile + kKeys * kPitchQk;                  // [kKeys][kPitchV]
  elem_t* q_tiles = v_tile + kKeys * kPitchV;                  // 2 x [kQueries][kPitchQk]
  elem_t* dout_tiles = q_tiles + 2 * kQueries * kPitchQk;      // 2 x [kQueries][kPitchV]
  elem_t* pt_tile = dout_tiles + 2 * kQueries * kPitchV;       // [kKeys][kPitchP]: P^T
  elem_t* dst_tile = pt_tile + kKeys * kPitchP;                // [kKeys][kPitchP]: dS^T
  float* lse_tiles = reinterpret_cast<float*>(dst_tile + kKeys * kPitchP);  // 2 x [kQueries], log2
  float* delta_tiles = lse_tiles + 2 * kQueries;                              // 2 x [kQueries]

  int block, b, kv_head;
  block_coordinates(p.num_key_blocks, p.heads_kv, &block, &b, &kv_head, false);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane / 4;
  const int quad = lane % 4;
  const int warp_row = warp / 2;  // 32 keys: rows of S^T and of dK, dV
  const int warp_col = warp % 2;  // 32 queries of S^T; half the head dims of dK, dV
  const long long first_key = static_cast<long long>(block) * kKeys;
  long long keys[2][2];
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    keys[m][0] = first_key + warp_row * 32 + m * 16 + group;
    keys[m][1] = keys[m][0] + 8;
  }

  const bool keys_full = first_key + kKeys <= p.seqlen_k;
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  const long long last_key = min(first_key + kKeys, static_cast<long long>(p.seqlen_k)) - 1;
  const long long query_lo = query_begin(p, first_key);
  const long long query_hi = query_end(p, last_key);
  load_tile<kKeys, kDimQk>(k_tile, operand_row<const elem_t>(p.k, b, kv_head, 0), p.k.stride_seq, first_key,
                           p.seqlen_k, p.head_dim_qk);
  load_tile<kKeys, kDimV>(v_tile, operand_row<const elem_t>(p.v, b, kv_head, 0), p.v.stride_seq, first_key,
                          p.seqlen_k, p.head_dim_v);

  // The query tiles of every head of the group, one sequence (as in the other dK/dV kernel).
  const long long first_tile = query_lo / kQueries * kQueries;
  const int tiles_per_head =
      query_hi > first_tile ? static_cast<int>((query_hi - first_tile + kQueries - 1) / kQueries) : 0;
  const int tiles = tiles_per_head * p.group_size;
  const auto load_queries = [&](int t, int into) {
    const int h = kv_head * p.group_size + t / tiles_per_head;
    const long long start = first_tile + static_cast<long long>(t % tiles_per_head) * kQueries;
    load_tile<kQueries, kDimQk>(q_tiles + into * kQueries * kPitchQk, operand_row<const elem_t>(p.q, b, h, 0),
                                p.q.stride_seq, start, query_hi, p.head_dim_qk);
    load_tile<kQueries, kDimV>(dout_tiles + into * kQueries * kPitchV, operand_row<const elem_t>(p.dout, b, h, 0),
                               p.dout.stride_seq, start, query_hi, p.head_dim_v);
    const long long batch_head = static_cast<long long>(b) * p.heads_q + h;
    for (int r = threadIdx.x; r < kQueries; r += kThreads) {
      const long long i = start + r;
      const bool valid = i >= query_lo && i < query_hi;
      lse_tiles[into * kQueries + r] =
          valid ? lse_log2(*operand_row<const float>(p.lse, b, h, i)) : -negative_infinity<float>();
      delta_tiles[into * kQueries + r] =
          valid ? static_cast<const float*>(p.delta)[batch_head * p.seqlen_q + i] : 0.0f;
    }
  };
  if (tiles > 0) load_queries(0, 0);
  cp_async_commit();

  float dv[2][kHalfV / 8][4], dk[2][kHalfQk / 8][4];
  zero(dv);
  zero(dk);
  int buffer = 0;
  for (int t = 0; t < tiles; ++t, buffer ^= 1) {
    if (t + 1 < tiles) load_queries(t + 1, buffer ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // this tile (and K, V) in shared memory; P^T, dS^T free
    const elem_t* q_tile = q_tiles + buffer * kQueries * kPitchQk;
    const elem_t* dout_tile = dout_tiles + buffer * kQueries * kPitchV;
    const float* lse_tile = lse_tiles + buffer * kQueries;
    const float* delta_tile = delta_tiles + buffer * kQueries;
    const int h = kv_head * p.group_size + t / tiles_per_head;
    const long long start = first_tile + static_cast<long long>(t % tiles_per_head) * kQueries;
    const long long batch_head = static_cast<long long>(b) * p.heads_q + h;

    {
      float st[2][4][4], dpt[2][4][4];  // this warp's 32 keys x 32 queries of S^T and dP^T
      zero(st);
      zero(dpt);
      mma_rows_by_rows<kDimQk, 32, kPitchQk, kPitchQk>(st, k_tile + warp_row * 32 * kPitchQk,
                                                       q_tile + warp_col * 32 * kPitchQk, lane);
      mma_rows_by_rows<kDimV, 32, kPitchV, kPitchV>(dpt, v_tile + warp_row * 32 * kPitchV,
                                                    dout_tile + warp_col * 32 * kPitchV, lane);
      const bool interior = keys_full && start >= query_lo && start + kQueries <= query_hi &&
                            all_visible(p, start, start + kQueries - 1, first_key, first_key + kKeys - 1);
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        if (interior) {
          dkdv_tile_gradient<true, 32>(st[m], dpt[m], p, keys[m], lse_tile, delta_tile, start, warp_col * 32,
                                       query_lo, query_hi, b, h, batch_head, quad, scale_log2);
        } else {
          dkdv_tile_gradient<false, 32>(st[m], dpt[m], p, keys[m], lse_tile, delta_tile, start, warp_col * 32,
                                        query_lo, query_hi, b, h, batch_head, quad, scale_log2);
        }
      }
      stage(pt_tile, st, warp_row * 32, warp_col * 32, group, quad);
      stage(dst_tile, dpt, warp_row * 32, warp_col * 32, group, quad);
    }
    __syncthreads();  // P^T and dS^T of the whole block in shared memory

    // dV += P^T dO and dK += dS^T Q: this warp's 32 keys x half the head dims.
    mma_rows_by_krows<kQueries, kHalfV, kPitchP, kPitchV>(dv, pt_tile + warp_row * 32 * kPitchP,
                                                          dout_tile + warp_col * kHalfV, lane);
    mma_rows_by_krows<kQueries, kHalfQk, kPitchP, kPitchQk>(dk, dst_tile + warp_row * 32 * kPitchP,
                                                            q_tile + warp_col * kHalfQk, lane);
    __syncthreads();  // every warp done with this buffer and with P^T, dS^T
  }
  cp_async_wait<0>();
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    store_rows<kHalfQk>(p.dk, b, kv_head, keys[m], p.seqlen_k, p.head_dim_qk, dk[m], quad, warp_col * kHalfQk);
    store_rows<kHalfV>(p.dv, b, kv_head, keys[m], p.seqlen_k, p.head_dim_v, dv[m], quad, warp_col * kHalfV);
  }
}
#endif  // FJ_ENTRY == 2 && FJ_STAGED

}  // namespace mma
}  // namespace flashjit
