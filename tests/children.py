"""Child processes for the fault tests: output read by threads, every wait with a deadline.

A Child's stdout and stderr are drained line by line by two threads and its exit is
recorded by a third, so nothing the test does can block on a silent or stopped child; a
wait that runs out raises AssertionError naming the bound and what the child printed.
Also: a process's scheduler state from /proc (stopped at a fault point is state T).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def proc_state(pid: int) -> str:
    """The one-letter state of /proc/PID/stat (R, S, D, T, t, Z...), "" if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return ""
    # The command name in parentheses may hold spaces or parentheses: split after the last.
    return stat[stat.rfind(b")") + 2:][:1].decode()


def wait_stopped(pid: int, timeout: float, what: str = "") -> float:
    """Wait until `pid` is stopped (state T: a fault point sent it SIGSTOP); return the
    monotonic time it was seen stopped. AssertionError if it exits or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        state = proc_state(pid)
        if state == "T":
            return time.monotonic()
        if state in ("", "Z", "X"):
            raise AssertionError(f"{what or pid} exited instead of stopping at its fault point")
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what or pid} did not reach its fault point within "
                                 f"{timeout:g} s (state {state})")
        time.sleep(0.01)


class Child:
    """One process (usually `python -m zcmigrate ...`), its output kept as it comes."""

    def __init__(self, argv: Sequence[str], *, name: str, env: dict[str, str] | None = None,
                 prefix: Sequence[str] = (), cwd: Path = ROOT) -> None:
        self.name = name
        self.argv = [*prefix, *argv]
        self.started = time.monotonic()
        self.exited_at: float | None = None
        self._out: list[str] = []
        self._err: list[str] = []
        self._cond = threading.Condition()
        # cwd=ROOT: `python -m` puts the cwd first on sys.path, and the checkout's root is
        # the package directory itself, so no folder there can shadow the installed build.
        self.proc = subprocess.Popen(self.argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, errors="replace", start_new_session=True)
        self._threads = [
            threading.Thread(target=self._drain, args=(self.proc.stdout, self._out),
                             daemon=True, name=f"{name}-out"),
            threading.Thread(target=self._drain, args=(self.proc.stderr, self._err),
                             daemon=True, name=f"{name}-err"),
            threading.Thread(target=self._reap, daemon=True, name=f"{name}-wait"),
        ]
        for t in self._threads:
            t.start()

    @classmethod
    def zcmigrate(cls, *args: str, name: str, env: dict[str, str] | None = None,
                  prefix: Sequence[str] = ()) -> Child:
        return cls([sys.executable, "-m", "zcmigrate", *args], name=name, env=env,
                   prefix=prefix)

    # ------------------------------------------------------------ reading

    def _drain(self, stream: Any, into: list[str]) -> None:
        for line in stream:
            with self._cond:
                into.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _reap(self) -> None:
        # This daemon thread's job is to wait for the exit, however long the child runs;
        # tests bound their own waits (wait_exit's timeout) and kill what outlives them.
        self.proc.wait()
        with self._cond:
            self.exited_at = time.monotonic()
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def out(self) -> str:
        with self._cond:
            return "".join(self._out)

    @property
    def err(self) -> str:
        with self._cond:
            return "".join(self._err)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.exited_at is not None else None

    def describe(self) -> str:
        """Who it is, how it ended, and what it said, for a failure message: the status and
        error of its JSON result, the tail of its log without debug lines."""
        code = self.returncode
        how = "running" if code is None else f"exit {code}"
        if code is not None and code < 0:
            how = f"killed by {signal.Signals(-code).name}"
        state = proc_state(self.pid) if code is None else ""
        doc = self.json_doc()
        if doc:
            said = f"status {doc.get('status')!r}, error {doc.get('error-desc')!r}"
        else:
            said = self.out[-1000:]
        tail_err = "".join(line for line in self.err.splitlines(keepends=True)
                           if '"level": "debug"' not in line)[-2000:]
        return (f"{self.name} (pid {self.pid}, {how}{', state ' + state if state else ''})\n"
                f"--- stdout: {said}\n--- stderr:\n{tail_err}")

    def _wait_for(self, found: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = found()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0 or (self.exited_at is not None
                                 and not any(t.is_alive() for t in self._threads[:2])):
                    value = found()
                    if value:
                        return value
                    why = "it exited" if self.exited_at is not None else \
                        f"still nothing after {timeout:g} s"
                    raise AssertionError(f"{what} ({why})\n{self.describe()}")
                self._cond.wait(min(left, 0.1))

    def wait_line(self, prefix: str, timeout: float = 60.0) -> str:
        """The first stdout line starting with `prefix`."""
        def found() -> str | None:
            return next((x.strip() for x in self._out if x.startswith(prefix)), None)
        line: str = self._wait_for(found, timeout, f"{self.name} never printed {prefix!r}")
        return line

    def wait_event(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        """The first JSON log line on stderr whose "event" is `event`."""
        def found() -> dict[str, Any] | None:
            for x in self._err:
                if x.startswith("{") and f'"event": "{event}"' in x:
                    with contextlib.suppress(json.JSONDecodeError):
                        doc: dict[str, Any] = json.loads(x)
                        return doc
            return None
        doc: dict[str, Any] = self._wait_for(found, timeout,
                                             f"{self.name} never logged {event!r}")
        return doc

    def wait_stderr(self, text: str, timeout: float = 60.0) -> str:
        """The first stderr line that holds `text`."""
        def found() -> str | None:
            return next((x for x in self._err if text in x), None)
        line: str = self._wait_for(found, timeout, f"{self.name} never wrote {text!r}")
        return line

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line on stderr so far."""
        docs = []
        for line in self.err.splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    docs.append(json.loads(line))
        return docs

    def json_doc(self) -> dict[str, Any]:
        """The JSON document (--json) at the end of stdout; {} if there is none."""
        out = self.out
        if "{" not in out:
            return {}
        with contextlib.suppress(json.JSONDecodeError):
            doc: dict[str, Any] = json.loads(out[out.index("{"):])
            return doc
        return {}

    # ------------------------------------------------------------- ending

    def wait_exit(self, timeout: float, what: str = "") -> int:
        """The exit code, once the child has exited; AssertionError past the deadline
        (the child is left running: the caller's clean-up ends it)."""
        self._wait_for(lambda: self.exited_at is not None, timeout,
                       what or f"{self.name} did not exit")
        # Let the readers take the last lines written before the exit.
        for t in self._threads[:2]:
            t.join(5)
        code = self.proc.returncode
        assert code is not None
        return code

    def refusal(self, timeout: float, not_before: str, what: str) -> int:
        """The exit code of a child that must end by itself within `timeout` without ever
        printing a stdout line starting with `not_before` (e.g. "listening:"); fails as
        soon as that line comes instead of waiting the whole timeout."""
        def ended_or_printed() -> str | None:
            if any(x.startswith(not_before) for x in self._out):
                return "printed"
            return "exited" if self.exited_at is not None else None
        how = self._wait_for(ended_or_printed, timeout, f"{what}: not refused")
        if how == "printed":
            raise AssertionError(f"{what}: not refused, it printed {not_before!r}\n"
                                 f"{self.describe()}")
        return self.wait_exit(5)

    def exit_within(self, bound: float, since: float, what: str) -> int:
        """The exit code, asserting the child exited at most `bound` seconds after the
        monotonic time `since` (waiting for it no longer than that, plus a second)."""
        deadline = since + bound + 1.0
        with self._cond:
            while self.exited_at is None and time.monotonic() < deadline:
                self._cond.wait(min(deadline - time.monotonic(), 0.1))
        if self.exited_at is None:
            raise AssertionError(f"{what}: {self.name} still running "
                                 f"{time.monotonic() - since:.1f} s after the fault, "
                                 f"bound {bound:g} s\n{self.describe()}")
        took = self.exited_at - since
        code = self.wait_exit(5)
        assert took <= bound, (f"{what}: {self.name} exited {took:.1f} s after the fault, "
                               f"bound {bound:g} s\n{self.describe()}")
        return code

    @property
    def alive(self) -> bool:
        return self.exited_at is None

    def signal(self, sig: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def stopped(self) -> bool:
        return proc_state(self.pid) == "T"

    def wait_stopped(self, timeout: float = 60.0) -> float:
        """Wait until the child stopped itself at its fault point; the monotonic time."""
        try:
            return wait_stopped(self.pid, timeout, self.name)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.describe()}") from None

    def kill(self) -> None:
        """SIGKILL, and wait until it is reaped (a stopped process dies too)."""
        self.signal(signal.SIGKILL)
        with contextlib.suppress(AssertionError):
            self.wait_exit(10)

    def close(self, grace: float = 2.0) -> None:
        """End the child whatever its state: SIGTERM and SIGCONT, then SIGKILL."""
        if self.alive:
            self.signal(signal.SIGTERM)
            self.signal(signal.SIGCONT)
            with contextlib.suppress(AssertionError):
                self.wait_exit(grace)
        if self.alive:
            self.kill()
        for t in self._threads:
            t.join(5)
