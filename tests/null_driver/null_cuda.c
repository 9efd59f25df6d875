/* A null CUDA driver: libcuda.so.1's entry points that flashjit loads, answering as
 * one sm_90 device would and doing no work. Loaded in place of the real driver
 * (LD_LIBRARY_PATH), it lets flashjit's own host path (validation, kernel choice,
 * compiles, descriptors, launch arguments) run and be timed or profiled on a
 * machine without a GPU; the driver's own time is absent from what it measures.
 * Device memory is host memory from malloc; the driver's fills and copies are done.
 *   FLASHJIT_NULL_DRIVER_NAME  the device's name (default "NVIDIA H200")
 *   FLASHJIT_NULL_DRIVER_SMS   its multiprocessors (default 132)
 *   FLASHJIT_NULL_DRIVER_ARCH  its compute capability as 90, 80, ... (default 90)
 * What it was asked: null_driver_counts() (launches, descriptors encoded, pool allocations and
 * frees) and null_driver_launches() (the last launches' shapes), for tests (ctest
 * CudaHostPath.*) and scripts (ctypes); null_driver_set_capturing(1): every stream capturing. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;

static unsigned long long g_launches, g_encodes, g_allocs, g_frees;

/* A launch as the driver saw it; with null_driver_record_params(n), the first n bytes of its
 * first kernel parameter too. */
#define NULL_PARAM_BYTES 2048
typedef struct {
  unsigned grid[3], block[3], shared_bytes;
  unsigned programmatic; /* 1: launched with programmatic stream serialisation (cuLaunchKernelEx) */
  const char* function;  /* the entry's name */
  unsigned char params[NULL_PARAM_BYTES];
} null_launch;
#define NULL_LAUNCH_LOG 64
static null_launch g_log[NULL_LAUNCH_LOG];
static size_t g_param_bytes;

/* Records the first `bytes` bytes (at most NULL_PARAM_BYTES) of each launch's first parameter
 * from now on; returns 0, or -1 where that is more than a record holds. */
int null_driver_record_params(size_t bytes) {
  if (bytes > NULL_PARAM_BYTES) return -1;
  g_param_bytes = bytes;
  return 0;
}

/* The last min(count, launches so far, 256) launches, oldest first; returns how many. */
unsigned null_driver_launches(null_launch* out, unsigned count) {
  const unsigned long long have = g_launches < NULL_LAUNCH_LOG ? g_launches : NULL_LAUNCH_LOG;
  const unsigned n = count < have ? count : (unsigned)have;
  for (unsigned i = 0; i < n; ++i) out[i] = g_log[(g_launches - n + i) % NULL_LAUNCH_LOG];
  return n;
}

static int env_int(const char* name, int fallback) {
  const char* text = getenv(name);
  return text && *text ? atoi(text) : fallback;
}

void null_driver_counts(unsigned long long* out) {
  out[0] = g_launches;
  out[1] = g_encodes;
  out[2] = g_allocs;
  out[3] = g_frees;
}

CUresult cuInit(unsigned flags) { (void)flags; return 0; }
CUresult cuDriverGetVersion(int* version) { *version = 13000; return 0; }
CUresult cuDeviceGetCount(int* count) { *count = 1; return 0; }
CUresult cuDeviceGet(int* device, int ordinal) { *device = ordinal; return ordinal == 0 ? 0 : 101; }
CUresult cuDeviceGetName(char* name, int length, int device) {
  (void)device;
  const char* text = getenv("FLASHJIT_NULL_DRIVER_NAME");
  strncpy(name, text && *text ? text : "NVIDIA H200", (size_t)length - 1);
  name[length - 1] = '\0';
  return 0;
}
CUresult cuDeviceGetAttribute(int* value, int attribute, int device) {
  (void)device;
  const int arch = env_int("FLASHJIT_NULL_DRIVER_ARCH", 90);
  switch (attribute) {
    case 16: *value = env_int("FLASHJIT_NULL_DRIVER_SMS", 132); return 0;  /* multiprocessors */
    case 75: *value = arch / 10; return 0;                                 /* major */
    case 76: *value = arch % 10; return 0;                                 /* minor */
    case 97: *value = arch >= 90 ? 232448 : 166912; return 0;              /* opt-in shared memory */
    default: *value = 0; return 0;
  }
}
static int g_context;
CUresult cuDevicePrimaryCtxRetain(void** context, int device) { (void)device; *context = &g_context; return 0; }
static void* g_current;
CUresult cuCtxGetCurrent(void** context) { *context = g_current; return 0; }
CUresult cuCtxSetCurrent(void* context) { g_current = context; return 0; }
static int g_module;
CUresult cuModuleLoadData(void** module, const void* image) { (void)image; *module = &g_module; return 0; }
/* A function is its entry's name (a copy that lives as long as the process). */
CUresult cuModuleGetFunction(void** function, void* module, const char* name) {
  (void)module;
  *function = strdup(name);
  return *function ? 0 : 2;
}
CUresult cuFuncGetAttribute(int* value, int attribute, void* function) {
  (void)attribute; (void)function;
  *value = 0;
  return 0;
}
CUresult cuFuncSetAttribute(void* function, int attribute, int value) {
  (void)function; (void)attribute; (void)value;
  return 0;
}
CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared, void* stream, void** params, void** extra) {
  (void)stream; (void)extra;
  null_launch* entry = &g_log[g_launches % NULL_LAUNCH_LOG];
  entry->grid[0] = gx, entry->grid[1] = gy, entry->grid[2] = gz;
  entry->block[0] = bx, entry->block[1] = by, entry->block[2] = bz;
  entry->shared_bytes = shared;
  entry->function = (const char*)f;
  memset(entry->params, 0, sizeof entry->params);
  if (g_param_bytes && params && params[0]) memcpy(entry->params, params[0], g_param_bytes);
  entry->programmatic = 0;
  ++g_launches;
  return 0;
}
/* cuda.h's CUlaunchAttribute and CUlaunchConfig, as far as flashjit sets them. */
typedef struct {
  int id;
  char pad[4];
  union {
    char bytes[64];
    int value;
  } value;
} null_launch_attribute;
typedef struct {
  unsigned grid[3], block[3], shared_bytes;
  void* stream;
  null_launch_attribute* attributes;
  unsigned attribute_count;
} null_launch_config;
CUresult cuLaunchKernelEx(const null_launch_config* config, void* f, void** params, void** extra) {
  const CUresult status = cuLaunchKernel(f, config->grid[0], config->grid[1], config->grid[2], config->block[0],
                                         config->block[1], config->block[2], config->shared_bytes, config->stream,
                                         params, extra);
  null_launch* entry = &g_log[(g_launches - 1) % NULL_LAUNCH_LOG];
  for (unsigned i = 0; i < config->attribute_count; ++i) {
    if (config->attributes[i].id == 6 /* programmatic stream serialisation */) {
      entry->programmatic = config->attributes[i].value.value != 0;
    }
  }
  return status;
}
/* What cuStreamIsCapturing answers for every stream: null_driver_set_capturing(1) makes the
 * calls from then on run as under stream capture (CU_STREAM_CAPTURE_STATUS_ACTIVE). */
static int g_capturing;
void null_driver_set_capturing(int capturing) { g_capturing = capturing; }
CUresult cuStreamIsCapturing(void* stream, int* status) { (void)stream; *status = g_capturing ? 1 : 0; return 0; }
CUresult cuStreamGetId(void* stream, unsigned long long* id) { *id = (unsigned long long)(uintptr_t)stream; return 0; }
CUresult cuStreamSynchronize(void* stream) { (void)stream; return 0; }
static int g_pool;
CUresult cuMemPoolCreate(void** pool, const void* props) { (void)props; *pool = &g_pool; return 0; }
CUresult cuMemPoolSetAttribute(void* pool, int attribute, void* value) {
  (void)pool; (void)attribute; (void)value;
  return 0;
}
CUresult cuMemPoolDestroy(void* pool) { (void)pool; return 0; }
/* The pool: an arena handed out in order, which starts again once every block is back, so that
 * calls that take the same scratch get the same addresses (larger blocks come from malloc). */
#define NULL_ARENA_BYTES (16u << 20)
static unsigned char* g_arena;
static size_t g_arena_used, g_arena_blocks;
CUresult cuMemAllocFromPoolAsync(unsigned long long* pointer, size_t bytes, void* pool, void* stream) {
  (void)pool; (void)stream;
  const size_t rounded = (bytes + 255) / 256 * 256;
  if (!g_arena && posix_memalign((void**)&g_arena, 256, NULL_ARENA_BYTES) != 0) return 2;
  void* memory = NULL;
  if (rounded <= NULL_ARENA_BYTES - g_arena_used) {
    memory = g_arena + g_arena_used;
    g_arena_used += rounded ? rounded : 256;
    ++g_arena_blocks;
  } else if (posix_memalign(&memory, 256, bytes ? bytes : 1) != 0) {
    return 2; /* CUDA_ERROR_OUT_OF_MEMORY */
  }
  *pointer = (unsigned long long)(uintptr_t)memory;
  ++g_allocs;
  return 0;
}
CUresult cuMemFreeAsync(unsigned long long pointer, void* stream) {
  (void)stream;
  unsigned char* memory = (unsigned char*)(uintptr_t)pointer;
  if (g_arena && memory >= g_arena && memory < g_arena + NULL_ARENA_BYTES) {
    if (--g_arena_blocks == 0) g_arena_used = 0;
  } else {
    free(memory);
  }
  ++g_frees;
  return 0;
}
CUresult cuMemAlloc_v2(unsigned long long* pointer, size_t bytes) {
  void* memory = NULL;
  if (posix_memalign(&memory, 256, bytes ? bytes : 1) != 0) return 2;
  memset(memory, 0, bytes);
  *pointer = (unsigned long long)(uintptr_t)memory;
  return 0;
}
/* Fills and copies are done (device memory is host memory here), so that one aimed at the wrong
 * place shows in what it overwrites. */
CUresult cuMemsetD32Async(unsigned long long pointer, unsigned value, size_t count, void* stream) {
  (void)stream;
  unsigned* words = (unsigned*)(uintptr_t)pointer;
  for (size_t i = 0; i < count; ++i) words[i] = value;
  return 0;
}
CUresult cuMemcpyHtoDAsync_v2(unsigned long long to, const void* from, size_t bytes, void* stream) {
  (void)stream;
  memcpy((void*)(uintptr_t)to, from, bytes);
  return 0;
}
CUresult cuMemcpyDtoHAsync_v2(void* to, unsigned long long from, size_t bytes, void* stream) {
  (void)stream;
  memcpy(to, (const void*)(uintptr_t)from, bytes);
  return 0;
}
CUresult cuGetErrorString(CUresult status, const char** text) {
  *text = status == 0 ? "no error" : "null driver error";
  return 0;
}
CUresult cuTensorMapEncodeTiled(void* map, int data_type, unsigned rank, void* address, const uint64_t* sizes,
                                const uint64_t* strides, const unsigned* box, const unsigned* element_strides,
                                int interleave, int swizzle, int l2, int fill) {
  /* A digest of the arguments in each of the map's 16 words, so that a map encoded for other
   * arguments differs from it. */
  unsigned long long words[12 + 4 * 4] = {(unsigned long long)data_type, rank, (unsigned long long)(uintptr_t)address,
                                          (unsigned long long)interleave, (unsigned long long)swizzle,
                                          (unsigned long long)l2, (unsigned long long)fill};
  size_t n = 7;
  for (unsigned i = 0; i < rank && i < 4; ++i) {
    words[n++] = sizes[i];
    words[n++] = box[i];
    words[n++] = element_strides[i];
    if (i + 1 < rank) words[n++] = strides[i];
  }
  unsigned long long* out = (unsigned long long*)map;
  for (int w = 0; w < 16; ++w) {
    unsigned long long hash = 1469598103934665603ull + (unsigned long long)w;
    for (size_t i = 0; i < n; ++i) hash = (hash ^ words[i]) * 1099511628211ull;
    out[w] = hash;
  }
  ++g_encodes;
  return 0;
}
/* NVRTC asks the driver it finds for its private tables; a null driver has none (NVRTC
 * then compiles as it does on a machine without a driver). */
CUresult cuGetExportTable(const void** table, const void* id) {
  (void)id;
  *table = NULL;
  return 500; /* CUDA_ERROR_NOT_FOUND */
}
