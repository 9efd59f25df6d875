// flashjit as MLX primitives: attention forward (o, lse) and its fused backward
// (dq, dk, dv) are nodes of MLX's lazy graph, evaluated through flashjit's C API
// on a CPU stream or, where MLX runs on CUDA, on its GPU stream (eval_gpu). mx.grad / mx.vjp reach the backward through Forward::vjp;
// mx.compile sees both as ordinary primitives.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <typeinfo>
#include <variant>
#include <vector>

#include "flashjit/flashjit.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

#if FLASHJIT_MLX_CUDA
// MLX's CUDA backend is part of libmlx only where mlx-cuda is installed: every symbol of it
// that eval_gpu calls is referenced weakly, so that the module still loads beside mlx-cpu's
// libmlx (they are then null, cuda_available() is false and eval_gpu says what is missing).
// The rest of the backend it uses is inline in the headers (gpu_ptr, add_temporary, stream).
#include "cuda/driver.hpp"  // flashjit's device memory for the outputs (FLASHJIT_MLX_MEMORY=device)
#include "mlx/backend/cuda/allocator.h"
#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"
namespace mlx::core::cu {
__attribute__((weak)) CommandEncoder& get_command_encoder(Stream s);
}
// Member functions cannot be redeclared weak in C++: these declarations under their mangled
// names make the references weak, and let cuda_available() test each address (the compiler
// then knows it may be null).
extern "C" {
__attribute__((weak)) void flashjit_mlx_capture_begin() asm("_ZN3mlx4core2cu14CommandEncoder14CaptureContextC1ERS2_");
__attribute__((weak)) void flashjit_mlx_capture_end() asm("_ZN3mlx4core2cu14CommandEncoder14CaptureContextD1Ev");
__attribute__((weak)) void flashjit_mlx_set_input() asm("_ZN3mlx4core2cu14CommandEncoder15set_input_arrayERKNS0_5arrayE");
__attribute__((weak)) void flashjit_mlx_set_output() asm("_ZN3mlx4core2cu14CommandEncoder16set_output_arrayERKNS0_5arrayE");
// add_kernel_node_raw(CUfunction, dim3 grid, dim3 block, dim3 cluster, uint32_t smem, void** params)
__attribute__((weak)) void flashjit_mlx_add_kernel_node() asm(
    "_ZN3mlx4core2cu14CommandEncoder19add_kernel_node_rawEP9CUfunc_st4dim3S5_S5_jPPv");
}
#endif

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

constexpr const char* kOp = "[flashjit.mlx]";

struct Options {
  std::optional<double> scale;
  double softcap = 0.0;
  int causal = 0;  // fj_causal
  int64_t window_left = -1;
  int64_t window_right = -1;
  bool has_mask = false;
  double dropout_p = 0.0;  // > 0: an input after the mask holds the seed and offset as 4 uint32
  // A variable-length batch (fj_varlen): packed q, k, v [total, heads, dim], and the int32
  // offsets cu_seqlens_q, cu_seqlens_k as the two inputs after the tensors (no mask).
  bool varlen = false;
  int64_t max_seqlen_q = 0, max_seqlen_k = 0;
  // A KV cache (forward only, no dropout) of a variable-length batch: 1, the int32 key counts
  // (seqused_k) as a third input after the offsets; 2, pages: cu_seqlens_q, the counts and the
  // int32 page table [batch, max_pages] after the tensors (k, v pages [num_pages, page_size, H, D]).
  int kv_cache = 0;

  bool operator==(const Options& o) const {
    return scale == o.scale && softcap == o.softcap && causal == o.causal && window_left == o.window_left &&
           window_right == o.window_right && has_mask == o.has_mask && dropout_p == o.dropout_p &&
           varlen == o.varlen && max_seqlen_q == o.max_seqlen_q && max_seqlen_k == o.max_seqlen_k &&
           kv_cache == o.kv_cache;
  }
  // The integer arrays of a variable-length batch among a primitive's inputs.
  size_t varlen_inputs() const { return varlen ? (kv_cache != 0 ? 3 : 2) : 0; }
  // Where the mask and the dropout seed sit among a primitive's inputs, after `first` tensors.
  size_t mask_index(size_t first) const { return has_mask ? first : size_t(-1); }
  size_t rng_index(size_t first) const {
    return dropout_p > 0 ? first + varlen_inputs() + (has_mask ? 1 : 0) : size_t(-1);
  }
  // The offsets of a variable-length batch, from the primitive's input `first` on.
  fj_varlen varlen_of(const mx::array* offsets) const;
};

fj_dtype dtype_of(const mx::Dtype& dtype) {
  if (dtype == mx::float32) return FJ_FLOAT32;
  if (dtype == mx::float16) return FJ_FLOAT16;
  if (dtype == mx::bfloat16) return FJ_BFLOAT16;
  if (dtype == mx::float64) return FJ_FLOAT64;
  if (dtype == mx::bool_) return FJ_BOOL;
  if (dtype == mx::int32) return FJ_INT32;
  return FJ_INT64;  // any other dtype: rejected by check_inputs before a graph node is made
}

// Where an evaluated array's first element is for code on `device`. On MLX's CUDA backend
// array::data() is the host's view of the buffer (getting it may move the buffer to managed
// memory and wait for the device), so kernels take gpu_ptr: the buffer's device address plus
// the array's offset.
const void* address_of(const mx::array& a, [[maybe_unused]] const mx::Device& device) {
#if FLASHJIT_MLX_CUDA
  if (device == mx::Device::gpu) return mx::gpu_ptr<void>(a);
#endif
  return a.data<char>();
}

// An evaluated array; on MLX's GPU stream its memory is the CUDA device's.
fj_tensor tensor_of(const mx::array& a, const mx::Device& device = mx::Device::cpu) {
  fj_tensor t{};
  t.data = const_cast<void*>(address_of(a, device));
  t.dtype = dtype_of(a.dtype());
  t.device_type = device == mx::Device::gpu ? FJ_DEVICE_CUDA : FJ_DEVICE_CPU;
  t.device_index = device.index;
  t.ndim = int32_t(a.ndim());
  for (size_t d = 0; d < a.ndim(); ++d) {
    t.shape[d] = a.shape(int(d));
    t.strides[d] = a.strides()[d];
  }
  return t;
}

fj_varlen Options::varlen_of(const mx::array* offsets) const {
  fj_varlen out{};
  out.cu_seqlens_q = tensor_of(offsets[0]);
  if (kv_cache == 2) {  // pages: no key offsets
    out.seqused_k = tensor_of(offsets[1]);
    out.page_table = tensor_of(offsets[2]);
  } else {
    out.cu_seqlens_k = tensor_of(offsets[1]);
    if (kv_cache == 1) out.seqused_k = tensor_of(offsets[2]);
  }
  out.max_seqlen_q = max_seqlen_q;
  out.max_seqlen_k = max_seqlen_k;
  return out;
}

// The C API's options without the mask and the dropout seed.
fj_attention_options scalar_options(const Options& o) {
  fj_attention_options options = fj_attention_options_default();
  options.has_scale = o.scale.has_value();
  options.scale = o.scale.value_or(0.0);
  options.softcap = o.softcap;
  options.causal = fj_causal(o.causal);
  options.window_left = o.window_left;
  options.window_right = o.window_right;
  options.dropout_p = o.dropout_p;
  return options;
}

// The C API's options; `extra` are the primitive's inputs from the mask on (mask, then rng).
fj_attention_options options_of(const Options& o, const mx::array* extra, const mx::Device& device = mx::Device::cpu) {
  fj_attention_options options = scalar_options(o);
  if (o.has_mask) options.mask = tensor_of(*extra++, device);
  if (o.dropout_p > 0) {
    // On the GPU stream the kernels read the words where MLX computed them, when they run
    // (a drawn seed is not computed yet when the call is recorded).
    if (device == mx::Device::gpu) {
      options.dropout_seed_words = address_of(*extra, device);
      return options;
    }
    const uint32_t* words = extra->data<uint32_t>();  // seed (low, high), offset (low, high)
    options.dropout_seed = uint64_t(words[0]) | (uint64_t(words[1]) << 32);
    options.dropout_offset = uint64_t(words[2]) | (uint64_t(words[3]) << 32);
  }
  return options;
}

void check(fj_status status) {
  if (status != FJ_SUCCESS) throw std::runtime_error(fj_last_error());
}


// Whether eval_gpu can run: built against MLX's CUDA headers, and libmlx has every symbol of
// the CUDA backend that it calls.
bool cuda_available() {
#if FLASHJIT_MLX_CUDA
  return &mx::cu::get_command_encoder != nullptr && &flashjit_mlx_capture_begin != nullptr &&
         &flashjit_mlx_capture_end != nullptr && &flashjit_mlx_set_input != nullptr &&
         &flashjit_mlx_set_output != nullptr;
#else
  return false;
#endif
}

// Allocates the outputs and enqueues call(inputs, outputs) on the stream's CPU encoder. The task
// holds the arrays, so their memory lives until it has run.
template <typename Call>
void enqueue(const mx::Stream& stream, const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs,
             Call call) {
  for (mx::array& x : outputs) x.set_data(mx::allocator::malloc(x.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const mx::array& x : inputs) encoder.set_input_array(x);
  for (mx::array& x : outputs) encoder.set_output_array(x);
  encoder.dispatch([inputs, outputs, call]() mutable { check(call(inputs, outputs)); });
}

// An environment variable of two values: false for `off` (also unset or empty), true for `on`;
// another value raises ValueError naming the variable.
[[maybe_unused]] bool environment_switch(const char* name, const char* off, const char* on) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0' || std::strcmp(value, off) == 0) return false;
  if (std::strcmp(value, on) == 0) return true;
  throw std::invalid_argument(std::string(kOp) + " " + name + ": expected " + off + " or " + on + ", got '" + value +
                              "'");
}

// How eval_gpu records flashjit's kernels into MLX's command encoder: by stream capture (unset or
// `capture`: the kernels launched on the encoder's stream while it captures, the captured graph
// added as a child node), or (`nodes`) each kernel added as a kernel node of the encoder's graph
// through fj_attention_options.launch, without a capture (where libmlx exports the encoder's
// add_kernel_node_raw; else by capture).
[[maybe_unused]] bool mlx_launch_nodes() { return environment_switch("FLASHJIT_MLX_LAUNCH", "capture", "nodes"); }

#if FLASHJIT_MLX_CUDA
// fj_attention_options.launch for FLASHJIT_MLX_LAUNCH=nodes: each kernel a node of the encoder's
// graph. MLX makes a node depend on the last writers of the arrays declared before it, and a node
// uses those declarations up, so each kernel after the first declares the call's outputs and
// workspace again (written by the kernel before): it then comes after that one.
std::atomic<int64_t> kernel_nodes{0};  // added so (kernel_node_count())
struct NodeLauncher {
  mx::cu::CommandEncoder* encoder;
  std::vector<mx::array>* outputs;
  const mx::array* workspace;
  int kernels = 0;
  std::string error;
};

int add_kernel_node(void* data, void* function, const unsigned grid[3], const unsigned block[3],
                    unsigned shared_bytes, void** arguments) {
  auto& launcher = *static_cast<NodeLauncher*>(data);
  try {
    if (launcher.kernels++ > 0) {
      for (mx::array& x : *launcher.outputs) launcher.encoder->set_output_array(x);
      launcher.encoder->set_output_array(*launcher.workspace);
    }
    launcher.encoder->add_kernel_node_raw(static_cast<CUfunction>(function), dim3(grid[0], grid[1], grid[2]),
                                          dim3(block[0], block[1], block[2]), dim3(0, 0, 0), shared_bytes, arguments);
    ++kernel_nodes;
    return 0;
  } catch (const std::exception& e) {
    launcher.error = e.what();
    return 1;
  }
}
#endif

// Where eval_gpu's outputs and workspace live (FLASHJIT_MLX_MEMORY). `device` (unset): flashjit's
// device memory (allocate_array_memory), in buffers whose deleter gives it back; counted by
// device_memory(). `allocator`: MLX's allocator's memory (mx::allocator::malloc: managed memory;
// its cache is shared with MLX's own device buffers, and a device buffer it hands back for such a
// request is first moved to managed memory by a copy that waits for the device: in LoRA steps on
// an H100 this made steps 13-19% slower than device memory).
[[maybe_unused]] bool mlx_device_memory() { return !environment_switch("FLASHJIT_MLX_MEMORY", "device", "allocator"); }

#if FLASHJIT_MLX_CUDA
// MLX data of flashjit's device memory on `device_index`, allocated in `stream`'s order. MLX reads
// such a buffer as its own device buffers (cu::CudaBuffer, device >= 0); reading it on the host
// (Buffer::raw_ptr) moves it to MLX's managed (or pinned host) memory, which the deleter then
// frees as MLX would. No bytes: no memory (device -1, as MLX's own empty buffers).
mx::allocator::Data device_data(size_t bytes, cudaStream_t stream, int device_index) {
  if (bytes == 0) {
    return mx::allocator::Data(mx::allocator::Buffer(new mx::cu::CudaBuffer{nullptr, 0, -1}),
                               [](mx::allocator::Buffer buffer) { delete static_cast<mx::cu::CudaBuffer*>(buffer.ptr()); });
  }
  void* data = flashjit::cuda::allocate_array_memory(bytes, reinterpret_cast<flashjit::cuda::CUstream>(stream),
                                                     device_index);
  return mx::allocator::Data(mx::allocator::Buffer(new mx::cu::CudaBuffer{data, bytes, device_index}),
                             [device_index](mx::allocator::Buffer buffer) {
                               auto* held = static_cast<mx::cu::CudaBuffer*>(buffer.ptr());
                               if (held->device >= 0) {
                                 flashjit::cuda::release_array_memory(held->data, held->size, held->device);
                               } else {  // moved by a host read: MLX's memory now
                                 flashjit::cuda::release_moved_array_memory(held->data, held->size, device_index);
                               }
                               delete held;
                             });
}
#endif

// The workspace's shape: rows of 256 bytes (MLX's workspace alignment; one dim of bytes would
// overflow int32 above 2 GiB).
[[maybe_unused]] mx::Shape workspace_shape(size_t bytes) {
  constexpr size_t row = 256;
  return {int((std::max<size_t>(bytes, 1) + row - 1) / row), int(row)};
}

// The host time eval_gpu spends in enqueue_cuda (eval_gpu_host_time()): calls, their whole time
// and the prepare pass's share, in nanoseconds, so that a benchmark can tell flashjit's own host
// work a call from MLX's around it.
std::atomic<int64_t> host_calls{0}, host_ns{0}, host_prepare_ns{0}, host_alloc_ns{0};
struct HostTime {
  using Clock = std::chrono::steady_clock;
  Clock::time_point start = Clock::now();
  ~HostTime() {
    host_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
    ++host_calls;
  }
};

// Allocates the outputs and records call(inputs, outputs, cuda_options) into the GPU stream's
// command encoder: prepare(..., &bytes) first compiles and loads the kernels (nothing may compile
// while the encoder captures) and sizes the scratch, which the call then takes from an array the
// encoder keeps until the work is done (no memory nodes in the captured graph). The outputs and
// the workspace take flashjit's device memory (device_data), or with FLASHJIT_MLX_MEMORY=allocator
// mx::allocator::malloc's memory, managed memory on CUDA: MLX's own kernels take device memory
// from cu::malloc_async, which libmlx does not export, and arrays made by MLX's ops and taken over
// as outputs measured slower on an H100 (bench/results/h100-mlx-2026-12-06-bdbfc6d.md). A failed call's capture is discarded and its
// error thrown once the capture has ended, so the stream leaves capture mode and no partial graph
// joins the encoder's.
template <typename Call>
void enqueue_cuda(const mx::Stream& stream, const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs,
                  Call call) {
#if FLASHJIT_MLX_CUDA
  const HostTime timed;
  if (!cuda_available()) {
    throw std::runtime_error(std::string(kOp) + " this libmlx has no CUDA backend (pip install \"mlx[cuda13]\")");
  }
  const bool nodes = mlx_launch_nodes() && &flashjit_mlx_add_kernel_node != nullptr;  // a bad value: nothing done
  const bool device_memory = mlx_device_memory();
  auto& encoder = mx::cu::get_command_encoder(stream);
  // Memory for an output or the workspace, its host time counted (host_alloc_ns).
  const auto take_memory = [&](mx::array& x) {
    const auto start = HostTime::Clock::now();
    if (device_memory) {
      x.set_data(device_data(x.nbytes(), encoder.stream(), stream.device.index));
    } else {
      x.set_data(mx::allocator::malloc(x.nbytes()));
    }
    host_alloc_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(HostTime::Clock::now() - start).count();
  };
  for (mx::array& x : outputs) {
    take_memory(x);
    // Held by the encoder until the work is done (MLX keeps a node's inputs so, not its outputs):
    // an output of flashjit's memory dropped early would otherwise give it back, in no stream's
    // order, while the kernels still write it.
    if (device_memory) encoder.add_temporary(x);
  }
  fj_attention_options cuda{};
  size_t bytes = 0;
  const auto prepare_start = HostTime::Clock::now();
  check(call(inputs, outputs, cuda, &bytes));  // prepare: cuda.stream unset, nothing enqueued
  host_prepare_ns +=
      std::chrono::duration_cast<std::chrono::nanoseconds>(HostTime::Clock::now() - prepare_start).count();
  mx::array workspace(workspace_shape(bytes), mx::uint8, nullptr, {});
  take_memory(workspace);
  encoder.add_temporary(workspace);
  for (const mx::array& x : inputs) encoder.set_input_array(x);
  for (mx::array& x : outputs) encoder.set_output_array(x);
  cuda.stream = static_cast<cudaStream_t>(encoder.stream());
  cuda.workspace = mx::gpu_ptr<void>(workspace);
  cuda.workspace_bytes = bytes;
  if (nodes) {
    // Every kernel writes the workspace: declared an output here, and again before each later
    // kernel (add_kernel_node).
    NodeLauncher launcher{&encoder, &outputs, &workspace};
    encoder.set_output_array(workspace);
    cuda.launch = add_kernel_node;
    cuda.launch_data = &launcher;
    const fj_status status = call(inputs, outputs, cuda, nullptr);
    if (!launcher.error.empty()) throw std::runtime_error(std::string(kOp) + " " + launcher.error);
    check(status);
    return;
  }
  std::exception_ptr error;
  {
    auto capture = encoder.capture_context();
    try {
      check(call(inputs, outputs, cuda, nullptr));
    } catch (...) {
      error = std::current_exception();
      capture.discard = true;
    }
  }
  if (error) std::rethrow_exception(error);
#else
  (void)stream, (void)inputs, (void)outputs, (void)call;
  throw std::runtime_error(std::string(kOp) + " was built without MLX's CUDA headers: run it on a cpu stream");
#endif
}

// What both primitives share: their options and equivalence for mx.compile.
class Node : public mx::Primitive {
 public:
  Node(mx::Stream stream, Options options) : mx::Primitive(stream), options_(options) {}

  bool is_equivalent(const mx::Primitive& other) const override {
    return typeid(other) == typeid(*this) && static_cast<const Node&>(other).options_ == options_;
  }

 protected:
  Options options_;
};

// o [B, Hq, Sq, Dv] and lse [B, Hq, Sq] over q, k, v; packed (3-dim q): o [total_q, Hq, Dv]
// and lse [Hq, total_q].
std::vector<mx::Shape> forward_shapes(const std::vector<mx::array>& inputs) {
  const mx::array& q = inputs[0];
  const mx::array& v = inputs[2];  // packed [total_k, H, Dv], or a KV cache's pages [pages, page_size, H, Dv]
  if (q.ndim() == 3) return {{q.shape(0), q.shape(1), v.shape(v.ndim() - 1)}, {q.shape(1), q.shape(0)}};
  mx::Shape o = q.shape();
  o[3] = inputs[2].shape(3);
  mx::Shape lse = q.shape();
  lse.pop_back();
  return {o, lse};
}

class Forward : public Node {
 public:
  using Node::Node;

  // inputs: q, k, v[, mask | cu_seqlens_q, cu_seqlens_k][, rng]; outputs: o, lse.
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    enqueue(stream(), inputs, outputs, [options = options_](auto& in, auto& out) {
      const fj_tensor q = tensor_of(in[0]), k = tensor_of(in[1]), v = tensor_of(in[2]);
      fj_tensor o = tensor_of(out[0]), lse = tensor_of(out[1]);
      if (options.varlen) {
        const fj_varlen varlen = options.varlen_of(in.data() + 3);
        const fj_attention_options opts = options_of(options, in.data() + 3 + options.varlen_inputs());
        return fj_attention_varlen_forward(&q, &k, &v, &varlen, &opts, &o, &lse);
      }
      const fj_attention_options opts = options_of(options, in.data() + 3);
      return fj_attention_forward(&q, &k, &v, &opts, &o, &lse);
    });
  }

  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    if (options_.varlen) throw std::runtime_error(std::string(kOp) + " varlen_attention runs on a cpu stream only");
    const mx::Device device = stream().device;
    enqueue_cuda(stream(), inputs, outputs,
                 [&, options = options_](auto& in, auto& out, const fj_attention_options& cuda, size_t* bytes) {
      const fj_tensor q = tensor_of(in[0], device), k = tensor_of(in[1], device), v = tensor_of(in[2], device);
      fj_tensor o = tensor_of(out[0], device), lse = tensor_of(out[1], device);
      fj_attention_options opts = options_of(options, in.data() + 3, device);
      opts.stream = cuda.stream, opts.workspace = cuda.workspace, opts.workspace_bytes = cuda.workspace_bytes;
      opts.launch = cuda.launch, opts.launch_data = cuda.launch_data;
      return bytes ? fj_attention_prepare_forward(&q, &k, &v, &opts, &o, &lse, bytes)
                   : fj_attention_forward(&q, &k, &v, &opts, &o, &lse);
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;

  std::pair<std::vector<mx::array>, std::vector<int>> vmap(const std::vector<mx::array>& inputs,
                                                           const std::vector<int>& axes) override;

  const char* name() const override { return "FlashjitAttention"; }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return forward_shapes(inputs);
  }
};

class Backward : public Node {
 public:
  using Node::Node;

  // inputs: q, k, v, o, lse, dout[, mask | cu_seqlens_q, cu_seqlens_k][, rng]; outputs: dq, dk, dv.
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    enqueue(stream(), inputs, outputs, [options = options_](auto& in, auto& out) {
      fj_tensor t[6];
      for (int i = 0; i < 6; ++i) t[i] = tensor_of(in[i]);
      fj_tensor dq = tensor_of(out[0]), dk = tensor_of(out[1]), dv = tensor_of(out[2]);
      if (options.varlen) {
        const fj_varlen varlen = options.varlen_of(in.data() + 6);
        const fj_attention_options opts = options_of(options, in.data() + 6 + options.varlen_inputs());
        return fj_attention_varlen_backward(&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &varlen, &opts, &dq, &dk,
                                            &dv);
      }
      const fj_attention_options opts = options_of(options, in.data() + 6);
      return fj_attention_backward(&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &opts, &dq, &dk, &dv);
    });
  }

  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    if (options_.varlen) throw std::runtime_error(std::string(kOp) + " varlen_attention runs on a cpu stream only");
    const mx::Device device = stream().device;
    enqueue_cuda(stream(), inputs, outputs,
                 [&, options = options_](auto& in, auto& out, const fj_attention_options& cuda, size_t* bytes) {
      fj_tensor t[6];
      for (int i = 0; i < 6; ++i) t[i] = tensor_of(in[i], device);
      fj_tensor dq = tensor_of(out[0], device), dk = tensor_of(out[1], device), dv = tensor_of(out[2], device);
      fj_attention_options opts = options_of(options, in.data() + 6, device);
      opts.stream = cuda.stream, opts.workspace = cuda.workspace, opts.workspace_bytes = cuda.workspace_bytes;
      opts.launch = cuda.launch, opts.launch_data = cuda.launch_data;
      return bytes ? fj_attention_prepare_backward(&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &opts, &dq, &dk, &dv,
                                                   bytes)
                   : fj_attention_backward(&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &opts, &dq, &dk, &dv);
    });
  }

  const char* name() const override { return "FlashjitAttentionBackward"; }

  std::pair<std::vector<mx::array>, std::vector<int>> vmap(const std::vector<mx::array>& inputs,
                                                           const std::vector<int>& axes) override;

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape(), inputs[1].shape(), inputs[2].shape()};
  }
};

// The graph nodes of the two primitives over their inputs (see eval_cpu).
std::vector<mx::array> forward_node(const mx::Stream& stream, const Options& options,
                                    const std::vector<mx::array>& inputs) {
  const mx::Dtype dtype = inputs[0].dtype();
  return mx::array::make_arrays(forward_shapes(inputs),
                                {dtype, dtype == mx::float64 ? mx::float64 : mx::float32},
                                std::make_shared<Forward>(stream, options), inputs);
}

std::vector<mx::array> backward_node(const mx::Stream& stream, const Options& options,
                                     const std::vector<mx::array>& inputs) {
  return mx::array::make_arrays({inputs[0].shape(), inputs[1].shape(), inputs[2].shape()},
                                {inputs[0].dtype(), inputs[1].dtype(), inputs[2].dtype()},
                                std::make_shared<Backward>(stream, options), inputs);
}

mx::Stream cpu_stream() {
  return mx::default_stream(mx::Device(mx::Device::cpu));
}

// Row-contiguous on `stream` (a no-op node for arrays that already are).
mx::array rows(const mx::array& x, const mx::Stream& stream) {
  return mx::contiguous(x, false, stream);
}

// vmap: the mapped axis of each input becomes part of its batch dim (dim 0), so one
// call covers the whole map; inputs without the axis are broadcast over it (a mask of
// batch 1, at mask_index, stays batch 1). The outputs come back split as (V, B, ...).
std::pair<std::vector<mx::array>, std::vector<int>> vmap_through_batch(
    const mx::Stream& stream, const std::vector<mx::array>& inputs, const std::vector<int>& axes, size_t mask_index,
    size_t rng_index,
    const std::function<std::vector<mx::array>(const std::vector<mx::array>&)>& apply) {
  int width = 1;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (axes[i] >= 0) width = inputs[i].shape(axes[i]);
  }
  // The batch of one map item: q's (input 0), without the mapped axis.
  const int batch = axes[0] == 0 ? inputs[0].shape(1) : inputs[0].shape(0);
  std::vector<mx::array> merged;
  for (size_t i = 0; i < inputs.size(); ++i) {
    mx::array x = inputs[i];
    if (i == rng_index) {  // one seed for the whole map: the merged batch draws distinct elements
      if (axes[i] >= 0) throw std::invalid_argument(std::string(kOp) + " vmap over the dropout seed");
      merged.push_back(x);
      continue;
    }
    if (axes[i] >= 0) {
      x = mx::moveaxis(x, axes[i], 0, stream);
      if (x.shape(1) != batch) {  // a mapped mask of batch 1: its batch broadcast before merging
        mx::Shape shape = x.shape();
        shape[1] = batch;
        x = mx::broadcast_to(x, shape, stream);
      }
    } else if (i == mask_index && x.shape(0) == 1) {
      merged.push_back(x);
      continue;
    } else {
      mx::Shape shape = x.shape();
      shape.insert(shape.begin(), width);
      x = mx::broadcast_to(mx::expand_dims(x, 0, stream), shape, stream);
    }
    mx::Shape shape(x.shape().begin() + 1, x.shape().end());
    shape[0] *= width;
    merged.push_back(rows(mx::reshape(x, shape, stream), stream));
  }
  std::vector<mx::array> outputs = apply(merged);
  for (mx::array& out : outputs) {
    mx::Shape shape = out.shape();
    shape[0] /= width;
    shape.insert(shape.begin(), width);
    out = mx::reshape(out, shape, stream);
  }
  return {outputs, std::vector<int>(outputs.size(), 0)};
}

std::vector<mx::array> Forward::vjp(const std::vector<mx::array>& primals,
                                    const std::vector<mx::array>& cotangents, const std::vector<int>& argnums,
                                    const std::vector<mx::array>& outputs) {
  if (options_.kv_cache != 0) {
    throw std::invalid_argument(std::string(kOp) + " attention_with_kvcache is not differentiable (a cache is for "
                                "inference)");
  }
  // lse is not differentiable: its cotangent is ignored.
  std::vector<mx::array> inputs = {primals[0], primals[1], primals[2],
                                   outputs[0], outputs[1], rows(cotangents[0], stream())};
  for (size_t i = 3; i < primals.size(); ++i) inputs.push_back(primals[i]);  // mask, dropout seed
  const std::vector<mx::array> grads = backward_node(stream(), options_, inputs);
  std::vector<mx::array> out;
  for (int arg : argnums) {
    if (arg < 3) {
      out.push_back(grads[arg]);
    } else {  // no gradient flows into the mask or the seed
      out.push_back(mx::zeros_like(primals[arg], stream()));
    }
  }
  return out;
}

std::pair<std::vector<mx::array>, std::vector<int>> Forward::vmap(const std::vector<mx::array>& inputs,
                                                                  const std::vector<int>& axes) {
  if (options_.varlen) throw std::invalid_argument(std::string(kOp) + " vmap over a variable-length batch");
  return vmap_through_batch(stream(), inputs, axes, options_.mask_index(3), options_.rng_index(3),
                            [this](const auto& merged) { return forward_node(stream(), options_, merged); });
}

std::pair<std::vector<mx::array>, std::vector<int>> Backward::vmap(const std::vector<mx::array>& inputs,
                                                                   const std::vector<int>& axes) {
  if (options_.varlen) throw std::invalid_argument(std::string(kOp) + " vmap over a variable-length batch");
  return vmap_through_batch(stream(), inputs, axes, options_.mask_index(6), options_.rng_index(6),
                            [this](const auto& merged) { return backward_node(stream(), options_, merged); });
}

[[noreturn]] void bad(const std::string& message) {
  throw std::invalid_argument(std::string(kOp) + " " + message);
}

// An array as the C API describes it, without memory (lazy arrays have none yet):
// row-major strides, as rows() makes them before a call.
fj_tensor describe(const mx::array& x) {
  fj_tensor t{};
  t.dtype = dtype_of(x.dtype());
  t.device_type = FJ_DEVICE_CPU;
  t.ndim = int32_t(std::min<size_t>(x.ndim(), FJ_MAX_DIMS));
  int64_t stride = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    t.shape[d] = x.shape(d);
    t.strides[d] = stride;
    stride *= std::max<int64_t>(1, t.shape[d]);
  }
  return t;
}

// The inputs and options checked by the C API (fj_attention_check_forward), whose
// errors name the argument; dtypes the C API has no code for are named here.
void check_inputs(const mx::array& q, const mx::array& k, const mx::array& v, const std::optional<mx::array>& mask,
                  const Options& o) {
  const std::pair<const char*, const mx::array*> named[] = {{"q", &q}, {"k", &k}, {"v", &v}};
  for (const auto& [name, x] : named) {
    const fj_dtype dtype = dtype_of(x->dtype());
    if (dtype != FJ_FLOAT32 && dtype != FJ_FLOAT16 && dtype != FJ_BFLOAT16 && dtype != FJ_FLOAT64) {
      bad(std::string(name) + ": expected float32, float16, bfloat16 or float64");
    }
  }
  if (mask && mask->dtype() != mx::bool_ && dtype_of(mask->dtype()) == FJ_INT64) {
    bad("mask: expected bool (True = attend) or an additive float32 or q-dtype mask");
  }
  const fj_tensor tq = describe(q), tk = describe(k), tv = describe(v);
  fj_tensor to = tq, tlse = tq;
  if (q.ndim() == 4 && v.ndim() == 4) {  // o [B, Hq, Sq, Dv], lse [B, Hq, Sq]: other ranks fail on q first
    to.shape[3] = v.shape(3);
    to.strides[2] = v.shape(3);
    to.strides[1] = to.strides[2] * q.shape(2);
    to.strides[0] = to.strides[1] * q.shape(1);
    tlse.ndim = 3;
    tlse.dtype = tq.dtype == FJ_FLOAT64 ? FJ_FLOAT64 : FJ_FLOAT32;
    tlse.strides[2] = 1;
    tlse.strides[1] = q.shape(2);
    tlse.strides[0] = int64_t(q.shape(1)) * q.shape(2);
  }
  fj_attention_options options = scalar_options(o);
  if (mask) options.mask = describe(*mask);
  if (fj_attention_check_forward(&tq, &tk, &tv, &options, &to, &tlse) != FJ_SUCCESS) {
    std::string message = fj_last_error();
    const std::string prefix = "[attention] ";
    if (message.rfind(prefix, 0) == 0) message = message.substr(prefix.size());
    bad(message);
  }
}

// Where a call's nodes may go: a stream, or a device (its default stream).
using Target = std::optional<std::variant<mx::Stream, mx::Device>>;

// The stream a call's nodes go to: the one given, the given device's default stream (a GPU
// of any index), or by default the CPU's. A GPU is checked before MLX is asked for its stream,
// so that mlx-cpu's libmlx gets flashjit's error, which says what is missing.
mx::Stream target_stream(const Target& target) {
  if (!target) return cpu_stream();
  const mx::Stream* stream = std::get_if<mx::Stream>(&*target);
  const mx::Device device = stream ? stream->device : std::get<mx::Device>(*target);
  if (device == mx::Device::gpu && !cuda_available()) {
    bad("gpu: MLX's GPU stream needs flashjit built against MLX's CUDA headers and mlx-cuda");
  }
  return stream ? *stream : mx::default_stream(device);
}

std::tuple<mx::array, mx::array> attention(const mx::array& q, const mx::array& k, const mx::array& v,
                                           std::optional<mx::array> mask, std::optional<double> scale,
                                           double softcap, int causal, int64_t window_left,
                                           int64_t window_right, double dropout_p,
                                           std::optional<mx::array> rng, const Target& target) {
  Options options{scale, softcap, causal, window_left, window_right, mask.has_value(), dropout_p};
  const mx::Stream stream = target_stream(target);
  check_inputs(q, k, v, mask, options);
  if (dropout_p > 0 && (!rng || rng->dtype() != mx::uint32 || rng->ndim() != 1 || rng->shape(0) != 4)) {
    bad("rng: expected 4 uint32 (seed low, high, offset low, high) with dropout");
  }
  if (causal != 0) options.window_right = 0;
  std::vector<mx::array> inputs = {rows(q, stream), rows(k, stream), rows(v, stream)};
  if (mask) inputs.push_back(rows(*mask, stream));  // the C API takes no negative strides
  if (dropout_p > 0) inputs.push_back(rows(*rng, stream));
  const std::vector<mx::array> out = forward_node(stream, options, inputs);
  return {out[0], out[1]};
}

// Packed q [total_q, Hq, D], k, v [total_k, Hkv, D(v)] and the int32 offsets (evaluated here:
// the C API checks their values before a node is made, so the node's call cannot fail).
// With seqused_k (the keys each sequence uses) the keys are a KV cache, forward only: packed rows
// at cu_seqlens_k, or with page_table (cu_seqlens_k None) pages [num_pages, page_size, Hkv, D].
std::tuple<mx::array, mx::array> varlen_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                                                  mx::array cu_seqlens_q, std::optional<mx::array> cu_seqlens_k,
                                                  int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                  std::optional<double> scale, double softcap, int causal,
                                                  int64_t window_left, int64_t window_right, double dropout_p,
                                                  std::optional<mx::array> rng, std::optional<mx::array> seqused_k,
                                                  std::optional<mx::array> page_table) {
  Options options{scale, softcap, causal, window_left, window_right, false, dropout_p};
  options.varlen = true;
  options.max_seqlen_q = max_seqlen_q;
  options.max_seqlen_k = max_seqlen_k;
  options.kv_cache = page_table ? 2 : seqused_k ? 1 : 0;
  if (page_table && (!seqused_k || cu_seqlens_k)) bad("page_table: needs seqused_k and no cu_seqlens_k");
  if (!page_table && !cu_seqlens_k) bad("cu_seqlens_k: required without a page table");
  if (options.kv_cache != 0 && dropout_p > 0) bad("dropout_p: a KV cache's attention takes no dropout");
  const std::pair<const char*, const mx::array*> named[] = {{"q", &q}, {"k", &k}, {"v", &v}};
  for (const auto& [name, x] : named) {
    const fj_dtype dtype = dtype_of(x->dtype());
    if (dtype != FJ_FLOAT32 && dtype != FJ_FLOAT16 && dtype != FJ_BFLOAT16 && dtype != FJ_FLOAT64) {
      bad(std::string(name) + ": expected float32, float16, bfloat16 or float64");
    }
  }
  // The integer arrays after the tensors, in the order the node takes them (Options::varlen_of),
  // evaluated here: the C API checks their values before a node is made.
  std::vector<mx::array> arrays = {rows(mx::astype(cu_seqlens_q, mx::int32, cpu_stream()), cpu_stream())};
  for (const std::optional<mx::array>* x : {&cu_seqlens_k, &seqused_k, &page_table}) {
    if (*x) arrays.push_back(rows(mx::astype(**x, mx::int32, cpu_stream()), cpu_stream()));
  }
  mx::eval(arrays);
  const fj_tensor tq = describe(q), tk = describe(k), tv = describe(v);
  fj_tensor to = tq, tlse = tq;
  const int dim_v = v.ndim() > 0 ? v.shape(v.ndim() - 1) : 0;
  if (q.ndim() == 3 && v.ndim() >= 3) {  // o [total_q, Hq, Dv], lse [Hq, total_q]: other ranks fail on q first
    to.shape[2] = dim_v;
    to.strides[1] = dim_v;
    to.strides[0] = to.strides[1] * q.shape(1);
    tlse.ndim = 2;
    tlse.dtype = tq.dtype == FJ_FLOAT64 ? FJ_FLOAT64 : FJ_FLOAT32;
    tlse.shape[0] = q.shape(1), tlse.shape[1] = q.shape(0);
    tlse.strides[0] = q.shape(0), tlse.strides[1] = 1;
  }
  const fj_attention_options scalars = scalar_options(options);
  const fj_varlen varlen = options.varlen_of(arrays.data());
  if (fj_attention_varlen_check_forward(&tq, &tk, &tv, &varlen, &scalars, &to, &tlse) != FJ_SUCCESS) {
    std::string message = fj_last_error();
    const std::string prefix = "[varlen_attention] ";
    if (message.rfind(prefix, 0) == 0) message = message.substr(prefix.size());
    bad(message);
  }
  if (dropout_p > 0 && (!rng || rng->dtype() != mx::uint32 || rng->ndim() != 1 || rng->shape(0) != 4)) {
    bad("rng: expected 4 uint32 (seed low, high, offset low, high) with dropout");
  }
  if (causal != 0) options.window_right = 0;
  std::vector<mx::array> inputs = {rows(q, cpu_stream()), rows(k, cpu_stream()), rows(v, cpu_stream())};
  inputs.insert(inputs.end(), arrays.begin(), arrays.end());
  if (dropout_p > 0) inputs.push_back(rows(*rng, cpu_stream()));
  const std::vector<mx::array> out = forward_node(cpu_stream(), options, inputs);
  return {out[0], out[1]};
}

}  // namespace

NB_MODULE(_mlx, m) {
  m.doc() = "flashjit attention as MLX primitives (CPU streams; MLX's GPU stream where MLX runs on CUDA)";
  nb::module_::import_("mlx.core");  // registers mlx.core.array with nanobind
  m.def("attention", &attention, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("mask").none(),
        nb::arg("scale").none(), nb::arg("softcap"), nb::arg("causal"), nb::arg("window_left"),
        nb::arg("window_right"), nb::arg("dropout_p"), nb::arg("rng").none(), nb::arg("stream").none() = nb::none(),
        "o, lse: lazy MLX arrays from the flashjit attention primitive on `stream` (an mx.Stream, or an mx.Device "
        "for its default stream; None: the CPU's); "
        "differentiable through q, k, v.");
  m.def(
      "eval_gpu_host_time",
      [] {
        nb::dict result;
        result["calls"] = host_calls.load();
        result["seconds"] = double(host_ns.load()) * 1e-9;
        result["prepare_seconds"] = double(host_prepare_ns.load()) * 1e-9;
        result["alloc_seconds"] = double(host_alloc_ns.load()) * 1e-9;
        return result;
      },
      "Host time of the primitives' eval_gpu since the module loaded: calls, their whole time in seconds "
      "(outputs and workspace allocated, the prepare pass, the kernels recorded into MLX's graph), the "
      "prepare pass's share and the allocations' share; zeros where nothing ran on a GPU stream.");
  m.def(
      "device_memory",
      [](bool reset_peak) {
        nb::dict result;
#if FLASHJIT_MLX_CUDA
        const flashjit::cuda::ArrayMemory now = flashjit::cuda::array_memory();
        result["active"] = now.active;
        result["peak"] = now.peak;
        if (reset_peak) flashjit::cuda::reset_array_memory_peak();
#else
        (void)reset_peak;
        result["active"] = size_t(0);
        result["peak"] = size_t(0);
#endif
        return result;
      },
      nb::arg("reset_peak") = false,
      "Bytes of flashjit's device memory held by MLX arrays (on a GPU stream, unless FLASHJIT_MLX_MEMORY=allocator): "
      "now (active) and at "
      "most since the last reset (peak); reset_peak=True then starts the peak again from the active bytes.");
  m.def(
      "kernel_node_count",
      [] {
#if FLASHJIT_MLX_CUDA
        return kernel_nodes.load();
#else
        return int64_t(0);
#endif
      },
      "Kernels added to MLX's graph as kernel nodes (FLASHJIT_MLX_LAUNCH=nodes) since the module loaded.");
  m.def("cuda_available", &cuda_available,
        "Whether the primitives can run on MLX's GPU stream: built against MLX's CUDA headers, and the loaded "
        "libmlx has MLX's CUDA backend (mlx-cuda).");
  m.def("varlen_attention", &varlen_attention, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("cu_seqlens_q"),
        nb::arg("cu_seqlens_k").none(), nb::arg("max_seqlen_q"), nb::arg("max_seqlen_k"), nb::arg("scale").none(),
        nb::arg("softcap"), nb::arg("causal"), nb::arg("window_left"), nb::arg("window_right"),
        nb::arg("dropout_p"), nb::arg("rng").none(), nb::arg("seqused_k").none() = nb::none(),
        nb::arg("page_table").none() = nb::none(),
        "o [total_q, Hq, Dv], lse [Hq, total_q]: the primitive over a packed variable-length batch (with "
        "seqused_k: a KV cache, in pages with page_table).");
}
