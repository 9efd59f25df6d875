// Naive attention in float64, the oracle of the C++ tests. It reads the same
// AttentionProblem as the backends and materialises one score row at a time.
#pragma once

#include <vector>

#include "core/problem.hpp"

namespace flashjit::reference {

struct ForwardResult {
  std::vector<double> o;    // contiguous [batch, heads_q, seqlen_q, head_dim_v]
  std::vector<double> lse;  // contiguous [batch, heads_q, seqlen_q]
};

struct BackwardResult {
  std::vector<double> dq;  // contiguous, shapes of q, k, v
  std::vector<double> dk;
  std::vector<double> dv;
};

// rounding == FJ_FLOAT64 computes exactly. Another dtype rounds every
// intermediate (scores, probabilities, products, outputs) to that dtype, as an
// unfused implementation in that dtype would: the baseline for test tolerances.
ForwardResult forward(const AttentionProblem& p, fj_dtype rounding);
BackwardResult backward(const AttentionProblem& p, fj_dtype rounding);

}  // namespace flashjit::reference
