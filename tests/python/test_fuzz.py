"""A short fixed-seed sweep of the differential fuzzer (fuzz.py) on
FLASHJIT_TEST_DEVICE; `python tests/python/fuzz.py --cases N` runs long sweeps."""

import pytest

import fuzz
from conftest import DEVICE


@pytest.mark.parametrize("seed", [0, 1])
def test_random_problems_match_the_reference(seed):
    failures = fuzz.run(cases=300, seed=seed, device=DEVICE)
    assert not failures, "\n".join(f"case {index} (seed {seed}): {case}\n  {message}"
                                   for index, case, message in failures[:5])
