#include "core/problem.hpp"

#include <algorithm>
#include <cfloat>
#include <utility>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>
#include <tuple>

#include "core/backend.hpp"
#include "core/dtype.hpp"
#include "core/error.hpp"
#include "core/philox.hpp"

namespace flashjit {
namespace {

// C callers may store any integer in an enum field; read it as the integer it
// is before range-checking, since loading an out-of-range enum is undefined in C++.
template <typename Enum>
int32_t enum_code(const Enum& value) {
  static_assert(sizeof(Enum) == sizeof(int32_t), "C enums are int-sized");
  int32_t code;
  std::memcpy(&code, &value, sizeof code);
  return code;
}

constexpr const char* kDimNames = "[batch, heads, seqlen, head_dim]";

std::string dims_string(const int64_t* values, int ndim) {
  std::string out = "[";
  for (int d = 0; d < ndim && d < FJ_MAX_DIMS; ++d) {
    if (d) out += ", ";
    out += std::to_string(values[d]);
  }
  return out + "]";
}
std::string shape_string(const fj_tensor& t) {
  return dims_string(t.shape, t.ndim);
}

// Set while a problem is validated from descriptors alone (make_*_problem's descriptors_only).
thread_local bool t_descriptors_only = false;

struct DescriptorsOnly {
  explicit DescriptorsOnly(bool on) : previous_(t_descriptors_only) { t_descriptors_only = on; }
  ~DescriptorsOnly() { t_descriptors_only = previous_; }
  DescriptorsOnly(const DescriptorsOnly&) = delete;
  DescriptorsOnly& operator=(const DescriptorsOnly&) = delete;

 private:
  bool previous_;
};

// Checks that a tensor argument is present and well formed (pointer, rank,
// non-negative sizes and strides, contiguous last dim).
const fj_tensor& check_tensor(const char* op, const char* name, const fj_tensor* t, int ndim) {
  if (t == nullptr) throw_value_error("[", op, "] ", name, ": expected a tensor, got NULL");
  if (t->ndim != ndim) {
    throw_value_error("[", op, "] ", name, ": expected ", ndim, " dims",
                      ndim == 4 ? std::string(" ") + kDimNames : std::string(), ", got ", t->ndim);
  }
  const int32_t device = enum_code(t->device_type);
  if (device_name(device) == nullptr) {
    throw_value_error("[", op, "] ", name, ": unknown device type ", device, " (this build has devices ",
                      backend_names(), ")");
  }
  const int32_t dtype = enum_code(t->dtype);
  if (dtype < FJ_FLOAT32 || dtype > FJ_INT64) {
    throw_type_error("[", op, "] ", name, ": unknown dtype code ", dtype);
  }
  int64_t elements = 1;
  for (int d = 0; d < ndim; ++d) {
    if (t->shape[d] < 0) {
      throw_value_error("[", op, "] ", name, ": expected non-negative sizes, got shape ", shape_string(*t));
    }
    if (t->strides[d] < 0) {
      throw_value_error("[", op, "] ", name, ": expected non-negative strides, got stride ", t->strides[d],
                        " in dim ", d);
    }
    int64_t span = 0;
    if (__builtin_mul_overflow(elements, t->shape[d], &elements) ||
        __builtin_mul_overflow(t->shape[d], t->strides[d], &span) || span > (int64_t(1) << 60)) {
      throw_value_error("[", op, "] ", name, ": shape ", shape_string(*t),
                        " with these strides exceeds the address space");
    }
  }
  if (elements > 0 && t->data == nullptr && !t_descriptors_only) {
    throw_value_error("[", op, "] ", name, ": data pointer is NULL");
  }
  return *t;
}

bool has_no_elements(const fj_tensor& t) {
  for (int d = 0; d < t.ndim; ++d)
    if (t.shape[d] == 0) return true;
  return false;
}

// An empty tensor is never read or written, so its strides do not matter.
void check_last_dim_contiguous(const char* op, const char* name, const fj_tensor& t) {
  const int last = t.ndim - 1;
  if (!has_no_elements(t) && t.shape[last] > 1 && t.strides[last] != 1) {
    throw_value_error("[", op, "] ", name, ": expected the last dim to be contiguous (stride 1), got stride ",
                      t.strides[last]);
  }
}

void check_shape(const char* op, const char* name, const fj_tensor& t, const int64_t* expected,
                 const char* why) {
  for (int d = 0; d < t.ndim; ++d) {
    if (t.shape[d] != expected[d]) {
      fj_tensor want = t;
      for (int e = 0; e < t.ndim; ++e) want.shape[e] = expected[e];
      throw_value_error("[", op, "] ", name, ": expected shape ", shape_string(want), " (", why, "), got ",
                        shape_string(t));
    }
  }
}

void check_same_dtype(const char* op, const char* name, const fj_tensor& t, fj_dtype expected) {
  if (t.dtype != expected) {
    throw_type_error("[", op, "] ", name, ": expected dtype ", dtype_name(expected),
                     " (the dtype of q), got ", dtype_name(t.dtype));
  }
}

void check_same_device(const char* op, const char* name, const fj_tensor& t, const fj_tensor& q) {
  if (t.device_type != q.device_type || t.device_index != q.device_index) {
    throw_value_error("[", op, "] ", name, ": expected the device of q (", device_name(q.device_type), ":",
                      q.device_index, "), got ", device_name(t.device_type), ":", t.device_index);
  }
}

Operand make_operand(const fj_tensor& t) {
  Operand op;
  op.data = t.data;
  op.stride_batch = t.shape[0] == 1 ? 0 : t.strides[0];
  op.stride_head = t.shape[1] == 1 ? 0 : t.strides[1];
  op.stride_seq = t.shape[2] == 1 ? 0 : t.strides[2];
  return op;
}

// Byte range [first, last] spanned by a strided tensor; empty when it has no element.
struct ByteRange {
  uintptr_t first = 0;
  uintptr_t last = 0;
  bool empty = true;
};

ByteRange byte_range(const fj_tensor& t) {
  ByteRange range;
  if (has_no_elements(t)) return range;
  int64_t span = 0;
  for (int d = 0; d < t.ndim; ++d) span += (t.shape[d] - 1) * t.strides[d];
  range.first = reinterpret_cast<uintptr_t>(t.data);
  range.last = range.first + uintptr_t((span + 1) * dtype_size(t.dtype)) - 1;
  range.empty = false;
  return range;
}

bool ranges_overlap(const fj_tensor& a, const fj_tensor& b) {
  const ByteRange x = byte_range(a), y = byte_range(b);
  return !x.empty && !y.empty && x.first <= y.last && y.first <= x.last;
}

// Whether delta (in elements) equals sum_d k_d * stride_d for integers k_d in
// [lo_d, hi_d] (and, with nonzero, some k_d != 0): whether an element of one
// strided view is an element of another view `delta` elements further on (k_d
// = its index minus the other's), or, delta = 0 with k_d in [-(extent - 1),
// extent - 1] and nonzero, whether one view maps two indices to one element.
// Dims go from the largest stride down; a dim's k is confined to the values
// that leave a remainder the inner dims can still reach. Searches at most
// kMaxNodes steps and answers true (unproven: assume shared) beyond that.
struct StridedDim {
  int64_t stride;  // > 0
  int64_t lo, hi;
};
bool representable(int64_t delta, const StridedDim* dims, int count, bool nonzero, int64_t& budget) {
  if (--budget < 0) return true;
  if (count == 0) return delta == 0 && !nonzero;
  int64_t inner_lo = 0, inner_hi = 0;  // the sums the remaining dims reach
  for (int d = 1; d < count; ++d) {
    inner_lo += dims[d].lo * dims[d].stride;
    inner_hi += dims[d].hi * dims[d].stride;
  }
  const int64_t stride = dims[0].stride;
  // k * stride within [delta - inner_hi, delta - inner_lo], k within [lo, hi].
  const auto floor_div = [](int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); };
  const int64_t lo = std::max(dims[0].lo, -floor_div(-(delta - inner_hi), stride));
  const int64_t hi = std::min(dims[0].hi, floor_div(delta - inner_lo, stride));
  for (int64_t k = lo; k <= hi; ++k) {
    if (representable(delta - k * stride, dims + 1, count - 1, nonzero && k == 0, budget)) return true;
  }
  return false;
}

// Whether the elements of x and of y (y's data `delta_bytes` after x's; with x
// the same tensor as y, delta 0) are provably apart: no element of x is one of
// y, or (same tensor) x maps every index to its own element. Views of other
// shapes are compared dim by dim where their strides agree (dq, dk and dv of
// grouped heads sliced from one buffer); dims with different strides, or a
// byte offset between elements, are not proven apart.
bool provably_disjoint(const fj_tensor& x, const fj_tensor& y, int64_t delta_bytes, bool same_tensor) {
  const int64_t element = dtype_size(x.dtype);
  if (x.dtype != y.dtype || x.ndim != y.ndim || delta_bytes % element != 0) return false;
  StridedDim dims[FJ_MAX_DIMS];
  int count = 0;
  for (int d = 0; d < x.ndim; ++d) {
    const int64_t extent_x = x.shape[d], extent_y = y.shape[d];
    if (extent_x <= 1 && extent_y <= 1) continue;
    if (extent_x > 1 && extent_y > 1 && x.strides[d] != y.strides[d]) return false;
    const int64_t stride = extent_x > 1 ? x.strides[d] : y.strides[d];
    // Index in x minus index in y; strides are >= 0 (check_tensor) and nonzero here.
    dims[count++] = StridedDim{stride, -(extent_y - 1), extent_x - 1};
  }
  for (int i = 1; i < count; ++i) {  // largest stride first
    for (int j = i; j > 0 && dims[j].stride > dims[j - 1].stride; --j) std::swap(dims[j], dims[j - 1]);
  }
  constexpr int64_t kMaxNodes = 100000;
  int64_t budget = kMaxNodes;
  return !representable(delta_bytes / element, dims, count, same_tensor, budget);
}

struct Named {
  const char* name;
  const fj_tensor* tensor;
};

// What the kernels write must not alias what they read, nor itself:
//  - no output maps two of its indices to one element (a zero stride, or
//    strides that fold rows onto each other);
//  - no output shares bytes with an input (the mask included);
//  - outputs are pairwise apart: byte ranges that do not meet, or views whose
//    strides agree and that provably never share an element, such as dq, dk, dv
//    sliced from one packed [B, S, Hq + 2 Hkv, D] buffer.
void check_outputs(const char* op, std::initializer_list<Named> outputs,
                   std::initializer_list<Named> inputs) {
  for (const Named& out : outputs) {
    const fj_tensor& t = *out.tensor;
    for (int d = 0; d < t.ndim && !has_no_elements(t); ++d) {  // an empty output is never written
      if (t.shape[d] > 1 && t.strides[d] == 0) {
        throw_value_error("[", op, "] ", out.name, ": output has stride 0 in dim ", d, " of size ",
                          t.shape[d], "; every output element needs its own memory");
      }
    }
    if (!has_no_elements(t) && !provably_disjoint(t, t, 0, true)) {
      throw_value_error("[", op, "] ", out.name, ": output strides ", dims_string(t.strides, t.ndim), " of shape ",
                        shape_string(t),
                        " map several elements to one address; every output element needs its own memory");
    }
    if (t_descriptors_only) continue;  // no addresses to compare with the inputs
    for (const Named& in : inputs) {
      if (in.tensor != nullptr && ranges_overlap(t, *in.tensor)) {
        throw_value_error("[", op, "] ", out.name, ": output memory overlaps input ", in.name,
                          "; pass a separate buffer");
      }
    }
  }
  if (t_descriptors_only) return;  // nor between outputs
  for (auto a = outputs.begin(); a != outputs.end(); ++a) {
    for (auto b = a + 1; b != outputs.end(); ++b) {
      const fj_tensor &x = *a->tensor, &y = *b->tensor;
      if (!ranges_overlap(x, y)) continue;
      const int64_t delta = int64_t(reinterpret_cast<uintptr_t>(y.data) - reinterpret_cast<uintptr_t>(x.data));
      if (!provably_disjoint(x, y, delta, false)) {
        throw_value_error("[", op, "] ", b->name, ": output memory overlaps output ", a->name,
                          " (elements of one would be written as elements of the other); pass separate buffers");
      }
    }
  }
}

const fj_tensor* mask_of(const fj_attention_options* options) {
  const bool present = t_descriptors_only ? options->mask.ndim > 0 : options->mask.data != nullptr;
  return present ? &options->mask : nullptr;
}

// The window bounds and the diagonal of the options for p's lengths (checked by the caller).
// A bound at least Sq + Sk away from the diagonal excludes nothing: treat it as unbounded,
// which also keeps the index arithmetic far from overflow.
void apply_window_bounds(const fj_attention_options& opt, AttentionProblem& p) {
  const int64_t no_bound = p.seqlen_q + p.seqlen_k;
  p.window_left = opt.window_left >= no_bound ? -1 : opt.window_left;
  p.window_right = opt.causal != FJ_CAUSAL_NONE ? 0 : opt.window_right >= no_bound ? -1 : opt.window_right;
  p.diagonal_shift = opt.causal == FJ_CAUSAL_TOP_LEFT ? 0 : p.seqlen_k - p.seqlen_q;
}

// Options shared by both directions: scale, softcap, causal, window, mask, dropout.
void apply_options(const char* op, const fj_attention_options* options, const fj_tensor& q,
                   AttentionProblem& p) {
  if (options == nullptr) throw_value_error("[", op, "] options: expected a pointer, got NULL");
  const fj_attention_options& opt = *options;

  if (opt.has_scale) {
    if (!std::isfinite(opt.scale)) {
      throw_value_error("[", op, "] scale: expected a finite number, got ", opt.scale);
    }
    if (p.dtype != FJ_FLOAT64 && std::abs(opt.scale) > FLT_MAX) {
      throw_value_error("[", op, "] scale: expected a value representable in float32 for ",
                        dtype_name(p.dtype), " inputs, got ", opt.scale);
    }
    p.scale = opt.scale;
  } else {
    p.scale = 1.0 / std::sqrt(double(p.head_dim_qk));
  }
  if (!(opt.softcap >= 0.0) || !std::isfinite(opt.softcap)) {
    throw_value_error("[", op, "] softcap: expected a finite value >= 0 (0 = off), got ", opt.softcap);
  }
  if (p.dtype != FJ_FLOAT64 && opt.softcap != 0.0 && (opt.softcap < FLT_MIN || opt.softcap > FLT_MAX)) {
    throw_value_error("[", op, "] softcap: expected 0 or a value in [", FLT_MIN, ", ", FLT_MAX, "] for ",
                      dtype_name(p.dtype), " inputs, got ", opt.softcap);
  }
  p.softcap = opt.softcap;

  const int32_t causal = enum_code(opt.causal);
  if (causal != FJ_CAUSAL_NONE && causal != FJ_CAUSAL_TOP_LEFT && causal != FJ_CAUSAL_BOTTOM_RIGHT) {
    throw_value_error("[", op, "] causal: expected 0 (none), 1 (top-left) or 2 (bottom-right), got ", causal);
  }
  if (opt.window_left < -1) {
    throw_value_error("[", op, "] window_left: expected -1 (unbounded) or >= 0, got ", opt.window_left);
  }
  if (opt.window_right < -1) {
    throw_value_error("[", op, "] window_right: expected -1 (unbounded) or >= 0, got ", opt.window_right);
  }
  p.causal = opt.causal;
  if (opt.causal != FJ_CAUSAL_NONE && opt.window_right > 0) {
    throw_value_error("[", op, "] window_right: expected -1 or 0 with a causal mask, got ", opt.window_right);
  }
  apply_window_bounds(opt, p);

  if (!(opt.dropout_p >= 0.0 && opt.dropout_p < 1.0)) {
    throw_value_error("[", op, "] dropout_p: expected a value in [0, 1), got ", opt.dropout_p);
  }
  p.dropout_p = opt.dropout_p;
  p.dropout_threshold = dropout_threshold(opt.dropout_p);
  p.dropout_seed = opt.dropout_seed;
  p.dropout_offset = opt.dropout_offset;
  if (opt.dropout_seed_words != nullptr && p.dropout_p > 0) {
    if (reinterpret_cast<uintptr_t>(opt.dropout_seed_words) % alignof(uint32_t) != 0) {
      throw_value_error("[", op, "] dropout_seed_words: expected a 4-byte aligned pointer, got ",
                        opt.dropout_seed_words);
    }
    const auto* words = static_cast<const uint32_t*>(opt.dropout_seed_words);
    if (q.device_type == FJ_DEVICE_CPU) {  // host memory, and the call runs now
      p.dropout_seed = uint64_t(words[0]) | (uint64_t(words[1]) << 32);
      p.dropout_offset = uint64_t(words[2]) | (uint64_t(words[3]) << 32);
    } else if (q.device_type == FJ_DEVICE_CUDA) {
      p.dropout_seed_words = words;
    } else {
      throw_unsupported("[", op, "] dropout_seed_words: read on the CPU and CUDA backends only");
    }
  }
  if (!dropout_counter_fits(p.batch * p.heads_q, p.seqlen_q, p.seqlen_k)) {
    throw_value_error("[", op,
                      "] q: sizes exceed the dropout counter range (batch*heads and seqlen_q "
                      "below 2^32)");
  }

  if (opt.num_threads < 0 || opt.num_threads > kMaxThreads) {
    throw_value_error("[", op, "] num_threads: expected 0 (default) to ", kMaxThreads, ", got ",
                      opt.num_threads);
  }
  p.num_threads = opt.num_threads;
  p.stream = opt.stream;
  if (opt.workspace == nullptr && opt.workspace_bytes != 0) {
    throw_value_error("[", op, "] workspace: NULL with workspace_bytes = ", opt.workspace_bytes,
                      "; expected a device pointer, or workspace_bytes = 0");
  }
  if (reinterpret_cast<uintptr_t>(opt.workspace) % 16 != 0) {
    throw_value_error("[", op, "] workspace: expected a 16-byte aligned device pointer, got ", opt.workspace);
  }
  p.workspace = opt.workspace;
  p.workspace_bytes = opt.workspace_bytes;
  if (opt.nondeterministic != 0 && opt.nondeterministic != 1) {
    throw_value_error("[", op, "] nondeterministic: expected 0 (every backward bitwise deterministic) or 1, got ",
                      opt.nondeterministic);
  }
  p.nondeterministic = opt.nondeterministic == 1;
  p.launch = opt.launch;
  p.launch_data = opt.launch_data;

  const fj_tensor& mask = opt.mask;
  if (mask.data == nullptr && mask.ndim == 0) return;  // no mask
  check_tensor(op, "mask", &mask, 4);
  check_same_device(op, "mask", mask, q);
  if (mask.dtype == FJ_BOOL) {
    p.mask_kind = MaskKind::kBool;
  } else if (mask.dtype == FJ_FLOAT32 || mask.dtype == q.dtype) {
    p.mask_kind = MaskKind::kAdditive;
  } else if (is_float_dtype(mask.dtype)) {
    throw_type_error("[", op, "] mask: expected dtype ",
                     q.dtype == FJ_FLOAT32 ? std::string("bool or float32")
                                           : str_cat("bool, float32 or ", dtype_name(q.dtype), " (the dtype of q)"),
                     ", got ", dtype_name(mask.dtype));
  } else {
    throw_type_error("[", op, "] mask: expected a bool (true = attend) or float (additive) mask, got ",
                     dtype_name(mask.dtype));
  }
  const int64_t full[4] = {p.batch, p.heads_q, p.seqlen_q, p.seqlen_k};
  static const char* const kMaskDims[4] = {"batch", "heads_q", "seqlen_q", "seqlen_k"};
  for (int d = 0; d < 4; ++d) {
    if (mask.shape[d] != 1 && mask.shape[d] != full[d]) {
      throw_value_error("[", op, "] mask: dim ", d, " (", kMaskDims[d], ") has size ", mask.shape[d],
                        full[d] == 1 ? ", expected 1" : str_cat(", expected 1 or ", full[d]),
                        " to broadcast to [batch, heads_q, seqlen_q, seqlen_k] = [", full[0], ", ", full[1],
                        ", ", full[2], ", ", full[3], "]");
    }
    p.mask_stride[d] = mask.shape[d] == 1 ? 0 : mask.strides[d];
  }
  p.mask_dtype = mask.dtype;
  p.mask = mask.data;
}

// Shapes and dtypes of q, k, v (common to both directions).
AttentionProblem make_inputs(const char* op, const fj_tensor* q_arg, const fj_tensor* k_arg,
                             const fj_tensor* v_arg) {
  const fj_tensor& q = check_tensor(op, "q", q_arg, 4);
  const fj_tensor& k = check_tensor(op, "k", k_arg, 4);
  const fj_tensor& v = check_tensor(op, "v", v_arg, 4);
  if (!is_float_dtype(q.dtype)) {
    throw_type_error("[", op, "] q: expected dtype float32, float16, bfloat16 or float64, got ",
                     dtype_name(q.dtype));
  }
  check_same_dtype(op, "k", k, q.dtype);
  check_same_dtype(op, "v", v, q.dtype);
  check_same_device(op, "k", k, q);
  check_same_device(op, "v", v, q);
  check_last_dim_contiguous(op, "q", q);
  check_last_dim_contiguous(op, "k", k);
  check_last_dim_contiguous(op, "v", v);

  AttentionProblem p;
  p.batch = q.shape[0];
  p.heads_q = q.shape[1];
  p.seqlen_q = q.shape[2];
  p.head_dim_qk = q.shape[3];
  p.heads_kv = k.shape[1];
  p.seqlen_k = k.shape[2];
  p.head_dim_v = v.shape[3];
  p.dtype = q.dtype;
  p.lse_dtype = q.dtype == FJ_FLOAT64 ? FJ_FLOAT64 : FJ_FLOAT32;
  p.device_type = q.device_type;
  p.device_index = q.device_index;

  if (p.head_dim_qk < 1) throw_value_error("[", op, "] q: head_dim must be >= 1, got ", p.head_dim_qk);
  if (p.head_dim_v < 1) throw_value_error("[", op, "] v: head_dim must be >= 1, got ", p.head_dim_v);
  if (k.shape[0] != p.batch) {
    throw_value_error("[", op, "] k: batch size ", k.shape[0], " does not match q's ", p.batch);
  }
  if (k.shape[3] != p.head_dim_qk) {
    throw_value_error("[", op, "] k: head_dim ", k.shape[3], " does not match q's ", p.head_dim_qk);
  }
  const int64_t v_expected[4] = {p.batch, p.heads_kv, p.seqlen_k, p.head_dim_v};
  check_shape(op, "v", v, v_expected, "batch, heads and seqlen of k");
  if (p.heads_kv < 1 && p.heads_q > 0) {
    throw_value_error("[", op, "] k: heads must be >= 1, got ", p.heads_kv);
  }
  if (p.heads_kv > 0 && p.heads_q % p.heads_kv != 0) {
    throw_value_error("[", op, "] k: query heads (", p.heads_q, ") must be a multiple of key/value heads (",
                      p.heads_kv, ")");
  }
  p.q = make_operand(q);
  p.k = make_operand(k);
  p.v = make_operand(v);
  return p;
}

void set_lse(const char* op, const fj_tensor* lse_arg, const fj_tensor& q, AttentionProblem& p) {
  const fj_tensor& lse = check_tensor(op, "lse", lse_arg, 3);
  const int64_t expected[3] = {p.batch, p.heads_q, p.seqlen_q};
  check_shape(op, "lse", lse, expected, "[batch, heads_q, seqlen_q]");
  if (lse.dtype != p.lse_dtype) {
    throw_type_error("[", op, "] lse: expected dtype ", dtype_name(p.lse_dtype), ", got ",
                     dtype_name(lse.dtype));
  }
  check_same_device(op, "lse", lse, q);
  p.lse = lse.data;
  p.lse_stride_batch = lse.shape[0] == 1 ? 0 : lse.strides[0];
  p.lse_stride_head = lse.shape[1] == 1 ? 0 : lse.strides[1];
  p.lse_stride_seq = lse.shape[2] == 1 ? 0 : lse.strides[2];
}

// Checks one [batch, heads, seqlen, head_dim] operand against its expected shape.
const fj_tensor& check_operand(const char* op, const char* name, const fj_tensor* t, const fj_tensor& q,
                               const int64_t* shape, const char* why) {
  const fj_tensor& checked = check_tensor(op, name, t, 4);
  check_shape(op, name, checked, shape, why);
  check_same_dtype(op, name, checked, q.dtype);
  check_same_device(op, name, checked, q);
  check_last_dim_contiguous(op, name, checked);
  return checked;
}

}  // namespace

namespace {

AttentionProblem forward_problem(const char* op, const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                 const fj_attention_options* options, const fj_tensor* o, const fj_tensor* lse) {
  AttentionProblem p = make_inputs(op, q, k, v);
  const int64_t o_shape[4] = {p.batch, p.heads_q, p.seqlen_q, p.head_dim_v};
  const fj_tensor& out = check_operand(op, "o", o, *q, o_shape, "[batch, heads_q, seqlen_q, head_dim_v]");
  // lse NULL: not written (p.lse stays nullptr; the backends skip its stores).
  if (lse != nullptr) set_lse(op, lse, *q, p);
  apply_options(op, options, *q, p);
  p.o = make_operand(out);
  if (lse != nullptr) {
    check_outputs(op, {{"o", o}, {"lse", lse}}, {{"q", q}, {"k", k}, {"v", v}, {"mask", mask_of(options)}});
  } else {
    check_outputs(op, {{"o", o}}, {{"q", q}, {"k", k}, {"v", v}, {"mask", mask_of(options)}});
  }
  return p;
}

AttentionProblem backward_problem(const char* op, const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                  const fj_tensor* o, const fj_tensor* lse, const fj_tensor* dout,
                                  const fj_attention_options* options, const fj_tensor* dq, const fj_tensor* dk,
                                  const fj_tensor* dv) {
  AttentionProblem p = make_inputs(op, q, k, v);
  const int64_t o_shape[4] = {p.batch, p.heads_q, p.seqlen_q, p.head_dim_v};
  const int64_t q_shape[4] = {p.batch, p.heads_q, p.seqlen_q, p.head_dim_qk};
  const int64_t k_shape[4] = {p.batch, k->shape[1], p.seqlen_k, p.head_dim_qk};
  const int64_t v_shape[4] = {p.batch, k->shape[1], p.seqlen_k, p.head_dim_v};
  p.o = make_operand(check_operand(op, "o", o, *q, o_shape, "[batch, heads_q, seqlen_q, head_dim_v]"));
  p.dout = make_operand(check_operand(op, "dout", dout, *q, o_shape, "the shape of o"));
  p.dq = make_operand(check_operand(op, "dq", dq, *q, q_shape, "the shape of q"));
  p.dk = make_operand(check_operand(op, "dk", dk, *q, k_shape, "the shape of k"));
  p.dv = make_operand(check_operand(op, "dv", dv, *q, v_shape, "the shape of v"));
  set_lse(op, lse, *q, p);
  apply_options(op, options, *q, p);
  check_outputs(
      op, {{"dq", dq}, {"dk", dk}, {"dv", dv}},
      {{"q", q}, {"k", k}, {"v", v}, {"o", o}, {"lse", lse}, {"dout", dout}, {"mask", mask_of(options)}});
  return p;
}

// ---- variable-length batches ----

// A packed [total, heads, dim] operand as the [1, heads, total, dim] tensor the dense checks take.
fj_tensor as_sequence_major(const char* op, const char* name, const fj_tensor* t) {
  const fj_tensor& packed = check_tensor(op, name, t, 3);
  fj_tensor view = packed;
  view.ndim = 4;
  view.shape[0] = 1, view.shape[1] = packed.shape[1], view.shape[2] = packed.shape[0], view.shape[3] = packed.shape[2];
  view.strides[0] = 0, view.strides[1] = packed.strides[1], view.strides[2] = packed.strides[0];
  view.strides[3] = packed.strides[2];
  return view;
}

// lse [heads, total] as [1, heads, total].
fj_tensor lse_as_batch_of_one(const char* op, const fj_tensor* t) {
  const fj_tensor& packed = check_tensor(op, "lse", t, 2);
  fj_tensor view = packed;
  view.ndim = 3;
  view.shape[0] = 1, view.shape[1] = packed.shape[0], view.shape[2] = packed.shape[1];
  view.strides[0] = 0, view.strides[1] = packed.strides[0], view.strides[2] = packed.strides[1];
  return view;
}

// The offsets of one side: int32 [batch + 1] in host memory, 0 first, never
// decreasing, the total last; returns the longest length. Or (on_device) in the
// memory of the operands' device `q`: their values are not read here (0 returned).
int64_t check_offsets(const char* op, const char* name, const fj_tensor* t, int64_t batch, int64_t total,
                      const fj_tensor& q, bool on_device) {
  const fj_tensor& offsets = check_tensor(op, name, t, 1);
  if (offsets.dtype != FJ_INT32) {
    throw_type_error("[", op, "] ", name, ": expected dtype int32, got ", dtype_name(offsets.dtype));
  }
  if (on_device && (offsets.device_type != q.device_type || offsets.device_index != q.device_index)) {
    throw_value_error("[", op, "] ", name, ": expected the memory of the operands (", device_name(q.device_type), ":",
                      q.device_index, ") as cu_seqlens_q's, got ", device_name(offsets.device_type), ":",
                      offsets.device_index);
  }
  if (!on_device && offsets.device_type != FJ_DEVICE_CPU) {
    throw_value_error("[", op, "] ", name, ": expected host (cpu) memory, got ", device_name(offsets.device_type),
                      ":", offsets.device_index, " (the offsets are read before the launch)");
  }
  if (offsets.shape[0] < 1 || (batch >= 0 && offsets.shape[0] != batch + 1)) {
    throw_value_error("[", op, "] ", name, ": expected ",
                      batch >= 0 ? str_cat(batch + 1, " offsets (batch + 1, as cu_seqlens_q)")
                                 : std::string("batch + 1 >= 1 offsets"),
                      ", got ", offsets.shape[0]);
  }
  if (offsets.data == nullptr || on_device) return 0;  // descriptors only, or not readable here
  const auto at = [&](int64_t i) {
    return int64_t(static_cast<const int32_t*>(offsets.data)[i * offsets.strides[0]]);
  };
  if (at(0) != 0) throw_value_error("[", op, "] ", name, ": expected offset 0 to be 0, got ", at(0));
  int64_t longest = 0;
  for (int64_t i = 1; i < offsets.shape[0]; ++i) {
    if (at(i) < at(i - 1)) {
      throw_value_error("[", op, "] ", name, ": offsets must not decrease; offset ", i, " is ", at(i), " after ",
                        at(i - 1));
    }
    longest = std::max(longest, at(i) - at(i - 1));
  }
  const int64_t last = at(offsets.shape[0] - 1);
  if (last != total) {
    throw_value_error("[", op, "] ", name, ": expected the last offset to be the number of packed rows (", total,
                      "), got ", last);
  }
  return longest;
}

bool present(const fj_tensor& t) { return t.ndim > 0 || t.data != nullptr; }

// An int32 tensor of `ndim` dims with contiguous rows, in host memory, or (device: the operands'
// q) in the CUDA memory of q's device, where the kernels read it and the host never does.
const fj_tensor& check_int32(const char* op, const char* name, const fj_tensor& t, int ndim,
                             const fj_tensor* device = nullptr) {
  check_tensor(op, name, &t, ndim);
  if (t.dtype != FJ_INT32) throw_type_error("[", op, "] ", name, ": expected dtype int32, got ", dtype_name(t.dtype));
  if (device == nullptr && t.device_type != FJ_DEVICE_CPU) {
    throw_value_error("[", op, "] ", name, ": expected host (cpu) memory, got ", device_name(t.device_type), ":",
                      t.device_index, " (it is read before the launch)");
  }
  if (device != nullptr && (t.device_type != device->device_type || t.device_index != device->device_index)) {
    throw_value_error("[", op, "] ", name, ": expected the memory of the operands (", device_name(device->device_type),
                      ":", device->device_index, ") with seqused_k there, got ", device_name(t.device_type), ":",
                      t.device_index);
  }
  if (!has_no_elements(t) && t.shape[ndim - 1] > 1 && t.strides[ndim - 1] != 1) {
    throw_value_error("[", op, "] ", name, ": expected the last dim contiguous (stride 1), got stride ",
                      t.strides[ndim - 1]);
  }
  return t;
}

// Whether a KV cache's counts (and pages) are in the operands' CUDA memory, where the host
// does not read them (AttentionProblem::kv_on_device).
bool kv_cache_on_device(const fj_varlen& varlen, const fj_tensor& q) {
  return present(varlen.seqused_k) && varlen.seqused_k.device_type != FJ_DEVICE_CPU &&
         q.device_type != FJ_DEVICE_CPU;
}

// seqused_k: int32 [batch], each at least 0 and at most `capacity(b)`; returns the largest. On the
// device (kv_cache_on_device) the counts are not read: the largest capacity is returned.
template <typename Capacity>
int64_t check_seqused(const char* op, const fj_varlen& varlen, int64_t batch, Capacity capacity,
                      const char* what, const fj_tensor& q) {
  const bool on_device = kv_cache_on_device(varlen, q);
  const fj_tensor& used = check_int32(op, "seqused_k", varlen.seqused_k, 1, on_device ? &q : nullptr);
  if (used.shape[0] != batch) {
    throw_value_error("[", op, "] seqused_k: expected ", batch, " counts (one a sequence), got ", used.shape[0]);
  }
  int64_t longest = 0;
  if (on_device) {
    for (int64_t b = 0; b < batch; ++b) longest = std::max(longest, capacity(b));
    return longest;
  }
  for (int64_t b = 0; used.data != nullptr && b < batch; ++b) {
    const int64_t n = static_cast<const int32_t*>(used.data)[b];
    if (n < 0 || n > capacity(b)) {
      throw_value_error("[", op, "] seqused_k: sequence ", b, " uses ", n, " keys; expected 0 to ", capacity(b),
                        " (", what, ")");
    }
    longest = std::max(longest, n);
  }
  return longest;
}

// seqused_k over keys at cu_seqlens_k: a sequence uses the first of its rows.
int64_t apply_seqused(const char* op, const fj_varlen& varlen, int64_t batch, const fj_tensor& q,
                      AttentionProblem& p) {
  const auto* offsets = static_cast<const int32_t*>(varlen.cu_seqlens_k.data);
  const int64_t longest = check_seqused(
      op, varlen, batch, [&](int64_t b) { return offsets == nullptr ? INT32_MAX : int64_t(offsets[b + 1] - offsets[b]); },
      "its rows in cu_seqlens_k", q);
  p.seqused_k = static_cast<const int32_t*>(varlen.seqused_k.data);
  p.kv_on_device = kv_cache_on_device(varlen, q);
  return longest;
}

// The page table and the pages (k and v as given, [num_pages, page_size, Hkv, D]).
int64_t apply_pages(const char* op, const fj_varlen& varlen, int64_t batch, const fj_tensor& q,
                    AttentionProblem& p) {
  const bool on_device = kv_cache_on_device(varlen, q);
  const fj_tensor& table = check_int32(op, "page_table", varlen.page_table, 2, on_device ? &q : nullptr);
  if (table.shape[0] != batch) {
    throw_value_error("[", op, "] page_table: expected ", batch, " rows (one a sequence), got ", table.shape[0]);
  }
  if (!present(varlen.seqused_k)) {
    throw_value_error("[", op, "] seqused_k: expected each sequence's key count with a page table");
  }
  const int64_t max_pages = table.shape[1];
  const int64_t longest =
      check_seqused(op, varlen, batch, [&](int64_t) { return max_pages * p.page_size; }, "its pages", q);
  const auto* pages = static_cast<const int32_t*>(table.data);
  const auto* used = static_cast<const int32_t*>(varlen.seqused_k.data);
  for (int64_t b = 0; !on_device && pages != nullptr && used != nullptr && b < batch; ++b) {
    for (int64_t j = 0; j * p.page_size < used[b]; ++j) {
      const int64_t page = pages[b * table.strides[0] + j];
      if (page < 0 || page >= p.num_pages) {
        throw_value_error("[", op, "] page_table: page ", j, " of sequence ", b, " is ", page, "; expected 0 to ",
                          p.num_pages - 1);
      }
    }
  }
  p.page_table = pages;
  p.page_table_stride = table.strides[0];
  p.page_table_width = max_pages;
  p.seqused_k = used;
  p.kv_on_device = on_device;
  return longest;
}

// The varlen fields of a problem validated as the dense call on the packed views.
// Offsets in the CUDA memory of the operands (fj_varlen) are not read by the host: the
// maxima must be given, and the counts and pages that the host reads cannot come with them.
void apply_varlen(const char* op, const fj_varlen* varlen, const fj_attention_options* options, const fj_tensor& q,
                  AttentionProblem& p) {
  if (varlen == nullptr) throw_value_error("[", op, "] varlen: expected a pointer, got NULL");
  const int64_t total_q = p.seqlen_q, total_k = p.seqlen_k;
  const bool on_device = varlen->cu_seqlens_q.ndim == 1 && varlen->cu_seqlens_q.device_type != FJ_DEVICE_CPU &&
                         q.device_type != FJ_DEVICE_CPU;
  if (on_device) {
    if (present(varlen->page_table) || present(varlen->seqused_k)) {
      throw_value_error("[", op, "] cu_seqlens_q: expected host (cpu) memory with ",
                        present(varlen->page_table) ? "page_table" : "seqused_k",
                        " (offsets in device memory go with neither)");
    }
    for (auto [name, bound] : {std::pair{"max_seqlen_q", varlen->max_seqlen_q},
                               std::pair{"max_seqlen_k", varlen->max_seqlen_k}}) {
      if (bound <= 0) {
        throw_value_error("[", op, "] ", name, ": expected the longest length (> 0) with offsets in device memory "
                          "(the host does not read them), got ", bound);
      }
    }
  }
  const int64_t longest_q = check_offsets(op, "cu_seqlens_q", &varlen->cu_seqlens_q, -1, total_q, q, on_device);
  const int64_t batch = varlen->cu_seqlens_q.shape[0] - 1;
  const bool paged = present(varlen->page_table);
  int64_t longest_k = 0;
  if (paged) {
    if (present(varlen->cu_seqlens_k)) {
      throw_value_error("[", op, "] cu_seqlens_k: expected none with a page table (the pages place the keys)");
    }
    longest_k = apply_pages(op, *varlen, batch, q, p);
  } else {
    longest_k = check_offsets(op, "cu_seqlens_k", &varlen->cu_seqlens_k, batch, total_k, q, on_device);
    if (present(varlen->seqused_k)) longest_k = apply_seqused(op, *varlen, batch, q, p);
  }
  int64_t max_q = varlen->max_seqlen_q, max_k = varlen->max_seqlen_k;
  if (p.kv_on_device && max_k > 0) {
    // The counts are not read here: a bound clamps them (the kernels take no key past it), and
    // longest_k is the cache's rows (or pages' keys), past which no count may reach.
    longest_k = std::min(longest_k, max_k);
  }
  for (auto [name, bound, longest] : {std::tuple{"max_seqlen_q", &max_q, longest_q},
                                      std::tuple{"max_seqlen_k", &max_k, longest_k}}) {
    if (p.kv_on_device && bound == &max_k) {
      if (*bound < 0) throw_value_error("[", op, "] max_seqlen_k: expected 0 or a bound > 0, got ", *bound);
      *bound = longest;
      continue;
    }
    if (*bound < 0 || (*bound > 0 && *bound < longest)) {
      throw_value_error("[", op, "] ", name, ": expected 0 (the longest) or a bound >= the longest sequence (",
                        longest, "), got ", *bound);
    }
    if (*bound == 0) *bound = longest;
  }
  p.batch = batch;
  p.seqlen_q = max_q;
  p.seqlen_k = max_k;
  p.cu_seqlens_q = static_cast<const int32_t*>(varlen->cu_seqlens_q.data);
  p.cu_seqlens_k = paged ? nullptr : static_cast<const int32_t*>(varlen->cu_seqlens_k.data);
  p.offsets_on_device = on_device;
  p.total_q = total_q;
  p.total_k = total_k;
  if (varlen->cu_seqlens_q.strides[0] != 1 && batch > 0) {
    throw_value_error("[", op, "] cu_seqlens_q: expected contiguous offsets (stride 1), got stride ",
                      varlen->cu_seqlens_q.strides[0]);
  }
  if (!paged && varlen->cu_seqlens_k.strides[0] != 1 && batch > 0) {
    throw_value_error("[", op, "] cu_seqlens_k: expected contiguous offsets (stride 1), got stride ",
                      varlen->cu_seqlens_k.strides[0]);
  }
  if (!dropout_counter_fits(p.batch * p.heads_q, p.seqlen_q, p.seqlen_k)) {
    throw_value_error("[", op, "] q: sizes exceed the dropout counter range (batch*heads and seqlen_q below 2^32)");
  }
  // The packed views' batch strides are 0 already (batch 1); the offsets place each sequence.
}

// Pages [num_pages, page_size, heads, dim] as the [1, heads, page_size, dim] view of their first
// page, for the dense checks of dtype, device and row layout.
fj_tensor first_page(const char* op, const char* name, const fj_tensor* t) {
  const fj_tensor& pages = check_tensor(op, name, t, 4);
  if (pages.shape[0] < 1) throw_value_error("[", op, "] ", name, ": expected at least one page, got none");
  if (pages.shape[1] < 16 || pages.shape[1] % 16 != 0) {
    throw_value_error("[", op, "] ", name, ": expected a page size (dim 1) that is a multiple of 16, got ",
                      pages.shape[1]);
  }
  fj_tensor view = pages;
  view.shape[0] = 1, view.shape[1] = pages.shape[2], view.shape[2] = pages.shape[1], view.shape[3] = pages.shape[3];
  view.strides[0] = 0, view.strides[1] = pages.strides[2], view.strides[2] = pages.strides[1];
  view.strides[3] = pages.strides[3];
  return view;
}

// Before the dense checks, which would name the views' shapes: no mask, and the
// packed shapes of every operand after q and k (k and v as pages with a page table).
void check_packed_shapes(const char* op, const fj_attention_options* options,
                         std::initializer_list<std::tuple<const char*, const fj_tensor*, const char*>> operands,
                         const fj_tensor* q, const fj_tensor* k, const fj_tensor* v, bool paged = false) {
  if (options != nullptr && mask_of(options) != nullptr) {
    throw_value_error("[", op, "] mask: variable-length batches take no mask (attention stays within each sequence)");
  }
  const int64_t total_q = q->shape[0], heads_q = q->shape[1], dim_qk = q->shape[2];
  const int64_t total_k = k->shape[0], heads_kv = k->shape[paged ? 2 : 1], dim_v = v->shape[paged ? 3 : 2];
  if (paged) {
    const int64_t expected[4] = {k->shape[0], k->shape[1], heads_kv, dim_v};
    check_shape(op, "v", *v, expected, "[num_pages, page_size, heads_kv, head_dim_v]: the pages of k");
  }
  for (const auto& [name, t, layout] : operands) {
    const std::string which = layout;
    if (paged && which == "v") continue;
    int64_t expected[3] = {total_q, heads_q, dim_v};
    if (which == "v") expected[0] = total_k, expected[1] = heads_kv;
    if (which == "q") expected[2] = dim_qk;
    if (which == "k") expected[0] = total_k, expected[1] = heads_kv, expected[2] = dim_qk;
    if (which == "lse") expected[0] = heads_q, expected[1] = total_q;
    const char* why = which == "v"     ? "[total_k, heads_kv, head_dim_v]: the rows and heads of k"
                      : which == "q"   ? "[total_q, heads_q, head_dim_qk]: the shape of q"
                      : which == "k"   ? "[total_k, heads_kv, head_dim_qk]: the shape of k"
                      : which == "lse" ? "[heads_q, total_q]"
                                       : "[total_q, heads_q, head_dim_v]";
    check_tensor(op, name, t, which == "lse" ? 2 : 3);
    check_shape(op, name, *t, expected, why);
  }
}

}  // namespace

AttentionProblem make_forward_problem(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                      const fj_attention_options* options, const fj_tensor* o,
                                      const fj_tensor* lse, bool descriptors_only) {
  const DescriptorsOnly only(descriptors_only);
  return forward_problem("attention", q, k, v, options, o, lse);
}

AttentionProblem make_backward_problem(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                       const fj_tensor* o, const fj_tensor* lse, const fj_tensor* dout,
                                       const fj_attention_options* options, const fj_tensor* dq,
                                       const fj_tensor* dk, const fj_tensor* dv, bool descriptors_only) {
  const DescriptorsOnly only(descriptors_only);
  return backward_problem("attention_backward", q, k, v, o, lse, dout, options, dq, dk, dv);
}

AttentionProblem make_varlen_forward_problem(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                             const fj_varlen* varlen, const fj_attention_options* options,
                                             const fj_tensor* o, const fj_tensor* lse, bool descriptors_only) {
  constexpr const char* op = "varlen_attention";
  const DescriptorsOnly only(descriptors_only);
  const bool paged = varlen != nullptr && present(varlen->page_table);
  const fj_tensor q4 = as_sequence_major(op, "q", q);
  const fj_tensor k4 = paged ? first_page(op, "k", k) : as_sequence_major(op, "k", k);
  const fj_tensor v4 = paged ? first_page(op, "v", v) : as_sequence_major(op, "v", v);
  check_packed_shapes(op, options, {{"v", v, "v"}, {"o", o, "o"}, {"lse", lse, "lse"}}, q, k, v, paged);
  const fj_tensor o4 = as_sequence_major(op, "o", o), lse3 = lse_as_batch_of_one(op, lse);
  AttentionProblem p = forward_problem(op, &q4, &k4, &v4, options, &o4, &lse3);
  if (paged) {  // every page, not only the first: k's and v's batch strides step pages
    check_outputs(op, {{"o", &o4}, {"lse", &lse3}}, {{"k", k}, {"v", v}});
    p.page_size = k->shape[1];
    p.num_pages = k->shape[0];
    p.k.stride_batch = k->shape[0] == 1 ? 0 : k->strides[0];
    p.v.stride_batch = v->shape[0] == 1 ? 0 : v->strides[0];
  }
  apply_varlen(op, varlen, options, *q, p);
  // Again for the longest lengths: the checks above saw the first page's rows as the keys,
  // which would have taken a window wider than a page for no window at all.
  if (paged) apply_window_bounds(*options, p);
  return p;
}

AttentionProblem make_varlen_backward_problem(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                              const fj_tensor* o, const fj_tensor* lse, const fj_tensor* dout,
                                              const fj_varlen* varlen, const fj_attention_options* options,
                                              const fj_tensor* dq, const fj_tensor* dk, const fj_tensor* dv,
                                              bool descriptors_only) {
  constexpr const char* op = "varlen_attention_backward";
  const DescriptorsOnly only(descriptors_only);
  if (varlen != nullptr && present(varlen->page_table)) {
    throw_unsupported("[", op, "] page_table: paged KV caches are forward only (a cache is for inference)");
  }
  const fj_tensor q4 = as_sequence_major(op, "q", q), k4 = as_sequence_major(op, "k", k),
                  v4 = as_sequence_major(op, "v", v);
  check_packed_shapes(op, options,
                      {{"v", v, "v"}, {"o", o, "o"}, {"lse", lse, "lse"}, {"dout", dout, "o"}, {"dq", dq, "q"},
                       {"dk", dk, "k"}, {"dv", dv, "v"}},
                      q, k, v);
  const fj_tensor o4 = as_sequence_major(op, "o", o), dout4 = as_sequence_major(op, "dout", dout),
                  dq4 = as_sequence_major(op, "dq", dq), dk4 = as_sequence_major(op, "dk", dk),
                  dv4 = as_sequence_major(op, "dv", dv);
  const fj_tensor lse3 = lse_as_batch_of_one(op, lse);
  AttentionProblem p = backward_problem(op, &q4, &k4, &v4, &o4, &lse3, &dout4, options, &dq4, &dk4, &dv4);
  apply_varlen(op, varlen, options, *q, p);
  return p;
}

void adopt_host_offsets(const char* op, AttentionProblem& p, const int32_t* offsets_q, const int32_t* offsets_k) {
  fj_tensor host{};
  host.dtype = FJ_INT32;
  host.device_type = FJ_DEVICE_CPU;
  host.ndim = 1;
  host.shape[0] = p.batch + 1;
  host.strides[0] = 1;
  fj_tensor q = host, k = host;
  q.data = const_cast<int32_t*>(offsets_q);
  k.data = const_cast<int32_t*>(offsets_k);
  const int64_t longest_q = check_offsets(op, "cu_seqlens_q", &q, p.batch, p.total_q, host, false);
  const int64_t longest_k = check_offsets(op, "cu_seqlens_k", &k, p.batch, p.total_k, host, false);
  for (auto [name, bound, longest] : {std::tuple{"max_seqlen_q", p.seqlen_q, longest_q},
                                      std::tuple{"max_seqlen_k", p.seqlen_k, longest_k}}) {
    if (bound < longest) {
      throw_value_error("[", op, "] ", name, ": expected a bound >= the longest sequence (", longest, "), got ", bound);
    }
  }
  p.cu_seqlens_q = offsets_q;
  p.cu_seqlens_k = offsets_k;
  p.offsets_on_device = false;
}

void adopt_host_kv_cache(const char* op, AttentionProblem& p, const int32_t* counts, const int32_t* pages) {
  // The host copies as host descriptors, checked and taken as a call's own host arrays are.
  const auto host_int32 = [](const int32_t* data, int64_t rows, int64_t columns) {
    fj_tensor t{};
    t.data = const_cast<int32_t*>(data);
    t.dtype = FJ_INT32;
    t.device_type = FJ_DEVICE_CPU;
    t.ndim = columns < 0 ? 1 : 2;
    t.shape[0] = rows;
    t.shape[1] = columns;
    t.strides[0] = columns < 0 ? 1 : columns;
    t.strides[1] = 1;
    return t;
  };
  fj_varlen host{};
  host.seqused_k = host_int32(counts, p.batch, -1);
  fj_tensor on_host{};
  on_host.device_type = FJ_DEVICE_CPU;
  if (pages != nullptr) {
    host.page_table = host_int32(pages, p.batch, p.page_table_width);
    apply_pages(op, host, p.batch, on_host, p);
  } else {
    host.cu_seqlens_k = host_int32(p.cu_seqlens_k, p.batch + 1, -1);
    apply_seqused(op, host, p.batch, on_host, p);
  }
}

AttentionProblem sequence_problem(const AttentionProblem& p, int64_t b) {
  if (p.kv_on_device) throw Error(FJ_ERROR_INTERNAL, "[varlen] a KV cache's counts in device memory, read per sequence");
  AttentionProblem s = p;
  const int64_t first_q = p.cu_seqlens_q[b], first_k = p.cu_seqlens_k != nullptr ? p.cu_seqlens_k[b] : 0;
  s.batch = 1;
  s.seqlen_q = p.cu_seqlens_q[b + 1] - first_q;
  s.seqlen_k = p.seqused_k != nullptr ? p.seqused_k[b] : p.cu_seqlens_k[b + 1] - first_k;
  s.cu_seqlens_q = s.cu_seqlens_k = s.seqused_k = nullptr;
  if (p.page_table != nullptr) {  // the sequence's row of the table; the pages stay where they are
    s.page_table = p.page_table + b * p.page_table_stride;
    s.page_table_stride = 0;
  }
  s.dropout_batch = p.dropout_batch + b;
  s.diagonal_shift = p.causal == FJ_CAUSAL_TOP_LEFT ? 0 : s.seqlen_k - s.seqlen_q;
  const int64_t element = int64_t(dtype_size(p.dtype));
  const auto advance = [&](Operand& x, int64_t rows) {
    if (x.data != nullptr) x.data = static_cast<char*>(x.data) + rows * x.stride_seq * element;
  };
  for (Operand* x : {&s.q, &s.o, &s.dout, &s.dq}) advance(*x, first_q);
  for (Operand* x : {&s.k, &s.v, &s.dk, &s.dv}) advance(*x, first_k);
  if (s.lse != nullptr) {
    s.lse = static_cast<char*>(s.lse) + first_q * p.lse_stride_seq * int64_t(dtype_size(p.lse_dtype));
  }
  return s;
}

AttentionProblem heads_part(const AttentionProblem& p, int64_t batch_first, int64_t batch_count, int64_t kv_first,
                            int64_t kv_count) {
  const bool some_heads = kv_count < p.heads_kv;
  if (p.varlen() || batch_first < 0 || kv_first < 0 || batch_count < 1 || kv_count < 1 ||
      batch_first + batch_count > p.batch || kv_first + kv_count > p.heads_kv || (some_heads && batch_count != 1)) {
    throw Error(FJ_ERROR_INTERNAL, str_cat("[heads] no part of batch ", batch_first, "+", batch_count, " and kv heads ",
                                           kv_first, "+", kv_count, " in ", p.batch, " x ", p.heads_kv));
  }
  const int64_t group = p.group_size(), query_first = kv_first * group;
  AttentionProblem s = p;
  s.batch = batch_count;
  s.heads_kv = kv_count;
  s.heads_q = kv_count * group;
  s.dropout_batch = p.dropout_batch + batch_first;
  if (some_heads) {
    s.dropout_heads = p.dropout_heads > 0 ? p.dropout_heads : p.heads_q;
    s.dropout_head = p.dropout_head + query_first;
  }
  const int64_t element = int64_t(dtype_size(p.dtype));
  const auto advance = [&](Operand& x, int64_t head) {
    if (x.data != nullptr) {
      x.data = static_cast<char*>(x.data) + (batch_first * x.stride_batch + head * x.stride_head) * element;
    }
  };
  for (Operand* x : {&s.q, &s.o, &s.dout, &s.dq}) advance(*x, query_first);
  for (Operand* x : {&s.k, &s.v, &s.dk, &s.dv}) advance(*x, kv_first);
  if (s.lse != nullptr) {
    s.lse = static_cast<char*>(s.lse) +
            (batch_first * p.lse_stride_batch + query_first * p.lse_stride_head) * int64_t(dtype_size(p.lse_dtype));
  }
  if (s.mask != nullptr) {
    s.mask = static_cast<const char*>(s.mask) +
             (batch_first * p.mask_stride[0] + query_first * p.mask_stride[1]) * int64_t(dtype_size(p.mask_dtype));
  }
  return s;
}

DenseParts::DenseParts(const AttentionProblem& p) : whole_(&p) {
  if (!p.varlen() || p.batch == 0) return;  // a batch of no sequence: one empty part, as a dense call
  sequences_.reserve(size_t(p.batch));
  for (int64_t b = 0; b < p.batch; ++b) sequences_.push_back(sequence_problem(p, b));
}

AttentionProblem with_query_groups_packed(const AttentionProblem& p) {
  const int64_t group = p.group_size();
  const bool sees_every_key = p.window_right < 0 || p.diagonal_shift + p.window_right >= p.seqlen_k - 1;
  if (p.seqlen_q != 1 || group <= 1 || p.has_dropout() || p.window_left >= 0 || !sees_every_key) return p;
  // Row r of packed head h is query head h * group + r.
  AttentionProblem packed = p;
  packed.heads_q = p.heads_kv;
  packed.seqlen_q = group;
  for (Operand* x : {&packed.q, &packed.o}) {
    x->stride_seq = x->stride_head;
    x->stride_head *= group;
  }
  packed.lse_stride_seq = p.lse_stride_head;
  packed.lse_stride_head = p.lse_stride_head * group;
  packed.mask_stride[2] = p.mask_stride[1];
  packed.mask_stride[1] = p.mask_stride[1] * group;
  return packed;
}

}  // namespace flashjit
