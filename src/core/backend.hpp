// The contract between the core and a backend. Each backend folder defines
//   const flashjit::Backend& flashjit_backend_<name>();
// and registers <name> in CMake (flashjit_register_backend); dispatch.cpp
// collects them from the generated list, so adding a backend touches its folder
// only. Its name is its device's name in the C API (fj_device_type_by_name), in
// Python (flashjit.backends(), torch's device type) and in messages; its device
// type is flashjit.h's code for CPU and CUDA, a code of its own for others.
#pragma once

#include "core/problem.hpp"

namespace flashjit {

struct Backend {
  const char* name;
  int32_t device_type;  // FJ_DEVICE_CPU, FJ_DEVICE_CUDA, or a code of its own
  // Throws flashjit::Error(FJ_ERROR_UNSUPPORTED, ...) for a problem it cannot run.
  void (*forward)(const AttentionProblem& problem);
  void (*backward)(const AttentionProblem& problem);
  // fj_attention_prepare_*: readies the kernels of the forward (backward = false) or the
  // backward of a problem as a call under stream capture would take them, and returns the
  // scratch bytes that call needs; enqueues nothing. Null: nothing to prepare, no scratch.
  size_t (*prepare)(const AttentionProblem& problem, bool backward) = nullptr;
};

// The backend for a device, or an FJ_ERROR_UNSUPPORTED error naming what is compiled in.
const Backend& backend_for(int32_t device_type, const char* op);

// Comma-separated names of the compiled-in backends.
const char* backend_names();

// The registered backend of a device name, or nullptr.
const Backend* backend_named(const char* name);

// A device's name for messages: its backend's, "cpu" or "cuda" for flashjit.h's
// codes without a backend in this build, else nullptr (an unknown code).
const char* device_name(int32_t device_type);

}  // namespace flashjit
