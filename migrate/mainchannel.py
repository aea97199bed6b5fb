"""The main channel's I/O: records from migrate/protocol.py over a channel.Channel.

Framing only; what a record means is the job's business. It knows nothing of pages.
"""

from __future__ import annotations

import select
import socket

from zcmigrate.channel.zcsocket import Channel
from zcmigrate.migrate.protocol import RECORD_HEADER_SIZE, Record, RecordType, decode_record_header
from zcmigrate.multifd.wire import RemoteProtocolError
from zcmigrate.native import lib


class MainChannelTimeout(Exception):
    pass


class MainChannel:
    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def send(self, data: bytes) -> None:
        self.channel.write_all(data)

    def recv(self, timeout: float | None = None) -> Record:
        """The next record; MainChannelTimeout if none starts within `timeout` seconds."""
        if timeout is not None:
            # Wait for the first byte only: a record that has started arrives whole.
            rev = lib.zc_poll(self.channel.fileno(), select.POLLIN, max(0, int(timeout * 1000)))
            if rev == 0:
                raise MainChannelTimeout(f"no record within {timeout:g} s")
        head = self.channel.read_exact(RECORD_HEADER_SIZE)
        rtype, length = decode_record_header(head)
        payload = bytes(self.channel.read_exact(length)) if length else b""
        return Record(rtype, payload)

    def expect(self, *types: RecordType, timeout: float | None = None) -> Record:
        rec = self.recv(timeout)
        if rec.type not in types and rec.type not in (RecordType.ERROR, RecordType.CANCEL):
            names = " or ".join(t.name for t in types)
            raise RemoteProtocolError(f"main channel: expected {names}, got {rec.type.name}")
        return rec

    def peer_closed(self) -> bool:
        """Whether the peer has closed the connection (a look, not a read)."""
        try:
            return self.channel.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def shutdown(self) -> None:
        self.channel.shutdown()

    def close(self) -> None:
        self.channel.close()

    @property
    def closed(self) -> bool:
        return self.channel.is_shut_down

