"""Sizes and rates: parsing what people type, printing what they read."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zcmigrate.migrate.units import format_rate, format_size, parse_bandwidth, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("0", 0),
        ("256M", 256 << 20),
        ("256m", 256 << 20),
        ("1G", 1 << 30),
        ("64MiB", 64 << 20),
        ("64MB", 64 << 20),
        ("64mib", 64 << 20),
        ("4K", 4096),
        ("2T", 2 << 40),
        ("4096B", 4096),
        ("1.5G", 3 << 29),
        ("1.1K", 1126),
        (" 8 KiB ", 8192),
        ("256.0 MiB", 256 << 20),
    ],
)
def test_parse_size_accepts_binary_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "   ", "M", "-1", "-4K", "12Q", "1.2.3", "1.5", "64iB", "1e3", "K64", "64 M B", "0x10"],
)
def test_parse_size_rejects_malformed_input_with_the_input_in_the_message(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_parse_size_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match="string"):
        parse_size(4096)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("unlimited", 0),
        ("64M", 64 << 20),
        ("1GiB/s", 1 << 30),
        ("100", 100),
    ],
)
def test_parse_bandwidth_treats_zero_as_unlimited(text: str, expected: int) -> None:
    assert parse_bandwidth(text) == expected


@pytest.mark.parametrize("text", ["", "fast", "-1M", "1M/h"])
def test_parse_bandwidth_rejects_malformed_input(text: str) -> None:
    with pytest.raises(ValueError, match="invalid bandwidth"):
        parse_bandwidth(text)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1024, "1.0 KiB"),
        (256 << 20, "256.0 MiB"),
        (3 << 29, "1.5 GiB"),
        (5 << 40, "5.0 TiB"),
        ((1 << 20) - 1, "1.0 MiB"),
    ],
)
def test_format_size(n: int, expected: str) -> None:
    assert format_size(n) == expected


def test_format_rate() -> None:
    assert format_rate(123.4 * (1 << 20)) == "123.4 MiB/s"
    assert format_rate(0) == "0 B/s"


@given(st.integers(min_value=0, max_value=1 << 50))
def test_format_size_output_parses_back_to_within_rounding(n: int) -> None:
    back = parse_size(format_size(n))
    # One decimal of the unit: at most 0.05 off a value of at least 0.95 units.
    assert abs(back - n) <= n * 0.053 + 1


@given(st.text(max_size=20))
def test_parse_size_raises_only_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        assert parse_size(text) >= 0
