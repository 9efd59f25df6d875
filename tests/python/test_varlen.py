"""flashjit.varlen_attention: each packed sequence attends only to its own keys, against
float64 attention of that sequence alone (outputs, LSE, gradients), with every option."""

import pytest
import torch

import flashjit
from conftest import DEVICE
from reference import check, leaves, naive_attention

LENGTHS_Q = [5, 0, 1, 33, 130, 64, 7]
LENGTHS_K = [9, 4, 1, 33, 97, 64, 0]


def _offsets(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


# Head dims 64 and 128 in bfloat16 take the sm_90a kernels on an H100/H200: a launch
# a sequence, or with FLASHJIT_CUDA_VARLEN=1 the single-launch forward (every
# sequence's work tiles in one persistent grid); 24/16 the mma.sync kernels.
@pytest.mark.parametrize("launch", ["sequences", "one"] if DEVICE == "cuda" else ["sequences"])
@pytest.mark.parametrize("D,Dv", [(24, 16), (64, 64), (128, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(causal="top_left"), dict(window=(6, 2)),
                                     dict(softcap=5.0, scale=0.3), dict(dropout_p=0.25, seed=11, offset=3)])
def test_matches_each_sequence_alone(dtype, options, D, Dv, launch, monkeypatch):
    monkeypatch.setenv("FLASHJIT_CUDA_VARLEN", "1" if launch == "one" else "0")
    torch.manual_seed(0)
    Hq, Hkv = 4, 2
    q = torch.randn(sum(LENGTHS_Q), Hq, D, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(LENGTHS_K), Hkv, D, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(LENGTHS_K), Hkv, Dv, device=DEVICE, dtype=dtype, requires_grad=True)
    cu_q, cu_k = _offsets(LENGTHS_Q), _offsets(LENGTHS_K)
    o, lse = flashjit.varlen_attention(q, k, v, cu_q, cu_k, max(LENGTHS_Q), max(LENGTHS_K), return_lse=True,
                                       **options)
    assert o.shape == (sum(LENGTHS_Q), Hq, Dv) and lse.shape == (Hq, sum(LENGTHS_Q))
    dout = torch.randn_like(o)
    o.backward(dout)
    causal = options.get("causal", False)
    causal = "bottom_right" if causal is True else causal
    reference_options = dict(causal=causal, window=options.get("window", (-1, -1)),
                             softcap=options.get("softcap", 0.0), scale=options.get("scale"))
    dk_seen = torch.zeros(k.shape[0], dtype=torch.bool)
    keep_all = None
    if options.get("dropout_p"):  # the padded batch's mask
        keep_all = torch.from_numpy(flashjit.dropout_keep_mask(len(LENGTHS_Q), Hq, max(LENGTHS_Q), max(LENGTHS_K),
                                                               dropout_p=options["dropout_p"], seed=options["seed"],
                                                               offset=options["offset"]))
    for i in range(len(LENGTHS_Q)):
        qb, qe = cu_q[i].item(), cu_q[i + 1].item()
        kb, ke = cu_k[i].item(), cu_k[i + 1].item()
        if qe == qb:
            continue
        view = [x.detach()[b:e].transpose(0, 1).unsqueeze(0) for x, b, e in ((q, qb, qe), (k, kb, ke), (v, kb, ke))]
        keep = None if keep_all is None else keep_all[i:i + 1, :, :qe - qb, :ke - kb]
        exact = leaves(*view, dtype=torch.float64, device="cpu")
        base = leaves(*view, device="cpu")
        exact_o, exact_lse = naive_attention(*exact, dropout_p=options.get("dropout_p", 0.0), keep=keep,
                                             **reference_options)
        base_o, base_lse = naive_attention(*base, dropout_p=options.get("dropout_p", 0.0), keep=keep, dtype=dtype,
                                           **reference_options)
        check("o", o[qb:qe].transpose(0, 1).unsqueeze(0), base_o, exact_o, dtype)
        check("lse", lse[:, qb:qe].unsqueeze(0), base_lse, exact_lse, torch.float32)
        g = dout[qb:qe].transpose(0, 1).unsqueeze(0).cpu()
        exact_o.backward(g.double())
        base_o.backward(g)
        for name, grad, b, e, base_x, exact_x in (("dq", q.grad, qb, qe, base[0], exact[0]),
                                                  ("dk", k.grad, kb, ke, base[1], exact[1]),
                                                  ("dv", v.grad, kb, ke, base[2], exact[2])):
            check(name, grad[b:e].transpose(0, 1).unsqueeze(0), base_x.grad, exact_x.grad, dtype)
        dk_seen[kb:ke] = True
    # Keys of a sequence without queries get no gradient.
    assert (k.grad[~dk_seen] == 0).all() and (v.grad[~dk_seen] == 0).all()


def test_no_grad_and_a_sequence_without_keys():
    q = torch.randn(6, 2, 8, device=DEVICE)
    k = torch.randn(3, 2, 8, device=DEVICE)
    o, lse = flashjit.varlen_attention(q, k, k, _offsets([3, 3]), _offsets([3, 0]), return_lse=True)
    assert (o[3:] == 0).all() and torch.isneginf(lse[:, 3:]).all()
    expected = flashjit.attention(q[:3].transpose(0, 1)[None], k.transpose(0, 1)[None], k.transpose(0, 1)[None])
    torch.testing.assert_close(o[:3], expected[0].transpose(0, 1), rtol=0, atol=0)


@pytest.mark.parametrize("cu_q,cu_k,max_q,match", [
    ([0, 3, 6], [0, 2], None, r"cu_seqlens_k: expected 3 offsets \(batch \+ 1, as cu_seqlens_q\), got 2"),
    ([1, 3, 6], [0, 2, 4], None, r"cu_seqlens_q: expected offset 0 to be 0, got 1"),
    ([0, 4, 3, 6], [0, 1, 2, 4], None, r"cu_seqlens_q: offsets must not decrease; offset 2 is 3 after 4"),
    ([0, 3, 5], [0, 2, 4], None,
     r"cu_seqlens_q: expected the last offset to be the number of packed rows \(6\), got 5"),
    ([0, 3, 6], [0, 2, 4], 2, r"max_seqlen_q: expected 0 \(the longest\) or a bound >= the longest sequence "
                              r"\(3\), got 2"),
])
def test_bad_offsets(cu_q, cu_k, max_q, match):
    q, k = torch.randn(6, 2, 8), torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match=match):
        flashjit.varlen_attention(q, k, k, torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32),
                                  max_q)
    with pytest.raises(ValueError, match="cu_seqlens_q: expected a 1-d int32"):
        flashjit.varlen_attention(q, k, k, torch.tensor([0.0, 6.0]), torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"q: expected 3 dims \[total, heads, head_dim\], got 4"):
        flashjit.varlen_attention(q[None], k, k, torch.tensor([0, 6]), torch.tensor([0, 4]))


def _small_batch(requires_grad=True):
    torch.manual_seed(1)
    q = torch.randn(sum(LENGTHS_Q), 4, 16, device=DEVICE, requires_grad=requires_grad)
    k = torch.randn(sum(LENGTHS_K), 2, 16, device=DEVICE, requires_grad=requires_grad)
    v = torch.randn(sum(LENGTHS_K), 2, 16, device=DEVICE, requires_grad=requires_grad)
    return q, k, v


def test_compiles_into_one_graph_with_its_gradients():
    """flashjit::varlen_fwd / varlen_bwd are custom ops: torch.compile(fullgraph=True) traces
    through them (fake kernels for the shapes) and gives eager's outputs and gradients."""
    cu_q, cu_k = _offsets(LENGTHS_Q), _offsets(LENGTHS_K)

    def step(q, k, v):
        return flashjit.varlen_attention(q, k, v, cu_q, cu_k, max(LENGTHS_Q), max(LENGTHS_K), causal=True)

    q, k, v = _small_batch()
    eager = step(q, k, v)
    eager.square().sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v)
    compiled.square().sum().backward()
    assert torch.equal(compiled, eager)
    for got, expected in zip((q.grad, k.grad, v.grad), grads):
        assert torch.equal(got, expected)


def test_opcheck():
    from torch.library import opcheck

    q, k, v = _small_batch()
    cu_q, cu_k = _offsets(LENGTHS_Q), _offsets(LENGTHS_K)
    options = (None, None, 0.0, 2, -1, -1, 0.0, None, 0, True)
    opcheck(torch.ops.flashjit.varlen_fwd.default, (q, k, v, cu_q, cu_k, 0, 0, *options))
    o, lse = flashjit.varlen_attention(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    opcheck(torch.ops.flashjit.varlen_bwd.default,
            (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o.detach(), lse, cu_q, cu_k, 0, 0, *options))


# With FLASHJIT_CUDA_VARLEN=1, offsets in GPU memory with both maxima given stay there: a
# kernel builds the sequences' table (the same order as the host's, so the same bits), no
# value is checked, and offsets past the packed rows are clamped, never followed. Where one
# launch does not apply (head dim 24: the mma.sync kernels) the backend copies them to the
# host and checks them as host offsets.
@pytest.mark.skipif(DEVICE != "cuda", reason="offsets in GPU memory")
def test_offsets_in_gpu_memory(monkeypatch):
    monkeypatch.setenv("FLASHJIT_CUDA_VARLEN", "1")
    torch.manual_seed(0)
    for D in (64, 24):
        q = torch.randn(sum(LENGTHS_Q), 4, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(sum(LENGTHS_K), 2, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(sum(LENGTHS_K), 2, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        cu_q, cu_k = _offsets(LENGTHS_Q), _offsets(LENGTHS_K)
        max_q, max_k = max(LENGTHS_Q), max(LENGTHS_K)
        results = []
        for offsets in ((cu_q, cu_k), (cu_q.cpu(), cu_k.cpu())):
            o = flashjit.varlen_attention(q, k, v, *offsets, max_q, max_k, causal=True)
            o.backward(torch.ones_like(o))
            results.append([o.detach()] + [x.grad.clone() for x in (q, k, v)])
            for x in (q, k, v):
                x.grad = None
        for on_device, on_host in zip(*results):
            assert torch.equal(on_device, on_host)
        past_end = cu_q.clone()
        past_end[-1] += 100  # past the packed rows
        decreasing = cu_k.clone()
        decreasing[1], decreasing[2] = decreasing[2], decreasing[1] - 1  # overlapping sequences
        one_launch = D == 64 and torch.cuda.get_device_capability() == (9, 0)
        for bad_q, bad_k in ((past_end, cu_k), (cu_q, decreasing)):
            if one_launch:
                o = flashjit.varlen_attention(q, k, v, bad_q, bad_k, max_q, max_k, causal=True)
                o.sum().backward()
                torch.cuda.synchronize()  # no fault: the kernels stayed inside the operands and the scratch
            else:
                with pytest.raises(ValueError, match="cu_seqlens_[qk]: (expected the last offset|offsets must not)"):
                    flashjit.varlen_attention(q, k, v, bad_q, bad_k, max_q, max_k, causal=True)
