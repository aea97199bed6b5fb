"""The destination's side of post-copy, from the source's POSTCOPY_LISTEN to the commit.

At the switch: the precopy receive stops at its final sync, the pages the source says are
still dirty are punched out of the image (so that they fault as missing), the image goes
into place, and the guest is started here with `zcmigrate guest IMAGE --postcopy SOCKET`
in a session of its own (it must outlive this receiver), then handed its device state.
While it runs: its faults are read from its userfaultfd and turned into requests on the
urgent channel (a page that was not dirty is a zero page never written: placed at once),
the source's answers and the background pages of the data channels are placed with
UFFDIO_COPY (which never overwrites a page the guest already has). When every page is
there: the holes left are zero pages and are filled, the guest is told (it unregisters),
and only then the image and the device state are committed durably.

If the source goes away meanwhile, the guest waits in the kernel for the pages it lacks
(it keeps its own userfaultfd: nothing is invented) and the receiver says so and ends
with ReceivePostcopyInterrupted. It knows the main channel's records, the guest's link and
pages; not the CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import mmap
import os
import statistics
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Final

from zcmigrate import ZcmigrateError
from zcmigrate.channel.aead import Direction, Opener, SessionKeys
from zcmigrate.channel.fdpass import FdListener
from zcmigrate.channel.zcsocket import Channel, Listener
from zcmigrate.migrate import faults
from zcmigrate.migrate.admission import admit_data_channels
from zcmigrate.migrate.errors import (
    PostcopyUnacknowledged,
    ReceiveError,
    ReceivePostcopyInterrupted,
)
from zcmigrate.migrate.guest import (
    DeviceState,
    GuestError,
    PostcopyGuest,
    read_control_record,
)
from zcmigrate.migrate.imagefiles import guest_log_path, postcopy_socket
from zcmigrate.migrate.incoming import IncomingImage
from zcmigrate.migrate.mainchannel import MainChannel
from zcmigrate.migrate.postcopy_resume import (
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
from zcmigrate.multifd.exiting import Exiting
from zcmigrate.multifd.pageflags import PageFlags
from zcmigrate.multifd.pages import dirty_offsets
from zcmigrate.multifd.placement import Handed, PlacementReaders
from zcmigrate.multifd.receiver import ReceiverPool
from zcmigrate.multifd.urgent import MAX_PAGES, PAGES, UrgentChannel
from zcmigrate.multifd.userfault import (
    RangeGone,
    UserfaultError,
    UserfaultRange,
    filesystem_type,
    punch_pages,
)
from zcmigrate.multifd.wire import (
    InitTracker,
    RemoteProtocolError,
    SequenceTracker,
    WireContext,
)

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

GO_TIMEOUT: Final = 86400.0
"""The guest's --go-timeout: precopy may last long; the guest waits doing nothing, and
exits should this receiver die (its link closes)."""
GUEST_START_TIMEOUT: Final = 30.0
"""From spawning the guest to its hello with the userfaultfd: a Python start on a loaded
host takes a second or two; far longer means it failed (its log says why)."""
TAKE_OVER_WAIT: Final = 30.0
"""How long `receive --resume` waits for the guest to reach it: the guest tries every
0.2 s, so far longer means no guest waits on this image."""
_SLICE: Final = 0.1
_ZERO_RUN: Final = 256  # zero pages placed per UFFDIO_COPY when holes are filled


def urgent_channel_id(ctx: WireContext) -> int:
    """The urgent channel's id: the one after the data channels' (its init record, its
    binding MAC and, with a key, its sealing keys are its own)."""
    return ctx.channels


@dataclasses.dataclass
class PostcopyOutcome:
    """What post-copy did, for the receiver's report (query-migrate's spelling)."""

    guest_pid: int
    requests: int
    latency_median_us: int
    latency_p99_us: int
    total_time_ms: int
    dirty_pages: int
    filled_zero_pages: int

    def to_dict(self) -> dict[str, int]:
        return {"postcopy-requests": self.requests,
                "postcopy-latency-median": self.latency_median_us,
                "postcopy-latency-p99": self.latency_p99_us,
                "postcopy-total-time": self.total_time_ms,
                "postcopy-dirty-pages": self.dirty_pages,
                "guest-pid": self.guest_pid}


def latency_summary(samples_ns: Sequence[int]) -> tuple[int, int]:
    """Median and 99th percentile in microseconds (0, 0 without samples)."""
    if not samples_ns:
        return 0, 0
    ordered = sorted(samples_ns)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return int(statistics.median(ordered) / 1000), int(p99 / 1000)


class PostcopyDestination:
    """One post-copy, driven from the destination's main-channel thread."""

    def __init__(
        self,
        *,
        main: MainChannel | None,
        listener: Listener,
        pool: ReceiverPool | None,
        ctx: WireContext,
        incoming: IncomingImage,
        session: SessionKeys | None,
        peer_timeout: float,
        exiting: Exiting,
        check_alive: Callable[[], None],
        begin_commit: Callable[[], None],
        status: Callable[[str], None],
        log: FilteringBoundLogger,
        guest_args: Sequence[str] = (),
    ) -> None:
        self._main_ch = main  # None until a session: a receiver that takes over has none
        self.listener = listener
        self.pool = pool
        self.ctx = ctx
        self.incoming = incoming
        self.session = session
        self.peer_timeout = peer_timeout
        self.exiting = exiting
        self.check_alive = check_alive
        self.begin_commit = begin_commit
        self.status = status
        self.log = log
        self.guest_args = list(guest_args)
        self.ps = ctx.page_size
        self.npages = ctx.image_size // ctx.page_size
        self._lock = threading.Lock()
        # One flag per page: set while the page is stale here (dirty at the switch and not
        # placed since). A fault on a page that is not pending is a zero page.
        self._pending = PageFlags(self.npages, self.ps)
        self._left = 0
        self._requested: dict[int, int] = {}  # page -> monotonic ns of its request
        self._latency_ns: list[int] = []
        self._requests = 0
        self._zero = bytes(self.ps * _ZERO_RUN)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._range: UserfaultRange | None = None
        self._urgent: UrgentChannel | None = None
        self._readers: PlacementReaders | None = None
        self._guest: PostcopyGuest | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._fd_listener: FdListener | None = None
        self._t_running = 0.0
        self._t_last_page = 0.0
        self._starter: threading.Thread | None = None
        self._start_error: ReceiveError | None = None
        self._went = False  # the guest was sent its go: it may run here
        self._device_state: bytes | None = None  # for the commit, after a resume too
        self._openers: list[Opener] = []  # a resumed session's sealed data channels
        self._ndirty = 0
        self._keep_image = False  # precopy completed instead: the image is committed

    @property
    def main(self) -> MainChannel:
        assert self._main_ch is not None, "no session yet"
        return self._main_ch

    # ------------------------------------------------------------------ advise

    def advise(self) -> None:
        """POSTCOPY_ADVISE, at the start of the migration: check that post-copy can run
        here, put the image in place and start the guest on it now, so that its start
        (a new process: a second or so) is not paid in the downtime. It registers its
        mapping and waits for its go; the precopy pages land in the file meanwhile."""
        fd = self.incoming.fd
        fs = filesystem_type(fd)
        if fs != "tmpfs":
            raise ReceiveError(f"post-copy needs the destination image on a tmpfs (such as "
                               f"/dev/shm), where missing pages can be reported; "
                               f"{self.incoming.image.parent} is on {fs}")
        if self.ps != mmap.PAGESIZE:
            raise ReceiveError(f"post-copy needs {mmap.PAGESIZE}-byte pages, this "
                               f"migration has {self.ps}-byte pages")
        self.incoming.place_for_postcopy()
        self._spawn_guest()
        self._starter = threading.Thread(target=self._accept_guest, name="postcopy-guest",
                                         daemon=True)
        self._starter.start()

    def not_needed(self) -> None:
        """Precopy converged before any switch: the waiting guest never ran and goes; the
        image stays (the precopy commit owns it now)."""
        if self._starter is not None:
            self._starter.join(GUEST_START_TIMEOUT)
        self._kill_unstarted_guest()
        self._keep_image = True

    def close(self) -> None:
        """After a failure before the go, or at the end: stop what runs; a guest that
        never got its go is stopped and its image, never run, discarded."""
        self._stop_threads()
        if self._starter is not None:
            self._starter.join(GUEST_START_TIMEOUT)
        if not self._went:
            self._kill_unstarted_guest()
            if not self._keep_image:
                self.incoming.discard_placed()
        if self._guest is not None:
            self._guest.close()  # the guest keeps its own descriptor
            self._guest = None
        for opener in self._openers:
            opener.close()
        self._openers = []
        if self._fd_listener is not None:
            self._fd_listener.close()
            self._fd_listener = None

    # ------------------------------------------------------------------ the switch

    def run(self, listen: PostcopyListen) -> PostcopyOutcome:
        """From POSTCOPY_LISTEN to the commit; the caller sends nothing meanwhile."""
        # Every precopy page is in place once every channel passed the SYNC before
        # POSTCOPY_LISTEN; none after it is read by the pool (final): from here the data
        # channels are ours, for the background pages.
        assert self.pool is not None, "a receiver that takes over has no precopy"
        self.pool.sync(timeout=self.peer_timeout, final=True)
        self.pool.check_complete()
        offsets = self._dirty_list()
        # Stale pages out: each faults as missing from now on, until its last version
        # arrives. Punched before the guest runs, so it can never read one.
        punch_pages(self.incoming.fd, offsets, self.ps)
        with self._lock:
            self._left = self._pending.mark(offsets)
        self.log.info("post-copy: stale pages punched out", dirty_pages=len(offsets))
        if self._starter is not None:
            self._starter.join(GUEST_START_TIMEOUT)
        if self._start_error is not None:
            raise self._start_error
        self._admit_urgent()
        self.main.send(PostcopyReady())
        faults.reached("destination:postcopy-ready")
        rec = self.main.recv(self.peer_timeout, abort=self.check_alive)
        assert isinstance(rec, DeviceStateRecord)  # the table admits nothing else here
        state = DeviceState.decode(rec.data)
        # From here the guest may run here: nothing turns this into "nothing committed".
        self.begin_commit()
        # Before the go: should this receiver die, `receive IMAGE --resume` finds here
        # which migration the waiting guest belongs to.
        write_resume_record(self.incoming.image, ResumeRecord(
            uuid=self.ctx.uuid, page_size=self.ps, image_size=self.ctx.image_size,
            device_state=rec.data, destination="", role="destination"))
        self._went = True
        return self._serve(state, rec.data, len(offsets))

    def _admit_urgent(self) -> None:
        """The urgent channel: admitted as one more data channel of the session, the one
        after the data channels (urgent_channel_id)."""
        urgent_ch = admit_data_channels(
            self.listener, InitTracker(dataclasses.replace(self.ctx,
                                                           channels=self.ctx.channels + 1)),
            n=1, first=urgent_channel_id(self.ctx), main=self.main,
            binding=self.session.binding_mac if self.session is not None else None,
            timeout=self.peer_timeout, peer_timeout=self.peer_timeout,
            abort=self.check_alive)[0]
        urgent_ch.name = "urgent"
        cid = urgent_channel_id(self.ctx)
        self._urgent = UrgentChannel(
            urgent_ch, page_size=self.ps, image_size=self.ctx.image_size,
            sealer=(self.session.sealer(Direction.DESTINATION_TO_SOURCE, cid)
                    if self.session is not None else None),
            opener=(self.session.opener(Direction.SOURCE_TO_DESTINATION, cid)
                    if self.session is not None else None))

    def _dirty_list(self) -> array[int]:
        """The POSTCOPY_DIRTY records, in order and gap-free, as page offsets."""
        words = array("Q", bytes(8 * ((self.npages + 63) // 64)))
        expect = 0
        while True:
            rec = self.main.recv(self.peer_timeout, abort=self.check_alive)
            assert isinstance(rec, PostcopyDirty)
            if rec.first != expect or rec.first + rec.count > self.npages:
                raise RemoteProtocolError(
                    f"POSTCOPY_DIRTY: pages {rec.first}..{rec.first + rec.count} after "
                    f"{expect}, in an image of {self.npages} pages")
            chunk = array("Q")
            chunk.frombytes(rec.bitmap)
            if sys.byteorder == "big":
                chunk.byteswap()
            words[rec.first // 64:rec.first // 64 + len(chunk)] = chunk
            expect = rec.first + rec.count
            if rec.last:
                break
        if expect != self.npages:
            raise RemoteProtocolError(f"POSTCOPY_DIRTY: the list ends at page {expect} of "
                                      f"{self.npages}")
        out = array("Q", bytes(8 * self.npages))
        return out[:dirty_offsets(words, self.npages, self.ps, out)]

    def _spawn_guest(self) -> None:
        """Start the guest on IMAGE, in its own session (a signal to the receiver's
        process group must not reach it, and it outlives the receiver)."""
        image = self.incoming.image
        sock = postcopy_socket(image)
        self._fd_listener = FdListener(sock)
        # It waits for its go as long as precopy lasts; should this receiver die first,
        # its link closes and it exits, having run nothing.
        argv = [sys.executable, "-m", "zcmigrate", "guest", str(image), "--postcopy",
                str(sock), "--go-timeout", str(GO_TIMEOUT), *self.guest_args]
        logf = open(guest_log_path(image), "ab")  # noqa: SIM115 - the child keeps it
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          close_fds=True)
        finally:
            logf.close()
        self.log.info("post-copy guest started", pid=self._proc.pid,
                      log=str(guest_log_path(image)))

    def _accept_guest(self) -> None:
        """Take the guest's userfaultfd (in a thread: precopy goes on meanwhile)."""
        assert self._fd_listener is not None and self._proc is not None
        image = self.incoming.image
        try:
            guest = PostcopyGuest.accept(self._fd_listener, GUEST_START_TIMEOUT)
        except GuestError as e:
            self._start_error = ReceiveError(f"the post-copy guest did not start: {e}; see "
                                             f"{guest_log_path(image)}")
            return
        if guest.peer.pid != self._proc.pid:
            guest.close()
            self._start_error = ReceiveError(
                f"a process other than our guest (pid {guest.peer.pid}) connected to "
                f"{self._fd_listener.path}")
            return
        self._guest = guest
        self._range = guest.pages

    def _kill_unstarted_guest(self) -> None:
        """A guest that never got its go has run nothing: it may simply go."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)

    # ------------------------------------------------------------------ serving

    def _start_serving(self, channels: Sequence[Handed]) -> None:
        """The background readers on the data channels, the fault loop and the urgent
        channel's reader."""
        self._readers = PlacementReaders(channels, self.ctx, self._place, self.exiting)
        self._readers.start()
        for name, target in (("postcopy-faults", self._fault_loop),
                             ("postcopy-urgent", self._urgent_loop)):
            t = threading.Thread(target=self._guarded, args=(target,), name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, state: DeviceState, device_state: bytes, ndirty: int) -> PostcopyOutcome:
        assert self._guest is not None and self._range is not None and self._urgent is not None
        self._device_state = device_state
        self._ndirty = ndirty
        assert self.pool is not None
        self._start_serving(self.pool.handoff())
        try:
            self._guest.go(state, self.peer_timeout)
        except GuestError as e:
            # The guest may be gone or refused: it did not run, or it died. Either way no
            # copy runs here; the source keeps its own, held.
            raise ReceiveError(f"the post-copy guest did not start: {e}") from e
        self._t_running = time.monotonic()
        pid = self._proc.pid if self._proc is not None else 0
        self.status(f"post-copy: guest pid {pid} runs here; {self._left} pages to come")
        self.log.info("post-copy guest running", pid=pid, pending=self._left)
        faults.reached("destination:postcopy-running")
        return self._until_commit(ndirty)

    def _until_commit(self, ndirty: int) -> PostcopyOutcome:
        """The guest is served: POSTCOPY_RUNNING, then until every page is there, then
        the commit (a break on the way: ReceivePostcopyInterrupted)."""
        assert self._guest is not None and self._device_state is not None
        device_state = self._device_state
        pid = self._proc.pid if self._proc is not None else 0
        try:
            self.main.send(PostcopyRunning())
            while True:
                rec = self.main.recv(None, abort=self.check_alive)
                if isinstance(rec, PostcopyEnd):
                    break
                assert isinstance(rec, Keepalive | PostcopyRunning)
            assert self._readers is not None
            self._readers.wait_synced(1, self.peer_timeout)
            self._wait_all_placed()
        except (ZcmigrateError, OSError) as e:
            raise self._interrupted(e) from e
        filled = self._fill_holes()
        reason = self._guest.done(self.peer_timeout)
        if reason is not None:
            raise ReceiveError(f"every page was placed, but the guest disagrees: {reason}")
        self._stop_threads()
        median, p99 = latency_summary(self._latency_ns)
        total_ms = int(((self._t_last_page or time.monotonic()) - self._t_running) * 1000)
        outcome = PostcopyOutcome(guest_pid=pid, requests=self._requests,
                                  latency_median_us=median, latency_p99_us=p99,
                                  total_time_ms=total_ms, dirty_pages=ndirty,
                                  filled_zero_pages=filled)
        self.main.send(PostcopyComplete(requests=outcome.requests,
                                        latency_median_us=median, latency_p99_us=p99,
                                        total_time_ms=total_ms))
        self.incoming.commit_postcopy(device_state)
        remove_resume_record(self.incoming.image)
        self.log.info("post-copy complete", **outcome.to_dict(), filled_zero_pages=filled)
        try:
            self.main.send(CommitAck(hashlib.sha256(device_state).digest()))
        except (ZcmigrateError, OSError) as e:
            raise PostcopyUnacknowledged(outcome, str(e)) from e
        return outcome

    # ------------------------------------------------------------------ recovery

    def take_over(self, record: ResumeRecord) -> None:
        """`receive IMAGE --resume`: the receiver of this post-copy died. Take its guest
        over on the same socket (a recovery hello: the guest sends its userfaultfd again),
        wake its range so that faults the dead one read come again, and count as missing
        every page not in the file: the stale ones not placed yet, and zero pages never
        written (the source sends those too; a copy never overwrites a page). Then, as
        after any break, wait for the source's resume (DestinationJob)."""
        image = self.incoming.image
        # Whatever happens here, IMAGE is the waiting guest's: never discarded by close().
        self._keep_image = True
        self._fd_listener = FdListener(postcopy_socket(image))
        try:
            guest = PostcopyGuest.accept(self._fd_listener, TAKE_OVER_WAIT)
        except GuestError as e:
            raise ReceiveError(f"no post-copy guest waits on {image}: {e}") from e
        owner = read_control_record(image)
        if not guest.hello.recovery or owner is None or owner.pid != guest.peer.pid:
            guest.close()
            raise ReceiveError(
                f"the process (pid {guest.peer.pid}) that connected to "
                f"{self._fd_listener.path} is not the post-copy guest waiting on {image}")
        self._guest, self._range = guest, guest.pages
        self._device_state = record.device_state
        self._went = True
        # Every hole is a page still to come: marked in one call, not a step a page.
        left = self._pending.mark(array("Q", _holes(self.incoming.fd, self.ctx.image_size,
                                                     self.ps)))
        self._left = left
        self._t_running = time.monotonic()
        guest.take_over()
        self.log.info("post-copy guest taken over", pid=guest.peer.pid, pages_left=left)

    def detach(self) -> None:
        """After a break: stop serving (threads, readers, urgent channel) but keep the
        guest's link and its userfaultfd, and what is still pending: the guest waits in
        the kernel for its pages while a new session is awaited."""
        self._stop_threads()
        self._stop = threading.Event()
        for opener in self._openers:  # a resumed session's; the pool closes its own
            opener.close()
        self._openers = []

    def resume(self, *, main: MainChannel, channels: Sequence[Channel], ctx: WireContext,
               session: SessionKeys | None, exiting: Exiting) -> PostcopyOutcome:
        """A new session of this migration (DestinationJob checked its resume HELLO and
        admitted its data channels): list the pages still missing, admit its urgent
        channel, serve the guest again, and finish as usual."""
        self._main_ch, self.ctx, self.session, self.exiting = main, ctx, session, exiting
        try:
            with self._lock:
                pending = self._pending.bitmap()
                left = self._left
                asked = [page * self.ps for page in self._requested if self._pending[page]]
            self._send_missing(pending)
            self._admit_urgent()
            # New channels, so new sequences and, sealed, the new session's openers.
            fresh: list[Handed] = [
                (ch, SequenceTracker(i),
                 session.opener(Direction.SOURCE_TO_DESTINATION, i)
                 if ctx.sealed and session is not None else None)
                for i, ch in enumerate(channels)]
            self._openers = [o for _, _, o in fresh if o is not None]
            self._start_serving(fresh)
            assert self._urgent is not None
            # Faults read before the break were asked for on the old urgent channel and
            # never answered: their threads still wait. Ask again, first.
            for i in range(0, len(asked), MAX_PAGES):
                self._urgent.send_request(asked[i:i + MAX_PAGES])
        except (ZcmigrateError, OSError) as e:
            raise self._interrupted(e) from e
        self.log.info("post-copy resumed", pages_left=left, asked_again=len(asked))
        self.status(f"post-copy resumed: {left} pages to come")
        return self._until_commit(self._ndirty)

    def _send_missing(self, words: array[int]) -> None:
        """The pages still pending (a bitmap in host order) as POSTCOPY_MISSING records
        (POSTCOPY_DIRTY's layout)."""
        npages = self.npages
        if sys.byteorder != "little":
            words.byteswap()
        raw = words.tobytes()
        first = 0
        while True:
            count = min(DIRTY_CHUNK_PAGES, npages - first)
            chunk = raw[first // 8:first // 8 + (count + 63) // 64 * 8]
            last = first + count >= npages
            self.main.send(PostcopyMissing(first=first, count=count, bitmap=chunk, last=last))
            if last:
                return
            first += count

    def _interrupted(self, cause: BaseException) -> ReceivePostcopyInterrupted:
        pid = self._proc.pid if self._proc is not None else 0
        with self._lock:
            left = self._left
        why = self.exiting.error or cause
        msg = (f"post-copy interrupted: {why}. The guest (pid {pid}) runs on "
               f"{self.incoming.image} and waits for the {left} pages it has not got yet: "
               "it is paused on those, nothing is invented for it. Only the source holds "
               "them: keep the source's image, and finish the migration from there with "
               "`zcmigrate send SOURCE_IMAGE --resume --to THIS_RECEIVER` "
               "(docs/operations.md, \"Post-copy recovery\")")
        self.status(f"post-copy interrupted: guest pid {pid} waits for {left} pages")
        self.log.error("post-copy interrupted: the guest waits for pages", guest_pid=pid,
                       pages_left=left, error=str(why))
        return ReceivePostcopyInterrupted(msg)

    def _guarded(self, target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as e:  # a server thread records every failure, and ends
            if not self._stop.is_set():
                self.exiting.set(e if isinstance(e, ZcmigrateError)
                                 else ReceiveError(f"post-copy: {e}"), "postcopy")

    def _fault_loop(self) -> None:
        """Read the guest's faults; ask for pending pages, place zero pages at once."""
        rng = self._range
        urgent = self._urgent
        assert rng is not None and urgent is not None
        ps = self.ps
        while not self._stop.is_set():
            if not rng.wait_faults(_SLICE):
                continue
            ask: list[int] = []
            now = time.monotonic_ns()
            for f in rng.read_faults():
                page = f.offset // ps
                with self._lock:
                    if self._pending[page]:
                        if page not in self._requested:
                            self._requested[page] = now
                            ask.append(f.offset)
                        continue
                # Not stale: a page the precopy sent as zero and nobody wrote. (One
                # placed since the fault is left as it is: the copy only wakes.)
                self._copy(f.offset, self._zero[:ps])
            for i in range(0, len(ask), MAX_PAGES):
                urgent.send_request(ask[i:i + MAX_PAGES])
            with self._lock:
                self._requests += len(ask)

    def _urgent_loop(self) -> None:
        urgent = self._urgent
        assert urgent is not None
        while not self._stop.is_set():
            rec = urgent.recv(_SLICE)
            if rec is None:
                continue
            if rec.kind != PAGES:
                raise RemoteProtocolError("urgent channel: the source sent a request")
            self._place(array("Q", rec.offsets), memoryview(rec.data), array("Q"))

    @contextlib.contextmanager
    def _placing(self, what: str) -> Iterator[UserfaultRange]:
        """The guest's range, for copies whose failures say `what` was being placed."""
        assert self._range is not None
        try:
            yield self._range
        except RangeGone as e:
            raise ReceiveError(f"the post-copy guest is gone: {e}") from e
        except UserfaultError as e:
            raise ReceiveError(f"placing {what}: {e}") from e

    def _copy(self, offset: int, data: bytes | memoryview) -> None:
        with self._placing(f"a page at {offset}") as rng:
            rng.copy(offset, data)

    def _place(self, normal: array[int], payload: memoryview, zero: array[int]) -> None:
        """Place pages that arrived (urgent or background): each run of adjacent pages in
        one UFFDIO_COPY, a packet in one C call. Never a write: a page the guest has
        already is left as it is."""
        ps = self.ps
        with self._placing(f"{len(normal) + len(zero)} pages") as rng:
            if normal:
                rng.copy_pages(normal, len(normal), ps, payload)
            for i in range(0, len(zero), _ZERO_RUN):
                part = zero[i:i + _ZERO_RUN]
                rng.copy_pages(part, len(part), ps, self._zero)
        self._arrived(normal)
        self._arrived(zero)

    def _arrived(self, offsets: array[int]) -> None:
        if not offsets:
            return
        now = time.monotonic_ns()
        with self._lock:
            self._left -= self._pending.clear(offsets)
            # The pages a fault asked for and that are no longer pending arrived now
            # (here or by an earlier packet): their latency. Few are ever in flight, so
            # this looks at them, not at every page of the packet.
            if self._requested:
                for page in [p for p in self._requested if not self._pending[p]]:
                    self._latency_ns.append(now - self._requested.pop(page))
            if self._left == 0 and not self._t_last_page:
                self._t_last_page = time.monotonic()

    def _wait_all_placed(self) -> None:
        """After the background pages' last SYNC: every stale page was sent, on a data
        channel or the urgent one; wait for the urgent answers still on their way."""
        deadline = time.monotonic() + self.peer_timeout
        while True:
            with self._lock:
                left = self._left
            if left == 0:
                return
            if self.exiting.is_set():
                err = self.exiting.error
                raise err if isinstance(err, ZcmigrateError) else ReceiveError(str(err))
            if time.monotonic() > deadline:
                raise ReceiveError(f"{left} stale pages never arrived after the source's "
                                   "last background page")
            time.sleep(0.01)

    def _fill_holes(self) -> int:
        """Every page has arrived: a hole left is a zero page the precopy never had to
        write. The guest's range must have none before it may unregister (a hole would
        then read as zeros by chance, not by knowledge), so each gets its zeros."""
        fd = self.incoming.fd
        size = self.ctx.image_size
        ps = self.ps
        filled = 0
        for hole, end in _hole_runs(fd, size):
            for off in range(hole, end, ps * _ZERO_RUN):
                n = min(ps * _ZERO_RUN, end - off)
                self._copy(off, memoryview(self._zero)[:n])
                filled += n // ps
        return filled

    def _stop_threads(self) -> None:
        self._stop.set()
        if self._readers is not None:
            self._readers.stop()
            self._readers = None
        for t in self._threads:
            t.join(5.0)
        self._threads = []
        if self._urgent is not None:
            self._urgent.close()
            self._urgent = None


def _hole_runs(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The runs [start, end) of `fd`'s first `size` bytes that hold no data (never
    written), in order, as SEEK_HOLE and SEEK_DATA report them."""
    pos = 0
    while pos < size:
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            raise
        if hole >= size:
            return
        try:
            end = min(os.lseek(fd, hole, os.SEEK_DATA), size)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            end = size
        yield hole, end
        pos = end


def _holes(fd: int, size: int, page_size: int = mmap.PAGESIZE) -> Iterator[int]:
    """The page offsets of `fd`'s first `size` bytes that hold no data (never written)."""
    for hole, end in _hole_runs(fd, size):
        yield from range(hole - hole % page_size, end, page_size)


__all__ = ["PostcopyDestination", "PostcopyOutcome", "latency_summary",
           "urgent_channel_id"]
