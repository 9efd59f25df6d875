"""LoRA fine-tuning of a transformers Llama or Qwen2 model with peft, with or without flashjit.

    python examples/finetune/torch_lora.py --model tiny --steps 20 --use-flash-attention
    python examples/finetune/torch_lora.py --model qwen2.5 --seq-len 2048 --batch-size 1 \\
        --steps 10 --dtype bfloat16 --device cuda --use-flash-attention --profile-attention

The same models, corpus and flags as mlx_lora.py. --use-flash-attention loads the model with
flashjit's transformers attention backend (flashjit.transformers.register()); without it
transformers runs its "sdpa" backend (torch's scaled_dot_product_attention).
--profile-attention runs one extra step inside flashjit.profile(framework=True), which times
every attention call (flashjit's or torch's) and gives attention's share of the step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mlx_lora import CONFIGS, corpus_tokens  # noqa: E402  (the shared configurations and corpus)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--model-path", help="a local transformers checkpoint (weights and tokenizer)")
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
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
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


def build_model(args, attn_implementation):
    import torch
    import transformers

    dtype = getattr(torch, args.dtype)
    if args.model_path:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype,
                                                                  attn_implementation=attn_implementation)
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_path)
        return model, tokenizer
    config = dict(CONFIGS[args.model])
    family = config.pop("family")
    config_class = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**config), dtype=dtype,
                                                          attn_implementation=attn_implementation)
    return model, None


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.flash_block_size:
        os.environ["FLASHJIT_CUDA_TILES"] = f"n={args.flash_block_size}"
    import peft
    import torch

    import flashjit
    import flashjit.transformers

    attn = flashjit.transformers.register() if args.use_flash_attention else "sdpa"
    model, tokenizer = build_model(args, attn)
    layers = model.config.num_hidden_layers
    chosen = range(layers) if args.lora_layers < 0 else range(layers - args.lora_layers, layers)
    lora = peft.LoraConfig(r=args.lora_rank, lora_alpha=20 * args.lora_rank,  # scale 20, as mlx_lora.py
                           lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], layers_to_transform=list(chosen))
    model = peft.get_peft_model(model, lora).to(args.device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens_per_step = args.batch_size * args.seq_len
    ids = corpus_tokens(args, model.config.vocab_size, tokenizer, (args.steps + 2) * (tokens_per_step + args.batch_size))
    batches = torch.tensor(ids).reshape(args.steps + 2, args.batch_size, -1)[:, :, :args.seq_len + 1].to(args.device)
    optimizer = (torch.optim.Adam if args.optimizer == "adam" else torch.optim.SGD)(
        [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    cuda = args.device == "cuda"

    def train_step(batch):
        optimizer.zero_grad(set_to_none=True)
        out = model(input_ids=batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]),
                                                 batch[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        return loss.item()  # synchronises

    print(f"{args.model}: {trainable / 1e6:.2f} M trainable parameters, {tokens_per_step} tokens a step, "
          f"attention: {attn}, device {args.device}", flush=True)
    history = []
    for step in range(args.steps):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = train_step(batches[step])
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else _rss_peak_mib()
        history.append(dict(step=step + 1, loss=loss, seconds=seconds, tokens_per_second=tokens_per_step / seconds,
                            peak_memory_mib=peak))
        print(f"step {step + 1:4d}  loss {loss:.4f}  {tokens_per_step / seconds:9.0f} tokens/s  "
              f"peak {peak:8.1f} MiB", flush=True)
    attention = None
    if args.profile_attention:
        with flashjit.profile(framework=True, peak=True) as prof:
            train_step(batches[args.steps])
        print(prof.table(), flush=True)
        record = prof.to_json()
        attention = {k: record[k] for k in ("attention_ms", "elapsed_ms", "attention_share", "summary", "peak_tflops")}
    timed = history[1:] or history
    summary = dict(
        model=args.model, device=args.device, dtype=args.dtype, flash_attention=args.use_flash_attention,
        seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, trainable_parameters=trainable,
        first_loss=history[0]["loss"], last_loss=history[-1]["loss"],
        tokens_per_second=tokens_per_step * len(timed) / sum(h["seconds"] for h in timed),
        peak_memory_mib=max(h["peak_memory_mib"] for h in history), history=history, attention=attention)
    print(f"summary: loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}, "
          f"{summary['tokens_per_second']:.0f} tokens/s, peak {summary['peak_memory_mib']:.1f} MiB", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as file:
            json.dump(summary, file, indent=1)
    if not all(math.isfinite(h["loss"]) for h in history):
        print("error: the loss is not finite", file=sys.stderr)
        sys.exit(1)
    return summary


def _rss_peak_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's high-water mark


if __name__ == "__main__":
    main()
