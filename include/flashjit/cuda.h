/*
 * flashjit's CUDA backend: its run-time compiled kernels, their cache and the
 * tile choices measured on a device. The attention calls themselves are
 * flashjit.h's (fj_tensor.device_type = FJ_DEVICE_CUDA).
 */
#ifndef FLASHJIT_CUDA_H_
#define FLASHJIT_CUDA_H_

#include "flashjit/flashjit.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- CUDA: run-time compiled kernels and their cache ---------------------
 * Kernels are compiled by NVRTC on first use and cached in memory and on disk
 * ($FLASHJIT_CACHE_DIR, else ~/.cache/flashjit). Without the CUDA backend in the
 * build, or without NVRTC or a GPU where one is needed, these return
 * FJ_ERROR_UNSUPPORTED with the reason in fj_last_error(). */

/* What a kernel is specialised on; sizes and pointers are run-time values. */
typedef struct fj_kernel_config {
  int32_t backward;    /* 0: the forward kernel; 1: the backward kernels */
  fj_dtype dtype;      /* float32, float16, bfloat16 or float64 */
  int32_t head_dim_qk; /* 1..256 */
  int32_t head_dim_v;  /* 1..256 */
  int32_t mask;        /* 0: none, 1: boolean, 2: additive */
  fj_dtype mask_dtype; /* additive masks: float32 or dtype */
  int32_t window;      /* nonzero: causal or sliding-window bounds */
  int32_t dropout;     /* nonzero: dropout */
  int32_t softcap;     /* nonzero: softcap */
  int32_t arch;        /* target, e.g. 90 for sm_90; 0: the arch of device_index (needs a GPU) */
  int32_t device_index;
  int32_t nondeterministic; /* backward: 1 also compiles the kernels a backward with
                             * fj_attention_options.nondeterministic = 1 takes; 0 or 1 */
} fj_kernel_config;

fj_kernel_config fj_kernel_config_default(void);

/* Compiles (or finds in the cache) the kernels of each config. With arch set, no
 * GPU is needed: only NVRTC. A forward config also compiles the tile choices of
 * its classes: with arch 0 (the device's) those tuned on that device or else the
 * built-in table's, with arch set the built-in table's. A backward config compiles the
 * pass FLASHJIT_CUDA_BACKWARD forces; unforced, the split kernels, and the one-pass ones
 * where one of its classes is tuned to them (the same tables), and with nondeterministic set
 * the one pass with unordered dQ adds where such a call takes it. */
fj_status fj_cuda_precompile(const fj_kernel_config* configs, int32_t count);

typedef struct fj_cuda_cache_stats {
  int64_t compiles;    /* NVRTC compilations in this process */
  int64_t disk_loads;  /* binaries read from the disk cache */
  int64_t memory_hits; /* lookups answered from memory */
  double last_compile_seconds;
  double last_disk_load_seconds;
} fj_cuda_cache_stats;

fj_status fj_cuda_get_cache_stats(fj_cuda_cache_stats* stats);
/* Forgets binaries and loaded kernels held in memory; the disk cache stays. */
fj_status fj_cuda_clear_memory_cache(void);
/* The disk cache's base directory and the directory of one arch's entries. */
fj_status fj_cuda_cache_dir(int32_t arch, char* buffer, size_t size);
fj_status fj_cuda_nvrtc_version(int32_t* major, int32_t* minor);
/* Number of CUDA devices (0 without a driver or GPU; never fails). */
int32_t fj_cuda_device_count(void);
/* Arch (e.g. 90), multiprocessor count and name of a device. */
fj_status fj_cuda_device_info(int32_t device_index, int32_t* arch, int32_t* multiprocessors, char* name,
                              size_t name_size);

/* Tile choices of the sm_90a forward, and the sm_90a backward's pass, measured on a device
 * (flashjit tune). A tuning file holds, for one device (by name) and arch, the configuration
 * measured fastest for each problem class; later calls on that device take it
 * (FLASHJIT_CUDA_TILES and FLASHJIT_CUDA_BACKWARD still win). The class key of a config at a
 * key length (config->backward: of its backward, "bwd_..."): */
fj_status fj_cuda_tuning_key(const fj_kernel_config* config, int64_t seqlen_k, char* buffer, size_t size);
/* Writes the tuning file of a device from lines "<key> <tiles> <TFLOP/s>" (a backward class:
 * "one-pass" or "split" for tiles; "built-in": drop the class), keeping other classes of a
 * valid earlier file; its path goes to path (unless NULL). */
fj_status fj_cuda_save_tuning(const char* device_name, int32_t arch, const char* entries, char* path,
                              size_t path_size);
/* The tuning file of a device and the choices it holds, or why it is ignored. */
fj_status fj_cuda_describe_tuning(const char* device_name, int32_t arch, char* buffer, size_t size);

#ifdef __cplusplus
}
#endif

#endif /* FLASHJIT_CUDA_H_ */
