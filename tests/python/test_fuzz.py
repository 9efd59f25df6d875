"""A short fixed-seed sweep of the differential fuzzer (fuzz.py) on
FLASHJIT_TEST_DEVICE; `python tests/python/fuzz.py --cases N` runs long sweeps."""

import pytest

import fuzz
from conftest import DEVICE


# On a GPU most cases compile kernels of their own (NVRTC, seconds each, in the test's
# one process; 100 cases a seed took over five minutes on a fresh H200 machine, and 40 a
# seed 200-250 s on an H100 beside 14 other test processes): the suite takes 20 a seed
# over four seeds there, which the parallel workers share, and the GPU scripts run the
# long sweeps in parallel processes (scripts/gpu_reliability.sh, 500 cases).
CASES = 300 if DEVICE == "cpu" else 20
SEEDS = [0, 1] if DEVICE == "cpu" else [0, 1, 2, 3]


@pytest.mark.parametrize("seed", SEEDS)
def test_random_problems_match_the_reference(seed):
    failures = fuzz.run(cases=CASES, seed=seed, device=DEVICE)
    assert not failures, "\n".join(f"case {index} (seed {seed}): {case}\n  {message}"
                                   for index, case, message in failures[:5])
