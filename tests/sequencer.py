"""Force threads into an exact order at named points: trio.testing.Sequencer, for threads.

Tests use it through the pools' hooks, so races at sync points become deterministic; it must
not know the pools, sockets or pages: it only counts positions and hook calls.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager


class SequencerError(AssertionError):
    """The forced order could not happen: a position waited too long, or the sequence broke."""


class Sequencer:
    """`with seq(n):` blocks until the blocks of positions 0..n-1 have all been left.

    Positions must be 0, 1, 2, ... each used once, from any threads. A position that waits
    longer than `timeout` seconds raises SequencerError and breaks the sequencer, so every
    other waiter raises at once too: a test whose order cannot happen fails fast, and no
    thread is left blocked.
    """

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._cond = threading.Condition()
        self._next = 0
        self._claimed: set[int] = set()
        self._broken: str | None = None
        self.order: list[tuple[int, str]] = []  # (position, thread name) as they ran

    @contextmanager
    def __call__(self, position: int) -> Iterator[None]:
        deadline = time.monotonic() + self.timeout
        with self._cond:
            if position in self._claimed:
                raise SequencerError(f"sequencer position {position} used twice")
            self._claimed.add(position)
            while self._next != position:
                if self._broken is not None:
                    raise SequencerError(f"position {position}: sequencer broken ({self._broken})")
                left = deadline - time.monotonic()
                if left <= 0:
                    self._broken = (f"position {position} waited {self.timeout:g} s for "
                                    f"position {self._next}")
                    self._cond.notify_all()
                    raise SequencerError(self._broken)
                self._cond.wait(left)
            self.order.append((position, threading.current_thread().name))
        ok = False
        try:
            yield
            ok = True
        finally:
            with self._cond:
                if not ok and self._broken is None:
                    self._broken = f"position {position} raised"
                self._next = position + 1
                self._cond.notify_all()

    @property
    def broken(self) -> str | None:
        return self._broken

    @property
    def reached(self) -> int:
        """How many positions have been passed."""
        with self._cond:
            return self._next


HookKey = tuple[str, int, int]  # (point, channel id, occurrence: 1 for the first)


class HookSchedule:
    """A pool hook that holds the calls named in `schedule` at their Sequencer positions.

    schedule maps (point, channel id, nth call of that point on that channel) to a position;
    every other call passes straight through. `actions` run inside a position's block.
    """

    def __init__(
        self,
        seq: Sequencer,
        schedule: Mapping[HookKey, int],
        actions: Mapping[HookKey, Callable[[], object]] | None = None,
    ) -> None:
        self._seq = seq
        self._schedule = dict(schedule)
        self._actions = dict(actions or {})
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, int]] = Counter()
        self.calls: list[HookKey] = []

    def __call__(self, point: str, channel_id: int) -> None:
        with self._lock:
            self._counts[point, channel_id] += 1
            key = (point, channel_id, self._counts[point, channel_id])
            self.calls.append(key)
        position = self._schedule.get(key)
        action = self._actions.get(key)
        if position is None:
            if action is not None:
                action()
            return
        with self._seq(position):
            if action is not None:
                action()

    def count(self, point: str, channel_id: int) -> int:
        with self._lock:
            return self._counts[point, channel_id]
