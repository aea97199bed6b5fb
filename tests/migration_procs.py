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

from tests.child_output import DIE_WITH_PARENT, ChildOutput

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def spawn(*args: str, stdout: Any = subprocess.PIPE, stderr: Any = subprocess.PIPE,
          env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """The child, its pipes read from the start by a ChildOutput (wait_line, finish...);
    `env` adds to the environment (ZCMIGRATE_FAULT, for one)."""
    proc = subprocess.Popen([*DIE_WITH_PARENT, sys.executable, "-m", "zcmigrate", *args],
                            cwd=ROOT, env={**ENV, **(env or {})}, stdout=stdout,
                            stderr=stderr, text=True)
    ChildOutput(proc)
    return proc


def wait_line(proc: subprocess.Popen[str], prefix: str, timeout: float = 60.0) -> str:
    """The next line on stdout that starts with `prefix`, stripped."""
    line = ChildOutput.of(proc).wait_line(
        "stdout", lambda line: line.startswith(prefix), f"a line starting {prefix!r}", timeout)
    return line.strip()


def start_or_kill(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    """wait_line, and a child that never said it started is not left running."""
    try:
        return wait_line(proc, prefix, timeout)
    except AssertionError:
        proc.kill()
        proc.wait()
        raise


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 15) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        message = f"{proc.args} did not stop within {timeout} s\n{ChildOutput.of(proc).describe()}"
        proc.kill()
        proc.wait()
        raise AssertionError(message) from None


@dataclass
class Guest:
    image: Path
    proc: subprocess.Popen[str]

    @classmethod
    def start(cls, image: Path, size: str, dirty_rate: str, fill: str = "half") -> Guest:
        p = spawn("guest", str(image), "--size", size, "--dirty-rate", dirty_rate,
                  "--fill", fill)
        start_or_kill(p, "guest running", timeout=120)
        return cls(image, p)

    def touched(self) -> int:
        from zcmigrate.migrate.guest import GuestControl

        with GuestControl.open(self.image) as g:
            return g.touched

    def running(self, timeout: float = 10.0) -> bool:
        """Alive and making progress: its write counter moves within `timeout` seconds.

        Seen moving, not hoped to have moved after a fixed sleep: a busy machine may hold
        the guest off the CPU for a while, and that does not make it stopped."""
        if self.proc.poll() is not None:
            return False
        before = self.touched()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.01)
            if self.proc.poll() is not None:
                return False
            if self.touched() > before:
                return True
        return False


@dataclass
class Receiver:
    image: Path
    proc: subprocess.Popen[str]
    port: int
    extra: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, image: Path, *extra: str, env: dict[str, str] | None = None) -> Receiver:
        p = spawn("receive", str(image), "--listen", "127.0.0.1:0", "--json",
                  "--log-format", "json", *extra, env=env)
        line = start_or_kill(p, "listening:", timeout=60)
        return cls(image, p, int(line.rsplit(":", 1)[1]), list(extra))

    def result(self, timeout: float = 120) -> tuple[int, str, str]:
        """Exit status, stdout and stderr, once it exited (killed after `timeout` s)."""
        return ChildOutput.of(self.proc).wait_exit(timeout)


def send(image: Path, port: int, *args: str,
         env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return spawn("send", str(image), "--to", f"127.0.0.1:{port}", "--json",
                 "--log-format", "json", *args, env=env)


def wait_stopped(proc: subprocess.Popen[str], timeout: float = 60.0) -> None:
    """Until `proc` has stopped itself at a fault point (ZCMIGRATE_FAULT): state T."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited ({proc.returncode}) before its "
                                 "fault point")
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
        if stat[stat.rfind(")") + 2] == "T":
            return
        time.sleep(0.01)
    raise AssertionError(f"{proc.args} did not reach its fault point in {timeout:g} s")


def json_output(out: str) -> dict[str, Any]:
    """The JSON document (--json) at the end of a command's stdout; {} if none."""
    if "{" not in out:
        return {}
    doc: dict[str, Any] = json.loads(out[out.index("{"):])
    return doc


def finish(proc: subprocess.Popen[str], timeout: float = 180) -> tuple[int, dict[str, Any], str]:
    """Exit code, the final statistics (--json), stderr, once it exited (killed after
    `timeout` s)."""
    code, out, err = ChildOutput.of(proc).wait_exit(timeout)
    return code, json_output(out), err


def log_events(stderr: str) -> list[dict[str, Any]]:
    events = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
    return events


def wait_for_event(proc: subprocess.Popen[str], event: str, timeout: float = 60) -> list[str]:
    """Read the JSON log on stderr until `event` appears; return the lines read."""
    needle = f'"event": "{event}"'
    return ChildOutput.of(proc).wait_for(
        "stderr", lambda line: needle in line, f"the log event {event!r}", timeout)
