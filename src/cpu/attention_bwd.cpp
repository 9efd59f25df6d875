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
#include <vector>

#include "core/error.hpp"
#include "cpu/kernels.hpp"
#include "cpu/thread_pool.hpp"
#include "cpu/tile.hpp"

namespace flashjit::cpu {
namespace {

template <typename Acc>
struct BackwardScratch {
  // Query side: q (ld_qk), dout (ld_v), per-row D and lse.
  std::vector<Acc> q, dout, delta, lse;
  // Key side: k^T and v^T (ld_k), k rows (ld_qk) for dQ.
  std::vector<Acc> k_t, v_t, k;
  // Tile: p, dp (then ds), dropped p, softcap derivative, transposes.
  std::vector<Acc> p, dp, p_dropped, softcap_grad, transposed;
  // Accumulators: dq (ld_qk) or dk (ld_qk) and dv (ld_v).
  std::vector<Acc> acc_a, acc_b;
  std::vector<uint8_t> keep;

  explicit BackwardScratch(const AttentionProblem& pr) {
    const int64_t ld_qk = round_up(pr.head_dim_qk, kLanes<Acc>);
    const int64_t ld_v = round_up(pr.head_dim_v, kLanes<Acc>);
    const int64_t ld_k = round_up(kBlockK, kLanes<Acc>);
    const int64_t block = std::max(kBlockQ, kBlockK);
    q.resize(kBlockQ * ld_qk);
    dout.resize(kBlockQ * ld_v);
    delta.resize(kBlockQ);
    lse.resize(kBlockQ);
    k_t.resize(pr.head_dim_qk * ld_k);
    v_t.resize(pr.head_dim_v * ld_k);
    k.resize(kBlockK * ld_qk);
    p.resize(kBlockQ * ld_k);
    dp.resize(kBlockQ * ld_k);
    p_dropped.resize(kBlockQ * ld_k);
    softcap_grad.resize(kBlockQ * ld_k);
    transposed.resize(block * block);
    acc_a.resize(block * ld_qk);
    acc_b.resize(block * ld_v);
    keep.resize(kBlockK);
  }
};

// Loads q, dout, D = rowsum(dO * O) and lse for query rows [query0, query0 + rows).
template <typename T, typename Acc>
void load_query_block(const AttentionProblem& p, int64_t b, int64_t h, int64_t query0, int64_t rows,
                      BackwardScratch<Acc>& w) {
  const int64_t ld_qk = round_up(p.head_dim_qk, kLanes<Acc>);
  const int64_t ld_v = round_up(p.head_dim_v, kLanes<Acc>);
  pack_rows(p.q.row<const T>(b, h, query0), p.q.stride_seq, rows, p.head_dim_qk, w.q.data(), ld_qk);
  pack_rows(p.dout.row<const T>(b, h, query0), p.dout.stride_seq, rows, p.head_dim_v, w.dout.data(), ld_v);
  for (int64_t r = 0; r < rows; ++r) {
    const T* o_row = p.o.row<const T>(b, h, query0 + r);
    const Acc* do_row = w.dout.data() + r * ld_v;
    Acc delta = 0;
    for (int64_t c = 0; c < p.head_dim_v; ++c) delta += do_row[c] * to_acc<Acc>(o_row[c]);
    w.delta[r] = delta;
    const int64_t index = b * p.lse_stride_batch + h * p.lse_stride_head + (query0 + r) * p.lse_stride_seq;
    w.lse[r] = p.lse_dtype == FJ_FLOAT64 ? Acc(static_cast<const double*>(p.lse)[index])
                                         : Acc(static_cast<const float*>(p.lse)[index]);
  }
}

// Loads k^T and v^T (and k rows when with_k_rows) for keys [key0, key0 + cols).
template <typename T, typename Acc>
void load_key_block(const AttentionProblem& p, int64_t b, int64_t h_kv, int64_t key0, int64_t cols,
                    bool with_k_rows, BackwardScratch<Acc>& w) {
  const int64_t ld_k = round_up(cols, kLanes<Acc>);
  pack_transposed(p.k.row<const T>(b, h_kv, key0), p.k.stride_seq, cols, p.head_dim_qk, w.k_t.data(), ld_k);
  pack_transposed(p.v.row<const T>(b, h_kv, key0), p.v.stride_seq, cols, p.head_dim_v, w.v_t.data(), ld_k);
  if (with_k_rows) {
    const int64_t ld_qk = round_up(p.head_dim_qk, kLanes<Acc>);
    pack_rows(p.k.row<const T>(b, h_kv, key0), p.k.stride_seq, cols, p.head_dim_qk, w.k.data(), ld_qk);
  }
}

// For the loaded query and key blocks: w.p = P, w.p_dropped = dropout(P) (when
// dropout is on), w.dp = dS (already multiplied by softcap' and scale).
template <typename Acc>
void tile_gradients(const AttentionProblem& p, int64_t b, int64_t h, int64_t query0, int64_t rows,
                    int64_t key0, int64_t cols, BackwardScratch<Acc>& w) {
  const int64_t ld_k = round_up(cols, kLanes<Acc>);
  const int64_t ld_qk = round_up(p.head_dim_qk, kLanes<Acc>);
  const int64_t ld_v = round_up(p.head_dim_v, kLanes<Acc>);
  const bool softcap = p.softcap > 0.0;
  const Acc keep_scale = Acc(1.0 / (1.0 - p.dropout_p));
  const Acc scale = Acc(p.scale);

  // S = Q K^T -> logits;  dP = dO V^T
  gemm(rows, ld_k, p.head_dim_qk, w.q.data(), ld_qk, w.k_t.data(), ld_k, w.p.data(), ld_k, false);
  compute_logits(p, b, h, query0, rows, key0, cols, ld_k, w.p.data(),
                 softcap ? w.softcap_grad.data() : static_cast<Acc*>(nullptr));
  gemm(rows, ld_k, p.head_dim_v, w.dout.data(), ld_v, w.v_t.data(), ld_k, w.dp.data(), ld_k, false);

  for (int64_t r = 0; r < rows; ++r) {
    Acc* p_row = w.p.data() + r * ld_k;
    Acc* ds_row = w.dp.data() + r * ld_k;
    if (w.lse[r] == kNegInf<Acc>) {  // fully masked row: no gradient flows
      std::fill(p_row, p_row + ld_k, Acc(0));
      std::fill(ds_row, ds_row + ld_k, Acc(0));
      if (p.has_dropout())
        std::fill(w.p_dropped.data() + r * ld_k, w.p_dropped.data() + (r + 1) * ld_k, Acc(0));
      continue;
    }
    exp_shifted_sum(p_row, ld_k, w.lse[r]);  // P = exp(logits - lse)
    if (p.has_dropout()) {
      Acc* pd_row = w.p_dropped.data() + r * ld_k;
      dropout_keep_row(p, b, h, query0 + r, key0, cols, w.keep.data());
      for (int64_t c = 0; c < cols; ++c) {
        const Acc factor = w.keep[c] ? keep_scale : Acc(0);
        pd_row[c] = p_row[c] * factor;
        ds_row[c] *= factor;
      }
      for (int64_t c = cols; c < ld_k; ++c) pd_row[c] = Acc(0);
    }
    const Acc delta = w.delta[r];
    if (softcap) {
      const Acc* g_row = w.softcap_grad.data() + r * ld_k;
      for (int64_t c = 0; c < cols; ++c) ds_row[c] = p_row[c] * (ds_row[c] - delta) * g_row[c] * scale;
    } else {
      for (int64_t c = 0; c < cols; ++c) ds_row[c] = p_row[c] * (ds_row[c] - delta) * scale;
    }
    for (int64_t c = cols; c < ld_k; ++c) ds_row[c] = Acc(0);
  }
}

template <typename T, typename Acc>
void dq_block(const AttentionProblem& p, int64_t b, int64_t h, int64_t query0, BackwardScratch<Acc>& w) {
  const int64_t rows = std::min(kBlockQ, p.seqlen_q - query0);
  const int64_t h_kv = h / p.group_size();
  const int64_t ld_qk = round_up(p.head_dim_qk, kLanes<Acc>);
  load_query_block<T>(p, b, h, query0, rows, w);
  std::fill(w.acc_a.begin(), w.acc_a.begin() + rows * ld_qk, Acc(0));
  const int64_t key_begin = p.key_begin(query0);
  const int64_t key_end = p.key_end(query0 + rows - 1);
  for (int64_t key0 = key_begin; key0 < key_end; key0 += kBlockK) {
    const int64_t cols = std::min(kBlockK, key_end - key0);
    load_key_block<T>(p, b, h_kv, key0, cols, true, w);
    tile_gradients(p, b, h, query0, rows, key0, cols, w);
    // dQ += dS K
    gemm(rows, ld_qk, cols, w.dp.data(), round_up(cols, kLanes<Acc>), w.k.data(), ld_qk, w.acc_a.data(),
         ld_qk, true);
  }
  for (int64_t r = 0; r < rows; ++r)
    store_row(w.acc_a.data() + r * ld_qk, p.head_dim_qk, Acc(1), p.dq.row<T>(b, h, query0 + r));
}

template <typename T, typename Acc>
void dkdv_block(const AttentionProblem& p, int64_t b, int64_t h_kv, int64_t key0, BackwardScratch<Acc>& w) {
  const int64_t cols = std::min(kBlockK, p.seqlen_k - key0);
  const int64_t ld_k = round_up(cols, kLanes<Acc>);
  const int64_t ld_qk = round_up(p.head_dim_qk, kLanes<Acc>);
  const int64_t ld_v = round_up(p.head_dim_v, kLanes<Acc>);
  load_key_block<T>(p, b, h_kv, key0, cols, false, w);
  std::fill(w.acc_a.begin(), w.acc_a.begin() + cols * ld_qk, Acc(0));
  std::fill(w.acc_b.begin(), w.acc_b.begin() + cols * ld_v, Acc(0));
  const int64_t query_begin = p.query_begin(key0);
  const int64_t query_end = p.query_end(key0 + cols - 1);
  const int64_t group = p.group_size();
  for (int64_t h = h_kv * group; h < (h_kv + 1) * group; ++h) {
    for (int64_t query0 = query_begin; query0 < query_end; query0 += kBlockQ) {
      const int64_t rows = std::min(kBlockQ, query_end - query0);
      load_query_block<T>(p, b, h, query0, rows, w);
      tile_gradients(p, b, h, query0, rows, key0, cols, w);
      const Acc* p_used = p.has_dropout() ? w.p_dropped.data() : w.p.data();
      // dV += dropout(P)^T dO
      transpose(p_used, ld_k, rows, cols, w.transposed.data(), rows);
      gemm(cols, ld_v, rows, w.transposed.data(), rows, w.dout.data(), ld_v, w.acc_b.data(), ld_v, true);
      // dK += dS^T Q
      transpose(w.dp.data(), ld_k, rows, cols, w.transposed.data(), rows);
      gemm(cols, ld_qk, rows, w.transposed.data(), rows, w.q.data(), ld_qk, w.acc_a.data(), ld_qk, true);
    }
  }
  for (int64_t c = 0; c < cols; ++c) {
    store_row(w.acc_a.data() + c * ld_qk, p.head_dim_qk, Acc(1), p.dk.row<T>(b, h_kv, key0 + c));
    store_row(w.acc_b.data() + c * ld_v, p.head_dim_v, Acc(1), p.dv.row<T>(b, h_kv, key0 + c));
  }
}

template <typename T>
void backward_typed(const AttentionProblem& p) {
  using Acc = typename AccumulatorOf<T>::type;
  const int64_t query_blocks = (p.seqlen_q + kBlockQ - 1) / kBlockQ;
  const int64_t key_blocks = (p.seqlen_k + kBlockK - 1) / kBlockK;
  const int64_t dq_tasks = p.batch * p.heads_q * query_blocks;
  const int64_t dkdv_tasks = p.batch * p.heads_kv * key_blocks;
  const int workers = worker_count(p.num_threads, std::max(dq_tasks, dkdv_tasks));
  std::vector<BackwardScratch<Acc>> scratch;
  scratch.reserve(workers);
  for (int i = 0; i < workers; ++i) scratch.emplace_back(p);
  parallel_for(dq_tasks, workers, [&](int64_t task, int worker) {
    const int64_t bh = task / query_blocks;
    dq_block<T, Acc>(p, bh / p.heads_q, bh % p.heads_q, (task % query_blocks) * kBlockQ, scratch[worker]);
  });
  parallel_for(dkdv_tasks, workers, [&](int64_t task, int worker) {
    const int64_t bh = task / key_blocks;
    dkdv_block<T, Acc>(p, bh / p.heads_kv, bh % p.heads_kv, (task % key_blocks) * kBlockK, scratch[worker]);
  });
}

}  // namespace

void attention_backward(const AttentionProblem& p) {
  dispatch_float_dtype(p.dtype, "attention_backward",
                       [&](auto element) { backward_typed<decltype(element)>(p); });
}

}  // namespace flashjit::cpu
