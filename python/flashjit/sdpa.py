"""torch.nn.functional.scaled_dot_product_attention on flashjit, and the switch
that routes torch's function here."""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .api import backends
from .arrays import check_dense
from .options import AttentionOptions

try:
    from torch.nn.attention.bias import CausalBias, CausalVariant
except ImportError:  # a torch without attention biases
    CausalBias = CausalVariant = None

_OP = "scaled_dot_product_attention"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PLAIN_TYPES = ops._PLAIN_TYPES


class SDPAValueError(ValueError, RuntimeError):
    """A bad argument to the SDPA drop-in: a ValueError, and a RuntimeError as
    torch's scaled_dot_product_attention raises for the same input."""


class SDPATypeError(TypeError, RuntimeError):
    """A wrong dtype or type given to the SDPA drop-in: a TypeError, and a
    RuntimeError where torch's function raises one."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check(query, key, value, attn_mask, dropout_p, is_causal):
    """What must hold before the inputs are broadcast and reshaped for the core (which
    validates the rest: dtypes, devices, head dims and lengths, the mask's dtype,
    dropout_p; its errors reach the caller in this function's names, _as_sdpa_error)."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, Tensor):
            raise SDPATypeError(f"[{_OP}] {name}: expected a torch.Tensor, got {type(x).__name__}")
        check_dense(_OP, name, x)
        if x.ndim < 2:
            raise SDPAValueError(f"[{_OP}] {name}: expected at least 2 dims (..., seqlen, head_dim), got {x.ndim}")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise SDPATypeError(f"[{_OP}] attn_mask: expected a torch.Tensor or None, got {type(attn_mask).__name__}")
        check_dense(_OP, "attn_mask", attn_mask)
        if is_causal:
            raise SDPAValueError(f"[{_OP}] attn_mask: must be None when is_causal=True (Explicit attn_mask should "
                                 "not be set when is_causal=True; add the causal mask to attn_mask instead)")
    if not 0.0 <= dropout_p <= 1.0:  # 1 is served here (zeros), not by the core
        raise SDPAValueError(f"[{_OP}] dropout_p: expected a value in [0, 1], got {dropout_p}")


_SDPA_NAMES = {"q": "query", "k": "key", "v": "value", "mask": "attn_mask", "o": "output", "lse": "output"}


def _as_sdpa_error(error: Exception) -> Exception:
    """An error of the core's attention call, in this function's names: "[attention] k: head_dim
    8 does not match q's 16" becomes "[scaled_dot_product_attention] key: head_dim 8 does not
    match query's 16"."""
    text = str(error)
    match = re.match(r"\[attention\] (\w+):", text)
    if match:  # the argument, then the tensors the message names by letter
        rest = re.sub(r"\b([qkvo])\b(?!=)", lambda m: _SDPA_NAMES[m.group(1)], text[match.end():])
        text = f"[{_OP}] {_SDPA_NAMES.get(match.group(1), match.group(1))}:{rest}"
    elif text.startswith("[attention]"):
        text = f"[{_OP}]{text[len('[attention]'):]}"
    kind = {ValueError: SDPAValueError, TypeError: SDPATypeError}.get(type(error), type(error))
    return kind(text)


def _heads(query, key, value, enable_gqa) -> tuple[int, int]:
    """Query heads and key/value heads after broadcasting (dim -3)."""
    heads_q, heads_k, heads_v = query.shape[-3], key.shape[-3], value.shape[-3]
    if heads_q == heads_k == heads_v:
        return heads_q, heads_q
    if enable_gqa:
        for name, heads in (("key", heads_k), ("value", heads_v)):
            if heads_q % heads:
                raise SDPAValueError(f"[{_OP}] {name}: query heads ({heads_q}) must be a multiple of {name} heads "
                                     f"({heads}) with enable_gqa=True")
        # Key and value head counts may differ (torch repeats each); the kernels need one count.
        return heads_q, heads_k if heads_k == heads_v else heads_q
    try:
        heads = torch.broadcast_shapes((heads_q,), (heads_k,), (heads_v,))[0]
    except RuntimeError:
        raise SDPAValueError(f"[{_OP}] key: {heads_k} heads (value {heads_v}) do not broadcast with query's {heads_q}; "
                             "pass enable_gqa=True for grouped-query attention") from None
    # Key/value heads of 1 are shared by every query head without a copy.
    return heads, 1 if heads_k == heads_v == 1 else heads


def _as_4d(x: Tensor, batch_dims: tuple, batch: int, heads: int) -> Tensor:
    """[*batch_dims, heads, S, D] (expanding size-1 dims) as [batch, heads, S, D], a view when possible."""
    if x.ndim == 4 and x.shape[0] == batch and x.shape[1] == heads:
        return x  # already [batch, heads, S, D]
    if x.shape[-3] not in (1, heads):  # enable_gqa with unequal key and value heads
        x = x.repeat_interleave(heads // x.shape[-3], dim=-3)
    target = (*batch_dims, heads, *x.shape[-2:])
    if tuple(x.shape) != target:
        x = x.expand(target)
    return x if len(batch_dims) == 1 else x.reshape(batch, heads, *x.shape[-2:])


def _mask_as_4d(mask: Tensor, batch_dims: tuple, batch: int, heads: int, seqlen_q: int, seqlen_k: int) -> Tensor:
    rank = len(batch_dims) + 3
    scores = (*batch_dims, heads, seqlen_q, seqlen_k)
    if mask.ndim > rank or any(m not in (1, s) for m, s in zip(mask.shape[::-1], scores[::-1])):
        raise SDPAValueError(f"[{_OP}] attn_mask: shape {list(mask.shape)} does not broadcast to the scores' "
                             f"{list(scores)}")
    mask = mask[(None,) * (rank - mask.ndim)]
    if len(batch_dims) == 1:
        return mask
    # Flatten the batch dims; the last three keep their own (possibly 1) sizes.
    return mask.expand(*batch_dims, *mask.shape[-3:]).reshape(batch, *mask.shape[-3:])


def _is_causal_bias(attn_mask) -> bool:
    return CausalBias is not None and isinstance(attn_mask, CausalBias)


def _causal_bias_code(bias, query: Tensor, key: Tensor, is_causal: bool) -> int:
    """The causal mode of a torch.nn.attention.bias.CausalBias: causal_upper_left is
    is_causal's top-left alignment, causal_lower_right flashjit's bottom-right one."""
    if is_causal:
        raise SDPAValueError(f"[{_OP}] attn_mask: CausalBias should not be used with causal=True (is_causal=True "
                             "is causal_upper_left already)")
    if (bias.seq_len_q, bias.seq_len_kv) != (query.shape[-2], key.shape[-2]):
        raise SDPAValueError(f"[{_OP}] attn_mask: a CausalBias of {bias.seq_len_q} x {bias.seq_len_kv} for "
                             f"{query.shape[-2]} queries and {key.shape[-2]} keys")
    return 1 if bias.variant == CausalVariant.UPPER_LEFT else 2


_PLAIN_OPTIONS: dict = {}


def _plain_options(scale, causal: int) -> AttentionOptions:
    """The options of a call without mask or dropout, made once per (scale, causal)."""
    key = (None if scale is None else float(scale), causal)
    options = _PLAIN_OPTIONS.get(key)
    if options is None:
        options = AttentionOptions(scale=key[0], causal=causal)
        if len(_PLAIN_OPTIONS) < 256:  # a few scales in practice; never an unbounded cache
            _PLAIN_OPTIONS[key] = options
    return options


# The plans (ops.find_plan) of this function's plain calls, by enable_gqa: those of the
# common call alone, whose checks here depend on nothing but the plan's signature and enable_gqa.
_PLAN_TAGS = {False: "sdpa", True: "sdpa gqa"}


def _plan(query, key, value, dropout_p, is_causal, scale, enable_gqa) -> tuple:
    """(plan, signature) of a call without a mask whose other arguments have their plain types
    (ops.find_plan); (None, None) for other calls, which leave no plan."""
    if not (dropout_p.__class__ is float and dropout_p == 0.0 and is_causal.__class__ is bool
            and (scale is None or scale.__class__ is float) and enable_gqa.__class__ is bool):
        return None, None
    return ops.find_plan(query, key, value, _plain_options(scale, int(is_causal)), _PLAN_TAGS[enable_gqa])


def _planned(plan, query, key, value) -> Tensor:
    """The output of a call through its plan (_plan's), errors in this function's names."""
    try:
        return ops.planned_attention(plan, query, key, value, with_lse=False)[0]
    except (ValueError, TypeError, NotImplementedError) as error:
        raise _as_sdpa_error(error) from None


def _call(q, k, v, options: AttentionOptions, mask, rng, plan_tag=None, plan_key=None) -> Tensor:
    """ops.attention's output, its errors in this function's names (not while compiling: the
    tracer takes the errors as they are). plan_tag, plan_key: the common call's (_PLAN_TAGS, the
    signature _plan gave; None: no plan is left)."""
    if torch.compiler.is_compiling():
        return ops.attention(q, k, v, options, mask, rng, plan_key=None)[0]
    try:
        return ops.attention(q, k, v, options, mask, rng, plan_tag=plan_tag, plan_key=plan_key)[0]
    except (ValueError, TypeError, NotImplementedError) as error:
        raise _as_sdpa_error(error) from None


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, *, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention, computed by flashjit.

    query (N, ..., Hq, L, E), key (N, ..., H, S, E), value (N, ..., H, S, Ev) -> (N, ..., Hq, L, Ev);
    leading dims broadcast. attn_mask: bool (True = attend) or float added to the scores,
    broadcastable to (N, ..., Hq, L, S), not together with is_causal (top-left aligned);
    or a torch.nn.attention.bias.CausalBias (causal_upper_left,
    causal_lower_right), served as a causal bound, not a mask.
    scale defaults to 1/sqrt(E). enable_gqa=True lets Hq be a multiple of H. Dropout draws
    its seed from torch's default generator. Rows with no visible key give 0.
    Differentiable through query, key and value.
    """
    plan, signature = (None, None) if attn_mask is not None else _plan(query, key, value, dropout_p, is_causal,
                                                                        scale, enable_gqa)
    if plan is not None:
        return _planned(plan, query, key, value)
    bias = attn_mask if _is_causal_bias(attn_mask) else None
    if bias is not None:
        attn_mask = None
    _check(query, key, value, attn_mask, dropout_p, is_causal)
    causal = 1 if is_causal else 0
    if bias is not None:
        causal = _causal_bias_code(bias, query, key, is_causal)
    if query.shape[-1] == 0 or value.shape[-1] == 0:
        # Empty head dims hold no work; torch's own function defines the result.
        if bias is not None:
            attn_mask = bias._materialize(query.device)
        return torch._C._nn.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                                         scale=scale, enable_gqa=enable_gqa)
    if (attn_mask is None and not dropout_p and query.ndim == key.ndim == value.ndim == 4
            and query.shape[0] == key.shape[0] == value.shape[0] and key.shape[1] == value.shape[1]
            and (query.shape[1] == key.shape[1] or (enable_gqa and query.shape[1] % key.shape[1] == 0))):
        # The common call ([B, H, S, D], no mask, no dropout): nothing to broadcast or reshape.
        return _call(query, key, value, _plain_options(scale, causal), None, None, _PLAN_TAGS[bool(enable_gqa)],
                     signature)
    out_rank = max(query.ndim, key.ndim, value.ndim)
    # Leading dims broadcast as in torch.matmul; a 2-d input gets a heads dim of 1.
    rank = max(out_rank, 3)
    if not query.ndim == key.ndim == value.ndim == rank:
        query, key, value = (x[(None,) * (rank - x.ndim)] for x in (query, key, value))
    heads_q, heads_kv = _heads(query, key, value, enable_gqa)
    batch_dims = tuple(query.shape[:-3])
    try:
        if not batch_dims == key.shape[:-3] == value.shape[:-3]:
            batch_dims = tuple(torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3]))
    except RuntimeError:
        raise SDPAValueError(f"[{_OP}] key: batch dims {list(key.shape[:-3])} do not broadcast with query's "
                             f"{list(query.shape[:-3])}") from None
    batch = math.prod(batch_dims)
    seqlen_q, seqlen_k = query.shape[-2], key.shape[-2]
    q = _as_4d(query, batch_dims, batch, heads_q)
    k = _as_4d(key, batch_dims, batch, heads_kv)
    v = _as_4d(value, batch_dims, batch, heads_kv)
    mask = None if attn_mask is None else _mask_as_4d(attn_mask, batch_dims, batch, heads_q, seqlen_q, seqlen_k)
    # dropout_p = 1 drops everything: torch gives zeros (and zero gradients).
    drop_all = dropout_p == 1.0
    dropout_p = 0.0 if drop_all else float(dropout_p)
    rng = ops.dropout_rng() if dropout_p > 0 else None
    options = AttentionOptions(scale=None if scale is None else float(scale), causal=causal, dropout_p=dropout_p)
    o = _call(q, k, v, options, mask, rng)
    if drop_all:
        o = o * 0.0
    if len(batch_dims) != 1:  # o is [batch, heads_q, seqlen_q, Ev]
        o = o.reshape(*batch_dims, heads_q, seqlen_q, o.shape[-1])
    return o[0] if out_rank == 2 else o


# ---- routing torch.nn.functional.scaled_dot_product_attention here ---------------------------------------

# "original": what patch_sdpa() replaced (torch's function until then, for the operator below).
_patch = {"original": F.scaled_dot_product_attention}
_warned: set[str] = set()


# Read once: torch.compile traces _fallback_reason, and cannot trace into _C.
_SERVED_DEVICES = tuple(backends())


# torch.backends.cuda.*_sdp_enabled, read without their Python wrappers (host time per call).
_SDP_FLAGS = tuple(getattr(torch._C, f"_get_{name}_sdp_enabled", lambda: True)
                   for name in ("flash", "mem_efficient", "math", "cudnn"))


def _torch_backends_chosen() -> bool:
    """Whether one of torch's SDPA backends is switched off (torch.nn.attention.sdpa_kernel,
    torch.backends.cuda.enable_*_sdp): the caller then chose among torch's own kernels."""
    flash, mem_efficient, math_sdp, cudnn = _SDP_FLAGS
    return not (flash() and mem_efficient() and math_sdp() and cudnn())


def _fallback_reason(query, key, value, attn_mask) -> Optional[str]:
    """Why flashjit cannot serve this call, or None when it can."""
    # A choice among torch's backends is honoured in eager code (torch.compile traces the
    # router without the flags: compiled code is served by flashjit either way).
    if not torch.compiler.is_compiling() and _torch_backends_chosen():
        return "torch's SDPA backends were chosen (torch.nn.attention.sdpa_kernel or enable_*_sdp)"
    if (attn_mask is None and type(query) in _PLAIN_TYPES and type(key) in _PLAIN_TYPES
            and type(value) in _PLAIN_TYPES and not (query.is_nested or key.is_nested or value.is_nested)
            and query.device.type in _SERVED_DEVICES and key.device.type in _SERVED_DEVICES
            and value.device.type in _SERVED_DEVICES and query.dtype in _FLOAT_DTYPES):
        return None  # the common call, in fewer steps than the loop below (host time per call)
    for name, x in (("query", query), ("key", key), ("value", value), ("attn_mask", attn_mask)):
        if x is None:
            continue
        if not isinstance(x, Tensor):
            return f"{name} is not a tensor"
        if type(x) not in _PLAIN_TYPES:
            return f"tensor subclass {type(x).__name__}"
        if x.is_nested:
            return "nested tensors"
        if x.device.type not in _SERVED_DEVICES:
            return f"device {x.device.type} (flashjit serves {', '.join(_SERVED_DEVICES)})"
    if query.dtype not in _FLOAT_DTYPES:
        return f"dtype {_dtype_name(query.dtype)}"
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.requires_grad and torch.is_grad_enabled():
        return "a float attn_mask that requires grad (flashjit gives no mask gradient)"
    return None


def _routed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    if attn_mask is None:
        # A plan's signature holds what _fallback_reason checks but the backend flags (plain types,
        # served devices and dtypes, strided tensors; no plan under torch.compile, whose tracer
        # does not read the flags): a planned call skips the rest.
        plan = _plan(query, key, value, dropout_p, is_causal, scale, enable_gqa)[0]
        if plan is not None and not _torch_backends_chosen():
            return _planned(plan, query, key, value)
    bias = _is_causal_bias(attn_mask)
    reason = _fallback_reason(query, key, value, None if bias else attn_mask)
    if reason is None:
        return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                            enable_gqa=enable_gqa)
    # Tensor subclasses that define __torch_function__ (CausalBias among them) take
    # over as they do for torch's function: they are handed this router, which is
    # torch.nn.functional.scaled_dot_product_attention while patched.
    relevant = tuple(x for x in (query, key, value, attn_mask) if x is not None)
    if torch.overrides.has_torch_function(relevant):
        return torch.overrides.handle_torch_function(_routed, relevant, query, key, value, attn_mask, dropout_p,
                                                     is_causal, scale=scale, enable_gqa=enable_gqa)
    # torch.compile cannot trace warnings.warn; eager calls report the reason.
    if reason not in _warned and not torch.compiler.is_compiling():
        _warned.add(reason)
        warnings.warn(f"flashjit: calling torch's scaled_dot_product_attention instead: {reason}", stacklevel=2)
    return _patch["original"](query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                              enable_gqa=enable_gqa)


_routed.__doc__ = ("torch.nn.functional.scaled_dot_product_attention routed to flashjit by flashjit.patch_sdpa(); "
                   "calls torch's own function, with a warning once per reason, where flashjit cannot serve.")


# TorchScript cannot compile the router (keyword-only arguments, Python throughout);
# it compiles calls to operators. flashjit::sdpa is the router as an operator with
# torch's SDPA schema (CompositeImplicitAutograd: autograd flows through what it
# calls), and the router is registered as that builtin, so that a scripted module
# (nn.MultiheadAttention, nn.TransformerEncoderLayer) runs flashjit as its eager
# twin does, with the same dropout stream.
_SDPA_SCHEMA = ("sdpa(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, float dropout_p=0.0, "
                "bool is_causal=False, *, float? scale=None, bool enable_gqa=False) -> Tensor")


def _script_as_operator() -> None:
    try:
        from torch.jit import _builtins

        _library = torch.library.Library("flashjit", "FRAGMENT")
        _library.define(_SDPA_SCHEMA)
        _library.impl("sdpa", _routed, "CompositeImplicitAutograd")  # the router has the schema's signature
        _patch["library"] = _library  # kept alive: the registration lasts while it does
        _builtins._register_builtin(_routed, "flashjit::sdpa")
    except (ImportError, AttributeError, RuntimeError):  # a torch without these: scripting fails as before
        pass


_script_as_operator()


def is_sdpa_patched() -> bool:
    return F.scaled_dot_product_attention is _routed


def patch_sdpa() -> None:
    """Route torch.nn.functional.scaled_dot_product_attention to flashjit.

    Code that looks the function up at call time (torch.nn.functional.<name>, as
    torch.nn.MultiheadAttention and transformers do) follows the switch; a name
    imported before patching (`from torch.nn.functional import ...`) does not.
    """
    if not is_sdpa_patched():
        _patch["original"] = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _routed


def unpatch_sdpa() -> None:
    """Put back the function that patch_sdpa() replaced (the same object)."""
    if is_sdpa_patched():
        F.scaled_dot_product_attention = _patch["original"]


@contextlib.contextmanager
def sdpa_patched():
    """`with flashjit.sdpa_patched():` patches for the duration of the block."""
    was_patched = is_sdpa_patched()
    patch_sdpa()
    try:
        yield
    finally:
        if not was_patched:
            unpatch_sdpa()
