import os

import pytest
import torch

import flashjit

# FLASHJIT_TEST_DEVICE=cuda reruns the suite on the GPU; without one it skips.
DEVICE = os.environ.get("FLASHJIT_TEST_DEVICE", "cpu")

# Under pytest-xdist (-n N) each worker is a process of its own: torch's CPU threads (the float64
# references) get a share of the cores each, not every core each (N workers x all cores
# oversubscribe the host). flashjit's CPU kernels take their own thread counts.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


def pytest_collection_modifyitems(config, items):
    if DEVICE == "cpu":
        return
    reason = None
    if DEVICE == "cuda" and not torch.cuda.is_available():
        reason = "FLASHJIT_TEST_DEVICE=cuda but torch sees no GPU"
    elif DEVICE not in flashjit.backends():
        reason = f"FLASHJIT_TEST_DEVICE={DEVICE} but this build has backends {flashjit.backends()}"
    if reason:
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if "cpu_only" not in item.keywords:
                item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only: runs on the CPU whatever FLASHJIT_TEST_DEVICE says")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fresh_plans():
    """No plans of plain calls (flashjit.ops) before or after the test."""
    from flashjit import ops

    ops._PLANS.clear()
    ops._SEEN.clear()
    yield
    ops._PLANS.clear()
    ops._SEEN.clear()
