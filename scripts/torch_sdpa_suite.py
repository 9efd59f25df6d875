"""PyTorch's own SDPA tests against flashjit's drop-in.

Runs PyTorch's `test/test_transformers.py` (a copy the caller provides; it is not
part of this repository) twice with pytest on one device: as is, and with
`flashjit.patch_sdpa()` called before the file is imported. Prints the tests that
pass plain and fail patched, and how many SDPA calls flashjit served and how many
it handed back to torch (so that a pass cannot come from everything falling back).

    python scripts/torch_sdpa_suite.py PATH/test_transformers.py [--device cpu|cuda] [--out bench/results]
        [-k EXPRESSION] [--timeout SECONDS] [--workers N] [--test-timeout SECONDS]
        [--source 'pytorch/pytorch at <commit>'] [--shard K/N] [--concurrent] [--confirm] [--patched-first]

--shard K/N keeps the K-th of N equal slices of the selected tests (by test id, the
same slice in both runs and in every worker), so that a suite longer than one sitting
can run as N calls; each slice writes its own record. --concurrent runs the plain and
the patched run at once (two processes sharing the device, each with --workers), which
halves a slice's wall time where the machine has the cores; the outcomes are the same.
--confirm runs the tests whose outcome differed between the two runs again, alone, both
ways, and marks those that differ again: a difference that does not come back is the
first run's (a flaky test, a worker lost), not flashjit's. Failures' first lines are in
the record. --patched-first runs the patched run first and then the plain run only on the
tests that did not pass patched (what passes patched cannot count against flashjit): about
half the time of both runs, without the list of tests that fail plain and pass patched.

The file's imports need torch's test helpers (torch.testing._internal, shipped
with torch) and, outside fbcode, test_cpp_extensions_open_device_registration
from torch's test folder: a stub of the two names it takes is put beside it, so
the tests that build a C++ extension fail in both runs alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

_STUB = '''"""Stub for torch's test_cpp_extensions_open_device_registration (not available here)."""


def remove_build_path():
    pass


def generate_faked_module():
    raise RuntimeError("the open-device C++ extension is not available in this run")
'''

# A pytest plugin for both runs with --shard K/N: keeps every N-th test of the
# selection, sorted by id, from the K-th (1-based).
_SHARD_PLUGIN = '''
import os


def pytest_collection_modifyitems(config, items):
    k, n = (int(x) for x in os.environ["FLASHJIT_SUITE_SHARD"].split("/"))
    order = sorted(range(len(items)), key=lambda i: items[i].nodeid)
    keep = {i for rank, i in enumerate(order) if rank % n == k - 1}
    config.hook.pytest_deselected(items=[item for i, item in enumerate(items) if i not in keep])
    items[:] = [item for i, item in enumerate(items) if i in keep]
'''

# A pytest plugin that keeps the tests a file lists (FLASHJIT_SUITE_ONLY: a junit id a line,
# 'dotted.module.Class::test'), told by class and test name.
_ONLY_PLUGIN = '''
import os


def pytest_collection_modifyitems(config, items):
    wanted = set()
    with open(os.environ["FLASHJIT_SUITE_ONLY"]) as listed:
        for line in listed:
            if "::" in line:
                classname, test = line.strip().split("::", 1)
                wanted.add((classname.rsplit(".", 1)[-1], test))
    keep = [item for item in items if (getattr(item.cls, "__name__", ""), item.name) in wanted]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep
'''

# A pytest plugin for the patched run: patch before collection imports the test
# file, count what the router served and what it handed to torch.
_PLUGIN = '''
import json
import os

import flashjit
import flashjit.sdpa as sdpa

# served / fallback: the router's calls; tests: the tests this process ran; unpatched: those after
# which torch.nn.functional.scaled_dot_product_attention was not the router any more (a count of
# zero calls then tells a patch undone from tests that never call the function).
counts = {"served": 0, "fallback": 0, "tests": 0, "unpatched": 0}
# pytest-xdist's controller sees every worker's tests finish too: it counts none of them.
controller = False


def pytest_configure(config):
    global controller
    controller = bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")
    flashjit.patch_sdpa()
    served = sdpa.scaled_dot_product_attention
    original = sdpa._patch["original"]

    def counted_served(*args, **kwargs):
        counts["served"] += 1
        return served(*args, **kwargs)

    def counted_original(*args, **kwargs):
        counts["fallback"] += 1
        return original(*args, **kwargs)

    sdpa.scaled_dot_product_attention = counted_served
    sdpa._patch["original"] = counted_original


def _write_counts():
    # One file a process (pytest-xdist's workers each count their own calls), rewritten
    # after every test so that a worker that dies late still leaves what it counted.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.environ["FLASHJIT_SUITE_COUNTS"] + "." + worker, "w") as out:
        json.dump(counts, out)


def pytest_runtest_logfinish(nodeid, location):
    if controller:
        return
    counts["tests"] += 1
    counts["unpatched"] += not sdpa.is_sdpa_patched()
    _write_counts()


def pytest_unconfigure(config):
    _write_counts()
'''


def outcomes(junit: pathlib.Path, messages: dict[str, str] | None = None) -> dict[str, str]:
    """test id -> passed / failed / skipped, from a junit XML report; a failure's first line goes
    into `messages` where one is given."""
    result = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        result[name] = ("failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds
                        else "passed")
        if messages is not None and result[name] == "failed":
            failure = next(child for child in case if child.tag in ("failure", "error"))
            text = (failure.get("message") or failure.text or "").strip()
            messages[name] = " ".join(text.split())[:200]
    return result


def run(test_file: pathlib.Path, device: str, patched: bool, work: pathlib.Path, keyword: str | None,
        timeout: int, workers: int, test_timeout: int, shard: str | None, only: list[str] | None = None,
        messages: dict[str, str] | None = None, suffix: str = "") -> tuple[dict[str, str], dict | None, float]:
    """One pytest run of the file (or of the tests `only` names, for the confirmation: no -k, no
    shard), plain or patched: outcomes by test id, the patched run's counts, seconds."""
    name = ("patched" if patched else "plain") + suffix
    junit = work / f"{name}.xml"
    env = dict(os.environ, PYTORCH_TESTING_DEVICE_ONLY_FOR=device,
               PYTHONPATH=os.pathsep.join([str(work), str(test_file.parent), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "pytest", str(test_file), "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
               "-o", "junit_family=xunit1"]
    if only:
        listed = work / f"{name}-tests.txt"
        listed.write_text("\n".join(only) + "\n")
        command += ["-p", "flashjit_suite_only"]
        env["FLASHJIT_SUITE_ONLY"] = str(listed)
    if keyword and not only:
        command += ["-k", keyword]
    if workers > 1:
        command += ["-n", str(workers)]
    if test_timeout:
        command += ["--timeout", str(test_timeout)]
    if shard and not only:
        command += ["-p", "flashjit_suite_shard"]
        env["FLASHJIT_SUITE_SHARD"] = shard
    counts_file = work / f"{name}-counts.json"
    if patched:
        command += ["-p", "flashjit_suite_plugin"]
        env["FLASHJIT_SUITE_COUNTS"] = str(counts_file)
    start = datetime.datetime.now()
    print(f"[{name}] {' '.join(command[1:])}" + (f" ({len(only)} tests listed)" if only else ""), file=sys.stderr,
          flush=True)
    with open(work / f"{name}.log", "w") as log:
        try:
            subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=work)
        except subprocess.TimeoutExpired:
            print(f"[{name}] stopped after --timeout {timeout} s: no outcomes",
                  file=sys.stderr, flush=True)
    seconds = (datetime.datetime.now() - start).total_seconds()
    counts = None
    if patched:
        for part in work.glob(f"{counts_file.name}.*"):
            counts = counts or {}
            for key, value in json.loads(part.read_text()).items():
                counts[key] = counts.get(key, 0) + value
    return (outcomes(junit, messages) if junit.exists() else {}), counts, seconds


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("test_file", type=pathlib.Path, help="PyTorch's test/test_transformers.py")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None, help="directory for the markdown record")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression (both runs)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    parser.add_argument("--workers", type=int, default=1, help="pytest-xdist processes a run (needs pytest-xdist)")
    parser.add_argument("--test-timeout", type=int, default=0,
                        help="seconds a test may take before it counts as failed (needs pytest-timeout)")
    parser.add_argument("--source", default="", help="where the test file came from (for the record), e.g. "
                        "'pytorch/pytorch at <commit>'")
    parser.add_argument("--shard", default=None, metavar="K/N", help="run the K-th of N slices of the tests")
    parser.add_argument("--concurrent", action="store_true", help="run the plain and the patched run at once")
    parser.add_argument("--patched-first", action="store_true",
                        help="run patched first, then plain only on the tests that did not pass patched")
    parser.add_argument("--budget", type=int, default=0, metavar="SECONDS",
                        help="seconds the whole script may take: --confirm gets what the two runs left")
    parser.add_argument("--confirm", action="store_true",
                        help="run the tests whose outcome differed again, alone, both ways, and mark those that "
                             "differ again")
    args = parser.parse_args()
    started = time.monotonic()
    if args.shard:
        try:
            k, n = (int(x) for x in args.shard.split("/"))
            if not 1 <= k <= n:
                raise ValueError
        except ValueError:
            parser.error(f"--shard: expected K/N with 1 <= K <= N, got {args.shard!r}")
    # What torch's test file imports (a file that does not import them does not need them).
    text = args.test_file.read_text() if args.test_file.is_file() else ""
    needed = [name for name in ("expecttest", "hypothesis") if name in text] + (["xdist"] if args.workers > 1 else []) + (
        ["pytest_timeout"] if args.test_timeout else [])
    missing = [name for name in needed if not _importable(name)]
    if missing:
        print(f"this run needs {' and '.join(missing)}: pip install "
              f"{' '.join(name.replace('xdist', 'pytest-xdist').replace('_', '-') for name in missing)}", file=sys.stderr)
        return 2
    import torch

    import flashjit

    test_file = args.test_file.resolve()
    with tempfile.TemporaryDirectory() as directory:
        work = pathlib.Path(directory)
        (work / "test_cpp_extensions_open_device_registration.py").write_text(_STUB)
        (work / "flashjit_suite_plugin.py").write_text(_PLUGIN)
        (work / "flashjit_suite_shard.py").write_text(_SHARD_PLUGIN)
        (work / "flashjit_suite_only.py").write_text(_ONLY_PLUGIN)
        messages: dict[str, dict[str, str]] = {"plain": {}, "patched": {}}

        def run_settings(timeout=args.timeout):
            """run()'s arguments after the device, but for the tests listed."""
            return work, args.keyword, timeout, args.workers, args.test_timeout, args.shard

        def both(only=None, suffix="", timeout=args.timeout):
            """The plain and the patched run (at once with --concurrent): their outcomes, counts, seconds."""
            common = run_settings(timeout)
            if args.concurrent:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(2) as pool:
                    plain_run = pool.submit(run, test_file, args.device, False, *common, only, messages["plain"], suffix)
                    patched_run = pool.submit(run, test_file, args.device, True, *common, only, messages["patched"],
                                              suffix)
                    return plain_run.result(), patched_run.result()
            return (run(test_file, args.device, False, *common, only, messages["plain"], suffix),
                    run(test_file, args.device, True, *common, only, messages["patched"], suffix))

        if args.patched_first:
            # The patched run, then the plain run of only the tests that did not pass patched: what
            # passes patched cannot pass plain and fail patched (about half the GPU time of both).
            common = run_settings()
            patched, counts, patched_seconds = run(test_file, args.device, True, *common, None, messages["patched"])
            not_passed = sorted(name for name, outcome in patched.items() if outcome != "passed")
            plain, _, plain_seconds = (run(test_file, args.device, False, *common, not_passed, messages["plain"])
                                       if not_passed else ({}, None, 0.0))
        else:
            (plain, _, plain_seconds), (patched, counts, patched_seconds) = both()
        tail = (work / "patched.log").read_text().strip().splitlines()[-1:]
        passed_plain = {name for name, outcome in plain.items() if outcome == "passed"}
        broken = sorted(name for name in passed_plain if patched.get(name) != "passed")
        fixed = sorted(name for name, outcome in patched.items() if outcome == "passed" and plain.get(name) == "failed")
        # (--patched-first: nothing that passed patched ran plain, so none of these is known.)
        # --confirm: the tests whose outcome differed, run again alone both ways; a test that passes
        # plain and fails patched again is flashjit's, one that now agrees was the first run's noise.
        confirmed = None
        left = args.budget - (time.monotonic() - started) - 15 if args.budget else args.timeout
        if args.confirm and (broken or fixed) and left < 30:
            print(f"--confirm skipped: {left:.0f} s of --budget left", file=sys.stderr)
        elif args.confirm and (broken or fixed):
            # Within what is left of --budget (one after the other: half each).
            (plain_again, _, _), (patched_again, counts_again, _) = both(
                broken + fixed, "-confirm", int(min(args.timeout, left if args.concurrent else left / 2)))
            confirmed = {
                "broken": sorted(n for n in broken if plain_again.get(n) == "passed" and patched_again.get(n) != "passed"),
                "fixed": sorted(n for n in fixed if patched_again.get(n) == "passed" and plain_again.get(n) == "failed"),
                "ran": len(plain_again), "counts": counts_again}
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    commit = os.environ.get("FLASHJIT_COMMIT") or os.popen("git rev-parse --short HEAD 2>/dev/null").read().strip()
    summary = (f"plain: {len(passed_plain)} passed of {len(plain)} ({plain_seconds:.0f} s); patched: "
               f"{sum(o == 'passed' for o in patched.values())} passed of {len(patched)} ({patched_seconds:.0f} s); "
               f"{len(broken)} pass plain and not patched")
    if args.patched_first:
        summary = (f"patched: {sum(o == 'passed' for o in patched.values())} passed of {len(patched)} "
                   f"({patched_seconds:.0f} s); plain, only the {len(plain)} tests that did not pass patched "
                   f"(--patched-first): {len(passed_plain)} passed ({plain_seconds:.0f} s); {len(broken)} pass plain "
                   "and not patched (tests that fail plain and pass patched are not looked for in this mode)")
    lines = [f"# PyTorch's test_transformers.py under flashjit.patch_sdpa(): {device}", "",
             f"- date: {datetime.date.today()}", f"- commit: {commit}",
             f"- command: `python scripts/torch_sdpa_suite.py test_transformers.py --device {args.device}"
             + (f" -k '{args.keyword}'" if args.keyword else "")
             + (f" --workers {args.workers}" if args.workers > 1 else "")
             + (f" --shard {args.shard}" if args.shard else "") + (" --concurrent" if args.concurrent else "")
             + (" --confirm" if args.confirm else "") + (" --patched-first" if args.patched_first else "") + "`",
             f"- torch {torch.__version__}, flashjit {flashjit.__version__}"
             + (f"; test_transformers.py: {args.source}" if args.source else ""), "",
             summary, "",
             f"SDPA calls in the patched run: {counts['served'] if counts else '?'} served by flashjit, "
             f"{counts['fallback'] if counts else '?'} handed to torch's function; "
             f"{counts.get('tests', '?') if counts else '?'} tests counted in its processes, "
             f"{counts.get('unpatched', '?') if counts else '?'} of them leaving the patch undone.", "",
             f"Pass plain, not patched ({len(broken)}):", ""]
    if confirmed is not None:
        again = confirmed["counts"] or {}
        lines[-2:-2] = [
            f"Run again alone, both ways (--confirm; {confirmed['ran']} of the {len(broken) + len(fixed)} tests whose "
            f"outcome differed ran; {again.get('served', '?')} SDPA calls served by flashjit, "
            f"{again.get('fallback', '?')} handed to torch): {len(confirmed['broken'])} pass plain and fail patched "
            f"again, {len(confirmed['fixed'])} fail plain and pass patched again. The lists below mark those "
            "with **again**; the others agreed on the second run.", ""]
    marked = set(confirmed["broken"] + confirmed["fixed"]) if confirmed else set()

    def listed(name, side):
        message = messages[side].get(name)
        return (f"- `{name}` ({patched.get(name, 'not run') if side == 'patched' else 'failed'})"
                + (" **again**" if name in marked else "") + (f": {message}" if message else ""))

    lines += [listed(name, "patched") for name in broken] or ["- none"]
    lines += ["", f"Fail plain, pass patched ({len(fixed)}):", ""]
    lines += [listed(name, "plain") for name in fixed] or ["- none"]
    # What fails on plain torch as well (not flashjit's doing), by the first line's kind, so that
    # a record tells a suite that cannot run here (memory, a missing backend) from one that ran.
    failed_both = [name for name, outcome in plain.items() if outcome == "failed" and patched.get(name) == "failed"]
    lines += ["", f"Fail both ways ({len(failed_both)}), by the kind of their first line (plain run):", ""]
    kinds: dict[str, list[str]] = {}
    for name in failed_both:
        first = messages["plain"].get(name) or "no message"
        kinds.setdefault(first.split(":", 1)[0].strip()[:80], []).append(name)
    lines += [f"- {kind}: {len(names)} (e.g. `{names[0]}`)"
              for kind, names in sorted(kinds.items(), key=lambda item: -len(item[1]))[:12]] or ["- none"]
    lines += ["", f"patched run's last line: {tail[0] if tail else ''}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from flashjit.bench.provenance import device_tag

        tag = device_tag({"device": args.device, "gpu": device})
        slice_tag = f"-shard{args.shard.replace('/', 'of')}" if args.shard else ""
        path = pathlib.Path(args.out) / f"{tag}-torch-sdpa-suite-{datetime.date.today()}-{commit}{slice_tag}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}", file=sys.stderr)
    return 0 if not broken else 1


if __name__ == "__main__":
    sys.exit(main())
