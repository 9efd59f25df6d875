#include <string>

#include "core/backend.hpp"
#include "core/error.hpp"

#define FLASHJIT_BACKEND(name) const flashjit::Backend& flashjit_backend_##name();
#include "flashjit_backends.inc"
#undef FLASHJIT_BACKEND

namespace flashjit {
namespace {

struct Registry {
  const Backend* backends[8];
  int count = 0;
  std::string names;

  Registry() {
#define FLASHJIT_BACKEND(name) backends[count++] = &flashjit_backend_##name();
#include "flashjit_backends.inc"
#undef FLASHJIT_BACKEND
    for (int i = 0; i < count; ++i) names += (i ? "," : "") + std::string(backends[i]->name);
  }
};

const Registry& registry() {
  static const Registry instance;
  return instance;
}

}  // namespace

const Backend& backend_for(fj_device_type device_type, const char* op) {
  const Registry& r = registry();
  for (int i = 0; i < r.count; ++i) {
    if (r.backends[i]->device_type == device_type) return *r.backends[i];
  }
  throw_unsupported("[", op, "] no backend for device ", device_type == FJ_DEVICE_CUDA ? "cuda" : "cpu",
                    " in this build (compiled-in backends: ", r.names, ")");
}

const char* backend_names() {
  return registry().names.c_str();
}

}  // namespace flashjit
