"""migrate.protocol under hypothesis: every main-channel record type, from bytes a peer
chose.

Whatever arrives (arbitrary bytes, a valid record mutated, JSON that is valid but hostile:
nesting, numbers of hundreds of digits, NaN, floats and booleans for counts, strings
that are not hex), decode_header and decode_record raise nothing but
RemoteProtocolError: never Python's own RecursionError, ValueError, MemoryError,
UnicodeDecodeError or KeyError, whose messages would reach a log or an ERROR record in
words that are not ours. Valid records round-trip, and every record we may send encodes
within its type's limit. Sealed records, as MainChannel.deliver opens them, likewise.

The data channels' init record and packet header have the same properties in
tests/test_wire_properties.py.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from zcmigrate.channel.aead import TAG_LEN, Direction, SessionKeys, shared_key
from zcmigrate.channel.zcsocket import Channel
from zcmigrate.migrate.mainchannel import MainChannel
from zcmigrate.migrate.protocol import (
    DEVICE_STATE_MAX,
    DIRTY_CHUNK_PAGES,
    ERROR_MESSAGE_MAX,
    MAIN_MAGIC,
    MAIN_VERSION,
    NONCE_SIZE,
    RECORD_HEADER_SIZE,
    RECORDS,
    CommitAck,
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
    Role,
    decode_header,
    decode_record,
    encode_header,
)
from zcmigrate.multifd.wire import (
    MAX_CHANNELS,
    MAX_IMAGE_SIZE,
    MAX_PAGE_SIZE,
    MAX_PAGES_ALLOC,
    MIN_PAGE_SIZE,
    RemoteProtocolError,
)

# No explain phase: on Python 3.11 it traces every line, and a failure with long strings
# then takes minutes to report.
SETTINGS = settings(max_examples=200, deadline=None,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
U64 = 2**64
TYPES = list(RecordType)
# Every JSON field name any record reads: hostile objects use them, so that decoding gets
# past "field missing" to the checks of each field's value.
FIELD_NAMES = sorted({"uuid", "channels", "page-size", "image-size", "pages-alloc", "block",
                      "multifd-zerocopy", "zero-page-detection", "nonce", "encryption", "resume",
                      "mac", "version", "key", "iteration", "device-state-sha256", "message",
                      "postcopy-requests", "postcopy-latency-median", "postcopy-latency-p99",
                      "postcopy-total-time"})


# ------------------------------------------------------------------ valid records


def _hex_bytes(size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=size, max_size=size)


@st.composite
def hellos(draw: st.DrawFn) -> Hello:
    page_size = draw(st.sampled_from([1 << k for k in range(MIN_PAGE_SIZE.bit_length() - 1,
                                                            MAX_PAGE_SIZE.bit_length())]))
    pages = draw(st.one_of(st.integers(1, 64), st.integers(1, MAX_IMAGE_SIZE // page_size)))
    block = draw(st.text(st.characters(min_codepoint=1, max_codepoint=127), min_size=1,
                         max_size=63))
    return Hello(uuid=draw(_hex_bytes(16)), channels=draw(st.integers(1, MAX_CHANNELS)),
                 page_size=page_size, image_size=pages * page_size,
                 pages_alloc=draw(st.integers(1, MAX_PAGES_ALLOC)), block=block,
                 zero_copy=draw(st.booleans()), zero_page_detection=draw(st.booleans()),
                 nonce=draw(_hex_bytes(NONCE_SIZE)), encryption=draw(st.booleans()),
                 resume=draw(st.booleans()), mac=draw(st.one_of(st.just(b""), _hex_bytes(32))))


_ITERATION = st.integers(1, U64 - 1)
_U64 = st.integers(0, U64 - 1)


@st.composite
def dirty_lists(draw: st.DrawFn, cls: type[PostcopyDirty] = PostcopyDirty) -> PostcopyDirty:
    # Whole 64-page words from a word boundary; small counts keep the examples cheap,
    # the bound itself is one of them.
    count = draw(st.one_of(st.integers(1, 4096), st.just(DIRTY_CHUNK_PAGES)))
    words = (count + 63) // 64
    return cls(first=64 * draw(st.integers(0, (U64 - 1) // 64 - 1)), count=count,
                         bitmap=draw(_hex_bytes(words * 8)), last=draw(st.booleans()))

# Any record a correct end may send, by type.
VALID: dict[RecordType, st.SearchStrategy[Record]] = {
    RecordType.GREETING: st.builds(Greeting, _hex_bytes(NONCE_SIZE), st.booleans()),
    RecordType.HELLO: hellos(),
    RecordType.HELLO_ACK: st.builds(HelloAck, st.one_of(st.just(b""), _hex_bytes(32))),
    RecordType.MULTIFD_FLUSH: st.builds(MultifdFlush, _ITERATION),
    RecordType.END_OF_RAM: st.builds(EndOfRam, _ITERATION),
    RecordType.DEVICE_STATE: st.builds(DeviceStateRecord, st.binary(max_size=4096)),
    RecordType.COMMIT_ACK: st.builds(CommitAck, _hex_bytes(32)),
    # Any text at all, longer than the bound too: control characters and astral ones
    # escape to 6 and 12 bytes of JSON.
    RecordType.ERROR: st.builds(Error, st.one_of(
        st.text(max_size=200), st.text(min_size=ERROR_MESSAGE_MAX - 100,
                                       max_size=ERROR_MESSAGE_MAX + 100))),
    RecordType.POSTCOPY_LISTEN: st.builds(PostcopyListen, _ITERATION),
    RecordType.POSTCOPY_END: st.builds(PostcopyEnd, _ITERATION),
    RecordType.POSTCOPY_DIRTY: dirty_lists(),
    RecordType.POSTCOPY_MISSING: dirty_lists(PostcopyMissing),
    RecordType.POSTCOPY_COMPLETE: st.builds(PostcopyComplete, _U64, _U64, _U64, _U64),
    **{t: st.just(RECORDS[t]()) for t in (RecordType.CANCEL, RecordType.WRITEBACK,
                                          RecordType.WRITEBACK_DONE, RecordType.KEEPALIVE,
                                          RecordType.RAM_RECEIVED,
                                          RecordType.POSTCOPY_ADVISE,
                                          RecordType.POSTCOPY_READY,
                                          RecordType.POSTCOPY_RUNNING)},
}


def records() -> st.SearchStrategy[Record]:
    return st.one_of(*VALID.values())


def test_every_record_type_has_a_strategy() -> None:
    # A type added without one would go untested.
    assert set(VALID) == set(RecordType)


def split(raw: bytes, device_state_max: int = DEVICE_STATE_MAX) -> Record:
    rtype, length = decode_header(raw[:RECORD_HEADER_SIZE], device_state_max)
    assert length == len(raw) - RECORD_HEADER_SIZE
    return decode_record(rtype, raw[RECORD_HEADER_SIZE:])


@SETTINGS
@given(record=records())
def test_valid_records_round_trip_within_their_limit(record: Record) -> None:
    raw = record.encode()
    assert len(raw) - RECORD_HEADER_SIZE <= record.limit(DEVICE_STATE_MAX)
    back = split(raw)
    if isinstance(record, Error):
        # Cut to ERROR_MESSAGE_MAX characters and, once escaped, to the record's limit;
        # what is left is the message's beginning.
        assert isinstance(back, Error)
        assert record.message.startswith(back.message)
        if len(json.dumps(record.message)) + 20 <= Error.MAX_PAYLOAD \
                and len(record.message) <= ERROR_MESSAGE_MAX:
            assert back == record
    else:
        assert back == record


# ------------------------------------------------------------------ hostile bytes


def only_ours(rtype: RecordType, payload: bytes) -> Record | None:
    """decode_record, which may refuse only in its own words."""
    try:
        return decode_record(rtype, payload)
    except RemoteProtocolError as e:
        assert str(e) and len(str(e)) < 1000, e  # a message for a log, not the payload
        return None


@SETTINGS
@given(rtype=st.sampled_from(TYPES), payload=st.binary(max_size=512))
def test_arbitrary_payloads_of_every_type_raise_only_our_errors(
    rtype: RecordType, payload: bytes
) -> None:
    only_ours(rtype, payload)


@SETTINGS
@given(head=st.one_of(
    st.binary(max_size=2 * RECORD_HEADER_SIZE),
    st.builds(lambda t, n, v: encode_header(RecordType(t), n)[:4] + v.to_bytes(2, "big")
              + t.to_bytes(2, "big") + n.to_bytes(4, "big"),
              st.sampled_from([int(t) for t in TYPES]), st.integers(0, 2**32 - 1),
              st.sampled_from([MAIN_VERSION, MAIN_VERSION - 1, 0, 0xFFFF])),
    st.builds(lambda t, n: MAIN_MAGIC.to_bytes(4, "big") + MAIN_VERSION.to_bytes(2, "big")
              + t.to_bytes(2, "big") + n.to_bytes(4, "big"),
              st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1))),
    device_state_max=st.sampled_from([0, DEVICE_STATE_MAX, 64 << 20]))
def test_record_headers_are_checked_against_their_types_limit(
    head: bytes, device_state_max: int
) -> None:
    try:
        rtype, length = decode_header(head, device_state_max)
    except RemoteProtocolError:
        return
    assert len(head) == RECORD_HEADER_SIZE
    assert length <= RECORDS[rtype].limit(device_state_max)


def json_values() -> st.SearchStrategy[Any]:
    """JSON, with the values a hostile peer would try in a field: huge and negative
    numbers, floats, booleans, strings that are almost hex, and nesting."""
    scalars = st.one_of(
        st.none(), st.booleans(),
        st.integers(-(2**70), 2**70), st.sampled_from([0, 1, U64 - 1, U64, -1, 2**63]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=80), st.sampled_from(["", "00" * 16, "00" * 32, "zz", "0", "\u00e9"]),
    )
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(FIELD_NAMES), inner, max_size=4)), max_leaves=12)


@st.composite
def hostile_json(draw: st.DrawFn) -> bytes:
    """A payload that is valid JSON, or nearly: an object with the records' field names,
    a valid record's payload with a field replaced, or JSON Python's own decoder fails on
    in its own words."""
    kind = draw(st.sampled_from(["object", "replaced", "deep", "digits", "literal"]))
    if kind == "object":
        obj = draw(st.dictionaries(st.sampled_from(FIELD_NAMES), json_values(), max_size=12))
        return json.dumps(obj).encode()
    if kind == "replaced":
        record = draw(records().filter(lambda r: r.payload()[:1] == b"{"))
        obj = json.loads(record.payload())
        obj[draw(st.sampled_from(sorted(obj)))] = draw(json_values())
        return json.dumps(obj).encode()
    if kind == "deep":
        depth = draw(st.integers(500, 5000))
        open_, close = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return (open_ * depth + "1" + close * depth).encode()
    if kind == "digits":
        digits = draw(st.integers(19, 6000))
        name = draw(st.sampled_from(FIELD_NAMES))
        return f'{{"{name}": {"9" * digits}}}'.encode()
    return draw(st.sampled_from([b"NaN", b"-Infinity", b'{"iteration": NaN}',
                                 b'{"iteration": 1e999}', b'{"iteration": 1.0}',
                                 b'"\\ud800"', b'{"message": "\\udfff"}', b"\xef\xbb\xbf{}",
                                 b'{"a": 1, "a": 2}', b"{}" * 3]))


@SETTINGS
@given(rtype=st.sampled_from(TYPES), payload=hostile_json())
def test_hostile_json_of_every_type_raises_only_our_errors(
    rtype: RecordType, payload: bytes
) -> None:
    only_ours(rtype, payload)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid record's bytes, with bytes changed, cut out or put in."""
    raw = bytearray(draw(records()).encode())
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["set", "cut", "insert"]))
        at = draw(st.integers(0, len(raw)))
        if how == "set" and at < len(raw):
            raw[at] = draw(st.integers(0, 255))
        elif how == "cut":
            del raw[at:at + draw(st.integers(1, 8))]
        else:
            raw[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(raw)


def decode_stream(raw: bytes) -> None:
    """What a receiver does with bytes: a header, then as many bytes as it says."""
    rtype, length = decode_header(raw[:RECORD_HEADER_SIZE])
    only_ours(rtype, raw[RECORD_HEADER_SIZE:RECORD_HEADER_SIZE + length])


@SETTINGS
@given(raw=mutated())
def test_mutated_records_raise_only_our_errors(raw: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_stream(raw)


# ------------------------------------------------------------------ sealed

KEY = shared_key(b"the hypothesis key")


def session_keys() -> SessionKeys:
    """One session's keys, as either end derives them (each end its own instance: a
    SessionKeys gives out one sealer per stream)."""
    return SessionKeys(KEY, bytes(NONCE_SIZE), bytes(range(NONCE_SIZE)), bytes(16))


@contextlib.contextmanager
def destination_end() -> Iterator[MainChannel]:
    """A destination's main channel past its handshake, on a real socket pair (deliver
    does not read it), opening what the source seals."""
    a, b = socket.socketpair()
    main = MainChannel(Channel(a), Role.DESTINATION)
    try:
        main.conversation.send(Greeting(bytes(NONCE_SIZE)))
        main.conversation.receive(Hello(uuid=bytes(16), channels=1, page_size=4096,
                                        image_size=4096, pages_alloc=1, block="b",
                                        zero_copy=False, zero_page_detection=False))
        main.conversation.send(HelloAck())
        keys = session_keys()
        main.secure(keys.sealer(Direction.DESTINATION_TO_SOURCE, None),
                    keys.opener(Direction.SOURCE_TO_DESTINATION, None))
        yield main
    finally:
        main.close()
        b.close()


def sealed(payload: bytes, rtype: RecordType) -> bytes:
    """A record as a source holding the key seals it (the first of its stream)."""
    sealer = session_keys().sealer(Direction.SOURCE_TO_DESTINATION, None)
    header = encode_header(rtype, len(payload) + TAG_LEN)
    return header + sealer.seal(payload, aad=header)


@SETTINGS
@given(data=st.data())
def test_sealed_records_hostile_or_changed_raise_only_our_errors(data: st.DataObject) -> None:
    """A key holder's sealed records (of any type, their payload hostile) and anyone's
    edits of them: MainChannel.deliver refuses in its own words."""
    rtype = data.draw(st.sampled_from(TYPES))
    payload = data.draw(st.one_of(hostile_json(), st.binary(max_size=256),
                                  records().map(lambda r: r.payload())))
    raw = bytearray(sealed(payload, rtype))
    if data.draw(st.booleans()):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    head, body = bytes(raw[:RECORD_HEADER_SIZE]), bytes(raw[RECORD_HEADER_SIZE:])
    with destination_end() as main:
        try:
            _, length = main.parse_header(head)
            if length > len(body):
                return  # a record that never ends: the channel's deadline, not decoding
            main.deliver(head, body[:length])
        except RemoteProtocolError as e:
            assert str(e), e


def test_a_sealed_record_opens_and_decodes() -> None:
    # The sealed property above is not vacuous: a sealed record, untouched, is delivered.
    with destination_end() as main:
        raw = sealed(MultifdFlush(1).payload(), RecordType.MULTIFD_FLUSH)
        assert main.deliver(raw[:RECORD_HEADER_SIZE], raw[RECORD_HEADER_SIZE:]) == \
            MultifdFlush(1)
