"""flashjit.mlx on MLX's GPU stream against its CPU stream and float64, for the cases where the
two streams' results differ in their last bits (run on a machine with mlx-cuda; see
scripts/gpu_mlx.sh for bringing MLX there):

  python scripts/mlx_gpu_streams.py [cases] [varlen] [module]     (default: all three)

cases:  dense attention on each stream (strided views, contiguous copies, fresh arrays) and
        varlen_attention (a CPU stream) against float64, for GQA, small and unequal head dims,
        bottom-right causal and softcap: the largest absolute error of each.
varlen: test_mlx_modules.py's variable-length batch, sequence by sequence, against float64.
module: flashjit.mlx.MultiHeadAttention and mlx.nn.MultiHeadAttention's gradients with a boolean
        mask on each stream, the largest difference of each pair."""

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import flashjit
import flashjit.mlx as fm

GPU = flashjit._mlx.cuda_available()


def reference(q, k, v, softcap, causal, scale=None):
    """float64 attention of q [H, Sq, D], k [Hkv, Sk, D], v [Hkv, Sk, Dv]; causal aligned bottom-right."""
    heads, sq, dim = q.shape
    kv_heads, sk = k.shape[:2]
    group = heads // kv_heads
    scale = scale or 1 / np.sqrt(dim)
    out = np.zeros((heads, sq, v.shape[-1]))
    for h in range(heads):
        s = q[h] @ k[h // group].T * scale
        if softcap:
            s = softcap * np.tanh(s / softcap)
        if causal:
            for i in range(sq):
                s[i, i + sk - sq + 1:] = -np.inf
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        out[h] = p @ v[h // group]
    return out


def cases():
    streams = (("gpu", mx.gpu), ("cpu", mx.cpu)) if GPU else (("cpu", mx.cpu),)
    for heads, kv_heads, dim, dim_v, sq, sk, softcap, causal in [
            (4, 2, 16, 8, 5, 6, 4.0, True), (4, 2, 16, 8, 5, 6, 0.0, True), (4, 2, 16, 8, 5, 6, 0.0, False),
            (4, 4, 16, 8, 5, 6, 0.0, False), (4, 2, 16, 16, 5, 6, 0.0, False), (4, 2, 32, 32, 5, 6, 0.0, False),
            (4, 2, 16, 8, 6, 6, 0.0, False), (4, 2, 32, 32, 37, 45, 0.0, False)]:
        mx.random.seed(2)
        q = mx.random.normal((sq, heads, dim))
        k, v = mx.random.normal((sk, kv_heads, dim)), mx.random.normal((sk, kv_heads, dim_v))
        mx.eval(q, k, v)
        exact = reference(*(np.array(x, dtype=np.float64).transpose(1, 0, 2) for x in (q, k, v)), softcap, causal)
        view = lambda x: x.transpose(1, 0, 2)[None]
        alignment = "bottom_right" if causal else False
        errors = {}
        for name, stream in streams:
            for how, inputs in (("", [view(x) for x in (q, k, v)]),
                                ("-contig", [mx.contiguous(view(x)) for x in (q, k, v)]),
                                ("-fresh", [mx.array(np.array(view(x))) for x in (q, k, v)])):
                o = fm.attention(*inputs, causal=alignment, softcap=softcap, stream=stream)
                errors[name + how] = np.abs(np.array(o[0]) - exact).max()
        o = fm.varlen_attention(q, k, v, [0, sq], [0, sk], causal=causal, softcap=softcap)
        errors["varlen"] = np.abs(np.array(o).transpose(1, 0, 2) - exact).max()
        print((heads, kv_heads, dim, dim_v, sq, sk, softcap, causal), {a: f"{b:.1e}" for a, b in errors.items()},
              flush=True)


def varlen():
    for stream in (None, mx.cpu):
        lengths_q, lengths_k = [5, 0, 1, 20, 9], [6, 3, 1, 20, 0]
        offsets_q = [0] + [int(x) for x in np.cumsum(lengths_q)]
        offsets_k = [0] + [int(x) for x in np.cumsum(lengths_k)]
        mx.random.seed(2)
        q = mx.random.normal((sum(lengths_q), 4, 16))
        k, v = mx.random.normal((sum(lengths_k), 2, 16)), mx.random.normal((sum(lengths_k), 2, 8))
        o = fm.varlen_attention(q, k, v, mx.array(offsets_q, dtype=mx.int32), offsets_k, causal=True, softcap=4.0)
        for i in range(len(lengths_q)):
            (qb, qe), (kb, ke) = offsets_q[i:i + 2], offsets_k[i:i + 2]
            if qe == qb:
                continue
            alone = fm.attention(*(x.transpose(1, 0, 2)[None] for x in (q[qb:qe], k[kb:ke], v[kb:ke])),
                                 causal="bottom_right", softcap=4.0, stream=stream)
            exact = (reference(*(np.array(x, dtype=np.float64).transpose(1, 0, 2) for x in (q[qb:qe], k[kb:ke], v[kb:ke])),
                               4.0, True) if ke > kb else np.zeros((4, qe - qb, 8)))
            exact = np.nan_to_num(exact)
            print(stream, i, "varlen err", np.abs(np.array(o[qb:qe]).transpose(1, 0, 2) - exact).max(),
                  "alone err", np.abs(np.array(alone[0]) - exact).max(), flush=True)


def module():
    from mlx.utils import tree_flatten

    mx.random.seed(0)
    ours = fm.MultiHeadAttention(48, 6, key_input_dims=40, value_dims=36, bias=True)
    theirs = nn.MultiHeadAttention(48, 6, key_input_dims=40, value_dims=36, bias=True)
    theirs.update(ours.parameters())
    queries, keys = mx.random.normal((2, 11, 48)), mx.random.normal((2, 13, 40))
    values = mx.random.normal((2, 13, 40))
    mask = mx.random.uniform(shape=(2, 1, 11, 13)) > 0.3

    def loss(model, *inputs):
        return (model(*inputs, mask) ** 2).sum()

    grads = {}
    devices = (("gpu", mx.gpu), ("cpu", mx.cpu)) if GPU else (("cpu", mx.cpu),)
    for name, model in (("ours", ours), ("theirs", theirs)):
        for where, device in devices:
            with mx.stream(device):
                tree = nn.value_and_grad(model, loss)(model, queries, keys, values)[1]
                grads[f"{name}-{where}"] = {key: np.array(value) for key, value in tree_flatten(tree)}
    pairs = [("ours-cpu", "theirs-cpu")]
    if GPU:
        pairs = [("ours-gpu", "theirs-gpu"), ("ours-gpu", "ours-cpu"), ("theirs-gpu", "theirs-cpu")] + pairs + [
            ("ours-gpu", "theirs-cpu")]
    for a, b in pairs:
        print(a, b, max(np.abs(grads[a][key] - grads[b][key]).max() for key in grads[a]), flush=True)


if __name__ == "__main__":
    print("default device", mx.default_device(), "cuda_available", GPU)
    for part in sys.argv[1:] or ["cases", "varlen", "module"]:
        {"cases": cases, "varlen": varlen, "module": module}[part]()
