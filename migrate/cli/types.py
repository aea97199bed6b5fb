"""click parameter types for sizes and rates with binary units (256M, 64MiB, 1G).

Parsing lives in migrate/units.py; this only adapts it to click's error reporting, and
knows no command.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from zcmigrate.migrate.units import parse_bandwidth, parse_size

if TYPE_CHECKING:
    _IntParamType = click.ParamType[int]
else:
    # click made ParamType generic only in 8.2; the project still accepts 8.1.
    _IntParamType = click.ParamType


class _UnitType(_IntParamType):
    """An int parsed with a unit-aware function; click reports its ValueError."""

    parse: Callable[[str], int]

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> int:
        if isinstance(value, int):
            return value
        try:
            return type(self).parse(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class SizeType(_UnitType):
    """A size in bytes with an optional binary unit: 4096, 256M, 64MiB."""

    name = "size"
    parse = staticmethod(parse_size)


class BandwidthType(_UnitType):
    """Bytes per second with an optional binary unit; 0 means unlimited."""

    name = "rate"
    parse = staticmethod(parse_bandwidth)

