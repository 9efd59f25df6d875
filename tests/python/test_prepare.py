"""fj_attention_prepare_* and the caller's workspace, the C API's way to record calls into CUDA
graphs that must hold no memory nodes (MLX's command encoder adds them as child graphs):
validation as the call's, nothing written, the workspace's size; on CUDA a call with the
workspace gives the call's results, and a graph recorded after prepare replays them bit for bit."""

import pytest
import torch

from flashjit import _C
from conftest import DEVICE

cuda_only = pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available(),
                               reason="needs FLASHJIT_TEST_DEVICE=cuda and a GPU")
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def options(causal):
    return dict(mask=None, scale=None, softcap=0.0, causal=causal, window_left=-1, window_right=0 if causal else -1,
                dropout_p=0.0, seed=0, offset=0, num_threads=0)


def problem(seqlen=130, head_dim=64):
    torch.manual_seed(0)
    shape = (2, 4, seqlen, head_dim)
    q, k, v, dout = (torch.randn(shape, device=DEVICE, dtype=DTYPE) for _ in range(4))
    o = torch.full(shape, float("nan"), device=DEVICE, dtype=DTYPE)
    lse = torch.full(shape[:3], float("nan"), device=DEVICE, dtype=torch.float32)
    grads = [torch.full(shape, float("nan"), device=DEVICE, dtype=DTYPE) for _ in range(3)]
    return q, k, v, o, lse, dout, grads


def stream():
    return torch.cuda.current_stream().cuda_stream if DEVICE == "cuda" else 0


@pytest.mark.parametrize("causal", [0, 2])
def test_prepare_writes_nothing_and_sizes_the_workspace(causal):
    q, k, v, o, lse, dout, (dq, dk, dv) = problem()
    forward_bytes = _C.forward(q, k, v, o, lse, prepare=True, stream=stream(), **options(causal))
    backward_bytes = _C.backward(q, k, v, o, lse, dout, dq, dk, dv, prepare=True, stream=stream(), **options(causal))
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    for name, x in (("o", o), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isnan(x).all(), f"prepare wrote {name}"
    if DEVICE == "cuda":
        # The forward recorded into a graph takes no scratch where it does not split its keys
        # (many queries); the backward's holds a float row statistic or two for each query row.
        assert forward_bytes == 0
        assert backward_bytes >= 4 * q.shape[0] * q.shape[1] * q.shape[2]
    else:
        assert forward_bytes == backward_bytes == 0


def test_prepare_rejects_what_the_call_rejects():
    q, k, v, o, lse, dout, (dq, dk, dv) = problem()
    with pytest.raises(ValueError, match="k"):
        _C.forward(q, k[..., :32], v, o, lse, prepare=True, **options(0))
    with pytest.raises(ValueError, match="workspace"):
        _C.forward(q, k, v, o, lse, workspace=(0, 64), **options(0))


@cuda_only
def test_a_call_with_the_workspace_gives_the_calls_results():
    q, k, v, o, lse, dout, (dq, dk, dv) = problem(seqlen=333)
    kw = options(2)
    _C.forward(q, k, v, o, lse, stream=stream(), **kw)
    _C.backward(q, k, v, o, lse, dout, dq, dk, dv, stream=stream(), **kw)
    size = _C.backward(q, k, v, o, lse, dout, dq, dk, dv, prepare=True, stream=stream(), **kw)
    workspace = torch.empty(size, device="cuda", dtype=torch.uint8)
    o2, lse2 = torch.full_like(o, float("nan")), torch.full_like(lse, float("nan"))
    _C.forward(q, k, v, o2, lse2, stream=stream(), workspace=(workspace.data_ptr(), size), **kw)
    grads = [torch.full_like(dq, float("nan")) for _ in range(3)]
    _C.backward(q, k, v, o, lse, dout, *grads, stream=stream(), workspace=(workspace.data_ptr(), size), **kw)
    torch.cuda.synchronize()
    # The forward with a workspace takes no scratch of its own (and, with less than it needs to
    # split its keys, does not split them): the same values to rounding. The backward's kernels
    # are the same: the same bits.
    torch.testing.assert_close(o2, o, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse2, lse, atol=1e-3, rtol=1e-3)
    for name, got, want in zip(("dq", "dk", "dv"), grads, (dq, dk, dv)):
        assert torch.equal(got, want), name
    with pytest.raises(ValueError, match="workspace_bytes"):
        _C.backward(q, k, v, o, lse, dout, *grads, stream=stream(), workspace=(workspace.data_ptr(), size - 1), **kw)


@cuda_only
@pytest.mark.parametrize("head_dim", [64, 128])
def test_a_graph_recorded_after_prepare_replays_the_calls(head_dim):
    q, k, v, o, lse, dout, (dq, dk, dv) = problem(seqlen=257, head_dim=head_dim)
    kw = options(2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _C.forward(q, k, v, o, lse, prepare=True, stream=stream(), **kw)
        size = _C.backward(q, k, v, o, lse, dout, dq, dk, dv, prepare=True, stream=stream(), **kw)
    torch.cuda.current_stream().wait_stream(side)
    workspace = torch.empty(size, device="cuda", dtype=torch.uint8)
    ws = (workspace.data_ptr(), size)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _C.forward(q, k, v, o, lse, stream=stream(), workspace=ws, **kw)
        _C.backward(q, k, v, o, lse, dout, dq, dk, dv, stream=stream(), workspace=ws, **kw)

    with torch.no_grad():  # fresh inputs in the recorded buffers
        for x in (q, k, v, dout):
            x.copy_(torch.randn_like(x))
    want_o, want_lse = torch.empty_like(o), torch.empty_like(lse)
    want = [torch.empty_like(dq) for _ in range(3)]
    _C.forward(q, k, v, want_o, want_lse, stream=stream(), workspace=ws, **kw)
    _C.backward(q, k, v, want_o, want_lse, dout, *want, stream=stream(), workspace=ws, **kw)
    for x in (o, lse, dq, dk, dv):
        x.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for name, got, expected in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv), (want_o, want_lse, *want)):
        assert torch.isfinite(expected).all(), name
        assert torch.equal(got, expected), name


@cuda_only
def test_a_decoding_graph_splits_its_keys_in_the_workspace():
    # One query against 8k keys: prepare sizes the split forward's partials, and the call
    # recorded with that workspace (no allocation node in the graph) splits as the eager call
    # does: the replay is its bits. Given less, the call runs unsplit, still right.
    torch.manual_seed(0)
    q = torch.randn(1, 8, 1, 128, device="cuda", dtype=DTYPE)
    k, v = (torch.randn(1, 8, 8192, 128, device="cuda", dtype=DTYPE) for _ in range(2))
    o, want = (torch.full_like(q, float("nan")) for _ in range(2))
    lse, want_lse = (torch.full(q.shape[:3], float("nan"), device="cuda") for _ in range(2))
    kw = options(0)
    size = _C.forward(q, k, v, o, lse, prepare=True, stream=stream(), **kw)
    assert size >= 2 * 8 * 128 * 4, "the partials of at least two splits a query row"
    workspace = torch.empty(size, device="cuda", dtype=torch.uint8)
    _C.forward(q, k, v, want, want_lse, stream=stream(), **kw)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _C.forward(q, k, v, o, lse, stream=stream(), workspace=(workspace.data_ptr(), size), **kw)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(o, want) and torch.equal(lse, want_lse)
    small = torch.full_like(q, float("nan"))
    _C.forward(q, k, v, small, lse, stream=stream(), workspace=(workspace.data_ptr(), size - 16), **kw)
    torch.cuda.synchronize()
    torch.testing.assert_close(small, want, atol=2e-2, rtol=2e-2)
