"""Post-copy's background receive: the data channels go on carrying pages after the
receiver pool's final sync, and each page is handed to a `place` callback instead of
being written to the file, because the guest already runs on that file: a write would
overwrite a page the guest has since changed. The caller places pages with UFFDIO_COPY,
which never overwrites a page that is there (multifd/userfault.py).

No barrier between channels: after the switch the source's guest is paused, so every
copy of a page is the same version and order does not matter. Each channel's SYNC
packets are counted, so the caller can wait until every page sent before the source's
last SYNC has been placed.

It knows packets and channels (handed over by the ReceiverPool, with their sequence
trackers, so that a lost or repeated packet is still found, and with a sealed context
their openers, so that a packet's pages are placed only once its tag verified); not
guests, userfaultfds or the migration's protocol. It opens no socket.
"""

from __future__ import annotations

import threading
import time
from array import array
from collections.abc import Callable, Sequence
from typing import Any, Final

import structlog

from zcmigrate.channel.aead import Opener
from zcmigrate.channel.errors import ChannelClosed
from zcmigrate.channel.zcsocket import Channel
from zcmigrate.multifd.exiting import Exiting, MultifdError
from zcmigrate.multifd.wire import (
    HEADER_SIZE,
    TAG_SIZE,
    SequenceTracker,
    WireContext,
    decode_header,
    decode_offsets,
    sealed_capacity,
    sealed_size,
)
from zcmigrate.native import ffi

_log = structlog.get_logger("zcmigrate.multifd.placement")
_WAIT_SLICE: Final = 0.1

Handed = tuple[Channel, SequenceTracker, Opener | None]
"""One data channel as the ReceiverPool hands it over: the channel, its sequence tracker,
and its opener when the context is sealed (None otherwise)."""
Place = Callable[["array[int]", memoryview, "array[int]"], None]
"""place(normal offsets, their pages in order, zero offsets): put one packet's pages in."""


class PlacementReaders:
    """One thread per data channel, reading packets and handing their pages to `place`
    until stop() (or a failure, set on `exiting`)."""

    def __init__(self, channels: Sequence[Handed], ctx: WireContext, place: Place,
                 exiting: Exiting) -> None:
        if any((opener is not None) != ctx.sealed for _, _, opener in channels):
            raise ValueError("a sealed context needs an opener per channel, and only it")
        self._ctx = ctx
        self._place = place
        self._exiting = exiting
        self._channels = list(channels)
        self._cond = threading.Condition()
        self._synced = [0] * len(channels)
        self._pages = 0
        self._stopping = False
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i, (ch, seq, opener) in enumerate(self._channels):
            t = threading.Thread(target=self._run, args=(i, ch, seq, opener),
                                 name=f"postcopy-recv-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    @property
    def pages(self) -> int:
        """Pages handed to `place` so far, normal and zero."""
        return self._pages

    def wait_synced(self, k: int, timeout: float) -> None:
        """Until every channel has read its k-th SYNC since the hand-over (every page sent
        before it placed); MultifdError after `timeout` seconds or on a failure."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while min(self._synced, default=k) < k:
                if self._exiting.is_set():
                    err = self._exiting.error
                    raise err if isinstance(err, MultifdError) else MultifdError(
                        f"post-copy receive stopped: {err}")
                left = deadline - time.monotonic()
                if left <= 0:
                    behind = [i for i, n in enumerate(self._synced) if n < k]
                    raise MultifdError(f"post-copy receive: channels {behind} sent no SYNC "
                                       f"within {timeout:g} s")
                self._cond.wait(min(left, _WAIT_SLICE))

    def stop(self) -> None:
        """Stop reading (the channels stay open: the pool closes them); join the threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for ch, _, _ in self._channels:
            ch.shutdown()
        for t in self._threads:
            t.join(5.0)

    def _run(self, i: int, ch: Channel, seq: SequenceTracker, opener: Opener | None) -> None:
        try:
            self._read(i, ch, seq, opener)
        except BaseException as e:  # a reader thread records every failure, and ends
            if self._stopping and isinstance(e, ChannelClosed):
                return
            error = MultifdError.on_channel("post-copy receive", i, e)
            if self._exiting.set(error, where=f"postcopy-recv-{i}"):
                _log.error("post-copy receive channel failed", error=str(error))
        finally:
            with self._cond:
                self._cond.notify_all()

    def _read(self, i: int, ch: Channel, seq: SequenceTracker, opener: Opener | None) -> None:
        ctx = self._ctx
        ps = ctx.page_size
        # Sealed: one packet's messages and tags are read into this buffer and opened in
        # place (counter seq - 1, as the ReceiverPool's workers: the tracker holds seq to
        # the next one, the opener holds the counter again) before anything of it is used:
        # the guest runs on this image, so not a byte that failed its tag may reach it.
        cap = sealed_capacity(ctx)
        sealed: Any = ffi.new("uint8_t[]", cap) if opener is not None else None
        while not self._stopping:
            # No deadline on these reads: the channel's peer timeout (keepalive and
            # TCP_USER_TIMEOUT) finds a dead source, and stop() shuts the channel down,
            # which ends a read in progress.
            head = ch.read_exact(HEADER_SIZE)
            header = decode_header(head, ctx)
            seq.accept(header)  # a lost, repeated or reordered packet never lands
            if opener is not None:
                total = sealed_size(header)
                if total > cap:  # decode_header refuses it; never overrun
                    raise MultifdError(f"post-copy receive channel {i}: a sealed packet of "
                                       f"{total} bytes, more than pages_alloc pages")
                # Read straight into the buffer it is opened in: no copy in between.
                ch.readv_into([ffi.buffer(sealed, total)])
                aad = bytes(head)
                if header.is_sync:
                    opener.open_in_place(header.seq - 1, sealed, 0, aad=aad)
                else:
                    size = header.offsets_size
                    opener.open_lead(header.seq - 1, sealed, size, aad=aad)
                    opener.open_pages(header.seq - 1, sealed + size + TAG_SIZE,
                                      header.payload_size, aad=aad)
            if header.is_sync:
                with self._cond:
                    self._synced[i] += 1
                    self._cond.notify_all()
                continue
            if opener is not None:
                raw: Any = ffi.buffer(sealed, header.offsets_size)[:]
            else:
                raw = ch.read_exact(header.offsets_size) if header.offsets_size else b""
            normal, zero = decode_offsets(raw, header, ctx)
            if header.payload_size != len(normal) * ps:
                raise MultifdError(f"post-copy receive channel {i}: a payload of "
                                   f"{header.payload_size} bytes for {len(normal)} pages")
            if opener is not None:
                start = header.offsets_size + TAG_SIZE
                payload = memoryview(ffi.buffer(sealed, start + header.payload_size))[start:]
            else:
                payload = memoryview(ch.read_exact(header.payload_size)
                                     if header.payload_size else bytearray())
            self._place(normal, payload, zero)
            with self._cond:
                self._pages += len(normal) + len(zero)


__all__ = ["Handed", "Place", "PlacementReaders"]
