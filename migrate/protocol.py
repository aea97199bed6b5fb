"""The main channel's records: one frozen class per record type, and their bytes.

Sans-I/O like multifd/wire.py: bytes in, records out, and the reverse; it never touches
a socket. Every record is a 12-byte big-endian header (magic, version, type, length) and
a payload, JSON for all but the device state. Which record may come when is the table in
migrate/conversation.py. docs/protocol.md is the reference. It must not know threads,
guests or the CLI.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from zcmigrate.channel.aead import CIPHERS, DEFAULT_CIPHER
from zcmigrate.multifd.wire import LocalProtocolError, RemoteProtocolError, WireContext

MAIN_MAGIC = 0x5A434D47  # "ZCMG": a data channel (0x11223344) is never mistaken for it
# 4: a sealed data packet is two messages (offsets, then pages), two tags; 5: HELLO names the
# session's cipher, and the session keys are bound to it.
MAIN_VERSION = 5
RECORD_HEADER = struct.Struct(">IHHI")
RECORD_HEADER_SIZE = RECORD_HEADER.size
NONCE_SIZE = 32
MAC_SIZE = 32  # HMAC-SHA256
ERROR_MESSAGE_MAX = 4096
# The device state is small (a guest's registers); its bound is the one size a receiver
# may raise (decode_header's device_state_max), every other record's is fixed here. No
# sender sends more than the hard bound.
DEVICE_STATE_MAX = 1 << 20
DEVICE_STATE_HARD_MAX = 64 << 20


class RecordType(enum.IntEnum):
    GREETING = 1  # dst -> src: protocol version, a fresh nonce, whether it holds a key
    HELLO = 2  # src -> dst: migration UUID, parameters, a fresh nonce, its MAC
    HELLO_ACK = 3  # dst -> src: ready for the data channels, with its own MAC
    MULTIFD_FLUSH = 4  # src -> dst: every data channel has sent SYNC for this iteration
    END_OF_RAM = 5  # src -> dst: every data channel has sent its final SYNC; no page follows
    DEVICE_STATE = 6  # src -> dst: the paused guest's device state
    COMMIT_ACK = 7  # dst -> src: image and device state are durable
    ERROR = 8  # either way: the sender gives up, with a message
    CANCEL = 9  # src -> dst: the user cancelled; discard everything
    WRITEBACK = 10  # src -> dst: make what you have durable now; the guest still runs
    WRITEBACK_DONE = 11  # dst -> src: done; the commit has only the last pages left
    KEEPALIVE = 12  # src -> dst: still here, while no page moves (max-bandwidth pacing)
    RAM_RECEIVED = 13  # dst -> src: every page is in place: send the device state
    # Post-copy (docs/protocol.md, "Post-copy"):
    POSTCOPY_LISTEN = 14  # src -> dst: guest paused, every channel synced: switch to post-copy
    POSTCOPY_DIRTY = 15  # src -> dst: a piece of the bitmap of pages still dirty (binary)
    POSTCOPY_READY = 16  # dst -> src: stale pages punched out, the guest waits for its go
    POSTCOPY_RUNNING = 17  # dst -> src: the guest runs here; push the rest
    POSTCOPY_END = 18  # src -> dst: every channel has sent its last page and SYNC
    POSTCOPY_COMPLETE = 19  # dst -> src: every page arrived; committing (with statistics)
    POSTCOPY_ADVISE = 20  # src -> dst: this migration may switch to post-copy: get ready
    # Post-copy recovery (docs/protocol.md, "Post-copy recovery"):
    POSTCOPY_MISSING = 21  # dst -> src: a piece of the bitmap of pages still missing (binary)


class Role(enum.Enum):
    """Which end of the main channel: every record type is sent by one of them (or both)."""

    SOURCE = "source"
    DESTINATION = "destination"

    @property
    def peer(self) -> Role:
        return Role.DESTINATION if self is Role.SOURCE else Role.SOURCE


BOTH = frozenset(Role)


# ------------------------------------------------------------------ framing


def encode_header(rtype: RecordType, length: int) -> bytes:
    return RECORD_HEADER.pack(MAIN_MAGIC, MAIN_VERSION, int(rtype), length)


def decode_header(data: bytes | bytearray | memoryview,
                  device_state_max: int = DEVICE_STATE_MAX,
                  overhead: int = 0) -> tuple[RecordType, int]:
    """Check a record header; return its type and payload length.

    The length is checked against the record type's own bound before anything is read or
    allocated for it: a peer cannot make us allocate more than a few KiB, or the device
    state's configured bound.
    """
    if len(data) != RECORD_HEADER_SIZE:
        raise RemoteProtocolError(
            f"main channel: truncated record header ({len(data)} of {RECORD_HEADER_SIZE} bytes)"
        )
    magic, version, rtype, length = RECORD_HEADER.unpack(data)
    if magic != MAIN_MAGIC:
        raise RemoteProtocolError(
            f"main channel: bad magic {magic:#010x}, expected {MAIN_MAGIC:#010x}"
        )
    if version != MAIN_VERSION:
        raise RemoteProtocolError(
            f"main channel: version {version} is not supported (this side speaks {MAIN_VERSION})"
        )
    try:
        kind = RecordType(rtype)
    except ValueError:
        raise RemoteProtocolError(f"main channel: unknown record type {rtype}") from None
    # `overhead`: what sealing adds to every payload (the AEAD tag).
    limit = RECORDS[kind].limit(device_state_max) + overhead
    if length > limit:
        raise RemoteProtocolError(
            f"main channel: {kind.name} claims {length} bytes, more than its limit of {limit}"
        )
    return kind, length


def _json_object(what: str, payload: bytes) -> dict[str, Any]:
    """The payload as a JSON object; RemoteProtocolError, in our words, for anything else
    (not UTF-8, not JSON, an integer of thousands of digits, nesting that would overflow
    Python's recursion limit)."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RemoteProtocolError(f"{what}: payload is not UTF-8 ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise RemoteProtocolError(f"{what}: payload is not JSON ({e.msg} at {e.pos})") from None
    except ValueError:
        # int() refuses more than sys.get_int_max_str_digits() digits.
        raise RemoteProtocolError(f"{what}: payload holds a number too long to be one") from None
    except RecursionError:
        raise RemoteProtocolError(f"{what}: payload is nested too deeply") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"{what}: payload is not a JSON object")
    return obj


T = TypeVar("T")


def _field(what: str, obj: dict[str, Any], name: str, kind: type[T]) -> T:
    v = obj.get(name)
    # bool is an int subclass; a JSON true must not pass as a count.
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise RemoteProtocolError(f"{what}: field {name!r} missing or not {kind.__name__}")
    if isinstance(v, int) and not 0 <= v < 1 << 64:
        # Checked here, so no message of ours ever prints a number of 600 digits.
        raise RemoteProtocolError(f"{what}: field {name!r} is not an unsigned 64-bit number")
    return v


def _hex(what: str, text: str, size: int) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise RemoteProtocolError(f"{what}: not hex") from None
    if len(raw) != size:
        raise RemoteProtocolError(f"{what}: {len(raw)} bytes, expected {size}")
    return raw


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# ------------------------------------------------------------------ records


class Record:
    """Common behaviour of the record classes; each sets TYPE, SENDERS and MAX_PAYLOAD."""

    __slots__ = ()
    TYPE: ClassVar[RecordType]
    SENDERS: ClassVar[frozenset[Role]]
    MAX_PAYLOAD: ClassVar[int] = 256

    @classmethod
    def limit(cls, device_state_max: int) -> int:
        return cls.MAX_PAYLOAD

    def payload(self) -> bytes:
        return b""

    @classmethod
    def from_payload(cls, payload: bytes) -> Record:
        if payload:
            raise RemoteProtocolError(f"{cls.TYPE.name}: {len(payload)} bytes of payload, "
                                      "expected none")
        return cls()

    def encode(self) -> bytes:
        """The whole record: header and payload."""
        data = self.payload()
        if len(data) > self.limit(DEVICE_STATE_HARD_MAX):
            raise LocalProtocolError(f"{self.TYPE.name}: payload of {len(data)} bytes is "
                                     "too large")
        return encode_header(self.TYPE, len(data)) + data


@dataclass(frozen=True, slots=True)
class Greeting(Record):
    """The destination's first word: a fresh nonce, and whether it holds a key (a source
    with a key refuses one that does not: it could not prove who it is)."""

    TYPE: ClassVar[RecordType] = RecordType.GREETING
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.DESTINATION})

    nonce: bytes
    keyed: bool = False

    def payload(self) -> bytes:
        return _dumps({"version": MAIN_VERSION, "nonce": self.nonce.hex(), "key": self.keyed})

    @classmethod
    def from_payload(cls, payload: bytes) -> Greeting:
        obj = _json_object("GREETING", payload)
        return cls(nonce=_hex("GREETING: nonce", _field("GREETING", obj, "nonce", str),
                              NONCE_SIZE),
                   keyed=_field("GREETING", obj, "key", bool))


def _mac_field(what: str, obj: dict[str, Any]) -> bytes:
    text = _field(what, obj, "mac", str)
    return _hex(f"{what}: mac", text, MAC_SIZE) if text else b""


@dataclass(frozen=True, slots=True)
class Hello(Record):
    """What the source proposes: the migration's identity and the agreed parameters."""

    TYPE: ClassVar[RecordType] = RecordType.HELLO
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.SOURCE})
    MAX_PAYLOAD: ClassVar[int] = 4096

    uuid: bytes
    channels: int
    page_size: int
    image_size: int
    pages_alloc: int
    block: str
    zero_copy: bool
    zero_page_detection: bool
    nonce: bytes = bytes(NONCE_SIZE)  # the source's fresh contribution to the session
    encryption: bool = False  # seal every data packet (with a key only)
    # The AEAD of the session's keys (channel/aead.py CIPHERS): the source's choice, under
    # the MAC like every field, so no one on the path can swap it.
    cipher: str = DEFAULT_CIPHER
    # A new session of a post-copy that broke (`send --resume`): `uuid` is that
    # migration's, and the destination answers with the pages it still lacks.
    resume: bool = False
    mac: bytes = b""  # HMAC over the greeting and every field above; b"": no key

    def context(self) -> WireContext:
        """The data channels' wire context; LocalProtocolError becomes the peer's fault."""
        try:
            return WireContext(
                uuid=self.uuid,
                channels=self.channels,
                page_size=self.page_size,
                image_size=self.image_size,
                pages_alloc=self.pages_alloc,
                block=self.block,
                sealed=self.encryption,
            )
        except LocalProtocolError as e:
            raise RemoteProtocolError(f"HELLO: {e}") from e

    def _fields(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid.hex(),
            "channels": self.channels,
            "page-size": self.page_size,
            "image-size": self.image_size,
            "pages-alloc": self.pages_alloc,
            "block": self.block,
            "multifd-zerocopy": self.zero_copy,
            "zero-page-detection": self.zero_page_detection,
            "nonce": self.nonce.hex(),
            "encryption": self.encryption,
            "cipher": self.cipher,
            "resume": self.resume,
        }

    def body(self) -> bytes:
        """Every field but the MAC, canonically encoded: what the MAC covers. The
        destination computes it from the values it decoded, so the MAC vouches for the
        parameters as understood, not for bytes it might read otherwise."""
        return _dumps(self._fields())

    def payload(self) -> bytes:
        return _dumps({**self._fields(), "mac": self.mac.hex()})

    @classmethod
    def from_payload(cls, payload: bytes) -> Hello:
        obj = _json_object("HELLO", payload)

        def f(name: str, kind: type[T]) -> T:
            return _field("HELLO", obj, name, kind)

        hello = cls(
            uuid=_hex("HELLO: uuid", f("uuid", str), 16),
            channels=f("channels", int),
            page_size=f("page-size", int),
            image_size=f("image-size", int),
            pages_alloc=f("pages-alloc", int),
            block=f("block", str),
            zero_copy=f("multifd-zerocopy", bool),
            zero_page_detection=f("zero-page-detection", bool),
            nonce=_hex("HELLO: nonce", f("nonce", str), NONCE_SIZE),
            encryption=f("encryption", bool),
            cipher=f("cipher", str),
            resume=f("resume", bool),
            mac=_mac_field("HELLO", obj),
        )
        if hello.cipher not in CIPHERS:
            raise RemoteProtocolError(
                f"HELLO: cipher {hello.cipher[:40]!r} is not one this receiver knows "
                f"({', '.join(CIPHERS)})")
        hello.context()  # every parameter in range, or the peer hears why
        return hello


@dataclass(frozen=True, slots=True)
class HelloAck(Record):
    """The destination accepts; with a key, its MAC over the greeting and the hello
    proves it holds the key too (mutual authentication)."""

    TYPE: ClassVar[RecordType] = RecordType.HELLO_ACK
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.DESTINATION})

    mac: bytes = b""

    def payload(self) -> bytes:
        return _dumps({"mac": self.mac.hex()})

    @classmethod
    def from_payload(cls, payload: bytes) -> HelloAck:
        return cls(mac=_mac_field("HELLO_ACK", _json_object("HELLO_ACK", payload)))


@dataclass(frozen=True, slots=True)
class _IterationRecord(Record):
    iteration: int

    def payload(self) -> bytes:
        return _dumps({"iteration": self.iteration})

    @classmethod
    def from_payload(cls, payload: bytes) -> _IterationRecord:
        name = cls.TYPE.name
        it = _field(name, _json_object(name, payload), "iteration", int)
        if it < 1:
            raise RemoteProtocolError(f"{name}: iteration {it}, expected at least 1")
        return cls(iteration=it)


@dataclass(frozen=True, slots=True)
class MultifdFlush(_IterationRecord):
    """Every data channel has sent the SYNC of precopy iteration `iteration`."""

    TYPE: ClassVar[RecordType] = RecordType.MULTIFD_FLUSH
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.SOURCE})


@dataclass(frozen=True, slots=True)
class EndOfRam(_IterationRecord):
    """Every data channel has sent its final SYNC (iteration `iteration`): the last pages
    are on their way and no page follows them."""

    TYPE: ClassVar[RecordType] = RecordType.END_OF_RAM
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.SOURCE})


@dataclass(frozen=True, slots=True)
class DeviceStateRecord(Record):
    """The paused guest's device state, as opaque bytes (the guest decodes it)."""

    TYPE: ClassVar[RecordType] = RecordType.DEVICE_STATE
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.SOURCE})

    data: bytes

    @classmethod
    def limit(cls, device_state_max: int) -> int:
        return device_state_max

    def payload(self) -> bytes:
        return self.data

    @classmethod
    def from_payload(cls, payload: bytes) -> DeviceStateRecord:
        return cls(data=payload)


@dataclass(frozen=True, slots=True)
class CommitAck(Record):
    """Image and device state are durable. It names the device state it committed (its
    SHA-256), so an acknowledgement of another migration's state cannot pass for ours;
    with a key it is sealed under this session's keys."""

    TYPE: ClassVar[RecordType] = RecordType.COMMIT_ACK
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.DESTINATION})

    device_state_sha256: bytes = bytes(32)

    def payload(self) -> bytes:
        return _dumps({"device-state-sha256": self.device_state_sha256.hex()})

    @classmethod
    def from_payload(cls, payload: bytes) -> CommitAck:
        obj = _json_object("COMMIT_ACK", payload)
        return cls(device_state_sha256=_hex(
            "COMMIT_ACK: device-state-sha256",
            _field("COMMIT_ACK", obj, "device-state-sha256", str), 32))


@dataclass(frozen=True, slots=True)
class Error(Record):
    """The sender gives up; the message says why, for the other end's user."""

    TYPE: ClassVar[RecordType] = RecordType.ERROR
    SENDERS: ClassVar[frozenset[Role]] = BOTH
    MAX_PAYLOAD: ClassVar[int] = 2 * ERROR_MESSAGE_MAX  # JSON escaping may double it

    message: str

    def payload(self) -> bytes:
        # JSON escapes a control or non-ASCII character to 6 bytes (12 beyond the BMP), so
        # ERROR_MESSAGE_MAX characters may not fit MAX_PAYLOAD: cut the message until it
        # does. Refusing to encode would lose the one record that says why we gave up.
        msg = self.message[:ERROR_MESSAGE_MAX]
        while True:
            data = _dumps({"message": msg})
            if len(data) <= self.MAX_PAYLOAD:
                return data
            msg = msg[:len(msg) * self.MAX_PAYLOAD // len(data)]  # shorter every time

    @classmethod
    def from_payload(cls, payload: bytes) -> Error:
        try:
            msg = _json_object("ERROR", payload).get("message")
        except RemoteProtocolError:
            msg = None
        # An error record that cannot say why is still an error: the peer gave up.
        return cls(message=msg[:ERROR_MESSAGE_MAX] if isinstance(msg, str)
                   else "(no message)")


@dataclass(frozen=True, slots=True)
class Cancel(Record):
    TYPE: ClassVar[RecordType] = RecordType.CANCEL
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.SOURCE})


@dataclass(frozen=True, slots=True)
class Writeback(Record):
    TYPE: ClassVar[RecordType] = RecordType.WRITEBACK
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.SOURCE})


@dataclass(frozen=True, slots=True)
class WritebackDone(Record):
    TYPE: ClassVar[RecordType] = RecordType.WRITEBACK_DONE
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.DESTINATION})


@dataclass(frozen=True, slots=True)
class Keepalive(Record):
    """Sent when the source has had nothing to send for a while (a low max-bandwidth), so
    that the destination's deadline measures a dead source, not a patient one."""

    TYPE: ClassVar[RecordType] = RecordType.KEEPALIVE
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.SOURCE})


@dataclass(frozen=True, slots=True)
class RamReceived(Record):
    """The destination has passed the final sync and found every page: the device state
    may leave. Until the source hears it, the device state has not left, so a stalled or
    silent destination lets the source resume its guest within the pause's bound."""

    TYPE: ClassVar[RecordType] = RecordType.RAM_RECEIVED
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.DESTINATION})


# ------------------------------------------------------------------ post-copy

# Pages one POSTCOPY_DIRTY record describes at most: 2 Mi pages (8 GiB of 4 KiB pages) in
# 256 KiB of bitmap, so a record stays small and any image size needs only more records.
DIRTY_CHUNK_PAGES = 1 << 21
_DIRTY_HEAD = struct.Struct(">QQB")  # first page, pages covered, last record (0 or 1)


@dataclass(frozen=True, slots=True)
class PostcopyAdvise(Record):
    """Sent once, right after the handshake, by a source that may switch to post-copy
    (QEMU's postcopy-advise): the destination checks it can serve one and starts the
    guest it will hand the device state to, so that its start is not paid in the
    downtime. A destination that cannot answers ERROR, and precopy never begins."""

    TYPE: ClassVar[RecordType] = RecordType.POSTCOPY_ADVISE
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.SOURCE})


@dataclass(frozen=True, slots=True)
class PostcopyListen(_IterationRecord):
    """The guest is paused and every data channel has sent the SYNC of iteration
    `iteration` after its last precopy page: the destination stops its precopy receive
    there, and the list of pages still dirty follows (POSTCOPY_DIRTY records)."""

    TYPE: ClassVar[RecordType] = RecordType.POSTCOPY_LISTEN
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.SOURCE})


@dataclass(frozen=True, slots=True)
class PostcopyDirty(Record):
    """Pages [first, first + count) of the image, one bit each (LSB first within a
    64-bit little-endian word, as the guest's dirty bitmap): a set bit is a page whose
    precopy version is stale. `last` closes the list. Binary, not JSON: it is large."""

    TYPE: ClassVar[RecordType] = RecordType.POSTCOPY_DIRTY
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.SOURCE})
    MAX_PAYLOAD: ClassVar[int] = _DIRTY_HEAD.size + DIRTY_CHUNK_PAGES // 8

    first: int
    count: int
    bitmap: bytes
    last: bool

    def payload(self) -> bytes:
        return _DIRTY_HEAD.pack(self.first, self.count, int(self.last)) + self.bitmap

    @classmethod
    def from_payload(cls, payload: bytes) -> PostcopyDirty:
        if len(payload) < _DIRTY_HEAD.size:
            raise RemoteProtocolError(f"{cls.TYPE.name}: {len(payload)} bytes, shorter than "
                                      "its header")
        first, count, last = _DIRTY_HEAD.unpack_from(payload)
        bitmap = payload[_DIRTY_HEAD.size:]
        if (last not in (0, 1) or not 0 < count <= DIRTY_CHUNK_PAGES or first % 64
                or len(bitmap) != (count + 63) // 64 * 8):
            raise RemoteProtocolError(
                f"{cls.TYPE.name}: {count} pages from page {first} in {len(bitmap)} bytes "
                f"(last={last}): not whole 64-page words of at most {DIRTY_CHUNK_PAGES} pages")
        return cls(first=first, count=count, bitmap=bitmap, last=bool(last))


@dataclass(frozen=True, slots=True)
class PostcopyMissing(PostcopyDirty):
    """Post-copy recovery: the destination's answer to a resume HELLO, the pages its
    guest still lacks, in POSTCOPY_DIRTY's encoding (a set bit: send this page). The
    source sends exactly these, whatever it remembers: only the destination knows what
    arrived before the break."""

    TYPE: ClassVar[RecordType] = RecordType.POSTCOPY_MISSING
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.DESTINATION})


@dataclass(frozen=True, slots=True)
class PostcopyReady(Record):
    """The destination synced, punched the stale pages out of its image and holds the
    guest's userfaultfd: the device state may come."""

    TYPE: ClassVar[RecordType] = RecordType.POSTCOPY_READY
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.DESTINATION})


@dataclass(frozen=True, slots=True)
class PostcopyRunning(Record):
    """The guest runs on the destination: the downtime ends here."""

    TYPE: ClassVar[RecordType] = RecordType.POSTCOPY_RUNNING
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.DESTINATION})


@dataclass(frozen=True, slots=True)
class PostcopyEnd(_IterationRecord):
    """Every data channel has sent its last background page and a SYNC after it."""

    TYPE: ClassVar[RecordType] = RecordType.POSTCOPY_END
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.SOURCE})


@dataclass(frozen=True, slots=True)
class PostcopyComplete(Record):
    """Every page is in place and the guest agreed (its range is unregistered): the
    destination commits now. Its post-copy statistics ride along, so that the source's
    report holds them too."""

    TYPE: ClassVar[RecordType] = RecordType.POSTCOPY_COMPLETE
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.DESTINATION})
    MAX_PAYLOAD: ClassVar[int] = 1024

    requests: int = 0
    latency_median_us: int = 0
    latency_p99_us: int = 0
    total_time_ms: int = 0

    def payload(self) -> bytes:
        return _dumps({"postcopy-requests": self.requests,
                       "postcopy-latency-median": self.latency_median_us,
                       "postcopy-latency-p99": self.latency_p99_us,
                       "postcopy-total-time": self.total_time_ms})

    @classmethod
    def from_payload(cls, payload: bytes) -> PostcopyComplete:
        obj = _json_object("POSTCOPY_COMPLETE", payload)

        def f(name: str) -> int:
            return _field("POSTCOPY_COMPLETE", obj, name, int)

        return cls(requests=f("postcopy-requests"),
                   latency_median_us=f("postcopy-latency-median"),
                   latency_p99_us=f("postcopy-latency-p99"),
                   total_time_ms=f("postcopy-total-time"))


RECORDS: dict[RecordType, type[Record]] = {
    cls.TYPE: cls
    for cls in (Greeting, Hello, HelloAck, MultifdFlush, EndOfRam, DeviceStateRecord,
                CommitAck, Error, Cancel, Writeback, WritebackDone, Keepalive, RamReceived,
                PostcopyListen, PostcopyDirty, PostcopyReady, PostcopyRunning, PostcopyEnd,
                PostcopyComplete, PostcopyAdvise, PostcopyMissing)
}
if set(RECORDS) != set(RecordType):
    raise ImportError("migrate.protocol: a record type has no class")


def decode_record(rtype: RecordType, payload: bytes) -> Record:
    """The record of type `rtype` from its payload; RemoteProtocolError if malformed."""
    decode: Callable[[bytes], Record] = RECORDS[rtype].from_payload
    return decode(payload)
