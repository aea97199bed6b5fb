"""The multifd receiver pool: N worker threads reading packets and writing their pages into the
destination image (a file through its descriptor, or a mapping), the sync barrier that keeps
iterations in order, and the proof that nothing went missing (every packet of every channel in
sequence, every page arrived). It knows pages and packets; not guests, the CLI, systemd or the
main channel.
"""

from __future__ import annotations

import os
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from zcmigrate.channel.aead import Direction, Opener, SessionKeys
from zcmigrate.channel.errors import ChannelClosed, ChannelError, ReadTimeout
from zcmigrate.channel.iovec import IoVec
from zcmigrate.channel.zcsocket import Channel
from zcmigrate.multifd.exiting import Exiting, MultifdError
from zcmigrate.multifd.pool import PoolBase
from zcmigrate.multifd.stats import ChannelCounters, PoolStats
from zcmigrate.multifd.wire import (
    HEADER_SIZE,
    INIT_SIZE,
    TAG_SIZE,
    InitTracker,
    RemoteProtocolError,
    SequenceTracker,
    WireContext,
    decode_header,
    decode_offsets,
    sealed_capacity,
    sealed_size,
)
from zcmigrate.native import ffi, lib

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["Hook", "MissingPages", "ReceiverPool", "accept_data_channel"]

Hook = Callable[[str, int], None]

_log = structlog.get_logger("zcmigrate.multifd.receiver")

# Every condition wait re-checks the pool's state at least this often; wake-ups come from
# notify or from Exiting, the slice only bounds a missed one.
_WAIT_SLICE = 0.5
_JOIN_TIMEOUT = 5.0  # after close() has shut every channel down, workers end at once
_MISSING_SHOWN = 8  # missing pages named in a message

# _FINAL: stopped at the final SYNC, as sync(final=True) asked; _CLOSED: the peer closed at a
# packet boundary; _STOPPED: close() or Exiting; _FAILED: this worker's own error.
_RUNNING, _FINAL, _CLOSED, _STOPPED, _FAILED = "running", "final", "closed", "stopped", "failed"


@dataclass(frozen=True, slots=True)
class MissingPages:
    """The pages of the image that no packet has carried yet, as a normal or a zero page."""

    count: int
    pages: int  # all pages of the image
    first: tuple[int, ...]  # byte offsets of the first few missing, in page order

    def __str__(self) -> str:
        if not self.count:
            return f"all {self.pages} pages arrived"
        shown = ", ".join(f"0x{off:x}" for off in self.first[1:])
        return (f"{self.count} of {self.pages} pages never arrived, first at offset "
                f"0x{self.first[0]:x}" + (f", then {shown}" if shown else "")
                + (", ..." if self.count > len(self.first) else ""))


def accept_data_channel(channel: Channel, tracker: InitTracker, timeout: float) -> int:
    """Read a new data channel's 64-byte init record and return its channel id.

    RemoteProtocolError if the record is wrong (or the id was seen before), MultifdError if it
    does not come within `timeout` seconds or the peer closes first. The destination uses the
    id to order its channels (ReceiverPool takes them with index == id).
    """
    try:
        data = channel.read_exact(INIT_SIZE, timeout)
    except ReadTimeout:
        raise MultifdError(f"data channel {channel.name}: no init record within "
                           f"{timeout:g} s") from None
    except ChannelClosed as e:
        raise MultifdError(f"data channel {channel.name}: closed before its init record "
                           f"({e})", cause=e) from e
    except ChannelError as e:
        raise MultifdError(f"data channel {channel.name}: reading the init record failed: "
                           f"{e}", cause=e) from e
    return tracker.accept(data).channel_id


class _Worker:
    """One channel's state; the counters and barrier fields are guarded by the pool lock."""

    def __init__(self, channel_id: int, channel: Channel, opener: Opener | None) -> None:
        self.id = channel_id
        self.channel = channel
        self.opener = opener  # sealed packets: accepts only counter seq - 1, in order
        self.name = f"multifd-recv-{channel_id}"
        self.state = _RUNNING
        self.synced = 0  # SYNC packets read
        self.sequence = SequenceTracker(channel_id)  # its worker's alone: no lock
        self.packets = 0
        self.normal_pages = 0
        self.zero_pages = 0
        self.thread: threading.Thread | None = None


class ReceiverPool(PoolBase):
    """N receiver workers over N data channels (index == channel id) and their sync barrier.

    sync() is called from one thread (the destination's main-channel thread); statistics()
    from any. Every wait is bounded or woken by the shared Exiting. Before a commit: the last
    sync with final=True (every worker stops at it and is joined), then check_complete()
    (nothing after the final SYNC, every page arrived at least once; missing_pages() counts).

    hook(point, channel_id), for tests, runs in the worker at: "recv_header" (a data
    packet's header and offsets read, its pages not yet), "recv_packet" (its pages in
    place), "recv_sync" (a SYNC packet read, before the barrier). An exception in the hook
    fails the worker like any other.

    image: a file descriptor open for writing on the image file (of at least the image's
    size), or a writable mapping of it. Through a descriptor, each worker reads a packet's
    pages into its own buffer and writes them with pwrite: on a 4 KiB-page tmpfs that costs
    about half the CPU of a copy into a fresh mapping, which faults and zeroes every new page
    first. A mapping (anonymous memory in tests; the destination's choice on disk file
    systems, docs/performance.md) gets the pages read straight into place. The pool never
    closes the descriptor; durability (fdatasync) is the caller's.

    known_zero: `image` is fresh (all zero): zero pages never written need no work.

    keys: with a sealed context (ctx.sealed), the session whose source-to-destination key of
    each channel opens its packets; required then, refused otherwise. A sealed packet's body
    is read into the worker's buffer and opened there in place; its offsets are decoded and
    its pages written only once its tag verified (docs/protocol.md, "Sealed packets").
    """

    role = "receive"

    def __init__(
        self,
        channels: Sequence[Channel],
        ctx: WireContext,
        image: Buffer | int,
        *,
        known_zero: bool = False,
        exiting: Exiting | None = None,
        hook: Hook | None = None,
        keys: SessionKeys | None = None,
    ) -> None:
        if ctx.sealed != (keys is not None):
            raise ValueError("a sealed context needs the session's keys, and only it takes "
                             f"them (sealed {ctx.sealed}, keys given: {keys is not None})")
        self._fd = -1
        if isinstance(image, int):
            size = os.fstat(image).st_size
            if size < ctx.image_size:
                raise ValueError(f"image file of {size} bytes, the wire context says "
                                 f"{ctx.image_size}")
            self._fd = image
        super().__init__(channels, ctx, None if isinstance(image, int) else image,
                         writable=True, exiting=exiting)
        self._hook = hook
        # Held around each packet's pwrite: writes to one file serialize on its inode lock
        # anyway, and a worker waiting here sleeps where one waiting for the inode lock spins
        # (rwsem_spin_on_owner), taking a core from the sender on a 2-core host.
        self._write_lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # the barrier, both directions
        self._workers = [
            _Worker(i, ch, None if keys is None
                    else keys.opener(Direction.SOURCE_TO_DESTINATION, i))
            for i, ch in enumerate(channels)
        ]
        npages = ctx.image_size // ctx.page_size
        self._nwords = (npages + 63) // 64  # of each bitmap below
        # One bit per page, set once a page was written: on a fresh (all-zero) image a zero
        # page that was never written needs no work at all, not even a fault.
        self._written: array[int] | None = None
        self._written_c: Any = ffi.NULL
        if known_zero:
            self._written = array("Q", bytes(8 * self._nwords))
            self._written_c = ffi.from_buffer("uint64_t[]", self._written)
        # One bit per page, set once a packet carried it (normal or zero) and it is in place:
        # a commit needs every page to have arrived at least once.
        self._npages = npages
        self._arrived = array("Q", bytes(8 * self._nwords))
        self._arrived_c: Any = ffi.from_buffer("uint64_t[]", self._arrived)
        self._released = 0  # the last sync number the coordinator released
        self._final = 0  # the final sync's number once sync(final=True) released it
        self._join_exiting()

    # ------------------------------------------------------------------ state

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ API


    def sync(self, timeout: float | None = None, *, final: bool = False) -> int:
        """Wait until every worker has read its next SYNC packet, then release them all.

        Every page sent before that SYNC on any channel is then in place, and no worker
        writes a page sent after it until this returns. Returns the sync number (1 first).
        MultifdError if a worker failed, its peer closed the channel before this SYNC, or
        `timeout` seconds passed; each of those fails the pool.

        final: the last sync of the migration. Every worker stops at this SYNC instead of
        reading on, and its thread is joined before this returns: nothing read after it can
        reach the image. Then check_complete() says whether the image may be committed; no
        sync() may follow.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        failure: MultifdError | None = None
        with self._cond:
            if not self._started or self._stopping:
                raise MultifdError("multifd receive: the pool is not running "
                                   "(not started, or closed)")
            if self._final:
                raise MultifdError(f"multifd receive: sync after the final sync "
                                   f"({self._final})")
            k = self._released + 1
            while True:
                err = self.error
                if err is not None:
                    raise err
                if self._stopping:
                    raise MultifdError(f"multifd receive: the pool was closed during sync {k}")
                behind = [w for w in self._workers if w.synced < k]
                if not behind:
                    if final:
                        self._final = k  # before the release: a woken worker must see it
                    self._released = k
                    self._cond.notify_all()
                    if not final:
                        return k
                    break
                ended = [w for w in behind if w.state != _RUNNING]
                if ended:
                    w = ended[0]
                    how = ("the peer closed the channel" if w.state == _CLOSED
                           else f"the worker {w.state}")
                    failure = MultifdError(
                        f"multifd receive channel {w.id}: {how} before sync {k} "
                        f"(after {w.synced} syncs)",
                        channel_id=w.id,
                    )
                    break
                wait = self._next_wait(deadline, _WAIT_SLICE)
                if wait is None:
                    ids = [w.id for w in behind]
                    failure = MultifdError(
                        f"multifd receive channel {ids[0]}: no SYNC packet for sync {k} "
                        f"within {timeout:g} s (channels still behind: {ids})",
                        channel_id=ids[0],
                    )
                    break
                self._cond.wait(wait)
        if failure is None:
            return self._join_at_final(k, deadline)
        self._fail(failure, "multifd-recv sync")

    def _join_at_final(self, k: int, deadline: float | None) -> int:
        """After the final release: every worker ends at its SYNC k; join their threads."""
        # Released workers only have to wake up and return: a worker still running after
        # this long is stuck, and one that ended otherwise failed or was stopped.
        join_deadline = time.monotonic() + _JOIN_TIMEOUT
        if deadline is not None:
            join_deadline = max(join_deadline, deadline)
        threads = [w.thread for w in self._workers if w.thread is not None]
        for t in threads:
            t.join(max(0.0, join_deadline - time.monotonic()))
        with self._cond:
            err = self.error
            if err is not None:
                raise err
            wrong = [w for w in self._workers if w.state != _FINAL]
        if not wrong and not any(t.is_alive() for t in threads):
            return k
        w = wrong[0] if wrong else self._workers[0]
        failure = MultifdError(
            f"multifd receive channel {w.id}: the worker did not stop at the final sync {k} "
            f"(it is {w.state})",
            channel_id=w.id,
        )
        self._fail(failure, "multifd-recv sync")

    def handoff(self) -> list[tuple[Channel, SequenceTracker, Opener | None]]:
        """After sync(final=True): each data channel (by id) with its sequence tracker and,
        sealed, its opener, for a reader that goes on reading the same channels in order
        (post-copy's background pages, multifd/placement.py). The channels and openers
        stay the pool's to close."""
        if not self._final:
            raise MultifdError("multifd receive: handoff before the final sync")
        return [(w.channel, w.sequence, w.opener) for w in self._workers]

    def missing_pages(self) -> MissingPages:
        """The pages no packet has carried yet (normal or zero), counted in C from the arrival
        bitmap. While workers run it is a snapshot; after the final sync it is the answer."""
        first: Any = ffi.new("uint64_t[]", _MISSING_SHOWN)
        with ffi.from_buffer("uint64_t[]", self._arrived) as bm:  # valid after close() too
            count = int(lib.zc_bitmap_missing(bm, self._npages, self._ctx.page_size, first,
                                              _MISSING_SHOWN))
        shown = tuple(int(first[i]) for i in range(min(count, _MISSING_SHOWN)))
        return MissingPages(count=count, pages=self._npages, first=shown)

    def check_complete(self) -> None:
        """After sync(final=True), right before the commit: RemoteProtocolError if a channel
        holds bytes after its final SYNC, or if a page of the image never arrived.

        Either means the source broke the protocol or something between lost part of the
        stream; what arrived must not be committed. Bytes that arrive after this call are
        never read (the workers are joined); a caller that looks twice catches late ones.
        """
        with self._cond:
            if not self._final:
                raise RuntimeError("ReceiverPool.check_complete() before sync(final=True)")
            err = self.error
            if err is not None:
                raise err
        for w in self._workers:
            try:
                extra = w.channel.peek(1)
            except BlockingIOError:
                continue  # nothing there: the channel is idle, as it should be
            except ChannelError:
                continue  # reset or shut down after the final sync: nothing more to read
            if extra:
                raise RemoteProtocolError(
                    f"multifd receive: data after the final sync on channel {w.id}, expected "
                    f"nothing more on it (seq {w.sequence.next_seq - 1} was its final SYNC)"
                )
        missing = self.missing_pages()
        if missing.count:
            raise RemoteProtocolError(f"multifd receive: {missing}")
        _log.info("receive complete", pages=missing.pages, channels=len(self._workers))

    def statistics(self) -> PoolStats:
        with self._lock:
            rows = [(w.id, w.channel, w.packets, w.normal_pages, w.zero_pages, w.synced)
                    for w in self._workers]
        chans = tuple(
            ChannelCounters(
                id=cid, packets=packets, bytes=ch.statistics().bytes_received,
                normal_pages=normal, zero_pages=zero, syncs=syncs, zero_copy_queued=0,
                zero_copy_completed=0, zero_copy_copied=0, enobufs_retries=0,
            )
            for cid, ch, packets, normal, zero, syncs in rows
        )
        return PoolStats.from_channels(chans)

    def close(self) -> None:
        """Stop every worker now, join them, close the channels. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            self._cond.notify_all()
        for ch in self._channels:
            ch.shutdown()  # a worker blocked in a read wakes only this way
        threads = [w.thread for w in self._workers if w.thread is not None]
        for t in threads:
            t.join(_JOIN_TIMEOUT)
        if self._release(threads):
            for w in self._workers:
                if w.opener is not None:
                    w.opener.close()
            ffi.release(self._arrived_c)
            if self._written is not None:
                ffi.release(self._written_c)

    # ------------------------------------------------------------------ workers

    def _run(self, w: _Worker) -> None:
        log = _log.bind(channel=w.id)
        try:
            end = self._receive(w)
        except BaseException as e:  # a worker thread must record every failure, and end
            with self._cond:
                stopping = self._stopping
                w.state = _STOPPED if stopping else _FAILED
                self._cond.notify_all()
            if stopping and isinstance(e, ChannelClosed):
                log.debug("receive channel stopped")
                return  # close() shut the channel down under a read: not a failure
            error = MultifdError.on_channel("receive", w.id, e)
            if self._exiting.set(error, where=w.name):
                log.error("receive channel failed", error=str(error))
            return
        with self._cond:
            w.state = end
            self._cond.notify_all()
        log.debug("receive channel ended", how=end)

    def _receive(self, w: _Worker) -> str:
        """Read packets until the peer closes at a sync point (_CLOSED), the final sync
        (_FINAL) or the pool stops (_STOPPED)."""
        ctx = self._ctx
        ps = ctx.page_size
        ch = w.channel
        hook = self._hook
        known_zero = self._written is not None
        written_c = self._written_c
        arrived_c = self._arrived_c
        sequence = w.sequence
        # Reused for every packet: nothing is allocated per page.
        header_buf = bytearray(HEADER_SIZE)
        header_iov = IoVec.from_buffers([header_buf], writable=True)
        offsets_buf = bytearray(8 * ctx.pages_alloc)
        offsets_c: Any = ffi.from_buffer(offsets_buf)
        offsets_view = memoryview(offsets_buf)
        offsets_iov = IoVec(1)
        nwritten: Any = ffi.new("uint32_t *")
        to_file = self._fd >= 0
        opener = w.opener
        if opener is not None:
            # A sealed packet's two messages and their tags land here. Its offsets are
            # opened in place and decoded first, so every page goes only where the source
            # said; then its page data is opened, in place and written to the file, or
            # straight into the mapping (one pass fewer over the bytes: docs/security.md
            # says why an unverified page may lie in an image not yet committed).
            sealed_cap = sealed_capacity(ctx)
            sealed_buf: Any = ffi.new("uint8_t[]", sealed_cap)
            sealed_iov = IoVec(1)
            sealed_iov.entries[0].iov_base = sealed_buf
            tag_buf: Any = ffi.new("uint8_t[]", TAG_SIZE)
            tag_iov = IoVec(1)
            tag_iov.entries[0].iov_base = tag_buf
            tag_iov.entries[0].iov_len = TAG_SIZE
            tag_iov.set_filled(1, TAG_SIZE)
        elif to_file:
            # A packet's pages land here first, then go to the file: the place for a step
            # that works on the payload before it is written (decryption in place).
            payload_buf: Any = ffi.new("char[]", ctx.pages_alloc * ps)
            payload_iov = IoVec(1)
            payload_iov.entries[0].iov_base = payload_buf
        def land(normal_c: Any, nn: int, pages: Any, pages_len: int) -> None:
            """A packet's pages, read (and opened) into a buffer of ours, into the image:
            pwrite through the file or a copy into the mapping, one C call per packet
            that checks every offset and the buffer's length before the first byte moves."""
            if to_file:
                with self._write_lock:
                    rc = lib.zc_write_pages(self._fd, ctx.image_size, normal_c, nn, ps,
                                            pages, pages_len)
            else:
                rc = lib.zc_place_pages(self._base, ctx.image_size, normal_c, nn, ps, pages,
                                        pages_len)
            if rc == lib.ZC_EBOUNDS:
                raise RemoteProtocolError("packet offsets: outside the image (zc_write_pages)"
                                          if to_file else
                                          "packet offsets: outside the image (zc_place_pages)")
            if rc:
                raise OSError(rc, f"writing pages to the image file: {os.strerror(rc)}")
            if known_zero:
                self._mark(written_c, normal_c, nn)
            self._mark(arrived_c, normal_c, nn)

        # Bytes this worker has read; with the channel's own count it tells a close at a
        # packet boundary (nothing of the next packet read) from one inside a packet.
        read_base = ch.statistics().bytes_received
        consumed = 0
        after_data = False  # a data packet came after the last SYNC (or the init record)
        while True:
            if self._stopping or self._exiting.is_set():
                return _STOPPED
            try:
                ch.readv_into(header_iov)
            except ChannelClosed:
                partial = ch.statistics().bytes_received - read_base - consumed
                if partial or ch.is_shut_down:
                    raise
                if after_data:
                    # The source always syncs before it closes a channel it sent pages on:
                    # pages after the last SYNC were never covered by a sync, so this peer
                    # went away mid-iteration. Fail now rather than at the next sync().
                    raise ChannelClosed(
                        f"the peer closed the channel after packet {w.packets} "
                        f"without a SYNC after it (after {w.synced} syncs)"
                    ) from None
                return _CLOSED
            consumed += HEADER_SIZE
            header = decode_header(header_buf, ctx)
            # Before a byte of the packet's pages is read: a repeated or reordered packet
            # never reaches the image, and a lost one fails the channel here.
            sequence.accept(header)
            if header.is_sync:
                if opener is not None:
                    # The SYNC's counts are trusted only once its tag (over the header
                    # alone) verified.
                    ch.readv_into(tag_iov)
                    consumed += TAG_SIZE
                    opener.open_in_place(header.seq - 1, tag_buf, 0, aad=header_buf)
                end = self._at_sync(w)
                if end != _RUNNING:
                    return end
                after_data = False
                continue
            size = header.offsets_size
            if opener is not None:
                sealed = sealed_size(header)
                if sealed > sealed_cap:  # decode_header refuses it; never overrun
                    raise RemoteProtocolError(f"sealed packet of {sealed} bytes, more than "
                                              f"pages_alloc pages, their offsets and tags")
                sealed_iov.entries[0].iov_len = sealed
                sealed_iov.set_filled(1, sealed)
                ch.readv_into(sealed_iov)
                consumed += sealed
                # Counter seq - 1: the sequence check above already holds it to the next
                # one, and the opener holds it again, so a replay or reordering fails twice.
                opener.open_lead(header.seq - 1, sealed_buf, size, aad=header_buf)
                normal, zero = decode_offsets(ffi.buffer(sealed_buf, size), header, ctx)
                sealed_pages = sealed_buf + size + TAG_SIZE
            else:
                if size:
                    entry = offsets_iov.entries[0]
                    entry.iov_base = offsets_c
                    entry.iov_len = size
                    offsets_iov.set_filled(1, size)
                    ch.readv_into(offsets_iov)
                    consumed += size
                normal, zero = decode_offsets(offsets_view[:size], header, ctx)
            if hook is not None:
                hook("recv_header", w.id)
            nn = len(normal)
            if opener is not None:
                payload = header.payload_size
                if payload != nn * ps:  # decode_header refuses it; C would too
                    raise RemoteProtocolError(f"sealed packet: {payload} bytes of page data "
                                              f"for {nn} pages")
                if nn and not to_file:
                    normal_c = ffi.from_buffer("uint64_t[]", normal)
                    opener.open_pages(header.seq - 1, sealed_pages, payload, aad=header_buf,
                                      into=(self._base, ctx.image_size, normal_c, nn, ps))
                    if known_zero:
                        self._mark(written_c, normal_c, nn)
                    self._mark(arrived_c, normal_c, nn)
                else:
                    opener.open_pages(header.seq - 1, sealed_pages, payload, aad=header_buf)
                    if nn:
                        normal_c = ffi.from_buffer("uint64_t[]", normal)
                        land(normal_c, nn, sealed_pages, payload)
            elif nn and to_file:
                normal_c = ffi.from_buffer("uint64_t[]", normal)
                payload = header.payload_size
                if payload > len(payload_buf):  # decode_header refuses it; never overrun
                    raise RemoteProtocolError(f"packet payload of {payload} bytes, more than "
                                              f"pages_alloc pages ({len(payload_buf)})")
                payload_iov.entries[0].iov_len = payload
                payload_iov.set_filled(1, payload)
                ch.readv_into(payload_iov)
                consumed += payload
                # Written before the next header is read: every page of this packet is in the
                # file before this worker can reach a SYNC, so the barrier keeps its meaning
                # (ARCHITECTURE.md, invariant 2), and a later packet's copy of a page lands
                # after this one's.
                land(normal_c, nn, payload_buf, len(payload_buf))
            elif nn:
                normal_c = ffi.from_buffer("uint64_t[]", normal)

                # In C: the iovecs (adjacent pages merged), then readv straight into the
                # destination mapping; no intermediate buffer, one call per packet.
                def reader(fd: int, nread: Any, oc: Any = normal_c, n: int = nn) -> int:
                    return int(lib.zc_recv_pages(fd, self._base, ctx.image_size, oc, n, ps,
                                                 nread))

                if ch.read_with(reader, header.payload_size) == lib.ZC_EBOUNDS:
                    raise RemoteProtocolError("packet offsets: outside the image (zc_recv_pages)")
                consumed += header.payload_size
                if known_zero:
                    self._mark(written_c, normal_c, nn)
                self._mark(arrived_c, normal_c, nn)
            nz = len(zero)
            if nz and to_file:
                zero_c = ffi.from_buffer("uint64_t[]", zero)
                with self._write_lock:
                    rc = lib.zc_write_zero_pages(self._fd, ctx.image_size, zero_c, nz, ps,
                                                 written_c, self._nwords, nwritten)
                if rc == lib.ZC_EBOUNDS:
                    raise RemoteProtocolError(
                        "packet offsets: outside the image (zc_write_zero_pages)")
                if rc:
                    raise OSError(rc, f"writing zero pages to the image file: "
                                      f"{os.strerror(rc)}")
                self._mark(arrived_c, zero_c, nz)
            elif nz:
                zero_c = ffi.from_buffer("uint64_t[]", zero)
                if lib.zc_zero_pages(self._base, ctx.image_size, zero_c, nz, ps, written_c,
                                     self._nwords, nwritten):
                    raise RemoteProtocolError("packet offsets: outside the image (zc_zero_pages)")
                self._mark(arrived_c, zero_c, nz)
            with self._lock:
                w.packets += 1
                w.normal_pages += nn
                w.zero_pages += nz
            after_data = True
            if hook is not None:
                hook("recv_packet", w.id)

    def _mark(self, bitmap_c: Any, offsets_c: Any, n: int) -> None:
        """Set the bits of `n` pages in one of the pool's bitmaps (in C, bounds checked)."""
        if lib.zc_mark_pages(bitmap_c, self._nwords, offsets_c, n, self._ctx.page_size):
            raise RemoteProtocolError("packet offsets: outside the image (zc_mark_pages)")

    def _at_sync(self, w: _Worker) -> str:
        """Record a SYNC packet and wait for the coordinator's release. _RUNNING: read on;
        _FINAL: this was the final sync, stop here; _STOPPED: the pool stops."""
        hook = self._hook
        if hook is not None:
            hook("recv_sync", w.id)
        with self._cond:
            w.synced += 1
            k = w.synced
            self._cond.notify_all()
            # The barrier: no worker reads past its k-th SYNC until every worker has read
            # its own, so a page sent after a sync point never lands before one sent
            # before it on another channel (ARCHITECTURE.md, invariant 2).
            while self._released < k:
                if self._stopping or self._exiting.is_set():
                    return _STOPPED
                self._cond.wait(_WAIT_SLICE)
            # Not a byte after the final SYNC is read: the device state is applied to
            # exactly what came before it (invariant 3), and check_complete() finds
            # anything after it still in the socket.
            return _FINAL if self._final == k else _RUNNING
