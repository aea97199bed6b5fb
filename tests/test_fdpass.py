"""channel/fdpass.py: records with descriptors between local processes, over real Unix
sockets in a private directory."""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from zcmigrate.channel.errors import ChannelClosed, ReadTimeout
from zcmigrate.channel.fdpass import MAX_FDS, MAX_RECORD, FdConnection, FdListener
from zcmigrate.channel.local import LocalSocketError


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    return d / "pc.sock"


@pytest.fixture
def pair(sock_path: Path) -> Iterator[tuple[FdConnection, FdConnection]]:
    with FdListener(sock_path) as lst:
        client = FdConnection.connect(sock_path, 5.0)
        server = lst.accept(5.0)
        try:
            yield client, server
        finally:
            client.close()
            server.close()


def test_a_record_and_its_descriptor_arrive_together(
    pair: tuple[FdConnection, FdConnection], tmp_path: Path
) -> None:
    client, server = pair
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        client.send(b'{"hello":1}', [fd])
    finally:
        os.close(fd)  # ours closes; the peer's copy lives on
    body, fds = server.recv(5.0)
    assert body == b'{"hello":1}' and len(fds) == 1
    try:
        os.write(fds[0], b"through the passed descriptor")
        assert (tmp_path / "f").read_bytes() == b"through the passed descriptor"
        assert fcntl.fcntl(fds[0], fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        os.close(fds[0])


def test_a_descriptor_is_never_received_with_a_neighbouring_record(
    pair: tuple[FdConnection, FdConnection],
) -> None:
    client, server = pair
    r, w = os.pipe()
    try:
        client.send(b"first")
        client.send(b"second", [r, w])
        client.send(b"third")
        client.send(b"")
        time.sleep(0.05)  # all four queued before the first read
        got = [server.recv(5.0) for _ in range(4)]
    finally:
        os.close(r)
        os.close(w)
    assert [b for b, _ in got] == [b"first", b"second", b"third", b""]
    assert [len(f) for _, f in got] == [0, 2, 0, 0]
    for fd in got[1][1]:
        os.close(fd)


def test_a_silent_peer_times_out_and_a_closed_one_is_closed(
    pair: tuple[FdConnection, FdConnection],
) -> None:
    client, server = pair
    t0 = time.monotonic()
    with pytest.raises(ReadTimeout):
        server.recv(0.2)
    assert 0.15 < time.monotonic() - t0 < 5
    client.close()
    with pytest.raises(ChannelClosed):
        server.recv(5.0)
    with pytest.raises(ChannelClosed):
        server.send(b"anyone?")


def test_a_blocking_read_ends_when_the_connection_is_closed_here(
    pair: tuple[FdConnection, FdConnection],
) -> None:
    _, server = pair
    errors: list[BaseException] = []

    def read() -> None:
        try:
            server.recv(None)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=read)
    t.start()
    time.sleep(0.1)
    server.close()
    t.join(5.0)
    assert not t.is_alive() and isinstance(errors[0], ChannelClosed)


def test_limits_are_refused_on_both_ends(pair: tuple[FdConnection, FdConnection]) -> None:
    client, server = pair
    with pytest.raises(ValueError, match="descriptors"):
        client.send(b"x", [0] * (MAX_FDS + 1))
    with pytest.raises(ValueError, match="larger"):
        client.send(b"x" * (MAX_RECORD + 1))
    client._sock.sendall(struct.pack(">I", MAX_RECORD + 1))  # a peer that lies
    with pytest.raises(ChannelClosed, match="record"):
        server.recv(5.0)


def test_the_peer_is_named_by_the_kernel(pair: tuple[FdConnection, FdConnection]) -> None:
    client, server = pair
    for end in (client, server):
        peer = end.peer()
        assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())


def test_the_listening_socket_is_ours_alone(sock_path: Path) -> None:
    with FdListener(sock_path):
        assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
        with pytest.raises(LocalSocketError, match="in use"):
            FdListener(sock_path)
    assert not sock_path.exists()
    # A leftover socket file of a listener that died is replaced.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock_path))
    s.close()
    with FdListener(sock_path):
        pass
    open_dir = sock_path.parent.parent / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    with pytest.raises(LocalSocketError, match="others may"):
        FdListener(open_dir / "pc.sock")


def test_connect_waits_for_a_listener_until_its_deadline(sock_path: Path) -> None:
    listeners: list[FdListener] = []
    timer = threading.Timer(0.3, lambda: listeners.append(FdListener(sock_path)))
    timer.start()
    try:
        conn = FdConnection.connect(sock_path, 5.0)
        conn.close()
    finally:
        timer.join(5.0)  # it fires after 0.3 s; a bound all the same
        for lst in listeners:
            lst.close()
    t0 = time.monotonic()
    with pytest.raises(LocalSocketError, match="nothing listens"):
        FdConnection.connect(sock_path, 0.3)
    assert time.monotonic() - t0 < 5


def test_accept_gives_up_at_its_deadline(sock_path: Path) -> None:
    with FdListener(sock_path) as lst, pytest.raises(ReadTimeout):
        lst.accept(0.1)
