"""Backends come from the registry: the device codes the bindings give Python
(flashjit._C.DEVICES) are the compiled-in backends', and a backend added from its
own folder (the "relay" of tests/backend, built into `make sanitize`'s extension)
is reached from Python with no change to the bindings or the package."""

import math

import pytest
import torch

import flashjit
from flashjit import _C


def test_device_codes_are_the_compiled_in_backends():
    assert set(_C.DEVICES) == set(flashjit.backends())
    assert _C.DEVICES["cpu"] == 0
    if "cuda" in _C.DEVICES:
        assert _C.DEVICES["cuda"] == 1


def test_a_folder_backend_is_reached_from_python():
    if "relay" not in flashjit.backends():
        pytest.skip("built without -DFLASHJIT_EXTRA_BACKENDS=tests/backend (make sanitize builds it in)")
    relay = _C.DEVICES["relay"]
    torch.manual_seed(0)
    q = torch.randn(2, 4, 37, 24)
    k, v = torch.randn(2, 2, 45, 24), torch.randn(2, 2, 45, 24)
    expected_o, expected_lse = flashjit.attention(q, k, v, causal="bottom_right", return_lse=True)
    o, lse = torch.full_like(expected_o, math.nan), torch.full_like(expected_lse, math.nan)

    def on_relay(x, device=relay):
        return (x.data_ptr(), _C.DTYPES["float32"], device, 0, tuple(x.shape), tuple(x.stride()))

    options = dict(mask=None, scale=None, softcap=0.0, causal=2, window_left=-1, window_right=-1, dropout_p=0.0,
                   seed=0, offset=0, num_threads=0)
    _C.forward(on_relay(q), on_relay(k), on_relay(v), on_relay(o), on_relay(lse), **options)
    assert torch.equal(o, expected_o) and torch.equal(lse, expected_lse)
    with pytest.raises(ValueError, match=r"k: expected the device of q \(relay:0\), got cpu:0"):
        _C.forward(on_relay(q), on_relay(k, _C.DEVICES["cpu"]), on_relay(v), on_relay(o), on_relay(lse), **options)
