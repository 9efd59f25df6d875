// The contract between the core and a backend. Each backend folder defines
//   const flashjit::Backend& flashjit_backend_<name>();
// and registers <name> in CMake (flashjit_register_backend); dispatch.cpp
// collects them from the generated list, so adding a backend touches its folder only.
#pragma once

#include "core/problem.hpp"

namespace flashjit {

struct Backend {
  const char* name;
  fj_device_type device_type;
  // Throws flashjit::Error(FJ_ERROR_UNSUPPORTED, ...) for a problem it cannot run.
  void (*forward)(const AttentionProblem& problem);
  void (*backward)(const AttentionProblem& problem);
};

// The backend for a device, or an FJ_ERROR_UNSUPPORTED error naming what is compiled in.
const Backend& backend_for(fj_device_type device_type, const char* op);

// Comma-separated names of the compiled-in backends.
const char* backend_names();

}  // namespace flashjit
