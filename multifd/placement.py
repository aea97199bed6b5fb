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
trackers, so that a lost or repeated packet is still found); not guests, userfaultfds or
the migration's protocol. It opens no socket.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Final

import structlog

from zcmigrate.channel.errors import ChannelClosed
from zcmigrate.channel.zcsocket import Channel
from zcmigrate.multifd.exiting import Exiting, MultifdError
from zcmigrate.multifd.wire import (
    HEADER_SIZE,
    SequenceTracker,
    WireContext,
    decode_header,
    decode_offsets,
)

_log = structlog.get_logger("zcmigrate.multifd.placement")
_WAIT_SLICE: Final = 0.1

Place = Callable[[Sequence[int], memoryview, Sequence[int]], None]
"""place(normal offsets, their pages in order, zero offsets): put one packet's pages in."""


class PlacementReaders:
    """One thread per data channel, reading packets and handing their pages to `place`
    until stop() (or a failure, set on `exiting`)."""

    def __init__(self, channels: Sequence[tuple[Channel, SequenceTracker]], ctx: WireContext,
                 place: Place, exiting: Exiting) -> None:
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
        for i, (ch, seq) in enumerate(self._channels):
            t = threading.Thread(target=self._run, args=(i, ch, seq),
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
        for ch, _ in self._channels:
            ch.shutdown()
        for t in self._threads:
            t.join(5.0)

    def _run(self, i: int, ch: Channel, seq: SequenceTracker) -> None:
        try:
            self._read(i, ch, seq)
        except BaseException as e:  # a reader thread records every failure, and ends
            if self._stopping and isinstance(e, ChannelClosed):
                return
            error = MultifdError.on_channel("post-copy receive", i, e)
            if self._exiting.set(error, where=f"postcopy-recv-{i}"):
                _log.error("post-copy receive channel failed", error=str(error))
        finally:
            with self._cond:
                self._cond.notify_all()

    def _read(self, i: int, ch: Channel, seq: SequenceTracker) -> None:
        ctx = self._ctx
        ps = ctx.page_size
        while not self._stopping:
            header = decode_header(ch.read_exact(HEADER_SIZE), ctx)
            seq.accept(header)  # a lost, repeated or reordered packet never lands
            if header.is_sync:
                with self._cond:
                    self._synced[i] += 1
                    self._cond.notify_all()
                continue
            raw = ch.read_exact(header.offsets_size) if header.offsets_size else b""
            normal, zero = decode_offsets(raw, header, ctx)
            if header.payload_size != len(normal) * ps:
                raise MultifdError(f"post-copy receive channel {i}: a payload of "
                                   f"{header.payload_size} bytes for {len(normal)} pages")
            payload = ch.read_exact(header.payload_size) if header.payload_size else bytearray()
            self._place(normal, memoryview(payload), zero)
            with self._cond:
                self._pages += len(normal) + len(zero)


__all__ = ["Place", "PlacementReaders"]
