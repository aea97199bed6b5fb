"""The fault suite's packet-dropping rule (tests/dropping_proxy.py) on exact bytes: it drops
one whole data packet of one channel (or changes one byte of it), forwards everything else
untouched, stays in step when packets carry a trailer (a sealed packet's tag), and says so
when it cannot read them."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from tests.dropping_proxy import MAX_TRAILER, DroppingProxy, PacketDropper
from zcmigrate.multifd.wire import WireContext, encode_init, encode_packet, encode_sync

CTX = WireContext(uuid=bytes(range(16)), channels=2, page_size=4096, image_size=64 << 20,
                  pages_alloc=16)


def stream(channel: int, trailer: int = 0) -> tuple[bytes, list[bytes]]:
    """A data channel's bytes: init record, then data, zero-only and sync packets; and the
    packets one by one (each with `trailer` bytes of stand-in tag after it)."""
    tag = b"\xee" * trailer
    packets = []
    packets_since_sync = pages_since_sync = 0
    for num in range(8):
        seq = num + 1  # the channel's sequence number, 1 for its first packet
        if num == 2:
            pkt = encode_packet(CTX, packet_num=num, seq=seq, normal=(), zero=[4096 * num])
            packets_since_sync, pages_since_sync = packets_since_sync + 1, pages_since_sync + 1
        elif num == 5:
            pkt = encode_sync(CTX, num, seq, packets=packets_since_sync, pages=pages_since_sync)
            packets_since_sync = pages_since_sync = 0
        else:
            offsets = [4096 * (16 * num + i) for i in range(3)]
            pkt = encode_packet(CTX, packet_num=num, seq=seq,
                                normal=offsets) + os.urandom(3 * 4096)
            packets_since_sync, pages_since_sync = packets_since_sync + 1, pages_since_sync + 3
        packets.append(pkt + tag)
    return encode_init(CTX, channel) + tag + b"".join(packets), packets


def run(dropper: PacketDropper, data: bytes, chunk: int) -> bytes:
    out = b"".join(dropper.feed(data[i:i + chunk]) for i in range(0, len(data), chunk))
    return out + dropper.finish()


@pytest.mark.parametrize("chunk", [1, 7, 320, 5000, 1 << 20])
@pytest.mark.parametrize("trailer", [0, 16])
def test_the_nth_data_packet_of_the_channel_is_dropped_whole(chunk: int, trailer: int) -> None:
    data, packets = stream(0, trailer)
    d = PacketDropper(channel=0, nth=3)
    out = run(d, data, chunk)
    # Data packets are 0, 1, 3, 4, 6, 7: the third is packet 3.
    assert d.dropped is not None and d.problem is None
    assert d.dropped.packet_num == 3 and d.dropped.normal_pages == 3
    assert d.dropped.size == len(packets[3])
    assert out == data.replace(packets[3], b"")


@pytest.mark.parametrize("chunk", [1, 320, 1 << 20])
@pytest.mark.parametrize("flip_at", [31, 320, -1])
def test_with_flip_at_the_nth_data_packet_passes_with_one_byte_inverted(
        chunk: int, flip_at: int) -> None:
    data, packets = stream(0, trailer=16)
    d = PacketDropper(channel=0, nth=3, flip_at=flip_at)
    out = run(d, data, chunk)
    assert d.dropped is None and d.problem is None
    assert d.flipped is not None and d.flipped.packet_num == 3
    changed = bytearray(packets[3])
    changed[flip_at] ^= 0xFF
    assert out == data.replace(packets[3], bytes(changed))


def test_other_channels_and_the_main_channel_pass_untouched() -> None:
    data, _ = stream(1)
    d = PacketDropper(channel=0, nth=1)
    assert run(d, data, 999) == data and d.dropped is None and d.channel_id == 1
    main = b"ZCMG" + os.urandom(5000)
    d = PacketDropper(channel=0, nth=1)
    assert run(d, main, 100) == main and not d.is_data_channel


def test_unreadable_headers_drop_nothing_and_say_why() -> None:
    init = encode_init(CTX, 0)
    sealed = init + os.urandom(64 << 10)  # what fully sealed headers would look like
    d = PacketDropper(channel=0, nth=1)
    assert run(d, sealed, 4096) == sealed
    assert d.dropped is None and d.problem is not None and "no packet header" in d.problem
    data, _ = stream(0, trailer=MAX_TRAILER + 8)
    d = PacketDropper(channel=0, nth=1)
    assert run(d, data, 4096) == data and d.dropped is None and d.problem


def test_the_proxy_forwards_both_ways_and_drops_on_real_sockets() -> None:
    data, packets = stream(0)
    upstream = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = upstream.accept()
        conn.sendall(b"hello")
        chunks = []
        while chunk := conn.recv(1 << 16):
            chunks.append(chunk)
        got.append(b"".join(chunks))
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with DroppingProxy(upstream.getsockname()[:2], channel=0, nth=1) as proxy:
        c = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        assert c.recv(5) == b"hello"
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        t.join(10)
        c.close()
        assert proxy.dropped is not None and proxy.dropped.packet_num == 0
    upstream.close()
    assert got == [data.replace(packets[0], b"")]
