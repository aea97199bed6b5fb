"""The destination side of one migration: handshake, receive, and the durable commit.

Pages land in `<image>.incoming`; the device state is taken only after every data
channel reached the final sync, then image and state are made durable and the commit
acknowledged. On any failure the incoming image is discarded and nothing committed
earlier is touched. It knows no CLI, terminal or systemd (status goes to a callback).
"""

from __future__ import annotations

import contextlib
import hmac
import mmap
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from zcmigrate.channel.errors import AcceptTimeout, ChannelError
from zcmigrate.channel.zcsocket import Channel, Listener
from zcmigrate.migrate.durable import fsync_dir, write_atomic
from zcmigrate.migrate.guest import state_path
from zcmigrate.migrate.mainchannel import MainChannel, MainChannelTimeout
from zcmigrate.migrate.protocol import (
    NONCE_SIZE,
    Hello,
    Record,
    RecordType,
    auth_mac,
    decode_flush,
    encode_error,
    encode_greeting,
    encode_record,
    error_message,
)
from zcmigrate.migrate.stats import RECEIVE_FIELDS, channel_dict
from zcmigrate.multifd.exiting import Exiting, MultifdError
from zcmigrate.multifd.receiver import ReceiverPool, accept_data_channel
from zcmigrate.multifd.wire import InitTracker, ProtocolError, RemoteProtocolError

log = structlog.get_logger("zcmigrate.destination")

HANDSHAKE_TIMEOUT = 30.0


class ReceiveError(Exception):
    """The incoming migration failed; nothing was committed."""

    exit_code = 1


class ReceiveCancelled(ReceiveError):
    exit_code = 4


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

    def to_dict(self) -> dict[str, object]:
        return {
            "status": "completed",
            "image": str(self.image),
            "state-file": str(self.state_file),
            "uuid": self.uuid,
            "total": self.image_size,
            "page-size": self.page_size,
            "channels": self.channels,
            "normal": self.normal_pages,
            "zero-pages": self.zero_pages,
            "transferred": self.bytes_received,
            "syncs": self.syncs,
            "total-time": round(self.total_time_ms),
            "multifd": {"channels": self.per_channel},
        }


def incoming_path(image: Path) -> Path:
    return image.with_name(image.name + ".incoming")


# Where the receiver writes pages with pwrite through the image's descriptor rather than
# into a mapping. On a tmpfs a write(2) fills a new page without zeroing it first and
# without a fault per page: half the CPU of the mapping (docs/performance.md). On a disk
# file system the CPU gain is small (0.33-0.40 against 0.45-0.55 s/GiB) and a live
# migration's commit fsync was measured slower after pwrite (370-820 ms against
# 80-370 ms on ext4, so the downtime limit was missed): those keep the mapping.
WRITE_THROUGH_FD = frozenset({"tmpfs"})


def filesystem_type(fd: int) -> str:
    """The type of the file system holding `fd` ("tmpfs", "ext4", ...) from
    /proc/self/mountinfo, or "" when no mount matches its device."""
    dev = os.fstat(fd).st_dev
    want = f"{os.major(dev)}:{os.minor(dev)}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[2] == want and " - " in line:
                return line.split(" - ", 1)[1].split()[0]
    return ""


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
    ) -> None:
        self.image = Path(image).absolute()
        self.listener = listener
        self.auth_key = auth_key
        self.accept_timeout = accept_timeout
        self.status = status or (lambda s: None)
        self.exiting = Exiting()
        self._main: MainChannel | None = None
        self._pool: ReceiverPool | None = None
        self._map: mmap.mmap | None = None  # only where pages go through a mapping
        self._fd = -1
        self._incoming = incoming_path(self.image)
        self._created = False
        self._writeback: threading.Thread | None = None
        self.log = log.bind(image=str(self.image))

    def cancel(self, reason: str = "stopped") -> None:
        """Stop waiting and discard (SIGTERM on the receiver)."""
        self.exiting.set(ReceiveCancelled(f"receive cancelled: {reason}"), "cancel")
        self.listener.shutdown()
        if self._main is not None:
            self._main.shutdown()

    def run(self) -> ReceiveResult:
        t0 = time.monotonic()
        try:
            return self._run(t0)
        except BaseException as e:
            err = self._fail(e)
            raise err from e
        finally:
            self._cleanup()

    # ----------------------------------------------------------------- main

    def _run(self, t0: float) -> ReceiveResult:
        self.status("waiting for a migration")
        main = MainChannel(self.listener.accept(timeout=self.accept_timeout, name="main"))
        self._main = main
        t0 = time.monotonic()  # the migration starts when its main channel arrives
        nonce = secrets.token_bytes(NONCE_SIZE)
        main.send(encode_greeting(nonce))
        rec = main.recv(timeout=HANDSHAKE_TIMEOUT)
        if rec.type is RecordType.ERROR:
            raise ReceiveError(f"source gave up: {error_message(rec)}")
        hello = Hello.decode(rec)
        if self.auth_key is not None:
            expected = auth_mac(self.auth_key, nonce, hello.uuid)
            if not hmac.compare_digest(expected, hello.auth):
                raise RemoteProtocolError("authentication failed: the source does not hold "
                                          "this receiver's key")
        ctx = hello.context()
        uuid = hello.uuid.hex()
        self.log = self.log.bind(uuid=uuid[:8])
        self._create_incoming(ctx.image_size)
        main.send(encode_record(RecordType.HELLO_ACK))
        self.status(f"migration {uuid[:8]}: {ctx.image_size >> 20} MiB, {ctx.channels} channels")
        self.log.info("hello", channels=ctx.channels, image_size=ctx.image_size,
                      page_size=ctx.page_size, zero_copy=hello.zero_copy)

        channels = self._accept_data_channels(InitTracker(ctx), ctx.channels)
        self._pool = ReceiverPool(channels, ctx, self._fd if self._map is None else self._map,
                                  known_zero=True, exiting=self.exiting)
        self._pool.start()

        final_seen = end_seen = False
        syncs = 0
        while True:
            rec = self._next_record(main)
            if rec.type is RecordType.MULTIFD_FLUSH:
                iteration, final = decode_flush(rec)
                if final_seen:
                    raise RemoteProtocolError("MULTIFD_FLUSH after the final one")
                # Every data channel must reach this SYNC before any moves past it: a
                # page of the next iteration never lands before one of this iteration.
                self._pool.sync(timeout=None)
                syncs += 1
                final_seen = final
                if not final:
                    self._start_writeback()
                self.status(f"migration {uuid[:8]}: iteration {iteration} synced")
            elif rec.type is RecordType.WRITEBACK:
                if final_seen:
                    raise RemoteProtocolError("WRITEBACK after the final MULTIFD_FLUSH")
                # Everything received is in place (the source sends this right after a
                # sync): make it durable now, while the source guest still runs.
                if self._writeback is not None:
                    self._writeback.join()
                os.fdatasync(self._fd)
                main.send(encode_record(RecordType.WRITEBACK_DONE))
            elif rec.type is RecordType.END_OF_RAM:
                if not final_seen:
                    raise RemoteProtocolError("END_OF_RAM before the final MULTIFD_FLUSH")
                end_seen = True
            elif rec.type is RecordType.DEVICE_STATE:
                # The device state is applied only after every data channel has reached
                # the final sync (the invariant, point 3).
                if not (final_seen and end_seen):
                    raise RemoteProtocolError(
                        "DEVICE_STATE before the final sync of every data channel"
                    )
                self.status(f"migration {uuid[:8]}: committing")
                self._commit(rec.payload)
                main.send(encode_record(RecordType.COMMIT_ACK))
                break
            elif rec.type is RecordType.CANCEL:
                raise ReceiveCancelled("the source cancelled the migration")
            elif rec.type is RecordType.ERROR:
                raise ReceiveError(f"the source failed: {error_message(rec)}")
            else:
                raise RemoteProtocolError(f"main channel: unexpected {rec.type.name}")

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
            syncs=syncs,
            total_time_ms=(time.monotonic() - t0) * 1000,
            per_channel=per,
        )
        self.log.info("committed", normal=result.normal_pages, zero=result.zero_pages,
                      syncs=syncs)
        self.status(f"migration {uuid[:8]}: committed")
        return result

    def _next_record(self, main: MainChannel) -> Record:
        """The next main-channel record; a failed data channel ends the wait too."""
        while True:
            try:
                return main.recv(timeout=0.25)
            except MainChannelTimeout:
                if self.exiting.is_set():
                    err = self.exiting.error
                    raise (err if err is not None else ReceiveError("stopped")) from None

    def _accept_data_channels(self, tracker: InitTracker, n: int) -> list[Channel]:
        """The N data channels of this migration, by id; strangers are turned away."""
        got: dict[int, Channel] = {}
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        try:
            while not tracker.complete:
                left = deadline - time.monotonic()
                if left <= 0 or self.exiting.is_set():
                    raise ReceiveError(
                        f"only {len(got)} of {n} data channels connected within "
                        f"{HANDSHAKE_TIMEOUT:g} s"
                    )
                if self._main is not None and self._main.peer_closed():
                    # The source is gone: no more of its channels will come.
                    raise ReceiveError(
                        f"the source closed the main channel after {len(got)} of {n} data "
                        "channels connected"
                    )
                try:
                    ch = self.listener.accept(timeout=min(left, 0.25), name="multifd?")
                except AcceptTimeout:
                    continue  # look at the main channel again, then wait on
                try:
                    cid = accept_data_channel(ch, tracker, timeout=min(left, 10.0))
                except (ProtocolError, MultifdError, ChannelError) as e:
                    # Not a channel of this migration: a stray or hostile connection must
                    # not be able to end (or join) the migration.
                    self.log.warning("data channel refused", reason=str(e))
                    ch.close()
                    continue
                ch.name = f"multifd{cid}"
                got[cid] = ch
        except BaseException:
            for ch in got.values():
                ch.close()
            raise
        return [got[i] for i in range(n)]

    # ------------------------------------------------------------- storage

    def _create_incoming(self, size: int) -> None:
        parent = self.image.parent
        if not parent.is_dir():
            raise ReceiveError(f"destination directory {parent} does not exist")
        with contextlib.suppress(FileNotFoundError):
            self._incoming.unlink()  # a leftover of a failed migration: never committed
        try:
            fd = os.open(self._incoming, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         0o600)
        except OSError as e:
            raise ReceiveError(f"cannot create {self._incoming}: {e.strerror}") from e
        self._fd = fd
        self._created = True
        try:
            # A sparse file reads as zero: pages sent as zero need no write at all.
            os.ftruncate(fd, size)
            if filesystem_type(fd) not in WRITE_THROUGH_FD:
                self._map = mmap.mmap(fd, size, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise ReceiveError(f"cannot size {self._incoming} to {size} bytes: {e.strerror}") \
                from e

    def _start_writeback(self) -> None:
        """Write received pages back in the background, so the commit's fsync has little
        left to do while the guest is paused (downtime). fdatasync releases the GIL."""
        if self._writeback is not None and self._writeback.is_alive():
            return
        fd = self._fd

        def writeback() -> None:
            with contextlib.suppress(OSError):
                os.fdatasync(fd)

        self._writeback = threading.Thread(target=writeback, name="writeback", daemon=True)
        self._writeback.start()

    def _commit(self, device_state: bytes) -> None:
        """Make image and device state durable, then swap them in (the commit point)."""
        if self._writeback is not None:
            self._writeback.join()
        if self._map is not None:
            self._map.flush()
        os.fsync(self._fd)
        state_file = state_path(self.image)
        # No window where a new image sits beside an old state: the old state goes
        # first, so a crash in between leaves an image without a state (uncommitted).
        with contextlib.suppress(FileNotFoundError):
            state_file.unlink()
        os.replace(self._incoming, self.image)
        self._created = False
        fsync_dir(self.image.parent)
        write_atomic(state_file, device_state)

    # ------------------------------------------------------------- failure

    def _pending_cancel(self) -> bool:
        """Whether the source's CANCEL is waiting on the main channel: when the source
        cancels, its data channels may close before we read the CANCEL record."""
        if self._main is None or self._main.closed:
            return False
        with contextlib.suppress(Exception):
            while True:
                rec = self._main.recv(timeout=0.5)
                if rec.type is RecordType.CANCEL:
                    return True
                if rec.type is RecordType.ERROR:
                    return False
        return False

    def _fail(self, exc: BaseException) -> ReceiveError:
        if not isinstance(exc, ReceiveError) and self._pending_cancel():
            exc = ReceiveCancelled("the source cancelled the migration")
        if isinstance(exc, ReceiveError):
            err = exc
        elif isinstance(self.exiting.error, ReceiveError):
            err = self.exiting.error
        else:
            cause = self.exiting.error or exc
            err = ReceiveError(f"migration failed: {cause}")
        self.exiting.set(err, "destination")
        if self._main is not None and not self._main.closed and not isinstance(
            exc, ReceiveCancelled
        ):
            with contextlib.suppress(Exception):
                self._main.send(encode_error(str(err)))
        self.log.error("receive failed, nothing committed", error=str(err))
        self.status(f"failed: {err}")
        return err

    def _cleanup(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self._main is not None:
            self._main.close()
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()
        if self._writeback is not None:
            self._writeback.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._created:
            # Discard: what was received is worth nothing without the device state.
            with contextlib.suppress(FileNotFoundError):
                self._incoming.unlink()
            self._created = False
