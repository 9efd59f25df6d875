// No allocation grows with seqlen_q x seqlen_k: peak heap use during forward and
// backward, measured by replacing the global operator new, at two sequence lengths.
// Each measurement runs on a fresh thread, so the per-thread scratch that the CPU
// backend keeps between calls is allocated, and counted, inside it.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <new>
#include <thread>

#include "harness.hpp"

namespace {

std::atomic<int64_t> g_live{0};
std::atomic<int64_t> g_peak{0};
std::atomic<bool> g_counting{false};

void* counted_alloc(std::size_t size) {
  // A size header keeps the bookkeeping exact across operator delete overloads.
  void* block = std::malloc(size + 16);
  if (block == nullptr) throw std::bad_alloc();
  *static_cast<std::size_t*>(block) = size;
  if (g_counting.load()) {
    const int64_t live = g_live.fetch_add(int64_t(size)) + int64_t(size);
    int64_t peak = g_peak.load();
    while (live > peak && !g_peak.compare_exchange_weak(peak, live)) {
    }
  }
  return static_cast<char*>(block) + 16;
}

void counted_free(void* pointer) {
  if (pointer == nullptr) return;
  void* block = static_cast<char*>(pointer) - 16;
  if (g_counting.load()) g_live.fetch_sub(int64_t(*static_cast<std::size_t*>(block)));
  std::free(block);
}

// Aligned variants: the header takes a whole alignment unit.
void* counted_aligned_alloc(std::size_t size, std::align_val_t alignment) {
  const std::size_t unit = std::max(std::size_t(alignment), sizeof(std::size_t));
  void* block = std::aligned_alloc(unit, (size + 2 * unit - 1) / unit * unit);
  if (block == nullptr) throw std::bad_alloc();
  *static_cast<std::size_t*>(block) = size;
  if (g_counting.load()) {
    const int64_t live = g_live.fetch_add(int64_t(size)) + int64_t(size);
    int64_t peak = g_peak.load();
    while (live > peak && !g_peak.compare_exchange_weak(peak, live)) {
    }
  }
  return static_cast<char*>(block) + unit;
}

void counted_aligned_free(void* pointer, std::align_val_t alignment) {
  if (pointer == nullptr) return;
  const std::size_t unit = std::max(std::size_t(alignment), sizeof(std::size_t));
  void* block = static_cast<char*>(pointer) - unit;
  if (g_counting.load()) g_live.fetch_sub(int64_t(*static_cast<std::size_t*>(block)));
  std::free(block);
}

}  // namespace

void* operator new(std::size_t size) {
  return counted_alloc(size);
}
void* operator new[](std::size_t size) {
  return counted_alloc(size);
}
void operator delete(void* p) noexcept {
  counted_free(p);
}
void operator delete[](void* p) noexcept {
  counted_free(p);
}
void operator delete(void* p, std::size_t) noexcept {
  counted_free(p);
}
void operator delete[](void* p, std::size_t) noexcept {
  counted_free(p);
}
void* operator new(std::size_t size, std::align_val_t alignment) {
  return counted_aligned_alloc(size, alignment);
}
void operator delete(void* p, std::align_val_t alignment) noexcept {
  counted_aligned_free(p, alignment);
}
void operator delete(void* p, std::size_t, std::align_val_t alignment) noexcept {
  counted_aligned_free(p, alignment);
}

namespace flashjit::testing {
namespace {

// Peak bytes the library allocates during one forward + backward at seqlen n.
int64_t peak_bytes(int64_t n) {
  AttentionBuffers t(1, 2, 2, n, n, 64, FJ_FLOAT32);
  fj_attention_options options = fj_attention_options_default();
  options.num_threads = 1;  // on the caller's thread
  options.dropout_p = 0.1;
  g_live = 0;
  g_peak = 0;
  g_counting = true;
  std::thread caller([&] {
    EXPECT_EQ(t.forward(options), FJ_SUCCESS);
    EXPECT_EQ(t.backward(options), FJ_SUCCESS);
  });
  caller.join();
  g_counting = false;
  return g_peak.load();
}

TEST(Memory, PeakDoesNotGrowWithScoreMatrix) {
  peak_bytes(64);  // one-time allocations happen outside the measurement
  const int64_t small = peak_bytes(512);
  const int64_t large = peak_bytes(2048);  // 16x the score elements of `small`
  RecordProperty("peak_bytes_512", std::to_string(small));
  RecordProperty("peak_bytes_2048", std::to_string(large));
  std::printf("peak heap during forward+backward: seqlen 512: %lld bytes, seqlen 2048: %lld bytes\n",
              (long long)small, (long long)large);
  EXPECT_GT(small, 0);
  // Linear growth would allow 4x; a score matrix would give about 16x.
  EXPECT_LE(large, 4 * small);
  // And far below one float32 score matrix per head.
  EXPECT_LT(large, 2048LL * 2048 * 4 / 8);
}

}  // namespace
}  // namespace flashjit::testing
