"""Page-level operations on a mapped image, in C: the dirty bitmap's atomic fetch-and-clear
and its offsets, the reference workload's touch and check, zeroing pages.

It knows pages and bitmaps, not guests or migrations: which file is mapped and what a
page's byte means is the caller's business. It is the one door to native for them, so
that nothing above this layer handles cffi buffers or raw C calls.
"""

from __future__ import annotations

import mmap
import os
from array import array
from typing import TYPE_CHECKING, Any, Final

from zcmigrate.native import ffi, lib

if TYPE_CHECKING:
    from typing_extensions import Buffer

_U32: Final = (1 << 32) - 1


def bitmap_words(npages: int) -> int:
    """u64 words in a dirty bitmap of `npages` pages: page i is bit i % 64 of word i // 64."""
    return (npages + 63) // 64


class MappedFile:
    """A whole file mapped shared, with its address taken once for native calls.

    A cffi buffer is held on the mmap until close(): the mmap cannot be closed or resized
    under it, so `address` stays valid for as long as this object is open.
    """

    def __init__(self, fd: int, size: int, *, writable: bool) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.size = size
        self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
        self._buf: Any = ffi.from_buffer(self.mm)
        self.address: int = int(ffi.cast("uintptr_t", self._buf))
        self._views: list[memoryview] = []

    def u64_view(self, offset: int, count: int) -> memoryview:
        """`count` native-endian u64 words from byte `offset`, writable if the mapping is;
        released by close()."""
        with memoryview(self.mm) as whole:
            view = whole[offset : offset + count * 8].cast("Q")
        self._views.append(view)
        return view

    def close(self) -> None:
        """Release the views, the native buffer and the mapping. BufferError if someone
        still holds a buffer on a view (the mapping then stays until they let go)."""
        for v in self._views:
            v.release()
        self._views.clear()
        ffi.release(self._buf)
        self.mm.close()


def _check_page_size(page_size: int) -> None:
    # The C side takes a u32 and divides by it.
    if not 0 < page_size <= _U32:
        raise ValueError(f"page size {page_size} is not a positive u32")


def _check_words(what: str, words: array[int], need: int) -> None:
    if words.typecode != "Q" or len(words) < need:
        raise ValueError(
            f"{what} must be an array('Q') of at least {need} words, got "
            f"array({words.typecode!r}) of {len(words)}"
        )


def fetch_clear_dirty(bitmap_address: int, nwords: int, out: array[int]) -> int:
    """Move the shared dirty bitmap at `bitmap_address` into `out`, clearing each word
    with an atomic exchange; returns the number of dirty pages fetched.

    A bit set after its word was taken stays in the shared bitmap for the next fetch, so
    no write is lost between a fetch and the sends that follow it.
    """
    _check_words("out", out, nwords)
    bm = ffi.cast("uint64_t *", bitmap_address)
    with ffi.from_buffer("uint64_t[]", out, require_writable=True) as out_c:
        count = int(lib.zc_bitmap_fetch_clear(bm, nwords, out_c, len(out_c)))
    if count < 0:
        raise ValueError(f"fetch_clear_dirty: {os.strerror(-count)} ({nwords} words into "
                         f"{len(out)})")
    return count


def dirty_offsets(bitmap: array[int], npages: int, page_size: int, out: array[int]) -> int:
    """Write the byte offset of every page marked in `bitmap` into `out`, in page order;
    returns how many. Bits past `npages` (the last word's tail) are ignored."""
    _check_page_size(page_size)
    _check_words("bitmap", bitmap, bitmap_words(npages))
    # Every page may be dirty: `out` must have room for all of them.
    _check_words("out", out, npages)
    with (
        ffi.from_buffer("uint64_t[]", bitmap) as bm_c,
        ffi.from_buffer("uint64_t[]", out, require_writable=True) as out_c,
    ):
        count = int(lib.zc_bitmap_offsets(bm_c, npages, page_size, out_c, len(out_c)))
    if count < 0:
        raise ValueError(f"dirty_offsets: {os.strerror(-count)} ({npages} pages into "
                         f"{len(out)} offsets)")
    return count


def or_words(a: array[int], b: array[int]) -> array[int]:
    """Bitwise OR of two bitmaps, at C speed through Python's big integers."""
    if len(a) != len(b):
        raise ValueError(f"bitmaps of {len(a)} and {len(b)} words cannot be merged")
    n = len(a) * 8
    merged = int.from_bytes(a.tobytes(), "little") | int.from_bytes(b.tobytes(), "little")
    out = array("Q")
    out.frombytes(merged.to_bytes(n, "little"))
    return out


def _check_image(image: MappedFile, npages: int, page_size: int, position: int) -> None:
    _check_page_size(page_size)
    if npages < 1 or npages * page_size > image.size:
        raise ValueError(
            f"{npages} pages of {page_size} bytes do not fit a {image.size}-byte mapping"
        )
    if not 0 <= position < npages:
        raise ValueError(f"position {position} is not a page of {npages}")


def touch_pages(
    image: MappedFile,
    bitmap_address: int,
    npages: int,
    page_size: int,
    position: int,
    count: int,
) -> int:
    """The reference workload's writes (QEMU's migration test guest): add one to byte 0
    of `count` pages from `position` on, wrapping to page 0 after the last, and mark each
    page in the dirty bitmap at `bitmap_address` after its write. Returns the next
    position.

    The mark follows the write (a release store), so whoever fetch-clears the bit
    afterwards sends this version of the page or a newer one.
    """
    _check_image(image, npages, page_size, position)
    if count < 0:
        raise ValueError(f"cannot touch {count} pages")
    bm = ffi.cast("uint64_t *", bitmap_address)
    pos = int(lib.zc_guest_touch(image.address, bm, npages, page_size, position, count))
    if pos < 0:
        raise ValueError(f"touch_pages: {os.strerror(-pos)} (position {position} of "
                         f"{npages} pages)")
    return pos


def first_page_off_step(
    image: MappedFile, npages: int, page_size: int, position: int, value: int
) -> int | None:
    """The reference workload's check: pages before `position` must hold value+1 in
    byte 0, the others value (mod 256). Returns the first page that does not, or None
    when every page agrees."""
    _check_image(image, npages, page_size, position)
    bad = int(lib.zc_guest_check(image.address, npages, page_size, position, value & 0xFF))
    return None if bad < 0 else bad


def zero_pages(buffer: Buffer, offsets: array[int], page_size: int) -> int:
    """Zero the pages of a writable `buffer` that start at the byte `offsets`, skipping
    those already zero (writing them would only fault them in); returns how many it
    wrote. ValueError if a page lies outside the buffer."""
    _check_page_size(page_size)
    if offsets.typecode != "Q":
        raise ValueError(f"offsets must be an array('Q'), got array({offsets.typecode!r})")
    nwritten = ffi.new("uint32_t *")
    with (
        ffi.from_buffer(buffer, require_writable=True) as buf_c,
        ffi.from_buffer("uint64_t[]", offsets) as offsets_c,
    ):
        size = len(buf_c)
        rc = lib.zc_zero_pages(
            int(ffi.cast("uintptr_t", buf_c)),
            size,
            offsets_c,
            len(offsets),
            page_size,
            ffi.NULL,
            0,
            nwritten,
        )
    if rc:
        raise ValueError(f"{os.strerror(rc)}: a page lies outside the {size}-byte buffer")
    return int(nwritten[0])


__all__ = [
    "MappedFile",
    "bitmap_words",
    "dirty_offsets",
    "fetch_clear_dirty",
    "first_page_off_step",
    "or_words",
    "touch_pages",
    "zero_pages",
]
