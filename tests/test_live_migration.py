"""Live migration end to end with real processes: a guest dirtying its image, a receiver
and a sender over loopback TCP, and the oracle on the destination."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from pathlib import Path

import pytest

from tests.migration_procs import (
    Guest,
    Receiver,
    finish,
    json_output,
    send,
    stop,
    wait_for_event,
    wait_stopped,
)

# Downtime runs from the pause to the destination's commit: the last pages, the final
# sync, and fsyncs of the last iteration's pages and of the state file on whatever disk
# tmp_path is (WRITEBACK made the rest durable before the pause). The tolerance covers
# those fsyncs and a loaded 2-core machine. The decision to pause is checked on its own,
# exactly: the expected downtime fit the limit.
DOWNTIME_TOLERANCE_MS = 400


def oracle(image: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*spawn_args("guest"), str(image), "--check"], capture_output=True,
                          text=True, timeout=60)


def spawn_args(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "zcmigrate", *args]


def assert_nothing_committed(dst: Path, *, killed: bool = False) -> None:
    assert not dst.exists(), "the destination committed an image"
    assert not Path(f"{dst}.state").exists(), "the destination committed a device state"
    if not killed:  # a SIGKILLed receiver cannot clean up; its next run does
        assert not Path(f"{dst}.incoming").exists(), "the partial image was not discarded"


@pytest.mark.parametrize("zerocopy", ["on", "off"])
def test_live_migration_of_a_running_guest_completes_and_the_oracle_passes(
    tmp_path: Path, zerocopy: str
) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    guest = Guest.start(src, "256M", "64M")
    recv = Receiver.start(dst)
    try:
        code, stats, err = finish(send(src, recv.port, "--multifd-channels", "2",
                                       "--multifd-zerocopy", zerocopy))
        assert code == 0, err
        rcode, rout, rerr = recv.result()
        assert rcode == 0, rerr
    finally:
        stop(recv.proc)
        stop(guest.proc)
    assert stats["status"] == "completed"
    ram = stats["ram"]
    assert ram["dirty-sync-count"] > 1
    assert ram["total"] == 256 << 20
    assert ram["transferred"] > 0 and ram["normal"] > 0 and ram["zero-pages"] > 0
    limit = stats["parameters"]["downtime-limit"]
    assert stats["expected-downtime"] <= limit  # paused only once it expected to fit
    assert 0 < stats["downtime"] <= limit + DOWNTIME_TOLERANCE_MS, (
        f"downtime {stats['downtime']} ms, expected {stats['expected-downtime']} ms")
    chans = stats["multifd"]["channels"]
    assert len(chans) == 2
    if zerocopy == "on":
        assert all(c["zero-copy-queued"] > 0 for c in chans)
        assert all(c["zero-copy-queued"] == c["zero-copy-completed"] for c in chans)
        # Loopback always copies: every flush reported it.
        assert all(c["zero-copy-copied"] == c["zero-copy-completed"] for c in chans)
        assert ram["dirty-sync-missed-zero-copy"] > 0
    else:
        assert all(c["zero-copy-queued"] == 0 for c in chans)
        assert ram["dirty-sync-missed-zero-copy"] == 0
    # The receiver prints the same layout, and agrees on what went over.
    got = json_output(rout)
    assert got["status"] == "completed" and got["image"] == str(dst)
    for key in ("transferred", "total", "normal", "normal-bytes", "zero-pages", "page-size",
                "iterations"):
        assert got["ram"][key] == ram[key], key
    for sent, received in zip(chans, got["multifd"]["channels"], strict=True):
        for key in ("id", "packets", "bytes", "normal-pages", "zero-pages", "syncs"):
            assert received[key] == sent[key], (sent["id"], key)
    # The source guest handed over: it exited after the commit.
    assert guest.proc.wait(10) == 0
    check = oracle(dst)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "oracle: ok" in check.stdout


def test_cancel_keeps_the_guest_running_and_a_second_migration_completes(
    tmp_path: Path,
) -> None:
    src, dst1, dst2 = tmp_path / "src.img", tmp_path / "dst1.img", tmp_path / "dst2.img"
    guest = Guest.start(src, "64M", "16M")
    try:
        recv = Receiver.start(dst1)
        # Slow enough that the first pass is still running when we cancel.
        proc = send(src, recv.port, "--max-bandwidth", "8M")
        wait_for_event(proc, "connected")
        proc.send_signal(signal.SIGINT)
        code, stats, err = finish(proc)
        assert code == 4, err
        assert stats["status"] == "cancelled"
        rcode, _, rerr = recv.result()
        assert rcode == 4, rerr  # cancelled, not failed
        assert "cancel" in rerr
        assert_nothing_committed(dst1)
        assert guest.running(), "the source guest stopped after a cancel"

        recv2 = Receiver.start(dst2)
        code, stats, err = finish(send(src, recv2.port))
        assert code == 0, err
        assert recv2.result()[0] == 0
        check = oracle(dst2)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        stop(guest.proc)


def test_destination_killed_mid_migration_fails_the_source_which_resumes_the_guest(
    tmp_path: Path,
) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    guest = Guest.start(src, "64M", "16M")
    try:
        recv = Receiver.start(dst)
        proc = send(src, recv.port, "--max-bandwidth", "8M")
        wait_for_event(proc, "connected")
        recv.proc.kill()
        recv.proc.wait(10)
        code, stats, err = finish(proc)
        assert code == 1
        assert stats["status"] == "failed"
        desc = stats["error-desc"]
        assert "multifd" in desc or "main" in desc  # names the channel that failed
        assert any(w in desc for w in ("closed", "reset", "broken", "refused")), desc
        assert guest.running()
        assert_nothing_committed(dst, killed=True)
        # The next receiver on the same image throws the leftover away.
        recv2 = Receiver.start(dst)
        code, _, err = finish(send(src, recv2.port))
        assert code == 0, err
        assert recv2.result()[0] == 0
        assert not Path(f"{dst}.incoming").exists()
    finally:
        stop(guest.proc)


def test_source_killed_mid_migration_makes_the_destination_exit_without_committing(
    tmp_path: Path,
) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    guest = Guest.start(src, "64M", "16M")
    try:
        recv = Receiver.start(dst)
        proc = send(src, recv.port, "--max-bandwidth", "8M")
        wait_for_event(proc, "connected")
        proc.kill()
        proc.wait(10)
        rcode, _, rerr = recv.result(timeout=30)
        assert rcode != 0
        assert "nothing committed" in rerr
        assert_nothing_committed(dst)
    finally:
        stop(guest.proc)


def test_a_dirty_rate_above_max_bandwidth_ends_with_a_clear_message(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    guest = Guest.start(src, "8M", "32M")
    try:
        recv = Receiver.start(dst)
        code, stats, err = finish(send(src, recv.port, "--max-bandwidth", "4M"), timeout=120)
        assert code == 5, err
        assert "cannot converge" in stats["error-desc"]
        assert "max-bandwidth" in stats["error-desc"]
        assert recv.result()[0] != 0
        assert guest.running()
        assert_nothing_committed(dst)
    finally:
        stop(guest.proc)


def test_a_static_image_migrates_in_one_pass(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    data = bytes(range(256)) * (4 << 12)  # 4 MiB of pattern, then zeros
    src.write_bytes(data + bytes(12 << 20))
    recv = Receiver.start(dst)
    code, stats, err = finish(send(src, recv.port, "--multifd-channels", "3"))
    assert code == 0, err
    assert recv.result()[0] == 0
    assert stats["ram"]["iterations"] == 2  # the pass and the final (empty) sync
    assert stats["ram"]["dirty-sync-count"] == 0
    assert dst.read_bytes() == src.read_bytes()
    assert stats["ram"]["zero-pages"] == (12 << 20) // 4096


def test_a_failure_after_the_pause_resumes_the_guest_at_the_source(tmp_path: Path) -> None:
    """A fake destination plays along until the source has paused the guest (the source
    stops itself there: ZCMIGRATE_FAULT), then resets every connection: the source must
    fail and resume its paused guest."""
    import signal
    import socket
    import struct
    import threading

    from zcmigrate.migrate.protocol import (
        RECORD_HEADER_SIZE,
        Greeting,
        HelloAck,
        RecordType,
        WritebackDone,
        decode_header,
    )

    src = tmp_path / "src.img"
    guest = Guest.start(src, "16M", "4M")
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    conns: list[socket.socket] = []

    def recv_exact(s: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise ConnectionError
            buf += chunk
        return buf

    def drain(s: socket.socket) -> None:
        try:
            while s.recv(1 << 20):
                pass
        except OSError:
            pass

    threads: list[threading.Thread] = []

    def fake_destination() -> None:
        main, _ = lsock.accept()
        conns.append(main)
        main.sendall(Greeting(bytes(32)).encode())
        _, n = decode_header(recv_exact(main, RECORD_HEADER_SIZE))
        recv_exact(main, n)
        main.sendall(HelloAck().encode())
        for _ in range(2):
            d, _ = lsock.accept()
            d.sendall(bytes(32))  # the challenge every data connection gets first
            conns.append(d)
            threads.append(threading.Thread(target=drain, args=(d,), daemon=True))
            threads[-1].start()
        with contextlib.suppress(OSError):
            while True:
                rtype, n = decode_header(recv_exact(main, RECORD_HEADER_SIZE))
                recv_exact(main, n)
                if rtype is RecordType.WRITEBACK:
                    main.sendall(WritebackDone().encode())

    t = threading.Thread(target=fake_destination, daemon=True)
    t.start()
    try:
        proc = send(src, port, "--multifd-channels", "2",
                    env={"ZCMIGRATE_FAULT": "source:paused"})
        wait_stopped(proc)  # the guest is paused, nothing of the last pages has left
        # Reset, not close: the source's next write fails at once. A socket another
        # thread still reads is only really closed when that read returns, so the
        # readers are woken (SHUT_RD sends nothing) and gone before the reset.
        for c in list(conns):
            c.shutdown(socket.SHUT_RD)
        for th in [t, *threads]:
            th.join(10)
            assert not th.is_alive()
        for c in list(conns):
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
        proc.send_signal(signal.SIGCONT)
        code, stats, err = finish(proc)
        assert code == 1, err
        assert stats["status"] == "failed"
        assert '"event": "guest paused"' in err, "the source never paused the guest"
        assert guest.running(), "the paused guest was not resumed"
    finally:
        lsock.close()
        stop(guest.proc)


def test_max_bandwidth_is_honoured(tmp_path: Path) -> None:
    """16 MiB at 4 MiB/s cannot take less than about 4 s. A lower bound only: a slow
    machine can make it longer, never shorter, so this checks the limit, not speed."""
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(bytes(range(256)) * (16 << 12))  # 16 MiB, no zero pages
    recv = Receiver.start(dst)
    code, stats, err = finish(send(src, recv.port, "--max-bandwidth", "4M"))
    assert code == 0, err
    assert recv.result()[0] == 0
    # The limiter lets the first 8 MiB chunk go at once, then keeps to the rate.
    assert stats["total-time"] >= 1500
    assert stats["ram"]["mbps"] <= 4 * 8 * 1.049 * 1.1  # 4 MiB/s in Mbit/s, 10 % slack
