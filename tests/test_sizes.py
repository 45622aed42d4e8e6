"""kiln.sizes: the one parser of sizes, for the CLI's flags and the Python API's keywords,
and the one formatter of sizes in messages."""

from __future__ import annotations

import pytest

from kiln.errors import ConfigError, options_as_flags
from kiln.sizes import need_and_available, parse_size, size_option, size_text


@pytest.mark.parametrize("given, size", [
    ("18GB", 18 * 10**9), ("18gb", 18 * 10**9), ("18 G", 18 * 10**9), ("512MiB", 512 * 2**20),
    ("1.5e9", 1_500_000_000), ("1e+3", 1000), ("2000000000", 2 * 10**9), ("64KB", 64_000),
    (4096, 4096), (2e10, 2 * 10**10), ("0.5KB", 500),
    ("1.1GiB", int(1.1 * 2**30)),  # a unit's fractions of a byte are dropped
])
def test_a_size_is_bytes(given, size):
    assert parse_size(given) == size


@pytest.mark.parametrize("given, why", [
    ("18XB", "is not a size like 20GB, 512MiB or 2000000000"),
    ("-1GB", "must be at least 1 byte"), ("", "is not a size like"), (True, "is not a size like"),
    ([1], "is not a size like"), (float("nan"), "is not a size like"),
    (float("inf"), "is not a size like"),
    ("1e400GB", "is more than any machine holds (at most 1 EB)"),
    (10**19, "is more than any machine holds"),
    (0, "must be at least 1 byte"), (-5, "must be at least 1 byte"),
    # bytes are whole: max_build_memory=1.5 had been 1 byte ("1.5B" and "0.5" 1 and 0)
    (1.5, "is not a whole number of bytes; give bytes (an integer), or a size with its unit "
          "such as 20GB or 512MiB"),
    ("1.5", "is not a whole number of bytes"), ("1.5B", "is not a whole number of bytes"),
    ("0.5", "is not a whole number of bytes"),
])
def test_no_size_says_why(given, why):
    with pytest.raises(ValueError) as info:
        parse_size(given)
    assert str(info.value).startswith(why)


def test_a_size_option_is_refused_by_its_name_in_one_line():
    """From Python the keyword, and what forms it takes (a number of bytes too)."""
    assert size_option("max_build_memory", None) is None
    assert size_option("max_build_memory", "18GB") == 18 * 10**9
    with pytest.raises(ConfigError) as info:
        size_option("max_build_memory", "18XB")
    assert str(info.value) == ("max_build_memory '18XB' is not a size like 20GB, 512MiB or "
                               "2000000000 (a string, or a number of bytes)")
    with pytest.raises(ConfigError, match=r"^--max_cache_size 0 must be at least 1 byte$"), \
            options_as_flags():
        size_option("max_cache_size", 0)


@pytest.mark.parametrize("given, message", [
    ("1KB", "--max_build_memory 1KB is 1000 bytes, less than 400 MiB; give 400MiB or more"),
    ("399MiB", "--max_build_memory 399MiB is 418381824 bytes, less than 400 MiB; give 400MiB "
               "or more"),
    ("0", "--max_build_memory 0 is 0 bytes, less than 400 MiB; give 400MiB or more"),
    ("1", "--max_build_memory 1 is 1 byte, less than 400 MiB; give 400MiB or more"),
    ("-1MB", "--max_build_memory -1MB is less than 400 MiB; give 400MiB or more"),
])
def test_a_size_under_its_minimum_shows_what_was_typed_and_the_minimum(given, message):
    """A trial's --max_build_memory 1KB had been told "--max_build_memory 1000 is 1000 bytes",
    with the forms a size takes, its form being valid; its 0 "at least 1 byte", then its 1 the
    real minimum."""
    with pytest.raises(ConfigError) as info, options_as_flags():
        size_option("max_build_memory", given, least=400 << 20, short="less than 400 MiB",
                    fix="give 400MiB or more")
    assert str(info.value) == message


GIB, MIB = 2**30, 2**20


@pytest.mark.parametrize("n, text", [
    (3 * 2**40, "3.0 TiB"), (1.25 * GIB, "1.2 GiB"), (GIB / 10, "0.1 GiB"), (5 * MIB, "5 MiB"),
    (1, "1 KiB"), (1500, "2 KiB"), (2**50, "1.0 PiB"), (9437183999.9e9, "8.2 EiB"),
])
def test_size_text(n, text):
    """A trial's KV cache of 9437183999.9 GB had been "8583068.8 TiB" at kiln run."""
    assert size_text(n) == text


@pytest.mark.parametrize("n, text", [(100, "100 bytes"), (1, "1 byte"), (999, "999 bytes"),
                                     (1000, "1 KB"), (123_456, "123 KB"), (2.5e6, "2 MB"),
                                     (0.1e9, "0.1 GB"), (18e9, "18.0 GB")])
def test_build_budgets_keep_their_unit_small_ones_included(n, text):
    assert size_text(n, "decimal") == text  # a 100-byte budget had been told as "1 KB"


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1, "1 B"), (999, "999 B"), (5000, "5.0 kB"),
                                     (2e6, "2.0 MB"), (0.5e9, "500.0 MB"), (18e9, "18.0 GB")])
def test_build_cache_sizes_read_as_kiln_cache_list_shows_them(n, text):
    assert size_text(n, "si") == text


@pytest.mark.parametrize("need, available, texts", [
    # a start had been refused with "need 0.2 GiB ..., and 0.2 GiB is available"
    (0.24 * GIB, 0.21 * GIB, ("0.24 GiB", "0.21 GiB")),
    (0.2401 * GIB, 0.2399 * GIB, ("0.2401 GiB", "0.2399 GiB")),
    (5 * GIB, GIB, ("5.0 GiB", "1.0 GiB")),  # apart already: as size_text says them
    (GIB + 2, GIB + 1, (f"{GIB + 2} bytes", f"{GIB + 1} bytes")),
])
def test_a_need_above_what_is_available_reads_as_more(need, available, texts):
    assert need_and_available(need, available) == texts
