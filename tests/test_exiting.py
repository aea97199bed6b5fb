"""The shared exiting flag: the first error wins, callbacks run once, waiters wake."""

from __future__ import annotations

import threading

import pytest

from tests.thread_wait import Timeline, wait_until_blocked
from zcmigrate.multifd.exiting import Exiting, MultifdError


def test_first_error_wins_and_later_ones_are_refused() -> None:
    ex = Exiting()
    first, second = ValueError("first"), RuntimeError("second")
    assert not ex.is_set() and ex.error is None and ex.where == ""
    assert ex.set(first, where="multifd-send-1") is True
    assert ex.set(second, where="multifd-recv-0") is False
    assert ex.is_set()
    assert ex.error is first
    assert ex.where == "multifd-send-1"


def test_only_one_of_many_racing_threads_wins() -> None:
    ex = Exiting()
    barrier = threading.Barrier(16)
    won: list[int] = []
    lock = threading.Lock()

    def racer(i: int) -> None:
        barrier.wait(5)
        if ex.set(RuntimeError(f"error {i}"), where=f"t{i}"):
            with lock:
                won.append(i)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len(won) == 1
    assert str(ex.error) == f"error {won[0]}" and ex.where == f"t{won[0]}"


def test_set_calls_every_registered_callback_once_despite_exceptions() -> None:
    ex = Exiting()
    calls: list[str] = []

    def broken() -> None:
        calls.append("broken")
        raise OSError("already closed")

    ex.register(lambda: calls.append("a"))
    ex.register(broken)
    ex.register(lambda: calls.append("b"))
    assert ex.set(ValueError("x"))
    ex.set(ValueError("y"))
    assert calls == ["a", "broken", "b"]


def test_register_after_set_calls_at_once() -> None:
    ex = Exiting()
    ex.set(ValueError("x"))
    calls: list[str] = []
    ex.register(lambda: calls.append("late"))
    assert calls == ["late"]


def test_register_after_set_suppresses_the_callbacks_exception() -> None:
    ex = Exiting()
    ex.set(ValueError("x"))

    def broken() -> None:
        raise OSError("gone")

    ex.register(broken)  # must not raise


def test_unregistered_callback_is_not_called() -> None:
    ex = Exiting()
    calls: list[str] = []

    def cb() -> None:
        calls.append("cb")

    ex.register(cb)
    ex.unregister(cb)
    ex.unregister(cb)  # twice is harmless
    ex.set(ValueError("x"))
    assert calls == []


def test_wait_times_out_while_not_set() -> None:
    assert Exiting().wait(0.01) is False


def test_wait_wakes_every_waiter() -> None:
    ex = Exiting()
    woke: list[bool] = []
    timeline = Timeline()

    def waiter(i: int) -> None:
        woke.append(ex.wait(10))
        timeline.mark(f"waiter {i} returned")

    threads = [threading.Thread(target=waiter, args=(i,), name=f"test-waiter-{i}")
               for i in range(4)]
    for t in threads:
        t.start()
    # Every waiter is asleep in wait() before set(): else set() could come first, and
    # wait() would return True without having been woken.
    for t in threads:
        wait_until_blocked(t, inside="Exiting.wait", syscalls={"futex"})
    timeline.mark("set")
    ex.set(RuntimeError("stop"))
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert woke == [True] * 4
    for i in range(4):
        timeline.assert_order("set", f"waiter {i} returned")
    assert ex.wait(0) is True


def test_callbacks_see_the_flag_already_set() -> None:
    ex = Exiting()
    seen: list[bool] = []
    ex.register(lambda: seen.append(ex.is_set()))
    ex.set(RuntimeError("x"))
    assert seen == [True]


def test_a_callback_may_call_set_again_without_deadlock() -> None:
    ex = Exiting()
    results: list[bool] = []
    ex.register(lambda: results.append(ex.set(RuntimeError("nested"))))
    assert ex.set(RuntimeError("outer"))
    assert results == [False]
    assert str(ex.error) == "outer"


def test_multifd_error_names_the_channel_and_the_cause() -> None:
    cause = ConnectionResetError("Connection reset by peer")
    err = MultifdError.on_channel("receive", 3, cause)
    assert err.channel_id == 3 and err.cause is cause and err.__cause__ is cause
    assert "receive channel 3" in str(err)
    assert "Connection reset by peer" in str(err) and "ConnectionResetError" in str(err)
    with pytest.raises(MultifdError, match="channel 3"):
        raise err
