"""Sizes and rates as people type them ("256M", "64MiB", "1.5G") and as we print them.

Binary units only, as QEMU reads them. Pure functions: no knowledge of guests, channels,
parameters or the CLI; callers turn the ValueError into their own kind of error.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_UNITS: dict[str, int] = {
    "": 1,
    "K": 1 << 10,
    "M": 1 << 20,
    "G": 1 << 30,
    "T": 1 << 40,
}

# The unit letter may be followed by "iB" or "B" ("64MiB", "64MB"); a plain "B" alone means
# bytes. Whitespace between number and unit is allowed so that format_size's own output
# ("256.0 MiB") parses back.
_SIZE_RE = re.compile(
    r"^(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[KMGT]?)(?P<suffix>I?B)?$",
    re.IGNORECASE,
)

_FORMAT_UNITS: tuple[tuple[str, int], ...] = (
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
)


def parse_size(text: str) -> int:
    """Parse "4096", "256M", "1G", "64MiB", "1.5 GiB" into a number of bytes.

    A fraction of a unit is truncated to whole bytes. Raises ValueError, naming the input
    and what is accepted, for anything else (negative numbers, unknown units, "1.5").
    """
    if not isinstance(text, str):
        raise ValueError(f"size must be a string like '256M', not {type(text).__name__}")
    stripped = text.strip()
    m = _SIZE_RE.match(stripped)
    if m is None:
        raise ValueError(
            f"invalid size {text!r}: expected a number with an optional binary unit "
            "K, M, G or T (optionally followed by 'iB' or 'B'), e.g. '4096', '256M', '64MiB'"
        )
    suffix = m.group("suffix") or ""
    unit = m.group("unit").upper()
    if suffix.upper() == "IB" and not unit:
        # "64iB" is a typo, not bytes.
        raise ValueError(f"invalid size {text!r}: 'iB' needs a unit letter before it (KiB, MiB)")
    try:
        number = Decimal(m.group("num"))
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"invalid size {text!r}: {exc}") from exc
    value = number * _UNITS[unit]
    if not unit and value != value.to_integral_value():
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    # As QEMU does, a fraction of a unit is truncated to whole bytes ("1.1K" is 1126).
    return int(value)


def parse_bandwidth(text: str) -> int:
    """Parse a rate in bytes per second ("64M", "1GiB/s"); "0" or "unlimited" give 0.

    0 means unlimited, as QEMU's max-bandwidth=0 does.
    """
    if not isinstance(text, str):
        raise ValueError(f"bandwidth must be a string like '64M', not {type(text).__name__}")
    stripped = text.strip()
    if stripped.lower() in ("unlimited", "none"):
        return 0
    if stripped.lower().endswith("/s"):
        stripped = stripped[:-2]
    try:
        return parse_size(stripped)
    except ValueError as exc:
        raise ValueError(
            f"invalid bandwidth {text!r}: expected bytes per second with an optional binary "
            "unit, e.g. '64M', '1GiB/s', or '0' for unlimited"
        ) from exc


def format_size(n: int | float) -> str:
    """Format a byte count: 512 -> "512 B", 268435456 -> "256.0 MiB"."""
    if n < 0:
        return "-" + format_size(-n)
    for name, factor in _FORMAT_UNITS:
        # Compare after rounding so that 1048575 prints "1.0 MiB", not "1024.0 KiB".
        if round(n / factor, 1) >= 1.0:
            return f"{n / factor:.1f} {name}"
    if isinstance(n, int):
        return f"{n} B"
    return f"{n:.1f} B"


def format_rate(bytes_per_s: int | float) -> str:
    """Format a rate: 129394278.4 -> "123.4 MiB/s"."""
    return format_size(bytes_per_s) + "/s"
