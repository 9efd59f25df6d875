// The CPU backend: the kernels of the instruction-set variant this processor runs.
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "core/backend.hpp"
#include "core/error.hpp"
#include "core/guarded.hpp"
#include "cpu/kernels.hpp"
#include "flashjit/cpu.h"

namespace flashjit::cpu {
namespace {

struct Variant {
  const char* name;
  void (*forward)(const AttentionProblem&);
  void (*backward)(const AttentionProblem&);
  bool (*runs_here)();
};

#if FJ_CPU_MULTI_ISA
bool runs_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
         __builtin_cpu_supports("fma");
}

// AMX needs the processor's tiles and the kernel's leave to use their state: Linux
// grants it to the process on request (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA),
// once, for every thread.
bool runs_amx() {
  static const bool granted = [] {
    if (!runs_avx512() || !__builtin_cpu_supports("avx512bf16") || !__builtin_cpu_supports("amx-tile") ||
        !__builtin_cpu_supports("amx-bf16")) {
      return false;
    }
#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
    constexpr long kRequestPermission = 0x1023, kTileData = 18;
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
#else
    return false;
#endif
  }();
  return granted;
}

bool runs_avx512bf16() { return runs_avx512() && __builtin_cpu_supports("avx512bf16"); }

// Widest first.
const Variant kVariants[] = {
    {"amx", amx::attention_forward, amx::attention_backward, runs_amx},
    {"avx512bf16", avx512bf16::attention_forward, avx512bf16::attention_backward, runs_avx512bf16},
    {"avx512", avx512::attention_forward, avx512::attention_backward, runs_avx512},
    {"avx2", avx2::attention_forward, avx2::attention_backward,
     [] { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"); }},
    {"baseline", baseline::attention_forward, baseline::attention_backward, [] { return true; }},
};
constexpr const char* kNames = "baseline,avx2,avx512,avx512bf16,amx";
#else
const Variant kVariants[] = {{"native", native::attention_forward, native::attention_backward, [] { return true; }}};
constexpr const char* kNames = "native";
#endif

// FLASHJIT_CPU_ISA's variant, or the widest that runs here; a named variant that is not
// compiled in or that this processor cannot run is an error, never an illegal instruction.
const Variant& chosen() {
  const char* wanted = std::getenv("FLASHJIT_CPU_ISA");
  if (wanted == nullptr || *wanted == '\0' || std::strcmp(wanted, "auto") == 0) {
    for (const Variant& v : kVariants) {
      if (v.runs_here()) return v;
    }
  }
  for (const Variant& v : kVariants) {
    if (std::strcmp(v.name, wanted) != 0) continue;
    if (!v.runs_here()) {
      throw_unsupported("[cpu] FLASHJIT_CPU_ISA: this processor cannot run the ", v.name, " kernels");
    }
    return v;
  }
  throw_value_error("[cpu] FLASHJIT_CPU_ISA: '", wanted, "' is not a compiled-in variant; expected auto or one of ",
                    kNames);
}

}  // namespace

void attention_forward(const AttentionProblem& problem) { chosen().forward(problem); }
void attention_backward(const AttentionProblem& problem) { chosen().backward(problem); }
const char* kernel_variant() { return chosen().name; }
const char* kernel_variants() { return kNames; }

}  // namespace flashjit::cpu

extern "C" fj_status fj_cpu_kernels(const char** variant, const char** variants) {
  return flashjit::guarded([&] {
    if (variant == nullptr || variants == nullptr) {
      flashjit::throw_value_error("[cpu_kernels] variant, variants: expected pointers, got NULL");
    }
    *variants = flashjit::cpu::kernel_variants();
    *variant = flashjit::cpu::kernel_variant();
  });
}

const flashjit::Backend& flashjit_backend_cpu() {
  static const flashjit::Backend backend{"cpu", FJ_DEVICE_CPU, flashjit::cpu::attention_forward,
                                         flashjit::cpu::attention_backward};
  return backend;
}
