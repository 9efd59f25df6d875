// Entry points of the CPU backend: the kernels of each instruction-set variant
// compiled in (tile.hpp), and the choice among them for this processor.
#pragma once

#include "core/problem.hpp"

namespace flashjit::cpu {

#define FJ_CPU_DECLARE_VARIANT(isa)                      \
  namespace isa {                                        \
  void attention_forward(const AttentionProblem& problem);  \
  void attention_backward(const AttentionProblem& problem); \
  }
FJ_CPU_DECLARE_VARIANT(native)    // the build's own flags (FLASHJIT_NATIVE)
FJ_CPU_DECLARE_VARIANT(baseline)  // x86-64 as the compiler targets it by default
FJ_CPU_DECLARE_VARIANT(avx2)      // AVX2 and FMA (x86-64-v3)
FJ_CPU_DECLARE_VARIANT(avx512)    // AVX-512 F, BW, DQ, VL (x86-64-v4)
FJ_CPU_DECLARE_VARIANT(avx512bf16)  // avx512, bfloat16 products on AVX-512-BF16 (amx's kernels without tiles)
FJ_CPU_DECLARE_VARIANT(amx)       // avx512, with AMX tiles and AVX-512-BF16 for bfloat16
#undef FJ_CPU_DECLARE_VARIANT

// The variant's kernels: FLASHJIT_CPU_ISA names one ("baseline", "avx2", "avx512", "avx512bf16", "amx";
// "auto" or unset: the widest this processor runs).
void attention_forward(const AttentionProblem& problem);
void attention_backward(const AttentionProblem& problem);

// The variant calls take now, and the variants compiled in (comma separated).
const char* kernel_variant();
const char* kernel_variants();

}  // namespace flashjit::cpu
