// The C boundary: every C++ exception becomes a status plus fj_last_error().
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <string>

#include "core/backend.hpp"
#include "core/error.hpp"
#include "core/guarded.hpp"
#include "core/philox.hpp"
#include "core/problem.hpp"
#include "flashjit/flashjit.h"

namespace {

#define FJ_STRINGIFY_(x) #x
#define FJ_STRINGIFY(x) FJ_STRINGIFY_(x)

// fj_attention_prepare_*: the backend readies the call's kernels as under stream capture and
// reports its scratch; nothing runs.
void prepare(const flashjit::AttentionProblem& problem, bool backward, size_t* workspace_bytes, const char* op) {
  if (workspace_bytes == nullptr) {
    flashjit::throw_value_error("[", op, "] workspace_bytes: expected a pointer to write the size to, got NULL");
  }
  const flashjit::Backend& backend = flashjit::backend_for(problem.device_type, op);
  *workspace_bytes = backend.prepare == nullptr ? 0 : backend.prepare(problem, backward);
}

}  // namespace

extern "C" {

fj_attention_options fj_attention_options_default(void) {
  fj_attention_options options;
  std::memset(&options, 0, sizeof options);
  options.causal = FJ_CAUSAL_NONE;
  options.window_left = -1;
  options.window_right = -1;
  return options;
}

fj_status fj_attention_forward(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                               const fj_attention_options* options, fj_tensor* o, fj_tensor* lse) {
  return flashjit::guarded([&] {
    const flashjit::AttentionProblem problem = flashjit::make_forward_problem(q, k, v, options, o, lse);
    flashjit::backend_for(problem.device_type, "attention").forward(problem);
  });
}

fj_status fj_attention_backward(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                const fj_tensor* o, const fj_tensor* lse, const fj_tensor* dout,
                                const fj_attention_options* options, fj_tensor* dq, fj_tensor* dk,
                                fj_tensor* dv) {
  return flashjit::guarded([&] {
    const flashjit::AttentionProblem problem =
        flashjit::make_backward_problem(q, k, v, o, lse, dout, options, dq, dk, dv);
    flashjit::backend_for(problem.device_type, "attention_backward").backward(problem);
  });
}

fj_status fj_attention_prepare_forward(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                       const fj_attention_options* options, fj_tensor* o, fj_tensor* lse,
                                       size_t* workspace_bytes) {
  return flashjit::guarded([&] {
    prepare(flashjit::make_forward_problem(q, k, v, options, o, lse), false, workspace_bytes, "attention");
  });
}

fj_status fj_attention_prepare_backward(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                        const fj_tensor* o, const fj_tensor* lse, const fj_tensor* dout,
                                        const fj_attention_options* options, fj_tensor* dq, fj_tensor* dk,
                                        fj_tensor* dv, size_t* workspace_bytes) {
  return flashjit::guarded([&] {
    prepare(flashjit::make_backward_problem(q, k, v, o, lse, dout, options, dq, dk, dv), true, workspace_bytes,
            "attention_backward");
  });
}

fj_status fj_attention_varlen_forward(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                      const fj_varlen* varlen, const fj_attention_options* options, fj_tensor* o,
                                      fj_tensor* lse) {
  return flashjit::guarded([&] {
    const flashjit::AttentionProblem problem = flashjit::make_varlen_forward_problem(q, k, v, varlen, options, o, lse);
    flashjit::backend_for(problem.device_type, "varlen_attention").forward(problem);
  });
}

fj_status fj_attention_varlen_backward(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                       const fj_tensor* o, const fj_tensor* lse, const fj_tensor* dout,
                                       const fj_varlen* varlen, const fj_attention_options* options,
                                       fj_tensor* dq, fj_tensor* dk, fj_tensor* dv) {
  return flashjit::guarded([&] {
    const flashjit::AttentionProblem problem =
        flashjit::make_varlen_backward_problem(q, k, v, o, lse, dout, varlen, options, dq, dk, dv);
    flashjit::backend_for(problem.device_type, "varlen_attention_backward").backward(problem);
  });
}

fj_status fj_attention_varlen_check_forward(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                            const fj_varlen* varlen, const fj_attention_options* options,
                                            const fj_tensor* o, const fj_tensor* lse) {
  return flashjit::guarded([&] { flashjit::make_varlen_forward_problem(q, k, v, varlen, options, o, lse, true); });
}

fj_status fj_attention_check_forward(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                     const fj_attention_options* options, const fj_tensor* o,
                                     const fj_tensor* lse) {
  return flashjit::guarded([&] { flashjit::make_forward_problem(q, k, v, options, o, lse, true); });
}

fj_status fj_attention_check_backward(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                      const fj_tensor* o, const fj_tensor* lse, const fj_tensor* dout,
                                      const fj_attention_options* options, const fj_tensor* dq,
                                      const fj_tensor* dk, const fj_tensor* dv) {
  return flashjit::guarded([&] { flashjit::make_backward_problem(q, k, v, o, lse, dout, options, dq, dk, dv, true); });
}

int fj_dropout_keep(uint64_t seed, uint64_t offset, double p, int64_t b, int64_t h, int64_t num_heads,
                    int64_t i, int64_t j) {
  if (!(p > 0.0)) return 1;
  if (p >= 1.0) return 0;
  return flashjit::dropout_keep(seed, offset, flashjit::dropout_threshold(p), b * num_heads + h, i, j) ? 1
                                                                                                       : 0;
}

fj_status fj_dropout_keep_mask(uint64_t seed, uint64_t offset, double p, int64_t batch, int64_t num_heads,
                               int64_t seqlen_q, int64_t seqlen_k, uint8_t* keep) {
  return flashjit::guarded([&] {
    if (!(p >= 0.0 && p < 1.0)) {
      flashjit::throw_value_error("[dropout_keep_mask] p: expected a value in [0, 1), got ", p);
    }
    int64_t batch_heads = 0, rows = 0, elements = 0;
    if (batch < 0 || num_heads < 0 || seqlen_q < 0 || seqlen_k < 0 ||
        __builtin_mul_overflow(batch, num_heads, &batch_heads) ||
        !flashjit::dropout_counter_fits(batch_heads, seqlen_q, seqlen_k) ||
        __builtin_mul_overflow(batch_heads, seqlen_q, &rows) ||
        __builtin_mul_overflow(rows, seqlen_k, &elements)) {
      flashjit::throw_value_error("[dropout_keep_mask] sizes [", batch, ", ", num_heads, ", ", seqlen_q, ", ",
                                  seqlen_k,
                                  "] must be >= 0 and within the dropout counter "
                                  "range (batch*heads and seqlen_q below 2^32)");
    }
    if (keep == nullptr && elements > 0) {
      flashjit::throw_value_error("[dropout_keep_mask] keep: data pointer is NULL");
    }
    const uint32_t threshold = flashjit::dropout_threshold(p);
    for (int64_t bh = 0; bh < batch * num_heads; ++bh) {
      for (int64_t i = 0; i < seqlen_q; ++i) {
        for (int64_t quad = 0; quad * 4 < seqlen_k; ++quad) {
          const flashjit::Philox4x32 words = flashjit::dropout_words(seed, offset, bh, i, quad);
          for (int lane = 0; lane < 4 && quad * 4 + lane < seqlen_k; ++lane) {
            *keep++ = words.word[lane] >= threshold ? 1 : 0;
          }
        }
      }
    }
  });
}

}  // extern "C"

std::string& flashjit::last_error_text() {
  thread_local std::string text;
  return text;
}

extern "C" {

const char* fj_last_error(void) {
  return flashjit::last_error_text().c_str();
}

const char* fj_version(void) {
  return FJ_STRINGIFY(FJ_VERSION_MAJOR) "." FJ_STRINGIFY(FJ_VERSION_MINOR) "." FJ_STRINGIFY(FJ_VERSION_PATCH);
}

const char* fj_backends(void) {
  return flashjit::backend_names();
}

fj_status fj_device_type_by_name(const char* name, int32_t* device_type) {
  return flashjit::guarded([&] {
    if (device_type == nullptr) flashjit::throw_value_error("[device_type_by_name] device_type: expected a pointer, got NULL");
    const flashjit::Backend* backend = flashjit::backend_named(name);
    if (backend == nullptr) {
      flashjit::throw_unsupported("[device_type_by_name] name: no backend '", name == nullptr ? "(NULL)" : name,
                                  "' in this build (compiled-in backends: ", flashjit::backend_names(), ")");
    }
    *device_type = int32_t(backend->device_type);
  });
}

}  // extern "C"
