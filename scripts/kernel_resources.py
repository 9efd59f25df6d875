"""Registers, spills, stack and ptxas warnings of flashjit's kernels, without a GPU.

Generates the NVRTC source of each kernel a config selects (through a fresh
cache directory), compiles it again with nvcc -cubin -Xptxas -v for the same
target, and prints one line per kernel; ptxas warnings (wgmma serialisation,
ignored setmaxnreg) are printed in full. Needs nvcc on PATH.

    python scripts/kernel_resources.py [--arch 90] [--dtype bfloat16] [--head-dims 64 128 256] [--extras]
        [--backward] [--sass DIR]
"""

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--extras", action="store_true",
                        help="also causal/window kernels and mask + window + dropout + softcap kernels")
    parser.add_argument("--backward", action="store_true", help="also the backward kernels")
    parser.add_argument("--sass", metavar="DIR",
                        help="also write each kernel's SASS to DIR/<kernel name>.sass (to compare two "
                             "commits' machine code: diff -r)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as cache:
        os.environ["FLASHJIT_CACHE_DIR"] = cache
        import flashjit
        from flashjit.cuda import KernelConfig

        configs = []
        for head_dim in args.head_dims:
            for backward in (False, True) if args.backward else (False,):
                configs.append(KernelConfig(dtype=args.dtype, head_dim=head_dim, backward=backward))
                if args.extras:
                    configs.append(KernelConfig(dtype=args.dtype, head_dim=head_dim, backward=backward, window=True))
                    configs.append(KernelConfig(dtype=args.dtype, head_dim=head_dim, backward=backward, mask="bool",
                                                window=True, dropout=True, softcap=True))
        flashjit.precompile(configs, arch=args.arch)
        failed = False
        if args.sass:
            os.makedirs(args.sass, exist_ok=True)
        for source in sorted(pathlib.Path(cache).rglob("*.cu")):
            text = source.read_text()
            name = text.splitlines()[0].removeprefix("// flashjit kernel ").strip()
            target = f"sm_{args.arch}a" if name.endswith("a") else f"sm_{args.arch}"
            cubin = os.path.join(cache, "kernel.cubin")
            result = subprocess.run(
                ["nvcc", "-cubin", f"-arch={target}", "-std=c++17", "-Xptxas", "-v", "-diag-suppress", "177", "-o", cubin,
                 "-x", "cu", str(source)], capture_output=True, text=True)
            log = result.stdout + result.stderr
            if result.returncode != 0:
                print(f"{name}: nvcc failed\n{log}")
                failed = True
                continue
            registers = re.search(r"Used (\d+) registers", log)
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
            stack = re.search(r"(\d+) bytes stack frame", log)
            print(f"{name}: {registers.group(1) if registers else '?'} registers, "
                  f"stack {stack.group(1) if stack else '?'} B, spills {spill.group(1) if spill else '?'}/"
                  f"{spill.group(2) if spill else '?'} B")
            for line in log.splitlines():
                if "warning" in line.lower():
                    print(f"    {line.strip()}")
            if args.sass:
                sass = subprocess.run(["cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True).stdout
                pathlib.Path(args.sass, f"{name}.sass").write_text(sass)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
