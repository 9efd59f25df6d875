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

}  // namespace flashjit
