"""Before any peer is trusted: connections that send nothing, one byte a second, or an
HTTP request are served beside the real source and closed in turn; none of them holds up
the migration or ends a one-shot receiver's wait. A real receiver process."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from tests.migration_procs import Receiver, finish, send


def test_idle_slow_and_foreign_connections_do_not_stop_a_real_migration(
    tmp_path: Path,
) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(os.urandom(8 << 20))
    recv = Receiver.start(dst)
    addr = ("127.0.0.1", recv.port)
    idle = [socket.create_connection(addr, timeout=10) for _ in range(5)]
    probe = socket.create_connection(addr, timeout=10)
    probe.sendall(b"GET / HTTP/1.0\r\n\r\n")
    stop = threading.Event()
    slow = [socket.create_connection(addr, timeout=10) for _ in range(2)]

    def drip(s: socket.socket) -> None:  # one byte a second, never a whole record
        while not stop.is_set():
            try:
                s.sendall(b"Z")
            except OSError:
                return
            stop.wait(1.0)

    drips = [threading.Thread(target=drip, args=(s,), daemon=True) for s in slow]
    for t in drips:
        t.start()
    try:
        # The strays are waiting in the receiver before the real source connects.
        time.sleep(0.5)
        code, _, err = finish(send(src, recv.port), timeout=120)
        assert code == 0, err
        rcode, _, rerr = recv.result(timeout=60)
        assert rcode == 0, rerr
        assert dst.read_bytes() == src.read_bytes()
        # The HTTP probe was read, refused and said so in the receiver's log.
        assert "bad magic" in rerr
        assert probe.recv(4096)  # it got the greeting, then an ERROR and the close
    finally:
        stop.set()
        for s in (*idle, *slow, probe):
            s.close()
