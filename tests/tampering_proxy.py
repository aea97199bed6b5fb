"""A proxy in front of a receiver that forwards a real session and changes it where a test
says: one byte flipped, bytes dropped or bytes injected, at a place named by the protocol
(a main-channel record of some type, in either direction; the first page of a data
channel). It also keeps what passes in clear (GREETING, HELLO, every init record), and lets
a test act where a hostile peer would: before a connection reaches the receiver, and right
before or after a data channel's init record does.

StreamEditor and the locators are sans-I/O (bytes in, bytes out); TamperingProxy runs them
on real sockets. Every place is found from the headers before it, which stay in clear when
records and packets are sealed (the header is the AAD), so nothing here depends on what
follows a payload.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from zcmigrate.migrate.protocol import (
    MAIN_MAGIC,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    Greeting,
    Hello,
    RecordType,
    decode_record,
)
from zcmigrate.multifd.wire import HEADER_SIZE, INIT_SIZE, MULTIFD_MAGIC

_CHANNEL_ID_AT = 24  # in the init record
_COUNTS = struct.Struct(">16xI12xI")  # a packet header's normal_pages (16), zero_pages (32)

Direction = Literal["to-destination", "to-source"]
Step = tuple[Literal["skip", "at", "pass"], int]


@dataclass(frozen=True)
class Edit:
    """What to do at the place found: flip one bit of one byte, drop `count` bytes, or
    inject `data` before the byte that is there."""

    kind: Literal["flip", "drop", "inject"]
    count: int = 1
    data: bytes = b""

    @classmethod
    def flip(cls) -> Edit:
        return cls("flip")

    @classmethod
    def drop(cls, count: int) -> Edit:
        return cls("drop", count=count)

    @classmethod
    def inject(cls, data: bytes) -> Edit:
        return cls("inject", data=data)


class Locator(Protocol):
    """Walks one direction of one connection from a structure boundary: ("skip", n) the
    next n bytes hold no place, ("at", n) the place is n bytes on, ("pass", 0) this stream
    holds none; None: not enough bytes yet to tell."""

    kind: Literal["main", "data"]

    def step(self, buf: bytes) -> Step | None: ...


class RecordLocator:
    """The `nth` main-channel record of type `rtype`: `offset` bytes into its payload
    (sealed: ciphertext, then the tag), or its first header byte with `offset=None`."""

    kind: Literal["main", "data"] = "main"

    def __init__(self, rtype: RecordType, *, offset: int | None = 0, nth: int = 1) -> None:
        self.rtype = rtype
        self.offset = offset
        self.nth = nth
        self.seen = 0

    def step(self, buf: bytes) -> Step | None:
        if len(buf) < RECORD_HEADER_SIZE:
            return None
        magic, _, rtype, length = RECORD_HEADER.unpack_from(buf)
        if magic != MAIN_MAGIC:
            return ("pass", 0)  # lost step, or not a main channel: touch nothing
        if rtype == self.rtype:
            self.seen += 1
            if self.seen == self.nth:
                if self.offset is None:
                    return ("at", 0)
                if self.offset >= length:
                    return ("pass", 0)
                return ("at", RECORD_HEADER_SIZE + self.offset)
        return ("skip", RECORD_HEADER_SIZE + length)


class PageLocator:
    """`offset` bytes into the page data of the first packet of data channel `channel`
    (which must carry pages: a static image's first packet on a channel does), or with
    `header`, `offset` bytes into that packet's header."""

    kind: Literal["main", "data"] = "data"

    def __init__(self, channel: int, offset: int, *, header: bool = False) -> None:
        self.channel = channel
        self.offset = offset
        self.header = header
        self._in_init = True

    def step(self, buf: bytes) -> Step | None:
        if self._in_init:
            if len(buf) < INIT_SIZE:
                return None
            if buf[_CHANNEL_ID_AT] != self.channel:
                return ("pass", 0)
            self._in_init = False
            return ("skip", INIT_SIZE)
        if len(buf) < HEADER_SIZE:
            return None
        if self.header:
            return ("at", self.offset)
        normal, zero = _COUNTS.unpack_from(buf)
        if normal == 0:
            return ("pass", 0)
        return ("at", HEADER_SIZE + 8 * (normal + zero) + self.offset)


class StreamEditor:
    """One direction of one connection: bytes in, the edited bytes out. Everything before
    the place is forwarded as soon as it is known to be before it (a peer waiting for an
    answer is never held up), the edit is made once, and everything after passes."""

    def __init__(self, locator: Locator, edit: Edit) -> None:
        self.locator = locator
        self.edit = edit
        self.applied_at: int | None = None  # stream offset of the edit, once made
        self._buf = bytearray()
        self._offset = 0  # stream offset of _buf[0]
        self._skip = 0
        self._armed = False  # the place is where _skip ends
        self._drop = 0
        self._done = False

    def feed(self, data: bytes | memoryview) -> bytes:
        self._buf += data
        out = bytearray()
        while self._buf:
            if self._drop:
                n = min(self._drop, len(self._buf))
                self._take(n)
                self._drop -= n
                continue
            if self._done:
                out += self._take(len(self._buf))
                continue
            if self._skip:
                n = min(self._skip, len(self._buf))
                out += self._take(n)
                self._skip -= n
                continue
            if self._armed:
                self._apply(out)
                continue
            step = self.locator.step(bytes(self._buf))
            if step is None:
                break
            what, n = step
            if what == "pass":
                self._done = True
            else:
                self._skip = n
                self._armed = what == "at"
        return bytes(out)

    def _take(self, n: int) -> bytes:
        taken = bytes(self._buf[:n])
        del self._buf[:n]
        self._offset += n
        return taken

    def _apply(self, out: bytearray) -> None:
        self._armed = False
        self._done = True
        self.applied_at = self._offset
        if self.edit.kind == "flip":
            out += bytes([self._take(1)[0] ^ 0x01])
        elif self.edit.kind == "drop":
            self._drop = self.edit.count
        else:
            out += self.edit.data


@dataclass(frozen=True)
class Tamper:
    """An edit for the first connection its locator fits (then the proxy forwards
    untouched: a later session through it is a clean one)."""

    direction: Direction
    locator: Locator
    edit: Edit


class _Clear:
    """The first record of a main-channel direction, kept as its bytes."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.record: bytes | None = None

    def feed(self, data: bytes | memoryview) -> None:
        if self.record is not None:
            return
        self.buf += data
        if len(self.buf) >= RECORD_HEADER_SIZE:
            length = RECORD_HEADER.unpack_from(self.buf)[3]
            if len(self.buf) >= RECORD_HEADER_SIZE + length:
                self.record = bytes(self.buf[:RECORD_HEADER_SIZE + length])


def _payload(record: bytes) -> tuple[RecordType, bytes]:
    return RecordType(RECORD_HEADER.unpack_from(record)[2]), record[RECORD_HEADER_SIZE:]


Hook = Callable[[int], None]
InitHook = Callable[[int, bytes], None]


class TamperingProxy:
    """Listens on 127.0.0.1 and forwards every connection to `upstream` (a receiver),
    applying `tamper` to the first connection it fits.

    before_upstream(i): run for the i-th accepted connection (0: the first, a source's
    main channel) before the proxy connects it to the receiver. before_init(id, record)
    and after_init(id, record): run around forwarding a data channel's init record, one
    data channel at a time (the others' init records wait), so that what a hook sends
    reaches the receiver in a known order with the real channels. An exception in a hook
    is kept (`errors`) and re-raised by check().
    """

    def __init__(self, upstream: tuple[str, int], *, tamper: Tamper | None = None,
                 before_upstream: Hook | None = None, before_init: InitHook | None = None,
                 after_init: InitHook | None = None) -> None:
        self.upstream = upstream
        self.tamper = tamper
        self.before_upstream = before_upstream
        self.before_init = before_init
        self.after_init = after_init
        self.connections = 0
        self.inits: list[tuple[int, bytes]] = []  # every data channel's init record
        self.hellos: list[bytes] = []  # every main channel's first record from the source
        self.greetings: list[bytes] = []  # ... and from the receiver
        self.editor: StreamEditor | None = None  # the tamper's, once a connection took it
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._init_lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closing = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name="tamper-accept")

    def __enter__(self) -> TamperingProxy:
        self._acceptor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ what passed

    @property
    def applied_at(self) -> int | None:
        """The stream offset where the edit was made, once it was."""
        with self._lock:
            return None if self.editor is None else self.editor.applied_at

    def session(self, i: int = -1) -> tuple[Greeting, Hello]:
        """The GREETING and HELLO of the i-th main channel that passed (the last: -1)."""
        with self._lock:
            greeting, hello = _payload(self.greetings[i]), _payload(self.hellos[i])
        g, h = decode_record(*greeting), decode_record(*hello)
        assert isinstance(g, Greeting) and isinstance(h, Hello)
        return g, h

    def check(self) -> None:
        """Raise the first error a hook (or a pump) raised."""
        with self._lock:
            if self.errors:
                raise self.errors[0]

    def _take_tamper(self, kind: Literal["main", "data"], direction: Direction,
                     channel: int | None = None) -> StreamEditor | None:
        """The tamper's editor for this connection and direction, if it fits and no other
        connection took it."""
        t = self.tamper
        with self._lock:
            if t is None or self.editor is not None or t.direction != direction \
                    or t.locator.kind != kind:
                return None
            if isinstance(t.locator, PageLocator) and t.locator.channel != channel:
                return None
            self.editor = StreamEditor(t.locator, t.edit)
            return self.editor

    # ------------------------------------------------------------ sockets

    def _accept_loop(self) -> None:
        index = 0
        while not self._closing.is_set():
            try:
                # No deadline: the proxy accepts for as long as it lives; close() shuts the
                # listener down, which ends this accept with an OSError.
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                if self.before_upstream is not None:
                    self.before_upstream(index)
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except BaseException as e:
                with self._lock:
                    self.errors.append(e)
                client.close()
                continue
            index += 1
            with self._lock:
                self.connections += 1
                self._socks += [client, server]
            conn = _Connection(self, server)
            for args in ((client, server, conn.to_destination),
                         (server, client, conn.to_source)):
                t = threading.Thread(target=self._pump, args=args, daemon=True,
                                     name="tamper-pump")
                self._threads.append(t)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket,
              through: Callable[[bytes], bytes]) -> None:
        try:
            while True:
                data = src.recv(1 << 18)
                if not data:
                    break
                out = through(data)
                if out:
                    dst.sendall(out)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        except BaseException as e:
            if not isinstance(e, OSError):
                with self._lock:
                    self.errors.append(e)
            # One side reset or failed: pass it on, as a dead peer would.
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        if self._acceptor.is_alive():
            self._acceptor.join(5)
        for t in self._threads:
            t.join(5)


class _Connection:
    """One proxied connection: its kind (told by the first bytes either way: the receiver
    speaks first, a GREETING on a main channel and a random challenge on a data one), its
    clear first records, its init record and the tamper's editor if it took it."""

    def __init__(self, proxy: TamperingProxy, server: socket.socket) -> None:
        self.proxy = proxy
        self.server = server
        self.kind: Literal["main", "data", "other"] | None = None
        self._lock = threading.Lock()
        self._head: dict[Direction, bytearray] = {"to-destination": bytearray(),
                                                  "to-source": bytearray()}
        self._started: set[Direction] = set()
        self._editors: dict[Direction, StreamEditor | None] = {}
        self._clear: dict[Direction, _Clear] = {"to-destination": _Clear(),
                                                "to-source": _Clear()}
        self._init = bytearray()
        self._init_sent = False

    def to_destination(self, data: bytes) -> bytes:
        return self._through("to-destination", data)

    def to_source(self, data: bytes) -> bytes:
        return self._through("to-source", data)

    def _classify(self, direction: Direction, data: bytes) -> bytes | None:
        """The bytes to go on with once the kind is known; None while it is not."""
        head = self._head[direction]
        head += data
        with self._lock:
            if self.kind is None:
                if len(head) < 4:
                    return None
                magic = struct.unpack_from(">I", head)[0]
                if magic == MAIN_MAGIC:
                    self.kind = "main"
                elif direction == "to-source" or magic == MULTIFD_MAGIC:
                    self.kind = "data"
                else:
                    self.kind = "other"
        rest = bytes(head)
        head.clear()
        return rest

    def _through(self, direction: Direction, data: bytes) -> bytes:
        if direction not in self._started:
            ready = self._classify(direction, data)
            if ready is None:
                return b""
            data = ready
            self._started.add(direction)
            if self.kind == "main":
                self._editors[direction] = self.proxy._take_tamper("main", direction)
            elif self.kind == "data" and direction == "to-source":
                self._editors[direction] = self.proxy._take_tamper("data", direction)
        if self.kind == "main":
            self._keep_clear(direction, data)
        if self.kind == "data" and direction == "to-destination" and not self._init_sent:
            return self._init_record(data)
        return self._edit(direction, data)

    def _edit(self, direction: Direction, data: bytes) -> bytes:
        editor = self._editors.get(direction)
        return data if editor is None else editor.feed(data)

    def _keep_clear(self, direction: Direction, data: bytes) -> None:
        clear = self._clear[direction]
        if clear.record is not None:
            return
        clear.feed(data)
        if clear.record is not None:
            with self.proxy._lock:
                (self.proxy.hellos if direction == "to-destination"
                 else self.proxy.greetings).append(clear.record)

    def _init_record(self, data: bytes) -> bytes:
        """Hold a data channel's first 64 bytes, then forward them between the hooks."""
        self._init += data
        if len(self._init) < INIT_SIZE:
            return b""
        init, rest = bytes(self._init[:INIT_SIZE]), bytes(self._init[INIT_SIZE:])
        self._init_sent = True
        cid = init[_CHANNEL_ID_AT]
        proxy = self.proxy
        self._editors["to-destination"] = proxy._take_tamper("data", "to-destination", cid)
        with proxy._init_lock:
            with proxy._lock:
                proxy.inits.append((cid, init))
            if proxy.before_init is not None:
                proxy.before_init(cid, init)
            # Sent here, under the lock: after_init runs once the receiver has it.
            out = self._edit("to-destination", init)
            if out:
                self.server.sendall(out)
            if proxy.after_init is not None:
                proxy.after_init(cid, init)
        return self._edit("to-destination", rest)
