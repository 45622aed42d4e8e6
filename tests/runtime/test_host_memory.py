"""Sizes in host-memory messages (kiln.runtime.host_memory)."""

from __future__ import annotations

import pytest

from kiln.runtime.host_memory import need_and_available, size_text

GIB, MIB = 2**30, 2**20


@pytest.mark.parametrize("n, text", [
    (3 * 2**40, "3.0 TiB"), (1.25 * GIB, "1.2 GiB"), (GIB / 10, "0.1 GiB"), (5 * MIB, "5 MiB"),
    (1, "1 KiB"), (1500, "2 KiB"),
])
def test_size_text(n, text):
    assert size_text(n) == text


@pytest.mark.parametrize("need, available, texts", [
    # a start had been refused with "need 0.2 GiB ..., and 0.2 GiB is available"
    (0.24 * GIB, 0.21 * GIB, ("0.24 GiB", "0.21 GiB")),
    (0.2401 * GIB, 0.2399 * GIB, ("0.2401 GiB", "0.2399 GiB")),
    (5 * GIB, GIB, ("5.0 GiB", "1.0 GiB")),  # apart already: as size_text says them
    (GIB + 2, GIB + 1, (f"{GIB + 2} bytes", f"{GIB + 1} bytes")),
])
def test_a_need_above_what_is_available_reads_as_more(need, available, texts):
    assert need_and_available(need, available) == texts
