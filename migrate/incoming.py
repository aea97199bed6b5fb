"""The destination's incoming image: `IMAGE.incoming` while pages arrive, then the durable
swap into IMAGE with its device state (the commit), or its removal (the discard).

It owns the file, its mapping and the background writeback; the order of renames and
fsyncs that makes a commit survive a power cut lives here. It knows no sockets or pages.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from pathlib import Path

from zcmigrate.migrate.durable import fsync_dir, write_atomic
from zcmigrate.migrate.errors import ReceiveError
from zcmigrate.migrate.guest import guest_holder
from zcmigrate.migrate.imagefiles import incoming_path, lock_path, state_path
from zcmigrate.migrate.imagelock import ImageLock
from zcmigrate.migrate.units import format_size

# File systems where reserving space means allocating and zeroing every page up front:
# there the receiver checks the free space instead, and reports ENOSPC if it runs out.
_NO_CHEAP_RESERVATION = frozenset({"tmpfs", "hugetlbfs", "ramfs"})
# Where the receiver writes pages with pwrite through the image's descriptor rather than
# into a mapping. On a tmpfs of 4 KiB pages a write(2) fills a new page without zeroing it
# first and without a fault per page: half the CPU of the mapping (docs/performance.md).
# A tmpfs of huge pages is left out (writes_through_fd): a fault there covers 2 MiB, and
# reading straight into the mapping measured 0.45-0.59 s/GiB against 0.46-1.10 through
# pwrite (clear), 0.87 against 1.26-1.57 sealed. On a disk file system the CPU gain is
# small (0.33-0.40 against 0.45-0.55 s/GiB) and a live migration's commit fsync was
# measured slower after pwrite (370-820 ms against 80-370 ms on ext4, so the downtime
# limit was missed): those keep the mapping.
WRITE_THROUGH_FD = frozenset({"tmpfs"})


def check_destination(image: Path, *, replace: bool) -> None:
    """Refuse a destination that must not be overwritten: one a running guest holds (a
    receiver that replaced it would leave that guest writing to a deleted file: two
    copies), or any existing image unless `replace`."""
    pid = guest_holder(image)
    if pid is not None:
        who = f" (pid {pid})" if pid else ""
        raise ReceiveError(f"a guest{who} runs on {image}: stop it before receiving into "
                           "it; --replace does not override this")
    if (image.exists() or image.is_symlink()) and not replace:
        raise ReceiveError(f"{image} exists: pass --replace to overwrite it with the "
                           "migration (the old image and its state go only at the commit)")


def claim_destination(image: Path, *, replace: bool) -> ImageLock:
    """Before a receiver says it is ready: its directory exists and is writable, no other
    receiver or migration owns IMAGE (the lock, held until released), and IMAGE may be
    written (check_destination)."""
    parent = image.parent
    if not parent.is_dir():
        raise ReceiveError(f"the destination directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or os.statvfs(parent).f_flag & os.ST_RDONLY:
        raise ReceiveError(f"the destination directory {parent} is not writable")
    lock = ImageLock(lock_path(image), f"cannot receive into {image}")
    try:
        check_destination(image, replace=replace)
    except BaseException:
        lock.release()
        raise
    return lock


def writes_through_fd(fd: int) -> bool:
    """Whether the receiver should pwrite into `fd` rather than copy into a mapping of it:
    on a tmpfs of 4 KiB pages only (WRITE_THROUGH_FD). A tmpfs that allocates huge pages
    (huge=always or within_size: st_blksize is then the huge page's size) faults once per
    2 MiB, so a read straight into the mapping is one copy where pwrite is two."""
    return (filesystem_type(fd) in WRITE_THROUGH_FD
            and os.fstat(fd).st_blksize <= mmap.PAGESIZE)


def filesystem_type(fd: int) -> str:
    """The type of the file system holding `fd` ("tmpfs", "ext4", ...) from
    /proc/self/mountinfo, or "" when no mount matches its device."""
    dev = os.fstat(fd).st_dev
    want = f"{os.major(dev)}:{os.minor(dev)}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[2] == want and " - " in line:
                return line.split(" - ", 1)[1].split()[0]
    return ""


def free_space(directory: Path) -> int | None:
    """Bytes an unprivileged writer may still use in `directory`, None if unknown."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def no_space(path: Path, needed: int) -> ReceiveError:
    """The error for a destination without room, with what is needed and what is free."""
    try:
        st = os.statvfs(path.parent)
        free = format_size(st.f_bavail * st.f_frsize)
    except OSError:
        free = "unknown"
    return ReceiveError(f"no space left on the destination: {path.name} needs "
                        f"{format_size(needed)}, {path.parent} has {free} free")


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
        self._placed = False  # post-copy moved the file into IMAGE before the commit

    @property
    def sink(self) -> mmap.mmap | int:
        """Where the receiver pool writes pages: the file's descriptor (pwrite) on a
        tmpfs, a writable mapping elsewhere (ReceiverPool takes either)."""
        assert self._fd >= 0, "create() first"
        return self._fd if self._map is None else self._map

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
            self._reserve(fd, size)
            if not writes_through_fd(fd):
                self._map = mmap.mmap(fd, size, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise no_space(self.path, size) from e
            raise ReceiveError(f"cannot size {self.path} to {size} bytes: {e.strerror}") from e

    def _reserve(self, fd: int, size: int) -> None:
        """The image's space, now, so that a full disk is found before the first page
        rather than half-way (or as a SIGBUS on a mapped page)."""
        if filesystem_type(fd) in _NO_CHEAP_RESERVATION:
            # fallocate would allocate and zero every page here: check instead; a page
            # that does not fit later fails its write with ENOSPC, reported as such.
            st = os.fstatvfs(fd)
            if st.f_bavail * st.f_frsize < size:
                raise no_space(self.path, size)
            return
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return  # no fallocate here: the writes find out
            raise

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
            # No deadline, as for the os.fsync that follows every call: the thread does one
            # fdatasync, and durability cannot be given up on half-way; a disk that never
            # answers stalls the fsync after it alike.
            self._writeback.join()

    def commit(self, device_state: bytes) -> None:
        """Make image and device state durable, then swap them in (the commit point)."""
        self._join_writeback()
        if self._map is not None:
            self._map.flush()
        os.fsync(self._fd)
        # No window where a new image sits beside an old state: the old state goes
        # first, and its removal reaches the disk before the rename, so a crash in
        # between leaves an image without a state (uncommitted), never a new image with
        # the old state (which the oracle would accept for the wrong guest).
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
            fsync_dir(self.image.parent)
        os.replace(self.path, self.image)
        self._created = False
        fsync_dir(self.image.parent)
        write_atomic(self.state_file, device_state, mode=0o600)

    def place_for_postcopy(self) -> int:
        """Post-copy: move the pages received so far into IMAGE now, before the commit,
        because the guest starts on IMAGE while its last pages are still missing (the old
        IMAGE and its state go now, not at the commit: the guest that will run here is
        this one). Returns the file's descriptor (still ours). From here close() leaves
        the file alone: a guest runs on it."""
        self._join_writeback()
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        os.replace(self.path, self.image)
        self._created = False
        self._placed = True
        self.path = self.image
        fsync_dir(self.image.parent)
        return self._fd

    def adopt_placed(self) -> None:
        """`receive IMAGE --resume`: the image a dead receiver placed for post-copy, on
        which its guest runs and waits; ours from now until the commit, never discarded
        (close() leaves it alone)."""
        try:
            self._fd = os.open(self.image, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise ReceiveError(f"cannot open {self.image}: {e.strerror}") from e
        self._created = False
        self._placed = True
        self.path = self.image

    def discard_placed(self) -> None:
        """A post-copy that failed before its guest ran: the image placed early holds
        nothing anyone needs."""
        if self._placed:
            self._placed = False
            with contextlib.suppress(FileNotFoundError):
                self.image.unlink()

    @property
    def fd(self) -> int:
        return self._fd

    def commit_postcopy(self, device_state: bytes) -> None:
        """Post-copy's commit, once every page has arrived: the image (in place since
        place_for_postcopy) made durable, then the device state of the switch written
        beside it. The guest has run on since, so the state marks the hand-over (who owns
        the guest), not where the running guest is now."""
        if self._map is not None:
            self._map.flush()
        os.fsync(self._fd)
        write_atomic(self.state_file, device_state, mode=0o600)

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
