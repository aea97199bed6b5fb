"""When precopy may stop: the expected downtime against downtime-limit, and when to give up.

A pure decision over what one iteration measured (QEMU's migration_iteration_run and
its bandwidth estimate): no clocks, sockets or guests; the job feeds it numbers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Iterations in a row whose dirty rate reaches the bandwidth before we call it hopeless.
HOPELESS_ITERATIONS = 3
# A dirty rate within this share of the bandwidth counts as "as fast as we send".
_HOPELESS_SHARE = 0.95


class Action(enum.Enum):
    SWITCH_OVER = "switch-over"  # the rest fits the downtime limit: pause the guest
    ITERATE = "iterate"  # send what was dirtied, then ask again
    GIVE_UP = "give-up"  # it will not converge: say why, keep the guest running here


@dataclass(frozen=True, slots=True)
class Iteration:
    """What one precopy iteration measured."""

    number: int  # 1 for the first pass
    sent_bytes: int
    elapsed: float  # seconds the iteration took, sync included
    dirty_bytes: int  # dirtied while it ran: what the next iteration (or the pause) sends
    bandwidth: float  # bytes per second the migration moved, as estimated after it
    since_start: float  # seconds since precopy began


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    expected_downtime_ms: float
    reason: str = ""


def _mib(rate: float) -> str:
    return f"{rate / (1 << 20):.1f} MiB"


class Convergence:
    """Judges each iteration; remembers only how many in a row looked hopeless."""

    def __init__(self, *, max_iterations: int, timeout: float) -> None:
        self.max_iterations = max_iterations
        self.timeout = timeout  # seconds of precopy; 0 means no limit
        self._hopeless = 0

    def decide(self, it: Iteration, downtime_limit_ms: int) -> Decision:
        """downtime_limit_ms is read per call: it may change while the migration runs."""
        bandwidth = max(it.bandwidth, 1.0)
        expected_ms = it.dirty_bytes / bandwidth * 1000.0
        if expected_ms <= downtime_limit_ms:
            return Decision(Action.SWITCH_OVER, expected_ms)
        dirty_rate = it.dirty_bytes / max(it.elapsed, 1e-6)
        self._hopeless = self._hopeless + 1 if dirty_rate >= bandwidth * _HOPELESS_SHARE else 0
        reason = ""
        if self._hopeless >= HOPELESS_ITERATIONS:
            reason = (f"the guest dirties {_mib(dirty_rate)}/s, as fast as or faster than "
                      f"the migration moves pages ({_mib(bandwidth)}/s)")
        elif it.number >= self.max_iterations:
            reason = f"{it.number} iterations (max-iterations) did not bring it there"
        elif self.timeout and it.since_start > self.timeout:
            reason = f"{self.timeout:g} s (timeout) did not bring it there"
        if reason:
            return Decision(Action.GIVE_UP, expected_ms, reason)
        return Decision(Action.ITERATE, expected_ms)
