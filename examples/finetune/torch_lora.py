"""LoRA fine-tuning of a transformers Llama or Qwen2 model with peft, with or without flashjit.

    python examples/finetune/torch_lora.py --model tiny --steps 20 --use-flash-attention
    python examples/finetune/torch_lora.py --model qwen2.5 --seq-len 2048 --batch-size 1 \\
        --steps 10 --dtype bfloat16 --device cuda --use-flash-attention --profile-attention

The same models, corpus and flags as mlx_lora.py. --use-flash-attention loads the model with
flashjit's transformers attention backend (flashjit.transformers.register()); without it
transformers runs its "sdpa" backend (torch's scaled_dot_product_attention).
--profile-attention runs one extra step inside flashjit.profile(framework=True, alone=True,
model=model), which records every attention call (flashjit's or torch's) with its layer, times each
distinct one by itself after the step (a step of a small batch waits on the host, and a call timed
inside it would count that wait), and gives attention's share of the step.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CONFIGS, corpus_tokens, parse_args, record_step, summarize  # noqa: E402


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
    args = parse_args(__doc__, "transformers", ["cpu", "cuda"], argv)
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
        record_step(history, step + 1, loss, seconds, tokens_per_step,
                    torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else _rss_peak_mib())
    attention = None
    if args.profile_attention:
        with flashjit.profile(framework=True, peak=True, alone=True, model=model) as prof:
            train_step(batches[args.steps])
        print(prof.table(), flush=True)
        record = prof.to_json()
        attention = {k: record[k] for k in ("attention_ms", "elapsed_ms", "attention_share", "summary", "layers",
                                             "peak_tflops")}
    return summarize(args, history, trainable, tokens_per_step, attention)


def _rss_peak_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's high-water mark


if __name__ == "__main__":
    main()
