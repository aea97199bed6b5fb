"""The receiver's handle on a guest started with `--postcopy SOCKET`: accept its link,
adopt its userfaultfd as a UserfaultRange, send the go with the device state (or take
over from a receiver that died), and say when every page is there. It knows the link's
records and the guest's descriptor, not where pages come from or the migration's
protocol: serving the faults is the caller's loop over `pages`.
"""

from __future__ import annotations

import contextlib
import os

from zcmigrate.channel.errors import ChannelError
from zcmigrate.channel.fdpass import FdConnection, FdListener, PeerCredentials
from zcmigrate.migrate.guest.device import DeviceState
from zcmigrate.migrate.guest.errors import GuestError
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
from zcmigrate.multifd.userfault import UserfaultRange


class PostcopyGuest:
    """One guest's link, from the receiver's side. `pages` is the guest's registered
    image, to read faults from and copy pages into; `hello` says where it is."""

    def __init__(self, conn: FdConnection, hello: Hello, pages: UserfaultRange,
                 conv: Conversation) -> None:
        self._conn = conn
        self.hello = hello
        self.pages = pages
        self.peer: PeerCredentials = conn.peer()
        self._conv = conv

    @classmethod
    def accept(cls, listener: FdListener, timeout: float) -> PostcopyGuest:
        """The next guest to connect and say hello within `timeout` seconds. GuestError
        for a guest that breaks the contract (it is refused and disconnected)."""
        try:
            conn = listener.accept(timeout)
        except ChannelError as exc:
            raise GuestError(f"no post-copy guest on {listener.path}: {exc}") from exc
        conv = Conversation("receiver")
        fds: list[int] = []
        try:
            body, fds = conn.recv(timeout)
            record = decode(body)
            conv.received(record)
            assert isinstance(record, Hello)
            if len(fds) != 1:
                raise PostcopyProtocolError(
                    f"a post-copy hello carries one userfaultfd, not {len(fds)} descriptors"
                )
            pages = UserfaultRange(fds[0], record.base, record.size, record.granule)
            fds = []
        except (ChannelError, GuestError, ValueError) as exc:
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(ChannelError, GuestError):
                conn.send(encode(Refused(reason=str(exc)[:1024])))
            conn.close()
            if isinstance(exc, GuestError):
                raise
            raise GuestError(f"a post-copy guest did not say hello: {exc}") from exc
        return cls(conn, record, pages, conv)

    def _send(self, record: Record) -> None:
        self._conv.sent(record)
        try:
            self._conn.send(encode(record))
        except ChannelError as exc:
            raise GuestError(f"the post-copy guest (pid {self.hello.pid}) is gone: {exc}") from exc

    def _recv(self, timeout: float) -> Record:
        try:
            body, fds = self._conn.recv(timeout)
        except ChannelError as exc:
            raise GuestError(
                f"no answer from the post-copy guest (pid {self.hello.pid}): {exc}"
            ) from exc
        for fd in fds:
            os.close(fd)
        record = decode(body)
        self._conv.received(record)
        return record

    def go(self, state: DeviceState, timeout: float) -> None:
        """Start a guest that offered itself for the first time from `state`; returns once
        it runs. Serve its faults from then on (they may come before this returns)."""
        if self.hello.recovery:
            raise GuestError(f"the guest (pid {self.hello.pid}) runs already: take_over() it")
        self._send(Go(device_state=state))
        record = self._recv(timeout)
        if isinstance(record, Refused):
            raise GuestError(f"the guest (pid {self.hello.pid}) refused the go: {record.reason}")
        assert isinstance(record, Running)

    def take_over(self) -> None:
        """Serve a guest that ran with another receiver: wake its whole range first, since
        the last receiver may have read faults it never served (their threads wait, and
        no fault is read twice): woken, they fault again and come to us."""
        if not self.hello.recovery:
            raise GuestError(f"the guest (pid {self.hello.pid}) has not run yet: go() it")
        self.pages.wake()
        self._send(Serving())

    def done(self, timeout: float) -> str | None:
        """Say every page is in place; None once the guest unregistered its range, or the
        guest's reason for refusing (a hole is left: go on serving). A fault read just
        before the guest unregistered may find the range gone when served (RangeGone):
        its page was there, and the unregister woke its thread. Nothing to do."""
        self._send(Done())
        record = self._recv(timeout)
        if isinstance(record, Refused):
            return record.reason
        assert isinstance(record, Complete)
        return None

    def close(self) -> None:
        """Close the link and our copy of the descriptor. The guest keeps its own: a page
        still missing keeps its thread waiting, for another receiver."""
        self._conn.close()
        self.pages.close()

    def __enter__(self) -> PostcopyGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["PostcopyGuest"]
