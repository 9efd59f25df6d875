import os

import pytest
import torch

import flashjit

# FLASHJIT_TEST_DEVICE=cuda reruns the suite on the GPU; without one it skips.
DEVICE = os.environ.get("FLASHJIT_TEST_DEVICE", "cpu")


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
