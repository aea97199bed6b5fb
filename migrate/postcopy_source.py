"""The source's side of post-copy, from the switch to the commit.

The guest is paused here (SourceJob._precopy did it) with its last dirty pages known.
Then: every data channel syncs (POSTCOPY_LISTEN), the bitmap of pages still dirty goes
over (POSTCOPY_DIRTY), the urgent channel is opened and bound to the session like a data
channel, and once the destination is ready the device state leaves: from that moment the
guest may run on the destination, so this one is held paused and never resumes by itself
(ARCHITECTURE.md, invariant 5). While the destination's guest runs, one thread answers its
page requests on the urgent channel first, and the data channels push the other dirty
pages in the background. The destination commits once every page has arrived; until its
COMMIT_ACK nothing here lets go of the image or its guest.

If the connection breaks after the device state left, PostcopyInterrupted says so: the
destination's guest waits for pages only this host holds. It knows the main channel's
records, the sender pool and the urgent channel; not the CLI.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import threading
import time
from array import array
from typing import TYPE_CHECKING

from zcmigrate import ZcmigrateError
from zcmigrate.channel.aead import Direction
from zcmigrate.channel.zcsocket import connect
from zcmigrate.migrate import faults
from zcmigrate.migrate.errors import CommitUncertain, MigrationError, PostcopyInterrupted
from zcmigrate.migrate.guest import GuestError, mark_handed_over
from zcmigrate.migrate.postcopy_resume import (
    POSTCOPY_CHECK,
    ResumeRecord,
    remove_resume_record,
    write_resume_record,
)
from zcmigrate.migrate.protocol import (
    DIRTY_CHUNK_PAGES,
    CommitAck,
    DeviceStateRecord,
    Keepalive,
    PostcopyComplete,
    PostcopyDirty,
    PostcopyEnd,
    PostcopyListen,
    PostcopyMissing,
    PostcopyReady,
    PostcopyRunning,
)
from zcmigrate.migrate.ratelimit import RateLimiter
from zcmigrate.multifd.pageflags import PageFlags
from zcmigrate.multifd.pages import dirty_offsets
from zcmigrate.multifd.urgent import REQUEST, UrgentChannel
from zcmigrate.multifd.wire import (
    CHALLENGE_SIZE,
    INIT_MAC_SIZE,
    RemoteProtocolError,
    encode_init,
)

if TYPE_CHECKING:
    from zcmigrate.migrate.source import SourceJob

_CHUNK_PAGES = 2048  # pages queued per step of the background push (as precopy's)


@dataclasses.dataclass
class PostcopyStats:
    """Post-copy's numbers, as query-migrate spells them (the destination measured the
    latency: from a fault read to its page placed)."""

    requests: int = 0
    latency_median_us: int = 0
    latency_p99_us: int = 0
    total_time_ms: int = 0
    urgent_pages: int = 0
    background_pages: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"postcopy-requests": self.requests,
                "postcopy-latency-median": self.latency_median_us,
                "postcopy-latency-p99": self.latency_p99_us,
                "postcopy-total-time": self.total_time_ms,
                "postcopy-urgent-pages": self.urgent_pages,
                "postcopy-background-pages": self.background_pages}


class PostcopySource:
    def __init__(self, job: SourceJob) -> None:
        self.job = job
        self._urgent: UrgentChannel | None = None
        self._stop = threading.Event()
        assert job._map is not None, "post-copy starts on a mapped image"
        # The pages sent on the urgent channel: the background push skips them.
        self._served = PageFlags(len(job._map) // job.page_size, job.page_size)
        self._served_any = False
        self._served_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # The destination said its guest runs (POSTCOPY_RUNNING, or a resume it accepted):
        # until then a break may have come before it ever had the device state.
        self._runs_there = False
        self.stats = PostcopyStats()

    def run(self, dirty: array[int], words: array[int], device_state: bytes) -> None:
        job = self.job
        assert job._main is not None and job._pool is not None and job._map is not None
        main, pool, params = job._main, job._pool, job.params
        npages = len(job._map) // job.page_size
        job.stats.postcopy = self.stats
        try:
            # The switch's sync: every precopy page is in place on the destination before
            # it punches out the stale ones (a late old copy must not refill a hole).
            res = pool.sync(timeout=params.peer_timeout)
            job.stats.synced(res.copied_channels)
            main.send(PostcopyListen(job.stats.iterations))
            self._send_dirty_list(words, npages)
            self._open_urgent()
            job._expect(PostcopyReady, params.peer_timeout,
                        "word that the destination is ready for post-copy")
            # Durably, before the device state may leave: whatever happens to this
            # process from here, `send --resume` finds the migration to finish.
            write_resume_record(job.image, ResumeRecord(
                uuid=job.uuid, page_size=job.page_size, image_size=len(job._map),
                device_state=device_state, destination=f"{job.dest.host}:{job.dest.port}"))
            with job._lock:
                job._check_exiting()
                assert job._guest is not None
                # The point of no return, as for the device state in precopy: the guest
                # may run on the destination from here, so this one is held.
                try:
                    job._guest.hold(job.uuid)
                except GuestError as e:
                    raise MigrationError(f"the guest's pause cannot be held: {e}") from e
                job._device_sent = True
            self._start_serving()
            faults.reached("source:postcopy-device-sending")
            main.send(DeviceStateRecord(device_state))
            faults.reached("source:postcopy-device-sent")
            job._expect(PostcopyRunning, params.peer_timeout,
                        "word that the guest runs on the destination", abortable=False)
            self._runs_there = True
            t_running = time.monotonic()
            if job._watchdog is not None:
                job._watchdog.cancel()
            if job.stats.t_pause is not None:
                job.stats.downtime_ms = (t_running - job.stats.t_pause) * 1000
            job.log.info("post-copy: the guest runs on the destination",
                         downtime_ms=round(job.stats.downtime_ms or 0, 1), pages=len(dirty))
            self._push(dirty)
            faults.reached("source:postcopy-pushed")
            ack = self._end(job.stats.iterations + 1)
        except ZcmigrateError as e:
            if job._device_sent:
                raise self._interrupted(e) from e
            raise
        finally:
            self._stop_serving()
        self._committed(ack, device_state)

    def resume(self, record: ResumeRecord) -> None:
        """`send --resume`: a new session of the migration record names is up (handshake
        with resume set, data channels bound). The destination lists the pages its guest
        still lacks; they go, requests first, then the usual end."""
        job = self.job
        assert job._main is not None and job._map is not None
        job.stats.postcopy = self.stats
        params = job.params
        # A destination that takes a resume holds the migration's record: its guest got
        # the go there.
        self._runs_there = True
        try:
            missing = self._recv_missing_list(len(job._map) // job.page_size)
            self._open_urgent()
            self._start_serving()  # its faults come as soon as the channel is admitted
            job._expect(PostcopyRunning, params.peer_timeout,
                        "word that the destination serves its guest again", abortable=False)
            job.log.info("post-copy resumed: the destination is served again",
                         missing_pages=len(missing))
            faults.reached("source:postcopy-resumed")
            self._push(missing)
            ack = self._end(1)
        except Exception as e:  # whatever broke, the migration stays interrupted
            raise self._interrupted(e) from e
        finally:
            self._stop_serving()
        self._committed(ack, record.device_state)

    def _recv_missing_list(self, npages: int) -> array[int]:
        """The POSTCOPY_MISSING records, in order and gap-free, as page offsets; a bit
        beyond the image is the destination's protocol error."""
        job = self.job
        words = array("Q", bytes(8 * ((npages + 63) // 64)))
        expect = 0
        while True:
            rec = job._expect(PostcopyMissing, job.params.peer_timeout,
                              "list of the pages the destination still lacks",
                              abortable=False)
            if rec.first != expect or rec.first + rec.count > npages:
                raise RemoteProtocolError(
                    f"POSTCOPY_MISSING: pages {rec.first}..{rec.first + rec.count} after "
                    f"{expect}, in an image of {npages} pages")
            chunk = array("Q")
            chunk.frombytes(rec.bitmap)
            if sys.byteorder == "big":
                chunk.byteswap()
            words[rec.first // 64:rec.first // 64 + len(chunk)] = chunk
            expect = rec.first + rec.count
            if rec.last:
                break
        if expect != npages:
            raise RemoteProtocolError(f"POSTCOPY_MISSING: the list ends at page {expect} of "
                                      f"{npages}")
        out = array("Q", bytes(8 * npages))
        # Bits past the last page in its word are never turned into offsets.
        return out[:dirty_offsets(words, npages, job.page_size, out)]

    def _end(self, iteration: int) -> CommitAck:
        """Every background page sent: POSTCOPY_END, then the destination's word that every
        page arrived, then its commit."""
        job = self.job
        assert job._main is not None and job._pool is not None
        params = job.params
        job._pool.sync(timeout=params.peer_timeout)
        job._main.send(PostcopyEnd(iteration))
        done = job._expect(PostcopyComplete, params.commit_timeout + params.peer_timeout,
                           "word that every page arrived", abortable=False)
        self.stats.requests = done.requests
        self.stats.latency_median_us = done.latency_median_us
        self.stats.latency_p99_us = done.latency_p99_us
        self.stats.total_time_ms = done.total_time_ms
        return job._expect(CommitAck, params.commit_timeout,
                           "commit from the destination", abortable=False)

    def _committed(self, ack: CommitAck, device_state: bytes) -> None:
        job = self.job
        if ack.device_state_sha256 != hashlib.sha256(device_state).digest():
            raise CommitUncertain("the destination acknowledged a commit of another device "
                                  "state than the one sent")
        downtime = job.stats.downtime_ms
        job.stats.committed()
        job.stats.downtime_ms = downtime  # post-copy's downtime ended when the guest ran
        job.log.info("committed", downtime_ms=round(downtime or 0, 1), **self.stats.to_dict())
        try:
            if job._guest is not None:
                job._guest.hand_over(job.uuid)
            else:
                # `send --resume` after the guest here died (or the host restarted): its
                # control file is marked, so that no guest starts on this copy by mistake.
                mark_handed_over(job.image, job.uuid)
        except GuestError as e:
            job.log.error("the source guest could not be marked handed over; it stays "
                          "paused: retire it with `zcmigrate retire`", error=str(e))
        # Only now: the destination owns every page, this image may go.
        remove_resume_record(job.image)

    def _interrupted(self, cause: BaseException) -> PostcopyInterrupted:
        img = self.job.image
        if self._runs_there:
            where = ("The guest runs on the destination and waits there for pages only this "
                     "host holds: it is not lost, but it cannot finish without them.")
        else:
            # The device state left but no word came back: the destination may never have
            # had it (then it started nothing and gave up), or runs the guest now.
            where = ("The device state was on its way but no word came back that the guest "
                     "runs on the destination: it may run there, waiting for pages only this host "
                     f"holds, or the destination may never have started it ({POSTCOPY_CHECK};"
                     f" only then `zcmigrate resume {img} --postcopy-never-started`).")
        return PostcopyInterrupted(
            f"post-copy interrupted: {self._error or cause}. {where} The guest here stays "
            f"paused (held) and {img} keeps every page: do not retire or resume it while its "
            f"guest may run there. Finish the migration with `zcmigrate send {img} --resume "
            "--to HOST:PORT` once the destination's receiver waits for it again; it can only "
            "be finished, never undone (docs/operations.md, \"Post-copy recovery\")")

    # ------------------------------------------------------------------ the switch

    def _send_dirty_list(self, words: array[int], npages: int) -> None:
        assert self.job._main is not None
        raw = words.tobytes() if sys.byteorder == "little" else _swapped(words)
        first = 0
        while True:
            count = min(DIRTY_CHUNK_PAGES, npages - first)
            lo = first // 8
            chunk = raw[lo:lo + (count + 63) // 64 * 8]
            last = first + count >= npages
            self.job._main.send(PostcopyDirty(first=first, count=count, bitmap=chunk,
                                              last=last))
            if last:
                return
            first += count

    def _open_urgent(self) -> None:
        """The urgent channel: connected and bound to the session like a data channel
        (the destination's challenge, our init record with its MAC), with the id after
        the data channels', and sealed with keys of its own when the session has some."""
        job = self.job
        assert job._map is not None
        ctx_n = job.params.multifd_channels
        peer_timeout = job.params.peer_timeout
        ch = connect(job.dest.host, job.dest.port, name="urgent", peer_timeout=peer_timeout)
        try:
            challenge = bytes(ch.read_exact(CHALLENGE_SIZE, peer_timeout))
            session = job._session
            mac = (session.binding_mac(ctx_n, challenge) if session is not None
                   else bytes(INIT_MAC_SIZE))
            ctx = job._wire_context()
            ch.write_all(encode_init(dataclasses.replace(ctx, channels=ctx_n + 1), ctx_n,
                                     mac))
        except BaseException:
            ch.close()
            raise
        self._urgent = UrgentChannel(
            ch, page_size=job.page_size, image_size=len(job._map),
            sealer=(session.sealer(Direction.SOURCE_TO_DESTINATION, ctx_n)
                    if session is not None else None),
            opener=(session.opener(Direction.DESTINATION_TO_SOURCE, ctx_n)
                    if session is not None else None))

    # ------------------------------------------------------------------ serving

    def _start_serving(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="postcopy-urgent",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        """Answer each request at once, with the pages as they are in the paused image."""
        urgent, m = self._urgent, self.job._map
        assert urgent is not None and m is not None
        ps = self.job.page_size
        try:
            while not self._stop.is_set():
                rec = urgent.recv(0.1)
                if rec is None:
                    continue
                if rec.kind != REQUEST:
                    raise MigrationError("urgent channel: the destination sent pages")
                data = b"".join(m[off:off + ps] for off in rec.offsets)
                urgent.send_pages(rec.offsets, data)
                with self._served_lock:
                    self._served.mark(array("Q", rec.offsets))
                    self._served_any = True
                self.stats.urgent_pages += len(rec.offsets)
        except BaseException as e:  # the serving thread records its failure, and ends
            if not self._stop.is_set():
                self._error = e
                self.job.exiting.set(e, "postcopy urgent")

    def _stop_serving(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._urgent is not None:
            self._urgent.close()

    def _push(self, dirty: array[int]) -> None:
        """The other dirty pages, over the data channels, at max-bandwidth; a page the
        urgent channel has already sent is skipped (its one version is there)."""
        job = self.job
        assert job._pool is not None
        ps = job.page_size
        pacing = RateLimiter(lambda: job.params.max_bandwidth)
        queued = 0
        for i in range(0, len(dirty), _CHUNK_PAGES):
            if self._error is not None:
                raise MigrationError(f"the urgent channel failed: {self._error}")
            if job.exiting.is_set():
                err = job.exiting.error
                raise err if isinstance(err, ZcmigrateError) else MigrationError(str(err))
            chunk = dirty[i:i + _CHUNK_PAGES]
            with self._served_lock:
                if self._served_any:
                    chunk = self._served.unset_only(chunk)
            if chunk:
                job._pool.send_pages(chunk)
                queued += len(chunk) * ps
                self.stats.background_pages += len(chunk)
                job.stats.queued(len(chunk) * ps)
                job._last_sent = time.monotonic()
            while (ahead := pacing.delay(queued)) > 0:
                if job.exiting.wait(min(ahead, 0.1)):
                    break
                if time.monotonic() - job._last_sent >= job.params.peer_timeout / 3:
                    assert job._main is not None
                    job._main.send(Keepalive())
                    job._last_sent = time.monotonic()
            job._report()


def _swapped(words: array[int]) -> bytes:
    w = array("Q", words)
    w.byteswap()
    return w.tobytes()


__all__ = ["PostcopySource", "PostcopyStats"]
