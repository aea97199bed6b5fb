"""A TCP proxy in front of a receiver that forwards a migration untouched except for exactly
one whole multifd data packet of one data channel, which it drops (or, with `flip_at`,
forwards with one byte changed).

PacketDropper is the rule, sans I/O: fed a data channel's bytes (64-byte init record, then
packets: a 320-byte header, the offsets and the page data, docs/protocol.md), it returns
what to forward. It drops the Nth packet that carries page data (normal_pages > 0), found
by its header's sizes alone, and it stays in step if packets are later sealed with
something after their documented end (an AEAD tag): the next header is looked for in a
short window after each packet, and what lies between goes with the packet. If the
headers cannot be read at all it drops nothing and says why (`problem`).
DroppingProxy runs it on real sockets, optionally inside a network namespace.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass

from tests.netns import enter_namespace
from zcmigrate.multifd.wire import (
    HEADER_SIZE,
    INIT_SIZE,
    MAX_PAGES_ALLOC,
    MULTIFD_MAGIC,
    MULTIFD_VERSION,
)

# magic, version, flags, pages_alloc, normal_pages, next_packet_size, packet_num, zero_pages:
# the first 36 bytes of a packet header (docs/protocol.md, "Packet header").
_SIZES = struct.Struct(">IIIIIIQI")
_PREFIX = struct.pack(">II", MULTIFD_MAGIC, MULTIFD_VERSION)
_CHANNEL_ID_AT = 24  # in the init record
# Bytes after a record's documented end that may belong to it (a seal's tag and length).
MAX_TRAILER = 256


@dataclass(frozen=True)
class DroppedPacket:
    channel: int
    packet_num: int
    normal_pages: int
    zero_pages: int
    size: int  # bytes dropped: header, offsets, page data and any trailer
    stream_offset: int  # where it began in its channel's stream


class PacketDropper:
    """One connection's client-to-server bytes in, what to forward out.

    flip_at: instead of dropping the packet, forward it with the byte at this index of it
    inverted (from its start: the header is [0, 320); negative: from its end, trailer
    included, so -1 is a sealed packet's last tag byte); `flipped` then says which."""

    def __init__(self, channel: int, nth: int, flip_at: int | None = None) -> None:
        if nth < 1:
            raise ValueError("nth counts from 1")
        self.channel = channel
        self.nth = nth
        self.flip_at = flip_at
        self.flipped: DroppedPacket | None = None
        self.channel_id: int | None = None
        self.data_packets = 0
        self.dropped: DroppedPacket | None = None
        self.problem: str | None = None
        self._mode = "sniff"  # sniff -> init -> packets -> pass
        self._buf = bytearray()
        self._offset = 0  # stream offset of _buf[0]

    @property
    def is_data_channel(self) -> bool:
        return self.channel_id is not None

    def feed(self, data: bytes | memoryview) -> bytes:
        if self._mode == "pass":
            return bytes(data)
        self._buf += data
        out = bytearray()
        while self._step(out):
            pass
        if self._mode == "pass":
            out += self._buf
            self._forget(len(self._buf))
        return bytes(out)

    def finish(self) -> bytes:
        """What is still held when the client closes: forwarded as it is."""
        rest = bytes(self._buf)
        self._forget(len(rest))
        self._mode = "pass"
        return rest

    def _forget(self, n: int) -> None:
        del self._buf[:n]
        self._offset += n

    def _next_header(self, end: int) -> int | None:
        """Where the header after a record ending at `end` starts (at most MAX_TRAILER
        bytes later); None to wait for more bytes; -1 if there is none in the window."""
        limit = end + MAX_TRAILER + len(_PREFIX)
        at = self._buf.find(_PREFIX, end, limit)
        if at >= 0:
            return at
        return None if len(self._buf) < limit else -1

    def _give_up(self, why: str) -> bool:
        self.problem = why
        self._mode = "pass"
        return False

    def _step(self, out: bytearray) -> bool:
        """Take one record off the buffer if it is all there; False to wait for bytes."""
        buf = self._buf
        if self._mode == "sniff":
            if len(buf) < 4:
                return False
            if struct.unpack_from(">I", buf)[0] != MULTIFD_MAGIC:
                self._mode = "pass"  # the main channel: not ours to parse
                return False
            self._mode = "init"
        if self._mode == "init":
            if len(buf) < INIT_SIZE:
                return False
            self.channel_id = buf[_CHANNEL_ID_AT]
            if self.channel_id != self.channel:
                self._mode = "pass"
                return False
            start = self._next_header(INIT_SIZE)
            if start is None:
                return False
            if start < 0:
                return self._give_up(f"channel {self.channel_id}: no packet header within "
                                     f"{MAX_TRAILER} bytes after the init record")
            out += buf[:start]
            self._forget(start)
            self._mode = "packets"
            return True
        if self._mode != "packets" or len(buf) < HEADER_SIZE:
            return False
        (magic, version, flags, pages_alloc, normal, size, packet_num,
         zero) = _SIZES.unpack_from(buf)
        if (magic, version) != (MULTIFD_MAGIC, MULTIFD_VERSION) or flags > 1 or not (
                normal + zero <= pages_alloc <= MAX_PAGES_ALLOC):
            return self._give_up(f"channel {self.channel_id}: no readable packet header at "
                                 f"stream offset {self._offset} (magic 0x{magic:08x}, "
                                 f"flags {flags}, pages {normal}+{zero}/{pages_alloc})")
        end = HEADER_SIZE + 8 * (normal + zero) + size
        nxt = self._next_header(end)
        if nxt is None:
            return False
        if nxt < 0:
            return self._give_up(f"channel {self.channel_id}: packet {packet_num} is not "
                                 f"followed by a header within {MAX_TRAILER} bytes of its "
                                 f"documented end (stream offset {self._offset + end})")
        if normal > 0:
            self.data_packets += 1
        if normal > 0 and self.data_packets == self.nth:
            seen = DroppedPacket(channel=self.channel, packet_num=packet_num,
                                 normal_pages=normal, zero_pages=zero, size=nxt,
                                 stream_offset=self._offset)
            if self.flip_at is None:
                self.dropped = seen
            else:
                packet = bytearray(buf[:nxt])
                packet[self.flip_at] ^= 0xFF
                out += packet
                self.flipped = seen
            self._forget(nxt)
            self._mode = "pass"
            return False
        out += buf[:nxt]
        self._forget(nxt)
        return True


class DroppingProxy:
    """Listens on `listen_host`, forwards every connection to `upstream`, and drops the
    `nth` data packet of data channel `channel` (PacketDropper). With `namespace`, its
    sockets live in that network namespace."""

    def __init__(self, upstream: tuple[str, int], *, channel: int = 0, nth: int = 3,
                 namespace: str | None = None, listen_host: str = "127.0.0.1",
                 flip_at: int | None = None) -> None:
        self.upstream = upstream
        self.channel = channel
        self.nth = nth
        self.flip_at = flip_at
        self.namespace = namespace
        self.listen_host = listen_host
        self.port = 0
        self.connections = 0
        self._droppers: list[PacketDropper] = []
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name="proxy-accept")

    def __enter__(self) -> DroppingProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> int:
        self._acceptor.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self.port

    @property
    def dropped(self) -> DroppedPacket | None:
        with self._lock:
            return next((d.dropped for d in self._droppers if d.dropped), None)

    @property
    def flipped(self) -> DroppedPacket | None:
        with self._lock:
            return next((d.flipped for d in self._droppers if d.flipped), None)

    @property
    def problems(self) -> list[str]:
        with self._lock:
            return [d.problem for d in self._droppers if d.problem]

    def report(self) -> str:
        return (f"proxy: {self.connections} connections, dropped {self.dropped}, "
                f"flipped {self.flipped}, problems {self.problems}")

    def _accept_loop(self) -> None:
        # This thread alone enters the namespace: every socket it creates (the listener,
        # each upstream connection) lives there, the pumps only use them.
        try:
            if self.namespace is not None:
                enter_namespace(self.namespace)
            lst = socket.create_server((self.listen_host, 0))
            self.port = lst.getsockname()[1]
            self._socks.append(lst)
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        while not self._closing.is_set():
            try:
                client, _ = lst.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            dropper = PacketDropper(self.channel, self.nth, self.flip_at)
            with self._lock:
                self.connections += 1
                self._socks += [client, server]
                self._droppers.append(dropper)
            for args in ((client, server, dropper), (server, client, None)):
                t = threading.Thread(target=self._pump, args=args, daemon=True,
                                     name="proxy-pump")
                self._threads.append(t)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket,
              dropper: PacketDropper | None) -> None:
        buf = bytearray(1 << 18)
        view = memoryview(buf)
        try:
            while True:
                n = src.recv_into(buf)
                if not n:
                    break
                data = view[:n] if dropper is None else dropper.feed(view[:n])
                if data:
                    dst.sendall(data)
            if dropper is not None:
                rest = dropper.finish()
                if rest:
                    dst.sendall(rest)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        except OSError:
            # One side reset: pass the reset on, as a router would not, but a dead peer does.
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self._acceptor.join(5)
        for t in self._threads:
            t.join(5)
