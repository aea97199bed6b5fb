"""The main channel's records (migrate/protocol.py), from exact bytes."""

from __future__ import annotations

import struct

import pytest

from zcmigrate.migrate.protocol import (
    MAIN_MAGIC,
    MAX_PAYLOAD,
    RECORD_HEADER_SIZE,
    Hello,
    Record,
    RecordType,
    auth_mac,
    decode_flush,
    decode_greeting,
    decode_record_header,
    encode_flush,
    encode_greeting,
    encode_record,
)
from zcmigrate.multifd.wire import RemoteProtocolError

UUID = bytes(range(16))


def _hello(**kw: object) -> Hello:
    base = dict(uuid=UUID, channels=2, page_size=4096, image_size=1 << 20, pages_alloc=512,
                block="zcmigrate.ram", zero_copy=True, zero_page_detection=True)
    base.update(kw)
    return Hello(**base)  # type: ignore[arg-type]


def _hello_payload(old: bytes, new: bytes) -> Record:
    return Record(RecordType.HELLO, _hello().encode()[RECORD_HEADER_SIZE:].replace(old, new))


def _record(data: bytes) -> Record:
    rtype, length = decode_record_header(data[:RECORD_HEADER_SIZE])
    assert len(data) == RECORD_HEADER_SIZE + length
    return Record(rtype, data[RECORD_HEADER_SIZE:])


def test_record_header_is_big_endian_magic_version_type_length() -> None:
    data = encode_record(RecordType.END_OF_RAM, b"xy")
    assert data == struct.pack(">IHHI", MAIN_MAGIC, 1, 5, 2) + b"xy"


def test_hello_round_trips_and_yields_the_wire_context() -> None:
    hello = _hello()
    back = Hello.decode(_record(hello.encode()))
    assert back == hello
    ctx = back.context()
    assert (ctx.channels, ctx.page_size, ctx.pages_alloc) == (2, 4096, 512)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (struct.pack(">IHHI", 0x11223344, 1, 2, 0), "bad magic"),
        (struct.pack(">IHHI", MAIN_MAGIC, 2, 2, 0), "version 2"),
        (struct.pack(">IHHI", MAIN_MAGIC, 1, 99, 0), "unknown record type 99"),
        (struct.pack(">IHHI", MAIN_MAGIC, 1, 6, MAX_PAYLOAD + 1), "more than"),
        (struct.pack(">IHHI", MAIN_MAGIC, 1, 6, 0)[:7], "truncated"),
    ],
)
def test_bad_record_headers_are_rejected(header: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_record_header(header)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"not json", "not JSON"),
        (b"[1,2]", "not a JSON object"),
        (b'{"uuid": "00"}', "uuid has 1 bytes"),
        (b'{"uuid": "zz"}', "not hex"),
    ],
)
def test_malformed_hello_is_rejected(payload: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        Hello.decode(Record(RecordType.HELLO, payload))


def test_hello_with_a_bool_for_a_number_is_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="channels"):
        Hello.decode(_hello_payload(b'"channels":2', b'"channels":true'))


def test_hello_with_parameters_out_of_range_is_the_peers_fault() -> None:
    with pytest.raises(RemoteProtocolError, match="HELLO"):
        Hello.decode(_hello_payload(b'"page-size":4096', b'"page-size":4095'))
    with pytest.raises(RemoteProtocolError, match="HELLO"):
        Hello.decode(_hello_payload(b'"channels":2', b'"channels":0'))


def test_greeting_carries_a_32_byte_nonce() -> None:
    nonce = bytes(range(32))
    assert decode_greeting(_record(encode_greeting(nonce))) == nonce
    with pytest.raises(RemoteProtocolError, match="nonce"):
        decode_greeting(Record(RecordType.GREETING, b'{"nonce": "00"}'))


def test_auth_mac_depends_on_key_nonce_and_migration() -> None:
    n = bytes(32)
    a = auth_mac(b"k" * 16, n, UUID)
    assert a != auth_mac(b"j" * 16, n, UUID)
    assert a != auth_mac(b"k" * 16, b"\x01" * 32, UUID)
    assert a != auth_mac(b"k" * 16, n, bytes(16))


def test_flush_record_round_trips_and_rejects_garbage() -> None:
    assert decode_flush(_record(encode_flush(3, final=True))) == (3, True)
    with pytest.raises(RemoteProtocolError):
        decode_flush(Record(RecordType.MULTIFD_FLUSH, b'{"iteration": -1, "final": false}'))
    with pytest.raises(RemoteProtocolError):
        decode_flush(Record(RecordType.MULTIFD_FLUSH, b'{"iteration": 1}'))
