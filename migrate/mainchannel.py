"""The main channel's I/O: the records of migrate/protocol.py over a channel.Channel, each
checked against the conversation table (migrate/conversation.py) in both directions, and
sealed once the handshake has given the session its keys (AES-GCM: the clear header is the
AAD, so neither type nor length can be changed; the counter is implicit, so a record can
be neither replayed nor reordered).

Framing, sealing, deadlines and order only; what a record means is the job's business.
It knows nothing of pages or guests.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from zcmigrate import ZcmigrateError
from zcmigrate.channel.aead import TAG_LEN, Opener, Sealer
from zcmigrate.channel.errors import AeadError, ReadTimeout
from zcmigrate.channel.zcsocket import Channel
from zcmigrate.migrate.conversation import Conversation, Phase
from zcmigrate.migrate.protocol import (
    DEVICE_STATE_MAX,
    RECORD_HEADER_SIZE,
    Error,
    Record,
    RecordType,
    Role,
    decode_header,
    decode_record,
    encode_header,
)
from zcmigrate.multifd.wire import RemoteProtocolError

# A record that has begun to arrive must arrive whole within this: its sender wrote it in
# one go, so only a dead or hostile peer takes longer.
RECORD_TIMEOUT = 10.0
# How often a wait for the next record looks at its abort check (a cancel, a failed pool).
_SLICE = 0.25


class MainChannelTimeout(ZcmigrateError):
    """No record within the time the caller allowed."""


class MainChannel:
    def __init__(self, channel: Channel, role: Role, *,
                 device_state_max: int = DEVICE_STATE_MAX) -> None:
        self.channel = channel
        self.conversation = Conversation(role)
        self._device_state_max = device_state_max
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None

    def secure(self, sealer: Sealer, opener: Opener) -> None:
        """From now on every record is sealed on the way out and opened on the way in."""
        self._sealer, self._opener = sealer, opener

    @property
    def secured(self) -> bool:
        return self._sealer is not None

    @property
    def phase(self) -> Phase:
        return self.conversation.phase

    def send(self, record: Record) -> None:
        """Send `record`; LocalProtocolError (nothing sent) if the table forbids it now."""
        self.conversation.send(record)
        if self._sealer is None:
            self.channel.write_all(record.encode())
            return
        payload = record.payload()
        header = encode_header(record.TYPE, len(payload) + TAG_LEN)
        self.channel.write_all(header + self._sealer.seal(payload, aad=header))

    def recv(self, timeout: float | None = None, *,
             abort: Callable[[], None] | None = None) -> Record:
        """The next record, checked against the table.

        MainChannelTimeout if none starts within `timeout` seconds (None: no limit). While
        waiting, `abort()` is called every quarter second: it raises to end the wait (a
        cancel, a failed data channel). A record that has started must be whole within
        RECORD_TIMEOUT; its length is checked against its type's limit before it is read.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if abort is not None:
                abort()
            wait = _SLICE if abort is not None else None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MainChannelTimeout(f"no record from the {self._peer} within "
                                             f"{timeout:g} s")
                wait = left if wait is None else min(wait, left)
            if self.channel.wait_readable(wait):
                break
        try:
            head = bytes(self.channel.read_exact(RECORD_HEADER_SIZE, RECORD_TIMEOUT))
            _, length = self.parse_header(head)
            payload = (bytes(self.channel.read_exact(length, RECORD_TIMEOUT)) if length
                       else b"")
        except ReadTimeout as e:
            raise RemoteProtocolError(f"main channel: a record from the {self._peer} stalled "
                                      f"half-way ({e})") from None
        return self.deliver(head, payload)

    def parse_header(self, head: bytes) -> tuple[RecordType, int]:
        """The type and payload length of a record header, checked against the type's
        size limit (plus the tag once sealed) before any payload is read."""
        overhead = TAG_LEN if self._opener is not None else 0
        return decode_header(head, self._device_state_max, overhead)

    def deliver(self, head: bytes, payload: bytes) -> Record:
        """The record made of a checked header and its payload: opened if sealed,
        decoded, and passed through the conversation table."""
        rtype, _ = self.parse_header(head)
        if self._opener is not None:
            try:
                payload = self._opener.open(self._opener.expected_counter, payload, aad=head)
            except AeadError as e:
                raise RemoteProtocolError(f"main channel: a {rtype.name} record from the "
                                          f"{self._peer} failed authentication: it was changed "
                                          f"on the way, or sealed under another key ({e})") \
                    from None
        record = decode_record(rtype, payload)
        self.conversation.receive(record)
        return record

    @property
    def _peer(self) -> str:
        return self.conversation.role.peer.value

    def send_error(self, message: str) -> bool:
        """Tell the peer we give up, if the table allows it (never once the commit has
        started) and the channel still works; True if sent. Never raises."""
        if self.closed or not self.conversation.may_send(RecordType.ERROR):
            return False
        with contextlib.suppress(ZcmigrateError, OSError):
            self.send(Error(message))
            return True
        return False

    def peer_closed(self) -> bool:
        return self.channel.peer_closed()

    def shutdown(self) -> None:
        self.channel.shutdown()

    def close(self) -> None:
        self.channel.close()

    @property
    def closed(self) -> bool:
        return self.channel.is_shut_down
