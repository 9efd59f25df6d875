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
  AttentionBuffers t(2, 4, 2, 150, 200, 40, FJ_BFLOAT16);
  fj_attention_options options = fj_attention_options_default();
  options.causal = FJ_CAUSAL_BOTTOM_RIGHT;
  options.dropout_p = 0.1;
  options.dropout_seed = 99;
  options.num_threads = threads;
  EXPECT_EQ(t.forward(options), FJ_SUCCESS) << fj_last_error();
  EXPECT_EQ(t.backward(options), FJ_SUCCESS) << fj_last_error();
  return Outputs{t.o.values(), t.lse.values(), t.dq.values(), t.dk.values(), t.dv.values()};
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
