// Attention with scalar arithmetic in the accumulator type: float32 inputs with
// float32 arithmetic (no TF32), float64, and any head dim or alignment. Each
// row (a query in the forward and dQ kernels, a key in the dK/dV kernel) is
// owned by kLanes consecutive threads; each lane holds every kLanes-th element
// of the row's vectors, so a dot product is a lane-local sum and a 3-step
// shuffle. The other operand streams through shared memory in tiles of
// FJ_BLOCK_N rows, converted to the accumulator type once on load.
//
// Macros from the prelude: the entry's (FJ_FORWARD, FJ_BACKWARD_DQ, FJ_BACKWARD_DKDV), FJ_ELEM, FJ_ACC, FJ_HEAD_DIM_QK, FJ_HEAD_DIM_V
// (multiples of kLanes), FJ_THREADS, FJ_BLOCK_N, FJ_MASK, FJ_MASK_TYPE,
// FJ_HAS_WINDOW, FJ_DROPOUT, FJ_SOFTCAP.
#pragma once

namespace flashjit {
namespace simt {

typedef FJ_ELEM elem_t;
typedef FJ_ACC acc_t;

constexpr int kLanes = 8;
constexpr int kRows = FJ_THREADS / kLanes;  // rows owned by one block
constexpr int kTile = FJ_BLOCK_N;           // rows of the streamed operand per step
constexpr int kSliceQk = FJ_HEAD_DIM_QK / kLanes;
constexpr int kSliceV = FJ_HEAD_DIM_V / kLanes;

// Sum over the kLanes threads of a row.
FJ_DEVICE acc_t row_sum(acc_t x) {
#pragma unroll
  for (int mask = 1; mask < kLanes; mask <<= 1) x += __shfl_xor_sync(0xffffffffu, x, mask);
  return x;
}

// Rows [first, first + kTile) of an operand into shared memory as acc_t; rows at
// or past row_end and columns past dim read as zero.
template <int kDim>
FJ_DEVICE void load_tile(acc_t* tile, const elem_t* base, long long stride_seq, long long first,
                         long long row_end, int dim) {
  for (int index = threadIdx.x; index < kTile * kDim; index += FJ_THREADS) {
    const int r = index / kDim;
    const int c = index - r * kDim;
    const long long row = first + r;
    tile[index] = (row < row_end && c < dim) ? load_as<acc_t>(base + row * stride_seq + c) : acc_t(0);
  }
}

// Slice of a row vector into registers: element lane + kLanes * e.
template <int kSlice>
FJ_DEVICE void load_slice(acc_t (&slice)[kSlice], const elem_t* row, bool valid, int dim, int lane) {
#pragma unroll
  for (int e = 0; e < kSlice; ++e) {
    const int d = lane + kLanes * e;
    slice[e] = (valid && d < dim) ? load_as<acc_t>(row + d) : acc_t(0);
  }
}

template <int kSlice>
FJ_DEVICE void store_slice(elem_t* row, const acc_t (&slice)[kSlice], acc_t factor, int dim, int lane) {
#pragma unroll
  for (int e = 0; e < kSlice; ++e) {
    const int d = lane + kLanes * e;
    if (d < dim) store_as(row + d, slice[e] * factor);
  }
}

template <int kSlice, int kDim>
FJ_DEVICE acc_t dot_with_tile_row(const acc_t (&slice)[kSlice], const acc_t* tile_row, int lane) {
  acc_t partial = 0;
#pragma unroll
  for (int e = 0; e < kSlice; ++e) partial += slice[e] * tile_row[lane + kLanes * e];
  return row_sum(partial);
}

#if FJ_FORWARD
extern "C" __global__ void __launch_bounds__(FJ_THREADS) fj_attention_forward(const KernelParams p) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  constexpr layout::Simt kLayout = layout::simt(kTile, FJ_HEAD_DIM_QK, FJ_HEAD_DIM_V, sizeof(acc_t), false);
  acc_t* k_tile = reinterpret_cast<acc_t*>(shared_bytes + kLayout.streamed_qk);  // [kTile][FJ_HEAD_DIM_QK]
  acc_t* v_tile = reinterpret_cast<acc_t*>(shared_bytes + kLayout.streamed_v);   // [kTile][FJ_HEAD_DIM_V]

  int block, b, h;
  block_coordinates(p.num_query_blocks, p.heads_q, &block, &b, &h);
  const int kv_head = h / p.group_size;
  const int lane = threadIdx.x % kLanes;
  const long long first_query = static_cast<long long>(block) * kRows;
  const long long i = first_query + threadIdx.x / kLanes;
  const bool row_valid = i < p.seqlen_q;
#if FJ_DROPOUT
  const long long batch_head = static_cast<long long>(b) * p.heads_q + h;
#endif

  acc_t q[kSliceQk];
  load_slice(q, operand_row<const elem_t>(p.q, b, h, row_valid ? i : 0), row_valid, p.head_dim_qk, lane);
  acc_t o[kSliceV];
#pragma unroll
  for (int e = 0; e < kSliceV; ++e) o[e] = 0;
  acc_t row_max = negative_infinity<acc_t>();
  acc_t row_sum_exp = 0;

  const long long last_query = min(first_query + kRows, static_cast<long long>(p.seqlen_q)) - 1;
  const long long key_lo = key_begin(p, first_query);
  const long long key_hi = key_end(p, last_query);
  const elem_t* k_base = operand_row<const elem_t>(p.k, b, kv_head, 0);
  const elem_t* v_base = operand_row<const elem_t>(p.v, b, kv_head, 0);

  // Tiles start at multiples of kTile (a multiple of 4), so key quads of the
  // dropout rule never straddle a tile.
  for (long long tile_start = key_lo / kTile * kTile; tile_start < key_hi; tile_start += kTile) {
    __syncthreads();
    load_tile<FJ_HEAD_DIM_QK>(k_tile, k_base, p.k.stride_seq, tile_start, key_hi, p.head_dim_qk);
    load_tile<FJ_HEAD_DIM_V>(v_tile, v_base, p.v.stride_seq, tile_start, key_hi, p.head_dim_v);
    __syncthreads();

    // S = q K^T for the tile, then the logits.
    acc_t score[kTile];
    acc_t tile_max = negative_infinity<acc_t>();
#pragma unroll
    for (int jj = 0; jj < kTile; ++jj) {
      const acc_t dot = dot_with_tile_row<kSliceQk, FJ_HEAD_DIM_QK>(q, k_tile + jj * FJ_HEAD_DIM_QK, lane);
      const long long j = tile_start + jj;
      acc_t unused_tanh;
      score[jj] = (row_valid && j >= key_lo && j < key_hi) ? logit(p, dot, b, h, i, j, &unused_tanh)
                                                          : negative_infinity<acc_t>();
      tile_max = max(tile_max, score[jj]);
    }
    const acc_t new_max = max(row_max, tile_max);
    if (new_max == negative_infinity<acc_t>()) {  // nothing visible yet, or only NaN scores (max skips NaN)
      bool any_nan = false;
#pragma unroll
      for (int jj = 0; jj < kTile; ++jj) any_nan = any_nan || score[jj] != score[jj];
      if (any_nan) row_sum_exp = score[0] - score[0] + __int_as_float(0x7fc00000);  // NaN: O and LSE become NaN
      continue;
    }

    // Online softmax: rescale what was accumulated, then O += P V.
    const acc_t correction = exp_of(row_max - new_max);
    row_max = new_max;
    row_sum_exp *= correction;
#pragma unroll
    for (int e = 0; e < kSliceV; ++e) o[e] *= correction;
#pragma unroll
    for (int quad = 0; quad < kTile / 4; ++quad) {
#if FJ_DROPOUT
      const Philox4x32 words = dropout_words(dropout_seed_of(p), dropout_offset_of(p), p.dropout_head_base + batch_head, i,
                                             (tile_start >> 2) + quad);
#endif
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int jj = quad * 4 + r;
        acc_t prob = exp_of(score[jj] - new_max);
        row_sum_exp += prob;
#if FJ_DROPOUT
        prob = words.word[r] >= p.dropout_threshold ? prob * static_cast<acc_t>(p.dropout_keep_scale) : acc_t(0);
#endif
        const acc_t* v_row = v_tile + jj * FJ_HEAD_DIM_V;
#pragma unroll
        for (int e = 0; e < kSliceV; ++e) o[e] += prob * v_row[lane + kLanes * e];
      }
    }
  }

  if (!row_valid) return;
  const bool none_visible = row_sum_exp == acc_t(0);  // a NaN sum (NaN score) gives NaN O and LSE
  store_slice(operand_row<elem_t>(p.o, b, h, i), o, none_visible ? acc_t(0) : acc_t(1) / row_sum_exp,
              p.head_dim_v, lane);
  if (lane == 0 && p.lse.data != nullptr) {
    *operand_row<acc_t>(p.lse, b, h, i) =
        none_visible ? negative_infinity<acc_t>() : row_max + log_of(row_sum_exp);
  }
}

#endif  // FJ_FORWARD

#if FJ_BACKWARD_DQ
// dQ for kRows query rows, over the keys they see. Also writes delta =
// rowsum(dO * O) for its rows, which the dK/dV kernel (launched next) reads.
extern "C" __global__ void __launch_bounds__(FJ_THREADS) fj_attention_backward_dq(const KernelParams p) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  constexpr layout::Simt kLayout = layout::simt(kTile, FJ_HEAD_DIM_QK, FJ_HEAD_DIM_V, sizeof(acc_t), false);
  acc_t* k_tile = reinterpret_cast<acc_t*>(shared_bytes + kLayout.streamed_qk);
  acc_t* v_tile = reinterpret_cast<acc_t*>(shared_bytes + kLayout.streamed_v);

  int block, b, h;
  block_coordinates(p.num_query_blocks, p.heads_q, &block, &b, &h);
  const int kv_head = h / p.group_size;
  const int lane = threadIdx.x % kLanes;
  const long long first_query = static_cast<long long>(block) * kRows;
  const long long i = first_query + threadIdx.x / kLanes;
  const bool row_valid = i < p.seqlen_q;
  const long long row = row_valid ? i : 0;
  const long long batch_head = static_cast<long long>(b) * p.heads_q + h;

  acc_t q[kSliceQk], dout[kSliceV], out[kSliceV], dq[kSliceQk];
  load_slice(q, operand_row<const elem_t>(p.q, b, h, row), row_valid, p.head_dim_qk, lane);
  load_slice(dout, operand_row<const elem_t>(p.dout, b, h, row), row_valid, p.head_dim_v, lane);
  load_slice(out, operand_row<const elem_t>(p.o, b, h, row), row_valid, p.head_dim_v, lane);
  acc_t partial = 0;
#pragma unroll
  for (int e = 0; e < kSliceV; ++e) partial += dout[e] * out[e];
  const acc_t delta = row_sum(partial);
  if (row_valid && lane == 0) static_cast<acc_t*>(p.delta)[batch_head * p.seqlen_q + i] = delta;
#pragma unroll
  for (int e = 0; e < kSliceQk; ++e) dq[e] = 0;
  const acc_t lse = row_valid ? *operand_row<const acc_t>(p.lse, b, h, i) : negative_infinity<acc_t>();

  const long long last_query = min(first_query + kRows, static_cast<long long>(p.seqlen_q)) - 1;
  const long long key_lo = key_begin(p, first_query);
  const long long key_hi = key_end(p, last_query);
  const elem_t* k_base = operand_row<const elem_t>(p.k, b, kv_head, 0);
  const elem_t* v_base = operand_row<const elem_t>(p.v, b, kv_head, 0);

  for (long long tile_start = key_lo / kTile * kTile; tile_start < key_hi; tile_start += kTile) {
    __syncthreads();
    load_tile<FJ_HEAD_DIM_QK>(k_tile, k_base, p.k.stride_seq, tile_start, key_hi, p.head_dim_qk);
    load_tile<FJ_HEAD_DIM_V>(v_tile, v_base, p.v.stride_seq, tile_start, key_hi, p.head_dim_v);
    __syncthreads();
#pragma unroll 4
    for (int jj = 0; jj < kTile; ++jj) {
      const long long j = tile_start + jj;
      const acc_t dot = dot_with_tile_row<kSliceQk, FJ_HEAD_DIM_QK>(q, k_tile + jj * FJ_HEAD_DIM_QK, lane);
      // dP = dO V^T, through the dropout mask.
      acc_t dprob = dot_with_tile_row<kSliceV, FJ_HEAD_DIM_V>(dout, v_tile + jj * FJ_HEAD_DIM_V, lane);
      // Every lane takes part in the shuffles above; rows that see no key (lse = -inf) stop here.
      if (j < key_lo || j >= key_hi || lse == negative_infinity<acc_t>()) continue;
      acc_t tanh_value = 0;
      const acc_t x = logit(p, dot, b, h, i, j, &tanh_value);
      if (x == negative_infinity<acc_t>()) continue;
      const acc_t prob = exp_of(x - lse);
#if FJ_DROPOUT
      dprob = dropout_keeps(p, batch_head, i, j) ? dprob * static_cast<acc_t>(p.dropout_keep_scale) : acc_t(0);
#endif
      // dS = P (dP - delta), through softcap's derivative and the scale.
      acc_t dscore = prob * (dprob - delta);
#if FJ_SOFTCAP
      dscore *= acc_t(1) - tanh_value * tanh_value;
#endif
      dscore *= static_cast<acc_t>(p.scale);
      const acc_t* k_row = k_tile + jj * FJ_HEAD_DIM_QK;
#pragma unroll
      for (int e = 0; e < kSliceQk; ++e) dq[e] += dscore * k_row[lane + kLanes * e];
    }
  }
  if (row_valid) store_slice(operand_row<elem_t>(p.dq, b, h, i), dq, acc_t(1), p.head_dim_qk, lane);
}

#endif  // FJ_BACKWARD_DQ

#if FJ_BACKWARD_DKDV
// dK and dV for kRows keys of one kv head, summed over the query heads of its
// group and the queries that see them: no atomics, deterministic.
extern "C" __global__ void __launch_bounds__(FJ_THREADS) fj_attention_backward_dkdv(const KernelParams p) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  constexpr layout::Simt kLayout = layout::simt(kTile, FJ_HEAD_DIM_QK, FJ_HEAD_DIM_V, sizeof(acc_t), true);
  acc_t* q_tile = reinterpret_cast<acc_t*>(shared_bytes + kLayout.streamed_qk);    // [kTile][FJ_HEAD_DIM_QK]
  acc_t* dout_tile = reinterpret_cast<acc_t*>(shared_bytes + kLayout.streamed_v);  // [kTile][FJ_HEAD_DIM_V]
  acc_t* lse_tile = reinterpret_cast<acc_t*>(shared_bytes + kLayout.lse_tile);     // [kTile]
  acc_t* delta_tile = reinterpret_cast<acc_t*>(shared_bytes + kLayout.delta_tile); // [kTile]

  int block, b, kv_head;
  block_coordinates(p.num_key_blocks, p.heads_kv, &block, &b, &kv_head, false);
  const int lane = threadIdx.x % kLanes;
  const long long first_key = static_cast<long long>(block) * kRows;
  const long long j = first_key + threadIdx.x / kLanes;
  const bool key_valid = j < p.seqlen_k;
  const long long key = key_valid ? j : 0;

  acc_t k[kSliceQk], v[kSliceV], dk[kSliceQk], dv[kSliceV];
  load_slice(k, operand_row<const elem_t>(p.k, b, kv_head, key), key_valid, p.head_dim_qk, lane);
  load_slice(v, operand_row<const elem_t>(p.v, b, kv_head, key), key_valid, p.head_dim_v, lane);
#pragma unroll
  for (int e = 0; e < kSliceQk; ++e) dk[e] = 0;
#pragma unroll
  for (int e = 0; e < kSliceV; ++e) dv[e] = 0;

  const long long last_key = min(first_key + kRows, static_cast<long long>(p.seqlen_k)) - 1;
  const long long query_lo = query_begin(p, first_key);
  const long long query_hi = query_end(p, last_key);

  for (int member = 0; member < p.group_size; ++member) {
    const int h = kv_head * p.group_size + member;
    const long long batch_head = static_cast<long long>(b) * p.heads_q + h;
    const elem_t* q_base = operand_row<const elem_t>(p.q, b, h, 0);
    const elem_t* dout_base = operand_row<const elem_t>(p.dout, b, h, 0);
    for (long long tile_start = query_lo / kTile * kTile; tile_start < query_hi; tile_start += kTile) {
      __syncthreads();
      load_tile<FJ_HEAD_DIM_QK>(q_tile, q_base, p.q.stride_seq, tile_start, query_hi, p.head_dim_qk);
      load_tile<FJ_HEAD_DIM_V>(dout_tile, dout_base, p.dout.stride_seq, tile_start, query_hi, p.head_dim_v);
      for (int r = threadIdx.x; r < kTile; r += FJ_THREADS) {
        const long long i = tile_start + r;
        const bool valid = i >= query_lo && i < query_hi;
        lse_tile[r] = valid ? *operand_row<const acc_t>(p.lse, b, h, i) : negative_infinity<acc_t>();
        delta_tile[r] = valid ? static_cast<const acc_t*>(p.delta)[batch_head * p.seqlen_q + i] : acc_t(0);
      }
      __syncthreads();
#pragma unroll 4
      for (int ii = 0; ii < kTile; ++ii) {
        const long long i = tile_start + ii;
        const acc_t dot = dot_with_tile_row<kSliceQk, FJ_HEAD_DIM_QK>(k, q_tile + ii * FJ_HEAD_DIM_QK, lane);
        acc_t dprob = dot_with_tile_row<kSliceV, FJ_HEAD_DIM_V>(v, dout_tile + ii * FJ_HEAD_DIM_V, lane);
        const acc_t lse = lse_tile[ii];
        if (!key_valid || lse == negative_infinity<acc_t>()) continue;
        acc_t tanh_value = 0;
        const acc_t x = logit(p, dot, b, h, i, j, &tanh_value);
        if (x == negative_infinity<acc_t>()) continue;
        const acc_t prob = exp_of(x - lse);
        acc_t kept_prob = prob;
#if FJ_DROPOUT
        const bool keep = dropout_keeps(p, batch_head, i, j);
        const acc_t keep_scale = static_cast<acc_t>(p.dropout_keep_scale);
        kept_prob = keep ? prob * keep_scale : acc_t(0);
        dprob = keep ? dprob * keep_scale : acc_t(0);
#endif
        acc_t dscore = prob * (dprob - delta_tile[ii]);
#if FJ_SOFTCAP
        dscore *= acc_t(1) - tanh_value * tanh_value;
#endif
        dscore *= static_cast<acc_t>(p.scale);
        // dV += P^T dO, dK += dS^T Q.
        const acc_t* dout_row = dout_tile + ii * FJ_HEAD_DIM_V;
        const acc_t* q_row = q_tile + ii * FJ_HEAD_DIM_QK;
#pragma unroll
        for (int e = 0; e < kSliceV; ++e) dv[e] += kept_prob * dout_row[lane + kLanes * e];
#pragma unroll
        for (int e = 0; e < kSliceQk; ++e) dk[e] += dscore * q_row[lane + kLanes * e];
      }
    }
  }
  if (key_valid) {
    store_slice(operand_row<elem_t>(p.dk, b, kv_head, j), dk, acc_t(1), p.head_dim_qk, lane);
    store_slice(operand_row<elem_t>(p.dv, b, kv_head, j), dv, acc_t(1), p.head_dim_v, lane);
  }
}

#endif  // FJ_BACKWARD_DKDV

}  // namespace simt
}  // namespace flashjit
