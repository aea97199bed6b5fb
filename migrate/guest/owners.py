"""Who owns a guest: whether the process holding a pause lease still lives (its pid and
its start time, so that neither a zombie nor a reused pid passes for it), which guest
process holds the flock on an image's control file, and which of its threads wait in
the kernel for a missing page. It knows /proc and flock, not what a migration or a
guest does.
"""

from __future__ import annotations

import fcntl
import os

from zcmigrate.migrate.guest.layout import CONTROL_MAGIC, Field, read_control_header
from zcmigrate.migrate.imagefiles import control_path
from zcmigrate.migrate.imagelock import holder_pid

# /proc/<pid>/stat after the ")" that ends the command name: field 3 (state) is word 0,
# field 22 (starttime, clock ticks after boot) is word 19.
_STATE_WORD = 0
_STARTTIME_WORD = 19


def _stat_words(pid: int) -> list[bytes] | None:
    """The words of /proc/<pid>/stat after the command name; None if there is no such
    file (no such process, or one /proc does not show us)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 1 :].split()


def process_start_time(pid: int) -> int | None:
    """The start time of a live process (clock ticks after boot, as /proc/<pid>/stat
    gives it); None if it is gone, a zombie, or not visible."""
    if pid <= 0:
        return None
    words = _stat_words(pid)
    if words is None or len(words) <= _STARTTIME_WORD or words[_STATE_WORD] in (b"Z", b"X"):
        return None
    return int(words[_STARTTIME_WORD])


def owner_alive(pid: int, start_time: int) -> bool:
    """Whether the process that took a lease as (pid, start_time) still lives.

    Dead means: no such pid (ESRCH), a zombie (killed, not yet reaped), or a pid that now
    belongs to a process started at another time. A process that exists but that /proc
    does not show (hidepid) counts as alive: a lease is never broken on a guess. A
    start_time of 0 (unknown) compares with nothing.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    words = _stat_words(pid)
    if words is None or len(words) <= _STARTTIME_WORD:
        return True
    if words[_STATE_WORD] in (b"Z", b"X"):
        return False
    return start_time == 0 or int(words[_STARTTIME_WORD]) == start_time


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie is not)."""
    return owner_alive(pid, 0)


def guest_holder(image: str | os.PathLike[str]) -> int | None:
    """The pid of the guest running on `image`, or None if none does (test it with
    `is not None`: 0 means a guest runs whose pid cannot be told).

    A running guest holds an exclusive flock on IMAGE.guest for its whole life (taken on
    the file it renames into place, released when it ends however it ends), so a shared
    lock that cannot be had means a guest runs. The pid comes from /proc/locks, else from
    the control block the guest wrote.
    """
    path = control_path(image)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            return None
    finally:
        os.close(fd)
    pid = holder_pid(path)
    if pid is not None:
        return pid
    head = read_control_header(path)
    if head is not None and head[Field.MAGIC] == CONTROL_MAGIC and head[Field.PID] > 0:
        return int(head[Field.PID])
    # Held by someone whose pid nobody tells: a guest runs all the same.
    return 0


def threads_waiting_for_pages(pid: int) -> int | None:
    """How many threads of `pid` wait in the kernel for a page a userfaultfd reports
    missing (their wchan is handle_userfault: a post-copy guest's page that has not
    arrived); None if /proc does not tell (no such process, no wchan here)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    waiting, known = 0, False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan", "rb") as f:
                wchan = f.read().strip()
        except OSError:
            continue
        known = True
        waiting += wchan == b"handle_userfault"
    return waiting if known else None


__all__ = [
    "guest_holder",
    "owner_alive",
    "pid_alive",
    "process_start_time",
    "threads_waiting_for_pages",
]
