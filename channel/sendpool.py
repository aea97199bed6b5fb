"""Page-aligned send buffers for zero-copy sends of bytes we wrote ourselves (ciphertext),
each reused only after every MSG_ZEROCOPY call that carried it completed (seed 004).

It knows buffers and the channel's call numbers, not what the bytes are.
"""

from __future__ import annotations

import contextlib
import enum
import mmap
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from zcmigrate.channel.errors import ChannelClosed, ChannelError, SendBufferTimeout
from zcmigrate.native import ffi

# How long acquire() waits for completions before it looks at the shutdown flag again.
_WAIT_SLICE = 0.1
# A transparent huge page on x86-64 and arm64 (4 KiB base pages): what a send buffer's
# start is aligned to, so that whole 2 MiB stretches of it can be huge pages.
_HUGE = 2 << 20
# madvise(2) values Python 3.11's mmap module does not name (Linux 5.14).
_MADV_POPULATE_WRITE = 23


class ZeroCopyWriter(Protocol):
    """What the pool needs of a channel (zcsocket.Channel has it; tests use fakes)."""

    name: str
    supports_zero_copy: bool

    def writev(self, buffers: Iterable[Any], *, header: Any = None,
               zero_copy: bool = False) -> int: ...

    def zero_copy_calls(self) -> int: ...

    def zero_copy_completed(self, first: int, end: int, timeout: float = 0.0) -> bool: ...


class BufferState(enum.Enum):
    FREE = "free"
    HELD = "held"  # handed out by acquire(), not sent yet
    IN_FLIGHT = "in flight"  # sent; the kernel may still read it


class SendBuffer:
    """`size` bytes of private anonymous memory, starting on a 2 MiB boundary. Write into
    `view` (or `cdata`, `address` for C), then hand it to SendPool.send(); never touch it
    after that.

    Each whole 2 MiB of it is asked to be a transparent huge page (MADV_HUGEPAGE; the kernel
    may say no: THP "never", or no huge page free). A sealed packet's 2 MiB of ciphertext
    then lies in one huge page plus a small tail: a zero-copy send pins one folio where it
    pinned 512 pages, and the cipher's writes walk one TLB entry. Measured: the sealed
    source's CPU dropped (docs/performance.md, "Send buffers on huge pages"). The tail and
    the alignment slack are ordinary pages; the slack is never touched, so it costs
    address space, not memory.
    """

    __slots__ = ("_all", "_mm", "address", "calls", "cdata", "index", "size", "state", "view")

    def __init__(self, index: int, size: int) -> None:
        huge = size // _HUGE * _HUGE
        # Room to start on a 2 MiB boundary wherever the kernel puts the mapping.
        self._mm = mmap.mmap(-1, size + (_HUGE if huge else 0), flags=mmap.MAP_PRIVATE)
        self._all: Any = ffi.from_buffer("uint8_t[]", self._mm, require_writable=True)
        start = -int(ffi.cast("uintptr_t", self._all)) % _HUGE if huge else 0
        if huge:
            with contextlib.suppress(OSError):  # no THP in this kernel: small pages
                self._mm.madvise(mmap.MADV_HUGEPAGE, start, huge)
        _populate(self._mm, start, size)
        self.index = index
        self.size = size
        self.view = memoryview(self._mm)[start:start + size]
        # A slice of _all (which the buffer holds): a uint8_t[size] view, no copy.
        self.cdata: Any = self._all[start:start + size]
        self.address = int(ffi.cast("uintptr_t", self.cdata))
        self.state = BufferState.FREE
        self.calls = (0, 0)  # the zero-copy calls [first, end) of its last send

    def unmap(self) -> None:
        self.view.release()
        ffi.release(self._all)
        # A view of it may still live (in a traceback's frame): then it goes when that dies.
        with contextlib.suppress(BufferError):
            self._mm.close()

    def __repr__(self) -> str:
        return f"<SendBuffer {self.index} {self.state.value} calls {self.calls}>"


def _populate(mm: mmap.mmap, start: int, size: int) -> None:
    """Fault in [start, start + size) of `mm` now, as writable memory: the first send pays
    no page faults. After MADV_HUGEPAGE, so the huge pages are what gets faulted in."""
    try:
        mm.madvise(_MADV_POPULATE_WRITE, start, size)
    except OSError:  # before Linux 5.14: touch every page instead
        for off in range(start, start + size, mmap.PAGESIZE):
            mm[off] = 0


@dataclass(frozen=True, slots=True)
class SendPoolStats:
    """A snapshot of the pool (trio's statistics() style)."""

    buffers: int
    buffer_size: int
    free: int
    held: int
    in_flight: int
    in_flight_peak: int
    sends: int
    acquire_waits: int
    acquire_wait_seconds: float


class SendPool:
    """`count` buffers of `size` bytes (rounded up to whole pages) for one channel.

    acquire() hands a free buffer out, waiting for completions (bounded by its timeout,
    woken by shutdown()) when none is free; send() writes it on the channel with zero copy
    when the channel has it (and `zero_copy` is not False); the buffer comes back once its
    calls have completed. At most count * size bytes are pinned by zero copy at once: keep
    that within RLIMIT_MEMLOCK when running without CAP_IPC_LOCK. One writer thread uses a
    pool; shutdown() may come from any thread.

    `poison`, if given, is written over every buffer as it returns to the free list: a
    debugging aid that makes any early reuse visible to the receiver.
    """

    def __init__(self, channel: ZeroCopyWriter, count: int, size: int, *,
                 zero_copy: bool | None = None, poison: bytes | None = None) -> None:
        if count <= 0:
            raise ValueError("a send pool needs at least one buffer")
        if size <= 0:
            raise ValueError("send buffers need a positive size")
        if poison is not None and not poison:
            raise ValueError("an empty poison pattern")
        page = mmap.PAGESIZE
        self.buffer_size = -(-size // page) * page
        self._channel = channel
        if zero_copy and not channel.supports_zero_copy:
            raise ValueError(f"send pool: channel {channel.name} has no zero copy")
        # None: whatever the channel can do.
        self._zero_copy = channel.supports_zero_copy if zero_copy is None else zero_copy
        self._poison = poison
        self._shut = threading.Event()
        self._buffers = [SendBuffer(i, self.buffer_size) for i in range(count)]
        # FIFO: a freed buffer waits behind every other free one before its next use.
        self._free: deque[SendBuffer] = deque(self._buffers)
        self._in_flight: deque[SendBuffer] = deque()  # in send order
        self._sends = 0
        self._peak = 0
        self._waits = 0
        self._wait_seconds = 0.0

    @property
    def zero_copy(self) -> bool:
        return self._zero_copy

    # --------------------------------------------------------------- hand out

    def acquire(self, timeout: float | None = None) -> SendBuffer:
        """A free buffer, now held by the caller. Waits for completions when none is free:
        SendBufferTimeout after `timeout` seconds, ChannelClosed on shutdown."""
        deadline = None if timeout is None else time.monotonic() + timeout
        started = 0.0
        while True:
            if self._shut.is_set():
                raise ChannelClosed(f"send pool of channel {self._channel.name} was shut down")
            if not self._free:
                self.reclaim()
            if self._free:
                buf = self._free.popleft()
                buf.state = BufferState.HELD
                if started:
                    self._wait_seconds += time.monotonic() - started
                return buf
            if not self._in_flight:
                raise ChannelError(
                    f"send pool of channel {self._channel.name}: all {len(self._buffers)} "
                    "buffers are held and none is in flight; a caller keeps buffers it "
                    "neither sends nor releases"
                )
            if not started:
                started = time.monotonic()
                self._waits += 1
            wait = _WAIT_SLICE
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._wait_seconds += time.monotonic() - started
                    raise SendBufferTimeout(
                        f"send pool of channel {self._channel.name}: no buffer of "
                        f"{len(self._buffers)} came free within {timeout:g} s; zero-copy "
                        "completions are not arriving (is the destination reading?)"
                    )
                wait = min(wait, left)
            # The oldest send completes first in the common case (TCP acknowledges in
            # order, seed 004 "Notification Batching"); any other is picked up by reclaim.
            oldest = self._in_flight[0]
            self._channel.zero_copy_completed(*oldest.calls, timeout=wait)

    def release(self, buf: SendBuffer) -> None:
        """Give back a held buffer that was not sent."""
        self._check_held(buf, "release")
        self._make_free(buf)

    # ------------------------------------------------------------------- send

    def send(self, buf: SendBuffer, nbytes: int, *, header: Any = None) -> int:
        """Write `header` (sent normally) and the first `nbytes` of `buf` (with zero copy
        if the channel has it); the buffer is the pool's again from here on."""
        self._check_held(buf, "send")
        if not 0 <= nbytes <= buf.size:
            raise ValueError(f"{nbytes} bytes from a send buffer of {buf.size}")
        ch = self._channel
        first = ch.zero_copy_calls()
        try:
            # A cffi buffer of the mapping, not a slice of `view`: a failed send's traceback
            # holds what the channel made of it in a cycle, and the collector clearing an
            # exported memoryview at exit crashed the interpreter (SIGSEGV).
            sent = ch.writev([ffi.buffer(buf.cdata, nbytes)], header=header,
                             zero_copy=self._zero_copy)
        finally:
            # Even a writev that failed half-way may have made calls that pin the buffer.
            buf.calls = (first, ch.zero_copy_calls())
            buf.state = BufferState.IN_FLIGHT
            self._in_flight.append(buf)
            self._sends += 1
            self._peak = max(self._peak, len(self._in_flight))
        self.reclaim()
        return sent

    def reclaim(self) -> int:
        """Move every buffer whose calls have all completed to the free list (reading the
        error queue, never waiting); return how many."""
        freed = 0
        for buf in list(self._in_flight):
            if self._completed(buf):
                self._in_flight.remove(buf)
                self._make_free(buf)
                freed += 1
        return freed

    def _completed(self, buf: SendBuffer) -> bool:
        """The release rule: every zero-copy call that carried bytes of `buf` completed."""
        first, end = buf.calls
        return first == end or self._channel.zero_copy_completed(first, end)

    def _make_free(self, buf: SendBuffer) -> None:
        if self._poison is not None:
            pat = self._poison
            reps = -(-buf.size // len(pat))
            buf.view[:] = (pat * reps)[:buf.size]
        buf.state = BufferState.FREE
        buf.calls = (0, 0)
        self._free.append(buf)

    def _check_held(self, buf: SendBuffer, what: str) -> None:
        if buf.index >= len(self._buffers) or self._buffers[buf.index] is not buf:
            raise ValueError(f"cannot {what} a buffer of another pool")
        if buf.state is not BufferState.HELD:
            raise ValueError(f"cannot {what} send buffer {buf.index}: it is {buf.state.value}")

    # ---------------------------------------------------------------- the end

    def shutdown(self) -> None:
        """Wake a blocked acquire(); it and every later one raise ChannelClosed."""
        self._shut.set()

    def close(self) -> None:
        """Unmap every buffer. Meant for after the channel's flush(); a buffer still in
        flight is safe to unmap (the kernel holds its own references to pinned pages)."""
        self.shutdown()
        for buf in self._buffers:
            buf.unmap()
        self._free.clear()
        self._in_flight.clear()

    def statistics(self) -> SendPoolStats:
        held = sum(b.state is BufferState.HELD for b in self._buffers)
        return SendPoolStats(
            buffers=len(self._buffers),
            buffer_size=self.buffer_size,
            free=len(self._free),
            held=held,
            in_flight=len(self._in_flight),
            in_flight_peak=self._peak,
            sends=self._sends,
            acquire_waits=self._waits,
            acquire_wait_seconds=self._wait_seconds,
        )
