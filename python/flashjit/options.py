"""The attention options as one value, checked once where a call enters flashjit.

Every front end (flashjit.attention and attention_backward for numpy and torch,
the SDPA drop-in, the MLX primitives, the tuner) builds an AttentionOptions from
its own arguments with `AttentionOptions.make` and passes it whole. It is
flattened in two places only: `op_args` for the torch custom ops, whose schema
takes scalars, and `c_kwargs` for the C API's keyword arguments (numpy, MLX).
The per-call tensors (the mask, the dropout seed as a tensor) travel beside it.
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np

CAUSAL_MODES = {"none": 0, "top_left": 1, "bottom_right": 2}
INT64_MAX = (1 << 63) - 1
U64_MAX = (1 << 64) - 1


def integer(op: str, name: str, value, low: int, high: int, expected: str) -> int:
    """value as an int within [low, high]; anything else (floats, bools, strings,
    out-of-range integers) is an error naming the argument, never coerced."""
    if isinstance(value, (bool, np.bool_)) or not hasattr(type(value), "__index__"):
        raise TypeError(f"[{op}] {name}: expected an integer ({expected}), got {value!r}")
    value = operator.index(value)
    if not low <= value <= high:
        raise ValueError(f"[{op}] {name}: expected {expected}, got {value}")
    return value


def causal_code(op: str, causal) -> int:
    """0 (none), 1 (top-left: SDPA's is_causal) or 2 (bottom-right: flash-attn's)."""
    if causal is None or causal is False:
        return 0
    if causal is True:
        return 1
    if isinstance(causal, str) and causal in CAUSAL_MODES:
        return CAUSAL_MODES[causal]
    raise ValueError(f"[{op}] causal: expected False, True, 'top_left' or 'bottom_right', got {causal!r}")


def window_bounds(op: str, window) -> tuple[int, int]:
    """(left, right) keys around the diagonal, -1 = unbounded."""
    try:
        window_left, window_right = window
    except (TypeError, ValueError):
        raise ValueError(f"[{op}] window: expected a pair (left, right), got {window!r}") from None
    expected = "-1 (unbounded) or 0..2^63-1"
    return (integer(op, "window_left", window_left, -1, INT64_MAX, expected),
            integer(op, "window_right", window_right, -1, INT64_MAX, expected))


def seed_and_offset(op: str, seed, offset) -> tuple:
    """seed (None: drawn) and offset as unsigned 64-bit integers."""
    return (None if seed is None else integer(op, "seed", seed, 0, U64_MAX, "0..2^64-1"),
            integer(op, "offset", offset, 0, U64_MAX, "0..2^64-1"))


def unordered_allowed(deterministic: bool) -> bool:
    """Whether a backward may sum dQ in no fixed order (the C API's nondeterministic): only with
    deterministic=False, and never while torch.use_deterministic_algorithms(True) is in force."""
    if deterministic:
        return False
    torch = sys.modules.get("torch")
    return torch is None or not torch.are_deterministic_algorithms_enabled()


def num_threads_value(op: str, num_threads) -> int:
    return integer(op, "num_threads", num_threads, 0, 1024, "0 (default) to 1024")


@dataclass(frozen=True)
class AttentionOptions:
    """What a call computes besides its tensors: the scale (None: 1/sqrt(head dim)),
    softcap (0: off), causal alignment (0 none, 1 top-left, 2 bottom-right), window
    bounds (-1: unbounded), dropout probability and CPU threads (0: the default).
    The core validates them against the shapes; `make` checks their types and ranges."""

    scale: Optional[float] = None
    softcap: float = 0.0
    causal: int = 0
    window_left: int = -1
    window_right: int = -1
    dropout_p: float = 0.0
    num_threads: int = 0
    deterministic: bool = True

    @classmethod
    def make(cls, op: str, *, scale=None, softcap=0.0, causal=False, window=(-1, -1), dropout_p=0.0,
             num_threads=0, deterministic=True) -> "AttentionOptions":
        """From a front end's arguments (causal: False/True/'top_left'/'bottom_right'),
        each checked, with errors naming `op` and the argument."""
        # Arguments of exact builtin types are checked once a distinct value (host time per call:
        # callers such as transformers pass a scale every call); equal keys give equal options, but
        # for a scale of -0.0 against 0.0, which stays out.
        key = (scale, softcap, causal, window, dropout_p, num_threads, deterministic)
        cacheable = ((scale is None or (scale.__class__ is float and scale != 0.0)) and softcap.__class__ is float
                     and (causal is False or causal is True or causal.__class__ is str) and window.__class__ is tuple
                     and len(window) == 2 and window[0].__class__ is int and window[1].__class__ is int
                     and dropout_p.__class__ is float and num_threads.__class__ is int
                     and (deterministic is True or deterministic is False))
        if cacheable:
            options = _MADE.get(key)
            if options is not None:
                return options
        window_left, window_right = window_bounds(op, window)
        if deterministic is not True and deterministic is not False:
            raise TypeError(f"[{op}] deterministic: expected True (every backward bitwise repeatable) or False, "
                            f"got {deterministic!r}")
        options = cls(None if scale is None else float(scale), float(softcap), causal_code(op, causal), window_left,
                      window_right, float(dropout_p), num_threads_value(op, num_threads), deterministic)
        if cacheable:
            if len(_MADE) >= 256:  # a few distinct option sets in practice; never an unbounded cache
                _MADE.clear()
            _MADE[key] = options
        return options

    # The torch custom ops' schema, after q, k, v (and for bwd the tensors before them):
    # mask, scale, softcap, causal, window_left, window_right, dropout_p, rng, num_threads, deterministic.
    def op_args(self, mask, rng) -> tuple:
        return (mask, self.scale, self.softcap, self.causal, self.window_left, self.window_right, self.dropout_p,
                rng, self.num_threads, self.deterministic)

    @classmethod
    def from_op_args(cls, args) -> tuple["AttentionOptions", object, object]:
        """(options, mask, rng) from the ops' trailing arguments (op_args' order)."""
        mask, scale, softcap, causal, window_left, window_right, dropout_p, rng, num_threads, deterministic = args
        return cls(scale, softcap, causal, window_left, window_right, dropout_p, num_threads, deterministic), mask, rng

    OP_ARG_COUNT = 10  # len(op_args(...)): the ops' arguments after their tensors

    def c_kwargs(self, mask, seed: int, offset: int) -> dict:
        """The C API's keyword arguments (_C.forward, _C.backward, the MLX primitives)."""
        return dict(mask=mask, scale=self.scale, softcap=self.softcap, causal=self.causal,
                    window_left=self.window_left, window_right=self.window_right, dropout_p=self.dropout_p,
                    seed=seed, offset=offset, num_threads=self.num_threads,
                    nondeterministic=unordered_allowed(self.deterministic))


# AttentionOptions.make's results by its arguments (those of exact builtin types).
_MADE: dict = {}
