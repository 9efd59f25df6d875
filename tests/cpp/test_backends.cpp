// Backends come from the registry: a backend added from its own folder (the test
// build's "relay", tests/backend) is found by name, dispatched to by its device
// code, named in messages, and kept apart from the other devices.
#include <gtest/gtest.h>

#include <string>

#include "flashjit/flashjit.h"
#include "harness.hpp"

extern "C" int64_t flashjit_relay_backend_calls(void) __attribute__((weak));

namespace flashjit::testing {
namespace {

TEST(Backends, CpuIsFoundByName) {
  int32_t code = -1;
  ASSERT_EQ(fj_device_type_by_name("cpu", &code), FJ_SUCCESS) << fj_last_error();
  EXPECT_EQ(code, FJ_DEVICE_CPU);
  EXPECT_EQ(fj_device_type_by_name("tpu", &code), FJ_ERROR_UNSUPPORTED);
  EXPECT_NE(std::string(fj_last_error()).find("no backend 'tpu' in this build (compiled-in backends: cpu"),
            std::string::npos)
      << fj_last_error();
  EXPECT_EQ(fj_device_type_by_name("cpu", nullptr), FJ_ERROR_INVALID_VALUE);
}

TEST(Backends, AFolderBackendIsReachedThroughTheCApi) {
  int32_t relay = -1;
  if (fj_device_type_by_name("relay", &relay) != FJ_SUCCESS || flashjit_relay_backend_calls == nullptr) {
    GTEST_SKIP() << "built without -DFLASHJIT_EXTRA_BACKENDS=tests/backend";
  }
  EXPECT_NE(std::string(fj_backends()).find("relay"), std::string::npos);
  AttentionBuffers on_cpu(2, 4, 2, 37, 45, 24, FJ_FLOAT32), on_relay(2, 4, 2, 37, 45, 24, FJ_FLOAT32);
  fj_attention_options options = fj_attention_options_default();
  options.causal = FJ_CAUSAL_BOTTOM_RIGHT;
  // The same inputs (AttentionBuffers' fixed seeds); the relay's outputs poisoned.
  for (GuardedTensor* t : {&on_relay.o, &on_relay.lse, &on_relay.dq, &on_relay.dk, &on_relay.dv}) t->poison();
  const int64_t before = flashjit_relay_backend_calls();
  ASSERT_EQ(on_cpu.forward(options), FJ_SUCCESS) << fj_last_error();
  ASSERT_EQ(on_cpu.backward(options), FJ_SUCCESS) << fj_last_error();
  EXPECT_EQ(flashjit_relay_backend_calls(), before);

  // The same call with every tensor on the relay device.
  fj_tensor q = on_relay.q.view(), k = on_relay.k.view(), v = on_relay.v.view(), o = on_relay.o.view(),
            lse = on_relay.lse.view(), dout = on_relay.dout.view(), dq = on_relay.dq.view(),
            dk = on_relay.dk.view(), dv = on_relay.dv.view();
  for (fj_tensor* t : {&q, &k, &v, &o, &lse, &dout, &dq, &dk, &dv}) t->device_type = fj_device_type(relay);
  ASSERT_EQ(fj_attention_forward(&q, &k, &v, &options, &o, &lse), FJ_SUCCESS) << fj_last_error();
  ASSERT_EQ(fj_attention_backward(&q, &k, &v, &o, &lse, &dout, &options, &dq, &dk, &dv), FJ_SUCCESS) << fj_last_error();
  EXPECT_EQ(flashjit_relay_backend_calls(), before + 2);
  EXPECT_EQ(on_relay.o.values(), on_cpu.o.values());
  EXPECT_EQ(on_relay.lse.values(), on_cpu.lse.values());
  EXPECT_EQ(on_relay.dq.values(), on_cpu.dq.values());
  EXPECT_EQ(on_relay.dk.values(), on_cpu.dk.values());
  EXPECT_EQ(on_relay.dv.values(), on_cpu.dv.values());

  // A tensor left on the CPU is named with both devices.
  k.device_type = FJ_DEVICE_CPU;
  EXPECT_EQ(fj_attention_forward(&q, &k, &v, &options, &o, &lse), FJ_ERROR_INVALID_VALUE);
  EXPECT_NE(std::string(fj_last_error()).find("k: expected the device of q (relay:0), got cpu:0"),
            std::string::npos)
      << fj_last_error();
}

}  // namespace
}  // namespace flashjit::testing
