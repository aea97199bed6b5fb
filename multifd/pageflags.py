"""One flag per page of an image, set, cleared and filtered a packet's offsets at a time in
C (native/zcuffd.c, zcu_flags_*) rather than one Python step per page. Post-copy keeps
two: at the destination the pages still to come, at the source the pages already sent on
the urgent channel (which the background push then skips).

It knows page offsets and counts, not guests, channels or locks: the caller serializes
every call (each user holds its own lock around them).
"""

from __future__ import annotations

from array import array
from typing import Any

from zcmigrate.native import ffi, lib


class PageFlags:
    """`npages` flags of `page_size`-byte pages, all clear at first."""

    def __init__(self, npages: int, page_size: int) -> None:
        if npages < 0 or page_size <= 0:
            raise ValueError(f"{npages} pages of {page_size} bytes")
        self.npages = npages
        self.page_size = page_size
        self._flags = bytearray(npages)
        self._flags_c: Any = ffi.from_buffer("uint8_t[]", self._flags)
        self._count: Any = ffi.new("uint32_t *")

    def __getitem__(self, page: int) -> bool:
        """Whether page number `page` (not its offset) is set."""
        return bool(self._flags[page])

    def mark(self, offsets: Any, count: int | None = None) -> int:
        """Set the pages at these byte offsets (a uint64 array, or its first `count`);
        return how many were not set before."""
        return self._set(offsets, count, 1)

    def clear(self, offsets: Any, count: int | None = None) -> int:
        """Clear the pages at these byte offsets; return how many were set before."""
        return self._set(offsets, count, 0)

    def set_page(self, page: int) -> bool:
        """Set one page by number; True if it was clear."""
        was = self._flags[page]
        self._flags[page] = 1
        return not was

    def unset_only(self, offsets: array[int]) -> array[int]:
        """The offsets whose page is not set, in their order."""
        out = array("Q", bytes(8 * len(offsets)))
        with ffi.from_buffer("uint64_t[]", offsets) as offs, \
                ffi.from_buffer("uint64_t[]", out, require_writable=True) as out_c:
            if lib.zcu_flags_unset_only(self._flags_c, self.npages, offs, len(offs),
                                        self.page_size, out_c, len(out_c), self._count):
                raise ValueError(self._refused(len(offs)))
            kept = int(self._count[0])
        del out[kept:]
        return out

    def bitmap(self) -> array[int]:
        """The flags as 64-bit words in host order, bit i of the whole for page i."""
        words = array("Q", bytes(8 * ((self.npages + 63) // 64)))
        with ffi.from_buffer("uint64_t[]", words, require_writable=True) as w:
            if lib.zcu_flags_bitmap(self._flags_c, self.npages, w, len(w)):
                raise ValueError(f"a bitmap of {len(w)} words for {self.npages} pages")
        return words

    def snapshot(self) -> bytes:
        """Every flag as one byte per page (b"\\x01" set)."""
        return bytes(self._flags)

    def _set(self, offsets: Any, count: int | None, value: int) -> int:
        with ffi.from_buffer("uint64_t[]", offsets) as offs:
            n = len(offs) if count is None else count
            if n > len(offs):
                raise ValueError(f"{len(offs)} offsets, {n} asked for")
            if n == 0:
                return 0
            if lib.zcu_flags_set(self._flags_c, self.npages, offs, n, self.page_size, value,
                                 self._count):
                raise ValueError(self._refused(n))
            return int(self._count[0])

    def _refused(self, n: int) -> str:
        return (f"a page offset among {n} is unaligned to {self.page_size} bytes or past "
                f"page {self.npages}")


__all__ = ["PageFlags"]
