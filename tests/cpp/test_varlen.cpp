// Variable-length batches through the C API (fj_attention_varlen_*): each packed
// sequence gives what the dense call on that sequence alone gives, bit for bit on
// the CPU (the same kernels on views); dropout draws as a padded batch; bad offsets
// and shapes are named, and nothing is written.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "core/dtype.hpp"
#include "harness.hpp"

namespace flashjit::testing {
namespace {

// Rows [first, first + length) of a packed [total, H, D] tensor as [1, H, length, D].
fj_tensor sequence_view(fj_tensor packed, int64_t first, int64_t length) {
  fj_tensor t = packed;
  t.data = static_cast<char*>(packed.data) + first * packed.strides[0] * int64_t(dtype_size(packed.dtype));
  t.ndim = 4;
  t.shape[0] = 1, t.shape[1] = packed.shape[1], t.shape[2] = length, t.shape[3] = packed.shape[2];
  t.strides[0] = 0, t.strides[1] = packed.strides[1], t.strides[2] = packed.strides[0];
  t.strides[3] = packed.strides[2];
  return t;
}

// Columns [first, first + length) of lse [H, total] as [1, H, length].
fj_tensor lse_view(fj_tensor packed, int64_t first, int64_t length) {
  fj_tensor t = packed;
  t.data = static_cast<char*>(packed.data) + first * packed.strides[1] * int64_t(dtype_size(packed.dtype));
  t.ndim = 3;
  t.shape[0] = 1, t.shape[1] = packed.shape[0], t.shape[2] = length;
  t.strides[0] = 0, t.strides[1] = packed.strides[0], t.strides[2] = packed.strides[1];
  return t;
}

std::vector<int32_t> offsets_of(const std::vector<int64_t>& lengths) {
  std::vector<int32_t> offsets(1, 0);
  for (int64_t n : lengths) offsets.push_back(offsets.back() + int32_t(n));
  return offsets;
}

fj_tensor host_offsets(std::vector<int32_t>& values) {
  fj_tensor t;
  std::memset(&t, 0, sizeof t);
  t.data = values.data();
  t.dtype = FJ_INT32;
  t.device_type = FJ_DEVICE_CPU;
  t.ndim = 1;
  t.shape[0] = int64_t(values.size());
  t.strides[0] = 1;
  return t;
}

// A packed batch and a second set of outputs for the per-sequence dense calls.
struct Packed {
  std::vector<int64_t> lengths_q, lengths_k;
  std::vector<int32_t> offsets_q, offsets_k;
  GuardedTensor q, k, v, dout, o, lse, dq, dk, dv;          // the varlen call's
  GuardedTensor o_ref, lse_ref, dq_ref, dk_ref, dv_ref;     // the dense calls'
  fj_varlen varlen{};

  Packed(std::vector<int64_t> lq, std::vector<int64_t> lk, int64_t hq, int64_t hkv, int64_t d, fj_dtype dtype)
      : lengths_q(lq), lengths_k(lk), offsets_q(offsets_of(lq)), offsets_k(offsets_of(lk)),
        q({total(lq), hq, d}, dtype, Layout::kPadded), k({total(lk), hkv, d}, dtype, Layout::kPadded),
        v({total(lk), hkv, d}, dtype), dout({total(lq), hq, d}, dtype), o({total(lq), hq, d}, dtype),
        lse({hq, total(lq)}, FJ_FLOAT32, Layout::kPadded), dq({total(lq), hq, d}, dtype),
        dk({total(lk), hkv, d}, dtype), dv({total(lk), hkv, d}, dtype), o_ref({total(lq), hq, d}, dtype),
        lse_ref({hq, total(lq)}, FJ_FLOAT32, Layout::kPadded), dq_ref({total(lq), hq, d}, dtype),
        dk_ref({total(lk), hkv, d}, dtype), dv_ref({total(lk), hkv, d}, dtype) {
    q.fill_normal(1), k.fill_normal(2), v.fill_normal(3), dout.fill_normal(4);
    for (GuardedTensor* t : {&o, &lse, &dq, &dk, &dv, &o_ref, &lse_ref, &dq_ref, &dk_ref, &dv_ref}) t->poison();
    varlen.cu_seqlens_q = host_offsets(offsets_q);
    varlen.cu_seqlens_k = host_offsets(offsets_k);
    varlen.max_seqlen_q = varlen.max_seqlen_k = 0;
  }
  static int64_t total(const std::vector<int64_t>& lengths) {
    return std::accumulate(lengths.begin(), lengths.end(), int64_t(0));
  }

  fj_status forward(const fj_attention_options& options) {
    fj_tensor tq = q.view(), tk = k.view(), tv = v.view(), to = o.view(), tlse = lse.view();
    return fj_attention_varlen_forward(&tq, &tk, &tv, &varlen, &options, &to, &tlse);
  }
  fj_status backward(const fj_attention_options& options) {
    fj_tensor tq = q.view(), tk = k.view(), tv = v.view(), to = o.view(), tlse = lse.view(), tdo = dout.view();
    fj_tensor tdq = dq.view(), tdk = dk.view(), tdv = dv.view();
    return fj_attention_varlen_backward(&tq, &tk, &tv, &to, &tlse, &tdo, &varlen, &options, &tdq, &tdk, &tdv);
  }
  // Each sequence through the dense entry points into the _ref outputs.
  void dense_one_by_one(const fj_attention_options& options) {
    for (size_t b = 0; b + 1 < offsets_q.size(); ++b) {
      const int64_t fq = offsets_q[b], lq = lengths_q[b], fk = offsets_k[b], lk = lengths_k[b];
      fj_tensor sq = sequence_view(q.view(), fq, lq), sk = sequence_view(k.view(), fk, lk),
                sv = sequence_view(v.view(), fk, lk), so = sequence_view(o_ref.view(), fq, lq),
                slse = lse_view(lse_ref.view(), fq, lq), sdo = sequence_view(dout.view(), fq, lq),
                sdq = sequence_view(dq_ref.view(), fq, lq), sdk = sequence_view(dk_ref.view(), fk, lk),
                sdv = sequence_view(dv_ref.view(), fk, lk);
      ASSERT_EQ(fj_attention_forward(&sq, &sk, &sv, &options, &so, &slse), FJ_SUCCESS) << fj_last_error();
      ASSERT_EQ(fj_attention_backward(&sq, &sk, &sv, &so, &slse, &sdo, &options, &sdq, &sdk, &sdv), FJ_SUCCESS)
          << fj_last_error();
    }
  }
};

bool same_bits(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!(a[i] == b[i] || (std::isnan(a[i]) && std::isnan(b[i])))) return false;
  }
  return true;
}

struct VarlenCase {
  const char* name;
  fj_causal causal;
  int64_t window_left, window_right;
  double softcap;
  fj_dtype dtype;
};

class VarlenMatchesDense : public ::testing::TestWithParam<VarlenCase> {};

TEST_P(VarlenMatchesDense, SequenceBySequence) {
  const VarlenCase c = GetParam();
  // Empty sequences on either side, a single row, one long among short ones.
  Packed p({5, 0, 1, 130, 64, 7, 3}, {9, 4, 1, 97, 200, 0, 3}, 4, 2, 24, c.dtype);
  fj_attention_options options = fj_attention_options_default();
  options.causal = c.causal;
  options.window_left = c.window_left;
  options.window_right = c.window_right;
  options.softcap = c.softcap;
  ASSERT_EQ(p.forward(options), FJ_SUCCESS) << fj_last_error();
  ASSERT_EQ(p.backward(options), FJ_SUCCESS) << fj_last_error();
  p.dense_one_by_one(options);
  // Keys of a sequence with no query get zero gradients from both (the dense call with no
  // query writes them too), so the whole packed buffers compare.
  EXPECT_TRUE(same_bits(p.o.values(), p.o_ref.values()));
  EXPECT_TRUE(same_bits(p.lse.values(), p.lse_ref.values()));
  EXPECT_TRUE(same_bits(p.dq.values(), p.dq_ref.values()));
  EXPECT_TRUE(same_bits(p.dk.values(), p.dk_ref.values()));
  EXPECT_TRUE(same_bits(p.dv.values(), p.dv_ref.values()));
  for (const GuardedTensor* t : {&p.o, &p.lse, &p.dq, &p.dk, &p.dv}) EXPECT_TRUE(t->guards_intact());
}

INSTANTIATE_TEST_SUITE_P(Cases, VarlenMatchesDense,
                         ::testing::Values(VarlenCase{"plain", FJ_CAUSAL_NONE, -1, -1, 0.0, FJ_FLOAT32},
                                           VarlenCase{"bottom_right", FJ_CAUSAL_BOTTOM_RIGHT, -1, -1, 0.0, FJ_FLOAT32},
                                           VarlenCase{"top_left", FJ_CAUSAL_TOP_LEFT, -1, -1, 0.0, FJ_BFLOAT16},
                                           VarlenCase{"window", FJ_CAUSAL_NONE, 6, 2, 0.0, FJ_FLOAT16},
                                           VarlenCase{"softcap", FJ_CAUSAL_NONE, -1, -1, 5.0, FJ_FLOAT32}),
                         [](const auto& info) { return std::string(info.param.name); });

// With equal lengths the packed batch is the dense batch [B, H, S, D] stored sequence-major:
// dropout, drawn as a padded batch, drops the same elements, so every output is equal.
TEST(Varlen, DropoutDrawsAsThePaddedBatch) {
  const int64_t batch = 3, length = 37, heads = 2, dim = 16;
  Packed p(std::vector<int64_t>(batch, length), std::vector<int64_t>(batch, length), heads, heads, dim, FJ_FLOAT32);
  fj_attention_options options = fj_attention_options_default();
  options.dropout_p = 0.3;
  options.dropout_seed = 17;
  options.dropout_offset = 5;
  ASSERT_EQ(p.forward(options), FJ_SUCCESS) << fj_last_error();
  ASSERT_EQ(p.backward(options), FJ_SUCCESS) << fj_last_error();
  // The same memory as a dense batch: packed row b * length + s is (b, s).
  const auto dense = [&](GuardedTensor& t) {
    fj_tensor x = t.view();
    fj_tensor d = x;
    d.ndim = 4;
    d.shape[0] = batch, d.shape[1] = x.shape[1], d.shape[2] = length, d.shape[3] = x.shape[2];
    d.strides[0] = length * x.strides[0], d.strides[1] = x.strides[1], d.strides[2] = x.strides[0];
    d.strides[3] = x.strides[2];
    return d;
  };
  fj_tensor q = dense(p.q), k = dense(p.k), v = dense(p.v), o = dense(p.o_ref), dout = dense(p.dout);
  fj_tensor dq = dense(p.dq_ref), dk = dense(p.dk_ref), dv = dense(p.dv_ref);
  fj_tensor packed_lse = p.lse_ref.view(), lse = packed_lse;
  lse.shape[0] = batch, lse.shape[1] = heads, lse.shape[2] = length;
  lse.strides[0] = length * packed_lse.strides[1], lse.strides[1] = packed_lse.strides[0];
  lse.strides[2] = packed_lse.strides[1];
  lse.ndim = 3;
  ASSERT_EQ(fj_attention_forward(&q, &k, &v, &options, &o, &lse), FJ_SUCCESS) << fj_last_error();
  ASSERT_EQ(fj_attention_backward(&q, &k, &v, &o, &lse, &dout, &options, &dq, &dk, &dv), FJ_SUCCESS)
      << fj_last_error();
  EXPECT_TRUE(same_bits(p.o.values(), p.o_ref.values()));
  EXPECT_TRUE(same_bits(p.lse.values(), p.lse_ref.values()));
  EXPECT_TRUE(same_bits(p.dq.values(), p.dq_ref.values()));
  EXPECT_TRUE(same_bits(p.dk.values(), p.dk_ref.values()));
  EXPECT_TRUE(same_bits(p.dv.values(), p.dv_ref.values()));
}

// Each bad input names its argument, and the outputs keep their poison.
TEST(Varlen, BadInputsAreNamedAndNothingIsWritten) {
  struct Bad {
    const char* expect;
    void (*spoil)(Packed&, fj_attention_options&);
  };
  const Bad cases[] = {
      {"cu_seqlens_q: offsets must not decrease", [](Packed& p, fj_attention_options&) { p.offsets_q[2] = 1; }},
      {"cu_seqlens_k: expected the last offset to be the number of packed rows",
       [](Packed& p, fj_attention_options&) { p.offsets_k.back() -= 1; }},
      {"cu_seqlens_q: expected offset 0 to be 0", [](Packed& p, fj_attention_options&) { p.offsets_q[0] = 1; }},
      {"cu_seqlens_k: expected 4 offsets",
       [](Packed& p, fj_attention_options&) { p.varlen.cu_seqlens_k.shape[0] = 3; }},
      {"cu_seqlens_q: expected dtype int32",
       [](Packed& p, fj_attention_options&) { p.varlen.cu_seqlens_q.dtype = FJ_INT64; }},
      {"cu_seqlens_q: expected host (cpu) memory",
       [](Packed& p, fj_attention_options&) { p.varlen.cu_seqlens_q.device_type = FJ_DEVICE_CUDA; }},
      {"max_seqlen_k: expected 0 (the longest) or a bound >= the longest sequence (8)",
       [](Packed& p, fj_attention_options&) { p.varlen.max_seqlen_k = 7; }},
      {"mask: variable-length batches take no mask",
       [](Packed& p, fj_attention_options& options) { options.mask = p.q.view(); }},
  };
  for (const Bad& bad : cases) {
    Packed p({3, 5, 2}, {4, 8, 1}, 2, 1, 8, FJ_FLOAT32);
    fj_attention_options options = fj_attention_options_default();
    bad.spoil(p, options);
    EXPECT_NE(p.forward(options), FJ_SUCCESS) << bad.expect;
    EXPECT_NE(std::string(fj_last_error()).find(bad.expect), std::string::npos) << fj_last_error();
    EXPECT_NE(p.backward(options), FJ_SUCCESS) << bad.expect;
    EXPECT_NE(std::string(fj_last_error()).find(bad.expect), std::string::npos) << fj_last_error();
    for (const GuardedTensor* t : {&p.o, &p.lse, &p.dq, &p.dk, &p.dv}) {
      for (double x : t->values()) ASSERT_TRUE(std::isnan(x)) << bad.expect;
    }
  }
  // Packed shapes are named in their own terms.
  Packed p({3, 5}, {4, 8}, 2, 1, 8, FJ_FLOAT32);
  fj_attention_options options = fj_attention_options_default();
  fj_tensor q = p.q.view(), k = p.k.view(), v = p.v.view(), o = p.o.view(), lse = p.lse.view();
  lse.shape[1] -= 1;
  EXPECT_EQ(fj_attention_varlen_forward(&q, &k, &v, &p.varlen, &options, &o, &lse), FJ_ERROR_INVALID_VALUE);
  EXPECT_NE(std::string(fj_last_error()).find("lse: expected shape [2, 8] ([heads_q, total_q])"), std::string::npos)
      << fj_last_error();
  lse = p.lse.view();
  v.shape[0] -= 1;
  EXPECT_EQ(fj_attention_varlen_forward(&q, &k, &v, &p.varlen, &options, &o, &lse), FJ_ERROR_INVALID_VALUE);
  EXPECT_NE(std::string(fj_last_error()).find("v: expected shape [12, 1, 8]"), std::string::npos) << fj_last_error();
}

// A KV cache: each sequence uses the first seqused_k[b] of its rows (a dense cache [B, S_cache]
// as packed rows), or its keys live in shuffled pages. Against the dense call on that
// sequence's keys alone: bit for bit for the dense cache (the same blocks), to float64
// rounding for pages (blocks end at page boundaries).
struct Cache {
  int64_t batch = 3, sq = 5, capacity = 64, heads_q = 4, heads_kv = 2, dim = 16, page = 16;
  std::vector<int32_t> used = {17, 0, 40};
  std::vector<int32_t> offsets_q, offsets_k, table;
  int64_t pages_per_sequence = 4, num_pages = 14;
  GuardedTensor q, k, v, o, lse, k_pages, v_pages, o_ref, lse_ref;
  fj_varlen varlen{};

  Cache()
      : q({3 * 5, 4, 16}, FJ_FLOAT64), k({3 * 64, 2, 16}, FJ_FLOAT64), v({3 * 64, 2, 16}, FJ_FLOAT64),
        o({3 * 5, 4, 16}, FJ_FLOAT64), lse({4, 3 * 5}, FJ_FLOAT64), k_pages({14, 16, 2, 16}, FJ_FLOAT64, Layout::kPadded),
        v_pages({14, 16, 2, 16}, FJ_FLOAT64), o_ref({3 * 5, 4, 16}, FJ_FLOAT64), lse_ref({4, 3 * 5}, FJ_FLOAT64) {
    q.fill_normal(1), k.fill_normal(2), v.fill_normal(3);
    for (int64_t b = 0; b <= batch; ++b) offsets_q.push_back(int32_t(b * sq)), offsets_k.push_back(int32_t(b * capacity));
    // Pages in a shuffled order: sequence b's page i is page (5 * (b * 4 + i) + 3) % 14 (all distinct).
    std::vector<double> kv = k.values(), vv = v.values(), kp(size_t(k_pages.numel()), 0.5), vp(kp);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t i = 0; i < pages_per_sequence; ++i) {
        const int64_t index = (5 * (b * pages_per_sequence + i) + 3) % num_pages;
        table.push_back(int32_t(index));
        const int64_t row_elems = heads_kv * dim, page_elems = page * row_elems;
        std::copy_n(kv.begin() + (b * capacity + i * page) * row_elems, page_elems, kp.begin() + index * page_elems);
        std::copy_n(vv.begin() + (b * capacity + i * page) * row_elems, page_elems, vp.begin() + index * page_elems);
      }
    }
    k_pages.fill(kp), v_pages.fill(vp);
    for (GuardedTensor* t : {&o, &lse, &o_ref, &lse_ref}) t->poison();
    varlen.cu_seqlens_q = host_offsets(offsets_q);
    varlen.cu_seqlens_k = host_offsets(offsets_k);
    varlen.seqused_k = host_offsets(used);
    varlen.seqused_k.shape[0] = batch;
  }
  fj_tensor table_view() {
    fj_tensor t = host_offsets(table);
    t.ndim = 2;
    t.shape[0] = batch, t.shape[1] = pages_per_sequence;
    t.strides[0] = pages_per_sequence, t.strides[1] = 1;
    return t;
  }
  void use_pages() {
    varlen.page_table = table_view();
    std::memset(&varlen.cu_seqlens_k, 0, sizeof varlen.cu_seqlens_k);
  }
  fj_status forward(const fj_attention_options& options, bool paged) {
    fj_tensor tq = q.view(), tk = paged ? k_pages.view() : k.view(), tv = paged ? v_pages.view() : v.view();
    fj_tensor to = o.view(), tlse = lse.view();
    return fj_attention_varlen_forward(&tq, &tk, &tv, &varlen, &options, &to, &tlse);
  }
  void dense_one_by_one(const fj_attention_options& options) {
    for (int64_t b = 0; b < batch; ++b) {
      fj_tensor sq_ = sequence_view(q.view(), b * sq, sq), sk = sequence_view(k.view(), b * capacity, used[b]),
                sv = sequence_view(v.view(), b * capacity, used[b]), so = sequence_view(o_ref.view(), b * sq, sq),
                slse = lse_view(lse_ref.view(), b * sq, sq);
      ASSERT_EQ(fj_attention_forward(&sq_, &sk, &sv, &options, &so, &slse), FJ_SUCCESS) << fj_last_error();
    }
  }
};

double max_difference(const std::vector<double>& a, const std::vector<double>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isinf(a[i]) && a[i] == b[i]) continue;
    worst = std::max(worst, std::abs(a[i] - b[i]));
  }
  return worst;
}

// Offsets in the operands' CUDA memory are not read by the host: the check names the
// maxima they need and the inputs they cannot come with (descriptors only: no GPU here).
TEST(Varlen, OffsetsInDeviceMemoryNeedTheMaxima) {
  struct Bad {
    const char* expect;
    void (*spoil)(fj_varlen&, fj_tensor&);
  };
  const Bad cases[] = {
      {"max_seqlen_q: expected the longest length (> 0) with offsets in device memory",
       [](fj_varlen& v, fj_tensor&) { v.max_seqlen_q = 0; }},
      {"max_seqlen_k: expected the longest length (> 0) with offsets in device memory",
       [](fj_varlen& v, fj_tensor&) { v.max_seqlen_k = 0; }},
      {"cu_seqlens_k: expected the memory of the operands (cuda:0)",
       [](fj_varlen& v, fj_tensor&) { v.cu_seqlens_k.device_index = 1; }},
      {"cu_seqlens_q: expected host (cpu) memory with seqused_k",
       [](fj_varlen& v, fj_tensor& used) { v.seqused_k = used; }},
      {"", [](fj_varlen&, fj_tensor&) {}},  // the maxima given: accepted without reading the offsets
  };
  for (const Bad& bad : cases) {
    Packed p({3, 5, 2}, {4, 8, 1}, 2, 1, 8, FJ_FLOAT16);
    fj_tensor q = p.q.view(), k = p.k.view(), v = p.v.view(), o = p.o.view(), lse = p.lse.view();
    for (fj_tensor* t : {&q, &k, &v, &o, &lse, &p.varlen.cu_seqlens_q, &p.varlen.cu_seqlens_k}) {
      t->data = nullptr;
      t->device_type = FJ_DEVICE_CUDA;
      t->device_index = 0;
    }
    fj_tensor used = p.varlen.cu_seqlens_q;
    used.shape[0] = 3;
    p.varlen.max_seqlen_q = 5;
    p.varlen.max_seqlen_k = 8;
    bad.spoil(p.varlen, used);
    const fj_attention_options options = fj_attention_options_default();
    const fj_status status = fj_attention_varlen_check_forward(&q, &k, &v, &p.varlen, &options, &o, &lse);
    if (*bad.expect == '\0') {
      EXPECT_EQ(status, FJ_SUCCESS) << fj_last_error();
    } else {
      EXPECT_NE(status, FJ_SUCCESS) << bad.expect;
      EXPECT_NE(std::string(fj_last_error()).find(bad.expect), std::string::npos) << fj_last_error();
    }
  }
}

// A KV cache's counts in the operands' CUDA memory are not read by the host (the kernels clamp
// them): descriptors on the operands' device are accepted with host offsets, others are named.
TEST(VarlenCache, CountsInDeviceMemoryAreCheckedByDescriptor) {
  struct Case {
    const char* expect;
    void (*spoil)(fj_varlen&);
  };
  const Case cases[] = {
      {"", [](fj_varlen&) {}},
      {"", [](fj_varlen& v) { v.max_seqlen_k = 5; }},     // a bound clamps the counts
      {"", [](fj_varlen& v) { v.max_seqlen_k = 1000; }},  // and is clamped to the cache's rows
      {"seqused_k: expected the memory of the operands (cuda:0) with seqused_k there, got cuda:1",
       [](fj_varlen& v) { v.seqused_k.device_index = 1; }},
      {"seqused_k: expected dtype int32", [](fj_varlen& v) { v.seqused_k.dtype = FJ_INT64; }},
      {"seqused_k: expected 3 counts", [](fj_varlen& v) { v.seqused_k.shape[0] = 2; }},
      {"max_seqlen_k: expected 0 or a bound > 0", [](fj_varlen& v) { v.max_seqlen_k = -1; }},
  };
  for (const Case& c : cases) {
    Packed p({3, 5, 2}, {4, 8, 1}, 2, 1, 8, FJ_FLOAT16);
    fj_tensor q = p.q.view(), k = p.k.view(), v = p.v.view(), o = p.o.view(), lse = p.lse.view();
    for (fj_tensor* t : {&q, &k, &v, &o, &lse}) {
      t->data = nullptr;
      t->device_type = FJ_DEVICE_CUDA;
      t->device_index = 0;
    }
    fj_tensor used{};
    used.dtype = FJ_INT32;
    used.device_type = FJ_DEVICE_CUDA;
    used.ndim = 1;
    used.shape[0] = 3;
    used.strides[0] = 1;
    p.varlen.seqused_k = used;
    c.spoil(p.varlen);
    const fj_attention_options options = fj_attention_options_default();
    const fj_status status = fj_attention_varlen_check_forward(&q, &k, &v, &p.varlen, &options, &o, &lse);
    if (*c.expect == '\0') {
      EXPECT_EQ(status, FJ_SUCCESS) << fj_last_error();
    } else {
      EXPECT_NE(status, FJ_SUCCESS) << c.expect;
      EXPECT_NE(std::string(fj_last_error()).find(c.expect), std::string::npos) << fj_last_error();
    }
  }
}

TEST(VarlenCache, UsedKeysOfADenseCacheAndOfPages) {
  for (const fj_causal causal : {FJ_CAUSAL_NONE, FJ_CAUSAL_BOTTOM_RIGHT}) {
    Cache cache;
    fj_attention_options options = fj_attention_options_default();
    options.causal = causal;
    cache.dense_one_by_one(options);
    ASSERT_EQ(cache.forward(options, false), FJ_SUCCESS) << fj_last_error();
    EXPECT_TRUE(same_bits(cache.o.values(), cache.o_ref.values()));
    EXPECT_TRUE(same_bits(cache.lse.values(), cache.lse_ref.values()));
    cache.o.poison(), cache.lse.poison();
    cache.use_pages();
    ASSERT_EQ(cache.forward(options, true), FJ_SUCCESS) << fj_last_error();
    EXPECT_LT(max_difference(cache.o.values(), cache.o_ref.values()), 1e-12);
    EXPECT_LT(max_difference(cache.lse.values(), cache.lse_ref.values()), 1e-12);
    EXPECT_TRUE(cache.o.guards_intact() && cache.lse.guards_intact());
  }
}

TEST(VarlenCache, BadCachesAreNamed) {
  const auto expect_error = [](Cache& cache, bool paged, const char* text) {
    fj_attention_options options = fj_attention_options_default();
    EXPECT_NE(cache.forward(options, paged), FJ_SUCCESS) << text;
    EXPECT_NE(std::string(fj_last_error()).find(text), std::string::npos) << fj_last_error();
    for (double x : cache.o.values()) ASSERT_TRUE(std::isnan(x)) << text;
  };
  struct Bad {
    bool paged;
    const char* expect;
    void (*spoil)(Cache&);
  };
  const Bad cases[] = {
      {false, "seqused_k: sequence 2 uses 65 keys; expected 0 to 64 (its rows in cu_seqlens_k)",
       [](Cache& c) { c.used[2] = 65; }},
      {true, "page_table: page 1 of sequence 2 is 14; expected 0 to 13",
       [](Cache& c) { c.use_pages(), c.table[9] = 14; }},
      {true, "cu_seqlens_k: expected none with a page table",
       [](Cache& c) { c.use_pages(), c.varlen.cu_seqlens_k = host_offsets(c.offsets_k); }},
      {true, "seqused_k: sequence 0 uses 65 keys; expected 0 to 64 (its pages)",
       [](Cache& c) { c.use_pages(), c.used[0] = 65; }},
      {true, "seqused_k: expected each sequence's key count with a page table",
       [](Cache& c) { c.use_pages(), std::memset(&c.varlen.seqused_k, 0, sizeof c.varlen.seqused_k); }},
  };
  for (const Bad& bad : cases) {
    Cache cache;
    bad.spoil(cache);
    expect_error(cache, bad.paged, bad.expect);
  }
  {
    Cache cache;
    cache.use_pages();
    fj_attention_options options = fj_attention_options_default();
    fj_tensor q = cache.q.view(), k = cache.k_pages.view(), v = cache.v_pages.view(), o = cache.o.view(),
              lse = cache.lse.view();
    k.shape[1] = v.shape[1] = 8;
    EXPECT_EQ(fj_attention_varlen_forward(&q, &k, &v, &cache.varlen, &options, &o, &lse), FJ_ERROR_INVALID_VALUE);
    EXPECT_NE(std::string(fj_last_error()).find("k: expected a page size (dim 1) that is a multiple of 16, got 8"),
              std::string::npos)
        << fj_last_error();
    fj_tensor dout = o, dq = q, dk = cache.k_pages.view(), dv = cache.v_pages.view();
    k = cache.k_pages.view(), v = cache.v_pages.view();
    EXPECT_EQ(fj_attention_varlen_backward(&q, &k, &v, &o, &lse, &dout, &cache.varlen, &options, &dq, &dk, &dv),
              FJ_ERROR_UNSUPPORTED);
    EXPECT_NE(std::string(fj_last_error()).find("paged KV caches are forward only"), std::string::npos)
        << fj_last_error();
  }
}

}  // namespace
}  // namespace flashjit::testing
