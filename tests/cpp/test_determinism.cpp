// Forward and backward give bit-identical results across runs and thread counts.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "core/bounds_core.h"
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

// Words changed in place between calls on the same tensors and options: each call reads them.
TEST(Determinism, SeedWordsChangedInPlaceAreReadByEachCall) {
  AttentionBuffers t(1, 2, 2, 16, 24, 16, FJ_FLOAT32);
  fj_attention_options options = fj_attention_options_default();
  options.dropout_p = 0.5;
  uint32_t words[4] = {7, 0, 0, 0};
  options.dropout_seed_words = words;
  ASSERT_EQ(t.forward(options), FJ_SUCCESS) << fj_last_error();
  const std::vector<double> first = t.o.values();
  words[0] = 8;
  ASSERT_EQ(t.forward(options), FJ_SUCCESS) << fj_last_error();
  EXPECT_NE(t.o.values(), first);
  words[0] = 7;
  ASSERT_EQ(t.forward(options), FJ_SUCCESS) << fj_last_error();
  EXPECT_EQ(t.o.values(), first);
}

// Key blocks of 128 keys over lengths (queries and keys each of 1 to 4096, ends inside tiles),
// both causal alignments and six kinds of bounds: the one pass's orders are checked over these.
struct SpanCase {
  int64_t shift, left, right, seqlen_q, seqlen_k;
  std::string describe(int64_t tile_rows) const {
    return "shift " + std::to_string(shift) + " window " + std::to_string(left) + "/" + std::to_string(right) +
           " Sq " + std::to_string(seqlen_q) + " Sk " + std::to_string(seqlen_k) + " tile " + std::to_string(tile_rows);
  }
};
std::vector<SpanCase> span_cases() {
  std::vector<SpanCase> cases;
  for (int64_t seqlen_q : {1, 31, 128, 300, 700, 4096}) {
    for (int64_t seqlen_k : {1, 100, 128, 333, 1000, 4096}) {
      for (int64_t align : {0, 1}) {  // top-left, bottom-right diagonal
        const int64_t shift = align ? seqlen_k - seqlen_q : 0;
        cases.push_back({shift, -1, -1, seqlen_q, seqlen_k});  // no bounds
        cases.push_back({shift, -1, 0, seqlen_q, seqlen_k});   // causal
        cases.push_back({shift, 64, 0, seqlen_q, seqlen_k});   // causal sliding window
        cases.push_back({shift, 40, 90, seqlen_q, seqlen_k});  // two-sided window
        cases.push_back({shift, 0, -1, seqlen_q, seqlen_k});   // keys from the diagonal on
        cases.push_back({shift, 3, 5, seqlen_q, seqlen_k});    // a narrow band
      }
    }
  }
  return cases;
}

// Calls body(c, spans, tiles, where) for every span case and tile height (16, 32, 64 rows) with
// 128-key blocks, as the one-pass orders' tests walk them.
template <typename Body>
void for_each_span(Body body) {
  for (const SpanCase& c : span_cases()) {
    for (int64_t tile_rows : {16, 32, 64}) {
      const KeyBlockSpans spans{128, tile_rows, c.shift, c.left, c.right, c.seqlen_q, c.seqlen_k};
      body(c, spans, (c.seqlen_q + tile_rows - 1) / tile_rows, c.describe(tile_rows));
    }
  }
}

// The one-pass CUDA backward adds each query tile's dQ shares in ascending key-block order
// (KeyBlockSpans, shared with attention_hopper_bwd.cuh). Over causal alignments, windows and
// lengths: the blocks that visit a tile are consecutive; the kernel's walk (each block's tiles
// from the last down, the lowest visitor carried from tile to tile) gives the visitors of a tile
// the ranks 0 .. count - 1 in ascending block order, and only the highest is "last"; and every
// query row that sees a key lies in a visited tile (the others' dQ rows are zeros, written apart).
TEST(OnePassOrder, VisitorsOfEveryTileAreRankedOnceInBlockOrder) {
  for (const SpanCase& c : span_cases()) {
    for (int64_t tile_rows : {16, 32, 64}) {
      const KeyBlockSpans spans{128, tile_rows, c.shift, c.left, c.right, c.seqlen_q, c.seqlen_k};
      const int64_t tiles = (c.seqlen_q + tile_rows - 1) / tile_rows;
      const std::string where = c.describe(tile_rows);
      std::vector<std::vector<int64_t>> ranks(tiles), lasts(tiles);
      for (int64_t block = 0; block < spans.blocks(); ++block) {
        const int64_t first = spans.first_tile(block), end = spans.query_end(block);
        const bool walks = spans.query_begin(block) < end;  // as the kernel's tiles_per_head
        int64_t lowest = block;
        for (int64_t start = walks && end > first ? (end - 1) / tile_rows * tile_rows : -1; start >= first;
             start -= tile_rows) {  // the kernel's walk
          ASSERT_TRUE(spans.visits(block, start)) << where;
          lowest = spans.lowest_visitor(lowest, start);
          ranks[start / tile_rows].push_back(block - lowest);
          if (!spans.visits(block + 1, start)) lasts[start / tile_rows].push_back(block);
        }
      }
      for (int64_t t = 0; t < tiles; ++t) {
        std::vector<int64_t> visitors;
        for (int64_t block = 0; block < spans.blocks(); ++block) {
          if (spans.visits(block, t * tile_rows)) visitors.push_back(block);
        }
        for (size_t i = 1; i < visitors.size(); ++i) ASSERT_EQ(visitors[i], visitors[i - 1] + 1) << where;
        // Blocks pushed their ranks in ascending block order: ranks must rise 0, 1, ... with it (the
        // kernel's blocks wait only on lower ones, launched before them).
        ASSERT_EQ(ranks[t].size(), visitors.size()) << where;
        for (size_t i = 0; i < ranks[t].size(); ++i) ASSERT_EQ(ranks[t][i], int64_t(i)) << where << " tile " << t;
        if (visitors.empty()) {
          ASSERT_TRUE(lasts[t].empty()) << where;
          for (int64_t i = t * tile_rows; i < std::min((t + 1) * tile_rows, c.seqlen_q); ++i) {
            ASSERT_GE(visible_key_begin(i, c.shift, c.left, c.seqlen_k), visible_key_end(i, c.shift, c.right, c.seqlen_k))
                << where << ": row " << i << " sees a key but no block visits its tile";
          }
        } else {
          ASSERT_EQ(lasts[t], std::vector<int64_t>{visitors.back()}) << where << " tile " << t;
        }
      }
    }
  }
}

// FLASHJIT_CUDA_ONE_PASS_DQ=writer-diagonal: each block walks its tiles upward from its first, by
// two writer threads on alternate tiles, each carrying the highest visitor of its previous tile up
// (KeyBlockSpans::highest_visitor); a tile's visitors then take the ranks 0 .. count - 1 once each,
// in descending block order (each waits only on higher blocks, which launch before it).
TEST(OnePassOrder, DiagonalWalksRankTheVisitorsFromTheHighestDown) {
  for_each_span([](const SpanCase&, const KeyBlockSpans& spans, int64_t tiles, const std::string& where) {
    const int64_t tile_rows = spans.tile_rows;
    std::vector<std::vector<std::pair<int64_t, int64_t>>> ranks(tiles);  // (block, rank)
    for (int64_t block = 0; block < spans.blocks(); ++block) {
      const int64_t first = spans.first_tile(block), end = spans.query_end(block);
      if (!(spans.query_begin(block) < end) || end <= first) continue;  // walks nothing
      const int64_t count = (end - 1) / tile_rows - first / tile_rows + 1;
      for (int64_t pair = 0; pair < 2; ++pair) {
        int64_t highest = block;
        for (int64_t t = pair; t < count; t += 2) {  // this writer thread's tiles, upward
          const int64_t start = first + t * tile_rows;
          ASSERT_TRUE(spans.visits(block, start)) << where;
          ASSERT_TRUE(spans.visits(highest, start)) << where << ": the carried block no longer visits";
          highest = spans.highest_visitor(highest, start);
          ranks[start / tile_rows].push_back({block, highest - block});
        }
      }
    }
    for (int64_t t = 0; t < tiles; ++t) {
      std::vector<int64_t> visitors;
      for (int64_t block = 0; block < spans.blocks(); ++block) {
        if (spans.visits(block, t * tile_rows)) visitors.push_back(block);
      }
      ASSERT_EQ(ranks[t].size(), visitors.size()) << where << " tile " << t;
      for (const auto& [block, rank] : ranks[t]) {
        ASSERT_EQ(rank, visitors.back() - block) << where << " tile " << t << " block " << block;
      }
    }
  });
}

// The arrival order (FLASHJIT_CUDA_ONE_PASS_DQ=arrival; KeyBlockSpans::arrival_step, walk_phase,
// walk_tile, step_at, as the kernel uses them): each block's walk meets each tile it visits
// exactly once, at the step arrival_step names (and step_at, from the phase); the
// visitors of a tile ranked by (step, block) take the ranks 0 .. count - 1 once each, so the
// adds form one chain (the kernel counts the visitors that come before it, in parallel, and
// waits for that count); and where the blocks' rows are twice a tile's and queries and keys
// line up (no shift: causal, or no bounds and as many queries as keys), no two visitors of a
// tile meet it at the same step, which is what keeps blocks that run in step from waiting.
TEST(OnePassOrder, ArrivalWalksMeetEachTileOnceAndRankTheVisitorsOnce) {
  for (const SpanCase& c : span_cases()) {
    // No two visitors of a tile at one step: no bounds over as many queries as keys, or causal.
    const bool distinct = c.left < 0 && ((c.right < 0 && c.seqlen_q == c.seqlen_k && c.seqlen_q % 128 == 0) ||
                                         (c.right == 0 && c.shift == 0));
    for (int64_t tile_rows : {16, 32, 64}) {
      const KeyBlockSpans spans{128, tile_rows, c.shift, c.left, c.right, c.seqlen_q, c.seqlen_k};
      const int64_t tiles = (c.seqlen_q + tile_rows - 1) / tile_rows;
      const std::string where = c.describe(tile_rows);
      std::vector<std::vector<std::pair<int64_t, int64_t>>> arrivals(tiles);  // (step, block) a tile
      for (int64_t block = 0; block < spans.blocks(); ++block) {
        const int64_t count = spans.tile_count(block);
        const int64_t first = spans.first_tile(block) / tile_rows;
        const int64_t phase = count > 0 ? spans.walk_phase(block, count) : 0;
        ASSERT_TRUE(count == 0 || (phase >= 0 && phase < count)) << where;
        std::vector<bool> met(tiles, false);
        for (int64_t j = 0; j < count; ++j) {
          const int64_t q = KeyBlockSpans::walk_tile(first, count, phase, j);
          ASSERT_TRUE(q >= 0 && q < tiles && spans.visits(block, q * tile_rows)) << where << " block " << block;
          ASSERT_FALSE(met[q]) << where << " block " << block << " meets tile " << q << " twice";
          met[q] = true;
          ASSERT_EQ(spans.arrival_step(block, count, q), j) << where;
          ASSERT_EQ(KeyBlockSpans::step_at(first, count, phase, q), j) << where;
          arrivals[q].push_back({j, block});
        }
        for (int64_t q = 0; q < tiles; ++q) ASSERT_EQ(met[q], spans.visits(block, q * tile_rows)) << where;
      }
      for (int64_t q = 0; q < tiles; ++q) {
        std::vector<int64_t> ranks;
        for (const auto& [step, block] : arrivals[q]) {
          int64_t rank = 0;
          for (const auto& [other_step, other] : arrivals[q]) {
            rank += spans.arrives_before(other, other_step, block, step) ? 1 : 0;
          }
          ranks.push_back(rank);
        }
        std::sort(ranks.begin(), ranks.end());
        for (size_t i = 0; i < ranks.size(); ++i) ASSERT_EQ(ranks[i], int64_t(i)) << where << " tile " << q;
        if (distinct && tile_rows == 64) {
          std::vector<int64_t> steps;
          for (const auto& arrival : arrivals[q]) steps.push_back(arrival.first);
          std::sort(steps.begin(), steps.end());
          ASSERT_TRUE(std::adjacent_find(steps.begin(), steps.end()) == steps.end())
              << where << ": two visitors of tile " << q << " meet it at one step";
        }
      }
    }
  }
}

// bounds_core.h's Divisor (the backward kernels' tile head and start a step): the quotient and
// the remainder it gives equal integer division's for every divisor up to 4,096 over the
// numerators around each multiple of it up to 2^16 and a sample up to 2^31 - 1, and for large
// divisors at their edges.
TEST(Divisor, MatchesIntegerDivisionOverDivisorsAndNumerators) {
  const auto check = [](int d, int n) {
    const Divisor divisor(d);
    const int q = divisor.quotient(n);
    ASSERT_EQ(q, n / d) << n << " / " << d;
    ASSERT_EQ(n - q * d, n % d) << n << " % " << d;  // the kernel's remainder
  };
  const int top = 2147483647;
  for (int d = 1; d <= 4096; ++d) {
    for (int n = 0; n < 65536; n += (d < 64 ? 1 : d)) {
      for (int e : {-1, 0, 1}) {
        if (n + e >= 0) check(d, n + e);
      }
    }
    for (int n : {top, top - 1, top - d, top / d * d, top / d * d - 1, 1 << 30, (1 << 30) - 1}) check(d, n);
  }
  uint64_t state = 0x9E3779B97F4A7C15ull;
  for (int i = 0; i < 200000; ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const int d = 1 + static_cast<int>((state >> 33) % (i % 2 ? 4096u : 2147483647u));
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    check(d, static_cast<int>(state >> 33));
  }
  for (int d : {top, top - 1, 1 << 30, (1 << 30) + 1, (1 << 30) - 1, 65537, 46341}) {
    for (int n : {0, 1, d - 1, d, top, top - 1, top / d * d - 1}) check(d, n);
  }
  EXPECT_EQ(Divisor(0).quotient(7), 7);  // below 1: taken as 1
}

}  // namespace
}  // namespace flashjit::testing
