#!/usr/bin/env bash
# Installs a flashjit wheel into a fresh virtual environment whose PATH holds nothing but
# that environment (no compiler can be reached), then runs a numpy-only smoke test: the
# import, `flashjit info`, and an attention call against a float64 reference.
#   bash scripts/wheel_check.sh dist/flashjit-*.whl [BASE_PYTHON]
set -euo pipefail
wheel=$1
base=${2:-python3}
check=$(mktemp -d "${TMPDIR:-/tmp}/flashjit-wheel-check.XXXXXX")
trap 'rm -rf "$check"' EXIT
"$base" -m venv "$check/venv"
"$check/venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel"
cd "$check"  # away from the checkout, so that the installed package is the one imported
env -i HOME="$check" PATH="$check/venv/bin" "$check/venv/bin/python" - <<'PY'
import shutil
import subprocess
import sys

import numpy as np

import flashjit

assert shutil.which("g++") is None and shutil.which("cc") is None, "a compiler is reachable"
print(f"flashjit {flashjit.__version__} from {flashjit.__file__}")
print(subprocess.run([sys.executable, "-m", "flashjit", "info"], capture_output=True, text=True, check=True).stdout)
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((2, 4, 33, 40)).astype(np.float32) for _ in range(3))
o = flashjit.attention(q, k, v, causal=True)
scores = np.einsum("bhid,bhjd->bhij", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(40)
scores[..., np.triu(np.ones((33, 33), bool), 1)] = -np.inf
p = np.exp(scores - scores.max(-1, keepdims=True))
expected = np.einsum("bhij,bhjd->bhid", p / p.sum(-1, keepdims=True), v.astype(np.float64))
error = float(np.abs(o - expected).max())
assert error < 1e-5, error
print(f"smoke test: causal attention, max error {error:.2e} against float64")
PY
echo "wheel check passed: $(basename "$wheel")"
