"""CUDA graphs: a captured forward+backward replays to the eager results (the
backward's scratch, and a split forward's partials, are stream-ordered allocations, graph
nodes under capture), and a kernel that would need compiling during capture is a clear error."""

import pytest
import torch

import flashjit
from conftest import DEVICE

pytestmark = pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available(),
                                reason="needs FLASHJIT_TEST_DEVICE=cuda and a GPU")


@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 64), (torch.float16, 256), (torch.float32, 32)])
def test_captured_forward_backward_replays_eager_results(dtype, head_dim):
    shape = (2, 4, 200, head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape, device="cuda", dtype=dtype)

    def step():
        out = flashjit.scaled_dot_product_attention(q, k, v, is_causal=True)
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles or loads every kernel before capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    with torch.no_grad():  # fresh inputs in the captured buffers
        for x in (q, k, v, dout):
            x.copy_(torch.randn_like(x))
    expected = step()
    for x in captured:
        x.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for name, got, want in zip(("out", "dq", "dk", "dv"), captured, expected):
        assert torch.isfinite(want).all(), name
        # Deterministic kernels: the replay is bit for bit the eager call.
        assert torch.equal(got, want), name


def test_compiling_during_capture_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(tmp_path))  # an empty disk cache
    flashjit.cuda.clear_memory_cache()
    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.float16)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(NotImplementedError, match="capturing a CUDA graph.*precompile"):
        with torch.cuda.graph(graph):
            flashjit.scaled_dot_product_attention(q, q, q)
    # Outside capture the same call compiles and runs.
    out = flashjit.scaled_dot_product_attention(q, q, q)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("tiles", ["sched=static", "sched=static,chain=tiles"])
@pytest.mark.parametrize("causal", [False, True])
def test_captured_static_schedule_replays_eager_results(monkeypatch, causal, tiles):
    # With sched=static the sm_90a forward keeps its persistent grid under capture (no
    # counter to take): more work tiles than SMs (256 query blocks), so that blocks run
    # several (and, chained, carry one into the next), replayed on fresh inputs, bit for
    # bit the eager call.
    monkeypatch.setenv("FLASHJIT_CUDA_TILES", tiles)
    q, k, v = (torch.randn(2, 16, 1000, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flashjit.attention(q, k, v, causal=causal)  # compiled before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = flashjit.attention(q, k, v, causal=causal)
    for x in (q, k, v):
        x.copy_(torch.randn_like(x))
    expected = flashjit.attention(q, k, v, causal=causal)
    captured.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(expected).all()
    assert torch.equal(captured, expected)


@pytest.mark.parametrize("overlap", ["default", "eager"])
@pytest.mark.parametrize("masked", [False, True])
def test_captured_decoding_splits_its_keys_as_the_eager_call(masked, overlap, tmp_path, monkeypatch):
    # One query against 8k keys (GQA 32/8): the eager call splits the keys over many blocks and
    # combines their partials; captured, it does the same (the partials in a graph allocation),
    # so the graph holds the combine kernel and its replay is bit for bit the eager call; by
    # default the combine is launched programmatically inside the graph, with
    # FLASHJIT_CUDA_OVERLAP=eager plainly.
    if overlap != "default":
        monkeypatch.setenv("FLASHJIT_CUDA_OVERLAP", overlap)
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, 8192, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = torch.rand(1, 1, 1, 8192, device="cuda") > 0.2 if masked else None

    def call():
        return flashjit.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    call()  # compiled before capture
    torch.cuda.synchronize()
    # keep_graph: torch 2.8+ destroys the captured graph once instantiated (nothing to dump).
    try:
        graph = torch.cuda.CUDAGraph(keep_graph=True)
    except TypeError:
        graph = torch.cuda.CUDAGraph()
    graph.enable_debug_mode()
    with torch.cuda.graph(graph):
        captured = call()
    graph.debug_dump(str(tmp_path / "graph.dot"))
    assert "fj_attention_forward_combine" in (tmp_path / "graph.dot").read_text()
    for x in (q, k, v):
        x.copy_(torch.randn_like(x))
    expected = call()
    captured.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(expected).all()
    assert torch.equal(captured, expected)
