"""Pacing to max-bandwidth, a limit that may change at any moment (migrate-set-parameters).

A new limit applies from the moment it is seen, not retroactively: the reference point
moves with every change. Pure arithmetic over a clock it is given; it knows no sockets.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimiter:
    def __init__(self, limit: Callable[[], int],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = limit  # bytes per second, read at every call; 0 = unlimited
        self._clock = clock
        self._ref_t = clock()
        self._ref_bytes = 0
        self._ref_limit = limit()

    def delay(self, total_bytes: int) -> float:
        """Seconds to wait before going on, having queued `total_bytes` since the start;
        0 when within the limit (or there is none)."""
        limit = self._limit()
        now = self._clock()
        if limit != self._ref_limit:
            self._ref_t, self._ref_bytes, self._ref_limit = now, total_bytes, limit
        if not limit:
            return 0.0
        return max(0.0, self._ref_t + (total_bytes - self._ref_bytes) / limit - now)
