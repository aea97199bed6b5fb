"""Durable file updates: atomic replace with fsync of the file and its directory.

Used for the destination's commit and the guest's device state; knows nothing of either.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or unlink in directory `path` survive a power cut."""
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data`: a crash leaves the old file or the new one, never a torn
    one, and once this returns the new one survives a power cut. Raises OSError.

    The temporary file is new (O_EXCL, a name no one can guess) and never a symbolic link
    (O_NOFOLLOW): a file planted beside the target cannot receive the data, nor redirect
    it elsewhere. It is private (0600) unless `mode` says otherwise."""
    target = Path(path)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}.{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # ours: O_EXCL made it
        raise
