#include "cpu/reference.hpp"

#include <cmath>
#include <cstdint>
#include <limits>

#include "core/dtype.hpp"
#include "core/philox.hpp"

namespace flashjit::reference {
namespace {

double read(const void* base, fj_dtype dtype, int64_t index) {
  switch (dtype) {
    case FJ_FLOAT32: return static_cast<const float*>(base)[index];
    case FJ_FLOAT16: return to_float(static_cast<const Half*>(base)[index]);
    case FJ_BFLOAT16: return to_float(static_cast<const BFloat16*>(base)[index]);
    case FJ_FLOAT64: return static_cast<const double*>(base)[index];
    case FJ_BOOL: return static_cast<const uint8_t*>(base)[index] ? 1.0 : 0.0;
    default: return std::numeric_limits<double>::quiet_NaN();
  }
}

double round_to(fj_dtype dtype, double x) {
  switch (dtype) {
    case FJ_FLOAT32: return double(float(x));
    case FJ_FLOAT16: return to_float(half_from_float(float(x)));
    case FJ_BFLOAT16: return to_float(bfloat16_from_float(float(x)));
    default: return x;
  }
}

double element(const AttentionProblem& p, const Operand& t, int64_t b, int64_t h, int64_t s, int64_t d) {
  return read(t.data, p.dtype, b * t.stride_batch + h * t.stride_head + s * t.stride_seq + d);
}

// Visibility from the documented rule, derived here from the options rather than
// from AttentionProblem's precomputed bounds so that the oracle checks them.
bool visible(const AttentionProblem& p, int64_t i, int64_t j) {
  const int64_t shift = p.causal == FJ_CAUSAL_TOP_LEFT ? 0 : p.seqlen_k - p.seqlen_q;
  const int64_t right = p.causal != FJ_CAUSAL_NONE ? 0 : p.window_right;
  const int64_t relative = j - i - shift;
  return (p.window_left < 0 || relative >= -p.window_left) && (right < 0 || relative <= right);
}

// Probabilities of one query row: logits, softmax, dropout. tanh values are kept
// for the softcap derivative.
struct Row {
  std::vector<double> tanh_value, prob, dropped, keep;
  double lse = -INFINITY;
};

Row attention_row(const AttentionProblem& p, fj_dtype rounding, int64_t b, int64_t h, int64_t i) {
  const int64_t h_kv = h / p.group_size();
  Row row;
  std::vector<double> logit(p.seqlen_k, -INFINITY);
  row.tanh_value.assign(p.seqlen_k, 0.0);
  row.prob.assign(p.seqlen_k, 0.0);
  row.dropped.assign(p.seqlen_k, 0.0);
  row.keep.assign(p.seqlen_k, 1.0);
  double max_logit = -INFINITY;
  for (int64_t j = 0; j < p.seqlen_k; ++j) {
    double dot = 0.0;
    for (int64_t d = 0; d < p.head_dim_qk; ++d)
      dot += element(p, p.q, b, h, i, d) * element(p, p.k, b, h_kv, j, d);
    double x = round_to(rounding, dot * p.scale);
    if (p.softcap > 0.0) {
      row.tanh_value[j] = std::tanh(x / p.softcap);
      x = round_to(rounding, p.softcap * row.tanh_value[j]);
    }
    if (p.mask_kind != MaskKind::kNone) {
      const double m =
          read(p.mask, p.mask_dtype,
               b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2] + j * p.mask_stride[3]);
      x = p.mask_kind == MaskKind::kBool ? (m != 0.0 ? x : -INFINITY) : round_to(rounding, x + m);
    }
    if (!visible(p, i, j)) x = -INFINITY;
    logit[j] = x;
    max_logit = std::max(max_logit, x);
  }
  if (max_logit == -INFINITY) return row;  // fully masked: P = 0, lse = -inf
  double sum = 0.0;
  for (int64_t j = 0; j < p.seqlen_k; ++j) sum += std::exp(logit[j] - max_logit);
  row.lse = max_logit + std::log(sum);
  const double keep_scale = 1.0 / (1.0 - p.dropout_p);
  for (int64_t j = 0; j < p.seqlen_k; ++j) {
    row.prob[j] = round_to(rounding, std::exp(logit[j] - max_logit) / sum);
    if (p.has_dropout()) {
      row.keep[j] =
          dropout_keep(p.dropout_seed, p.dropout_offset, p.dropout_threshold, p.dropout_index(b, h), i, j) ? 1.0
                                                                                                       : 0.0;
    }
    row.dropped[j] =
        p.has_dropout() ? round_to(rounding, row.prob[j] * row.keep[j] * keep_scale) : row.prob[j];
  }
  return row;
}

}  // namespace

ForwardResult forward(const AttentionProblem& p, fj_dtype rounding) {
  ForwardResult result;
  result.o.assign(p.batch * p.heads_q * p.seqlen_q * p.head_dim_v, 0.0);
  result.lse.assign(p.batch * p.heads_q * p.seqlen_q, -INFINITY);
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads_q; ++h) {
      const int64_t h_kv = h / p.group_size();
      for (int64_t i = 0; i < p.seqlen_q; ++i) {
        const Row row = attention_row(p, rounding, b, h, i);
        const int64_t index = (b * p.heads_q + h) * p.seqlen_q + i;
        result.lse[index] = row.lse;
        for (int64_t d = 0; d < p.head_dim_v; ++d) {
          double acc = 0.0;
          for (int64_t j = 0; j < p.seqlen_k; ++j) acc += row.dropped[j] * element(p, p.v, b, h_kv, j, d);
          result.o[index * p.head_dim_v + d] = round_to(rounding, acc);
        }
      }
    }
  }
  return result;
}

BackwardResult backward(const AttentionProblem& p, fj_dtype rounding) {
  const int64_t heads_kv = p.heads_kv;
  BackwardResult g;
  g.dq.assign(p.batch * p.heads_q * p.seqlen_q * p.head_dim_qk, 0.0);
  g.dk.assign(p.batch * heads_kv * p.seqlen_k * p.head_dim_qk, 0.0);
  g.dv.assign(p.batch * heads_kv * p.seqlen_k * p.head_dim_v, 0.0);
  const double keep_scale = 1.0 / (1.0 - p.dropout_p);
  std::vector<double> dprob(p.seqlen_k);
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads_q; ++h) {
      const int64_t h_kv = h / p.group_size();
      for (int64_t i = 0; i < p.seqlen_q; ++i) {
        const Row row = attention_row(p, rounding, b, h, i);
        if (row.lse == -INFINITY) continue;
        // dP = dropout(dO V^T); D = sum_j P dP
        double delta = 0.0;
        for (int64_t j = 0; j < p.seqlen_k; ++j) {
          double acc = 0.0;
          for (int64_t d = 0; d < p.head_dim_v; ++d)
            acc += element(p, p.dout, b, h, i, d) * element(p, p.v, b, h_kv, j, d);
          acc = round_to(rounding, acc);
          dprob[j] = p.has_dropout() ? round_to(rounding, acc * row.keep[j] * keep_scale) : acc;
          delta += row.prob[j] * dprob[j];
        }
        delta = round_to(rounding, delta);
        for (int64_t j = 0; j < p.seqlen_k; ++j) {
          double ds = round_to(rounding, row.prob[j] * (dprob[j] - delta));
          if (p.softcap > 0.0) ds *= 1.0 - row.tanh_value[j] * row.tanh_value[j];
          ds *= p.scale;
          const int64_t k_row = (b * heads_kv + h_kv) * p.seqlen_k + j;
          const int64_t q_row = (b * p.heads_q + h) * p.seqlen_q + i;
          for (int64_t d = 0; d < p.head_dim_qk; ++d) {
            g.dq[q_row * p.head_dim_qk + d] += ds * element(p, p.k, b, h_kv, j, d);
            g.dk[k_row * p.head_dim_qk + d] += ds * element(p, p.q, b, h, i, d);
          }
          for (int64_t d = 0; d < p.head_dim_v; ++d)
            g.dv[k_row * p.head_dim_v + d] += row.dropped[j] * element(p, p.dout, b, h, i, d);
        }
      }
    }
  }
  for (double& x : g.dq) x = round_to(rounding, x);
  for (double& x : g.dk) x = round_to(rounding, x);
  for (double& x : g.dv) x = round_to(rounding, x);
  return g;
}

}  // namespace flashjit::reference
