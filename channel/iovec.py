"""A struct iovec array for the channel's writev and readv, built without copying.

Slot 0 is kept free for a header, so a sender can put its framing bytes in front of
buffers taken straight from an mmap (h11's data passthrough) with no copy in Python.
It knows addresses and lengths, not what they hold.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from zcmigrate.native import ffi


class IoVec:
    """Up to `capacity` buffers (plus the header slot) as a cffi `struct iovec[]`.

    Fill it with `from_buffers` (general, one Python step per buffer) or let C fill
    `entries` directly and call `set_filled` (the per-page hot path).
    """

    __slots__ = ("_arr", "_keep", "capacity", "count", "nbytes")

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._arr: Any = ffi.new("struct iovec[]", capacity + 1)
        self._keep: list[Any] = []  # cffi buffers that must outlive the syscall
        self.count = 0
        self.nbytes = 0

    @classmethod
    def from_buffers(cls, buffers: Iterable[Any], *, writable: bool = False) -> IoVec:
        bufs = list(buffers)
        iov = cls(len(bufs))
        for b in bufs:
            cdata = ffi.from_buffer(b, require_writable=writable)
            n = len(cdata)
            if n == 0:
                continue
            entry = iov._arr[iov.count + 1]
            entry.iov_base = cdata
            entry.iov_len = n
            iov._keep.append(cdata)
            iov.count += 1
            iov.nbytes += n
        return iov

    @property
    def entries(self) -> Any:
        """Pointer to the first buffer slot (after the header slot), for C to fill."""
        return self._arr + 1

    def set_filled(self, count: int, nbytes: int, keep: Any = None) -> None:
        """Declare that C wrote `count` entries covering `nbytes`; `keep` is the object that
        owns their memory (a mapping, or a cffi buffer of it), kept alive with them."""
        if not 0 <= count <= self.capacity:
            raise ValueError(f"iovec count {count} outside 0..{self.capacity}")
        self.count = count
        self.nbytes = nbytes
        self._keep = [keep] if keep is not None else []

    @property
    def owned(self) -> bool:
        """Whether something is known to own the memory the entries point at (or there
        are none): what a zero-copy send must hold until its completion."""
        return self.count == 0 or bool(self._keep)

    @property
    def owners(self) -> tuple[Any, ...]:
        """The objects that keep the entries' memory alive, as they are now (the IoVec
        itself may be refilled for the next send)."""
        return tuple(self._keep)

    def with_header(self, header: Any) -> tuple[Any, int, int, Any]:
        """(iovec pointer, iovcnt, header bytes, header buffer) with slot 0 filled.

        The header, when there is one, is exactly one iovec: the first.
        """
        if header is None or len(header) == 0:
            return self._arr + 1, self.count, 0, None
        hbuf = ffi.from_buffer(header)
        self._arr[0].iov_base = hbuf
        self._arr[0].iov_len = len(hbuf)
        return self._arr, self.count + 1, len(hbuf), hbuf
