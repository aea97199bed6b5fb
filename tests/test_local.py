"""channel/local.py: the control socket's transport, against real Unix sockets."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from zcmigrate.channel.local import LineServer, LocalSocketError, private_dir, request_line


def _echo(line: bytes) -> bytes:
    if line == b"boom":
        raise RuntimeError("handler bug")
    return b"echo " + line


def _server(path: Path) -> LineServer:
    return LineServer(path, _echo, error_reply=lambda m: b"error " + m.encode())


def test_one_line_in_one_line_out_and_the_socket_is_ours_alone(tmp_path: Path) -> None:
    d = tmp_path / "run"
    srv = _server(d / "x.sock")
    try:
        assert request_line(d / "x.sock", b"hello") == b"echo hello"
        assert (d / "x.sock").stat().st_mode & 0o777 == 0o600
        assert d.stat().st_mode & 0o777 == 0o700
    finally:
        srv.close()
    assert not (d / "x.sock").exists()


def test_a_handler_that_raises_is_answered_and_the_server_goes_on(tmp_path: Path) -> None:
    srv = _server(tmp_path / "run" / "x.sock")
    try:
        assert request_line(srv.path, b"boom").startswith(b"error internal error: RuntimeError")
        # A client that connects and says nothing, then one that hangs up half-way.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(srv.path))
            s.sendall(b"no newline")
        assert request_line(srv.path, b"still here") == b"echo still here"
    finally:
        srv.close()


def test_a_second_server_on_a_served_path_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run" / "x.sock"
    srv = _server(path)
    try:
        with pytest.raises(LocalSocketError, match="in use"):
            _server(path)
    finally:
        srv.close()


def test_a_leftover_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "run" / "x.sock"
    private_dir(path.parent)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens
    srv = _server(path)
    try:
        assert request_line(path, b"a") == b"echo a"
    finally:
        srv.close()


def test_a_directory_others_may_enter_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o755)
    with pytest.raises(LocalSocketError, match=r"mode 0755.*chmod 700"):
        private_dir(d)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another uid")
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 12345, 12345)
    with pytest.raises(LocalSocketError, match="belongs to uid 12345"):
        private_dir(d)


def test_nothing_listening_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LocalSocketError, match="nothing answers"):
        request_line(tmp_path / "none.sock", b"x")
