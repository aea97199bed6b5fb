"""How the pools fail: a killed socket, a protocol error, a peer that leaves early or never
syncs. Every failure stops the whole pool quickly, joins every thread, and names the channel.
"""

from __future__ import annotations

import mmap
import socket
import threading
import time
from array import array
from collections.abc import Iterator

import pytest

from tests.conftest import tcp_pair
from tests.packet_factory import ChannelStream, PacketFactory
from tests.sequencer import HookSchedule, Sequencer
from tests.test_sender_receiver import Background, make_pools, pool_threads
from tests.thread_wait import Timeline, wait_until_blocked
from zcmigrate.channel.zcsocket import Channel
from zcmigrate.multifd.exiting import Exiting, MultifdError
from zcmigrate.multifd.receiver import ReceiverPool, accept_data_channel
from zcmigrate.multifd.sender import SenderPool
from zcmigrate.multifd.wire import InitTracker, RemoteProtocolError, WireContext

PAGE = 4096
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _no_pool_thread_survives() -> Iterator[None]:
    yield
    assert pool_threads() == []


def context(channels: int, size: int = 1 * MiB, pages_alloc: int = 64) -> WireContext:
    return WireContext(uuid=bytes(range(16)), channels=channels, page_size=PAGE,
                       image_size=size, pages_alloc=pages_alloc)


class RawSources:
    """N data channels whose source side the test writes by hand (PacketFactory bytes)."""

    def __init__(self, ctx: WireContext, dst: mmap.mmap | int, *,
                 known_zero: bool = True) -> None:
        self.ctx = ctx
        self.factory = PacketFactory(ctx)
        # Each channel's packets numbered and counted as a correct source does.
        self.streams = [ChannelStream(self.factory, i) for i in range(ctx.channels)]
        pairs = [tcp_pair(zero_copy=False) for _ in range(ctx.channels)]
        self.tx = [p[0] for p in pairs]
        tracker = InitTracker(ctx)
        rx: list[Channel | None] = [None] * ctx.channels
        for i, (tx, r) in enumerate(pairs):
            tx.write_all(self.streams[i].init())
            rx[accept_data_channel(r, tracker, timeout=5)] = r
        self.rx = [c for c in rx if c is not None]
        self.pool = ReceiverPool(self.rx, ctx, dst, known_zero=known_zero)
        self.pool.start()

    def close(self) -> None:
        self.pool.close()
        for tx in self.tx:
            tx.close()


@pytest.fixture
def dst() -> Iterator[mmap.mmap]:
    mm = mmap.mmap(-1, 1 * MiB)
    yield mm
    mm.close()


def pool_ends_within(pool: ReceiverPool | SenderPool, seconds: float) -> None:
    assert pool.exiting.wait(seconds), f"pool still not exiting after {seconds} s"


# ----------------------------------------------------------------- a killed socket


@pytest.mark.parametrize("zero_copy", [False, True], ids=["copy", "zerocopy"])
@pytest.mark.parametrize("shared", [True, False], ids=["one-exiting", "two-exitings"])
def test_a_receiver_socket_killed_mid_transfer_stops_both_pools_quickly(
    zero_copy: bool, shared: bool
) -> None:
    """With one Exiting for both pools (one process), the first error is channel 1's by
    causality: channel 0 breaks only once Exiting shuts it down. With two (two hosts), each
    side's first error may be the other side's shutdown reaching it: any channel, named."""
    size = 256 * MiB
    ctx = context(2, size, pages_alloc=256)
    src = mmap.mmap(-1, size)
    for off in range(0, size, 16 * MiB):
        src[off:off + 16 * MiB] = bytes([off // MiB % 251 + 1]) * (16 * MiB)
    dst_big = mmap.mmap(-1, size)
    killed_at: list[float] = []
    holder: list[Channel] = []
    timeline = Timeline()

    def kill() -> None:
        # From the test, under the pool's feet: the worker finds out from the socket alone.
        timeline.mark("channel 1 killed")
        killed_at.append(time.monotonic())
        holder[0].socket.shutdown(socket.SHUT_RDWR)

    # Kill channel 1 once 8 of its packets (8 MiB) are in place: the transfer is running.
    hook = HookSchedule(Sequencer(), {}, actions={("recv_packet", 1, 8): kill})
    pools = make_pools(ctx, src, dst_big, zero_copy=zero_copy, receiver_hook=hook,
                       receiver_exiting="sender" if shared else None)
    holder.append(pools.rx[1])

    def coordinate() -> int:
        try:
            return pools.receiver.sync(timeout=30)
        finally:
            timeline.mark("receiver sync returned")

    coord = Background(coordinate)
    send_error: BaseException | None = None
    try:
        offsets = array("Q", range(0, size, PAGE))
        for _ in range(32):  # 8 GiB at most: far more than can go before the kill
            pools.sender.send_pages(offsets)
    except MultifdError as e:
        send_error = e
    timeline.mark("send_pages failed")
    coord_error = coord.exception(5)
    pools.close()
    stopped = time.monotonic()
    try:
        assert killed_at, "the transfer ended before channel 1 was killed"
        # Both sides failed, and because of the kill: after it, not on their own.
        timeline.assert_order("channel 1 killed", "send_pages failed")
        timeline.assert_order("channel 1 killed", "receiver sync returned")
        # How fast is the behaviour too (every failure stops the whole pool quickly): the
        # pools' waits look at Exiting every 0.1 to 0.5 s, so they stop well within a
        # second on an idle machine; 5 s leaves room for a loaded one.
        assert stopped - killed_at[0] < 5.0, f"pools took {stopped - killed_at[0]:.2f} s to stop"
        assert pool_threads() == []
        assert send_error is not None and send_error is pools.sender.error
        assert coord_error is not None and coord_error is pools.receiver.error
        for err in (pools.sender.error, pools.receiver.error):
            assert err.channel_id is not None
            assert f"channel {err.channel_id}: " in str(err)
            if shared:
                assert err.channel_id == 1
    finally:
        src.close()
        dst_big.close()


def test_a_sender_whose_peer_is_gone_fails_naming_the_channel() -> None:
    size = 64 * MiB
    ctx = context(2, size, pages_alloc=256)
    src = mmap.mmap(-1, size)
    src[:] = b"\x11" * size
    pairs = [tcp_pair(zero_copy=False) for _ in range(2)]
    release = threading.Event()
    timeline = Timeline()

    def hold_channel_1(point: str, channel_id: int) -> None:
        if point == "send_packet" and channel_id == 1:
            assert release.wait(10)

    pool = SenderPool([p[0] for p in pairs], ctx, src, zero_copy=False, hook=hold_channel_1)
    pairs[1][1].close()  # channel 1's destination is gone; channel 0's just never reads
    pool.start()

    def send_all() -> None:
        try:
            pool.send_pages(array("Q", range(0, size, PAGE)))
            pool.sync(timeout=10)
        finally:
            timeline.mark("send_pages failed")

    sending = Background(send_all)
    # Channel 1 is held before its first packet until channel 0 really is blocked in a
    # write to a peer that does not read: then only Exiting can wake it.
    worker_0 = next(t for t in threading.enumerate() if t.name == "multifd-send-0")
    wait_until_blocked(worker_0, inside="Channel.writev", syscalls={"sendmsg"})
    timeline.mark("channel 1 goes on")
    release.set()
    err = sending.exception(10)
    timeline.assert_order("channel 1 goes on", "send_pages failed")
    pool.close()  # joins channel 0's worker: Exiting woke it (else the fixture fails)
    pairs[0][1].close()
    src.close()
    assert isinstance(err, MultifdError) and err is pool.error
    assert err.channel_id == 1 and "send channel 1" in str(err)


# ----------------------------------------------------------------- protocol errors


def test_bad_magic_stops_the_receiver_pool_naming_channel_and_field(dst: mmap.mmap) -> None:
    raw = RawSources(context(2), dst)
    try:
        coord = Background(lambda: raw.pool.sync(timeout=10))
        # The failure must wake a sync() already waiting, not one that starts after it.
        wait_until_blocked(coord.thread, inside="ReceiverPool.sync", syscalls={"futex"})
        raw.tx[0].write_all(raw.streams[0].sync())
        raw.tx[1].write_all(raw.factory.build_header(magic=0xDEADBEEF))
        err = coord.exception(10)
        assert isinstance(err, MultifdError) and err is raw.pool.error
        assert err.channel_id == 1 and isinstance(err.cause, RemoteProtocolError)
        assert "receive channel 1" in str(err)
        assert "bad magic 0xdeadbeef, expected 0x11223344" in str(err)
        pool_ends_within(raw.pool, 1)
    finally:
        raw.close()


def test_an_offset_outside_the_image_is_refused_before_any_write(dst: mmap.mmap) -> None:
    raw = RawSources(context(1), dst)
    try:
        outside = raw.ctx.image_size
        raw.tx[0].write_all(raw.streams[0].data(normal=[0, outside]))
        pool_ends_within(raw.pool, 5)
        err = raw.pool.error
        assert err is not None and err.channel_id == 0
        assert "normal offset [1]" in str(err) and "outside the image" in str(err)
        assert dst[:PAGE] == bytes(PAGE)  # the packet's first, valid page was not written
        with pytest.raises(MultifdError, match="receive channel 0"):
            raw.pool.sync(timeout=1)
    finally:
        raw.close()


def test_eof_inside_a_packet_is_an_error(dst: mmap.mmap) -> None:
    raw = RawSources(context(1), dst)
    try:
        packet = raw.streams[0].data(normal=[0, PAGE])
        raw.tx[0].write_all(packet[:-PAGE // 2])
        raw.tx[0].close()
        pool_ends_within(raw.pool, 5)
        err = raw.pool.error
        assert err is not None and err.channel_id == 0
        assert "peer closed the connection" in str(err)
    finally:
        raw.close()


def test_eof_after_data_without_a_sync_fails_at_once(dst: mmap.mmap) -> None:
    raw = RawSources(context(1), dst)
    try:
        raw.tx[0].write_all(raw.streams[0].data(normal=[0]))
        raw.tx[0].close()
        pool_ends_within(raw.pool, 5)  # no sync() needed to notice
        err = raw.pool.error
        assert err is not None and err.channel_id == 0
        assert "without a SYNC" in str(err)
        assert dst[:PAGE] == raw.factory.page_data(1)  # what did arrive is in place
    finally:
        raw.close()


# ----------------------------------------------------------------- peers that leave or stall


def test_sync_fails_clearly_when_the_peer_closed_early(dst: mmap.mmap) -> None:
    raw = RawSources(context(2), dst)
    try:
        raw.tx[0].write_all(raw.streams[0].sync())
        raw.tx[1].close()  # right after its init record: a boundary, so no error yet
        with pytest.raises(MultifdError) as info:
            raw.pool.sync(timeout=10)
        # Ended by the close, not by the 10 s timeout: the message says which.
        assert info.value.channel_id == 1
        assert "receive channel 1: the peer closed the channel before sync 1" in str(info.value)
        assert info.value is raw.pool.error  # and the pool is failed for good
    finally:
        raw.close()


def test_a_clean_close_after_the_last_sync_is_not_an_error(dst: mmap.mmap) -> None:
    raw = RawSources(context(2), dst)
    try:
        for tx, stream in zip(raw.tx, raw.streams, strict=True):
            tx.write_all(stream.data(normal=[0, PAGE]))
            tx.write_all(stream.sync())
        assert raw.pool.sync(timeout=10) == 1
        for tx in raw.tx:
            tx.close()
        # Both workers end quietly; only a further sync() would find them gone.
        for t in [t for t in threading.enumerate() if t.name.startswith("multifd-recv-")]:
            t.join(5)
            assert not t.is_alive(), f"{t.name} did not end when its peer closed"
        assert raw.pool.error is None and not raw.pool.exiting.is_set()
        assert raw.pool.statistics().normal_pages == 4
    finally:
        raw.close()


def test_receiver_sync_times_out_and_fails_the_pool(dst: mmap.mmap) -> None:
    raw = RawSources(context(2), dst)
    try:
        raw.tx[1].write_all(raw.streams[1].sync())
        t0 = time.monotonic()
        with pytest.raises(MultifdError, match=r"receive channel 0: no SYNC packet for sync 1 "
                                               r"within 0\.2 s") as info:
            raw.pool.sync(timeout=0.2)
        # The deadline is the behaviour: not before it (a bound load cannot break), and not
        # long after it: 5 s is far past 0.2 s plus one wait slice even on a loaded machine.
        assert 0.2 <= time.monotonic() - t0 < 5.0
        assert info.value.channel_id == 0
        pool_ends_within(raw.pool, 1)
    finally:
        raw.close()


def test_exiting_set_elsewhere_wakes_a_blocked_send_pages() -> None:
    size = 64 * MiB
    ctx = context(2, size, pages_alloc=256)
    src = mmap.mmap(-1, size)
    src[:] = b"\x22" * size
    pairs = [tcp_pair(zero_copy=False) for _ in range(2)]  # nobody reads the far ends
    exiting = Exiting()
    pool = SenderPool([p[0] for p in pairs], ctx, src, zero_copy=False, queue_depth=1,
                      exiting=exiting)
    pool.start()
    timeline = Timeline()

    def send_all() -> None:
        try:
            pool.send_pages(array("Q", range(0, size, PAGE)))
        finally:
            timeline.mark("send_pages returned")

    sending = Background(send_all)
    # Until send_pages is asleep on full queues (the workers are stuck in their writes).
    wait_until_blocked(sending.thread, inside="SenderPool._dispatch", syscalls={"futex"})
    assert pool.statistics().send_waits > 0
    cause = RuntimeError("main channel lost")
    timeline.mark("exiting set")
    exiting.set(cause, where="migration thread")
    err = sending.exception(5)
    timeline.assert_order("exiting set", "send_pages returned")
    pool.close()
    for _, rx in pairs:
        rx.close()
    src.close()
    assert isinstance(err, MultifdError) and err is pool.error
    assert err.cause is cause and err.channel_id is None
    assert "main channel lost" in str(err) and "migration thread" in str(err)


def test_a_pool_over_an_already_exiting_flag_refuses_work() -> None:
    ctx = context(1)
    src = mmap.mmap(-1, ctx.image_size)
    tx, rx = tcp_pair(zero_copy=False)
    exiting = Exiting()
    exiting.set(MultifdError("earlier failure"))
    pool = SenderPool([tx], ctx, src, zero_copy=False, exiting=exiting)
    assert tx.is_shut_down  # registered after set: shut down at once
    pool.start()
    with pytest.raises(MultifdError, match="earlier failure"):
        pool.send_pages(array("Q", [0]))
    pool.close()
    rx.close()
    src.close()


def test_send_pages_refuses_offsets_outside_the_image() -> None:
    ctx = context(1)
    src = mmap.mmap(-1, ctx.image_size)
    tx, rx = tcp_pair(zero_copy=False)
    pool = SenderPool([tx], ctx, src, zero_copy=False)
    pool.start()
    try:
        with pytest.raises(Exception, match="outside the image"):
            pool.send_pages(array("Q", [0, ctx.image_size]))
        with pytest.raises(TypeError):
            pool.send_pages([0])  # type: ignore[arg-type]
        assert pool.error is None  # a caller's mistake does not fail the pool
    finally:
        pool.close()
        rx.close()
        src.close()


# ----------------------------------------------------------------- accepting data channels


def test_accept_data_channel_times_out_without_an_init_record() -> None:
    tx, rx = tcp_pair(zero_copy=False)
    t0 = time.monotonic()
    with pytest.raises(MultifdError, match=r"no init record within 0\.2 s"):
        accept_data_channel(rx, InitTracker(context(1)), timeout=0.2)
    # The deadline is the behaviour: not before it, and not long after it (5 s is far
    # past 0.2 s even on a loaded machine).
    assert 0.2 <= time.monotonic() - t0 < 5.0
    tx.close()
    rx.close()


def test_accept_data_channel_refuses_a_bad_init_record() -> None:
    ctx = context(2)
    factory = PacketFactory(ctx)
    tracker = InitTracker(ctx)
    tx, rx = tcp_pair(zero_copy=False)
    tx2, rx2 = tcp_pair(zero_copy=False)
    try:
        tx.write_all(factory.build_init(channel_id=1))
        assert accept_data_channel(rx, tracker, timeout=5) == 1
        tx2.write_all(factory.build_init(channel_id=1))
        with pytest.raises(RemoteProtocolError, match="channel id 1 seen twice"):
            accept_data_channel(rx2, tracker, timeout=5)
    finally:
        for ch in (tx, rx, tx2, rx2):
            ch.close()


def test_accept_data_channel_reports_a_peer_that_closed_first() -> None:
    tx, rx = tcp_pair(zero_copy=False)
    tx.write_all(b"\x11\x22")  # part of a record, then gone
    tx.close()
    with pytest.raises(MultifdError, match="closed"):
        accept_data_channel(rx, InitTracker(context(1)), timeout=5)
    rx.close()
