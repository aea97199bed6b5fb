"""The guest's end of post-copy: register the image's mapping for missing pages, hand the
userfaultfd to the receiver listening on a local socket, wait for its go, then keep the
link from a thread of its own (offering the descriptor again after a break) until the
receiver says every page is there. Once the guest runs it writes the post-copy fields of
the control block; it knows the mapping, the image's descriptor and the link's records,
not the workload's loop or the migration's protocol.

The guest keeps its own descriptor for as long as a page may be missing, on purpose: the
last close of a userfaultfd unregisters its range, and a thread that waits on a missing
page would then find a page of zeros, an invented page. With the receiver gone, a
thread that touches a missing page simply waits, whatever happens to the receiver.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from zcmigrate.channel.errors import ChannelError
from zcmigrate.channel.fdpass import FdConnection
from zcmigrate.migrate.guest.device import DeviceState
from zcmigrate.migrate.guest.errors import GuestError
from zcmigrate.migrate.guest.layout import Field, PostcopyPhase
from zcmigrate.migrate.guest.postcopy import (
    Complete,
    Conversation,
    Done,
    Go,
    Hello,
    PostcopyProtocolError,
    Record,
    Refused,
    Running,
    Serving,
    decode,
    encode,
)
from zcmigrate.multifd.pages import MappedFile
from zcmigrate.multifd.userfault import (
    UserfaultError,
    UserfaultRange,
    features_for,
    filesystem_type,
    first_missing,
    mapping_granule,
)

GO_TIMEOUT_S: Final = 120.0
"""How long a guest waits, from its start, for a receiver and its go: the receiver sends
it once the source's guest is paused and its device state arrived. Nothing has run
before the go, so a guest that gives up leaves nothing behind."""
RECONNECT_S: Final = 0.2
"""Pause between attempts to reach a receiver again after the link broke."""
TAKE_OVER_TIMEOUT_S: Final = 10.0
"""How long a new receiver may take to answer a recovery hello before the guest tries
again (it keeps trying: giving up would mean inventing pages)."""
_CONNECT_ATTEMPT_S: Final = 1.0


class PostcopyLink:
    """The guest's end of the post-copy link for one image."""

    def __init__(
        self,
        socket_path: Path,
        image: Path,
        image_fd: int,
        mapping: MappedFile,
        page_size: int,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.image = image.absolute()
        self._image_fd = image_fd
        self._mapping = mapping
        self._page_size = page_size
        # The control block exists from the go on (running() brings it): a guest that
        # never ran leaves the last guest's block, and its hand-over mark, as they were.
        self._ctl: memoryview | None = None
        self._peer = 0
        self._say_cb = say
        self._range: UserfaultRange | None = None
        self._conn: FdConnection | None = None
        self._conv = Conversation("guest")
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def _say(self, line: str) -> None:
        if self._say_cb is not None:
            self._say_cb(line)

    def _set_phase(self, phase: PostcopyPhase, peer: int | None = None) -> None:
        with self._lock:
            if peer is not None:
                self._peer = peer
            ctl = self._ctl
            if ctl is None:
                return
            ctl[Field.POSTCOPY_PEER] = self._peer
            ctl[Field.POSTCOPY_AT] = time.monotonic_ns()
            ctl[Field.POSTCOPY] = phase

    # ------------------------------------------------------------------ start

    def offer(self, deadline: float) -> None:
        """Register the mapping, reach the receiver on the socket (until the monotonic
        `deadline`) and hand it the userfaultfd with a first hello."""
        fd = self._image_fd
        try:
            self._range = UserfaultRange.register(
                self._mapping.address, self._mapping.size, mapping_granule(fd), features_for(fd)
            )
        except UserfaultError as exc:
            raise GuestError(
                f"cannot start {self.image} post-copy (it is on {filesystem_type(fd)}): {exc}"
            ) from exc
        conn = self._connect(max(deadline - time.monotonic(), 0.0))
        try:
            self._conv = self._send_hello(conn, recovery=False)
        except (ChannelError, GuestError):
            conn.close()
            raise
        self._conn = conn
        self._peer = conn.peer().pid

    def _connect(self, timeout: float) -> FdConnection:
        try:
            conn = FdConnection.connect(self.socket_path, timeout)
        except ChannelError as exc:
            raise GuestError(f"no receiver to serve {self.image}'s missing pages: {exc}") from exc
        peer = conn.peer()
        if peer.uid not in (os.geteuid(), 0):
            conn.close()
            # Whoever holds the descriptor writes this guest's memory.
            raise GuestError(
                f"the process listening on {self.socket_path} (pid {peer.pid}) belongs to "
                f"uid {peer.uid}, neither us nor root: it is not handed the userfaultfd"
            )
        return conn

    def _send_hello(self, conn: FdConnection, *, recovery: bool) -> Conversation:
        assert self._range is not None
        conv = Conversation("guest")
        hello = Hello(
            pid=os.getpid(),
            image=str(self.image),
            size=self._range.length,
            page_size=self._page_size,
            granule=self._range.granule,
            base=self._range.base,
            recovery=recovery,
        )
        self._send(conn, conv, hello, fds=[self._range.fileno()])
        return conv

    def _send(
        self, conn: FdConnection, conv: Conversation, record: Record, fds: list[int] | None = None
    ) -> None:
        conv.sent(record)
        conn.send(encode(record), fds or [])

    def _recv(self, conn: FdConnection, conv: Conversation, timeout: float | None) -> Record:
        body, fds = conn.recv(timeout)
        for fd in fds:  # the receiver sends none; never keep one
            os.close(fd)
        record = decode(body)
        conv.received(record)
        return record

    def wait_go(self, deadline: float) -> DeviceState:
        """The device state of the receiver's go, waited for until the monotonic
        `deadline`. GuestError if the receiver refuses, closes or is silent."""
        assert self._conn is not None
        try:
            record = self._recv(self._conn, self._conv, max(deadline - time.monotonic(), 0.0))
        except ChannelError as exc:
            raise GuestError(
                f"no go from the receiver on {self.socket_path}: {exc}; the guest never ran"
            ) from exc
        if isinstance(record, Refused):
            raise GuestError(f"the receiver refused to start the guest: {record.reason}")
        assert isinstance(record, Go)
        return record.device_state

    def refuse(self, reason: str) -> None:
        """Tell the receiver the go cannot be followed (best effort) and close."""
        if self._conn is not None:
            with contextlib.suppress(ChannelError, GuestError, OSError):
                self._send(self._conn, self._conv, Refused(reason=reason[:1024]))
            self._conn.close()
            self._conn = None

    def running(self, ctl: memoryview) -> None:
        """The guest runs with the control block `ctl`: say so, and serve the link from
        a thread until it completes."""
        assert self._conn is not None
        self._ctl = ctl
        # On a break, the thread finds it and offers the descriptor again.
        with contextlib.suppress(ChannelError):
            self._send(self._conn, self._conv, Running(pid=os.getpid()))
        self._set_phase(PostcopyPhase.SERVED)
        self._thread = threading.Thread(target=self._serve, name="postcopy-link", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the link's thread

    def _serve(self) -> None:
        conn: FdConnection | None = self._conn
        conv = self._conv
        while not self._stopping.is_set():
            if conn is None:
                conn, conv = self._take_over()
                continue
            try:
                record = self._recv(conn, conv, None)
            except (ChannelError, PostcopyProtocolError) as exc:
                self._lost(conn, str(exc))
                conn = None
                continue
            if isinstance(record, Done):
                if self._finish(conn, conv):
                    return
            elif isinstance(record, Refused):
                self._lost(conn, f"it refused: {record.reason}")
                conn = None

    def _lost(self, conn: FdConnection, why: str) -> None:
        with self._lock:
            conn.close()
            self._conn = None
        if self._stopping.is_set():
            return
        self._set_phase(PostcopyPhase.LOST)
        self._say(
            f"guest post-copy: the receiver (pid {self._peer}) is gone "
            f"({why}); a page not here yet stalls the guest until a receiver takes over on "
            f"{self.socket_path}"
        )

    def _take_over(self) -> tuple[FdConnection | None, Conversation]:
        """Offer the descriptor again until a receiver says it serves (or we stop)."""
        while not self._stopping.wait(RECONNECT_S):
            try:
                conn = self._connect(_CONNECT_ATTEMPT_S)
            except GuestError:
                continue
            with self._lock:
                if self._stopping.is_set():
                    conn.close()
                    break
                self._conn = conn  # so that stop() can break the wait below
            try:
                conv = self._send_hello(conn, recovery=True)
                record = self._recv(conn, conv, TAKE_OVER_TIMEOUT_S)
                if not isinstance(record, Serving):
                    raise PostcopyProtocolError(f"a recovery hello answered with {record.tag}")
            except (ChannelError, GuestError):
                with self._lock:
                    conn.close()
                    self._conn = None
                continue
            pid = conn.peer().pid
            self._set_phase(PostcopyPhase.SERVED, pid)
            self._say(f"guest post-copy: receiver pid {pid} took over on {self.socket_path}")
            return conn, conv
        return None, Conversation("guest")

    def _finish(self, conn: FdConnection, conv: Conversation) -> bool:
        """The receiver says every page is there: unregister only if the image agrees."""
        assert self._range is not None
        fs = filesystem_type(self._image_fd)
        hole = first_missing(self._image_fd, self._range.length) if fs == "tmpfs" else None
        if fs != "tmpfs" or hole is not None:
            why = (
                f"the page at offset {hole} of {self.image} is still missing"
                if hole is not None
                else f"{fs} does not report missing pages: the range stays registered"
            )
            self._say(f"guest post-copy: the receiver says every page is here, but {why}")
            with contextlib.suppress(ChannelError):
                self._send(conn, conv, Refused(reason=why))
            return False
        try:
            self._range.unregister()
        except UserfaultError as exc:
            with contextlib.suppress(ChannelError):
                self._send(conn, conv, Refused(reason=str(exc)))
            return False
        self._range.close()
        self._set_phase(PostcopyPhase.COMPLETE)
        with contextlib.suppress(ChannelError):
            self._send(conn, conv, Complete())
        with self._lock:
            conn.close()
            self._conn = None
        self._say("guest post-copy complete: every page is here")
        return True

    # ------------------------------------------------------------------ the end

    def stop(self) -> None:
        """End the link's thread and connection (the guest exits). The descriptor stays
        open until close(): call that once the image is unmapped."""
        self._stopping.set()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        if self._thread is not None:
            self._thread.join(5.0)
        with self._lock:
            self._ctl = None  # the guest releases it next

    def close(self) -> None:
        """Close the guest's userfaultfd, if post-copy did not complete."""
        if self._range is not None:
            self._range.close()


__all__ = ["GO_TIMEOUT_S", "RECONNECT_S", "TAKE_OVER_TIMEOUT_S", "PostcopyLink"]
