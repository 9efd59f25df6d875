"""Which instruction sets a flashjit binary's functions use: every function with AMX tiles
(tmm registers) must be one of the amx variant's CPU kernels, every function with AVX-512
(zmm or mask registers) one of the avx512, avx512bf16 or amx variant's, every function with AVX
(ymm registers) one of the avx2, avx512, avx512bf16 or amx variant's, so that a processor without them
never reaches those instructions (the backend chooses a variant by what the processor
reports). Also checks that those variants do use their instruction sets.

    python scripts/check_cpu_isa.py BINARY    (a .so, .a or .o; needs objdump)

Exit status 0 when the binary keeps to this, 1 otherwise (the offending functions listed).
"""

import re
import subprocess
import sys

FUNCTION = re.compile(r"^[0-9a-f]+ <(.*)>:$")
ZMM = re.compile(r"%zmm\d+|%k[1-7]\b")
YMM = re.compile(r"%ymm\d+")
TMM = re.compile(r"%tmm\d+")
# The registers each variant may use beyond the baseline, widest first.
ALLOWED = {"amx": {"tmm", "zmm", "ymm"}, "avx512bf16": {"zmm", "ymm"}, "avx512": {"zmm", "ymm"}, "avx2": {"ymm"}}


def functions(binary):
    """{function name: set of 'tmm'/'zmm'/'ymm' it uses} from objdump's disassembly."""
    text = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", binary], capture_output=True, text=True,
                          check=True).stdout
    uses, name = {}, None
    for line in text.splitlines():
        match = FUNCTION.match(line)
        if match:
            name = match.group(1)
            uses.setdefault(name, set())
        elif name is not None:
            if ZMM.search(line):
                uses[name].add("zmm")
            if YMM.search(line):
                uses[name].add("ymm")
            if TMM.search(line):
                uses[name].add("tmm")
    return uses


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    uses = functions(sys.argv[1])
    def allowed(name):
        return next((registers for variant, registers in ALLOWED.items() if f"::{variant}::" in name), set())

    bad = [(name, sorted(found - allowed(name))) for name, found in uses.items() if found - allowed(name)]
    for name, found in bad[:20]:
        print(f"outside its variant: {', '.join(found)} in {name}")
    own = {"amx": "tmm", "avx512bf16": "zmm", "avx512": "zmm", "avx2": "ymm"}
    missing = [variant for variant, register in own.items()
               if not any(register in found for name, found in uses.items() if f"::{variant}::" in name)]
    for variant in missing:
        print(f"the {variant} variant uses no {own[variant]} register: not built for it?")
    kernels = sum(1 for name in uses if "flashjit::cpu::" in name)
    print(f"{len(uses)} functions, {kernels} in flashjit::cpu; {len(bad)} outside their variant"
          + (f"; variants without their registers: {', '.join(missing)}" if missing else ""))
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
