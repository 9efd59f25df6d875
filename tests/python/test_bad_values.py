"""One table of bad option values through every Python entry point that takes
the option: each must raise TypeError or ValueError naming the argument, never
crash, hang or coerce the value."""

import numpy as np
import pytest
import torch

import flashjit

BAD = [  # (option, value, exception)
    ("window", (1.7, 0), TypeError), ("window", (0, "x"), TypeError), ("window", (-2, 0), ValueError),
    ("window", (0, 2**70), ValueError), ("window", 3, ValueError), ("window", (1, 2, 3), ValueError),
    ("seed", 1.5, TypeError), ("seed", -1, ValueError), ("seed", 2**64, ValueError), ("seed", "7", TypeError),
    ("offset", -1, ValueError), ("offset", 2**64, ValueError), ("offset", 0.5, TypeError),
    ("num_threads", -1, ValueError), ("num_threads", 5000, ValueError), ("num_threads", 2.5, TypeError),
    ("num_threads", True, TypeError),
    ("scale", float("nan"), ValueError), ("scale", float("inf"), ValueError),
    ("softcap", -1.0, ValueError), ("softcap", float("nan"), ValueError),
    ("dropout_p", 1.5, ValueError), ("dropout_p", -0.1, ValueError), ("dropout_p", float("nan"), ValueError),
    ("causal", "diagonal", ValueError), ("causal", 2, ValueError),
]
NAMES = {"window": "window", "seed": "seed", "offset": "offset", "num_threads": "num_threads",
         "scale": "scale", "softcap": "softcap", "dropout_p": "dropout_p", "causal": "causal"}


def inputs(kind):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((1, 2, 8, 16)).astype(np.float32) for _ in range(3)]
    return arrays if kind == "numpy" else [torch.from_numpy(x) for x in arrays]


def call_forward(kind, option, value):
    q, k, v = inputs(kind)
    kwargs = {option: value}
    if option in ("seed", "offset"):
        kwargs.setdefault("dropout_p", 0.1)
        kwargs.setdefault("seed", 3)
        kwargs[option] = value
    flashjit.attention(q, k, v, **kwargs)


def call_backward(kind, option, value):
    q, k, v = inputs(kind)
    o, lse = flashjit.attention(q, k, v, return_lse=True)
    kwargs = {option: value}
    if option in ("seed", "offset"):
        kwargs = {"dropout_p": 0.1, "seed": 3, option: value}
    flashjit.attention_backward(q, k, v, o, lse, o, **kwargs)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("entry", [call_forward, call_backward], ids=["attention", "attention_backward"])
@pytest.mark.parametrize("option,value,exc", BAD, ids=[f"{o}={v!r}" for o, v, _ in BAD])
def test_every_entry_point_rejects(entry, kind, option, value, exc):
    with pytest.raises(exc, match=NAMES[option]):
        entry(kind, option, value)


@pytest.mark.parametrize("option,value,exc", [b for b in BAD if b[0] in ("scale", "dropout_p")],
                         ids=[f"{o}={v!r}" for o, v, _ in BAD if o in ("scale", "dropout_p")])
def test_sdpa_rejects(option, value, exc):
    q, k, v = inputs("torch")
    with pytest.raises(exc, match=rf"\[scaled_dot_product_attention\] {option}"):
        flashjit.scaled_dot_product_attention(q, k, v, **{option: value})


@pytest.mark.parametrize("option,value,exc", [b for b in BAD if b[0] in ("seed", "offset")],
                         ids=[f"{o}={v!r}" for o, v, _ in BAD if o in ("seed", "offset")])
def test_dropout_keep_mask_rejects(option, value, exc):
    kwargs = {"dropout_p": 0.1, "seed": 3, option: value}
    with pytest.raises(exc, match=option):
        flashjit.dropout_keep_mask(1, 2, 3, 4, **kwargs)
