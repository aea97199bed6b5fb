"""Where a thread waits, and in which order things happened: for tests of what wakes a
blocked thread.

A test that checks that shutdown() wakes a thread blocked in a call proves nothing if the
thread never blocked. wait_until_blocked() returns only once the thread has been seen, twice
in a row, asleep in the kernel (state S or D in /proc/self/task/TID/stat) in one of the
named system calls (/proc/self/task/TID/syscall) with the named Python function on its
stack (sys._current_frames()). Timeline records events from any thread in the order they
happened, so that a test asserts that order instead of timing it. It knows threads and
/proc, not zcmigrate.
"""

from __future__ import annotations

import platform
import sys
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import pytest

# The system calls a blocked test thread can sit in, by number on each machine. glibc has
# poll() call ppoll and select() call pselect6 where the old calls do not exist (aarch64),
# and select() on x86_64 too: name both where either can be meant.
_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "read": 0, "write": 1, "poll": 7, "readv": 19, "writev": 20, "select": 23,
        "nanosleep": 35, "accept": 43, "sendto": 44, "recvfrom": 45, "sendmsg": 46,
        "recvmsg": 47, "wait4": 61, "futex": 202, "clock_nanosleep": 230, "epoll_wait": 232,
        "pselect6": 270, "ppoll": 271, "epoll_pwait": 281, "accept4": 288,
    },
    "aarch64": {
        "epoll_pwait": 22, "read": 63, "write": 64, "readv": 65, "writev": 66,
        "pselect6": 72, "ppoll": 73, "futex": 98, "nanosleep": 101, "clock_nanosleep": 115,
        "accept": 202, "sendto": 206, "recvfrom": 207, "sendmsg": 211, "recvmsg": 212,
        "accept4": 242, "wait4": 260,
    },
}
_SAMPLE_S = 0.01


@dataclass(frozen=True)
class Seen:
    """One look at a thread: kernel state, system call and Python stack (innermost last)."""

    state: str
    syscall: str
    stack: tuple[str, ...]

    def __str__(self) -> str:
        return f"state {self.state}, system call {self.syscall}, stack {' > '.join(self.stack)}"


def python_stack(thread: threading.Thread) -> tuple[str, ...]:
    """The qualified names of the functions on the thread's stack, outermost first."""
    frame = sys._current_frames().get(thread.ident or -1)
    names: list[str] = []
    while frame is not None:
        names.append(frame.f_code.co_qualname)
        frame = frame.f_back
    return tuple(reversed(names))


def _kernel(tid: int, names: dict[int, str]) -> tuple[str, str]:
    task = Path(f"/proc/self/task/{tid}")
    try:
        stat = (task / "stat").read_text()
        syscall = (task / "syscall").read_text().split()
    except FileNotFoundError:
        return "gone", "none"
    state = stat[stat.rindex(")") + 2]  # after "pid (comm) "; comm may hold spaces
    if not syscall or syscall[0] == "running":
        return state, "running"
    number = int(syscall[0])
    return state, names.get(number, f"#{number}")


def look(thread: threading.Thread) -> Seen:
    names = {n: s for s, n in _syscall_table().items()}
    before = python_stack(thread)
    state, syscall = _kernel(thread.native_id or -1, names)
    after = python_stack(thread)
    # The stack before and after the look at the kernel: a function on both was running
    # during the look (or was left and entered again), never one the thread had not reached.
    common = before if before == after else tuple(f for f in before if f in after)
    return Seen(state, syscall, common)


def _syscall_table() -> dict[str, int]:
    table = _SYSCALLS.get(platform.machine())
    if table is None:
        pytest.skip(f"no system call numbers for {platform.machine()} in tests/thread_wait.py")
    return table


def wait_until_blocked(thread: threading.Thread, *, inside: str, syscalls: Collection[str],
                       timeout: float = 10.0) -> Seen:
    """Return once `thread` is seen asleep in one of `syscalls` with the function `inside`
    (a qualified name: "Channel.readv_into") on its Python stack, twice in a row.

    AssertionError if the thread ends first or is not seen so within `timeout` seconds.
    """
    known = _syscall_table()
    unknown = [s for s in syscalls if s not in _SYSCALLS["x86_64"] | _SYSCALLS["aarch64"]]
    assert not unknown, f"no number for system calls {unknown}: add them to _SYSCALLS"
    wanted = {s for s in syscalls if s in known}
    deadline = time.monotonic() + timeout
    in_a_row = 0
    seen = look(thread)
    while True:
        if not thread.is_alive():
            raise AssertionError(f"thread {thread.name} ended before it blocked in "
                                 f"{'/'.join(sorted(wanted))} inside {inside}; last seen: {seen}")
        if seen.state in ("S", "D") and seen.syscall in wanted and inside in seen.stack:
            in_a_row += 1
            if in_a_row == 2:
                return seen
        else:
            in_a_row = 0
        if time.monotonic() > deadline:
            raise AssertionError(f"thread {thread.name} not seen blocked in "
                                 f"{'/'.join(sorted(wanted))} inside {inside} within "
                                 f"{timeout:g} s; last seen: {seen}")
        time.sleep(_SAMPLE_S)
        seen = look(thread)


class Timeline:
    """Named events from any thread, in the order they happened."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[str] = []

    def mark(self, event: str) -> None:
        with self._lock:
            self._events.append(event)

    @property
    def events(self) -> list[str]:
        with self._lock:
            return list(self._events)

    def assert_order(self, *events: str) -> None:
        """Each of `events` happened exactly once, in this order (others may be between)."""
        got = self.events
        for e in events:
            assert got.count(e) == 1, f"{e!r} happened {got.count(e)} times: {got}"
        where = [got.index(e) for e in events]
        assert where == sorted(where), f"expected {list(events)} in that order, got {got}"
