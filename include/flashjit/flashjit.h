/*
 * flashjit: exact, memory-light attention with a plain C API.
 *
 * Layout (SDPA order), strides in elements, last dimension contiguous:
 *   q   [B, Hq,  Sq, Dqk]      k [B, Hkv, Sk, Dqk]      v [B, Hkv, Sk, Dv]
 *   o   [B, Hq,  Sq, Dv]     lse [B, Hq,  Sq]  float32 (float64 when q is float64)
 *   mask (optional) [B|1, Hq|1, Sq|1, Sk|1] broadcast through zero strides.
 * Hq must be a multiple of Hkv: query head h reads key/value head h / (Hq / Hkv).
 *
 * Every entry point returns a status; on failure fj_last_error() holds a message
 * naming the offending argument and value. No C++ exception crosses this API.
 */
#ifndef FLASHJIT_FLASHJIT_H_
#define FLASHJIT_FLASHJIT_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FJ_VERSION_MAJOR 0
#define FJ_VERSION_MINOR 1
#define FJ_VERSION_PATCH 0
#define FJ_MAX_DIMS 4

typedef enum fj_status {
  FJ_SUCCESS = 0,
  FJ_ERROR_INVALID_VALUE = 1, /* a shape, stride, pointer or option is wrong */
  FJ_ERROR_INVALID_TYPE = 2,  /* a dtype is wrong */
  FJ_ERROR_UNSUPPORTED = 3,   /* valid, but no backend in this build runs it */
  FJ_ERROR_OUT_OF_MEMORY = 4,
  FJ_ERROR_INTERNAL = 5
} fj_status;

typedef enum fj_dtype {
  FJ_FLOAT32 = 0,
  FJ_FLOAT16 = 1,
  FJ_BFLOAT16 = 2,
  FJ_FLOAT64 = 3, /* CPU only: for gradient checks */
  FJ_BOOL = 4,    /* one byte per element, nonzero = true; masks only */
  FJ_INT8 = 5,    /* named so that a caller can pass one and get a clear error */
  FJ_INT32 = 6,
  FJ_INT64 = 7
} fj_dtype;

typedef enum fj_device_type { FJ_DEVICE_CPU = 0, FJ_DEVICE_CUDA = 1 } fj_device_type;

/* Causal masks. TOP_LEFT keeps key j for query i when j <= i (SDPA's is_causal);
 * BOTTOM_RIGHT keeps j <= i + Sk - Sq (flash-attn and MLX). */
typedef enum fj_causal { FJ_CAUSAL_NONE = 0, FJ_CAUSAL_TOP_LEFT = 1, FJ_CAUSAL_BOTTOM_RIGHT = 2 } fj_causal;

/* A strided view of caller memory; flashjit never copies or frees it. */
typedef struct fj_tensor {
  void* data;
  fj_dtype dtype;
  fj_device_type device_type;
  int32_t device_index;
  int32_t ndim; /* 0 with data == NULL means "absent" (optional tensors) */
  int64_t shape[FJ_MAX_DIMS];
  int64_t strides[FJ_MAX_DIMS]; /* in elements, not bytes */
} fj_tensor;

/* Everything besides the tensors. Initialise with fj_attention_options_default(). */
typedef struct fj_attention_options {
  int32_t has_scale; /* 0: scale = 1 / sqrt(Dqk) */
  double scale;      /* multiplies q.k before softcap, mask and softmax */
  double softcap;    /* > 0: score = softcap * tanh(score / softcap); 0 = off */
  fj_causal causal;
  /* Sliding window: key j is kept for query i when
   *   i + shift - window_left <= j <= i + shift + window_right,
   * where -1 leaves that side unbounded and shift = Sk - Sq, except with
   * FJ_CAUSAL_TOP_LEFT where shift = 0. A causal mask sets window_right to 0,
   * so with causal set window_right must be -1 or 0. */
  int64_t window_left;
  int64_t window_right;
  /* Optional mask: FJ_BOOL (true = attend) or additive float (float32 or q's dtype),
   * added to the score after softcap. Four dims, each 1 or the full size. */
  fj_tensor mask;
  /* Dropout on the attention probabilities, applied after softmax; kept values are
   * scaled by 1 / (1 - p). Which elements drop is fixed by (seed, offset, b, h, i, j):
   * see fj_dropout_keep() for the exact rule. */
  double dropout_p;
  uint64_t dropout_seed;
  uint64_t dropout_offset;
  int32_t num_threads; /* CPU: 0 = FLASHJIT_NUM_THREADS or all cores */
  /* CUDA: the cudaStream_t / CUstream to launch on (NULL = the legacy default stream).
   * Work is only enqueued; the call does not synchronise. Ignored on the CPU. */
  void* stream;
} fj_attention_options;

fj_attention_options fj_attention_options_default(void);

/* o, lse = attention(q, k, v). A query row with no key left after masking gives
 * o = 0 and lse = -inf. */
fj_status fj_attention_forward(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                               const fj_attention_options* options, fj_tensor* o, fj_tensor* lse);

/* dq, dk, dv from the forward's o and lse and the output gradient dout (o's shape).
 * dk and dv sum over the query heads of each group. Deterministic. */
fj_status fj_attention_backward(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                const fj_tensor* o, const fj_tensor* lse, const fj_tensor* dout,
                                const fj_attention_options* options, fj_tensor* dq, fj_tensor* dk,
                                fj_tensor* dv);

/* The validation of fj_attention_forward / fj_attention_backward without the call:
 * the same errors for the same descriptors, which may have NULL data pointers (for
 * front ends that describe tensors without memory: shape inference, lazy arrays).
 * Memory shared between tensors, which depends on addresses, is checked only by
 * the calls; an output's own strides (no two elements at one address) by both. */
fj_status fj_attention_check_forward(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                     const fj_attention_options* options, const fj_tensor* o,
                                     const fj_tensor* lse);
fj_status fj_attention_check_backward(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                      const fj_tensor* o, const fj_tensor* lse, const fj_tensor* dout,
                                      const fj_attention_options* options, const fj_tensor* dq,
                                      const fj_tensor* dk, const fj_tensor* dv);

/* The dropout rule, exposed so that tests and other backends can reproduce it.
 * Philox4x32-10 (Salmon et al., 2011) with
 *   key     = (lo32(seed), hi32(seed) ^ hi32(offset))
 *   counter = (floor(j / 4), i, b * H + h, lo32(offset))
 * gives four 32-bit words r[0..3]; element (b, h, i, j) is dropped when
 *   r[j % 4] < floor(p * 2^32)
 * and kept otherwise. h is the query head, H the number of query heads. */
int fj_dropout_keep(uint64_t seed, uint64_t offset, double p, int64_t b, int64_t h, int64_t num_heads,
                    int64_t i, int64_t j);

/* Writes the keep mask (1 = kept) for [B, H, Sq, Sk] into a contiguous byte array. */
fj_status fj_dropout_keep_mask(uint64_t seed, uint64_t offset, double p, int64_t batch, int64_t num_heads,
                               int64_t seqlen_q, int64_t seqlen_k, uint8_t* keep);

/* Message of the last failure on this thread ("" if none). */
const char* fj_last_error(void);

const char* fj_version(void);

/* Names of the compiled-in backends, comma separated ("cpu"). */
const char* fj_backends(void);


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
} fj_kernel_config;

fj_kernel_config fj_kernel_config_default(void);

/* Compiles (or finds in the cache) the kernels of each config. With arch set, no
 * GPU is needed: only NVRTC. A forward config also compiles the tile choices of
 * its classes: with arch 0 (the device's) those tuned on that device or else the
 * built-in table's, with arch set the built-in table's. */
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

/* Tile choices of the sm_90a forward measured on a device (flashjit tune). A tuning file
 * holds, for one device (by name) and arch, the configuration measured fastest for each
 * problem class; later forwards on that device take it (FLASHJIT_CUDA_TILES still wins).
 * The class key of a config's forward at a key length: */
fj_status fj_cuda_tuning_key(const fj_kernel_config* config, int64_t seqlen_k, char* buffer, size_t size);
/* Writes the tuning file of a device from lines "<key> <tiles> <TFLOP/s>" (tiles "built-in":
 * drop the class), keeping other classes of a valid earlier file; its path goes to path
 * (unless NULL). */
fj_status fj_cuda_save_tuning(const char* device_name, int32_t arch, const char* entries, char* path,
                              size_t path_size);
/* The tuning file of a device and the choices it holds, or why it is ignored. */
fj_status fj_cuda_describe_tuning(const char* device_name, int32_t arch, char* buffer, size_t size);

#ifdef __cplusplus
}
#endif

#endif /* FLASHJIT_FLASHJIT_H_ */
