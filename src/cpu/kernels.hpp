// Entry points of the CPU backend.
#pragma once

#include "core/problem.hpp"

namespace flashjit::cpu {

void attention_forward(const AttentionProblem& problem);
void attention_backward(const AttentionProblem& problem);

}  // namespace flashjit::cpu
