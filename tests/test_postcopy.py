"""Post-copy end to end with real processes over loopback TCP (issue 13, items 2 and 4): a
guest dirtying twice what --max-bandwidth carries (plain precopy exits 5 on it:
tests/test_auto_converge.py) migrates with --postcopy, the receiver starts the guest
on the destination, its faults are served, and the oracle holds once every page is there;
`set postcopy-start` starts it by hand; and a peer killed during post-copy leaves a guest
that waits (no page invented) and a clear report on the other side (exit 8).

Images live in /dev/shm: post-copy needs the destination on a tmpfs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.migration_procs import (
    Guest,
    Receiver,
    finish,
    send,
    spawn,
    stop,
    wait_line,
    wait_stopped,
)
from zcmigrate.migrate.guest import (
    DeviceState,
    GuestControl,
    LeaseMode,
    PostcopyPhase,
    check_oracle,
    read_control_record,
    read_device_state,
)
from zcmigrate.migrate.imagefiles import control_path

SIZE, DIRTY, BANDWIDTH = "16M", "64M", "32M"  # the guest dirties twice what the link moves
NPAGES = (16 << 20) // 4096
DOWNTIME_TOLERANCE_MS = 400  # as tests/test_live_migration.py: a loaded 2-core host
SHM = Path("/dev/shm")


@pytest.fixture
def shm() -> Iterator[Path]:
    if not SHM.is_dir():
        pytest.skip("needs a tmpfs at /dev/shm")
    d = Path(tempfile.mkdtemp(prefix="zcm-pc-", dir=SHM))
    try:
        yield d
    finally:
        kill_destination_guest(d / "dst.img")
        shutil.rmtree(d, ignore_errors=True)


def kill_destination_guest(image: Path) -> None:
    """The receiver starts the destination's guest in a session of its own (it outlives
    the receiver): the test stops it by its pid."""
    record = read_control_record(image) if control_path(image).exists() else None
    if record is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGKILL)


def stop_and_check_destination(image: Path) -> None:
    """Ask the destination's guest to exit; the oracle holds for where it stopped."""
    with GuestControl.open(image) as g:
        g.request_exit(15.0)
    record = read_control_record(image)
    assert record is not None and record.postcopy.phase == PostcopyPhase.COMPLETE
    state = DeviceState(npages=NPAGES, page_size=4096, position=record.position,
                        value=record.value, touched=record.touched)
    verdict = check_oracle(image, state)
    assert verdict.ok, verdict.message


@pytest.mark.parametrize("zerocopy", ["on", "off"])
def test_postcopy_completes_a_guest_twice_as_fast_as_the_link(shm: Path, zerocopy: str) -> None:
    src, dst = shm / "src.img", shm / "dst.img"
    guest = Guest.start(src, SIZE, DIRTY)
    try:
        recv = Receiver.start(dst)
        code, stats, err = finish(send(src, recv.port, "--max-bandwidth", BANDWIDTH,
                                       "--postcopy", "--multifd-zerocopy", zerocopy))
        assert code == 0, err
        rcode, rout, rerr = recv.result()
        assert rcode == 0, rerr
    finally:
        stop(guest.proc)
    assert stats["status"] == "completed"
    assert '"event": "switching to post-copy"' in err
    limit = stats["parameters"]["downtime-limit"]
    # The downtime no longer depends on the dirty rate: pause to the guest running there.
    assert 0 < stats["downtime"] <= limit + DOWNTIME_TOLERANCE_MS, stats["downtime"]
    # A guest that touches every page at once asks for some before the push brings them.
    assert stats["postcopy-requests"] > 0 and stats["ram"]["postcopy-requests"] > 0
    assert stats["postcopy-latency-p99"] >= stats["postcopy-latency-median"] > 0
    assert stats["postcopy-total-time"] > 0
    assert '"postcopy-requests"' in rout
    if zerocopy == "on":
        assert all(c["zero-copy-queued"] > 0 for c in stats["multifd"]["channels"])
    # The source guest was handed over: it exited after the commit.
    assert guest.proc.wait(10) == 0
    stop_and_check_destination(dst)


def test_set_postcopy_start_switches_a_running_migration(shm: Path) -> None:
    """--postcopy-after 0: precopy iterates until `zcmigrate set postcopy-start` (QEMU's
    migrate-start-postcopy) asks for the switch."""
    src, dst = shm / "src.img", shm / "dst.img"
    sock = shm / "ctl.sock"
    guest = Guest.start(src, SIZE, DIRTY)
    try:
        recv = Receiver.start(dst)
        proc = send(src, recv.port, "--max-bandwidth", BANDWIDTH, "--postcopy",
                    "--postcopy-after", "0", "--control-socket", str(sock))
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(1.0)  # into precopy
        ask = spawn("set", "postcopy-start", str(src), "--socket", str(sock))
        assert wait_line(ask, "post-copy requested")
        assert ask.wait(30) == 0
        code, stats, err = finish(proc)
        assert code == 0, err
        assert '"event": "post-copy requested"' in err
        assert recv.result()[0] == 0
        assert stats["postcopy-total-time"] > 0
    finally:
        stop(guest.proc)
    stop_and_check_destination(dst)


def assert_waits_for_pages(image: Path) -> None:
    """The destination's guest lost its server: it stops at a missing page (its write
    counter stands still) instead of reading zeros, and says so in its control block."""
    deadline = time.monotonic() + 20
    while True:
        record = read_control_record(image)
        assert record is not None
        if record.postcopy.phase == PostcopyPhase.LOST:
            break
        assert time.monotonic() < deadline, record
        time.sleep(0.05)
    time.sleep(0.5)
    touched = read_control_record(image).touched  # type: ignore[union-attr]
    time.sleep(1.0)
    after = read_control_record(image)
    assert after is not None and after.touched == touched, "the guest ran past a missing page"
    os.kill(after.pid, 0)  # alive: paused on its page, not dead


def kill_receiver_during_postcopy(src: Path, dst: Path) -> tuple[int, str]:
    """A post-copy of src into dst whose receiver is killed (-9) once the guest runs on
    the destination: the dead receiver's port, and the source's stderr after it exited
    8."""
    recv = Receiver.start(dst, env={"ZCMIGRATE_FAULT": "destination:postcopy-running"})
    proc = send(src, recv.port, "--max-bandwidth", "8M", "--postcopy", "--peer-timeout", "5")
    wait_stopped(recv.proc, 60)
    recv.proc.kill()
    recv.proc.wait(10)  # SIGKILL ends it; a wait past that is a stuck kernel
    code, _, err = finish(proc, 60)
    assert code == 8, err
    return recv.port, err


def test_receiver_killed_during_postcopy(shm: Path) -> None:
    """kill -9 of the receiver while pages are missing: the source says post-copy was
    interrupted (exit 8) and keeps its guest held paused with every page; the guest on
    the destination waits."""
    src, dst = shm / "src.img", shm / "dst.img"
    guest = Guest.start(src, SIZE, DIRTY)
    try:
        _, err = kill_receiver_during_postcopy(src, dst)
        assert "post-copy interrupted" in err and "do not retire or resume" in err
        assert "--resume" in err
        assert guest.proc.poll() is None, "the source guest exited with pages still needed"
        with GuestControl.open(src) as g:
            assert g.lease.mode == LeaseMode.HOLD
        assert_waits_for_pages(dst)
    finally:
        stop(guest.proc, signal.SIGKILL)


def test_sender_killed_during_postcopy(shm: Path) -> None:
    """kill -9 of the sender once the guest runs on the destination: the receiver says
    post-copy was interrupted (exit 8) and that the guest waits; the guest invents no
    page."""
    src, dst = shm / "src.img", shm / "dst.img"
    guest = Guest.start(src, SIZE, DIRTY)
    try:
        # A short recovery wait: with none coming, the receiver gives up its wait (the
        # guest does not: tests/test_postcopy_recovery.py resumes one).
        recv = Receiver.start(dst, "--peer-timeout", "5", "--postcopy-recover-timeout", "2")
        proc = send(src, recv.port, "--max-bandwidth", "8M", "--postcopy",
                    env={"ZCMIGRATE_FAULT": "source:postcopy-device-sent"})
        wait_stopped(proc, 60)
        time.sleep(0.5)  # the guest starts there and faults on what it lacks
        proc.kill()
        proc.wait()
        rcode, _, rerr = recv.result(60)
        assert rcode == 8, rerr
        assert "post-copy interrupted" in rerr and "waits for the" in rerr
        assert "no resume came" in rerr
        assert_waits_for_pages(dst)
    finally:
        stop(guest.proc, signal.SIGKILL)


def test_a_precopy_that_converges_first_completes_as_precopy(shm: Path) -> None:
    """--postcopy with a slow guest: precopy converges before any switch; the guest the
    receiver started for post-copy never runs and goes, the image is committed."""
    src, dst = shm / "src.img", shm / "dst.img"
    guest = Guest.start(src, SIZE, "1M")
    try:
        recv = Receiver.start(dst)
        code, stats, err = finish(send(src, recv.port, "--postcopy"))
        assert code == 0, err
        assert recv.result()[0] == 0
        assert "switching to post-copy" not in err and "postcopy-requests" not in stats
    finally:
        stop(guest.proc)
    assert not control_path(dst).exists(), "the post-copy guest ran"
    verdict = check_oracle(dst, read_device_state(dst))
    assert verdict.ok, verdict.message
