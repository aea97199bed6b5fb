"""The control file's layout, the one contract between a guest and the migration that
drives it: offsets, magic, version, states and requests, page-size limits. It holds no
behaviour of either side; a new field is a row in the table and a member of Field.
"""

from __future__ import annotations

import enum
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
#     4096  bitmap       ceil(npages / 64) u64 words, bit i of the bitmap = page i dirty
#
# Requests are levels, not edges: the guest never clears `request`, so a request cannot be
# lost between the guest reading it and clearing it. Pause means "be paused until the
# request says otherwise"; none and resume both mean "run".
#
# The guest writes position, value and touched before it publishes state=paused (x86
# stores are not reordered with each other, and each aligned u64 store through a
# memoryview is a single store), so a reader that sees "paused" reads a consistent
# device state. The bitmap words are only ever changed with atomic operations
# (multifd/pages.py).

CONTROL_MAGIC: Final = 0x5A43_4755_4553_5431  # "ZCGUEST1"
CONTROL_VERSION: Final = 1
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
    "MIN_PAGE_SIZE",
    "U64_MAX",
    "Field",
    "GuestRequest",
    "GuestState",
    "bitmap_words",
    "check_page_size",
    "control_file_size",
    "read_control_header",
]
