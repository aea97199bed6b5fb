"""Who owns an image: an exclusive lock that one migration (send or receive) holds on
IMAGE.lock for as long as it runs, and the name of the process that holds it.

flock(2) locks belong to the open file, so they end when the holder exits however it
exits (kill -9 included) and need no clean-up; /proc/locks names the holder's pid. It
knows files and processes, not migrations or guests.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from zcmigrate.migrate.errors import ImageBusy


def holder_pid(path: Path) -> int | None:
    """The pid holding a flock on `path` (the process that took it), or None."""
    try:
        st = path.stat()
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; blocked waiters have "->".
        fields = line.split()
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
            continue
        if fields[5] == want and fields[4].isdigit():
            return int(fields[4])
    return None


def process_name(pid: int) -> str:
    """The process's command line, shortened for a message."""
    try:
        text = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return "gone"
    return text if len(text) <= 80 else text[:77] + "..."


class ImageLock:
    """An exclusive flock on `path`, taken at once or refused (ImageBusy naming the
    holder); released by release() or when the process ends."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise ImageBusy(f"cannot open the lock file {path}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = holder_pid(path)
            who = f"pid {pid} ({process_name(pid)})" if pid else "another process"
            raise ImageBusy(f"{what}: {path.name} is held by {who}; one migration at a time "
                            "per image: wait for it to end, or cancel it") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = -1

    def __enter__(self) -> ImageLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
