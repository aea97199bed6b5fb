"""Child processes for the guest's lease tests: a `zcmigrate guest` whose stdout is read
line by line against deadlines, a process that pauses (and may hold) a guest and then
waits to be killed, a process that throttles one, and one-shot commands. Nothing here
can hang: every read has a deadline, every child is killed on the way out."""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

WAIT_S = 10.0
ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@dataclass
class Child:
    """A child whose stdout is read with deadlines; everything it printed is kept."""

    proc: subprocess.Popen[bytes]
    out: bytearray = field(default_factory=bytearray)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, text: str, timeout: float = WAIT_S) -> str:
        """Read until a line containing `text` arrives; return that line."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        want = text.encode()
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while True:
                for line in bytes(self.out).splitlines(keepends=True):
                    if want in line and line.endswith(b"\n"):
                        return line.decode().strip()
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise AssertionError(f"no {text!r} within {timeout} s; printed {self.out!r}")
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    err = self.proc.stderr.read() if self.proc.stderr else b""
                    raise AssertionError(
                        f"exited ({self.proc.poll()}) before {text!r}: {self.out!r} {err!r}"
                    )
                self.out += chunk

    def wait(self, timeout: float = WAIT_S) -> int:
        return self.proc.wait(timeout=timeout)


@contextlib.contextmanager
def child(args: list[str]) -> Iterator[Child]:
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        yield Child(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=WAIT_S)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()


@contextlib.contextmanager
def guest(image: Path, *args: str) -> Iterator[Child]:
    """`zcmigrate guest IMAGE ARGS`, once it printed its "guest running" line."""
    with child([sys.executable, "-m", "zcmigrate", "guest", str(image), *args]) as c:
        c.expect("guest running:")
        yield c


_PAUSER = """
import sys, time
from zcmigrate.migrate.guest import GuestControl
ctl = GuestControl.open(sys.argv[1])
ctl.pause(timeout=5.0)
if sys.argv[2]:
    ctl.hold(bytes.fromhex(sys.argv[2]))
print("paused" + (" and held" if sys.argv[2] else ""), flush=True)
time.sleep(600)
"""

_THROTTLER = """
import sys, time
from zcmigrate.migrate.guest import GuestControl
ctl = GuestControl.open(sys.argv[1])
ctl.throttle = int(sys.argv[2])
print("throttled", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def pauser(image: Path, hold: bytes | None = None) -> Iterator[Child]:
    """A process that pauses the guest on `image` (and holds it for migration `hold`),
    then waits to be killed: the migration of a test."""
    with child([sys.executable, "-c", _PAUSER, str(image), hold.hex() if hold else ""]) as c:
        c.expect("paused")
        yield c


@contextlib.contextmanager
def throttler(image: Path, per_mille: int) -> Iterator[Child]:
    """A process that throttles the guest on `image`, then waits to be killed."""
    with child([sys.executable, "-c", _THROTTLER, str(image), str(per_mille)]) as c:
        c.expect("throttled")
        yield c


def zcmigrate(*args: str) -> subprocess.CompletedProcess[str]:
    """One `zcmigrate` command to its end (within WAIT_S)."""
    return subprocess.run([sys.executable, "-m", "zcmigrate", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=WAIT_S)


def proc_state(pid: int) -> str:
    """The one-letter state of a process in /proc (Z for a zombie), "" if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rfind(")") + 2]
