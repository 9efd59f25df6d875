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

/* Other backends' devices have codes of their own (fj_device_type_by_name), below the last value. */
typedef enum fj_device_type {
  FJ_DEVICE_CPU = 0,
  FJ_DEVICE_CUDA = 1,
  FJ_DEVICE_TYPE_MAX_ENUM = 0x7FFFFFFF /* not a device: makes every code a valid value in C++ */
} fj_device_type;

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
  /* Optional (NULL: off): four uint32 words, seed low, seed high, offset low, offset high,
   * that replace dropout_seed and dropout_offset, read when the call's work runs: CUDA
   * memory of the call's device, read by the kernels (a call recorded into a CUDA graph
   * draws what the words hold at each replay, and a seed computed earlier on the stream
   * needs no copy to the host); host memory on the CPU, read by the call. 4-byte aligned. */
  const void* dropout_seed_words;
  int32_t num_threads; /* CPU: 0 = FLASHJIT_NUM_THREADS or all cores */
  /* CUDA: the cudaStream_t / CUstream to launch on (NULL = the legacy default stream).
   * Work is only enqueued; the call does not synchronise. Ignored on the CPU. */
  void* stream;
  /* CUDA: device memory the call uses as its scratch instead of taking scratch from
   * flashjit's stream-ordered pool, for callers that record calls into CUDA graphs that
   * must hold no memory nodes (a child graph cannot). NULL: flashjit's own. Given, it
   * holds workspace_bytes, at least what fj_attention_prepare_* reports (a forward given
   * less runs without splitting its keys over more blocks: slower for a few queries against
   * many keys; a backward given less is refused), starts 16-byte aligned (checked on every
   * device), and stays untouched until the call's work on the stream is done. Otherwise
   * ignored on the CPU. */
  void* workspace;
  size_t workspace_bytes;
  /* Backward only: 1 lets a backward sum dQ in no fixed order where that measured faster
   * (CUDA, sm_90, head dims up to 64 and 128: the one-pass backward's unordered float32 adds), so two
   * runs on the same inputs may differ in dQ's last bits (dK and dV stay bitwise repeatable).
   * 0, the zeroed struct's value: every backward is bitwise deterministic. Ignored elsewhere
   * and by the forward. */
  int32_t nondeterministic;
  /* CUDA, for callers that record work as graph nodes of their own (MLX's command encoder):
   * where set, each kernel of the call is handed to launch(launch_data, function, grid, block,
   * shared_bytes, arguments) instead of being launched on stream: function is the kernel's
   * CUfunction, grid and block its dimensions (x, y, z), shared_bytes its dynamic shared memory
   * and arguments its kernelParams as cuLaunchKernel takes them, valid during that call only
   * (hand them to a CUDA call that copies them: cuLaunchKernel, cuGraphAddKernelNode). The kernels come
   * in the order they run, each after the previous one has finished. The call then needs
   * workspace (its scratch: nothing is allocated, set or copied on stream; fj_attention_prepare_*
   * sizes it with launch set or not) and takes no variable-length batch. launch returns 0, or another value, which fails the call. NULL:
   * kernels are launched on stream. Ignored on the CPU. (The struct's newest fields: callers
   * start from fj_attention_options_default() or a zeroed struct, so that they read 0 and NULL
   * unless set.) */
  int (*launch)(void* launch_data, void* function, const unsigned grid[3], const unsigned block[3],
                unsigned shared_bytes, void** arguments);
  void* launch_data;
} fj_attention_options;

fj_attention_options fj_attention_options_default(void);

/* o, lse = attention(q, k, v). A query row with no key left after masking gives
 * o = 0 and lse = -inf. lse may be NULL (inference: the log-sum-exp is not written; the
 * backward needs it). */
fj_status fj_attention_forward(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                               const fj_attention_options* options, fj_tensor* o, fj_tensor* lse);

/* dq, dk, dv from the forward's o and lse and the output gradient dout (o's shape).
 * dk and dv sum over the query heads of each group. Deterministic (bitwise the same on the
 * same inputs) unless options->nondeterministic allows otherwise. */
fj_status fj_attention_backward(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                const fj_tensor* o, const fj_tensor* lse, const fj_tensor* dout,
                                const fj_attention_options* options, fj_tensor* dq, fj_tensor* dk,
                                fj_tensor* dv);

/* Before recording a call into a CUDA graph: chooses the kernels the same call makes under
 * stream capture, compiles and loads them (a call under capture does not compile), and
 * writes the workspace it needs (bytes, for fj_attention_options.workspace) to
 * *workspace_bytes; nothing is enqueued and no output is written. The arguments are the
 * call's own (data pointers included: they decide which kernels can read them). On the
 * CPU: validation only, and 0 bytes. */
fj_status fj_attention_prepare_forward(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                       const fj_attention_options* options, fj_tensor* o, fj_tensor* lse,
                                       size_t* workspace_bytes);
fj_status fj_attention_prepare_backward(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                        const fj_tensor* o, const fj_tensor* lse, const fj_tensor* dout,
                                        const fj_attention_options* options, fj_tensor* dq, fj_tensor* dk,
                                        fj_tensor* dv, size_t* workspace_bytes);

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

/* Variable-length batches: the sequences of a batch packed one after another, no padding
 * (the layouts of flash-attn's varlen functions):
 *   q [total_q, Hq, Dqk]   k [total_k, Hkv, Dqk]   v [total_k, Hkv, Dv]
 *   o [total_q, Hq, Dv]  lse [Hq, total_q]
 * Sequence b is rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q, o and lse and rows
 * cu_seqlens_k[b] .. cu_seqlens_k[b + 1] - 1 of k and v; attention never crosses a sequence
 * boundary, and a sequence may be empty. Causal and window bounds apply to each sequence with
 * its own lengths (FJ_CAUSAL_BOTTOM_RIGHT: its last query sees its last key). Dropout drops
 * what it would drop in a padded batch [batch, Hq, max_seqlen_q, max_seqlen_k] at the same
 * (b, h, i, j), i and j counted within the sequence. Masks are not taken.
 *
 * A KV cache: seqused_k (int32 [batch], host memory) gives each sequence's key count, its
 * first keys; with page_table (int32 [batch, max_pages], host memory) k and v are pages
 * [num_pages, page_size, Hkv, D] (page_size a multiple of 16) and key j of sequence b is row
 * j % page_size of page page_table[b][j / page_size]; cu_seqlens_k is then absent (ndim 0,
 * data NULL). Paged caches are forward only.
 * seqused_k (and page_table with it) may instead be in the CUDA memory of CUDA operands, with the
 * offsets in host memory: the host then reads neither (no wait for the device before the call).
 * Their values are not checked: the kernels clamp each count into 0 .. min(max_seqlen_k, the
 * sequence's rows or pages' keys) and each page index into the pages. Where one launch does not
 * take the call (see the CUDA backend) the backend copies them to the host first and checks them
 * there (a wait for the stream; not under stream capture). */
/* The offsets may instead be in the CUDA memory of CUDA operands (both of them, with both maxima
 * given and no seqused_k or page_table): the host does not read them then. Where one launch runs
 * the batch (sm_90, FLASHJIT_CUDA_VARLEN=1) a kernel builds its table from them without any check
 * (of them or of the maxima against them): each offset is raised to the largest before it and
 * clamped into the packed rows, so that no sequence reaches outside the operands. Elsewhere the
 * backend copies them to the host (waiting for the stream) and checks them as host offsets. */
typedef struct fj_varlen {
  fj_tensor cu_seqlens_q; /* int32 [batch + 1] in host memory (or see above): 0, never decreasing, total_q last */
  fj_tensor cu_seqlens_k; /* int32 [batch + 1] in host memory (or see above): 0, never decreasing, total_k last */
  int64_t max_seqlen_q;   /* 0 (the longest) or a bound on the lengths */
  int64_t max_seqlen_k;
  fj_tensor seqused_k;    /* optional: int32 [batch], keys each sequence uses (<= its rows or pages); host or CUDA memory */
  fj_tensor page_table;   /* optional: int32 [batch, max_pages]; needs seqused_k, in the same memory */
} fj_varlen;

fj_status fj_attention_varlen_forward(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                      const fj_varlen* varlen, const fj_attention_options* options, fj_tensor* o,
                                      fj_tensor* lse);
fj_status fj_attention_varlen_backward(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                       const fj_tensor* o, const fj_tensor* lse, const fj_tensor* dout,
                                       const fj_varlen* varlen, const fj_attention_options* options,
                                       fj_tensor* dq, fj_tensor* dk, fj_tensor* dv);
/* Their validation without the call, as fj_attention_check_forward (tensor data may be NULL;
 * the offsets, counts and page table are checked where their data is given). */
fj_status fj_attention_varlen_check_forward(const fj_tensor* q, const fj_tensor* k, const fj_tensor* v,
                                            const fj_varlen* varlen, const fj_attention_options* options,
                                            const fj_tensor* o, const fj_tensor* lse);

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

/* Names of the compiled-in backends, comma separated ("cpu,cuda"). A backend's name is its
 * device's: fj_tensor.device_type is FJ_DEVICE_CPU or FJ_DEVICE_CUDA for those two, and for
 * any other backend the code fj_device_type_by_name gives. */
const char* fj_backends(void);

/* The device type code of a compiled-in backend's device by its name; FJ_ERROR_UNSUPPORTED
 * (naming the compiled-in backends) when this build has none of that name. */
fj_status fj_device_type_by_name(const char* name, int32_t* device_type);

/* Backend-specific entry points have headers of their own: flashjit/cuda.h. */


#ifdef __cplusplus
}
#endif

#endif /* FLASHJIT_FLASHJIT_H_ */
