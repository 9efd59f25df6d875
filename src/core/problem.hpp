// AttentionProblem: every shape, stride, dtype and flag of one attention call,
// validated once and shared by every backend and both directions.
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

#include "core/bounds_core.h"
#include "flashjit/flashjit.h"

namespace flashjit {

// Upper bound on threads a call may ask for.
inline constexpr int32_t kMaxThreads = 1024;

// A [batch, heads, seqlen, dim] operand: base pointer and strides in elements.
// The last dimension is contiguous. Size-1 dims get stride 0 so that indexing
// never depends on a meaningless stride.
struct Operand {
  void* data = nullptr;
  int64_t stride_batch = 0;
  int64_t stride_head = 0;
  int64_t stride_seq = 0;

  template <typename T>
  T* row(int64_t b, int64_t h, int64_t s) const {
    return static_cast<T*>(data) + b * stride_batch + h * stride_head + s * stride_seq;
  }
};

enum class MaskKind { kNone, kBool, kAdditive };

struct AttentionProblem {
  // Sizes.
  int64_t batch = 0;
  int64_t heads_q = 0;
  int64_t heads_kv = 0;
  int64_t seqlen_q = 0;
  int64_t seqlen_k = 0;
  int64_t head_dim_qk = 0;
  int64_t head_dim_v = 0;
  fj_dtype dtype = FJ_FLOAT32;      // q, k, v, o (and the gradients)
  fj_dtype lse_dtype = FJ_FLOAT32;  // float32, or float64 for float64 inputs
  int32_t device_type = FJ_DEVICE_CPU;  // a backend's device code (backend.hpp)
  int32_t device_index = 0;

  // Tensors. Forward reads q, k, v and writes o, lse; backward also reads o, lse,
  // dout and writes dq, dk, dv.
  Operand q, k, v, o, dout, dq, dk, dv;
  void* lse = nullptr;  // [batch, heads_q, seqlen_q]
  int64_t lse_stride_batch = 0;
  int64_t lse_stride_head = 0;
  int64_t lse_stride_seq = 0;

  // Mask [b, h, i, j] with zero strides on broadcast dims.
  MaskKind mask_kind = MaskKind::kNone;
  fj_dtype mask_dtype = FJ_BOOL;
  const void* mask = nullptr;
  int64_t mask_stride[4] = {0, 0, 0, 0};

  double scale = 1.0;
  double softcap = 0.0;  // 0 = off
  fj_causal causal = FJ_CAUSAL_NONE;
  // Key j is visible from query i when  -window_left <= j - i - diagonal_shift <= window_right,
  // each bound ignored when -1. Causal masks are folded in here (window_right = 0).
  int64_t window_left = -1;
  int64_t window_right = -1;
  int64_t diagonal_shift = 0;

  double dropout_p = 0.0;
  uint32_t dropout_threshold = 0;  // drop when the Philox word is below this
  uint64_t dropout_seed = 0;
  uint64_t dropout_offset = 0;
  // fj_attention_options.dropout_seed_words on a device that reads them when the work runs
  // (CUDA); nullptr on the CPU, which read them into dropout_seed and dropout_offset.
  const uint32_t* dropout_seed_words = nullptr;

  int32_t num_threads = 0;
  void* stream = nullptr;  // CUDA stream to enqueue on
  void* workspace = nullptr;  // CUDA: the caller's scratch (fj_attention_options.workspace), or null
  size_t workspace_bytes = 0;
  // A backward may sum dQ in no fixed order where that measured faster (fj_attention_options.nondeterministic).
  bool nondeterministic = false;
  // CUDA: the caller's launcher (fj_attention_options.launch), or null: kernels launched on stream.
  decltype(fj_attention_options::launch) launch = nullptr;
  void* launch_data = nullptr;

  // A variable-length batch (fj_attention_varlen_*): the operands are packed, sequence
  // b being rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q, o, lse, dout and dq
  // and rows cu_seqlens_k[b] .. of k, v, dk and dv; seqlen_q and seqlen_k are the
  // longest lengths and the batch strides 0. Host memory, validated. Null: a dense batch.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  // The offsets are in the operands' device memory instead (CUDA; fj_varlen): not
  // validated, never read by the host; seqlen_q and seqlen_k are the given maxima.
  bool offsets_on_device = false;
  int64_t total_q = 0;  // the packed rows of q and of k (a variable-length batch's totals)
  int64_t total_k = 0;
  // A KV cache (fj_varlen.seqused_k): sequence b uses its first seqused_k[b] keys.
  const int32_t* seqused_k = nullptr;
  // A paged KV cache (fj_varlen.page_table): key j of batch entry b is row j % page_size
  // of page page_table[b * page_table_stride + j / page_size]; k's and v's batch strides
  // step pages. Null: each key at its row.
  const int32_t* page_table = nullptr;
  int64_t page_table_stride = 0;
  int64_t page_table_width = 0;  // pages a row of the table holds (max_pages)
  int64_t page_size = 0;
  int64_t num_pages = 0;
  // seqused_k (and page_table) are in the operands' CUDA memory (fj_varlen): never read by the
  // host, their values not validated; the kernels clamp each count into 0 .. seqlen_k (the given
  // maximum, or the longest sequence's rows or the pages' keys; the one-launch path takes only
  // sequences of equal rows) and each page index into the pages.
  bool kv_on_device = false;

  // The dropout counter's batch index of batch entry 0: a sequence of a variable-length
  // batch run as a problem of its own draws as batch entry `dropout_batch` of a padded batch.
  int64_t dropout_batch = 0;
  // A part of one batch entry's heads run as a problem of its own (heads_part): its query head 0
  // draws as head `dropout_head` of `dropout_heads` (0: this problem's heads_q, from head 0).
  int64_t dropout_head = 0;
  int64_t dropout_heads = 0;

  bool varlen() const { return cu_seqlens_q != nullptr; }
  // The dropout counter's (batch entry, head) index of this problem's batch entry b and query head h.
  int64_t dropout_index(int64_t b, int64_t h) const {
    return (dropout_batch + b) * (dropout_heads > 0 ? dropout_heads : heads_q) + dropout_head + h;
  }

  // Key `key`'s row of a key-side operand (k, v), through the page table where there is one.
  template <typename T>
  T* key_row(const Operand& x, int64_t b, int64_t h, int64_t key) const {
    if (page_table == nullptr) return x.row<T>(b, h, key);
    return x.row<T>(page_table[b * page_table_stride + key / page_size], h, key % page_size);
  }
  // How many of `count` keys from `key` on lie in consecutive rows (the rest of its page).
  int64_t consecutive_keys(int64_t key, int64_t count) const {
    if (page_table == nullptr) return count;
    const int64_t left = page_size - key % page_size;
    return count < left ? count : left;
  }

  int64_t group_size() const { return heads_kv > 0 ? heads_q / heads_kv : 0; }
  bool has_dropout() const { return dropout_threshold != 0; }

  // First and one-past-last key a query row can see, and query row that can see
  // a key, through the causal/window bounds (bounds_core.h).
  int64_t key_begin(int64_t query) const { return visible_key_begin(query, diagonal_shift, window_left, seqlen_k); }
  int64_t key_end(int64_t query) const { return visible_key_end(query, diagonal_shift, window_right, seqlen_k); }
  int64_t query_begin(int64_t key) const {
    return visible_query_begin(key, diagonal_shift, window_right, seqlen_q);
  }
  int64_t query_end(int64_t key) const { return visible_query_end(key, diagonal_shift, window_left, seqlen_q); }
};

// Build and validate. Throw flashjit::Error naming the argument on bad input.
// descriptors_only: validate shapes, strides, dtypes, devices and options alone
// (data pointers may be NULL; memory shared between tensors, a fact of
// addresses, is not checked), for callers that describe tensors without memory
// (torch's fake tensors, lazy arrays).
AttentionProblem make_forward_problem(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                      const fj_attention_options* options, const fj_tensor* o,
                                      const fj_tensor* lse, bool descriptors_only = false);

AttentionProblem make_backward_problem(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                       const fj_tensor* o, const fj_tensor* lse, const fj_tensor* dout,
                                       const fj_attention_options* options, const fj_tensor* dq,
                                       const fj_tensor* dk, const fj_tensor* dv, bool descriptors_only = false);

// A variable-length batch's call (fj_varlen's layouts, see flashjit.h): validated as
// the dense call on [1, H, total, D] views of the packed operands, then the offsets.
AttentionProblem make_varlen_forward_problem(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                             const fj_varlen* varlen, const fj_attention_options* options,
                                             const fj_tensor* o, const fj_tensor* lse, bool descriptors_only = false);
AttentionProblem make_varlen_backward_problem(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                              const fj_tensor* o, const fj_tensor* lse, const fj_tensor* dout,
                                              const fj_varlen* varlen, const fj_attention_options* options,
                                              const fj_tensor* dq, const fj_tensor* dk, const fj_tensor* dv,
                                              bool descriptors_only = false);

// Sequence b of a variable-length batch as a dense problem of batch 1 (views of the
// packed operands, its own lengths and causal diagonal, dropout_batch = b).
AttentionProblem sequence_problem(const AttentionProblem& p, int64_t b);
// A variable-length problem whose offsets were in device memory, given them in host
// memory (a backend's copy, batch + 1 each): checked as host offsets are (and against
// the maxima the call gave), then taken; `op` names the call in errors.
void adopt_host_offsets(const char* op, AttentionProblem& p, const int32_t* offsets_q, const int32_t* offsets_k);

// A KV cache whose counts (and pages) were in device memory (kv_on_device), copied to the host
// by the backend: `counts` [batch] and `pages` (null, or [batch][page_table_width] packed),
// checked as host ones are, and taken as the problem's.
void adopt_host_kv_cache(const char* op, AttentionProblem& p, const int32_t* counts, const int32_t* pages);
// Batch entries [batch_first, batch_first + batch_count) and key/value heads [kv_first, kv_first +
// kv_count) of a dense problem, with their query heads, as a problem of its own: views of the
// operands (lse and mask included), drawing dropout as the whole does. A part of the heads
// (kv_count < heads_kv) has one batch entry.
AttentionProblem heads_part(const AttentionProblem& p, int64_t batch_first, int64_t batch_count, int64_t kv_first,
                            int64_t kv_count);
// The dense problems a call runs: p itself (nothing copied or allocated, the common case on
// every call's path), or each sequence of a variable-length batch (sequence_problem).
class DenseParts {
 public:
  explicit DenseParts(const AttentionProblem& p);
  const AttentionProblem* begin() const { return sequences_.empty() ? whole_ : sequences_.data(); }
  const AttentionProblem* end() const { return begin() + size(); }
  size_t size() const { return sequences_.empty() ? 1 : sequences_.size(); }
  const AttentionProblem& operator[](size_t i) const { return begin()[i]; }

 private:
  const AttentionProblem* whole_;
  std::vector<AttentionProblem> sequences_;
};

// One query with grouped heads (decoding with GQA/MQA) as the same attention
// with the group's query heads as query rows of their key/value head, so that a
// kernel reads each key once for the whole group instead of once a query head.
// Only where nothing depends on a row's index: one query row, no dropout (its
// counter names the head and row), no left window bound, and a right bound
// (causal) that lets the query see every key; p itself otherwise. The strides
// address the caller's q, o, lse and mask in place (no copy).
AttentionProblem with_query_groups_packed(const AttentionProblem& p);

}  // namespace flashjit
