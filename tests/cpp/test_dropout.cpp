// The dropout rule: Philox4x32-10 known-answer vectors, the documented counter
// layout, and the drop rate.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/philox.hpp"
#include "flashjit/flashjit.h"

namespace flashjit {
namespace {

// Known-answer vectors of Random123's kat_vectors for philox4x32-10.
TEST(Philox, KnownAnswers) {
  struct Kat {
    uint32_t counter[4], key[2], expected[4];
  };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& kat : kats) {
    const Philox4x32 out =
        philox4x32_10(kat.counter[0], kat.counter[1], kat.counter[2], kat.counter[3], kat.key[0], kat.key[1]);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(out.word[i], kat.expected[i]) << "word " << i;
  }
}

TEST(Dropout, DocumentedCounterLayout) {
  const uint64_t seed = 0x0123456789abcdefull, offset = 0xfedcba9876543210ull;
  const double p = 0.3;
  const uint32_t threshold = dropout_threshold(p);
  for (int64_t b : {0, 1}) {
    for (int64_t h : {0, 2}) {
      for (int64_t i : {0, 5}) {
        for (int64_t j : {0, 1, 2, 3, 4, 9}) {
          const Philox4x32 words =
              philox4x32_10(uint32_t(j / 4), uint32_t(i), uint32_t(b * 3 + h), uint32_t(offset),
                            uint32_t(seed), uint32_t(seed >> 32) ^ uint32_t(offset >> 32));
          const int expected = words.word[j % 4] >= threshold ? 1 : 0;
          EXPECT_EQ(fj_dropout_keep(seed, offset, p, b, h, 3, i, j), expected);
        }
      }
    }
  }
}

TEST(Dropout, KeepMaskMatchesElementRule) {
  const int64_t batch = 2, heads = 3, sq = 5, sk = 11;
  std::vector<uint8_t> keep(batch * heads * sq * sk);
  ASSERT_EQ(fj_dropout_keep_mask(7, 9, 0.25, batch, heads, sq, sk, keep.data()), FJ_SUCCESS);
  size_t index = 0;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < sq; ++i)
        for (int64_t j = 0; j < sk; ++j)
          EXPECT_EQ(keep[index++], fj_dropout_keep(7, 9, 0.25, b, h, heads, i, j));
}

TEST(Dropout, RateMatchesProbability) {
  for (double p : {0.0, 0.1, 0.5, 0.9}) {
    const int64_t sq = 256, sk = 512;
    std::vector<uint8_t> keep(sq * sk);
    ASSERT_EQ(fj_dropout_keep_mask(42, 0, p, 1, 1, sq, sk, keep.data()), FJ_SUCCESS);
    double kept = 0;
    for (uint8_t x : keep) kept += x;
    const double rate = 1.0 - kept / double(keep.size());
    EXPECT_NEAR(rate, p, 0.005) << "p = " << p;
  }
}

TEST(Dropout, KeepMaskRejectsSizesBeyondTheCounter) {
  EXPECT_EQ(fj_dropout_keep_mask(1, 0, 0.5, 1, 1, int64_t(1) << 62, 4, nullptr), FJ_ERROR_INVALID_VALUE);
  EXPECT_NE(std::string(fj_last_error()).find("dropout counter range"), std::string::npos);
  EXPECT_EQ(fj_dropout_keep_mask(1, 0, 0.5, int64_t(1) << 20, int64_t(1) << 20, 1, 1, nullptr),
            FJ_ERROR_INVALID_VALUE);
  EXPECT_EQ(fj_dropout_keep_mask(1, 0, 0.5, 1, 1, 4, 4, nullptr), FJ_ERROR_INVALID_VALUE);
}

TEST(Dropout, SeedAndOffsetChangeTheMask) {
  const int64_t n = 4096;
  std::vector<uint8_t> a(n), b(n), c(n);
  ASSERT_EQ(fj_dropout_keep_mask(1, 0, 0.5, 1, 1, 1, n, a.data()), FJ_SUCCESS);
  ASSERT_EQ(fj_dropout_keep_mask(2, 0, 0.5, 1, 1, 1, n, b.data()), FJ_SUCCESS);
  ASSERT_EQ(fj_dropout_keep_mask(1, 1, 0.5, 1, 1, 1, n, c.data()), FJ_SUCCESS);
  EXPECT_NE(a, b);
  EXPECT_NE(a, c);
}

}  // namespace
}  // namespace flashjit
