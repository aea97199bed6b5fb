"""The terminal progress line of `zcmigrate send`: transferred, remaining, mbps, iteration,
expected downtime, and a percentage that never runs backwards or past 100%.

Off a terminal it prints nothing: the job's structlog lines (one per iteration) serve.
It knows only MigrationStats, not the job or click.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from zcmigrate.migrate.stats import MigrationStats
from zcmigrate.migrate.units import format_size

BAR = 24


class ProgressDisplay:
    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None,
                 min_interval: float = 0.1) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.min_interval = min_interval
        self._percent = 0.0
        self._last = 0.0
        self._width = 0
        self._lock = threading.Lock()

    def percent(self, stats: MigrationStats) -> float:
        """Monotonic: the first pass drives it; later iterations cannot pull it back,
        and only a completed migration shows 100."""
        p = stats.percent if stats.iteration <= 1 else 99.0
        p = 100.0 if stats.status == "completed" else min(p, 99.9)
        self._percent = max(self._percent, p)
        return self._percent

    def line(self, stats: MigrationStats) -> str:
        pct = self.percent(stats)
        filled = int(BAR * pct / 100)
        exp = stats.expected_downtime_ms
        parts = [
            f"[{'#' * filled}{'.' * (BAR - filled)}] {pct:5.1f}%",
            f"iter {stats.iteration}",
            f"sent {format_size(stats.transferred)}",
            f"left {format_size(stats.remaining)}",
            f"{stats.mbps:8.1f} mbps",
            f"exp. downtime {'-' if exp is None else f'{exp:.0f} ms'}",
            stats.status,
        ]
        return "  ".join(parts)

    def update(self, stats: MigrationStats, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last < self.min_interval:
                return
            self._last = now
            text = self.line(stats)
            pad = max(0, self._width - len(text))
            self._width = len(text)
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()

    def finish(self, stats: MigrationStats) -> None:
        if not self.enabled:
            return
        self.update(stats, force=True)
        self.stream.write("\n")
        self.stream.flush()
