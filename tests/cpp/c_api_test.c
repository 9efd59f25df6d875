/* Compiled as C: the header is plain C and the API works without C++. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "flashjit/cuda.h"
#include "flashjit/flashjit.h"

static fj_tensor view4(float* data, int64_t b, int64_t h, int64_t s, int64_t d) {
  fj_tensor t;
  memset(&t, 0, sizeof t);
  t.data = data;
  t.dtype = FJ_FLOAT32;
  t.device_type = FJ_DEVICE_CPU;
  t.ndim = 4;
  t.shape[0] = b; t.shape[1] = h; t.shape[2] = s; t.shape[3] = d;
  t.strides[0] = h * s * d; t.strides[1] = s * d; t.strides[2] = d; t.strides[3] = 1;
  return t;
}

int main(void) {
  enum { B = 1, H = 2, S = 5, D = 4 };
  int32_t cpu_code = -1;
  if (fj_device_type_by_name("cpu", &cpu_code) != FJ_SUCCESS || cpu_code != FJ_DEVICE_CPU) {
    fprintf(stderr, "fj_device_type_by_name(\"cpu\"): %s\n", fj_last_error());
    return 1;
  }
  if (fj_cuda_device_count() < 0) return 1; /* flashjit/cuda.h: 0 without a GPU, never fails */
  float q[B * H * S * D], k[B * H * S * D], v[B * H * S * D], o[B * H * S * D], lse[B * H * S];
  for (int i = 0; i < B * H * S * D; ++i) {
    q[i] = (float)sin(i);
    k[i] = (float)cos(i);
    v[i] = (float)(i % 7) - 3.0f;
  }
  fj_tensor tq = view4(q, B, H, S, D), tk = view4(k, B, H, S, D), tv = view4(v, B, H, S, D);
  fj_tensor to = view4(o, B, H, S, D);
  fj_tensor tl = view4(lse, B, H, S, 1);
  tl.ndim = 3;
  tl.strides[0] = H * S; tl.strides[1] = S; tl.strides[2] = 1;
  fj_attention_options options = fj_attention_options_default();
  options.causal = FJ_CAUSAL_TOP_LEFT;
  if (fj_attention_forward(&tq, &tk, &tv, &options, &to, &tl) != FJ_SUCCESS) {
    fprintf(stderr, "forward failed: %s\n", fj_last_error());
    return 1;
  }
  /* With top-left causal, query 0 sees only key 0: o[0] = v[0] and lse = q0.k0 / sqrt(D). */
  for (int d = 0; d < D; ++d) {
    if (fabsf(o[d] - v[d]) > 1e-6f) {
      fprintf(stderr, "o[0][%d] = %g, expected %g\n", d, o[d], v[d]);
      return 1;
    }
  }
  float dot = 0.0f;
  for (int d = 0; d < D; ++d) dot += q[d] * k[d];
  if (fabsf(lse[0] - dot / 2.0f) > 1e-6f) {
    fprintf(stderr, "lse[0] = %g, expected %g\n", lse[0], dot / 2.0f);
    return 1;
  }
  tk.shape[1] = 3;
  tv.shape[1] = 3;
  if (fj_attention_forward(&tq, &tk, &tv, &options, &to, &tl) != FJ_ERROR_INVALID_VALUE ||
      strstr(fj_last_error(), "multiple of key/value heads") == NULL) {
    fprintf(stderr, "expected a GQA error, got \"%s\"\n", fj_last_error());
    return 1;
  }
  printf("C API test passed (flashjit %s, backends %s)\n", fj_version(), fj_backends());
  return 0;
}
