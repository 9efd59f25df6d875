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

import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CONFIGS, corpus_tokens, parse_args, record_step, summarize  # noqa: E402



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


def main(argv=None) -> dict:
    args = parse_args(__doc__, "mlx-lm", ["cpu", "gpu"], argv)
    if args.flash_block_size:
        os.environ["FLASHJIT_CUDA_TILES"] = f"n={args.flash_block_size}"
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    mx.random.seed(args.seed)
    model, tokenizer = build_model(args)
    model.freeze()
    layers = len(model.layers) if args.lora_layers < 0 else args.lora_layers
    linear_to_lora_layers(model, layers, {"rank": args.lora_rank, "scale": 20.0, "dropout": 0.0})
    trainable = sum(p.size for _, p in tree_flatten(model.trainable_parameters()))
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
    attention = fm.mlx_lm_attention() if args.use_flash_attention else contextlib.nullcontext()
    history = []
    with attention:
        print(f"{args.model}: {trainable / 1e6:.2f} M trainable parameters, {tokens_per_step} tokens a step, "
              f"attention: {'flashjit' if args.use_flash_attention else 'mlx-lm (mx.fast)'}, device {args.device}",
              flush=True)
        for step in range(args.steps):
            fm.reset_peak_memory()  # MLX's and flashjit's device memory's (on the GPU stream)
            host = fm._mlx.eval_gpu_host_time()
            start = time.perf_counter()
            loss = train_step(batches[step])
            seconds = time.perf_counter() - start
            record_step(history, step + 1, loss, seconds, tokens_per_step, fm.peak_memory() / 2 ** 20,
                        step_diagnostics(host, fm._mlx.eval_gpu_host_time(), fm._mlx.device_memory()))
        profile = None
        if args.profile_attention:
            profile = fm.profile_step(lambda: train_step(batches[args.steps]), peak=True)
            print(profile["table"], flush=True)
    return summarize(args, history, trainable, tokens_per_step,
                     None if profile is None else {k: v for k, v in profile.items() if k != "table"})


def step_diagnostics(host_before: dict, host_after: dict, device_memory: dict) -> dict:
    """What a step's record adds in MLX (the JSON's history), to tell a slow step's cause: flashjit's
    eval_gpu calls and their host time (the allocations' share apart), flashjit's device memory that
    MLX arrays hold after the step, and MLX's own active and cached memory."""
    import mlx.core as mx

    return dict(flashjit_calls=host_after["calls"] - host_before["calls"],
                flashjit_host_ms=(host_after["seconds"] - host_before["seconds"]) * 1e3,
                flashjit_alloc_ms=(host_after["alloc_seconds"] - host_before["alloc_seconds"]) * 1e3,
                flashjit_active_mib=device_memory["active"] / 2 ** 20,
                mlx_active_mib=mx.get_active_memory() / 2 ** 20, mlx_cache_mib=mx.get_cache_memory() / 2 ** 20)


if __name__ == "__main__":
    main()
