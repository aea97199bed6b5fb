"""Post-copy recovery end to end (issue 13, item 3), real processes on loopback TCP: the
sender dies right after the device state left (the guest runs on the destination and
waits for pages only the source holds); the receiver keeps the guest's link and waits;
`send --resume` finishes the migration, oracle ok. Also: a resume with nothing to
resume, and a resume the receiver must refuse (wrong key, wrong migration), after which
the guest still waits and a right one completes.

The network break itself (nftables drop for 10 s between namespaces) is
tests/test_faults.py's test_postcopy_link_broken_for_10_s_resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.migration_procs import (
    Guest,
    Receiver,
    finish,
    send,
    spawn,
    stop,
    wait_for_event,
    wait_stopped,
)
from tests.test_postcopy import (  # noqa: F401 - the fixture
    DIRTY,
    SIZE,
    kill_receiver_during_postcopy,
    shm,
    stop_and_check_destination,
)
from zcmigrate.migrate.guest import GuestControl, LeaseMode, read_control_record
from zcmigrate.migrate.imagefiles import resume_path
from zcmigrate.migrate.keyfile import read_key


def assert_stalls(image: Path) -> None:
    """The destination's guest waits on a missing page, still linked to its receiver
    (which waits for the resume): alive, its write counter standing still."""
    time.sleep(0.5)
    before = read_control_record(image)
    time.sleep(1.0)
    after = read_control_record(image)
    assert before is not None and after is not None
    assert after.touched == before.touched, "the guest ran past a missing page"
    os.kill(after.pid, 0)


def _resume_in_process(src: Path, port: int, key: Path, *, uuid: bytes,
                       refused: str) -> None:
    import pytest

    from zcmigrate.migrate import source
    from zcmigrate.migrate.errors import PostcopyInterrupted
    from zcmigrate.migrate.params import MigrationParameters
    from zcmigrate.migrate.postcopy_resume import read_resume_record

    real = read_resume_record(src)
    assert real is not None
    job = source.SourceJob(src, source.Destination("127.0.0.1", port),
                           MigrationParameters(), auth_key=read_key(key), resume=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(source, "read_resume_record",
                   lambda image: dataclasses.replace(real, uuid=uuid))
        mp.setattr(source, "read_control_record", lambda image: None)
        with pytest.raises(PostcopyInterrupted, match=refused):
            job.run()


def _keygen(path: Path) -> None:
    p = spawn("keygen", str(path))
    assert p.wait(30) == 0


def _interrupted(src: Path, dst: Path, key: Path) -> tuple[Guest, Receiver]:
    """A post-copy whose sender is killed once the device state left."""
    guest = Guest.start(src, SIZE, DIRTY)
    recv = Receiver.start(dst, "--peer-timeout", "5", "--auth-key-file", str(key))
    proc = send(src, recv.port, "--max-bandwidth", "8M", "--postcopy", "--peer-timeout", "5",
                "--auth-key-file", str(key),
                env={"ZCMIGRATE_FAULT": "source:postcopy-device-sent"})
    wait_stopped(proc, 60)
    assert resume_path(src).exists(), "the resume record is written before the state leaves"
    time.sleep(0.5)  # the guest runs there and faults on what it lacks
    proc.kill()
    proc.wait()
    wait_for_event(recv.proc, "post-copy interrupted: waiting for the source to resume", 30)
    return guest, recv


def test_send_resume_finishes_a_postcopy_whose_sender_died(shm: Path) -> None:  # noqa: F811
    src, dst = shm / "src.img", shm / "dst.img"
    key, other = shm / "key", shm / "other"
    _keygen(key)
    _keygen(other)
    guest, recv = _interrupted(src, dst, key)
    try:
        assert_stalls(dst)
        with GuestControl.open(src) as g:
            assert g.lease.mode == LeaseMode.HOLD
        # Resuming the guest here is refused: it ran over there since the switch.
        r = subprocess.run([sys.executable, "-m", "zcmigrate", "resume", str(src)],
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode != 0 and "--resume" in r.stderr, r.stderr
        # A fresh migration of the image is refused: its guest runs over there.
        code, _, err = finish(send(src, recv.port, "--auth-key-file", str(key)), 60)
        assert code == 1 and "--resume" in err, err
        # Another key: the receiver refuses it, and waits on.
        code, _, err = finish(send(src, recv.port, "--resume", "--auth-key-file",
                                   str(other)), 60)
        assert code == 8 and "authentication failed" in err, err
        # Another migration's UUID: refused too.
        record = resume_path(src)
        saved = record.read_text()
        doc = json.loads(saved)
        doc["uuid"] = "00" * 16
        record.write_text(json.dumps(doc))
        code, _, err = finish(send(src, recv.port, "--resume", "--auth-key-file",
                                   str(key)), 60)
        # The source itself sees that its held guest names another migration.
        assert code == 2 and "not the interrupted one" in err, err
        record.write_text(saved)
        # The receiver refuses another UUID too (a source that got it wrong: in-process,
        # past the source's own check).
        _resume_in_process(src, recv.port, key, uuid=bytes(16),
                           refused="waits for the resume of migration")
        assert recv.proc.poll() is None, "the receiver gave up on a refused resume"
        assert_stalls(dst)
        # The right one finishes the migration.
        code, stats, err = finish(send(src, recv.port, "--resume", "--auth-key-file",
                                       str(key), "--multifd-zerocopy", "on"), 120)
        assert code == 0, err
        assert stats["status"] == "completed"
        assert '"event": "post-copy resumed: the destination is served again"' in err
        rcode, rout, rerr = recv.result(60)
        assert "after post-copy" in rout or "postcopy-requests" in rout
        assert rcode == 0, rerr
        assert '"event": "post-copy resume accepted"' in rerr
        assert not resume_path(src).exists()
        assert guest.proc.wait(10) == 0  # handed over: it exited
    finally:
        stop(guest.proc, signal.SIGKILL)
    stop_and_check_destination(dst)


def test_send_resume_with_nothing_to_resume_changes_nothing(shm: Path) -> None:  # noqa: F811
    src = shm / "src.img"
    guest = Guest.start(src, "1M", "1M")
    try:
        before = sorted(p.name for p in shm.iterdir())
        r = subprocess.run([sys.executable, "-m", "zcmigrate", "send", str(src), "--resume",
                            "--to", "127.0.0.1:9"], capture_output=True, text=True,
                           timeout=60, check=False)
        assert r.returncode == 2, r.stderr
        assert "nothing to resume" in r.stderr and "nothing was changed" in r.stderr
        assert sorted(p.name for p in shm.iterdir()) == before
        # Nor is there a post-copy guest to take over on it.
        r = subprocess.run([sys.executable, "-m", "zcmigrate", "receive", str(src),
                            "--resume", "--listen", "127.0.0.1:0"], capture_output=True,
                           text=True, timeout=60, check=False)
        assert r.returncode == 1 and "nothing to take over" in r.stderr, r.stderr
        assert sorted(p.name for p in shm.iterdir()) == before
        assert guest.running(), "the guest stopped running"
    finally:
        stop(guest.proc)


def test_a_new_receiver_takes_over_after_kill_9_and_send_resume_finishes(
        shm: Path) -> None:  # noqa: F811
    """kill -9 of the receiver during post-copy: the source exits 8; `receive IMAGE
    --resume` takes the waiting guest over on its socket and waits for the source;
    `send --resume` then finishes, oracle ok."""
    src, dst = shm / "src.img", shm / "dst.img"
    guest = Guest.start(src, SIZE, DIRTY)
    try:
        port, _ = kill_receiver_during_postcopy(src, dst)
        assert resume_path(dst).exists() and resume_path(src).exists()
        # The destination's record is not the source's: no `send --resume` from it.
        code, _, err = finish(send(dst, port, "--resume"), 60)
        assert code == 2 and "not its source" in err, err
        second = Receiver.start(dst, "--resume")
        wait_for_event(second.proc, "post-copy guest taken over", 30)
        wait_for_event(second.proc, "post-copy interrupted: waiting for the source to resume",
                       30)
        code, stats, err = finish(send(src, second.port, "--resume"), 120)
        assert code == 0, err
        assert stats["status"] == "completed"
        rcode, _, rerr = second.result(60)
        assert rcode == 0, rerr
        assert not resume_path(src).exists() and not resume_path(dst).exists()
        assert guest.proc.wait(10) == 0
    finally:
        stop(guest.proc, signal.SIGKILL)
    stop_and_check_destination(dst)


def test_a_device_state_that_never_arrived_is_resumed_here_on_the_operator_s_word(
        shm: Path) -> None:  # noqa: F811
    """The window between "the guest is held, its device state leaving" and the
    destination having it: the source dies there, so the destination never starts the
    guest and gives up with nothing committed. The held guest is not lost: a plain
    `resume` is refused (the guest might run there), the destination's two checks say it
    never did, and `resume --postcopy-never-started` runs it here again, record gone."""
    src, dst = shm / "src.img", shm / "dst.img"
    guest = Guest.start(src, SIZE, DIRTY)
    try:
        recv = Receiver.start(dst, "--peer-timeout", "5")
        proc = send(src, recv.port, "--max-bandwidth", "8M", "--postcopy",
                    env={"ZCMIGRATE_FAULT": "source:postcopy-device-sending"})
        wait_stopped(proc, 60)
        proc.kill()
        proc.wait(10)  # SIGKILL ends it; a wait past that is a stuck kernel
        rcode, _, rerr = recv.result(60)
        assert rcode == 1 and "nothing committed" in rerr, rerr
        assert resume_path(src).exists() and not resume_path(dst).exists()
        with GuestControl.open(src) as g:
            assert g.lease.mode == LeaseMode.HOLD

        def zcmigrate(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "zcmigrate", *args],
                                  capture_output=True, text=True, timeout=60, check=False)

        r = zcmigrate("resume", str(src))
        assert r.returncode == 1 and "--postcopy-never-started" in r.stderr, r.stderr
        assert not guest.running(1.0), "a refused resume let the guest run"
        # The destination's word: no guest to take over, nothing committed.
        r = zcmigrate("receive", str(dst), "--resume", "--listen", "127.0.0.1:0")
        assert r.returncode == 1 and "nothing to take over" in r.stderr, r.stderr
        r = zcmigrate("guest", "--check", str(dst))
        assert r.returncode == 1 and "no device state" in r.stderr, r.stderr
        r = zcmigrate("resume", str(src), "--postcopy-never-started")
        assert r.returncode == 0, r.stderr
        assert "resumed the guest" in r.stdout, r.stdout
        assert guest.running(), "the guest did not run again here"
        assert not resume_path(src).exists()
    finally:
        stop(guest.proc, signal.SIGKILL)


def test_a_receiver_killed_before_the_device_state_says_so_at_the_source(
        shm: Path) -> None:  # noqa: F811
    """The same window seen from a source that lives: the receiver dies after saying it
    is ready and before it read the device state. `send` exits 8 and says that no word
    came back that the guest runs there, naming the destination's checks and the way
    back; the destination has no record, and the guest resumes here on that word."""
    src, dst = shm / "src.img", shm / "dst.img"
    guest = Guest.start(src, SIZE, DIRTY)
    try:
        recv = Receiver.start(dst, env={"ZCMIGRATE_FAULT": "destination:postcopy-ready"})
        proc = send(src, recv.port, "--max-bandwidth", "8M", "--postcopy",
                    "--peer-timeout", "5")
        wait_stopped(recv.proc, 60)
        recv.proc.kill()
        recv.proc.wait(10)  # SIGKILL ends it; a wait past that is a stuck kernel
        code, _, err = finish(proc, 60)
        assert code == 8, err
        assert "no word came back that the guest runs" in err, err
        assert "nothing to take over" in err and "--postcopy-never-started" in err, err
        assert not resume_path(dst).exists()
        r = subprocess.run([sys.executable, "-m", "zcmigrate", "resume", str(src),
                            "--postcopy-never-started"], capture_output=True, text=True,
                           timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        assert guest.running(), "the guest did not run again here"
    finally:
        stop(guest.proc, signal.SIGKILL)
