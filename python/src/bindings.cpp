// nanobind module over the C API. Tensors arrive through DLPack (numpy arrays,
// torch tensors, anything exporting __dlpack__) without a copy; statuses become
// Python exceptions.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cstring>
#include <optional>
#include <string>

#include "flashjit/flashjit.h"

namespace nb = nanobind;

namespace {

using Array = nb::ndarray<nb::ro>;
using OutArray = nb::ndarray<>;

[[noreturn]] void raise_status(fj_status status) {
  const std::string message = fj_last_error();
  switch (status) {
    case FJ_ERROR_INVALID_VALUE: throw nb::value_error(message.c_str());
    case FJ_ERROR_INVALID_TYPE: throw nb::type_error(message.c_str());
    case FJ_ERROR_UNSUPPORTED: PyErr_SetString(PyExc_NotImplementedError, message.c_str()); break;
    case FJ_ERROR_OUT_OF_MEMORY: PyErr_SetString(PyExc_MemoryError, message.c_str()); break;
    default: PyErr_SetString(PyExc_RuntimeError, message.c_str()); break;
  }
  throw nb::python_error();
}

std::string dlpack_dtype_name(nb::dlpack::dtype dtype) {
  static const char* const kCodes[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
  const char* code = dtype.code < 7 ? kCodes[dtype.code] : "unknown";
  return std::string(code) + std::to_string(dtype.bits);
}

fj_dtype to_fj_dtype(const char* op, const char* name, nb::dlpack::dtype dtype) {
  using Code = nb::dlpack::dtype_code;
  const auto code = Code(dtype.code);
  if (dtype.lanes == 1) {
    if (code == Code::Float && dtype.bits == 32) return FJ_FLOAT32;
    if (code == Code::Float && dtype.bits == 16) return FJ_FLOAT16;
    if (code == Code::Float && dtype.bits == 64) return FJ_FLOAT64;
    if (code == Code::Bfloat && dtype.bits == 16) return FJ_BFLOAT16;
    if (code == Code::Bool && dtype.bits == 8) return FJ_BOOL;
    if (code == Code::Int && dtype.bits == 8) return FJ_INT8;
    if (code == Code::Int && dtype.bits == 32) return FJ_INT32;
    if (code == Code::Int && dtype.bits == 64) return FJ_INT64;
  }
  throw nb::type_error((std::string("[") + op + "] " + name + ": unsupported dtype " +
                        dlpack_dtype_name(dtype) + "; expected float32, float16, bfloat16, float64 or bool")
                           .c_str());
}

template <typename A>
fj_tensor to_tensor(const char* op, const char* name, const A& array) {
  fj_tensor t;
  std::memset(&t, 0, sizeof t);
  t.data = const_cast<void*>(static_cast<const void*>(array.data()));
  t.dtype = to_fj_dtype(op, name, array.dtype());
  switch (array.device_type()) {
    case nb::device::cpu::value: t.device_type = FJ_DEVICE_CPU; break;
    case nb::device::cuda::value: t.device_type = FJ_DEVICE_CUDA; break;
    default:
      throw nb::value_error((std::string("[") + op + "] " + name + ": unsupported device type " +
                             std::to_string(array.device_type()) + "; expected cpu or cuda")
                                .c_str());
  }
  t.device_index = array.device_id();
  t.ndim = int32_t(array.ndim());  // the C API rejects a rank other than 3 or 4 by name
  for (size_t d = 0; d < array.ndim() && d < FJ_MAX_DIMS; ++d) {
    t.shape[d] = array.shape(d);
    t.strides[d] = array.stride(d);
  }
  return t;
}

fj_attention_options make_options(const char* op, const std::optional<Array>& mask,
                                  std::optional<double> scale, double softcap, int causal,
                                  int64_t window_left, int64_t window_right, double dropout_p, uint64_t seed,
                                  uint64_t offset, int num_threads, uintptr_t stream) {
  fj_attention_options options = fj_attention_options_default();
  if (mask) options.mask = to_tensor(op, "mask", *mask);
  options.has_scale = scale.has_value();
  options.scale = scale.value_or(0.0);
  options.softcap = softcap;
  options.causal = fj_causal(causal);
  options.window_left = window_left;
  options.window_right = window_right;
  options.dropout_p = dropout_p;
  options.dropout_seed = seed;
  options.dropout_offset = offset;
  options.num_threads = num_threads;
  options.stream = reinterpret_cast<void*>(stream);
  return options;
}

void forward(const Array& q, const Array& k, const Array& v, OutArray o, OutArray lse,
             const std::optional<Array>& mask, std::optional<double> scale, double softcap, int causal,
             int64_t window_left, int64_t window_right, double dropout_p, uint64_t seed, uint64_t offset,
             int num_threads, uintptr_t stream) {
  constexpr const char* op = "attention";
  const fj_tensor tq = to_tensor(op, "q", q), tk = to_tensor(op, "k", k), tv = to_tensor(op, "v", v);
  fj_tensor to = to_tensor(op, "o", o), tlse = to_tensor(op, "lse", lse);
  const fj_attention_options options = make_options(op, mask, scale, softcap, causal, window_left,
                                                    window_right, dropout_p, seed, offset, num_threads, stream);
  fj_status status;
  {
    nb::gil_scoped_release release;
    status = fj_attention_forward(&tq, &tk, &tv, &options, &to, &tlse);
  }
  if (status != FJ_SUCCESS) raise_status(status);
}

void backward(const Array& q, const Array& k, const Array& v, const Array& o, const Array& lse,
              const Array& dout, OutArray dq, OutArray dk, OutArray dv, const std::optional<Array>& mask,
              std::optional<double> scale, double softcap, int causal, int64_t window_left,
              int64_t window_right, double dropout_p, uint64_t seed, uint64_t offset, int num_threads,
              uintptr_t stream) {
  constexpr const char* op = "attention_backward";
  const fj_tensor tq = to_tensor(op, "q", q), tk = to_tensor(op, "k", k), tv = to_tensor(op, "v", v);
  const fj_tensor to = to_tensor(op, "o", o), tlse = to_tensor(op, "lse", lse);
  const fj_tensor tdout = to_tensor(op, "dout", dout);
  fj_tensor tdq = to_tensor(op, "dq", dq), tdk = to_tensor(op, "dk", dk), tdv = to_tensor(op, "dv", dv);
  const fj_attention_options options = make_options(op, mask, scale, softcap, causal, window_left,
                                                    window_right, dropout_p, seed, offset, num_threads, stream);
  fj_status status;
  {
    nb::gil_scoped_release release;
    status = fj_attention_backward(&tq, &tk, &tv, &to, &tlse, &tdout, &options, &tdq, &tdk, &tdv);
  }
  if (status != FJ_SUCCESS) raise_status(status);
}

void dropout_keep_mask(uint64_t seed, uint64_t offset, double p,
                       nb::ndarray<uint8_t, nb::ndim<4>, nb::c_contig, nb::device::cpu> keep) {
  const fj_status status = fj_dropout_keep_mask(seed, offset, p, keep.shape(0), keep.shape(1), keep.shape(2),
                                                keep.shape(3), keep.data());
  if (status != FJ_SUCCESS) raise_status(status);
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "flashjit C API bindings (internal; use the flashjit package)";
  m.def("forward", &forward, nb::arg("q").noconvert(), nb::arg("k").noconvert(), nb::arg("v").noconvert(),
        nb::arg("o").noconvert(), nb::arg("lse").noconvert(), nb::arg("mask").noconvert().none(),
        nb::arg("scale").none(), nb::arg("softcap"), nb::arg("causal"), nb::arg("window_left"),
        nb::arg("window_right"), nb::arg("dropout_p"), nb::arg("seed"), nb::arg("offset"),
        nb::arg("num_threads"), nb::arg("stream") = 0);
  m.def("backward", &backward, nb::arg("q").noconvert(), nb::arg("k").noconvert(), nb::arg("v").noconvert(),
        nb::arg("o").noconvert(), nb::arg("lse").noconvert(), nb::arg("dout").noconvert(),
        nb::arg("dq").noconvert(), nb::arg("dk").noconvert(), nb::arg("dv").noconvert(),
        nb::arg("mask").noconvert().none(), nb::arg("scale").none(), nb::arg("softcap"), nb::arg("causal"),
        nb::arg("window_left"), nb::arg("window_right"), nb::arg("dropout_p"), nb::arg("seed"),
        nb::arg("offset"), nb::arg("num_threads"), nb::arg("stream") = 0);
  m.def("dropout_keep_mask", &dropout_keep_mask, nb::arg("seed"), nb::arg("offset"), nb::arg("p"),
        nb::arg("keep").noconvert());
  m.def("version", [] { return std::string(fj_version()); });
  m.def("backends", [] { return std::string(fj_backends()); });
}
