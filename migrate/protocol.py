"""The main channel's records: greeting, hello, flush, end of RAM, device state, commit, error.

Sans-I/O like multifd/wire.py: bytes in, records out, and the reverse; it never touches
a socket. Every record is a 12-byte big-endian header (magic, version, type, length)
and a payload. docs/protocol.md is the reference. It must not know threads or guests.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import struct
from dataclasses import dataclass
from typing import Any

from zcmigrate.multifd.wire import LocalProtocolError, RemoteProtocolError, WireContext

MAIN_MAGIC = 0x5A434D47  # "ZCMG": a data channel (0x11223344) is never mistaken for it
MAIN_VERSION = 1
RECORD_HEADER = struct.Struct(">IHHI")
RECORD_HEADER_SIZE = RECORD_HEADER.size
# The largest record we accept: the device state is small (a guest's registers), and a
# length field from the network must not make us allocate gigabytes.
MAX_PAYLOAD = 16 << 20
NONCE_SIZE = 32


class RecordType(enum.IntEnum):
    GREETING = 1  # dst -> src: protocol version and an authentication nonce
    HELLO = 2  # src -> dst: migration UUID, parameters, image and page size, auth MAC
    HELLO_ACK = 3  # dst -> src: the destination is ready for the data channels
    MULTIFD_FLUSH = 4  # src -> dst: every data channel has sent SYNC for this iteration
    END_OF_RAM = 5  # src -> dst: no page follows
    DEVICE_STATE = 6  # src -> dst: the paused guest's device state
    COMMIT_ACK = 7  # dst -> src: image and device state are durable
    ERROR = 8  # either way: the sender gives up, with a message
    CANCEL = 9  # src -> dst: the user cancelled; discard everything
    WRITEBACK = 10  # src -> dst: make what you have durable now; the guest still runs
    WRITEBACK_DONE = 11  # dst -> src: done; the commit has only the last pages left


@dataclass(frozen=True, slots=True)
class Record:
    type: RecordType
    payload: bytes

    def json(self) -> dict[str, Any]:
        """The payload as a JSON object; RemoteProtocolError if it is not one."""
        try:
            obj = json.loads(self.payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RemoteProtocolError(f"{self.type.name}: payload is not JSON: {e}") from e
        if not isinstance(obj, dict):
            raise RemoteProtocolError(f"{self.type.name}: payload is not a JSON object")
        return obj


def encode_record(rtype: RecordType, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise LocalProtocolError(f"{rtype.name}: payload of {len(payload)} bytes is too large")
    return RECORD_HEADER.pack(MAIN_MAGIC, MAIN_VERSION, int(rtype), len(payload)) + payload


def encode_json(rtype: RecordType, obj: dict[str, Any]) -> bytes:
    return encode_record(rtype, json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def decode_record_header(data: bytes | bytearray | memoryview) -> tuple[RecordType, int]:
    """Check a record header; return its type and payload length."""
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
    if length > MAX_PAYLOAD:
        raise RemoteProtocolError(
            f"main channel: {kind.name} claims {length} bytes, more than {MAX_PAYLOAD}"
        )
    return kind, length


# ------------------------------------------------------------------ handshake


def auth_mac(key: bytes, nonce: bytes, uuid: bytes) -> str:
    """The source's proof that it holds the shared key, bound to this nonce and migration."""
    return hmac.new(key, b"zcmigrate-auth-v1" + nonce + uuid, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Hello:
    """What the source proposes: the migration's identity and the agreed parameters."""

    uuid: bytes
    channels: int
    page_size: int
    image_size: int
    pages_alloc: int
    block: str
    zero_copy: bool
    zero_page_detection: bool
    auth: str = ""

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
            )
        except LocalProtocolError as e:
            raise RemoteProtocolError(f"HELLO: {e}") from e

    def encode(self) -> bytes:
        return encode_json(
            RecordType.HELLO,
            {
                "uuid": self.uuid.hex(),
                "channels": self.channels,
                "page-size": self.page_size,
                "image-size": self.image_size,
                "pages-alloc": self.pages_alloc,
                "block": self.block,
                "multifd-zerocopy": self.zero_copy,
                "zero-page-detection": self.zero_page_detection,
                "auth": self.auth,
            },
        )

    @classmethod
    def decode(cls, record: Record) -> Hello:
        if record.type is not RecordType.HELLO:
            raise RemoteProtocolError(f"expected HELLO, got {record.type.name}")
        obj = record.json()

        def field(name: str, kind: type) -> Any:
            v = obj.get(name)
            # bool is an int subclass; a JSON true must not pass as a channel count.
            if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                raise RemoteProtocolError(f"HELLO: field {name!r} missing or not {kind.__name__}")
            return v

        try:
            uuid = bytes.fromhex(field("uuid", str))
        except ValueError:
            raise RemoteProtocolError("HELLO: uuid is not hex") from None
        if len(uuid) != 16:
            raise RemoteProtocolError(f"HELLO: uuid has {len(uuid)} bytes, expected 16")
        hello = cls(
            uuid=uuid,
            channels=field("channels", int),
            page_size=field("page-size", int),
            image_size=field("image-size", int),
            pages_alloc=field("pages-alloc", int),
            block=field("block", str),
            zero_copy=field("multifd-zerocopy", bool),
            zero_page_detection=field("zero-page-detection", bool),
            auth=field("auth", str),
        )
        hello.context()  # every parameter in range, or the peer hears why
        return hello


def encode_greeting(nonce: bytes) -> bytes:
    return encode_json(RecordType.GREETING, {"version": MAIN_VERSION, "nonce": nonce.hex()})


def decode_greeting(record: Record) -> bytes:
    if record.type is RecordType.ERROR:
        raise RemoteProtocolError(f"destination refused: {error_message(record)}")
    if record.type is not RecordType.GREETING:
        raise RemoteProtocolError(f"expected GREETING, got {record.type.name}")
    nonce = record.json().get("nonce")
    try:
        raw = bytes.fromhex(nonce) if isinstance(nonce, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != NONCE_SIZE:
        raise RemoteProtocolError("GREETING: nonce missing or not 32 hex-encoded bytes")
    return raw


def encode_error(message: str) -> bytes:
    return encode_json(RecordType.ERROR, {"message": message[:4096]})


def error_message(record: Record) -> str:
    try:
        msg = record.json().get("message")
    except RemoteProtocolError:
        msg = None
    return msg if isinstance(msg, str) else "(no message)"


def encode_flush(iteration: int, final: bool = False) -> bytes:
    return encode_json(RecordType.MULTIFD_FLUSH, {"iteration": iteration, "final": final})


def decode_flush(record: Record) -> tuple[int, bool]:
    obj = record.json()
    it, final = obj.get("iteration"), obj.get("final")
    if not isinstance(it, int) or isinstance(it, bool) or it < 0 or not isinstance(final, bool):
        raise RemoteProtocolError("MULTIFD_FLUSH: iteration or final missing or malformed")
    return it, final
