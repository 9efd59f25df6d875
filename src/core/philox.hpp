// Host-side dropout helpers around the shared Philox rule (philox_core.h).
#pragma once

#include <cmath>
#include <cstdint>

#include "core/philox_core.h"

namespace flashjit {

// Dropout threshold for probability p in [0, 1): floor(p * 2^32), exact in double.
inline uint32_t dropout_threshold(double p) {
  return uint32_t(std::floor(p * 4294967296.0));
}

// The counter holds the query index, the batch-head index and the key quad in
// 32 bits each: sizes within this range never repeat a counter.
inline bool dropout_counter_fits(int64_t batch_heads, int64_t seqlen_q, int64_t seqlen_k) {
  return batch_heads <= int64_t(UINT32_MAX) && seqlen_q <= int64_t(UINT32_MAX) &&
         seqlen_k <= 4 * int64_t(UINT32_MAX);
}

}  // namespace flashjit
