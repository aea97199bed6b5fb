"""The destination side of one migration: handshake, receive, and the durable commit.

Pages land in `<image>.incoming`; the device state is taken only after every data
channel reached the final sync, then image and state are made durable and the commit
acknowledged. On any failure the incoming image is discarded and nothing committed
earlier is touched. It knows no CLI, terminal or systemd (status goes to a callback).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import structlog

from zcmigrate import ZcmigrateError
from zcmigrate.channel.aead import (
    Direction,
    SessionKeys,
    cipher_id,
    handshake_mac,
    macs_equal,
)
from zcmigrate.channel.errors import ChannelError
from zcmigrate.channel.zcsocket import DEFAULT_PEER_TIMEOUT, Channel, Listener
from zcmigrate.migrate import faults
from zcmigrate.migrate.admission import admit_data_channels, admit_source
from zcmigrate.migrate.errors import (
    MigrationError,
    PostcopyUnacknowledged,
    ReceiveCancelled,
    ReceiveError,
    ReceivePostcopyInterrupted,
    SourceFailed,
)
from zcmigrate.migrate.imagefiles import resume_path, state_path
from zcmigrate.migrate.incoming import (
    IncomingImage,
    check_destination,
    free_space,
    no_space,
)
from zcmigrate.migrate.mainchannel import MainChannel
from zcmigrate.migrate.postcopy_resume import read_resume_record
from zcmigrate.migrate.protocol import (
    DEVICE_STATE_MAX,
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
    PostcopyListen,
    RamReceived,
    Record,
    Writeback,
    WritebackDone,
)
from zcmigrate.migrate.stats import RECEIVE_FIELDS, channel_dict, channel_json
from zcmigrate.migrate.units import format_size
from zcmigrate.multifd.exiting import Exiting
from zcmigrate.multifd.receiver import ReceiverPool
from zcmigrate.multifd.wire import InitTracker, RemoteProtocolError, WireContext

if TYPE_CHECKING:
    from zcmigrate.migrate.postcopy_destination import PostcopyDestination, PostcopyOutcome

log = structlog.get_logger("zcmigrate.destination")


@dataclass
class ReceiveResult:
    image: Path
    state_file: Path
    uuid: str
    image_size: int
    page_size: int
    channels: int
    normal_pages: int
    zero_pages: int
    bytes_received: int
    syncs: int
    total_time_ms: float
    per_channel: list[dict[str, int]] = field(default_factory=list)
    # False when the commit happened but COMMIT_ACK could not be delivered: the source
    # then keeps its guest paused and must be told by hand (`zcmigrate retire`).
    acknowledged: bool = True
    # Post-copy's numbers (PostcopyOutcome.to_dict), None after a precopy migration.
    postcopy: dict[str, int] | None = None

    def to_dict(self) -> dict[str, object]:
        """The layout `send --json` prints (MigrationStats.to_dict, query-migrate's names),
        with what only the receiver knows: the image, its state file, the migration's UUID.
        Every MULTIFD_FLUSH ends one of the source's iterations, so the syncs seen here
        are its "iterations"."""
        seconds = max(self.total_time_ms / 1000, 1e-6)
        return {
            "status": "completed",
            "total-time": round(self.total_time_ms),
            "ram": {
                "transferred": self.bytes_received,
                "remaining": 0,
                "total": self.image_size,
                "normal": self.normal_pages,
                "normal-bytes": self.normal_pages * self.page_size,
                "zero-pages": self.zero_pages,
                "page-size": self.page_size,
                "mbps": round(self.bytes_received * 8 / 1e6 / seconds, 3),
                "iterations": self.syncs,
            },
            "multifd": {"channels": [channel_json(c) for c in self.per_channel]},
            "image": str(self.image),
            "state-file": str(self.state_file),
            "uuid": self.uuid,
            "acknowledged": self.acknowledged,
            **(self.postcopy or {}),
        }


R = TypeVar("R", bound=Record)


class DestinationJob:
    """Receive one migration on `listener` into `image`; run() blocks until the end."""

    def __init__(
        self,
        image: str | os.PathLike[str],
        listener: Listener,
        *,
        auth_key: bytes | None = None,
        accept_timeout: float | None = None,
        status: Callable[[str], None] | None = None,
        peer_timeout: float = DEFAULT_PEER_TIMEOUT,
        replace: bool = False,
        max_image_size: int | None = None,
        max_device_state: int = DEVICE_STATE_MAX,
        guest_args: list[str] | None = None,
        postcopy_recover_timeout: float | None = None,
        take_over: bool = False,
        require_cipher: str | None = None,
    ) -> None:
        if require_cipher is not None:
            cipher_id(require_cipher)
        self.image = Path(image).absolute()
        self.listener = listener
        self.auth_key = auth_key
        self.accept_timeout = accept_timeout
        self.status = status or (lambda s: None)
        self.peer_timeout = peer_timeout
        self.replace = replace
        self.max_image_size = max_image_size  # None: what the directory can hold
        self.max_device_state = max_device_state
        # None: either cipher the source chooses; else only that one (a policy that asks
        # for an algorithm NIST approves sets aes-128-gcm).
        self.require_cipher = require_cipher
        self.exiting = Exiting()
        self._main: MainChannel | None = None
        self._pool: ReceiverPool | None = None
        self._incoming = IncomingImage(self.image)
        self._syncs = 0
        self._committed = False
        self._committing = False
        self._session: SessionKeys | None = None
        self._acknowledged = True
        self._state_lock = threading.Lock()
        self._seen_bytes = -1
        self._seen_at = 0.0
        self._uuid = ""
        # Post-copy: the arguments of the guest started here (its dirty rate), and the
        # post-copy in progress once the source advised one.
        self.guest_args = guest_args or []
        self._postcopy: PostcopyDestination | None = None
        self._postcopy_outcome: PostcopyOutcome | None = None
        self._ctx: WireContext | None = None
        # Post-copy recovery: how long to wait for `send --resume` after a break (None:
        # for ever; the guest waits for its pages whatever we do), the migration's UUID,
        # and the data channels of a resumed session (no ReceiverPool owns them).
        self.postcopy_recover_timeout = postcopy_recover_timeout
        self._hello_uuid = b""
        self._data_channels: list[Channel] = []
        # `receive IMAGE --resume`: no migration starts here; the guest a dead receiver
        # left waiting on IMAGE is taken over, and its source's resume awaited.
        self.take_over = take_over
        self.log = log.bind(image=str(self.image))

    def cancel(self, reason: str = "stopped") -> bool:
        """Stop waiting and discard (SIGTERM on the receiver); False once the commit has
        begun: it then finishes, and is reported as committed (the commit point)."""
        with self._state_lock:
            if self._committing:
                self.log.warning("stop requested during the commit: finishing it first",
                                 reason=reason)
                return False
            self.exiting.set(ReceiveCancelled(f"receive cancelled: {reason}"), "cancel")
        self.listener.shutdown()
        if self._main is not None:
            self._main.shutdown()
        return True

    def run(self) -> ReceiveResult:
        try:
            return self._run()
        except BaseException as e:
            err = self._fail(e)
            raise err from e
        finally:
            self._cleanup()

    # ----------------------------------------------------------------- main

    def _check_exiting(self) -> None:
        if self.exiting.is_set():
            err = self.exiting.error
            raise err if err is not None else ReceiveError("stopped")

    def _check_alive(self) -> None:
        """While the source sends nothing on the main channel (its iterations), its data
        channels must move: a source that sent no byte for peer-timeout is stopped or cut
        off, and keepalive alone would not say so while its kernel still answers."""
        self._check_exiting()
        assert self._main is not None
        total = self._main.channel.statistics().bytes_received
        if self._pool is not None:
            total += self._pool.statistics().bytes
        for ch in self._data_channels:
            total += ch.statistics().bytes_received
        now = time.monotonic()
        if total != self._seen_bytes:
            self._seen_bytes, self._seen_at = total, now
        elif now - self._seen_at > self.peer_timeout:
            raise ReceiveError(f"the source sent nothing for {self.peer_timeout:g} s "
                               "(peer-timeout): it stopped or the network cut it off")

    def _run(self) -> ReceiveResult:
        if self.take_over:
            return self._run_take_over()
        self.status("waiting for a migration")
        key = self.auth_key
        # Every connection is served until one proves it is a migration; strays, probes
        # and wrong keys are logged and closed, and the wait goes on.
        admitted = admit_source(self.listener, keyed=key is not None,
                                authenticate=self._authenticate,
                                accept_timeout=self.accept_timeout,
                                peer_timeout=self.peer_timeout, abort=self._check_exiting,
                                device_state_max=self.max_device_state)
        main, greeting, hello = admitted.main, admitted.greeting, admitted.hello
        self._main = main
        t0 = time.monotonic()  # the migration starts when its HELLO is accepted
        self._check_size(hello)
        ctx = hello.context()
        uuid = self._uuid = hello.uuid.hex()
        self._hello_uuid = hello.uuid
        self.log = self.log.bind(uuid=uuid[:8])
        # The image may have changed hands since the receiver started (a guest resumed
        # on the last one committed here): look again before touching anything.
        check_destination(self.image, replace=self.replace)
        self._incoming.create(ctx.image_size)
        if key is None:
            main.send(HelloAck())
        else:
            main.send(HelloAck(handshake_mac(key, b"hello-ack", greeting.payload(),
                                             hello.payload())))
            self._session = SessionKeys(key, hello.nonce, greeting.nonce, hello.uuid,
                                        hello.cipher)
            main.secure(self._session.sealer(Direction.DESTINATION_TO_SOURCE, None),
                        self._session.opener(Direction.SOURCE_TO_DESTINATION, None))
        self.status(f"migration {uuid[:8]}: {ctx.image_size >> 20} MiB, {ctx.channels} channels")
        self.log.info("hello", channels=ctx.channels, image_size=ctx.image_size,
                      page_size=ctx.page_size, zero_copy=hello.zero_copy,
                      cipher=hello.cipher if key is not None else None,
                      encryption=key is not None and hello.encryption)

        session = self._session
        channels = admit_data_channels(
            self.listener, InitTracker(ctx), n=ctx.channels, main=main,
            binding=session.binding_mac if session is not None else None,
            timeout=self.peer_timeout, peer_timeout=self.peer_timeout,
            abort=self._check_exiting)
        self._ctx = ctx
        if ctx.sealed and session is None:  # _authenticate refuses it; never run clear
            raise RemoteProtocolError("the source asks for sealed packets without a key")
        self._pool = ReceiverPool(channels, ctx, self._incoming.sink, known_zero=True,
                                  exiting=self.exiting,
                                  keys=session if ctx.sealed else None)
        self._pool.start()

        # What each record makes us do; the conversation table has already refused any
        # record that is out of order, so no handler checks what came before.
        handlers: dict[type[Record], Callable[[Record], None]] = {
            MultifdFlush: self._on_flush,
            Keepalive: lambda rec: None,  # only to say the source is alive
            Writeback: self._on_writeback,
            EndOfRam: self._on_end_of_ram,
            DeviceStateRecord: self._on_device_state,
            Cancel: self._on_cancel,
            Error: self._on_error,
            PostcopyAdvise: self._on_postcopy_advise,
            PostcopyListen: self._on_postcopy_listen,
        }
        while not self._committed:
            rec = main.recv(None, abort=self._check_alive)
            handlers[type(rec)](rec)

        stats = self._pool.statistics()
        per = [channel_dict(c, RECEIVE_FIELDS) for c in stats.channels]
        result = ReceiveResult(
            image=self.image,
            state_file=state_path(self.image),
            uuid=uuid,
            image_size=ctx.image_size,
            page_size=ctx.page_size,
            channels=ctx.channels,
            normal_pages=sum(c["normal_pages"] for c in per),
            zero_pages=sum(c["zero_pages"] for c in per),
            bytes_received=sum(c["bytes"] for c in per),
            syncs=self._syncs,
            total_time_ms=(time.monotonic() - t0) * 1000,
            per_channel=per,
            acknowledged=self._acknowledged,
            postcopy=(self._postcopy_outcome.to_dict() if self._postcopy_outcome is not None
                      else None),
        )
        self.log.info("committed", normal=result.normal_pages, zero=result.zero_pages,
                      syncs=self._syncs)
        self.status(f"migration {uuid[:8]}: committed")
        return result

    def _run_take_over(self) -> ReceiveResult:
        """The receiver of a post-copy died: take its waiting guest over, then wait for the
        source's `send --resume` as after any break (_recover)."""
        t0 = time.monotonic()
        try:
            rec = read_resume_record(self.image)
        except MigrationError as e:
            raise ReceiveError(str(e)) from e
        if rec is None or rec.role != "destination":
            raise ReceiveError(
                f"nothing to take over: {self.image} is not the destination of an "
                f"interrupted post-copy (no {resume_path(self.image).name} of a destination "
                "beside it); nothing was changed")
        self._hello_uuid, self._uuid = rec.uuid, rec.uuid.hex()
        self.log = self.log.bind(uuid=self._uuid[:8])
        try:
            self._ctx = WireContext(uuid=rec.uuid, channels=1, page_size=rec.page_size,
                                    image_size=rec.image_size, pages_alloc=1)
        except ZcmigrateError as e:
            raise ReceiveError(f"{resume_path(self.image)}: {e}") from e
        self._incoming.adopt_placed()
        from zcmigrate.migrate.postcopy_destination import PostcopyDestination
        self._postcopy = PostcopyDestination(
            main=None, listener=self.listener, pool=None, ctx=self._ctx,
            incoming=self._incoming, session=None, peer_timeout=self.peer_timeout,
            exiting=self.exiting, check_alive=self._check_alive,
            begin_commit=self._begin_commit, status=self.status, log=self.log,
            guest_args=self.guest_args)
        with self._state_lock:
            self._committing = True  # the guest runs here: no cancel says "nothing"
        self._postcopy.take_over(rec)
        try:
            outcome = self._recover(ReceivePostcopyInterrupted(
                f"post-copy of migration {self._uuid[:8]} taken over from a receiver that "
                "died"))
        except PostcopyUnacknowledged as e:
            outcome = e.outcome
            self._acknowledged = False
            self.log.error("committed, but the acknowledgement could not be delivered",
                           error=str(e))
        self._postcopy_outcome = outcome
        return ReceiveResult(
            image=self.image, state_file=state_path(self.image), uuid=self._uuid,
            image_size=rec.image_size, page_size=rec.page_size, channels=0,
            normal_pages=0, zero_pages=0, bytes_received=0, syncs=0,
            total_time_ms=(time.monotonic() - t0) * 1000, acknowledged=self._acknowledged,
            postcopy=outcome.to_dict())

    def _check_size(self, hello: Hello) -> None:
        """A source (proven, with a key) that proposes more than we take: its migration
        fails at once, before anything is sized or allocated for it."""
        limit = self.max_image_size
        if limit is not None and hello.image_size > limit:
            raise ReceiveError(
                f"the source proposes an image of {format_size(hello.image_size)}; this "
                f"receiver takes at most {format_size(limit)} (--max-image-size)")
        # The old image (with --replace) goes only at the commit: the new one needs all of
        # its own room meanwhile. Checked here so that a source too big is refused before
        # anything is sized for it; the reservation at create() is the real test.
        free = free_space(self.image.parent)
        if free is not None and hello.image_size > free:
            raise no_space(self.image, hello.image_size)

    def _authenticate(self, greeting: Greeting, hello: Hello) -> None:
        key = self.auth_key
        if key is None:
            if hello.mac or hello.encryption:
                raise RemoteProtocolError("the source holds a key and this receiver none: "
                                          "give the receiver the same key")
            return
        if not hello.mac:
            raise RemoteProtocolError("authentication failed: the source holds no key, and "
                                      "this receiver accepts only sources that hold its key")
        want = handshake_mac(key, b"hello", greeting.payload(), hello.body())
        if not macs_equal(hello.mac, want):
            raise RemoteProtocolError("authentication failed: the source does not hold this "
                                      "receiver's key")
        if self.require_cipher is not None and hello.cipher != self.require_cipher:
            raise RemoteProtocolError(
                f"the source chose the cipher {hello.cipher}; this receiver requires "
                f"{self.require_cipher} (--require-cipher): send with --cipher "
                f"{self.require_cipher}")

    def _authenticate_new(self, greeting: Greeting, hello: Hello) -> None:
        self._authenticate(greeting, hello)
        if hello.resume:
            raise RemoteProtocolError(
                f"a resume of post-copy migration {hello.uuid.hex()[:8]}: this receiver "
                "waits for no interrupted post-copy (its receiver may have died: the guest "
                "then waits for a receiver to take over)")

    def _authenticate_resume(self, greeting: Greeting, hello: Hello) -> None:
        """A resume HELLO of the very migration whose guest waits here, or nothing."""
        self._authenticate(greeting, hello)
        want = self._uuid[:8]
        if not hello.resume:
            raise RemoteProtocolError(
                f"this receiver waits for the source of interrupted post-copy migration "
                f"{want} to resume it (`zcmigrate send IMAGE --resume`), not for a new "
                "migration")
        if hello.uuid != self._hello_uuid:
            raise RemoteProtocolError(
                f"a resume of migration {hello.uuid.hex()[:8]}: this receiver waits for "
                f"the resume of migration {want}")
        assert self._ctx is not None
        if (hello.page_size, hello.image_size) != (self._ctx.page_size,
                                                   self._ctx.image_size):
            raise RemoteProtocolError(
                f"a resume of migration {want} with {hello.image_size} bytes in "
                f"{hello.page_size}-byte pages; it was {self._ctx.image_size} bytes in "
                f"{self._ctx.page_size}-byte pages")

    # ------------------------------------------------------- record handlers

    def _on_flush(self, rec: Record) -> None:
        assert isinstance(rec, MultifdFlush) and self._pool is not None
        # Every data channel must reach this SYNC before any moves past it: a page of the
        # next iteration never lands before one of this iteration.
        self._pool.sync(timeout=self.peer_timeout)
        self._syncs += 1
        if self._syncs == 1:
            faults.reached("destination:precopy")
        self._incoming.start_writeback()
        self.status(f"migration {self._uuid[:8]}: iteration {rec.iteration} synced")

    def _on_writeback(self, rec: Record) -> None:
        assert self._main is not None
        # Everything received is in place (the source sends this right after a sync):
        # make it durable now, while the source guest still runs.
        self._incoming.writeback()
        self._main.send(WritebackDone())

    def _on_end_of_ram(self, rec: Record) -> None:
        assert isinstance(rec, EndOfRam) and self._pool is not None
        if self._postcopy is not None:
            # Advised, but precopy converged: the guest waiting for a go never will.
            self._postcopy.not_needed()
        # The final sync: every channel's last pages are in place once it is through, and
        # every worker stopped at it and was joined: nothing after it reaches the image.
        self._pool.sync(timeout=self.peer_timeout, final=True)
        self._syncs += 1
        # Every page arrived and nothing came after the final SYNC, or nothing is
        # committed: checked before RAM_RECEIVED, so that the refusal still travels as an
        # ERROR and the source, which has not sent the device state, resumes its guest.
        self._pool.check_complete()
        assert self._main is not None
        self._main.send(RamReceived())

    def _on_device_state(self, rec: Record) -> None:
        assert isinstance(rec, DeviceStateRecord) and self._main is not None
        assert self._pool is not None
        # The table lets the device state in only after END_OF_RAM, whose sync every data
        # channel has passed: it is applied after the final sync (the invariant, point 3).
        # Looked at again right before the commit point, for bytes that came after the
        # final SYNC since END_OF_RAM: a failure here commits nothing.
        self._pool.check_complete()
        with self._state_lock:
            # Past this point nothing turns the migration into "nothing committed": a
            # cancel or SIGTERM waits for the commit (ARCHITECTURE.md, invariant 5).
            self._check_exiting()
            self._committing = True
        self.status(f"migration {self._uuid[:8]}: committing")
        faults.reached("destination:committing")
        self._incoming.commit(rec.data)
        faults.reached("destination:committed")
        self._committed = True
        try:
            self._main.send(CommitAck(hashlib.sha256(rec.data).digest()))
        except (ChannelError, OSError) as e:
            self._acknowledged = False
            self.log.error("committed, but the acknowledgement could not be delivered",
                           error=str(e))

    def _on_postcopy_advise(self, rec: Record) -> None:
        assert self._main is not None and self._pool is not None and self._ctx is not None
        # Loaded when a source asks for post-copy (or --resume takes a guest over): a
        # precopy receiver's start does without it (about 20 ms of imports).
        from zcmigrate.migrate.postcopy_destination import PostcopyDestination
        self._postcopy = PostcopyDestination(
            main=self._main, listener=self.listener, pool=self._pool, ctx=self._ctx,
            incoming=self._incoming, session=self._session, peer_timeout=self.peer_timeout,
            exiting=self.exiting, check_alive=self._check_alive,
            begin_commit=self._begin_commit, status=self.status, log=self.log,
            guest_args=self.guest_args)
        self._postcopy.advise()
        self.status(f"migration {self._uuid[:8]}: post-copy advised; the guest waits here")

    def _on_postcopy_listen(self, rec: Record) -> None:
        assert isinstance(rec, PostcopyListen)
        if self._postcopy is None:
            raise RemoteProtocolError("POSTCOPY_LISTEN without POSTCOPY_ADVISE first")
        self._syncs += 1
        self.status(f"migration {self._uuid[:8]}: post-copy")
        try:
            try:
                self._postcopy_outcome = self._postcopy.run(rec)
            except ReceivePostcopyInterrupted as e:
                self._postcopy_outcome = self._recover(e)
        except PostcopyUnacknowledged as e:
            self._postcopy_outcome = e.outcome
            self._acknowledged = False
            self.log.error("committed, but the acknowledgement could not be delivered",
                           error=str(e))
        self._committed = True

    def _recover(self, broke: ReceivePostcopyInterrupted) -> PostcopyOutcome:
        """Post-copy recovery: the session broke while the guest runs here. Keep its link
        (and userfaultfd) and wait for the same source to come back with a resume HELLO
        (same migration, new session); serve it from what is still missing. Again after
        every break, until postcopy_recover_timeout (then `broke`, exit 8): the guest
        keeps waiting in the kernel either way, and nothing is ever invented for it."""
        assert self._postcopy is not None
        timeout = self.postcopy_recover_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        key = self.auth_key
        while True:
            self._postcopy.detach()
            self._close_session()
            # A fresh Exiting: the old one holds the break, and would stop the new session.
            self.exiting = Exiting()
            waiting = (f"post-copy interrupted, waiting for `zcmigrate send IMAGE --resume` "
                       f"from the source (migration {self._uuid[:8]})")
            self.status(waiting)
            self.log.warning("post-copy interrupted: waiting for the source to resume",
                             timeout_s=timeout)
            left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            try:
                admitted = admit_source(
                    self.listener, keyed=key is not None,
                    authenticate=self._authenticate_resume, accept_timeout=left,
                    peer_timeout=self.peer_timeout, abort=self._check_exiting,
                    device_state_max=self.max_device_state)
            except ReceiveError as e:
                raise ReceivePostcopyInterrupted(
                    f"{broke}; and no resume came: {e}") from e
            main, greeting, hello = admitted.main, admitted.greeting, admitted.hello
            self._main = main
            try:
                session: SessionKeys | None = None
                if key is None:
                    main.send(HelloAck())
                else:
                    main.send(HelloAck(handshake_mac(key, b"hello-ack", greeting.payload(),
                                                     hello.payload())))
                    # A new session (new nonces both ways), same migration.
                    session = SessionKeys(key, hello.nonce, greeting.nonce, hello.uuid,
                                          hello.cipher)
                    main.secure(session.sealer(Direction.DESTINATION_TO_SOURCE, None),
                                session.opener(Direction.SOURCE_TO_DESTINATION, None))
                self._session = session
                ctx = hello.context()
                self._data_channels = admit_data_channels(
                    self.listener, InitTracker(ctx), n=ctx.channels, main=main,
                    binding=session.binding_mac if session is not None else None,
                    timeout=self.peer_timeout, peer_timeout=self.peer_timeout,
                    abort=self._check_exiting)
            except (ZcmigrateError, OSError) as e:
                self.log.error("a resume session failed before it started", error=str(e))
                continue
            self.log.info("post-copy resume accepted", channels=ctx.channels)
            self._seen_bytes = -1  # the new session's bytes, from now
            try:
                return self._postcopy.resume(main=main, channels=self._data_channels,
                                             ctx=ctx, session=session, exiting=self.exiting)
            except ReceivePostcopyInterrupted as e:
                broke = e

    def _close_session(self) -> None:
        """The broken session's sockets; the guest's link is not one of them."""
        if self._pool is not None:
            self._pool.close()  # kept: its statistics are the result's
        for ch in self._data_channels:
            ch.close()
        self._data_channels = []
        if self._main is not None:
            self._main.close()

    def _begin_commit(self) -> None:
        with self._state_lock:
            # Past this point nothing turns the migration into "nothing committed": a
            # cancel or SIGTERM waits (ARCHITECTURE.md, invariant 5).
            self._check_exiting()
            self._committing = True

    def _on_cancel(self, rec: Record) -> None:
        raise ReceiveCancelled("the source cancelled the migration")

    def _on_error(self, rec: Record) -> None:
        assert isinstance(rec, Error)
        raise SourceFailed(f"the source failed: {rec.message}")

    # ------------------------------------------------------------- failure

    def _pending_cancel(self) -> bool:
        """Whether the source's CANCEL is waiting on the main channel: when the source
        cancels, its data channels may close before we read the CANCEL record."""
        if self._main is None or self._main.closed:
            return False
        with contextlib.suppress(Exception):
            while True:
                rec = self._main.recv(0.5)
                if isinstance(rec, Cancel):
                    return True
                if isinstance(rec, Error):
                    return False
        return False

    def _fail(self, exc: BaseException) -> ReceiveError:
        if not isinstance(exc, ReceiveError) and self._pending_cancel():
            exc = ReceiveCancelled("the source cancelled the migration")
        first = self.exiting.error
        if (isinstance(exc, SourceFailed) and first is not None
                and not isinstance(first, ReceiveError)):
            # Our own failure came first (a data channel refused a packet and closed its
            # connections); the source's ERROR is only its echo (a broken pipe there).
            # The operator needs the cause, so say ours, then the source's.
            exc = ReceiveError(f"migration failed: {first} (then {exc})")
        if isinstance(exc, ReceiveError):
            err = exc
        elif isinstance(self.exiting.error, ReceiveError):
            err = self.exiting.error
        else:
            cause = self.exiting.error or exc
            err = ReceiveError(f"migration failed: {cause}")
        self.exiting.set(err, "destination")
        if self._main is not None and not isinstance(exc, ReceiveCancelled):
            self._main.send_error(str(err))
        if isinstance(err, ReceivePostcopyInterrupted):
            return err  # said already, with what the guest waits for
        self.log.error("receive failed, nothing committed", error=str(err))
        self.status(f"failed: {err}")
        return err

    def _cleanup(self) -> None:
        if self._postcopy is not None:
            self._postcopy.close()
        if self._pool is not None:
            self._pool.close()
        for ch in self._data_channels:
            ch.close()
        if self._main is not None:
            self._main.close()
        self._incoming.close()
