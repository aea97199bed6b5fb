"""Control of a running migration over a Unix socket: status, cancel, set a parameter.

The sending process serves one JSON request per line and answers one JSON line (QMP in
miniature). The socket is created 0600: whoever can use it can cancel the migration.
It knows the job only through the small Controlled protocol below.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

from zcmigrate.channel.local import LineServer, LocalSocketError, request_line
from zcmigrate.migrate.errors import ControlError, ParameterError
from zcmigrate.migrate.stats import MigrationStats


class Controlled(Protocol):
    def snapshot(self) -> MigrationStats: ...
    def cancel(self, reason: str = ...) -> bool: ...
    def set_parameter(self, name: str, value: int) -> None: ...


class ControlServer:
    """Serves `job` on a Unix socket from a daemon thread until close()."""

    def __init__(self, path: str | os.PathLike[str], job: Controlled) -> None:
        self.path = Path(path)
        self.job = job
        try:
            self._server = LineServer(self.path, self._handle, error_reply=_error_line)
        except LocalSocketError as e:
            raise ControlError(f"control socket: {e}; pass --control-socket to choose "
                               "another path") from e

    def _handle(self, line: bytes) -> bytes:
        try:
            req = json.loads(line or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError):
            return _error_line("request is not JSON")
        return json.dumps(self.dispatch(req)).encode()

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
        self._server.close()


def _error_line(message: str) -> bytes:
    return json.dumps({"ok": False, "error": message}).encode()


def request(path: str | os.PathLike[str], req: dict[str, Any], timeout: float = 10.0
            ) -> dict[str, Any]:
    """One request to the migration serving `path`; ControlError if there is none."""
    try:
        reply_line = request_line(Path(path), json.dumps(req).encode(), timeout)
    except LocalSocketError as e:
        raise ControlError(f"no migration is running on {path}: {e}") from e
    try:
        reply = json.loads(reply_line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ControlError(f"bad reply from {path}") from e
    if not isinstance(reply, dict):
        raise ControlError(f"bad reply from {path}")
    return reply
