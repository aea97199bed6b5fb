"""Which pages post-copy still waits for: one byte per page, set when a page goes stale at
the switch and cleared when its last version is placed, a packet's offsets at a time in C
(native/zcuffd.c, zcu_pending_set) rather than one Python step per page.

It knows page offsets and counts, not guests, channels or locks: the caller serializes
every call (post-copy's destination holds its lock around each).
"""

from __future__ import annotations

from typing import Any

from zcmigrate.native import ffi, lib


class PendingPages:
    """`npages` flags of `page_size`-byte pages, all clear at first."""

    def __init__(self, npages: int, page_size: int) -> None:
        if npages < 0 or page_size <= 0:
            raise ValueError(f"{npages} pages of {page_size} bytes")
        self.npages = npages
        self.page_size = page_size
        self._flags = bytearray(npages)
        self._flags_c: Any = ffi.from_buffer("uint8_t[]", self._flags)
        self._changed: Any = ffi.new("uint32_t *")

    def __getitem__(self, page: int) -> bool:
        """Whether page number `page` (not its offset) is still to come."""
        return bool(self._flags[page])

    def mark(self, offsets: Any, count: int | None = None) -> int:
        """Set the pages at these byte offsets (a uint64 array, or its first `count`);
        return how many were not set before."""
        return self._set(offsets, count, 1)

    def clear(self, offsets: Any, count: int | None = None) -> int:
        """Clear the pages at these byte offsets; return how many were set before."""
        return self._set(offsets, count, 0)

    def set_page(self, page: int) -> bool:
        """Set one page by number (a fault's, a hole's); True if it was clear."""
        was = self._flags[page]
        self._flags[page] = 1
        return not was

    def snapshot(self) -> bytes:
        """Every flag as one byte per page (b"\\x01" still to come)."""
        return bytes(self._flags)

    def _set(self, offsets: Any, count: int | None, value: int) -> int:
        with ffi.from_buffer("uint64_t[]", offsets) as offs:
            n = len(offs) if count is None else count
            if n > len(offs):
                raise ValueError(f"{len(offs)} offsets, {n} asked for")
            if n == 0:
                return 0
            if lib.zcu_pending_set(self._flags_c, self.npages, offs, n, self.page_size,
                                   value, self._changed):
                raise ValueError(f"a page offset among {n} is unaligned to {self.page_size} "
                                 f"bytes or past page {self.npages}")
            return int(self._changed[0])


__all__ = ["PendingPages"]
