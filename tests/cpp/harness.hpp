// Test harness: strided tensors inside guarded buffers, a case description
// covering every feature, and the comparison against the float64 reference.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/problem.hpp"
#include "flashjit/flashjit.h"

namespace flashjit::testing {

// Memory layouts of a [B, H, S, D] tensor.
enum class Layout {
  kContiguous,  // [B, H, S, D]
  kPadded,      // gaps between rows and heads
  kSeqMajor,    // stored as [B, S, H, D] (transposed view, as from a projection)
};

// A tensor view inside a buffer whose other bytes hold a sentinel pattern, so a
// write outside the view is caught.
class GuardedTensor {
 public:
  GuardedTensor(std::vector<int64_t> shape, fj_dtype dtype, Layout layout = Layout::kContiguous);
  // Same, with explicit strides (zero strides broadcast).
  GuardedTensor(std::vector<int64_t> shape, std::vector<int64_t> strides, fj_dtype dtype);

  fj_tensor view();
  void fill_normal(uint64_t seed, double stddev = 1.0);
  void fill(const std::vector<double>& values);  // logical row-major order
  void poison();                                 // NaN (or 0xFF bytes) over the view
  std::vector<double> values() const;            // logical row-major order, as double
  // True when no byte outside the view changed.
  bool guards_intact() const;
  int64_t numel() const;
  const std::vector<int64_t>& shape() const { return shape_; }
  void set(int64_t logical_index, double value);

 private:
  int64_t offset(int64_t logical_index) const;  // element offset of a logical index
  std::vector<int64_t> shape_, strides_;
  fj_dtype dtype_;
  int64_t guard_elems_ = 0;
  int64_t span_ = 0;
  std::vector<unsigned char> bytes_;
  std::vector<bool> in_view_;
};

// The nine tensors of one forward + backward: q, k, v, dout filled with normal
// values (seeds 1 to 4); o, lse, dq, dk, dv left for the library to write.
struct AttentionBuffers {
  AttentionBuffers(int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q, int64_t seqlen_k,
                   int64_t head_dim, fj_dtype dtype);
  fj_status forward(const fj_attention_options& options);
  fj_status backward(const fj_attention_options& options);

  GuardedTensor q, k, v, o, lse, dout, dq, dk, dv;
};

enum class MaskType { kNone, kBool, kAdditiveFloat32, kAdditiveDtype };

struct Case {
  std::string name;
  int64_t batch = 1, heads_q = 2, heads_kv = 2, seqlen_q = 33, seqlen_k = 33, dim_qk = 16, dim_v = 16;
  fj_dtype dtype = FJ_FLOAT32;
  Layout layout = Layout::kContiguous;
  fj_causal causal = FJ_CAUSAL_NONE;
  int64_t window_left = -1, window_right = -1;
  MaskType mask = MaskType::kNone;
  bool mask_broadcast[4] = {false, false, false, false};  // size 1 in that dim
  bool mask_empty_rows = false;                           // some query rows see no key at all
  double softcap = 0.0;
  double scale = 0.0;  // 0: default 1/sqrt(dim_qk)
  double dropout = 0.0;
  bool backward = true;
};

// Maximum absolute errors of one output against the float64 reference.
struct ErrorReport {
  std::string what;
  double error = 0;      // flashjit vs exact
  double baseline = 0;   // unfused in the same dtype vs exact
  double tolerance = 0;  // 2 * baseline + floor
};

// Runs the case forward (and backward) and returns one report per output, or
// a failure message in `failure` for structural problems (guards, masked rows).
struct CaseResult {
  std::vector<ErrorReport> reports;
  std::string failure;
};
CaseResult run_case(const Case& c);

std::string describe(const Case& c);

}  // namespace flashjit::testing
