// The options both front-end modules (flashjit._C and flashjit._torch_ops) set on a C API call
// from their arguments: what the scores are (scale, softcap, causal bound, window), the CPU
// threads and the stream. Header only: _torch_ops links no flashjit code.
#pragma once

#include <cstdint>
#include <optional>

#include "flashjit/flashjit.h"

namespace flashjit_front {

inline void set_score_options(fj_attention_options& options, std::optional<double> scale, double softcap,
                              int64_t causal, int64_t window_left, int64_t window_right, int64_t num_threads,
                              void* stream) {
  options.has_scale = scale.has_value();
  options.scale = scale.value_or(0.0);
  options.softcap = softcap;
  options.causal = fj_causal(causal);
  options.window_left = window_left;
  options.window_right = window_right;
  options.num_threads = int32_t(num_threads);
  options.stream = stream;
}

}  // namespace flashjit_front
