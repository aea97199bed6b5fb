"""The test helper that says where a thread waits: it must refuse a thread that is not
blocked where the test says, or every shutdown test built on it passes by luck."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.thread_wait import Timeline, wait_until_blocked


def _recv(sock: socket.socket) -> None:
    sock.recv(1)


@pytest.fixture
def blocked_in_recv() -> Iterator[threading.Thread]:
    a, b = socket.socketpair()
    t = threading.Thread(target=_recv, args=(a,), name="test-recv", daemon=True)
    t.start()
    yield t
    b.send(b"x")  # wakes it
    t.join(5)
    a.close()
    b.close()


def test_a_thread_blocked_in_recv_is_seen_there(blocked_in_recv: threading.Thread) -> None:
    seen = wait_until_blocked(blocked_in_recv, inside="_recv", syscalls={"recvfrom"})
    assert seen.state == "S" and seen.syscall == "recvfrom"
    assert seen.stack[-1] == "_recv"


def test_another_system_call_or_function_is_refused(blocked_in_recv: threading.Thread) -> None:
    with pytest.raises(AssertionError, match=r"not seen blocked in sendmsg inside _recv.*"
                                             r"system call recvfrom"):
        wait_until_blocked(blocked_in_recv, inside="_recv", syscalls={"sendmsg"}, timeout=0.2)
    with pytest.raises(AssertionError, match=r"inside Channel\.readv_into"):
        wait_until_blocked(blocked_in_recv, inside="Channel.readv_into",
                           syscalls={"recvfrom"}, timeout=0.2)


def test_a_thread_running_python_is_not_blocked() -> None:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    t = threading.Thread(target=spin, name="test-spin")
    t.start()
    try:
        # It is seen running, or now and then waiting for the GIL (in futex, which is why
        # a test naming futex must also name the function the thread must be inside),
        # never in a read.
        with pytest.raises(AssertionError, match="not seen blocked"):
            wait_until_blocked(t, inside="spin", syscalls={"read", "readv", "recvfrom"},
                               timeout=0.3)
    finally:
        stop.set()
        t.join(5)


def test_a_thread_that_ends_first_is_reported_at_once() -> None:
    t = threading.Thread(target=lambda: None, name="test-brief")
    t.start()
    t.join(5)
    with pytest.raises(AssertionError, match="test-brief ended before it blocked"):
        wait_until_blocked(t, inside="<lambda>", syscalls={"futex"}, timeout=10)


def test_a_system_call_without_a_number_is_a_mistake_in_the_test() -> None:
    t = threading.current_thread()
    with pytest.raises(AssertionError, match="no number for system calls"):
        wait_until_blocked(t, inside="x", syscalls={"no_such_call"})


def test_timeline_checks_order_and_that_each_event_happened_once() -> None:
    tl = Timeline()
    for e in ("a", "x", "b"):
        tl.mark(e)
    tl.assert_order("a", "b")
    with pytest.raises(AssertionError, match="in that order"):
        tl.assert_order("b", "a")
    with pytest.raises(AssertionError, match="'c' happened 0 times"):
        tl.assert_order("a", "c")
    tl.mark("a")
    with pytest.raises(AssertionError, match="'a' happened 2 times"):
        tl.assert_order("a", "b")
