"""sd_notify and socket activation with real sockets and real child processes: a datagram
socket the test binds plays systemd's notify socket, and children inherit listening
sockets at fd 3 the way systemd (and its own systemd-socket-activate) passes them.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.child_output import DIE_WITH_PARENT, ChildOutput
from zcmigrate.channel.sdnotify import SD_LISTEN_FDS_START, listen_fds, notify

ROOT = Path(__file__).resolve().parent.parent
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket, named in $NOTIFY_SOCKET as systemd names its own."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    # systemd asks for the sender's credentials to tell the main process (NotifyAccess=).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def receive(sock: socket.socket) -> tuple[list[str], int]:
    """One datagram's lines and the pid the kernel vouches sent it."""
    data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
    pid = -1
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = _UCRED.unpack(payload[: _UCRED.size])[0]
    return data.decode().split("\n"), pid


# ------------------------------------------------------------------------- notify


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


def test_lines_travel_together_in_one_datagram(notify_socket: socket.socket) -> None:
    assert notify("READY=1", "STATUS=listening on 0.0.0.0:4444") is True
    lines, pid = receive(notify_socket)
    assert lines == ["READY=1", "STATUS=listening on 0.0.0.0:4444"]
    assert pid == os.getpid()
    assert notify("STOPPING=1") is True
    assert receive(notify_socket)[0] == ["STOPPING=1"]


def test_an_abstract_notify_socket_is_reached_by_its_at_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = f"zcmigrate-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1", "STATUS=ready") is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=ready"


def test_a_child_process_notifies_with_its_own_credentials(
    notify_socket: socket.socket,
) -> None:
    # What systemd sees from a Type=notify service: the datagram and the sender's pid,
    # which must be the main process for NotifyAccess=main to accept it.
    child = subprocess.Popen(
        [sys.executable, "-c",
         "from zcmigrate.channel.sdnotify import notify; "
         "import sys; sys.exit(0 if notify('READY=1', 'STATUS=receiving guest1') else 3)"],
        cwd=ROOT,
    )
    lines, pid = receive(notify_socket)
    assert child.wait(10) == 0
    assert lines == ["READY=1", "STATUS=receiving guest1"]
    assert pid == child.pid


def test_a_line_with_a_newline_or_without_an_assignment_is_refused(
    notify_socket: socket.socket,
) -> None:
    with pytest.raises(ValueError):
        notify("STATUS=two\nlines")
    with pytest.raises(ValueError):
        notify("READY")


def test_an_unreachable_notify_socket_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    with pytest.raises(OSError):
        notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    with pytest.raises(OSError):
        notify("READY=1")


# --------------------------------------------------------------------- listen_fds


def test_nothing_passed_means_no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert listen_fds() == []


def test_sockets_meant_for_another_process_are_ignored_and_the_variables_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The variables of a parent that was activated leak into its children: they must
    # not take the parent's descriptors (fd 3 here is pytest's own).
    monkeypatch.setenv("LISTEN_PID", str(os.getppid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "receive")
    assert listen_fds() == []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        assert name not in os.environ


def test_malformed_variables_are_an_error_and_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", "self")
    monkeypatch.setenv("LISTEN_FDS", "1")
    with pytest.raises(ValueError):
        listen_fds()
    assert "LISTEN_PID" not in os.environ and "LISTEN_FDS" not in os.environ
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "0")
    with pytest.raises(ValueError):
        listen_fds()
    assert "LISTEN_FDS" not in os.environ


# Run as an activated child: reports what listen_fds() made of fds 3 and up, then
# serves one connection on the stream socket to prove it is the parent's listener.
_ACTIVATED = """
import json, os, socket
from zcmigrate.channel.sdnotify import listen_fds
socks = listen_fds()
print(json.dumps({
    "pid": os.getpid(),
    "fds": [s.fileno() for s in socks],
    "inheritable": [os.get_inheritable(s.fileno()) for s in socks],
    "families": [int(s.family) for s in socks],
    "types": [int(s.type) for s in socks],
    "names": [n.hex() if isinstance(n, bytes) else n for n in (s.getsockname() for s in socks)],
    "env": {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")},
}), flush=True)
stream = next(s for s in socks if s.type == socket.SOCK_STREAM)
conn, _ = stream.accept()
conn.sendall(b"served by %d" % os.getpid())
conn.close()
"""


def _read_report(child: subprocess.Popen[str]) -> dict[str, Any]:
    line = ChildOutput.of(child).wait_line("stdout", lambda line: line.startswith("{"),
                                           "its JSON report", 30)
    report: dict[str, Any] = json.loads(line)
    return report


def _check_served(report: dict[str, Any], port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        assert c.recv(64) == b"served by %d" % report["pid"]


def _connect_when_listening(port: int, timeout: float = 10) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=timeout)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


# The child, before it becomes the service: moves the sockets to fds 3 and 4 and names
# its own pid (which exec keeps) in $LISTEN_PID, as systemd does between fork and exec.
_LAUNCH = """
import os, sys
for target, fd in enumerate(int(a) for a in sys.argv[1].split(",")):
    os.dup2(fd, 3 + target)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2", LISTEN_FDNAMES="receive:spare")
os.execv(sys.executable, [sys.executable, "-c", sys.argv[2]])
"""


def test_a_child_takes_the_sockets_it_inherits_at_fd_3() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    abstract = b"\0zcmigrate-test-" + uuid.uuid4().hex.encode()
    dgram.bind(abstract)
    # Above 4 so that moving them to 3 and 4 in the child cannot clobber one another.
    high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 10) for s in (listener, dgram)]
    port = listener.getsockname()[1]
    try:
        child = subprocess.Popen(
            [*DIE_WITH_PARENT, sys.executable, "-c", _LAUNCH, ",".join(map(str, high)),
             _ACTIVATED],
            cwd=ROOT, pass_fds=high, stdout=subprocess.PIPE, text=True,
        )
        try:
            report = _read_report(child)
            _check_served(report, port)
            assert child.wait(10) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    finally:
        for fd in high:
            os.close(fd)
        listener.close()
        dgram.close()
    assert report["fds"] == [SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + 1]
    assert report["families"] == [socket.AF_INET, socket.AF_UNIX]
    assert report["types"] == [socket.SOCK_STREAM, socket.SOCK_DGRAM]
    assert report["names"] == [["127.0.0.1", port], abstract.hex()]
    assert report["inheritable"] == [False, False]  # close-on-exec, as sd_listen_fds does
    assert report["env"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}


@pytest.mark.skipif(not shutil.which("systemd-socket-activate"),
                    reason="systemd-socket-activate is not installed")
def test_systemds_own_activator_hands_over_a_listening_socket() -> None:
    with socket.socket() as probe:
        # A free port for the activator to bind; it cannot report one it chose itself.
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    child = subprocess.Popen(
        [*DIE_WITH_PARENT, "systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=receive",
         sys.executable, "-c", _ACTIVATED],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        # The activator execs the service on the first connection, as systemd would.
        with _connect_when_listening(port) as c:
            report = _read_report(child)
            assert c.recv(64) == b"served by %d" % report["pid"]
        assert child.wait(10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert report["pid"] == child.pid  # the activator exec'd into the service
    assert report["fds"] == [SD_LISTEN_FDS_START]
    assert report["names"][0] == ["127.0.0.1", port]
    assert report["env"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}
