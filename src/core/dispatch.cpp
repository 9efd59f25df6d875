#include <cstring>
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

const Backend& backend_for(int32_t device_type, const char* op) {
  const Registry& r = registry();
  for (int i = 0; i < r.count; ++i) {
    if (r.backends[i]->device_type == device_type) return *r.backends[i];
  }
  const char* name = device_name(device_type);
  throw_unsupported("[", op, "] no backend for device ", name != nullptr ? name : "?", " in this build (compiled-in backends: ",
                    r.names, ")");
}

const char* backend_names() {
  return registry().names.c_str();
}

const Backend* backend_named(const char* name) {
  const Registry& r = registry();
  for (int i = 0; name != nullptr && i < r.count; ++i) {
    if (std::strcmp(r.backends[i]->name, name) == 0) return r.backends[i];
  }
  return nullptr;
}

const char* device_name(int32_t device_type) {
  const Registry& r = registry();
  for (int i = 0; i < r.count; ++i) {
    if (r.backends[i]->device_type == device_type) return r.backends[i]->name;
  }
  if (device_type == FJ_DEVICE_CPU) return "cpu";
  if (device_type == FJ_DEVICE_CUDA) return "cuda";
  return nullptr;
}

}  // namespace flashjit
