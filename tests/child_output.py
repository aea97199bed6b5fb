"""A child process's stdout and stderr, read by threads from the moment it starts and waited
on with deadlines: no test blocks in readline() on a child that never prints, no child
blocks on a full pipe that nobody reads, and every failure shows what the child printed so
far and its exit status. It knows pipes and processes, not zcmigrate.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, ClassVar, Literal

Stream = Literal["stdout", "stderr"]
# Put before a child's command line: the kernel kills the child when the thread that
# started it ends (PR_SET_PDEATHSIG; exec keeps it). A run ended by a test's timeout
# (os._exit) then leaves no guest or receiver running behind it. Start such children from
# the test's own thread, never from a short-lived helper thread.
DIE_WITH_PARENT: tuple[str, ...] = (
    ("setpriv", "--pdeathsig", "KILL") if shutil.which("setpriv") else ())
# How much of each stream a failure message shows: the end, where the reason usually is.
_SHOWN = 6000


class _Pipe:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.lines: list[str] = []  # complete lines, without their newline
        self.partial = ""
        self.cursor = 0  # lines before it were taken by wait_for()
        self.eof = False

    def text(self) -> str:
        return "".join(self.parts)


class ChildOutput:
    """Reads a Popen's stdout and stderr pipes (those that are pipes) in two threads.

    Owns them: it reads duplicates of their descriptors and closes the Popen's own, so
    nothing else can read a line out from under it (use `text()`, `wait_for()` and
    `wait_exit()`, never `proc.stdout` or `proc.communicate()`).
    """

    _of: ClassVar[weakref.WeakKeyDictionary[subprocess.Popen[Any], ChildOutput]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, proc: subprocess.Popen[Any]) -> None:
        if proc in ChildOutput._of:
            raise RuntimeError(f"{self.command_of(proc)}: its output is already being read")
        ChildOutput._of[proc] = self
        self.proc = proc
        self._cond = threading.Condition()
        self._pipes: dict[Stream, _Pipe] = {}
        self._readers: list[threading.Thread] = []
        for name in ("stdout", "stderr"):
            f = getattr(proc, name)
            pipe = _Pipe()
            self._pipes[name] = pipe
            if f is None:  # not a pipe: nothing will ever come
                pipe.eof = True
                continue
            fd = os.dup(f.fileno())
            f.close()
            t = threading.Thread(target=self._read, args=(pipe, fd), daemon=True,
                                 name=f"test-child-{proc.pid}-{name}")
            t.start()
            self._readers.append(t)

    @classmethod
    def of(cls, proc: subprocess.Popen[Any]) -> ChildOutput:
        """The reader of `proc`'s output, started now if it was not yet."""
        found = cls._of.get(proc)
        return found if found is not None else cls(proc)

    def _read(self, pipe: _Pipe, fd: int) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        try:
            while True:
                try:
                    chunk = os.read(fd, 1 << 16)
                except OSError:
                    chunk = b""
                text = decoder.decode(chunk, final=not chunk)
                with self._cond:
                    pipe.parts.append(text)
                    *done, pipe.partial = (pipe.partial + text).split("\n")
                    pipe.lines += done
                    if not chunk:
                        if pipe.partial:
                            pipe.lines.append(pipe.partial)
                            pipe.partial = ""
                        pipe.eof = True
                    self._cond.notify_all()
                if not chunk:
                    return
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ reading

    def text(self, stream: Stream) -> str:
        """Everything the child printed on `stream` so far."""
        with self._cond:
            return self._pipes[stream].text()

    def wait_for(self, stream: Stream, match: Callable[[str], bool], what: str,
                 timeout: float) -> list[str]:
        """Wait until a line on `stream` matches; return the lines up to it (inclusive) that
        no earlier wait_for() returned. AssertionError, showing what the child printed and
        its exit status, if none did within `timeout` seconds or the stream ended first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            pipe = self._pipes[stream]
            first = scan = pipe.cursor
            while True:
                for i in range(scan, len(pipe.lines)):
                    if match(pipe.lines[i]):
                        pipe.cursor = i + 1
                        return pipe.lines[first:i + 1]
                scan = len(pipe.lines)
                left = deadline - time.monotonic()
                if pipe.eof or left <= 0:
                    break
                self._cond.wait(left)
        why = (f"closed its {stream} without printing {what}" if pipe.eof
               else f"did not print {what} on {stream} within {timeout:g} s")
        if pipe.eof:
            # The stream ends when the child exits: give the exit status a moment to be there.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2)
        raise AssertionError(f"{self.command()} {why}\n{self.describe()}")

    def wait_line(self, stream: Stream, match: Callable[[str], bool], what: str,
                  timeout: float) -> str:
        """The first line not taken before that matches (see wait_for)."""
        return self.wait_for(stream, match, what, timeout)[-1]

    def wait_exit(self, timeout: float) -> tuple[int, str, str]:
        """Wait for the child to exit and for the end of its output: (exit status, stdout,
        stderr). A child still running after `timeout` seconds is killed, so that no test
        leaves one behind, and the AssertionError shows what it had printed."""
        deadline = time.monotonic() + timeout
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            message = f"{self.command()} still running after {timeout:g} s\n{self.describe()}"
            self.proc.kill()
            self.proc.wait(10)  # SIGKILL ends it; only reaping is left
            raise AssertionError(message) from None
        # The pipes end with the child, unless a process it started still holds them.
        grace = max(deadline - time.monotonic(), 5.0)
        with self._cond:
            ended = self._cond.wait_for(
                lambda: all(p.eof for p in self._pipes.values()), grace)
            if not ended:
                raise AssertionError(f"{self.command()} exited ({code}) but its pipes stayed "
                                     f"open for {grace:g} s more\n{self.describe()}")
            return code, self._pipes["stdout"].text(), self._pipes["stderr"].text()

    # ------------------------------------------------------------------ messages

    def command(self) -> str:
        return self.command_of(self.proc)

    @staticmethod
    def command_of(proc: subprocess.Popen[Any]) -> str:
        args = proc.args
        shown = " ".join(map(str, args)) if isinstance(args, list | tuple) else repr(args)
        return f"child {proc.pid} ({shown})"

    def status(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit status {code}"

    def describe(self) -> str:
        """Its exit status and what it printed so far, for an assertion message."""
        with self._cond:
            out, err = self._pipes["stdout"].text(), self._pipes["stderr"].text()
        return (f"{self.status()}\n--- stdout so far ---\n{_tail(out)}\n"
                f"--- stderr so far ---\n{_tail(err)}")


def _tail(text: str) -> str:
    if len(text) <= _SHOWN:
        return text
    return f"[... {len(text) - _SHOWN} characters before]{text[-_SHOWN:]}"
