"""Keys and the default of trust: keygen, a receiver that will not listen beyond loopback
without one, a source that will not send to a receiver that cannot prove it holds its
key, and a keyed migration sealed end to end. Real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.dropping_proxy import DroppingProxy
from tests.migration_procs import Receiver, finish, log_events, send, spawn, stop
from zcmigrate.channel.aead import TAG_LEN, handshake_mac
from zcmigrate.migrate.imagefiles import state_path
from zcmigrate.migrate.keyfile import KeyFileError, keygen, read_key
from zcmigrate.migrate.protocol import (
    RECORD_HEADER_SIZE,
    Greeting,
    Hello,
    HelloAck,
    decode_header,
    decode_record,
)
from zcmigrate.multifd.wire import HEADER_SIZE

ZCM = [sys.executable, "-m", "zcmigrate"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ZCM, *args], capture_output=True, text=True, timeout=60)


def test_keygen_writes_a_private_key_and_never_overwrites(tmp_path: Path) -> None:
    key = tmp_path / "k"
    r = _run("keygen", str(key))
    assert r.returncode == 0, r.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    assert len(key.read_text().strip()) == 64
    before = key.read_bytes()
    r = _run("keygen", str(key))
    assert r.returncode != 0 and "exists" in r.stderr
    assert key.read_bytes() == before


def test_a_key_file_everyone_can_read_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "k"
    keygen(key)
    key.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod o-r"):
        read_key(key)
    key.chmod(0o640)  # a service's group may read it
    assert len(read_key(key)) == 32


def test_without_a_key_the_receiver_listens_on_loopback_only(tmp_path: Path) -> None:
    r = _run("receive", str(tmp_path / "d.img"), "--listen", "0.0.0.0:0")
    assert r.returncode == 2
    assert "without a key" in r.stderr and "keygen" in r.stderr and "--insecure" in r.stderr
    assert "listening" not in r.stdout
    # --insecure says the network is trusted; loopback needs nothing.
    for listen, extra in (("0.0.0.0:0", ["--insecure"]), ("127.0.0.1:0", [])):
        p = spawn("receive", str(tmp_path / "d.img"), "--listen", listen, *extra,
                  "--accept-timeout", "1")
        _code, out, _ = Receiver(tmp_path / "d.img", p, 0).result(timeout=30)
        assert out.startswith("listening:"), out


def test_a_source_with_a_key_refuses_a_receiver_without_one(tmp_path: Path) -> None:
    key = tmp_path / "k"
    keygen(key)
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(1 << 20))
    recv = Receiver.start(tmp_path / "dst.img")  # no key
    code, _, err = finish(send(src, recv.port, "--auth-key-file", str(key)))
    assert code == 1
    assert "holds no key" in err
    assert recv.proc.poll() is None  # the receiver waits on for a source it can serve
    stop(recv.proc)
    assert not (tmp_path / "dst.img").exists()


def test_a_source_with_a_key_refuses_a_receiver_that_cannot_prove_it(tmp_path: Path) -> None:
    """A fake receiver says it holds a key and accepts the hello, but its HELLO_ACK's MAC
    is under another key: the source must not send the guest (a forged acknowledgement
    would otherwise be the end of it)."""
    key = tmp_path / "k"
    keygen(key)
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(1 << 20))
    lsock = socket.create_server(("127.0.0.1", 0))
    got: list[Hello] = []

    def fake() -> None:
        conn, _ = lsock.accept()
        with conn:
            greeting = Greeting(bytes(range(32)), keyed=True)
            conn.sendall(greeting.encode())
            head = conn.recv(RECORD_HEADER_SIZE, socket.MSG_WAITALL)
            rtype, n = decode_header(head)
            hello = decode_record(rtype, conn.recv(n, socket.MSG_WAITALL))
            assert isinstance(hello, Hello)
            got.append(hello)
            conn.sendall(HelloAck(handshake_mac(bytes(32), b"hello-ack", greeting.payload(),
                                                hello.payload())).encode())
            conn.recv(1)

    t = threading.Thread(target=fake, daemon=True)
    t.start()
    try:
        code, _, err = finish(send(src, lsock.getsockname()[1], "--auth-key-file", str(key)))
    finally:
        lsock.close()
    assert code == 1
    assert "did not prove that it holds our key" in err
    assert got and got[0].mac  # the hello itself was authenticated


def test_a_keyed_migration_completes_with_both_ends_proven(tmp_path: Path) -> None:
    key = tmp_path / "k"
    keygen(key)
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(os.urandom(4 << 20))
    recv = Receiver.start(dst, "--auth-key-file", str(key))
    code, _stats, err = finish(send(src, recv.port, "--auth-key-file", str(key)))
    assert code == 0, err
    assert recv.result()[0] == 0
    assert dst.read_bytes() == src.read_bytes()


# ------------------------------------------------------------------ sealed data packets

def _image_with_zero_pages(path: Path, size: int = 16 << 20) -> bytes:
    """Random pages with a zero run every 64 pages: normal and zero pages in one packet."""
    data = bytearray(os.urandom(size))
    for at in range(0, size, 64 * 4096):
        data[at:at + 4 * 4096] = bytes(4 * 4096)
    path.write_bytes(data)
    return bytes(data)


def _wire_bytes(stats: dict[str, Any]) -> tuple[int, int, int]:
    """(data-channel bytes, data packets, SYNCs) the source's final statistics count."""
    chans = stats["multifd"]["channels"]
    return (sum(c["bytes"] for c in chans), sum(c["packets"] for c in chans),
            sum(c["syncs"] for c in chans))


@pytest.mark.parametrize("zero_copy", ["on", "off"])
def test_a_sealed_migration_arrives_identical_and_each_packet_carries_a_tag(
        tmp_path: Path, zero_copy: str) -> None:
    """The same image with a key, encrypted under each cipher (the default, OCB, then
    --cipher aes-128-gcm) and then with --no-encryption: identical every time, and each
    sealed run's data channels carried exactly two 16-byte tags more per data packet (its
    offsets', its pages') and one per SYNC: every packet was sealed, none went clear."""
    key = tmp_path / "k"
    keygen(key)
    src = tmp_path / "src.img"
    data = _image_with_zero_pages(src)
    wire: dict[str, tuple[int, int]] = {}
    for mode in ("sealed", "gcm", "clear"):
        dst = tmp_path / f"{mode}.img"
        recv = Receiver.start(dst, "--auth-key-file", str(key))
        extra = {"sealed": [], "gcm": ["--cipher", "aes-128-gcm"],
                 "clear": ["--no-encryption"]}[mode]
        code, stats, err = finish(send(src, recv.port, "--auth-key-file", str(key),
                                       "--multifd-zerocopy", zero_copy, *extra))
        assert code == 0, err
        assert recv.result()[0] == 0
        assert dst.read_bytes() == data, f"{mode}: the destination differs"
        wire[mode] = _wire_bytes(stats)
    (sealed, packets, syncs), (clear, *clear_counts) = wire["sealed"], wire["clear"]
    assert [packets, syncs] == clear_counts
    assert sealed - clear == TAG_LEN * (2 * packets + syncs)
    assert wire["gcm"] == wire["sealed"]


def test_a_receiver_that_requires_gcm_refuses_an_ocb_source_and_takes_the_next(
        tmp_path: Path) -> None:
    """receive --require-cipher aes-128-gcm: a source on the default cipher (OCB) is
    refused, told what to do, and nothing is written; the receiver keeps listening, and
    the same source with --cipher aes-128-gcm then migrates the image."""
    key = tmp_path / "k"
    keygen(key)
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    data = _image_with_zero_pages(src)
    recv = Receiver.start(dst, "--auth-key-file", str(key),
                          "--require-cipher", "aes-128-gcm")
    code, _, err = finish(send(src, recv.port, "--auth-key-file", str(key)))
    assert code == 1, err
    assert "this receiver requires aes-128-gcm" in err, err
    assert "--cipher aes-128-gcm" in err, err
    assert not dst.exists() and not state_path(dst).exists()
    code, _, err = finish(send(src, recv.port, "--auth-key-file", str(key),
                               "--cipher", "aes-128-gcm"))
    assert code == 0, err
    rcode, _, rerr = recv.result()
    assert rcode == 0, rerr
    assert dst.read_bytes() == data
    hello = [e for e in log_events(rerr) if e.get("event") == "hello"]
    assert [e.get("cipher") for e in hello] == ["aes-128-gcm"], hello


FLIPS = [
    pytest.param(31, id="header-packet_num"),  # no header check looks at it: the tag must
    pytest.param(HEADER_SIZE, id="offsets"),
    pytest.param(-TAG_LEN - 100, id="page-data"),
    pytest.param(-1, id="tag"),
]


@pytest.mark.parametrize("flip_at", FLIPS)
def test_a_flipped_byte_in_a_sealed_data_packet_fails_the_migration(
        tmp_path: Path, flip_at: int) -> None:
    """Issue 11's proxy that flips one byte of one page: with sealed packets, a byte
    flipped anywhere in a data packet (its clear header, its offsets, its pages, its tag)
    fails the tag, so the receiver fails the migration and commits nothing, and the
    source fails with it."""
    key = tmp_path / "k"
    keygen(key)
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    _image_with_zero_pages(src)
    recv = Receiver.start(dst, "--auth-key-file", str(key))
    with DroppingProxy(("127.0.0.1", recv.port), channel=0, nth=2, flip_at=flip_at) as proxy:
        scode, _, serr = finish(send(src, proxy.port, "--auth-key-file", str(key)))
        rcode, _, rerr = recv.result()
    assert proxy.flipped is not None, f"harness: nothing was flipped; {proxy.report()}"
    assert not proxy.problems, proxy.report()
    assert rcode == 1, rerr
    assert scode == 1, serr
    assert "did not verify" in rerr, rerr
    assert not dst.exists() and not state_path(dst).exists(), "something was committed"
