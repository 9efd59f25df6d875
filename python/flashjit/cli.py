"""The flashjit command: bench, info, precompile, cache clear, demo.

    flashjit bench [--quick] [--out DIR] ...   compare with naive attention, PyTorch SDPA, FlexAttention
    flashjit info [--json]                     version, backends, GPU, NVRTC, kernel cache
    flashjit precompile [--arch 90] ...        compile the common CUDA kernels ahead of time
    flashjit cache clear                       delete this version's on-disk kernel cache
    flashjit tune [--backward] [--head-dims 64 128] ...  measure the sm_90a forward's tiles (the backward's pass)
                                               on this GPU and keep the fastest
    flashjit demo ...                          the CPU forward+backward demo (python -m flashjit.demo)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_EPILOG = "Run `flashjit <command> --help` for a command's options."


def _parser() -> argparse.ArgumentParser:
    from . import bench

    parser = argparse.ArgumentParser(prog="flashjit", description="flashjit attention engine", epilog=_EPILOG)
    commands = parser.add_subparsers(dest="command", metavar="{bench,info,precompile,cache,tune,demo}")
    commands.required = True
    bench_parser = commands.add_parser("bench", help="benchmark against naive attention and PyTorch",
                                       description=bench.__doc__.split("\n\n")[0])
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(subparser=bench_parser)
    info = commands.add_parser("info", help="version, backends, GPU, NVRTC and kernel cache")
    info.add_argument("--json", action="store_true", help="print a JSON object")
    precompile = commands.add_parser("precompile", help="compile the common CUDA kernels ahead of time",
                                     description="Compiles (or finds in the cache) the forward and backward "
                                     "kernels of the usual bf16/fp16 training problems.")
    precompile.add_argument("--arch", type=_arch, default=0,
                            help="target such as 80, 90 or sm_90 (no GPU needed); default: the GPU's arch")
    precompile.add_argument("--gpu", type=int, default=0, metavar="INDEX", help="device index (default 0)")
    precompile.add_argument("--dtypes", nargs="+", choices=["float32", "float16", "bfloat16", "float64"],
                            metavar="DTYPE", help="float32, float16, bfloat16 or float64 (default: bfloat16 float16)")
    precompile.add_argument("--head-dims", nargs="+", type=_head_dim, metavar="D", help="default: 64 128")
    precompile.add_argument("--nondeterministic", action="store_true",
                            help="the backward configs also with what deterministic=False backwards run")
    precompile.add_argument("--quiet", action="store_true", help="no line per kernel")
    cache = commands.add_parser("cache", help="the on-disk kernel cache")
    cache.add_argument("action", choices=["clear", "info"], help="clear: delete this version's cache; "
                       "info: where it is and how large")
    tune = commands.add_parser("tune", help="measure the sm_90a forward's tile choices (or the backward's pass) "
                               "on this GPU",
                               description="Times candidate tile configurations of the sm_90a forward per problem "
                               "class (dtype, head dim, causal, key length) and keeps each class's fastest in the "
                               "GPU's tuning file in the kernel cache directory; later calls take it. With "
                               "--backward, the backward's passes (split, one-pass, and one-pass-diagonal for "
                               "causal classes) instead.")
    tune.add_argument("--backward", action="store_true", help="tune the backward's pass instead of the forward's tiles")
    tune.add_argument("--gpu", type=int, default=0, metavar="INDEX", help="device index (default 0)")
    tune.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float16"], default=["bfloat16", "float16"],
                      metavar="DTYPE", help="bfloat16, float16 or both (default: both)")
    tune.add_argument("--head-dims", nargs="+", type=_head_dim, default=[64, 128, 256], metavar="D",
                      help="default: 64 128 256 (with --backward, those from 33 to 128)")
    tune.add_argument("--seqlens", nargs="+", type=_seqlen, default=[1024, 4096, 16384], metavar="N")
    tune.add_argument("--with", dest="variants", nargs="+", default=[], metavar="KEYS",
                      help="also each candidate with these FLASHJIT_CUDA_TILES keys added, e.g. chain=tiles "
                           "(the forward only)")
    commands.add_parser("demo", help="the CPU demo (options: flashjit demo --help)", add_help=False)
    return parser


def _arch(text: str) -> int:
    digits = text.lower().removeprefix("sm_").removeprefix("sm").replace(".", "")
    if not digits.isdigit() or int(digits) < 80:
        raise argparse.ArgumentTypeError(f"expected a compute capability of at least 80 such as 80, 90 or sm_90, "
                                         f"got {text!r}")
    return int(digits)


def _seqlen(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _head_dim(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 256:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to 256, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from . import demo

        return demo.main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        try:
            import torch  # noqa: F401
        except ImportError:
            print("flashjit bench: needs torch (pip install torch matplotlib); `flashjit info` works without it",
                  file=sys.stderr)
            return 1
        from . import bench

        return bench.run(args, args.subparser, argv[1:])
    if args.command == "info":
        return info(as_json=args.json)
    if args.command == "precompile":
        return precompile(args.arch, args.gpu, args.dtypes, args.head_dims, not args.quiet, args.nondeterministic)
    if args.command == "tune":
        return tune(args.gpu, args.dtypes, args.head_dims, args.seqlens, args.backward, args.variants)
    return cache_info() if args.action == "info" else cache_clear()


# ----------------------------------------------------------------------------- info

def _directory_usage(path: str) -> tuple[int, int]:
    """(files, bytes) under path."""
    files = size = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                size += os.lstat(os.path.join(root, name)).st_size
                files += 1
            except OSError:
                pass
    return files, size


def version_cache_dir() -> str:
    """This version's cache directory, <base>/<version> (kernels sit in its sm_XX/ folders)."""
    import flashjit

    return os.path.dirname(flashjit.cuda.cache_dir(80))


def _error_text(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def collect_info() -> dict:
    import platform

    import flashjit

    result = {
        "flashjit": flashjit.__version__,
        "package": os.path.dirname(flashjit.__file__),
        "backends": flashjit.backends(),
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "flashjit_threads": int(os.environ.get("FLASHJIT_NUM_THREADS", "0") or 0) or os.cpu_count(),
        **_cpu_kernels(),
    }
    try:
        import torch

        result["torch"] = torch.__version__
        result["torch_cuda"] = torch.version.cuda
        from . import ops

        result["torch_autograd_rule"] = ops.native_note
    except ImportError:
        result["torch"] = None
    gpus = []
    try:
        for index in range(flashjit.cuda.device_count()):
            gpu = flashjit.cuda.device_info(index)
            gpus.append({"index": index, "name": gpu["name"], "arch": f"sm_{gpu['arch']}",
                         "multiprocessors": gpu["multiprocessors"],
                         "tuning": flashjit.cuda.tuning_info(index) if gpu["arch"] == 90 else None})
        if not gpus:
            flashjit.cuda.device_info(0)  # raises with the reason (no driver, no device)
            result["gpu_note"] = "no CUDA device visible to the driver"
    except Exception as error:  # noqa: BLE001 (reported, not raised: info works on any machine)
        result["gpu_note"] = _error_text(error)
    result["gpus"] = gpus
    try:
        result["nvrtc"] = ".".join(map(str, flashjit.cuda.nvrtc_version()))
    except Exception as error:  # noqa: BLE001
        result["nvrtc"] = None
        result["nvrtc_note"] = _error_text(error)
    result["nvrtc_path"] = os.environ.get("FLASHJIT_NVRTC") or None
    try:
        import flashjit.mlx  # noqa: F401  (built only where MLX was installed)
        import mlx.core

        result["mlx"] = mlx.core.__version__
    except ImportError as error:
        result["mlx"] = None
        result["mlx_note"] = _error_text(error)
    try:
        from importlib.metadata import version

        result["transformers"] = version("transformers")
    except Exception:  # noqa: BLE001 (not installed)
        result["transformers"] = None
    try:
        directory = version_cache_dir()
        files, size = _directory_usage(directory)
        result["cache"] = {"dir": directory, "files": files, "bytes": size,
                           "archs": sorted(name for name in (os.listdir(directory) if os.path.isdir(directory) else [])
                                           if name.startswith("sm_"))}
    except Exception as error:  # noqa: BLE001
        result["cache"] = {"dir": None, "note": _error_text(error)}
    return result


def _cpu_kernels() -> dict:
    """The CPU kernel variant calls take and those compiled in (or why none can run)."""
    from . import _C

    try:
        variant, variants = _C.cpu_kernels()
    except (ValueError, NotImplementedError, RuntimeError) as error:
        variant, variants = f"none ({_error_text(error)})", ""
    return {"cpu_kernels": variant, "cpu_kernel_variants": variants}


def info(as_json: bool = False) -> int:
    result = collect_info()
    if as_json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"flashjit {result['flashjit']} ({result['package']})")
    print(f"backends: {', '.join(result['backends'])}")
    print(f"cpu: {result['cpu_cores']} cores, flashjit threads {result['flashjit_threads']} "
          f"(FLASHJIT_NUM_THREADS {'set' if os.environ.get('FLASHJIT_NUM_THREADS') else 'unset'})")
    print(f"cpu kernels: {result['cpu_kernels']} (compiled: {result['cpu_kernel_variants']}; "
          f"FLASHJIT_CPU_ISA {os.environ.get('FLASHJIT_CPU_ISA') or 'unset'})")
    if result["torch"] is not None:
        print(f"torch: {result['torch']}" + (f" (CUDA {result['torch_cuda']})" if result["torch_cuda"] else " (CPU)"))
        print(f"torch autograd rule: {result['torch_autograd_rule']}")
    else:
        print("torch: not installed")
    for gpu in result["gpus"]:
        print(f"gpu {gpu['index']}: {gpu['name']}, {gpu['arch']}, {gpu['multiprocessors']} SMs")
        if gpu["tuning"]:
            print("  tuned tiles: " + gpu["tuning"].replace("\n", "\n    "))
    if not result["gpus"]:
        print(f"gpu: none ({result.get('gpu_note', '')})")
    if result["nvrtc"]:
        print(f"nvrtc: {result['nvrtc']}" + (f" ({result['nvrtc_path']})" if result["nvrtc_path"] else ""))
    else:
        print(f"nvrtc: not found ({result['nvrtc_note']})")
    mlx_text = f"with mlx {result['mlx']}" if result["mlx"] else f"unavailable ({result['mlx_note']})"
    print(f"mlx primitives: {mlx_text}")
    transformers_text = result["transformers"] and f"with transformers {result['transformers']}"
    print(f"transformers backend: {transformers_text or 'transformers not installed'}")
    cache = result["cache"]
    if cache.get("dir"):
        archs = f", archs {', '.join(cache['archs'])}" if cache["archs"] else ""
        print(f"kernel cache: {cache['dir']}: {cache['files']} files, {cache['bytes']} bytes{archs}")
    else:
        print(f"kernel cache: unavailable ({cache['note']})")
    return 0


# ----------------------------------------------------------------------------- precompile

def _configs(dtypes: list[str] | None, head_dims: list[int] | None, nondeterministic: bool = False):
    import dataclasses

    from .cuda import KernelConfig, common_configs

    if dtypes is None and head_dims is None:
        configs = common_configs()
    else:
        configs = []
        for dtype in dtypes or ["bfloat16", "float16"]:
            for head_dim in head_dims or [64, 128]:
                for window in (False, True):
                    for backward in (False, True):
                        configs.append(KernelConfig(dtype=dtype, head_dim=head_dim, window=window, backward=backward))
    if nondeterministic:
        configs = [dataclasses.replace(c, deterministic=False) if c.backward else c for c in configs]
    return configs


def _describe(config) -> str:
    parts = [config.dtype, f"D{config.head_dim}", "backward" if config.backward else "forward"]
    if config.window:
        parts.append("causal/window")
    if not config.deterministic:
        parts.append("+ deterministic=False")
    return " ".join(parts)


def precompile(arch: int, gpu: int, dtypes: list[str] | None, head_dims: list[int] | None, progress: bool,
               nondeterministic: bool = False) -> int:
    import flashjit

    configs = _configs(dtypes, head_dims, nondeterministic)
    target = f"sm_{arch}" if arch else f"GPU {gpu}'s arch"
    start = time.monotonic()
    before = flashjit.cuda.cache_stats()
    for index, config in enumerate(configs):
        stats = flashjit.cuda.cache_stats()
        began = time.monotonic()
        try:
            flashjit.precompile([config], arch=arch, device=gpu)
        except (NotImplementedError, RuntimeError, ValueError, TypeError) as error:
            hint = "" if arch else "; pass --arch 80 or --arch 90 to compile for a target without a GPU"
            print(f"flashjit precompile: {_error_text(error)}{hint}", file=sys.stderr)
            return 1
        after = flashjit.cuda.cache_stats()
        how = ("compiled" if after["compiles"] > stats["compiles"] else
               "loaded from disk" if after["disk_loads"] > stats["disk_loads"] else "already loaded")
        if progress:
            print(f"[{index + 1:>2}/{len(configs)}] {_describe(config):<34} {how} in "
                  f"{time.monotonic() - began:.2f} s", file=sys.stderr, flush=True)
    after = flashjit.cuda.cache_stats()
    print(f"{len(configs)} kernel configs for {target} in {time.monotonic() - start:.1f} s: "
          f"{after['compiles'] - before['compiles']} kernels compiled, "
          f"{after['disk_loads'] - before['disk_loads']} loaded from disk; cache {version_cache_dir()}")
    return 0


# ----------------------------------------------------------------------------- tune

def tune(gpu: int, dtypes: list[str], head_dims: list[int], seqlens: list[int], backward: bool = False,
         variants: list[str] = ()) -> int:
    import flashjit

    try:
        import torch  # noqa: F401
    except ImportError:
        print("flashjit tune: needs torch with CUDA (pip install torch)", file=sys.stderr)
        return 1
    if flashjit.cuda.device_count() == 0:
        print("flashjit tune: no CUDA GPU found", file=sys.stderr)
        return 1
    try:
        results = flashjit.cuda.tune(head_dims, seqlens, dtype=tuple(dtypes), device=gpu, backward=backward,
                                     variants=tuple(variants))
    except (NotImplementedError, ValueError) as error:
        print(f"flashjit tune: {error}", file=sys.stderr)
        return 1
    for key, result in results.items():
        print(f"{key}: {result['tiles']} ({result['tflops'][result['tiles']]:.0f} TFLOP/s)")
    print(flashjit.cuda.tuning_info(gpu))
    return 0


# ----------------------------------------------------------------------------- cache

def cache_info() -> int:
    directory = version_cache_dir()
    files, size = _directory_usage(directory)
    print(f"{directory}: {files} files, {size} bytes")
    return 0


def cache_clear() -> int:
    """Deletes this version's kernel files (other versions' kernels and files flashjit did not write stay)."""
    import flashjit

    directory = version_cache_dir()
    if not os.path.isdir(directory):
        print(f"nothing to remove: {directory} does not exist")
        return 0
    removed = flashjit.cuda.remove_cache_files(flashjit.__version__)
    print(f"removed {removed['files']} kernel files ({removed['bytes']} bytes) from {directory}")
    for folder in removed["folders"]:
        print(f"removed the empty folder {folder}")
    for path in removed["kept"]:
        print(f"kept {path}: not a flashjit kernel file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
