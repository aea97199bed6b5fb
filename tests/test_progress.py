"""The terminal progress line: it never runs backwards, and never past 100%."""

from __future__ import annotations

import io
import re
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from zcmigrate.migrate.cli.progress import ProgressDisplay
from zcmigrate.migrate.stats import MigrationStats

BASE = MigrationStats(
    status="active", total_time_ms=0, setup_time_ms=1, downtime_ms=None,
    expected_downtime_ms=None, transferred=0, remaining=0, total=1 << 30, normal_pages=0,
    normal_bytes=0, zero_pages=0, page_size=4096, dirty_sync_count=0, dirty_pages_rate=0,
    mbps=0, dirty_sync_missed_zero_copy=0, iteration=1, live=True, error=None,
)

updates = st.lists(
    st.tuples(st.integers(1, 6), st.integers(0, 1 << 30), st.sampled_from(["active", "device"])),
    min_size=1, max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(updates)
def test_percentage_never_goes_backwards_or_past_100(seq: list[tuple[int, int, str]]) -> None:
    display = ProgressDisplay(io.StringIO(), enabled=True, min_interval=0)
    last = 0.0
    for iteration, remaining, status in seq:
        p = display.percent(replace(BASE, iteration=iteration, remaining=remaining,
                                    status=status))
        assert last <= p < 100.0
        last = p
    assert display.percent(replace(BASE, status="completed")) == 100.0


def test_the_line_shows_what_a_user_watches() -> None:
    out = io.StringIO()
    display = ProgressDisplay(out, enabled=True, min_interval=0)
    display.update(replace(BASE, transferred=512 << 20, remaining=256 << 20, mbps=8000.0,
                           iteration=2, expected_downtime_ms=42.0))
    text = out.getvalue()
    assert text.startswith("\r")
    for part in ("iter 2", "sent 512.0 MiB", "left 256.0 MiB", "8000.0 mbps",
                 "exp. downtime 42 ms", "active"):
        assert part in text
    assert re.search(r"\d+\.\d%", text)


def test_off_a_terminal_nothing_is_drawn() -> None:
    out = io.StringIO()
    display = ProgressDisplay(out)  # StringIO is not a terminal
    display.update(BASE, force=True)
    display.finish(BASE)
    assert out.getvalue() == ""
