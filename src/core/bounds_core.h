// The causal/window bounds of flashjit.h in one place, shared verbatim by the
// host (AttentionProblem, the CPU backend) and the CUDA kernels (common.cuh):
// key j is visible from query i when
//   -window_left <= j - i - diagonal_shift <= window_right,
// a bound of -1 being absent (causal attention is window_right = 0 with the
// diagonal shifted for bottom-right alignment).
#pragma once

#ifndef FJ_HOST_DEVICE  // kernel sources embed host_device.h before this file
#include "core/host_device.h"
#endif

namespace flashjit {

FJ_HOST_DEVICE int64_t clamp_to_length(int64_t x, int64_t length) {
  return x < 0 ? 0 : (x > length ? length : x);
}

// First and one-past-last key query row `query` can see.
FJ_HOST_DEVICE int64_t visible_key_begin(int64_t query, int64_t diagonal_shift, int64_t window_left,
                                         int64_t seqlen_k) {
  return window_left < 0 ? 0 : clamp_to_length(query + diagonal_shift - window_left, seqlen_k);
}
FJ_HOST_DEVICE int64_t visible_key_end(int64_t query, int64_t diagonal_shift, int64_t window_right,
                                       int64_t seqlen_k) {
  return window_right < 0 ? seqlen_k : clamp_to_length(query + diagonal_shift + window_right + 1, seqlen_k);
}

// First and one-past-last query row that can see key `key`.
FJ_HOST_DEVICE int64_t visible_query_begin(int64_t key, int64_t diagonal_shift, int64_t window_right,
                                           int64_t seqlen_q) {
  return window_right < 0 ? 0 : clamp_to_length(key - diagonal_shift - window_right, seqlen_q);
}
FJ_HOST_DEVICE int64_t visible_query_end(int64_t key, int64_t diagonal_shift, int64_t window_left,
                                         int64_t seqlen_q) {
  return window_left < 0 ? seqlen_q : clamp_to_length(key - diagonal_shift + window_left + 1, seqlen_q);
}

// Whether key `key` is visible from query row `query`.
FJ_HOST_DEVICE bool key_visible(int64_t query, int64_t key, int64_t diagonal_shift, int64_t window_left,
                                int64_t window_right) {
  const int64_t shifted = key - query - diagonal_shift;
  return (window_left < 0 || shifted >= -window_left) && (window_right < 0 || shifted <= window_right);
}

// The query tiles the one-pass backward's key blocks walk (the sm_90a dK/dV kernel): block b
// holds keys b * block_rows .. + block_rows - 1 (the last block fewer) and, if any query sees one
// of them, walks the tiles of tile_rows queries from the one holding its first visible query to
// its last visible query. Both ends never fall as b grows, so the blocks that visit a tile are
// consecutive; the one-pass backward adds their shares of a tile's dQ in ascending block order
// (attention_hopper_bwd.cuh; descending with FLASHJIT_CUDA_ONE_PASS_DQ=writer-diagonal).
struct KeyBlockSpans {
  int64_t block_rows, tile_rows, diagonal_shift, window_left, window_right, seqlen_q, seqlen_k;

  FJ_HOST_DEVICE int64_t blocks() const { return (seqlen_k + block_rows - 1) / block_rows; }
  // Block b's first visible query, the first row of its first tile, and one past its last visible
  // query; it sees a query when the first is below the last (keys are consecutive and a key's
  // window is at least one query wide, so no block spans from keys before every query to keys
  // after them all).
  FJ_HOST_DEVICE int64_t query_begin(int64_t b) const {
    return visible_query_begin(b * block_rows, diagonal_shift, window_right, seqlen_q);
  }
  FJ_HOST_DEVICE int64_t first_tile(int64_t b) const { return query_begin(b) / tile_rows * tile_rows; }
  FJ_HOST_DEVICE int64_t query_end(int64_t b) const {
    const int64_t end = (b + 1) * block_rows < seqlen_k ? (b + 1) * block_rows : seqlen_k;
    return visible_query_end(end - 1, diagonal_shift, window_left, seqlen_q);
  }
  // Whether block b walks the tile of queries from `start` (a multiple of tile_rows).
  FJ_HOST_DEVICE bool visits(int64_t b, int64_t start) const {
    return b >= 0 && b < blocks() && query_begin(b) < query_end(b) && first_tile(b) <= start && start < query_end(b);
  }
  // The lowest block that visits tile `start`, searched down from `from`, a block no lower than it
  // and no higher than a visitor. A block below a visitor starts its walk no later and, if its last
  // visible query passes the tile's start, sees a query (else every key of the block would come
  // after every query, and so would the visitor's), so that comparison alone decides (no division
  // in the loop).
  FJ_HOST_DEVICE int64_t lowest_visitor(int64_t from, int64_t start) const {
    while (from > 0 && query_end(from - 1) > start) --from;
    return from;
  }
  // The highest block that visits tile `start`, searched up from `from`, a visitor of it no higher
  // than the highest (FLASHJIT_CUDA_ONE_PASS_DQ=writer-diagonal: each block walks its tiles upward
  // from its first, so that the highest visitor carried from tile to tile only moves up; a tile's
  // visitors are consecutive, and a visitor of a lower tile no lower than one of this tile is one
  // too, its last visible query being no earlier).
  FJ_HOST_DEVICE int64_t highest_visitor(int64_t from, int64_t start) const {
    while (visits(from + 1, start)) ++from;
    return from;
  }

  // The arrival order (FLASHJIT_CUDA_ONE_PASS_DQ=arrival): block b walks its tiles cyclically,
  // upward, from its diagonal tile (the one holding query b * block_rows - diagonal_shift, taken
  // into its range modulo its tile count), and a tile's visitors add in the order they reach it:
  // by the step of their walk that meets it, ties by block. Where blocks run in step and queries
  // line up with keys, the visitors of a tile then meet it at different steps (block_rows /
  // tile_rows apart, causal or not), so that no add waits on one of the same step; but a block
  // may wait on a higher one, so a head's blocks must be resident together (the host's guard).
  // Tiles by index (start / tile_rows); counts and indices fit an int (the modulo's width).
  FJ_HOST_DEVICE int64_t tile_count(int64_t b) const {
    const int64_t end = query_end(b);
    return query_begin(b) < end ? (end - 1) / tile_rows - first_tile(b) / tile_rows + 1 : 0;
  }
  // The step of block b's walk (of count = tile_count(b) > 0 tiles) that meets tile index q.
  FJ_HOST_DEVICE int64_t arrival_step(int64_t b, int64_t count, int64_t q) const {
    const int64_t corner = b * block_rows - diagonal_shift;  // floor division, for either sign
    const int64_t diagonal = corner >= 0 ? corner / tile_rows : -((tile_rows - 1 - corner) / tile_rows);
    const int step = static_cast<int>(q - diagonal) % static_cast<int>(count);
    return step < 0 ? step + count : step;
  }
  // The walk's phase: the step at which block b (count = tile_count(b) > 0) meets its first tile.
  FJ_HOST_DEVICE int64_t walk_phase(int64_t b, int64_t count) const {
    return arrival_step(b, count, first_tile(b) / tile_rows);
  }
  // The tile index at step j of a walk from tile index `first` (count tiles, phase `phase`): the
  // inverse of arrival_step.
  FJ_HOST_DEVICE static int64_t walk_tile(int64_t first, int64_t count, int64_t phase, int64_t j) {
    const int64_t q = j + first - phase;
    return q < first ? q + count : q;
  }
  // arrival_step of a tile index q that the walk visits (first <= q < first + count), from the
  // walk's phase: no division, for the kernel's count at each add.
  FJ_HOST_DEVICE static int64_t step_at(int64_t first, int64_t count, int64_t phase, int64_t q) {
    const int64_t step = q - first + phase;
    return step >= count ? step - count : step;
  }
  // Whether block c's add to tile index q (a visitor's: arrival step `step` in its walk) comes
  // before that of block b at step `mine`.
  FJ_HOST_DEVICE static bool arrives_before(int64_t c, int64_t step, int64_t b, int64_t mine) {
    return step < mine || (step == mine && c < b);
  }
};

// Division of non-negative 32-bit counts (below 2^31) by a divisor fixed for a kernel block (a GQA
// group's size, a head's query tiles), by a multiply and a shift instead of a generic integer
// division's ~20 instructions and reciprocal (GPUs have no divide instruction; Granlund and
// Montgomery, "Division by invariant integers using multiplication", 1994, the round-up method):
// with s = ceil(log2 d) and m = floor(2^32 (2^s - d) / d) + 1, n / d = (umulhi(n, m) + n) >> s for
// every n < 2^31 (d = 1: s = 0, m = 1). The sum stays under 2^32 since umulhi(n, m) < n. Built once
// a block; a divisor below 1 is taken as 1 (a block with no tiles never divides). The remainder is
// the caller's n - q * d.
struct Divisor {
  uint32_t multiplier, shift;
  FJ_HOST_DEVICE explicit Divisor(int d) {
    const uint32_t divisor = d < 1 ? 1u : static_cast<uint32_t>(d);
    shift = 0;
    while ((1ull << shift) < divisor) ++shift;
    multiplier = static_cast<uint32_t>(((1ull << 32) * ((1ull << shift) - divisor)) / divisor + 1);
  }
  FJ_HOST_DEVICE int quotient(int n) const {
    const uint32_t u = static_cast<uint32_t>(n);
#if defined(__CUDA_ARCH__)
    const uint32_t high = __umulhi(u, multiplier);
#else
    const uint32_t high = static_cast<uint32_t>((static_cast<uint64_t>(u) * multiplier) >> 32);
#endif
    return static_cast<int>((high + u) >> shift);
  }
};

}  // namespace flashjit
