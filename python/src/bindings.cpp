// nanobind module over the C API. Tensors arrive without a copy: as torch tensors read in place
// through their attributes (set_tensor_type), as a descriptor tuple (data_ptr, fj_dtype,
// fj_device_type, device_index, shape, strides) that the torch front end's plans keep, or
// through DLPack (numpy arrays, anything exporting __dlpack__): DLPack export costs a few
// microseconds per torch tensor, which is most of the call on small problems. Statuses become
// Python exceptions.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "flashjit/cuda.h"
#include "flashjit/cpu.h"
#include "flashjit/flashjit.h"
#include "score_options.hpp"

namespace nb = nanobind;

namespace {

using Array = nb::ndarray<nb::ro>;

// Takes the GIL back after a call that ran without it. A thread the interpreter
// is ending (a daemon thread at exit, Python < 3.14) leaves through
// pthread_exit inside PyEval_RestoreThread; unwinding that through nanobind's
// frames would abort the process, so the thread stops here instead and the
// process's exit removes it.
void restore_gil(PyThreadState* state) {
  try {
    PyEval_RestoreThread(state);
  } catch (...) {  // abi::__forced_unwind: the only thing PyEval_RestoreThread throws (not named: no binding)
    for (;;) pause();  // never leaves the handler, which a forced unwind does not allow without rethrowing
  }
}

// call() with the GIL released (C API calls that take time: kernels, compiles).
template <class Call>
fj_status without_gil(Call call) {
  PyThreadState* state = PyEval_SaveThread();
  fj_status status;
  try {
    status = call();
  } catch (...) {
    restore_gil(state);
    throw;
  }
  restore_gil(state);
  return status;
}

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
  std::string name = dtype.code < 7 ? std::string(kCodes[dtype.code]) + std::to_string(dtype.bits)
                                    : "float" + std::to_string(dtype.bits) + " (DLPack type code " +
                                          std::to_string(dtype.code) + ")";  // the float8/6/4 variants
  if (dtype.lanes != 1) name += " x" + std::to_string(dtype.lanes);
  return name;
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

fj_tensor array_to_tensor(const char* op, const char* name, const Array& array) {
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

// Descriptor tuples come from flashjit's own front end, which maps only the
// dtypes and devices it supports; anything else arrives as an array.
// Read through the CPython API directly: this runs for every tensor of every call, and
// nanobind's generic casts cost about five times as much here.
fj_tensor descriptor_to_tensor(const char* op, const char* name, PyObject* d) {
  const auto bad = [&](const char* what) {
    return nb::type_error((std::string("[") + op + "] " + name + ": " + what).c_str());
  };
  if (PyTuple_GET_SIZE(d) != 6) throw bad("expected a 6-tuple tensor descriptor");
  // An int, or what says it is one (numpy's integers): anything else is named.
  const auto integer = [&](PyObject* value, int64_t low, int64_t high) {
    long long result;
    if (PyLong_Check(value)) {
      result = PyLong_AsLongLong(value);
    } else {
      PyObject* index = PyNumber_Index(value);
      if (index == nullptr) {
        PyErr_Clear();
        throw bad("a tensor descriptor holds integers and two tuples of them");
      }
      result = PyLong_AsLongLong(index);
      Py_DECREF(index);
    }
    if (result == -1 && PyErr_Occurred()) throw nb::python_error();
    if (result < low || result > high) throw bad("a tensor descriptor's integer is out of range");
    return int64_t(result);
  };
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  fj_tensor t;
  std::memset(&t, 0, sizeof t);
  PyObject* pointer = PyTuple_GET_ITEM(d, 0);
  const unsigned long long address = PyLong_Check(pointer) ? PyLong_AsUnsignedLongLong(pointer) : 0;
  if (!PyLong_Check(pointer) || (address == static_cast<unsigned long long>(-1) && PyErr_Occurred())) {
    PyErr_Clear();  // a negative or too large one (OverflowError): the message below names it
    throw bad("a tensor descriptor's first item is a data pointer (a non-negative integer)");
  }
  t.data = reinterpret_cast<void*>(static_cast<uintptr_t>(address));
  t.dtype = fj_dtype(integer(PyTuple_GET_ITEM(d, 1), 0, kInt32Max));
  t.device_type = fj_device_type(integer(PyTuple_GET_ITEM(d, 2), 0, kInt32Max));
  t.device_index = int32_t(integer(PyTuple_GET_ITEM(d, 3), std::numeric_limits<int32_t>::min(), kInt32Max));
  PyObject* shape = PyTuple_GET_ITEM(d, 4);
  PyObject* strides = PyTuple_GET_ITEM(d, 5);
  if (!PyTuple_Check(shape) || !PyTuple_Check(strides)) throw bad("a tensor descriptor's shape and strides are tuples");
  t.ndim = int32_t(PyTuple_GET_SIZE(shape));  // the C API rejects a rank other than 3 or 4 by name
  if (PyTuple_GET_SIZE(strides) != PyTuple_GET_SIZE(shape)) {
    throw bad("a tensor descriptor's strides are as many as its dims");
  }
  constexpr int64_t kMin = std::numeric_limits<int64_t>::min(), kMax = std::numeric_limits<int64_t>::max();
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(shape) && i < FJ_MAX_DIMS; ++i) {
    t.shape[i] = integer(PyTuple_GET_ITEM(shape, i), kMin, kMax);
    t.strides[i] = integer(PyTuple_GET_ITEM(strides, i), kMin, kMax);
  }
  return t;
}

// Tensors of the framework the front end registered (set_tensor_type: torch.Tensor and the
// codes of its dtypes), read in place through their own attributes: what a descriptor tuple
// holds, without building the tuple in Python and parsing it here (about half the time of
// each tensor of a call). Anything else of that type (a dtype or device without a code: meta,
// int64, ...) goes through DLPack of x.detach(), which names what it is.
struct TensorType {
  PyTypeObject* type = nullptr;  // owned (kept for the process's life, as the module is)
  PyObject* dtypes = nullptr;    // {dtype object: fj_dtype}
  int32_t cpu = -1, cuda = -1;   // device codes; -1 where the backend is not compiled in
  PyObject *dtype = nullptr, *is_cuda = nullptr, *is_cpu = nullptr, *data_ptr = nullptr, *shape = nullptr,
           *stride = nullptr, *get_device = nullptr, *detach = nullptr, *is_neg = nullptr;  // interned names
};
TensorType tensor_type;
// A faster reader of the same tensors where the framework's own library provides one
// (flashjit._torch_ops for torch: set_tensor_reader): 1 with *out filled, 0 to read them here.
int (*tensor_reader)(PyObject*, fj_tensor*) = nullptr;

// A new reference, or nb::python_error with Python's own exception.
PyObject* owned(PyObject* object) {
  if (object == nullptr) throw nb::python_error();
  return object;
}

// The Python exception being raised again, of the same type, its message led by the operand's
// name (reading a tensor's attributes can fail: a tensor without storage, a subclass's own rules).
[[noreturn]] void raise_named(const char* op, const char* name) {
  PyObject *type = nullptr, *value = nullptr, *traceback = nullptr;
  PyErr_Fetch(&type, &value, &traceback);
  PyErr_NormalizeException(&type, &value, &traceback);
  PyObject* text = value != nullptr ? PyObject_Str(value) : nullptr;
  const char* message = text != nullptr ? PyUnicode_AsUTF8(text) : nullptr;
  if (message == nullptr) PyErr_Clear();
  PyErr_Format(type != nullptr ? type : PyExc_TypeError, "[%s] %s: %s", op, name,
               message != nullptr ? message : "its attributes could not be read");
  Py_XDECREF(text);
  Py_XDECREF(type);
  Py_XDECREF(value);
  Py_XDECREF(traceback);
  throw nb::python_error();
}

// x read as a descriptor; false where it has no descriptor (its dtype or device has no code).
bool read_framework_tensor(const char* op, const char* name, PyObject* x, fj_tensor& t) {
  const TensorType& type = tensor_type;
  if (tensor_reader != nullptr && tensor_reader(x, &t) == 1 &&
      t.device_type == (t.device_type == FJ_DEVICE_CUDA ? type.cuda : type.cpu)) {
    return true;
  }
  const auto got = [&](PyObject* object) {  // a new reference, or the error raised naming the operand
    if (object == nullptr) raise_named(op, name);
    return nb::steal(object);
  };
  const auto integer = [&](PyObject* value) {
    const long long result = PyLong_AsLongLong(value);
    if (result == -1 && PyErr_Occurred()) raise_named(op, name);
    return int64_t(result);
  };
  const nb::object dtype = got(PyObject_GetAttr(x, type.dtype));
  PyObject* code = PyDict_GetItemWithError(type.dtypes, dtype.ptr());  // borrowed
  if (code == nullptr) {
    if (PyErr_Occurred()) raise_named(op, name);
    return false;
  }
  std::memset(&t, 0, sizeof t);
  t.dtype = fj_dtype(integer(code));
  const nb::object cuda = got(PyObject_GetAttr(x, type.is_cuda));
  if (cuda.ptr() == Py_True) {
    if (type.cuda < 0) return false;
    t.device_type = fj_device_type(type.cuda);
    t.device_index = int32_t(integer(got(PyObject_CallMethodNoArgs(x, type.get_device)).ptr()));
  } else {
    const nb::object cpu = got(PyObject_GetAttr(x, type.is_cpu));
    if (cpu.ptr() != Py_True || type.cpu < 0) return false;
    t.device_type = fj_device_type(type.cpu);
  }
  // A lazily negated view holds -x as x's memory with a flag, which a descriptor cannot say.
  if (got(PyObject_CallMethodNoArgs(x, type.is_neg)).ptr() == Py_True) {
    throw nb::type_error((std::string("[") + op + "] " + name +
                          ": a lazily negated view (its negative bit is set); pass x.resolve_neg()")
                             .c_str());
  }
  const nb::object pointer = got(PyObject_CallMethodNoArgs(x, type.data_ptr));
  const unsigned long long address = PyLong_AsUnsignedLongLong(pointer.ptr());
  if (address == static_cast<unsigned long long>(-1) && PyErr_Occurred()) raise_named(op, name);
  t.data = reinterpret_cast<void*>(static_cast<uintptr_t>(address));
  const nb::object shape = got(PyObject_GetAttr(x, type.shape));
  const nb::object strides = got(PyObject_CallMethodNoArgs(x, type.stride));
  if (!PyTuple_Check(shape.ptr()) || !PyTuple_Check(strides.ptr()) ||
      PyTuple_GET_SIZE(shape.ptr()) != PyTuple_GET_SIZE(strides.ptr())) {
    throw nb::type_error((std::string("[") + op + "] " + name + ": its shape and stride() are not tuples of as many "
                          "integers")
                             .c_str());
  }
  t.ndim = int32_t(PyTuple_GET_SIZE(shape.ptr()));  // the C API rejects a rank other than 3 or 4 by name
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(shape.ptr()) && i < FJ_MAX_DIMS; ++i) {
    t.shape[i] = integer(PyTuple_GET_ITEM(shape.ptr(), i));
    t.strides[i] = integer(PyTuple_GET_ITEM(strides.ptr(), i));
  }
  return true;
}

void set_tensor_type(nb::handle type, nb::dict dtypes) {
  if (!PyType_Check(type.ptr())) throw nb::type_error("set_tensor_type: type: expected a class");
  TensorType next;
  next.type = reinterpret_cast<PyTypeObject*>(type.inc_ref().ptr());
  next.dtypes = dtypes.inc_ref().ptr();
  const auto code = [](const char* device) {
    int32_t value = 0;
    return fj_device_type_by_name(device, &value) == FJ_SUCCESS ? value : -1;
  };
  next.cpu = code("cpu");
  next.cuda = code("cuda");
  next.dtype = PyUnicode_InternFromString("dtype");
  next.is_cuda = PyUnicode_InternFromString("is_cuda");
  next.is_cpu = PyUnicode_InternFromString("is_cpu");
  next.data_ptr = PyUnicode_InternFromString("data_ptr");
  next.shape = PyUnicode_InternFromString("shape");
  next.stride = PyUnicode_InternFromString("stride");
  next.get_device = PyUnicode_InternFromString("get_device");
  next.detach = PyUnicode_InternFromString("detach");
  next.is_neg = PyUnicode_InternFromString("is_neg");
  for (PyObject* interned : {next.dtype, next.is_cuda, next.is_cpu, next.data_ptr, next.shape, next.stride,
                             next.get_device, next.detach, next.is_neg}) {
    if (interned == nullptr) throw nb::python_error();
  }
  tensor_type = next;  // the previous one's references are kept (set once per process)
}

fj_tensor to_tensor(const char* op, const char* name, nb::handle x) {
  if (PyTuple_Check(x.ptr())) return descriptor_to_tensor(op, name, x.ptr());
  nb::object detached;
  if (tensor_type.type != nullptr && PyObject_TypeCheck(x.ptr(), tensor_type.type)) {
    fj_tensor t;
    if (read_framework_tensor(op, name, x.ptr(), t)) return t;
    // DLPack takes no tensor that requires grad; the detached one shares x's memory.
    detached = nb::steal(owned(PyObject_CallMethodNoArgs(x.ptr(), tensor_type.detach)));
    x = detached;
  }
  Array array;
  if (!nb::try_cast<Array>(x, array, /*convert=*/false)) {
    if (detached.is_valid()) {  // a framework tensor that DLPack does not take either (meta, a device of its own)
      const nb::str device = nb::str(nb::getattr(x, "device")), dtype = nb::str(nb::getattr(x, "dtype"));
      throw nb::type_error((std::string("[") + op + "] " + name + ": a tensor of " + dtype.c_str() + " on " +
                            device.c_str() + ", which flashjit cannot read; it takes float32, float16, bfloat16, "
                            "float64 and bool tensors on the cpu or cuda")
                               .c_str());
    }
    throw nb::type_error((std::string("[") + op + "] " + name + ": expected an array exporting DLPack, got " +
                          nb::type_name(x.type()).c_str())
                             .c_str());
  }
  return array_to_tensor(op, name, array);
}

fj_attention_options make_options(const char* op, nb::handle mask, std::optional<double> scale,
                                  double softcap, int causal, int64_t window_left, int64_t window_right,
                                  double dropout_p, uint64_t seed, uint64_t offset, int num_threads,
                                  uintptr_t stream, bool nondeterministic = false) {
  fj_attention_options options = fj_attention_options_default();
  if (!mask.is_none()) options.mask = to_tensor(op, "mask", mask);
  flashjit_front::set_score_options(options, scale, softcap, causal, window_left, window_right, num_threads,
                                    reinterpret_cast<void*>(stream));
  options.dropout_p = dropout_p;
  options.dropout_seed = seed;
  options.dropout_offset = offset;
  options.nondeterministic = nondeterministic ? 1 : 0;
  return options;
}

// The caller's workspace, (device pointer, bytes), into the options.
using Workspace = std::optional<std::tuple<uintptr_t, size_t>>;
void set_workspace(fj_attention_options& options, const Workspace& workspace) {
  if (!workspace) return;
  options.workspace = reinterpret_cast<void*>(std::get<0>(*workspace));
  options.workspace_bytes = std::get<1>(*workspace);
}

// check_only: validation alone; prepare: fj_attention_prepare_* (returns the workspace bytes);
// else the call (returns 0).
size_t forward(nb::handle q, nb::handle k, nb::handle v, nb::handle o, nb::handle lse, nb::handle mask,
               std::optional<double> scale, double softcap, int causal, int64_t window_left,
               int64_t window_right, double dropout_p, uint64_t seed, uint64_t offset, int num_threads,
               uintptr_t stream, bool check_only, bool prepare, const Workspace& workspace, bool nondeterministic) {
  constexpr const char* op = "attention";
  const fj_tensor tq = to_tensor(op, "q", q), tk = to_tensor(op, "k", k), tv = to_tensor(op, "v", v);
  fj_tensor to = to_tensor(op, "o", o);
  // lse None: the log-sum-exp is not written (a call that needs no backward).
  fj_tensor tlse{};
  fj_tensor* lse_ptr = nullptr;
  if (!lse.is_none()) {
    tlse = to_tensor(op, "lse", lse);
    lse_ptr = &tlse;
  }
  fj_attention_options options =
      make_options(op, mask, scale, softcap, causal, window_left, window_right, dropout_p, seed, offset,
                   num_threads, stream, nondeterministic);
  set_workspace(options, workspace);
  size_t bytes = 0;
  fj_status status;
  if (check_only) {
    status = fj_attention_check_forward(&tq, &tk, &tv, &options, &to, lse_ptr);
  } else if (prepare) {
    status = without_gil([&] { return fj_attention_prepare_forward(&tq, &tk, &tv, &options, &to, lse_ptr, &bytes); });
  } else {
    status = without_gil([&] { return fj_attention_forward(&tq, &tk, &tv, &options, &to, lse_ptr); });
  }
  if (status != FJ_SUCCESS) raise_status(status);
  return bytes;
}

// The nine tensors of a backward call as the C API describes them.
struct BackwardTensors {
  fj_tensor q, k, v, o, lse, dout, dq, dk, dv;
  BackwardTensors(const char* op, nb::handle q_, nb::handle k_, nb::handle v_, nb::handle o_, nb::handle lse_,
                  nb::handle dout_, nb::handle dq_, nb::handle dk_, nb::handle dv_)
      : q(to_tensor(op, "q", q_)), k(to_tensor(op, "k", k_)), v(to_tensor(op, "v", v_)), o(to_tensor(op, "o", o_)),
        lse(to_tensor(op, "lse", lse_)), dout(to_tensor(op, "dout", dout_)), dq(to_tensor(op, "dq", dq_)),
        dk(to_tensor(op, "dk", dk_)), dv(to_tensor(op, "dv", dv_)) {}
};

size_t backward(nb::handle q, nb::handle k, nb::handle v, nb::handle o, nb::handle lse, nb::handle dout,
                nb::handle dq, nb::handle dk, nb::handle dv, nb::handle mask, std::optional<double> scale,
                double softcap, int causal, int64_t window_left, int64_t window_right, double dropout_p,
                uint64_t seed, uint64_t offset, int num_threads, uintptr_t stream, bool check_only, bool prepare,
                const Workspace& workspace, bool nondeterministic) {
  constexpr const char* op = "attention_backward";
  BackwardTensors t(op, q, k, v, o, lse, dout, dq, dk, dv);
  fj_attention_options options =
      make_options(op, mask, scale, softcap, causal, window_left, window_right, dropout_p, seed, offset,
                   num_threads, stream, nondeterministic);
  set_workspace(options, workspace);
  size_t bytes = 0;
  fj_status status;
  if (check_only) {
    status = fj_attention_check_backward(&t.q, &t.k, &t.v, &t.o, &t.lse, &t.dout, &options, &t.dq, &t.dk, &t.dv);
  } else if (prepare) {
    status = without_gil([&] {
      return fj_attention_prepare_backward(&t.q, &t.k, &t.v, &t.o, &t.lse, &t.dout, &options, &t.dq, &t.dk, &t.dv,
                                           &bytes);
    });
  } else {
    status = without_gil(
        [&] { return fj_attention_backward(&t.q, &t.k, &t.v, &t.o, &t.lse, &t.dout, &options, &t.dq, &t.dk, &t.dv); });
  }
  if (status != FJ_SUCCESS) raise_status(status);
  return bytes;
}

void check(fj_status status);

// A variable-length batch's offsets (host int32 tensors) and length bounds.
fj_varlen make_varlen(const char* op, nb::handle cu_seqlens_q, nb::handle cu_seqlens_k, int64_t max_seqlen_q,
                      int64_t max_seqlen_k, nb::handle seqused_k = nb::none(), nb::handle page_table = nb::none()) {
  fj_varlen varlen;
  std::memset(&varlen, 0, sizeof varlen);
  varlen.cu_seqlens_q = to_tensor(op, "cu_seqlens_q", cu_seqlens_q);
  if (!cu_seqlens_k.is_none()) varlen.cu_seqlens_k = to_tensor(op, "cu_seqlens_k", cu_seqlens_k);
  varlen.max_seqlen_q = max_seqlen_q;
  varlen.max_seqlen_k = max_seqlen_k;
  if (!seqused_k.is_none()) varlen.seqused_k = to_tensor(op, "seqused_k", seqused_k);
  if (!page_table.is_none()) varlen.page_table = to_tensor(op, "page_table", page_table);
  return varlen;
}

void varlen_forward(nb::handle cu_seqlens_q, nb::handle cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                    nb::handle q, nb::handle k, nb::handle v, nb::handle o, nb::handle lse, nb::handle mask,
                    std::optional<double> scale, double softcap, int causal, int64_t window_left,
                    int64_t window_right, double dropout_p, uint64_t seed, uint64_t offset, int num_threads,
                    uintptr_t stream, nb::handle seqused_k, nb::handle page_table, bool check_only,
                    bool nondeterministic) {
  constexpr const char* op = "varlen_attention";
  const fj_varlen varlen = make_varlen(op, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k,
                                       page_table);
  const fj_tensor tq = to_tensor(op, "q", q), tk = to_tensor(op, "k", k), tv = to_tensor(op, "v", v);
  fj_tensor to = to_tensor(op, "o", o), tlse = to_tensor(op, "lse", lse);
  const fj_attention_options options =
      make_options(op, mask, scale, softcap, causal, window_left, window_right, dropout_p, seed, offset,
                   num_threads, stream, nondeterministic);
  if (check_only) {
    check(fj_attention_varlen_check_forward(&tq, &tk, &tv, &varlen, &options, &to, &tlse));
    return;
  }
  check(without_gil([&] { return fj_attention_varlen_forward(&tq, &tk, &tv, &varlen, &options, &to, &tlse); }));
}

void varlen_backward(nb::handle cu_seqlens_q, nb::handle cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                     nb::handle q, nb::handle k, nb::handle v, nb::handle o, nb::handle lse, nb::handle dout,
                     nb::handle dq, nb::handle dk, nb::handle dv, nb::handle mask, std::optional<double> scale,
                     double softcap, int causal, int64_t window_left, int64_t window_right, double dropout_p,
                     uint64_t seed, uint64_t offset, int num_threads, uintptr_t stream, bool nondeterministic) {
  constexpr const char* op = "varlen_attention_backward";
  const fj_varlen varlen = make_varlen(op, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  BackwardTensors t(op, q, k, v, o, lse, dout, dq, dk, dv);
  const fj_attention_options options =
      make_options(op, mask, scale, softcap, causal, window_left, window_right, dropout_p, seed, offset,
                   num_threads, stream, nondeterministic);
  check(without_gil([&] {
    return fj_attention_varlen_backward(&t.q, &t.k, &t.v, &t.o, &t.lse, &t.dout, &varlen, &options, &t.dq, &t.dk,
                                        &t.dv);
  }));
}

void dropout_keep_mask(uint64_t seed, uint64_t offset, double p,
                       nb::ndarray<uint8_t, nb::ndim<4>, nb::c_contig, nb::device::cpu> keep) {
  const fj_status status = fj_dropout_keep_mask(seed, offset, p, keep.shape(0), keep.shape(1), keep.shape(2),
                                                keep.shape(3), keep.data());
  if (status != FJ_SUCCESS) raise_status(status);
}

void check(fj_status status) {
  if (status != FJ_SUCCESS) raise_status(status);
}

// (backward, dtype, head_dim_qk, head_dim_v, mask, mask_dtype, window, dropout, softcap, arch, device_index,
//  nondeterministic)
using KernelConfigTuple = std::tuple<bool, int, int, int, int, int, bool, bool, bool, int, int, bool>;

fj_kernel_config kernel_config(const KernelConfigTuple& t) {
  fj_kernel_config config = fj_kernel_config_default();
  config.backward = std::get<0>(t);
  config.dtype = fj_dtype(std::get<1>(t));
  config.head_dim_qk = std::get<2>(t);
  config.head_dim_v = std::get<3>(t);
  config.mask = std::get<4>(t);
  config.mask_dtype = fj_dtype(std::get<5>(t));
  config.window = std::get<6>(t);
  config.dropout = std::get<7>(t);
  config.softcap = std::get<8>(t);
  config.arch = std::get<9>(t);
  config.device_index = std::get<10>(t);
  config.nondeterministic = std::get<11>(t);
  return config;
}

void cuda_precompile(const std::vector<KernelConfigTuple>& configs) {
  std::vector<fj_kernel_config> c_configs;
  for (const KernelConfigTuple& t : configs) c_configs.push_back(kernel_config(t));
  check(without_gil([&] { return fj_cuda_precompile(c_configs.data(), int32_t(c_configs.size())); }));
}

std::string cuda_tuning_key(const KernelConfigTuple& config, int64_t seqlen_k) {
  const fj_kernel_config c = kernel_config(config);
  char buffer[512];
  check(fj_cuda_tuning_key(&c, seqlen_k, buffer, sizeof buffer));
  return buffer;
}

std::string cuda_save_tuning(const std::string& device_name, int arch, const std::string& entries) {
  char path[4096];
  check(fj_cuda_save_tuning(device_name.c_str(), arch, entries.c_str(), path, sizeof path));
  return path;
}

std::string cuda_describe_tuning(const std::string& device_name, int arch) {
  std::string buffer(1 << 16, '\0');
  check(fj_cuda_describe_tuning(device_name.c_str(), arch, buffer.data(), buffer.size()));
  return buffer.c_str();
}

nb::dict cuda_cache_stats() {
  fj_cuda_cache_stats stats;
  check(fj_cuda_get_cache_stats(&stats));
  nb::dict out;
  out["compiles"] = stats.compiles;
  out["disk_loads"] = stats.disk_loads;
  out["memory_hits"] = stats.memory_hits;
  out["last_compile_seconds"] = stats.last_compile_seconds;
  out["last_disk_load_seconds"] = stats.last_disk_load_seconds;
  return out;
}

std::string cuda_cache_dir(int arch) {
  char buffer[4096];
  check(fj_cuda_cache_dir(arch, buffer, sizeof buffer));
  return buffer;
}

std::tuple<int, int> cuda_nvrtc_version() {
  int32_t major = 0, minor = 0;
  check(fj_cuda_nvrtc_version(&major, &minor));
  return {major, minor};
}

std::tuple<int, int, std::string> cuda_device_info(int device_index) {
  int32_t arch = 0, multiprocessors = 0;
  char name[256];
  check(fj_cuda_device_info(device_index, &arch, &multiprocessors, name, sizeof name));
  return {arch, multiprocessors, name};
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "flashjit C API bindings (internal; use the flashjit package)";
  m.def("forward", &forward, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("o"), nb::arg("lse").none(),
        nb::arg("mask").none(), nb::arg("scale").none(), nb::arg("softcap"), nb::arg("causal"),
        nb::arg("window_left"), nb::arg("window_right"), nb::arg("dropout_p"), nb::arg("seed"),
        nb::arg("offset"), nb::arg("num_threads"), nb::arg("stream") = 0, nb::arg("check_only") = false,
        nb::arg("prepare") = false, nb::arg("workspace") = nb::none(), nb::arg("nondeterministic") = false);
  m.def("backward", &backward, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("o"), nb::arg("lse"),
        nb::arg("dout"), nb::arg("dq"), nb::arg("dk"), nb::arg("dv"), nb::arg("mask").none(),
        nb::arg("scale").none(), nb::arg("softcap"), nb::arg("causal"), nb::arg("window_left"),
        nb::arg("window_right"), nb::arg("dropout_p"), nb::arg("seed"), nb::arg("offset"),
        nb::arg("num_threads"), nb::arg("stream") = 0, nb::arg("check_only") = false,
        nb::arg("prepare") = false, nb::arg("workspace") = nb::none(), nb::arg("nondeterministic") = false);
  m.def("varlen_forward", &varlen_forward, nb::arg("cu_seqlens_q"), nb::arg("cu_seqlens_k").none(),
        nb::arg("max_seqlen_q"), nb::arg("max_seqlen_k"), nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("o"),
        nb::arg("lse"), nb::arg("mask").none(), nb::arg("scale").none(), nb::arg("softcap"), nb::arg("causal"),
        nb::arg("window_left"), nb::arg("window_right"), nb::arg("dropout_p"), nb::arg("seed"), nb::arg("offset"),
        nb::arg("num_threads"), nb::arg("stream") = 0, nb::arg("seqused_k").none() = nb::none(),
        nb::arg("page_table").none() = nb::none(), nb::arg("check_only") = false,
        nb::arg("nondeterministic") = false);
  m.def("varlen_backward", &varlen_backward, nb::arg("cu_seqlens_q"), nb::arg("cu_seqlens_k"),
        nb::arg("max_seqlen_q"), nb::arg("max_seqlen_k"), nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("o"),
        nb::arg("lse"), nb::arg("dout"), nb::arg("dq"), nb::arg("dk"), nb::arg("dv"), nb::arg("mask").none(),
        nb::arg("scale").none(), nb::arg("softcap"), nb::arg("causal"), nb::arg("window_left"),
        nb::arg("window_right"), nb::arg("dropout_p"), nb::arg("seed"), nb::arg("offset"), nb::arg("num_threads"),
        nb::arg("stream") = 0, nb::arg("nondeterministic") = false);
  m.def("dropout_keep_mask", &dropout_keep_mask, nb::arg("seed"), nb::arg("offset"), nb::arg("p"),
        nb::arg("keep").noconvert());
  nb::dict dtypes;
  dtypes["float32"] = int(FJ_FLOAT32);
  dtypes["float16"] = int(FJ_FLOAT16);
  dtypes["bfloat16"] = int(FJ_BFLOAT16);
  dtypes["float64"] = int(FJ_FLOAT64);
  dtypes["bool"] = int(FJ_BOOL);
  m.attr("DTYPES") = dtypes;  // descriptor codes by dtype name
  nb::dict index_dtypes;       // and of the integer arrays of variable-length calls (offsets, counts, pages)
  index_dtypes["int32"] = int(FJ_INT32);
  m.attr("INDEX_DTYPES") = index_dtypes;
  nb::dict devices;  // device codes of the compiled-in backends, by name
  const std::string names = fj_backends();
  for (size_t start = 0; start < names.size();) {
    const size_t comma = std::min(names.find(',', start), names.size());
    const std::string name = names.substr(start, comma - start);
    int32_t code = 0;
    check(fj_device_type_by_name(name.c_str(), &code));
    devices[name.c_str()] = code;
    start = comma + 1;
  }
  m.attr("DEVICES") = devices;
  m.def("set_tensor_type", &set_tensor_type, nb::arg("type"), nb::arg("dtypes"));
  // The address of a faster reader of the registered type's tensors (0: none), as
  // flashjit._torch_ops's flashjit_torch_describe.
  m.def("set_tensor_reader", [](uintptr_t address) {
    tensor_reader = reinterpret_cast<int (*)(PyObject*, fj_tensor*)>(address);
  });
  // The C API's entry points as addresses, for flashjit._torch_ops (flashjit_torch_bind): the same
  // kernel cache and memory pool as this module's calls.
  m.def("c_api", [] {
    return std::make_tuple(reinterpret_cast<uintptr_t>(&fj_attention_options_default),
                           reinterpret_cast<uintptr_t>(&fj_attention_forward),
                           reinterpret_cast<uintptr_t>(&fj_attention_backward),
                           reinterpret_cast<uintptr_t>(&fj_last_error),
                           reinterpret_cast<uintptr_t>(&fj_attention_check_forward), sizeof(fj_attention_options));
  });
  m.def("version", [] { return std::string(fj_version()); });
  m.def("backends", [] { return std::string(fj_backends()); });
  m.def("cpu_kernels", [] {
    const char *variant = nullptr, *variants = nullptr;
    check(fj_cpu_kernels(&variant, &variants));
    return std::make_tuple(std::string(variant), std::string(variants));
  });
  m.def("cuda_precompile", &cuda_precompile, nb::arg("configs"));
  m.def("cuda_cache_stats", &cuda_cache_stats);
  m.def("cuda_clear_memory_cache", [] { check(fj_cuda_clear_memory_cache()); });
  m.def("cuda_cache_dir", &cuda_cache_dir, nb::arg("arch") = 0);
  m.def("cuda_tuning_key", &cuda_tuning_key, nb::arg("config"), nb::arg("seqlen_k"));
  m.def("cuda_save_tuning", &cuda_save_tuning, nb::arg("device_name"), nb::arg("arch"), nb::arg("entries"));
  m.def("cuda_describe_tuning", &cuda_describe_tuning, nb::arg("device_name"), nb::arg("arch"));
  m.def("cuda_nvrtc_version", &cuda_nvrtc_version);
  m.def("cuda_device_count", [] { return int(fj_cuda_device_count()); });
  m.def("cuda_device_info", &cuda_device_info, nb::arg("device_index"));
}
