"""The flashjit command: `flashjit info` and `flashjit demo`."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="flashjit", description="flashjit attention engine")
    parser.add_argument("command", choices=["info", "demo"], help="info: version and backends; demo: CPU demo")
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from . import demo

        return demo.main(rest)
    import os

    import flashjit

    print(f"flashjit {flashjit.__version__}")
    print(f"backends: {', '.join(flashjit.backends())}")
    print(f"cpu threads: {os.environ.get('FLASHJIT_NUM_THREADS', os.cpu_count())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
