"""The destination against a hand-played source: exact records over real TCP to a real
receiver process, for the rules a misbehaving or hostile peer must not get around."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import socket
import struct
import termios
import time
from pathlib import Path

import pytest

from tests.migration_procs import Receiver, finish, send, wait_for_event
from tests.packet_factory import ChannelStream, PacketFactory
from zcmigrate.channel.aead import handshake_mac, shared_key
from zcmigrate.migrate.keyfile import keygen
from zcmigrate.migrate.protocol import (
    RECORD_HEADER_SIZE,
    DeviceStateRecord,
    EndOfRam,
    Greeting,
    Hello,
    MultifdFlush,
    Record,
    RecordType,
    decode_header,
    decode_record,
)
from zcmigrate.multifd.wire import CHALLENGE_SIZE, WireContext, encode_init, encode_packet

UUID = bytes(range(16))
PAGE = 4096
SIZE = 64 * PAGE


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def recv_record(s: socket.socket) -> Record:
    rtype, length = decode_header(recv_exact(s, RECORD_HEADER_SIZE))
    return decode_record(rtype, recv_exact(s, length))


def hello(channels: int = 1) -> Hello:
    return Hello(uuid=UUID, channels=channels, page_size=PAGE, image_size=SIZE,
                 pages_alloc=64, block="zcmigrate.ram", zero_copy=False,
                 zero_page_detection=True, nonce=bytes(range(32)))


def ctx(channels: int = 1) -> WireContext:
    return hello(channels).context()


def handshake(port: int, h: Hello | None = None,
              key: bytes | None = None) -> tuple[socket.socket, Record]:
    """Connect, read GREETING, send HELLO (with its MAC under `key`), read the answer."""
    main = socket.create_connection(("127.0.0.1", port), timeout=10)
    greeting = recv_record(main)
    assert isinstance(greeting, Greeting)
    h = h or hello()
    if key is not None:
        h = dataclasses.replace(h, mac=handshake_mac(key, b"hello", greeting.payload(),
                                                     h.body()))
    main.sendall(h.encode())
    return main, recv_record(main)


def assert_nothing_committed(dst: Path) -> None:
    assert not dst.exists() and not Path(f"{dst}.state").exists()
    assert not Path(f"{dst}.incoming").exists()


def stream(channel_id: int = 0) -> ChannelStream:
    """A data channel's packets, numbered and counted as a correct source does."""
    return ChannelStream(PacketFactory(ctx()), channel_id)


def rest_as_zero(*sent: int) -> list[int]:
    """Every page's offset but those in `sent`: sent as zero pages, they complete the image."""
    return [p * PAGE for p in range(SIZE // PAGE) if p * PAGE not in sent]


def test_device_state_before_the_final_sync_is_refused(tmp_path: Path) -> None:
    dst = tmp_path / "dst.img"
    recv = Receiver.start(dst)
    main, ack = handshake(recv.port)
    assert ack.TYPE is RecordType.HELLO_ACK
    data = socket.create_connection(("127.0.0.1", recv.port), timeout=10)
    s = stream()
    data.sendall(s.init())
    data.sendall(s.data(normal=[0], zero=rest_as_zero(0)))
    data.sendall(s.sync())
    main.sendall(MultifdFlush(1).encode())
    # A source that skips the final sync and sends the device state at once:
    main.sendall(DeviceStateRecord(b"{}").encode())
    rec = recv_record(main)
    assert rec.TYPE is RecordType.ERROR
    assert "DEVICE_STATE is out of order in phase precopy" in rec.message  # type: ignore[attr-defined]
    code, _, err = recv.result(timeout=30)
    assert code == 1 and "nothing committed" in err
    assert_nothing_committed(dst)


def test_strangers_on_the_data_port_are_turned_away_and_the_migration_goes_on(
    tmp_path: Path,
) -> None:
    dst = tmp_path / "dst.img"
    recv = Receiver.start(dst)
    main, ack = handshake(recv.port)
    assert ack.TYPE is RecordType.HELLO_ACK
    other = WireContext(uuid=b"\xff" * 16, channels=1, page_size=PAGE, image_size=SIZE,
                        pages_alloc=64)
    strangers = [
        encode_init(other, 0),  # another migration's UUID
        struct.pack(">II", 0xDEADBEEF, 1) + bytes(56),  # not a data channel at all
    ]
    for init in strangers:
        s = socket.create_connection(("127.0.0.1", recv.port), timeout=10)
        s.sendall(init)
        assert len(recv_exact(s, CHALLENGE_SIZE)) == CHALLENGE_SIZE  # every one gets one
        assert s.recv(1) == b"", "the destination kept a stranger's connection"
        s.close()
    data = socket.create_connection(("127.0.0.1", recv.port), timeout=10)
    s = stream()
    data.sendall(s.init())
    # A second channel claiming the same id is a stranger too.
    dup = socket.create_connection(("127.0.0.1", recv.port), timeout=10)
    dup.sendall(encode_init(ctx(), 0))
    page = b"\x07" * PAGE
    data.sendall(s.data(normal=[PAGE * 5], zero=rest_as_zero(PAGE * 5), payload=page))
    data.sendall(s.sync())
    main.sendall(EndOfRam(1).encode())
    assert recv_record(main).TYPE is RecordType.RAM_RECEIVED
    main.sendall(DeviceStateRecord(b'{"kind":"test"}').encode())
    assert recv_record(main).TYPE is RecordType.COMMIT_ACK
    code, _, err = recv.result(timeout=30)
    assert code == 0, err
    image = dst.read_bytes()
    assert image[PAGE * 5:PAGE * 6] == page and image.count(0) == SIZE - PAGE
    assert Path(f"{dst}.state").read_bytes() == b'{"kind":"test"}'
    dup.close()


def test_a_page_offset_outside_the_image_stops_the_migration_without_writing(
    tmp_path: Path,
) -> None:
    dst = tmp_path / "dst.img"
    recv = Receiver.start(dst)
    main, _ = handshake(recv.port)
    data = socket.create_connection(("127.0.0.1", recv.port), timeout=10)
    data.sendall(encode_init(ctx(), 0))
    # Built by hand: the encoder itself refuses offsets outside the image.
    header = bytearray(encode_packet(ctx(), packet_num=1, seq=1, normal=[0]))
    header[320:328] = struct.pack(">Q", SIZE)  # one page past the end
    data.sendall(bytes(header) + b"\x01" * PAGE)
    code, _, err = recv.result(timeout=30)
    assert code == 1 and "outside the image" in err
    assert_nothing_committed(dst)
    main.close()


@pytest.mark.parametrize("source_key", [None, b"the-wrong-key-0123456789"])
def test_a_receiver_with_a_key_refuses_sources_without_it(
    tmp_path: Path, source_key: bytes | None
) -> None:
    key = tmp_path / "key"
    keygen(key)
    dst = tmp_path / "dst.img"
    recv = Receiver.start(dst, "--auth-key-file", str(key))
    wrong = None if source_key is None else shared_key(source_key)
    main, rec = handshake(recv.port, hello(), key=wrong)
    assert rec.TYPE is RecordType.ERROR
    assert "authentication failed" in rec.message  # type: ignore[attr-defined]
    main.close()
    assert_nothing_committed(dst)
    # Refused and logged, not the end of the receiver: the real source that comes next
    # migrates (a one-shot receive keeps listening until a valid migration).
    src = tmp_path / "src.img"
    src.write_bytes(bytes(range(256)) * (SIZE // 256))
    code, _, err = finish(send(src, recv.port, "--auth-key-file", str(key)))
    assert code == 0, err
    rcode, _, rerr = recv.result(timeout=30)
    assert rcode == 0
    assert '"event": "connection refused"' in rerr and "authentication failed" in rerr
    assert dst.read_bytes() == src.read_bytes()


def test_matching_keys_migrate(tmp_path: Path) -> None:
    key = tmp_path / "key"
    keygen(key)
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(bytes(range(256)) * (SIZE // 256))
    recv = Receiver.start(dst, "--auth-key-file", str(key))
    code, _, err = finish(send(src, recv.port, "--auth-key-file", str(key)))
    assert code == 0, err
    assert recv.result()[0] == 0
    assert dst.read_bytes() == src.read_bytes()


def test_a_source_that_dies_while_channels_connect_ends_the_wait_at_once(
    tmp_path: Path,
) -> None:
    """Killed between connecting its data channels and sending their init records, the
    source leaves dead connections in the backlog: the receiver must notice that the
    main channel closed, not wait out the handshake timeout for channels that never come."""
    dst = tmp_path / "dst.img"
    recv = Receiver.start(dst)
    main, ack = handshake(recv.port, hello(channels=2))
    assert ack.TYPE is RecordType.HELLO_ACK
    data = socket.create_connection(("127.0.0.1", recv.port), timeout=10)  # no init record
    data.close()
    main.close()
    started = time.monotonic()
    code, _, err = recv.result(timeout=60)
    # The message tells the close from the handshake timeout, and the bound is the
    # behaviour ("at once"): well short of the 30 s (the destination's HANDSHAKE_TIMEOUT)
    # that waiting it out would take, and far past a loaded machine's noticing it.
    assert code == 1 and "closed the main channel" in err
    assert time.monotonic() - started < 15
    assert_nothing_committed(dst)


# ------------------------------------------------------------- every packet, every page
#
# A source that loses, repeats or miscounts a packet, leaves a page out, or sends after its
# final SYNC: whatever arrived must not be committed. Each of these commits an all-zero or
# half-filled image (exit 0 on both ends) without the sequence numbers and counts.


def wait_acknowledged(s: socket.socket, timeout: float = 10.0) -> None:
    """Until the peer's kernel has acknowledged every byte sent on `s` (SIOCOUTQ 0): they are
    in its socket's receive queue."""
    deadline = time.monotonic() + timeout
    while struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, bytes(4)))[0]:
        assert time.monotonic() < deadline, f"bytes still unacknowledged after {timeout} s"
        time.sleep(0.001)


def play(port: int, packets: list[bytes], *, device_state: bool = False,
         ) -> tuple[socket.socket, socket.socket]:
    """Handshake, one data channel carrying `packets`, then END_OF_RAM on the main channel,
    and the device state right after it if `device_state` (as the real source sends it)."""
    main, ack = handshake(port)
    assert ack.TYPE is RecordType.HELLO_ACK
    data = socket.create_connection(("127.0.0.1", port), timeout=10)
    data.sendall(stream().init() + b"".join(packets))
    main.sendall(EndOfRam(1).encode())
    if device_state:
        main.sendall(DeviceStateRecord(b"{}").encode())
    return main, data


def assert_refused(recv: Receiver, main: socket.socket, dst: Path, message: str) -> None:
    """The source hears ERROR naming the fault; the receiver exits 1, committing nothing."""
    rec = recv_record(main)
    assert rec.TYPE is RecordType.ERROR, rec
    assert message in rec.message  # type: ignore[attr-defined]
    code, _, err = recv.result(timeout=30)
    assert code == 1 and "nothing committed" in err and message in err
    assert_nothing_committed(dst)


def test_a_packet_skipped_on_its_channel_is_refused(tmp_path: Path) -> None:
    dst = tmp_path / "dst.img"
    recv = Receiver.start(dst)
    s = stream()
    first = s.data(normal=[0], zero=rest_as_zero(0, PAGE))
    s.data(normal=[PAGE])  # a proxy dropped it
    main, _ = play(recv.port, [first, s.sync()])
    assert_refused(recv, main, dst, "seq 3 on channel 0, expected 2 (1 packet missing)")


def test_a_packet_repeated_on_its_channel_is_refused(tmp_path: Path) -> None:
    dst = tmp_path / "dst.img"
    recv = Receiver.start(dst)
    s = stream()
    packet = s.data(normal=[0], zero=rest_as_zero(0))
    main, _ = play(recv.port, [packet, packet, s.sync()])
    assert_refused(recv, main, dst,
                   "seq 1 on channel 0, expected 2 (a packet repeated or out of order)")


@pytest.mark.parametrize(("packets", "pages"), [(1, 64), (2, 63), (3, 64), (0, 0)])
def test_a_sync_whose_counts_differ_from_what_arrived_is_refused(
    tmp_path: Path, packets: int, pages: int
) -> None:
    dst = tmp_path / "dst.img"
    recv = Receiver.start(dst)
    s = stream()
    sent = [s.data(normal=[0]), s.data(zero=rest_as_zero(0))]
    main, _ = play(recv.port, [*sent, s.sync(sync_packets=packets, sync_pages=pages)])
    assert_refused(recv, main, dst,
                   f"the sender counts {packets} data packets and {pages} pages since the "
                   "previous SYNC, received 2 packets and 64 pages")


def test_a_page_never_sent_is_refused_before_the_commit(tmp_path: Path) -> None:
    dst = tmp_path / "dst.img"
    recv = Receiver.start(dst)
    s = stream()
    # Every packet in sequence and counted: only the image has a hole, at page 17.
    packets = [s.data(normal=[0, PAGE]), s.data(zero=rest_as_zero(0, PAGE, 17 * PAGE)),
               s.sync()]
    main, _ = play(recv.port, packets)
    assert_refused(recv, main, dst,
                   "1 of 64 pages never arrived, first at offset 0x11000")


def test_an_empty_migration_is_refused(tmp_path: Path) -> None:
    dst = tmp_path / "dst.img"
    recv = Receiver.start(dst)
    main, _ = play(recv.port, [stream().sync()])
    assert_refused(recv, main, dst, "64 of 64 pages never arrived, first at offset 0x0, then "
                                    "0x1000, 0x2000")


def test_a_packet_after_the_final_sync_is_refused(tmp_path: Path) -> None:
    dst = tmp_path / "dst.img"
    recv = Receiver.start(dst)
    s = stream()
    packets = [s.data(zero=rest_as_zero()), s.sync(), s.data(normal=[PAGE])]
    main, _ = play(recv.port, packets)
    assert_refused(recv, main, dst, "data after the final sync on channel 0")


def test_a_packet_after_the_final_sync_that_comes_late_is_refused_at_the_commit(
    tmp_path: Path,
) -> None:
    """Sent once the destination checked the image at END_OF_RAM (and said RAM_RECEIVED),
    before the device state: the look right before the commit finds it. The table lets no
    ERROR through once the device state arrived, so the source hears nothing more than the
    main channel closing."""
    dst = tmp_path / "dst.img"
    recv = Receiver.start(dst)
    s = stream()
    main, data = play(recv.port, [s.data(zero=rest_as_zero()), s.sync()])
    wait_for_event(recv.proc, "receive complete", timeout=30)  # the check at END_OF_RAM
    data.sendall(s.data(normal=[PAGE]))
    wait_acknowledged(data)  # in the destination's socket before the device state leaves
    main.sendall(DeviceStateRecord(b"{}").encode())
    code, _, err = recv.result(timeout=30)
    assert code == 1 and "data after the final sync on channel 0" in err
    assert "nothing committed" in err
    assert_nothing_committed(dst)
    assert recv_record(main).TYPE is RecordType.RAM_RECEIVED  # the check at END_OF_RAM
    assert main.recv(1) == b""  # and nothing after the device state came in


def faulty_streams() -> dict[str, tuple[list[bytes], str]]:
    """Each fault above as the packets that carry it, and what the receiver says of it."""
    gap, repeat, counts, hole, after = (stream() for _ in range(5))
    first = gap.data(normal=[0], zero=rest_as_zero(0, PAGE))
    gap.data(normal=[PAGE])
    packet = repeat.data(zero=rest_as_zero())
    return {
        "gap": ([first, gap.sync()], "seq 3 on channel 0, expected 2"),
        "repeat": ([packet, packet, repeat.sync()], "seq 1 on channel 0, expected 2"),
        "counts": ([counts.data(zero=rest_as_zero()), counts.sync(sync_pages=1)],
                   "the sender counts 1 data packets and 1 pages"),
        "hole": ([hole.data(zero=rest_as_zero(0)), hole.sync()],
                 "1 of 64 pages never arrived, first at offset 0x0"),
        "after": ([after.data(zero=rest_as_zero()), after.sync(), after.data(normal=[0])],
                  "data after the final sync on channel 0"),
    }


@pytest.mark.parametrize("fault", ["gap", "repeat", "counts", "hole", "after"])
def test_with_the_device_state_already_sent_nothing_is_committed_either(
    tmp_path: Path, fault: str
) -> None:
    """A source that sends the device state right after END_OF_RAM, without waiting for
    RAM_RECEIVED (the real one waits)."""
    dst = tmp_path / "dst.img"
    recv = Receiver.start(dst)
    packets, message = faulty_streams()[fault]
    main, _ = play(recv.port, packets, device_state=True)
    code, _, err = recv.result(timeout=30)
    assert code == 1 and "nothing committed" in err and message in err
    assert_nothing_committed(dst)
    with contextlib.suppress(ConnectionError):
        assert recv_record(main).TYPE is RecordType.ERROR  # never a COMMIT_ACK


@pytest.mark.parametrize("fault", ["gap", "hole"])
def test_with_the_device_state_already_sent_the_source_still_hears_error(
    tmp_path: Path, fault: str
) -> None:
    """The refusal comes at END_OF_RAM, before RAM_RECEIVED: an ERROR the table allows,
    even to a source that did not wait and sent its device state (which is not taken)."""
    dst = tmp_path / "dst.img"
    recv = Receiver.start(dst)
    packets, message = faulty_streams()[fault]
    main, _ = play(recv.port, packets, device_state=True)
    try:
        assert_refused(recv, main, dst, message)
    finally:
        recv.result(timeout=30)
