// The forward's online softmax on C fragments (mma.m16n8k16 and wgmma
// accumulators share the layout, mma_common.cuh), shared by the mma.sync
// kernel (attention_mma.cuh) and the sm_90a kernel (attention_hopper.cuh).
// A thread holds kTiles 16-row tiles, of which rows g and g + 8 (g = lane / 4);
// the four lanes of a quad hold a row's columns between them.
//
// Per tile of keys: logits in the log2 domain (tile_logits), then
// softmax_step: new row maxima, S -> P = exp2(S - max), row sums, and the
// factor for the output accumulated so far (rescale_rows). Dropout scales P
// after the sums, so the sums are those of the undropped probabilities.
#pragma once

namespace flashjit {
namespace mma {

// Row r's maximum or sum of this thread's part of a 16 x kBlockN C tile, as a
// tree of templated levels: a serial chain over the row would leave the warps of
// a scheduler waiting on each step's latency, and a loop over the levels puts the
// partial sums in local memory.
template <bool kSum, int kWidth>
FJ_DEVICE void reduce_level(float (&part)[kBlockN / 8]) {
  if constexpr (kWidth >= 1) {
#pragma unroll
    for (int n = 0; n < kWidth; ++n) part[n] = kSum ? part[n] + part[n + kWidth] : fmaxf(part[n], part[n + kWidth]);
    reduce_level<kSum, kWidth / 2>(part);
  }
}

template <bool kSum>
FJ_DEVICE float row_reduce(const float (&c)[kBlockN / 8][4], int r) {
  constexpr int kParts = kBlockN / 8;
  float part[kParts];
#pragma unroll
  for (int n = 0; n < kParts; ++n) part[n] = kSum ? c[n][2 * r] + c[n][2 * r + 1] : fmaxf(c[n][2 * r], c[n][2 * r + 1]);
  // Fold an odd tail (kParts = 6, 10, 12, 22, ...) into a power of two first.
  constexpr int kPow2 = kParts >= 16 ? 16 : kParts >= 8 ? 8 : kParts >= 4 ? 4 : kParts >= 2 ? 2 : 1;
#pragma unroll
  for (int n = kPow2; n < kParts; ++n) part[n - kPow2] = kSum ? part[n - kPow2] + part[n] : fmaxf(part[n - kPow2], part[n]);
  reduce_level<kSum, kPow2 / 2>(part);
  return part[0];
}

// kFoldScale (sm_90a forward without softcap or additive mask, scale > 0): S
// stays the raw dot product (bounds and boolean masks still give -inf), and
// softmax_step applies scale * log2(e) inside the exponent's fused multiply-add.
constexpr bool kFoldScale = FJ_FOLD_SCALE;
static_assert(!kFoldScale || (FJ_MASK != 2 && !FJ_SOFTCAP), "the scale folds only where the logit is the scaled dot");
// FJ_LAZY_RESCALE (the sm_90a forward without dropout) keeps a row's base (the maximum its probabilities are taken
// against) until the maximum exceeds it by more than this many powers of two, so
// that O is rescaled rarely; P then stays below 2^kRebaseSlack. Exact either
// way: O, the sums and the LSE all use the same base. Not with dropout, whose
// factor 1 / (1 - p) multiplies P (fp16 would overflow as p nears 1).
constexpr float kRebaseSlack = FJ_LAZY_RESCALE ? 8.0f : 0.0f;
static_assert(!FJ_LAZY_RESCALE || !FJ_DROPOUT, "dropout scales P: its base follows the maximum");

// Logits of one S tile in the log2 domain (raw with kFoldScale). Edge tiles
// (not kInterior) take each row's visible keys through the causal/window bounds
// as a column span, -inf elsewhere and in rows past the sequence; kRightOnly: no
// left bound (window_left < 0, so every span starts at column 0: one compare a key).
template <int kTiles, bool kInterior, bool kRightOnly = false>
FJ_DEVICE void tile_logits(float (&s)[kTiles][kBlockN / 8][4], const KernelParams& p, const long long (&rows)[kTiles][2],
                           long long tile_start, int b, int h, int quad, float scale_log2) {
  if constexpr (!kInterior && !kRightOnly && FJ_HAS_WINDOW && !FJ_EDGE_GENERAL) {
    // Causal, or a right bound alone: the spans' right ends cut the tile. (Kernels without
    // bounds keep the general test: their edge tiles, at the sequence's end, are rare.)
    if (p.window_left < 0) {
      tile_logits<kTiles, false, true>(s, p, rows, tile_start, b, h, quad, scale_log2);
      return;
    }
  }
  // Interior tiles of a kernel that folds the scale and has no mask: the raw dot products as they are.
  if constexpr (!(kInterior && kFoldScale && FJ_MASK == 0)) {
#pragma unroll
    for (int m = 0; m < kTiles; ++m) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const long long i = rows[m][r];
        const ColumnSpan<kBlockN> span = key_span<kBlockN>(p, i, tile_start);
#if FJ_MASK == 1
        // The boolean mask's entries of this row along one pointer (the thread's first column,
        // then 8 keys a step): an add or two an entry instead of its whole address. Read only
        // for visible keys of the sequence's rows, as before.
        const long long key_stride = p.mask_stride[3];
        const FJ_MASK_TYPE* entry = mask_element(p, b, h, i, tile_start + quad * 2);
#endif
#pragma unroll
        for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            float& x = s[m][n][2 * r + c];
            const int column = n * 8 + quad * 2 + c;
            float unused_tanh;
            if (kInterior || (kRightOnly ? column < span.last : span.contains(column))) {
#if FJ_MASK == 1
              const bool hidden = entry[c * key_stride] == 0;
              if constexpr (kFoldScale) {
                if (hidden) x = negative_infinity<float>();
              } else {
                x = hidden ? negative_infinity<float>()
                           : logit_log2<false>(p, x, scale_log2, b, h, i, tile_start + column, &unused_tanh);
              }
#else
              if constexpr (!kFoldScale) x = logit_log2(p, x, scale_log2, b, h, i, tile_start + column, &unused_tanh);
#endif
            } else {
              x = negative_infinity<float>();
            }
          }
#if FJ_MASK == 1
          entry += 8 * key_stride;
#endif
        }
#if FJ_MASK == 1
        // The next key tile's entries of this row toward L1 while this one's softmax and the
        // products run (a row's keys of a tile span one or two lines), by one thread of the quad,
        // from the tile's first key and its middle one, for rows and keys that exist.
        if (quad == 0 && i < p.seqlen_q && tile_start + kBlockN < p.seqlen_k) {
          prefetch_l1(entry);  // quad 0's entry: now key tile_start + kBlockN
          if (tile_start + kBlockN + kBlockN / 2 < p.seqlen_k) prefetch_l1(entry + kBlockN / 2 * key_stride);
        }
#endif
      }
    }
  }
}

// Edge tiles with no left bound (causal, or a right bound alone) in kernels whose logits are the
// raw dot products (kFoldScale, no mask): a row's keys from column `limit[r]` of the thread's own
// columns on are hidden. limit[r] is the row's visible keys past the tile's first key less the
// thread's first column (2 * quad), worked out once a work tile by the caller, so that a key's
// test is one compare against an immediate (tile_logits' right-only path finds the same keys
// from the row's span every step).
template <int kTiles>
FJ_DEVICE void right_edge_logits(float (&s)[kTiles][kBlockN / 8][4], const int (&limit)[kTiles][2]) {
  static_assert(kFoldScale && FJ_MASK == 0, "the raw dot products stand where a key is visible");
#pragma unroll
  for (int m = 0; m < kTiles; ++m) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
      for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          if (n * 8 + c >= limit[m][r]) s[m][n][2 * r + c] = negative_infinity<float>();
        }
      }
    }
  }
}

// 2^x from a polynomial on the FMA units, for the share of P that FJ_EXP_POLY moves off the
// MUFU (the special-function unit, 16 results a clock an SM: at head dim 64 a step's exps take
// it as long as the step's products take the tensor cores). x is rounded to an integer n by the
// 1.5 * 2^23 shift (its low bits then hold n), 2^(x - n) on [-1/2, 1/2] is a cubic fitted for
// relative error (7.5e-5 at most, below the rounding of P to bfloat16 or float16 for the
// product), and 2^n is put together in the exponent field. x is clamped below at -127, where
// 2^n is +0, so that -inf (a masked logit) gives exactly 0; max.NaN keeps a NaN a NaN, as the
// MUFU does. x never exceeds kRebaseSlack (8) here, so n + 127 stays a valid exponent.
FJ_DEVICE float poly_exp2(float x) {
  float clamped;
  asm("max.NaN.f32 %0, %1, %2;\n" : "=f"(clamped) : "f"(x), "f"(-127.0f));
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23
  const float shifted = __fadd_rn(clamped, kShift);
  const float whole = __fadd_rn(shifted, -kShift);
  const float frac = __fadd_rn(clamped, -whole);
  const float poly = fmaf(fmaf(fmaf(0.055171702f, frac, 0.24261120f), frac, 0.69326097f), frac, 0.99992806f);
  // (n mod 2^9) << 23 from the shifted value's low bits, plus 127 << 23: 2^n for n in -127 .. 8.
  const float power = __int_as_float(__float_as_int(shifted) * (1 << 23) + (127 << 23));
  return poly * power;
}

// Whether 8-column group n of a P tile takes poly_exp2: FJ_EXP_POLY of every 16 groups, spread
// evenly (FLASHJIT_CUDA_TILES "poly=k"; 0, the default, none).
template <int kN>
constexpr bool kPolyGroup = FJ_EXP_POLY > 0 && (kN + 1) * FJ_EXP_POLY / 16 != kN * FJ_EXP_POLY / 16;

template <int kN, int kLast>
FJ_DEVICE void exp2_groups(float (&s)[kBlockN / 8][4], const float (&base)[2], float scale_log2) {
  if constexpr (kN < kLast) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float x = kFoldScale ? fmaf(s[kN][e], scale_log2, -base[e / 2]) : s[kN][e] - base[e / 2];
      s[kN][e] = kPolyGroup<kN> ? poly_exp2(x) : fast_exp2(x);
    }
    exp2_groups<kN + 1, kLast>(s, base, scale_log2);
  }
}

// One online-softmax step: the row bases take this tile's logits (a base moves
// to the new maximum only past kRebaseSlack), S becomes P = exp2(S - base), the
// row sums are rescaled and extended, and scale_old receives the factor that
// rebases the output accumulated so far (1 where no base moved). Returns whether
// any of this thread's bases moved.
template <int kTiles>
FJ_DEVICE bool softmax_step(float (&s)[kTiles][kBlockN / 8][4], float (&row_max)[kTiles][2],
                            float (&row_sum)[kTiles][2], float (&scale_old)[kTiles][2], float scale_log2) {
  bool moved = false;
#pragma unroll
  for (int m = 0; m < kTiles; ++m) {
    float base[2], old_max[2];
    bool rebase[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tmax = row_reduce<false>(s[m], r);
      tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
      tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
      if constexpr (kFoldScale) tmax *= scale_log2;  // scale > 0: the maximum of the scaled logits
      old_max[r] = row_max[m][r];
      rebase[r] = tmax > old_max[r] + kRebaseSlack;
      moved = moved || rebase[r];
      const float new_max = rebase[r] ? tmax : old_max[r];
      // A row with nothing visible yet keeps max -inf; subtract 0 instead so exp2 gives 0, not NaN.
      base[r] = new_max == negative_infinity<float>() ? 0.0f : new_max;
      row_max[m][r] = new_max;
    }
    // The factors that rebase the rows' sums and O, 1 where no base moved: their exps only in the
    // steps where some row of the warp moved (with the lazy rescale, few after the first).
    scale_old[m][0] = scale_old[m][1] = 1.0f;
    if (__any_sync(0xffffffffu, rebase[0] || rebase[1])) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (rebase[r]) scale_old[m][r] = fast_exp2(old_max[r] - base[r]);
      }
    }
    exp2_groups<0, kBlockN / 8>(s[m], base, scale_log2);
#pragma unroll
    for (int r = 0; r < 2; ++r) row_sum[m][r] = row_sum[m][r] * scale_old[m][r] + row_reduce<true>(s[m], r);
  }
  return moved;
}

// Rows of C fragments times per-row factors (rows g and g + 8 of each tile).
template <int kTiles, int kN>
FJ_DEVICE void rescale_rows(float (&c)[kTiles][kN][4], const float (&factor)[kTiles][2]) {
#pragma unroll
  for (int m = 0; m < kTiles; ++m) {
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      c[m][n][0] *= factor[m][0];
      c[m][n][1] *= factor[m][0];
      c[m][n][2] *= factor[m][1];
      c[m][n][3] *= factor[m][1];
    }
  }
}

#if FJ_DROPOUT
// P of one tile after dropout: each kept element scaled by 1 / (1 - p), the
// others 0, by the shared Philox rule.
template <int kTiles>
FJ_DEVICE void apply_dropout(float (&s)[kTiles][kBlockN / 8][4], const KernelParams& p, long long batch_head,
                             const long long (&rows)[kTiles][2], long long tile_start, int quad) {
#pragma unroll
  for (int m = 0; m < kTiles; ++m) {
#pragma unroll
    for (int n = 0; n < kBlockN / 8; ++n) {
      float factor[4];
      dropout_factors(factor, p, batch_head, rows[m], tile_start + n * 8 + quad * 2);
#pragma unroll
      for (int e = 0; e < 4; ++e) s[m][n][e] *= factor[e];
    }
  }
}
#endif

// Per row: the factor that normalises O (1 / rowsum, 0 for a row with no
// visible key), and LSE = ln(sum exp) = (max + log2(sum)) / log2(e), or -inf,
// written for rows of the sequence. A NaN score leaves the sum NaN: O and LSE
// of that row come out NaN.
template <int kTiles>
FJ_DEVICE void finish_rows(const KernelParams& p, const float (&row_max)[kTiles][2], const float (&row_sum)[kTiles][2],
                           const long long (&rows)[kTiles][2], int b, int h, int quad, float (&inverse)[kTiles][2]) {
#pragma unroll
  for (int m = 0; m < kTiles; ++m) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float total = row_sum[m][r];
      total += __shfl_xor_sync(0xffffffffu, total, 1);
      total += __shfl_xor_sync(0xffffffffu, total, 2);
      // No visible key: O = 0, LSE = -inf. A NaN score makes the sum NaN, and O and LSE NaN.
      const bool none_visible = total == 0.0f;
      inverse[m][r] = none_visible ? 0.0f : 1.0f / total;
      const long long i = rows[m][r];
      if (quad == 0 && i < p.seqlen_q && p.lse.data != nullptr) {
        *operand_row<float>(p.lse, b, h, i) =
            none_visible ? negative_infinity<float>() : (row_max[m][r] + log2f(total)) / kLog2e;
      }
    }
  }
}

// O /= rowsum into the output, and LSE (finish_rows); rows with no visible key
// get O = 0 and LSE = -inf.
template <int kTiles>
FJ_DEVICE void write_output(const KernelParams& p, const float (&o)[kTiles][kDimV / 8][4],
                            const float (&row_max)[kTiles][2], const float (&row_sum)[kTiles][2],
                            const long long (&rows)[kTiles][2], int b, int h, int quad) {
  float inverse[kTiles][2];
  finish_rows(p, row_max, row_sum, rows, b, h, quad, inverse);
#pragma unroll
  for (int m = 0; m < kTiles; ++m) store_rows<kDimV>(p.o, b, h, rows[m], p.seqlen_q, p.head_dim_v, o[m], quad, inverse[m]);
}

#if FJ_SPLIT
// write_output for a split forward: split `split`'s normalised rows and LSE as
// floats into the partials (KernelParams::split_o, split_lse) for combine.cuh.
template <int kTiles>
FJ_DEVICE void write_split_output(const KernelParams& p, const float (&o)[kTiles][kDimV / 8][4],
                                  const float (&row_max)[kTiles][2], const float (&row_sum)[kTiles][2],
                                  const long long (&rows)[kTiles][2], int b, int h, int quad, int split) {
  const long long all_rows = static_cast<long long>(p.batch) * p.heads_q * p.seqlen_q;
  const long long first_row =
      static_cast<long long>(split) * all_rows + (static_cast<long long>(b) * p.heads_q + h) * p.seqlen_q;
#pragma unroll
  for (int m = 0; m < kTiles; ++m) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float total = row_sum[m][r];
      total += __shfl_xor_sync(0xffffffffu, total, 1);
      total += __shfl_xor_sync(0xffffffffu, total, 2);
      const long long i = rows[m][r];
      if (i >= p.seqlen_q) continue;
      const bool none_visible = total == 0.0f;  // NaN stays NaN, as in finish_rows
      const float inverse = none_visible ? 0.0f : 1.0f / total;
      float* out_row = p.split_o + (first_row + i) * p.head_dim_v;
#pragma unroll
      for (int n = 0; n < kDimV / 8; ++n) {
        const int d = n * 8 + quad * 2;
        if (d < p.head_dim_v) out_row[d] = o[m][n][2 * r] * inverse;
        if (d + 1 < p.head_dim_v) out_row[d + 1] = o[m][n][2 * r + 1] * inverse;
      }
      if (quad == 0) {
        p.split_lse[first_row + i] =
            none_visible ? negative_infinity<float>() : (row_max[m][r] + log2f(total)) / kLog2e;
      }
    }
  }
}
#endif

// The rows' results: the output and LSE, or (FJ_SPLIT) split `split`'s partials.
template <int kTiles>
FJ_DEVICE void write_result(const KernelParams& p, const float (&o)[kTiles][kDimV / 8][4],
                            const float (&row_max)[kTiles][2], const float (&row_sum)[kTiles][2],
                            const long long (&rows)[kTiles][2], int b, int h, int quad, int split) {
#if FJ_SPLIT
  write_split_output(p, o, row_max, row_sum, rows, b, h, quad, split);
#else
  (void)split;
  write_output(p, o, row_max, row_sum, rows, b, h, quad);
#endif
}

}  // namespace mma
}  // namespace flashjit
