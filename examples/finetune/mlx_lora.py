"""LoRA fine-tuning of an mlx-lm Llama or Qwen2 model, with or without flashjit's attention.

    python examples/finetune/mlx_lora.py --model tiny --steps 20 --use-flash-attention
    python examples/finetune/mlx_lora.py --model tinyllama --seq-len 2048 --batch-size 1 \\
        --steps 10 --use-flash-attention --profile-attention --device gpu

The model is built from the TinyLlama-1.1B or Qwen2.5-0.5B configuration with random
weights (--model-path loads a local mlx-lm checkpoint and its tokenizer instead); `tiny` is a
two-layer model for tests. The text is --data (a local file, tokenized by the checkpoint's
tokenizer, else byte by byte) or a generated corpus with repeating structure, so that the loss
falls. Each step prints loss, tokens/s and peak memory; the end a summary (--json-out writes
it as JSON).

--use-flash-attention routes mlx-lm's attention to flashjit (flashjit.mlx.mlx_lm_attention);
without it mlx-lm runs mx.fast.scaled_dot_product_attention. --flash-block-size sets the keys a
step of flashjit's CUDA forward (FLASHJIT_CUDA_TILES=n=...; default: the measured choice).
--profile-attention times the attention calls of one extra step in isolation
(flashjit.mlx.profile_step) and reports attention's share of the step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

CONFIGS = {
    # TinyLlama/TinyLlama-1.1B: Llama, 22 layers, 32 query heads sharing 4 key/value heads.
    "tinyllama": dict(family="llama", hidden_size=2048, num_hidden_layers=22, intermediate_size=5632,
                      num_attention_heads=32, num_key_value_heads=4, rms_norm_eps=1e-5, vocab_size=32000,
                      rope_theta=10000.0, tie_word_embeddings=False),
    # Qwen/Qwen2.5-0.5B: Qwen2, 24 layers, 14 query heads sharing 2 key/value heads, tied embeddings.
    "qwen2.5": dict(family="qwen2", hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
                    num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=151936,
                    rope_theta=1000000.0, tie_word_embeddings=True),
    # Two layers, for tests; transformers initialises it with a larger spread than its default
    # (initializer_range 0.02), so that a few steps of LoRA move the loss.
    "tiny": dict(family="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=256,
                 rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.2),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--model-path", help="a local mlx-lm checkpoint (weights and tokenizer)")
    parser.add_argument("--data", help="a local text file (default: a generated corpus)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-layers", type=int, default=-1, help="blocks given LoRA adapters, from the last "
                        "(-1: all)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--use-flash-attention", action="store_true")
    parser.add_argument("--flash-block-size", type=int, help="keys a step of flashjit's CUDA forward")
    parser.add_argument("--profile-attention", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", help="write the summary here as JSON")
    args = parser.parse_args(argv)
    for name in ("seq_len", "batch_size", "steps", "lora_rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive number, got {getattr(args, name)}")
    return args


def build_model(args):
    import mlx.core as mx
    import mlx.nn as nn

    if args.model_path:
        from mlx_lm import load
        model, tokenizer = load(args.model_path)
        return model, tokenizer
    config = dict(CONFIGS[args.model])
    family = config.pop("family")
    config.pop("initializer_range", None)  # mlx-lm initialises its own way
    if family == "llama":
        from mlx_lm.models import llama as module
    else:
        from mlx_lm.models import qwen2 as module
    model = module.Model(module.ModelArgs(model_type=family, **config))
    model.set_dtype(getattr(mx, args.dtype))
    mx.eval(model.parameters())
    del nn
    return model, None


def corpus_tokens(args, vocab_size, tokenizer, count):
    """`count` token ids: the data file's, else a generated text with repeating structure."""
    import numpy as np

    if args.data:
        with open(args.data, encoding="utf-8", errors="replace") as file:
            text = file.read()
        ids = tokenizer.encode(text) if tokenizer is not None else list(text.encode("utf-8"))
    else:
        rng = np.random.default_rng(args.seed)
        words = rng.integers(0, vocab_size, size=(64, 6))  # a small vocabulary of "words"
        sentence = rng.integers(0, 64, size=4096)
        ids = words[sentence].reshape(-1).tolist()
    ids = [i % vocab_size for i in ids]
    while len(ids) < count:
        ids = ids + ids
    return ids[:count]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.flash_block_size:
        os.environ["FLASHJIT_CUDA_TILES"] = f"n={args.flash_block_size}"
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    mx.random.seed(args.seed)
    model, tokenizer = build_model(args)
    model.freeze()
    layers = len(model.layers) if args.lora_layers < 0 else args.lora_layers
    linear_to_lora_layers(model, layers, {"rank": args.lora_rank, "scale": 20.0, "dropout": 0.0})
    trainable = sum(p.size for _, p in _leaves(model.trainable_parameters()))
    vocab = model.args.vocab_size if hasattr(model, "args") else CONFIGS[args.model]["vocab_size"]
    tokens_per_step = args.batch_size * args.seq_len
    ids = corpus_tokens(args, vocab, tokenizer, (args.steps + 2) * (tokens_per_step + args.batch_size))
    batches = mx.array(ids).reshape(args.steps + 2, args.batch_size, -1)[:, :, :args.seq_len + 1]

    def loss_fn(model, batch):
        logits = model(batch[:, :-1])
        return nn.losses.cross_entropy(logits.astype(mx.float32), batch[:, 1:]).mean()

    optimizer = (optim.Adam if args.optimizer == "adam" else optim.SGD)(learning_rate=args.learning_rate)
    step_fn = nn.value_and_grad(model, loss_fn)

    def train_step(batch):
        loss, grads = step_fn(model, batch)
        optimizer.update(model, grads)
        mx.eval(loss, model.trainable_parameters(), optimizer.state)
        return loss.item()

    import flashjit.mlx as fm
    attention = fm.mlx_lm_attention() if args.use_flash_attention else _nothing()
    history = []
    with attention:
        print(f"{args.model}: {trainable / 1e6:.2f} M trainable parameters, {tokens_per_step} tokens a step, "
              f"attention: {'flashjit' if args.use_flash_attention else 'mlx-lm (mx.fast)'}, device {args.device}",
              flush=True)
        for step in range(args.steps):
            mx.reset_peak_memory()
            start = time.perf_counter()
            loss = train_step(batches[step])
            seconds = time.perf_counter() - start
            peak = mx.get_peak_memory() / 2 ** 20
            history.append(dict(step=step + 1, loss=loss, seconds=seconds, tokens_per_second=tokens_per_step / seconds,
                                peak_memory_mib=peak))
            print(f"step {step + 1:4d}  loss {loss:.4f}  {tokens_per_step / seconds:9.0f} tokens/s  "
                  f"peak {peak:8.1f} MiB", flush=True)
        profile = None
        if args.profile_attention:
            profile = fm.profile_step(lambda: train_step(batches[args.steps]))
            print(profile["table"], flush=True)
    timed = history[1:] or history  # the first step compiles
    summary = dict(
        model=args.model, device=args.device, dtype=args.dtype, flash_attention=args.use_flash_attention,
        seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, trainable_parameters=trainable,
        first_loss=history[0]["loss"], last_loss=history[-1]["loss"],
        tokens_per_second=tokens_per_step * len(timed) / sum(h["seconds"] for h in timed),
        peak_memory_mib=max(h["peak_memory_mib"] for h in history), history=history,
        attention=None if profile is None else {k: v for k, v in profile.items() if k != "table"})
    print(f"summary: loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}, "
          f"{summary['tokens_per_second']:.0f} tokens/s, peak {summary['peak_memory_mib']:.1f} MiB", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as file:
            json.dump(summary, file, indent=1)
    if not all(math.isfinite(h["loss"]) for h in history):
        print("error: the loss is not finite", file=sys.stderr)
        sys.exit(1)
    return summary


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}{key}.")
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from _leaves(value, f"{prefix}{index}.")
    else:
        yield prefix, tree


if __name__ == "__main__":
    main()
