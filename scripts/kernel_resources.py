"""Registers, spills, stack and ptxas warnings of flashjit's kernels, without a GPU.

Generates the NVRTC source of each kernel a config selects (through a fresh
cache directory), compiles it again with nvcc -cubin -Xptxas -v for the same
target, and prints one line per kernel; ptxas warnings (wgmma serialisation,
ignored setmaxnreg) are printed in full. Needs nvcc on PATH.

    python scripts/kernel_resources.py [--arch 90] [--dtype bfloat16] [--head-dims 64 128 256] [--extras]
        [--backward] [--code DIR] [--sass DIR]
"""

import argparse
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import tempfile


def code_sections(cubin):
    """The cubin's code and kernel-info sections (.text.*, .nv.info.*, .nv.shared.*,
    .nv.constant0.*) by name, hex: what runs, without the symbol and string tables."""
    data = pathlib.Path(cubin).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "a 64-bit ELF cubin"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_offset = headers[shstrndx][4]

    def name(header):
        start = names_offset + header[0]
        return data[start:data.index(b"\0", start)].decode()

    lines = []
    for header in headers:
        section = name(header)
        if section.startswith((".text.", ".nv.info.", ".nv.shared.", ".nv.constant0.")):
            kind, offset, size = header[1], header[4], header[5]
            body = b"" if kind == 8 else data[offset:offset + size]  # SHT_NOBITS: a size alone
            lines.append(f"{section} {size} {body.hex()}")
    return "\n".join(sorted(lines)) + "\n"


def write_sass(nvdisasm, cubin, path):
    """The cubin's disassembly, then its instructions counted by opcode (without modifiers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = subprocess.run([nvdisasm, "-c", "-g", cubin], capture_output=True, text=True, check=True).stdout
    counts = {}
    for line in text.splitlines():
        match = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if match:
            counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    summary = "\n".join(f"// {count:6d} {opcode}" for opcode, count in sorted(counts.items(), key=lambda kv: -kv[1]))
    path.write_text(text + "\n// instructions by opcode\n" + summary + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--extras", action="store_true",
                        help="also causal/window kernels and mask + window + dropout + softcap kernels")
    parser.add_argument("--backward", action="store_true", help="also the backward kernels")
    parser.add_argument("--code", metavar="DIR",
                        help="also write each kernel's machine code (the cubin's code sections, hex) to "
                             "DIR/<kernel name>.code, to compare two commits' kernels: diff -r")
    parser.add_argument("--sass", metavar="DIR",
                        help="also write each kernel's disassembly to DIR/<kernel name>.sass (needs nvdisasm on "
                             "PATH or in $NVDISASM) with a count of its instructions by opcode")
    args = parser.parse_args()
    nvdisasm = os.environ.get("NVDISASM") or shutil.which("nvdisasm")
    if args.sass and not nvdisasm:
        parser.error("--sass needs nvdisasm (PATH or $NVDISASM)")

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
        if args.code:
            os.makedirs(args.code, exist_ok=True)
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
                if "warning" in line.lower() or "performance loss" in line.lower():
                    print(f"    {line.strip()}")
            if args.code:
                pathlib.Path(args.code, f"{name}.code").write_text(code_sections(cubin))
            if args.sass:
                write_sass(nvdisasm, cubin, pathlib.Path(args.sass, f"{name}.sass"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
