#include "core/backend.hpp"

#include "cpu/kernels.hpp"

const flashjit::Backend& flashjit_backend_cpu() {
  static const flashjit::Backend backend{"cpu", FJ_DEVICE_CPU, flashjit::cpu::attention_forward,
                                         flashjit::cpu::attention_backward};
  return backend;
}
