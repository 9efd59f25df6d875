"""flashjit.distributed.ring_attention and ulysses_attention over gloo on the CPU: 2 and 4 processes, each holding its
shard of one sequence, against flashjit.attention on the whole sequence in one process (outputs,
LSEs and the gradients of q, k and v), both layouts, causal and not, GQA, windows, float64 and
float32; the same bits on a second run; uneven shards refused with their lengths named."""

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flashjit
from conftest import DEVICE
from flashjit import distributed as fd

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
cpu_ranks = pytest.mark.skipif(DEVICE != "cpu", reason="gloo ranks on the CPU")

CASES = [
    dict(causal=False), dict(causal=True), dict(causal=True, window=(40, -1)), dict(causal=False, window=(30, 20)),
    dict(causal=True, softcap=5.0, scale=0.3),
]


def check_rank(rank, world, layout, case, dtype, hq, hkv, chunk, method):
    torch.manual_seed(1234)
    S = chunk * (2 * world if layout == "zigzag" else world)
    q = torch.randn(2, hq, S, 32, dtype=dtype)
    k, v = (torch.randn(2, hkv, S, 32, dtype=dtype) for _ in range(2))
    dout = torch.randn(2, hq, S, 32, dtype=dtype)
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref, lse_ref = flashjit.attention(*full, return_lse=True, **case)
    o_ref.backward(dout)
    local = [fd.shard(x, layout=layout).requires_grad_() for x in (q, k, v)]
    o, lse = method(*local, layout=layout, return_lse=True, **case)
    o.backward(fd.shard(dout, layout=layout))
    tol = 1e-10 if dtype == torch.float64 else 3e-5
    pairs = [("o", o, o_ref), ("lse", lse, lse_ref)] + [(name, x.grad, y.grad) for name, x, y in
                                                         zip(("dq", "dk", "dv"), local, full)]
    for name, got, want in pairs:
        want = fd.shard(want.detach(), layout=layout)
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got)), f"{name}: non-finite entries differ"
        err = (got.detach().double() - want.double())[finite].abs().max().item() if finite.any() else 0.0
        assert err <= tol * max(1.0, want[finite].abs().max().item()), f"{name}: error {err:.3g}"
    # The same bits on a second run (a fixed order of merges and sums).
    again = [x.detach().clone().requires_grad_() for x in local]
    o2 = method(*again, layout=layout, **case)
    o2.backward(fd.shard(dout, layout=layout))
    assert torch.equal(o2, o) and all(torch.equal(a.grad, b.grad) for a, b in zip(again, local)), "not deterministic"
    # The whole output gathered back equals the reference on every rank.
    assert torch.allclose(fd.unshard(o.detach(), layout=layout).double(), o_ref.detach().double(), atol=tol * 10)


def worker(rank, world, store, failures):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        # float32 with two ranks only: its path differs from float64's in the dtype alone, and four
        # ranks on CI's two cores cost twice two's.
        dtypes = (torch.float64, torch.float32) if world == 2 else (torch.float64,)
        for layout in fd.LAYOUTS:
            for case in CASES:
                for dtype in dtypes:
                    for hq, hkv in ((4, 4), (4, 2)):
                        for method in (fd.ring_attention, fd.ulysses_attention):
                            if method is fd.ulysses_attention and hkv % world:
                                continue  # its heads must divide by the ranks (checked below)
                            try:
                                check_rank(rank, world, layout, case, dtype, hq, hkv, 24, method)
                            except Exception:
                                failures.put(f"rank {rank}, {method.__name__}, {layout}, {case}, {dtype}, "
                                             f"{hq}/{hkv}:\n{traceback.format_exc(limit=3)}")
        # Errors, each named: shards of different lengths, heads that do not divide by the ranks
        # (all-to-all), an odd shard for zigzag.
        uneven = torch.randn(1, 2, 8 + (2 if rank == 1 else 0), 16)
        heads = torch.randn(1, world + 1, 8, 16)
        odd = torch.randn(1, 2, 7, 16)
        for call, inputs, expected in ((fd.ring_attention, uneven, "same length"),
                                       (fd.ulysses_attention, heads, "must divide"),
                                       (fd.ring_attention, odd, "multiple of 2")):
            try:
                call(inputs, inputs, inputs)
                failures.put(f"rank {rank}: {call.__name__} accepted {tuple(inputs.shape)} ({expected})")
            except ValueError as error:
                if expected not in str(error):
                    failures.put(f"rank {rank}: unclear error {error}")
    finally:
        dist.destroy_process_group()


@cpu_ranks
@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_matches_one_process(world, tmp_path):
    context = mp.get_context("spawn")
    failures = context.Queue()
    os.environ.setdefault("FLASHJIT_NUM_THREADS", "1")  # the ranks share this machine's cores
    mp.start_processes(worker, args=(world, str(tmp_path / "store"), failures), nprocs=world, join=True,
                       start_method="spawn")
    found = []
    while not failures.empty():
        found.append(failures.get())
    assert not found, "\n".join(found[:5])


def one_rank(rank, world, store, failures, device):
    dist.init_process_group("gloo" if device == "cpu" else "nccl", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(7)
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        q, k, v = (torch.randn(2, 4, 96, 32).to(device, dtype) for _ in range(3))
        for method in (fd.ring_attention, fd.ulysses_attention):
            for layout in fd.LAYOUTS:
                for case in CASES:
                    got = method(fd.shard(q, layout=layout), fd.shard(k, layout=layout), fd.shard(v, layout=layout),
                                 layout=layout, **case)
                    if not torch.equal(got, flashjit.attention(q, k, v, **case)):
                        failures.put(f"{method.__name__}, {layout}, {case}: not attention()'s bits with one rank")
    finally:
        dist.destroy_process_group()


def test_one_rank_is_exactly_attention(tmp_path):
    # A world of one holds the whole sequence in order: the result is flashjit.attention's, bit for bit
    # (on FLASHJIT_TEST_DEVICE: gloo on the CPU, NCCL on a GPU).
    failures = mp.get_context("spawn").Queue()
    mp.start_processes(one_rank, args=(1, str(tmp_path / "store"), failures, DEVICE), nprocs=1, join=True,
                       start_method="spawn")
    found = []
    while not failures.empty():
        found.append(failures.get())
    assert not found, "\n".join(found[:5])


@cpu_ranks
def test_without_a_process_group_the_error_says_what_to_do():
    q = torch.randn(1, 2, 8, 16)
    if dist.is_initialized():
        pytest.skip("a process group is initialised")
    with pytest.raises(RuntimeError, match="init_process_group"):
        fd.ring_attention(q, q, q)
    with pytest.raises(ValueError, match="layout"):
        fd.chunks_of(0, 2, "striped")
