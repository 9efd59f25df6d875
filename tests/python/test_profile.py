"""flashjit.profile(): every attention call inside the block is recorded with
its FLOPs, bytes and time; calls outside it are not; torch's own SDPA calls
with framework=True; a table and JSON at exit."""

import json

import pytest
import torch

import flashjit
from flashjit import profiler


def _inputs(B=2, Hq=4, Hkv=2, Sq=33, Sk=47, D=16, grad=True):
    torch.manual_seed(0)
    q = torch.randn(B, Hq, Sq, D, requires_grad=grad)
    k = torch.randn(B, Hkv, Sk, D, requires_grad=grad)
    v = torch.randn(B, Hkv, Sk, D, requires_grad=grad)
    return q, k, v


def _visible_by_mask(Sq, Sk, causal, window):
    i = torch.arange(Sq)[:, None]
    j = torch.arange(Sk)[None, :]
    shift = 0 if causal == "top_left" else Sk - Sq
    rel = j - i - shift
    left, right = window
    if causal:
        right = 0
    visible = torch.ones(Sq, Sk, dtype=torch.bool)
    if left >= 0:
        visible &= rel >= -left
    if right >= 0:
        visible &= rel <= right
    return int(visible.sum())


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), ("top_left", (-1, -1)), ("bottom_right", (-1, -1)),
                                           (False, (5, 3)), ("bottom_right", (7, -1))])
def test_counts_flops_and_bytes(causal, window):
    q, k, v = _inputs()
    flashjit.attention(q, k, v).sum().backward()  # outside the block: not recorded
    with flashjit.profile() as prof:
        for _ in range(3):
            flashjit.attention(q, k, v, causal=causal, window=window).sum().backward()
    assert profiler._active is None
    assert [c.direction for c in prof.calls].count("forward") == 3
    assert [c.direction for c in prof.calls].count("backward") == 3
    pairs = _visible_by_mask(33, 47, causal, window)
    forward = next(c for c in prof.calls if c.direction == "forward")
    backward = next(c for c in prof.calls if c.direction == "backward")
    assert forward.flops == 2 * 2 * 4 * pairs * (16 + 16)
    assert backward.flops == 2.5 * forward.flops
    assert forward.bytes == (2 * 4 * 33 * 32 + 2 * 2 * 47 * 32) * 4 + 2 * 4 * 33 * 4
    assert all(c.ms > 0 for c in prof.calls)
    assert prof.elapsed_ms >= prof.attention_ms() > 0
    (row,) = [r for r in prof.summary() if r["direction"] == "forward"]
    assert row["calls"] == 3 and row["impl"] == "flashjit" and "B2 H4/2 Sq33 Sk47 D16" in row["shape"]


def test_framework_calls_table_and_json(tmp_path):
    q, k, v = _inputs(grad=False)
    path = tmp_path / "profile.json"
    with flashjit.profile(framework=True, json_path=str(path)) as prof:
        torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                         is_causal=True)
        flashjit.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert torch.nn.functional.scaled_dot_product_attention.__module__.startswith("torch")  # unhooked at exit
    assert [(c.impl, c.direction) for c in prof.calls] == [("torch", "forward"), ("flashjit", "forward")]
    assert prof.calls[0].causal == 1
    record = json.loads(path.read_text())
    assert len(record["calls"]) == 2 and record["summary"][0]["impl"] == "torch"
    assert 0 < record["attention_share"] <= 1
    table = prof.table()
    assert "| forward | torch |" in table and "| forward | flashjit |" in table and "attention:" in table


def _torch_sdpa_step(q, k, v, **kwargs):
    torch.manual_seed(1)  # the same dropout mask each time
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    (out * out).sum().backward()
    return out


@pytest.mark.parametrize("kwargs", [dict(is_causal=True), dict(dropout_p=0.3)])  # fused; torch's math path
def test_framework_backward_is_recorded_and_leaves_gradients_unchanged(kwargs):
    q, k, v = _inputs(Hkv=4)
    v.requires_grad_(False)  # only the inputs that require grad are waited for (and get gradients)
    out = _torch_sdpa_step(q, k, v, **kwargs)
    expected = [out, q.grad, k.grad]
    q.grad = k.grad = None
    with flashjit.profile(framework=True) as prof:
        out = _torch_sdpa_step(q, k, v, **kwargs)
    for a, b in zip([out, q.grad, k.grad], expected):
        assert torch.equal(a, b)
    assert v.grad is None
    assert [(c.impl, c.direction) for c in prof.calls] == [("torch", "forward"), ("torch", "backward")]
    forward, backward = prof.calls
    assert backward.flops == 2.5 * forward.flops > 0 and backward.shape_key() == forward.shape_key()
    assert backward.bytes > forward.bytes and all(c.ms > 0 for c in prof.calls)
    rows = {(r["direction"], r["impl"]): r["calls"] for r in prof.summary()}
    assert rows == {("forward", "torch"): 1, ("backward", "torch"): 1}


def test_framework_backward_once_per_pass_and_only_inside_a_block():
    q, k, v = _inputs(Hkv=4)
    F = torch.nn.functional
    mask = torch.zeros(33, 47, requires_grad=True)  # a mask that requires grad is waited for too
    with flashjit.profile(framework=True) as prof:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.sum().backward(retain_graph=True)
        out.sum().backward()
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v)
        F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach())  # no gradient: no backward to record
        F.scaled_dot_product_attention(q, k, v).add_(1)  # the output is torch's own: in place is fine
        later = F.scaled_dot_product_attention(q, k, v)
    assert mask.grad is not None
    assert [(c.impl, c.direction) for c in prof.calls] == [("torch", "forward")] + [("torch", "backward")] * 2 + [
        ("torch", "forward")] * 4
    later.sum().backward()  # after the block: not recorded
    with flashjit.profile() as plain:
        F.scaled_dot_product_attention(q, k, v).sum().backward()  # framework=False: not recorded
        later = F.scaled_dot_product_attention(q, k, v)
    with flashjit.profile(framework=True) as other:
        later.sum().backward()  # its forward made without the hook: nothing to record
    assert len(prof.calls) == 7 and plain.calls == [] and other.calls == []


def test_patched_sdpa_is_recorded_once_as_flashjit():
    q, k, v = _inputs(grad=False, Hkv=4)
    with flashjit.sdpa_patched(), flashjit.profile(framework=True) as prof:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert [(c.impl, c.direction) for c in prof.calls] == [("flashjit", "forward")]


def test_blocks_do_not_nest_and_peak_is_measured_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(tmp_path))
    q, k, v = _inputs(grad=False)
    with flashjit.profile(peak=True) as prof:
        with pytest.raises(RuntimeError, match="do not nest"):
            with flashjit.profile():
                pass
        flashjit.attention(q, k, v)
    (key,) = prof.peaks
    assert key == "cpu float32" and prof.peaks[key] > 0
    stored = json.loads((tmp_path / "peak_tflops.json").read_text())
    assert len(stored) == 1 and list(stored.values())[0] == prof.peaks[key]
    row = prof.summary()[0]
    assert row["peak_share"] == pytest.approx(row["tflops"] / prof.peaks[key])


@pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in flashjit.backends(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sync", [False, True])
def test_cuda_calls_are_timed_by_events(sync):
    q, k, v = (x.detach().cuda().half().requires_grad_() for x in _inputs(Sq=300, Sk=300, D=64))
    with flashjit.profile(sync=sync) as prof:
        flashjit.attention(q, k, v, causal="bottom_right").sum().backward()
    assert [c.direction for c in prof.calls] == ["forward", "backward"]
    assert all(c.ms > 0 and c.device.startswith("cuda") for c in prof.calls)
    assert prof.peak_memory_mib > 0


def test_compiled_calls_are_recorded():
    q, k, v = _inputs(grad=False)
    compiled = torch.compile(lambda q, k, v: flashjit.attention(q, k, v, causal="bottom_right"), fullgraph=True)
    compiled(q, k, v)  # compile outside the block
    with flashjit.profile() as prof:
        compiled(q, k, v)
    assert [(c.impl, c.direction, c.causal) for c in prof.calls] == [("flashjit", "forward", 2)]


def test_mlx_calls_are_recorded_and_timed_alone():
    mx = pytest.importorskip("mlx.core")
    fm = pytest.importorskip("flashjit.mlx")
    q, k, v = (mx.random.normal(shape) for shape in ((2, 4, 33, 16), (2, 2, 47, 16), (2, 2, 47, 16)))
    fm.attention(q, k, v)  # outside the block: not recorded
    original = mx.fast.scaled_dot_product_attention
    with flashjit.profile(framework=True) as prof:
        assert mx.fast.scaled_dot_product_attention is not original
        for _ in range(2):
            mx.eval(fm.attention(q, k, v, causal="bottom_right"))
        mx.eval(mx.fast.scaled_dot_product_attention(q, mx.repeat(k, 2, 1), mx.repeat(v, 2, 1), scale=0.25,
                                                     mask="causal"))
    assert mx.fast.scaled_dot_product_attention is original  # unhooked at exit
    assert [(c.impl, c.direction, c.causal) for c in prof.calls] == [("flashjit", "forward", 2)] * 2 + [
        ("mx.fast", "forward", 2)]
    assert all(c.timed_alone and c.ms > 0 and c.device == "mlx:cpu" for c in prof.calls)
    assert prof.calls[0].flops == 2 * 2 * 4 * _visible_by_mask(33, 47, "bottom_right", (-1, -1)) * 32
    rows = {(r["impl"], r["calls"]) for r in prof.summary()}
    assert rows == {("flashjit", 2), ("mx.fast", 1)}


def test_a_varlen_call_is_one_record_with_each_sequences_work():
    q, k = torch.randn(12, 4, 16, requires_grad=True), torch.randn(9, 2, 16, requires_grad=True)
    cu_q, cu_k = torch.tensor([0, 5, 5, 12], dtype=torch.int32), torch.tensor([0, 4, 6, 9], dtype=torch.int32)
    with flashjit.profile() as prof:
        flashjit.varlen_attention(q, k, k, cu_q, cu_k, causal=True).sum().backward()
    assert [(c.direction, c.batch, c.seqlen_q, c.seqlen_k) for c in prof.calls] == [
        ("forward", 3, 7, 4), ("backward", 3, 7, 4)]
    # Bottom-right causal pairs of the sequences (5, 4), (0, 2), (7, 3): 10 + 0 + 6.
    pairs = 10 + 0 + 6
    assert prof.calls[0].flops == 2.0 * 4 * pairs * (16 + 16)
    assert prof.calls[1].flops == 2.5 * prof.calls[0].flops


def test_torch_profiler_names_the_eager_path_as_the_ops():
    """The eager path (no dispatcher round trip) shows up in torch.profiler as flashjit::fwd
    and flashjit::bwd, the names the custom ops have under torch.compile."""
    x = torch.randn(1, 2, 8, 16, requires_grad=True)
    with torch.profiler.profile() as prof:
        flashjit.scaled_dot_product_attention(x, x, x).sum().backward()
    names = {event.name for event in prof.events()}
    assert {"flashjit::fwd", "flashjit::bwd"} <= names, sorted(names)


def _alone_devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() and "cuda" in flashjit.backends() else [])


@pytest.mark.parametrize("device", _alone_devices())
def test_alone_times_each_kind_once_and_leaves_outputs_and_random_state(device, monkeypatch):
    """alone=True: every call recorded, each kind (direction, impl, shapes) run again once at the
    exit (replay_ms, counted), every call of a kind given that kind's time; the step's own outputs,
    gradients and torch's random state are what they are without the profile."""
    dtype = torch.float32 if device == "cpu" else torch.float16
    q, k, v = (x.detach().to(device, dtype).requires_grad_() for x in _inputs(Sq=40, Sk=40, D=32))
    q2 = torch.randn(2, 4, 24, 32, device=device, dtype=dtype, requires_grad=True)
    replays = []
    timed = profiler.replay_ms
    monkeypatch.setattr(profiler, "replay_ms", lambda run, *a, **kw: replays.append(run) or timed(run, *a, **kw))

    def step():
        torch.manual_seed(5)
        o = flashjit.attention(q, k, v, causal=True)
        o2 = flashjit.attention(q2, k, v)
        o3 = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.3, enable_gqa=True)
        o4 = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.3, enable_gqa=True)
        (o.sum() + o.sum() + o2.sum() + o3.float().square().sum() + o4.sum()).backward()
        grads = [x.grad.clone() for x in (q, k, v, q2)]
        for x in (q, k, v, q2):
            x.grad = None
        return [o.detach().clone(), o2.detach().clone(), o3.detach().clone()], grads, torch.rand(3, device=device)

    outs, grads, after = step()
    with flashjit.profile(framework=True, alone=True) as prof:
        outs_p, grads_p, _ = step()
        state = torch.get_rng_state(), (torch.cuda.get_rng_state() if device == "cuda" else None)
    assert torch.equal(torch.get_rng_state(), state[0])
    if device == "cuda":
        assert torch.equal(torch.cuda.get_rng_state(), state[1])
    for a, b in zip(outs + grads, outs_p + grads_p):
        assert torch.equal(a, b)
    assert torch.equal(after, step()[2])  # the same draws after a profiled step as after a plain one
    kinds = {(c.direction, c.impl, c.shape_key()) for c in prof.calls}
    # flashjit: two forward kinds and two backward kinds; torch: one forward kind (twice) and its backward.
    assert len(prof.calls) == 8 and len(kinds) == 6 and len(replays) == 6
    assert all(c.timed_alone and c.ms > 0 for c in prof.calls)
    torch_forward = [c.ms for c in prof.calls if c.impl == "torch" and c.direction == "forward"]
    assert len(torch_forward) == 2 and torch_forward[0] == torch_forward[1]
    assert all(run is not None for run in replays) and not prof._replays  # kept inputs let go at the exit


def test_alone_is_off_by_default_and_times_in_step():
    q, k, v = _inputs()
    with flashjit.profile() as prof:
        flashjit.attention(q, k, v).sum().backward()
    assert not prof.alone and not any(c.timed_alone for c in prof.calls) and not prof._replays


@pytest.mark.parametrize("alone", [False, True])
def test_a_kv_cache_call_with_new_keys_is_one_record(alone):
    """attention_with_kvcache checks the whole call before it writes the new keys into the cache:
    that check is not an attention call, and with alone=True the kind's time is the real call's."""
    torch.manual_seed(0)
    q, k_new, v_new = torch.randn(2, 1, 4, 16), torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    k_cache, v_cache = torch.randn(2, 32, 2, 16), torch.randn(2, 32, 2, 16)
    lengths = torch.tensor([10, 20], dtype=torch.int32)
    replays = []
    timed = profiler.replay_ms
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(profiler, "replay_ms", lambda run, *a, **kw: replays.append(run) or timed(run, *a, **kw))
        with flashjit.profile(alone=alone) as prof:
            o = flashjit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, k=k_new, v=v_new)
    assert [c.direction for c in prof.calls] == ["forward"] and prof.calls[0].ms > 0
    assert len(replays) == (1 if alone else 0)
    # The replay wrote fresh outputs only: the caches hold the new keys once, o is the call's.
    assert torch.equal(k_cache[0, 10], k_new[0, 0]) and torch.equal(k_cache[1, 20], k_new[1, 0])
    again = flashjit.attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), cache_seqlens=lengths + 1)
    assert torch.equal(o, again)


class _SelfAttention(torch.nn.Module):
    def __init__(self, use_torch=False):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.use_torch = use_torch

    def forward(self, x):
        q = self.proj(x).view(1, 2, -1, 8)
        sdpa = torch.nn.functional.scaled_dot_product_attention if self.use_torch else \
            flashjit.scaled_dot_product_attention
        return sdpa(q, q, q, is_causal=True).reshape(x.shape)


class _Block(torch.nn.Module):
    def __init__(self, use_torch=False):
        super().__init__()
        self.attn = _SelfAttention(use_torch)

    def forward(self, x):
        return x + self.attn(x)


@pytest.mark.parametrize("alone", [False, True])
def test_calls_are_recorded_by_layer(alone):
    """profile(model=...): each call is recorded with the attention module it ran in (forward
    hooks on the innermost modules named *Attention), its backward with its forward's layer, for
    flashjit's calls and torch's (framework=True); a table and JSON by layer; the hooks go at exit."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Block(), _Block(use_torch=True), _Block())
    x = torch.randn(12, 16, requires_grad=True)
    with flashjit.profile(model=model, framework=True, alone=alone) as prof:
        model(x).sum().backward()
    layers = {(c.direction, c.impl, c.layer) for c in prof.calls}
    assert layers == {(d, impl, name) for d in ("forward", "backward")
                      for impl, name in (("flashjit", "0.attn"), ("torch", "1.attn"), ("flashjit", "2.attn"))}
    rows = prof.layers()
    assert [row["layer"] for row in rows] == ["0.attn", "1.attn", "2.attn"]
    assert all(row["calls"] == 2 and row["forward_ms"] > 0 and row["backward_ms"] > 0 for row in rows)
    assert "| layer | calls |" in prof.table() and "| 1.attn | 2 |" in prof.table()
    assert [row["layer"] for row in prof.to_json()["layers"]] == ["0.attn", "1.attn", "2.attn"]
    with flashjit.profile() as plain:  # no model: no layers, and the earlier block's hooks are gone
        model(x).sum().backward()
    assert all(c.layer == "" for c in plain.calls) and plain.layers() == [] and "| layer |" not in plain.table()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    original = torch.nn.functional.scaled_dot_product_attention
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        with flashjit.profile(model=object(), framework=True):
            pass
    assert torch.nn.functional.scaled_dot_product_attention is original and profiler._active is None


def test_alone_runs_nothing_again_when_the_block_fails(monkeypatch):
    replays = []
    monkeypatch.setattr(profiler, "replay_ms", lambda run, *a, **kw: replays.append(run) or 1.0)
    q, k, v = _inputs()
    with pytest.raises(RuntimeError, match="the step failed"):
        with flashjit.profile(alone=True) as prof:
            flashjit.attention(q, k, v)
            raise RuntimeError("the step failed")
    assert replays == [] and profiler._active is None
    assert len(prof.calls) == 1 and prof.calls[0].ms != prof.calls[0].ms  # recorded, no time
