"""flashjit as a transformers attention backend: whole tiny models with its
attn_implementation against the same weights on transformers' sdpa path (eager where sdpa
cannot soft-cap) in float64 (oracle) and in the test dtype (baseline)."""

import copy

import pytest
import torch

from conftest import DEVICE
from reference import check, naive_attention

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.masking_utils")
import flashjit.transformers as fj_transformers  # noqa: E402

NAME = fj_transformers.register()


def llama_config(**overrides):
    settings = dict(vocab_size=97, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64, max_position_embeddings=128, initializer_range=0.2, pad_token_id=0)
    settings.update(overrides)
    return transformers.LlamaConfig(**settings)


def gemma2_config(**overrides):
    settings = dict(vocab_size=97, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64, max_position_embeddings=128, sliding_window=8,
                    attn_logit_softcapping=5.0, final_logit_softcapping=30.0, initializer_range=0.2, pad_token_id=0)
    settings.update(overrides)
    return transformers.Gemma2Config(**settings)


def models(config, implementations):
    """One model per (implementation, dtype, device) with the same weights, in eval mode.
    Each gets its own copy of the config, which records the attention implementation."""
    torch.manual_seed(1)
    first = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    state = first.state_dict()
    out = []
    for name, dt, device in implementations:
        model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=name)
        assert model.config._attn_implementation == name
        model.load_state_dict(state)
        out.append(model.to(device=device, dtype=dt).eval())
    return out


def padded_batch(batch=2, seqlen=24, vocab=97, pad=5, side="left"):
    """Token ids and the 2D attention mask; the second sequence is `pad` tokens shorter,
    padded on the left (as in batched generation) or on the right (as in training)."""
    ids = torch.randint(1, vocab, (batch, seqlen))
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    padded = slice(0, pad) if side == "left" else slice(seqlen - pad, seqlen)
    mask[1, padded] = 0
    ids[1, padded] = 0
    return ids, mask


def logits_and_grads(model, ids, mask, weight):
    """Logits at the unpadded positions, and the gradients of a weighted sum of them with
    respect to the first layer's query projection and the embeddings."""
    device = next(model.parameters()).device
    model.zero_grad()
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    kept = mask.bool().to(device)
    valid = logits[kept]
    (valid * weight.to(device=device, dtype=valid.dtype)).sum().backward()
    layer = model.model.layers[0].self_attn
    return valid, layer.q_proj.weight.grad, model.model.embed_tokens.weight.grad


def compare_models(config, reference_name, dtype, pad=5, side="left"):
    """flashjit against `reference_name` in float64 (oracle) and in `dtype` (baseline)."""
    ids, mask = padded_batch(pad=pad, side=side)
    ours, base, exact = models(config, [(NAME, dtype, DEVICE), (reference_name, dtype, "cpu"),
                                        (reference_name, torch.float64, "cpu")])
    weight = torch.randn(int(mask.sum()), config.vocab_size)
    for name, got, low, ref in zip(("logits", "dq_proj", "dembed"), logits_and_grads(ours, ids, mask, weight),
                                   logits_and_grads(base, ids, mask, weight), logits_and_grads(exact, ids, mask, weight)):
        assert torch.isfinite(ref).all(), f"{name}: the float64 reference is not finite"
        check(name, got, low, ref, dtype)


@pytest.mark.parametrize("pad", [0, 5], ids=["causal", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_logits_and_gradients(dtype, pad):
    # Without padding transformers builds no mask and asks for causal attention.
    compare_models(llama_config(), "sdpa", dtype, pad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma2_softcap_and_sliding_window(dtype):
    # transformers' sdpa backend cannot soft-cap logits, so eager is the reference here; its
    # fully masked rows (left padding) are NaN, so the batch is padded on the right.
    compare_models(gemma2_config(), "eager", dtype, side="right")


def test_generate_with_cache_matches_sdpa():
    """Greedy decoding of a left-padded batch with the KV cache (prefill, then one query a
    step seeing every cached key) gives the tokens of transformers' sdpa path, in float64."""
    config = llama_config()
    ids, mask = padded_batch(seqlen=12)
    ours, exact = models(config, [(NAME, torch.float64, DEVICE), ("sdpa", torch.float64, "cpu")])
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = ours.generate(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), **settings)
    want = exact.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(got.cpu(), want)


def test_training_dropout_is_drawn_from_torch_generator():
    config = llama_config(attention_dropout=0.3)
    ids, mask = padded_batch()
    (model,) = models(config, [(NAME, torch.float32, DEVICE)])
    model.train()
    run = [None] * 3
    for i, seed in enumerate((5, 5, 6)):
        torch.manual_seed(seed)
        run[i] = model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE)).logits
    assert torch.equal(run[0], run[1])
    assert not torch.equal(run[0], run[2])
    model.eval()
    plain = model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE)).logits
    assert not torch.equal(plain, run[0])


class _Module(torch.nn.Module):
    is_causal = True


def test_position_bias_is_added_inside_the_kernel():
    q, k, v = (torch.randn(2, 4, 9, 32, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(1, 4, 9, 9, dtype=torch.float64)
    keep = torch.rand(2, 1, 9, 9) > 0.3
    keep[..., 0] = True
    got, weights = fj_transformers.attention_forward(_Module(), *(x.to(DEVICE) for x in (q, k, v)),
                                                     keep.to(DEVICE), position_bias=bias.to(DEVICE))
    want, _ = naive_attention(q, k, v, attn_mask=bias.masked_fill(~keep, float("-inf")))
    assert weights is None and got.shape == (2, 9, 4, 32)
    check("o", got.transpose(1, 2), want, want, torch.float64)


def test_learned_position_bias_gets_its_gradient():
    """A bias that requires grad goes to transformers' sdpa path, which gives it a gradient."""
    q, k, v = (torch.randn(1, 2, 5, 16, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    module = _Module()
    module.is_causal = False
    got, _ = fj_transformers.attention_forward(module, q, k, v, None, position_bias=bias)
    got.sum().backward()
    want, _ = naive_attention(q, k, v, attn_mask=bias.detach())
    check("o", got.transpose(1, 2), want, want, torch.float64)
    assert bias.grad is not None and bias.grad.abs().sum() > 0


def test_causal_rule_follows_transformers_sdpa():
    """No mask and several queries: causal (top left); one query: every key."""
    q, k, v = (torch.randn(1, 2, s, 16, dtype=torch.float64) for s in (5, 7, 7))
    for queries, causal in ((q, True), (q[:, :, :1], False)):
        got, _ = fj_transformers.attention_forward(_Module(), *(x.to(DEVICE) for x in (queries, k, v)), None)
        want, _ = naive_attention(queries, k, v, causal=causal)
        check("o", got.transpose(1, 2), want, want, torch.float64)


@pytest.mark.parametrize("mask", [False, True])
def test_one_query_with_grouped_heads(mask):
    """Decoding with GQA: one query, a mask shared by the heads or none, softcap."""
    q = torch.randn(2, 8, 1, 32, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 37, 32, dtype=torch.float64, requires_grad=True) for _ in range(2))
    keep = None
    if mask:
        keep = torch.rand(2, 1, 1, 37) > 0.3
        keep[..., -1] = True
    got, _ = fj_transformers.attention_forward(_Module(), *(x.to(DEVICE) for x in (q, k, v)),
                                               None if keep is None else keep.to(DEVICE), softcap=3.0)
    want, _ = naive_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=keep, softcap=3.0)
    check("o", got.transpose(1, 2), want, want, torch.float64)
    grad = torch.randn(want.shape, dtype=torch.float64)
    exact = torch.autograd.grad(want, (q, k, v), grad)
    ours = torch.autograd.grad(got.transpose(1, 2), (q, k, v), grad.to(DEVICE))
    for name, a, b in zip(("dq", "dk", "dv"), ours, exact):
        check(name, a, b, b, torch.float64)


def test_queries_shared_by_the_batch():
    """A batch-1 query (learned queries) against batch-B keys broadcasts, as on sdpa."""
    q = torch.randn(1, 4, 6, 32, dtype=torch.float64)
    k, v = (torch.randn(3, 4, 11, 32, dtype=torch.float64) for _ in range(2))
    module = _Module()
    module.is_causal = False
    got, _ = fj_transformers.attention_forward(module, *(x.to(DEVICE) for x in (q, k, v)), None)
    want, _ = naive_attention(q.expand(3, -1, -1, -1), k, v)
    check("o", got.transpose(1, 2), want, want, torch.float64)


def test_unsupported_inputs_raise_clear_errors():
    q = torch.randn(1, 2, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="s_aux"):
        fj_transformers.attention_forward(_Module(), q, q, q, None, s_aux=torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match="attention_mask: expected None or a 4D mask"):
        fj_transformers.attention_forward(_Module(), q, q, q, torch.ones(1, 4, dtype=torch.bool, device=DEVICE))


def test_register_is_idempotent_and_names_the_backend():
    assert fj_transformers.register() == NAME
    assert NAME in transformers.AttentionInterface()
    with pytest.raises(ValueError, match="name: expected a non-empty string without 'flash'"):
        fj_transformers.register("flashjit")


def test_packed_sequences_equal_the_documents_one_by_one():
    """Documents packed into one row with cu_seq_lens (DataCollatorWithFlattening's flash
    kwargs) give the loss and gradients of the same documents run one by one (float64)."""
    lengths = [7, 1, 12, 5]
    torch.manual_seed(3)
    docs = [torch.randint(1, 97, (n,)) for n in lengths]
    (packed_model,) = models(llama_config(), [(NAME, torch.float64, DEVICE)])
    # The reference runs on the same device: rotary tables are float32, and a CPU and a GPU
    # round them differently (1e-6 in the logits). sdpa, not eager: eager softmaxes in float32.
    (single_model,) = models(llama_config(), [("sdpa", torch.float64, DEVICE)])
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    logits = packed_model(input_ids=ids.to(DEVICE), position_ids=positions.to(DEVICE),
                          cu_seq_lens_q=cu.to(DEVICE), cu_seq_lens_k=cu.to(DEVICE),
                          max_length_q=max(lengths), max_length_k=max(lengths)).logits[0]
    weight = torch.randn(sum(lengths), 97, dtype=torch.float64, device=DEVICE)
    (logits * weight).sum().backward()
    expected = []
    for doc in docs:
        expected.append(single_model(input_ids=doc[None].to(DEVICE)).logits[0])
    expected = torch.cat(expected)
    (expected * weight).sum().backward()
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
    for ours, theirs in ((packed_model.model.layers[0].self_attn.q_proj.weight.grad,
                          single_model.model.layers[0].self_attn.q_proj.weight.grad),
                         (packed_model.model.embed_tokens.weight.grad, single_model.model.embed_tokens.weight.grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
