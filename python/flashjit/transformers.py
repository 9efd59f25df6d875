"""flashjit as a Hugging Face transformers attention backend.

    import flashjit.transformers
    name = flashjit.transformers.register()          # "fjit"; once per process
    model = AutoModelForCausalLM.from_pretrained(model_id, attn_implementation=name)

The name cannot contain "flash": transformers takes any such name for one of its
FlashAttention integrations.

The backend takes the masks transformers builds for its "sdpa" backend (None where the
pattern is plain causal, else a boolean [B, 1, Sq, Sk] mask with padding, sliding windows
and chunks folded in), so every model that runs on "sdpa" runs here with the same
semantics. On top of "sdpa" it runs grouped-query attention without repeating K and V
(in decoding, the CUDA forward reads each cached key once a group of query heads and
splits the keys over blocks), logit soft-capping (Gemma 2) and additive position biases
in the kernel. A bias that requires grad (a learned relative bias in training) needs a
gradient flashjit's masks do not get: such calls run on transformers' sdpa backend, with a
warning once.
"""

from __future__ import annotations

import warnings
from typing import Optional

try:
    import torch
except ImportError:
    raise ImportError("flashjit.transformers needs torch, which is not installed: pip install torch transformers") \
        from None

from .api import attention

NAME = "fjit"
_OP = "flashjit.transformers"

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"[{_OP}] {message}", stacklevel=3)


def _causal(module: torch.nn.Module, query: torch.Tensor, attention_mask, is_causal: Optional[bool]) -> bool:
    """transformers' rule for its sdpa backend: causal only where no mask was built and the
    call has more than one query (a single query, as in decoding, sees every cached key)."""
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    return bool(is_causal) and attention_mask is None and query.shape[2] > 1


def _bias_mask(position_bias: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """An additive mask: the position bias where the boolean mask attends and -inf elsewhere,
    or the sum of the bias and an additive mask."""
    if attention_mask is None:
        return position_bias
    if attention_mask.dtype == torch.bool:
        return position_bias.masked_fill(~attention_mask, float("-inf"))
    return position_bias + attention_mask


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, softcap: Optional[float] = None,
                      position_bias: Optional[torch.Tensor] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls: query [B, Hq, Sq, D], key and value
    [B, Hkv, Sk, D] with Hq a multiple of Hkv; returns ([B, Sq, Hq, Dv], None)."""
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError(f"[{_OP}] s_aux: attention sinks are not supported; use attn_implementation='eager'")
    if kwargs.get("output_attentions"):
        _warn_once("output_attentions=True: the attention weights are never formed; returning None")
    if attention_mask is not None and attention_mask.ndim != 4:
        raise ValueError(f"[{_OP}] attention_mask: expected None or a 4D mask [B, 1 or H, Sq, Sk] (the masks "
                         f"transformers builds for 'sdpa'), got shape {tuple(attention_mask.shape)}")
    if position_bias is not None and position_bias.requires_grad and torch.is_grad_enabled():
        # A learned bias needs its gradient, which flashjit's masks do not get: sdpa computes this call.
        _warn_once("position_bias requires grad: flashjit gives masks no gradient, so these calls run on "
                   "transformers' sdpa backend")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)
    if kwargs.get("cu_seq_lens_q") is not None and kwargs.get("cu_seq_lens_k") is not None:
        return _packed_attention(module, query, key, value, scaling, is_causal, softcap, dropout, position_bias,
                                 kwargs)
    if query.shape[0] == 1 and key.shape[0] > 1:  # queries shared by the batch (learned queries), as sdpa
        query = query.expand(key.shape[0], -1, -1, -1)
    causal = _causal(module, query, attention_mask, is_causal)
    mask = attention_mask
    if position_bias is not None:
        mask = _bias_mask(position_bias, attention_mask)
    out = attention(query, key, value, attn_mask=mask, scale=scaling, softcap=float(softcap or 0.0),
                    causal=causal, dropout_p=float(dropout))
    return out.transpose(1, 2).contiguous(), None


def _packed_attention(module, query, key, value, scaling, is_causal, softcap, dropout, position_bias, kwargs):
    """Packed sequences described by cu_seq_lens_q/k (DataCollatorWithFlattening with
    return_flash_attn_kwargs=True, as transformers' FlashAttention integrations take them):
    one row of the batch holding the sequences one after another, each attending to its own
    keys (causal per sequence), through varlen_attention; the mask transformers built for the
    whole row is not used, as in those integrations."""
    from .varlen import varlen_attention

    if query.shape[0] != 1:
        raise ValueError(f"[{_OP}] cu_seq_lens_q: packed sequences must be one row of the batch, got a batch of "
                         f"{query.shape[0]}")
    if position_bias is not None:
        raise ValueError(f"[{_OP}] position_bias: not supported with packed sequences (cu_seq_lens_q)")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"[{_OP}] key: {key.shape[1]} heads do not divide the query's {query.shape[1]}")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    out = varlen_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                           kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], kwargs.get("max_length_q"),
                           kwargs.get("max_length_k"), causal="bottom_right" if causal else False,
                           softcap=float(softcap or 0.0), scale=scaling, dropout_p=float(dropout))
    return out.unsqueeze(0), None


def register(name: str = NAME) -> str:
    """Register the backend with transformers under `name` (attention function and mask
    builder); returns the name to pass as attn_implementation. Safe to call again."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError as error:
        raise ImportError(f"[{_OP}] register: needs transformers with AttentionInterface and "
                          f"AttentionMaskInterface (4.53 or newer): {error}") from error
    if not isinstance(name, str) or not name or "flash" in name:
        raise ValueError(f"[{_OP}] name: expected a non-empty string without 'flash' (transformers routes such "
                         f"names to its FlashAttention integrations), got {name!r}")
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return name
