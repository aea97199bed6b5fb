"""Real processes for the end-to-end tests: a guest, a receiver, a sender, each a child
running the installed `python -m zcmigrate` (send, receive or guest)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def spawn(*args: str, stdout: Any = subprocess.PIPE, stderr: Any = subprocess.PIPE,
          ) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "zcmigrate", *args], cwd=ROOT, env=ENV,
                            stdout=stdout, stderr=stderr, text=True)


def wait_line(proc: subprocess.Popen[str], prefix: str, timeout: float = 60.0) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line.strip()
        if not line and proc.poll() is not None:
            break
    err = proc.stderr.read() if proc.stderr else ""
    raise AssertionError(f"{proc.args} never printed {prefix!r} (exit {proc.poll()}): {err}")


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 15) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{proc.args} did not stop within {timeout} s") from None


@dataclass
class Guest:
    image: Path
    proc: subprocess.Popen[str]

    @classmethod
    def start(cls, image: Path, size: str, dirty_rate: str, fill: str = "half") -> Guest:
        p = spawn("guest", str(image), "--size", size, "--dirty-rate", dirty_rate,
                  "--fill", fill)
        wait_line(p, "guest running", timeout=120)
        return cls(image, p)

    def touched(self) -> int:
        from zcmigrate.migrate.guest import GuestControl

        with GuestControl.open(self.image) as g:
            return g.touched

    def running(self) -> bool:
        """Alive and making progress: its write counter moves."""
        if self.proc.poll() is not None:
            return False
        a = self.touched()
        time.sleep(0.2)
        return self.touched() > a


@dataclass
class Receiver:
    image: Path
    proc: subprocess.Popen[str]
    port: int
    extra: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, image: Path, *extra: str) -> Receiver:
        p = spawn("receive", str(image), "--listen", "127.0.0.1:0", "--json",
                  "--log-format", "json", *extra)
        line = wait_line(p, "listening:")
        return cls(image, p, int(line.rsplit(":", 1)[1]), list(extra))

    def result(self, timeout: float = 120) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


def send(image: Path, port: int, *args: str) -> subprocess.Popen[str]:
    return spawn("send", str(image), "--to", f"127.0.0.1:{port}", "--json",
                 "--log-format", "json", *args)


def json_output(out: str) -> dict[str, Any]:
    """The JSON document (--json) at the end of a command's stdout; {} if none."""
    if "{" not in out:
        return {}
    doc: dict[str, Any] = json.loads(out[out.index("{"):])
    return doc


def finish(proc: subprocess.Popen[str], timeout: float = 180) -> tuple[int, dict[str, Any], str]:
    """Exit code, the final statistics (--json), stderr."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, json_output(out), err


def log_events(stderr: str) -> list[dict[str, Any]]:
    events = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
    return events


def wait_for_event(proc: subprocess.Popen[str], event: str, timeout: float = 60) -> list[str]:
    """Read the JSON log on stderr until `event` appears; return the lines read."""
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if f'"event": "{event}"' in line:
            return lines
    raise AssertionError(f"{event!r} never logged (exit {proc.poll()}): {''.join(lines)}")
