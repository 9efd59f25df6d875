// Bad input: each gets a status and a message naming the argument and the value.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "harness.hpp"

namespace flashjit::testing {
namespace {

struct Call {
  fj_tensor q, k, v, o, lse, dout, dq, dk, dv;
  fj_attention_options options;
};

// Stores an arbitrary integer in a C enum field, as a C caller can.
template <typename Enum>
void set_code(Enum& field, int32_t code) {
  std::memcpy(&field, &code, sizeof code);
}

struct BadInput {
  std::string name;
  std::function<void(Call&)> corrupt;
  fj_status status;
  std::string message;  // must appear in fj_last_error()
};

class Errors : public ::testing::Test {
 protected:
  // Valid tensors: B=2, Hq=4, Hkv=2, Sq=8, Sk=12, D=16, float32.
  GuardedTensor q_{{2, 4, 8, 16}, FJ_FLOAT32}, k_{{2, 2, 12, 16}, FJ_FLOAT32}, v_{{2, 2, 12, 16}, FJ_FLOAT32};
  GuardedTensor o_{{2, 4, 8, 16}, FJ_FLOAT32}, lse_{{2, 4, 8}, FJ_FLOAT32}, dout_{{2, 4, 8, 16}, FJ_FLOAT32};
  GuardedTensor dq_{{2, 4, 8, 16}, FJ_FLOAT32}, dk_{{2, 2, 12, 16}, FJ_FLOAT32},
      dv_{{2, 2, 12, 16}, FJ_FLOAT32};
  GuardedTensor mask_{{1, 1, 8, 12}, FJ_BOOL}, int_mask_{{1, 1, 8, 12}, FJ_INT32};
  GuardedTensor half_{{2, 2, 12, 16}, FJ_FLOAT16};

  Call valid() {
    q_.fill_normal(1);
    k_.fill_normal(2);
    v_.fill_normal(3);
    dout_.fill_normal(4);
    Call c{q_.view(),    k_.view(),  v_.view(),  o_.view(),  lse_.view(),
           dout_.view(), dq_.view(), dk_.view(), dv_.view(), fj_attention_options_default()};
    return c;
  }

  void expect_rejected(const BadInput& bad) {
    // Each case after a valid forward on the same tensors: the bad arguments are still checked.
    Call good = valid();
    ASSERT_EQ(fj_attention_forward(&good.q, &good.k, &good.v, &good.options, &good.o, &good.lse), FJ_SUCCESS)
        << fj_last_error();
    o_.poison();
    Call c = valid();
    bad.corrupt(c);
    const fj_status forward = fj_attention_forward(&c.q, &c.k, &c.v, &c.options, &c.o, &c.lse);
    const std::string forward_error = fj_last_error();
    const fj_status backward =
        fj_attention_backward(&c.q, &c.k, &c.v, &c.o, &c.lse, &c.dout, &c.options, &c.dq, &c.dk, &c.dv);
    const std::string backward_error = fj_last_error();
    // An input shared by both directions must fail in both; backward-only inputs in backward.
    EXPECT_TRUE(forward == bad.status || backward == bad.status)
        << bad.name << ": forward " << forward << " (" << forward_error << "), backward " << backward;
    const std::string& message = forward == bad.status ? forward_error : backward_error;
    EXPECT_NE(message.find(bad.message), std::string::npos)
        << bad.name << ": message \"" << message << "\" lacks \"" << bad.message << "\"";
    EXPECT_TRUE(o_.guards_intact()) << bad.name;
    // The checks without a call see the same, except facts of addresses (NULL data,
    // memory shared between tensors); an output's own strides are checked by both.
    const bool address_fact = bad.message.find("NULL") != std::string::npos ||
                              bad.message.find("overlap") != std::string::npos;
    if (address_fact) return;
    const fj_status check_forward = fj_attention_check_forward(&c.q, &c.k, &c.v, &c.options, &c.o, &c.lse);
    const fj_status check_backward =
        fj_attention_check_backward(&c.q, &c.k, &c.v, &c.o, &c.lse, &c.dout, &c.options, &c.dq, &c.dk, &c.dv);
    EXPECT_EQ(check_forward, forward) << bad.name;
    EXPECT_EQ(check_backward, backward) << bad.name;
  }
};

// The same tensors again with other options: each call takes its own.
TEST_F(Errors, ARepeatedForwardTakesEachCallsOptions) {
  Call c = valid();
  auto forward = [&](const fj_attention_options& options) {
    o_.poison();
    EXPECT_EQ(fj_attention_forward(&c.q, &c.k, &c.v, &options, &c.o, &c.lse), FJ_SUCCESS) << fj_last_error();
    return o_.values();
  };
  const std::vector<double> plain = forward(c.options);
  fj_attention_options causal = c.options;
  causal.causal = FJ_CAUSAL_BOTTOM_RIGHT;
  fj_attention_options scaled = c.options;
  scaled.has_scale = 1;
  scaled.scale = 0.5;
  EXPECT_NE(forward(causal), plain);
  EXPECT_NE(forward(scaled), plain);
  EXPECT_EQ(forward(c.options), plain);  // bit for bit, as the first time
  // Another output shape through the same pointers is checked anew.
  c.o.shape[2] = 7;
  EXPECT_EQ(fj_attention_forward(&c.q, &c.k, &c.v, &c.options, &c.o, &c.lse), FJ_ERROR_INVALID_VALUE);
}

TEST_F(Errors, EachBadInputIsRejectedWithAClearMessage) {
  const std::vector<BadInput> cases = {
      {"q rank 3", [](Call& c) { c.q.ndim = 3; }, FJ_ERROR_INVALID_VALUE, "q: expected 4 dims"},
      {"k rank 5", [](Call& c) { c.k.ndim = 5; }, FJ_ERROR_INVALID_VALUE, "k: expected 4 dims"},
      {"lse rank 4", [](Call& c) { c.lse.ndim = 4; }, FJ_ERROR_INVALID_VALUE, "lse: expected 3 dims"},
      {"null q data", [](Call& c) { c.q.data = nullptr; }, FJ_ERROR_INVALID_VALUE, "q: data pointer is NULL"},
      {"null o data", [](Call& c) { c.o.data = nullptr; }, FJ_ERROR_INVALID_VALUE, "o: data pointer is NULL"},
      {"negative size", [](Call& c) { c.q.shape[2] = -1; }, FJ_ERROR_INVALID_VALUE,
       "q: expected non-negative sizes"},
      {"negative stride", [](Call& c) { c.k.strides[2] = -16; }, FJ_ERROR_INVALID_VALUE,
       "k: expected non-negative strides"},
      {"batch mismatch",
       [](Call& c) {
         c.k.shape[0] = 1;
         c.v.shape[0] = 1;
       },
       FJ_ERROR_INVALID_VALUE, "k: batch size 1 does not match q's 2"},
      {"head_dim mismatch", [](Call& c) { c.k.shape[3] = 8; }, FJ_ERROR_INVALID_VALUE,
       "k: head_dim 8 does not match q's 16"},
      {"k/v seqlen mismatch", [](Call& c) { c.v.shape[2] = 11; }, FJ_ERROR_INVALID_VALUE,
       "v: expected shape [2, 2, 12, 16]"},
      {"Hq % Hkv",
       [](Call& c) {
         c.k.shape[1] = 3;
         c.v.shape[1] = 3;
       },
       FJ_ERROR_INVALID_VALUE, "query heads (4) must be a multiple of key/value heads (3)"},
      {"mixed dtypes", [this](Call& c) { c.k = half_.view(); }, FJ_ERROR_INVALID_TYPE,
       "k: expected dtype float32 (the dtype of q), got float16"},
      {"integer q", [](Call& c) { c.q.dtype = FJ_INT32; }, FJ_ERROR_INVALID_TYPE,
       "q: expected dtype float32, float16, bfloat16 or float64, got int32"},
      {"last dim not contiguous", [](Call& c) { c.q.strides[3] = 2; }, FJ_ERROR_INVALID_VALUE,
       "q: expected the last dim to be contiguous (stride 1), got stride 2"},
      {"o shape", [](Call& c) { c.o.shape[2] = 7; }, FJ_ERROR_INVALID_VALUE,
       "o: expected shape [2, 4, 8, 16]"},
      {"o dtype", [](Call& c) { c.o.dtype = FJ_FLOAT64; }, FJ_ERROR_INVALID_TYPE,
       "o: expected dtype float32"},
      {"lse shape", [](Call& c) { c.lse.shape[1] = 2; }, FJ_ERROR_INVALID_VALUE,
       "lse: expected shape [2, 4, 8]"},
      {"lse dtype", [](Call& c) { c.lse.dtype = FJ_FLOAT16; }, FJ_ERROR_INVALID_TYPE,
       "lse: expected dtype float32, got float16"},
      {"mask not broadcastable",
       [this](Call& c) {
         c.options.mask = mask_.view();
         c.options.mask.shape[3] = 5;
       },
       FJ_ERROR_INVALID_VALUE, "mask: dim 3 (seqlen_k) has size 5, expected 1 or 12"},
      {"mask rank",
       [this](Call& c) {
         c.options.mask = mask_.view();
         c.options.mask.ndim = 2;
       },
       FJ_ERROR_INVALID_VALUE, "mask: expected 4 dims"},
      {"integer mask", [this](Call& c) { c.options.mask = int_mask_.view(); }, FJ_ERROR_INVALID_TYPE,
       "mask: expected a bool (true = attend) or float (additive) mask, got int32"},
      {"float16 mask with float32 q",
       [this](Call& c) {
         c.options.mask = mask_.view();
         c.options.mask.dtype = FJ_FLOAT16;
       },
       FJ_ERROR_INVALID_TYPE, "mask: expected dtype bool or float32, got float16"},
      {"window_left < -1", [](Call& c) { c.options.window_left = -2; }, FJ_ERROR_INVALID_VALUE,
       "window_left: expected -1 (unbounded) or >= 0, got -2"},
      {"window_right < -1", [](Call& c) { c.options.window_right = -5; }, FJ_ERROR_INVALID_VALUE,
       "window_right: expected -1 (unbounded) or >= 0, got -5"},
      {"causal with window_right",
       [](Call& c) {
         c.options.causal = FJ_CAUSAL_TOP_LEFT;
         c.options.window_right = 3;
       },
       FJ_ERROR_INVALID_VALUE, "window_right: expected -1 or 0 with a causal mask, got 3"},
      {"causal code", [](Call& c) { set_code(c.options.causal, 7); }, FJ_ERROR_INVALID_VALUE,
       "causal: expected 0 (none), 1 (top-left) or 2 (bottom-right), got 7"},
      {"dropout 1", [](Call& c) { c.options.dropout_p = 1.0; }, FJ_ERROR_INVALID_VALUE,
       "dropout_p: expected a value in [0, 1), got 1"},
      {"dropout negative", [](Call& c) { c.options.dropout_p = -0.1; }, FJ_ERROR_INVALID_VALUE,
       "dropout_p: expected a value in [0, 1), got -0.1"},
      {"dropout NaN", [](Call& c) { c.options.dropout_p = NAN; }, FJ_ERROR_INVALID_VALUE,
       "dropout_p: expected a value in [0, 1)"},
      {"softcap negative", [](Call& c) { c.options.softcap = -1.0; }, FJ_ERROR_INVALID_VALUE,
       "softcap: expected a finite value >= 0"},
      {"scale infinite",
       [](Call& c) {
         c.options.has_scale = 1;
         c.options.scale = INFINITY;
       },
       FJ_ERROR_INVALID_VALUE, "scale: expected a finite number, got inf"},
      {"num_threads negative", [](Call& c) { c.options.num_threads = -3; }, FJ_ERROR_INVALID_VALUE,
       "num_threads: expected 0 (default) to 1024, got -3"},
      {"num_threads too large", [](Call& c) { c.options.num_threads = 5000; }, FJ_ERROR_INVALID_VALUE,
       "num_threads: expected 0 (default) to 1024, got 5000"},
      {"unknown dtype code", [](Call& c) { set_code(c.q.dtype, 99); }, FJ_ERROR_INVALID_TYPE,
       "q: unknown dtype code 99"},
      {"unknown device code", [](Call& c) { set_code(c.k.device_type, 42); }, FJ_ERROR_INVALID_VALUE,
       "k: unknown device type 42"},
      {"scale beyond float32",
       [](Call& c) {
         c.options.has_scale = 1;
         c.options.scale = 1e39;
       },
       FJ_ERROR_INVALID_VALUE, "scale: expected a value representable in float32 for float32 inputs"},
      {"softcap below float32", [](Call& c) { c.options.softcap = 1e-45; }, FJ_ERROR_INVALID_VALUE,
       "softcap: expected 0 or a value in"},
      {"huge shape", [](Call& c) { c.q.shape[2] = int64_t(1) << 58; }, FJ_ERROR_INVALID_VALUE,
       "exceeds the address space"},
      {"lse inside o", [](Call& c) { c.lse.data = c.o.data; }, FJ_ERROR_INVALID_VALUE,
       "lse: output memory overlaps output o"},
      {"o overlaps mask",
       [](Call& c) {
         c.options.mask = c.o;
         c.options.mask.shape[3] = 12;
         c.options.mask.shape[0] = 1;
         c.options.mask.shape[1] = 1;
       },
       FJ_ERROR_INVALID_VALUE, "o: output memory overlaps input mask"},
      {"output stride 0", [](Call& c) { c.o.strides[1] = 0; }, FJ_ERROR_INVALID_VALUE,
       "o: output has stride 0 in dim 1 of size 4"},
      {"dk is dq", [](Call& c) { c.dk.data = c.dq.data; }, FJ_ERROR_INVALID_VALUE,
       "dk: output memory overlaps output dq"},
      {"dv is dk shifted by one element",
       [](Call& c) { c.dv.data = static_cast<float*>(c.dk.data) + 1; }, FJ_ERROR_INVALID_VALUE,
       "dv: output memory overlaps output dk"},
      {"dv is dk a row later",
       [](Call& c) { c.dv.data = static_cast<float*>(c.dk.data) + c.dk.strides[2]; }, FJ_ERROR_INVALID_VALUE,
       "dv: output memory overlaps output dk"},
      {"dq rows folded onto each other", [](Call& c) { c.dq.strides[2] = 4; }, FJ_ERROR_INVALID_VALUE,
       "dq: output strides [512, 128, 4, 1] of shape [2, 4, 8, 16] map several elements to one address"},
      {"device mismatch", [](Call& c) { c.v.device_type = FJ_DEVICE_CUDA; }, FJ_ERROR_INVALID_VALUE,
       "v: expected the device of q (cpu:0), got cuda:0"},
      {"o aliases q", [](Call& c) { c.o = c.q; }, FJ_ERROR_INVALID_VALUE,
       "o: output memory overlaps input q"},
      {"dq shape", [](Call& c) { c.dq.shape[3] = 15; }, FJ_ERROR_INVALID_VALUE,
       "dq: expected shape [2, 4, 8, 16]"},
      {"dk dtype", [](Call& c) { c.dk.dtype = FJ_BFLOAT16; }, FJ_ERROR_INVALID_TYPE,
       "dk: expected dtype float32 (the dtype of q), got bfloat16"},
      {"dout shape", [](Call& c) { c.dout.shape[0] = 3; }, FJ_ERROR_INVALID_VALUE,
       "dout: expected shape [2, 4, 8, 16]"},
      {"null dv data", [](Call& c) { c.dv.data = nullptr; }, FJ_ERROR_INVALID_VALUE,
       "dv: data pointer is NULL"},
      {"head_dim 0",
       [](Call& c) {
         c.q.shape[3] = 0;
         c.k.shape[3] = 0;
       },
       FJ_ERROR_INVALID_VALUE, "q: head_dim must be >= 1, got 0"},
  };
  EXPECT_GE(cases.size(), 20u);
  for (const BadInput& bad : cases) expect_rejected(bad);
}

TEST_F(Errors, NullPointersToStructs) {
  Call c = valid();
  EXPECT_EQ(fj_attention_forward(nullptr, &c.k, &c.v, &c.options, &c.o, &c.lse), FJ_ERROR_INVALID_VALUE);
  EXPECT_NE(std::string(fj_last_error()).find("q: expected a tensor, got NULL"), std::string::npos);
  EXPECT_EQ(fj_attention_forward(&c.q, &c.k, &c.v, nullptr, &c.o, &c.lse), FJ_ERROR_INVALID_VALUE);
  EXPECT_NE(std::string(fj_last_error()).find("options: expected a pointer, got NULL"), std::string::npos);
}

// fj_attention_check_*: descriptors without memory (NULL data) pass where their shapes do;
// a wrong shape is named as the call would name it.
// fj_attention_prepare_*: validation as the call's, nothing written, the workspace size out
// (0 on the CPU, which takes no scratch of the caller's); a NULL size pointer or a NULL
// workspace with a size is named.
TEST_F(Errors, PrepareValidatesWritesNothingAndReportsTheWorkspace) {
  Call c = valid();
  o_.poison();
  dq_.poison();
  const auto untouched = [](const std::vector<double>& values) {
    return std::all_of(values.begin(), values.end(), [](double x) { return std::isnan(x); });
  };
  size_t bytes = 123;
  EXPECT_EQ(fj_attention_prepare_forward(&c.q, &c.k, &c.v, &c.options, &c.o, &c.lse, &bytes), FJ_SUCCESS)
      << fj_last_error();
  EXPECT_EQ(bytes, 0u);
  bytes = 123;
  EXPECT_EQ(fj_attention_prepare_backward(&c.q, &c.k, &c.v, &c.o, &c.lse, &c.dout, &c.options, &c.dq, &c.dk, &c.dv,
                                          &bytes),
            FJ_SUCCESS)
      << fj_last_error();
  EXPECT_EQ(bytes, 0u);
  EXPECT_TRUE(untouched(o_.values()));
  EXPECT_TRUE(untouched(dq_.values()));

  EXPECT_EQ(fj_attention_prepare_forward(&c.q, &c.k, &c.v, &c.options, &c.o, &c.lse, nullptr),
            FJ_ERROR_INVALID_VALUE);
  EXPECT_NE(std::string(fj_last_error()).find("workspace_bytes"), std::string::npos) << fj_last_error();
  c.options.workspace_bytes = 64;  // and no workspace
  EXPECT_EQ(fj_attention_prepare_forward(&c.q, &c.k, &c.v, &c.options, &c.o, &c.lse, &bytes),
            FJ_ERROR_INVALID_VALUE);
  EXPECT_NE(std::string(fj_last_error()).find("workspace"), std::string::npos) << fj_last_error();
  EXPECT_EQ(fj_attention_forward(&c.q, &c.k, &c.v, &c.options, &c.o, &c.lse), FJ_ERROR_INVALID_VALUE);
  alignas(16) static unsigned char scratch[80];
  c.options.workspace = scratch + 4;  // the kernels' vector and bulk accesses need 16-byte alignment
  EXPECT_EQ(fj_attention_forward(&c.q, &c.k, &c.v, &c.options, &c.o, &c.lse), FJ_ERROR_INVALID_VALUE);
  EXPECT_NE(std::string(fj_last_error()).find("16-byte aligned"), std::string::npos) << fj_last_error();
  c.options.workspace = nullptr;
  c.options.workspace_bytes = 0;
  c.k.shape[3] = 8;  // a bad call is rejected by prepare as by the call
  EXPECT_EQ(fj_attention_prepare_forward(&c.q, &c.k, &c.v, &c.options, &c.o, &c.lse, &bytes),
            FJ_ERROR_INVALID_VALUE);
}

TEST_F(Errors, ChecksTakeDescriptorsWithoutData) {
  Call c = valid();
  for (fj_tensor* t : {&c.q, &c.k, &c.v, &c.o, &c.lse, &c.dout, &c.dq, &c.dk, &c.dv}) t->data = nullptr;
  EXPECT_EQ(fj_attention_check_forward(&c.q, &c.k, &c.v, &c.options, &c.o, &c.lse), FJ_SUCCESS) << fj_last_error();
  EXPECT_EQ(fj_attention_check_backward(&c.q, &c.k, &c.v, &c.o, &c.lse, &c.dout, &c.options, &c.dq, &c.dk, &c.dv),
            FJ_SUCCESS)
      << fj_last_error();
  c.options.mask = mask_.view();
  c.options.mask.data = nullptr;
  EXPECT_EQ(fj_attention_check_forward(&c.q, &c.k, &c.v, &c.options, &c.o, &c.lse), FJ_SUCCESS) << fj_last_error();
  c.options.mask.shape[3] = 11;  // a mask without data is still checked
  EXPECT_EQ(fj_attention_check_forward(&c.q, &c.k, &c.v, &c.options, &c.o, &c.lse), FJ_ERROR_INVALID_VALUE);
  EXPECT_NE(std::string(fj_last_error()).find("mask"), std::string::npos) << fj_last_error();
  c = valid();
  c.k.shape[3] = 8;
  EXPECT_EQ(fj_attention_check_forward(&c.q, &c.k, &c.v, &c.options, &c.o, &c.lse), FJ_ERROR_INVALID_VALUE);
  EXPECT_NE(std::string(fj_last_error()).find("k: head_dim 8 does not match q's 16"), std::string::npos)
      << fj_last_error();
  // The call itself still refuses NULL data.
  c = valid();
  c.q.data = nullptr;
  EXPECT_EQ(fj_attention_forward(&c.q, &c.k, &c.v, &c.options, &c.o, &c.lse), FJ_ERROR_INVALID_VALUE);
}

TEST_F(Errors, SuccessClearsTheLastError) {
  Call c = valid();
  c.q.ndim = 2;
  ASSERT_NE(fj_attention_forward(&c.q, &c.k, &c.v, &c.options, &c.o, &c.lse), FJ_SUCCESS);
  ASSERT_STRNE(fj_last_error(), "");
  c = valid();
  ASSERT_EQ(fj_attention_forward(&c.q, &c.k, &c.v, &c.options, &c.o, &c.lse), FJ_SUCCESS);
  EXPECT_STREQ(fj_last_error(), "");
}

TEST(EmptyProblems, ZeroSizedDimsAreValid) {
  // Sk = 0: every row sees nothing, o = 0 and lse = -inf; Sq = 0: nothing to do.
  GuardedTensor q({1, 2, 3, 8}, FJ_FLOAT32), k({1, 2, 0, 8}, FJ_FLOAT32), v({1, 2, 0, 8}, FJ_FLOAT32);
  GuardedTensor o({1, 2, 3, 8}, FJ_FLOAT32), lse({1, 2, 3}, FJ_FLOAT32);
  q.fill_normal(1);
  o.poison();
  lse.poison();
  fj_attention_options options = fj_attention_options_default();
  fj_tensor qv = q.view(), kv = k.view(), vv = v.view(), ov = o.view(), lv = lse.view();
  ASSERT_EQ(fj_attention_forward(&qv, &kv, &vv, &options, &ov, &lv), FJ_SUCCESS) << fj_last_error();
  for (double x : o.values()) EXPECT_EQ(x, 0.0);
  for (double x : lse.values()) EXPECT_EQ(x, -INFINITY);
}

TEST(EmptyProblems, EmptyInputsMayHaveAnyStrides) {
  // An expanded empty tensor (every stride 0) holds nothing to read.
  GuardedTensor q({1, 2, 3, 8}, FJ_FLOAT32), k({1, 2, 0, 8}, FJ_FLOAT32), v({1, 2, 0, 8}, FJ_FLOAT32);
  GuardedTensor o({1, 2, 3, 8}, FJ_FLOAT32), lse({1, 2, 3}, FJ_FLOAT32);
  q.fill_normal(1);
  fj_attention_options options = fj_attention_options_default();
  fj_tensor qv = q.view(), kv = k.view(), vv = v.view(), ov = o.view(), lv = lse.view();
  for (fj_tensor* t : {&kv, &vv}) {
    for (int d = 0; d < 4; ++d) t->strides[d] = 0;
  }
  ASSERT_EQ(fj_attention_forward(&qv, &kv, &vv, &options, &ov, &lv), FJ_SUCCESS) << fj_last_error();
  for (double x : o.values()) EXPECT_EQ(x, 0.0);
}

TEST(Windows, BoundsBeyondTheSequencesEqualUnbounded) {
  GuardedTensor q({1, 2, 10, 8}, FJ_FLOAT32), k({1, 2, 5, 8}, FJ_FLOAT32), v({1, 2, 5, 8}, FJ_FLOAT32);
  GuardedTensor o1({1, 2, 10, 8}, FJ_FLOAT32), l1({1, 2, 10}, FJ_FLOAT32);
  GuardedTensor o2({1, 2, 10, 8}, FJ_FLOAT32), l2({1, 2, 10}, FJ_FLOAT32);
  q.fill_normal(1);
  k.fill_normal(2);
  v.fill_normal(3);
  fj_tensor qv = q.view(), kv = k.view(), vv = v.view();
  fj_tensor o1v = o1.view(), l1v = l1.view(), o2v = o2.view(), l2v = l2.view();
  fj_attention_options unbounded = fj_attention_options_default();
  fj_attention_options huge = unbounded;
  huge.window_left = INT64_MAX;
  huge.window_right = INT64_MAX;
  ASSERT_EQ(fj_attention_forward(&qv, &kv, &vv, &unbounded, &o1v, &l1v), FJ_SUCCESS) << fj_last_error();
  ASSERT_EQ(fj_attention_forward(&qv, &kv, &vv, &huge, &o2v, &l2v), FJ_SUCCESS) << fj_last_error();
  EXPECT_EQ(o1.values(), o2.values());
  EXPECT_EQ(l1.values(), l2.values());
  for (double x : l2.values()) EXPECT_TRUE(std::isfinite(x));
}

// dq (Hq heads), dk and dv (Hkv heads each) sliced from one [B, S, Hq + 2 Hkv, D]
// buffer (with Hq = Hkv, the packed [B, S, 3, H, D] layout): interleaved, never
// the same element, so accepted, and written as the separate gradients are.
// Shifted by a head, dk's first head would be dq's last: rejected.
void check_packed_gradients(int64_t Hq, int64_t Hkv) {
  const int64_t B = 2, S = 20, D = 8, H = Hq + 2 * Hkv;
  AttentionBuffers t(B, Hq, Hkv, S, S, D, FJ_FLOAT32);
  fj_attention_options options = fj_attention_options_default();
  ASSERT_EQ(t.forward(options), FJ_SUCCESS) << fj_last_error();
  ASSERT_EQ(t.backward(options), FJ_SUCCESS) << fj_last_error();
  std::vector<float> packed(size_t(B * S * H * D), NAN);
  fj_tensor grads[3] = {t.dq.view(), t.dk.view(), t.dv.view()};
  const int64_t first_head[3] = {0, Hq, Hq + Hkv};
  for (int which = 0; which < 3; ++which) {
    grads[which].data = packed.data() + first_head[which] * D;
    const int64_t strides[4] = {S * H * D, D, H * D, 1};
    for (int d = 0; d < 4; ++d) grads[which].strides[d] = strides[d];
  }
  fj_tensor qv = t.q.view(), kv = t.k.view(), vv = t.v.view(), ov = t.o.view(), lv = t.lse.view();
  fj_tensor dov = t.dout.view();
  ASSERT_EQ(fj_attention_backward(&qv, &kv, &vv, &ov, &lv, &dov, &options, &grads[0], &grads[1], &grads[2]),
            FJ_SUCCESS)
      << fj_last_error();
  const std::vector<double> expected[3] = {t.dq.values(), t.dk.values(), t.dv.values()};
  const int64_t heads[3] = {Hq, Hkv, Hkv};
  for (int which = 0; which < 3; ++which)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < heads[which]; ++h)
        for (int64_t s = 0; s < S; ++s)
          for (int64_t d = 0; d < D; ++d)
            ASSERT_EQ(double(packed[size_t(((b * S + s) * H + first_head[which] + h) * D + d)]),
                      expected[which][size_t(((b * heads[which] + h) * S + s) * D + d)]);
  grads[1].data = packed.data() + (Hq - 1) * D;
  EXPECT_EQ(fj_attention_backward(&qv, &kv, &vv, &ov, &lv, &dov, &options, &grads[0], &grads[1], &grads[2]),
            FJ_ERROR_INVALID_VALUE);
  EXPECT_NE(std::string(fj_last_error()).find("dk: output memory overlaps output dq"), std::string::npos)
      << fj_last_error();
}

TEST(Outputs, PackedGradientViewsAreAccepted) {
  check_packed_gradients(3, 3);
}

TEST(Outputs, PackedGroupedHeadGradientViewsAreAccepted) {
  check_packed_gradients(4, 2);
}

}  // namespace
}  // namespace flashjit::testing
