"""kiln.runtime.bench's Workload: the seed it takes (the runs themselves: tests/cli)."""

from __future__ import annotations

import pytest

from kiln.runtime.bench import Workload
from kiln.runtime.errors import RequestError


@pytest.mark.parametrize(("seed", "message"), [
    (-1, "seed must be an integer >= 0, found -1 (Python's random reads it as 1)"),
    (1.5, "seed must be an integer >= 0, found 1.5"),
])
def test_a_seed_below_0_is_refused(seed, message):
    """Python's random.Random seeds with a negative seed's absolute value: -1 drew 1's
    prompts."""
    with pytest.raises(RequestError) as info:
        Workload(seed=seed)
    assert str(info.value) == message


def test_a_seed_of_0_or_more_is_taken():
    assert Workload(seed=0).seed == 0 and Workload(seed=2**70).seed == 2**70
