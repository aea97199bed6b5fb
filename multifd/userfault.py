"""Page faults of a mapping, resolved from elsewhere (userfaultfd): a descriptor that reports
the missing pages of a shared tmpfs (or hugetlbfs) mapping, the registered range as any
process holding that descriptor sees it, pages placed into it with a copy that wakes the
faulting thread, and pages punched out of a file so that they fault again.

It knows pages and file descriptors, not guests, receivers or sockets: who registers,
who serves a fault, and where a page comes from are the caller's business. It is the one
door to native/zcuffd.c for the layers above.
"""

from __future__ import annotations

import enum
import errno
import mmap
import os
import select
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from zcmigrate import ZcmigrateError
from zcmigrate.native import ffi, lib

if TYPE_CHECKING:
    from typing_extensions import Buffer

_U32: Final = (1 << 32) - 1
_DEVICE: Final = Path("/dev/userfaultfd")
FAULT_BATCH: Final = 128
"""Most faults one read_faults() call returns (the C side's batch)."""


class UserfaultError(ZcmigrateError):
    """A userfaultfd operation failed; the message says which one and what to do."""


class UserfaultUnavailable(UserfaultError):
    """No userfaultfd can be created here: permissions, or a kernel without the feature."""


class UnsupportedMapping(UserfaultError):
    """The mapping cannot report missing pages: its file is not on a tmpfs or hugetlbfs."""


class RangeGone(UserfaultError):
    """The registered range is gone: its process exited (ESRCH) or it was unregistered or
    unmapped (ENOENT). Nothing waits for a page there any more."""


class Features(enum.IntFlag):
    """UFFD_FEATURE_* bits this layer asks for (the kernel's values; zcuffd.c checks them)."""

    MISSING_HUGETLBFS = lib.ZCU_FEATURE_MISSING_HUGETLBFS
    MISSING_SHMEM = lib.ZCU_FEATURE_MISSING_SHMEM
    THREAD_ID = lib.ZCU_FEATURE_THREAD_ID


_REMEDY: Final = (
    "post-copy needs a userfaultfd: run as root (CAP_SYS_PTRACE), set the sysctl "
    "vm.unprivileged_userfaultfd=1, or give this user read-write access to /dev/userfaultfd"
)


def _open(how: int, features: Features) -> tuple[int, Features]:
    available = ffi.new("uint64_t *")
    fd = int(lib.zcu_open(how, int(features), available))
    return fd, Features(int(available[0]) & sum(Features))


def open_userfault(features: Features) -> int:
    """A new userfaultfd (close-on-exec, non-blocking) past the API handshake with
    `features`: through userfaultfd(2), else through /dev/userfaultfd when the syscall is
    not allowed to this user. The caller owns the descriptor."""
    fd, available = _open(lib.ZCU_OPEN_SYSCALL, features)
    if fd == -errno.EPERM and _DEVICE.exists():
        fd, available = _open(lib.ZCU_OPEN_DEVICE, features)
        if fd in (-errno.EACCES, -errno.EPERM):
            fd = -errno.EPERM
    if fd >= 0:
        return fd
    e = -fd
    if e == errno.EPERM:
        raise UserfaultUnavailable(f"cannot create a userfaultfd (EPERM): {_REMEDY}")
    if e == errno.ENOSYS:
        raise UserfaultUnavailable(
            "this kernel has no userfaultfd (built without CONFIG_USERFAULTFD): post-copy "
            "cannot run here"
        )
    if e == errno.EINVAL:
        missing = features & ~available
        raise UserfaultUnavailable(
            f"this kernel's userfaultfd lacks {missing!r} (it offers {available!r}): it "
            "cannot report the missing pages post-copy needs"
        )
    raise UserfaultUnavailable(f"cannot create a userfaultfd: {os.strerror(e)}")


def filesystem_type(fd: int) -> str:
    """The type of the file system holding the open file `fd` ("tmpfs", "ext4", ...) as
    /proc/self/mountinfo names it, or "unknown"."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    for line in lines:
        fields = line.split()
        if len(fields) > 2 and fields[2] == dev and " - " in line:
            return line.split(" - ", 1)[1].split()[0]
    return "unknown"


def mapping_granule(fd: int) -> int:
    """The page userfaultfd works in for a shared mapping of `fd`: the huge page on
    hugetlbfs (its block size), the base page elsewhere. Faults, copies and wakes come in
    whole granules, whatever page size a migration uses."""
    block = os.fstat(fd).st_blksize
    if block > mmap.PAGESIZE and block & (block - 1) == 0 and filesystem_type(fd) == "hugetlbfs":
        return block
    return mmap.PAGESIZE


def features_for(fd: int) -> Features:
    """What a range mapping `fd` needs: missing-page reports for its file system, and the
    faulting thread's id in every fault."""
    hugetlbfs = filesystem_type(fd) == "hugetlbfs"
    kind = Features.MISSING_HUGETLBFS if hugetlbfs else Features.MISSING_SHMEM
    return kind | Features.THREAD_ID


@dataclass(frozen=True, slots=True)
class Fault:
    """A thread waits for the page at `offset` (from the range's base, granule-aligned)."""

    offset: int
    tid: int
    """The faulting thread's id in its process; 0 without Features.THREAD_ID."""
    write: bool


@dataclass(frozen=True, slots=True)
class CopyResult:
    """What copy() did to a run of pages."""

    copied: int
    """Pages placed from the buffer; the kernel woke the threads that waited for them."""
    existed: int
    """Pages that were there already: they arrived another way since the fault (a pwrite
    into the page cache), were left as they were, and their waiters were woken."""


def _check_range(base: int, length: int, granule: int) -> None:
    if not 0 < granule <= _U32 or granule & (granule - 1):
        raise ValueError(f"granule {granule} is not a power of two")
    if base < 0 or length <= 0 or base % granule or length % granule or base + length >= 1 << 64:
        raise ValueError(
            f"range at {base:#x} of {length} bytes is not a non-empty run of whole "
            f"{granule}-byte pages"
        )


class UserfaultRange:
    """A range registered for MISSING faults, as seen by whichever process holds its
    descriptor. `base` is an address in the process that registered the range, not
    necessarily this one; page data given to copy() is read from this process.

    The registering process makes one with register(); a process it passed the
    descriptor to adopts it with UserfaultRange(fd, base, length, granule). Either owns
    its descriptor and closes it with close(). Closing the last descriptor of a range
    unregisters it, and a thread that waits in it then faults again and finds zeros on a
    missing page: the registering side keeps its own descriptor for as long as a page
    may be missing.

    Any number of threads may copy() and wake() at once; faults have one reader at a
    time (read_faults reuses its buffer).
    """

    def __init__(self, fd: int, base: int, length: int, granule: int) -> None:
        _check_range(base, length, granule)
        self._fd = fd
        self.base = base
        self.length = length
        self.granule = granule
        self.stray_messages = 0
        """Messages that were no page fault inside the range (none can come with this
        layer's features and one range per descriptor); counted, never served."""
        self._faults: Any = ffi.new("struct zcu_fault[]", FAULT_BATCH)

    @classmethod
    def register(
        cls, address: int, length: int, granule: int, features: Features
    ) -> UserfaultRange:
        """Create a userfaultfd with `features` and register [address, address + length)
        of this process for MISSING faults. UnsupportedMapping when the kernel refuses the
        range (a file on a disk file system); UserfaultUnavailable when no userfaultfd
        can be created."""
        _check_range(address, length, granule)
        fd = open_userfault(features)
        ioctls = ffi.new("uint64_t *")
        rc = int(lib.zcu_register(fd, address, length, granule, ioctls))
        if rc == 0 and ioctls[0] & lib.ZCU_RANGE_COPY and ioctls[0] & lib.ZCU_RANGE_WAKE:
            return cls(fd, address, length, granule)
        os.close(fd)
        if rc == errno.EINVAL:
            raise UnsupportedMapping(
                "the kernel cannot report missing pages of this mapping (EINVAL from "
                "UFFDIO_REGISTER): post-copy needs the image on a tmpfs (such as /dev/shm) "
                "or a hugetlbfs, not a disk file system"
            )
        if rc == 0:
            raise UnsupportedMapping(
                f"the registered range allows ioctls {int(ioctls[0]):#x}, without "
                "UFFDIO_COPY and UFFDIO_WAKE: pages cannot be placed into it"
            )
        raise UserfaultError(f"cannot register the range for missing pages: {_strerror(rc)}")

    def fileno(self) -> int:
        if self._fd < 0:
            raise UserfaultError("the userfaultfd is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def npages(self) -> int:
        """Granules in the range."""
        return self.length // self.granule

    def wait_faults(self, timeout: float) -> bool:
        """Whether a fault is there to read within `timeout` seconds."""
        ms = max(0, min(int(timeout * 1000), 1 << 30))
        rc = int(lib.zc_poll(self.fileno(), select.POLLIN, ms))
        if rc < 0:
            raise UserfaultError(f"poll on the userfaultfd failed: {os.strerror(-rc)}")
        return bool(rc & select.POLLIN)

    def read_faults(self, max_faults: int = FAULT_BATCH) -> list[Fault]:
        """The faults queued now, oldest first, at most `max_faults` (and FAULT_BATCH);
        [] when none is. A fault read is not repeated: its thread waits until its page is
        copied or woken, and a woken thread whose page is still missing faults again."""
        want = max(1, min(max_faults, FAULT_BATCH))
        n = int(lib.zcu_read_faults(self.fileno(), self.base, self.length, self.granule,
                                    self._faults, want))
        if n < 0:
            raise UserfaultError(f"reading faults failed: {_strerror(-n)}")
        out: list[Fault] = []
        for i in range(n):
            f = self._faults[i]
            if not f.inside:
                self.stray_messages += 1
                continue
            out.append(Fault(offset=int(f.offset), tid=int(f.tid), write=bool(f.flags & 1)))
        return out

    def copy(self, offset: int, data: Buffer) -> CopyResult:
        """Place the pages in `data` (whole granules) at `offset` of the range, waking the
        threads that wait for them. A page that is there already is left as it is and its
        waiters are woken (it came another way: the newer of the two versions is the
        caller's to know). RangeGone once the registering process or its range is gone."""
        r: Any = ffi.new("struct zcu_copy_result *")  # per call: copies run in parallel
        with ffi.from_buffer(data) as src:
            n = len(src)
            rc = int(lib.zcu_copy(self.fileno(), self.base, self.length, self.granule,
                                  offset, src, n, r))
        return self._copied(rc, r, f"{n} bytes at offset {offset} are not whole "
                            f"{self.granule}-byte pages inside the {self.length}-byte range",
                            f"at offset {offset}")

    def copy_pages(self, offsets: Any, count: int, page_size: int, data: Buffer) -> CopyResult:
        """copy() for `count` pages of `page_size` bytes gathered in `data` (page i for
        offsets[i], a uint64 array in host order): one UFFDIO_COPY per run of adjacent
        pages, in one C call. ValueError with nothing placed if an offset, a run (whole
        granules in the range) or the length of `data` is wrong."""
        r: Any = ffi.new("struct zcu_copy_result *")
        with ffi.from_buffer("uint64_t[]", offsets) as offs, ffi.from_buffer(data) as src:
            if len(offs) < count:
                raise ValueError(f"{len(offs)} offsets for {count} pages")
            n = len(src)
            rc = int(lib.zcu_copy_pages(self.fileno(), self.base, self.length, self.granule,
                                        offs, count, page_size, src, n, r))
        return self._copied(rc, r, f"{count} pages of {page_size} bytes from {n} bytes: an "
                            f"offset or a run is not whole {self.granule}-byte pages inside "
                            f"the {self.length}-byte range, or the data is short",
                            f"of {count} pages")

    @staticmethod
    def _copied(rc: int, r: Any, out_of_bounds: str, what: str) -> CopyResult:
        """A zcu_copy* call's outcome: its counts, or the error that says what stopped it."""
        if rc == lib.ZCU_EBOUNDS:
            raise ValueError(out_of_bounds)
        if rc in (errno.ESRCH, errno.ENOENT):
            raise RangeGone(_gone(rc, "copy"))
        if rc:
            raise UserfaultError(f"UFFDIO_COPY {what} failed after {int(r.copied)} pages: "
                                 f"{_strerror(rc)}")
        return CopyResult(copied=int(r.copied), existed=int(r.existed))

    def wake(self, offset: int = 0, length: int | None = None) -> None:
        """Wake the threads that wait in [offset, offset + length) (the whole range by
        default): each retries its access and faults again if its page is still missing,
        so its fault can be read anew (what a new server does after the last one died
        holding faults it had read). The kernel looks for waiters, not for the
        registration: on an unregistered range it is a no-op."""
        span = self.length - offset if length is None else length
        rc = int(lib.zcu_wake(self.fileno(), self.base, self.length, self.granule, offset,
                              span))
        if rc == lib.ZCU_EBOUNDS:
            raise ValueError(
                f"{span} bytes at offset {offset} are not whole {self.granule}-byte pages "
                f"inside the {self.length}-byte range"
            )
        if rc in (errno.ESRCH, errno.ENOENT):
            raise RangeGone(_gone(rc, "wake"))
        if rc:
            raise UserfaultError(f"UFFDIO_WAKE failed: {_strerror(rc)}")

    def unregister(self) -> None:
        """End the registration (only from the registering process). Every waiting thread
        is woken, and a page still missing then reads as zeros: call it only once no page
        is missing (first_missing)."""
        rc = int(lib.zcu_unregister(self.fileno(), self.base, self.length, self.granule))
        if rc:
            raise UserfaultError(f"UFFDIO_UNREGISTER failed: {_strerror(rc)}")

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> UserfaultRange:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _strerror(rc: int) -> str:
    if rc == lib.ZCU_EBOUNDS:
        return "out of bounds"
    return f"{errno.errorcode.get(rc, rc)} ({os.strerror(rc)})"


def _gone(rc: int, what: str) -> str:
    if rc == errno.ESRCH:
        return f"cannot {what} pages: the process that registered the range has exited"
    return f"cannot {what} pages: the range is no longer registered (unregistered or unmapped)"


def punch_pages(fd: int, offsets: array[int] | Sequence[int], page_size: int) -> int:
    """Punch the pages at byte `offsets` out of the file `fd` (the size stays), so that
    the next access through a registered mapping faults MISSING; returns how many.
    Offsets must be page-aligned and inside the file: ValueError punches nothing.
    OSError if the file system refuses (it cannot punch holes)."""
    if not 0 < page_size <= _U32:
        raise ValueError(f"page size {page_size} is not a positive u32")
    offs = offsets if isinstance(offsets, array) and offsets.typecode == "Q" else array(
        "Q", offsets
    )
    size = os.fstat(fd).st_size
    npunched = ffi.new("uint32_t *")
    with ffi.from_buffer("uint64_t[]", offs) as offs_c:
        rc = int(lib.zcu_punch(fd, size, offs_c, len(offs), page_size, npunched))
    if rc == lib.ZCU_EBOUNDS:
        raise ValueError(
            f"an offset is not a whole {page_size}-byte page inside the {size}-byte file"
        )
    if rc:
        raise OSError(rc, f"cannot punch pages out ({int(npunched[0])} punched first)")
    return int(npunched[0])


def first_missing(fd: int, length: int) -> int | None:
    """The offset of the first hole (a page never written or punched out) in the first
    `length` bytes of the file `fd`, or None when there is none. Exact on tmpfs;
    a file system that reports no holes (hugetlbfs) answers None whatever is missing,
    so ask filesystem_type() before trusting a None."""
    try:
        hole = os.lseek(fd, 0, os.SEEK_HOLE)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # an empty file
            return 0 if length > 0 else None
        raise
    return hole if hole < length else None


__all__ = [
    "FAULT_BATCH",
    "CopyResult",
    "Fault",
    "Features",
    "RangeGone",
    "UnsupportedMapping",
    "UserfaultError",
    "UserfaultRange",
    "UserfaultUnavailable",
    "features_for",
    "filesystem_type",
    "first_missing",
    "mapping_granule",
    "open_userfault",
    "punch_pages",
]
