// Backward attention on tensor cores for float16 and bfloat16 (mma_common.cuh),
// split in two kernels so that every gradient has one writer and the sums run
// in a fixed order: no atomics, bitwise deterministic.
//
//   dQ kernel (FJ_BACKWARD_DQ): each warp owns 16 query rows; K and V stream through
//     in double-buffered tiles of FJ_BLOCK_N keys. Per tile: S = Q K^T,
//     dP = dO V^T, dS = P (dP - delta) scale, dQ += dS K. It also writes
//     delta = rowsum(dO * O) for its rows, which the dK/dV kernel reads.
//   dK/dV kernel (FJ_BACKWARD_DKDV): each warp owns 16 keys of one kv head; Q, dO,
//     LSE and delta of every query head of the group stream through in
//     double-buffered tiles of FJ_BLOCK_N queries. Per tile, transposed:
//     S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q. Above head dim
//     128 the dK and dV accumulators do not both fit in registers: a kernel
//     with FJ_WITH_DV alone computes dV (no dP^T), one with FJ_WITH_DK alone dK.
//
// The per-element gradient and the stores are gradient.cuh's. Macros from the
// prelude: those of mma_common.cuh and the entry's (FJ_BACKWARD_DQ, FJ_BACKWARD_DKDV),
// FJ_WITH_DK, FJ_WITH_DV, FJ_MASK, FJ_MASK_TYPE, FJ_HAS_WINDOW, FJ_DROPOUT, FJ_SOFTCAP.
#pragma once

namespace flashjit {
namespace mma {

#if FJ_BACKWARD_DQ
extern "C" __global__ void __launch_bounds__(kThreads) fj_attention_backward_dq(const KernelParams p) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  constexpr layout::MmaBackward kLayout = layout::mma_backward(kBlockM, kBlockN, kPitchQk, kPitchV, false);
  elem_t* q_tile = reinterpret_cast<elem_t*>(shared_bytes + kLayout.own_qk);        // [kBlockM][kPitchQk]
  elem_t* dout_tile = reinterpret_cast<elem_t*>(shared_bytes + kLayout.own_v);      // [kBlockM][kPitchV]
  elem_t* k_tiles = reinterpret_cast<elem_t*>(shared_bytes + kLayout.streamed_qk);  // 2 x [kBlockN][kPitchQk]
  elem_t* v_tiles = reinterpret_cast<elem_t*>(shared_bytes + kLayout.streamed_v);   // 2 x [kBlockN][kPitchV]

  int block, b, h;
  block_coordinates(p.num_query_blocks, p.heads_q, &block, &b, &h);
  const int kv_head = h / p.group_size;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane / 4;
  const int quad = lane % 4;
  const long long first_query = static_cast<long long>(block) * kBlockM;
  const long long batch_head = static_cast<long long>(b) * p.heads_q + h;
  long long rows[kRowTiles][2];
  fragment_rows(first_query, warp, group, rows);

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
        dq_tile_gradient<true>(s[m], dp[m], p, rows[m], lse2[m], delta[m], tile_start, b, h,
                               batch_head, quad, scale_log2);
      } else {
        dq_tile_gradient<false>(s[m], dp[m], p, rows[m], lse2[m], delta[m], tile_start, b, h,
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
#endif  // FJ_BACKWARD_DQ

#if FJ_BACKWARD_DKDV
static_assert(kRowTiles == 1, "the dK/dV kernel gives each warp one 16-key tile");

extern "C" __global__ void __launch_bounds__(kThreads) fj_attention_backward_dkdv(const KernelParams p) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  constexpr layout::MmaBackward kLayout = layout::mma_backward(kBlockM, kBlockN, kPitchQk, kPitchV, true);
  elem_t* k_tile = reinterpret_cast<elem_t*>(shared_bytes + kLayout.own_qk);  // [kBlockM][kPitchQk]: the block's keys
  elem_t* v_tile = reinterpret_cast<elem_t*>(shared_bytes + kLayout.own_v);   // [kBlockM][kPitchV]
  elem_t* q_tiles = reinterpret_cast<elem_t*>(shared_bytes + kLayout.streamed_qk);    // 2 x [kBlockN][kPitchQk]
  elem_t* dout_tiles = reinterpret_cast<elem_t*>(shared_bytes + kLayout.streamed_v);  // 2 x [kBlockN][kPitchV]
  float* lse_tiles = reinterpret_cast<float*>(shared_bytes + kLayout.lse_tiles);      // 2 x [kBlockN], log2
  float* delta_tiles = reinterpret_cast<float*>(shared_bytes + kLayout.delta_tiles);  // 2 x [kBlockN]

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

#if FJ_WITH_DV
  float dv[1][kDimV / 8][4];
  zero(dv);
#endif
#if FJ_WITH_DK
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
#if FJ_WITH_DK
    mma_rows_by_rows<kDimV, kBlockN, kPitchV, kPitchV>(dpt, v_warp, dout_tile, lane);
#endif

    const bool interior = keys_full && start >= query_lo && start + kBlockN <= query_hi &&
                          all_visible(p, start, start + kBlockN - 1, first_key, first_key + kBlockM - 1);
    if (interior) {
      dkdv_tile_gradient<true>(st[0], dpt[0], p, keys, lse_tile, delta_tile, start, b, h, batch_head,
                               quad, scale_log2);
    } else {
      dkdv_tile_gradient<false>(st[0], dpt[0], p, keys, lse_tile, delta_tile, start, b, h, batch_head,
                                quad, scale_log2);
    }
#if FJ_WITH_DV
    mma_fragments_by_rows<kBlockN, kDimV, kPitchV>(dv, st, dout_tile, lane);
#endif
#if FJ_WITH_DK
    mma_fragments_by_rows<kBlockN, kDimQk, kPitchQk>(dk, dpt, q_tile, lane);
#endif
    __syncthreads();  // every warp done with this buffer before it is refilled
  }
  cp_async_wait<0>();
#if FJ_WITH_DK
  store_rows<kDimQk>(p.dk, b, kv_head, keys, p.seqlen_k, p.head_dim_qk, dk[0], quad);
#endif
#if FJ_WITH_DV
  store_rows<kDimV>(p.dv, b, kv_head, keys, p.seqlen_k, p.head_dim_v, dv[0], quad);
#endif
}
#endif  // FJ_BACKWARD_DKDV

}  // namespace mma
}  // namespace flashjit
