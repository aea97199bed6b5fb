"""The test helper that reads a child's output: lines with deadlines, failures that show
what the child printed and how it ended, pipes that never fill up."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.child_output import DIE_WITH_PARENT, ChildOutput


def child(code: str) -> tuple[subprocess.Popen[str], ChildOutput]:
    proc = subprocess.Popen([*DIE_WITH_PARENT, sys.executable, "-c", code],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, ChildOutput(proc)


def test_lines_come_in_order_and_each_once() -> None:
    proc, out = child("print('a'); print('b'); print('ready 1'); print('c'); print('ready 2')")
    assert out.wait_for("stdout", lambda s: s.startswith("ready"), "ready", 10) == [
        "a", "b", "ready 1"]
    assert out.wait_line("stdout", lambda s: s.startswith("ready"), "ready", 10) == "ready 2"
    assert out.wait_exit(10) == (0, "a\nb\nready 1\nc\nready 2\n", "")
    assert proc.returncode == 0


def test_a_child_that_exits_without_the_line_fails_at_once_saying_what_it_printed() -> None:
    _, out = child("import sys; print('hello'); print('oops', file=sys.stderr); sys.exit(3)")
    with pytest.raises(AssertionError) as info:
        out.wait_line("stdout", lambda s: s == "ready", "a 'ready' line", timeout=60)
    msg = str(info.value)
    assert "closed its stdout without printing a 'ready' line" in msg
    assert "exit status 3" in msg and "hello" in msg and "oops" in msg


def test_a_silent_child_fails_at_the_deadline_and_is_still_running() -> None:
    proc, out = child("import time; print('started', flush=True); time.sleep(60)")
    try:
        started = time.monotonic()
        with pytest.raises(AssertionError) as info:
            out.wait_line("stdout", lambda s: s == "ready", "a 'ready' line", timeout=0.3)
        # The deadline is the behaviour: not before it, and not long after it (the child
        # sleeps for 60 s, so a reader that blocked until it printed would take that long).
        assert 0.3 <= time.monotonic() - started < 10
        assert "did not print a 'ready' line on stdout within 0.3 s" in str(info.value)
        assert "still running" in str(info.value) and "started" in str(info.value)
    finally:
        proc.kill()
        proc.wait()


def test_wait_exit_kills_a_child_that_overruns_it() -> None:
    proc, out = child("import time; time.sleep(60)")
    with pytest.raises(AssertionError, match=r"still running after 0\.2 s"):
        out.wait_exit(0.2)
    assert proc.poll() == -9


def test_a_child_writing_more_than_a_pipe_holds_is_not_blocked() -> None:
    # 1 MiB on stderr before the line on stdout: nobody waits on stderr, the readers drain it.
    _, out = child("import sys; sys.stderr.write('x' * (1 << 20)); sys.stderr.flush(); "
                   "print('done', flush=True)")
    assert out.wait_line("stdout", lambda s: s == "done", "done", 10) == "done"
    code, _, err = out.wait_exit(10)
    assert code == 0 and len(err) == 1 << 20


def test_a_popen_has_one_reader() -> None:
    proc, out = child("pass")
    assert ChildOutput.of(proc) is out
    with pytest.raises(RuntimeError, match="already being read"):
        ChildOutput(proc)
    out.wait_exit(10)
