"""The flashjit command: a tiny benchmark sweep (CSV, JSON, markdown, plots), info,
precompile and cache clear."""

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import flashjit
from flashjit import bench, cli

pytestmark = pytest.mark.cpu_only

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def flashjit_command(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "flashjit", *args], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env}, cwd=cwd, timeout=300)


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_bench_cpu_sweep(tmp_path):
    """`python -m flashjit bench` on the CPU writes every output with sane numbers."""
    done = flashjit_command("bench", "--device", "cpu", "--seqlens", "64", "128", "--head-dims", "32",
                            "--impls", "flashjit,naive,sdpa-math", "--modes", "fwd", "bwd", "--repeats", "2",
                            "--out", str(tmp_path), "--name", "smoke", "--no-progress",
                            env={"FLASHJIT_COMMIT": "abc1234"})
    assert done.returncode == 0, done.stderr
    assert "fwd, float32: ms / TFLOP/s" in done.stdout

    columns, rows = read_csv(tmp_path / "smoke.csv")
    assert tuple(columns) == bench.COLUMNS
    assert len(rows) == 3 * 2 * 2 * 2  # impls x seqlens x causal x modes
    assert {row["status"] for row in rows} == {"ok"}, [row["reason"] for row in rows]
    for row in rows:
        for name in ("ms", "tflops", "flashjit_speedup", "peak_mib"):
            value = float(row[name])
            assert math.isfinite(value) and value > 0, (name, row)
        assert float(row["err_out"]) < 1e-5 and float(row["err_grad"]) < 1e-5, row
        assert int(row["runs"]) == 2
        if row["impl"] == "flashjit":
            assert float(row["flashjit_speedup"]) == 1.0
        # batch from 2048 tokens, heads from hidden 512
        assert int(row["batch"]) == 2048 // int(row["seqlen"]) and int(row["heads"]) == 512 // 32
    # The score matrices show in naive attention's memory, not in flashjit's.
    peak = {(r["impl"], r["seqlen"], r["causal"]): float(r["peak_mib"]) for r in rows}
    assert peak["naive", "128", "False"] > peak["flashjit", "128", "False"]

    record = json.loads((tmp_path / "smoke.json").read_text())
    meta = record["metadata"]
    assert meta["commit"] == "abc1234" and meta["flashjit"] == flashjit.__version__
    assert meta["torch"] == torch.__version__ and meta["device"] == "cpu" and meta["cpu_cores"] >= 1
    assert meta["command"].startswith("flashjit bench --device cpu") and meta["date"]
    assert len(record["rows"]) == len(rows) and record["columns"] == list(bench.COLUMNS)

    markdown = (tmp_path / "smoke.md").read_text()
    assert "- commit: abc1234" in markdown and "- command: `flashjit bench" in markdown
    plots = sorted(p.name for p in tmp_path.glob("*.png"))
    if HAS_MATPLOTLIB:
        assert plots == ["smoke-memory-float32.png", "smoke-tflops-bwd-float32.png", "smoke-tflops-fwd-float32.png"]
        assert all(0 < (tmp_path / p).stat().st_size < 100_000 for p in plots)
    else:
        assert plots == [] and "matplotlib is not installed" in done.stdout


def test_bench_unsupported_backend_is_recorded(tmp_path, capsys):
    """A backend the device lacks gives 'unsupported' rows with the reason, not a crash."""
    assert bench.main(["--device", "cpu", "--seqlens", "32", "--head-dims", "16", "--causal", "no",
                       "--impls", "flashjit", "sdpa-efficient", "--modes", "fwd", "--repeats", "1",
                       "--out", str(tmp_path), "--name", "t", "--no-plot", "--no-progress"]) == 0
    _, rows = read_csv(tmp_path / "t.csv")
    by_impl = {row["impl"]: row for row in rows}
    assert by_impl["flashjit"]["status"] == "ok"
    assert by_impl["sdpa-efficient"]["status"] == "unsupported" and by_impl["sdpa-efficient"]["reason"]
    assert by_impl["sdpa-efficient"]["ms"] == ""
    assert "sdpa-efficient unsupported" in capsys.readouterr().out


def test_bench_skips_what_would_not_fit(monkeypatch):
    config = bench.Config(device="cpu", dtypes=["float32"], head_dims=[8], seqlens=[64], causal=[False],
                          impls=["naive"], modes=["fwd"], repeats=1, batch=1, heads=1)
    monkeypatch.setattr(bench, "_available_bytes", lambda device: 1000)
    rows = bench.run_sweep(config, progress=False)
    assert [(row.status, row.reason.startswith("would need about")) for row in rows] == [("skipped", True)]


def test_flops():
    case = bench.Case("bfloat16", batch=2, heads=16, seqlen=1024, head_dim=128, causal=False)
    forward = 4 * 2 * 16 * 1024 * 1024 * 128
    assert bench.flops(case, "fwd") == forward
    assert bench.flops(case, "bwd") == 2.5 * forward
    assert bench.flops(case, "fwdbwd") == 3.5 * forward
    causal = bench.Case("bfloat16", batch=2, heads=16, seqlen=1024, head_dim=128, causal=True)
    assert bench.flops(causal, "fwd") == forward / 2


@pytest.mark.parametrize("args, message", [
    (["--seqlens", "0"], r"argument --seqlens: expected integers >= 1, got 0"),
    (["--head-dims", "x"], r"argument --head-dims: expected integers >= 1, got 'x'"),
    (["--dtypes", "float8"], r"argument --dtypes: expected some of float32, float16, bfloat16, float64; got 'float8'"),
    (["--impls", "xformers"], r"argument --impls: expected some of flashjit, naive"),
    (["--modes", "both"], r"argument --modes: expected some of fwd, bwd, fwdbwd; got 'both'"),
    (["--causal", "maybe"], r"argument --causal: invalid choice: 'maybe'"),
    (["--repeats", "0"], r"argument --repeats: expected an integer >= 1, got 0"),
    (["--batch", "2", "--tokens", "4096"], r"argument --tokens: not allowed with argument --batch"),
    (["--device", "cpu", "--hidden", "100", "--head-dims", "64"],
     r"--hidden 100: not a multiple of head dim 64"),
])
def test_bench_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_bench_cuda_without_gpu(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda"])
    assert "--device cuda: torch" in capsys.readouterr().err


def test_info(tmp_path):
    env = {"FLASHJIT_CACHE_DIR": str(tmp_path)}
    done = flashjit_command("info", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"flashjit {flashjit.__version__}")
    for label in ("backends:", "torch:", "torch autograd rule:", "gpu", "nvrtc:", "mlx primitives:",
                  "transformers backend:", "kernel cache:"):
        assert label in done.stdout
    info = json.loads(flashjit_command("info", "--json", env=env).stdout)
    assert info["flashjit"] == flashjit.__version__ and "cpu" in info["backends"]
    from flashjit import ops

    assert info["torch_autograd_rule"].startswith("C++" if ops.native_available() else "Python")
    off = json.loads(flashjit_command("info", "--json", env={**env, "FLASHJIT_TORCH_NATIVE": "0"}).stdout)
    assert off["torch_autograd_rule"] == "Python (FLASHJIT_TORCH_NATIVE=0)"
    assert info["cache"]["dir"] == os.path.join(str(tmp_path), flashjit.__version__)
    assert info["cache"]["files"] == 0 and info["cache"]["bytes"] == 0


KERNEL = "hopper-forward_bfloat16_qk128_v128_mask-none_aligned_t384_r1_n128_s2_sm90a-" + "0123456789abcdef" * 2


def test_cache_clear(tmp_path, monkeypatch, capsys):
    """Removes this version's kernel files, keeps other versions' and files flashjit did not write."""
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(tmp_path))
    mine = tmp_path / flashjit.__version__ / "sm_90"
    other = tmp_path / "0.0.1" / "sm_90"
    for folder in (mine, other):
        folder.mkdir(parents=True)
        (folder / f"{KERNEL}.cubin").write_bytes(b"x" * 100)
    (mine / f"{KERNEL}.cu").write_text("// source")
    (mine / f"{KERNEL}.cubin.lock").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("someone else's")
    assert cli.main(["cache", "info"]) == 0
    assert f"{tmp_path / flashjit.__version__}: 3 files, 109 bytes" in capsys.readouterr().out
    assert cli.main(["cache", "clear"]) == 0
    out = capsys.readouterr().out
    assert f"removed 3 kernel files (109 bytes) from {tmp_path / flashjit.__version__}" in out
    assert not (tmp_path / flashjit.__version__).exists() and (other / f"{KERNEL}.cubin").exists()
    assert (tmp_path / "notes.txt").exists()
    assert cli.main(["cache", "clear"]) == 0
    assert "nothing to remove" in capsys.readouterr().out


def test_clear_cache_removes_only_flashjit_files(tmp_path, monkeypatch, capsys):
    """flashjit.cuda.clear_cache() takes every version's kernels and nothing else, and says what it took."""
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(tmp_path))
    for version in (flashjit.__version__, "0.0.1"):
        (tmp_path / version / "sm_80").mkdir(parents=True)
        (tmp_path / version / "sm_80" / f"{KERNEL}.cubin").write_bytes(b"x" * 10)
    foreign = [tmp_path / "mine.bin", tmp_path / "0.0.1" / "sm_80" / "model.safetensors",
               tmp_path / "project" / "sm_1" / "data.cubin"]
    for path in foreign:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"keep")
    removed = flashjit.cuda.clear_cache()
    assert removed["files"] == 2 and removed["bytes"] == 20
    assert str(foreign[1]) in removed["kept"]
    assert all(path.exists() for path in foreign)
    assert not (tmp_path / flashjit.__version__).exists()
    assert (tmp_path / "0.0.1" / "sm_80").exists()  # still holds the foreign file
    assert capsys.readouterr().out == ""


@pytest.mark.skipif(flashjit.cuda.device_count() > 0, reason="checks the message on a machine without a GPU")
def test_precompile_without_gpu_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(tmp_path))
    assert cli.main(["precompile", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flashjit precompile: [cuda]") and "--arch 80 or --arch 90" in err


def _has_nvrtc() -> bool:
    try:
        flashjit.cuda.nvrtc_version()
        return True
    except NotImplementedError:
        return False


@pytest.mark.skipif(not _has_nvrtc(), reason="NVRTC not found")
def test_precompile_for_an_arch(tmp_path, monkeypatch, capsys):
    """--arch compiles without a GPU; the kernels land in this version's sm_90 folder."""
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(tmp_path))
    flashjit.cuda.clear_memory_cache()  # kernels an earlier test loaded would not be written again
    assert cli.main(["precompile", "--arch", "sm_90", "--dtypes", "float16", "--head-dims", "32"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("float16 D32") == 4  # forward and backward, with and without a window
    assert "4 kernel configs for sm_90" in captured.out
    assert list((tmp_path / flashjit.__version__ / "sm_90").glob("*.cubin"))
    # --nondeterministic: the backward configs also with what deterministic=False backwards run
    # (at head dim 32 the same kernels: nothing more to compile).
    assert cli.main(["precompile", "--arch", "sm_90", "--dtypes", "float16", "--head-dims", "32",
                     "--nondeterministic"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("backward") == 2 and captured.err.count("+ deterministic=False") == 2


def test_precompile_bad_arch(capsys):
    with pytest.raises(SystemExit):
        cli.main(["precompile", "--arch", "75"])
    assert "argument --arch: expected a compute capability of at least 80" in capsys.readouterr().err


def test_demo_still_dispatches(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0 and "--seqlens" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bench_cuda_sweep(tmp_path):
    """Every implementation on a small CUDA case: measured, or unsupported with a reason (FlexAttention
    too, when its compile fails)."""
    done = flashjit_command("bench", "--device", "cuda", "--dtypes", "bfloat16", "--seqlens", "256",
                            "--head-dims", "64", "--causal", "yes", "--repeats", "3", "--out", str(tmp_path),
                            "--name", "gpu", "--no-plot", "--no-progress")
    assert done.returncode == 0, done.stderr
    _, rows = read_csv(tmp_path / "gpu.csv")
    assert {row["impl"] for row in rows} == set(bench.IMPLS)
    for row in rows:
        what = f"{row['impl']} {row['mode']}: {row['status']} {row['reason']}"
        assert row["status"] in ("ok", "unsupported"), what
        assert row["status"] == "ok" or row["reason"], what
        if row["impl"] in ("flashjit", "naive", "sdpa-math", "sdpa-flash"):
            assert row["status"] == "ok", what
        if row["status"] == "ok":
            assert float(row["ms"]) > 0 and float(row["peak_mib"]) > 0, what
            assert float(row["err_out"]) < 0.05 and float(row["err_grad"]) < 0.05, what


def test_records_name_the_commit_or_else_the_version(tmp_path, monkeypatch):
    """In a flashjit checkout a record names its commit; outside one (an installed package
    run anywhere) the version, never "unknown"."""
    import re
    import subprocess as sp

    from flashjit.bench.provenance import record_commit

    monkeypatch.delenv("FLASHJIT_COMMIT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert record_commit() == f"v{flashjit.__version__}"
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if sp.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True).returncode == 0:
        monkeypatch.chdir(checkout)
        assert re.fullmatch(r"[0-9a-f]{7,40}", record_commit())
    monkeypatch.setenv("FLASHJIT_COMMIT", "abc1234")
    assert record_commit() == "abc1234"


@pytest.mark.parametrize("suite,fields", [("gqa", dict(heads_kv="2", seqlen_q="0", masked="False")),
                                          ("masked", dict(heads_kv="0", seqlen_q="0", masked="True")),
                                          ("decode", dict(heads_kv="0", seqlen_q="1", masked="False"))])
def test_bench_suites(suite, fields, tmp_path):
    """--suite gqa / masked / decode: the cases carry the suite's shape, every implementation that
    takes it runs with errors at float32's level, and the record names the suite."""
    done = flashjit_command("bench", "--device", "cpu", "--suite", suite, "--seqlens", "64", "--head-dims", "16",
                            "--heads", "8", "--batch", "2", "--impls", "flashjit,naive,sdpa-math", "--repeats", "1",
                            "--out", str(tmp_path), "--no-plot", "--no-progress", env={"FLASHJIT_COMMIT": "abc1234"})
    assert done.returncode == 0, done.stderr
    (record,) = [name for name in os.listdir(tmp_path) if name.endswith(".md")]
    assert record.startswith(f"cpu-bench-{suite}-") and f"- suite: {suite} (" in (tmp_path / record).read_text()
    _, rows = read_csv(tmp_path / record.replace(".md", ".csv"))
    assert rows and all(row["status"] == "ok" for row in rows), [row["reason"] for row in rows]
    assert all(row[key] == value for row in rows for key, value in fields.items())
    assert all(float(row["err_out"]) < 1e-5 for row in rows)
    if suite == "decode":
        assert {row["mode"] for row in rows} == {"fwd"} and {row["causal"] for row in rows} == {"False"}
    else:
        assert all(float(row["err_grad"]) < 1e-5 for row in rows)


def test_bench_decode_suite_refuses_causal_and_backward(capsys):
    for args in (["--causal", "yes"], ["--modes", "bwd"]):
        with pytest.raises(SystemExit):
            bench.main(["--device", "cpu", "--suite", "decode", *args])
        assert "--suite decode: forward only and no causal mask" in capsys.readouterr().err
