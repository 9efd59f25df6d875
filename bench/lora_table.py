"""LoRA fine-tuning with and without flashjit: the README's table.

Runs examples/finetune/torch_lora.py or mlx_lora.py for each model and sequence length,
once with the framework's own attention and once with --use-flash-attention, each in a
process of its own (so that each peak memory is its own), with --profile-attention; then
writes a record: tokens/s, peak memory, attention's share of a step, attention time by
direction (the profiled step's attention calls: torch's forward and backward apart, MLX's
together) and the speedup over the directions both sides recorded, flashjit's attention
TFLOP/s and its share of the device's peak, and the plan's two targets per row: attention
at least 2x faster than the framework's, and training memory at least 25% lower.

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
        extra = dict(item.split("=", 1) for item in args.flash_env) if flash else {}
        print(" ".join([f"{k}={v}" for k, v in extra.items()] + command[1:]), flush=True)
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                                    env=dict(os.environ, **extra))
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {args.timeout} s"}
        if result.returncode != 0 or not os.path.exists(out):
            lines = (result.stderr or result.stdout).strip().splitlines()
            return {"error": lines[-1] if lines else f"exit status {result.returncode}"}
        with open(out) as file:
            return json.load(file)


# The directions of the attention rows: torch's profile (flashjit.profile) records each call's
# forward and backward apart; flashjit.mlx.profile_step times each call forward and backward
# together (its rows have no direction).
DIRECTIONS = ("forward", "backward", "forward+backward")


def attention_figures(summary: dict) -> tuple[float, float, float, float]:
    """Attention ms of the profiled step (every row, all directions), its share of the step, its
    TFLOP/s and share of the device's peak (torch: flashjit.profile's rows, forward and backward
    apart; MLX: flashjit.mlx.profile_step's, forward and backward together)."""
    attention = summary.get("attention") or {}
    rows = attention.get("summary") or attention.get("rows") or []
    ms = attention.get("attention_ms", float("nan"))
    # Of the median step (steady steps, not profiled): the profiled step's own time carries the
    # profiler's work; where there is none, the profile's own share.
    step_ms = summary.get("step_seconds", float("nan")) * 1e3
    share = ms / step_ms if step_ms > 0 else attention.get("attention_share", attention.get("share", float("nan")))
    if not ms == ms or ms <= 0:
        return ms, share, float("nan"), float("nan")
    tera = sum(row["flops"] / 1e12 if "flops" in row else row.get("tflops", 0.0) * row["ms"] / 1e3 for row in rows)
    tflops = tera / (ms / 1e3)
    shares = [row["peak_share"] * row["ms"] for row in rows if row.get("peak_share", float("nan")) == row.get(
        "peak_share", float("nan"))]
    peak_share = sum(shares) / ms if shares else float("nan")
    return ms, share, tflops, peak_share


def attention_by_direction(summary: dict) -> dict[str, float]:
    """The profiled step's attention ms by direction (DIRECTIONS), only those it recorded."""
    attention = summary.get("attention") or {}
    by_direction: dict[str, float] = {}
    for row in attention.get("summary") or attention.get("rows") or []:
        direction = row.get("direction", "forward+backward")
        by_direction[direction] = by_direction.get(direction, 0.0) + row["ms"]
    return by_direction


def attention_speedup(framework: dict[str, float], flashjit: dict[str, float]) -> tuple[float, list[str]]:
    """The framework's attention ms over flashjit's, summed over the directions both sides
    recorded (against a run with no backward records, forward only), and those directions;
    nan where they share none."""
    common = [d for d in DIRECTIONS if d in framework and d in flashjit]
    base, ms = sum(framework[d] for d in common), sum(flashjit[d] for d in common)
    return (base / ms if common and ms > 0 else float("nan")), common


def speedup_cell(speedup: float, common: list[str], framework: dict, flashjit: dict) -> str:
    """The speedup, with the directions it covers where they are fewer than either side recorded."""
    if speedup != speedup:
        return "–"
    partial = set(common) != set(framework) | set(flashjit)
    return f"{speedup:.2f}x" + (f" ({' + '.join(common)} only)" if partial else "")


def table_row(result: dict, directions: list[str]) -> list:
    """One row of the record: a model and sequence length, both runs."""
    plain, flash = result["plain"], result["flash"]
    head = [result["model"], result["seq_len"]]
    if "error" in plain or "error" in flash:
        return head + [plain.get("error", "ok"), flash.get("error", "ok")] + ["–"] * (8 + len(directions))
    _, base_share, _, _ = attention_figures(plain)
    _, share, tflops, peak_share = attention_figures(flash)
    base_ms, ms = attention_by_direction(plain), attention_by_direction(flash)
    speedup, common = attention_speedup(base_ms, ms)
    saving = 1.0 - flash["peak_memory_mib"] / plain["peak_memory_mib"]

    def shown(by_direction, direction):
        return f"{by_direction[direction]:.1f}" if direction in by_direction else "–"

    return head + [f"{plain['tokens_per_second']:.0f}", f"{flash['tokens_per_second']:.0f}",
                   f"{plain['peak_memory_mib']:.0f}", f"{flash['peak_memory_mib']:.0f}",
                   f"{base_share:.0%} / {share:.0%}"] + [
        f"{shown(base_ms, d)} / {shown(ms, d)}" for d in directions] + [
        speedup_cell(speedup, common, base_ms, ms), f"{tflops:.0f}",
        f"{peak_share:.0%}" if peak_share == peak_share else "–",
        "–" if speedup != speedup else "yes" if speedup >= 2.0 else "no",
        "yes" if saving >= 0.25 else f"no ({saving:.0%})"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", choices=["torch", "mlx"], required=True)
    parser.add_argument("--models", nargs="+", default=["tinyllama", "qwen2.5"])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8, help="training steps a run (the first two are warm-ups, "
                        "not timed: examples/finetune/common.py)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu", help="cuda or cpu (torch), gpu or cpu (mlx)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds a run may take")
    parser.add_argument("--out", default=None, help="directory for the markdown record")
    parser.add_argument("--flash-env", nargs="+", default=[], metavar="NAME=VALUE",
                        help="environment variables of the flashjit runs only (e.g. FLASHJIT_MLX_LAUNCH=nodes)")
    args = parser.parse_args()
    for item in args.flash_env:
        if "=" not in item or not item.split("=", 1)[0]:
            parser.error(f"--flash-env: expected NAME=VALUE, got {item!r}")
    results = []
    for model in args.models:
        for seq_len in args.seq_lens:
            plain, flash = (run_example(args, model, seq_len, f) for f in (False, True))
            results.append(dict(model=model, seq_len=seq_len, plain=plain, flash=flash))
            for name, run in (("framework", plain), ("flashjit", flash)):
                figures = run.get("error") or f"{run['tokens_per_second']:.0f} tokens/s, attention " + ", ".join(
                    f"{d} {ms:.1f} ms" for d, ms in attention_by_direction(run).items())
                print(f"{model} {seq_len} {name}: {figures}", flush=True)
    recorded = set()
    for result in results:
        for run in (result["plain"], result["flash"]):
            recorded |= set(attention_by_direction(run))
    directions = [d for d in DIRECTIONS if d in recorded] or ["forward"]
    rows = [table_row(result, directions) for result in results]
    runs = [run for result in results for run in (result["plain"], result["flash"]) if "error" not in run]
    warmup = runs[0].get("warmup_steps", 1) if runs else 2
    own = "transformers' sdpa" if args.framework == "torch" else "mlx-lm's mx.fast"
    facts = [f"{args.framework} LoRA ({'examples/finetune/' + args.framework + '_lora.py'}), {args.dtype}, device "
             f"{args.device}, batch {args.batch_size}, {args.steps} steps (tokens/s: a step's tokens over the median "
             f"time of the steps after the first {warmup}), random weights",
             f"framework attention: {own}; each run in its own process; attention figures from the extra "
             "profiled step (--profile-attention)"
             + (f"; the flashjit runs with {' '.join(args.flash_env)}" if args.flash_env else ""),
             "attention ms: the profiled step's attention calls by direction (torch: flashjit.profile(framework="
             "True, alone=True), each distinct call's forward and backward timed by itself after the step; MLX: flashjit.mlx.profile_step, each distinct "
             "call timed alone, forward and backward together); attention share: all of them over the median step; "
             "attention speedup: the framework's ms over flashjit's, summed over the directions both runs recorded "
             "(those named where fewer than either recorded); TFLOP/s and of peak: flashjit's calls, all directions"]
    header = ["model", "seq", "tokens/s framework", "tokens/s flashjit", "peak MiB framework", "peak MiB flashjit",
              "attention share (framework / flashjit)"] + [
        f"attention ms {d} (framework / flashjit)" for d in directions] + [
        "attention speedup", "flashjit attention TFLOP/s", "of peak", "attention >= 2x", "memory -25%"]
    commit = record_commit()
    text = record_text(f"LoRA fine-tuning, {args.framework}, with and without flashjit", "lora_table.py", commit,
                       facts, header, rows)
    print(text)
    gpu = ""
    if args.device != "cpu":  # the GPU's name, through flashjit's CUDA backend (either framework)
        import flashjit.cuda
        gpu = flashjit.cuda.device_info()["name"]
    tag = device_tag({"device": "cpu" if args.device == "cpu" else "cuda", "gpu": gpu})
    label = "-".join(item.split("=", 1)[1] for item in args.flash_env)  # FLASHJIT_MLX_LAUNCH=nodes: "-nodes"
    save_record(args.out, tag, f"lora-{args.framework}", commit, text, label=label)
    if args.out:
        with open(os.path.join(args.out, f"lora-{args.framework}-runs.json"), "w") as file:
            json.dump(results, file, indent=1, default=str)


if __name__ == "__main__":
    main()
