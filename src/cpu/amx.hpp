// bfloat16 matrix products on AMX tiles (the `amx` variant of the CPU kernels:
// FJ_CPU_AMX). A tile register holds 16 rows of 64 bytes; TDPBF16PS adds to a
// 16 x 16 float tile C the products of a 16 x 32 bfloat16 tile A and a
// 32 x 16 bfloat16 tile B that is stored pairwise ("VNNI": row i of B's tile holds
// B[2i][n], B[2i + 1][n] for n = 0..15), accumulating in float32.
//
// The `avx512bf16` variant (FJ_CPU_AMX with FJ_CPU_AMX_TILES 0: processors with
// AVX-512-BF16 and no AMX, such as AMD's Zen 4) runs the same kernels on the same
// layouts, each tile product as VDPBF16PS on vectors: a pair of A's row, broadcast,
// times a pair row of B (16 columns), into a row of C held in a register.
//
// The forward packs K and V once per call into these pair layouts, a block of
// kBlockK keys at a time (PackedKv), so that every query block and every query
// head of a GQA group reads them as they are:
//   K block: [depth32 / 2][kBlockK][2]  (pairs of head-dim columns) for S = Q K^T
//   V block: [kBlockK / 2][ld_v][2]     (pairs of key rows)         for O += P V
// with zeros past the head dims and past the sequence's last key.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu/softmax512.hpp"
#include "cpu/tile.hpp"

// GCC 12 reports the undefined pass-through operand of its own AVX-512 intrinsics
// (_mm512_max_ps and others) as maybe uninitialized where they inline here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace flashjit::cpu::FJ_CPU_ISA {

static_assert(kBlockK == 64, "the AMX kernels take key blocks of 64");

// The tile configuration every AMX kernel here uses: eight tiles of 16 rows x 64
// bytes (C: 0-3, A: 4-5, B: 6-7). Per thread; loaded for each task, released after.
#if FJ_CPU_AMX_TILES
class AmxTiles {
 public:
  AmxTiles() {
    struct alignas(64) Config {
      uint8_t palette = 1, start_row = 0, reserved[14] = {};
      uint16_t bytes_per_row[16] = {};
      uint8_t rows[16] = {};
    } config;
    for (int t = 0; t < 8; ++t) {
      config.bytes_per_row[t] = 64;
      config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
  }
  ~AmxTiles() { _tile_release(); }
  AmxTiles(const AmxTiles&) = delete;
  AmxTiles& operator=(const AmxTiles&) = delete;
};
#else
class AmxTiles {  // vectors need no tile state
 public:
  AmxTiles() {}  // user-provided: a held AmxTiles is a scope, as with tiles
  ~AmxTiles() {}
  AmxTiles(const AmxTiles&) = delete;
  AmxTiles& operator=(const AmxTiles&) = delete;
};
#endif

inline int64_t amx_depth(int64_t head_dim) { return round_up(head_dim, 32); }

// Problems the AMX kernels take, forward and backward alike (the backward's S must be the
// forward's): bfloat16 of at least 16 queries; decoding keeps the row-by-row products, which
// read K and V once without packing them.
inline bool amx_applies(const AttentionProblem& p) { return p.seqlen_q >= 16; }

// C (+)= A B over depth / 32 steps for R row tiles x N column tiles (R, N in 1..2).
// a: the first row tile's first element; the second row tile starts a_rows later.
// b: pair-rows of the first column tile; the second starts b_cols later; each step
// of 32 advances a by 32 elements and b by b_step elements. c: float rows of ldc.
#if FJ_CPU_AMX_TILES
template <int R, int N>
inline void amx_tile_product(int64_t steps, const uint16_t* a, int64_t lda, int64_t a_rows, const uint16_t* b,
                             int64_t ldb, int64_t b_cols, int64_t b_step, float* c, int64_t ldc, bool accumulate) {
  const int64_t a_stride = lda * 2, b_stride = ldb * 2, c_stride = ldc * 4;
  float* c1 = c + 16 * ldc;
  if (accumulate) {
    _tile_loadd(0, c, c_stride);
    if constexpr (N == 2) _tile_loadd(1, c + 16, c_stride);
    if constexpr (R == 2) _tile_loadd(2, c1, c_stride);
    if constexpr (R == 2 && N == 2) _tile_loadd(3, c1 + 16, c_stride);
  } else {
    _tile_zero(0);
    if constexpr (N == 2) _tile_zero(1);
    if constexpr (R == 2) _tile_zero(2);
    if constexpr (R == 2 && N == 2) _tile_zero(3);
  }
  for (int64_t k = 0; k < steps; ++k) {
    const uint16_t* ak = a + k * 32;
    const uint16_t* bk = b + k * b_step;
    _tile_loadd(4, ak, a_stride);
    _tile_loadd(6, bk, b_stride);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (N == 2) {
      _tile_loadd(7, bk + b_cols, b_stride);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (R == 2) {
      _tile_loadd(5, ak + a_rows, a_stride);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (N == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, c_stride);
  if constexpr (N == 2) _tile_stored(1, c + 16, c_stride);
  if constexpr (R == 2) _tile_stored(2, c1, c_stride);
  if constexpr (R == 2 && N == 2) _tile_stored(3, c1 + 16, c_stride);
}
#else
// Eight rows of C (+)= A B for N column tiles, on VDPBF16PS: per pair of depth, N pair rows
// of B, and each row's pair of A broadcast (16 accumulators at N = 2).
template <int N>
inline void bf16_vector_rows(int64_t steps, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb,
                             int64_t b_cols, int64_t b_step, float* c, int64_t ldc, bool accumulate) {
  constexpr int kRows = 8;
  __m512 acc[kRows][N];
  for (int r = 0; r < kRows; ++r) {
    for (int n = 0; n < N; ++n) acc[r][n] = accumulate ? _mm512_loadu_ps(c + r * ldc + n * 16) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < steps; ++k) {
    const uint16_t* ak = a + k * 32;
    const uint16_t* bk = b + k * b_step;
    for (int pair = 0; pair < 16; ++pair) {
      __m512bh row[N];
      for (int n = 0; n < N; ++n) row[n] = (__m512bh)_mm512_loadu_si512(bk + pair * ldb + n * b_cols);
      for (int r = 0; r < kRows; ++r) {
        int32_t bits;
        std::memcpy(&bits, ak + r * lda + 2 * pair, sizeof(bits));
        const __m512bh x = (__m512bh)_mm512_set1_epi32(bits);
        for (int n = 0; n < N; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], x, row[n]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int n = 0; n < N; ++n) _mm512_storeu_ps(c + r * ldc + n * 16, acc[r][n]);
  }
}

// amx_tile_product's contract on vectors: R row tiles of 16 rows, 8 rows at a time.
template <int R, int N>
inline void amx_tile_product(int64_t steps, const uint16_t* a, int64_t lda, int64_t a_rows, const uint16_t* b,
                             int64_t ldb, int64_t b_cols, int64_t b_step, float* c, int64_t ldc, bool accumulate) {
  for (int tile = 0; tile < R; ++tile) {
    for (int half = 0; half < 2; ++half) {
      bf16_vector_rows<N>(steps, a + tile * a_rows + half * 8 * lda, lda, b, ldb, b_cols, b_step,
                          c + (tile * 16 + half * 8) * ldc, ldc, accumulate);
    }
  }
}
#endif

// C[rows16 x 16 col_tiles] (+)= A[rows16 x depth] B, A row-major bfloat16 (lda
// elements a row), B in pair rows of ldb elements (2 per column), 16 columns a
// tile; rows16 a multiple of 16, depth of 32. In pieces of up to 2 x 2 tiles, so that
// a caller can issue them one at a time between other work (the tile unit then runs
// beside the vector units).
struct AmxProduct {
  int64_t rows16 = 0, col_tiles = 0, depth = 0;
  const uint16_t* a = nullptr;
  int64_t lda = 0;
  const uint16_t* b = nullptr;
  int64_t ldb = 0;
  float* c = nullptr;
  int64_t ldc = 0;
  bool accumulate = false;

  int64_t pieces() const { return (rows16 + 31) / 32 * ((col_tiles + 1) / 2); }
  void piece(int64_t i) const {
    const int64_t col_pairs = (col_tiles + 1) / 2;
    const int64_t m = i / col_pairs * 32, n = i % col_pairs * 2;
    const int64_t steps = depth / 32, b_step = 16 * ldb;
    const bool two_rows = m + 32 <= rows16, two_cols = n + 2 <= col_tiles;
    const uint16_t* am = a + m * lda;
    const uint16_t* bn = b + n * 32;
    float* cmn = c + m * ldc + n * 16;
    if (two_rows && two_cols) {
      amx_tile_product<2, 2>(steps, am, lda, 16 * lda, bn, ldb, 32, b_step, cmn, ldc, accumulate);
    } else if (two_rows) {
      amx_tile_product<2, 1>(steps, am, lda, 16 * lda, bn, ldb, 32, b_step, cmn, ldc, accumulate);
    } else if (two_cols) {
      amx_tile_product<1, 2>(steps, am, lda, 16 * lda, bn, ldb, 32, b_step, cmn, ldc, accumulate);
    } else {
      amx_tile_product<1, 1>(steps, am, lda, 16 * lda, bn, ldb, 32, b_step, cmn, ldc, accumulate);
    }
  }
  void all() const {
    for (int64_t i = 0; i < pieces(); ++i) piece(i);
  }
};

inline void amx_product(int64_t rows16, int64_t col_tiles, int64_t depth, const uint16_t* a, int64_t lda,
                        const uint16_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  AmxProduct{rows16, col_tiles, depth, a, lda, b, ldb, c, ldc, accumulate}.all();
}

// dst[r][c] = src row r's bfloat16 bits for c < cols, 0 up to ld; rows up to rows16 zero.
inline void pack_bf16_rows(const BFloat16* src, int64_t stride, int64_t rows, int64_t rows16, int64_t cols,
                           uint16_t* dst, int64_t ld) {
  for (int64_t r = 0; r < rows16; ++r) {
    uint16_t* out = dst + r * ld;
    if (r < rows) {
      std::memcpy(out, src + r * stride, size_t(cols) * 2);
      std::fill(out + cols, out + ld, uint16_t(0));
    } else {
      std::fill(out, out + ld, uint16_t(0));
    }
  }
}

// P as bfloat16 (round to nearest even, NaN kept) from float rows of ld_s: rows
// [0, rows) of cols16 columns, zeros after them up to kBlockK. Rows from `rows` to
// rows16 are left as they are: their products land in O's padding rows, never stored.
inline void pack_probabilities(const float* s, int64_t ld_s, int64_t rows, int64_t cols16, uint16_t* p) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = s + r * ld_s;
    uint16_t* out = p + r * kBlockK;
    int64_t c = 0;
    for (; c + 32 <= cols16; c += 32) {
      const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(in + c + 16), _mm512_loadu_ps(in + c));
      _mm512_storeu_si512(out + c, reinterpret_cast<__m512i>(pair));
    }
    if (c < cols16) {  // 16 left
      const __m256bh half = _mm512_cvtneps_pbh(_mm512_loadu_ps(in + c));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c), reinterpret_cast<__m256i>(half));
      c += 16;
    }
    std::fill(out + c, out + kBlockK, uint16_t(0));
  }
}

// P as bfloat16 rows of kBlockK for the AMX tiles (softmax_visible_block), zeros past ld_k.
struct BfloatRows {
  uint16_t* p;
  void put(int64_t r, int64_t c, __m512 v) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + r * kBlockK + c), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  }
  void end_row(int64_t r, int64_t ld_k) const { std::fill(p + r * kBlockK + ld_k, p + (r + 1) * kBlockK, uint16_t(0)); }
};

// Pairs of columns of up to kBlockK rows (row(n) gives row n's bfloat16 bits): word
// (i, n) of out (depth / 2 x kBlockK words) holds columns 2i and 2i + 1 of row n, zeros
// past `cols` columns and `rows` rows. The B operand of a product over the columns.
template <typename Row>
inline void pack_column_pairs(Row row, int64_t rows, int64_t cols, int64_t depth, uint16_t* out) {
  uint32_t* words = reinterpret_cast<uint32_t*>(out);
  std::fill(words, words + depth / 2 * kBlockK, 0u);
  for (int64_t n = 0; n < rows; ++n) {
    const uint16_t* in = row(n);
    for (int64_t i = 0; 2 * i < cols; ++i) {
      const uint32_t hi = 2 * i + 1 < cols ? in[2 * i + 1] : 0u;
      words[i * kBlockK + n] = uint32_t(in[2 * i]) | hi << 16;
    }
  }
}

// Pairs of up to kBlockK rows: pair row i of out (kBlockK / 2 rows of 2 * ld elements)
// holds rows 2i and 2i + 1 column by column, zeros past `cols` and `rows`. The B
// operand of a product over the rows.
template <typename Row>
inline void pack_row_pairs(Row row, int64_t rows, int64_t cols, int64_t ld, uint16_t* out) {
  std::fill(out, out + kBlockK * ld, uint16_t(0));
  for (int64_t n = 0; n < rows; ++n) {
    const uint16_t* in = row(n);
    uint16_t* pair = out + (n / 2) * 2 * ld + n % 2;
    for (int64_t c = 0; c < cols; ++c) pair[2 * c] = in[c];
  }
}

// Float rows [0, rows) of x (ld_x a row) as bfloat16 row pairs over 16 * tiles
// columns (pack_row_pairs' layout, ldp = kBlockK), pair rows up to rows32 / 2 with
// zeros for the rows past `rows`.
inline void pack_float_row_pairs(const float* x, int64_t ld_x, int64_t rows, int64_t rows32, int64_t tiles,
                                 uint16_t* out) {
  // Lane 2j takes element j of the first row, lane 2j + 1 element j of the second.
  alignas(64) static constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                           8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  for (int64_t i = 0; 2 * i < rows32; ++i) {
    uint16_t* pair_row = out + i * 2 * kBlockK;
    for (int64_t t = 0; t < tiles; ++t) {
      const __m512 first = 2 * i < rows ? _mm512_loadu_ps(x + 2 * i * ld_x + 16 * t) : _mm512_setzero_ps();
      const __m512 second = 2 * i + 1 < rows ? _mm512_loadu_ps(x + (2 * i + 1) * ld_x + 16 * t) : _mm512_setzero_ps();
      const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(second, first));
      _mm512_storeu_si512(pair_row + 32 * t, _mm512_permutexvar_epi16(interleave, both));
    }
  }
}

// A copy of pair rows (pack_row_pairs' layout, `count` rows of ld columns) with the
// rows outside [begin, end) zeroed: rows a product must not take (0 * inf is NaN).
inline const uint16_t* rows_between(const uint16_t* pairs, int64_t count, int64_t ld, int64_t begin, int64_t end,
                                    uint16_t* copy) {
  if (begin <= 0 && end >= count) return pairs;
  std::memcpy(copy, pairs, size_t(count * ld) * 2);
  for (int64_t n = 0; n < count; ++n) {
    if (n >= begin && n < end) continue;
    uint16_t* pair_row = copy + (n / 2) * 2 * ld + n % 2;
    for (int64_t c = 0; c < ld; ++c) pair_row[2 * c] = 0;
  }
  return copy;
}

// K and V of a call in the pair layouts above, per (batch, key/value head, block of
// kBlockK keys); the keys of a block are read row by row (a paged cache's pages too).
class PackedKv {
 public:
  // Blocks to pack (pack's tasks): none where `used` is false.
  static int64_t count(const AttentionProblem& p, bool used) {
    return used ? p.batch * p.heads_kv * ((p.seqlen_k + kBlockK - 1) / kBlockK) : 0;
  }
  // Elements the packed blocks take (pack writes every one of them).
  static int64_t elements(const AttentionProblem& p, bool used) {
    return count(p, used) * (amx_depth(p.head_dim_qk) * kBlockK + kBlockK * round_up(p.head_dim_v, 16));
  }
  // data: elements(p, used) elements, 64-byte aligned, kept by the caller.
  PackedKv(const AttentionProblem& p, bool used, uint16_t* data)
      : depth_(amx_depth(p.head_dim_qk)),
        ld_v_(round_up(p.head_dim_v, 16)),
        blocks_((p.seqlen_k + kBlockK - 1) / kBlockK),
        heads_(p.heads_kv),
        tasks_(count(p, used)),
        data_(data) {}

  int64_t tasks() const { return tasks_; }
  int64_t depth() const { return depth_; }
  int64_t ld_v() const { return ld_v_; }
  const uint16_t* k_block(int64_t b, int64_t h_kv, int64_t key0) const { return block(b, h_kv, key0); }
  const uint16_t* v_block(int64_t b, int64_t h_kv, int64_t key0) const {
    return block(b, h_kv, key0) + depth_ * kBlockK;
  }

  // Packs task `index` (batch, head, block in that order).
  void pack(const AttentionProblem& p, int64_t index) {
    const int64_t j = index % blocks_, bh = index / blocks_;
    const int64_t b = bh / heads_, h_kv = bh % heads_;
    uint32_t* k_pairs = reinterpret_cast<uint32_t*>(data_ + size_t(index) * size_t(block_elems()));
    uint16_t* v_pairs = reinterpret_cast<uint16_t*>(k_pairs) + depth_ * kBlockK;
    const int64_t key0 = j * kBlockK, keys = std::min(kBlockK, p.seqlen_k - key0);
    pack_column_pairs(
        [&](int64_t n) { return reinterpret_cast<const uint16_t*>(p.key_row<const BFloat16>(p.k, b, h_kv, key0 + n)); },
        keys, p.head_dim_qk, depth_, reinterpret_cast<uint16_t*>(k_pairs));
    pack_row_pairs(
        [&](int64_t n) { return reinterpret_cast<const uint16_t*>(p.key_row<const BFloat16>(p.v, b, h_kv, key0 + n)); },
        keys, p.head_dim_v, ld_v_, v_pairs);
  }

 private:
  int64_t block_elems() const { return depth_ * kBlockK + kBlockK * ld_v_; }
  const uint16_t* block(int64_t b, int64_t h_kv, int64_t key0) const {
    return data_ + size_t(((b * heads_ + h_kv) * blocks_ + key0 / kBlockK) * block_elems());
  }

  int64_t depth_, ld_v_, blocks_, heads_, tasks_;
  uint16_t* data_;
};

// The backward's operands in the tiles' layouts, packed once per call. Key side, per
// (batch, key/value head, block of kBlockK keys): K and V as pairs of head-dim columns
// (S = Q K^T, dP = dO V^T) and K as pairs of keys (dQ += dS K). Query side, per (batch,
// query head, block of kBlockQ queries): Q and dO rows (A of S and dP), Q^T and dO^T
// (A of dK^T += Q^T dS and dV^T += dO^T P: rows are head-dim columns, kBlockQ queries
// each, zeros past the sequence), and each row's LSE and D = rowsum(dO * O).
class PackedBackward {
 public:
  explicit PackedBackward(const AttentionProblem& p)
      : depth_qk_(amx_depth(p.head_dim_qk)),
        depth_v_(amx_depth(p.head_dim_v)),
        ld_qk_(round_up(p.head_dim_qk, 16)),
        ld_v_(round_up(p.head_dim_v, 16)),
        key_blocks_((p.seqlen_k + kBlockK - 1) / kBlockK),
        query_blocks_((p.seqlen_q + kBlockQ - 1) / kBlockQ),
        heads_q_(p.heads_q),
        heads_kv_(p.heads_kv),
        key_tasks_(p.batch * p.heads_kv * key_blocks_),
        query_tasks_(p.batch * p.heads_q * query_blocks_) {}

  // uint16 elements of the packed operands (the float rows count two each).
  int64_t elements() const { return key_tasks_ * key_elems() + query_tasks_ * query_elems(); }
  void place(uint16_t* data) { data_ = data; }
  int64_t tasks() const { return key_tasks_ + query_tasks_; }
  int64_t depth_qk() const { return depth_qk_; }
  int64_t depth_v() const { return depth_v_; }
  int64_t ld_qk() const { return ld_qk_; }
  int64_t ld_v() const { return ld_v_; }

  const uint16_t* k_columns(int64_t b, int64_t h_kv, int64_t key0) const { return key_block(b, h_kv, key0); }
  const uint16_t* v_columns(int64_t b, int64_t h_kv, int64_t key0) const {
    return key_block(b, h_kv, key0) + depth_qk_ * kBlockK;
  }
  const uint16_t* k_rows(int64_t b, int64_t h_kv, int64_t key0) const {
    return v_columns(b, h_kv, key0) + depth_v_ * kBlockK;
  }
  const uint16_t* q(int64_t b, int64_t h, int64_t query0) const { return query_block(b, h, query0); }
  const uint16_t* dout(int64_t b, int64_t h, int64_t query0) const { return q(b, h, query0) + kBlockQ * depth_qk_; }
  const uint16_t* q_t(int64_t b, int64_t h, int64_t query0) const { return dout(b, h, query0) + kBlockQ * depth_v_; }
  const uint16_t* dout_t(int64_t b, int64_t h, int64_t query0) const { return q_t(b, h, query0) + ld_qk_ * kBlockQ; }
  const float* lse(int64_t b, int64_t h, int64_t query0) const {
    return reinterpret_cast<const float*>(dout_t(b, h, query0) + ld_v_ * kBlockQ);
  }
  const float* delta(int64_t b, int64_t h, int64_t query0) const { return lse(b, h, query0) + kBlockQ; }

  // Packs task `index`: the key blocks first, then the query blocks. row_buffer: head_dim_v floats.
  void pack(const AttentionProblem& p, int64_t index, float* row_buffer) const {
    if (index < key_tasks_) {
      const int64_t j = index % key_blocks_, bh = index / key_blocks_;
      const int64_t b = bh / heads_kv_, h_kv = bh % heads_kv_, key0 = j * kBlockK;
      const int64_t keys = std::min(kBlockK, p.seqlen_k - key0);
      const auto k_row = [&](int64_t n) { return reinterpret_cast<const uint16_t*>(p.k.row<const BFloat16>(b, h_kv, key0 + n)); };
      const auto v_row = [&](int64_t n) { return reinterpret_cast<const uint16_t*>(p.v.row<const BFloat16>(b, h_kv, key0 + n)); };
      uint16_t* out = const_cast<uint16_t*>(key_block(b, h_kv, key0));
      pack_column_pairs(k_row, keys, p.head_dim_qk, depth_qk_, out);
      pack_column_pairs(v_row, keys, p.head_dim_v, depth_v_, out + depth_qk_ * kBlockK);
      pack_row_pairs(k_row, keys, p.head_dim_qk, ld_qk_, out + (depth_qk_ + depth_v_) * kBlockK);
      return;
    }
    index -= key_tasks_;
    const int64_t i = index % query_blocks_, bh = index / query_blocks_;
    const int64_t b = bh / heads_q_, h = bh % heads_q_, query0 = i * kBlockQ;
    const int64_t rows = std::min(kBlockQ, p.seqlen_q - query0);
    uint16_t* q_rows = const_cast<uint16_t*>(q(b, h, query0));
    pack_bf16_rows(p.q.row<const BFloat16>(b, h, query0), p.q.stride_seq, rows, kBlockQ, p.head_dim_qk, q_rows,
                   depth_qk_);
    uint16_t* do_rows = q_rows + kBlockQ * depth_qk_;
    pack_bf16_rows(p.dout.row<const BFloat16>(b, h, query0), p.dout.stride_seq, rows, kBlockQ, p.head_dim_v, do_rows,
                   depth_v_);
    transpose_rows(q_rows, depth_qk_, ld_qk_, const_cast<uint16_t*>(q_t(b, h, query0)));
    transpose_rows(do_rows, depth_v_, ld_v_, const_cast<uint16_t*>(dout_t(b, h, query0)));
    float* lse_out = const_cast<float*>(lse(b, h, query0));
    float* delta_out = lse_out + kBlockQ;
    for (int64_t r = 0; r < kBlockQ; ++r) {
      if (r >= rows) {
        lse_out[r] = kNegInf<float>;
        delta_out[r] = 0.0f;
        continue;
      }
      const int64_t at = b * p.lse_stride_batch + h * p.lse_stride_head + (query0 + r) * p.lse_stride_seq;
      lse_out[r] = p.lse_dtype == FJ_FLOAT64 ? float(static_cast<const double*>(p.lse)[at])
                                             : static_cast<const float*>(p.lse)[at];
      // D as the float32 kernels take it: dO widened, times the stored O.
      pack_rows(p.dout.row<const BFloat16>(b, h, query0 + r), 0, 1, p.head_dim_v, row_buffer,
                round_up(p.head_dim_v, kLanes<float>));
      delta_out[r] = dot_row(row_buffer, p.o.row<const BFloat16>(b, h, query0 + r), p.head_dim_v);
    }
  }

 private:
  // out[c][r] = rows[r][c] for kBlockQ rows of `depth` elements, c < ld.
  static void transpose_rows(const uint16_t* rows, int64_t depth, int64_t ld, uint16_t* out) {
    for (int64_t c = 0; c < ld; ++c) {
      for (int64_t r = 0; r < kBlockQ; ++r) out[c * kBlockQ + r] = rows[r * depth + c];
    }
  }
  int64_t key_elems() const { return (depth_qk_ + depth_v_) * kBlockK + kBlockK * ld_qk_; }
  int64_t query_elems() const { return kBlockQ * (depth_qk_ + depth_v_ + ld_qk_ + ld_v_) + 2 * 2 * kBlockQ; }
  const uint16_t* key_block(int64_t b, int64_t h_kv, int64_t key0) const {
    return data_ + size_t(((b * heads_kv_ + h_kv) * key_blocks_ + key0 / kBlockK) * key_elems());
  }
  const uint16_t* query_block(int64_t b, int64_t h, int64_t query0) const {
    return data_ + size_t(key_tasks_ * key_elems()) +
           size_t(((b * heads_q_ + h) * query_blocks_ + query0 / kBlockQ) * query_elems());
  }

  int64_t depth_qk_, depth_v_, ld_qk_, ld_v_, key_blocks_, query_blocks_, heads_q_, heads_kv_, key_tasks_,
      query_tasks_;
  uint16_t* data_ = nullptr;
};

}  // namespace flashjit::cpu::FJ_CPU_ISA

#pragma GCC diagnostic pop
