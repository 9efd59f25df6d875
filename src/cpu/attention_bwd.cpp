// CPU backward, deterministic without atomics: dQ in tasks over (batch, query
// head, query block) and dK/dV in tasks over (batch, key/value head, key block),
// each recomputing P from the saved log-sum-exp. Each task owns its output
// rows and walks its inputs in a fixed order.
//
//   P  = exp(logits - lse)          dP = dropout(dO V^T)
//   D  = rowsum(dO * O)             dS = P * (dP - D) * softcap' * scale
//   dQ = dS K      dK = dS^T Q      dV = dropout(P)^T dO
#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.hpp"
#include "cpu/kernels.hpp"
#include "cpu/thread_pool.hpp"
#include "cpu/tile.hpp"
#if FJ_CPU_AMX
#include "cpu/amx.hpp"
#endif
#if FJ_CPU_VECTOR_BYTES == 64
#include "cpu/softmax512.hpp"
#endif

namespace flashjit::cpu::FJ_CPU_ISA {
namespace {

// Tile buffers of one task (uninitialised; see thread_scratch).
template <typename Acc>
struct BackwardScratch {
  // Query side: q (ld_qk), dout (ld_v), per-row D and lse.
  Acc *q, *dout, *delta, *lse;
  // Key side: k^T and v^T (ld_k), k rows (ld_qk) for dQ.
  Acc *k_t, *v_t, *k;
  // Tile: p, dp (then ds), dropped p, softcap derivative, transposes.
  Acc *p, *dp, *p_dropped, *softcap_grad, *transposed;
  // Accumulators: dq (ld_qk) or dk (ld_qk) and dv (ld_v).
  Acc *acc_a, *acc_b;
  uint8_t* keep;
  // bfloat16 tiles of the AMX kernels: dS rows, P and dS as row pairs, an edge copy of an operand.
  uint16_t *ds16, *p_pairs, *ds_pairs, *edge;

  void carve(const AttentionProblem& pr, ScratchSlicer& slicer) {
    const int64_t ld_qk = round_up(pr.head_dim_qk, kLanes<Acc>);
    const int64_t ld_v = round_up(pr.head_dim_v, kLanes<Acc>);
    const int64_t ld_k = round_up(kBlockK, kLanes<Acc>);
    const int64_t block = std::max(kBlockQ, kBlockK);
    q = slicer.take<Acc>(kBlockQ * ld_qk);
    dout = slicer.take<Acc>(kBlockQ * ld_v);
    delta = slicer.take<Acc>(kBlockQ);
    lse = slicer.take<Acc>(kBlockQ);
    k_t = slicer.take<Acc>(pr.head_dim_qk * ld_k);
    v_t = slicer.take<Acc>(pr.head_dim_v * ld_k);
    k = slicer.take<Acc>(kBlockK * ld_qk);
    p = slicer.take<Acc>(kBlockQ * ld_k);
    dp = slicer.take<Acc>(kBlockQ * ld_k);
    p_dropped = slicer.take<Acc>(kBlockQ * ld_k);
    softcap_grad = slicer.take<Acc>(kBlockQ * ld_k);
    transposed = slicer.take<Acc>(block * block);
    acc_a = slicer.take<Acc>(block * ld_qk);
    acc_b = slicer.take<Acc>(block * ld_v);
    keep = slicer.take<uint8_t>(kBlockK);
#if FJ_CPU_AMX
    ds16 = slicer.take<uint16_t>(kBlockQ * kBlockK);
    p_pairs = slicer.take<uint16_t>(kBlockQ * kBlockK);
    ds_pairs = slicer.take<uint16_t>(kBlockQ * kBlockK);
    edge = slicer.take<uint16_t>(std::max(kBlockQ, kBlockK) * std::max(ld_qk, ld_v));
#endif
  }
};

// Loads q, dout, D = rowsum(dO * O) and lse for query rows [query0, query0 + rows).
template <typename T, typename Acc>
void load_query_block(const AttentionProblem& p, int64_t b, int64_t h, int64_t query0, int64_t rows,
                      const BackwardScratch<Acc>& w) {
  const int64_t ld_qk = round_up(p.head_dim_qk, kLanes<Acc>);
  const int64_t ld_v = round_up(p.head_dim_v, kLanes<Acc>);
  pack_rows(p.q.row<const T>(b, h, query0), p.q.stride_seq, rows, p.head_dim_qk, w.q, ld_qk);
  pack_rows(p.dout.row<const T>(b, h, query0), p.dout.stride_seq, rows, p.head_dim_v, w.dout, ld_v);
  for (int64_t r = 0; r < rows; ++r) {
    const T* o_row = p.o.row<const T>(b, h, query0 + r);
    const Acc* do_row = w.dout + r * ld_v;
    w.delta[r] = dot_row(do_row, o_row, p.head_dim_v);
    const int64_t index = b * p.lse_stride_batch + h * p.lse_stride_head + (query0 + r) * p.lse_stride_seq;
    w.lse[r] = p.lse_dtype == FJ_FLOAT64 ? Acc(static_cast<const double*>(p.lse)[index])
                                         : Acc(static_cast<const float*>(p.lse)[index]);
  }
}

// Loads k^T and v^T (and k rows when with_k_rows) for keys [key0, key0 + cols).
template <typename T, typename Acc>
void load_key_block(const AttentionProblem& p, int64_t b, int64_t h_kv, int64_t key0, int64_t cols,
                    bool with_k_rows, const BackwardScratch<Acc>& w) {
  const int64_t ld_k = round_up(cols, kLanes<Acc>);
  pack_transposed(p.k.row<const T>(b, h_kv, key0), p.k.stride_seq, cols, p.head_dim_qk, w.k_t, ld_k);
  pack_transposed(p.v.row<const T>(b, h_kv, key0), p.v.stride_seq, cols, p.head_dim_v, w.v_t, ld_k);
  if (with_k_rows) {
    const int64_t ld_qk = round_up(p.head_dim_qk, kLanes<Acc>);
    pack_rows(p.k.row<const T>(b, h_kv, key0), p.k.stride_seq, cols, p.head_dim_qk, w.k, ld_qk);
  }
}

// From logits (w.p) and dP = dO V^T (w.dp) of a tile: w.p = P = exp(logits - lse),
// w.p_dropped = dropout(P) (when dropout is on), w.dp = dS (multiplied by softcap' and
// scale); lse and delta per row of the tile.
template <typename Acc>
void softmax_gradient(const AttentionProblem& p, int64_t b, int64_t h, int64_t query0, int64_t rows, int64_t key0,
                      int64_t cols, int64_t ld_k, const Acc* lse, const Acc* row_delta, const BackwardScratch<Acc>& w) {
  const bool softcap = p.softcap > 0.0;
  const Acc keep_scale = Acc(1.0 / (1.0 - p.dropout_p));
  const Acc scale = Acc(p.scale);
  for (int64_t r = 0; r < rows; ++r) {
    Acc* p_row = w.p + r * ld_k;
    Acc* ds_row = w.dp + r * ld_k;
    if (lse[r] == kNegInf<Acc>) {  // fully masked row: no gradient flows
      std::fill(p_row, p_row + ld_k, Acc(0));
      std::fill(ds_row, ds_row + ld_k, Acc(0));
      if (p.has_dropout()) std::fill(w.p_dropped + r * ld_k, w.p_dropped + (r + 1) * ld_k, Acc(0));
      continue;
    }
    exp_shifted_sum(p_row, ld_k, lse[r]);  // P = exp(logits - lse)
    if (p.has_dropout()) {
      Acc* pd_row = w.p_dropped + r * ld_k;
      dropout_keep_row(p, b, h, query0 + r, key0, cols, w.keep);
      for (int64_t c = 0; c < cols; ++c) {
        const Acc factor = w.keep[c] ? keep_scale : Acc(0);
        pd_row[c] = p_row[c] * factor;
        ds_row[c] *= factor;
      }
      for (int64_t c = cols; c < ld_k; ++c) pd_row[c] = Acc(0);
    }
    // D = rowsum(dO * O) comes from the stored O, rounded to the input dtype. Where
    // the row sees keys of one 64-aligned block only, and this tile holds them all,
    // D = sum_j P_ij dP_ij from the tile is exact to the rounding of this sum (dS of
    // a row that sees one key is exactly 0, as it should be); the dQ and the dK/dV
    // passes then both take it, whatever their tiles' alignment.
    Acc delta = row_delta[r];
    const int64_t first_key = p.key_begin(query0 + r), end_key = p.key_end(query0 + r);
    if (first_key < end_key && first_key / kBlockK == (end_key - 1) / kBlockK && first_key >= key0 &&
        end_key <= key0 + cols) {
      Acc tile_delta = 0, mass = 0;
      for (int64_t c = 0; c < cols; ++c) {
        tile_delta += p_row[c] * ds_row[c];
        mass += p_row[c];
      }
      if (holds_whole_row(mass, cols)) delta = tile_delta;
    }
    if (softcap) {
      const Acc* g_row = w.softcap_grad + r * ld_k;
      for (int64_t c = 0; c < cols; ++c) ds_row[c] = p_row[c] * (ds_row[c] - delta) * g_row[c] * scale;
    } else {
      for (int64_t c = 0; c < cols; ++c) ds_row[c] = p_row[c] * (ds_row[c] - delta) * scale;
    }
    for (int64_t c = cols; c < ld_k; ++c) ds_row[c] = Acc(0);
  }
}

// Reloads the k rows of keys [key0, key0 + cols) (dq_product may have zeroed some).
template <typename T, typename Acc>
void load_key_rows(const AttentionProblem& p, int64_t b, int64_t h_kv, int64_t key0, int64_t cols,
                   const BackwardScratch<Acc>& w) {
  const int64_t ld_qk = round_up(p.head_dim_qk, kLanes<Acc>);
  pack_rows(p.k.row<const T>(b, h_kv, key0), p.k.stride_seq, cols, p.head_dim_qk, w.k, ld_qk);
}

// For the loaded query and key blocks: w.p = P, w.p_dropped = dropout(P) (when
// dropout is on), w.dp = dS (already multiplied by softcap' and scale).
template <typename Acc>
void tile_gradients(const AttentionProblem& p, int64_t b, int64_t h, int64_t query0, int64_t rows,
                    int64_t key0, int64_t cols, const BackwardScratch<Acc>& w) {
  const int64_t ld_k = round_up(cols, kLanes<Acc>);
  const int64_t ld_qk = round_up(p.head_dim_qk, kLanes<Acc>);
  const int64_t ld_v = round_up(p.head_dim_v, kLanes<Acc>);
  const bool softcap = p.softcap > 0.0;

  // S = Q K^T -> logits;  dP = dO V^T
  gemm(rows, ld_k, p.head_dim_qk, w.q, ld_qk, w.k_t, ld_k, w.p, ld_k, false);
  // Rows the forward took as row-by-row dot products, in its order (first_few_row; k rows loaded).
  const int64_t few = std::max(query0, first_few_row(p.seqlen_q)) - query0;
  if (few < rows) gemm_abt_rows(rows - few, cols, ld_qk, w.q + few * ld_qk, ld_qk, w.k, ld_qk, w.p + few * ld_k, ld_k);
  gemm(rows, ld_k, p.head_dim_v, w.dout, ld_v, w.v_t, ld_k, w.dp, ld_k, false);
#if FJ_CPU_VECTOR_BYTES == 64
  // Blocks every row sees whole take P and dS in one fused pass (softmax512.hpp).
  if constexpr (std::is_same_v<Acc, float>) {
    if (fused_block(p, query0, rows, key0, cols) && gradient_visible_block(p, query0, rows, key0, cols, w.p, w.dp, ld_k, w.lse, w.delta)) return;
  }
#endif
  compute_logits(p, b, h, query0, rows, key0, cols, ld_k, w.p,
                 softcap ? w.softcap_grad : static_cast<Acc*>(nullptr));
  softmax_gradient(p, b, h, query0, rows, key0, cols, ld_k, w.lse, w.delta, w);
}

// dQ += dS K for a tile (w.dp, w.k loaded with its keys' rows), into dq (rows of ld_qk). Keys
// of the block before the query block's first visible key take no part (0 * inf is NaN).
template <typename Acc>
void dq_product(const AttentionProblem& p, int64_t query0, int64_t rows, int64_t key0, int64_t cols,
                const BackwardScratch<Acc>& w, Acc* dq) {
  const int64_t ld_qk = round_up(p.head_dim_qk, kLanes<Acc>);
  const int64_t skip = std::min(cols, p.key_begin(query0) - key0);
  if (skip > 0) std::fill(w.k, w.k + skip * ld_qk, Acc(0));
  gemm(rows, ld_qk, cols, w.dp, round_up(cols, kLanes<Acc>), w.k, ld_qk, dq, ld_qk, true);
}

template <typename T, typename Acc>
void dq_block(const AttentionProblem& p, int64_t b, int64_t h, int64_t query0,
              const BackwardScratch<Acc>& w) {
  const int64_t rows = std::min(kBlockQ, p.seqlen_q - query0);
  const int64_t h_kv = h / p.group_size();
  const int64_t ld_qk = round_up(p.head_dim_qk, kLanes<Acc>);
  load_query_block<T>(p, b, h, query0, rows, w);
  std::fill(w.acc_a, w.acc_a + rows * ld_qk, Acc(0));
  const int64_t key_begin = p.key_begin(query0);
  const int64_t key_end = p.key_end(query0 + rows - 1);
  // Key blocks aligned to kBlockK, as dkdv_block's and head_backward's: each element of dQ sums
  // the same blocks in the same order in either schedule.
  for (int64_t key0 = key_begin / kBlockK * kBlockK; key0 < key_end; key0 += kBlockK) {
    const int64_t cols = std::min(kBlockK, key_end - key0);
    load_key_block<T>(p, b, h_kv, key0, cols, true, w);
    tile_gradients(p, b, h, query0, rows, key0, cols, w);
    dq_product(p, query0, rows, key0, cols, w, w.acc_a);
  }
  for (int64_t r = 0; r < rows; ++r)
    store_row(w.acc_a + r * ld_qk, p.head_dim_qk, Acc(1), p.dq.row<T>(b, h, query0 + r));
}

// The query blocks whose gradients a key block (keys [key0, key0 + cols)) takes: for each query
// head of its group (member g, head h), dq_block's query blocks (aligned to kBlockQ, whole) from
// the first with a row that sees one of the keys, so that each row's S, P and dS come from the
// same tile computation in either schedule (a row's place in a tile picks its code path, gemm's
// row strips, which a compiler may contract into FMAs differently). visit(g, h, query0, rows,
// begin, end): the rows that see any of the keys are [begin, end) of the block's (unclamped).
template <typename Visit>
void for_each_query_block(const AttentionProblem& p, int64_t h_kv, int64_t key0, int64_t cols, Visit visit) {
  const int64_t query_begin = p.query_begin(key0);
  const int64_t query_end = p.query_end(key0 + cols - 1);
  const int64_t group = p.group_size();
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t query0 = query_begin / kBlockQ * kBlockQ; query0 < query_end; query0 += kBlockQ) {
      visit(g, h_kv * group + g, query0, std::min(kBlockQ, p.seqlen_q - query0), query_begin - query0,
            query_end - query0);
    }
  }
}

// dK and dV of one key block over the query blocks of every query head of its group; with dq
// (group x seqlen_q rows of ld_qk, head_backward's) also dQ += dS K of each tile into it.
template <typename T, typename Acc>
void dkdv_block(const AttentionProblem& p, int64_t b, int64_t h_kv, int64_t key0, const BackwardScratch<Acc>& w,
                Acc* dq = nullptr) {
  const int64_t cols = std::min(kBlockK, p.seqlen_k - key0);
  const int64_t ld_k = round_up(cols, kLanes<Acc>);
  const int64_t ld_qk = round_up(p.head_dim_qk, kLanes<Acc>);
  const int64_t ld_v = round_up(p.head_dim_v, kLanes<Acc>);
  load_key_block<T>(p, b, h_kv, key0, cols, dq != nullptr || first_few_row(p.seqlen_q) < p.seqlen_q, w);
  std::fill(w.acc_a, w.acc_a + cols * ld_qk, Acc(0));
  std::fill(w.acc_b, w.acc_b + cols * ld_v, Acc(0));
  for_each_query_block(p, h_kv, key0, cols, [&](int64_t g, int64_t h, int64_t query0, int64_t rows, int64_t begin,
                                                int64_t end) {
    load_query_block<T>(p, b, h, query0, rows, w);
    tile_gradients(p, b, h, query0, rows, key0, cols, w);
    // Rows of the block that see none of these keys take no part in dK and dV.
    const int64_t first = std::max<int64_t>(0, begin);
    const int64_t seen = std::min(rows, end) - first;
    const Acc* p_used = p.has_dropout() ? w.p_dropped : w.p;
    // dV += dropout(P)^T dO
    transpose(p_used + first * ld_k, ld_k, seen, cols, w.transposed, seen);
    gemm(cols, ld_v, seen, w.transposed, seen, w.dout + first * ld_v, ld_v, w.acc_b, ld_v, true);
    // dK += dS^T Q
    transpose(w.dp + first * ld_k, ld_k, seen, cols, w.transposed, seen);
    gemm(cols, ld_qk, seen, w.transposed, seen, w.q + first * ld_qk, ld_qk, w.acc_a, ld_qk, true);
    if (dq != nullptr) {
      // Last: dq_product zeroes the rows of w.k this query block does not see.
      dq_product(p, query0, rows, key0, cols, w, dq + (g * p.seqlen_q + query0) * ld_qk);
      if (p.key_begin(query0) > key0) load_key_rows<T>(p, b, h_kv, key0, cols, w);
    }
  });
  for (int64_t c = 0; c < cols; ++c) {
    store_row(w.acc_a + c * ld_qk, p.head_dim_qk, Acc(1), p.dk.row<T>(b, h_kv, key0 + c));
    store_row(w.acc_b + c * ld_v, p.head_dim_v, Acc(1), p.dv.row<T>(b, h_kv, key0 + c));
  }
}

// dQ, dK and dV of one key/value head in one pass (five products a tile instead of the two
// passes' seven): dkdv_block over the head's key blocks, with dQ += dS K of each tile summed
// in the task's own rows in the order dq_block sums them (key blocks aligned to kBlockK, in
// order), stored at the end.
template <typename T, typename Acc>
void head_backward(const AttentionProblem& p, int64_t b, int64_t h_kv, const BackwardScratch<Acc>& w) {
  const int64_t ld_qk = round_up(p.head_dim_qk, kLanes<Acc>);
  const int64_t group = p.group_size();
  std::vector<Acc> dq(size_t(group * p.seqlen_q * ld_qk), Acc(0));
  for (int64_t key0 = 0; key0 < p.seqlen_k; key0 += kBlockK) dkdv_block<T>(p, b, h_kv, key0, w, dq.data());
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t r = 0; r < p.seqlen_q; ++r) {
      store_row(dq.data() + (g * p.seqlen_q + r) * ld_qk, p.head_dim_qk, Acc(1), p.dq.row<T>(b, h_kv * group + g, r));
    }
  }
}

int64_t query_blocks(const AttentionProblem& p) { return (p.seqlen_q + kBlockQ - 1) / kBlockQ; }
int64_t key_blocks(const AttentionProblem& p) { return (p.seqlen_k + kBlockK - 1) / kBlockK; }

// Whether a call's backward takes one pass a key/value head: where its `heads` tasks keep every
// worker busy (many of them, or a multiple of the workers).
bool one_pass(int64_t heads, int workers) { return heads >= 4 * workers || (heads >= workers && heads % workers == 0); }

#if FJ_CPU_AMX
// The AMX backward (bfloat16, problems the AMX forward takes): the dQ and dK/dV passes of
// the float32 kernels with their products on AMX tiles over the operands packed once
// (PackedBackward), blocks aligned to kBlockQ / kBlockK; P and dS are rounded to
// bfloat16 for the products that take them, as the GPU kernels do. S is computed as the
// AMX forward computes it, so P = exp(S - lse) meets its LSE to the last bit.

// S = Q K^T -> logits, dP = dO V^T, then P and dS (softmax_gradient) for one tile.
void amx_tile_gradients(const AttentionProblem& p, const PackedBackward& pack, int64_t b, int64_t h, int64_t query0,
                        int64_t rows, int64_t key0, int64_t cols, const BackwardScratch<float>& w) {
  const int64_t h_kv = h / p.group_size(), ld_k = round_up(cols, 16), rows16 = round_up(rows, 16);
  amx_product(rows16, ld_k / 16, pack.depth_qk(), pack.q(b, h, query0), pack.depth_qk(),
              pack.k_columns(b, h_kv, key0), 2 * kBlockK, w.p, ld_k, false);
  amx_product(rows16, ld_k / 16, pack.depth_v(), pack.dout(b, h, query0), pack.depth_v(),
              pack.v_columns(b, h_kv, key0), 2 * kBlockK, w.dp, ld_k, false);
  const float* lse = pack.lse(b, h, query0);
  const float* delta = pack.delta(b, h, query0);
  // Blocks every row sees whole take one fused pass (the scale inside the exponent).
  if (fused_block(p, query0, rows, key0, cols) && gradient_visible_block(p, query0, rows, key0, cols, w.p, w.dp, ld_k, lse, delta)) return;
  compute_logits(p, b, h, query0, rows, key0, cols, ld_k, w.p, p.softcap > 0.0 ? w.softcap_grad : nullptr);
  softmax_gradient(p, b, h, query0, rows, key0, cols, ld_k, lse, delta, w);
}

// dQ += dS K for a tile (w.dp from amx_tile_gradients) into dq (rows of ld_qk). Keys of the
// block that no row of the query block sees take no part (0 * inf would be NaN).
void amx_dq_product(const AttentionProblem& p, const PackedBackward& pack, int64_t b, int64_t h_kv, int64_t query0,
                    int64_t rows, int64_t key0, int64_t cols, const BackwardScratch<float>& w, float* dq) {
  const int64_t ld_k = round_up(cols, 16), keys = round_up(cols, 32), ld_qk = pack.ld_qk();
  pack_probabilities(w.dp, ld_k, rows, ld_k, w.ds16);
  const uint16_t* k = rows_between(pack.k_rows(b, h_kv, key0), keys, ld_qk, p.key_begin(query0) - key0, cols, w.edge);
  amx_product(round_up(rows, 16), ld_qk / 16, keys, w.ds16, kBlockK, k, 2 * ld_qk, dq, ld_qk, true);
}

// dQ of one query block: dQ += dS K over its key blocks.
void amx_dq_block(const AttentionProblem& p, const PackedBackward& pack, int64_t b, int64_t h, int64_t query0,
                  const BackwardScratch<float>& w) {
  const AmxTiles tiles;
  const int64_t rows = std::min(kBlockQ, p.seqlen_q - query0), rows16 = round_up(rows, 16);
  const int64_t h_kv = h / p.group_size(), ld_qk = pack.ld_qk();
  std::fill(w.acc_a, w.acc_a + rows16 * ld_qk, 0.0f);
  const int64_t key_begin = p.key_begin(query0);
  const int64_t key_end = p.key_end(query0 + rows - 1);
  for (int64_t key0 = key_begin / kBlockK * kBlockK; key0 < key_end; key0 += kBlockK) {
    const int64_t cols = std::min(kBlockK, key_end - key0);
    amx_tile_gradients(p, pack, b, h, query0, rows, key0, cols, w);
    amx_dq_product(p, pack, b, h_kv, query0, rows, key0, cols, w, w.acc_a);
  }
  for (int64_t r = 0; r < rows; ++r) store_row(w.acc_a + r * ld_qk, p.head_dim_qk, 1.0f, p.dq.row<BFloat16>(b, h, query0 + r));
}

// Columns outside [begin, end) of kBlockQ-wide rows (ld of them) zeroed in a copy, or the rows themselves.
const uint16_t* columns_between(const uint16_t* rows, int64_t ld, int64_t begin, int64_t end, uint16_t* copy) {
  if (begin <= 0 && end >= kBlockQ) return rows;
  for (int64_t c = 0; c < ld; ++c) {
    for (int64_t r = 0; r < kBlockQ; ++r) copy[c * kBlockQ + r] = r >= begin && r < end ? rows[c * kBlockQ + r] : 0;
  }
  return copy;
}

// dK and dV of one key block: dV^T += dO^T dropout(P) and dK^T += Q^T dS over the query
// blocks of every query head of its group, then stored transposed; with dq (group x
// query_rows rows of ld_qk, amx_head_backward's) also dQ += dS K of each tile into it.
void amx_dkdv_block(const AttentionProblem& p, const PackedBackward& pack, int64_t b, int64_t h_kv, int64_t key0,
                    const BackwardScratch<float>& w, float* dq = nullptr, int64_t query_rows = 0) {
  const AmxTiles tiles;
  const int64_t cols = std::min(kBlockK, p.seqlen_k - key0), ld_k = round_up(cols, 16);
  const int64_t ld_qk = pack.ld_qk(), ld_v = pack.ld_v();
  float* dk_t = w.acc_a;  // [ld_qk][kBlockK]
  float* dv_t = w.acc_b;  // [ld_v][kBlockK]
  std::fill(dk_t, dk_t + ld_qk * kBlockK, 0.0f);
  std::fill(dv_t, dv_t + ld_v * kBlockK, 0.0f);
  for_each_query_block(p, h_kv, key0, cols, [&](int64_t g, int64_t h, int64_t query0, int64_t rows, int64_t begin,
                                                int64_t end) {
    const int64_t rows32 = round_up(rows, 32);
    amx_tile_gradients(p, pack, b, h, query0, rows, key0, cols, w);
    pack_float_row_pairs(p.has_dropout() ? w.p_dropped : w.p, ld_k, rows, rows32, ld_k / 16, w.p_pairs);
    pack_float_row_pairs(w.dp, ld_k, rows, rows32, ld_k / 16, w.ds_pairs);
    // Query rows of the block that see none of these keys take no part.
    const uint16_t* dout_t = columns_between(pack.dout_t(b, h, query0), ld_v, begin, end, w.edge);
    amx_product(ld_v, ld_k / 16, rows32, dout_t, kBlockQ, w.p_pairs, 2 * kBlockK, dv_t, kBlockK, true);
    const uint16_t* q_t = columns_between(pack.q_t(b, h, query0), ld_qk, begin, end, w.edge);
    amx_product(ld_qk, ld_k / 16, rows32, q_t, kBlockQ, w.ds_pairs, 2 * kBlockK, dk_t, kBlockK, true);
    if (dq != nullptr) {
      amx_dq_product(p, pack, b, h_kv, query0, rows, key0, cols, w, dq + (g * query_rows + query0) * ld_qk);
    }
  });
  for (int64_t c = 0; c < cols; ++c) {
    BFloat16* dk = p.dk.row<BFloat16>(b, h_kv, key0 + c);
    BFloat16* dv = p.dv.row<BFloat16>(b, h_kv, key0 + c);
    for (int64_t d = 0; d < p.head_dim_qk; ++d) dk[d] = bfloat16_from_float(dk_t[d * kBlockK + c]);
    for (int64_t d = 0; d < p.head_dim_v; ++d) dv[d] = bfloat16_from_float(dv_t[d * kBlockK + c]);
  }
}

// dQ, dK and dV of one key/value head in one pass (five products a tile instead of the
// two passes' seven): amx_dkdv_block over the head's key blocks in order, dQ accumulated in
// the task's own rows (in amx_dq_block's order of key blocks) and stored at the end.
void amx_head_backward(const AttentionProblem& p, const PackedBackward& pack, int64_t b, int64_t h_kv,
                       const BackwardScratch<float>& w) {
  const int64_t ld_qk = pack.ld_qk(), group = p.group_size();
  const int64_t query_rows = round_up(p.seqlen_q, kBlockQ);
  std::vector<float> dq(size_t(group * query_rows * ld_qk), 0.0f);
  for (int64_t key0 = 0; key0 < p.seqlen_k; key0 += kBlockK) amx_dkdv_block(p, pack, b, h_kv, key0, w, dq.data(), query_rows);
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t r = 0; r < p.seqlen_q; ++r) {
      store_row(dq.data() + (g * query_rows + r) * ld_qk, p.head_dim_qk, 1.0f, p.dq.row<BFloat16>(b, h_kv * group + g, r));
    }
  }
}

// The parts of a call amx_applies to, through the AMX passes (other parts count no tasks).
void amx_backward(const DenseParts& parts, int workers) {
  std::vector<PackedBackward> packed;
  packed.reserve(parts.size());
  int64_t elements = 0;
  for (const AttentionProblem& p : parts) {
    packed.emplace_back(p);
    if (amx_applies(p)) elements += round_up(packed.back().elements(), 32);
  }
  uint16_t* data = reinterpret_cast<uint16_t*>(thread_packing_buffer(size_t(elements) * 2));
  for (size_t i = 0; i < parts.size(); ++i) {
    if (!amx_applies(parts[i])) continue;
    packed[i].place(data);
    data += round_up(packed[i].elements(), 32);
  }
  const PartTasks pack_tasks(parts, [](const AttentionProblem& p) {
    return amx_applies(p) ? PackedBackward(p).tasks() : int64_t(0);
  });
  parallel_for(pack_tasks.total(), workers, [&](int64_t task, int) {
    const auto [part, index] = pack_tasks.locate(task);
    const auto w = thread_scratch<BackwardScratch<float>>(parts[part]);
    packed[part].pack(parts[part], index, w.q);
  });
  // One pass a key/value head where the heads keep every worker busy; else the dQ and the dK/dV
  // passes, whose tasks are blocks.
  const PartTasks head_tasks(parts, [](const AttentionProblem& p) {
    return amx_applies(p) ? p.batch * p.heads_kv : int64_t(0);
  });
  const int64_t heads = head_tasks.total();
  if (one_pass(heads, workers)) {
    parallel_for(heads, workers, [&](int64_t task, int) {
      const auto [part, index] = head_tasks.locate(task);
      const AttentionProblem& p = parts[part];
      amx_head_backward(p, packed[part], index / p.heads_kv, index % p.heads_kv, thread_scratch<BackwardScratch<float>>(p));
    });
    trim_thread_packing_buffer();
    return;
  }
  const PartTasks dq_tasks(parts, [](const AttentionProblem& p) {
    return amx_applies(p) ? p.batch * p.heads_q * query_blocks(p) : int64_t(0);
  });
  parallel_for(dq_tasks.total(), workers, [&](int64_t task, int) {
    const auto [part, index] = dq_tasks.locate(task);
    const AttentionProblem& p = parts[part];
    const int64_t bh = index / query_blocks(p);
    amx_dq_block(p, packed[part], bh / p.heads_q, bh % p.heads_q, (index % query_blocks(p)) * kBlockQ,
                 thread_scratch<BackwardScratch<float>>(p));
  });
  const PartTasks dkdv_tasks(parts, [](const AttentionProblem& p) {
    return amx_applies(p) ? p.batch * p.heads_kv * key_blocks(p) : int64_t(0);
  });
  parallel_for(dkdv_tasks.total(), workers, [&](int64_t task, int) {
    const auto [part, index] = dkdv_tasks.locate(task);
    const AttentionProblem& p = parts[part];
    const int64_t bh = index / key_blocks(p);
    amx_dkdv_block(p, packed[part], bh / p.heads_kv, bh % p.heads_kv, (index % key_blocks(p)) * kBlockK,
                   thread_scratch<BackwardScratch<float>>(p));
  });
  trim_thread_packing_buffer();
}
#endif

// Each pool of tasks spans every part (DenseParts: the sequences of a variable-length batch).
template <typename T>
void backward_typed(const AttentionProblem& whole) {
  using Acc = typename AccumulatorOf<T>::type;
  const DenseParts parts(whole);
  // With the amx kernels, bfloat16 parts they apply to take the AMX passes (amx_backward) and count
  // no tasks here.
  const auto here = [](const AttentionProblem& p) {
#if FJ_CPU_AMX
    if (std::is_same_v<T, BFloat16> && amx_applies(p)) return false;
#endif
    return true;
  };
  const PartTasks dq_tasks(parts, [&](const AttentionProblem& p) {
    return here(p) ? p.batch * p.heads_q * query_blocks(p) : int64_t(0);
  });
  const PartTasks dkdv_tasks(parts, [&](const AttentionProblem& p) {
    return here(p) ? p.batch * p.heads_kv * key_blocks(p) : int64_t(0);
  });
  double flops = 0;
  for (const AttentionProblem& p : parts) {
    flops += 5.0 * p.batch * p.heads_q * p.seqlen_q * p.seqlen_k * (p.head_dim_qk + p.head_dim_v);
  }
  int64_t blocks = 0;  // tasks of either pass, whichever kernels take them
  for (const AttentionProblem& p : parts) {
    blocks += std::max(p.batch * p.heads_q * query_blocks(p), p.batch * p.heads_kv * key_blocks(p));
  }
  const int workers = worker_count(whole.num_threads, blocks, flops);
#if FJ_CPU_AMX
  if constexpr (std::is_same_v<T, BFloat16>) amx_backward(parts, workers);
#endif
  // One pass a key/value head where the heads keep every worker busy (one_pass, as the AMX
  // kernels choose); else the dQ and the dK/dV passes over blocks. Both give the same bits.
  const PartTasks head_tasks(parts, [&](const AttentionProblem& p) { return here(p) ? p.batch * p.heads_kv : int64_t(0); });
  if (one_pass(head_tasks.total(), workers)) {
    parallel_for(head_tasks.total(), workers, [&](int64_t task, int) {
      const auto [part, index] = head_tasks.locate(task);
      const AttentionProblem& p = parts[part];
      head_backward<T, Acc>(p, index / p.heads_kv, index % p.heads_kv, thread_scratch<BackwardScratch<Acc>>(p));
    });
    return;
  }
  parallel_for(dq_tasks.total(), workers, [&](int64_t task, int) {
    const auto [part, index] = dq_tasks.locate(task);
    const AttentionProblem& p = parts[part];
    const int64_t bh = index / query_blocks(p);
    dq_block<T, Acc>(p, bh / p.heads_q, bh % p.heads_q, (index % query_blocks(p)) * kBlockQ,
                     thread_scratch<BackwardScratch<Acc>>(p));
  });
  parallel_for(dkdv_tasks.total(), workers, [&](int64_t task, int) {
    const auto [part, index] = dkdv_tasks.locate(task);
    const AttentionProblem& p = parts[part];
    const int64_t bh = index / key_blocks(p);
    dkdv_block<T, Acc>(p, bh / p.heads_kv, bh % p.heads_kv, (index % key_blocks(p)) * kBlockK,
                       thread_scratch<BackwardScratch<Acc>>(p));
  });
}

}  // namespace

void attention_backward(const AttentionProblem& p) {
  dispatch_float_dtype(p.dtype, "attention_backward",
                       [&](auto element) { backward_typed<decltype(element)>(p); });
}

}  // namespace flashjit::cpu::FJ_CPU_ISA
