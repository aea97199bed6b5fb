"""Records with file descriptors between two local processes: a Unix stream socket that
carries length-prefixed records, each with any descriptors attached (SCM_RIGHTS), the
listener that accepts such connections, and the peer's credentials (SO_PEERCRED).

The listening socket is created 0600 in a private directory (local.py's rule): whoever
connects may be handed descriptors that give power over another process's memory. It
knows bytes, descriptors and processes, not what the records mean.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from zcmigrate.channel.errors import ChannelClosed, ReadTimeout
from zcmigrate.channel.local import LocalSocketError, listen_private

MAX_RECORD: Final = 64 * 1024
MAX_FDS: Final = 8
"""Most descriptors one record may carry."""
_LEN: Final = struct.Struct(">I")
_CONNECT_RETRY_S: Final = 0.05


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The process at the other end, as the kernel saw it when it connected."""

    pid: int
    uid: int
    gid: int


class FdConnection:
    """One connected Unix stream socket carrying records and descriptors.

    A record is a 4-byte big-endian length and that many bytes, sent with one sendmsg;
    its descriptors ride on that sendmsg. Reads take exactly one record's bytes, so a
    descriptor is always received with the record it was sent with, never the next.
    Every received descriptor is close-on-exec and the caller's to close.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @classmethod
    def connect(cls, path: Path, timeout: float) -> FdConnection:
        """Connect to the listener on `path`, retrying while nobody listens there yet, for
        up to `timeout` seconds; LocalSocketError if none answers in time."""
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.settimeout(max(deadline - time.monotonic(), 0.001))
                s.connect(str(path))
                return cls(s)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                if time.monotonic() >= deadline:
                    raise LocalSocketError(
                        f"nothing listens on {path} ({e.strerror}) after {timeout:g} s"
                    ) from e
                time.sleep(_CONNECT_RETRY_S)
            except OSError as e:
                s.close()
                raise LocalSocketError(f"cannot connect to {path}: {e.strerror or e}") from e

    def peer(self) -> PeerCredentials:
        raw = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return PeerCredentials(pid=pid, uid=uid, gid=gid)

    def send(self, record: bytes, fds: Sequence[int] = ()) -> None:
        """Send one record with `fds` attached (duplicated into the peer on arrival; ours
        stay open). ChannelClosed if the peer is gone."""
        if len(record) > MAX_RECORD:
            raise ValueError(f"a record of {len(record)} bytes is larger than {MAX_RECORD}")
        if len(fds) > MAX_FDS:
            raise ValueError(f"{len(fds)} descriptors are more than {MAX_FDS} per record")
        data = _LEN.pack(len(record)) + record
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            sent = self._sock.sendmsg([data], anc if fds else [])
            if sent < len(data):
                # The descriptors went with the first bytes; the rest follows plainly.
                self._sock.sendall(data[sent:])
        except TimeoutError as e:
            raise ChannelClosed("the peer does not take records (send timed out)") from e
        except OSError as e:  # EPIPE, ECONNRESET; EBADF once closed here
            raise ChannelClosed(f"the connection is closed: {e.strerror or e}") from e

    def recv(self, timeout: float | None) -> tuple[bytes, list[int]]:
        """One record and the descriptors that came with it. ReadTimeout when no whole
        record arrives within `timeout` seconds (None: wait for ever); ChannelClosed when
        the peer closed. After a ReadTimeout in the middle of a record the connection is
        out of step: close it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        fds: list[int] = []
        try:
            head = self._read_exactly(_LEN.size, deadline, fds)
            (n,) = _LEN.unpack(head)
            if n > MAX_RECORD:
                raise ChannelClosed(f"the peer sent a {n}-byte record; at most {MAX_RECORD}")
            body = self._read_exactly(n, deadline, fds) if n else b""
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return body, fds

    def _read_exactly(self, n: int, deadline: float | None, fds: list[int]) -> bytes:
        buf = bytearray()
        space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
        while len(buf) < n:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ReadTimeout(f"no whole record within the deadline ({len(buf)} of {n} bytes)")
            try:
                self._sock.settimeout(left)
                data, anc, flags, _ = self._sock.recvmsg(n - len(buf), space,
                                                         socket.MSG_CMSG_CLOEXEC)
            except TimeoutError:
                raise ReadTimeout(
                    f"no whole record within the deadline ({len(buf)} of {n} bytes)"
                ) from None
            except OSError as e:  # ECONNRESET; EBADF once closed here
                raise ChannelClosed(f"the connection is closed: {e.strerror or e}") from e
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                    fds.extend(got)
            if flags & socket.MSG_CTRUNC:
                raise ChannelClosed(
                    f"the peer attached more than {MAX_FDS} descriptors to a record"
                )
            if not data:
                raise ChannelClosed("the peer closed the connection")
            buf += data
        return bytes(buf)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def __enter__(self) -> FdConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FdListener:
    """Accepts FdConnections on `path` (0600, in a private directory) until close()."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = listen_private(path, backlog=4)

    def accept(self, timeout: float) -> FdConnection:
        """The next connection within `timeout` seconds; ReadTimeout if none comes."""
        self._sock.settimeout(timeout)
        try:
            conn, _ = self._sock.accept()  # bounded: settimeout(timeout) above, TimeoutError
        except TimeoutError:
            raise ReadTimeout(f"no connection on {self.path} within {timeout:g} s") from None
        except OSError as e:
            raise ChannelClosed(f"the listener on {self.path} is closed: {e.strerror}") from e
        conn.setblocking(True)
        return FdConnection(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> FdListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["MAX_FDS", "MAX_RECORD", "FdConnection", "FdListener", "PeerCredentials"]
