"""The multifd sender pool: N worker threads, each owning one data channel, sending pages as
iovecs straight from the source mapping (or, sealed, as ciphertext from a pool of send
buffers), with a bounded job queue each and sync on request.
It knows pages and packets; it must not know guests, the CLI, systemd or the main channel.
"""

from __future__ import annotations

import os
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from zcmigrate.channel.aead import Direction, Sealer, SessionKeys
from zcmigrate.channel.iovec import IoVec
from zcmigrate.channel.sendpool import SendPool, SendPoolStats
from zcmigrate.channel.zcsocket import Channel
from zcmigrate.multifd.exiting import Exiting, MultifdError
from zcmigrate.multifd.pool import PoolBase
from zcmigrate.multifd.stats import ChannelCounters, PoolStats, SyncResult
from zcmigrate.multifd.wire import (
    HEADER_SIZE,
    TAG_SIZE,
    LocalProtocolError,
    WireContext,
    encode_init,
    encode_packet,
    encode_sync,
    sealed_capacity,
)
from zcmigrate.native import ffi, lib

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["Hook", "SenderPool", "SyncResult"]

Hook = Callable[[str, int], None]

_log = structlog.get_logger("zcmigrate.multifd.sender")

# Every condition wait re-checks the pool's state at least this often. Wake-ups come from
# notify (work, room, completion) or from Exiting; the slice only bounds a missed one.
_WAIT_SLICE = 0.5
# How long close() waits for the workers after it has forced them out (Exiting set).
_FORCED_JOIN = 5.0
_NO_OFFSETS: array[int] = array("Q")


@dataclass(slots=True)
class _Pages:
    offsets: array[int]  # the pool's own copy: the caller may reuse its array at once
    packet_num: int


@dataclass(slots=True)
class _Sync:
    sync_num: int
    packet_num: int


class _Worker:
    """One channel's state; all but the per-worker buffers are guarded by the pool lock."""

    def __init__(self, channel_id: int, channel: Channel, lock: threading.RLock,
                 pages_alloc: int, sealer: Sealer | None = None,
                 send_buffers: SendPool | None = None) -> None:
        self.id = channel_id
        self.channel = channel
        self.name = f"multifd-send-{channel_id}"
        self.work = threading.Condition(lock)
        self.queue: deque[_Pages | _Sync] = deque()
        self.load = 0  # page jobs queued or being sent: what "least loaded" compares
        self.synced = 0  # the last sync number this worker completed
        self.copied = 0  # what its flush returned at that sync
        self.packets = 0
        self.normal_pages = 0
        self.zero_pages = 0
        self.syncs = 0
        # The channel's numbering (docs/protocol.md, "Sequence"), touched by its worker
        # thread alone: the last seq sent, and what went out since the last SYNC.
        self.seq = 0
        self.since_sync_packets = 0
        self.since_sync_pages = 0
        self.thread: threading.Thread | None = None
        # Reused for every job, so the hot path allocates nothing per page.
        self.iov = IoVec(pages_alloc)
        self.normal = array("Q", bytes(8 * pages_alloc))
        self.zero = array("Q", bytes(8 * pages_alloc))
        self.normal_c: Any = ffi.from_buffer("uint64_t[]", self.normal)
        self.zero_c: Any = ffi.from_buffer("uint64_t[]", self.zero)
        self.nzero: Any = ffi.new("uint32_t *")
        # Sealed packets (docs/protocol.md, "Sealed packets"): this channel's sealer, whose
        # counter is always the next packet's seq - 1, and the buffers its ciphertext
        # leaves from; None for clear packets.
        self.sealer = sealer
        self.send_buffers = send_buffers


class SenderPool(PoolBase):
    """N sender workers over N connected data channels (index == channel id).

    send_pages() and sync() are called from one thread (the migration thread); statistics()
    from any. Every wait is bounded or woken by the shared Exiting.

    hook(point, channel_id), for tests, runs in the worker at: "send_packet" (before a data
    packet is written), "sent_packet" (after writev returned), "send_sync" (before a SYNC
    packet is written). An exception in the hook fails the worker like any other.

    keys: with a sealed context (ctx.sealed), the session whose source-to-destination key
    of each channel seals its packets; required then, refused otherwise. send_buffers: the
    send buffers per channel the ciphertext leaves from with zero copy (each reused only
    after the completion of every zero-copy call that carried it; without zero copy one
    is enough and one is made). send_buffer_poison, for tests: a
    pattern written over every send buffer as it comes back to its pool, so that a buffer
    reused too early shows in what the destination receives.
    """

    role = "send"

    def __init__(
        self,
        channels: Sequence[Channel],
        ctx: WireContext,
        image: Buffer,
        *,
        zero_copy: bool,
        zero_page_detection: bool = True,
        queue_depth: int = 4,
        flush_timeout: float | None = 60.0,
        exiting: Exiting | None = None,
        hook: Hook | None = None,
        init_macs: Sequence[bytes] | None = None,
        keys: SessionKeys | None = None,
        send_buffers: int = 4,
        send_buffer_poison: bytes | None = None,
    ) -> None:
        if queue_depth < 1:
            raise ValueError(f"queue_depth {queue_depth}, expected at least 1")
        if ctx.sealed != (keys is not None):
            raise ValueError("a sealed context needs the session's keys, and only it takes "
                             f"them (sealed {ctx.sealed}, keys given: {keys is not None})")
        if send_buffers < 1:
            raise ValueError(f"send_buffers {send_buffers}, expected at least 1")
        for i, ch in enumerate(channels):
            if zero_copy and not ch.supports_zero_copy:
                raise MultifdError(f"multifd send channel {i}: {ch.zero_copy_refusal}",
                                   channel_id=i)
        super().__init__(channels, ctx, image, writable=False, exiting=exiting)
        self._zero_copy = zero_copy
        self._zero_page_detection = zero_page_detection
        self._depth = queue_depth
        self._flush_timeout = flush_timeout
        self._hook = hook
        # Each channel's init record carries the MAC that binds it to the session (over
        # the destination's challenge, read by whoever connected it); zeros without a key.
        self._init_macs = list(init_macs) if init_macs is not None else None
        if self._init_macs is not None and len(self._init_macs) != len(channels):
            raise ValueError(f"{len(self._init_macs)} init MACs for {len(channels)} channels")
        self._room = threading.Condition(self._lock)  # producers and the sync waiter
        self._workers: list[_Worker] = []
        try:
            for i, ch in enumerate(channels):
                sealer = pool = None
                if keys is not None:
                    # A packet's ciphertext: its offsets and pages, and their two tags.
                    size = sealed_capacity(ctx)
                    sealer = keys.sealer(Direction.SOURCE_TO_DESTINATION, i)
                    # Without zero copy the kernel has copied a buffer when writev returns,
                    # so it is free again at once: one per channel is all that gets used,
                    # the same one each packet (warm in cache), and no others are faulted
                    # in at set-up.
                    count = send_buffers if zero_copy else 1
                    pool = SendPool(ch, count, size, zero_copy=zero_copy,
                                    poison=send_buffer_poison)
                self._workers.append(_Worker(i, ch, self._lock, ctx.pages_alloc, sealer, pool))
        except BaseException:
            self._close_sealing()
            raise
        self._last_offset = ctx.image_size - ctx.page_size
        self._next_packet = 0  # packet_num, shared by all channels as QEMU's is
        self._sync_num = 0
        self._send_waits = 0
        self._join_exiting()

    # ------------------------------------------------------------------ state

    def _wake(self) -> None:
        with self._lock:
            for w in self._workers:
                w.work.notify_all()
            self._room.notify_all()

    # ------------------------------------------------------------------ API


    def send_pages(self, offsets: array[int]) -> None:
        """Queue every page in `offsets` (byte offsets into the image, array('Q')).

        Split into jobs of at most pages_alloc pages, each queued to the least-loaded worker;
        blocks while every queue is full (backpressure). Raises MultifdError once exiting.
        """
        if not isinstance(offsets, array) or offsets.typecode != "Q":
            raise TypeError("send_pages() takes array('Q') of byte offsets")
        self._raise_if_failed()
        n = len(offsets)
        if n == 0:
            return
        # C reads each page before the wire encoder checks its offset, so the one bound that
        # keeps every read inside the mapping is checked here, once per call (max() runs in C).
        top = max(offsets)
        if top > self._last_offset:
            raise LocalProtocolError(
                f"send_pages: offset 0x{top:x} outside the image, expected at most "
                f"0x{self._last_offset:x} (image size {self._ctx.image_size})"
            )
        pa = self._ctx.pages_alloc
        for start in range(0, n, pa):
            self._dispatch(offsets[start:start + pa])

    def _dispatch(self, job: array[int]) -> None:
        with self._lock:
            waited = False
            while True:
                self._raise_if_failed()
                if not self._started or self._stopping:
                    raise MultifdError("multifd send: the pool is not running "
                                       "(not started, or closed)")
                best: _Worker | None = None
                for w in self._workers:
                    if len(w.queue) < self._depth and (best is None or w.load < best.load):
                        best = w
                if best is not None:
                    break
                if not waited:
                    self._send_waits += 1
                    waited = True
                self._room.wait(_WAIT_SLICE)
            best.queue.append(_Pages(job, self._next_packet))
            self._next_packet += 1
            best.load += 1
            best.work.notify()

    def sync(self, timeout: float | None = None) -> SyncResult:
        """Every worker, after its queued jobs, sends a SYNC packet and (zero copy) flushes.

        Returns when all N did both. Raises MultifdError if a worker failed, or if `timeout`
        seconds passed first (that fails the pool: a sync half done cannot be resumed).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._raise_if_failed()
            if not self._started or self._stopping:
                raise MultifdError("multifd send: the pool is not running (not started, or closed)")
            self._sync_num += 1
            k = self._sync_num
            for w in self._workers:
                # Past the queue bound on purpose: one SYNC per worker per sync() call.
                w.queue.append(_Sync(k, self._next_packet))
                self._next_packet += 1
                w.work.notify()
            while True:
                self._raise_if_failed()
                behind = [w.id for w in self._workers if w.synced < k]
                if not behind:
                    return SyncResult(copied_channels=sum(w.copied for w in self._workers),
                                      sync_num=k)
                wait = self._next_wait(deadline, _WAIT_SLICE)
                if wait is None:
                    failure = MultifdError(
                        f"multifd send channel {behind[0]}: sync {k} not done after "
                        f"{timeout:g} s (channels still behind: {behind})",
                        channel_id=behind[0],
                    )
                    break
                self._room.wait(wait)
        self._fail(failure, "multifd-send sync")

    def statistics(self) -> PoolStats:
        with self._lock:
            rows = [(w.id, w.channel, w.packets, w.normal_pages, w.zero_pages, w.syncs)
                    for w in self._workers]
            jobs = sum(len(w.queue) for w in self._workers)
            waits = self._send_waits
        chans = []
        for cid, ch, packets, normal, zero, syncs in rows:
            st = ch.statistics()
            chans.append(ChannelCounters(
                id=cid, packets=packets, bytes=st.bytes_sent, normal_pages=normal,
                zero_pages=zero, syncs=syncs, zero_copy_queued=st.zero_copy_queued,
                zero_copy_completed=st.zero_copy_completed,
                zero_copy_copied=st.zero_copy_copied, enobufs_retries=st.enobufs_retries,
            ))
        return PoolStats.from_channels(tuple(chans), jobs_queued=jobs, send_waits=waits)

    def send_buffer_statistics(self) -> list[SendPoolStats]:
        """Each channel's send buffers (sealed packets only; empty for clear ones): how
        often a worker waited for a completion to free one, and how many were in flight."""
        return [w.send_buffers.statistics() for w in self._workers
                if w.send_buffers is not None]

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop the workers (after their queued work, unless exiting), join them, close channels.

        If the queued work is not done after `timeout` seconds, Exiting is set to force the
        workers out. Idempotent.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            for w in self._workers:
                w.work.notify_all()
            self._room.notify_all()
        threads = [w.thread for w in self._workers if w.thread is not None]
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            self._exiting.set(MultifdError(
                f"multifd send: close: workers did not finish their queued work in {timeout} s"),
                where="multifd-send close")
            for t in threads:
                t.join(_FORCED_JOIN)
        if self._release(threads):
            self._close_sealing()

    def _close_sealing(self) -> None:
        """Unmap the send buffers and free the sealers' contexts: only once no worker can
        touch them (a buffer still in flight stays mapped while the channel holds it)."""
        for w in self._workers:
            if w.send_buffers is not None:
                w.send_buffers.close()
            if w.sealer is not None:
                w.sealer.close()

    # ------------------------------------------------------------------ workers

    def _run(self, w: _Worker) -> None:
        log = _log.bind(channel=w.id)
        try:
            if self._init_macs is None:
                w.channel.write_all(encode_init(self._ctx, w.id))
            else:
                w.channel.write_all(encode_init(self._ctx, w.id, self._init_macs[w.id]))
            while True:
                job = self._take(w)
                if job is None:
                    break
                if isinstance(job, _Pages):
                    self._send_job(w, job)
                else:
                    self._send_sync(w, job)
        except BaseException as e:  # a worker thread must record every failure, and end
            error = MultifdError.on_channel("send", w.id, e)
            if self._exiting.set(error, where=w.name):
                log.error("send channel failed", error=str(error))
            return
        log.debug("send channel stopped")

    def _take(self, w: _Worker) -> _Pages | _Sync | None:
        """The worker's next job, or None when it must stop (exiting, or closing and idle)."""
        with self._lock:
            while not w.queue:
                if self._stopping or self._exiting.is_set():
                    return None
                w.work.wait(_WAIT_SLICE)
            if self._exiting.is_set():
                return None
            job = w.queue.popleft()
            self._room.notify_all()  # room in a queue: a blocked send_pages() may go on
            return job

    def _send_job(self, w: _Worker, job: _Pages) -> None:
        ctx = self._ctx
        ps = ctx.page_size
        offsets = job.offsets
        n = len(offsets)
        offsets_c = ffi.from_buffer("uint64_t[]", offsets)
        if self._zero_page_detection:
            nn = int(lib.zc_split_zero(self._base, ctx.image_size, offsets_c, n, ps, w.normal_c,
                                       len(w.normal), w.zero_c, len(w.zero), w.nzero))
            if nn < 0:
                raise LocalProtocolError(f"zc_split_zero refused a job of {n} pages: "
                                         f"{os.strerror(-nn)}")
            nz = int(w.nzero[0])
            normal, zero, normal_c = w.normal[:nn], w.zero[:nz], w.normal_c
        else:
            nn, nz = n, 0
            normal, zero, normal_c = offsets, _NO_OFFSETS, offsets_c
        # Numbered here, in the worker, because the order packets leave on the channel is
        # the order the receiver checks; every packet encoded is sent, or the pool fails.
        header = encode_packet(ctx, packet_num=job.packet_num, seq=w.seq + 1, normal=normal,
                               zero=zero)
        w.seq += 1
        w.since_sync_packets += 1
        w.since_sync_pages += nn + nz
        hook = self._hook
        if w.sealer is not None:
            self._send_sealed(w, header, normal_c, nn)
        else:
            cnt = int(lib.zc_page_iov(self._base, ctx.image_size, normal_c, nn, ps,
                                      w.iov.entries, w.iov.capacity))
            if cnt < 0:
                raise LocalProtocolError(f"zc_page_iov refused offsets the wire encoder "
                                         f"accepted: {os.strerror(-cnt)}")
            # The mapping owns the pages: with zero copy the channel holds it until their
            # completions (the pool itself keeps it until every worker was joined).
            w.iov.set_filled(cnt, nn * ps, keep=self._image_c)
            if hook is not None:
                hook("send_packet", w.id)
            w.channel.writev(w.iov, header=header, zero_copy=self._zero_copy)
        with self._lock:
            w.packets += 1
            w.normal_pages += nn
            w.zero_pages += nz
            w.load -= 1
            self._room.notify_all()
        if hook is not None:
            hook("sent_packet", w.id)

    def _send_sealed(self, w: _Worker, packet: bytes, normal_c: Any, nn: int) -> None:
        """Seal the packet's offsets and its nn pages (read at normal_c in the mapping) in
        C into a send buffer (the pages in one pass from the mapping), and send its clear
        header, then the buffer."""
        assert w.sealer is not None and w.send_buffers is not None
        ctx = self._ctx
        # Bytes (320, and 8 per page), not views: nothing the channel pins for a send is an
        # exported memoryview that a failed send's traceback could keep in a cycle (see
        # SendPool.send for the crash that caused).
        header, lead = packet[:HEADER_SIZE], packet[HEADER_SIZE:]
        sealed = len(lead) + nn * ctx.page_size + 2 * TAG_SIZE
        self._check_counter(w)
        if self._hook is not None:
            self._hook("send_packet", w.id)
        # Waits, if every buffer is still in flight, for the completion that frees the
        # oldest: the seeds' rule (004, "the buffer may not be modified until the
        # notification"), here on our own buffers.
        buf = w.send_buffers.acquire(self._flush_timeout)
        try:
            w.sealer.seal_packet(self._base, ctx.image_size, normal_c, nn, ctx.page_size,
                                 buf.cdata, buf.size, aad=header, lead=lead)
        except BaseException:
            w.send_buffers.release(buf)
            raise
        w.send_buffers.send(buf, sealed, header=header)

    def _check_counter(self, w: _Worker) -> None:
        """The nonce's counter is the packet's seq - 1 (docs/protocol.md): the one the
        receiver derives from the header. w.seq is this packet's seq already."""
        assert w.sealer is not None
        if w.sealer.next_counter != w.seq - 1:
            raise LocalProtocolError(
                f"sealing channel {w.id}: the sealer's next counter is "
                f"{w.sealer.next_counter}, packet seq {w.seq} needs {w.seq - 1}")

    def _send_sync(self, w: _Worker, job: _Sync) -> None:
        hook = self._hook
        if hook is not None:
            hook("send_sync", w.id)
        # The counts let the receiver prove nothing went missing between two SYNCs, even
        # past a middlebox that renumbers what it forwards.
        sync = encode_sync(self._ctx, job.packet_num, w.seq + 1, packets=w.since_sync_packets,
                           pages=w.since_sync_pages)
        w.seq += 1
        w.since_sync_packets = w.since_sync_pages = 0
        if w.sealer is not None:
            # Its tag over the header alone: the counts are authenticated, the body empty.
            self._check_counter(w)
            sync += w.sealer.seal(b"", aad=sync)
        w.channel.write_all(sync)
        copied = 0
        if self._zero_copy:
            # Why the flush is here: with MSG_ZEROCOPY, writev only queued this iteration's
            # pages; the kernel reads them from the mapping later. Waiting for every
            # completion before sync() returns makes sure no page can be sent again (next
            # iteration, maybe on another channel) while an older send of it is still in
            # flight, so the newer version always lands later (ARCHITECTURE.md, invariant 2),
            # and nothing the migration sends after the final sync overtakes a page
            # (invariant 3). QEMU flushes at the same point, in multifd_send_sync_main().
            # A return of 1 (the kernel copied after all) feeds dirty-sync-missed-zero-copy.
            copied = w.channel.flush(self._flush_timeout)
        with self._lock:
            w.syncs += 1
            w.copied = copied
            w.synced = job.sync_num
            self._room.notify_all()
