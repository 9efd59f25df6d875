// The "relay" backend: a device of its own (code 100) whose memory is host
// memory; it counts its calls and relays them to the CPU backend. It exists to
// show that a backend folder plugs in without edits elsewhere.
#include <atomic>
#include <cstdint>

#include "core/backend.hpp"

const flashjit::Backend& flashjit_backend_cpu();

namespace {

std::atomic<int64_t> calls{0};

void forward(const flashjit::AttentionProblem& problem) {
  ++calls;
  flashjit_backend_cpu().forward(problem);
}

void backward(const flashjit::AttentionProblem& problem) {
  ++calls;
  flashjit_backend_cpu().backward(problem);
}

}  // namespace

// Calls this backend has served (for the C++ test).
extern "C" int64_t flashjit_relay_backend_calls(void) { return calls.load(); }

const flashjit::Backend& flashjit_backend_relay() {
  static const flashjit::Backend backend{"relay", 100, forward, backward};
  return backend;
}
