"""The control file's layout, the one contract between a guest and the migration that
drives it: offsets, magic, version, states and requests, page-size limits. It holds no
behaviour of either side; a new field is a row in the table and a member of Field.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from zcmigrate.migrate.guest.errors import GuestError
from zcmigrate.multifd.pages import bitmap_words

# `<image>.guest`, the control file shared by the guest and the migration:
#
#   offset  field        meaning (every field a native-endian u64)
#   ------  -----------  --------------------------------------------------------------
#        0  magic        CONTROL_MAGIC; written last, so a reader never sees half a header
#        8  version      CONTROL_VERSION
#       16  pid          the guest process
#       24  npages       pages in the image
#       32  page_size    bytes per page
#       40  state        GuestState: 0 starting, 1 running, 2 paused, 3 exited
#       48  request      GuestRequest: 0 none, 1 pause, 2 resume, 3 exit (written by others)
#       56  position     next page to touch; authoritative only while paused or exited
#       64  value        full passes over the image; byte 0 of a page is value & 255
#       72  touched      page writes since the image was created (when known)
#       80  dirty_rate   bytes of pages per second, 0 = as fast as possible; others may
#                        change it while the guest runs
#       88  heartbeat    CLOCK_MONOTONIC ns, updated every tick, also while paused
#       96  lease_owner  pid of the migration holding the pause lease (0 none); kept,
#                        with lease_mode lapsed, once the guest resumed after its death
#      104  lease_start  the owner's start time (field 22 of /proc/<pid>/stat, clock ticks
#                        since boot), so that a reused pid is not taken for the owner
#      112  lease_mode   LeaseMode: 0 none, 1 resume if the owner dies, 2 hold, 3 lapsed
#      120  migration_hi the migration that holds (hold) or took (handed over) the guest:
#      128  migration_lo its 16-byte UUID as two big-endian halves, 0 = none named
#      136  handed_over  CLOCK_REALTIME ns when the guest was handed over to a destination
#                        that committed; 0 = never. The guest exits and a new guest on
#                        the image is refused (see workload.run_guest)
#      144  throttle     per mille of every tick the guest sleeps, 0..990 (auto-converge;
#                        written by the migration, read by the guest every tick)
#      152  throttle_by  pid of the process that set the throttle (0 none), and
#      160  throttle_at  its start time: once it is dead the guest lifts the throttle
#      168  postcopy     PostcopyPhase: 0 none, 1 served, 2 lost, 3 complete (below);
#                        written by the guest's post-copy link, 0 for any other start
#      176  postcopy_peer pid of the receiver that serves (or last served) the guest's
#                        missing pages, 0 none yet
#      184  postcopy_at  CLOCK_MONOTONIC ns of the last change of postcopy
#     4096  bitmap       ceil(npages / 64) u64 words, bit i of the bitmap = page i dirty
#
# Requests are levels, not edges: the guest never clears `request`, so a request cannot be
# lost between the guest reading it and clearing it. Pause means "be paused until the
# request says otherwise"; none and resume both mean "run".
#
# The pause is a lease (ARCHITECTURE.md, invariant 5). The migration that pauses writes
# lease_owner, lease_start and lease_mode "resume if the owner dies" before the pause
# request; while paused under that mode the guest looks at the owner at least every
# 100 ms, and once the owner is dead (gone, a zombie, or its pid reused: another start
# time) it resumes itself: it writes lease_mode lapsed, then request resume, and goes on
# as for any resume, so the control block tells what happened (request resume, lease
# lapsed, lease_owner the dead pid). That is the one write of `request` the guest makes.
# Right before the device state leaves, the migration switches the lease to "hold": the
# destination may own the guest from then on, so it stays paused whatever happens until
# someone decides (resume: `zcmigrate resume`; exit and handed over: `zcmigrate
# retire`, or the migration after the destination's commit). A resume ends the lease
# (mode none, owner 0).
#
# Post-copy (`zcmigrate guest IMAGE --postcopy SOCKET`): the guest starts on an image
# some of whose pages have not arrived. It registers its mapping with a userfaultfd and
# hands that to the receiver listening on SOCKET; once the receiver sends the device
# state, the guest creates this block and runs (postcopy served), and a page it touches
# that is missing is fetched by the receiver while the touching thread waits in the
# kernel. If the receiver goes away (lost) the guest keeps its userfaultfd, so a missing
# page is never filled with zeros: a thread that touches one waits, and the heartbeat
# stops, until a receiver takes the descriptor again (served). Once the receiver says
# every page is there and the image has no hole left, the guest unregisters (complete).
# A blocked guest cannot write its own state: postcopy and a stale heartbeat together
# say why it is silent.
#
# The guest writes position, value and touched before it publishes state=paused (x86
# stores are not reordered with each other, and each aligned u64 store through a
# memoryview is a single store), so a reader that sees "paused" reads a consistent
# device state. The bitmap words are only ever changed with atomic operations
# (multifd/pages.py).

CONTROL_MAGIC: Final = 0x5A43_4755_4553_5431  # "ZCGUEST1"
CONTROL_VERSION: Final = 3
READABLE_VERSIONS: Final = frozenset({2, 3})
"""Control versions whose header this version reads (the pid, state, lease and hand-over
mark): fields are only ever appended, and a field a version lacks reads as 0."""
CONTROL_SIZE: Final = 4096
BITMAP_OFFSET: Final = CONTROL_SIZE


@enum.verify(enum.UNIQUE, enum.CONTINUOUS)
class Field(enum.IntEnum):
    """The header's fields by u64 index, as in the table above (byte offset = 8 * index).

    Everything else is derived from this: HEADER_WORDS, CONTROL_FIELDS, the views both
    sides map. A new field takes the next index and a row in the table.
    """

    MAGIC = 0
    VERSION = 1
    PID = 2
    NPAGES = 3
    PAGE_SIZE = 4
    STATE = 5
    REQUEST = 6
    POSITION = 7
    VALUE = 8
    TOUCHED = 9
    DIRTY_RATE = 10
    HEARTBEAT = 11
    LEASE_OWNER = 12
    LEASE_START = 13
    LEASE_MODE = 14
    MIGRATION_HI = 15
    MIGRATION_LO = 16
    HANDED_OVER = 17
    THROTTLE = 18
    THROTTLE_BY = 19
    THROTTLE_AT = 20
    POSTCOPY = 21
    POSTCOPY_PEER = 22
    POSTCOPY_AT = 23


HEADER_WORDS: Final = len(Field)
"""u64 words of the header in use, from Field.MAGIC to the last field."""

if HEADER_WORDS * 8 > CONTROL_SIZE:
    raise AssertionError("the control header has outgrown CONTROL_SIZE; move the bitmap")

CONTROL_FIELDS: Final[dict[str, int]] = {f.name.lower(): f * 8 for f in Field}
"""Byte offset of every control-block field, for readers in other languages and tests."""

MIN_PAGE_SIZE: Final = 64
MAX_PAGE_SIZE: Final = 1 << 30
MAX_IMAGE_BYTES: Final = 1 << 50
U64_MAX: Final = (1 << 64) - 1
MAX_THROTTLE: Final = 990
"""The most of a tick a throttled guest may sleep, per mille: it always runs a little."""


class GuestState(enum.IntEnum):
    STARTING = 0
    RUNNING = 1
    PAUSED = 2
    EXITED = 3


class GuestRequest(enum.IntEnum):
    NONE = 0
    PAUSE = 1
    RESUME = 2
    EXIT = 3


class LeaseMode(enum.IntEnum):
    """What the guest does while paused if the lease's owner dies (the table above)."""

    NONE = 0
    """No lease: a pause with no owner stays until someone resumes it."""
    RESUME_IF_OWNER_DIES = 1
    """The device state has not left: the guest resumes itself once the owner is dead."""
    HOLD = 2
    """The device state has left: the guest stays paused whatever happens."""
    LAPSED = 3
    """The owner died under RESUME_IF_OWNER_DIES and the guest resumed itself."""


class PostcopyPhase(enum.IntEnum):
    """Where a guest started with --postcopy stands (the table and the comment above)."""

    NONE = 0
    """Not a post-copy start (or one from before this version)."""
    SERVED = 1
    """Running; a missing page is fetched by the receiver while its thread waits."""
    LOST = 2
    """The receiver is gone: a missing page waits (never zeros) until one takes over."""
    COMPLETE = 3
    """Every page is there and the range is unregistered: an ordinary guest again."""


@dataclass(frozen=True, slots=True)
class Lease:
    """The pause lease and the hand-over mark as a control block holds them."""

    mode: LeaseMode
    owner: int
    """pid of the migration that holds the lease (or held it, when lapsed); 0 none."""
    owner_start: int
    """The owner's start time in clock ticks after boot; 0 unknown."""
    migration: bytes | None
    """The 16-byte UUID of the migration that holds or took the guest, if named."""
    handed_over_ns: int
    """CLOCK_REALTIME ns of the hand-over to a destination that committed; 0 never."""

    @classmethod
    def from_header(cls, words: Sequence[int]) -> Lease:
        """Decode the header words (indexed by Field); GuestError for an unknown mode."""
        raw = int(words[Field.LEASE_MODE])
        try:
            mode = LeaseMode(raw)
        except ValueError:
            raise GuestError(f"guest control block holds unknown lease mode {raw}") from None
        hi, lo = int(words[Field.MIGRATION_HI]), int(words[Field.MIGRATION_LO])
        return cls(
            mode=mode,
            owner=int(words[Field.LEASE_OWNER]),
            owner_start=int(words[Field.LEASE_START]),
            migration=uuid_bytes(hi, lo),
            handed_over_ns=int(words[Field.HANDED_OVER]),
        )

    @property
    def migration_name(self) -> str:
        """The migration's UUID in hex for messages, or "unnamed"."""
        return self.migration.hex() if self.migration else "unnamed"


def uuid_words(uuid: bytes | None) -> tuple[int, int]:
    """A 16-byte migration UUID as the (hi, lo) words of the control block; None -> 0, 0."""
    if uuid is None:
        return 0, 0
    if not isinstance(uuid, bytes) or len(uuid) != 16:
        raise GuestError(f"a migration UUID is 16 bytes, got {uuid!r}")
    return int.from_bytes(uuid[:8], "big"), int.from_bytes(uuid[8:], "big")


def uuid_bytes(hi: int, lo: int) -> bytes | None:
    """The inverse of uuid_words: None when both words are 0."""
    if hi == 0 and lo == 0:
        return None
    return hi.to_bytes(8, "big") + lo.to_bytes(8, "big")


def control_file_size(npages: int) -> int:
    """Bytes of a control file for `npages` pages: the header page and the bitmap."""
    return CONTROL_SIZE + 8 * bitmap_words(npages)


def check_page_size(page_size: int) -> None:
    if (
        type(page_size) is not int
        or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE
        or page_size & (page_size - 1)
    ):
        raise GuestError(
            f"page size {page_size!r} is not a power of two between {MIN_PAGE_SIZE} and "
            f"{MAX_PAGE_SIZE}"
        )


def read_control_header(path: Path) -> list[int] | None:
    """The header words of a control file as a plain read sees them (no mapping, no
    checks), indexed by Field; None if there is no whole header to read."""
    try:
        with open(path, "rb") as f:
            head = f.read(CONTROL_SIZE)
    except OSError:
        return None
    if len(head) < CONTROL_SIZE:
        return None
    return list(memoryview(head).cast("Q")[:HEADER_WORDS])


__all__ = [
    "BITMAP_OFFSET",
    "CONTROL_FIELDS",
    "CONTROL_MAGIC",
    "CONTROL_SIZE",
    "CONTROL_VERSION",
    "HEADER_WORDS",
    "MAX_IMAGE_BYTES",
    "MAX_PAGE_SIZE",
    "MAX_THROTTLE",
    "MIN_PAGE_SIZE",
    "READABLE_VERSIONS",
    "U64_MAX",
    "Field",
    "GuestRequest",
    "GuestState",
    "Lease",
    "LeaseMode",
    "PostcopyPhase",
    "bitmap_words",
    "check_page_size",
    "control_file_size",
    "read_control_header",
    "uuid_bytes",
    "uuid_words",
]
