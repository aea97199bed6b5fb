"""The ordering invariant, deterministically: a page sent again after a sync, on another channel,
always lands after its older version, whatever order the receivers run in.

Page P leaves on channel 0; the source changes P; sync; P leaves again on channel 1; sync.
A Sequencer holds the pools' threads at their hook points to force every interleaving of
channel 1's SYNC with channel 0's progress on the older P (ARCHITECTURE.md, invariant 2).
Both ways into the image: pages read into a mapping, and pages written to a file (pwrite).
"""

from __future__ import annotations

import mmap
import os
from array import array
from collections.abc import Iterator

import pytest

from tests.sequencer import HookKey, HookSchedule, Sequencer
from tests.test_sender_receiver import Background, make_pools, pool_threads
from zcmigrate.multifd.exiting import MultifdError
from zcmigrate.multifd.stats import PoolStats
from zcmigrate.multifd.wire import WireContext

PAGE = 4096
NPAGES = 64
P, Q = 5, 9  # P is sent twice; Q keeps channel 0 busy so the second P goes to channel 1
OLD = (b"old P " * PAGE)[:PAGE]
NEW = (b"NEW p " * PAGE)[:PAGE]
Q_DATA = (b"page Q " * PAGE)[:PAGE]
CTX = WireContext(uuid=bytes(16), channels=2, page_size=PAGE, image_size=NPAGES * PAGE,
                  pages_alloc=1)


@pytest.fixture(autouse=True)
def _no_pool_thread_survives() -> Iterator[None]:
    yield
    assert pool_threads() == []


def page(buf: mmap.mmap, n: int) -> bytes:
    return buf[n * PAGE:(n + 1) * PAGE]


def assert_flushed(stats: PoolStats, zero_copy: bool) -> None:
    # Right after sync() returned: no zero-copy send of any channel is still in flight.
    for c in stats.channels:
        assert c.zero_copy_queued == c.zero_copy_completed, f"channel {c.id}"
        if not zero_copy:
            assert c.zero_copy_queued == 0


# The receiver-side events that matter, in channel 0's program order R0h < R0p < R0s:
R0H: HookKey = ("recv_header", 0, 1)  # channel 0 has read the older P's header, not its data
R0P: HookKey = ("recv_packet", 0, 1)  # channel 0 has put the older P in place
R0S: HookKey = ("recv_sync", 0, 1)  # channel 0 has read SYNC 1
R1S: HookKey = ("recv_sync", 1, 1)  # channel 1 has read SYNC 1: the newer P comes next
R1P: HookKey = ("recv_packet", 1, 1)  # channel 1 has put the newer P in place

# Every place channel 1's SYNC can take among channel 0's three steps. After its SYNC,
# channel 1 runs free: only the barrier keeps the newer P from landing early.
RECEIVER_ORDERS = {
    "ch1-sync-before-ch0-reads-old-P": [R1S, R0H, R0P, R0S],
    "ch1-sync-while-old-P-is-read": [R0H, R1S, R0P, R0S],
    "ch1-sync-after-old-P-in-place": [R0H, R0P, R1S, R0S],
    "ch1-sync-after-ch0-sync": [R0H, R0P, R0S, R1S],
}
# And on the source, either channel's SYNC may be written first.
SENDER_ORDERS = {
    "ch0-sync-sent-first": [("send_sync", 0, 1), ("send_sync", 1, 1)],
    "ch1-sync-sent-first": [("send_sync", 1, 1), ("send_sync", 0, 1)],
}


def run_scenario(
    zero_copy: bool,
    sender_sync_order: list[HookKey],
    receiver_order: list[HookKey],
    receiver_timeout: float = 10.0,
    to_file: bool = False,
) -> tuple[mmap.mmap, HookSchedule, dict[str, bytes], Background[list[int]], PoolStats]:
    src = mmap.mmap(-1, CTX.image_size)
    fd = -1
    if to_file:
        # The receiver writes the file with pwrite; the test watches it through a mapping,
        # which shows the page cache as it is at each hook.
        fd = os.memfd_create("dst-image")
        os.ftruncate(fd, CTX.image_size)
        dst = mmap.mmap(fd, CTX.image_size, prot=mmap.PROT_READ)
    else:
        dst = mmap.mmap(-1, CTX.image_size)
    src[P * PAGE:(P + 1) * PAGE] = OLD
    src[Q * PAGE:(Q + 1) * PAGE] = Q_DATA
    seen: dict[str, bytes] = {}

    sseq = Sequencer(timeout=10)
    sender_schedule: dict[HookKey, int] = {("sent_packet", 0, 1): 0}  # 1: the source changes P
    for i, key in enumerate(sender_sync_order):
        sender_schedule[key] = 2 + i  # 4: round 2 has been dispatched
    sender_schedule[("send_packet", 0, 2)] = 5  # Q is held on channel 0 until then
    sender_hook = HookSchedule(sseq, sender_schedule)

    dseq = Sequencer(timeout=receiver_timeout)
    receiver_hook = HookSchedule(
        dseq,
        {key: i for i, key in enumerate(receiver_order)},
        actions={R0P: lambda: seen.setdefault("at R0p", page(dst, P)),
                 R1S: lambda: seen.setdefault("at R1s", page(dst, P)),
                 R1P: lambda: seen.setdefault("at R1p", page(dst, P))},
    )
    pools = make_pools(CTX, src, fd if to_file else dst, zero_copy=zero_copy,
                       sender_hook=sender_hook, receiver_hook=receiver_hook)

    def coordinate() -> list[int]:
        return [pools.receiver.sync(timeout=20), pools.receiver.sync(timeout=20)]

    coord = Background(coordinate, name="test-coordinator")
    try:
        # Iteration 1: P alone; both workers idle, so the tie goes to channel 0.
        pools.sender.send_pages(array("Q", [P * PAGE]))
        with sseq(1):
            # Only once channel 0 has written the older P: with zero copy off it is frozen
            # in the socket now, so the destination really receives the older version.
            src[P * PAGE:(P + 1) * PAGE] = NEW
        assert pools.sender.sync(timeout=20).sync_num == 1
        assert_flushed(pools.sender.statistics(), zero_copy)
        # Iteration 2: Q to channel 0 (held at its hook), so P goes to channel 1.
        pools.sender.send_pages(array("Q", [Q * PAGE, P * PAGE]))
        with sseq(4):
            pass
        assert pools.sender.sync(timeout=20).sync_num == 2
        sent = pools.sender.statistics()
        assert_flushed(sent, zero_copy)
    finally:
        coord.exception(30)
        pools.close()
        src.close()
        if fd >= 0:
            os.close(fd)  # the mapping keeps the file
    return dst, receiver_hook, seen, coord, sent


@pytest.mark.parametrize("to_file", [False, True], ids=["mapping", "file"])
@pytest.mark.parametrize("zero_copy", [False, True], ids=["copy", "zerocopy"])
@pytest.mark.parametrize("sender_order", list(SENDER_ORDERS))
@pytest.mark.parametrize("receiver_order", list(RECEIVER_ORDERS))
def test_newer_version_of_a_page_always_wins(
    zero_copy: bool, sender_order: str, receiver_order: str, to_file: bool
) -> None:
    dst, hook, seen, coord, sent = run_scenario(
        zero_copy, SENDER_ORDERS[sender_order], RECEIVER_ORDERS[receiver_order],
        to_file=to_file)
    try:
        assert coord.result() == [1, 2]
        # The second P really went on channel 1, the first on channel 0.
        assert [c.packets for c in sent.channels] == [2, 1]
        # Channel 0 put the older P in place first ...
        if zero_copy:
            # ... or, with zero copy, maybe already the newer one (invariant 1: harmless).
            assert seen["at R0p"] in (OLD, NEW)
        else:
            assert seen["at R0p"] == OLD
        assert seen["at R1s"] in (bytes(PAGE), OLD)  # the newer P had not landed yet
        assert seen["at R1p"] == NEW
        # The newer P landed only after channel 0 had reached SYNC 1: the sequencer does
        # not hold channel 1 there, the barrier does.
        assert hook.calls.index(R1P) > hook.calls.index(R0S)
        assert page(dst, P) == NEW
        assert page(dst, Q) == Q_DATA
    finally:
        dst.close()


@pytest.mark.parametrize("to_file", [False, True], ids=["mapping", "file"])
def test_the_barrier_makes_the_stale_order_impossible(to_file: bool) -> None:
    """Forcing the newer P in before channel 0 reads the older one cannot happen: channel 1
    waits at SYNC 1 for channel 0, which the sequencer holds, until the sequencer gives up."""
    dst, hook, _seen, coord, _ = run_scenario(
        False, SENDER_ORDERS["ch0-sync-sent-first"], [R1P, R0H], receiver_timeout=1.0,
        to_file=to_file)
    try:
        err = coord.exception()
        assert isinstance(err, MultifdError)
        assert err.channel_id == 0 and "SequencerError" in str(err)
        assert R1P not in hook.calls
        assert page(dst, P) != NEW
    finally:
        dst.close()
