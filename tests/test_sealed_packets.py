"""Sealed data packets (docs/protocol.md, "Sealed packets") through the real pools over
loopback TCP: images arrive identical through both receiver paths with zero copy on and
off; what travels is ciphertext; a changed, replayed or reordered packet is refused before
a byte of it reaches the image; and the send buffers keep seed 004's rule under zero copy.

The whole-process versions (a keyed `send` and `receive`, a proxy that flips one byte)
are in test_keys.py.
"""

from __future__ import annotations

import mmap
import os
import random
import threading
import time
from array import array
from collections.abc import Iterator

import pytest

from tests.conftest import tcp_pair
from tests.test_sender_receiver import Background, assert_identical, make_pools, pool_threads
from zcmigrate.channel.aead import Direction, Sealer, SessionKeys, StreamId
from zcmigrate.channel.sendpool import SendBuffer, SendPool
from zcmigrate.channel.zcsocket import Channel
from zcmigrate.multifd.exiting import MultifdError
from zcmigrate.multifd.receiver import ReceiverPool, accept_data_channel
from zcmigrate.multifd.sender import SenderPool
from zcmigrate.multifd.wire import (
    HEADER_SIZE,
    TAG_SIZE,
    InitTracker,
    WireContext,
    encode_init,
    encode_packet,
    encode_sync,
)
from zcmigrate.native import ffi

PAGE = 4096
MiB = 1 << 20
UUID = bytes(range(16))
POISON = b"\xa5"


@pytest.fixture(autouse=True)
def _no_pool_thread_survives() -> Iterator[None]:
    yield
    assert pool_threads() == []


def session() -> SessionKeys:
    return SessionKeys(os.urandom(32), os.urandom(32), os.urandom(32), UUID)


def sealed_ctx(size: int, *, channels: int = 2, pages_alloc: int = 128) -> WireContext:
    return WireContext(uuid=UUID, channels=channels, page_size=PAGE, image_size=size,
                       pages_alloc=pages_alloc, sealed=True)


def random_image(size: int, *, zero_every: int = 16) -> mmap.mmap:
    """Random pages, every `zero_every`-th one zero: packets carry both kinds."""
    mm = mmap.mmap(-1, size)
    mm[:] = os.urandom(size)
    for at in range(0, size, zero_every * PAGE):
        mm[at:at + PAGE] = bytes(PAGE)
    return mm


def all_pages_shuffled(size: int, seed: int) -> array[int]:
    offsets = list(range(0, size, PAGE))
    random.Random(seed).shuffle(offsets)
    return array("Q", offsets)


# ----------------------------------------------------------------- end to end


@pytest.mark.parametrize("to_file", [True, False], ids=["pwrite-file", "mapping"])
@pytest.mark.parametrize("zero_copy", [True, False], ids=["zerocopy", "copy"])
def test_a_sealed_image_arrives_identical_over_two_rounds(
        tmp_path: os.PathLike[str], zero_copy: bool, to_file: bool) -> None:
    size = 32 * MiB
    ctx = sealed_ctx(size)
    src = random_image(size)
    keys = session()
    if to_file:
        path = os.path.join(tmp_path, "dst.img")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, size)
        dst: mmap.mmap | int = fd
    else:
        dst = mmap.mmap(-1, size)
    pools = make_pools(ctx, src, dst, zero_copy=zero_copy, keys=keys)
    try:
        for rnd, offsets in enumerate([all_pages_shuffled(size, 1),
                                       all_pages_shuffled(size, 2)[:2000]], start=1):
            if rnd == 2:  # new contents for a subset, sent again
                for off in offsets[:500]:
                    src[off:off + PAGE] = os.urandom(PAGE)
                for off in offsets[500:600]:
                    src[off:off + PAGE] = bytes(PAGE)
            coord = Background(lambda: pools.receiver.sync(timeout=30))
            pools.sender.send_pages(offsets)
            assert pools.sender.sync(timeout=30).sync_num == rnd
            assert coord.result(30) == rnd
        sent, got = pools.sender.statistics(), pools.receiver.statistics()
        for a, b in zip(sent.channels, got.channels, strict=True):
            assert (a.packets, a.normal_pages, a.zero_pages, a.bytes) == (
                b.packets, b.normal_pages, b.zero_pages, b.bytes)
            # Every packet sealed: the clear layout plus two 16-byte tags per data packet
            # (its offsets', its pages') and one per SYNC.
            clear = (HEADER_SIZE * (a.packets + a.syncs) + 8 * (a.normal_pages + a.zero_pages)
                     + PAGE * a.normal_pages)
            assert a.bytes == 64 + clear + TAG_SIZE * (2 * a.packets + a.syncs)
        assert sent.zero_pages > 0
        if zero_copy:
            assert sent.zero_copy_queued > 0
        if to_file:
            with open(path, "rb") as f:
                assert_identical(src, f.read(), size)
        else:
            assert_identical(src, dst, size)
    finally:
        pools.close()
        if isinstance(dst, int):
            os.close(dst)
        else:
            dst.close()
        src.close()


def test_what_travels_is_ciphertext() -> None:
    """A raw reader of a sealed channel finds no page of the image in what it gets."""
    size = 2 * MiB
    ctx = sealed_ctx(size, channels=1)
    src = mmap.mmap(-1, size)
    marker = b"secret page! " * (PAGE // 13) + b"x" * (PAGE % 13)
    for at in range(0, size, PAGE):
        src[at:at + PAGE] = marker[:PAGE - 4] + at.to_bytes(4, "big")
    tx, rx = tcp_pair(zero_copy=False)
    sender = SenderPool([tx], ctx, src, zero_copy=False, keys=session())
    sender.start()
    try:
        sender.send_pages(array("Q", range(0, size, PAGE)))
        got = bytearray()
        while len(got) < size:
            got += rx.read_some(1 << 20)
    finally:
        sender.close(timeout=10)
        rx.close()
    assert b"secret page!" not in got
    src.close()


# ----------------------------------------------- a receiver fed packets by hand


class Feed:
    """One sealed data channel into a real ReceiverPool: the test writes the bytes."""

    def __init__(self, keys: SessionKeys, size: int = 1 * MiB) -> None:
        self.ctx = sealed_ctx(size, channels=1, pages_alloc=16)
        self.keys = keys
        self.image = mmap.mmap(-1, size)
        self.image[:] = os.urandom(size)
        self.base = int(ffi.cast("uintptr_t", ffi.from_buffer(self.image)))
        self.dst = mmap.mmap(-1, size)
        self.tx, rx = tcp_pair(zero_copy=False)
        self.tx.write_all(encode_init(self.ctx, 0))
        assert accept_data_channel(rx, InitTracker(self.ctx), timeout=5) == 0
        self.pool = ReceiverPool([rx], self.ctx, self.dst, known_zero=True, keys=keys)
        self.pool.start()

    def packet(self, sealer: Sealer, seq: int, first_page: int, n: int = 4) -> bytes:
        offsets = [(first_page + i) * PAGE for i in range(n)]
        head = encode_packet(self.ctx, packet_num=seq, seq=seq, normal=offsets)
        header, lead = head[:HEADER_SIZE], head[HEADER_SIZE:]
        out = ffi.new("uint8_t[]", len(lead) + n * PAGE + 2 * TAG_SIZE)
        sealer.seal_packet(self.base, len(self.image), ffi.new("uint64_t[]", offsets), n,
                           PAGE, out, len(out), aad=header, lead=lead)
        return header + bytes(ffi.buffer(out))

    def sync(self, sealer: Sealer, seq: int, packets: int, pages: int) -> bytes:
        s = encode_sync(self.ctx, seq, seq, packets=packets, pages=pages)
        return s + sealer.seal(b"", aad=s)

    def outcome(self, data: bytes) -> MultifdError | None:
        """Send `data`, then wait for the first sync: its error, or None if it passed."""
        self.tx.write_all(data)
        try:
            self.pool.sync(timeout=10)
        except MultifdError as e:
            return e
        return None

    def page_written(self, page: int) -> bool:
        return bytes(self.dst[page * PAGE:(page + 1) * PAGE]) != bytes(PAGE)

    def close(self) -> None:
        self.pool.close()
        self.tx.close()
        self.dst.close()
        self.image.close()


@pytest.fixture
def feed() -> Iterator[Feed]:
    f = Feed(session())
    yield f
    f.close()


def sealer_of(feed: Feed, first_counter: int = 0) -> Sealer:
    """The source's sealer of channel 0, built apart so a test may start it anywhere."""
    stream = StreamId(Direction.SOURCE_TO_DESTINATION, 0)
    return Sealer(feed.keys.key(stream), stream.prefix, first_counter=first_counter,
                  pages_prefix=stream.pages_prefix)


def test_hand_sealed_packets_are_accepted(feed: Feed) -> None:
    """The reference for the refusals below: the same packets, untouched, pass."""
    s = sealer_of(feed)
    assert feed.outcome(feed.packet(s, 1, 0) + feed.packet(s, 2, 4)
                        + feed.sync(s, 3, packets=2, pages=8)) is None
    assert feed.dst[:8 * PAGE] == feed.image[:8 * PAGE]


# Where to change one byte of the first data packet (4 pages, so 32 bytes of offsets, then
# their tag, then the pages and theirs).
TAMPER = [
    pytest.param(24 + 7, id="header-packet_num"),  # no header check reads it
    pytest.param(HEADER_SIZE + 7, id="offsets"),
    pytest.param(HEADER_SIZE + 32 + 5, id="offsets-tag"),
    pytest.param(HEADER_SIZE + 32 + TAG_SIZE + 3 * PAGE + 100, id="page"),
    pytest.param(-1, id="pages-tag"),
]


@pytest.mark.parametrize("at", TAMPER)
def test_a_changed_byte_anywhere_fails_the_channel_and_nothing_reaches_the_image(
        feed: Feed, at: int) -> None:
    s = sealer_of(feed)
    pkt = bytearray(feed.packet(s, 1, 0))
    pkt[at] ^= 0x01
    err = feed.outcome(bytes(pkt) + feed.sync(s, 2, packets=1, pages=4))
    assert err is not None and "did not verify" in str(err), err
    assert feed.dst[:] == bytes(len(feed.dst)), "a byte of a refused packet is in the image"


def test_pages_whose_data_fails_its_tag_are_left_zeroed_not_as_they_decrypted() -> None:
    """Into a mapping a sealed packet's pages are decrypted in place and checked after
    (docs/security.md): when the check fails, what they decrypted to (the attacker's
    doing) must not stay, and neither may what they held before: they hold zeros. Only the
    packet's own pages change; its neighbours keep their data."""
    f = Feed(session())
    try:
        s = sealer_of(f)
        first = f.packet(s, 1, 0, n=8)  # pages 0-7 arrive intact in round 1
        assert f.outcome(first + f.sync(s, 2, packets=1, pages=8)) is None
        assert f.dst[:8 * PAGE] == f.image[:8 * PAGE]
        f.image[:4 * PAGE] = os.urandom(4 * PAGE)  # pages 0-3 change before round 2
        pkt = bytearray(f.packet(s, 3, 0))
        pkt[HEADER_SIZE + 32 + TAG_SIZE + PAGE + 9] ^= 0x40  # a byte of page 1's data
        err = f.outcome(bytes(pkt) + f.sync(s, 4, packets=1, pages=4))
        assert err is not None and "did not verify" in str(err), err
        assert f.dst[:4 * PAGE] == bytes(4 * PAGE), "a refused page was not zeroed"
        assert f.dst[4 * PAGE:8 * PAGE] == f.image[4 * PAGE:8 * PAGE]
    finally:
        f.close()


def test_a_tampered_sync_is_refused(feed: Feed) -> None:
    """A SYNC's counts are authenticated: changing them fails the tag, not the count."""
    s = sealer_of(feed)
    sync = bytearray(feed.sync(s, 2, packets=1, pages=4))
    sync[-1] ^= 0x80
    err = feed.outcome(feed.packet(s, 1, 0) + bytes(sync))
    assert err is not None and "did not verify" in str(err), err


def test_a_replayed_packet_is_refused(feed: Feed) -> None:
    s = sealer_of(feed)
    first = feed.packet(s, 1, 0)
    err = feed.outcome(first + first)
    assert err is not None and "seq" in str(err), err


def test_a_replayed_body_under_a_renumbered_header_is_refused(feed: Feed) -> None:
    """The attacker's next step: packet 1's ciphertext again, behind a header that says
    seq 2 (which the sequence check then takes): its tag binds it to counter 0 and to the
    header it was sealed with."""
    s = sealer_of(feed)
    first = feed.packet(s, 1, 0)
    header = encode_packet(feed.ctx, packet_num=1, seq=2, normal=[i * PAGE for i in range(4)])
    replay = header[:HEADER_SIZE] + first[HEADER_SIZE:]
    err = feed.outcome(first + replay)
    assert err is not None and "did not verify" in str(err), err
    assert feed.page_written(0)  # the genuine first packet was in place: it was checked


def test_reordered_packets_are_refused_before_either_is_written(feed: Feed) -> None:
    s = sealer_of(feed)
    first, second = feed.packet(s, 1, 0), feed.packet(s, 2, 4)
    err = feed.outcome(second + first)
    assert err is not None and "seq" in str(err), err
    assert feed.dst[:] == bytes(len(feed.dst))


def test_a_packet_sealed_under_another_counter_than_its_seq_is_refused(feed: Feed) -> None:
    """The nonce's counter is seq - 1 on both ends: a packet whose header says seq 1 but
    was sealed under counter 1 does not open."""
    err = feed.outcome(feed.packet(sealer_of(feed, first_counter=1), 1, 0))
    assert err is not None and "did not verify" in str(err), err
    assert feed.dst[:] == bytes(len(feed.dst))


def test_a_packet_sealed_for_another_channel_is_refused(feed: Feed) -> None:
    other = StreamId(Direction.SOURCE_TO_DESTINATION, 1)
    s = Sealer(feed.keys.key(other), other.prefix, pages_prefix=other.pages_prefix)
    err = feed.outcome(feed.packet(s, 1, 0))
    assert err is not None and "did not verify" in str(err), err


# ----------------------------------------------------------- the buffer rule


class EarlyReleasePool(SendPool):
    """A broken pool: it takes a buffer back as soon as writev returns, as if the kernel
    had read it already (what seed 004 warns against)."""

    def _completed(self, buf: SendBuffer) -> bool:
        return True


def _poisoned_sealed_migration(monkeypatch: pytest.MonkeyPatch, *,
                               early: bool) -> tuple[BaseException | None, bool, int]:
    """32 MiB sealed over 2 zero-copy channels from send buffers overwritten with 0xA5 as
    they return to their pool, while the destination starts reading late and then reads
    slowly (completions lag: sent ciphertext waits in the socket queues, still the pool's
    pages). Returns (the error, whether the destination equals the source, how often a
    worker had to wait for a completion to get a buffer)."""
    if early:
        monkeypatch.setattr("zcmigrate.multifd.sender.SendPool", EarlyReleasePool)
    size = 32 * MiB
    ctx = sealed_ctx(size, pages_alloc=64)
    src, dst = random_image(size), mmap.mmap(-1, size)
    started = threading.Event()

    def slow_reader(point: str, channel: int) -> None:
        if point == "recv_header":
            if not started.is_set():
                time.sleep(0.3)
                started.set()
            time.sleep(0.0005)

    pools = make_pools(ctx, src, dst, zero_copy=True, keys=session(), send_buffers=2,
                       send_buffer_poison=POISON, receiver_hook=slow_reader,
                       receiver_exiting="sender")
    error: BaseException | None = None
    waits = 0
    try:
        coord = Background(lambda: pools.receiver.sync(timeout=30))
        try:
            pools.sender.send_pages(all_pages_shuffled(size, 3))
            pools.sender.sync(timeout=30)
            coord.result(30)
        except MultifdError as e:
            error = e
            coord.exception(30)
        waits = sum(s.acquire_waits for s in pools.sender.send_buffer_statistics())
        same = src[:] == dst[:]
    finally:
        pools.close()
        src.close()
        dst.close()
    return error, same, waits


def test_send_buffers_are_reused_only_after_their_completion(
        monkeypatch: pytest.MonkeyPatch) -> None:
    error, same, waits = _poisoned_sealed_migration(monkeypatch, early=False)
    assert error is None and same
    assert waits > 0, "no worker ever waited for a completion: the test proved nothing"


def test_the_poison_catches_send_buffers_reused_before_their_completion(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same run with a pool that releases a buffer as soon as writev returns: the
    poison lands on ciphertext the kernel had not sent yet, and the destination refuses
    it (a tag fails) instead of taking wrong pages."""
    error, same, _ = _poisoned_sealed_migration(monkeypatch, early=True)
    assert not same
    assert error is not None and "did not verify" in str(error), error


def test_a_sealed_pool_refuses_to_run_without_keys_and_a_clear_one_with_them() -> None:
    tx, rx = tcp_pair(zero_copy=False)
    try:
        img = mmap.mmap(-1, MiB)
        with pytest.raises(ValueError, match="sealed context needs"):
            SenderPool([tx], sealed_ctx(MiB, channels=1), img, zero_copy=False)
        clear = WireContext(uuid=UUID, channels=1, page_size=PAGE, image_size=MiB,
                            pages_alloc=16)
        with pytest.raises(ValueError, match="sealed context needs"):
            ReceiverPool([rx], clear, img, keys=session())
        img.close()
    finally:
        for ch in (tx, rx):
            Channel.close(ch)
