#include "harness.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <sstream>

#include "core/dtype.hpp"
#include "cpu/reference.hpp"

namespace flashjit::testing {
namespace {

constexpr unsigned char kSentinel = 0xA5;
constexpr int64_t kGuardElements = 16;

std::vector<int64_t> layout_strides(const std::vector<int64_t>& shape, Layout layout) {
  const int n = int(shape.size());
  std::vector<int64_t> strides(n, 1);
  if (layout == Layout::kSeqMajor && n == 4) {
    // Memory order [B, S, H, D].
    strides[3] = 1;
    strides[1] = shape[3];
    strides[2] = shape[1] * shape[3];
    strides[0] = shape[2] * shape[1] * shape[3];
    return strides;
  }
  const int64_t gaps[4] = {7, 5, 3, 0};  // extra elements after each outer dim
  int64_t stride = 1;
  for (int d = n - 1; d >= 0; --d) {
    strides[d] = stride;
    const int64_t gap = layout == Layout::kPadded && d < n - 1 ? gaps[d + 4 - n] : 0;
    stride = stride * shape[d] + gap;
    if (layout == Layout::kPadded && d == n - 1) stride += 3;  // gap after each row
  }
  return strides;
}

double read_element(const unsigned char* base, fj_dtype dtype, int64_t offset) {
  switch (dtype) {
    case FJ_FLOAT32: {
      float x;
      std::memcpy(&x, base + offset * 4, 4);
      return x;
    }
    case FJ_FLOAT64: {
      double x;
      std::memcpy(&x, base + offset * 8, 8);
      return x;
    }
    case FJ_FLOAT16: {
      Half x;
      std::memcpy(&x, base + offset * 2, 2);
      return to_float(x);
    }
    case FJ_BFLOAT16: {
      BFloat16 x;
      std::memcpy(&x, base + offset * 2, 2);
      return to_float(x);
    }
    case FJ_BOOL: return base[offset] ? 1.0 : 0.0;
    default: return NAN;
  }
}

void write_element(unsigned char* base, fj_dtype dtype, int64_t offset, double value) {
  switch (dtype) {
    case FJ_FLOAT32: {
      const float x = float(value);
      std::memcpy(base + offset * 4, &x, 4);
      break;
    }
    case FJ_FLOAT64: std::memcpy(base + offset * 8, &value, 8); break;
    case FJ_FLOAT16: {
      const Half x = half_from_float(float(value));
      std::memcpy(base + offset * 2, &x, 2);
      break;
    }
    case FJ_BFLOAT16: {
      const BFloat16 x = bfloat16_from_float(float(value));
      std::memcpy(base + offset * 2, &x, 2);
      break;
    }
    case FJ_BOOL: base[offset] = value != 0.0 ? 1 : 0; break;
    default: break;
  }
}

}  // namespace

GuardedTensor::GuardedTensor(std::vector<int64_t> shape, fj_dtype dtype, Layout layout)
    : GuardedTensor(shape, layout_strides(shape, layout), dtype) {}

GuardedTensor::GuardedTensor(std::vector<int64_t> shape, std::vector<int64_t> strides, fj_dtype dtype)
    : shape_(std::move(shape)), strides_(std::move(strides)), dtype_(dtype), guard_elems_(kGuardElements) {
  span_ = 1;
  for (size_t d = 0; d < shape_.size(); ++d) span_ += std::max<int64_t>(shape_[d] - 1, 0) * strides_[d];
  const int64_t total = span_ + 2 * guard_elems_;
  bytes_.assign(size_t(total * dtype_size(dtype_)), kSentinel);
  in_view_.assign(size_t(total), false);
  for (int64_t i = 0; i < numel(); ++i) in_view_[size_t(guard_elems_ + offset(i))] = true;
}

int64_t GuardedTensor::numel() const {
  int64_t n = 1;
  for (int64_t s : shape_) n *= s;
  return n;
}

int64_t GuardedTensor::offset(int64_t logical) const {
  int64_t off = 0;
  for (int d = int(shape_.size()) - 1; d >= 0; --d) {
    off += (logical % shape_[d]) * strides_[d];
    logical /= shape_[d];
  }
  return off;
}

fj_tensor GuardedTensor::view() {
  fj_tensor t;
  std::memset(&t, 0, sizeof t);
  t.data = bytes_.data() + guard_elems_ * dtype_size(dtype_);
  t.dtype = dtype_;
  t.device_type = FJ_DEVICE_CPU;
  t.ndim = int32_t(shape_.size());
  for (size_t d = 0; d < shape_.size(); ++d) {
    t.shape[d] = shape_[d];
    t.strides[d] = strides_[d];
  }
  return t;
}

void GuardedTensor::set(int64_t logical, double value) {
  write_element(bytes_.data() + guard_elems_ * dtype_size(dtype_), dtype_, offset(logical), value);
}

void GuardedTensor::fill_normal(uint64_t seed, double stddev) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, stddev);
  for (int64_t i = 0; i < numel(); ++i) set(i, normal(rng));
}

void GuardedTensor::fill(const std::vector<double>& values) {
  for (int64_t i = 0; i < numel(); ++i) set(i, values[size_t(i)]);
}

void GuardedTensor::poison() {
  for (int64_t i = 0; i < numel(); ++i) set(i, NAN);
}

std::vector<double> GuardedTensor::values() const {
  std::vector<double> out(static_cast<size_t>(numel()));
  const unsigned char* base = bytes_.data() + guard_elems_ * dtype_size(dtype_);
  for (int64_t i = 0; i < numel(); ++i) out[size_t(i)] = read_element(base, dtype_, offset(i));
  return out;
}

bool GuardedTensor::guards_intact() const {
  const int64_t elem = dtype_size(dtype_);
  for (size_t e = 0; e < in_view_.size(); ++e) {
    if (in_view_[e]) continue;
    for (int64_t byte = 0; byte < elem; ++byte)
      if (bytes_[e * size_t(elem) + size_t(byte)] != kSentinel) return false;
  }
  return true;
}

AttentionBuffers::AttentionBuffers(int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q,
                                   int64_t seqlen_k, int64_t head_dim, fj_dtype dtype)
    : q({batch, heads_q, seqlen_q, head_dim}, dtype),
      k({batch, heads_kv, seqlen_k, head_dim}, dtype),
      v({batch, heads_kv, seqlen_k, head_dim}, dtype),
      o({batch, heads_q, seqlen_q, head_dim}, dtype),
      lse({batch, heads_q, seqlen_q}, dtype == FJ_FLOAT64 ? FJ_FLOAT64 : FJ_FLOAT32),
      dout({batch, heads_q, seqlen_q, head_dim}, dtype),
      dq({batch, heads_q, seqlen_q, head_dim}, dtype),
      dk({batch, heads_kv, seqlen_k, head_dim}, dtype),
      dv({batch, heads_kv, seqlen_k, head_dim}, dtype) {
  q.fill_normal(1);
  k.fill_normal(2);
  v.fill_normal(3);
  dout.fill_normal(4);
}

fj_status AttentionBuffers::forward(const fj_attention_options& options) {
  fj_tensor qv = q.view(), kv = k.view(), vv = v.view(), ov = o.view(), lv = lse.view();
  return fj_attention_forward(&qv, &kv, &vv, &options, &ov, &lv);
}

fj_status AttentionBuffers::backward(const fj_attention_options& options) {
  fj_tensor qv = q.view(), kv = k.view(), vv = v.view(), ov = o.view(), lv = lse.view();
  fj_tensor dov = dout.view(), dqv = dq.view(), dkv = dk.view(), dvv = dv.view();
  return fj_attention_backward(&qv, &kv, &vv, &ov, &lv, &dov, &options, &dqv, &dkv, &dvv);
}

std::string describe(const Case& c) {
  std::ostringstream out;
  out << c.name << ": B" << c.batch << " Hq" << c.heads_q << " Hkv" << c.heads_kv << " Sq" << c.seqlen_q
      << " Sk" << c.seqlen_k << " D" << c.dim_qk << "/" << c.dim_v << " " << dtype_name(c.dtype);
  return out.str();
}

namespace {

double unit_floor(fj_dtype dtype) {
  switch (dtype) {
    case FJ_FLOAT16: return 2.0 * 0x1p-10;
    case FJ_BFLOAT16: return 2.0 * 0x1p-7;
    case FJ_FLOAT64: return 1e-12;
    default: return 1e-5;  // float32: about 80 ulp, for sums over long rows
  }
}

// Errors of `actual` and `baseline` against `exact`; -inf must match exactly.
ErrorReport compare(const std::string& what, const std::vector<double>& actual,
                    const std::vector<double>& baseline, const std::vector<double>& exact, fj_dtype dtype,
                    std::string& failure) {
  ErrorReport report;
  report.what = what;
  double magnitude = 1.0;
  for (size_t i = 0; i < exact.size(); ++i) {
    if (std::isinf(exact[i]) || std::isinf(actual[i])) {
      if (actual[i] != exact[i] && failure.empty()) {
        failure = what + "[" + std::to_string(i) + "] = " + std::to_string(actual[i]) + ", expected " +
                  std::to_string(exact[i]);
      }
      continue;
    }
    magnitude = std::max(magnitude, std::abs(exact[i]));
    const double err = std::abs(actual[i] - exact[i]);
    report.error = std::isnan(err) ? INFINITY : std::max(report.error, err);
    if (std::isfinite(baseline[i]))
      report.baseline = std::max(report.baseline, std::abs(baseline[i] - exact[i]));
  }
  report.tolerance = 2.0 * report.baseline + unit_floor(dtype) * magnitude;
  return report;
}

// Rows of the mask that see no key at all: every fifth query row.
bool empty_row(int64_t query) {
  return query % 5 == 2;
}

}  // namespace

CaseResult run_case(const Case& c) {
  CaseResult result;
  const fj_dtype lse_dtype = c.dtype == FJ_FLOAT64 ? FJ_FLOAT64 : FJ_FLOAT32;
  const uint64_t seed = std::hash<std::string>{}(describe(c));
  GuardedTensor q({c.batch, c.heads_q, c.seqlen_q, c.dim_qk}, c.dtype, c.layout);
  GuardedTensor k({c.batch, c.heads_kv, c.seqlen_k, c.dim_qk}, c.dtype, c.layout);
  GuardedTensor v({c.batch, c.heads_kv, c.seqlen_k, c.dim_v}, c.dtype, c.layout);
  GuardedTensor o({c.batch, c.heads_q, c.seqlen_q, c.dim_v}, c.dtype, c.layout);
  GuardedTensor lse({c.batch, c.heads_q, c.seqlen_q}, lse_dtype,
                    c.layout == Layout::kPadded ? Layout::kPadded : Layout::kContiguous);
  q.fill_normal(seed + 1);
  k.fill_normal(seed + 2);
  v.fill_normal(seed + 3);
  o.poison();
  lse.poison();

  fj_attention_options options = fj_attention_options_default();
  options.causal = c.causal;
  options.window_left = c.window_left;
  options.window_right = c.window_right;
  options.softcap = c.softcap;
  options.has_scale = c.scale != 0.0;
  options.scale = c.scale;
  options.dropout_p = c.dropout;
  options.dropout_seed = seed;
  options.dropout_offset = 12345;

  // The mask: broadcast dims have size 1 or, in the padded layout, full size with stride 0.
  std::vector<int64_t> full = {c.batch, c.heads_q, c.seqlen_q, c.seqlen_k};
  std::vector<int64_t> mask_shape = full;
  for (int d = 0; d < 4; ++d)
    if (c.mask_broadcast[d]) mask_shape[d] = 1;
  const fj_dtype mask_dtype = c.mask == MaskType::kBool              ? FJ_BOOL
                              : c.mask == MaskType::kAdditiveFloat32 ? FJ_FLOAT32
                                                                     : c.dtype;
  std::vector<int64_t> mask_strides = layout_strides(mask_shape, Layout::kContiguous);
  std::vector<int64_t> mask_view_shape = mask_shape;
  if (c.layout == Layout::kPadded) {
    for (int d = 0; d < 4; ++d)
      if (c.mask_broadcast[d]) {
        mask_view_shape[d] = full[d];
        mask_strides[d] = 0;
      }
  }
  GuardedTensor mask_storage(mask_shape, mask_dtype, Layout::kContiguous);
  if (c.mask != MaskType::kNone) {
    std::mt19937_64 rng(seed + 4);
    std::normal_distribution<double> normal(0.0, 1.0);
    std::bernoulli_distribution attend(0.7);
    std::vector<double> values(size_t(mask_storage.numel()));
    for (int64_t i = 0; i < mask_storage.numel(); ++i) {
      const int64_t query = (i / mask_shape[3]) % mask_shape[2];
      const bool hidden = c.mask_empty_rows && empty_row(query);
      if (c.mask == MaskType::kBool) {
        values[size_t(i)] = hidden ? 0.0 : (attend(rng) ? 1.0 : 0.0);
      } else {
        values[size_t(i)] = hidden || !attend(rng) ? -INFINITY : normal(rng);
      }
    }
    mask_storage.fill(values);
    options.mask = mask_storage.view();
    for (int d = 0; d < 4; ++d) {
      options.mask.shape[d] = mask_view_shape[d];
      options.mask.strides[d] = mask_strides[d];
    }
  }

  fj_tensor qv = q.view(), kv = k.view(), vv = v.view(), ov = o.view(), lv = lse.view();
  if (fj_attention_forward(&qv, &kv, &vv, &options, &ov, &lv) != FJ_SUCCESS) {
    result.failure = std::string("forward failed: ") + fj_last_error();
    return result;
  }
  const AttentionProblem problem = make_forward_problem(&qv, &kv, &vv, &options, &ov, &lv);
  const reference::ForwardResult exact = reference::forward(problem, FJ_FLOAT64);
  const reference::ForwardResult base = reference::forward(problem, c.dtype);
  result.reports.push_back(compare("o", o.values(), base.o, exact.o, c.dtype, result.failure));
  result.reports.push_back(compare("lse", lse.values(), base.lse, exact.lse, FJ_FLOAT32, result.failure));
  if (c.mask_empty_rows && c.mask != MaskType::kNone && !c.mask_broadcast[2]) {
    // Rows that see nothing: o = 0 exactly and lse = -inf.
    const std::vector<double> out = o.values(), lse_values = lse.values();
    for (int64_t row = 0; row < c.batch * c.heads_q * c.seqlen_q; ++row) {
      if (!empty_row(row % c.seqlen_q)) continue;
      if (lse_values[size_t(row)] != -INFINITY) result.failure = "masked row lse is not -inf";
      for (int64_t d = 0; d < c.dim_v; ++d)
        if (out[size_t(row * c.dim_v + d)] != 0.0) result.failure = "masked row output is not 0";
    }
  }
  if (!o.guards_intact() || !lse.guards_intact()) result.failure = "forward wrote outside o or lse";

  if (c.backward) {
    GuardedTensor dout({c.batch, c.heads_q, c.seqlen_q, c.dim_v}, c.dtype, c.layout);
    GuardedTensor dq({c.batch, c.heads_q, c.seqlen_q, c.dim_qk}, c.dtype, c.layout);
    GuardedTensor dk({c.batch, c.heads_kv, c.seqlen_k, c.dim_qk}, c.dtype, c.layout);
    GuardedTensor dv({c.batch, c.heads_kv, c.seqlen_k, c.dim_v}, c.dtype, c.layout);
    dout.fill_normal(seed + 5);
    dq.poison();
    dk.poison();
    dv.poison();
    fj_tensor dov = dout.view(), dqv = dq.view(), dkv = dk.view(), dvv = dv.view();
    if (fj_attention_backward(&qv, &kv, &vv, &ov, &lv, &dov, &options, &dqv, &dkv, &dvv) != FJ_SUCCESS) {
      result.failure = std::string("backward failed: ") + fj_last_error();
      return result;
    }
    const AttentionProblem bp =
        make_backward_problem(&qv, &kv, &vv, &ov, &lv, &dov, &options, &dqv, &dkv, &dvv);
    const reference::BackwardResult gexact = reference::backward(bp, FJ_FLOAT64);
    const reference::BackwardResult gbase = reference::backward(bp, c.dtype);
    result.reports.push_back(compare("dq", dq.values(), gbase.dq, gexact.dq, c.dtype, result.failure));
    result.reports.push_back(compare("dk", dk.values(), gbase.dk, gexact.dk, c.dtype, result.failure));
    result.reports.push_back(compare("dv", dv.values(), gbase.dv, gexact.dv, c.dtype, result.failure));
    if (!dq.guards_intact() || !dk.guards_intact() || !dv.guards_intact())
      result.failure = "backward wrote outside dq, dk or dv";
  }
  return result;
}

}  // namespace flashjit::testing
