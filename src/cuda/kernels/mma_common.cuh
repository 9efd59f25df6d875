// Tensor-core building blocks shared by the mma.sync kernels (forward and
// backward) for float16 and bfloat16: cp.async tile loads into padded shared
// memory, ldmatrix, mma.sync m16n8k16 with float32 accumulators, packing.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .row.col), g = lane / 4, t = lane % 4:
//   A 16x16: a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//   B 16x8:  b0 (k 2t..2t+1, n g)  b1 (k 2t+8.., n g)
//   C 16x8:  c0 c1 (g, 2t..2t+1)  c2 c3 (g+8, 2t..2t+1)
// The C fragments of two adjacent 8-column tiles are the A fragment of a
// 16-deep step (see a_from_c), so P and dS never leave registers.
//
// Macros from the prelude: FJ_ELEM (half_t or bf16_t), FJ_ELEM_IS_BF16,
// FJ_HEAD_DIM_QK, FJ_HEAD_DIM_V, FJ_WARPS, FJ_ROW_TILES, FJ_BLOCK_N, FJ_ALIGNED,
// FJ_MASK, FJ_SOFTCAP, FJ_DROPOUT, FJ_WGMMA (swizzled tiles for wgmma.cuh).
#pragma once

namespace flashjit {
namespace mma {

typedef FJ_ELEM elem_t;
static_assert(sizeof(elem_t) == layout::kHalfBytes, "the tensor-core kernels take 16-bit elements");

constexpr int kWarps = FJ_WARPS;
constexpr int kThreads = kWarps * 32;
constexpr int kRowTiles = FJ_ROW_TILES;  // 16-row tiles a warp owns
constexpr int kBlockM = 16 * kRowTiles * kWarps;
constexpr int kBlockN = FJ_BLOCK_N;
constexpr int kDimQk = FJ_HEAD_DIM_QK;
constexpr int kDimV = FJ_HEAD_DIM_V;
// Row pitch in elements: 16 bytes of padding make the 8 rows an ldmatrix reads
// land in 8 different bank groups.
constexpr int kPitchQk = kDimQk + 8;
constexpr int kPitchV = kDimV + 8;

// This thread's rows of a block whose first row is first_row: its warp owns
// kRowTiles tiles of 16 rows, and of tile m it holds rows group and group + 8.
FJ_DEVICE void fragment_rows(long long first_row, int warp, int group, long long (&rows)[kRowTiles][2]) {
#pragma unroll
  for (int m = 0; m < kRowTiles; ++m) {
    rows[m][0] = first_row + (warp * kRowTiles + m) * 16 + group;
    rows[m][1] = rows[m][0] + 8;
  }
}

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

// 2^x with the hardware approximation (2 ulp; subnormal results flush to 0;
// 2^-inf = 0).
FJ_DEVICE float fast_exp2(float x) {
  float result;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(result) : "f"(x));
  return result;
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

// Element offset of (row, column) in a shared-memory tile of kRows x kDim: rows
// padded by 16 bytes, or (wgmma kernels) the 128-byte swizzle of wgmma.cuh.
#if FJ_WGMMA
constexpr int kSwizzleElems = 128 / static_cast<int>(sizeof(elem_t));  // elements a region row holds
#endif
template <int kRows, int kDim>
FJ_DEVICE int tile_offset(int row, int column) {
#if FJ_WGMMA
  const int unit = (column % kSwizzleElems) / 8;
  return (column / kSwizzleElems) * kRows * kSwizzleElems + row * kSwizzleElems + ((unit ^ (row % 8)) * 8) +
         column % 8;
#else
  return row * (kDim + 8) + column;
#endif
}

// Rows [first, first + kRows) of an operand into a shared-memory tile
// (tile_offset), each row's address from row_pointer(row); rows at or past
// row_end and columns past dim are zero, and their addresses are not formed (an
// empty copy names `any`, an address of the operand, instead).
template <int kRows, int kDim, class RowPointer>
FJ_DEVICE void load_rows(elem_t* tile, long long first, long long row_end, int dim, const elem_t* any,
                         RowPointer row_pointer) {
  constexpr int kChunks = kDim / 8;  // 16-byte chunks per row
  for (int index = threadIdx.x; index < kRows * kChunks; index += kThreads) {
    const int r = index / kChunks;
    const int c = index - r * kChunks;
    const long long row = first + r;
    elem_t* destination = tile + tile_offset<kRows, kDim>(r, c * 8);
#if FJ_ALIGNED
    // Aligned: pointers and strides are multiples of 8 elements, dim a multiple of 8.
    const bool valid = row < row_end && c * 8 < dim;
    cp_async_16(destination, valid ? row_pointer(row) + c * 8 : any, valid ? 16 : 0);
#else
    const elem_t* source = row < row_end ? row_pointer(row) : nullptr;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int d = c * 8 + e;
      destination[e] = (source != nullptr && d < dim) ? source[d] : elem_t{0};
    }
#endif
  }
}

// load_rows of an operand's rows in place: row r at base + r * stride_seq.
template <int kRows, int kDim>
FJ_DEVICE void load_tile(elem_t* tile, const elem_t* base, long long stride_seq, long long first, long long row_end,
                         int dim) {
  load_rows<kRows, kDim>(tile, first, row_end, dim, base, [=](long long row) { return base + row * stride_seq; });
}

// The A fragment of a 16-deep step from the C fragments of two adjacent 8-column tiles.
FJ_DEVICE void a_from_c(unsigned (&a)[4], const float (&left)[4], const float (&right)[4]) {
  a[0] = pack2(left[0], left[1]);
  a[1] = pack2(left[2], left[3]);
  a[2] = pack2(right[0], right[1]);
  a[3] = pack2(right[2], right[3]);
}

// ldmatrix addresses for a warp reading a 16-row tile at `tile` (pitch in elements):
// the A fragment of rows 0..15, columns col..col+15.
FJ_DEVICE const elem_t* a_address(const elem_t* tile, int pitch, int col, int lane) {
  return tile + (lane % 16) * pitch + col + (lane / 16) * 8;
}
// Two B fragments (n tiles n0 and n0 + 8) of B = X^T where X rows are n: X[n0..n0+15][col..col+15].
FJ_DEVICE const elem_t* bt_address(const elem_t* tile, int pitch, int n0, int col, int lane) {
  return tile + (n0 + (lane / 16) * 8 + lane % 8) * pitch + col + ((lane / 8) % 2) * 8;
}
// Two B fragments of B = X where X rows are k: X[k0..k0+15][n0..n0+15], read with .trans.
FJ_DEVICE const elem_t* b_address(const elem_t* tile, int pitch, int k0, int n0, int lane) {
  return tile + (k0 + lane % 8 + ((lane / 8) % 2) * 8) * pitch + n0 + (lane / 16) * 8;
}

// acc[kTiles x 16 x kN] += A B for a warp over kDepth: a_fragment(a, m, kk) gives
// row tile m's A fragment of step kk; B comes from `x_tile` (pitch kPitchX) by
// ldmatrix, as X^T where X's rows are the kN columns (kXRowsAreK false) or as
// X where X's rows are the kDepth steps (true, ldmatrix .trans). Each B
// fragment read from shared memory feeds kTiles mma.
template <int kDepth, int kN, int kPitchX, bool kXRowsAreK, int kTiles, typename AFragment>
FJ_DEVICE void mma_accumulate(float (&acc)[kTiles][kN / 8][4], const AFragment& a_fragment, const elem_t* x_tile,
                              int lane) {
#pragma unroll
  for (int kk = 0; kk < kDepth / 16; ++kk) {
    unsigned a[kTiles][4];
#pragma unroll
    for (int m = 0; m < kTiles; ++m) a_fragment(a[m], m, kk);
#pragma unroll
    for (int n = 0; n < kN / 8; n += 2) {
      unsigned b[4];
      if constexpr (kXRowsAreK) {
        ldmatrix_x4_trans(b, b_address(x_tile, kPitchX, kk * 16, n * 8, lane));
      } else {
        ldmatrix_x4(b, bt_address(x_tile, kPitchX, n * 8, kk * 16, lane));
      }
#pragma unroll
      for (int m = 0; m < kTiles; ++m) {
        mma_16816(acc[m][n], a[m], b[0], b[1]);
        mma_16816(acc[m][n + 1], a[m], b[2], b[3]);
      }
    }
  }
}

// acc[kTiles x 16 x kN] += A X^T for a warp: A's kTiles x 16 rows at `a_tile`
// (pitch kPitchA, kDepth columns), X's kN rows at `x_tile` (pitch kPitchX).
template <int kDepth, int kN, int kPitchA, int kPitchX, int kTiles>
FJ_DEVICE void mma_rows_by_rows(float (&acc)[kTiles][kN / 8][4], const elem_t* a_tile, const elem_t* x_tile,
                                int lane) {
  mma_accumulate<kDepth, kN, kPitchX, false>(
      acc,
      [&](unsigned (&a)[4], int m, int kk) {
        ldmatrix_x4(a, a_address(a_tile + m * 16 * kPitchA, kPitchA, kk * 16, lane));
      },
      x_tile, lane);
}

// acc[kTiles x 16 x kN] += C X for a warp: C (kTiles x 16 x kDepth) in C fragments,
// X's kDepth rows at `x_tile` (pitch kPitchX, kN columns).
template <int kDepth, int kN, int kPitchX, int kTiles>
FJ_DEVICE void mma_fragments_by_rows(float (&acc)[kTiles][kN / 8][4], const float (&c)[kTiles][kDepth / 8][4],
                                     const elem_t* x_tile, int lane) {
  mma_accumulate<kDepth, kN, kPitchX, true>(
      acc, [&](unsigned (&a)[4], int m, int kk) { a_from_c(a, c[m][2 * kk], c[m][2 * kk + 1]); }, x_tile, lane);
}

template <int kN>
FJ_DEVICE void zero(float (&acc)[kN][4]) {
#pragma unroll
  for (int n = 0; n < kN; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
}
template <int kTiles, int kN>
FJ_DEVICE void zero(float (&acc)[kTiles][kN][4]) {
#pragma unroll
  for (int m = 0; m < kTiles; ++m) zero(acc[m]);
}

// The log2-domain logit of element (i, j) that the causal/window bounds let
// through (the callers check those per row, ColumnSpan): with no mask and no
// softcap, one multiply.
template <bool kBoolMask = true>
FJ_DEVICE float logit_log2(const KernelParams& p, float dot, float scale_log2, int b, int h, long long i, long long j,
                           float* tanh_out) {
#if FJ_MASK == 0 && !FJ_SOFTCAP
  return dot * scale_log2;
#else
  return masked_score<float, kBoolMask>(p, dot, b, h, i, j, tanh_out) * kLog2e;
#endif
}

#if FJ_DROPOUT
// Dropout factors (0 or 1 / (1 - p)) of this thread's C-fragment elements of an
// 8-column tile whose rows are queries rows[0], rows[1] and whose columns are
// keys key_pair, key_pair + 1 (key_pair = tile start + 2 * (lane % 4)).
FJ_DEVICE void dropout_factors(float (&factor)[4], const KernelParams& p, long long batch_head,
                               const long long (&rows)[2], long long key_pair) {
  const float keep_scale = static_cast<float>(p.dropout_keep_scale);
  const int word = static_cast<int>(key_pair & 3);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const Philox4x32 words =
        dropout_words(dropout_seed_of(p), dropout_offset_of(p), p.dropout_head_base + batch_head, rows[r],
                      key_pair >> 2);
    factor[2 * r] = words.word[word] >= p.dropout_threshold ? keep_scale : 0.0f;
    factor[2 * r + 1] = words.word[word + 1] >= p.dropout_threshold ? keep_scale : 0.0f;
  }
}
#endif

#if FJ_KV_CACHE
// A KV cache's batch entry b: its own key count (clamped into the cache's rows) and, aligned
// bottom-right, the diagonal that count puts it on.
// A page index from the table, clamped into the pages: a table in device memory (the caller's,
// AttentionProblem::kv_on_device) is not checked by the host, and no index may read past them.
FJ_DEVICE int page_of(const KernelParams& p, int index) { return min(max(index, 0), p.num_pages - 1); }

FJ_DEVICE KernelParams kv_cache_params(const KernelParams& p, int b) {
  KernelParams entry = p;
  const int used = max(0, min(p.seqused_k[b], p.seqlen_k));
  entry.seqlen_k = used;
  if (!p.varlen_top_left) entry.diagonal_shift = p.diagonal_shift + (used - p.seqlen_k);
  return entry;
}
#endif

// A lane's columns n * 8 + 2 * quad, + 1 of row r of an accumulator, times scale, as the element
// type, for n = n0 .. n0 + count - 1: in one 4-byte store each where the row starts 4-byte aligned
// (any caller's strides may make it not), else each on its own.
template <int kDim>
FJ_DEVICE void store_lane_columns(elem_t* row, int dim, const float (&acc)[kDim / 8][4], int r, int quad, int n0,
                                  int count, float scale) {
  const bool pairs = sizeof(elem_t) == 2 && reinterpret_cast<unsigned long long>(row) % 4 == 0;
#pragma unroll
  for (int i = 0; i < count; ++i) {
    const int n = n0 + i;
    const int d = n * 8 + quad * 2;
    if constexpr (sizeof(elem_t) == 2) {
      if (pairs && d + 1 < dim) {
        *reinterpret_cast<unsigned*>(row + d) = pack2(acc[n][2 * r] * scale, acc[n][2 * r + 1] * scale);
        continue;
      }
    }
    if (d < dim) row[d] = from_float<elem_t>(acc[n][2 * r] * scale);
    if (d + 1 < dim) row[d + 1] = from_float<elem_t>(acc[n][2 * r + 1] * scale);
  }
}

// v[i] for a run-time i in 0..3 by selects (an indexed register array would go to local memory).
FJ_DEVICE unsigned select4(const unsigned (&v)[4], int i) { return i == 0 ? v[0] : i == 1 ? v[1] : i == 2 ? v[2] : v[3]; }

// Rows rows[0], rows[1] of a [16 x kDim] accumulator, each times its scale (the forward's
// 1 / rowsum; 1 for a gradient), into an operand (warp-uniform: every lane of the warp calls it).
// 16-bit types, kDim a multiple of 32: the four lanes of a quad, which share a row, pass their
// column pairs round (a 4 x 4 transpose by rotation: in round k lane q sends its pair of column
// block n0 + (q + k) % 4 and receives that of n0 + q from lane (q - k) % 4) so that lane q holds
// the eight columns of block n0 + q and stores them in one 16-byte store, where the row starts
// 16-byte aligned and dim is a multiple of 8; otherwise (or for other types and widths)
// store_lane_columns.
template <int kDim>
FJ_DEVICE void store_rows(const KernelOperand& out, int b, int h, const long long (&rows)[2], long long row_end,
                          int dim, const float (&acc)[kDim / 8][4], int quad, const float (&scale)[2]) {
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
        for (int j = 0; j < 4; ++j) mine[j] = pack2(acc[n0 + j][2 * r] * scale[r], acc[n0 + j][2 * r + 1] * scale[r]);
        unsigned got[4];  // got[k]: round k's value, lane (quad - k) % 4's pair of block n0 + quad
        got[0] = select4(mine, quad);
#pragma unroll
        for (int k = 1; k < 4; ++k) {
          got[k] = __shfl_sync(0xffffffffu, select4(mine, (quad + k) & 3), quad_base | ((quad - k) & 3));
        }
        // Lane s's pair at position s of the chunk: round (quad - s) % 4's.
        const auto from = [&](int s) { return select4(got, (quad - s) & 3); };
        if (chunks) {
          if ((n0 + quad) * 8 < dim) {
            *reinterpret_cast<uint4*>(row + (n0 + quad) * 8) = make_uint4(from(0), from(1), from(2), from(3));
          }
        } else if (row != nullptr) {
          store_lane_columns<kDim>(row, dim, acc, r, quad, n0, 4, scale[r]);
        }
      }
    } else if (row != nullptr) {
      store_lane_columns<kDim>(row, dim, acc, r, quad, 0, kDim / 8, scale[r]);
    }
  }
}

// The same with no scale (a gradient's rows).
template <int kDim>
FJ_DEVICE void store_rows(const KernelOperand& out, int b, int h, const long long (&rows)[2], long long row_end,
                          int dim, const float (&acc)[kDim / 8][4], int quad) {
  const float one[2] = {1.0f, 1.0f};
  store_rows<kDim>(out, b, h, rows, row_end, dim, acc, quad, one);
}

}  // namespace mma
}  // namespace flashjit
