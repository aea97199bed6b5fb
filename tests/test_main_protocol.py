"""The main channel's records (migrate/protocol.py), from exact bytes."""

from __future__ import annotations

import dataclasses
import json
import struct

import pytest

from zcmigrate.channel.aead import handshake_mac
from zcmigrate.migrate.protocol import (
    DEVICE_STATE_HARD_MAX,
    DEVICE_STATE_MAX,
    MAIN_MAGIC,
    MAIN_VERSION,
    RECORD_HEADER_SIZE,
    RECORDS,
    DeviceStateRecord,
    EndOfRam,
    Error,
    Greeting,
    Hello,
    HelloAck,
    MultifdFlush,
    PostcopyComplete,
    PostcopyDirty,
    PostcopyEnd,
    PostcopyListen,
    PostcopyMissing,
    Record,
    RecordType,
    Writeback,
    decode_header,
    decode_record,
)
from zcmigrate.multifd.wire import LocalProtocolError, RemoteProtocolError

UUID = bytes(range(16))


def _hello(**kw: object) -> Hello:
    base = dict(uuid=UUID, channels=2, page_size=4096, image_size=1 << 20, pages_alloc=512,
                block="zcmigrate.ram", zero_copy=True, zero_page_detection=True)
    base.update(kw)
    return Hello(**base)  # type: ignore[arg-type]


def _roundtrip(data: bytes) -> Record:
    rtype, length = decode_header(data[:RECORD_HEADER_SIZE])
    assert len(data) == RECORD_HEADER_SIZE + length
    return decode_record(rtype, data[RECORD_HEADER_SIZE:])


def _hello_payload(old: bytes, new: bytes) -> bytes:
    return _hello().encode()[RECORD_HEADER_SIZE:].replace(old, new)


def test_record_header_is_big_endian_magic_version_type_length() -> None:
    data = EndOfRam(3).encode()
    payload = b'{"iteration":3}'
    assert data == struct.pack(">IHHI", MAIN_MAGIC, MAIN_VERSION, 5, len(payload)) + payload


def test_every_record_type_has_one_class_that_round_trips() -> None:
    samples: list[Record] = [Greeting(bytes(range(32))), _hello(), HelloAck(),
                             MultifdFlush(2), EndOfRam(3), DeviceStateRecord(b"\x00\xff"),
                             Error("disk full"), PostcopyListen(4), PostcopyEnd(5),
                             PostcopyDirty(first=0, count=3, bitmap=bytes(8), last=True),
                             PostcopyMissing(first=64, count=70, bitmap=bytes(16),
                                             last=False),
                             PostcopyComplete(requests=1, latency_median_us=2,
                                              latency_p99_us=3, total_time_ms=4)]
    samples += [cls() for cls in RECORDS.values()
                if cls not in {type(s) for s in samples}]  # the records with no fields
    assert {type(s) for s in samples} == set(RECORDS.values())
    for record in samples:
        assert _roundtrip(record.encode()) == record


def test_hello_yields_the_wire_context() -> None:
    ctx = _hello().context()
    assert (ctx.channels, ctx.page_size, ctx.pages_alloc) == (2, 4096, 512)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (struct.pack(">IHHI", 0x11223344, MAIN_VERSION, 2, 0), "bad magic"),
        (struct.pack(">IHHI", MAIN_MAGIC, 99, 2, 0), "version 99"),
        (struct.pack(">IHHI", MAIN_MAGIC, MAIN_VERSION, 99, 0), "unknown record type 99"),
        (struct.pack(">IHHI", MAIN_MAGIC, MAIN_VERSION, 6, DEVICE_STATE_MAX + 1),
         "DEVICE_STATE claims"),
        (struct.pack(">IHHI", MAIN_MAGIC, MAIN_VERSION, 2, 4097), "HELLO claims 4097"),
        (struct.pack(">IHHI", MAIN_MAGIC, MAIN_VERSION, 3, 257), "HELLO_ACK claims"),
        (struct.pack(">IHHI", MAIN_MAGIC, MAIN_VERSION, 6, 0)[:7], "truncated"),
    ],
)
def test_bad_record_headers_are_rejected_before_any_payload_is_read(header: bytes,
                                                                    match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_header(header)


def test_the_device_state_bound_is_the_receivers_to_set() -> None:
    header = struct.pack(">IHHI", MAIN_MAGIC, MAIN_VERSION, 6, 5000)
    assert decode_header(header, device_state_max=5000) == (RecordType.DEVICE_STATE, 5000)
    with pytest.raises(RemoteProtocolError, match="limit of 4999"):
        decode_header(header, device_state_max=4999)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1,2]", "not a JSON object"),
        (b'{"uuid": "00"}', "uuid: 1 bytes"),
        (b'{"uuid": "zz"}', "not hex"),
        (b'{"channels": ' + b"9" * 5000 + b"}", "too long"),
        (_hello_payload(b'"channels":2', b'"channels":' + b"9" * 600), "'channels' is not an "
         "unsigned 64-bit number"),
        (b"[" * 5000 + b"]" * 5000, "nested too deeply|not JSON"),
    ],
)
def test_malformed_hello_is_rejected_in_our_words(payload: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match) as info:
        Hello.from_payload(payload)
    # Never Python's own messages: they name no field and no fix.
    assert "set_int_max_str_digits" not in str(info.value)
    assert "recursion" not in str(info.value)


def test_hello_with_a_bool_for_a_number_is_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="channels"):
        Hello.from_payload(_hello_payload(b'"channels":2', b'"channels":true'))


def test_hello_with_parameters_out_of_range_is_the_peers_fault() -> None:
    with pytest.raises(RemoteProtocolError, match="HELLO"):
        Hello.from_payload(_hello_payload(b'"page-size":4096', b'"page-size":4095'))
    with pytest.raises(RemoteProtocolError, match="HELLO"):
        Hello.from_payload(_hello_payload(b'"channels":2', b'"channels":0'))


def test_greeting_carries_a_32_byte_nonce() -> None:
    with pytest.raises(RemoteProtocolError, match="nonce"):
        Greeting.from_payload(b'{"nonce": "00"}')


def test_a_record_without_fields_refuses_a_payload() -> None:
    with pytest.raises(RemoteProtocolError, match="WRITEBACK: 1 bytes of payload"):
        Writeback.from_payload(b"x")


def test_flush_and_end_of_ram_need_a_positive_iteration() -> None:
    for cls in (MultifdFlush, EndOfRam):
        with pytest.raises(RemoteProtocolError, match="iteration"):
            cls.from_payload(b'{"iteration": 0}')
        with pytest.raises(RemoteProtocolError, match="iteration"):
            cls.from_payload(b"{}")


def test_an_error_record_that_cannot_say_why_is_still_an_error() -> None:
    assert Error.from_payload(b"garbage") == Error("(no message)")
    assert Error.from_payload(json.dumps({"message": "x" * 10000}).encode()).message == "x" * 4096


def test_we_refuse_to_encode_a_record_beyond_its_limit() -> None:
    with pytest.raises(LocalProtocolError, match="DEVICE_STATE"):
        DeviceStateRecord(b"x" * (DEVICE_STATE_HARD_MAX + 1)).encode()


def test_the_hello_mac_covers_every_parameter_and_the_greeting() -> None:
    """handshake_mac over the greeting and the hello's body: any changed field, the
    nonce of either end included, gives another MAC."""
    key = bytes(range(32))
    greeting = Greeting(bytes(32), keyed=True)
    base = _hello(nonce=bytes(range(32)))
    mac = handshake_mac(key, b"hello", greeting.payload(), base.body())
    variants = [_hello(nonce=bytes(range(32)), **{f: v}) for f, v in (
        ("channels", 3), ("page_size", 8192), ("image_size", 2 << 20), ("pages_alloc", 256),
        ("block", "other"), ("zero_copy", False), ("zero_page_detection", False),
        ("encryption", True), ("uuid", bytes(16)))] + [_hello(nonce=bytes(32))]
    for v in variants:
        assert handshake_mac(key, b"hello", greeting.payload(), v.body()) != mac, v
    other_greeting = Greeting(b"\x01" * 32, keyed=True)
    assert handshake_mac(key, b"hello", other_greeting.payload(), base.body()) != mac
    assert handshake_mac(bytes(32), b"hello", greeting.payload(), base.body()) != mac
    # The MAC itself is not part of what it covers, and travels in the payload.
    signed = dataclasses.replace(base, mac=mac)
    assert signed.body() == base.body()
    assert _roundtrip(signed.encode()) == signed
