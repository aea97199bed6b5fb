"""Control of a running migration over a Unix socket: status, cancel, set a parameter.

The sending process serves one JSON request per line and answers one JSON line (QMP in
miniature). The socket is created 0600: whoever can use it can cancel the migration.
It knows the job only through the small Controlled protocol below.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any, Protocol

from zcmigrate.migrate.params import ParameterError
from zcmigrate.migrate.stats import MigrationStats

MAX_REQUEST = 64 * 1024


class Controlled(Protocol):
    def snapshot(self) -> MigrationStats: ...
    def cancel(self, reason: str = ...) -> bool: ...
    def set_parameter(self, name: str, value: int) -> None: ...


class ControlError(Exception):
    pass


class ControlServer:
    """Serves `job` on a Unix socket from a daemon thread until close()."""

    def __init__(self, path: str | os.PathLike[str], job: Controlled) -> None:
        self.path = Path(path)
        self.job = job
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if _alive(self.path):
                raise ControlError(f"{self.path} is in use by another migration; "
                                   "pass --control-socket to choose another path")
            self.path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._sock.bind(str(self.path))
        finally:
            os.umask(old)
        self._sock.listen(8)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5.0)
                with contextlib.suppress(OSError, ValueError):
                    self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        buf = b""
        while b"\n" not in buf and len(buf) < MAX_REQUEST:
            chunk = conn.recv(4096)
            if not chunk:
                break
            buf += chunk
        try:
            req = json.loads(buf.split(b"\n", 1)[0] or b"null")
            reply = self.dispatch(req)
        except (json.JSONDecodeError, UnicodeDecodeError):
            reply = {"ok": False, "error": "request is not JSON"}
        conn.sendall(json.dumps(reply).encode() + b"\n")

    def dispatch(self, req: Any) -> dict[str, Any]:
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"ok": False, "error": 'expected {"cmd": "status"|"cancel"|"set", ...}'}
        cmd = req["cmd"]
        if cmd == "status":
            return {"ok": True, "status": self.job.snapshot().to_dict()}
        if cmd == "cancel":
            if self.job.cancel("cancelled through the control socket"):
                return {"ok": True}
            return {"ok": False, "error": "too late to cancel: the migration is committing "
                                          "or has ended"}
        if cmd == "set":
            name, value = req.get("name"), req.get("value")
            if not isinstance(name, str) or not isinstance(value, int) or isinstance(value, bool):
                return {"ok": False, "error": "set needs a name and an integer value"}
            try:
                self.job.set_parameter(name, value)
            except ParameterError as e:
                return {"ok": False, "error": str(e)}
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._thread.join(2)


def _alive(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError:
        return False
    finally:
        s.close()
    return True


def request(path: str | os.PathLike[str], req: dict[str, Any], timeout: float = 10.0
            ) -> dict[str, Any]:
    """One request to the migration serving `path`; ControlError if there is none."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except OSError as e:
            raise ControlError(f"no migration is running on {path} ({e.strerror})") from e
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    try:
        reply: dict[str, Any] = json.loads(buf)
    except json.JSONDecodeError as e:
        raise ControlError(f"bad reply from {path}") from e
    return reply
