/*
 * flashjit's CPU backend: its kernels are compiled for several instruction sets
 * (x86-64 baseline, AVX2 + FMA, AVX-512) and each call takes the widest this
 * processor runs, or the one FLASHJIT_CPU_ISA names ("baseline", "avx2", "avx512",
 * "auto"). A build with FLASHJIT_NATIVE has one variant, "native". The attention
 * calls themselves are flashjit.h's (fj_tensor.device_type = FJ_DEVICE_CPU).
 */
#ifndef FLASHJIT_CPU_H_
#define FLASHJIT_CPU_H_

#include "flashjit/flashjit.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The variant calls take now and the compiled-in variants (comma separated); static
 * strings. FJ_ERROR_INVALID_VALUE / FJ_ERROR_UNSUPPORTED where FLASHJIT_CPU_ISA names a
 * variant that is not compiled in or that this processor cannot run. */
fj_status fj_cpu_kernels(const char** variant, const char** variants);

#ifdef __cplusplus
}
#endif

#endif /* FLASHJIT_CPU_H_ */
