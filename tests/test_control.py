"""status, cancel and parameter changes, each against a live migration in real processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.migration_procs import ROOT, Guest, Receiver, finish, send, stop, wait_for_event


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zcmigrate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


def status(sock: Path) -> dict[str, Any]:
    r = ctl("status", "--socket", str(sock), "--json")
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def test_status_shows_a_running_migration_as_info_migrate_does(tmp_path: Path) -> None:
    src, dst, sock = tmp_path / "src.img", tmp_path / "dst.img", tmp_path / "ctl.sock"
    guest = Guest.start(src, "64M", "8M")
    recv = Receiver.start(dst)
    proc = send(src, recv.port, "--max-bandwidth", "16M", "--control-socket", str(sock))
    try:
        wait_for_event(proc, "connected")
        first = status(sock)
        assert first["status"] == "active"
        assert first["ram"]["total"] == 64 << 20
        # The numbers move while it runs: seen moving, not hoped to have moved after a
        # fixed sleep (at 16 MiB/s they do within a status call or two).
        deadline = time.monotonic() + 30
        second = status(sock)
        while second["ram"]["transferred"] <= first["ram"]["transferred"]:
            assert time.monotonic() < deadline, f"transferred stuck at {second['ram']}"
            time.sleep(0.1)
            second = status(sock)
        text = ctl("status", "--socket", str(sock))
        assert text.returncode == 0
        for label in ("Migration status: active", "transferred ram:", "remaining ram:",
                      "dirty sync count:", "multifd channel 0:"):
            assert label in text.stdout
    finally:
        ctl("set", "max-bandwidth", "0", "--socket", str(sock))
        code, _, err = finish(proc)
        stop(recv.proc)
        stop(guest.proc)
    assert code == 0, err
    assert not sock.exists(), "the control socket outlived the migration"


def test_raising_max_bandwidth_while_running_lets_a_stuck_migration_finish(
    tmp_path: Path,
) -> None:
    src, dst, sock = tmp_path / "src.img", tmp_path / "dst.img", tmp_path / "ctl.sock"
    guest = Guest.start(src, "64M", "8M")
    recv = Receiver.start(dst)
    # At 2 MiB/s the first pass alone would take 32 s.
    proc = send(src, recv.port, "--max-bandwidth", "2M", "--control-socket", str(sock))
    try:
        wait_for_event(proc, "connected")
        assert status(sock)["parameters"]["max-bandwidth"] == 2 << 20
        r = ctl("set", "downtime-limit", "500", "--socket", str(sock))
        assert r.returncode == 0, r.stderr
        bad = ctl("set", "downtime-limit", "0", "--socket", str(sock))
        assert bad.returncode != 0 and "downtime-limit" in bad.stderr
        assert status(sock)["parameters"]["downtime-limit"] == 500
        r = ctl("set", "max-bandwidth", "0", "--socket", str(sock))
        assert r.returncode == 0, r.stderr
        # Completing at all shows the new limit took: at 2 MiB/s, below the guest's 8 MiB/s
        # dirty rate, the migration could never converge. No time bound needed.
        code, stats, err = finish(proc, timeout=60)
        assert code == 0, err
        assert stats["parameters"]["max-bandwidth"] == 0
        assert stats["parameters"]["downtime-limit"] == 500
        assert recv.result()[0] == 0
    finally:
        stop(recv.proc)
        stop(guest.proc)


def test_cancel_through_the_control_socket(tmp_path: Path) -> None:
    src, dst, sock = tmp_path / "src.img", tmp_path / "dst.img", tmp_path / "ctl.sock"
    guest = Guest.start(src, "64M", "8M")
    recv = Receiver.start(dst)
    proc = send(src, recv.port, "--max-bandwidth", "4M", "--control-socket", str(sock))
    try:
        wait_for_event(proc, "connected")
        r = ctl("cancel", "--socket", str(sock))
        assert r.returncode == 0, r.stderr
        code, stats, _ = finish(proc)
        assert code == 4 and stats["status"] == "cancelled"
        assert recv.result()[0] != 0
        assert guest.running()
        assert not dst.exists()
    finally:
        stop(recv.proc)
        stop(guest.proc)


def test_status_without_a_migration_says_so(tmp_path: Path) -> None:
    r = ctl("status", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 1
    assert "no migration is running" in r.stderr
