"""What the two fine-tuning examples share: the model configurations, the command line,
the corpus, and the per-step records and summary."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

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


def parse_args(doc: str, checkpoint: str, devices: list[str], argv=None):
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--model-path", help=f"a local {checkpoint} checkpoint (weights and tokenizer)")
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
    parser.add_argument("--device", choices=devices, default="cpu")
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


def record_step(history: list, step: int, loss: float, seconds: float, tokens: int, peak_mib: float,
                extra: dict | None = None) -> None:
    """Appends a step's record to history (with `extra`'s fields, if any) and prints its line."""
    history.append(dict(step=step, loss=loss, seconds=seconds, tokens_per_second=tokens / seconds,
                        peak_memory_mib=peak_mib, **(extra or {})))
    print(f"step {step:4d}  loss {loss:.4f}  {tokens / seconds:9.0f} tokens/s  peak {peak_mib:8.1f} MiB", flush=True)


WARMUP_STEPS = 2


def warmup_steps(steps: int) -> int:
    """Steps left out of tokens/s: the first two (the first compiles kernels and makes the
    optimizer's state; in MLX the second still compiles and caches its graph), fewer in a run
    too short to keep one timed step after them."""
    return max(0, min(WARMUP_STEPS, steps - 1))


def summarize(args, history: list, trainable: int, tokens_per_step: int, attention) -> dict:
    """The run's summary (printed; written as JSON with --json-out); exits 1 if a loss is not finite.
    tokens/s is a step's tokens over the median time of the steps after the warm-ups
    (warmup_steps), the same in both examples."""
    warmup = warmup_steps(len(history))
    step_seconds = statistics.median([h["seconds"] for h in history[warmup:]])
    summary = dict(
        model=args.model, device=args.device, dtype=args.dtype, flash_attention=args.use_flash_attention,
        seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, trainable_parameters=trainable,
        first_loss=history[0]["loss"], last_loss=history[-1]["loss"], warmup_steps=warmup,
        timed_steps=len(history) - warmup, step_seconds=step_seconds, tokens_per_second=tokens_per_step / step_seconds,
        peak_memory_mib=max(h["peak_memory_mib"] for h in history), history=history, attention=attention)
    print(f"summary: loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}, "
          f"{summary['tokens_per_second']:.0f} tokens/s (the median step of {summary['timed_steps']}, the first "
          f"{warmup} left out), peak {summary['peak_memory_mib']:.1f} MiB", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as file:
            json.dump(summary, file, indent=1)
    if not all(math.isfinite(h["loss"]) for h in history):
        print("error: the loss is not finite", file=sys.stderr)
        sys.exit(1)
    return summary
