"""Without torch (blocked in a child process): the numpy path works, and every entry
point that needs torch says so in one line with the command that installs it, instead
of a traceback from deep inside."""

import subprocess
import sys

BLOCK = "import sys; sys.modules['torch'] = None\n"


def child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


def test_numpy_attention_works():
    done = child("import numpy as np, flashjit\n"
                 "q = np.random.default_rng(0).standard_normal((1, 2, 5, 8)).astype(np.float32)\n"
                 "print(flashjit.attention(q, q, q).shape)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(1, 2, 5, 8)"


def test_torch_names_say_what_to_install():
    done = child("import flashjit\n"
                 "for name in ('scaled_dot_product_attention', 'varlen_attention', 'patch_sdpa'):\n"
                 "    try:\n"
                 "        getattr(flashjit, name)\n"
                 "    except ImportError as error:\n"
                 "        print(error)\n")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 3 and all("needs torch, which is not installed: pip install torch" in line for line in lines)


def test_transformers_backend_and_bench_say_what_to_install():
    done = child("import flashjit.transformers")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == ("ImportError: flashjit.transformers needs torch, which is not "
                                                    "installed: pip install torch transformers")
    done = child("from flashjit import cli; raise SystemExit(cli.main(['bench', '--quick']))")
    assert done.returncode == 1
    assert done.stderr.strip() == ("flashjit bench: needs torch (pip install torch matplotlib); `flashjit info` works "
                                   "without it")
    done = child("from flashjit import cli; raise SystemExit(cli.main(['info']))")
    assert done.returncode == 0, done.stderr
    assert "torch: not installed" in done.stdout


def test_mlx_module_says_what_to_install_without_mlx():
    done = subprocess.run([sys.executable, "-c", "import sys; sys.modules['mlx'] = None; import flashjit.mlx"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith(
        "ImportError: flashjit.mlx needs mlx, which is not installed: pip install 'mlx[cpu]' (Linux)")
