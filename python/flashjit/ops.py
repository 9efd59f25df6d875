"""PyTorch operators: `flashjit::fwd` and `flashjit::bwd` as torch.library custom
ops with fake (shape) functions and autograd, plus a low-overhead eager path.

`attention()` below is what the rest of the torch front end calls. Under
torch.compile, export or any dispatch mode it goes through the custom ops, which
the compiler sees as single opaque nodes. In plain eager mode it skips the
dispatcher with an autograd.Function over the same kernels: on a tiny CPU
problem the custom-op path costs about 1.4x the eager path's forward and 2x its
forward+backward (bench/results/cpu-overhead-*.md).

Dropout takes its randomness from `rng`, an int64 CPU tensor [seed, offset]:
a tensor rather than ints so that a compiled graph does not specialise on (and
recompile for) every new seed.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from . import _C
from .arrays import output_shapes
from . import profiler as _profiler
from .options import AttentionOptions, unordered_allowed
from .reference import naive_attention

_U64 = (1 << 64) - 1


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_DTYPE_CODES = {getattr(torch, name): code for name, code in _C.DTYPES.items()}
# Device codes of the compiled-in backends by name, which is torch's device type ("cpu", "cuda").
_DEVICE_CODES = _C.DEVICES
_CPU, _CUDA = _DEVICE_CODES["cpu"], _DEVICE_CODES.get("cuda")
# _C reads torch tensors in place (their data pointer, dtype, device, shape and strides), as it
# would the descriptors _ref builds, at about half the host time a tensor.
_C.set_tensor_type(torch.Tensor, _DTYPE_CODES)


def _ref(x: Tensor):
    """What _C reads a tensor through: a descriptor tuple, or the tensor itself
    (DLPack) for a dtype or device flashjit does not take, so that _C names it.
    A descriptor holds no reference: the caller keeps x alive through the call."""
    dtype = _DTYPE_CODES.get(x.dtype)
    if dtype is not None:
        if x.is_cpu:  # the common devices without building a torch.device (host time per call)
            return (x.data_ptr(), dtype, _CPU, 0, x.shape, x.stride())
        if x.is_cuda and _CUDA is not None:
            return (x.data_ptr(), dtype, _CUDA, x.get_device(), x.shape, x.stride())
        device = _DEVICE_CODES.get(x.device.type)
        if device is not None:
            return (x.data_ptr(), dtype, device, x.device.index or 0, x.shape, x.stride())
    return x.detach()


def _rows_readable(x: Tensor) -> Tensor:
    """The kernels read rows with unit stride; torch allows any last-dim stride
    (an expanded gradient from .sum() has stride 0 there)."""
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def _compact_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    """A dim expanded through stride 0 holds one value: narrow it to size 1,
    which the kernels broadcast, instead of reading it element by element."""
    if mask is None:
        return None
    mask = mask.detach()
    for dim in range(mask.ndim):
        if mask.stride(dim) == 0 and mask.shape[dim] > 1:
            mask = mask.narrow(dim, 0, 1)
    return mask


def _seed_offset(rng: Optional[Tensor]) -> tuple[int, int]:
    if rng is None:
        return 0, 0
    seed, offset = rng.tolist()
    return seed & _U64, offset & _U64


# The address of the reader _C takes torch tensors through (flashjit._torch_ops's), or 0.
_tensor_reader = 0
# flashjit._torch_ops's forward without autograd for plans (outputs allocated in C++), or None.
_native_forward = None
# flashjit._torch_ops's plan key of q, k, v (bytes, or None where a tensor is not read in C++), or None.
_native_signature = None
# flashjit._torch_ops's call of the C++ rule without the operator's binding (the op's 13
# arguments; for plain eager calls alone: planned_attention, attention), or None.
_native_apply = None


def _load_native():
    """(flashjit::eager_attention as a callable, or None; a note on which rule calls take): the
    attention op with its autograd rule in C++ (python/src/torch_ops.cpp), where this install
    built it against the torch in use, bound to _C's C API. FLASHJIT_TORCH_NATIVE=0 leaves it out."""
    if os.environ.get("FLASHJIT_TORCH_NATIVE", "1") == "0":
        return None, "Python (FLASHJIT_TORCH_NATIVE=0)"
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        with open(os.path.join(here, "_torch_ops.txt")) as f:
            built_with = f.read().split()
    except OSError:
        return None, "Python (flashjit was built without torch's headers: reinstall with pip install --no-build-isolation)"
    running = [torch.__version__, str(torch.version.git_version)]
    if built_with != running:  # its C++ ABI is another torch build's
        return None, (f"Python (the C++ rule was built for torch {' '.join(built_with[:1])}: reinstall flashjit "
                      f"for torch {torch.__version__})")
    path = os.path.join(here, "_torch_ops.so")
    try:
        torch.ops.load_library(path)
        library = ctypes.PyDLL(path)  # its functions called holding the GIL (one builds a Python function)
        bind, describe = library.flashjit_torch_bind, library.flashjit_torch_describe
        set_profiling = library.flashjit_torch_set_profiling
        *entry_points, options_size = _C.c_api()
        bind.restype = ctypes.c_int
        if bind(*(ctypes.c_void_p(address) for address in entry_points), ctypes.c_size_t(options_size)) != 1:
            return None, "Python (the C++ rule was built with another flashjit: reinstall flashjit)"
    except (OSError, RuntimeError, AttributeError) as error:
        return None, f"Python (the C++ rule did not load: {error})"
    # _C reads torch tensors from the at::Tensor they hold, not through their Python attributes.
    global _tensor_reader, _native_forward, _native_signature, _native_apply
    makers = (library.flashjit_torch_forward_function, library.flashjit_torch_signature_function,
              library.flashjit_torch_attention_function)
    for maker in makers:
        maker.restype = ctypes.py_object
    _native_forward, _native_signature, _native_apply = (maker() for maker in makers)
    _tensor_reader = ctypes.cast(describe, ctypes.c_void_p).value
    _C.set_tensor_reader(_tensor_reader)
    _profiler._open_listeners.append(lambda on: set_profiling(1 if on else 0))
    op = torch.ops.flashjit.eager_attention.default
    return getattr(op, "_op", op), f"C++ (flashjit._torch_ops, built for torch {built_with[0]})"


_native_attention, native_note = _load_native()


_function_mode_enabled = torch._C._is_torch_function_mode_enabled


def _native_call():
    """The C++ rule's entry: straight to its kernel, or through the operator's binding while a
    TorchFunctionMode is active (which then sees the op, as it sees torch's own)."""
    return _native_attention if _function_mode_enabled() else _native_apply


def _native_takes(q, k, v) -> bool:
    """Whether flashjit::eager_attention takes these operands: 4-dim, on the CPU or a CUDA device."""
    return _native_attention is not None and q.ndim == 4 and k.ndim == 4 and v.ndim == 4 and (q.is_cpu or q.is_cuda)


def native_available() -> bool:
    """Whether plain eager calls with gradients take the C++ autograd rule (flashjit._torch_ops)."""
    return _native_attention is not None


# The raw handle of the current stream, without building a torch.cuda.Stream
# object per call (absent from CPU-only builds of torch).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(x: Tensor) -> int:
    if not x.is_cuda:
        return 0
    if _raw_stream is not None:
        return _raw_stream(x.get_device())
    return torch.cuda.current_stream(x.device).cuda_stream


_DETERMINISTIC = {}


def _unordered_kwargs(deterministic: bool) -> dict:
    return _DETERMINISTIC if deterministic else {"nondeterministic": unordered_allowed(False)}


def _run(kernel, inputs, outputs, mask, scale, softcap, causal, window_left, window_right, dropout_p, rng,
         num_threads, deterministic=True):
    """Calls _C.forward or _C.backward on torch tensors, which _C reads in place; the
    temporaries made here (copies of rows that are not unit-stride, a compacted mask) stay
    referenced until the call returns."""
    readable = [_rows_readable(x) for x in inputs]
    mask = _compact_mask(mask)
    seed, offset = _seed_offset(rng)
    # The C API's nondeterministic only where asked for (a keyword argument costs a plain call host time).
    kernel(*readable, *outputs, mask, scale, softcap, causal, window_left, window_right, dropout_p, seed, offset,
           num_threads, _stream(inputs[0]), **_unordered_kwargs(deterministic))


def _descriptor(x: Tensor, compact: bool = False):
    """x as the C API sees it but without its memory (a NULL data pointer): for
    validating fake and meta tensors. The strides are those _run would pass (a
    copy where the last dim is not unit-stride; a mask's stride-0 dims as size 1).
    None for a dtype flashjit does not take (the call itself names it)."""
    dtype = _DTYPE_CODES.get(x.dtype)
    if dtype is None:
        return None
    shape, strides = list(x.shape), list(x.stride())
    if compact:
        shape = [1 if stride == 0 else size for size, stride in zip(shape, strides)]
    elif shape and shape[-1] > 1 and strides[-1] != 1:
        strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    device = _DEVICE_CODES.get(x.device.type, _CPU)  # meta: checked as if on the CPU
    return (0, dtype, device, x.device.index or 0, tuple(shape), tuple(strides))


def _check(kernel, inputs, outputs, mask, scale, softcap, causal, window_left, window_right, dropout_p, rng,
           num_threads, deterministic=True):
    """The C API's validation of a call on descriptors alone (the fake kernels'
    shapes come with the errors the call would raise)."""
    refs = [_descriptor(x) for x in (*inputs, *outputs)]
    mask_ref = None if mask is None else _descriptor(mask, compact=True)
    if any(ref is None for ref in refs) or (mask is not None and mask_ref is None):
        return
    kernel(*refs, mask_ref, scale, softcap, causal, window_left, window_right, dropout_p, 0, 0, num_threads, 0,
           check_only=True)


def _run_recorded(direction: str, kernel, inputs, outputs, *options):
    """_run, recorded by an open flashjit.profile() (the one global lookup when none is)."""
    profile = _profiler._active
    if profile is None:
        _run(kernel, inputs, outputs, *options)
        return
    mask, _, _, causal, window_left, window_right, dropout_p = options[:7]
    call = profile.begin(direction, "flashjit", *inputs[:3], causal, window_left, window_right, mask, dropout_p)
    _run(kernel, inputs, outputs, *options)
    offer_replay(profile, call, _run, kernel, inputs, outputs, options)
    profile.end(call)


def offer_replay(profile, call, run, kernel, inputs, outputs, options) -> None:
    """An alone=True profile's replay of a call (the first of its kind): run(kernel, inputs, fresh
    outputs laid out as `outputs`, *options). The inputs stay referenced until the block's exit."""
    if not profile.wants_replay(call):
        return
    inputs = tuple(inputs)
    layouts = [(x.shape, x.stride(), x.dtype, x.device) for x in outputs]
    profile.offer_replay(call, lambda: run(kernel, inputs, tuple(torch.empty_strided(*layout[:2], dtype=layout[2],
                                                                                     device=layout[3])
                                                                 for layout in layouts), *options))


def _new_output(q: Tensor, shape, like_q: bool = True) -> Tensor:
    """o [B, Hq, Sq, Dv] laid out as q is where q is a [B, S, H, D] buffer viewed as [B, H, S, D]
    (the projections' layout; torch's fused SDPA kernels allocate o so too), so that the usual
    transpose back to [B, S, H, D] needs no copy; else, or without like_q, contiguous. The custom
    op's o is contiguous: torch.compile may hand the op inputs laid out otherwise than its fake
    kernel saw them, and checks the outputs' strides against the fake's."""
    if like_q and _o_transposed(q, shape):
        return q.new_empty((shape[0], shape[2], shape[1], shape[3])).transpose(1, 2)
    return q.new_empty(shape)


def _o_transposed(q: Tensor, o_shape) -> bool:
    """Whether o [B, H, S, Dv] takes [B, S, H, Dv] memory, as q's ([B, S, H, D] viewed as [B, H, S, D])."""
    return len(o_shape) == 4 and q.stride(1) < q.stride(2)


def _forward(q, k, v, *options, like_q=True):
    if q.ndim == 4 and v.ndim == 4:  # the common case in fewer steps (host time per call)
        q_shape = q.shape
        o = _new_output(q, (q_shape[0], q_shape[1], q_shape[2], v.shape[3]), like_q)
        lse = q.new_empty(q_shape[:3], dtype=lse_dtype(q.dtype))
    else:
        o_shape, lse_shape = output_shapes("attention", q, v)
        o = _new_output(q, o_shape, like_q)
        lse = q.new_empty(lse_shape, dtype=lse_dtype(q.dtype))
    _run_recorded("forward", _C.forward, (q, k, v), (o, lse), *options)
    return o, lse


def _gradient_like(x: Tensor) -> Tensor:
    """x's gradient buffer in x's layout (empty_like keeps dense strides), contiguous where x's
    rows are not unit-stride (the kernels write rows; _run reads such an input through a copy)."""
    return torch.empty_like(x) if x.shape[-1] <= 1 or x.stride(-1) == 1 else torch.empty(
        x.shape, dtype=x.dtype, device=x.device)


def _backward(dout, q, k, v, o, lse, *options):
    dq, dk, dv = _gradient_like(q), _gradient_like(k), _gradient_like(v)
    _run_recorded("backward", _C.backward, (q, k, v, o, lse, dout), (dq, dk, dv), *options)
    return dq, dk, dv


@torch.library.custom_op("flashjit::fwd", mutates_args=())
def fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: Optional[float], softcap: float,
        causal: int, window_left: int, window_right: int, dropout_p: float, rng: Optional[Tensor],
        num_threads: int, deterministic: bool = True) -> tuple[Tensor, Tensor]:
    """o [B, Hq, Sq, Dv] (contiguous, q's dtype) and lse [B, Hq, Sq] (float32; float64 for float64).
    deterministic: the backward's (bwd's), kept for it by the autograd rule."""
    return _forward(q, k, v, mask, scale, softcap, causal, window_left, window_right, dropout_p, rng,
                    num_threads, deterministic, like_q=False)


@fwd.register_fake
def _fwd_fake(q, k, v, *options):
    o_shape, lse_shape = output_shapes("attention", q, v)
    o, lse = _new_output(q, o_shape, like_q=False), q.new_empty(lse_shape, dtype=lse_dtype(q.dtype))
    _check(_C.forward, (q, k, v), (o, lse), *options)
    return o, lse


@torch.library.custom_op("flashjit::bwd", mutates_args=())
def bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, mask: Optional[Tensor],
        scale: Optional[float], softcap: float, causal: int, window_left: int, window_right: int,
        dropout_p: float, rng: Optional[Tensor], num_threads: int, deterministic: bool = True
        ) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv in the layouts of q, k, v (dk, dv summed over each GQA group); bitwise
    repeatable unless deterministic is False (dq's sums then in no fixed order where that is
    faster; never under torch.use_deterministic_algorithms(True))."""
    return _backward(dout, q, k, v, o, lse, mask, scale, softcap, causal, window_left, window_right, dropout_p,
                     rng, num_threads, deterministic)


@bwd.register_fake
def _bwd_fake(dout, q, k, v, o, lse, *options):
    dq, dk, dv = _gradient_like(q), _gradient_like(k), _gradient_like(v)
    _check(_C.backward, (q, k, v, o, lse, dout), (dq, dk, dv), *options)
    return dq, dk, dv


# ---- autograd -------------------------------------------------------------------------------------------

# The ops' arguments after their tensors, as one value (options.py).
_NO_GRADS = (None,) * AttentionOptions.OP_ARG_COUNT


def _save(ctx, **tensors):
    """save_for_backward, remembering each tensor's name."""
    ctx.saved_names = tuple(tensors)
    ctx.save_for_backward(*tensors.values())


def _saved(ctx) -> SimpleNamespace:
    return SimpleNamespace(**dict(zip(ctx.saved_names, ctx.saved_tensors)))


def _check_mask_grad(mask_needs_grad: bool):
    if mask_needs_grad:
        raise NotImplementedError("[attention] mask: gradients into a float mask are not supported; pass "
                                  "attn_mask.detach() (torch.nn.functional.scaled_dot_product_attention "
                                  "computes them)")


_SAVED_BY_FWD = ("q", "k", "v", "o", "lse", "mask", "rng")


def _setup_fwd(ctx, inputs, output, options=None):
    """Autograd context of fwd, shared by the custom op and the eager path (options: the value
    inputs[3:] flatten, where the caller has it)."""
    mask = rng = None
    if options is None:
        options, mask, rng = AttentionOptions.from_op_args(inputs[3:])
    ctx.options = options
    ctx.saved_names = _SAVED_BY_FWD
    ctx.save_for_backward(*inputs[:3], *output, mask, rng)
    ctx.mark_non_differentiable(output[1])
    # The layer an open flashjit.profile(model=...) records the call in, for its backward's record.
    ctx.layer = _profiler.current_layer() if _profiler._active is not None else None


def _fwd_backward(ctx, grad_o, grad_lse, run=None):
    """Gradients of fwd's inputs; `run` computes dq, dk, dv (default: the bwd op)."""
    _check_mask_grad(ctx.needs_input_grad[3])
    s = _saved(ctx)
    layer = getattr(ctx, "layer", None)  # recorded in its forward's layer (flashjit.profile(model=...))
    with _profiler.layer_scope(layer) if layer else contextlib.nullcontext():
        dq, dk, dv = (run or bwd)(grad_o, s.q, s.k, s.v, s.o, s.lse, *ctx.options.op_args(s.mask, s.rng))
    return (dq, dk, dv) + _NO_GRADS


fwd.register_autograd(_fwd_backward, setup_context=_setup_fwd)


def _setup_bwd(ctx, inputs, output):
    dout, q, k, v = inputs[:4]
    ctx.options, mask, _ = AttentionOptions.from_op_args(inputs[6:])
    _save(ctx, dout=dout, q=q, k=k, v=v, mask=mask)


def _bwd_backward(ctx, grad_dq, grad_dk, grad_dv):
    """Double backward by recomputing attention naively and differentiating twice.
    o and lse are taken to be the forward's outputs for q, k, v, so every
    gradient reaches q, k, v and none goes to o or lse."""
    _check_mask_grad(ctx.needs_input_grad[6])
    opt = ctx.options
    if opt.dropout_p:
        raise NotImplementedError("[attention] double backward: not supported with dropout_p > 0")
    s = _saved(ctx)
    with torch.enable_grad():
        dout, q, k, v = (x.detach().requires_grad_() for x in (s.dout, s.q, s.k, s.v))
        o = naive_attention(q, k, v, attn_mask=s.mask, scale=opt.scale, softcap=opt.softcap, causal=opt.causal,
                            window=(opt.window_left, opt.window_right))
        first = torch.autograd.grad(o, (q, k, v), dout.to(o.dtype), create_graph=True)
        first = [g.to(x.dtype) for g, x in zip(first, (q, k, v))]
        pairs = [(g, gg) for g, gg in zip(first, (grad_dq, grad_dk, grad_dv)) if gg is not None]
        second = torch.autograd.grad([g for g, _ in pairs], (dout, q, k, v), [gg for _, gg in pairs],
                                     allow_unused=True, materialize_grads=True)
    ddout, dq, dk, dv = second
    return (ddout, dq, dk, dv, None, None) + _NO_GRADS


bwd.register_autograd(_bwd_backward, setup_context=_setup_bwd)


# ---- torch.func.vmap -------------------------------------------------------------------------------------
# Both ops batch by folding the mapped dim into the batch dim (every tensor
# argument leads with the batch, or broadcasts over it from size 1: the mask),
# running once, and unfolding the outputs.

def _fold(x: Optional[Tensor], dim: Optional[int], size: int, batch: int, is_mask: bool) -> Optional[Tensor]:
    """x mapped over `dim` (None: not mapped) as one tensor whose first dim is size * batch
    (or 1, for a mask that broadcasts over both)."""
    if x is None:
        return None
    if dim is None:
        if is_mask and x.shape[0] == 1:
            return x  # broadcasts over the folded batch as it did over the batch
        x = x.unsqueeze(0).expand(size, *x.shape)
    else:
        x = x.movedim(dim, 0)
        if x.shape[1] == 1 and batch != 1:
            x = x.expand(size, batch, *x.shape[2:])
    return x.reshape(size * x.shape[1], *x.shape[2:])


def _vmap_rule(op, tensor_positions: tuple[int, ...], rng_position: int, dropout_position: int):
    mask_position = tensor_positions[-1]

    def rule(info, in_dims, *args):
        size = info.batch_size
        if args[rng_position] is not None and args[dropout_position] > 0:
            if info.randomness == "error":
                raise RuntimeError("vmap: flashjit attention with dropout_p > 0 is random; pass "
                                   "randomness='different' or 'same' to vmap")
            if info.randomness == "same":  # one dropout mask for every mapped slice: a call each
                slices = [op(*[a if d is None else a.select(d, i) for a, d in zip(args, in_dims)])
                          for i in range(size)]
                return tuple(torch.stack(parts) for parts in zip(*slices)), (0,) * len(slices[0])
        first, first_dim = args[tensor_positions[0]], in_dims[tensor_positions[0]]
        batch = first.shape[0] if first_dim is None else first.movedim(first_dim, 0).shape[1]
        folded = list(args)
        for position in tensor_positions:
            folded[position] = _fold(args[position], in_dims[position], size, batch, position == mask_position)
        outputs = op(*folded)
        return tuple(x.reshape(size, batch, *x.shape[1:]) for x in outputs), (0,) * len(outputs)
    return rule


# Tensor arguments: fwd's q, k, v, mask; bwd's dout, q, k, v, o, lse, mask.
torch.library.register_vmap(fwd, _vmap_rule(fwd, (0, 1, 2, 3), 10, 9))
torch.library.register_vmap(bwd, _vmap_rule(bwd, (0, 1, 2, 3, 4, 5, 6), 13, 12))


# Whether a torch profiler records: the eager path then names its work as the ops do.
_profiler_enabled = torch._C._autograd._profiler_enabled
# The innermost saved-tensor hooks in force (torch.autograd.graph.saved_tensors_hooks), or None.
_top_saved_tensors_hooks = torch._C._autograd._top_saved_tensors_default_hooks


class _EagerAttention(torch.autograd.Function):
    """The same kernels and autograd rule without the dispatcher round trip.
    Inputs: q, k, v and the op's other arguments as one tuple (fewer arguments
    make apply cheaper; no gradient flows into the mask or rng), and the call's
    _Plan where one applies. Under a torch profiler its work is recorded as
    flashjit::fwd and flashjit::bwd."""

    @staticmethod
    def forward(ctx, q, k, v, options, plan):
        inputs = (q, k, v, *options)
        if _profiler_enabled():
            with torch.profiler.record_function("flashjit::fwd"):
                output = _forward(*inputs) if plan is None else plan.forward(q, k, v)
        else:
            output = _forward(*inputs) if plan is None else plan.forward(q, k, v)
        ctx.plan = plan
        if plan is not None:
            # The saved tensors as the backward will find them: without saved-tensor hooks they come
            # back as saved, and the same data pointers then also rule out a `.data` swap onto other
            # memory, so the plan's descriptors hold without reading every layout again.
            ctx.pointers = None if _top_saved_tensors_hooks(False) is not None else (
                q.data_ptr(), k.data_ptr(), v.data_ptr(), output[0].data_ptr(), output[1].data_ptr())
        _setup_fwd(ctx, inputs, output, None if plan is None else plan.options)  # a plan's calls: no mask, no rng
        # lse has no gradient: without this autograd would fill a zero tensor for it every
        # backward (an allocation and a kernel launch on a GPU).
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, grad_o, grad_lse):
        if grad_o is None:  # nothing reached o (only possible through lse, which has no gradient)
            return None, None, None, None, None
        # create_graph=True needs the op, whose backward is differentiable; a batched
        # gradient (vmap over the backward) needs its batching rule.
        plain = not torch.is_grad_enabled() and _plain_eager(grad_o)
        if plain and ctx.plan is not None and _profiler._active is None:
            q, k, v, o, lse = ctx.saved_tensors[:5]
            same = ctx.pointers is not None and ctx.pointers == (
                q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr())
            if _profiler_enabled():  # the same call, named in torch's profiler
                with torch.profiler.record_function("flashjit::bwd"):
                    grads = ctx.plan.backward(grad_o, q, k, v, o, lse, same)
            else:
                grads = ctx.plan.backward(grad_o, q, k, v, o, lse, same)
        elif plain and _profiler_enabled():
            with torch.profiler.record_function("flashjit::bwd"):
                grads = _fwd_backward(ctx, grad_o, grad_lse, _backward)
        else:
            grads = _fwd_backward(ctx, grad_o, grad_lse, _backward if plain else bwd)
        return grads[0], grads[1], grads[2], None, None


# _EagerAttention.apply without torch.func transforms, less its Python checks for them.
_base_apply = getattr(torch._C, "_FunctionBase", object).__dict__.get("apply")
_apply_eager = _EagerAttention.apply if _base_apply is None else _base_apply.__get__(None, _EagerAttention)


# Wrappers of torch.func transforms (and of the older vmap gradcheck uses) hold no storage of their own.
_has_storage = torch._C._has_storage


class _FuncAttention(torch.autograd.Function):
    """The ops under torch.func transforms (grad, vjp, jacrev, vmap, ...), which take
    autograd.Functions with a setup_context (the custom op's own autograd has none).
    vmap is the ops' batching rule, through the forward's call of fwd."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, options):
        with torch._C._AutoDispatchBelowAutograd():  # this Function is the autograd rule
            return fwd(q, k, v, *options)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, options = inputs
        _setup_fwd(ctx, (q, k, v, *options), output)

    @staticmethod
    def backward(ctx, grad_o, grad_lse):
        grads = _fwd_backward(ctx, grad_o, grad_lse, lambda *a: _FuncAttentionBackward.apply(*a[:6], a[6:]))
        return grads[0], grads[1], grads[2], None


class _FuncAttentionBackward(torch.autograd.Function):
    """bwd under torch.func transforms, differentiable again (_bwd_backward)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(dout, q, k, v, o, lse, options):
        with torch._C._AutoDispatchBelowAutograd():
            return bwd(dout, q, k, v, o, lse, *options)

    @staticmethod
    def setup_context(ctx, inputs, output):
        dout, q, k, v, o, lse, options = inputs
        _setup_bwd(ctx, (dout, q, k, v, o, lse, *options), output)

    @staticmethod
    def backward(ctx, grad_dq, grad_dk, grad_dv):
        return (*_bwd_backward(ctx, grad_dq, grad_dk, grad_dv)[:6], None)


_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _plain_eager(*tensors) -> bool:
    """True when no compiler, tracer, dispatch mode, torch.func transform or tensor
    subclass is in play, and the tensors hold data (meta tensors take the custom ops,
    whose fake kernels give the outputs' shapes, as torch's own operators do on the
    meta device)."""
    if _is_compiling() or _tracing_state() is not None or _current_dispatch_mode() is not None:
        return False
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TYPES or t.is_meta or not _has_storage(t)):
            return False
    return True


# Under torch.compile a seed is drawn by an op of flashjit's own, which the compiled code calls as
# it is: torch.randint in the graph became a CPU kernel the compiler generates and builds with a
# C++ toolchain, for a GPU model too. The op counts its draws into a tensor it mutates, which
# keeps two draws of one graph from being merged into one and a draw from being recomputed.
_COMPILED_DRAWS = torch.zeros(1, dtype=torch.int64)


@torch.library.custom_op("flashjit::draw_rng", mutates_args=("draws",))
def draw_rng(draws: Tensor) -> Tensor:
    """[seed, offset] as int64 on the CPU from torch's default CPU generator; draws += 1."""
    draws += 1
    return torch.randint(-(1 << 63), (1 << 63) - 1, (2,), dtype=torch.int64)


@draw_rng.register_fake
def _draw_rng_fake(draws):
    return torch.empty(2, dtype=torch.int64)


def dropout_rng(seed: Optional[int] = None, offset: int = 0) -> Tensor:
    """The rng argument of the ops: [seed, offset] as int64 (two's complement of
    the unsigned values), drawn from torch's default CPU generator when seed is None."""
    if seed is None:
        if _is_compiling():
            return draw_rng(_COMPILED_DRAWS)
        return torch.randint(-(1 << 63), (1 << 63) - 1, (2,), dtype=torch.int64)
    as_int64 = [((int(x) & _U64) ^ (1 << 63)) - (1 << 63) for x in (seed, offset)]
    return torch.tensor(as_int64, dtype=torch.int64)


# ---- plans of plain calls --------------------------------------------------------------------------------
# A plain eager call (no mask, no dropout, plain tensors whose rows have unit stride, no flashjit or
# torch profiler recording) whose signature (entry, options, shapes, strides, dtypes, devices) ran
# before takes that call's _Plan: the outputs' shapes and the descriptors' dtype and device codes,
# shapes and strides, worked out once, so that a call only allocates its outputs and reads data
# pointers in Python. The C API still validates every call in full (pointers, shared memory,
# alignment); a plan skips only Python that would rebuild the same values.

class _Plan:
    __slots__ = ("options", "args", "c_options", "o_shape", "o_transposed", "lse_shape", "lse_dtype", "static",
                 "layouts", "cuda", "native", "native_forward")

    def __init__(self, q, k, v, o, lse, refs, options: AttentionOptions):
        self.options = options
        self.args = options.op_args(None, None)
        self.c_options = (options.scale, options.softcap, options.causal, options.window_left,
                          options.window_right, 0.0, 0, 0, options.num_threads)
        self.o_shape, self.lse_shape, self.lse_dtype = tuple(o.shape), tuple(lse.shape), lse.dtype
        # o as _new_output laid it out (decided from q, as there): [B, S, H, D] memory, then viewed.
        self.o_transposed = _o_transposed(q, o.shape)
        if self.o_transposed:
            self.o_shape = (o.shape[0], o.shape[2], o.shape[1], o.shape[3])
        self.static = tuple(ref[1:] for ref in refs)  # the descriptors without their data pointers
        self.layouts = tuple(_layout(x) for x in (q, k, v, o, lse))
        self.cuda = q.is_cuda
        # flashjit::eager_attention's arguments after q, k, v (the ops'), where it takes the call; else None.
        self.native = self.args if _native_takes(q, k, v) else None
        # The C++ forward's arguments after q, k, v and with_lse (calls without autograd).
        self.native_forward = None if self.native is None else (
            options.scale, options.softcap, options.causal, options.window_left, options.window_right,
            options.num_threads)

    def forward(self, q, k, v, with_lse=True):
        """o, lse as _forward gives them; with_lse false: lse None, neither allocated nor
        computed (a call that needs no backward)."""
        if self.native_forward is not None and _native_forward is not None:  # outputs allocated in C++
            return _native_forward(q, k, v, with_lse, *self.native_forward)
        o = q.new_empty(self.o_shape).transpose(1, 2) if self.o_transposed else q.new_empty(self.o_shape)
        if _tensor_reader:  # _C reads the tensors themselves faster than descriptor tuples
            lse = q.new_empty(self.lse_shape, dtype=self.lse_dtype) if with_lse else None
            _C.forward(q, k, v, o, lse, None, *self.c_options, _stream(q) if self.cuda else 0)
            return o, lse
        sq, sk, sv, so, sl = self.static
        if with_lse:
            lse = q.new_empty(self.lse_shape, dtype=self.lse_dtype)
            lse_ref = (lse.data_ptr(), *sl)
        else:
            lse = lse_ref = None
        _C.forward((q.data_ptr(), *sq), (k.data_ptr(), *sk), (v.data_ptr(), *sv), (o.data_ptr(), *so),
                   lse_ref, None, *self.c_options, _stream(q) if self.cuda else 0)
        return o, lse

    def backward(self, dout, q, k, v, o, lse, same=False):
        """dq, dk, dv (and no gradients for the rest) as _fwd_backward gives them: from the plan's
        descriptors where the saved tensors come back as they were saved (saved-tensor hooks may
        hand back copies of other layouts, dtypes or devices; `same`: the caller knows they did,
        so their layouts are not read again) and dout has o's layout; else through _backward's
        general path."""
        sq, sk, sv, so, sl = self.static
        if (dout.stride() != so[4] or dout.dtype != o.dtype
                or (not same and any(_layout(x) != layout for x, layout in zip((q, k, v, o, lse), self.layouts)))):
            dq, dk, dv = _backward(dout, q, k, v, o, lse, *self.args)
            return (dq, dk, dv) + _NO_GRADS
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if _tensor_reader:
            _C.backward(q, k, v, o, lse, dout, dq, dk, dv, None, *self.c_options, _stream(q) if self.cuda else 0,
                        **_unordered_kwargs(self.options.deterministic))
            return (dq, dk, dv) + _NO_GRADS
        _C.backward((q.data_ptr(), *sq), (k.data_ptr(), *sk), (v.data_ptr(), *sv), (o.data_ptr(), *so),
                    (lse.data_ptr(), *sl), (dout.data_ptr(), *so), (dq.data_ptr(), *sq[:3], dq.shape, dq.stride()),
                    (dk.data_ptr(), *sk[:3], dk.shape, dk.stride()), (dv.data_ptr(), *sv[:3], dv.shape, dv.stride()),
                    None, *self.c_options, _stream(q) if self.cuda else 0,
                    **_unordered_kwargs(self.options.deterministic))
        return (dq, dk, dv) + _NO_GRADS


def _layout(x: Tensor) -> tuple:
    """What a plan's descriptor of x assumes besides its data pointer."""
    return x.dtype, x.device, x.shape, x.stride()


_PLANS: dict = {}
_MAX_PLANS = 256  # plans kept; all are forgotten when a new one would pass this
_SEEN: set = set()  # signatures called once (their second call makes the plan)
_MAX_SEEN = 1024
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_functorch_active = torch._C._are_functorch_transforms_active
_tracing_state = torch._C._get_tracing_state
_is_compiling = torch.compiler.is_compiling


def _plan_key(tag, q, k, v, options):
    """The signature a plan is kept under; None where the tensors have no strides (sparse,
    nested: the general path names them), or (with flashjit._torch_ops) no storage or another
    reason not to be read from their at::Tensor."""
    if _native_signature is not None:  # the same fields, packed in C++
        signature = _native_signature(q, k, v)
        return None if signature is None else (tag, options, signature)
    try:
        return (tag, options, q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype,
                v.dtype, q.device, k.device, v.device)
    except (RuntimeError, AttributeError, TypeError):
        return None


def find_plan(q, k, v, options: AttentionOptions, tag=None) -> tuple:
    """(plan, key): the plan an earlier plain call of this signature left through the same entry
    point (`tag`: an entry whose own checks differ keeps plans of its own), or None; and the
    signature (None where no plan can apply: a compiler, tracer, dispatch mode, profiler or
    tensor subclass in play, or tensors without strides). Without a plan the caller takes the
    general path, attention(..., plan_tag=tag, plan_key=key), which remembers the signature."""
    if (_profiler._active is not None or _is_compiling() or _tracing_state() is not None
            or _current_dispatch_mode() is not None or type(q) not in _PLAIN_TYPES or type(k) not in _PLAIN_TYPES
            or type(v) not in _PLAIN_TYPES):
        return None, None
    key = _plan_key(tag, q, k, v, options)
    plan = _PLANS.get(key) if key is not None else None
    # (A key from C++ is only made for tensors with storage.)
    if plan is None or (_native_signature is None and not (_has_storage(q) and _has_storage(k) and _has_storage(v))):
        return None, key
    return plan, key


def planned_attention(plan: _Plan, q, k, v, with_lse=True):
    """attention(q, k, v, options) through find_plan's plan; with_lse false: a call without
    autograd leaves lse None (not computed)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        if _functorch_active():
            return _EagerAttention.apply(q, k, v, plan.args, plan)
        if plan.native is not None and _native_attention is not None and not _profiler_enabled():  # the rule in C++
            return _native_call()(q, k, v, *plan.native)
        # What Function.apply calls without torch.func transforms, after unwrapping wrappers
        # of transforms that have ended, which hold no storage (none here).
        return _apply_eager(q, k, v, plan.args, plan)
    return plan.forward(q, k, v, with_lse)


def _remember_plan(key, q, k, v, options, output):
    """After a plain eager call of signature `key` ran: its plan, from the signature's second
    call on (a signature seen once, as each call of a growing KV cache is, costs only its entry
    in _SEEN), where its rows are readable as they are (no copies) and _C takes every tensor by
    descriptor."""
    if key not in _SEEN:
        if len(_SEEN) >= _MAX_SEEN:
            _SEEN.clear()
        _SEEN.add(key)
        return
    if _profiler._active is not None or any(x.shape[-1] > 1 and x.stride(-1) != 1 for x in (q, k, v)):
        return  # rows _rows_readable would copy
    refs = [_ref(x) for x in (q, k, v, *output)]
    if not all(isinstance(ref, tuple) for ref in refs):  # a dtype or device _C takes through DLPack
        return
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = _Plan(q, k, v, *output, refs, options)


_UNSET = object()


def attention(q, k, v, options: AttentionOptions, mask=None, rng=None, *, plan_tag=None, plan_key=_UNSET,
              with_lse=True):
    """o, lse with autograd through q, k, v (lse is not differentiable); rng: the
    dropout seed and offset as a tensor (dropout_rng), needed when options.dropout_p > 0.
    plan_tag: the entry point whose plans (find_plan) a plain call leaves; plan_key: the
    signature find_plan gave the caller, which found no plan (None: leave none). with_lse
    false: the caller does not use lse, which a planned call without autograd then leaves
    None (not computed)."""
    plain = mask is None and rng is None and not options.dropout_p  # plans run without dropout
    if plain and plan_key is _UNSET:
        plan, plan_key = find_plan(q, k, v, options, plan_tag)
        if plan is not None:
            return planned_attention(plan, q, k, v, with_lse)
    args = (q, k, v, *options.op_args(mask, rng))
    _check_mask_grad(mask is not None and mask.requires_grad and torch.is_grad_enabled())
    if _plain_eager(q, k, v, mask, rng):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            if (_native_takes(q, k, v) and _profiler._active is None and not _profiler_enabled()
                    and not _functorch_active()):
                output = _native_call()(*args)  # the autograd rule in C++
            else:
                output = _EagerAttention.apply(q, k, v, args[3:], None)
        else:
            output = _forward(*args)  # nothing to differentiate: no autograd node
        if plain and plan_key is not None and plan_key is not _UNSET:
            _remember_plan(plan_key, q, k, v, options, output)
        return output
    if not torch.compiler.is_compiling() and any(_functorch_wrapped(x) for x in (q, k, v)):
        return _FuncAttention.apply(q, k, v, args[3:])
    return fwd(*args)
