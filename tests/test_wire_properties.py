"""multifd.wire under hypothesis: no input lets a receiver write outside the image, and no
packet lost, repeated or reordered on a channel goes unnoticed.

The decoders must turn any bytes into either a checked packet or a RemoteProtocolError, and
every offset they hand back must name a whole page inside the image.
"""

from __future__ import annotations

import contextlib
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.packet_factory import MAGIC, ChannelStream, PacketFactory
from zcmigrate.multifd.wire import (
    HEADER_SIZE,
    MAX_IMAGE_SIZE,
    InitTracker,
    Packet,
    RemoteProtocolError,
    SequenceTracker,
    WireContext,
    decode_header,
    decode_init,
    decode_packet,
    encode_init,
    encode_packet,
)

U64 = 2**64
U32 = 2**32
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def contexts(draw: st.DrawFn) -> WireContext:
    page_size = draw(st.sampled_from([512, 4096, 65536]))
    # Small images put the edges close together; huge ones reach the top of the u64 range.
    pages = draw(st.one_of(st.integers(1, 64), st.integers(1, MAX_IMAGE_SIZE // page_size)))
    return WireContext(
        uuid=draw(st.binary(min_size=16, max_size=16)),
        channels=draw(st.integers(1, 255)),
        page_size=page_size,
        image_size=pages * page_size,
        pages_alloc=draw(st.integers(1, 8)),
    )


def offsets(ctx: WireContext) -> st.SearchStrategy[int]:
    ps, size = ctx.page_size, ctx.image_size
    edges = [
        0,
        1,
        ps - 1,
        ps,
        size - ps,
        size - ps + 1,
        size - 1,
        size,
        size + ps,
        2**63 - ps,
        2**63,
        U64 - ps,
        U64 - 1,
    ]
    return st.one_of(
        st.sampled_from([e for e in edges if 0 <= e < U64]),
        st.integers(0, size // ps - 1).map(lambda page: page * ps),
        st.integers(0, U64 - 1),
    )


def valid_offsets(ctx: WireContext) -> st.SearchStrategy[int]:
    last_page = ctx.image_size // ctx.page_size - 1
    return st.one_of(st.sampled_from([0, last_page]), st.integers(0, last_page)).map(
        lambda page: page * ctx.page_size
    )


def u32_near(value: int) -> st.SearchStrategy[int]:
    """A wrong value for a u32 field: a neighbour of `value`, an extreme, or anything."""
    value = min(value, U32 - 1)
    return st.one_of(
        st.sampled_from([max(value - 1, 0), min(value + 1, U32 - 1), 0, U32 - 1]),
        st.integers(0, U32 - 1),
    )


WRONG = (
    "flags",
    "pages_alloc",
    "normal_pages",
    "zero_pages",
    "next_packet_size",
    "count",
    "payload",
    "seq",
    "sync_counts",
)


def assert_stays_inside_the_image(packet: Packet, ctx: WireContext) -> None:
    for off in [*packet.normal, *packet.zero]:
        assert off >= 0 and off + ctx.page_size <= ctx.image_size and off % ctx.page_size == 0
    assert len(packet.normal) == packet.header.normal_pages
    assert len(packet.zero) == packet.header.zero_pages
    assert len(packet.normal) + len(packet.zero) <= ctx.pages_alloc
    assert len(packet.payload) == len(packet.normal) * ctx.page_size
    assert not (packet.header.is_sync and (packet.normal or packet.zero))
    assert packet.header.seq >= 1
    if not packet.header.is_sync:
        assert packet.header.sync_packets == packet.header.sync_pages == 0


@SETTINGS
@given(data=st.data(), ctx=contexts())
def test_no_header_and_offsets_let_a_receiver_write_outside_the_image(
    data: st.DataObject, ctx: WireContext
) -> None:
    # A valid packet with a few things wrong: fields, offsets (edges, misaligned, up to
    # 2**64 - 1) or both, so that many examples get as far as the offset check.
    normal = data.draw(st.lists(valid_offsets(ctx), max_size=ctx.pages_alloc))
    zero = data.draw(st.lists(valid_offsets(ctx), max_size=ctx.pages_alloc - len(normal)))
    for _ in range(data.draw(st.integers(0, 3))):
        target = data.draw(st.sampled_from([normal, zero]))
        if target:
            target[data.draw(st.integers(0, len(target) - 1))] = data.draw(offsets(ctx))
    wrong = data.draw(st.sets(st.sampled_from(WRONG), max_size=2))
    if "count" in wrong:
        zero += data.draw(st.lists(offsets(ctx), min_size=ctx.pages_alloc + 1 - len(normal)))
    fields: dict[str, Any] = {"packet_num": data.draw(st.integers(0, U64 - 1)),
                              "seq": data.draw(st.integers(1, U64 - 1))}
    if "flags" in wrong:
        fields["flags"] = data.draw(st.one_of(st.just(1), st.integers(0, U32 - 1)))
    else:
        fields["sync"] = not normal and not zero and data.draw(st.booleans())
    if "seq" in wrong:
        fields["seq"] = 0
    if "sync_counts" in wrong or fields.get("sync"):
        # Wrong on a data packet, any u64 on a SYNC (which count is right is the channel's
        # business, not the decoder's).
        fields["sync_packets"] = data.draw(st.integers(0, U64 - 1))
        fields["sync_pages"] = data.draw(st.integers(0, U64 - 1))
    if "pages_alloc" in wrong:
        fields["pages_alloc"] = data.draw(u32_near(ctx.pages_alloc))
    for name, count in (("normal_pages", len(normal)), ("zero_pages", len(zero))):
        if name in wrong:
            fields[name] = data.draw(u32_near(count))
    if "next_packet_size" in wrong:
        fields["next_packet_size"] = data.draw(u32_near(len(normal) * ctx.page_size))
    if "payload" in wrong:
        pages = data.draw(st.sampled_from([0, len(normal) + 1, max(len(normal) - 1, 0)]))
        fields["payload"] = bytes(pages * ctx.page_size + data.draw(st.integers(0, 9)))
    raw = PacketFactory(ctx).build_packet(normal=normal, zero=zero, **fields)
    try:
        packet = decode_packet(raw, ctx)
    except RemoteProtocolError:
        return
    assert_stays_inside_the_image(packet, ctx)


@SETTINGS
@given(data=st.data(), ctx=contexts())
def test_offsets_are_accepted_exactly_when_every_page_is_inside_the_image(
    data: st.DataObject, ctx: WireContext
) -> None:
    # Cross-checks the fast whole-buffer offset check against the obvious per-offset rule.
    count = data.draw(st.integers(0, ctx.pages_alloc))
    mixed = data.draw(st.lists(offsets(ctx), min_size=count, max_size=count))
    split = data.draw(st.integers(0, count))
    normal, zero = mixed[:split], mixed[split:]
    raw = PacketFactory(ctx).build_packet(normal=normal, zero=zero)
    valid = all(off % ctx.page_size == 0 and off + ctx.page_size <= ctx.image_size for off in mixed)
    try:
        packet = decode_packet(raw, ctx)
    except RemoteProtocolError as exc:
        assert not valid, exc
        assert "offset" in str(exc)
        return
    assert valid
    assert packet.normal.tolist() == normal and packet.zero.tolist() == zero


@settings(max_examples=300, deadline=None)
@given(ctx=contexts(), blob=st.binary(max_size=2 * HEADER_SIZE))
def test_random_bytes_raise_nothing_but_remote_protocol_error(
    ctx: WireContext, blob: bytes
) -> None:
    prefixed = MAGIC.to_bytes(4, "big") + (1).to_bytes(4, "big") + blob
    for data in (blob, prefixed):
        for decode in (decode_packet, decode_init, decode_header):
            with contextlib.suppress(RemoteProtocolError):
                decode(data, ctx)


@SETTINGS
@given(data=st.data(), ctx=contexts())
def test_mutated_packets_raise_nothing_but_remote_protocol_error(
    data: st.DataObject, ctx: WireContext
) -> None:
    normal = data.draw(st.lists(valid_offsets(ctx), max_size=min(ctx.pages_alloc, 2)))
    zero = data.draw(st.lists(valid_offsets(ctx), max_size=ctx.pages_alloc - len(normal)))
    raw = bytearray(PacketFactory(ctx).build_packet(normal=normal, zero=zero))
    # Mutate framing, not page data; the offsets and packet_num half the time, since a
    # random header byte mostly just breaks the magic or the block name.
    end = HEADER_SIZE + 8 * (len(normal) + len(zero))
    where = st.integers(0, end - 1)
    if end > HEADER_SIZE:
        where = st.one_of(where, st.integers(24, 63), st.integers(HEADER_SIZE, end - 1))
    else:
        where = st.one_of(where, st.integers(24, 63))  # packet_num, seq, the SYNC counts
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(where)] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(raw) + 16))
        raw = raw[:cut] + bytes(max(0, cut - len(raw)))
    mutated = bytes(raw)
    try:
        packet = decode_packet(mutated, ctx)
    except RemoteProtocolError:
        return
    assert_stays_inside_the_image(packet, ctx)


@SETTINGS
@given(data=st.data(), ctx=contexts())
def test_mutated_init_records_raise_nothing_but_remote_protocol_error(
    data: st.DataObject, ctx: WireContext
) -> None:
    raw = bytearray(encode_init(ctx, data.draw(st.integers(0, ctx.channels - 1))))
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    tracker = InitTracker(ctx)
    try:
        record = tracker.accept(raw)
    except RemoteProtocolError:
        return
    assert record.uuid == ctx.uuid and 0 <= record.channel_id < ctx.channels
    assert tracker.seen == {record.channel_id}


@SETTINGS
@given(data=st.data(), ctx=contexts())
def test_encode_decode_round_trip(data: st.DataObject, ctx: WireContext) -> None:
    sync = data.draw(st.booleans())
    packet_num = data.draw(st.integers(0, U64 - 1))
    seq = data.draw(st.integers(1, U64 - 1))
    counts = {"sync_packets": 0, "sync_pages": 0}
    if sync:
        counts = {name: data.draw(st.integers(0, U64 - 1)) for name in counts}
    normal: list[int] = []
    zero: list[int] = []
    if not sync:
        normal = data.draw(st.lists(valid_offsets(ctx), max_size=min(ctx.pages_alloc, 3)))
        zero = data.draw(st.lists(valid_offsets(ctx), max_size=ctx.pages_alloc - len(normal)))
    factory = PacketFactory(ctx)
    head = encode_packet(ctx, packet_num=packet_num, seq=seq, normal=normal, zero=zero,
                         sync=sync, **counts)
    expected = factory.build_packet(normal=normal, zero=zero, sync=sync, packet_num=packet_num,
                                    seq=seq, **counts)
    payload = factory.page_data(len(normal))
    assert head + payload == expected
    packet = decode_packet(head + payload, ctx)
    assert packet.header.is_sync == sync and packet.header.packet_num == packet_num
    assert packet.header.seq == seq
    assert (packet.header.sync_packets, packet.header.sync_pages) == tuple(counts.values())
    assert packet.normal.tolist() == normal and packet.zero.tolist() == zero
    assert packet.payload == payload
    channel_id = data.draw(st.integers(0, ctx.channels - 1))
    assert decode_init(encode_init(ctx, channel_id), ctx).channel_id == channel_id


@st.composite
def channel_streams(draw: st.DrawFn, ctx: WireContext) -> list[bytes]:
    """A correct channel's packets, data and SYNC mixed, ending with a SYNC as a source's
    channel does before it closes (or before the final sync is over)."""
    stream = ChannelStream(PacketFactory(ctx))
    packets = []
    for kind in draw(st.lists(st.sampled_from(["data", "zero", "empty", "sync"]), max_size=12)):
        if kind == "sync":
            packets.append(stream.sync())
            continue
        n = 0 if kind == "empty" else draw(st.integers(1, ctx.pages_alloc))
        pages = draw(st.lists(valid_offsets(ctx), min_size=n, max_size=n))
        split = draw(st.integers(0, n)) if kind == "data" else 0
        packets.append(stream.data(normal=pages[:split], zero=pages[split:]))
    packets.append(stream.sync())
    return packets


def run_tracker(packets: list[bytes], ctx: WireContext) -> None:
    tracker = SequenceTracker(0)
    for raw in packets:
        tracker.accept(decode_header(raw[:HEADER_SIZE], ctx))


@SETTINGS
@given(data=st.data(), ctx=contexts())
def test_a_correct_channel_never_trips_the_tracker(data: st.DataObject, ctx: WireContext) -> None:
    run_tracker(data.draw(channel_streams(ctx)), ctx)


@SETTINGS
@given(data=st.data(), ctx=contexts())
def test_no_packet_lost_repeated_or_swapped_on_a_channel_goes_unnoticed(
    data: st.DataObject, ctx: WireContext
) -> None:
    packets = data.draw(channel_streams(ctx))
    i = data.draw(st.integers(0, len(packets) - 1))
    how = data.draw(st.sampled_from(["drop", "repeat", "swap"]))
    if how == "drop":
        del packets[i]
    elif how == "repeat":
        packets.insert(i, packets[i])
    else:
        if len(packets) < 2:
            return
        i = min(i, len(packets) - 2)
        packets[i], packets[i + 1] = packets[i + 1], packets[i]
    try:
        run_tracker(packets, ctx)
    except RemoteProtocolError as exc:
        assert "seq" in str(exc) or "counts" in str(exc)
        return
    # A lost final SYNC can only show as a channel that ends before it: the receiver pool's
    # barrier and completeness check, not the tracker, see that.
    assert how == "drop" and i == len(packets)
