"""flashjit.mlx: the attention primitives in MLX's graph (CPU stream). Outputs, LSE and
gradients (through mx.vjp) against the float64 reference, within the tolerance set by
naive attention in the same dtype, as in test_attention.py; mx.compile; the
mx.fast.scaled_dot_product_attention-style entry; errors."""

import numpy as np
import pytest
import torch

import flashjit

from reference import check, leaves, naive_attention

mx = pytest.importorskip("mlx.core")
fm = pytest.importorskip("flashjit.mlx")

pytestmark = pytest.mark.cpu_only  # MLX runs these on its CPU stream whatever the test device

DTYPES = {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}


def to_mlx(x, dtype):
    return mx.array(x.float().numpy()).astype(dtype)


def to_torch(x):
    return torch.from_numpy(np.array(x.astype(mx.float32)))


def run(B=2, Hq=4, Hkv=2, Sq=37, Sk=45, D=32, Dv=None, dtype=torch.float32, mask=None, dropout_p=0.0,
        **options):
    Dv = Dv or D
    q, k, v = (torch.randn(B, H, S, d).to(dtype) for H, S, d in ((Hq, Sq, D), (Hkv, Sk, D), (Hkv, Sk, Dv)))
    dout = torch.randn(B, Hq, Sq, Dv).to(dtype)
    mdt = DTYPES[dtype]
    mask_mx = None
    if mask is not None:
        mask_mx = mx.array(mask.numpy()) if mask.dtype == torch.bool else mx.array(mask.numpy())

    seed = 987654321987 if dropout_p else None

    def forward(q, k, v):
        return fm.attention(q, k, v, mask=mask_mx, dropout_p=dropout_p, seed=seed, offset=5, **options)

    (o,), grads = mx.vjp(forward, [to_mlx(x, mdt) for x in (q, k, v)], [to_mlx(dout, mdt)])
    _, lse = fm.attention(*(to_mlx(x, mdt) for x in (q, k, v)), mask=mask_mx, return_lse=True,
                          dropout_p=dropout_p, seed=seed, offset=5, **options)
    mx.eval(o, lse, *grads)
    assert o.dtype == mdt and o.shape == (B, Hq, Sq, Dv) and lse.dtype == mx.float32

    torch_options = {key: value for key, value in options.items() if key != "scale"}
    scale = options.get("scale")
    keep = None
    if dropout_p:
        keep = torch.from_numpy(flashjit.dropout_keep_mask(B, Hq, Sq, Sk, dropout_p=dropout_p, seed=seed, offset=5))
    exact = leaves(q, k, v)
    exact_o, exact_lse = naive_attention(*exact, attn_mask=mask, scale=scale, dropout_p=dropout_p, keep=keep,
                                         **torch_options)
    low = leaves(q, k, v)
    base_o, base_lse = naive_attention(*low, attn_mask=mask, scale=scale, dtype=dtype, dropout_p=dropout_p,
                                       keep=keep, **torch_options)
    check("o", to_torch(o).to(dtype), base_o, exact_o, dtype)
    check("lse", to_torch(lse), base_lse, exact_lse, torch.float32)
    exact_o.backward(dout.double())
    base_o.backward(dout)
    for name, got, base, ref in zip(("dq", "dk", "dv"), grads, low, exact):
        assert got.dtype == mdt
        check(name, to_torch(got).to(dtype), base.grad, ref.grad, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("D,Dv", [(32, 32), (64, 40), (128, 128)])
def test_dtypes_and_head_dims(dtype, D, Dv):
    run(D=D, Dv=Dv, dtype=dtype)


@pytest.mark.parametrize("options", [dict(causal=True), dict(causal="bottom_right"), dict(window=(6, 3)),
                                     dict(softcap=5.0), dict(scale=0.3)],
                         ids=["top_left", "bottom_right", "window", "softcap", "scale"])
def test_features(options):
    run(Sq=45, Sk=37, **options)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masks(kind):
    shape = (2, 1, 37, 45)
    mask = torch.rand(shape) > 0.3 if kind == "bool" else torch.randn(shape)
    run(mask=mask, dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_drops_the_documented_elements(dtype):
    """With a seed, the kept elements are flashjit.dropout_keep_mask's (those of every backend)."""
    run(dropout_p=0.25, dtype=dtype, causal="bottom_right")


def test_dropout_seed_from_mlx_random_state():
    q, k, v = (mx.random.normal((1, 2, 16, 32)) for _ in range(3))

    def drop():
        return fm.attention(q, k, v, dropout_p=0.5)

    mx.random.seed(3)
    first = drop()
    mx.random.seed(3)
    again = drop()
    other = drop()
    assert mx.array_equal(first, again).item() and not mx.array_equal(first, other).item()
    loss = lambda q: fm.attention(q, k, v, dropout_p=0.5, seed=11).sum()  # noqa: E731
    assert mx.array_equal(mx.grad(loss)(q), mx.grad(loss)(q)).item()  # the backward drops the same elements


def test_compile_matches_eager():
    q, k, v = (mx.random.normal((1, 4, 20, 32)) for _ in range(3))
    fn = lambda q, k, v: fm.attention(q, k, v, causal=True)  # noqa: E731
    assert mx.array_equal(mx.compile(fn)(q, k, v), fn(q, k, v)).item()
    grad = mx.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2))
    for a, b in zip(mx.compile(grad)(q, k, v), grad(q, k, v)):
        assert mx.array_equal(a, b).item()


@pytest.mark.parametrize("mapped", ["all", "q_only", "with_mask"])
def test_vmap_and_its_gradient(mapped):
    """mx.vmap over a leading axis folds it into the batch: the same as a loop over it."""
    q = mx.random.normal((3, 2, 4, 9, 16))
    k, v = (mx.random.normal((3, 2, 2, 11, 16)) for _ in range(2))
    mask = mx.random.uniform(shape=(3, 1, 1, 9, 11)) > 0.2
    in_axes = (0, 0, 0) if mapped != "q_only" else (0, None, None)
    if mapped == "q_only":
        k, v = k[0], v[0]

    def one(q, k, v, m=None):
        return fm.attention(q, k, v, mask=m, causal="bottom_right")

    if mapped == "with_mask":
        got = mx.vmap(one, in_axes=(0, 0, 0, 0))(q, k, v, mask)
        want = mx.stack([one(q[i], k[i], v[i], mask[i]) for i in range(3)])
    else:
        got = mx.vmap(one, in_axes=in_axes)(q, k, v)
        want = mx.stack([one(q[i], k if mapped == "q_only" else k[i], v if mapped == "q_only" else v[i])
                         for i in range(3)])
    assert mx.allclose(got, want, atol=1e-6).item()
    loss = lambda q: mx.vmap(one, in_axes=in_axes)(q, k, v).sum()  # noqa: E731
    grad = mx.grad(loss)(q)
    loop = mx.stack([mx.grad(lambda x: one(x, k if mapped == "q_only" else k[i],
                                           v if mapped == "q_only" else v[i]).sum())(q[i]) for i in range(3)])
    assert mx.allclose(grad, loop, atol=1e-5).item()
    per_example = mx.vmap(mx.grad(lambda q, k, v: one(q, k, v).sum()), in_axes=in_axes)(q, k, v)
    assert mx.allclose(per_example, loop, atol=1e-5).item()


def test_vmap_over_an_inner_axis():
    q = mx.random.normal((2, 3, 4, 9, 16))  # mapped axis 1: 3 items of batch 2
    k, v = (mx.random.normal((2, 3, 2, 11, 16)) for _ in range(2))
    got = mx.vmap(lambda q, k, v: fm.attention(q, k, v), in_axes=(1, 1, 1), out_axes=1)(q, k, v)
    want = mx.stack([fm.attention(q[:, i], k[:, i], v[:, i]) for i in range(3)], axis=1)
    assert mx.allclose(got, want, atol=1e-6).item()


@pytest.mark.parametrize("Sq", [30, 7, 1])  # fewer queries than keys: "causal" aligns bottom right
def test_sdpa_entry_matches_mlx_fast(Sq):
    q = mx.random.normal((2, 8, Sq, 64))
    k, v = (mx.random.normal((2, 2, 30, 64)) for _ in range(2))
    bias = mx.random.normal((Sq, 30))
    for mask in ("causal", bias, None):
        ours = fm.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
        theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
        assert mx.abs(ours - theirs).max().item() < 1e-5, mask


def test_reversed_mask_view_and_lse_without_gradient():
    q, k, v = (mx.random.normal((1, 2, 6, 16)) for _ in range(3))
    keep = mx.random.uniform(shape=(1, 1, 6, 6)) > 0.3
    keep = mx.concatenate([keep[..., :5], mx.ones((1, 1, 6, 1), dtype=mx.bool_)], axis=-1)
    reversed_view = keep[..., ::-1]
    got = fm.attention(q, k, v, mask=reversed_view)
    want = fm.attention(q, k, v, mask=mx.array(np.array(reversed_view)))
    assert mx.array_equal(got, want).item()
    grad = mx.grad(lambda q: fm.attention(q, k, v, return_lse=True)[1].sum())(q)
    assert mx.array_equal(grad, mx.zeros_like(q)).item()


def test_bad_inputs_raise_clear_errors():
    q = mx.zeros((1, 4, 8, 16))
    k = mx.zeros((1, 2, 8, 16))
    cases = [
        ((q[0], k, k), {}, "q: expected 4 dims"),
        ((q.astype(mx.int32), k, k), {}, "q: expected float32, float16, bfloat16 or float64"),
        ((q, mx.zeros((1, 3, 8, 16)), mx.zeros((1, 3, 8, 16))), {},
         r"k: query heads \(4\) must be a multiple of key/value heads \(3\)"),
        ((q, k, mx.zeros((1, 2, 9, 16))), {}, "v: expected shape"),
        ((q, k, k), dict(mask=mx.zeros((1, 4, 7, 8), dtype=mx.bool_)), "mask: dim 2 .* has size 7"),
        ((q, k, k), dict(mask=mx.zeros((1, 1, 8, 8), dtype=mx.int32)), "mask: expected a bool .* mask, got int32"),
        ((q, k, k), dict(causal="left"), "causal: expected"),
        ((q, k, k), dict(causal=True, window=(2, 3)), "window_right: expected -1 or 0 with a causal mask"),
        ((q, k, k), dict(softcap=-1.0), "softcap: expected a finite value >= 0"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            fm.attention(*args, **kwargs)


def test_stream_choice_is_checked():
    # MLX's GPU stream needs flashjit built against MLX's CUDA headers and mlx-cuda's libmlx;
    # elsewhere asking for it is a clear error, and the default stays on the CPU.
    q = mx.random.normal((1, 2, 16, 32))
    assert isinstance(flashjit._mlx.cuda_available(), bool)
    with pytest.raises(TypeError, match="stream: expected mx.cpu, mx.gpu"):
        flashjit.mlx.attention(q, q, q, stream="somewhere")
    before = flashjit._mlx.eval_gpu_host_time()
    cpu = flashjit.mlx.attention(q, q, q, stream=mx.cpu)
    mx.eval(cpu)
    assert flashjit._mlx.eval_gpu_host_time() == before  # the GPU's host timer counts eval_gpu alone
    assert mx.array_equal(cpu, flashjit.mlx.attention(q, q, q, stream=mx.Device(mx.cpu)))
    assert mx.array_equal(cpu, flashjit.mlx.attention(q, q, q, stream=mx.new_stream(mx.cpu)))
    if not flashjit._mlx.cuda_available():
        for gpu in (mx.gpu, mx.Device(mx.gpu, 1)):  # a GPU of any index, not only MLX's default one
            with pytest.raises(ValueError, match="gpu: MLX's GPU stream needs"):
                flashjit.mlx.attention(q, q, q, stream=gpu)


@pytest.mark.skipif(not flashjit._mlx.cuda_available(), reason="MLX on CUDA (mlx-cuda) and flashjit's eval_gpu")
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_stream_matches_the_cpu_stream(causal):
    q, k, v = (mx.random.normal((2, 4, 200, 64)).astype(mx.bfloat16) for _ in range(3))
    loss = lambda stream: lambda q, k, v: flashjit.mlx.attention(q, k, v, causal=causal, stream=stream).astype(
        mx.float32).sum()
    before = flashjit._mlx.eval_gpu_host_time()
    o_gpu = flashjit.mlx.attention(q, k, v, causal=causal, stream=mx.gpu)
    mx.eval(o_gpu)
    after = flashjit._mlx.eval_gpu_host_time()
    # One eval_gpu call, timed, its prepare pass a part of it.
    assert after["calls"] == before["calls"] + 1
    assert after["seconds"] - before["seconds"] >= after["prepare_seconds"] - before["prepare_seconds"] > 0
    o_cpu = flashjit.mlx.attention(q, k, v, causal=causal, stream=mx.cpu)
    assert mx.allclose(o_gpu.astype(mx.float32), o_cpu.astype(mx.float32), atol=2e-2, rtol=2e-2)
    g_gpu = mx.grad(loss(mx.gpu), argnums=(0, 1, 2))(q, k, v)
    g_cpu = mx.grad(loss(mx.cpu), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_gpu, g_cpu):
        assert mx.allclose(a.astype(mx.float32), b.astype(mx.float32), atol=5e-2, rtol=5e-2)


# The streams the primitives run on here: the CPU's, and MLX's GPU stream where MLX runs on CUDA.
PLACES = ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(
    not flashjit._mlx.cuda_available(), reason="MLX on CUDA (mlx-cuda) and flashjit's eval_gpu"))]


def _stream(place):
    return mx.gpu if place == "gpu" else mx.cpu


def _step(stream, q, k, v, **options):
    """o, lse and the gradients of q, k, v on `stream`, evaluated."""
    def loss(q, k, v):
        return flashjit.mlx.attention(q, k, v, stream=stream, **options).astype(mx.float32).square().sum()

    o, lse = flashjit.mlx.attention(q, k, v, stream=stream, return_lse=True, **options)
    grads = mx.grad(loss, argnums=(0, 1, 2))(q, k, v)
    mx.eval(o, lse, *grads)
    return [o, lse, *grads]


@pytest.mark.skipif(not flashjit._mlx.cuda_available(), reason="MLX on CUDA (mlx-cuda) and flashjit's eval_gpu")
def test_gpu_kernel_nodes_give_the_captures_results(monkeypatch):
    """FLASHJIT_MLX_LAUNCH=nodes: flashjit's kernels added to MLX's graph as kernel nodes, each
    after the one before (the backward's three, a split decoding forward's two), give the bits of
    the stream capture; a bad value is an error naming the variable."""
    cases = [((1, 4, 200, 64), (1, 4, 200, 64), dict(causal=True)),
             ((1, 8, 1, 128), (1, 2, 4096, 128), dict())]  # one query against many keys: split and combine
    for q_shape, kv_shape, options in cases:
        q = mx.random.normal(q_shape).astype(mx.bfloat16)
        k, v = (mx.random.normal(kv_shape).astype(mx.bfloat16) for _ in range(2))
        results = {}
        for launch in ("capture", "nodes"):
            monkeypatch.setenv("FLASHJIT_MLX_LAUNCH", launch)
            before = flashjit._mlx.kernel_node_count()
            results[launch] = _step(mx.gpu, q, k, v, **options)
            added = flashjit._mlx.kernel_node_count() - before
            assert added == 0 if launch == "capture" else added >= 4  # two forwards and a backward's kernels
        for a, b in zip(results["capture"], results["nodes"]):
            assert mx.array_equal(a, b)
    monkeypatch.setenv("FLASHJIT_MLX_LAUNCH", "later")
    with pytest.raises(ValueError, match="FLASHJIT_MLX_LAUNCH: expected capture or nodes"):
        mx.eval(flashjit.mlx.attention(q, k, v, stream=mx.gpu))


@pytest.mark.skipif(not flashjit._mlx.cuda_available(), reason="MLX on CUDA (mlx-cuda) and flashjit's eval_gpu")
def test_gpu_device_memory_gives_the_allocators_results(monkeypatch):
    """FLASHJIT_MLX_MEMORY=device: the outputs and workspace in flashjit's device memory give the
    bits of MLX's allocator's memory, with both launches; the memory is counted while arrays hold
    it and given back when they go; an output read on the host (moved to managed memory by MLX)
    keeps its values and is freed too; a bad value is an error naming the variable."""
    q_shape, kv_shape = (1, 4, 200, 64), (1, 2, 300, 64)
    q = mx.random.normal(q_shape).astype(mx.bfloat16)
    k, v = (mx.random.normal(kv_shape).astype(mx.bfloat16) for _ in range(2))
    results = {}
    for launch in ("capture", "nodes"):
        monkeypatch.setenv("FLASHJIT_MLX_LAUNCH", launch)
        for memory in ("allocator", "device"):
            monkeypatch.setenv("FLASHJIT_MLX_MEMORY", memory)
            before = flashjit._mlx.device_memory(reset_peak=True)
            results[launch, memory] = _step(mx.gpu, q, k, v, causal=True)
            held = flashjit._mlx.device_memory()
            outputs = sum(x.nbytes for x in results[launch, memory])  # o, lse, dq, dk, dv
            if memory == "device":
                assert held["active"] - before["active"] >= outputs
                assert held["peak"] >= held["active"]
            else:
                # Nothing of flashjit's is taken (the peak stays at the active bytes of the
                # reset); the active bytes may fall, when MLX drops an earlier step's arrays
                # (a device step's row statistics) during this one.
                assert held["peak"] <= before["active"]
                assert held["active"] <= before["active"]
    for key, result in results.items():
        for a, b in zip(results["capture", "allocator"], result):
            assert mx.array_equal(a, b), key
    # float16, which numpy reads: the output's own buffer read on the host (MLX moves it to
    # managed memory first) against the same call in MLX's allocator's memory.
    q16, k16, v16 = (x.astype(mx.float16) for x in (q, k, v))
    read = {}
    for memory in ("allocator", "device"):
        monkeypatch.setenv("FLASHJIT_MLX_MEMORY", memory)
        o = flashjit.mlx.attention(q16, k16, v16, causal=True, stream=mx.gpu)
        mx.eval(o)
        read[memory] = np.array(o)
        del o
    assert np.array_equal(read["allocator"], read["device"])
    assert np.isfinite(read["device"]).all() and np.abs(read["device"]).max() > 0
    del results, result, a, b  # the loops' names hold the last step's arrays too
    mx.synchronize()
    assert flashjit._mlx.device_memory()["active"] == 0
    monkeypatch.setenv("FLASHJIT_MLX_MEMORY", "pinned")
    with pytest.raises(ValueError, match="FLASHJIT_MLX_MEMORY: expected device or allocator"):
        mx.eval(flashjit.mlx.attention(q, k, v, stream=mx.gpu))


def test_peak_memory_adds_flashjits_own():
    """flashjit.mlx.peak_memory(): MLX's peak plus flashjit's device memory's (none on the CPU
    stream); reset_peak_memory() starts both again."""
    flashjit.mlx.reset_peak_memory()
    q = mx.random.normal((1, 2, 64, 32))
    mx.eval(flashjit.mlx.attention(q, q, q, stream=mx.cpu))
    assert flashjit.mlx.peak_memory() >= mx.get_peak_memory() > 0
    assert flashjit._mlx.device_memory()["peak"] >= 0


@pytest.mark.parametrize("place", PLACES)
def test_compiled_calls_keep_their_own_memory(place):
    """Two calls of one shape in a compiled function beside the program's own zeros of the same
    shape: mx.compile merges equal constants and equivalent nodes, so the two calls (different
    options and inputs) must stay two nodes, and neither output may share memory with another
    array (the zeros stay zeros, each output is its own)."""
    stream = _stream(place)
    q, k, v = (mx.random.normal((1, 4, 96, 64)).astype(mx.bfloat16) for _ in range(3))

    def two(q, k, v):
        a = flashjit.mlx.attention(q, k, v, causal=True, stream=stream)
        b = flashjit.mlx.attention(k, q, v, stream=stream)
        zeros = mx.zeros(a.shape, a.dtype, stream=stream)
        return a, b, a + mx.zeros_like(a, stream=stream), zeros

    compiled = mx.compile(two)(q, k, v)
    plain = two(q, k, v)
    mx.eval(*compiled, *plain)
    for a, b in zip(compiled, plain):
        assert mx.array_equal(a, b)
    assert not mx.array_equal(compiled[0], compiled[1])
    assert mx.array_equal(compiled[2], compiled[0]) and not mx.any(compiled[3]).item()


@pytest.mark.parametrize("place", PLACES)
def test_vmap_and_its_gradient_match_a_loop(place):
    """vmap makes one node over the merged batch, forward and backward, on each stream."""
    stream = _stream(place)
    q, k, v = (mx.random.normal((3, 1, 2, 80, 64)).astype(mx.bfloat16) for _ in range(3))

    def f(q, k, v):
        return flashjit.mlx.attention(q, k, v, causal=True, stream=stream)

    def loss(q, k, v):
        return mx.vmap(f)(q, k, v).astype(mx.float32).square().sum()

    mapped = mx.vmap(f)(q, k, v)
    looped = mx.stack([f(q[i], k[i], v[i]) for i in range(3)])
    assert mx.allclose(mapped.astype(mx.float32), looped.astype(mx.float32), atol=1e-2, rtol=1e-2)
    grads = mx.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for i in range(3):
        one = mx.grad(lambda q, k, v: f(q, k, v).astype(mx.float32).square().sum(), argnums=(0, 1, 2))(
            q[i], k[i], v[i])
        for a, b in zip(grads, one):
            assert mx.allclose(a[i].astype(mx.float32), b.astype(mx.float32), atol=1e-2, rtol=1e-2)


@pytest.mark.skipif(not flashjit._mlx.cuda_available(), reason="MLX on CUDA (mlx-cuda) and flashjit's eval_gpu")
def test_gpu_stream_dropout_reads_the_drawn_seed():
    # Without seed= the seed is drawn from MLX's random state on the GPU: the kernels read the
    # drawn words in place (they are computed after the call is recorded), and drop what the
    # CPU stream drops for the same words.
    q, k, v = (mx.random.normal((1, 2, 96, 64)).astype(mx.bfloat16) for _ in range(3))
    outputs = []
    for stream in (mx.gpu, mx.cpu):
        mx.random.seed(3)
        outputs.append(flashjit.mlx.attention(q, k, v, dropout_p=0.3, stream=stream).astype(mx.float32))
    assert mx.allclose(outputs[0], outputs[1], atol=2e-2, rtol=2e-2)
    mx.random.seed(4)
    other = flashjit.mlx.attention(q, k, v, dropout_p=0.3, stream=mx.gpu).astype(mx.float32)
    assert not mx.allclose(outputs[0], other, atol=2e-2, rtol=2e-2)
