#include "core/problem.hpp"

#include <cmath>
#include <cstdint>
#include <string>

#include "core/dtype.hpp"
#include "core/error.hpp"
#include "core/philox.hpp"

namespace flashjit {
namespace {

constexpr const char* kDimNames = "[batch, heads, seqlen, head_dim]";

std::string shape_string(const fj_tensor& t) {
  std::string out = "[";
  for (int d = 0; d < t.ndim && d < FJ_MAX_DIMS; ++d) {
    if (d) out += ", ";
    out += std::to_string(t.shape[d]);
  }
  return out + "]";
}

// Checks that a tensor argument is present and well formed (pointer, rank,
// non-negative sizes and strides, contiguous last dim).
const fj_tensor& check_tensor(const char* op, const char* name, const fj_tensor* t, int ndim) {
  if (t == nullptr) throw_value_error("[", op, "] ", name, ": expected a tensor, got NULL");
  if (t->ndim != ndim) {
    throw_value_error("[", op, "] ", name, ": expected ", ndim, " dims",
                      ndim == 4 ? std::string(" ") + kDimNames : std::string(),
                      ", got ", t->ndim);
  }
  int64_t elements = 1;
  for (int d = 0; d < ndim; ++d) {
    if (t->shape[d] < 0) {
      throw_value_error("[", op, "] ", name, ": expected non-negative sizes, got shape ",
                        shape_string(*t));
    }
    if (t->strides[d] < 0) {
      throw_value_error("[", op, "] ", name, ": expected non-negative strides, got stride ",
                        t->strides[d], " in dim ", d);
    }
    elements *= t->shape[d];
  }
  if (elements > 0 && t->data == nullptr) {
    throw_value_error("[", op, "] ", name, ": data pointer is NULL");
  }
  if (t->device_type != FJ_DEVICE_CPU && t->device_type != FJ_DEVICE_CUDA) {
    throw_value_error("[", op, "] ", name, ": unknown device type ", int(t->device_type));
  }
  if (t->dtype < FJ_FLOAT32 || t->dtype > FJ_INT64) {
    throw_type_error("[", op, "] ", name, ": unknown dtype code ", int(t->dtype));
  }
  return *t;
}

void check_last_dim_contiguous(const char* op, const char* name, const fj_tensor& t) {
  const int last = t.ndim - 1;
  if (t.shape[last] > 1 && t.strides[last] != 1) {
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
      throw_value_error("[", op, "] ", name, ": expected shape ", shape_string(want), " (", why,
                        "), got ", shape_string(t));
    }
  }
}

void check_same_dtype(const char* op, const char* name, const fj_tensor& t, fj_dtype expected) {
  if (t.dtype != expected) {
    throw_type_error("[", op, "] ", name, ": expected dtype ", dtype_name(expected),
                     " (the dtype of q), got ", dtype_name(t.dtype));
  }
}

void check_same_device(const char* op, const char* name, const fj_tensor& t,
                       const fj_tensor& q) {
  if (t.device_type != q.device_type || t.device_index != q.device_index) {
    throw_value_error("[", op, "] ", name, ": expected the device of q (",
                      q.device_type == FJ_DEVICE_CPU ? "cpu" : "cuda", ":", q.device_index,
                      "), got ", t.device_type == FJ_DEVICE_CPU ? "cpu" : "cuda", ":",
                      t.device_index);
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
  int64_t span = 0;
  for (int d = 0; d < t.ndim; ++d) {
    if (t.shape[d] == 0) return range;
    span += (t.shape[d] - 1) * t.strides[d];
  }
  range.first = reinterpret_cast<uintptr_t>(t.data);
  range.last = range.first + uintptr_t((span + 1) * dtype_size(t.dtype)) - 1;
  range.empty = false;
  return range;
}

void check_no_overlap(const char* op, const char* out_name, const fj_tensor& out,
                      const char* in_name, const fj_tensor& in) {
  const ByteRange a = byte_range(out), b = byte_range(in);
  if (a.empty || b.empty) return;
  if (a.first <= b.last && b.first <= a.last) {
    throw_value_error("[", op, "] ", out_name, ": output memory overlaps input ", in_name,
                      "; pass a separate buffer");
  }
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
    p.scale = opt.scale;
  } else {
    p.scale = 1.0 / std::sqrt(double(p.head_dim_qk));
  }
  if (!(opt.softcap >= 0.0) || !std::isfinite(opt.softcap)) {
    throw_value_error("[", op, "] softcap: expected a finite value >= 0 (0 = off), got ",
                      opt.softcap);
  }
  p.softcap = opt.softcap;

  if (opt.causal != FJ_CAUSAL_NONE && opt.causal != FJ_CAUSAL_TOP_LEFT &&
      opt.causal != FJ_CAUSAL_BOTTOM_RIGHT) {
    throw_value_error("[", op, "] causal: expected 0 (none), 1 (top-left) or 2 (bottom-right), got ",
                      int(opt.causal));
  }
  if (opt.window_left < -1) {
    throw_value_error("[", op, "] window_left: expected -1 (unbounded) or >= 0, got ",
                      opt.window_left);
  }
  if (opt.window_right < -1) {
    throw_value_error("[", op, "] window_right: expected -1 (unbounded) or >= 0, got ",
                      opt.window_right);
  }
  p.causal = opt.causal;
  p.window_left = opt.window_left;
  p.window_right = opt.window_right;
  if (opt.causal != FJ_CAUSAL_NONE) {
    if (opt.window_right > 0) {
      throw_value_error("[", op, "] window_right: expected -1 or 0 with a causal mask, got ",
                        opt.window_right);
    }
    p.window_right = 0;
  }
  p.diagonal_shift = opt.causal == FJ_CAUSAL_TOP_LEFT ? 0 : p.seqlen_k - p.seqlen_q;

  if (!(opt.dropout_p >= 0.0 && opt.dropout_p < 1.0)) {
    throw_value_error("[", op, "] dropout_p: expected a value in [0, 1), got ", opt.dropout_p);
  }
  p.dropout_p = opt.dropout_p;
  p.dropout_threshold = dropout_threshold(opt.dropout_p);
  p.dropout_seed = opt.dropout_seed;
  p.dropout_offset = opt.dropout_offset;
  if (p.seqlen_q > UINT32_MAX || p.seqlen_k > 4 * int64_t(UINT32_MAX) ||
      p.batch * p.heads_q > UINT32_MAX) {
    throw_value_error("[", op, "] q: sizes exceed the dropout counter range (2^32 rows, 2^32 "
                      "batch*heads)");
  }

  if (opt.num_threads < 0) {
    throw_value_error("[", op, "] num_threads: expected >= 0 (0 = default), got ",
                      opt.num_threads);
  }
  p.num_threads = opt.num_threads;

  const fj_tensor& mask = opt.mask;
  if (mask.data == nullptr && mask.ndim == 0) return;  // no mask
  check_tensor(op, "mask", &mask, 4);
  check_same_device(op, "mask", mask, q);
  if (mask.dtype == FJ_BOOL) {
    p.mask_kind = MaskKind::kBool;
  } else if (mask.dtype == FJ_FLOAT32 || mask.dtype == q.dtype) {
    p.mask_kind = MaskKind::kAdditive;
  } else if (is_float_dtype(mask.dtype)) {
    throw_type_error("[", op, "] mask: expected dtype bool, float32 or ", dtype_name(q.dtype),
                     " (the dtype of q), got ", dtype_name(mask.dtype));
  } else {
    throw_type_error("[", op, "] mask: expected a bool (true = attend) or float (additive) mask, got ",
                     dtype_name(mask.dtype));
  }
  const int64_t full[4] = {p.batch, p.heads_q, p.seqlen_q, p.seqlen_k};
  static const char* const kMaskDims[4] = {"batch", "heads_q", "seqlen_q", "seqlen_k"};
  for (int d = 0; d < 4; ++d) {
    if (mask.shape[d] != 1 && mask.shape[d] != full[d]) {
      throw_value_error("[", op, "] mask: dim ", d, " (", kMaskDims[d], ") has size ",
                        mask.shape[d], ", expected 1 or ", full[d],
                        " to broadcast to [batch, heads_q, seqlen_q, seqlen_k] = [", full[0], ", ",
                        full[1], ", ", full[2], ", ", full[3], "]");
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
    throw_value_error("[", op, "] k: query heads (", p.heads_q,
                      ") must be a multiple of key/value heads (", p.heads_kv, ")");
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
const fj_tensor& check_operand(const char* op, const char* name, const fj_tensor* t,
                               const fj_tensor& q, const int64_t* shape, const char* why) {
  const fj_tensor& checked = check_tensor(op, name, t, 4);
  check_shape(op, name, checked, shape, why);
  check_same_dtype(op, name, checked, q.dtype);
  check_same_device(op, name, checked, q);
  check_last_dim_contiguous(op, name, checked);
  return checked;
}

}  // namespace

AttentionProblem make_forward_problem(const fj_tensor* q, const fj_tensor* k,
                                      const fj_tensor* v, const fj_attention_options* options,
                                      const fj_tensor* o, const fj_tensor* lse) {
  constexpr const char* op = "attention";
  AttentionProblem p = make_inputs(op, q, k, v);
  const int64_t o_shape[4] = {p.batch, p.heads_q, p.seqlen_q, p.head_dim_v};
  const fj_tensor& out = check_operand(op, "o", o, *q, o_shape, "[batch, heads_q, seqlen_q, head_dim_v]");
  set_lse(op, lse, *q, p);
  apply_options(op, options, *q, p);
  p.o = make_operand(out);
  for (const fj_tensor* written : {o, lse}) {
    const char* name = written == o ? "o" : "lse";
    check_no_overlap(op, name, *written, "q", *q);
    check_no_overlap(op, name, *written, "k", *k);
    check_no_overlap(op, name, *written, "v", *v);
  }
  return p;
}

AttentionProblem make_backward_problem(const fj_tensor* q, const fj_tensor* k,
                                       const fj_tensor* v, const fj_tensor* o,
                                       const fj_tensor* lse, const fj_tensor* dout,
                                       const fj_attention_options* options, const fj_tensor* dq,
                                       const fj_tensor* dk, const fj_tensor* dv) {
  constexpr const char* op = "attention_backward";
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
  const fj_tensor* inputs[] = {q, k, v, o, lse, dout};
  const char* input_names[] = {"q", "k", "v", "o", "lse", "dout"};
  const fj_tensor* outputs[] = {dq, dk, dv};
  const char* output_names[] = {"dq", "dk", "dv"};
  for (int w = 0; w < 3; ++w) {
    for (int r = 0; r < 6; ++r) check_no_overlap(op, output_names[w], *outputs[w], input_names[r], *inputs[r]);
  }
  return p;
}

}  // namespace flashjit
