"""multifd.wire: round trips, the encoder against independently built bytes, every rejection."""

from __future__ import annotations

import dataclasses
import struct
from array import array
from typing import Any

import pytest

from tests.packet_factory import ChannelStream, PacketFactory
from zcmigrate.multifd.wire import (
    BLOCK_NAME_SIZE,
    FLAG_SYNC,
    HEADER_SIZE,
    INIT_SIZE,
    MULTIFD_MAGIC,
    MULTIFD_VERSION,
    InitRecord,
    InitTracker,
    LocalProtocolError,
    PacketHeader,
    ProtocolError,
    RemoteProtocolError,
    SequenceTracker,
    WireContext,
    decode_header,
    decode_init,
    decode_offsets,
    decode_packet,
    encode_init,
    encode_packet,
    encode_sync,
)

UUID = bytes.fromhex("0123456789abcdef0123456789abcdef")
PAGE = 4096
PAGES = 64
IMAGE = PAGES * PAGE
LAST = IMAGE - PAGE
CTX = WireContext(uuid=UUID, channels=4, page_size=PAGE, image_size=IMAGE, pages_alloc=8)
F = PacketFactory(CTX)


def header_of(packet: bytes) -> PacketHeader:
    return decode_header(packet[:HEADER_SIZE], CTX)


# --- constants and sizes -------------------------------------------------------------------


def test_constants_follow_qemu_multifd() -> None:
    assert (MULTIFD_MAGIC, MULTIFD_VERSION, FLAG_SYNC) == (0x11223344, 2, 1)
    assert (INIT_SIZE, HEADER_SIZE, BLOCK_NAME_SIZE) == (64, 320, 256)


def test_init_record_is_64_bytes_and_header_320() -> None:
    assert len(encode_init(CTX, 0)) == INIT_SIZE
    assert len(encode_sync(CTX, 0, 1, packets=0, pages=0)) == HEADER_SIZE
    assert len(encode_packet(CTX, packet_num=0, seq=1, normal=[0, PAGE])) == HEADER_SIZE + 16


def test_local_and_remote_errors_are_protocol_errors() -> None:
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)


# --- the encoder against the factory ---------------------------------------------------------


@pytest.mark.parametrize("channel_id", [0, 1, 3])
def test_encode_init_matches_factory(channel_id: int) -> None:
    assert encode_init(CTX, channel_id) == F.build_init(channel_id=channel_id)


def test_encode_packet_matches_factory_without_payload() -> None:
    normal, zero = [0, LAST, 5 * PAGE], [PAGE, 7 * PAGE]
    expected = F.build_packet(normal=normal, zero=zero, packet_num=2**64 - 1, seq=2**64 - 1,
                              payload=b"")
    got = encode_packet(CTX, packet_num=2**64 - 1, seq=2**64 - 1, normal=normal, zero=zero)
    assert got == expected


def test_encode_packet_with_only_zero_pages_matches_factory() -> None:
    expected = F.build_packet(zero=[3 * PAGE], packet_num=9, seq=4, payload=b"")
    assert encode_packet(CTX, packet_num=9, seq=4, normal=[], zero=[3 * PAGE]) == expected


def test_encode_sync_matches_factory() -> None:
    expected = F.build_packet(sync=True, packet_num=77, seq=12, sync_packets=11,
                              sync_pages=2**64 - 1)
    assert encode_sync(CTX, 77, 12, packets=11, pages=2**64 - 1) == expected
    assert encode_packet(CTX, packet_num=77, seq=12, normal=(), sync=True, sync_packets=11,
                         sync_pages=2**64 - 1) == expected


def test_the_new_fields_sit_where_qemu_keeps_three_reserved_u64() -> None:
    header = encode_sync(CTX, 0, 0x0102030405060708, packets=0x1112131415161718,
                         pages=0x2122232425262728)
    assert header[36:40] == bytes(4)  # QEMU's reserved u32 stays reserved
    assert header[40:48] == bytes(range(1, 9))
    assert header[48:56] == bytes(range(0x11, 0x19))
    assert header[56:64] == bytes(range(0x21, 0x29))


def test_encode_packet_with_custom_block_name_matches_factory() -> None:
    ctx = dataclasses.replace(CTX, block="pc.ram")
    expected = PacketFactory(ctx).build_packet(normal=[PAGE], payload=b"")
    assert encode_packet(ctx, packet_num=0, seq=1, normal=[PAGE]) == expected


def test_encode_packet_accepts_arrays_and_leaves_them_untouched() -> None:
    normal, zero = array("Q", [PAGE, 2 * PAGE]), array("Q", [0])
    got = encode_packet(CTX, packet_num=1, seq=1, normal=normal, zero=zero)
    assert got == F.build_packet(normal=[PAGE, 2 * PAGE], zero=[0], packet_num=1, payload=b"")
    assert normal == array("Q", [PAGE, 2 * PAGE]) and zero == array("Q", [0])


def test_encode_packet_accepts_other_integer_arrays() -> None:
    got = encode_packet(CTX, packet_num=1, seq=1, normal=array("q", [PAGE]),
                        zero=array("L", [0]))
    assert got == F.build_packet(normal=[PAGE], zero=[0], packet_num=1, payload=b"")


# --- round trips -----------------------------------------------------------------------------


def test_init_round_trip() -> None:
    for channel_id in range(CTX.channels):
        assert decode_init(encode_init(CTX, channel_id), CTX) == InitRecord(UUID, channel_id)


def test_packet_round_trip_with_normal_and_zero_pages() -> None:
    normal, zero = [LAST, 0, 9 * PAGE], [PAGE, 2 * PAGE]
    payload = F.page_data(len(normal))
    data = encode_packet(CTX, packet_num=42, seq=7, normal=normal, zero=zero) + payload
    packet = decode_packet(data, CTX)
    assert packet.header == PacketHeader(
        flags=0,
        pages_alloc=8,
        normal_pages=3,
        next_packet_size=3 * PAGE,
        packet_num=42,
        zero_pages=2,
        seq=7,
        sync_packets=0,
        sync_pages=0,
        block="zcmigrate.ram",
    )
    assert packet.normal == array("Q", normal) and packet.zero == array("Q", zero)
    assert bytes(packet.payload) == payload
    assert not packet.header.is_sync and packet.header.pages == 5
    assert packet.header.offsets_size == 40 and packet.header.payload_size == 3 * PAGE


def test_sync_packet_round_trip() -> None:
    packet = decode_packet(encode_sync(CTX, 5, 9, packets=8, pages=300), CTX)
    assert packet.header.is_sync and packet.header.packet_num == 5
    assert (packet.header.seq, packet.header.sync_packets, packet.header.sync_pages) == (9, 8, 300)
    assert len(packet.normal) == len(packet.zero) == len(packet.payload) == 0


def test_full_packet_round_trip() -> None:
    normal = [i * PAGE for i in range(5)]
    zero = [(PAGES - 1 - i) * PAGE for i in range(3)]
    data = encode_packet(CTX, packet_num=0, seq=1, normal=normal, zero=zero) + F.page_data(5)
    packet = decode_packet(data, CTX)
    assert list(packet.normal) == normal and list(packet.zero) == zero


def test_empty_non_sync_packet_is_accepted() -> None:
    packet = decode_packet(encode_packet(CTX, packet_num=3, seq=1, normal=[]), CTX)
    assert not packet.header.is_sync and packet.header.offsets_size == 0


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_decoders_accept_any_bytes_like(wrap: Any) -> None:
    data = F.build_packet(normal=[PAGE], zero=[0])
    assert decode_packet(wrap(data), CTX).normal == array("Q", [PAGE])
    assert decode_init(wrap(F.build_init(channel_id=2)), CTX).channel_id == 2


def test_decoded_payload_is_a_view_of_the_input() -> None:
    data = bytearray(F.build_packet(normal=[PAGE]))
    packet = decode_packet(data, CTX)
    data[-1] ^= 0xFF
    assert packet.payload[-1] == data[-1]


def test_decode_offsets_returns_host_order_arrays() -> None:
    packet = F.build_packet(normal=[PAGE, 3 * PAGE], zero=[LAST])
    header = header_of(packet)
    normal, zero = decode_offsets(packet[HEADER_SIZE : HEADER_SIZE + 24], header, CTX)
    assert (normal.typecode, normal.tolist(), zero.tolist()) == ("Q", [PAGE, 3 * PAGE], [LAST])


# --- init record rejections ------------------------------------------------------------------


def test_init_bad_magic_is_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="init record: bad magic 0xdeadbeef"):
        decode_init(F.build_init(magic=0xDEADBEEF), CTX)


def test_init_bad_version_is_rejected() -> None:
    for version in (1, 3):
        with pytest.raises(RemoteProtocolError,
                           match=f"init record: bad version {version}, expected 2"):
            decode_init(F.build_init(version=version), CTX)


def test_init_wrong_uuid_is_rejected() -> None:
    with pytest.raises(
        RemoteProtocolError, match=r"init record: uuid 00000000-.*expected 01234567"
    ):
        decode_init(F.build_init(uuid=bytes(16)), CTX)


@pytest.mark.parametrize("channel_id", [4, 5, 255])
def test_init_channel_id_at_or_above_channel_count_is_rejected(channel_id: int) -> None:
    with pytest.raises(RemoteProtocolError, match=f"channel id {channel_id}, expected 0..3"):
        decode_init(F.build_init(channel_id=channel_id), CTX)


@pytest.mark.parametrize("index", range(7))
def test_init_nonzero_reserved_byte_is_rejected(index: int) -> None:
    reserved = bytearray(7)
    reserved[index] = 0x80
    with pytest.raises(RemoteProtocolError, match=f"reserved byte at offset {25 + index} = 0x80"):
        decode_init(F.build_init(reserved=bytes(reserved)), CTX)


def test_init_carries_the_binding_mac_in_its_last_32_bytes() -> None:
    mac = bytes(range(32))
    record = decode_init(F.build_init(channel_id=2, mac=mac), CTX)
    assert record.mac == mac and record.channel_id == 2
    assert encode_init(CTX, 2, mac) == F.build_init(channel_id=2, mac=mac)


@pytest.mark.parametrize("length", [0, 1, 32, 63])
def test_truncated_init_is_rejected(length: int) -> None:
    with pytest.raises(RemoteProtocolError, match=f"init record: truncated, {length} bytes"):
        decode_init(F.build_init()[:length], CTX)


def test_init_with_trailing_bytes_is_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="init record: 65 bytes, expected 64"):
        decode_init(F.build_init() + b"\0", CTX)


# --- init tracker ----------------------------------------------------------------------------


def test_tracker_completes_when_every_channel_has_sent_its_init() -> None:
    tracker = InitTracker(CTX)
    for channel_id in (2, 0, 3):
        assert tracker.accept(F.build_init(channel_id=channel_id)).channel_id == channel_id
        assert not tracker.complete
    tracker.accept(F.build_init(channel_id=1))
    assert tracker.complete and tracker.seen == frozenset(range(4))


def test_tracker_rejects_channel_id_seen_twice() -> None:
    tracker = InitTracker(CTX)
    tracker.accept(F.build_init(channel_id=1))
    with pytest.raises(RemoteProtocolError, match="channel id 1 seen twice"):
        tracker.accept(F.build_init(channel_id=1))
    assert tracker.seen == frozenset({1})


def test_tracker_does_not_count_a_rejected_init() -> None:
    tracker = InitTracker(CTX)
    with pytest.raises(RemoteProtocolError, match="bad version"):
        tracker.accept(F.build_init(channel_id=0, version=9))
    assert tracker.seen == frozenset()
    tracker.accept(F.build_init(channel_id=0))


def test_tracker_seen_is_a_snapshot() -> None:
    tracker = InitTracker(CTX)
    before = tracker.seen
    tracker.accept(F.build_init(channel_id=0))
    assert before == frozenset() and tracker.seen == frozenset({0})


# --- packet header rejections ----------------------------------------------------------------


def test_header_bad_magic_is_rejected() -> None:
    with pytest.raises(
        RemoteProtocolError, match="packet header: bad magic 0xdeadbeef, expected 0x11223344"
    ):
        decode_packet(F.build_packet(magic=0xDEADBEEF), CTX)


def test_header_bad_version_is_rejected() -> None:
    for version in (0, 1, 3):  # 1: a sender without seq and the SYNC counts
        with pytest.raises(RemoteProtocolError,
                           match=f"packet header: bad version {version}, expected 2"):
            decode_packet(F.build_packet(version=version), CTX)


@pytest.mark.parametrize("flags", [0x2, 0x3, 0x100, 0x80000000, 0xFFFFFFFF])
def test_header_unknown_flags_are_rejected(flags: int) -> None:
    with pytest.raises(RemoteProtocolError, match=f"unknown flags 0x{flags & ~1:x}"):
        decode_packet(F.build_packet(flags=flags), CTX)


@pytest.mark.parametrize("pages_alloc", [0, 7, 9, 2**32 - 1])
def test_header_pages_alloc_other_than_negotiated_is_rejected(pages_alloc: int) -> None:
    with pytest.raises(RemoteProtocolError, match=f"pages_alloc {pages_alloc}, expected 8"):
        decode_packet(F.build_packet(pages_alloc=pages_alloc), CTX)


@pytest.mark.parametrize(("normal", "zero"), [(9, 0), (0, 9), (5, 4), (2**32 - 1, 2**32 - 1)])
def test_header_more_pages_than_pages_alloc_is_rejected(normal: int, zero: int) -> None:
    header = F.build_header(normal_pages=normal, zero_pages=zero, next_packet_size=0)
    with pytest.raises(RemoteProtocolError, match=f"= {normal + zero}, expected at most"):
        decode_header(header, CTX)


@pytest.mark.parametrize("size", [0, PAGE - 1, PAGE + 1, 2 * PAGE, 2**32 - 1])
def test_header_next_packet_size_other_than_pages_times_page_size_is_rejected(size: int) -> None:
    with pytest.raises(RemoteProtocolError, match=f"next_packet_size {size}, expected 4096"):
        decode_header(F.build_header(normal_pages=1, next_packet_size=size), CTX)


@pytest.mark.parametrize(("normal", "zero"), [([PAGE], []), ([], [PAGE]), ([0], [PAGE])])
def test_sync_packet_with_pages_is_rejected(normal: list[int], zero: list[int]) -> None:
    with pytest.raises(RemoteProtocolError, match="SYNC packet with normal_pages"):
        decode_packet(F.build_packet(normal=normal, zero=zero, sync=True), CTX)


def test_header_nonzero_reserved_u32_is_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="reserved u32 at offset 36 = 0x1, expected 0"):
        decode_packet(F.build_packet(reserved=1), CTX)


@pytest.mark.parametrize("sync", [False, True])
def test_header_seq_zero_is_rejected(sync: bool) -> None:
    with pytest.raises(RemoteProtocolError, match="packet header: seq 0, expected at least 1"):
        decode_packet(F.build_packet(normal=[] if sync else [PAGE], sync=sync, seq=0), CTX)


@pytest.mark.parametrize("seq", [1, 2, 2**63, 2**64 - 1])
def test_header_any_other_seq_is_accepted_by_the_decoder(seq: int) -> None:
    # Which seq is right is the channel's business (SequenceTracker), not one header's.
    assert decode_packet(F.build_packet(normal=[PAGE], seq=seq), CTX).header.seq == seq


@pytest.mark.parametrize(("packets", "pages"), [(1, 0), (0, 1), (3, 24), (2**64 - 1, 2**64 - 1)])
def test_data_packet_with_sync_counts_is_rejected(packets: int, pages: int) -> None:
    with pytest.raises(
        RemoteProtocolError,
        match=f"data packet with sync_packets {packets} and sync_pages {pages}, expected 0 and 0",
    ):
        decode_packet(F.build_packet(normal=[PAGE], sync_packets=packets, sync_pages=pages),
                      CTX)


def test_an_empty_data_packet_with_sync_counts_is_rejected_too() -> None:
    with pytest.raises(RemoteProtocolError, match="data packet with sync_packets 1"):
        decode_packet(F.build_packet(sync_packets=1), CTX)


@pytest.mark.parametrize(("packets", "pages"), [(0, 0), (5, 0), (0, 5), (2**64 - 1, 2**64 - 1)])
def test_sync_packet_counts_are_decoded_as_sent(packets: int, pages: int) -> None:
    header = decode_packet(
        F.build_packet(sync=True, seq=3, sync_packets=packets, sync_pages=pages), CTX
    ).header
    assert (header.seq, header.sync_packets, header.sync_pages) == (3, packets, pages)


@pytest.mark.parametrize(
    "block_raw",
    [
        b"pc.ram".ljust(256, b"\0"),
        b"zcmigrate.ra".ljust(256, b"\0"),
        b"zcmigrate.ram2".ljust(256, b"\0"),
        b"zcmigrate.ram\0junk".ljust(256, b"\0"),
        b"zcmigrate.ram".ljust(256, b" "),
        bytes(256),
        b"\xff" * 256,
    ],
)
def test_header_wrong_block_name_is_rejected(block_raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match=r"block name .*, expected 'zcmigrate.ram'"):
        decode_packet(F.build_packet(block_raw=block_raw), CTX)


@pytest.mark.parametrize("length", [0, 4, 64, HEADER_SIZE - 1])
def test_truncated_header_is_rejected(length: int) -> None:
    data = F.build_packet()[:length]
    with pytest.raises(RemoteProtocolError, match=f"packet header: truncated, {length} bytes"):
        decode_packet(data, CTX)
    with pytest.raises(RemoteProtocolError, match="packet header: truncated"):
        decode_header(data, CTX)


def test_decode_header_wants_exactly_the_header() -> None:
    with pytest.raises(RemoteProtocolError, match="packet header: 321 bytes, expected 320"):
        decode_header(F.build_header() + b"\0", CTX)


# --- offsets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [1, 512, PAGE - 1, PAGE + 1, LAST + 8, 2**63 + 1])
def test_offsets_not_page_aligned_are_rejected(offset: int) -> None:
    with pytest.raises(RemoteProtocolError, match=rf"normal offset \[1\] 0x{offset:x}, expected"):
        decode_packet(F.build_packet(normal=[0, offset]), CTX)
    with pytest.raises(RemoteProtocolError, match=rf"zero offset \[0\] 0x{offset:x}, expected"):
        decode_packet(F.build_packet(normal=[0], zero=[offset]), CTX)


def test_offset_of_last_page_is_accepted() -> None:
    packet = decode_packet(F.build_packet(normal=[LAST], zero=[LAST]), CTX)
    assert packet.normal.tolist() == packet.zero.tolist() == [LAST]


@pytest.mark.parametrize(
    "offset", [IMAGE, IMAGE + PAGE, 2**32, 2**63 - PAGE, 2**63, 2**64 - PAGE, 2**64 - 2 * PAGE]
)
def test_offsets_outside_the_image_are_rejected(offset: int) -> None:
    with pytest.raises(RemoteProtocolError, match=rf"normal offset \[0\] 0x{offset:x} outside"):
        decode_packet(F.build_packet(normal=[offset]), CTX)
    with pytest.raises(RemoteProtocolError, match=rf"zero offset \[2\] 0x{offset:x} outside"):
        decode_packet(F.build_packet(zero=[0, LAST, offset]), CTX)


def test_offset_near_two_to_the_64_is_rejected() -> None:
    # 2**64 - 1 is misaligned too; the first failing check names it either way.
    with pytest.raises(RemoteProtocolError, match=r"normal offset \[0\] 0xffffffffffffffff"):
        decode_packet(F.build_packet(normal=[2**64 - 1]), CTX)


def test_bad_offset_is_found_among_good_ones() -> None:
    normal = [0, PAGE, LAST, 2 * PAGE, IMAGE, 3 * PAGE]
    with pytest.raises(RemoteProtocolError, match=r"normal offset \[4\]"):
        decode_packet(F.build_packet(normal=normal), CTX)


def test_offsets_checked_at_the_largest_image() -> None:
    ctx = WireContext(uuid=UUID, channels=1, page_size=65536, image_size=2**63, pages_alloc=4)
    factory = PacketFactory(ctx)
    last = 2**63 - 65536
    packet = decode_packet(factory.build_packet(normal=[last], zero=[0, last]), ctx)
    assert packet.normal.tolist() == [last]
    for bad in (2**63, 2**64 - 65536):
        with pytest.raises(RemoteProtocolError, match="outside the image"):
            decode_packet(factory.build_packet(normal=[last], zero=[bad]), ctx)


@pytest.mark.parametrize("missing", [1, 8, 23])
def test_truncated_offsets_are_rejected(missing: int) -> None:
    data = F.build_packet(normal=[], zero=[0, PAGE, 2 * PAGE])
    with pytest.raises(RemoteProtocolError, match=f"packet offsets: truncated, {24 - missing}"):
        decode_packet(data[: len(data) - missing], CTX)
    header = header_of(data)
    with pytest.raises(RemoteProtocolError, match="packet offsets: truncated"):
        decode_offsets(data[HEADER_SIZE : len(data) - missing], header, CTX)


def test_decode_offsets_wants_exactly_the_offsets() -> None:
    data = F.build_packet(zero=[0])
    with pytest.raises(RemoteProtocolError, match="packet offsets: 16 bytes, expected 8"):
        decode_offsets(data[HEADER_SIZE:] + bytes(8), header_of(data), CTX)


def test_decode_offsets_rejects_a_header_with_more_pages_than_pages_alloc() -> None:
    header = dataclasses.replace(header_of(F.build_packet()), zero_pages=9)
    with pytest.raises(RemoteProtocolError, match="expected at most pages_alloc 8"):
        decode_offsets(bytes(72), header, CTX)


# --- a channel's sequence: every packet accounted for --------------------------------------


def feed(tracker: SequenceTracker, *packets: bytes) -> None:
    for packet in packets:
        tracker.accept(decode_packet(packet, CTX).header)


def test_a_correct_channel_passes_the_tracker() -> None:
    stream = ChannelStream(F, channel_id=2)
    tracker = SequenceTracker(2)
    feed(tracker, stream.sync())  # a SYNC with nothing before it: counts 0 and 0
    feed(tracker, stream.data(normal=[0, PAGE], zero=[LAST]), stream.data(zero=[PAGE]),
         stream.data(), stream.sync())
    feed(tracker, stream.data(normal=[PAGE]), stream.sync(), stream.sync())
    assert tracker.next_seq == 9 == stream.seq + 1


def test_the_sync_counts_are_what_the_stream_built() -> None:
    stream = ChannelStream(F)
    stream.data(normal=[0, PAGE], zero=[LAST])
    stream.data(zero=[PAGE])
    header = decode_packet(stream.sync(), CTX).header
    assert (header.seq, header.sync_packets, header.sync_pages) == (3, 2, 4)


def test_the_first_packet_must_be_seq_1() -> None:
    with pytest.raises(RemoteProtocolError,
                       match=r"seq 2 on channel 1, expected 1 \(1 packet missing\)"):
        feed(SequenceTracker(1), F.build_packet(normal=[0], seq=2))


def test_a_dropped_data_packet_is_a_gap() -> None:
    stream, tracker = ChannelStream(F), SequenceTracker(0)
    feed(tracker, stream.data(normal=[0]))
    stream.data(normal=[PAGE])  # built, counted, never delivered
    stream.data(normal=[2 * PAGE])
    with pytest.raises(
        RemoteProtocolError,
        match=r"packet header: seq 4 on channel 0, expected 2 \(2 packets missing\)",
    ):
        feed(tracker, stream.data(normal=[3 * PAGE]))


def test_a_dropped_sync_packet_is_a_gap() -> None:
    stream, tracker = ChannelStream(F), SequenceTracker(3)
    feed(tracker, stream.data(normal=[0]))
    stream.sync()
    with pytest.raises(RemoteProtocolError, match=r"seq 3 on channel 3, expected 2"):
        feed(tracker, stream.data(normal=[PAGE]))


@pytest.mark.parametrize("again", ["data", "sync"])
def test_a_repeated_packet_is_refused(again: str) -> None:
    stream, tracker = ChannelStream(F), SequenceTracker(0)
    first = stream.data(normal=[0])
    packet = stream.data(normal=[PAGE]) if again == "data" else stream.sync()
    feed(tracker, first, packet)
    with pytest.raises(
        RemoteProtocolError,
        match=r"seq 2 on channel 0, expected 3 \(a packet repeated or out of order\)",
    ):
        feed(tracker, packet)


def test_packets_swapped_on_a_channel_are_refused() -> None:
    stream, tracker = ChannelStream(F), SequenceTracker(0)
    first, second = stream.data(normal=[0]), stream.data(normal=[PAGE])
    with pytest.raises(RemoteProtocolError, match=r"seq 2 on channel 0, expected 1"):
        feed(tracker, second, first)


@pytest.mark.parametrize(
    ("override", "claims"),
    [
        ({"sync_packets": 1}, "1 data packets and 3 pages"),
        ({"sync_packets": 3}, "3 data packets and 3 pages"),
        ({"sync_pages": 2}, "2 data packets and 2 pages"),
        ({"sync_pages": 2**64 - 1}, f"2 data packets and {2**64 - 1} pages"),
        ({"sync_packets": 0, "sync_pages": 0}, "0 data packets and 0 pages"),
    ],
)
def test_a_sync_whose_counts_differ_from_what_arrived_is_refused(
    override: dict[str, int], claims: str
) -> None:
    stream, tracker = ChannelStream(F), SequenceTracker(1)
    feed(tracker, stream.data(normal=[0, PAGE]), stream.data(zero=[LAST]))
    with pytest.raises(
        RemoteProtocolError,
        match=rf"SYNC packet \(seq 3\) on channel 1: the sender counts {claims} since the"
              r" previous SYNC, received 2 packets and 3 pages",
    ):
        feed(tracker, stream.sync(**override))


def test_a_dropped_packet_renumbered_by_a_proxy_is_found_at_the_sync() -> None:
    # A middlebox that drops a packet and renumbers the rest gets past seq, not the counts.
    stream, tracker = ChannelStream(F), SequenceTracker(0)
    feed(tracker, stream.data(normal=[0]))
    stream.data(normal=[PAGE])  # dropped
    with pytest.raises(RemoteProtocolError, match="counts 2 data packets and 2 pages"):
        feed(tracker, stream.sync(seq=2))


def test_the_counts_start_again_after_each_sync() -> None:
    stream, tracker = ChannelStream(F), SequenceTracker(0)
    feed(tracker, stream.data(normal=[0]), stream.sync(), stream.data(zero=[0, PAGE]))
    with pytest.raises(RemoteProtocolError, match="received 1 packets and 2 pages"):
        feed(tracker, stream.sync(sync_packets=2, sync_pages=3))


def test_a_refused_packet_does_not_move_the_tracker() -> None:
    stream, tracker = ChannelStream(F), SequenceTracker(0)
    with pytest.raises(RemoteProtocolError):
        feed(tracker, F.build_packet(normal=[0], seq=5))
    assert tracker.next_seq == 1
    feed(tracker, stream.data(normal=[0]))
    with pytest.raises(RemoteProtocolError):
        feed(tracker, F.build_packet(sync=True, seq=2, sync_packets=7))
    assert tracker.next_seq == 2
    feed(tracker, stream.sync())


# --- payload ---------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", [1, PAGE, 2 * PAGE - 1, 2 * PAGE])
def test_truncated_payload_is_rejected(missing: int) -> None:
    data = F.build_packet(normal=[0, PAGE])
    with pytest.raises(RemoteProtocolError, match="packet payload: truncated"):
        decode_packet(data[: len(data) - missing], CTX)


@pytest.mark.parametrize("extra", [1, 8, PAGE])
def test_trailing_bytes_after_the_payload_are_rejected(extra: int) -> None:
    with pytest.raises(RemoteProtocolError, match=rf"\({extra} trailing bytes\)"):
        decode_packet(F.build_packet(normal=[0, PAGE]) + bytes(extra), CTX)
    with pytest.raises(RemoteProtocolError, match="trailing bytes"):
        decode_packet(encode_sync(CTX, 0, 1, packets=0, pages=0) + bytes(extra), CTX)


# --- LocalProtocolError: we were asked to encode something invalid ---------------------------


def test_encode_init_rejects_channel_id_out_of_range() -> None:
    for channel_id in (-1, 4, 256, True):
        with pytest.raises(LocalProtocolError, match="init record: channel id"):
            encode_init(CTX, channel_id)


def test_encode_packet_rejects_more_pages_than_pages_alloc() -> None:
    with pytest.raises(LocalProtocolError, match=r"5 normal \+ 4 zero pages"):
        encode_packet(CTX, packet_num=0, seq=1, normal=[0] * 5, zero=[PAGE] * 4)


@pytest.mark.parametrize("offset", [1, PAGE - 1, LAST + 1])
def test_encode_packet_rejects_misaligned_offsets(offset: int) -> None:
    with pytest.raises(LocalProtocolError, match=rf"zero offset \[0\] 0x{offset:x}, expected"):
        encode_packet(CTX, packet_num=0, seq=1, normal=[0], zero=[offset])


@pytest.mark.parametrize("offset", [IMAGE, 2**63, 2**64 - PAGE])
def test_encode_packet_rejects_offsets_outside_the_image(offset: int) -> None:
    with pytest.raises(LocalProtocolError, match=r"normal offset \[1\] .* outside the image"):
        encode_packet(CTX, packet_num=0, seq=1, normal=[LAST, offset])


@pytest.mark.parametrize("offset", [-PAGE, 2**64, 2**70, 1.0, "0", None])
def test_encode_packet_rejects_offsets_that_are_not_u64(offset: Any) -> None:
    with pytest.raises(LocalProtocolError, match="offsets must be u64"):
        encode_packet(CTX, packet_num=0, seq=1, normal=[0], zero=[offset])


def test_encode_packet_rejects_sync_with_pages() -> None:
    with pytest.raises(LocalProtocolError, match="SYNC packet with 1 normal and 0 zero pages"):
        encode_packet(CTX, packet_num=0, seq=1, normal=[0], sync=True)
    with pytest.raises(LocalProtocolError, match="SYNC packet with 0 normal and 1 zero pages"):
        encode_packet(CTX, packet_num=0, seq=1, normal=[], zero=[0], sync=True)


@pytest.mark.parametrize("packet_num", [-1, 2**64, False])
def test_encode_packet_rejects_packet_num_outside_u64(packet_num: Any) -> None:
    with pytest.raises(LocalProtocolError, match="packet_num"):
        encode_packet(CTX, packet_num=packet_num, seq=1, normal=[0])
    with pytest.raises(LocalProtocolError, match="packet_num"):
        encode_sync(CTX, packet_num, 1, packets=0, pages=0)


@pytest.mark.parametrize("seq", [0, -1, 2**64, True, 1.0])
def test_encode_packet_rejects_seq_outside_one_to_u64_max(seq: Any) -> None:
    # 0 is never a packet's seq, and a seq past 2**64 - 1 would wrap: neither may be sent.
    with pytest.raises(LocalProtocolError,
                       match=r"packet: seq .*, expected 1\.\.18446744073709551615"):
        encode_packet(CTX, packet_num=0, seq=seq, normal=[0])
    with pytest.raises(LocalProtocolError, match="packet: seq"):
        encode_sync(CTX, 0, seq, packets=0, pages=0)


@pytest.mark.parametrize("count", [-1, 2**64, False, None])
def test_encode_sync_rejects_counts_that_are_not_u64(count: Any) -> None:
    with pytest.raises(LocalProtocolError, match=r"packet: sync_packets .*, expected a u64"):
        encode_sync(CTX, 0, 1, packets=count, pages=0)
    with pytest.raises(LocalProtocolError, match=r"packet: sync_pages .*, expected a u64"):
        encode_sync(CTX, 0, 1, packets=0, pages=count)


def test_encode_packet_rejects_sync_counts_on_a_data_packet() -> None:
    with pytest.raises(LocalProtocolError, match="sync_packets 1 on a data packet, expected 0"):
        encode_packet(CTX, packet_num=0, seq=1, normal=[0], sync_packets=1)
    with pytest.raises(LocalProtocolError, match="sync_pages 2 on a data packet, expected 0"):
        encode_packet(CTX, packet_num=0, seq=1, normal=[0], sync_pages=2)


def test_encode_packet_error_leaves_caller_array_untouched() -> None:
    normal = array("Q", [0, 1])
    with pytest.raises(LocalProtocolError):
        encode_packet(CTX, packet_num=0, seq=1, normal=normal)
    assert normal.tolist() == [0, 1]


GOOD: dict[str, Any] = dict(
    uuid=UUID, channels=4, page_size=PAGE, image_size=IMAGE, pages_alloc=8, block="b"
)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("uuid", b"short"),
        ("uuid", bytes(17)),
        ("uuid", "0123456789abcdef"),
        ("channels", 0),
        ("channels", 256),
        ("channels", True),
        ("page_size", 256),
        ("page_size", 131072),
        ("page_size", 3000),
        ("page_size", 4096.0),
        ("image_size", 0),
        ("image_size", -PAGE),
        ("image_size", IMAGE + 1),
        ("image_size", 2**63 + PAGE),
        ("pages_alloc", 0),
        ("pages_alloc", 1025),
        ("block", ""),
        ("block", "x" * 256),
        ("block", "a\0b"),
        ("block", "r\u00e4m"),
        ("block", b"zcmigrate.ram"),
    ],
)
def test_wire_context_rejects_bad_values(field: str, value: Any) -> None:
    with pytest.raises(LocalProtocolError, match=f"wire context: {field} "):
        WireContext(**{**GOOD, field: value})


def test_wire_context_accepts_the_bounds() -> None:
    WireContext(uuid=UUID, channels=255, page_size=512, image_size=512, pages_alloc=1024)
    WireContext(uuid=UUID, channels=1, page_size=65536, image_size=2**63, pages_alloc=1)
    WireContext(**{**GOOD, "block": "x" * 255})


def test_wire_context_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        CTX.channels = 5  # type: ignore[misc]


def test_factory_and_struct_agree_on_sizes() -> None:
    # Guards the factory itself: the tests above are only as good as its layout.
    assert struct.calcsize(">II16sB7s4Q") == INIT_SIZE
    assert struct.calcsize(">IIIIIIQIIQQQ256s") == HEADER_SIZE
    assert F.build_header(packet_num=0x0102030405060708)[24:32] == bytes(range(1, 9))
    assert F.build_header(seq=0x0102030405060708)[40:48] == bytes(range(1, 9))
    assert F.build_header(sync_packets=0x0102030405060708)[48:56] == bytes(range(1, 9))
    assert F.build_header(sync_pages=0x0102030405060708)[56:64] == bytes(range(1, 9))
