"""kiln.runtime.bench's Workload: the seed it takes (the runs themselves: tests/cli)."""

from __future__ import annotations

import pytest

from kiln.runtime.bench import Workload, arrival_offsets, make_prompts
from kiln.runtime.errors import RequestError
from kiln.runtime.params import SEED_MAX, SEED_MIN


@pytest.mark.parametrize("seed", [1.5, True, 2**64, -2**63 - 1])
def test_a_seed_outside_sampling_params_range_is_refused(seed):
    with pytest.raises(RequestError) as info:
        Workload(seed=seed)
    assert str(info.value) == (f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], found "
                               f"{seed!r}")


def test_seeds_are_read_modulo_2_64_as_sampling_params_reads_them():
    """kiln run --seed -1 was taken and kiln bench --seed -1 refused (Python's random.Random
    seeds with a negative seed's absolute value: -1 had drawn 1's prompts before it was
    refused); -1 is 2**64 - 1 now, as the sampling generators read it."""
    def drawn(seed: int) -> tuple[list[list[int]], list[float]]:
        workload = Workload(input_len=4, num_requests=3, request_rate=10.0, seed=seed)
        return make_prompts(workload, 100), arrival_offsets(workload)

    assert drawn(-1) == drawn(SEED_MAX) and drawn(-1) != drawn(1)
    assert drawn(SEED_MIN) == drawn(2**63) and drawn(SEED_MIN) != drawn(0)
