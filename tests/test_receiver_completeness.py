"""The receiver pool proves that nothing went missing: every packet of a channel in sequence,
every SYNC's counts equal to what arrived, a final sync that stops every worker at its SYNC,
and a completeness check (no byte after the final SYNC, every page arrived at least once)
that a destination runs before it commits.
"""

from __future__ import annotations

import mmap
import os
import random
import threading
from array import array
from collections.abc import Iterator
from typing import Any

import pytest

from tests.test_pool_failures import RawSources, pool_ends_within
from tests.test_sender_receiver import Background, make_pools, pool_threads
from zcmigrate.multifd.exiting import MultifdError
from zcmigrate.multifd.receiver import MissingPages
from zcmigrate.multifd.wire import RemoteProtocolError, WireContext
from zcmigrate.native import ffi, lib

PAGE = 4096
PAGES = 64
SIZE = PAGES * PAGE
UUID = bytes(range(16))


@pytest.fixture(autouse=True)
def _no_pool_thread_survives() -> Iterator[None]:
    yield
    assert pool_threads() == []


def context(channels: int, size: int = SIZE, pages_alloc: int = 16) -> WireContext:
    return WireContext(uuid=UUID, channels=channels, page_size=PAGE, image_size=size,
                       pages_alloc=pages_alloc)


@pytest.fixture(params=["mapping", "file"])
def sink(request: pytest.FixtureRequest) -> Iterator[mmap.mmap | int]:
    """Both places a receiver writes to: a mapping, and a file through its descriptor."""
    if request.param == "mapping":
        mm = mmap.mmap(-1, SIZE)
        yield mm
        mm.close()
    else:
        fd = os.memfd_create("incoming")
        os.ftruncate(fd, SIZE)
        yield fd
        os.close(fd)


def page_of(sink: mmap.mmap | int, offset: int) -> bytes:
    if isinstance(sink, int):
        return os.pread(sink, PAGE, offset)
    return sink[offset:offset + PAGE]


def all_pages(first: int = 0, end: int = PAGES) -> list[int]:
    return [p * PAGE for p in range(first, end)]


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("multifd-recv-")]


# ----------------------------------------------------------------- a channel's sequence


def test_a_skipped_packet_fails_the_pool_before_the_next_one_is_written(
    sink: mmap.mmap | int,
) -> None:
    raw = RawSources(context(2), sink)
    try:
        s = raw.streams[1]
        raw.tx[1].write_all(s.data(normal=[0]))
        s.data(normal=[PAGE])  # lost between the pools
        raw.tx[1].write_all(s.data(normal=[2 * PAGE]))
        pool_ends_within(raw.pool, 5)
        err = raw.pool.error
        assert err is not None and err.channel_id == 1
        assert isinstance(err.cause, RemoteProtocolError)
        assert "seq 3 on channel 1, expected 2 (1 packet missing)" in str(err)
        assert page_of(sink, 0) == raw.factory.page_data(1)  # before the gap: in place
        assert page_of(sink, 2 * PAGE) == bytes(PAGE)  # after it: never written
        with pytest.raises(MultifdError, match="receive channel 1"):
            raw.pool.sync(timeout=1)
    finally:
        raw.close()


def test_a_repeated_packet_fails_the_pool_and_is_not_written_again(
    sink: mmap.mmap | int,
) -> None:
    raw = RawSources(context(1), sink, known_zero=False)
    try:
        s = raw.streams[0]
        raw.tx[0].write_all(s.data(normal=[0]))
        replay = s.data(zero=[0])  # the page is zeroed by the second packet...
        raw.tx[0].write_all(replay)
        raw.tx[0].write_all(s.data(normal=[PAGE]))
        raw.tx[0].write_all(replay)  # ...and a replay of that packet must not land again
        pool_ends_within(raw.pool, 5)
        err = raw.pool.error
        assert err is not None and err.channel_id == 0
        assert ("seq 2 on channel 0, expected 4 (a packet repeated or out of order)"
                in str(err))
        assert page_of(sink, PAGE) == raw.factory.page_data(1)
    finally:
        raw.close()


@pytest.mark.parametrize(("packets", "pages"), [(1, 3), (2, 2), (3, 3), (0, 0)])
def test_a_sync_with_the_wrong_counts_fails_the_sync(
    sink: mmap.mmap | int, packets: int, pages: int
) -> None:
    raw = RawSources(context(2), sink)
    try:
        coord = Background(lambda: raw.pool.sync(timeout=10))
        raw.tx[0].write_all(raw.streams[0].sync())
        s = raw.streams[1]
        raw.tx[1].write_all(s.data(normal=[0, PAGE]) + s.data(zero=[2 * PAGE]))
        raw.tx[1].write_all(s.sync(sync_packets=packets, sync_pages=pages))
        err = coord.exception(10)
        assert isinstance(err, MultifdError) and err is raw.pool.error
        assert err.channel_id == 1
        assert (f"SYNC packet (seq 3) on channel 1: the sender counts {packets} data packets "
                f"and {pages} pages since the previous SYNC, received 2 packets and 3 pages"
                in str(err))
    finally:
        raw.close()


def test_a_correct_stream_over_several_syncs_passes(sink: mmap.mmap | int) -> None:
    raw = RawSources(context(2), sink)
    try:
        for k in (1, 2, 3):
            for ch, (tx, s) in enumerate(zip(raw.tx, raw.streams, strict=True)):
                if k != 2:  # an iteration in which nothing was sent: SYNC with 0 and 0
                    tx.write_all(s.data(normal=[(k * 2 + ch) * PAGE], zero=[(40 + k) * PAGE]))
                    tx.write_all(s.data())
                tx.write_all(s.sync())
            assert raw.pool.sync(timeout=10) == k
        assert raw.pool.error is None
    finally:
        raw.close()


# ----------------------------------------------------------------- the final sync


def test_the_final_sync_stops_every_worker_at_its_sync(sink: mmap.mmap | int) -> None:
    raw = RawSources(context(2, pages_alloc=64), sink)
    try:
        for tx, s in zip(raw.tx, raw.streams, strict=True):
            tx.write_all(s.data(normal=all_pages(0, 32) if s.channel_id == 0 else [],
                                zero=all_pages(32, 48) if s.channel_id == 0 else []))
            tx.write_all(s.sync())
        assert raw.pool.sync(timeout=10) == 1
        s = raw.streams[1]
        raw.tx[1].write_all(s.data(normal=all_pages(48, 64)))
        for tx, st in zip(raw.tx, raw.streams, strict=True):
            tx.write_all(st.sync())
        # A packet after the final SYNC, already in the socket when the final sync runs:
        # the worker is held at its SYNC, then stops there, and never reads it.
        raw.tx[0].write_all(raw.streams[0].data(normal=[5 * PAGE], payload=b"\xee" * PAGE))
        assert raw.pool.sync(timeout=10, final=True) == 2
        assert worker_threads() == []  # joined before sync() returned
        assert page_of(sink, 5 * PAGE) == raw.factory.page_data(6)[5 * PAGE:]
        with pytest.raises(RemoteProtocolError,
                           match="data after the final sync on channel 0, expected nothing "
                                 r"more on it \(seq 3 was its final SYNC\)"):
            raw.pool.check_complete()
        with pytest.raises(MultifdError, match="sync after the final sync"):
            raw.pool.sync(timeout=1)
        assert raw.pool.statistics().syncs == 4
    finally:
        raw.close()


def test_a_complete_image_passes_and_a_close_after_the_final_sync_is_no_data(
    sink: mmap.mmap | int,
) -> None:
    raw = RawSources(context(2), sink)
    try:
        halves = (all_pages(0, 32), all_pages(32, 64))
        for half, tx, s in zip(halves, raw.tx, raw.streams, strict=True):
            tx.write_all(s.data(normal=half[:16]) + s.data(zero=half[16:]))
            tx.write_all(s.sync())
        assert raw.pool.sync(timeout=10, final=True) == 1
        raw.tx[1].close()  # the source may close its channels once the final sync is over
        raw.pool.check_complete()
        assert raw.pool.missing_pages() == MissingPages(count=0, pages=PAGES, first=())
        assert str(raw.pool.missing_pages()) == f"all {PAGES} pages arrived"
    finally:
        raw.close()


def test_zero_pages_skipped_on_a_fresh_image_still_count_as_arrived(
    sink: mmap.mmap | int,
) -> None:
    raw = RawSources(context(1), sink, known_zero=True)
    try:
        s = raw.streams[0]
        # Never written (known zero): no work is done for them, yet they arrived.
        raw.tx[0].write_all(s.data(zero=all_pages(0, 16)) + s.data(zero=all_pages(16, 32)))
        raw.tx[0].write_all(s.data(zero=all_pages(32, 48)) + s.data(zero=all_pages(48, 64)))
        raw.tx[0].write_all(s.sync())
        raw.pool.sync(timeout=10, final=True)
        raw.pool.check_complete()
    finally:
        raw.close()


def test_pages_that_never_arrived_are_counted_and_named(sink: mmap.mmap | int) -> None:
    raw = RawSources(context(2), sink)
    try:
        sent = set(range(PAGES)) - {3, 4, 40, 63}
        mine = sorted(sent)
        for i, (tx, s) in enumerate(zip(raw.tx, raw.streams, strict=True)):
            offsets = [p * PAGE for p in mine[i::2]]
            for j in range(0, len(offsets), 16):
                tx.write_all(s.data(normal=offsets[j:j + 8], zero=offsets[j + 8:j + 16]))
            tx.write_all(s.sync())
        raw.pool.sync(timeout=10, final=True)
        missing = raw.pool.missing_pages()
        assert missing == MissingPages(count=4, pages=PAGES,
                                       first=(3 * PAGE, 4 * PAGE, 40 * PAGE, 63 * PAGE))
        with pytest.raises(RemoteProtocolError,
                           match=r"4 of 64 pages never arrived, first at offset 0x3000, then "
                                 r"0x4000, 0x28000, 0x3f000$"):
            raw.pool.check_complete()
    finally:
        raw.close()


def test_a_long_list_of_missing_pages_names_the_first_few() -> None:
    dst = mmap.mmap(-1, SIZE)
    raw = RawSources(context(1), dst)
    try:
        s = raw.streams[0]
        raw.tx[0].write_all(s.data(normal=[0, 2 * PAGE]) + s.sync())
        raw.pool.sync(timeout=10, final=True)
        missing = raw.pool.missing_pages()
        assert missing.count == 62 and missing.first == (PAGE, *all_pages(3, 10))
        assert str(missing) == ("62 of 64 pages never arrived, first at offset 0x1000, then "
                                "0x3000, 0x4000, 0x5000, 0x6000, 0x7000, 0x8000, 0x9000, ...")
    finally:
        raw.close()
        dst.close()


def test_check_complete_wants_the_final_sync_first() -> None:
    dst = mmap.mmap(-1, SIZE)
    raw = RawSources(context(1), dst)
    try:
        with pytest.raises(RuntimeError, match=r"before sync\(final=True\)"):
            raw.pool.check_complete()
        raw.tx[0].write_all(raw.streams[0].sync())
        raw.pool.sync(timeout=10)
        with pytest.raises(RuntimeError, match=r"before sync\(final=True\)"):
            raw.pool.check_complete()
    finally:
        raw.close()
        dst.close()


def test_missing_pages_is_a_snapshot_while_pages_arrive() -> None:
    dst = mmap.mmap(-1, SIZE)
    raw = RawSources(context(1), dst)
    try:
        assert raw.pool.missing_pages().count == PAGES
        s = raw.streams[0]
        raw.tx[0].write_all(s.data(normal=all_pages(0, 16)) + s.sync())
        raw.pool.sync(timeout=10)
        assert raw.pool.missing_pages().count == PAGES - 16
    finally:
        raw.close()
        dst.close()
    assert raw.pool.missing_pages().count == PAGES - 16  # and still after close()


# ----------------------------------------------------------------- real pools


@pytest.mark.parametrize("zero_copy", [False, True], ids=["copy", "zerocopy"])
def test_a_sender_pool_satisfies_the_receiver_over_iterations(zero_copy: bool) -> None:
    size = 16 << 20
    npages = size // PAGE
    ctx = context(3, size, pages_alloc=64)
    src = mmap.mmap(-1, size)
    dst = mmap.mmap(-1, size)
    rng = random.Random(3)
    for p in rng.sample(range(npages), npages // 2):  # half the pages zero, scattered
        src[p * PAGE:p * PAGE + 8] = os.urandom(8)
    pools = make_pools(ctx, src, dst, zero_copy=zero_copy)
    try:
        rounds = [array("Q", range(0, size, PAGE))]
        rounds += [array("Q", sorted(p * PAGE for p in rng.sample(range(npages), n)))
                   for n in (1000, 7, 0)]  # the last: an iteration with nothing dirty
        for k, offsets in enumerate(rounds, 1):
            final = k == len(rounds)
            coord: Background[Any] = Background(
                lambda final=final: pools.receiver.sync(timeout=30, final=final))
            pools.sender.send_pages(offsets)
            assert pools.sender.sync(timeout=30).sync_num == k
            assert coord.result(30) == k
        pools.receiver.check_complete()
        assert dst[:] == src[:]
    finally:
        pools.close()
        src.close()
        dst.close()


def test_a_sender_pool_that_sent_part_of_the_image_is_found_incomplete() -> None:
    size = 4 << 20
    ctx = context(2, size, pages_alloc=64)
    src = mmap.mmap(-1, size)
    dst = mmap.mmap(-1, size)
    pools = make_pools(ctx, src, dst, zero_copy=False)
    try:
        coord = Background(lambda: pools.receiver.sync(timeout=30, final=True))
        pools.sender.send_pages(array("Q", range(PAGE, size, PAGE)))  # all but page 0
        pools.sender.sync(timeout=30)
        coord.result(30)
        with pytest.raises(RemoteProtocolError,
                           match=r"1 of 1024 pages never arrived, first at offset 0x0$"):
            pools.receiver.check_complete()
    finally:
        pools.close()
        src.close()
        dst.close()


# ----------------------------------------------------------------- the C scan


def missing(bits: array[int], npages: int, page_size: int = PAGE,
            limit: int = 4) -> tuple[int, list[int]]:
    out: Any = ffi.new("uint64_t[]", max(limit, 1))
    with ffi.from_buffer("uint64_t[]", bits) as bm:
        count = int(lib.zc_bitmap_missing(bm, npages, page_size, out, limit))
    return count, [int(out[i]) for i in range(min(count, limit))]


def test_the_scan_counts_clear_bits_and_ignores_the_tail_past_the_last_page() -> None:
    assert missing(array("Q", [0]), 1) == (1, [0])
    assert missing(array("Q", [1]), 1) == (0, [])
    assert missing(array("Q", [0, 0]), 70) == (70, [0, PAGE, 2 * PAGE, 3 * PAGE])
    assert missing(array("Q", [2**64 - 1, 0b111111]), 70) == (0, [])
    assert missing(array("Q", [2**64 - 1, 0b101111]), 70) == (1, [68 * PAGE])
    every_other = 0x5555555555555555
    count, first = missing(array("Q", [every_other] * 4), 256, 512, limit=3)
    assert (count, first) == (128, [512, 3 * 512, 5 * 512])


def test_the_scan_names_no_more_than_asked() -> None:
    assert missing(array("Q", [0] * 2), 128, limit=0) == (128, [])
    assert missing(array("Q", [0] * 2), 128, limit=1) == (128, [0])
