"""A Hugging Face transformers model end to end on each attention backend.

A randomly initialised Llama-style decoder (GQA) in bf16 runs with
attn_implementation = flashjit's backend, transformers' "sdpa" (torch picks its kernel) and
"eager" (the score matrix formed in full), all in one run on the same weights:
  train     forward + backward of the language-model loss on B x N tokens, with no padding
            and with a right-padded batch (a 2D attention mask, as in fine-tuning);
  generate  greedy decoding of new tokens after a left-padded prompt, with the KV cache.
Times are medians of synchronised runs after warm-up, the backends taking turns in each
round; memory is the peak allocated above the weights and inputs during one training step.
The record lists the attention kernels each backend launched (torch's SDPA picks its own).

    python bench/transformers_model.py --out bench/results
    python bench/transformers_model.py --tiny --device cpu     # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import time

import torch
import transformers

import flashjit
import flashjit.transformers
from flashjit.bench import device_tag
from gpu_attention import record_commit, save_record, shown_arguments


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_ms(runs, device, rounds):
    """Median milliseconds of each callable, timed one after another in each round."""
    for run in runs.values():
        run()
    synchronize(device)
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def attention_kernels(run, device):
    """Names of the attention kernels one call launches (which kernel torch's SDPA chose)."""
    if device != "cuda":
        return ""
    from torch.profiler import ProfilerActivity, profile as profiler

    with profiler(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    words = ("attention", "sdpa", "fmha", "flash", "cudnn", "fj_", "softmax")
    names = {event.key for event in prof.key_averages() if any(w in event.key.lower() for w in words)
             and not event.key.startswith("aten::")}
    return ", ".join(sorted(name[:60] for name in names))


def model_config(args):
    return transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.heads * args.head_dim, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=max(args.seqlen, args.prompt + args.new_tokens),
        pad_token_id=0)


def batch(args, padded, side="right"):
    ids = torch.randint(1, args.vocab, (args.batch, args.seqlen), device=args.device)
    mask = torch.ones_like(ids)
    if padded:  # every other sequence a quarter shorter
        cut = args.seqlen // 4
        rows = slice(1, None, 2)
        if side == "right":
            mask[rows, -cut:] = 0
        else:
            mask[rows, :cut] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def train_step(model, ids, mask, labels):
    def run():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    return run


def peak_mib(run, device):
    if device != "cuda":
        return float("nan")
    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def generate_inputs(args):
    torch.manual_seed(2)
    prompt_args = copy.copy(args)
    prompt_args.seqlen = args.prompt
    ids, mask, _ = batch(prompt_args, padded=True, side="left")
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    return dict(input_ids=ids, attention_mask=mask, **settings)


def profile(model, name, args):
    """Tables of where one padded training step and one generate spend their time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    torch.manual_seed(1)
    step = train_step(model.train(), *batch(args, True))
    inputs = generate_inputs(args)
    model.eval()
    jobs = {"train-padded": step, "generate": lambda: model.generate(**inputs)}
    os.makedirs(args.profile, exist_ok=True)
    for job, run in jobs.items():
        with torch.no_grad() if job == "generate" else torch.enable_grad():
            model.train(job != "generate")
            run()
            synchronize(args.device)
            with profiler(activities=activities) as prof:
                run()
                synchronize(args.device)
        sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        for key in (sort, "self_cpu_time_total"):
            table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)
            path = os.path.join(args.profile, f"profile-{name}-{job}-{key}.txt")
            with open(path, "w") as f:
                f.write(table)
            print(f"== {name} {job} by {key}\n" + "\n".join(table.splitlines()[:14]), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="directory for the markdown record")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a small model and problem, for a smoke run")
    parser.add_argument("--backends", default="fjit,sdpa,eager")
    parser.add_argument("--profile", default=None,
                        help="a directory: write torch.profiler tables of one padded training step and one "
                             "generate per backend there, and measure nothing else")
    args = parser.parse_args()
    sizes = (dict(layers=2, heads=4, kv_heads=2, head_dim=32, intermediate=256, vocab=512, batch=2, seqlen=128,
                  prompt=32, new_tokens=8, runs=3) if args.tiny else
             dict(layers=4, heads=16, kv_heads=4, head_dim=128, intermediate=5632, vocab=32000, batch=2, seqlen=4096,
                  prompt=1024, new_tokens=64, runs=10))
    for key, value in sizes.items():
        setattr(args, key, value)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    names = [flashjit.transformers.register() if name == "fjit" else name for name in args.backends.split(",")]
    config = model_config(args)
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    state = reference.state_dict()
    del reference

    models = {}
    for name in names:
        model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=name)
        model.load_state_dict(state)
        models[name] = model.to(device=args.device, dtype=dtype)
    if args.profile:
        for name, model in models.items():
            profile(model, name, args)
        return

    # Every job runs the backends in turn, round after round, so that clocks, caches and
    # allocator growth favour none of them.
    torch.manual_seed(1)
    train_batches = {"train": batch(args, False), "train, padded": batch(args, True)}
    inputs = generate_inputs(args)
    rows = {name: {} for name in names}
    kernels = {}
    for case, data in train_batches.items():
        runs = {name: train_step(model.train(), *data) for name, model in models.items()}
        times = interleaved_ms(runs, args.device, args.runs)
        for name, run in runs.items():
            try:
                rows[name][case] = (times[name], peak_mib(run, args.device))
            except torch.OutOfMemoryError:
                rows[name][case] = None
            models[name].zero_grad(set_to_none=True)
            if case == "train, padded":
                kernels[name] = attention_kernels(run, args.device)
    with torch.no_grad():
        runs = {name: (lambda m=model: m.eval().generate(**inputs)) for name, model in models.items()}
        times = interleaved_ms(runs, args.device, max(3, args.runs // 2))
        for name, run in runs.items():
            rows[name]["generate"] = times[name]
            rows[name]["tokens"] = run()[:, args.prompt:].cpu()
    def shown(value):  # (ms, MiB) of a training case, or None (out of memory)
        if value is None:
            return "out of memory"
        ms, mib = value
        return f"{ms:.1f} ms" + (f", {mib:.0f} MiB" if mib == mib else "")

    for name in names:
        print(f"{name}: train {shown(rows[name]['train'])}; padded {shown(rows[name]['train, padded'])}; "
              f"generate {rows[name]['generate']:.0f} ms" + (f"; kernels {kernels[name]}" if kernels[name] else ""),
              flush=True)

    commit = record_commit()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    tokens = args.batch * args.seqlen
    first = names[0]
    lines = [f"# transformers model benchmark: {gpu}", "",
             f"- date: {datetime.date.today()}", f"- commit: {commit}",
             f"- command: `python bench/transformers_model.py{shown_arguments(sys.argv[1:])}`",
             f"- torch {torch.__version__}, transformers {transformers.__version__}, flashjit {flashjit.__version__}",
             f"- Llama-style decoder, {args.layers} layers, hidden {args.heads * args.head_dim}, {args.heads} query "
             f"heads, {args.kv_heads} key/value heads, head dim {args.head_dim}, {str(dtype).split('.')[-1]}, "
             "random weights",
             f"- train: forward+backward of the loss, B{args.batch} x N{args.seqlen}; padded: every other sequence "
             f"{args.seqlen // 4} tokens shorter (right padding). generate: B{args.batch}, a {args.prompt}-token "
             f"left-padded prompt, {args.new_tokens} new tokens, greedy, KV cache",
             f"- medians of {args.runs} synchronised runs ({max(3, args.runs // 2)} for generate), the backends "
             "taking turns in each round; memory: peak allocated above weights and inputs (GPU only: – on the CPU)",
             "",
             "| backend | train ms | train tokens/s | train peak MiB | padded ms | padded peak MiB | generate ms "
             "| new tokens/s | same tokens as " + first + " |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, row in rows.items():
        cells = [name]
        for case in ("train", "train, padded"):
            value = row[case]
            if value is None:
                cells += ["out of memory"] * (3 if case == "train" else 2)
                continue
            ms, mib = value
            memory = f"{mib:.0f}" if mib == mib else "–"  # measured on a GPU only
            cells += [f"{ms:.1f}"] + ([f"{tokens / ms * 1e3:,.0f}"] if case == "train" else []) + [memory]
        cells += [f"{row['generate']:.0f}", f"{args.batch * args.new_tokens / row['generate'] * 1e3:,.0f}",
                  "yes" if torch.equal(row["tokens"], rows[first]["tokens"]) else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    if args.device == "cuda":
        lines += ["", "Attention kernels of one padded training step (torch.profiler):", ""]
        lines += [f"- {name}: {kernels[name] or 'none found'}" for name in names]
    text = "\n".join(lines) + "\n"
    print(text)
    tag = device_tag({"device": args.device, "gpu": gpu}) if args.device == "cuda" else "cpu"
    save_record(args.out, tag, "transformers", commit, text)


if __name__ == "__main__":
    main()
