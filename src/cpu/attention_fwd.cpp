// CPU forward: one task per (batch, query head, block of kBlockQ queries); each
// task streams key blocks through an online softmax, so memory stays
// O(block * head_dim) whatever the sequence lengths.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

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
struct ForwardScratch {
  Acc *q, *k_t, *k_rows, *v, *s, *o, *row_max, *row_sum;
  uint8_t* keep;
  uint16_t *q16, *p16, *v16;  // bfloat16 tiles of the AMX kernels: Q, P, an edge block of V pairs
  Acc* s_next;                 // the AMX kernels' S of the next key block, computed during this one's softmax
  float* sum_lanes;            // AVX-512: row sums in vector lanes (softmax_visible_block)

  void carve(const AttentionProblem& p, ScratchSlicer& slicer) {
    const int64_t ld_k = round_up(kBlockK, kLanes<Acc>);
    const int64_t ld_qk = round_up(p.head_dim_qk, kLanes<Acc>);
    const int64_t ld_v = round_up(p.head_dim_v, kLanes<Acc>);
    q = slicer.take<Acc>(kBlockQ * ld_qk);
    k_t = slicer.take<Acc>(p.head_dim_qk * ld_k);
    k_rows = slicer.take<Acc>(kBlockK * ld_qk);
    v = slicer.take<Acc>(kBlockK * ld_v);
    s = slicer.take<Acc>(kBlockQ * ld_k);
    o = slicer.take<Acc>(kBlockQ * ld_v);
    row_max = slicer.take<Acc>(kBlockQ);
    row_sum = slicer.take<Acc>(kBlockQ);
    keep = slicer.take<uint8_t>(kBlockK);
#if FJ_CPU_VECTOR_BYTES == 64
    sum_lanes = slicer.take<float>(kBlockQ * kLanes<float>);
#endif
#if FJ_CPU_AMX
    q16 = slicer.take<uint16_t>(kBlockQ * round_up(p.head_dim_qk, 32));
    p16 = slicer.take<uint16_t>(kBlockQ * kBlockK);
    v16 = slicer.take<uint16_t>(kBlockK * ld_v);
    s_next = slicer.take<Acc>(kBlockQ * ld_k);
#endif
  }
};

// One block of keys through the online softmax: each row's maximum and sum move
// on, the running output is rescaled by exp(old max - new max), and S becomes P
// (dropped-out entries 0, the kept ones scaled by 1 / (1 - p)).
template <typename Acc>
void online_softmax(const AttentionProblem& p, const ForwardScratch<Acc>& w, int64_t b, int64_t h, int64_t query0,
                    int64_t rows, int64_t key0, int64_t cols, int64_t ld_k, int64_t ld_v) {
  const Acc keep_scale = Acc(1.0 / (1.0 - p.dropout_p));
  for (int64_t r = 0; r < rows; ++r) {
    Acc* s_row = w.s + r * ld_k;
    const Acc block_max = row_max_of(s_row, ld_k);
    const Acc new_max = std::max(w.row_max[r], block_max);
    if (new_max == kNegInf<Acc>) {  // nothing visible yet: P row is 0
      // ... unless the scores were NaN (row_max skips them): the row's sum and O become NaN.
      if (std::any_of(s_row, s_row + cols, [](Acc x) { return x != x; })) {
        w.row_sum[r] = std::numeric_limits<Acc>::quiet_NaN();
        std::fill(s_row, s_row + ld_k, std::numeric_limits<Acc>::quiet_NaN());
      } else {
        std::fill(s_row, s_row + ld_k, Acc(0));
      }
      continue;
    }
    const Acc correction = std::exp(w.row_max[r] - new_max);
    const Acc block_sum = exp_shifted_sum(s_row, ld_k, new_max);
    w.row_sum[r] = w.row_sum[r] * correction + block_sum;
    w.row_max[r] = new_max;
    if (correction != Acc(1)) {
      Acc* o_row = w.o + r * ld_v;
      for (int64_t c = 0; c < ld_v; ++c) o_row[c] *= correction;
    }
    if (p.has_dropout()) {
      // The normaliser uses every probability; only the output sees dropout.
      dropout_keep_row(p, b, h, query0 + r, key0, cols, w.keep);
      for (int64_t c = 0; c < cols; ++c) s_row[c] = w.keep[c] ? s_row[c] * keep_scale : Acc(0);
    }
  }
}

// O / rowsum into the output and the LSE of every row of the block.
template <typename T, typename Acc>
void finish_rows(const AttentionProblem& p, const ForwardScratch<Acc>& w, int64_t b, int64_t h, int64_t query0,
                 int64_t rows, int64_t ld_v) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t query = query0 + r;
    const bool empty = w.row_sum[r] == Acc(0);  // every key masked (a NaN sum stays NaN: O and LSE NaN)
    const Acc inv_sum = empty ? Acc(0) : Acc(1) / w.row_sum[r];
    store_row(w.o + r * ld_v, p.head_dim_v, inv_sum, p.o.row<T>(b, h, query));
    if (p.lse == nullptr) continue;  // not asked for
    const double lse = empty ? -INFINITY : double(w.row_max[r]) + std::log(double(w.row_sum[r]));
    const int64_t lse_index = b * p.lse_stride_batch + h * p.lse_stride_head + query * p.lse_stride_seq;
    if (p.lse_dtype == FJ_FLOAT64) {
      static_cast<double*>(p.lse)[lse_index] = lse;
    } else {
      static_cast<float*>(p.lse)[lse_index] = float(lse);
    }
  }
}

template <typename T, typename Acc>
void forward_block(const AttentionProblem& p, int64_t b, int64_t h, int64_t query0) {
  const auto w = thread_scratch<ForwardScratch<Acc>>(p);
  const int64_t rows = std::min(kBlockQ, p.seqlen_q - query0);
  const int64_t h_kv = h / p.group_size();
  const int64_t d_qk = p.head_dim_qk;
  const int64_t d_v = p.head_dim_v;
  const int64_t ld_qk = round_up(d_qk, kLanes<Acc>);
  const int64_t ld_v = round_up(d_v, kLanes<Acc>);
  // Decode-like blocks of a few queries: dot products against K rows beat
  // transposing each K block for the GEMM.
  const bool few_rows = rows <= kFewRows;
  // Decode blocks of accumulator-typed inputs whose head dims need no padding read K
  // and V rows where they are instead of copying each block.
  constexpr bool kSameType = std::is_same_v<T, Acc>;
  const bool in_place_k = kSameType && few_rows && d_qk % kLanes<Acc> == 0;
  const bool in_place_v = kSameType && few_rows && d_v % kLanes<Acc> == 0;

  pack_rows(p.q.row<const T>(b, h, query0), p.q.stride_seq, rows, d_qk, w.q, ld_qk);
  std::fill(w.o, w.o + rows * ld_v, Acc(0));
  std::fill(w.row_max, w.row_max + rows, kNegInf<Acc>);
  std::fill(w.row_sum, w.row_sum + rows, Acc(0));
#if FJ_CPU_VECTOR_BYTES == 64
  std::fill(w.sum_lanes, w.sum_lanes + rows * kLanes<float>, 0.0f);
#endif

  // Keys visible to some row of the block (the bounds are monotone in the row).
  const int64_t key_begin = p.key_begin(query0);
  const int64_t key_end = p.key_end(query0 + rows - 1);
  // A block never crosses a page of a paged cache (its keys' rows are consecutive).
  for (int64_t key0 = key_begin, cols = 0; key0 < key_end; key0 += cols) {
    cols = p.consecutive_keys(key0, std::min(kBlockK, key_end - key0));
    const int64_t ld_k = round_up(cols, kLanes<Acc>);
    const Acc* v_tile = w.v;
    int64_t ld_v_tile = ld_v;
    if (in_place_v) {
      v_tile = reinterpret_cast<const Acc*>(p.key_row<const T>(p.v, b, h_kv, key0));
      ld_v_tile = p.v.stride_seq;
    } else {
      pack_rows(p.key_row<const T>(p.v, b, h_kv, key0), p.v.stride_seq, cols, d_v, w.v, ld_v);
    }

    // S = Q K^T, then logits (scale, softcap, masks).
    if (few_rows) {
      if (in_place_k) {
        gemm_abt_rows(rows, cols, ld_qk, w.q, ld_qk,
                      reinterpret_cast<const Acc*>(p.key_row<const T>(p.k, b, h_kv, key0)), p.k.stride_seq, w.s,
                      ld_k);
      } else {
        pack_rows(p.key_row<const T>(p.k, b, h_kv, key0), p.k.stride_seq, cols, d_qk, w.k_rows, ld_qk);
        gemm_abt_rows(rows, cols, ld_qk, w.q, ld_qk, w.k_rows, ld_qk, w.s, ld_k);
      }
    } else {
      pack_transposed(p.key_row<const T>(p.k, b, h_kv, key0), p.k.stride_seq, cols, d_qk, w.k_t, ld_k);
      gemm(rows, ld_k, d_qk, w.q, ld_qk, w.k_t, ld_k, w.s, ld_k, false);
    }
#if FJ_CPU_VECTOR_BYTES == 64
    // Blocks every row sees whole take the fused step (softmax512.hpp); P goes over S.
    if constexpr (std::is_same_v<Acc, float>) {
      // (The fused step's lazy base takes the maximum of the scaled logits: scale > 0.)
      if (!few_rows && p.scale > 0 && fused_block(p, query0, rows, key0, cols) && softmax_visible_block(w.s, ld_k, rows, float(p.scale), w.row_max, w.row_sum, w.sum_lanes, w.o,
                                           ld_v, FloatInPlace{w.s, ld_k}, no_work)) {
        gemm(rows, ld_v, cols, w.s, ld_k, v_tile, ld_v_tile, w.o, ld_v, true);
        continue;
      }
      fold_row_sums(rows, w.row_sum, w.sum_lanes);
    }
#endif
    compute_logits(p, b, h, query0, rows, key0, cols, ld_k, w.s, static_cast<Acc*>(nullptr));

    online_softmax(p, w, b, h, query0, rows, key0, cols, ld_k, ld_v);
    // O += P V
    gemm(rows, ld_v, cols, w.s, ld_k, v_tile, ld_v_tile, w.o, ld_v, true);
  }

#if FJ_CPU_VECTOR_BYTES == 64
  if constexpr (std::is_same_v<Acc, float>) fold_row_sums(rows, w.row_sum, w.sum_lanes);
#endif
  finish_rows<T>(p, w, b, h, query0, rows, ld_v);
}

#if FJ_CPU_AMX
// forward_block for bfloat16 on AMX tiles: S = Q K^T and O += P V from the packed
// K/V pairs (amx.hpp) in float32, over key blocks aligned to kBlockK; the logits,
// the online softmax and the output are forward_block's. P is rounded to bfloat16
// for its product with V (the row sums take it unrounded).
void forward_block_amx(const AttentionProblem& p, const PackedKv& kv, int64_t b, int64_t h, int64_t query0,
                       int64_t block_rows) {
  const auto w = thread_scratch<ForwardScratch<float>>(p);
  const AmxTiles tiles;
  const int64_t rows = std::min(block_rows, p.seqlen_q - query0), rows16 = round_up(rows, 16);
  const int64_t h_kv = h / p.group_size();
  const int64_t depth = kv.depth(), ld_v = kv.ld_v();
  pack_bf16_rows(p.q.row<const BFloat16>(b, h, query0), p.q.stride_seq, rows, rows16, p.head_dim_qk, w.q16, depth);
  std::fill(w.o, w.o + rows16 * ld_v, 0.0f);
  std::fill(w.row_max, w.row_max + rows, kNegInf<float>);
  std::fill(w.row_sum, w.row_sum + rows, 0.0f);
  std::fill(w.sum_lanes, w.sum_lanes + rows * kLanes<float>, 0.0f);

  const int64_t key_begin = p.key_begin(query0);
  const int64_t key_end = p.key_end(query0 + rows - 1);
  // S of a key block: into one of two buffers, the next block's in pieces between the rows of
  // this block's exponentials, so that the tile unit runs beside the vector units.
  float* s_buffers[2] = {w.s, w.s_next};
  const auto s_product = [&](int64_t key0, float* s) {
    const int64_t ld_k = round_up(std::min(kBlockK, key_end - key0), 16);
    return AmxProduct{rows16, ld_k / 16, depth, w.q16, depth, kv.k_block(b, h_kv, key0), 2 * kBlockK, s, ld_k, false};
  };
  const int64_t first_key = key_begin / kBlockK * kBlockK;
  if (first_key < key_end) s_product(first_key, s_buffers[0]).all();
  for (int64_t key0 = first_key, which = 0; key0 < key_end; key0 += kBlockK, which ^= 1) {
    const int64_t cols = std::min(kBlockK, key_end - key0);  // the rest of the block is seen by no row
    const int64_t ld_k = round_up(cols, 16);
    ForwardScratch<float> ws = w;
    ws.s = s_buffers[which];
    const AmxProduct next = key0 + kBlockK < key_end ? s_product(key0 + kBlockK, s_buffers[which ^ 1]) : AmxProduct{};
    const int64_t pieces = next.pieces();
    int64_t issued = 0;
    const auto between = [&](int64_t rows_done) {
      for (const int64_t due = pieces * rows_done / rows; issued < due;) next.piece(issued++);
    };
    // Blocks every row sees whole take the fused step (the scale inside the exponent; scale > 0).
    if (!(p.scale > 0 && fused_block(p, query0, rows, key0, cols)) || !softmax_visible_block(ws.s, ld_k, rows, float(p.scale), w.row_max, w.row_sum, w.sum_lanes, w.o,
                                           ld_v, BfloatRows{w.p16}, between)) {
      fold_row_sums(rows, w.row_sum, w.sum_lanes);
      compute_logits(p, b, h, query0, rows, key0, cols, ld_k, ws.s, static_cast<float*>(nullptr));
      online_softmax(p, ws, b, h, query0, rows, key0, cols, ld_k, ld_v);
      pack_probabilities(ws.s, ld_k, rows, ld_k, w.p16);
    }
    while (issued < pieces) next.piece(issued++);
    // Keys of the block that no row sees take no part in the product (0 * inf would be NaN).
    const int64_t keys = round_up(cols, 32);
    const uint16_t* v = rows_between(kv.v_block(b, h_kv, key0), keys, ld_v, key_begin - key0, cols, w.v16);
    amx_product(rows16, ld_v / 16, keys, w.p16, kBlockK, v, 2 * ld_v, w.o, ld_v, true);
  }
  fold_row_sums(rows, w.row_sum, w.sum_lanes);
  finish_rows<BFloat16>(p, w, b, h, query0, rows, ld_v);
}
#endif

int64_t query_blocks(const AttentionProblem& p) { return (p.seqlen_q + kBlockQ - 1) / kBlockQ; }

// One pool of tasks over every (part, batch, query head, query block): the sequences of
// a variable-length batch share the workers instead of running one after another.
template <typename T>
void forward_typed(const AttentionProblem& whole) {
  using Acc = typename AccumulatorOf<T>::type;
  const DenseParts parts(whole);
  const PartTasks tasks(parts, [](const AttentionProblem& p) { return p.batch * p.heads_q * query_blocks(p); });
  double flops = 0;
  for (const AttentionProblem& p : parts) {
    flops += 2.0 * p.batch * p.heads_q * p.seqlen_q * p.seqlen_k * (p.head_dim_qk + p.head_dim_v);
  }
  const int workers = worker_count(whole.num_threads, tasks.total(), flops);
#if FJ_CPU_AMX
  if constexpr (std::is_same_v<T, BFloat16>) {
    // K and V of every part packed into AMX pairs first (a part of few queries keeps its own path).
    int64_t elements = 0;
    for (const AttentionProblem& p : parts) elements += round_up(PackedKv::elements(p, amx_applies(p)), 32);
    uint16_t* data = reinterpret_cast<uint16_t*>(thread_packing_buffer(size_t(elements) * 2));
    std::vector<PackedKv> packed;
    packed.reserve(parts.size());
    for (const AttentionProblem& p : parts) {
      packed.emplace_back(p, amx_applies(p), data);
      data += round_up(PackedKv::elements(p, amx_applies(p)), 32);
    }
    const PartTasks pack_tasks(parts, [&](const AttentionProblem& p) { return PackedKv::count(p, amx_applies(p)); });
    parallel_for(pack_tasks.total(), workers, [&](int64_t task, int) {
      const auto [part, index] = pack_tasks.locate(task);
      packed[part].pack(parts[part], index);
    });
    parallel_for(tasks.total(), workers, [&](int64_t task, int) {
      const auto [part, index] = tasks.locate(task);
      const AttentionProblem& p = parts[part];
      const int64_t blocks = query_blocks(p);
      const int64_t bh = index / blocks, query0 = (index % blocks) * kBlockQ;
      if (amx_applies(p)) {  // every block, so that the backward's S matches this one's bit for bit
        // Up to head dim 64 in halves of 32 rows: O, two S buffers, P and a K/V block then fit L1
        // (bench/NOTES.md). A tile's rows are independent, so S keeps the backward's bits.
        const int64_t half = p.head_dim_qk <= 64 && p.head_dim_v <= 64 ? kBlockQ / 2 : kBlockQ;
        for (int64_t q = query0; q < std::min(query0 + kBlockQ, p.seqlen_q); q += half) {
          forward_block_amx(p, packed[part], bh / p.heads_q, bh % p.heads_q, q, half);
        }
      } else {
        forward_block<T, Acc>(p, bh / p.heads_q, bh % p.heads_q, query0);
      }
    });
    trim_thread_packing_buffer();
    return;
  }
#endif
  parallel_for(tasks.total(), workers, [&](int64_t task, int) {
    const auto [part, index] = tasks.locate(task);
    const AttentionProblem& p = parts[part];
    const int64_t blocks = query_blocks(p);
    const int64_t bh = index / blocks;
    forward_block<T, Acc>(p, bh / p.heads_q, bh % p.heads_q, (index % blocks) * kBlockQ);
  });
}

}  // namespace

void attention_forward(const AttentionProblem& p) {
  dispatch_float_dtype(p.dtype, "attention", [&](auto element) { forward_typed<decltype(element)>(p); });
}

}  // namespace flashjit::cpu::FJ_CPU_ISA
