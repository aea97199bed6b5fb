"""When precopy may stop: the expected downtime against downtime-limit, when to give up,
and, with auto-converge, how hard to throttle the guest meanwhile.

Pure decisions over what one iteration measured (QEMU's migration_iteration_run, its
bandwidth estimate and its cpu-throttle steps): no clocks, sockets or guests; the job
feeds them numbers.
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
    """Judges each iteration; remembers only how many in a row looked hopeless.

    With a throttle that can still rise (`can_throttle`), a guest that dirties as fast as
    the link is not hopeless yet: the next step slows it down."""

    def __init__(self, *, max_iterations: int, timeout: float) -> None:
        self.max_iterations = max_iterations
        self.timeout = timeout  # seconds of precopy; 0 means no limit
        self.can_throttle = False
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
        if self._hopeless >= HOPELESS_ITERATIONS and not self.can_throttle:
            reason = (f"the guest dirties {_mib(dirty_rate)}/s, as fast as or faster than "
                      f"the migration moves pages ({_mib(bandwidth)}/s)")
        elif it.number >= self.max_iterations:
            reason = f"{it.number} iterations (max-iterations) did not bring it there"
        elif self.timeout and it.since_start > self.timeout:
            reason = f"{self.timeout:g} s (timeout) did not bring it there"
        if reason:
            return Decision(Action.GIVE_UP, expected_ms, reason)
        return Decision(Action.ITERATE, expected_ms)


class AutoConverge:
    """QEMU's auto-converge: each iteration that does not converge throttles the guest
    harder (cpu-throttle-initial, then + cpu-throttle-increment, up to the maximum), so
    that its dirty rate falls until the rest fits the downtime limit. Percent of the
    guest's time it sleeps."""

    MAX = 99  # QEMU's cpu-throttle ceiling: the guest always runs a little

    def __init__(self, *, initial: int, increment: int) -> None:
        if not 1 <= initial <= self.MAX or not 1 <= increment <= self.MAX:
            raise ValueError(f"throttle steps must be 1..{self.MAX} percent, not "
                             f"{initial} and {increment}")
        self.initial = initial
        self.increment = increment
        self.percent = 0

    @property
    def at_max(self) -> bool:
        return self.percent >= self.MAX

    def step(self, decision: Decision) -> int:
        """The throttle for the next iteration: raised after one that did not converge,
        unchanged once it did (the pause follows)."""
        if decision.action is Action.ITERATE:
            self.percent = (self.initial if self.percent == 0
                            else min(self.MAX, self.percent + self.increment))
        return self.percent
