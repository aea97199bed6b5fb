"""channel/sendpool.py: send buffers reused only after their zero-copy completions.

A fake channel makes completions come when the test says; real loopback TCP with
MSG_ZEROCOPY shows the rule holds against the kernel, and that the poison test below
catches a pool that releases a buffer early.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tcp_pair
from zcmigrate.channel.aead import TAG_LEN, Direction, SessionKeys
from zcmigrate.channel.errors import ChannelClosed, ChannelError, SendBufferTimeout
from zcmigrate.channel.sendpool import BufferState, SendBuffer, SendPool
from zcmigrate.channel.zcsocket import Channel
from zcmigrate.native import ffi

PAGE = mmap.PAGESIZE


class FakeChannel:
    """Counts zero-copy calls like Channel and completes them only when told."""

    name = "fake"

    def __init__(self, *, zero_copy: bool = True, calls_per_send: int = 1) -> None:
        self.supports_zero_copy = zero_copy
        self.calls_per_send = calls_per_send
        self.calls = 0
        self.done: set[int] = set()
        self.sent: list[bytes] = []
        self.fail_next = False
        self._cond = threading.Condition()

    def writev(self, buffers: Iterable[Any], *, header: Any = None,
               zero_copy: bool = False) -> int:
        data = (bytes(header) if header else b"") + b"".join(bytes(b) for b in buffers)
        self.sent.append(data)
        if zero_copy:
            self.calls += self.calls_per_send
        if self.fail_next:
            self.fail_next = False
            raise ChannelError("fake: send failed after its calls")
        return len(data)

    def zero_copy_calls(self) -> int:
        return self.calls

    def zero_copy_completed(self, first: int, end: int, timeout: float = 0.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: set(range(first, end)) <= self.done, timeout)

    def complete(self, *calls: int) -> None:
        with self._cond:
            self.done.update(calls)
            self._cond.notify_all()


def test_buffers_are_page_aligned_whole_pages_and_distinct() -> None:
    pool = SendPool(FakeChannel(), 3, 10_000)
    try:
        bufs = [pool.acquire(0) for _ in range(3)]
        assert pool.buffer_size == -(-10_000 // PAGE) * PAGE
        assert all(b.address % PAGE == 0 and b.size == pool.buffer_size for b in bufs)
        assert len({b.address for b in bufs}) == 3
        for b in bufs:
            pool.release(b)
    finally:
        pool.close()


HUGE = 2 << 20


def _thp_mode() -> str:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or ""."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else ""


def _mapping_of(address: int) -> dict[str, int]:
    """The kB fields of the /proc/self/smaps entry holding `address`."""
    entry: dict[str, int] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):  # "lo-hi perms offset dev inode path": a new entry
            if entry is not None:
                break
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                entry = {}
        elif entry is not None and fields[-1] == "kB":
            entry[fields[0].rstrip(":")] = int(fields[1])
    return entry or {}


def test_a_packet_sized_buffer_starts_on_a_huge_page_and_is_backed_by_one() -> None:
    # A sealed packet's 2 MiB of ciphertext in one huge page: one folio pinned per
    # zero-copy send instead of 512 pages (docs/performance.md).
    mode = _thp_mode()
    if mode not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are {mode or 'absent'} in this kernel")
    size = HUGE + 2 * PAGE
    buf = SendBuffer(0, size)
    try:
        assert buf.address % HUGE == 0
        assert len(buf.view) == size and len(buf.cdata) == size
        buf.view[:] = b"\x5a" * size  # every byte of it is ours to write
        assert ffi.buffer(buf.cdata, size)[size - 1] == b"\x5a"
        assert _mapping_of(buf.address).get("AnonHugePages", 0) >= HUGE // 1024
    finally:
        buf.unmap()


def test_a_sent_buffer_comes_back_only_once_every_call_carrying_it_completed() -> None:
    ch = FakeChannel(calls_per_send=2)  # e.g. an in-flight cap split the send in two
    pool = SendPool(ch, 1, PAGE)
    try:
        buf = pool.acquire(0)
        buf.view[:5] = b"hello"
        assert pool.send(buf, 5, header=b"H") == 6
        assert ch.sent == [b"Hhello"]
        assert buf.state is BufferState.IN_FLIGHT and buf.calls == (0, 2)
        with pytest.raises(SendBufferTimeout):
            pool.acquire(0.05)
        ch.complete(1)  # the later call first: still not free
        with pytest.raises(SendBufferTimeout):
            pool.acquire(0.05)
        ch.complete(0)
        assert pool.acquire(0) is buf
    finally:
        pool.close()


def test_a_later_buffer_completing_first_is_handed_out_first() -> None:
    ch = FakeChannel()
    pool = SendPool(ch, 2, PAGE)
    try:
        a, b = pool.acquire(0), pool.acquire(0)
        pool.send(a, PAGE)
        pool.send(b, PAGE)
        ch.complete(1)
        assert pool.acquire(1) is b
    finally:
        pool.close()


def test_acquire_waits_for_a_completion_that_comes_later() -> None:
    ch = FakeChannel()
    pool = SendPool(ch, 1, PAGE)
    try:
        pool.send(pool.acquire(0), PAGE)
        timer = threading.Timer(0.2, ch.complete, args=(0,))
        timer.start()
        t0 = time.monotonic()
        pool.acquire(5)
        assert 0.15 < time.monotonic() - t0 < 2
        st = pool.statistics()
        assert st.acquire_waits == 1 and st.acquire_wait_seconds > 0.15
    finally:
        pool.close()


def test_acquire_gives_up_at_its_deadline() -> None:
    ch = FakeChannel()
    pool = SendPool(ch, 2, PAGE)
    try:
        pool.send(pool.acquire(0), PAGE)
        pool.send(pool.acquire(0), PAGE)
        t0 = time.monotonic()
        with pytest.raises(SendBufferTimeout, match=r"no buffer of 2 came free within 0\.3 s"):
            pool.acquire(0.3)
        assert 0.25 < time.monotonic() - t0 < 1.5
    finally:
        pool.close()


def test_shutdown_wakes_a_blocked_acquire() -> None:
    ch = FakeChannel()
    pool = SendPool(ch, 1, PAGE)
    pool.send(pool.acquire(0), PAGE)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            pool.acquire(None)
        except BaseException as e:  # handed to the test thread
            errors.append(e)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    pool.shutdown()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 1
    assert len(errors) == 1 and isinstance(errors[0], ChannelClosed)
    pool.close()


def test_without_zero_copy_a_buffer_is_free_as_soon_as_writev_returns() -> None:
    ch = FakeChannel(zero_copy=False)
    pool = SendPool(ch, 1, PAGE)
    try:
        buf = pool.acquire(0)
        pool.send(buf, 10)
        assert buf.calls == (0, 0)
        assert pool.acquire(0) is buf
    finally:
        pool.close()


def test_a_send_that_failed_half_way_keeps_its_buffer_until_its_calls_complete() -> None:
    ch = FakeChannel()
    pool = SendPool(ch, 1, PAGE)
    try:
        buf = pool.acquire(0)
        ch.fail_next = True
        with pytest.raises(ChannelError, match="send failed"):
            pool.send(buf, PAGE)
        assert buf.state is BufferState.IN_FLIGHT
        with pytest.raises(SendBufferTimeout):
            pool.acquire(0.05)
        ch.complete(0)
        assert pool.acquire(0) is buf
    finally:
        pool.close()


def test_misuse_is_refused() -> None:
    ch = FakeChannel()
    pool = SendPool(ch, 2, PAGE)
    other = SendPool(ch, 1, PAGE)
    try:
        buf = pool.acquire(0)
        pool.send(buf, PAGE)
        with pytest.raises(ValueError, match="it is in flight"):
            pool.send(buf, PAGE)
        with pytest.raises(ValueError, match="it is in flight"):
            pool.release(buf)
        held = pool.acquire(0)
        with pytest.raises(ValueError, match="bytes from a send buffer of"):
            pool.send(held, PAGE + 1)
        with pytest.raises(ValueError, match="another pool"):
            other.release(held)
        # Everything held or in flight: acquire waits for the one in flight...
        with pytest.raises(SendBufferTimeout):
            pool.acquire(0.05)
        pool.release(held)
        assert pool.acquire(0) is held
    finally:
        pool.close()
        other.close()


def test_a_caller_holding_every_buffer_gets_an_error_not_a_hang() -> None:
    pool = SendPool(FakeChannel(), 1, PAGE)
    try:
        pool.acquire(0)
        with pytest.raises(ChannelError, match="held and none is in flight"):
            pool.acquire(None)
    finally:
        pool.close()


def test_poison_covers_a_buffer_when_it_returns() -> None:
    ch = FakeChannel()
    pool = SendPool(ch, 1, PAGE, poison=b"\xde\xad")
    try:
        buf = pool.acquire(0)
        buf.view[:] = bytes(PAGE)
        pool.send(buf, PAGE)
        assert buf.view[:2] == b"\0\0"  # in flight: untouched
        ch.complete(0)
        assert pool.acquire(0) is buf
        assert bytes(buf.view) == b"\xde\xad" * (PAGE // 2)
        st = pool.statistics()
        assert (st.buffers, st.held, st.free, st.in_flight, st.sends) == (1, 1, 0, 0, 1)
    finally:
        pool.close()


# ---------------------------------------------- the buffer rule against the kernel

POISON = b"\xdePOISON"
SEND = 256 << 10


class EarlyReleasePool(SendPool):
    """A broken pool: it takes a buffer back as soon as writev returns, as if the kernel
    were done with it (what the seed warns against)."""

    def _completed(self, buf: SendBuffer) -> bool:
        return True


@dataclass
class Received:
    sends: int
    wrong: int  # sends whose bytes were not what the sender wrote for them
    poisoned: int  # of which carried the poison pattern
    copied_completions: int


def _content(seq: int) -> bytes:
    return struct.pack(">Q", seq) * (SEND // 8)


def _stream_through_pool(pool_class: type[SendPool], *, sends: int = 48, buffers: int = 4,
                         receiver_delay: float = 0.3) -> Received:
    """Send `sends` buffers of distinct content through a poisoned pool over loopback TCP
    with MSG_ZEROCOPY while the receiver starts late (so sent bytes wait in the socket
    queues, still the pool's pages), and check every byte that arrives."""
    tx, rx = tcp_pair(zero_copy=True)
    assert tx.supports_zero_copy
    pool = pool_class(tx, buffers, SEND, poison=POISON)
    result = Received(sends, 0, 0, 0)

    def receive() -> None:
        time.sleep(receiver_delay)
        chunk = bytearray(SEND)
        for seq in range(sends):
            rx.readv_into([chunk])
            if chunk != _content(seq):
                result.wrong += 1
                result.poisoned += POISON in chunk

    t = threading.Thread(target=receive)
    t.start()
    try:
        for seq in range(sends):
            buf = pool.acquire(30)
            buf.view[:] = _content(seq)
            pool.send(buf, SEND)
        tx.flush(timeout=30)
        t.join(30)
        assert not t.is_alive()
        result.copied_completions = tx.statistics().zero_copy_copied
    finally:
        pool.close()
        tx.close()
        rx.close()
    return result


def test_the_receiver_never_sees_a_buffer_overwritten_after_its_release() -> None:
    got = _stream_through_pool(SendPool)
    assert (got.wrong, got.poisoned) == (0, 0)
    # Loopback copies every zero-copy send (seed 004, "Loopback"), but later: the
    # completions still came asynchronously, through the error queue.
    assert got.copied_completions > 0


def test_the_poison_test_catches_a_pool_that_releases_early() -> None:
    """The same test against a pool that breaks the rule must fail: the poison written
    over a released buffer reaches the receiver, because the kernel had not read it yet."""
    got = _stream_through_pool(EarlyReleasePool)
    assert got.wrong > 0 and got.poisoned > 0, got


# --------------------------------------------------- sealed pages from the pool


def test_pages_sealed_into_pool_buffers_cross_a_zero_copy_channel_and_open() -> None:
    """The blocks compose: gather-and-seal from an image into a pool buffer (ciphertext,
    then tag), send it with a plain header naming the counter, open it in place."""
    keys = SessionKeys(os.urandom(32), os.urandom(32), os.urandom(32), os.urandom(16))
    sealer = keys.sealer(Direction.SOURCE_TO_DESTINATION, 0)
    opener = keys.opener(Direction.SOURCE_TO_DESTINATION, 0)
    image = mmap.mmap(-1, 256 * PAGE)
    image[:] = os.urandom(len(image))
    image_c = ffi.from_buffer("uint8_t[]", image)
    base = int(ffi.cast("uintptr_t", image_c))
    packets = [array("Q", [((p * 37 + i * 5) % 256) * PAGE for i in range(64)])
               for p in range(24)]
    nbytes = 64 * PAGE
    tx, rx = tcp_pair(zero_copy=True)
    pool = SendPool(tx, 3, nbytes + TAG_LEN)
    failures: list[str] = []

    def receive(ch: Channel) -> None:
        buf = bytearray(nbytes + TAG_LEN)
        view = memoryview(buf)
        for offsets in packets:
            (counter,) = struct.unpack(">Q", ch.read_exact(8, timeout=30))
            ch.readv_into([view])
            opener.open_into(counter, view[:nbytes], view[:nbytes], view[nbytes:],
                             aad=struct.pack(">Q", counter))
            if buf[:nbytes] != b"".join(image[o:o + PAGE] for o in offsets):
                failures.append(f"packet {counter}")
        view.release()

    t = threading.Thread(target=receive, args=(rx,))
    t.start()
    try:
        for offsets in packets:
            buf = pool.acquire(30)
            header = struct.pack(">Q", sealer.next_counter)
            sealer.seal_gather(base, len(image), offsets, len(offsets), PAGE,
                               buf.view[:nbytes], buf.view[nbytes:nbytes + TAG_LEN],
                               aad=header)
            pool.send(buf, nbytes + TAG_LEN, header=header)
        tx.flush(timeout=30)
        t.join(30)
        assert not t.is_alive() and failures == []
        assert opener.expected_counter == len(packets)
    finally:
        pool.close()
        tx.close()
        rx.close()
        ffi.release(image_c)
        image.close()
