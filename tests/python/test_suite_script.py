"""scripts/torch_sdpa_suite.py on a small test file of its own: plain and patched runs (both
whole, or --patched-first: plain only where patched did not pass), the counts of SDPA calls
served, the failures' first lines (those failing both ways counted by kind), and --confirm's second run, which marks a difference that
comes back and leaves one that does not (a flaky test) unmarked."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

TESTS = '''
import os
import unittest

import torch
import torch.nn.functional as F

import flashjit.sdpa as sdpa


class TestSmall(unittest.TestCase):
    def test_attention(self):
        q = torch.randn(1, 2, 4, 8)
        F.scaled_dot_product_attention(q, q, q)

    def test_fails_patched(self):
        self.assertFalse(sdpa.is_sdpa_patched(), "patched here")

    def test_fails_first_patched_run(self):
        marker = os.path.join(os.environ["SUITE_MARKERS"], "patched" if sdpa.is_sdpa_patched() else "plain")
        first = not os.path.exists(marker)
        open(marker, "w").close()
        self.assertFalse(first and sdpa.is_sdpa_patched(), "first patched run")

    def test_fails_both(self):
        raise MemoryError("out of memory either way")
'''


# --patched-first, as scripts/gpu_suite.sh runs it (the mode with both runs whole is the same
# code but for which tests the plain run gets; one subprocess run costs ~5 s of CI here).
@pytest.mark.parametrize("patched_first", [True], ids=["patched-first"])
def test_confirm_marks_only_differences_that_come_back(tmp_path, monkeypatch, patched_first):
    if sys.platform == "win32":
        pytest.skip("POSIX paths")
    (tmp_path / "test_small.py").write_text(TESTS)
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("SUITE_MARKERS", str(markers))
    monkeypatch.setenv("FLASHJIT_TEST_DEVICE", "cpu")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "torch_sdpa_suite.py"), str(tmp_path / "test_small.py"),
                             "--device", "cpu", "--confirm", "--budget", "300", "--out", str(tmp_path / "out")]
                            + (["--patched-first"] if patched_first else []),
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr  # a test passes plain only
    (record,) = (tmp_path / "out").glob("cpu-torch-sdpa-suite-*.md")
    text = record.read_text()
    assert "patched: 1 passed of 4" in text, text
    if patched_first:  # plain ran only the three tests that did not pass patched
        assert "plain, only the 3 tests that did not pass patched (--patched-first): 2 passed" in text, text
    else:
        assert "plain: 3 passed of 4" in text, text
    assert "Fail both ways (1)" in text and "- MemoryError: 1 (e.g. `" in text, text
    assert "1 served by flashjit" in text, text
    lines = {line.split("`")[1].rsplit("::", 1)[1]: line for line in text.splitlines() if line.startswith("- `")}
    assert "**again**" in lines["test_fails_patched"] and "patched here" in lines["test_fails_patched"], text
    assert "**again**" not in lines["test_fails_first_patched_run"], text
    assert "1 pass plain and fail patched again" in text, text
