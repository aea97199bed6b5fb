"""The zero-copy socket channel: writev with optional MSG_ZEROCOPY, flush, readv, shutdown.

QEMU's QIOChannelSocket is the model (seeds 000, 002, 003): zero copy is a feature
decided when the channel is set up, `flush()` waits for every zero-copy send and says
whether any was copied, ENOBUFS gets one drain-and-retry. It knows bytes, not pages.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from zcmigrate.channel.errors import (
    ENOBUFS_REMEDY,
    AcceptTimeout,
    ChannelClosed,
    ChannelError,
    FlushTimeout,
    ReadTimeout,
    ZeroCopyLimitError,
    ZeroCopyUnsupported,
)
from zcmigrate.channel.errqueue import CompletionError, CompletionLedger
from zcmigrate.channel.iovec import IoVec
from zcmigrate.native import ZC_EOF, ffi, lib

SO_ZEROCOPY = getattr(socket, "SO_ZEROCOPY", 60)
SO_EE_ORIGIN_ZEROCOPY = 5
_DRAIN_BATCH = 64
# Zero-copy calls whose sizes one zc_sendv reports before it hands back for accounting.
_CALL_BATCH = 64
# How long a blocked flush or in-flight wait sleeps in poll before it looks at the
# shutdown flag again: the bound on how late shutdown() wakes it.
_WAIT_SLICE_MS = 100
# Seconds within which a dead peer is found by default (keepalive and user timeout).
DEFAULT_PEER_TIMEOUT = 30.0

# What closed channels' zero-copy sends may still be reading: after close() the kernel goes
# on sending what was queued, reading it from our memory, and no completion will ever say
# when it is done. Their owners stay referenced for the life of the process, so that no
# allocator reuses that memory under the kernel. Only a channel closed with zero-copy sends
# still in flight (a failure: flush() comes before every orderly close) adds to it.
_ORPHANED: list[Any] = []


@dataclass(frozen=True, slots=True)
class ChannelStats:
    """A snapshot of one channel's counters (trio's statistics() style)."""

    bytes_sent: int
    bytes_received: int
    send_calls: int
    zero_copy_queued: int
    zero_copy_completed: int
    zero_copy_copied: int
    flushes: int
    flushes_copied: int
    enobufs_retries: int
    in_flight_bytes: int
    in_flight_peak: int
    in_flight_waits: int
    held_sends: int  # zero-copy writevs whose buffers the channel holds until completion


class Channel:
    """One connected stream socket (TCP or Unix) with zero copy as a set-up feature.

    One thread writes (writev, flush) and one reads (readv_into) at a time; shutdown()
    may come from any thread and wakes both.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        zero_copy: bool = False,
        in_flight_cap: int | None = None,
        name: str = "",
        peer_timeout: float | None = DEFAULT_PEER_TIMEOUT,
    ) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self.name = name or f"fd{self._fd}"
        self._closed = False
        self._shut = threading.Event()
        self._ledger = CompletionLedger()
        self._ledger_lock = threading.Lock()
        self._completions: Any = ffi.new("struct zc_completion[]", _DRAIN_BATCH)
        self._send_result: Any = ffi.new("struct zc_send_result *")
        self._call_bytes: Any = ffi.new("uint64_t[]", _CALL_BATCH)
        # (first call, end call, owners) of every zero-copy writev not yet completed: the
        # references that keep its buffers' memory alive until the kernel is done with it.
        self._held: deque[tuple[int, int, tuple[Any, ...]]] = deque()
        self._nread: Any = ffi.new("uint64_t *")
        self._bytes_sent = 0
        self._bytes_received = 0
        self._send_calls = 0
        self._flushes = 0
        self._flushes_copied = 0
        self._enobufs_retries = 0
        self._in_flight_peak = 0
        self._in_flight_waits = 0
        if in_flight_cap is not None and in_flight_cap <= 0:
            raise ValueError("in_flight_cap must be a positive number of bytes")
        self.in_flight_cap = in_flight_cap
        self.supports_zero_copy = False
        self.zero_copy_refusal = "zero copy was not asked for when the channel was set up"
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            with contextlib.suppress(OSError):
                # Headers and sync packets are small: send them at once (QEMU does too).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if peer_timeout is not None:
                set_peer_timeout(sock, peer_timeout)
        if zero_copy:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
            except OSError as e:
                self.zero_copy_refusal = (
                    f"the kernel refused SO_ZEROCOPY on this {_describe(sock)} socket "
                    f"({os.strerror(e.errno or 0)}); MSG_ZEROCOPY needs TCP on Linux 4.14 or "
                    "later: set multifd-zerocopy off"
                )
            else:
                self.supports_zero_copy = True
                self.zero_copy_refusal = ""

    # ------------------------------------------------------------------ basics

    def fileno(self) -> int:
        return self._fd

    @property
    def socket(self) -> socket.socket:
        return self._sock

    @property
    def peer_host(self) -> str:
        """The peer's address, without the port ("" when it cannot be told)."""
        try:
            return str(self._sock.getpeername()[0])
        except OSError:
            return ""

    @property
    def is_shut_down(self) -> bool:
        return self._shut.is_set()

    def _check_open(self) -> None:
        if self._shut.is_set():
            raise ChannelClosed(f"channel {self.name} was shut down")

    def shutdown(self) -> None:
        """Wake every thread blocked on this channel; later operations raise ChannelClosed."""
        self._shut.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self._closed:
            return
        if self._held:
            # Whatever completed is let go; the rest the kernel may still read after the
            # close, with no one left to tell us when: those owners are kept for good.
            with contextlib.suppress(ChannelError, OSError):
                self._drain()
            with self._ledger_lock:
                _ORPHANED.extend(owners for _, _, owners in self._held)
                self._held.clear()
        self.shutdown()
        self._closed = True
        self._sock.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------- write

    def write_all(self, data: Any) -> None:
        """Send small control data normally (never zero copy)."""
        self.writev(IoVec(0), header=data)

    def writev(self, buffers: IoVec | Iterable[Any], *, header: Any = None,
               zero_copy: bool = False) -> int:
        """Send `header` normally, then `buffers` (with MSG_ZEROCOPY if `zero_copy`).

        Returns the bytes written (all of them; partial sends are looped in C). With
        zero copy the kernel reads the buffers after this returns, until each call's
        completion: their contents must stay unchanged until flush(), or a newer version
        of them may leave (seed 000), and their memory must stay allocated. The channel
        sees to the second: it holds a reference to every buffer of a zero-copy writev
        (the cffi views it made of them, or what an IoVec filled by C names as its owner
        with set_filled(keep=...)) until the error queue says every call that carried it
        completed, and past close() for good if that never comes. An IoVec filled by C
        with no owner is refused with zero copy (ValueError): its memory's lifetime is
        nothing the channel could hold.
        """
        self._check_open()
        if zero_copy and not self.supports_zero_copy:
            raise ZeroCopyUnsupported(f"channel {self.name}: {self.zero_copy_refusal}")
        iov = buffers if isinstance(buffers, IoVec) else IoVec.from_buffers(buffers)
        if zero_copy and not iov.owned:
            raise ValueError(
                f"channel {self.name}: a zero-copy writev of an IoVec with no owner: the "
                "kernel reads its memory until the completion arrives, so name the object "
                "that owns it (IoVec.set_filled(keep=...)) for the channel to hold"
            )
        ptr, cnt, nplain, hbuf = iov.with_header(header)
        total = nplain + iov.nbytes
        sent = 0
        first = self.zero_copy_calls()
        try:
            if zero_copy and self.in_flight_cap is not None:
                cap = self.in_flight_cap
                # Send the plain part and then cap-sized pieces, each only once enough
                # of the previous ones has completed: the locked-memory budget holds.
                if nplain:
                    sent += self._send(ptr, cnt, nplain, zero_copy, sent, nplain)
                while sent < total:
                    piece = min(cap, total - sent)
                    self._wait_in_flight(cap - piece)
                    sent += self._send(ptr, cnt, nplain, zero_copy, sent, piece)
            else:
                sent = self._send(ptr, cnt, nplain, zero_copy, 0, 0)
        finally:
            del hbuf  # sent without zero copy: the kernel copied it in sendmsg
            if zero_copy:
                # Even a writev that failed half-way may have made calls that read them.
                end = self.zero_copy_calls()
                if end > first:
                    with self._ledger_lock:
                        self._held.append((first, end, iov.owners))
        if zero_copy:
            # Opportunistic: notifications never pile up against optmem_max (seed 003).
            self._drain()
        return sent

    def _send(self, ptr: Any, cnt: int, nplain: int, zero_copy: bool, skip: int,
              limit: int) -> int:
        """Send bytes [skip, skip+limit) (limit 0: to the end); ENOBUFS: drain, retry once.

        `nplain` is the header's length in bytes; the header is the first iovec.
        """
        res = self._send_result
        sizes = self._call_bytes
        done = 0
        retried = False
        while True:
            rc = lib.zc_sendv(self._fd, ptr, cnt, 1 if nplain else 0, int(zero_copy), skip + done,
                              (limit - done) if limit else 0, res, sizes, _CALL_BATCH)
            done += int(res.bytes)
            self._bytes_sent += res.bytes
            self._send_calls += res.calls
            if res.zc_calls:
                # Each call pins what it carried until its own completion: account each
                # for its own bytes (the in-flight cap and the pool rely on it).
                with self._ledger_lock:
                    self._ledger.queue(ffi.unpack(sizes, int(res.zc_calls)))
                    self._in_flight_peak = max(self._in_flight_peak, self._ledger.in_flight_bytes)
            if rc == 1:
                continue  # the call sizes filled their array: accounted, go on
            if rc == 0:
                return done
            err = res.err
            if err == errno.ENOBUFS and zero_copy:
                if res.bytes > 0:
                    retried = False  # progress since the last failure: a new failure
                if not retried:
                    retried = True
                    self._enobufs_retries += 1
                    self._drain()
                    continue
                raise ZeroCopyLimitError(f"channel {self.name}: {ENOBUFS_REMEDY}")
            if self._shut.is_set():
                raise ChannelClosed(f"channel {self.name} was shut down during a send")
            if err in (errno.EPIPE, errno.ECONNRESET):
                raise ChannelClosed(f"channel {self.name}: peer closed the connection "
                                    f"({os.strerror(err)})")
            raise ChannelError(f"channel {self.name}: send failed: {os.strerror(err)}")

    # --------------------------------------------------------- error queue

    def _drain(self) -> int:
        """Read every notification waiting on the error queue; return calls completed."""
        total = 0
        while True:
            n = lib.zc_drain_errqueue(self._fd, self._completions, _DRAIN_BATCH)
            if n < 0:
                if -n in (errno.EBADF, errno.ENOTSOCK) and self._shut.is_set():
                    raise ChannelClosed(f"channel {self.name} was shut down")
                raise ChannelError(f"channel {self.name}: {_errqueue_problem(-n)}")
            with self._ledger_lock:
                for i in range(n):
                    c = self._completions[i]
                    if c.err or c.origin != SO_EE_ORIGIN_ZEROCOPY:
                        raise ChannelError(
                            f"channel {self.name}: socket error on the error queue: "
                            f"{os.strerror(c.err)} (origin {c.origin})"
                        )
                    try:
                        total += self._ledger.complete(c.lo, c.hi, bool(c.copied))
                    except CompletionError as e:
                        raise ChannelError(f"channel {self.name}: {e}") from e
            if self._held:
                self._release_held()
            if n < _DRAIN_BATCH:
                return total

    def _release_held(self) -> None:
        """Let go of the buffers of every zero-copy writev whose calls have all completed.
        Oldest first, stopping at the first still out: one completed out of order waits for
        those before it, which only holds a buffer longer, never too briefly."""
        with self._ledger_lock:
            held = self._held
            while held and self._ledger.calls_completed(held[0][0], held[0][1]):
                held.popleft()

    def _wait_in_flight(self, at_most: int, deadline: float | None = None) -> None:
        """Wait until no more than `at_most` bytes of zero-copy sends are in flight."""
        waited = False
        error_pending = False
        while True:
            completed = self._drain()
            if self._ledger.in_flight_bytes <= at_most or self._ledger.in_flight_calls == 0:
                return
            if error_pending and not completed:
                # POLLERR with nothing on the error queue: the connection itself failed
                # (reset, or TCP_USER_TIMEOUT), and poll would report it for ever.
                self._raise_socket_error()
            if not waited:
                self._in_flight_waits += 1
                waited = True
            error_pending = bool(self._wait_errqueue(deadline) & select.POLLERR)

    def _raise_socket_error(self) -> None:
        self._check_open()
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            if err in (errno.EPIPE, errno.ECONNRESET):
                raise ChannelClosed(f"channel {self.name}: the connection was reset "
                                    f"({os.strerror(err)})")
            raise ChannelError(f"channel {self.name}: the connection failed: "
                               f"{os.strerror(err)}")

    def _wait_errqueue(self, deadline: float | None) -> int:
        self._check_open()
        timeout_ms = _WAIT_SLICE_MS
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FlushTimeout(
                    f"channel {self.name}: {self._ledger.in_flight_calls} zero-copy sends "
                    "still not completed; is the destination reading?"
                )
            timeout_ms = min(timeout_ms, max(1, int(left * 1000)))
        # POLLERR is reported whatever `events` asks for (seed 004).
        revents = lib.zc_poll(self._fd, 0, timeout_ms)
        if revents < 0:
            raise ChannelError(f"channel {self.name}: poll failed: {os.strerror(-revents)}")
        if revents & (select.POLLHUP | select.POLLNVAL) and not revents & select.POLLERR:
            self._check_open()
            # The peer hung up: completions still come as the kernel frees the
            # buffers, but poll no longer blocks; do not spin on it.
            time.sleep(0.001)
        return int(revents)

    def flush(self, timeout: float | None = None) -> int:
        """Wait until every zero-copy send has completed.

        Returns 0 if none came back COPIED since the last flush, 1 if any did (the
        kernel copied after all: loopback, veth, no scatter-gather). Raises FlushTimeout
        after `timeout` seconds, ChannelClosed on shutdown, ChannelError on errors.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self._wait_in_flight(0, deadline)
        self._flushes += 1
        with self._ledger_lock:
            copied = self._ledger.take_copied()
        if copied:
            self._flushes_copied += 1
        return 1 if copied else 0

    def zero_copy_calls(self) -> int:
        """How many zero-copy send calls this channel has made. Read it before and after a
        writev(zero_copy=True): the calls numbered [before, after) carried its buffers (the
        one writer thread makes no other call in between)."""
        with self._ledger_lock:
            return self._ledger.calls_queued

    def zero_copy_completed(self, first: int, end: int, timeout: float = 0.0) -> bool:
        """Whether the zero-copy calls numbered [first, end) have all completed, so the
        buffers they carried may be overwritten (seed 004: not before the notification).

        Reads the error queue; waits up to `timeout` seconds for them (False if they are
        still out then), in slices, so that shutdown() wakes it with ChannelClosed.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._ledger_lock:
                if self._ledger.calls_completed(first, end):
                    return True
            self._drain()
            with self._ledger_lock:
                if self._ledger.calls_completed(first, end):
                    return True
            if time.monotonic() >= deadline:
                return False
            with contextlib.suppress(FlushTimeout):  # the deadline: checked above
                self._wait_errqueue(deadline)

    # -------------------------------------------------------------------- read

    def readv_into(self, buffers: IoVec | Iterable[Any]) -> int:
        """Fill `buffers` exactly, in order; ChannelClosed if the peer closes first."""
        self._check_open()
        iov = buffers if isinstance(buffers, IoVec) else IoVec.from_buffers(buffers, writable=True)
        if iov.nbytes == 0:
            return 0
        rc = int(lib.zc_readv_full(self._fd, iov.entries, iov.count, self._nread))
        return self._read_done(rc, iov.nbytes)

    def read_with(self, reader: Callable[[int, Any], int], nbytes: int) -> int:
        """Let a native reader fill `nbytes` from this channel: `reader(fd, nread)` returns 0,
        ZC_EOF or an errno, and stores the bytes it read in nread[0].

        For a reader that puts the bytes where only it knows (pages into a file). Returns
        the reader's own codes below ZC_EOF to the caller; raises as readv_into does.
        """
        self._check_open()
        rc = int(reader(self._fd, self._nread))
        if rc < ZC_EOF:
            self._bytes_received += int(self._nread[0])
            return rc
        self._read_done(rc, nbytes)
        return 0

    def _read_done(self, rc: int, nbytes: int) -> int:
        got = int(self._nread[0])
        self._bytes_received += got
        if rc == 0:
            return got
        if self._shut.is_set():
            raise ChannelClosed(f"channel {self.name} was shut down during a read")
        if rc == ZC_EOF:
            raise ChannelClosed(
                f"channel {self.name}: peer closed the connection after {got} of "
                f"{nbytes} bytes"
            )
        raise ChannelError(f"channel {self.name}: read failed: {os.strerror(rc)}")

    def read_exact(self, n: int, timeout: float | None = None) -> bytearray:
        """Exactly `n` bytes. With a timeout, ReadTimeout if they are not all here within
        `timeout` seconds: a peer that sends one byte a second cannot hold us longer."""
        buf = bytearray(n)
        if not n:
            return buf
        if timeout is None:
            self.readv_into([buf])
            return buf
        deadline = time.monotonic() + timeout
        view = memoryview(buf)
        got = 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0 or not self.wait_readable(left):
                raise ReadTimeout(f"channel {self.name}: {got} of {n} bytes within "
                                  f"{timeout:g} s")
            try:
                k = self._sock.recv_into(view[got:], n - got, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                self._check_open()
                raise ChannelError(f"channel {self.name}: read failed: "
                                   f"{e.strerror or e}") from e
            if k == 0:
                self._check_open()
                raise ChannelClosed(f"channel {self.name}: peer closed the connection after "
                                    f"{got} of {n} bytes")
            got += k
            self._bytes_received += k
        return buf

    def read_some(self, n: int) -> bytes:
        """Up to `n` bytes that have arrived, without waiting (b"" if none have yet);
        ChannelClosed once the peer has closed. For peers served together, none of
        which may make a read block (migrate/admission.py)."""
        self._check_open()
        try:
            data = self._sock.recv(n, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError as e:
            raise ChannelClosed(f"channel {self.name}: {e.strerror or e}") from e
        if not data:
            raise ChannelClosed(f"channel {self.name}: peer closed the connection")
        self._bytes_received += len(data)
        return data

    # ------------------------------------------------------------- readiness

    def wait_readable(self, timeout: float | None) -> bool:
        """Wait until a read would not block (data, the peer's close, or an error), at most
        `timeout` seconds (None: until then or shutdown). False on timeout; ChannelClosed
        once shut down. Waits in short slices, so shutdown() wakes it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._check_open()
            slice_ms = _WAIT_SLICE_MS
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                slice_ms = max(1, min(slice_ms, int(left * 1000)))
            revents = lib.zc_poll(self._fd, select.POLLIN, slice_ms)
            if revents < 0:
                raise ChannelError(f"channel {self.name}: poll failed: {os.strerror(-revents)}")
            if revents:
                self._check_open()
                return True

    def peek(self, n: int) -> bytes:
        """Up to `n` bytes that have arrived, without consuming them and without waiting;
        b"" if the peer has closed. BlockingIOError if nothing is there yet."""
        self._check_open()
        try:
            return self._sock.recv(n, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            raise
        except OSError as e:
            raise ChannelClosed(f"channel {self.name}: {e.strerror or e}") from e

    def peer_closed(self) -> bool:
        """Whether the peer has closed its end (a look, not a read): True also when
        the connection failed or this channel was shut down."""
        try:
            return self.peek(1) == b""
        except BlockingIOError:
            return False
        except ChannelError:
            return True

    # ---------------------------------------------------------------- numbers

    def statistics(self) -> ChannelStats:
        with self._ledger_lock:
            snap = self._ledger.snapshot()
        return ChannelStats(
            bytes_sent=self._bytes_sent,
            bytes_received=self._bytes_received,
            send_calls=self._send_calls,
            zero_copy_queued=snap.queued,
            zero_copy_completed=snap.completed,
            zero_copy_copied=snap.copied,
            flushes=self._flushes,
            flushes_copied=self._flushes_copied,
            enobufs_retries=self._enobufs_retries,
            in_flight_bytes=snap.in_flight_bytes,
            in_flight_peak=self._in_flight_peak,
            in_flight_waits=self._in_flight_waits,
            held_sends=len(self._held),
        )


def wait_readable_any(channels: Iterable[Channel], timeout: float,
                      listener: Listener | None = None) -> list[Channel]:
    """The channels a read would not block on (data, a close, an error), waiting up to
    `timeout` seconds for at least one; [] on timeout. For a set of pending connections
    served together, none of which may hold up the others. With a listener, a connection
    waiting to be accepted also ends the wait (the result may then be []): a new source
    is greeted at once, not after the rest of the timeout (that wait was 0.1 s of every
    migration's set-up, twice)."""
    chans = list(channels)
    poller = select.poll()
    for ch in chans:
        poller.register(ch.fileno(), select.POLLIN)
    if listener is not None:
        poller.register(listener.fileno(), select.POLLIN)
    elif not chans:
        time.sleep(max(0.0, timeout))
        return []
    ready = {fd for fd, _ in poller.poll(max(0, int(timeout * 1000)))}
    return [ch for ch in chans if ch.fileno() in ready]


def _errqueue_problem(err: int) -> str:
    if err == errno.EMSGSIZE:
        return ("a zero-copy completion was cut short on the error queue (MSG_CTRUNC): "
                "the calls it completed can never be accounted")
    if err == errno.EPROTO:
        return ("a malformed message on the error queue (no single IP_RECVERR of a whole "
                "sock_extended_err): its completion cannot be read")
    return f"reading the error queue failed: {os.strerror(err)}"


def _describe(sock: socket.socket) -> str:
    fam = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6", socket.AF_UNIX: "Unix"}
    kind = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "datagram"}
    return f"{fam.get(sock.family, str(sock.family))} {kind.get(sock.type, str(sock.type))}"


# ------------------------------------------------------------------ TCP set-up


def set_peer_timeout(sock: socket.socket, seconds: float) -> None:
    """Let the kernel find a dead peer within `seconds`: keepalive probes when the
    connection is idle (a host that lost power never sends a FIN), and TCP_USER_TIMEOUT
    when sent data stays unacknowledged or the peer's window stays shut (a peer that
    stopped reading). Either way the socket then fails with ETIMEDOUT, which wakes every
    blocked read and write on it. A peer that is alive but silent is the callers' to
    notice: their reads have deadlines."""
    t = max(3, int(seconds))
    idle, interval = max(1, t // 3), max(1, t // 6)
    count = max(1, (t - idle) // interval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, t * 1000)


def connect(host: str, port: int, *, zero_copy: bool = False, timeout: float = 10.0,
            in_flight_cap: int | None = None, name: str = "",
            peer_timeout: float | None = DEFAULT_PEER_TIMEOUT) -> Channel:
    """Connect over TCP (IPv4 or IPv6, whichever the name resolves to first)."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        where = format_hostport(host, port)
        raise ChannelError(f"cannot connect to {where}: {e.strerror or e}") from e
    sock.settimeout(None)  # blocking from here on: shutdown() is what wakes a waiter
    return Channel(sock, zero_copy=zero_copy, in_flight_cap=in_flight_cap, name=name,
                   peer_timeout=peer_timeout)


class Listener:
    """A listening TCP socket; accept() returns channels, try_accept() what is waiting."""

    def __init__(self, host: str, port: int, backlog: int = 64) -> None:
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, _, _, _, addr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(backlog)
            # Non-blocking: accept() runs only after select() said a connection waits, but
            # another thread (admission's try_accept) may take it first; a blocking accept
            # would then wait for the next one with no deadline.
            sock.setblocking(False)
        except OSError as e:
            raise ChannelError(f"cannot listen on {format_hostport(host, port)}: "
                               f"{e.strerror or e}") from e
        self._sock = sock
        self._shut = threading.Event()

    @classmethod
    def from_socket(cls, sock: socket.socket) -> Listener:
        """Wrap an already listening socket (systemd socket activation)."""
        self = cls.__new__(cls)
        sock.setblocking(False)  # as __init__'s: accept() never waits past select()
        self._sock = sock
        self._shut = threading.Event()
        return self

    @property
    def address(self) -> tuple[str, int]:
        addr = self._sock.getsockname()
        return str(addr[0]), int(addr[1])

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def is_loopback(self) -> bool:
        """Whether only this host can reach the listener (127.0.0.0/8, ::1)."""
        import ipaddress

        host = self.address[0]
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        mapped = getattr(addr, "ipv4_mapped", None)
        return bool(addr.is_loopback or (mapped is not None and mapped.is_loopback))

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self, timeout: float | None = None, *, zero_copy: bool = False,
               name: str = "", peer_timeout: float | None = DEFAULT_PEER_TIMEOUT) -> Channel:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._shut.is_set():
                raise ChannelClosed("listener was shut down")
            wait = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if wait <= 0:
                raise AcceptTimeout(f"no connection within {timeout:g} s on port {self.port}")
            r, _, _ = select.select([self._sock], [], [], wait)
            if r:
                try:
                    sock, _ = self._sock.accept()
                except BlockingIOError:
                    continue
                sock.settimeout(None)
                return Channel(sock, zero_copy=zero_copy, name=name,
                               peer_timeout=peer_timeout)

    def try_accept(self, *, name: str = "",
                   peer_timeout: float | None = DEFAULT_PEER_TIMEOUT) -> Channel | None:
        """A connection waiting in the backlog, or None at once if there is none."""
        if self._shut.is_set():
            raise ChannelClosed("listener was shut down")
        r, _, _ = select.select([self._sock], [], [], 0)
        if not r:
            return None
        try:
            sock, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            raise ChannelError(f"accept failed on port {self.port}: {e.strerror or e}") from e
        sock.settimeout(None)
        return Channel(sock, name=name, peer_timeout=peer_timeout)

    def shutdown(self) -> None:
        self._shut.set()

    def close(self) -> None:
        self._shut.set()
        self._sock.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def format_hostport(host: str, port: int) -> str:
    """HOST:PORT, with IPv6 addresses in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
