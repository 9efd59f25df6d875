"""Tile choices measured on the GPU (flashjit.cuda.tune, `flashjit tune`): a stored
choice is what later forwards compile. GPU tests skip without an sm_90 device; the
file handling (checksums, foreign devices) is tested in C++ (test_cuda_compile.cpp)."""

import os

import pytest
import torch

import flashjit
from conftest import DEVICE

needs_sm90 = pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available()
                                or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm_90 GPU")


def forward_cubins(directory):
    return sorted(name for root, _, names in os.walk(directory) for name in names
                  if name.startswith("hopper-forward") and name.endswith(".cubin"))


def tune_one_class(tmp_path, monkeypatch, head_dim, causal, **kw):
    """flashjit.cuda.tune over one bf16 class at N 1k, in a fresh cache with no switch set:
    (its key, its result)."""
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FLASHJIT_CUDA_TILES", raising=False)
    monkeypatch.delenv("FLASHJIT_CUDA_BACKWARD", raising=False)
    flashjit.cuda.clear_memory_cache()
    results = flashjit.cuda.tune(head_dims=(head_dim,), seqlens=(1024,), causal=(causal,), dtype="bfloat16",
                                 progress=False, **kw)
    (key, result), = results.items()
    return key, result


@needs_sm90
def test_a_stored_choice_is_what_later_forwards_compile(tmp_path, monkeypatch):
    # One candidate: it is stored whatever it measures.
    key, result = tune_one_class(tmp_path, monkeypatch, 64, False, candidates={64: ["groups=3"]})
    assert result["tiles"] == "groups=3" and result["tflops"]["groups=3"] > 0
    assert f"{key} groups=3" in flashjit.cuda.tuning_info()
    for cubin in forward_cubins(tmp_path):
        os.remove(os.path.join(tmp_path, flashjit.__version__, "sm_90", cubin))
    flashjit.cuda.clear_memory_cache()
    q = torch.randn(2, 4, 1024, 64, device="cuda", dtype=torch.bfloat16)
    flashjit.scaled_dot_product_attention(q, q, q)
    assert [name for name in forward_cubins(tmp_path) if "_t512_" in name], forward_cubins(tmp_path)
    # Another key length band was not tuned here: the built-in table's choice, or the hand-set one
    # (two consumer warpgroups) where the table has none.
    other = flashjit.cuda.tuning_key(flashjit.cuda.KernelConfig(dtype="bfloat16", head_dim=64), 16384)
    built_in = [line.split()[1] for line in flashjit.cuda.tuning_info().splitlines()
                if line.startswith(other + " ") and line.endswith("(built-in)")]
    threads = "_t512_" if built_in and "groups=3" in built_in[0] else "_t384_"
    q = torch.randn(1, 4, 16384, 64, device="cuda", dtype=torch.bfloat16)
    flashjit.scaled_dot_product_attention(q, q, q)
    assert [name for name in forward_cubins(tmp_path) if threads in name], forward_cubins(tmp_path)


@needs_sm90
def test_variants_are_candidates_and_a_chained_choice_is_compiled(tmp_path, monkeypatch):
    # variants=("chain=tiles",): each candidate is also timed with the key added; a stored chained
    # choice is what a later forward of the class compiles.
    from flashjit import _C

    key, result = tune_one_class(tmp_path, monkeypatch, 128, False, candidates={128: ["softmax=fast"]},
                                 variants=("chain=tiles",))
    assert set(result["tflops"]) == {"softmax=fast", "softmax=fast,chain=tiles"}
    info = flashjit.cuda.device_info()
    _C.cuda_save_tuning(info["name"], info["arch"], f"{key} softmax=fast,chain=tiles 1\n")
    flashjit.cuda.clear_memory_cache()
    q = torch.randn(2, 4, 1024, 128, device="cuda", dtype=torch.bfloat16)
    flashjit.scaled_dot_product_attention(q, q, q)
    assert [name for name in forward_cubins(tmp_path) if "_chain_" in name], forward_cubins(tmp_path)


def test_tune_variants_are_checked():
    with pytest.raises(ValueError, match="variants"):
        flashjit.cuda.tune(variants=("chain",))
    with pytest.raises(ValueError, match="variants"):
        flashjit.cuda.tune(backward=True, variants=("chain=tiles",))


@pytest.mark.skipif(flashjit.cuda.device_count() > 0, reason="checks the message on a machine without a GPU")
def test_tune_without_a_gpu_says_so(capsys):
    from flashjit import cli

    assert cli.main(["tune"]) == 1
    assert "no CUDA GPU found" in capsys.readouterr().err


def test_kernel_config_deterministic_reaches_the_c_api():
    # KernelConfig(deterministic=False): precompile also builds the unordered backward (the C
    # API's fj_kernel_config.nondeterministic; its compile is tests/cpp's); the field passes the
    # binding (the tuning key, which does not depend on it, reads the same config), and anything
    # but a bool is refused, naming it.
    free = flashjit.cuda.KernelConfig(dtype="bfloat16", head_dim=64, backward=True, deterministic=False)
    assert free._tuple(90, 0)[-1] is True
    assert flashjit.cuda.KernelConfig(backward=True)._tuple(90, 0)[-1] is False
    assert flashjit.cuda.tuning_key(free, 4096) == flashjit.cuda.tuning_key(
        flashjit.cuda.KernelConfig(dtype="bfloat16", head_dim=64, backward=True), 4096)
    with pytest.raises(TypeError, match=r"\[precompile\] deterministic: expected True or False, got 'no'"):
        flashjit.cuda.KernelConfig(backward=True, deterministic="no")._tuple(90, 0)


def test_backward_classes_have_keys_of_their_own():
    config = flashjit.cuda.KernelConfig(dtype="bfloat16", head_dim=128, window=True)
    forward = flashjit.cuda.tuning_key(config, 4096)
    backward = flashjit.cuda.tuning_key(flashjit.cuda.KernelConfig(dtype="bfloat16", head_dim=128, window=True,
                                                                   backward=True), 4096)
    assert backward == "bwd_" + forward


@needs_sm90
def test_a_tuned_backward_pass_is_what_later_backwards_run(tmp_path, monkeypatch):
    from flashjit import _C

    monkeypatch.setenv("FLASHJIT_CUDA_ONE_PASS_DQ", "writer")  # the tuner's candidates set their own, then restore it
    key, result = tune_one_class(tmp_path, monkeypatch, 128, True, backward=True)
    assert os.environ["FLASHJIT_CUDA_ONE_PASS_DQ"] == "writer"
    monkeypatch.delenv("FLASHJIT_CUDA_ONE_PASS_DQ")
    # A causal class: the one pass's diagonal order is a candidate too.
    assert key.startswith("bwd_") and set(result["tflops"]) == {"split", "one-pass", "one-pass-diagonal"}
    assert f"{key} {result['tiles']}" in flashjit.cuda.tuning_info()

    info = flashjit.cuda.device_info()

    def workspace(pass_name):
        # What a backward of that class takes once its pass is stored: the one pass holds dQ's
        # float32 sums, 4 bytes a scratch row a head dim (B2 H4 N1024 D128: 4 MiB); split, 8 bytes a row.
        _C.cuda_save_tuning(info["name"], info["arch"], f"{key} {pass_name} 1\n")
        shape = (2, 4, 1024, 128)
        q, k, v, o, dout = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(5))
        lse = torch.zeros(shape[:3], device="cuda")
        grads = [torch.empty_like(q) for _ in range(3)]
        return _C.backward(q, k, v, o, lse, dout, *grads, prepare=True, mask=None, scale=None, softcap=0.0,
                           causal=1, window_left=-1, window_right=0, dropout_p=0.0, seed=0, offset=0,
                           num_threads=0, stream=torch.cuda.current_stream().cuda_stream)

    sums = 4 * 2 * 4 * 1024 * 128
    assert workspace("one-pass") >= sums > workspace("split")
    assert workspace("one-pass-diagonal") >= sums
    monkeypatch.setenv("FLASHJIT_CUDA_BACKWARD", "split")  # the setting wins over the tuned pass
    assert workspace("one-pass") < sums
