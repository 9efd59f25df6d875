// Forward and backward give bit-identical results across runs and thread counts.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "harness.hpp"

namespace flashjit::testing {
namespace {

struct Outputs {
  std::vector<double> o, lse, dq, dk, dv;
  bool operator==(const Outputs& other) const {
    auto same = [](const std::vector<double>& a, const std::vector<double>& b) {
      return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0;
    };
    return same(o, other.o) && same(lse, other.lse) && same(dq, other.dq) && same(dk, other.dk) &&
           same(dv, other.dv);
  }
};

Outputs run(int threads) {
  const int64_t B = 2, Hq = 4, Hkv = 2, Sq = 150, Sk = 200, D = 40;
  GuardedTensor q({B, Hq, Sq, D}, FJ_BFLOAT16), k({B, Hkv, Sk, D}, FJ_BFLOAT16), v({B, Hkv, Sk, D}, FJ_BFLOAT16);
  GuardedTensor o({B, Hq, Sq, D}, FJ_BFLOAT16), lse({B, Hq, Sq}, FJ_FLOAT32), dout({B, Hq, Sq, D}, FJ_BFLOAT16);
  GuardedTensor dq({B, Hq, Sq, D}, FJ_BFLOAT16), dk({B, Hkv, Sk, D}, FJ_BFLOAT16), dv({B, Hkv, Sk, D}, FJ_BFLOAT16);
  q.fill_normal(1);
  k.fill_normal(2);
  v.fill_normal(3);
  dout.fill_normal(4);
  fj_attention_options options = fj_attention_options_default();
  options.causal = FJ_CAUSAL_BOTTOM_RIGHT;
  options.dropout_p = 0.1;
  options.dropout_seed = 99;
  options.num_threads = threads;
  fj_tensor qv = q.view(), kv = k.view(), vv = v.view(), ov = o.view(), lv = lse.view();
  fj_tensor dov = dout.view(), dqv = dq.view(), dkv = dk.view(), dvv = dv.view();
  EXPECT_EQ(fj_attention_forward(&qv, &kv, &vv, &options, &ov, &lv), FJ_SUCCESS) << fj_last_error();
  EXPECT_EQ(fj_attention_backward(&qv, &kv, &vv, &ov, &lv, &dov, &options, &dqv, &dkv, &dvv), FJ_SUCCESS)
      << fj_last_error();
  return Outputs{o.values(), lse.values(), dq.values(), dk.values(), dv.values()};
}

TEST(Determinism, BitIdenticalAcrossRunsAndThreadCounts) {
  const Outputs first = run(1);
  EXPECT_TRUE(first == run(1));
  EXPECT_TRUE(first == run(2));
  EXPECT_TRUE(first == run(3));
  EXPECT_TRUE(first == run(0));
}

}  // namespace
}  // namespace flashjit::testing
