// Forward attention on tensor cores for float16 and bfloat16: mma.sync
// m16n8k16 with float32 accumulators, ldmatrix from shared memory, cp.async
// loads of K overlapped with P V and of V with Q K^T. Each of FJ_WARPS warps
// owns 16 query rows of the block; K and V stream through in tiles of
// FJ_BLOCK_N keys. Head dims are padded to FJ_HEAD_DIM_QK / FJ_HEAD_DIM_V
// (multiples of 16) with zeros in shared memory.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .row.col), g = lane / 4, t = lane % 4:
//   A 16x16: a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//   B 16x8:  b0 (k 2t..2t+1, n g)  b1 (k 2t+8.., n g)
//   C 16x8:  c0 c1 (g, 2t..2t+1)  c2 c3 (g+8, 2t..2t+1)
// The C fragments of two adjacent 8-key tiles of S are the A fragment of P for
// a 16-key step, so P never leaves registers.
//
// Macros from the prelude: FJ_ELEM (half_t or bf16_t), FJ_HEAD_DIM_QK,
// FJ_HEAD_DIM_V, FJ_WARPS, FJ_BLOCK_N, FJ_ALIGNED, FJ_MASK, FJ_MASK_TYPE,
// FJ_HAS_WINDOW, FJ_DROPOUT, FJ_SOFTCAP.
#pragma once

namespace flashjit {
namespace mma {

typedef FJ_ELEM elem_t;

constexpr int kWarps = FJ_WARPS;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = 16 * kWarps;
constexpr int kBlockN = FJ_BLOCK_N;
constexpr int kDimQk = FJ_HEAD_DIM_QK;
constexpr int kDimV = FJ_HEAD_DIM_V;
// Row pitch in elements: 16 bytes of padding make the 8 rows an ldmatrix reads
// land in 8 different bank groups.
constexpr int kPitchQk = kDimQk + 8;
constexpr int kPitchV = kDimV + 8;
constexpr float kLog2e = 1.4426950408889634f;

FJ_DEVICE unsigned shared_address(const void* pointer) {
  return static_cast<unsigned>(__cvta_generic_to_shared(pointer));
}

FJ_DEVICE void cp_async_16(void* shared, const void* global, int source_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared)), "l"(global),
               "r"(source_bytes));
}
FJ_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
FJ_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

FJ_DEVICE void ldmatrix_x4(unsigned (&r)[4], const void* shared) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(shared)));
}
FJ_DEVICE void ldmatrix_x4_trans(unsigned (&r)[4], const void* shared) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(shared)));
}

// C += A B for one m16n8k16 step.
FJ_DEVICE void mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#if FJ_ELEM_IS_BF16
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two floats -> one register of two 16-bit values (lo = first).
FJ_DEVICE unsigned pack2(float lo, float hi) {
  unsigned result;
#if FJ_ELEM_IS_BF16
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(result) : "f"(hi), "f"(lo));
#else
  asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(result) : "f"(hi), "f"(lo));
#endif
  return result;
}

// Rows [first, first + kRows) of an operand into shared memory (pitch kDim + 8);
// rows at or past row_end and columns past dim are zero.
template <int kRows, int kDim>
FJ_DEVICE void load_tile(elem_t* tile, const elem_t* base, long long stride_seq, long long first, long long row_end,
                         int dim) {
  constexpr int kChunks = kDim / 8;  // 16-byte chunks per row
  for (int index = threadIdx.x; index < kRows * kChunks; index += kThreads) {
    const int r = index / kChunks;
    const int c = index - r * kChunks;
    const long long row = first + r;
    elem_t* destination = tile + r * (kDim + 8) + c * 8;
#if FJ_ALIGNED
    // Aligned: pointers and strides are multiples of 8 elements, dim a multiple of 8.
    const bool valid = row < row_end && c * 8 < dim;
    cp_async_16(destination, valid ? base + row * stride_seq + c * 8 : base, valid ? 16 : 0);
#else
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int d = c * 8 + e;
      destination[e] = (row < row_end && d < dim) ? base[row * stride_seq + d] : elem_t{0};
    }
#endif
  }
}

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
      ldmatrix_x4(a, q_warp + (lane % 16) * kPitchQk + kk * 16 + (lane / 16) * 8);
#pragma unroll
      for (int n = 0; n < kBlockN / 8; n += 2) {
        unsigned bk[4];
        ldmatrix_x4(bk, k_tile + (n * 8 + (lane / 16) * 8 + lane % 8) * kPitchQk + kk * 16 + ((lane / 8) % 2) * 8);
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
      Philox4x32 words[2];
      const long long key_quad = (tile_start + n * 8 + quad * 2) >> 2;
      words[0] = dropout_words(p.dropout_seed, p.dropout_offset, batch_head, rows[0], key_quad);
      words[1] = dropout_words(p.dropout_seed, p.dropout_offset, batch_head, rows[1], key_quad);
      const int word = (quad * 2) & 3;
      const float keep_scale = static_cast<float>(p.dropout_keep_scale);
#endif
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float prob = exp2f(s[n][e] - base_max[e / 2]);
        row_sum[e / 2] += prob;
#if FJ_DROPOUT
        prob = words[e / 2].word[word + (e % 2)] >= p.dropout_threshold ? prob * keep_scale : 0.0f;
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
      a[0] = pack2(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int n = 0; n < kDimV / 8; n += 2) {
        unsigned bv[4];
        ldmatrix_x4_trans(bv, v_tile + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kPitchV + n * 8 + (lane / 16) * 8);
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
