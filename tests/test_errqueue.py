"""CompletionLedger: the kernel's completion ranges turned into counts, on synthetic ranges."""

import pytest

from zcmigrate.channel.errqueue import COUNTER_MOD, CompletionError, CompletionLedger


def test_in_order_ranges_complete_everything_queued() -> None:
    led = CompletionLedger()
    led.queue([100, 100, 100])
    assert led.complete(0, 0, copied=False) == 1
    assert led.complete(1, 2, copied=False) == 2
    snap = led.snapshot()
    assert (snap.queued, snap.completed, snap.copied, snap.in_flight_calls) == (3, 3, 0, 0)
    assert snap.in_flight_bytes == 0


def test_out_of_order_completions_are_accepted() -> None:
    led = CompletionLedger()
    led.queue([100, 100, 100, 100, 100])
    led.complete(3, 4, copied=False)
    assert led.in_flight_calls == 3
    led.complete(0, 1, copied=False)
    led.complete(2, 2, copied=False)
    assert led.snapshot().completed == 5 and led.in_flight_calls == 0


def test_one_coalesced_range_covers_many_calls() -> None:
    led = CompletionLedger()
    for _ in range(100):
        led.queue([10])
    assert led.in_flight_bytes == 1000
    assert led.complete(0, 99, copied=True) == 100
    assert led.snapshot().copied == 100
    assert led.in_flight_bytes == 0


def test_range_wrapping_at_2_pow_32() -> None:
    led = CompletionLedger()
    led.start_at(COUNTER_MOD - 2)
    led.queue([1024, 1024, 1024, 1024])  # counters 2**32-2, 2**32-1, 0, 1
    assert led.complete(COUNTER_MOD - 2, 1, copied=False) == 4
    assert led.in_flight_calls == 0
    led.queue([1])  # the counter went on from 2
    led.complete(2, 2, copied=False)


def test_double_completion_is_an_error_and_changes_nothing() -> None:
    led = CompletionLedger()
    led.queue([10, 10, 10])
    led.complete(1, 1, copied=False)
    before = led.snapshot()
    with pytest.raises(CompletionError, match="never queued or has completed already"):
        led.complete(0, 1, copied=True)
    assert led.snapshot() == before
    assert not led.take_copied()


def test_completion_of_a_call_never_queued_is_an_error() -> None:
    led = CompletionLedger()
    led.queue([10, 10])
    with pytest.raises(CompletionError):
        led.complete(5, 5, copied=False)
    with pytest.raises(CompletionError, match="covers"):
        led.complete(0, 10, copied=False)


def test_range_larger_than_anything_outstanding_fails_fast() -> None:
    led = CompletionLedger()
    led.queue([1])
    with pytest.raises(CompletionError):
        led.complete(1, 0, copied=False)  # wraps to 2**32 calls


def test_take_copied_reports_since_the_last_take() -> None:
    led = CompletionLedger()
    led.queue([1, 1])
    led.complete(0, 0, copied=True)
    assert led.take_copied() is True
    assert led.take_copied() is False
    led.complete(1, 1, copied=False)
    assert led.take_copied() is False


def test_bytes_in_flight_follow_completions() -> None:
    led = CompletionLedger()
    led.queue([8192, 4096])
    led.queue([100])
    assert led.in_flight_bytes == 12388
    led.complete(2, 2, copied=False)
    assert led.in_flight_bytes == 12288


def test_each_call_is_accounted_for_the_bytes_it_carried() -> None:
    """One writev's calls carry what the kernel took in each (a short first call, a long
    second one): a completed call frees exactly its own bytes, never an even share."""
    led = CompletionLedger()
    led.queue([16384, 1 << 20, 7])
    led.complete(0, 0, copied=False)
    assert led.in_flight_bytes == (1 << 20) + 7
    led.complete(2, 2, copied=False)
    assert led.in_flight_bytes == 1 << 20
    led.complete(1, 1, copied=False)
    assert (led.in_flight_bytes, led.in_flight_calls) == (0, 0)


def test_a_negative_size_is_refused_and_changes_nothing() -> None:
    led = CompletionLedger()
    with pytest.raises(ValueError, match="negative size"):
        led.queue([4, -1])
    assert (led.calls_queued, led.in_flight_bytes) == (0, 0)


def test_calls_named_by_number_complete_out_of_order() -> None:
    """calls_queued before and after a send names its calls; calls_completed says when
    every one of them is back (what a send pool needs before it reuses a buffer)."""
    led = CompletionLedger()
    assert led.calls_queued == 0
    led.queue([1, 1])  # one send of two calls: [0, 2)
    led.queue([1])  # another: [2, 3)
    assert led.calls_queued == 3
    led.complete(2, 2, copied=True)
    assert led.calls_completed(2, 3)
    assert not led.calls_completed(0, 2)
    led.complete(1, 1, copied=True)
    assert not led.calls_completed(0, 2)  # one of the two is still out
    led.complete(0, 0, copied=True)
    assert led.calls_completed(0, 2) and led.calls_completed(0, 3)
    assert led.calls_completed(3, 3)  # no call at all: nothing to wait for


def test_call_numbers_keep_counting_across_the_kernels_wrap() -> None:
    led = CompletionLedger()
    led.start_at(COUNTER_MOD - 2)
    led.queue([1, 1, 1, 1])  # kernel counters 2**32-2, 2**32-1, 0, 1
    led.complete(COUNTER_MOD - 2, COUNTER_MOD - 1, copied=False)
    assert led.calls_completed(0, 2) and not led.calls_completed(2, 4)
    led.complete(0, 1, copied=False)
    assert led.calls_completed(0, 4)


def test_calls_not_made_yet_cannot_be_asked_about() -> None:
    led = CompletionLedger()
    led.queue([1])
    with pytest.raises(ValueError, match="outside the 1 queued"):
        led.calls_completed(0, 2)
    with pytest.raises(ValueError):
        led.calls_completed(1, 0)
