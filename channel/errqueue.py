"""Accounting of MSG_ZEROCOPY completions, as a pure class with no socket.

The kernel counts every successful zero-copy send call with a 32-bit counter and reports
completions as inclusive [lo, hi] ranges of it, possibly out of order, coalesced and
wrapping at 2**32 (seed 004, "Notification Batching"). This module turns those ranges
into queued / completed / copied counts and bytes still in flight. It knows nothing of
sockets, pages or packets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from zcmigrate import ZcmigrateError

COUNTER_MOD = 1 << 32


class CompletionError(ZcmigrateError):
    """A completion range that cannot be right: never queued, or completed twice."""


@dataclass(frozen=True, slots=True)
class LedgerSnapshot:
    queued: int
    completed: int
    copied: int
    in_flight_calls: int
    in_flight_bytes: int


class CompletionLedger:
    """Send calls queued with MSG_ZEROCOPY and the completions reported for them.

    `queue()` records calls in the kernel's order (the counter starts at 0 on a new
    socket); `complete()` takes one notification. A range that names a call never
    queued, or one already completed, raises CompletionError and changes nothing.
    """

    __slots__ = (
        "_completed",
        "_copied",
        "_copied_since_mark",
        "_in_flight_bytes",
        "_next",
        "_outstanding",
        "_queued",
    )

    def __init__(self) -> None:
        self._next = 0  # the kernel's counter value for the next successful call
        self._outstanding: dict[int, int] = {}  # counter value -> bytes it pinned
        self._queued = 0
        self._completed = 0
        self._copied = 0
        self._in_flight_bytes = 0
        self._copied_since_mark = False

    def queue(self, sizes: Sequence[int]) -> None:
        """Record successful zero-copy send calls, in the kernel's order: `sizes[i]` is the
        bytes the i-th of them carried (zc_sendv reports each call's own), so the bytes in
        flight drop by exactly what a call pinned when that call completes.
        """
        calls = len(sizes)
        if not calls:
            return
        if any(n < 0 for n in sizes):
            raise ValueError(f"a zero-copy call of negative size in {list(sizes)}")
        if len(self._outstanding) + calls >= COUNTER_MOD:
            # Beyond this the 32-bit counter would name two outstanding calls at once.
            raise CompletionError("more than 2**32 - 1 zero-copy sends outstanding")
        for i, n in enumerate(sizes):
            self._outstanding[(self._next + i) % COUNTER_MOD] = n
        self._next = (self._next + calls) % COUNTER_MOD
        self._queued += calls
        self._in_flight_bytes += sum(sizes)

    def complete(self, lo: int, hi: int, copied: bool) -> int:
        """Apply one notification for the inclusive range [lo, hi]; return calls completed."""
        if not (0 <= lo < COUNTER_MOD and 0 <= hi < COUNTER_MOD):
            raise CompletionError(f"completion range [{lo}, {hi}] is not 32-bit")
        count = (hi - lo) % COUNTER_MOD + 1  # wraps: [2**32-2, 1] is four calls
        if count > len(self._outstanding):
            raise CompletionError(
                f"completion range [{lo}, {hi}] covers {count} sends, "
                f"only {len(self._outstanding)} outstanding"
            )
        seqs = [(lo + i) % COUNTER_MOD for i in range(count)]
        missing = [s for s in seqs if s not in self._outstanding]
        if missing:
            # Check everything before changing anything: a bad range leaves no trace.
            raise CompletionError(
                f"completion range [{lo}, {hi}] names send {missing[0]}, "
                "which was never queued or has completed already"
            )
        for s in seqs:
            self._in_flight_bytes -= self._outstanding.pop(s)
        self._completed += count
        if copied:
            self._copied += count
            self._copied_since_mark = True
        return count

    def take_copied(self) -> bool:
        """Whether any completion came back COPIED since the last call (flush's 0 or 1)."""
        copied, self._copied_since_mark = self._copied_since_mark, False
        return copied

    @property
    def calls_queued(self) -> int:
        """Zero-copy calls queued so far: the number the next call will get (from 0)."""
        return self._queued

    def calls_completed(self, first: int, end: int) -> bool:
        """Whether the calls numbered [first, end) have all completed.

        Calls are numbered in the order queued, from 0, so `calls_queued` read before and
        after a send names the calls that carried its bytes. A call older than 2**32
        later ones shares its counter value with one of them: the answer can then only
        err towards "not yet", never towards reusing a buffer early.
        """
        if not 0 <= first <= end <= self._queued:
            raise ValueError(f"calls [{first}, {end}) outside the {self._queued} queued")
        if not self._outstanding:
            return True
        shift = (self._next - self._queued) % COUNTER_MOD  # start_at() moved the counter
        return not any((k + shift) % COUNTER_MOD in self._outstanding for k in range(first, end))

    @property
    def in_flight_calls(self) -> int:
        return len(self._outstanding)

    @property
    def in_flight_bytes(self) -> int:
        return self._in_flight_bytes

    def snapshot(self) -> LedgerSnapshot:
        return LedgerSnapshot(
            queued=self._queued,
            completed=self._completed,
            copied=self._copied,
            in_flight_calls=len(self._outstanding),
            in_flight_bytes=self._in_flight_bytes,
        )

    def start_at(self, counter: int) -> None:
        """Pretend the kernel's counter is at `counter` (tests of the wrap at 2**32)."""
        if self._outstanding:
            raise ValueError("cannot move the counter with sends outstanding")
        self._next = counter % COUNTER_MOD
