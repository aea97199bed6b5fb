"""The source side of one migration: handshake, precopy iterations, stop-and-copy, commit.

It drives a SenderPool from the migration thread, reads the guest's dirty bitmap, and
keeps the invariant of ARCHITECTURE.md: the device state leaves only after the final
sync and flush of every data channel, and until the destination commits the guest
stays intact and resumable. It knows no CLI, terminal or systemd.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import mmap
import os
import secrets
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import structlog

from zcmigrate import ZcmigrateError
from zcmigrate.channel.aead import (
    DEFAULT_CIPHER,
    Direction,
    SessionKeys,
    cipher_id,
    fresh_nonce,
    handshake_mac,
    macs_equal,
)
from zcmigrate.channel.probe import probe
from zcmigrate.channel.zcsocket import Channel, connect
from zcmigrate.migrate import faults
from zcmigrate.migrate.convergence import Action, AutoConverge, Convergence, Iteration
from zcmigrate.migrate.errors import (
    CommitUncertain,
    MigrationCancelled,
    MigrationError,
    NotConverging,
    NothingToResume,
    ParameterError,
    PostcopyInterrupted,
)
from zcmigrate.migrate.guest import (
    DeviceState,
    GuestControl,
    GuestError,
    GuestState,
    control_path,
    read_control_record,
)
from zcmigrate.migrate.imagefiles import lock_path, resume_path
from zcmigrate.migrate.imagelock import ImageLock
from zcmigrate.migrate.mainchannel import MainChannel, MainChannelTimeout
from zcmigrate.migrate.memlock import automatic_in_flight_cap
from zcmigrate.migrate.params import MigrationParameters
from zcmigrate.migrate.postcopy_resume import read_resume_record
from zcmigrate.migrate.protocol import (
    Cancel,
    CommitAck,
    DeviceStateRecord,
    EndOfRam,
    Error,
    Greeting,
    Hello,
    HelloAck,
    Keepalive,
    MultifdFlush,
    PostcopyAdvise,
    RamReceived,
    Record,
    RecordType,
    Role,
    Writeback,
    WritebackDone,
)
from zcmigrate.migrate.ratelimit import RateLimiter
from zcmigrate.migrate.state import Event, State, StateMachine
from zcmigrate.migrate.stats import MigrationStats, StatsBuilder
from zcmigrate.multifd.exiting import Exiting, MultifdError
from zcmigrate.multifd.pages import dirty_offsets, fetch_clear_dirty, or_words
from zcmigrate.multifd.sender import SenderPool
from zcmigrate.multifd.wire import CHALLENGE_SIZE, INIT_MAC_SIZE, WireContext

log = structlog.get_logger("zcmigrate.source")

# Pages handed to the pool per step: the unit of rate limiting, progress and of
# checking for a cancel. 8 MiB of 4 KiB pages.
CHUNK_PAGES = 2048
STATIC_DEVICE_STATE = b'{"kind":"static-image","version":1}'
# Bytes sent since the last WRITEBACK above which the destination writes back again before
# the pause (it always does once): below it, the commit's own fsync is short enough to
# leave in the downtime.
WRITEBACK_AFTER = 32 << 20
# After this many seconds of pacing with nothing to send, say we are still here.
_KEEPALIVE_SHARE = 1 / 3


@dataclass(frozen=True, slots=True)
class Destination:
    host: str
    port: int


R = TypeVar("R", bound=Record)


class SourceJob:
    """One outgoing migration of `image` to `dest`; run() from the migration thread."""

    def __init__(
        self,
        image: str | os.PathLike[str],
        dest: Destination,
        params: MigrationParameters,
        *,
        page_size: int = 4096,
        static: bool = False,
        auth_key: bytes | None = None,
        encryption: bool = True,
        cipher: str = DEFAULT_CIPHER,
        on_iteration: Callable[[MigrationStats], None] | None = None,
        resume: bool = False,
    ) -> None:
        self.image = Path(image)
        # `send --resume`: finish the post-copy of `image` that broke (postcopy_resume.py
        # holds what it needs); no precopy, no pause: its guest is held paused already.
        self.resume = resume
        self.dest = dest
        self.params = params
        self.page_size = page_size
        self.static = static
        self.auth_key = auth_key  # the 32-byte shared key (migrate/keyfile.py), or None
        self.encryption = encryption  # with a key: seal every data packet too
        cipher_id(cipher)  # a name zcmigrate offers, checked before anything connects
        self.cipher = cipher  # with a key: the session's AEAD (HELLO carries it)
        self._session: SessionKeys | None = None
        self._encrypted = False
        self.on_iteration = on_iteration
        self.uuid = secrets.token_bytes(16)
        self.exiting = Exiting()
        self.sm = StateMachine(self._on_state)
        self.stats = StatsBuilder(self.sm)
        self._cancel_reason: str | None = None
        self._device_sent = False
        self._lock_file: ImageLock | None = None
        self._watchdog: threading.Timer | None = None
        self._last_sent = time.monotonic()
        self._paused = False
        self._guest: GuestControl | None = None
        self._pool: SenderPool | None = None
        self._main: MainChannel | None = None
        self._map: mmap.mmap | None = None
        self._lock = threading.Lock()
        self._postcopy_requested = False  # `zcmigrate set postcopy-start IMAGE`
        self._ctx: WireContext | None = None
        self.log = log.bind(uuid=self.uuid.hex()[:8], dest=f"{dest.host}:{dest.port}")

    # ------------------------------------------------------------- control

    @property
    def state(self) -> State:
        return self.sm.state

    def cancel(self, reason: str = "cancelled by the user") -> bool:
        """Ask the job to stop; False when it is too late (the destination is committing)."""
        with self._lock:
            if self._device_sent or self.sm.state in (State.COMPLETED, State.FAILED,
                                                       State.CANCELLED):
                return False
            self._cancel_reason = reason
        # Wakes every worker and every wait in the pool; the migration thread sees it
        # at its next step and tells the destination.
        self.exiting.set(MigrationCancelled(reason), "cancel")
        return True

    def set_parameter(self, name: str, value: int) -> None:
        if name == "postcopy-start":
            # QEMU's migrate-start-postcopy: at the end of the current iteration.
            if not self.params.postcopy:
                raise ParameterError("postcopy-start needs a migration started with "
                                     "--postcopy (the destination must be ready for it)")
            self._postcopy_requested = True
            self.log.info("post-copy requested")
            return
        self.params.set(name, value)
        self.log.info("parameter changed", parameter=name, value=value)

    def snapshot(self) -> MigrationStats:
        self.stats.parameters = self.params.to_dict()  # may have changed while running
        return self.stats.snapshot(self._pool.statistics() if self._pool else None)

    def _on_state(self, old: State, new: State, event: Event) -> None:
        self.log.info("state", old=old.value, new=new.value, trigger=event.value)

    # ----------------------------------------------------------------- run

    def run(self) -> MigrationStats:
        """Migrate; return the final statistics or raise MigrationError (source intact)."""
        self.stats.start()
        try:
            if self.resume:
                self._resume()
                self.sm.fire(Event.COMMITTED)
                self._cleanup()
                return self.snapshot()
            self._setup()
            self.sm.fire(Event.CONNECTED)
            self.stats.setup_done()
            final, device_state, words = self._precopy()
            if words is not None:
                # Post-copy: the guest runs on the destination from here (postcopy_source).
                from zcmigrate.migrate.postcopy_source import PostcopySource

                PostcopySource(self).run(final, words, device_state)
            else:
                self._stop_and_copy(final, device_state)
            self.sm.fire(Event.COMMITTED)
        except BaseException as e:
            err = self._fail(e)
            self._cleanup()
            raise err from e
        self._cleanup()
        return self.snapshot()

    # --------------------------------------------------------------- setup

    def _setup(self) -> None:
        # One migration per image: a second `send` of it (or a receive into it) would
        # clear the same dirty bitmap and pause the same guest.
        self._lock_file = ImageLock(lock_path(self.image), f"cannot migrate {self.image}")
        self._open_image()
        assert self._map is not None
        ctl = control_path(self.image)
        if resume_path(self.image).exists():
            # Its guest runs on a destination and may wait there for pages only this image
            # holds: a fresh migration of it would put a second, older copy elsewhere.
            raise MigrationError(
                f"a post-copy of {self.image} was interrupted ({resume_path(self.image).name} "
                "is there): its guest runs on the destination and needs this image's pages. "
                f"Finish it with `zcmigrate send {self.image} --resume --to HOST:PORT` "
                "(docs/operations.md, \"Post-copy recovery\")")
        record = read_control_record(self.image)
        if record is not None and record.lease.handed_over_ns and not self.static:
            # Its guest now runs at a destination: this copy is stale, and sending it
            # (even --static) would put an old guest beside the live one.
            raise MigrationError(
                f"{self.image} was handed over to a destination by an earlier migration; "
                "its guest runs there now. Start a guest here only with "
                f"`zcmigrate guest {self.image} --force` if that copy is gone."
            )
        if not self.static and ctl.exists():
            try:
                self._guest = GuestControl.open(self.image)
            except GuestError as e:
                raise MigrationError(
                    f"{e}; to migrate the image as it is, pass --static"
                ) from e
            if self._guest.npages * self._guest.page_size != len(self._map):
                raise MigrationError("the guest's page count does not match the image size")
            self.page_size = self._guest.page_size
        npages = len(self._map) // self.page_size
        self.stats.set_image(len(self._map), self.page_size, live=self._guest is not None)
        channels = self.params.multifd_channels
        hello = Hello(
            uuid=self.uuid,
            channels=channels,
            page_size=self.page_size,
            image_size=npages * self.page_size,
            pages_alloc=self.params.pages_per_packet,
            block="zcmigrate.ram",
            zero_copy=self.params.multifd_zerocopy,
            zero_page_detection=self.params.zero_page_detection,
        )
        self._connect(hello)
        if self.params.postcopy:
            if self._guest is None:
                raise MigrationError("--postcopy needs a guest running on the image: a "
                                     "static image has nothing to run on the destination")
            # The destination checks it can serve a post-copy and starts its guest now,
            # while precopy runs, not in the downtime.
            assert self._main is not None
            self._main.send(PostcopyAdvise())
        self.log.info("connected", channels=channels, zero_copy=self.params.multifd_zerocopy,
                      pages=npages, live=self._guest is not None,
                      in_flight_cap=self._in_flight_cap())

    def _connect(self, hello: Hello) -> None:
        """The main channel, the handshake, and the data channels bound to the session."""
        channels = self.params.multifd_channels
        assert self._map is not None
        ctx = hello.context()
        cap = self._in_flight_cap()

        peer_timeout = self.params.peer_timeout
        main = MainChannel(connect(self.dest.host, self.dest.port, name="main",
                                   peer_timeout=peer_timeout), Role.SOURCE)
        self._main = main
        greeting = self._expect(Greeting, peer_timeout, "the destination's greeting")
        self._handshake(main, greeting, hello)
        # Sealed data packets once both ends agreed on it in the authenticated HELLO.
        ctx = dataclasses.replace(ctx, sealed=self._encrypted)
        self._ctx = ctx  # post-copy's urgent channel is bound to it too

        chans: list[Channel] = []
        macs: list[bytes] = []
        try:
            for i in range(channels):
                ch = connect(self.dest.host, self.dest.port,
                             zero_copy=self.params.multifd_zerocopy, in_flight_cap=cap,
                             name=f"multifd{i}", peer_timeout=peer_timeout)
                chans.append(ch)
                if self.params.multifd_zerocopy and not ch.supports_zero_copy:
                    raise MigrationError(ch.zero_copy_refusal)
                # The destination's fresh challenge for this connection: our init record
                # answers it with a MAC of the session, so no one else can take the
                # channel's place, and no recorded init record fits another connection.
                challenge = bytes(ch.read_exact(CHALLENGE_SIZE, peer_timeout))
                macs.append(self._session.binding_mac(i, challenge)
                            if self._session is not None else bytes(INIT_MAC_SIZE))
        except BaseException:
            for ch in chans:
                ch.close()
            raise
        self._pool = SenderPool(
            chans, ctx, self._map,
            zero_copy=self.params.multifd_zerocopy,
            zero_page_detection=self.params.zero_page_detection,
            exiting=self.exiting,
            init_macs=macs,
            keys=self._session if ctx.sealed else None,
        )
        self._pool.start()

    def _resume(self) -> None:
        """`send --resume`: a new session of the interrupted post-copy of the image, with
        its UUID; the destination says which pages it still lacks (postcopy_source)."""
        from zcmigrate.migrate.postcopy_source import PostcopySource

        nothing = NothingToResume(
            f"nothing to resume: no interrupted post-copy of {self.image} "
            f"({resume_path(self.image).name} is not there); nothing was changed")
        if not resume_path(self.image).exists():
            raise nothing  # before the lock, which would leave an IMAGE.lock behind
        self._lock_file = ImageLock(lock_path(self.image), f"cannot resume {self.image}")
        rec = read_resume_record(self.image)  # again, under the lock: it may have gone
        if rec is None:
            raise nothing
        if rec.role != "source":
            raise NothingToResume(
                f"{self.image} is the destination of an interrupted post-copy, not its "
                "source: resume from the source's image (a receiver takes over the guest "
                f"here with `zcmigrate receive {self.image} --resume`)")
        self.uuid = rec.uuid
        self.page_size = rec.page_size
        self.log = log.bind(uuid=self.uuid.hex()[:8], dest=f"{self.dest.host}:{self.dest.port}")
        self._open_image()
        assert self._map is not None
        if len(self._map) != rec.image_size:
            raise NothingToResume(f"{self.image} is {len(self._map)} bytes, the interrupted "
                                  f"post-copy's image {rec.image_size}: not the same image")
        record = read_control_record(self.image)
        if record is not None and record.lease.migration not in (None, rec.uuid):
            raise NothingToResume(f"the guest control file of {self.image} names migration "
                                  f"{record.lease.migration_name}, not the interrupted one")
        if record is not None and record.lease.handed_over_ns:
            raise NothingToResume(
                f"{self.image} is already handed over (migration "
                f"{record.lease.migration_name}): its post-copy was committed; `zcmigrate "
                f"retire {self.image}` removes {resume_path(self.image).name}")
        if control_path(self.image).exists():
            # The held guest, if it still runs: it exits once the destination committed.
            # One that died (or a restarted host) is marked handed over instead.
            with contextlib.suppress(GuestError):
                self._guest = GuestControl.open(self.image)
            if self._guest is not None and self._guest.state != GuestState.PAUSED:
                # Someone started a guest here again (`guest --force`): the image is no
                # longer the one of the switch, and its pages would mix two histories.
                raise MigrationError(
                    f"a guest runs on {self.image} (pid {self._guest.pid}): the image has "
                    "changed since the post-copy switch, so it cannot finish that "
                    "migration; nothing was sent")
        # From here on, as after the device state left: every failure leaves the migration
        # interrupted, to be resumed again, never undone.
        self._device_sent = True
        npages = len(self._map) // self.page_size
        self.stats.set_image(len(self._map), self.page_size, live=True)
        hello = Hello(uuid=self.uuid, channels=self.params.multifd_channels,
                      page_size=self.page_size, image_size=len(self._map),
                      pages_alloc=self.params.pages_per_packet, block="zcmigrate.ram",
                      zero_copy=self.params.multifd_zerocopy,
                      zero_page_detection=self.params.zero_page_detection, resume=True)
        job = PostcopySource(self)
        try:
            self._connect(hello)
            self.sm.fire(Event.CONNECTED)
            self.sm.fire(Event.CONVERGED)
            self.stats.setup_done()
            self.log.info("resuming post-copy", pages=npages)
        except ZcmigrateError as e:
            raise job._interrupted(e) from e
        job.resume(rec)

    def _handshake(self, main: MainChannel, greeting: Greeting, hello: Hello) -> None:
        """HELLO and HELLO_ACK; with a key, mutual proof over both ends' fresh nonces
        and the session's keys (docs/security.md)."""
        key = self.auth_key
        if key is not None and not greeting.keyed:
            raise MigrationError(
                "the receiver holds no key, so it cannot prove it is the receiver this key "
                "was shared with: refusing to send the guest there. Give it the same key "
                "(receive --auth-key-file), or send without one to a receiver on a trusted "
                "network."
            )
        nonce = fresh_nonce()
        hello = dataclasses.replace(hello, nonce=nonce,
                                    encryption=key is not None and self.encryption,
                                    cipher=self.cipher)
        if key is not None:
            hello = dataclasses.replace(
                hello, mac=handshake_mac(key, b"hello", greeting.payload(), hello.body()))
        main.send(hello)
        ack = self._expect(HelloAck, self.params.peer_timeout, "the answer to HELLO")
        if key is None:
            return
        want = handshake_mac(key, b"hello-ack", greeting.payload(), hello.payload())
        if not macs_equal(ack.mac, want):
            raise MigrationError(
                "the receiver did not prove that it holds our key (its HELLO_ACK does not "
                "verify): refusing to send the guest to it"
            )
        self._session = SessionKeys(key, nonce, greeting.nonce, self.uuid, hello.cipher)
        self._encrypted = hello.encryption
        main.secure(self._session.sealer(Direction.SOURCE_TO_DESTINATION, None),
                    self._session.opener(Direction.DESTINATION_TO_SOURCE, None))

    def _wire_context(self) -> WireContext:
        assert self._ctx is not None, "after the handshake"
        return self._ctx

    def _open_image(self) -> None:
        try:
            fd = os.open(self.image, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise MigrationError(f"cannot open image {self.image}: {e.strerror}") from e
        try:
            size = os.fstat(fd).st_size
            if size == 0 or size % self.page_size:
                raise MigrationError(
                    f"image {self.image} is {size} bytes, not a positive multiple of the "
                    f"page size {self.page_size}"
                )
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)

    def _in_flight_cap(self) -> int | None:
        """Zero-copy bytes in flight per channel, kept inside the locked-memory budget."""
        if not self.params.multifd_zerocopy:
            return None
        if self.params.in_flight_cap is not None:
            return self.params.in_flight_cap
        try:
            # The same choice `zcmigrate check` judges, so its verdict holds for us.
            return automatic_in_flight_cap(probe(), self.params.multifd_channels,
                                           self.params.pages_per_packet)
        except ValueError as e:
            raise MigrationError(str(e)) from e

    # ------------------------------------------------------------- precopy

    def _check_exiting(self) -> None:
        if self.exiting.is_set():
            err = self.exiting.error
            raise err if err is not None else MigrationError("stopped")

    def _expect(self, kind: type[R], timeout: float, what: str, *,
                abortable: bool = True) -> R:
        """The next main-channel record, which the table allows only as `kind` or ERROR
        here; MigrationError with the destination's own words for an ERROR."""
        assert self._main is not None
        try:
            rec = self._main.recv(timeout, abort=self._check_exiting if abortable else None)
        except MainChannelTimeout:
            raise MigrationError(f"no {what} within {timeout:g} s") from None
        if isinstance(rec, Error):
            raise MigrationError(f"the destination failed: {rec.message}")
        if not isinstance(rec, kind):  # the table admits nothing else; a bug if it did
            raise MigrationError(f"expected {kind.TYPE.name}, got {rec.TYPE.name}")
        return rec

    def _pause_and_collect(self, guest: GuestControl, fresh: array[int],
                           offsets_buf: array[int], expected_ms: float,
                           ) -> tuple[DeviceState, array[int], int]:
        """Pause the guest and collect its last dirty pages: those found at the last
        bitmap sync (`fresh`) and those it dirtied since. Returns the device state, the
        merged bitmap and how many page offsets it put at the front of `offsets_buf`."""
        state = self._pause(guest)
        faults.reached("source:paused")
        more = array("Q", bytes(8 * len(fresh)))
        self._fetch_dirty(guest, more)
        merged = or_words(fresh, more)
        assert self._map is not None
        count = dirty_offsets(merged, len(self._map) // self.page_size, self.page_size,
                              offsets_buf)
        self.stats.dirty_sync(count, 0.0, expected_ms)
        return state, merged, count

    def _precopy(self) -> tuple[array[int], bytes, array[int] | None]:
        """Iterate while the guest runs; return the last dirty pages and the device state,
        with the guest paused (or the whole image and no guest, for a static image)."""
        assert self._map is not None and self._pool is not None and self._main is not None
        ps = self.page_size
        npages = len(self._map) // ps
        guest = self._guest
        nwords = (npages + 63) // 64
        fresh = array("Q", bytes(8 * nwords))
        offsets_buf = array("Q", bytes(8 * npages))
        if guest is not None:
            # The first pass sends every page, so what is dirty now is sent anyway.
            self._fetch_dirty(guest, fresh)
        offsets = array("Q", range(0, npages * ps, ps))
        start = time.monotonic()
        judge = Convergence(max_iterations=self.params.max_iterations,
                            timeout=self.params.timeout)
        auto = (AutoConverge(initial=self.params.throttle_initial,
                             increment=self.params.throttle_increment)
                if self.params.auto_converge and guest is not None else None)
        written_back = False
        unsynced = 0  # bytes sent since the destination last wrote its image back
        iteration = 0
        while True:
            iteration += 1
            t0 = time.monotonic()
            self.stats.begin_iteration(iteration, len(offsets) * ps)
            self._send(offsets, rate_limited=True)
            self._sync(iteration)
            unsynced += len(offsets) * ps
            if iteration == 1:
                faults.reached("source:precopy")
            elapsed = max(time.monotonic() - t0, 1e-6)
            bandwidth = self.stats.end_iteration(len(offsets) * ps, elapsed)
            if guest is None:
                return array("Q"), STATIC_DEVICE_STATE, None
            dirty_pages = self._fetch_dirty(guest, fresh)
            judge.can_throttle = auto is not None and not auto.at_max
            decision = judge.decide(
                Iteration(number=iteration, sent_bytes=len(offsets) * ps, elapsed=elapsed,
                          dirty_bytes=dirty_pages * ps, bandwidth=bandwidth,
                          since_start=time.monotonic() - start),
                self.params.downtime_limit,
            )
            expected_ms = decision.expected_downtime_ms
            self.stats.dirty_sync(dirty_pages, elapsed, expected_ms)
            self._report()
            self.log.info("iteration", iteration=iteration, sent=len(offsets) * ps,
                          dirty=dirty_pages * ps, bandwidth=int(bandwidth),
                          expected_downtime_ms=round(expected_ms, 1))
            if decision.action is not Action.SWITCH_OVER and self._postcopy_due(
                    iteration, decision.action is Action.GIVE_UP):
                # Post-copy instead of another iteration: pause, and hand the destination
                # the list of pages still dirty; they follow while its guest runs.
                state, merged, count = self._pause_and_collect(guest, fresh, offsets_buf,
                                                               expected_ms)
                self.log.info("switching to post-copy", iteration=iteration,
                              dirty=count * ps, reason=decision.reason)
                return offsets_buf[:count], state.encode(), merged
            if decision.action is Action.SWITCH_OVER and (not written_back
                                                          or unsynced > WRITEBACK_AFTER):
                # Converged. The destination's commit makes the image durable while the
                # guest is paused: have it write back what it holds now, while the guest
                # still runs, so the pause pays only for the last pages. The write-back
                # takes time (a second or more for a large first pass on a disk), and the
                # guest dirties pages meanwhile: iterate once more and judge again with
                # what it dirtied, rather than pause on a stale estimate.
                self._writeback()
                written_back, unsynced = True, 0
                decision = dataclasses.replace(decision, action=Action.ITERATE)
            if decision.action is Action.SWITCH_OVER:
                # Stop the guest; what it dirtied since the last bitmap sync joins the
                # pages found dirty then.
                state, _, count = self._pause_and_collect(guest, fresh, offsets_buf,
                                                          expected_ms)
                return offsets_buf[:count], state.encode(), None
            if decision.action is Action.GIVE_UP:
                raise NotConverging(
                    f"migration cannot converge: expected downtime {expected_ms:.0f} ms stays "
                    f"above downtime-limit {self.params.downtime_limit} ms; {decision.reason}. "
                    "Raise max-bandwidth or downtime-limit, or lower the guest's dirty rate. "
                    "The guest keeps running here."
                )
            if auto is not None:
                self._throttle(guest, auto.step(decision))
            count = dirty_offsets(fresh, npages, ps, offsets_buf)
            offsets = offsets_buf[:count]

    def _postcopy_due(self, iteration: int, giving_up: bool) -> bool:
        """Whether to switch to post-copy now, precopy not having converged: asked for
        (`set postcopy-start`), --postcopy-after iterations done, or precopy giving up."""
        p = self.params
        if not p.postcopy:
            return False
        return (self._postcopy_requested or giving_up
                or (p.postcopy_after > 0 and iteration >= p.postcopy_after))

    def _throttle(self, guest: GuestControl, percent: int) -> None:
        """Auto-converge: the guest sleeps `percent` of its time from now on (it lifts the
        throttle by itself should we die; _cleanup lifts it whatever the outcome)."""
        if percent == self.stats.throttle:
            return
        guest.set_throttle(percent * 10)
        self.stats.throttle = percent
        self.log.info("guest throttled", cpu_throttle_percentage=percent)

    def _writeback(self) -> None:
        assert self._main is not None
        self._main.send(Writeback())
        self._expect(WritebackDone, self.params.commit_timeout,
                     "answer to WRITEBACK (is the destination's disk that slow?)")

    def _fetch_dirty(self, guest: GuestControl, out: array[int]) -> int:
        """Fetch and clear the guest's dirty bitmap atomically, word by word (in C)."""
        return fetch_clear_dirty(guest.bitmap_address, guest.nwords, out)

    def _send(self, offsets: array[int], *, rate_limited: bool) -> None:
        assert self._pool is not None
        ps = self.page_size
        queued = 0
        pacing = RateLimiter(lambda: self.params.max_bandwidth)
        for i in range(0, len(offsets), CHUNK_PAGES):
            self._check_exiting()
            chunk = offsets[i:i + CHUNK_PAGES]
            self._pool.send_pages(chunk)
            queued += len(chunk) * ps
            self.stats.queued(len(chunk) * ps)
            self._last_sent = time.monotonic()
            while rate_limited and (ahead := pacing.delay(queued)) > 0:
                # Short naps: a cancel or a changed limit takes effect within 0.1 s.
                if self.exiting.wait(min(ahead, 0.1)):
                    self._check_exiting()
                self._keepalive()
            self._report()

    def _keepalive(self) -> None:
        """While max-bandwidth holds pages back, tell the destination we are alive before
        its deadline would call us dead."""
        assert self._main is not None
        if time.monotonic() - self._last_sent >= self.params.peer_timeout * _KEEPALIVE_SHARE:
            self._main.send(Keepalive())
            self._last_sent = time.monotonic()

    def _sync(self, iteration: int, *, final: bool = False) -> None:
        assert self._pool is not None and self._main is not None
        # Every channel sends SYNC after this iteration's pages and flushes its zero-copy
        # sends, so no page of the next iteration can overtake one of this iteration on
        # the destination (the invariant, point 2). Only then the main channel moves on.
        # A sync moves at most the queued packets: a peer that cannot take them within
        # peer-timeout is stalled or gone (the sockets' own user timeout says the same).
        res = self._pool.sync(timeout=self.params.peer_timeout)
        self.stats.synced(res.copied_channels)
        self._main.send(EndOfRam(iteration) if final else MultifdFlush(iteration))

    def _pause(self, guest: GuestControl) -> DeviceState:
        self._check_exiting()
        state = guest.pause(timeout=5.0)
        self._paused = True
        self.stats.paused()
        self.sm.fire(Event.CONVERGED)
        # The pause has an upper bound: if the last pages and the device state cannot leave
        # within it (a blackholed link, a stalled destination), the guest runs again here
        # rather than wait for TCP to give up.
        bound = self.params.downtime_limit / 1000 + self.params.peer_timeout
        self._watchdog = threading.Timer(bound, self._pause_expired, args=(bound,))
        self._watchdog.daemon = True
        self._watchdog.start()
        self.log.info("guest paused", position=state.position, value=state.value,
                      pause_bound_s=round(bound, 3))
        return state

    def _pause_expired(self, bound: float) -> None:
        with self._lock:
            if self._device_sent:
                return  # too late: the destination may own the guest now
            err = MigrationError(
                f"the stop-and-copy did not finish within {bound:g} s (downtime-limit "
                f"{self.params.downtime_limit} ms + peer-timeout {self.params.peer_timeout:g} "
                "s): the destination is not taking the last pages; giving up"
            )
        self.log.error("pause bound reached", bound_s=round(bound, 3))
        self.exiting.set(err, "pause bound")

    def _report(self) -> None:
        if self.on_iteration is not None:
            self.on_iteration(self.snapshot())

    # ------------------------------------------------------- stop and copy

    def _stop_and_copy(self, final: array[int], device_state: bytes) -> None:
        assert self._main is not None
        if self._guest is None:
            self.sm.fire(Event.CONVERGED)
            self.stats.paused()
        self.stats.begin_iteration(self.stats.iterations + 1, len(final) * self.page_size)
        self._send(final, rate_limited=False)  # downtime: max-bandwidth does not apply
        # END_OF_RAM goes with the final sync, and the device state only after it: after
        # the final sync and flush of every data channel (the invariant, point 3).
        self._sync(self.stats.iterations, final=True)
        # The destination says when it has every page: only then may the device state
        # leave. A destination that stalls here has not got it, so the pause's bound (a
        # cancel too) still ends the wait and resumes the guest here.
        self._expect(RamReceived, self.params.peer_timeout,
                     "word from the destination that every page arrived")
        with self._lock:
            self._check_exiting()
            if self._guest is not None:
                # From here the destination may commit and run the guest: the pause is no
                # longer ours to end, not even by dying (the guest would resume itself
                # under the ordinary lease). Only resume/retire, by hand, settle it now.
                try:
                    self._guest.hold(self.uuid)
                except GuestError as e:
                    raise MigrationError(f"the guest's pause cannot be held: {e}") from e
            self._device_sent = True
        self._main.send(DeviceStateRecord(device_state))
        faults.reached("source:device-sent")
        try:
            ack = self._expect(CommitAck, self.params.commit_timeout,
                               "commit from the destination", abortable=False)
        except MigrationError as e:
            raise CommitUncertain(str(e)) from None
        if ack.device_state_sha256 != hashlib.sha256(device_state).digest():
            raise CommitUncertain("the destination acknowledged a commit of another device "
                                  "state than the one sent")
        self.stats.committed()
        self.log.info("committed", downtime_ms=round(self.stats.downtime_ms or 0, 1))
        if self._guest is not None:
            # The destination owns the guest now; two running copies would diverge. The
            # mark stays in IMAGE.guest: a guest started here again needs --force.
            try:
                self._guest.hand_over(self.uuid)
            except GuestError as e:
                self.log.error("the source guest could not be marked handed over; it stays "
                               "paused: retire it with `zcmigrate retire`", error=str(e))

    # --------------------------------------------------------------- failure

    def _fail(self, exc: BaseException) -> MigrationError:
        cancelled = self._cancel_reason is not None
        cause = self.exiting.error if isinstance(exc, MultifdError | OSError) else None
        if isinstance(exc, MigrationError):
            err = exc
        elif cancelled:
            err = MigrationCancelled(f"migration cancelled: {self._cancel_reason}")
        else:
            why = cause or exc
            err = MigrationError(f"migration failed: {why or type(why).__name__}")
        if isinstance(err, MigrationCancelled) and not cancelled:
            err = MigrationError(f"migration failed: {err}")
        self.exiting.set(err, "migration")
        if self._device_sent and not isinstance(err, CommitUncertain):
            err = CommitUncertain(
                f"{err}; the device state had already been sent, so the destination may "
                "have committed"
            )
        if isinstance(err, PostcopyInterrupted):
            pass  # its message says what is left where; resume here would make two copies
        elif isinstance(err, CommitUncertain):
            img = self.image
            msg = (f"{err}. The guest stays paused here: the destination may already run it. "
                   "On the destination, `zcmigrate guest --check DEST_IMAGE` says whether it "
                   f"committed. If it did not: `zcmigrate resume {img}` resumes the guest "
                   f"here. If it did: `zcmigrate retire {img}` retires this copy.")
            err = CommitUncertain(msg)
        elif self._guest is not None and self._paused:
            try:
                self._guest.resume()
                self._paused = False
            except GuestError as e:
                err = MigrationError(f"{err}; and the guest could not be resumed: {e}")
        if self._main is not None and not self._main.closed:
            # The table lets neither record through once the device state has left.
            if cancelled and self._main.conversation.may_send(RecordType.CANCEL):
                with contextlib.suppress(Exception):
                    self._main.send(Cancel())
            elif not cancelled:
                self._main.send_error(str(err))
        self.sm.try_fire(Event.CANCEL if cancelled else Event.ERROR)
        self.stats.failed(str(err))
        self.log.error("migration ended", status=self.sm.state.value, error=str(err),
                       guest_resumed=self._guest is not None and not self._paused)
        return err

    def _cleanup(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._pool is not None:
            self._pool.close()
        if self._main is not None:
            self._main.close()
        if self._guest is not None:
            if self.stats.throttle:
                # Never leave the guest throttled: not after a migration, not after a
                # failure (a guest handed over is on its way out anyway).
                with contextlib.suppress(GuestError):
                    self._guest.set_throttle(0)
            self._guest.close()
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()
        if self._lock_file is not None:
            self._lock_file.release()




__all__ = [
    "CommitUncertain",
    "Destination",
    "MigrationCancelled",
    "MigrationError",
    "NotConverging",
    "SourceJob",
]
