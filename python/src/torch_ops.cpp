// flashjit::eager_attention: the attention operator with its autograd rule in C++, for plain
// eager calls from PyTorch (flashjit.ops routes a planned call with gradients here). A Python
// autograd.Function costs a training step about 20 µs of host time in its own machinery; this
// node's backward runs in the autograd engine without Python.
//
// Built against the torch found at install time (python/CMakeLists.txt), it links no flashjit
// code: flashjit._C hands it the C API's entry points (flashjit_torch_bind), so that both share
// one kernel cache and one memory pool. Where the backward cannot run plainly (create_graph, a
// tensor subclass or dispatch mode, an open flashjit.profile) it calls the flashjit::bwd op
// through the dispatcher, as the Python rule does.
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <string>

#include "flashjit/flashjit.h"
#include "score_options.hpp"

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Api {
  decltype(&fj_attention_options_default) options_default = nullptr;
  decltype(&fj_attention_forward) forward = nullptr;
  decltype(&fj_attention_backward) backward = nullptr;
  decltype(&fj_last_error) last_error = nullptr;
  decltype(&fj_attention_check_forward) check_forward = nullptr;
};
Api api;
std::atomic<bool> profiling{false};  // a flashjit.profile() is open: backwards take the bwd op, which records

[[noreturn]] void fail(fj_status status) {
  const std::string message = api.last_error();
  switch (status) {
    case FJ_ERROR_INVALID_VALUE: TORCH_CHECK_VALUE(false, message);
    case FJ_ERROR_INVALID_TYPE: TORCH_CHECK_TYPE(false, message);
    case FJ_ERROR_UNSUPPORTED: TORCH_CHECK_NOT_IMPLEMENTED(false, message);
    case FJ_ERROR_OUT_OF_MEMORY: TORCH_CHECK_WITH(OutOfMemoryError, false, message);  // torch.OutOfMemoryError
    default: TORCH_CHECK(false, message);
  }
}

// x's descriptor in t, its data in place (x stays alive through the call; a meta tensor as if on
// the CPU, without memory, as the Python ops' fake kernels check them); false where the C API has
// no code for x's dtype (bool: masks, the C API names it elsewhere) or device, or a descriptor
// holds fewer dims.
bool fill_descriptor(const Tensor& x, fj_tensor& t) {
  t = fj_tensor{};
  switch (x.scalar_type()) {
    case at::kFloat: t.dtype = FJ_FLOAT32; break;
    case at::kHalf: t.dtype = FJ_FLOAT16; break;
    case at::kBFloat16: t.dtype = FJ_BFLOAT16; break;
    case at::kDouble: t.dtype = FJ_FLOAT64; break;
    case at::kBool: t.dtype = FJ_BOOL; break;
    default: return false;
  }
  if (x.dim() > FJ_MAX_DIMS) return false;
  if (x.is_meta()) {
    t.device_type = FJ_DEVICE_CPU;
  } else if (x.is_cuda()) {
    t.device_type = FJ_DEVICE_CUDA;
    t.device_index = x.get_device();
  } else if (x.is_cpu()) {
    t.device_type = FJ_DEVICE_CPU;
  } else {
    return false;
  }
  t.data = x.is_meta() ? nullptr : x.data_ptr();
  t.ndim = int32_t(x.dim());
  for (int64_t d = 0; d < x.dim(); ++d) {
    t.shape[d] = x.size(d);
    t.strides[d] = x.stride(d);
  }
  return true;
}

// Whether x's descriptor may be read from the at::Tensor as it is: a strided tensor with storage
// and no lazy negation or conjugation, not a tensor subclass with rules of its own (the Python
// key) or a functorch wrapper, not meta.
bool readable_here(const Tensor& x) {
  static const c10::DispatchKeySet special({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                            c10::DispatchKey::FuncTorchBatched,
                                            c10::DispatchKey::FuncTorchGradWrapper,
                                            c10::DispatchKey::Functionalize});
  return x.defined() && x.layout() == at::kStrided && !x.key_set().has_any(special) && x.has_storage() &&
         !x.is_meta() && !x.is_neg() && !x.is_conj();
}

// An integer as text for an error message. The messages of this library are built as one
// std::string, never streamed by c10::str from several pieces: on the H100 machine (torch 2.11,
// GCC 13.3) every error whose message c10::str streamed (integers among its pieces: 3-dim
// operands, a 5-dim mask) crashed the process, while those of one string raised as they should;
// the cause is not known (2026-12-07).
std::string text(int64_t value) { return std::to_string(value); }

// x's descriptor, or an error naming the operand and what is not taken.
fj_tensor describe(const Tensor& x, const char* name) {
  fj_tensor t;
  if (fill_descriptor(x, t)) return t;
  TORCH_CHECK_VALUE(x.dim() <= FJ_MAX_DIMS, std::string("[attention] ") + name + ": at most " + text(FJ_MAX_DIMS) +
                                                " dims, got " + text(x.dim()));
  TORCH_CHECK_NOT_IMPLEMENTED(x.is_cpu() || x.is_cuda() || x.is_meta(), std::string("[attention] ") + name +
                                                                            ": device " + x.device().str() +
                                                                            " is not taken here (cpu or cuda)");
  TORCH_CHECK_TYPE(false, std::string("[attention] ") + name + ": dtype " + c10::toString(x.scalar_type()) +
                              " is not taken (float16, bfloat16, float32 or float64; bool for masks)");
}

// The kernels read rows with unit stride; torch allows any last-dim stride.
Tensor rows_readable(const Tensor& x) {
  return x.size(-1) <= 1 || x.stride(-1) == 1 ? x : x.contiguous();
}

// A lazily negated or conjugated view (a flag on x's memory, which a descriptor cannot say) as
// its values, and rows with unit stride.
Tensor readable(const Tensor& x) {
  return rows_readable(x.is_neg() || x.is_conj() ? x.resolve_neg().resolve_conj() : x);
}

// The caller's current stream on x's device (NULL on the CPU), as torch's own kernels take it.
void* stream_of(const Tensor& x) {
  if (!x.is_cuda()) return nullptr;
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return impl.getStream(x.device()).native_handle();
}

// A mask's dims expanded through stride 0 hold one value: narrowed to size 1, which the kernels
// broadcast, instead of being read element by element.
Tensor compact_mask(const Tensor& mask) {
  Tensor m = mask;
  for (int64_t d = 0; d < m.dim(); ++d) {
    if (m.stride(d) == 0 && m.size(d) > 1) m = m.narrow(d, 0, 1);
  }
  return m;
}

// The op's arguments after q, k, v (flashjit::fwd's, in its order).
struct Options {
  std::optional<Tensor> mask;
  std::optional<double> scale;
  double softcap;
  int64_t causal, window_left, window_right;
  double dropout_p;
  std::optional<Tensor> rng;  // [seed, offset] as int64 on the CPU, where dropout_p > 0
  int64_t num_threads;
  bool deterministic;

  // The C API's options; mask_holder keeps the compacted mask alive through the call.
  fj_attention_options c_options(void* stream, Tensor& mask_holder) const {
    fj_attention_options options = api.options_default();
    flashjit_front::set_score_options(options, scale, softcap, causal, window_left, window_right, num_threads, stream);
    if (mask.has_value() && mask->defined()) {
      mask_holder = compact_mask(*mask);
      options.mask = describe(mask_holder, "mask");
    }
    options.dropout_p = dropout_p;
    if (rng.has_value() && rng->defined()) {
      TORCH_CHECK_VALUE(rng->scalar_type() == at::kLong && rng->numel() == 2 && rng->is_cpu(),
                        "[attention] rng: expected [seed, offset] as an int64 CPU tensor of 2 elements");
      const Tensor words = rng->contiguous();
      options.dropout_seed = uint64_t(words.data_ptr<int64_t>()[0]);
      options.dropout_offset = uint64_t(words.data_ptr<int64_t>()[1]);
    }
    return options;
  }
};

void check_bound() {
  TORCH_CHECK(api.forward != nullptr,
              "flashjit::eager_attention: the C API is not bound (import flashjit.ops, which binds it)");
}

// o [B, Hq, Sq, Dv] laid out as q is where q is a [B, S, H, D] buffer viewed as [B, H, S, D]
// (then the usual transpose back needs no copy), and lse [B, Hq, Sq] in float32 (float64 for float64).
std::tuple<Tensor, Tensor> new_outputs(const Tensor& q, const Tensor& k, const Tensor& v, bool with_lse = true) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                    "flashjit::eager_attention: q, k and v must have 4 dims [B, H, S, D], got " + text(q.dim()) +
                        ", " + text(k.dim()) + " and " + text(v.dim()));
  const int64_t batch = q.size(0), heads = q.size(1), rows = q.size(2), dv = v.size(3);
  Tensor o = q.stride(1) < q.stride(2) ? at::empty({batch, rows, heads, dv}, q.options()).transpose(1, 2)
                                       : at::empty({batch, heads, rows, dv}, q.options());
  if (!with_lse) return {o, Tensor()};
  Tensor lse = at::empty({batch, heads, rows}, q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  return {o, lse};
}

// The forward into new outputs (lse left undefined and not computed without with_lse); the C
// API's status, whose message api.last_error() holds. Throws c10 errors for what it cannot describe.
fj_status forward_into(const Tensor& q_, const Tensor& k_, const Tensor& v_, const Options& opt, bool with_lse,
                       Tensor& o, Tensor& lse) {
  check_bound();
  const Tensor q = readable(q_), k = readable(k_), v = readable(v_);
  std::tie(o, lse) = new_outputs(q, k, v, with_lse);
  const fj_tensor tq = describe(q, "q"), tk = describe(k, "k"), tv = describe(v, "v");
  fj_tensor to = describe(o, "o"), tlse{};
  if (with_lse) tlse = describe(lse, "lse");
  Tensor mask;
  const fj_attention_options options = opt.c_options(stream_of(q), mask);
  return api.forward(&tq, &tk, &tv, &options, &to, with_lse ? &tlse : nullptr);
}

std::tuple<Tensor, Tensor> run_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Options& opt) {
  Tensor o, lse;
  const fj_status status = forward_into(q, k, v, opt, true, o, lse);
  if (status != FJ_SUCCESS) fail(status);
  return {o, lse};
}

Tensor gradient_like(const Tensor& x) {
  return x.size(-1) <= 1 || x.stride(-1) == 1 ? at::empty_like(x) : at::empty(x.sizes(), x.options());
}

variable_list run_backward(const Tensor& dout_, const Tensor& q_, const Tensor& k_, const Tensor& v_,
                           const Tensor& o_, const Tensor& lse, const Options& opt) {
  const Tensor q = readable(q_), k = readable(k_), v = readable(v_), o = readable(o_);
  const Tensor dout = readable(dout_.scalar_type() == o.scalar_type() ? dout_ : dout_.to(o.scalar_type()));
  Tensor dq = gradient_like(q_), dk = gradient_like(k_), dv = gradient_like(v_);
  const fj_tensor tq = describe(q, "q"), tk = describe(k, "k"), tv = describe(v, "v"), to = describe(o, "o"),
                  tlse = describe(lse, "lse"), tdout = describe(dout, "dout");
  fj_tensor tdq = describe(dq, "dq"), tdk = describe(dk, "dk"), tdv = describe(dv, "dv");
  Tensor mask;
  fj_attention_options options = opt.c_options(stream_of(q), mask);
  options.nondeterministic = !opt.deterministic && !at::globalContext().deterministicAlgorithms();
  const fj_status status = api.backward(&tq, &tk, &tv, &to, &tlse, &tdout, &options, &tdq, &tdk, &tdv);
  if (status != FJ_SUCCESS) fail(status);
  return {dq, dk, dv};
}

// Whether the backward can call the C API itself: no gradient of the gradient to record, no
// tensor subclass, functorch wrapper or dispatch mode to honour, no flashjit.profile to record in.
bool plain_backward(const Tensor& dout) {
  static const c10::DispatchKeySet special({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                            c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchGradWrapper,
                                            c10::DispatchKey::Functionalize});
  return !at::GradMode::is_enabled() && !profiling.load(std::memory_order_relaxed) && dout.layout() == at::kStrided &&
         !dout.is_meta() && dout.has_storage() && !dout.key_set().has_any(special) &&
         !c10::impl::TorchDispatchModeTLS::any_modes_set();
}

c10::IValue optional_value(const std::optional<Tensor>& x) {
  return x.has_value() && x->defined() ? c10::IValue(*x) : c10::IValue();
}

// flashjit::bwd (the Python op with its own autograd rule and records) through the dispatcher.
variable_list op_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                          const Tensor& lse, const Options& opt) {
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("flashjit::bwd", "");
  torch::jit::Stack stack{dout,
                          q,
                          k,
                          v,
                          o,
                          lse,
                          optional_value(opt.mask),
                          opt.scale.has_value() ? c10::IValue(*opt.scale) : c10::IValue(),
                          opt.softcap,
                          opt.causal,
                          opt.window_left,
                          opt.window_right,
                          opt.dropout_p,
                          optional_value(opt.rng),
                          opt.num_threads,
                          opt.deterministic};
  op.callBoxed(stack);  // leaves dq, dk, dv on the stack
  return {stack.at(0).toTensor(), stack.at(1).toTensor(), stack.at(2).toTensor()};
}

// The op's C++ signature (flashjit::fwd's arguments).
#define FLASHJIT_OP_PARAMETERS                                                                                  \
  const Tensor &q, const Tensor &k, const Tensor &v, const std::optional<Tensor>&mask, std::optional<double> scale, \
      double softcap, int64_t causal, int64_t window_left, int64_t window_right, double dropout_p,               \
      const std::optional<Tensor>&rng, int64_t num_threads, bool deterministic
#define FLASHJIT_OP_OPTIONS \
  Options { mask, scale, softcap, causal, window_left, window_right, dropout_p, rng, num_threads, deterministic }

// flashjit::eager_attention through the dispatcher (its kernel for the thread's keys now).
std::tuple<Tensor, Tensor> dispatched_attention(FLASHJIT_OP_PARAMETERS) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("flashjit::eager_attention", "")
                             .typed<std::tuple<Tensor, Tensor>(FLASHJIT_OP_PARAMETERS)>();
  return op.call(q, k, v, mask, scale, softcap, causal, window_left, window_right, dropout_p, rng, num_threads,
                 deterministic);
}

// The node's output is o alone; lse (no gradient) leaves through lse_out, outside the graph, as
// mark_non_differentiable would leave it (which compiled autograd does not take on C++ nodes).
struct Attention : public torch::autograd::Function<Attention> {
  static variable_list forward(AutogradContext* ctx, FLASHJIT_OP_PARAMETERS, Tensor* lse_out) {
    RECORD_FUNCTION("flashjit::fwd", c10::ArrayRef<const c10::IValue>{});
    // The op's own kernel below the autograd key: the CPU or CUDA one, or Meta under fake tensors.
    Tensor o, lse;
    {
      const at::AutoDispatchBelowADInplaceOrView below;
      std::tie(o, lse) = dispatched_attention(q, k, v, mask, scale, softcap, causal, window_left, window_right,
                                              dropout_p, rng, num_threads, deterministic);
    }
    const Tensor none;
    ctx->save_for_backward({q, k, v, o, lse, mask.value_or(none), rng.value_or(none)});
    // The options after mask, in the op's order (rng is saved as a tensor).
    ctx->saved_data["options"] = c10::ivalue::Tuple::create(
        {scale.has_value() ? c10::IValue(*scale) : c10::IValue(), softcap, causal, window_left, window_right,
         dropout_p, num_threads, deterministic});
    *lse_out = lse;
    ctx->set_materialize_grads(false);
    return {o};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(14);  // one a forward argument; q, k, v's filled
    const Tensor& dout = grads[0];
    if (!dout.defined()) return result;  // no gradient reached o
    const auto saved = ctx->get_saved_variables();
    const auto& options = ctx->saved_data["options"].toTupleRef().elements();
    const auto optional = [](const Tensor& x) { return x.defined() ? std::optional<Tensor>(x) : std::nullopt; };
    const Options opt{optional(saved[5]),
                      options[0].isNone() ? std::nullopt : std::optional<double>(options[0].toDouble()),
                      options[1].toDouble(),
                      options[2].toInt(),
                      options[3].toInt(),
                      options[4].toInt(),
                      options[5].toDouble(),
                      optional(saved[6]),
                      options[6].toInt(),
                      options[7].toBool()};
    variable_list dqkv;
    if (plain_backward(dout)) {
      RECORD_FUNCTION("flashjit::bwd", c10::ArrayRef<const c10::IValue>{});
      dqkv = run_backward(dout, saved[0], saved[1], saved[2], saved[3], saved[4], opt);
    } else {
      dqkv = op_backward(dout, saved[0], saved[1], saved[2], saved[3], saved[4], opt);
    }
    result[0] = dqkv[0];
    result[1] = dqkv[1];
    result[2] = dqkv[2];
    return result;
  }
};

std::tuple<Tensor, Tensor> attention_autograd(FLASHJIT_OP_PARAMETERS) {
  // No gradient flows into the mask (the backward returns none for it): one it wants is refused.
  TORCH_CHECK_NOT_IMPLEMENTED(!(mask.has_value() && mask->defined() && mask->requires_grad() &&
                                at::GradMode::is_enabled()),
                              "[attention] mask: gradients into a float mask are not supported; pass "
                              "attn_mask.detach() (torch.nn.functional.scaled_dot_product_attention computes them)");
  Tensor lse;
  auto outputs = Attention::apply(q, k, v, mask, scale, softcap, causal, window_left, window_right, dropout_p, rng,
                                  num_threads, deterministic, &lse);
  return {outputs[0], lse};
}

// Without autograd (inference mode, or below the autograd key): the forward alone.
std::tuple<Tensor, Tensor> attention_plain(FLASHJIT_OP_PARAMETERS) {
  return run_forward(q, k, v, FLASHJIT_OP_OPTIONS);
}

// Meta tensors (and fake tensors, which take meta kernels): the outputs' shapes, dtypes and
// layouts, after the C API's validation of the same descriptors.
std::tuple<Tensor, Tensor> attention_meta(FLASHJIT_OP_PARAMETERS) {
  check_bound();
  auto [o, lse] = new_outputs(q, k, v);
  const Options opt = FLASHJIT_OP_OPTIONS;
  const fj_tensor tq = describe(rows_readable(q), "q"), tk = describe(rows_readable(k), "k"),
                  tv = describe(rows_readable(v), "v"), to = describe(o, "o"), tlse = describe(lse, "lse");
  Tensor mask_holder;
  Options checked = opt;
  checked.rng.reset();  // a meta rng holds no values: the seed does not matter to the checks
  const fj_attention_options options = checked.c_options(nullptr, mask_holder);
  const fj_status status = api.check_forward(&tq, &tk, &tv, &options, &to, &tlse);
  if (status != FJ_SUCCESS) fail(status);
  return {o, lse};
}

// The Python functions' arguments (raising through HANDLE_TH_ERRORS: `error` for a tensor that is
// not one, Python's own error for a number that is not one).
const Tensor& tensor_arg(PyObject* x, const char* error) {
  TORCH_CHECK_TYPE(THPVariable_Check(x), error);
  return THPVariable_Unpack(x);
}
int64_t int_arg(PyObject* x) {
  const long long value = PyLong_AsLongLong(x);
  if (value == -1 && PyErr_Occurred()) throw python_error();
  return int64_t(value);
}
double double_arg(PyObject* x) {
  const double value = PyFloat_AsDouble(x);
  if (value == -1.0 && PyErr_Occurred()) throw python_error();
  return value;
}
std::optional<double> scale_arg(PyObject* x) { return x == Py_None ? std::nullopt : std::optional(double_arg(x)); }
bool bool_arg(PyObject* x) {
  const int value = PyObject_IsTrue(x);
  if (value < 0) throw python_error();
  return value != 0;
}

// forward(q, k, v, with_lse, scale, softcap, causal, window_left, window_right, num_threads) ->
// (o, lse or None): a call without autograd straight from Python (flashjit.ops's plans of plain
// calls): the outputs allocated and the C API called in C++, the GIL released around the call.
// q, k, v: plain 4-dim torch tensors whose rows have unit stride (the plans' own conditions).
// Errors as flashjit._C raises them.
// The GIL released for a scope (the caller holds it).
struct ReleasedGil {
  PyThreadState* state = PyEval_SaveThread();
  ReleasedGil() = default;
  ReleasedGil(const ReleasedGil&) = delete;
  ReleasedGil& operator=(const ReleasedGil&) = delete;
  ~ReleasedGil() { PyEval_RestoreThread(state); }
};

PyObject* python_forward(PyObject*, PyObject* const* args, Py_ssize_t count) {
  fj_status status = FJ_SUCCESS;
  Tensor o, lse;
  bool with_lse = true;
  HANDLE_TH_ERRORS  // c10 errors (what forward_into cannot describe) as torch raises them
  TORCH_CHECK_TYPE(count == 10, "forward: expected 10 arguments, got " + text(count));
  constexpr const char* not_tensors = "forward: q, k and v must be torch tensors";
  const Tensor &q = tensor_arg(args[0], not_tensors), &k = tensor_arg(args[1], not_tensors),
               &v = tensor_arg(args[2], not_tensors);
  with_lse = bool_arg(args[3]);
  const Options opt{std::nullopt,    scale_arg(args[4]), double_arg(args[5]), int_arg(args[6]), int_arg(args[7]),
                    int_arg(args[8]), 0.0,                std::nullopt,        int_arg(args[9]), true};
  const ReleasedGil released;  // restored before an error is set (on unwinding too)
  status = forward_into(q, k, v, opt, with_lse, o, lse);
  END_HANDLE_TH_ERRORS
  if (status != FJ_SUCCESS) {
    const std::string message = api.last_error();
    PyObject* type = status == FJ_ERROR_INVALID_VALUE    ? PyExc_ValueError
                     : status == FJ_ERROR_INVALID_TYPE   ? PyExc_TypeError
                     : status == FJ_ERROR_UNSUPPORTED    ? PyExc_NotImplementedError
                     : status == FJ_ERROR_OUT_OF_MEMORY  ? PyExc_MemoryError
                                                         : PyExc_RuntimeError;
    PyErr_SetString(type, message.c_str());
    return nullptr;
  }
  PyObject* result = PyTuple_New(2);
  if (result == nullptr) return nullptr;
  PyTuple_SET_ITEM(result, 0, THPVariable_Wrap(o));
  if (with_lse) {
    PyTuple_SET_ITEM(result, 1, THPVariable_Wrap(lse));
  } else {
    Py_INCREF(Py_None);
    PyTuple_SET_ITEM(result, 1, Py_None);
  }
  return result;
}

// attention(q, k, v, mask, scale, softcap, causal, window_left, window_right, dropout_p, rng,
// num_threads, deterministic) -> (o, lse): flashjit::eager_attention's autograd kernel called
// straight from Python, without the ~4 µs a call of the operator's Python binding (its arguments
// parsed against the schema, the dispatcher's way to the autograd key). For flashjit.ops's
// plain eager calls with gradients alone: no dispatch mode, functorch transform, tensor
// subclass, tracer or profiler in play, where the dispatcher would take the same kernel (under
// inference mode or below autograd it goes through the dispatcher, which takes another). The
// GIL is released around the call as the binding releases it; errors as torch raises them.
PyObject* python_attention(PyObject*, PyObject* const* args, Py_ssize_t count) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(count == 13, "attention: expected 13 arguments, got " + text(count));
  const auto optional_tensor = [&](int i, const char* error) -> std::optional<Tensor> {
    if (args[i] == Py_None) return std::nullopt;
    return tensor_arg(args[i], error);
  };
  const Tensor &q = tensor_arg(args[0], "attention: q must be a torch tensor"),
               &k = tensor_arg(args[1], "attention: k must be a torch tensor"),
               &v = tensor_arg(args[2], "attention: v must be a torch tensor");
  const std::optional<Tensor> mask = optional_tensor(3, "attention: mask must be a torch tensor or None"),
                              rng = optional_tensor(10, "attention: rng must be a torch tensor or None");
  const std::optional<double> scale = scale_arg(args[4]);
  const double softcap = double_arg(args[5]), dropout_p = double_arg(args[9]);
  const int64_t causal = int_arg(args[6]), window_left = int_arg(args[7]), window_right = int_arg(args[8]),
                num_threads = int_arg(args[11]);
  const bool deterministic = bool_arg(args[12]);
  Tensor o, lse;
  {
    const ReleasedGil released;
    // Under inference mode or below autograd (keys the thread excludes) the dispatcher runs the
    // plain kernel, not this one: such calls go through it.
    const c10::impl::LocalDispatchKeySet local = c10::impl::tls_local_dispatch_key_set();
    const bool below = c10::InferenceMode::is_enabled() || local.excluded_.has_any(c10::autograd_dispatch_keyset);
    std::tie(o, lse) = (below ? dispatched_attention : attention_autograd)(
        q, k, v, mask, scale, softcap, causal, window_left, window_right, dropout_p, rng, num_threads, deterministic);
  }
  PyObject* result = PyTuple_New(2);
  if (result == nullptr) return nullptr;
  PyTuple_SET_ITEM(result, 0, THPVariable_Wrap(o));
  PyTuple_SET_ITEM(result, 1, THPVariable_Wrap(lse));
  return result;
  END_HANDLE_TH_ERRORS
}

PyMethodDef python_attention_method{
    "attention", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&python_attention)), METH_FASTCALL,
    "flashjit::eager_attention's autograd kernel without the operator's binding (flashjit.ops's eager calls)"};

// signature(q, k, v) -> bytes or None: the shapes, strides, dtypes and devices of three torch
// tensors packed as 64-bit integers (flashjit.ops's plan key, ~1 µs less a call than the
// tuple of their Python attributes); None where a tensor is not read by its at::Tensor here
// (flashjit_torch_describe's conditions: a tensor subclass with the Python key or a functorch
// wrapper, no storage, a layout without strides, a negated or conjugated view, another device),
// which the callers then serve without a plan. (The callers take plain tensor types alone.)
PyObject* python_signature(PyObject*, PyObject* const* args, Py_ssize_t count) {
  if (count != 3) {
    PyErr_SetString(PyExc_TypeError, "signature: expected 3 arguments");
    return nullptr;
  }
  constexpr int kFields = 4 + 2 * FJ_MAX_DIMS;  // dims, sizes, strides, dtype, device type, device index
  int64_t packed[3 * kFields];
  int64_t* at = packed;
  try {
    for (int i = 0; i < 3; ++i) {
      if (!THPVariable_Check(args[i]) || !readable_here(THPVariable_Unpack(args[i]))) Py_RETURN_NONE;
      const Tensor& x = THPVariable_Unpack(args[i]);
      if (x.dim() > FJ_MAX_DIMS || !(x.is_cpu() || x.is_cuda())) Py_RETURN_NONE;
      *at++ = x.dim();
      for (int64_t d = 0; d < x.dim(); ++d) *at++ = x.size(d);
      for (int64_t d = 0; d < x.dim(); ++d) *at++ = x.stride(d);
      *at++ = static_cast<int64_t>(x.scalar_type());
      *at++ = static_cast<int64_t>(x.device().type());
      *at++ = x.device().index();
    }
  } catch (...) {
    Py_RETURN_NONE;  // not a key (the general path names what is wrong)
  }
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(packed),
                                   static_cast<Py_ssize_t>((at - packed) * sizeof(int64_t)));
}

PyMethodDef python_signature_method{
    "signature", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&python_signature)), METH_FASTCALL,
    "flashjit._torch_ops plan key of q, k, v (flashjit.ops's plans)"};

PyMethodDef python_forward_method{"forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&python_forward)),
                                  METH_FASTCALL, "flashjit._torch_ops forward without autograd (flashjit.ops's plans)"};

}  // namespace

TORCH_LIBRARY_FRAGMENT(flashjit, m) {
  m.def(
      "eager_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float? scale, float softcap, int causal, "
      "int window_left, int window_right, float dropout_p, Tensor? rng, int num_threads, bool deterministic) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flashjit, Autograd, m) { m.impl("eager_attention", &attention_autograd); }
TORCH_LIBRARY_IMPL(flashjit, CPU, m) { m.impl("eager_attention", &attention_plain); }
TORCH_LIBRARY_IMPL(flashjit, CUDA, m) { m.impl("eager_attention", &attention_plain); }
TORCH_LIBRARY_IMPL(flashjit, Meta, m) { m.impl("eager_attention", &attention_meta); }

extern "C" {

// The C API's entry points, from flashjit._C (its c_api()): options_default, forward, backward,
// last_error, check_forward, and the size of fj_attention_options as _C was built with it.
// Returns 1, or 0 (nothing bound) where that size is not this library's (another flashjit).
__attribute__((visibility("default"))) int flashjit_torch_bind(void* options_default, void* forward, void* backward,
                                                               void* last_error, void* check_forward,
                                                               size_t options_size) {
  if (options_size != sizeof(fj_attention_options)) return 0;
  api.options_default = reinterpret_cast<decltype(api.options_default)>(options_default);
  api.forward = reinterpret_cast<decltype(api.forward)>(forward);
  api.backward = reinterpret_cast<decltype(api.backward)>(backward);
  api.last_error = reinterpret_cast<decltype(api.last_error)>(last_error);
  api.check_forward = reinterpret_cast<decltype(api.check_forward)>(check_forward);
  return 1;
}

// A torch tensor (a Python object) as the C API describes it, read from the at::Tensor it holds
// instead of through its Python attributes (flashjit._C's reader while this library is loaded:
// ~1 µs less a tensor). 1: *out holds x; 0: not read here (another dtype or device, no storage,
// a lazily negated or conjugated view, a tensor subclass or functorch wrapper with rules of its
// own, too many dims), for _C's own reading, which names what is wrong. Never throws.
__attribute__((visibility("default"))) int flashjit_torch_describe(PyObject* object, fj_tensor* out) noexcept {
  try {
    if (!THPVariable_Check(object)) return 0;
    const Tensor& x = THPVariable_Unpack(object);
    return readable_here(x) && fill_descriptor(x, *out) ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

// The Python function python_forward (a new reference; the caller holds the GIL).
__attribute__((visibility("default"))) PyObject* flashjit_torch_forward_function() {
  return PyCFunction_New(&python_forward_method, nullptr);
}

// The Python function python_attention (a new reference; the caller holds the GIL).
__attribute__((visibility("default"))) PyObject* flashjit_torch_attention_function() {
  return PyCFunction_New(&python_attention_method, nullptr);
}

// The Python function python_signature (a new reference; the caller holds the GIL).
__attribute__((visibility("default"))) PyObject* flashjit_torch_signature_function() {
  return PyCFunction_New(&python_signature_method, nullptr);
}

// flashjit.profile() open (1) or closed (0).
__attribute__((visibility("default"))) void flashjit_torch_set_profiling(int on) { profiling.store(on != 0); }
}
