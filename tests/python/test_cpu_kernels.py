"""The CPU kernel variants (flashjit/cpu.h): calls take the widest instruction set this
processor runs; FLASHJIT_CPU_ISA picks another compiled-in variant, which computes the
same attention (to float32 rounding), and a variant that is not compiled in, or that the
processor cannot run, is an error naming the variable, not an illegal instruction."""

import os
import subprocess
import sys

import numpy as np
import pytest

from flashjit import _C

VARIANT, VARIANTS = _C.cpu_kernels()

CALL = """
import sys, numpy as np, flashjit
from flashjit import _C
rng = np.random.default_rng(0)
q, k, v, dout = (rng.standard_normal((2, 4, 150, 72)).astype(np.float32) for _ in range(4))
o, lse = flashjit.attention(q, k, v, causal=True, return_lse=True)
dq, dk, dv = flashjit.attention_backward(q, k, v, o, lse, dout, causal=True)
np.savez(sys.argv[1], o=o, lse=lse, dq=dq, dk=dk, dv=dv)
print(_C.cpu_kernels()[0])
"""


def run(variant, out):
    env = dict(os.environ, FLASHJIT_CPU_ISA=variant)
    return subprocess.run([sys.executable, "-c", CALL, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_info_names_the_variant():
    text = subprocess.run([sys.executable, "-m", "flashjit", "info"], capture_output=True, text=True,
                          timeout=120).stdout
    assert f"cpu kernels: {VARIANT} (compiled: {VARIANTS};" in text


@pytest.fixture(scope="module")
def widest(tmp_path_factory):
    """The outputs of the call under the default choice (the widest variant), computed once."""
    path = tmp_path_factory.mktemp("widest") / "auto.npz"
    result = run("auto", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == VARIANT
    return path


@pytest.mark.parametrize("variant", VARIANTS.split(","))
def test_every_variant_computes_the_same_attention(variant, widest, tmp_path):
    chosen = run(variant, tmp_path / f"{variant}.npz")
    if chosen.returncode != 0 and "cannot run" in chosen.stderr:
        pytest.skip(f"this processor cannot run the {variant} kernels")
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.strip() == variant
    expected, got = np.load(widest), np.load(tmp_path / f"{variant}.npz")
    for name in ("o", "lse", "dq", "dk", "dv"):
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=2e-5, err_msg=name)


def test_an_unknown_variant_is_named():
    result = run("avx9000", "unused")
    assert result.returncode != 0
    assert "FLASHJIT_CPU_ISA: 'avx9000' is not a compiled-in variant; expected auto or one of " + VARIANTS \
        in result.stderr


BF16_CALL = """
import sys, numpy as np, torch, flashjit
from flashjit import _C
torch.manual_seed(0)
q, k, v, dout = (torch.randn(2, 4, 150, 72).to(torch.bfloat16) for _ in range(4))
o, lse = flashjit.attention(q, k, v, causal=True, return_lse=True)
dq, dk, dv = flashjit.attention_backward(q, k, v, o, lse, dout, causal=True)
np.savez(sys.argv[1], o=o.float().numpy(), lse=lse.numpy(), dq=dq.float().numpy(), dk=dk.float().numpy(),
         dv=dv.float().numpy())
print(_C.cpu_kernels()[0])
"""


@pytest.mark.parametrize("variant", VARIANTS.split(","))
def test_every_variant_computes_bfloat16_attention_within_its_rounding(variant, tmp_path):
    # The amx variant multiplies bfloat16 on AMX tiles and rounds P to bfloat16 for P V, so its
    # outputs are not those of the others bit for bit; each must stay within bfloat16's rounding
    # of the float64 attention of the same inputs.
    env = dict(os.environ, FLASHJIT_CPU_ISA=variant)
    result = subprocess.run([sys.executable, "-c", BF16_CALL, str(tmp_path / "out.npz")], env=env,
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "cannot run" in result.stderr:
        pytest.skip(f"this processor cannot run the {variant} kernels")
    assert result.returncode == 0, result.stderr
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(2, 4, 150, 72).to(torch.bfloat16).double().requires_grad_() for _ in range(4))
    scores = (q @ k.transpose(-1, -2)) / 72 ** 0.5
    scores = scores.masked_fill(torch.ones(150, 150, dtype=torch.bool).triu(1), float("-inf"))
    o = scores.softmax(-1) @ v
    o.backward(dout.detach())
    got = np.load(tmp_path / "out.npz")
    for name, exact, tol in (("o", o, 1e-2), ("lse", scores.logsumexp(-1), 1e-2), ("dq", q.grad, 5e-2),
                             ("dk", k.grad, 5e-2), ("dv", v.grad, 5e-2)):
        exact = exact.detach().numpy()
        err = np.abs(got[name] - exact).max()
        assert err <= tol * max(1.0, np.abs(exact).max()), f"{variant} {name}: error {err:.3g}"


@pytest.mark.parametrize("options", [dict(causal=True), dict(window=(40, 3)), dict(softcap=4.0, dropout_p=0.2)],
                         ids=["causal", "window", "softcap-dropout"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_backward_schedules_agree_bit_for_bit(dtype, options):
    # One key/value head with two workers (fewer heads than workers: a dQ pass and a dK/dV pass
    # over blocks; the problem is large enough for two, src/cpu/thread_pool.cpp) and with one
    # worker (one pass a head, dQ summed in the task) add the same products in the same order.
    torch = pytest.importorskip("torch")
    torch.manual_seed(5)
    dt = getattr(torch, dtype)
    q = torch.randn(1, 2, 600, 72).to(dt)
    k, v = (torch.randn(1, 1, 630, 72).to(dt) for _ in range(2))
    dout = torch.randn(1, 2, 600, 72).to(dt)
    import flashjit
    o, lse = flashjit.attention(q, k, v, return_lse=True, seed=7, **options)
    one = flashjit.attention_backward(q, k, v, o, lse, dout, seed=7, num_threads=1, **options)
    two = flashjit.attention_backward(q, k, v, o, lse, dout, seed=7, num_threads=2, **options)
    for name, a, b in zip(("dq", "dk", "dv"), one, two):
        differ = (a != b).nonzero()
        assert differ.numel() == 0, (
            f"{name}: {len(differ)} elements differ between one and two workers (first at {differ[:3].tolist()}, "
            f"largest difference {(a.double() - b.double()).abs().max().item():.3g}; "
            f"FLASHJIT_CPU_ISA={os.environ.get('FLASHJIT_CPU_ISA', 'unset')}, {os.cpu_count()} processors)")
