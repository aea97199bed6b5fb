"""Local control sockets: a Unix stream socket that answers one request line with one reply
line per connection, and the client that asks (QMP in miniature, without its JSON).

The socket is created 0600 in a directory that must be ours and 0700, so that nobody else
can reach it or put one in its place. It knows bytes and lines, not what they mean.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from zcmigrate.channel.errors import ChannelError

MAX_LINE = 64 * 1024
_log = structlog.get_logger("zcmigrate.channel.local")


class LocalSocketError(ChannelError):
    """The control socket cannot be served or reached; the message says what to do."""


def private_dir(path: Path) -> None:
    """Create `path` (0700) or check that it is a directory of ours that no one else may
    enter: a socket in a directory another user can write could be swapped for theirs."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError as e:
        raise LocalSocketError(f"cannot create {path}: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise LocalSocketError(f"{path} is not a directory")
    if st.st_uid != os.geteuid():
        raise LocalSocketError(f"{path} belongs to uid {st.st_uid}, not to us "
                               f"(uid {os.geteuid()}); remove it or choose another path")
    if st.st_mode & 0o077:
        raise LocalSocketError(f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: others may "
                               f"enter it; chmod 700 {path}")


def is_served(path: Path) -> bool:
    """Whether a server answers on `path` (a connect succeeds)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError:
        return False
    finally:
        s.close()
    return True


def listen_private(path: Path, *, backlog: int) -> socket.socket:
    """A Unix stream socket listening on `path`, 0600 in a private directory (private_dir);
    a leftover socket file nobody serves is replaced, a served one refused."""
    private_dir(path.parent)
    if path.exists() or path.is_symlink():
        if is_served(path):
            raise LocalSocketError(f"{path} is in use by another process")
        path.unlink()  # a leftover of a process that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # the socket is created 0600, never briefly wider
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise LocalSocketError(f"cannot bind {path}: {e.strerror}") from e
    finally:
        os.umask(old)
    sock.listen(backlog)
    return sock


class LineServer:
    """Serves `handler(request line) -> reply line` on `path` from a daemon thread until
    close(). One slow or broken client cannot stop it: each connection has a deadline, and
    an exception in the handler is logged and answered, never the end of the thread."""

    def __init__(self, path: Path, handler: Callable[[bytes], bytes], *,
                 error_reply: Callable[[str], bytes], name: str = "control") -> None:
        self.path = path
        self._handler = handler
        self._error_reply = error_reply
        self._sock = listen_private(path, backlog=8)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                # No deadline on purpose: the server waits for requests for as long as it
                # lives; close() shuts the socket down, which ends this accept.
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(5.0)
                try:
                    self._answer(conn)
                except Exception as e:  # a bad request must not end the server
                    _log.warning("control request failed", error=str(e),
                                 kind=type(e).__name__)

    def _answer(self, conn: socket.socket) -> None:
        buf = b""
        while b"\n" not in buf and len(buf) < MAX_LINE:
            chunk = conn.recv(4096)
            if not chunk:
                break
            buf += chunk
        line = buf.split(b"\n", 1)[0]
        try:
            reply = self._handler(line)
        except Exception as e:
            _log.error("control handler failed", error=str(e), kind=type(e).__name__)
            reply = self._error_reply(f"internal error: {type(e).__name__}: {e}")
        conn.sendall(reply + b"\n")

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._thread.join(2)


def request_line(path: Path, line: bytes, timeout: float = 10.0) -> bytes:
    """Send one line to the server on `path` and return its reply line (without the
    newline); LocalSocketError if none answers."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except OSError as e:
            raise LocalSocketError(f"nothing answers on {path} ({e.strerror})") from e
        try:
            s.sendall(line + b"\n")
            buf = b""
            while not buf.endswith(b"\n") and len(buf) < 16 * MAX_LINE:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except OSError as e:
            raise LocalSocketError(f"{path}: {e.strerror or e}") from e
    finally:
        s.close()
    return buf.rstrip(b"\n")
