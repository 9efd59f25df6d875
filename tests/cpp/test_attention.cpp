// CPU forward and backward against the float64 reference (docs/tolerance.md)
// over a shape list and every feature of the problem description.
#include <gtest/gtest.h>

#include <vector>

#include "core/backend.hpp"
#include "harness.hpp"

namespace flashjit::testing {
namespace {

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  auto add = [&](Case c) { cases.push_back(c); };

  for (int64_t dim : {1, 3, 8, 40, 64, 72, 96, 128, 160, 192, 200, 256}) {
    Case c;
    c.name = "head_dim";
    c.dim_qk = c.dim_v = dim;
    c.seqlen_q = 65;
    c.seqlen_k = 63;
    add(c);
  }
  for (int64_t seqlen : {1, 7, 63, 65, 127, 129, 1000}) {
    Case c;
    c.name = "seqlen";
    c.heads_q = c.heads_kv = 1;
    c.seqlen_q = c.seqlen_k = seqlen;
    c.dim_qk = c.dim_v = 32;
    add(c);
  }
  for (auto [sq, sk] :
       std::vector<std::pair<int64_t, int64_t>>{{7, 129}, {129, 7}, {1, 200}, {200, 1}, {65, 1000}}) {
    Case c;
    c.name = "seqlen_q_ne_k";
    c.seqlen_q = sq;
    c.seqlen_k = sk;
    add(c);
  }
  {
    Case c;
    c.name = "dim_v_ne_dim_qk";
    c.dim_qk = 72;
    c.dim_v = 40;
    add(c);
    c.dim_qk = 24;
    c.dim_v = 130;
    add(c);
  }
  for (auto [hq, hkv] : std::vector<std::pair<int64_t, int64_t>>{{2, 2}, {4, 2}, {8, 1}, {16, 2}}) {
    Case c;
    c.name = "gqa";
    c.batch = 2;
    c.heads_q = hq;
    c.heads_kv = hkv;
    c.seqlen_q = 70;
    c.seqlen_k = 90;
    add(c);
  }
  for (fj_dtype dtype : {FJ_FLOAT16, FJ_BFLOAT16, FJ_FLOAT64}) {
    for (int64_t dim : {8, 64, 128}) {
      Case c;
      c.name = "dtype";
      c.dtype = dtype;
      c.dim_qk = c.dim_v = dim;
      c.seqlen_q = 100;
      c.seqlen_k = 130;
      add(c);
    }
  }
  for (fj_causal causal : {FJ_CAUSAL_TOP_LEFT, FJ_CAUSAL_BOTTOM_RIGHT}) {
    for (auto [sq, sk] :
         std::vector<std::pair<int64_t, int64_t>>{{100, 100}, {37, 150}, {150, 37}, {1, 64}, {130, 129}}) {
      Case c;
      c.name = causal == FJ_CAUSAL_TOP_LEFT ? "causal_top_left" : "causal_bottom_right";
      c.causal = causal;
      c.seqlen_q = sq;
      c.seqlen_k = sk;
      add(c);
      c.dtype = FJ_BFLOAT16;
      add(c);
    }
  }
  for (auto [left, right] :
       std::vector<std::pair<int64_t, int64_t>>{{16, 0}, {8, 8}, {-1, 4}, {4, -1}, {0, 0}, {100, 3}}) {
    for (fj_causal causal : {FJ_CAUSAL_NONE, FJ_CAUSAL_TOP_LEFT, FJ_CAUSAL_BOTTOM_RIGHT}) {
      if (causal != FJ_CAUSAL_NONE && right > 0) continue;
      Case c;
      c.name = "window";
      c.causal = causal;
      c.window_left = left;
      c.window_right = right;
      c.seqlen_q = 150;
      c.seqlen_k = 170;
      add(c);
    }
  }
  for (double cap : {2.0, 30.0}) {
    Case c;
    c.name = "softcap";
    c.softcap = cap;
    c.scale = 0.5;
    c.seqlen_q = 80;
    c.seqlen_k = 100;
    add(c);
    c.dtype = FJ_FLOAT16;
    add(c);
  }
  {
    Case c;
    c.name = "custom_scale";
    c.scale = 0.03;
    add(c);
    c.scale = -1.3;
    add(c);
  }
  // Masks: full, broadcast over batch / head / query / everything but keys.
  const bool broadcasts[][4] = {{false, false, false, false}, {true, false, false, false},
                                {false, true, false, false},  {false, false, true, false},
                                {true, true, true, false},    {true, true, false, false}};
  for (MaskType type : {MaskType::kBool, MaskType::kAdditiveFloat32, MaskType::kAdditiveDtype}) {
    for (const auto& broadcast : broadcasts) {
      for (Layout layout : {Layout::kContiguous, Layout::kPadded}) {
        Case c;
        c.name = "mask";
        c.batch = 2;
        c.mask = type;
        c.layout = layout;
        c.seqlen_q = 70;
        c.seqlen_k = 75;
        for (int d = 0; d < 4; ++d) c.mask_broadcast[d] = broadcast[d];
        c.dtype = type == MaskType::kAdditiveDtype ? FJ_FLOAT16 : FJ_FLOAT32;
        add(c);
      }
    }
  }
  for (MaskType type : {MaskType::kBool, MaskType::kAdditiveFloat32}) {
    Case c;
    c.name = "fully_masked_rows";
    c.mask = type;
    c.mask_empty_rows = true;
    c.seqlen_q = 40;
    c.seqlen_k = 90;
    add(c);
  }
  for (double p : {0.1, 0.5, 0.9}) {
    Case c;
    c.name = "dropout";
    c.dropout = p;
    c.seqlen_q = 77;
    c.seqlen_k = 133;
    add(c);
    c.dtype = FJ_BFLOAT16;
    add(c);
  }
  for (Layout layout : {Layout::kPadded, Layout::kSeqMajor}) {
    Case c;
    c.name = "strided";
    c.layout = layout;
    c.batch = 2;
    c.heads_q = 4;
    c.heads_kv = 2;
    c.seqlen_q = 66;
    c.seqlen_k = 67;
    add(c);
    c.dtype = FJ_FLOAT16;
    add(c);
  }
  {
    // Everything at once.
    Case c;
    c.name = "combined";
    c.batch = 2;
    c.heads_q = 6;
    c.heads_kv = 2;
    c.seqlen_q = 90;
    c.seqlen_k = 140;
    c.dim_qk = 72;
    c.dim_v = 40;
    c.dtype = FJ_BFLOAT16;
    c.layout = Layout::kSeqMajor;
    c.causal = FJ_CAUSAL_BOTTOM_RIGHT;
    c.window_left = 50;
    c.mask = MaskType::kBool;
    c.mask_broadcast[1] = true;
    c.softcap = 5.0;
    c.dropout = 0.2;
    add(c);
    c.dtype = FJ_FLOAT64;
    c.layout = Layout::kPadded;
    c.mask = MaskType::kAdditiveFloat32;
    add(c);
  }
  {
    Case c;
    c.name = "long";
    c.heads_q = c.heads_kv = 1;
    c.seqlen_q = 1000;
    c.seqlen_k = 1000;
    c.dim_qk = c.dim_v = 64;
    c.causal = FJ_CAUSAL_TOP_LEFT;
    c.dtype = FJ_FLOAT16;
    add(c);
  }
  return cases;
}

class AttentionCase : public ::testing::TestWithParam<Case> {};

TEST_P(AttentionCase, MatchesFloat64Reference) {
  const Case& c = GetParam();
  const CaseResult result = run_case(c);
  EXPECT_TRUE(result.failure.empty()) << describe(c) << ": " << result.failure;
  for (const ErrorReport& r : result.reports) {
    EXPECT_LE(r.error, r.tolerance) << describe(c) << ": " << r.what << " error " << r.error
                                    << " > tolerance " << r.tolerance << " (baseline " << r.baseline << ")";
  }
}

INSTANTIATE_TEST_SUITE_P(Cpu, AttentionCase, ::testing::ValuesIn(all_cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return info.param.name + "_" + std::to_string(info.index);
                         });

}  // namespace
}  // namespace flashjit::testing

namespace flashjit::testing {
namespace {

// with_query_groups_packed: a decoding step with grouped heads run as the packed
// problem gives the unpacked problem's o and lse, and is packed only where
// nothing depends on the query row (here: not with a left window bound).
TEST(QueryGroupPacking, PackedDecodeEqualsUnpacked) {
  const Backend& cpu = backend_for(FJ_DEVICE_CPU, "test");
  for (const fj_causal causal : {FJ_CAUSAL_NONE, FJ_CAUSAL_BOTTOM_RIGHT}) {
    AttentionBuffers plain(2, 8, 2, 1, 77, 40, FJ_FLOAT32);
    GuardedTensor packed_o(plain.o.shape(), FJ_FLOAT32), packed_lse(plain.lse.shape(), FJ_FLOAT32);
    fj_attention_options options = fj_attention_options_default();
    options.causal = causal;
    fj_tensor q = plain.q.view(), k = plain.k.view(), v = plain.v.view(), o = plain.o.view(),
              lse = plain.lse.view(), o2 = packed_o.view(), lse2 = packed_lse.view();
    const AttentionProblem problem = make_forward_problem(&q, &k, &v, &options, &o, &lse);
    const AttentionProblem packed = with_query_groups_packed(make_forward_problem(&q, &k, &v, &options, &o2, &lse2));
    EXPECT_EQ(packed.heads_q, 2);
    EXPECT_EQ(packed.seqlen_q, 4);
    cpu.forward(problem);
    cpu.forward(packed);
    EXPECT_EQ(plain.o.values(), packed_o.values());
    EXPECT_EQ(plain.lse.values(), packed_lse.values());
    EXPECT_TRUE(packed_o.guards_intact() && packed_lse.guards_intact());
  }
  AttentionBuffers windowed(1, 4, 2, 1, 20, 16, FJ_FLOAT32);
  fj_attention_options options = fj_attention_options_default();
  options.window_left = 5;
  fj_tensor q = windowed.q.view(), k = windowed.k.view(), v = windowed.v.view(), o = windowed.o.view(),
            lse = windowed.lse.view();
  EXPECT_EQ(with_query_groups_packed(make_forward_problem(&q, &k, &v, &options, &o, &lse)).seqlen_q, 1);
}

}  // namespace
}  // namespace flashjit::testing

namespace flashjit::testing {
namespace {

// An output without elements is never written, so any strides do (frameworks give
// empty arrays zero strides): a backward over no keys leaves dk and dv empty and
// writes dq = 0.
TEST(EmptyOutputs, ZeroStridesAreAccepted) {
  AttentionBuffers b(1, 2, 2, 5, 0, 8, FJ_FLOAT32);
  GuardedTensor dk({1, 2, 0, 8}, {0, 0, 0, 1}, FJ_FLOAT32), dv({1, 2, 0, 8}, {0, 0, 0, 1}, FJ_FLOAT32);
  fj_attention_options options = fj_attention_options_default();
  ASSERT_EQ(b.forward(options), FJ_SUCCESS) << fj_last_error();
  b.dq.poison();
  fj_tensor q = b.q.view(), k = b.k.view(), v = b.v.view(), o = b.o.view(), lse = b.lse.view(),
            dout = b.dout.view(), dq = b.dq.view(), dkv = dk.view(), dvv = dv.view();
  ASSERT_EQ(fj_attention_backward(&q, &k, &v, &o, &lse, &dout, &options, &dq, &dkv, &dvv), FJ_SUCCESS)
      << fj_last_error();
  for (double x : b.dq.values()) EXPECT_EQ(x, 0.0);
}

}  // namespace
}  // namespace flashjit::testing

namespace flashjit::testing {
namespace {

// lse NULL (inference): the forward writes the same o, and nothing else; the backward
// still needs an lse and says so; a NULL o is still an error naming o.
TEST(OptionalLse, NullLseGivesTheSameOutput) {
  for (const fj_dtype dtype : {FJ_FLOAT32, FJ_BFLOAT16}) {
    AttentionBuffers b(2, 4, 2, 37, 45, 16, dtype);
    fj_attention_options options = fj_attention_options_default();
    options.causal = FJ_CAUSAL_BOTTOM_RIGHT;
    ASSERT_EQ(b.forward(options), FJ_SUCCESS) << fj_last_error();
    const std::vector<double> with_lse = b.o.values();
    b.o.poison();
    fj_tensor q = b.q.view(), k = b.k.view(), v = b.v.view(), o = b.o.view();
    ASSERT_EQ(fj_attention_forward(&q, &k, &v, &options, &o, nullptr), FJ_SUCCESS) << fj_last_error();
    EXPECT_EQ(b.o.values(), with_lse);
    EXPECT_TRUE(b.o.guards_intact());
    ASSERT_EQ(fj_attention_check_forward(&q, &k, &v, &options, &o, nullptr), FJ_SUCCESS) << fj_last_error();
    size_t workspace = 0;
    ASSERT_EQ(fj_attention_prepare_forward(&q, &k, &v, &options, &o, nullptr, &workspace), FJ_SUCCESS)
        << fj_last_error();
    fj_tensor dout = b.dout.view(), dq = b.dq.view(), dk = b.dk.view(), dv = b.dv.view();
    EXPECT_EQ(fj_attention_backward(&q, &k, &v, &o, nullptr, &dout, &options, &dq, &dk, &dv), FJ_ERROR_INVALID_VALUE);
    EXPECT_NE(std::string(fj_last_error()).find("lse"), std::string::npos) << fj_last_error();
    EXPECT_EQ(fj_attention_forward(&q, &k, &v, &options, nullptr, nullptr), FJ_ERROR_INVALID_VALUE);
    EXPECT_NE(std::string(fj_last_error()).find("o:"), std::string::npos) << fj_last_error();
  }
}

}  // namespace
}  // namespace flashjit::testing
