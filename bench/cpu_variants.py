"""The CPU kernel variants of this build (flashjit/cpu.h) against each other: forward and
forward + backward time of a few float32 problems (B*N = 2048 tokens, H = 512 / D), each
variant in a process of its own (FLASHJIT_CPU_ISA), median of --repeats after a warm-up.

    python bench/cpu_variants.py [--repeats 5] [--out DIR] [--label TAG]

A build with FLASHJIT_NATIVE has the one variant `native`: run it there with --label native
to set it beside a portable build's record.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

CASES = [(64, 2048, False), (128, 2048, False), (64, 2048, True), (128, 1024, True)]

CHILD = """
import json, statistics, sys, time
import torch, flashjit
from flashjit import _C
torch.manual_seed(0)
repeats = int(sys.argv[1])
rows = []
for head_dim, seqlen, causal in json.loads(sys.argv[2]):
    heads, batch = 512 // head_dim, max(1, 2048 // seqlen)
    q, k, v = (torch.randn(batch, heads, seqlen, head_dim, requires_grad=True) for _ in range(3))
    grad = torch.randn(batch, heads, seqlen, head_dim)
    def forward():
        with torch.no_grad():
            flashjit.attention(q, k, v, causal=causal)
    def both():
        flashjit.attention(q, k, v, causal=causal).backward(grad)
    times = []
    for fn in (forward, both):
        fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        times.append(statistics.median(samples))
    rows.append([head_dim, seqlen, causal, *times])
print(json.dumps({"variant": _C.cpu_kernels()[0], "rows": rows}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    from flashjit import _C

    _, variants = _C.cpu_kernels()
    results = {}
    for variant in variants.split(","):
        env = dict(os.environ, FLASHJIT_CPU_ISA=variant)
        done = subprocess.run([sys.executable, "-c", CHILD, str(args.repeats), json.dumps(CASES)], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{variant}: {done.stderr.strip().splitlines()[-1]}", file=sys.stderr)
            continue
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])["rows"]
    from flashjit.bench.provenance import record_commit

    commit = record_commit()
    names = list(results)
    widest = names[-1] if names and names[0] == "baseline" else names[0]
    lines = [f"# CPU kernel variants: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
             "", f"- date: {datetime.date.today().isoformat()}", f"- commit: {commit}",
             f"- command: `python bench/cpu_variants.py --repeats {args.repeats}"
             + (f" --label {args.label}`" if args.label else "`"),
             "- float32, B*N = 2048 tokens, H = 512 / D; milliseconds, median; each variant in its own process", "",
             "| D | N | causal | " + " | ".join(f"{n} fwd | {n} fwd+bwd" for n in names)
             + (f" | {widest} vs baseline (fwd+bwd) |" if "baseline" in names and widest != "baseline" else " |"),
             "|---|---|---|" + "---|---|" * len(names) + ("---|" if "baseline" in names and widest != "baseline" else "")]
    for i, (head_dim, seqlen, causal) in enumerate(CASES):
        cells = [f"{results[n][i][3]:.1f} | {results[n][i][4]:.1f}" for n in names]
        ratio = ""
        if "baseline" in names and widest != "baseline":
            ratio = f" {results['baseline'][i][4] / results[widest][i][4]:.2f}x |"
        lines.append(f"| {head_dim} | {seqlen} | {'yes' if causal else 'no'} | " + " | ".join(cells) + " |" + ratio)
    text = "\n".join(lines) + "\n"
    print(text)
    from gpu_attention import save_record  # bench/ is the script's folder

    save_record(args.out, "cpu", "variants", commit, text, args.label)


if __name__ == "__main__":
    main()
