"""The destination's incoming image: `IMAGE.incoming` while pages arrive, then the durable
swap into IMAGE with its device state (the commit), or its removal (the discard).

It owns the file, its mapping and the background writeback; the order of renames and
fsyncs that makes a commit survive a power cut lives here. It knows no sockets or pages.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from pathlib import Path

from zcmigrate.migrate.durable import fsync_dir, write_atomic
from zcmigrate.migrate.errors import ReceiveError
from zcmigrate.migrate.imagefiles import incoming_path, state_path


class IncomingImage:
    """One migration's destination file. create() it, let the pool fill map(), commit()
    or discard(); close() always (it discards what was not committed)."""

    def __init__(self, image: Path) -> None:
        self.image = image
        self.path = incoming_path(image)
        self.state_file = state_path(image)
        self._fd = -1
        self._map: mmap.mmap | None = None
        self._created = False
        self._writeback: threading.Thread | None = None

    @property
    def mapping(self) -> mmap.mmap:
        assert self._map is not None, "create() first"
        return self._map

    def create(self, size: int) -> None:
        parent = self.image.parent
        if not parent.is_dir():
            raise ReceiveError(f"destination directory {parent} does not exist")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a leftover of a failed migration: never committed
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ReceiveError(f"cannot create {self.path}: {e.strerror}") from e
        self._fd = fd
        self._created = True
        try:
            # A sparse file reads as zero: pages sent as zero need no write at all.
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise ReceiveError(f"cannot size {self.path} to {size} bytes: {e.strerror}") from e

    def start_writeback(self) -> None:
        """Write received pages back in the background, so the commit's fsync has little
        left to do while the guest is paused (downtime). fdatasync releases the GIL."""
        if self._writeback is not None and self._writeback.is_alive():
            return
        fd = self._fd

        def writeback() -> None:
            with contextlib.suppress(OSError):
                os.fdatasync(fd)

        self._writeback = threading.Thread(target=writeback, name="writeback", daemon=True)
        self._writeback.start()

    def writeback(self) -> None:
        """Make everything received so far durable now (the source's WRITEBACK)."""
        self._join_writeback()
        os.fdatasync(self._fd)

    def _join_writeback(self) -> None:
        if self._writeback is not None:
            self._writeback.join()

    def commit(self, device_state: bytes) -> None:
        """Make image and device state durable, then swap them in (the commit point)."""
        self._join_writeback()
        self.mapping.flush()
        os.fsync(self._fd)
        # No window where a new image sits beside an old state: the old state goes
        # first, so a crash in between leaves an image without a state (uncommitted).
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        os.replace(self.path, self.image)
        self._created = False
        fsync_dir(self.image.parent)
        write_atomic(self.state_file, device_state)

    def close(self) -> None:
        """Release the file; discard it if it was not committed (what was received is
        worth nothing without the device state)."""
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        self._join_writeback()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._created:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._created = False
