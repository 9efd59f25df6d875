// Forward and backward give bit-identical results across runs and thread counts.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
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

Outputs run(int threads, const uint32_t* seed_words = nullptr) {
  AttentionBuffers t(2, 4, 2, 150, 200, 40, FJ_BFLOAT16);
  fj_attention_options options = fj_attention_options_default();
  options.causal = FJ_CAUSAL_BOTTOM_RIGHT;
  options.dropout_p = 0.1;
  options.dropout_seed = seed_words ? 12345 : 99;  // the words, where given, replace these
  options.dropout_offset = seed_words ? 777 : (uint64_t(3) << 32) + 5;
  options.dropout_seed_words = seed_words;
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

// fj_attention_options.dropout_seed_words: seed and offset as four words (low, high) that
// replace dropout_seed and dropout_offset (read by the call on the CPU).
TEST(Determinism, SeedWordsReplaceSeedAndOffset) {
  const uint32_t words[4] = {99, 0, 5, 3};
  EXPECT_TRUE(run(2) == run(2, words));
  const uint32_t other[4] = {100, 0, 5, 3};
  EXPECT_FALSE(run(2) == run(2, other));
  AttentionBuffers t(1, 1, 1, 8, 8, 16, FJ_FLOAT32);
  fj_attention_options options = fj_attention_options_default();
  options.dropout_p = 0.5;
  alignas(4) unsigned char bytes[20] = {};
  options.dropout_seed_words = bytes + 1;
  ASSERT_EQ(t.forward(options), FJ_ERROR_INVALID_VALUE);
  EXPECT_NE(std::string(fj_last_error()).find("dropout_seed_words"), std::string::npos) << fj_last_error();
}

}  // namespace
}  // namespace flashjit::testing
