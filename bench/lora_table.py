"""LoRA fine-tuning with and without flashjit: the README's table.

Runs examples/finetune/torch_lora.py or mlx_lora.py for each model and sequence length,
once with the framework's own attention and once with --use-flash-attention, each in a
process of its own (so that each peak memory is its own), with --profile-attention; then
writes a record: tokens/s, peak memory, attention's share of a step, attention time and
TFLOP/s (the profiled step's attention calls) and its share of the device's peak, and the
plan's two targets per row: attention at least 2x faster than the framework's, and
training memory at least 25% lower.

    python bench/lora_table.py --framework torch --device cuda --dtype bfloat16 --out bench/results
    python bench/lora_table.py --framework mlx --device gpu --dtype bfloat16 --out bench/results
    python bench/lora_table.py --framework torch --models tiny --seq-lens 64 --steps 3   (a quick check)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from gpu_attention import record_commit, record_text, save_record

from flashjit.bench.provenance import device_tag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(args, model: str, seq_len: int, flash: bool) -> dict:
    """One run's summary (examples/finetune/common.py), or {"error": ...} where it failed."""
    script = os.path.join(ROOT, "examples", "finetune", f"{args.framework}_lora.py")
    with tempfile.TemporaryDirectory() as directory:
        out = os.path.join(directory, "summary.json")
        command = [sys.executable, script, "--model", model, "--seq-len", str(seq_len), "--batch-size",
                   str(args.batch_size), "--steps", str(args.steps), "--dtype", args.dtype, "--device", args.device,
                   "--profile-attention", "--json-out", out] + (["--use-flash-attention"] if flash else [])
        print(" ".join(command[1:]), flush=True)
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {args.timeout} s"}
        if result.returncode != 0 or not os.path.exists(out):
            lines = (result.stderr or result.stdout).strip().splitlines()
            return {"error": lines[-1] if lines else f"exit status {result.returncode}"}
        with open(out) as file:
            return json.load(file)


def attention_figures(summary: dict) -> tuple[float, float, float, float]:
    """Attention ms of the profiled step, its share of the step, its TFLOP/s and share of the
    device's peak (torch: flashjit.profile's rows, forward and backward apart; MLX:
    flashjit.mlx.profile_step's, forward and backward together)."""
    attention = summary.get("attention") or {}
    rows = attention.get("summary") or attention.get("rows") or []
    ms = attention.get("attention_ms", float("nan"))
    share = attention.get("attention_share", attention.get("share", float("nan")))
    if not ms == ms or ms <= 0:
        return ms, share, float("nan"), float("nan")
    tera = sum(row["flops"] / 1e12 if "flops" in row else row.get("tflops", 0.0) * row["ms"] / 1e3 for row in rows)
    tflops = tera / (ms / 1e3)
    shares = [row["peak_share"] * row["ms"] for row in rows if row.get("peak_share", float("nan")) == row.get(
        "peak_share", float("nan"))]
    peak_share = sum(shares) / ms if shares else float("nan")
    return ms, share, tflops, peak_share


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", choices=["torch", "mlx"], required=True)
    parser.add_argument("--models", nargs="+", default=["tinyllama", "qwen2.5"])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu", help="cuda or cpu (torch), gpu or cpu (mlx)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds a run may take")
    parser.add_argument("--out", default=None, help="directory for the markdown record")
    args = parser.parse_args()
    rows, results = [], []
    for model in args.models:
        for seq_len in args.seq_lens:
            plain, flash = (run_example(args, model, seq_len, f) for f in (False, True))
            results.append(dict(model=model, seq_len=seq_len, plain=plain, flash=flash))
            if "error" in plain or "error" in flash:
                rows.append([model, seq_len, plain.get("error", "ok"), flash.get("error", "ok")] + ["–"] * 9)
                continue
            base_ms, base_share, _, _ = attention_figures(plain)
            ms, share, tflops, peak_share = attention_figures(flash)
            speedup = base_ms / ms if ms > 0 else float("nan")
            saving = 1.0 - flash["peak_memory_mib"] / plain["peak_memory_mib"]
            rows.append([model, seq_len, f"{plain['tokens_per_second']:.0f}", f"{flash['tokens_per_second']:.0f}",
                         f"{plain['peak_memory_mib']:.0f}", f"{flash['peak_memory_mib']:.0f}",
                         f"{base_share:.0%} / {share:.0%}", f"{base_ms:.1f} / {ms:.1f}", f"{speedup:.2f}x",
                         f"{tflops:.0f}", f"{peak_share:.0%}" if peak_share == peak_share else "–",
                         "yes" if speedup >= 2.0 else "no", "yes" if saving >= 0.25 else f"no ({saving:.0%})"])
            print(rows[-1], flush=True)
    own = "transformers' sdpa" if args.framework == "torch" else "mlx-lm's mx.fast"
    facts = [f"{args.framework} LoRA ({'examples/finetune/' + args.framework + '_lora.py'}), {args.dtype}, device "
             f"{args.device}, batch {args.batch_size}, {args.steps} steps (the first not timed), random weights",
             f"framework attention: {own}; each run in its own process; attention figures from the extra "
             "profiled step (--profile-attention)"]
    header = ["model", "seq", "tokens/s framework", "tokens/s flashjit", "peak MiB framework", "peak MiB flashjit",
              "attention share (framework / flashjit)", "attention ms (framework / flashjit)", "attention speedup",
              "flashjit attention TFLOP/s", "of peak", "attention >= 2x", "memory -25%"]
    commit = record_commit()
    text = record_text(f"LoRA fine-tuning, {args.framework}, with and without flashjit", "lora_table.py", commit,
                       facts, header, rows)
    print(text)
    gpu = ""
    if args.device != "cpu":  # the GPU's name, through flashjit's CUDA backend (either framework)
        import flashjit.cuda
        gpu = flashjit.cuda.device_info()["name"]
    tag = device_tag({"device": "cpu" if args.device == "cpu" else "cuda", "gpu": gpu})
    save_record(args.out, tag, f"lora-{args.framework}", commit, text)
    if args.out:
        with open(os.path.join(args.out, f"lora-{args.framework}-runs.json"), "w") as file:
            json.dump(results, file, indent=1, default=str)


if __name__ == "__main__":
    main()
