"""The zero-copy socket channel over real loopback TCP and Unix sockets."""

from __future__ import annotations

import gc
import hashlib
import mmap
import os
import socket
import threading
import time
import weakref
from array import array
from collections.abc import Callable, Sequence

import pytest

from tests.conftest import tcp_pair
from tests.thread_wait import Timeline, wait_until_blocked
from zcmigrate.channel.errors import ChannelClosed, FlushTimeout, ZeroCopyUnsupported
from zcmigrate.channel.errqueue import CompletionLedger
from zcmigrate.channel.iovec import IoVec
from zcmigrate.channel.zcsocket import Channel, Listener, connect
from zcmigrate.native import ffi

MiB = 1 << 20
# shutdown() wakes a waiter at once: the kernel ends a blocked sendmsg or readv on
# SHUT_RDWR, and flush looks at the flag after every 100 ms poll slice. 5 s is far past
# either on a loaded machine, and these calls have no timeout of their own: a waiter that
# shutdown() does not wake would wait for ever.
WAKE_S = 5.0


def _send_image(
    image: mmap.mmap, *, zero_copy: bool, host: str = "127.0.0.1", piece: int = 4 * MiB
) -> tuple[int, bytes, Channel]:
    """Send `image` in writev calls of 16 pieces each; return flush, received digest."""
    tx, rx = tcp_pair(zero_copy=zero_copy, host=host)
    size = len(image)
    digest: list[bytes] = []

    def receive() -> None:
        h = hashlib.sha256()
        buf = bytearray(16 * piece)
        view = memoryview(buf)
        left = size
        while left:
            n = min(left, len(buf))
            rx.readv_into([view[:n]])
            h.update(view[:n])
            left -= n
        digest.append(h.digest())

    t = threading.Thread(target=receive)
    t.start()
    view = memoryview(image)
    for off in range(0, size, 16 * piece):
        bufs = [view[o : o + piece] for o in range(off, min(size, off + 16 * piece), piece)]
        tx.writev(bufs, zero_copy=zero_copy)
        del bufs
    flushed = tx.flush(timeout=30)
    t.join(30)
    del view
    rx.close()
    return flushed, digest[0], tx


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_256_mib_from_an_mmap_arrive_identical_with_zero_copy(
    random_image: mmap.mmap, host: str
) -> None:
    flushed, digest, tx = _send_image(random_image, zero_copy=True, host=host)
    assert digest == hashlib.sha256(random_image).digest()
    st = tx.statistics()
    tx.close()
    assert st.bytes_sent == len(random_image)
    assert st.zero_copy_queued > 0
    assert st.zero_copy_queued == st.zero_copy_completed
    # Loopback always copies (seed 004, "Loopback"): every completion is COPIED.
    assert st.zero_copy_copied == st.zero_copy_completed
    assert flushed == 1
    assert st.in_flight_bytes == 0 and st.flushes == 1 and st.flushes_copied == 1


def test_without_zero_copy_nothing_is_queued_and_flush_returns_0(
    random_image: mmap.mmap,
) -> None:
    flushed, digest, tx = _send_image(random_image, zero_copy=False)
    assert digest == hashlib.sha256(random_image).digest()
    st = tx.statistics()
    tx.close()
    assert st.zero_copy_queued == 0 and st.zero_copy_completed == 0
    assert flushed == 0


def test_header_goes_first_and_normally() -> None:
    tx, rx = tcp_pair(zero_copy=True)
    payload = mmap.mmap(-1, 64 * 1024)
    payload[:] = bytes(range(256)) * 256
    tx.writev([payload], header=b"HDR!", zero_copy=True)
    tx.flush(10)
    got = rx.read_exact(4 + len(payload))
    assert got[:4] == b"HDR!" and got[4:] == payload[:]
    st = tx.statistics()
    # The header went without MSG_ZEROCOPY: one zero-copy call, for the payload.
    assert st.zero_copy_queued == 1
    tx.close()
    rx.close()


def test_flush_with_nothing_queued_returns_0_at_once() -> None:
    tx, rx = tcp_pair(zero_copy=True)
    assert tx.flush(timeout=1) == 0
    tx.write_all(b"x")
    assert tx.flush(timeout=1) == 0
    tx.close()
    rx.close()


def test_second_flush_reports_only_copies_since_the_first() -> None:
    tx, rx = tcp_pair(zero_copy=True)
    data = bytearray(256 * 1024)
    t = threading.Thread(target=lambda: rx.read_exact(len(data)))
    t.start()
    tx.writev([data], zero_copy=True)
    assert tx.flush(10) == 1
    assert tx.flush(10) == 0
    t.join(10)
    assert not t.is_alive(), "the reader never got the 256 KiB"
    tx.close()
    rx.close()


def test_in_flight_cap_bounds_bytes_pinned() -> None:
    tx, rx = tcp_pair(zero_copy=True, in_flight_cap=256 * 1024)
    data = mmap.mmap(-1, 8 * MiB)
    t = threading.Thread(target=lambda: rx.read_exact(len(data)))
    t.start()
    tx.writev([data], zero_copy=True)
    tx.flush(10)
    t.join(10)
    assert not t.is_alive(), "the reader never got the 8 MiB"
    st = tx.statistics()
    assert st.in_flight_peak <= 256 * 1024
    assert st.zero_copy_queued >= 32  # the 8 MiB went as pieces of at most the cap
    tx.close()
    rx.close()


def test_shutdown_wakes_a_thread_blocked_in_a_zero_copy_writev() -> None:
    tx, rx = tcp_pair(zero_copy=True)
    # The receiver never reads: once the socket buffers fill, sendmsg blocks.
    data = mmap.mmap(-1, 64 * MiB)
    errors: list[BaseException] = []
    timeline = Timeline()

    def sender() -> None:
        try:
            tx.writev([data], zero_copy=True)
            tx.flush()
        except BaseException as e:
            errors.append(e)
        timeline.mark("sender returned")

    t = threading.Thread(target=sender, name="test-sender")
    t.start()
    wait_until_blocked(t, inside="Channel.writev", syscalls={"sendmsg"})
    timeline.mark("shutdown")
    tx.shutdown()
    t.join(WAKE_S)
    assert not t.is_alive(), f"shutdown did not wake the sender within {WAKE_S} s"
    timeline.assert_order("shutdown", "sender returned")
    assert isinstance(errors[0], ChannelClosed), errors
    tx.close()
    rx.close()


def _stalled_pair() -> tuple[Channel, socket.socket]:
    """A zero-copy sender whose peer has a tiny receive buffer and never reads.

    A small send then returns at once but stays in the sender's queue, pinned,
    so flush() has something real to wait for.
    """
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by accept()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    csock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    csock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    csock.connect(lsock.getsockname())
    peer, _ = lsock.accept()
    lsock.close()
    return Channel(csock, zero_copy=True), peer


def test_shutdown_wakes_a_thread_blocked_in_flush_waiting_for_completions() -> None:
    tx, peer = _stalled_pair()
    data = mmap.mmap(-1, 128 * 1024)
    tx.writev([data], zero_copy=True)  # returns: it fits the send buffer
    assert tx.statistics().zero_copy_queued >= 1
    errors: list[BaseException] = []
    timeline = Timeline()
    t = threading.Thread(target=lambda: _catch(errors, tx.flush, timeline), name="test-flush")
    t.start()
    # The peer reads nothing: flush waits in poll for completions that cannot come.
    wait_until_blocked(t, inside="Channel.flush", syscalls={"poll", "ppoll"})
    timeline.mark("shutdown")
    tx.shutdown()
    t.join(WAKE_S)
    assert not t.is_alive(), f"shutdown did not wake flush within {WAKE_S} s"
    timeline.assert_order("shutdown", "returned")
    assert isinstance(errors[0], ChannelClosed), errors
    tx.close()
    peer.close()


def test_shutdown_wakes_a_thread_blocked_in_readv_into() -> None:
    tx, rx = tcp_pair(zero_copy=False)
    errors: list[BaseException] = []
    timeline = Timeline()
    t = threading.Thread(target=lambda: _catch(errors, lambda: rx.read_exact(1024), timeline),
                         name="test-reader")
    t.start()
    wait_until_blocked(t, inside="Channel.readv_into", syscalls={"readv"})
    timeline.mark("shutdown")
    rx.shutdown()
    t.join(WAKE_S)
    assert not t.is_alive(), f"shutdown did not wake readv_into within {WAKE_S} s"
    timeline.assert_order("shutdown", "returned")
    assert isinstance(errors[0], ChannelClosed), errors
    tx.close()
    rx.close()


def test_flush_times_out_with_a_clear_error() -> None:
    tx, peer = _stalled_pair()
    data = mmap.mmap(-1, 128 * 1024)
    tx.writev([data], zero_copy=True)
    started = time.monotonic()
    with pytest.raises(FlushTimeout, match="still not completed"):
        tx.flush(timeout=0.3)
    # The deadline is the behaviour: not given up before it (a bound load cannot break),
    # and not long after it: 5 s is far past the 0.3 s deadline plus one 100 ms poll slice
    # even on a loaded machine, and still catches a flush that waits a multiple of it.
    assert 0.25 < time.monotonic() - started < 5.0
    # The peer reads now: the same sends complete and a later flush succeeds.
    peer.setblocking(True)
    got = 0
    while got < len(data):
        got += len(peer.recv(1 << 16))
    assert tx.flush(timeout=5) == 1
    tx.close()
    peer.close()


def test_peer_closing_mid_read_is_reported_with_the_byte_count() -> None:
    tx, rx = tcp_pair(zero_copy=False)
    tx.write_all(b"abc")
    tx.close()
    with pytest.raises(ChannelClosed, match="after 3 of 10 bytes"):
        rx.read_exact(10)
    rx.close()


def test_zero_copy_on_a_unix_socket_fails_with_a_clear_error() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ch = Channel(a, zero_copy=True)
    assert ch.supports_zero_copy is False
    with pytest.raises(ZeroCopyUnsupported, match=r"Unix stream.*multifd-zerocopy off"):
        ch.writev([b"data"], zero_copy=True)
    # The same channel still sends normally: no silent fallback, but no lock-out either.
    ch.writev([b"data"], zero_copy=False)
    assert b.recv(4) == b"data"
    ch.close()
    b.close()


def test_zero_copy_not_asked_for_at_setup_is_refused() -> None:
    tx, rx = tcp_pair(zero_copy=False)
    with pytest.raises(ZeroCopyUnsupported, match="not asked for"):
        tx.writev([b"x"], zero_copy=True)
    tx.close()
    rx.close()


def test_iovec_from_buffers_skips_empty_buffers() -> None:
    iov = IoVec.from_buffers([b"", b"ab", bytearray(0), b"c"])
    assert iov.count == 2 and iov.nbytes == 3


def test_listener_accept_times_out_clearly() -> None:
    with Listener("127.0.0.1", 0) as lst, pytest.raises(Exception, match="no connection"):
        lst.accept(timeout=0.2)


def test_connect_to_a_closed_port_names_the_address() -> None:
    with Listener("127.0.0.1", 0) as lst:
        port = lst.port
    with pytest.raises(Exception, match=f"127.0.0.1:{port}"):
        connect("127.0.0.1", port, timeout=1)


def _catch(errors: list[BaseException], fn: Callable[[], object],
           timeline: Timeline | None = None) -> None:
    try:
        fn()
    except BaseException as e:
        errors.append(e)
    if timeline is not None:
        timeline.mark("returned")


def test_a_writev_names_its_zero_copy_calls_and_learns_when_they_complete() -> None:
    """zero_copy_calls() before and after a writev names the calls that carried its
    buffers; zero_copy_completed() says when the kernel is done with them (a send pool
    may then reuse them, seed 004), waiting up to its timeout."""
    tx, peer = _stalled_pair()
    data = mmap.mmap(-1, 128 * 1024)
    first = tx.zero_copy_calls()
    tx.writev([b"header"], zero_copy=False)
    assert tx.zero_copy_calls() == first  # no zero-copy call, nothing to wait for
    tx.writev([data], header=b"hdr", zero_copy=True)
    end = tx.zero_copy_calls()
    assert end > first
    started = time.monotonic()
    assert tx.zero_copy_completed(first, end, timeout=0.3) is False  # the peer reads nothing
    assert 0.25 < time.monotonic() - started < 1.0
    peer.setblocking(True)
    got = 0
    while got < len(data) + 9:
        got += len(peer.recv(1 << 16))
    assert tx.zero_copy_completed(first, end, timeout=5) is True
    assert tx.zero_copy_completed(first, first) is True
    tx.close()
    peer.close()


def test_shutdown_wakes_a_thread_waiting_for_given_zero_copy_calls() -> None:
    tx, peer = _stalled_pair()
    data = mmap.mmap(-1, 128 * 1024)
    tx.writev([data], zero_copy=True)
    end = tx.zero_copy_calls()
    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: _catch(errors, lambda: tx.zero_copy_completed(
        0, end, timeout=60)))
    t.start()
    time.sleep(0.3)
    assert t.is_alive()
    started = time.monotonic()
    tx.shutdown()
    t.join(1.0)
    assert not t.is_alive() and time.monotonic() - started < 1.0
    assert isinstance(errors[0], ChannelClosed)
    tx.close()
    peer.close()


# ------------------------------------------- what a zero-copy writev holds, and for how long


def _read_all(peer: socket.socket, n: int) -> bytes:
    peer.setblocking(True)
    got = bytearray()
    while len(got) < n:
        got += peer.recv(1 << 16)
    return bytes(got)


def test_a_zero_copy_writev_holds_its_buffers_until_their_calls_complete() -> None:
    """Heap memory handed to a zero-copy writev and dropped by the caller at once stays
    alive while the kernel may still read it: the channel holds it until the completion,
    and lets go of it after."""
    tx, peer = _stalled_pair()
    data = array("B", os.urandom(128 * 1024))
    expected = data.tobytes()
    ref = weakref.ref(data)
    first = tx.zero_copy_calls()
    tx.writev([data], header=b"hdr", zero_copy=True)
    del data
    gc.collect()
    assert not tx.zero_copy_completed(first, tx.zero_copy_calls())  # the peer reads nothing
    assert ref() is not None, "the channel let go of a buffer the kernel still reads"
    assert tx.statistics().held_sends == 1
    assert _read_all(peer, 3 + len(expected)) == b"hdr" + expected
    tx.flush(timeout=10)
    gc.collect()
    assert ref() is None and tx.statistics().held_sends == 0
    tx.close()
    peer.close()


def test_a_held_bytearray_cannot_be_resized_under_the_kernel() -> None:
    tx, peer = _stalled_pair()
    buf = bytearray(64 * 1024)
    tx.writev([buf], zero_copy=True)
    with pytest.raises(BufferError):
        buf.extend(b"more")  # its memory could move while the kernel reads it
    _read_all(peer, 64 * 1024)
    tx.flush(timeout=10)
    buf.extend(b"more")  # completed: it is the caller's again
    tx.close()
    peer.close()


def test_an_iovec_filled_by_c_needs_an_owner_for_zero_copy() -> None:
    tx, rx = tcp_pair(zero_copy=True)
    image = mmap.mmap(-1, 8 * 4096)
    image[:] = os.urandom(len(image))
    image_c = ffi.from_buffer(image)
    iov = IoVec(1)
    iov.entries[0].iov_base = image_c
    iov.entries[0].iov_len = len(image)
    try:
        iov.set_filled(1, len(image))
        with pytest.raises(ValueError, match="no owner"):
            tx.writev(iov, zero_copy=True)
        assert tx.zero_copy_calls() == 0 and tx.statistics().bytes_sent == 0
        tx.writev(iov, zero_copy=False)  # copied in sendmsg: nothing to hold
        iov.set_filled(1, len(image), keep=image_c)
        tx.writev(iov, zero_copy=True)
        assert bytes(rx.read_exact(2 * len(image), timeout=10)) == bytes(image) * 2
        tx.flush(timeout=10)
    finally:
        tx.close()
        rx.close()
        ffi.release(image_c)
        image.close()


def test_closing_with_sends_in_flight_keeps_their_buffers_for_good() -> None:
    """After close() the kernel may still send what was queued, reading our memory, and
    no completion will ever come: the owners are kept, never handed back to the heap."""
    tx, peer = _stalled_pair()
    data = array("B", bytes(64 * 1024))
    ref = weakref.ref(data)
    tx.writev([data], zero_copy=True)
    del data
    tx.close()
    gc.collect()
    assert ref() is not None
    peer.close()


def test_in_flight_bytes_are_counted_per_call_as_the_kernel_took_them() -> None:
    """A writev whose first zero-copy call carries 1024 small iovecs and whose second
    carries one large buffer: the ledger gets each call's own bytes, not an even share."""

    class Recording(CompletionLedger):
        def __init__(self) -> None:
            super().__init__()
            self.batches: list[list[int]] = []

        def queue(self, sizes: Sequence[int]) -> None:
            self.batches.append(list(sizes))
            super().queue(sizes)

    tx, rx = tcp_pair(zero_copy=True)
    ledger = Recording()
    tx._ledger = ledger  # before any send: the kernel's counter is at 0 too
    small = bytearray(os.urandom(16 * 1024))
    big = bytearray(os.urandom(MiB))
    bufs = [memoryview(small)[i * 16:(i + 1) * 16] for i in range(1024)] + [big]
    got = bytearray()
    t = threading.Thread(target=lambda: got.extend(rx.read_exact(len(small) + MiB, timeout=30)))
    t.start()
    try:
        tx.writev(bufs, zero_copy=True)
        tx.flush(timeout=30)
        t.join(30)
        assert bytes(got) == bytes(small) + bytes(big)
        sizes = [n for batch in ledger.batches for n in batch]
        assert sizes[0] == len(small) and sum(sizes) == len(small) + MiB
    finally:
        tx.close()
        rx.close()


def test_a_writev_of_more_calls_than_one_report_holds_accounts_all_of_them() -> None:
    """70 windows of 1024 iovecs: zc_sendv hands back after 64 calls, the channel
    accounts them and goes on; every byte arrives and every call is queued and completed."""
    tx, rx = tcp_pair(zero_copy=True)
    blob = os.urandom(70 * 1024 * 64)
    view = memoryview(blob)
    bufs = [view[i:i + 64] for i in range(0, len(blob), 64)]
    got = bytearray()
    t = threading.Thread(target=lambda: got.extend(rx.read_exact(len(blob), timeout=60)))
    t.start()
    try:
        tx.writev(bufs, zero_copy=True)
        del bufs
        tx.flush(timeout=60)
        t.join(60)
        st = tx.statistics()
        assert bytes(got) == blob
        assert st.zero_copy_queued >= 70 and st.zero_copy_completed == st.zero_copy_queued
        assert st.in_flight_bytes == 0 and st.held_sends == 0
    finally:
        view.release()
        tx.close()
        rx.close()
