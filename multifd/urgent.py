"""Post-copy's urgent channel: the destination asks for the pages its guest waits on, the
source answers with them, on a TCP connection of its own, so that a page a guest thread
waits for never queues behind the background pages of the data channels.

Two record kinds, each a 16-byte big-endian header (magic, kind, count, body length) and
a body: REQUEST (destination -> source) carries page offsets, PAGES (source ->
destination) carries page offsets and the pages themselves. With a session key the body
is sealed (AES-GCM, the header as AAD, the counter implicit, as on the main channel), so
that no one on the path can feed the guest a page or learn one.

It knows pages and records over a channel.Channel, not guests, userfaultfds or the
migration's protocol: what a request means and where a page lands are the caller's. It
opens no socket: the caller hands it a connected, bound Channel.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from zcmigrate.channel.aead import TAG_LEN, Opener, Sealer
from zcmigrate.channel.errors import AeadError
from zcmigrate.channel.zcsocket import Channel
from zcmigrate.multifd.wire import LocalProtocolError, RemoteProtocolError

URGENT_MAGIC: Final = 0x5A435552  # "ZCUR": neither a data channel nor the main channel
REQUEST: Final = 1
PAGES: Final = 2
MAX_PAGES: Final = 64
"""Pages one record names at most: a fault wants one page; a burst of faults is split."""
_HEAD: Final = struct.Struct(">IBxHI4x")  # magic, kind, count, body length
HEAD_SIZE: Final = _HEAD.size
RECORD_TIMEOUT: Final = 10.0
"""A record that has begun must be whole within this: its sender wrote it in one go."""


@dataclass(frozen=True, slots=True)
class UrgentRecord:
    kind: int
    offsets: tuple[int, ...]
    data: bytes
    """PAGES: the pages, in the order of `offsets`; REQUEST: empty."""


class UrgentChannel:
    """One end of the urgent channel. One thread sends and one thread receives at a time
    (each direction has its own sealer or opener); send and recv may run concurrently."""

    def __init__(self, channel: Channel, *, page_size: int, image_size: int,
                 sealer: Sealer | None = None, opener: Opener | None = None) -> None:
        self.channel = channel
        self.page_size = page_size
        self.image_size = image_size
        self._sealer = sealer
        self._opener = opener
        self._send_lock = threading.Lock()

    # ------------------------------------------------------------------ encoding

    def _check_offsets(self, offsets: Sequence[int], error: type[Exception]) -> None:
        if not 0 < len(offsets) <= MAX_PAGES:
            raise error(f"urgent channel: {len(offsets)} pages in one record, expected "
                        f"1..{MAX_PAGES}")
        ps, size = self.page_size, self.image_size
        for off in offsets:
            if off % ps or not 0 <= off <= size - ps:
                raise error(f"urgent channel: offset {off} is not a page inside the "
                            f"{size}-byte image")

    def _send(self, kind: int, offsets: Sequence[int], data: bytes = b"") -> None:
        self._check_offsets(offsets, LocalProtocolError)
        body = struct.pack(f">{len(offsets)}Q", *offsets) + data
        extra = TAG_LEN if self._sealer is not None else 0
        head = _HEAD.pack(URGENT_MAGIC, kind, len(offsets), len(body) + extra)
        with self._send_lock:
            if self._sealer is not None:
                body = self._sealer.seal(body, aad=head)
            self.channel.write_all(head + body)

    def send_request(self, offsets: Sequence[int]) -> None:
        """Ask for the pages at `offsets` (destination)."""
        self._send(REQUEST, offsets)

    def send_pages(self, offsets: Sequence[int], data: bytes) -> None:
        """The pages at `offsets`, `data` holding them in that order (source)."""
        if len(data) != len(offsets) * self.page_size:
            raise LocalProtocolError(f"urgent channel: {len(data)} bytes for "
                                     f"{len(offsets)} pages")
        self._send(PAGES, offsets, data)

    # ------------------------------------------------------------------ decoding

    def recv(self, timeout: float | None) -> UrgentRecord | None:
        """The next record, or None if none starts within `timeout` seconds. A record
        whose header, length or offsets are wrong, or whose seal does not open, is
        RemoteProtocolError: nothing of it reaches the caller."""
        if not self.channel.wait_readable(timeout):
            return None
        head = bytes(self.channel.read_exact(HEAD_SIZE, RECORD_TIMEOUT))
        magic, kind, count, length = _HEAD.unpack(head)
        if magic != URGENT_MAGIC:
            raise RemoteProtocolError(f"urgent channel: bad magic {magic:#010x}")
        if kind not in (REQUEST, PAGES):
            raise RemoteProtocolError(f"urgent channel: unknown record kind {kind}")
        if not 0 < count <= MAX_PAGES:
            raise RemoteProtocolError(f"urgent channel: {count} pages in one record, "
                                      f"expected 1..{MAX_PAGES}")
        want = count * 8 + (count * self.page_size if kind == PAGES else 0)
        extra = TAG_LEN if self._opener is not None else 0
        if length != want + extra:
            # Checked before anything is read for it: the length cannot make us allocate.
            raise RemoteProtocolError(f"urgent channel: a record of {count} pages claims "
                                      f"{length} bytes, expected {want + extra}")
        body = bytes(self.channel.read_exact(length, RECORD_TIMEOUT))
        if self._opener is not None:
            try:
                body = self._opener.open(self._opener.expected_counter, body, aad=head)
            except AeadError as e:
                raise RemoteProtocolError(f"urgent channel: a record failed authentication "
                                          f"({e})") from None
        offsets = struct.unpack_from(f">{count}Q", body)
        self._check_offsets(offsets, RemoteProtocolError)
        return UrgentRecord(kind=kind, offsets=offsets, data=body[count * 8:])

    def shutdown(self) -> None:
        self.channel.shutdown()

    def close(self) -> None:
        self.channel.close()


__all__ = ["HEAD_SIZE", "MAX_PAGES", "PAGES", "REQUEST", "URGENT_MAGIC", "UrgentChannel",
           "UrgentRecord"]
