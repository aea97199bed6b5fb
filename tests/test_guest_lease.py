"""Exactly one guest, whatever fails (issue 10), on the guest's side, with real
processes: the pause is a lease its owner's death ends, unless it is a hold; a held
guest is settled by `zcmigrate resume` or `zcmigrate retire`, never while a migration
owns the image; a handed-over image starts no second guest; guest_holder names the
guest; and the throttle of auto-converge (issue 13) cuts what the guest dirties."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.guest_children import WAIT_S, guest, pauser, proc_state, throttler, zcmigrate
from tests.test_guest import guest_thread
from zcmigrate.migrate.guest import (
    CONTROL_FIELDS,
    MAX_THROTTLE,
    GuestControl,
    GuestError,
    GuestRequest,
    GuestState,
    LeaseMode,
    check_oracle,
    create_image,
    guest_holder,
    owner_alive,
    process_start_time,
    read_control_record,
    run_guest,
    write_device_state,
)
from zcmigrate.migrate.guest.layout import uuid_bytes, uuid_words
from zcmigrate.migrate.imagefiles import control_path, lock_path
from zcmigrate.migrate.imagelock import ImageLock
from zcmigrate.migrate.settle import settle_resume, settle_retire

PAGE = 4096
UUID = bytes.fromhex("0123456789abcdeffedcba9876543210")
LEASE_PROMISE_S = 1.0  # a dead owner's pause ends within this (the lease's promise)


def _wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def _runs(ctl: GuestControl) -> bool:
    """The guest makes progress: its write counter moves (it dirties 4 pages a tick)."""
    before = ctl.touched
    _wait_until(lambda: ctl.touched > before or ctl.state == GuestState.EXITED, "progress", 2.0)
    return ctl.state == GuestState.RUNNING


def _frozen(ctl: GuestControl, seconds: float) -> bool:
    """Paused all along for `seconds`: state, request and write counter never move,
    while the guest ticks (its heartbeat is fresh)."""
    touched = ctl.touched
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ctl.state != GuestState.PAUSED or ctl.request != GuestRequest.PAUSE:
            return False
        if ctl.touched != touched:
            return False
        time.sleep(0.01)
    return ctl.heartbeat_age < 0.1


def _poke(image: Path, field: str, value: int) -> None:
    fd = os.open(control_path(image), os.O_RDWR)
    try:
        os.pwrite(fd, value.to_bytes(8, sys.byteorder), CONTROL_FIELDS[field])
    finally:
        os.close(fd)


def _stop_and_check_oracle(g_proc: subprocess.Popen[bytes], ctl: GuestControl,
                           image: Path) -> None:
    g_proc.send_signal(signal.SIGTERM)
    assert g_proc.wait(timeout=WAIT_S) == 0
    assert ctl.state == GuestState.EXITED
    assert check_oracle(image, ctl.device_state()).ok


# --------------------------------------------------------------------------- the lease


def test_kill_9_of_the_process_that_paused_the_guest_resumes_it_within_a_second(
    tmp_path: Path,
) -> None:
    image = tmp_path / "img"
    with (
        guest(image, "--size", "1M", "--dirty-rate", "4M") as g,
        GuestControl.open(image) as ctl,
        pauser(image) as p,
    ):
        assert ctl.state == GuestState.PAUSED and _frozen(ctl, 0.3)
        lease = ctl.lease
        assert (lease.mode, lease.owner) == (LeaseMode.RESUME_IF_OWNER_DIES, p.pid)
        assert lease.owner_start == process_start_time(p.pid)

        killed = time.monotonic()
        os.kill(p.pid, signal.SIGKILL)
        _wait_until(lambda: ctl.state == GuestState.RUNNING, "the guest to resume", WAIT_S)
        took = time.monotonic() - killed
        assert took < LEASE_PROMISE_S, f"resumed {took:.3f} s after the kill"
        # Not reaped yet: the guest took the zombie for dead, as it must.
        assert proc_state(p.pid) == "Z"

        # It resumed, it did not exit, and the control block says why.
        assert g.proc.poll() is None and _runs(ctl)
        assert ctl.request == GuestRequest.RESUME
        lease = ctl.lease
        assert (lease.mode, lease.owner) == (LeaseMode.LAPSED, p.pid)
        assert f"guest resumed by itself: the migration (pid {p.pid})" in g.expect("resumed")
        _stop_and_check_oracle(g.proc, ctl, image)


def test_a_held_pause_outlives_its_owner(tmp_path: Path) -> None:
    image = tmp_path / "img"
    with (
        guest(image, "--size", "1M", "--dirty-rate", "4M") as g,
        GuestControl.open(image) as ctl,
        pauser(image, hold=UUID) as p,
    ):
        assert (ctl.lease.mode, ctl.lease.migration) == (LeaseMode.HOLD, UUID)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        # Twice the time a lease in the other mode takes to end, at 50 ms owner checks.
        assert _frozen(ctl, 2 * LEASE_PROMISE_S)
        assert g.proc.poll() is None
        assert b"resumed" not in g.out
        # Nobody else takes the pause over either.
        with pytest.raises(GuestError, match=r"held paused.*zcmigrate resume"):
            ctl.pause(timeout=1.0)
        assert ctl.state == GuestState.PAUSED


def test_a_reused_pid_is_not_the_owner(tmp_path: Path) -> None:
    """The owner's start time is part of the lease: a pid that now belongs to a process
    started at another time does not keep the guest paused."""
    image = tmp_path / "img"
    with (
        guest(image, "--size", "1M", "--dirty-rate", "4M") as g,
        GuestControl.open(image) as ctl,
        subprocess.Popen(["sleep", "60"]) as sleeper,
    ):
        try:
            ctl.pause(owner=sleeper.pid)
            assert _frozen(ctl, 0.3)  # a live owner keeps it paused
            start = ctl.lease.owner_start
            assert start == process_start_time(sleeper.pid)
            _poke(image, "lease_start", start + 1)  # as if the pid had been reused
            _wait_until(lambda: ctl.state == GuestState.RUNNING, "resume", LEASE_PROMISE_S + 1)
            assert ctl.lease.mode == LeaseMode.LAPSED
            assert g.proc.poll() is None
        finally:
            sleeper.kill()


def test_owner_alive_tells_the_living_the_dead_the_zombie_and_the_impostor() -> None:
    me = os.getpid()
    start = process_start_time(me)
    assert start is not None and start > 0
    assert owner_alive(me, start) and owner_alive(me, 0)
    assert not owner_alive(me, start + 1)
    assert not owner_alive(0, 0) and not owner_alive(-1, 0)
    with subprocess.Popen(["sleep", "60"]) as zombie:
        zstart = process_start_time(zombie.pid)
        assert zstart is not None
        zombie.kill()
        _wait_until(lambda: proc_state(zombie.pid) == "Z", "a zombie", WAIT_S)
        assert not owner_alive(zombie.pid, zstart)
        assert process_start_time(zombie.pid) is None
    assert not owner_alive(zombie.pid, zstart)  # reaped


def test_a_pause_is_refused_while_a_live_owner_holds_it_and_waits_out_a_dead_one(
    tmp_path: Path,
) -> None:
    image = tmp_path / "img"
    with (
        guest(image, "--size", "1M", "--dirty-rate", "4M") as g,
        GuestControl.open(image) as ctl,
    ):
        with pauser(image) as p:
            with pytest.raises(GuestError, match=f"already paused by pid {p.pid}"):
                ctl.pause(timeout=1.0)
            assert ctl.lease.owner == p.pid  # the refusal left its lease alone
            os.kill(p.pid, signal.SIGKILL)
            _wait_until(lambda: proc_state(p.pid) == "Z", "the pauser's death")
            # The guest resumes itself first, then this pause is taken.
            state = ctl.pause(timeout=5.0)
            assert ctl.lease.owner == os.getpid()
            assert ctl.lease.mode == LeaseMode.RESUME_IF_OWNER_DIES
            assert _frozen(ctl, 0.2) and ctl.device_state() == state
        ctl.resume()
        assert ctl.lease.mode == LeaseMode.NONE and ctl.lease.owner == 0
        assert _runs(ctl)
        _stop_and_check_oracle(g.proc, ctl, image)


def test_hold_needs_a_pause_and_names_the_migration(tmp_path: Path) -> None:
    image = tmp_path / "img"
    create_image(image, 64 * PAGE, PAGE, "zero")
    with guest_thread(image, dirty_rate=64 << 10) as ctl:
        with pytest.raises(GuestError, match="not paused"):
            ctl.hold(UUID)
        with pytest.raises(GuestError, match="16 bytes"):
            ctl.hold(b"short")
        ctl.pause()
        ctl.hold(UUID)
        assert (ctl.lease.mode, ctl.lease.migration) == (LeaseMode.HOLD, UUID)
        ctl.resume()
        assert ctl.lease.mode == LeaseMode.NONE


def test_uuid_words_round_trip() -> None:
    assert uuid_bytes(*uuid_words(UUID)) == UUID
    assert uuid_words(None) == (0, 0) and uuid_bytes(0, 0) is None
    assert uuid_words(UUID)[0] == 0x0123456789ABCDEF


# --------------------------------------------------------------------------- settling


def _held_guest_args() -> tuple[str, ...]:
    return ("--size", "1M", "--dirty-rate", "4M")


def test_resume_command_resumes_a_held_guest_and_refuses_while_a_migration_owns_it(
    tmp_path: Path,
) -> None:
    image = tmp_path / "img"
    with (
        guest(image, *_held_guest_args()) as g,
        GuestControl.open(image) as ctl,
    ):
        with pauser(image, hold=UUID) as p:
            refused = zcmigrate("resume", str(image))
            assert refused.returncode == 1
            assert f"the migration that paused it still runs (pid {p.pid}" in refused.stderr
            os.kill(p.pid, signal.SIGKILL)
        assert _frozen(ctl, 0.2)

        with ImageLock(lock_path(image), "test migration"):
            busy = zcmigrate("resume", str(image))
            assert busy.returncode == 1
            assert f"held by pid {os.getpid()}" in busy.stderr
            assert f"zcmigrate cancel {image}" in busy.stderr
            assert _frozen(ctl, 0.2)

        done = zcmigrate("resume", str(image))
        assert done.returncode == 0, done.stderr
        assert f"resumed the guest (pid {g.pid}) on {image}: it runs here again" in done.stdout
        assert "0123456789abcdeffedcba9876543210" in done.stdout
        assert "zcmigrate guest --check DEST_IMAGE" in done.stdout
        assert _runs(ctl) and ctl.lease.mode == LeaseMode.NONE

        again = zcmigrate("resume", str(image))
        assert again.returncode == 0 and "runs already" in again.stdout
        _stop_and_check_oracle(g.proc, ctl, image)


def test_retire_command_hands_a_held_guest_over_and_refuses_while_a_migration_owns_it(
    tmp_path: Path,
) -> None:
    image = tmp_path / "img"
    with (
        guest(image, *_held_guest_args()) as g,
        GuestControl.open(image) as ctl,
    ):
        with pauser(image, hold=UUID) as p:
            os.kill(p.pid, signal.SIGKILL)
        paused_at = ctl.device_state()

        with ImageLock(lock_path(image), "test migration"):
            busy = zcmigrate("retire", str(image))
            assert busy.returncode == 1 and f"zcmigrate cancel {image}" in busy.stderr
            assert _frozen(ctl, 0.2) and g.proc.poll() is None

        before = time.time_ns()
        done = zcmigrate("retire", str(image))
        assert done.returncode == 0, done.stderr
        assert f"retired the guest (pid {g.pid}) on {image}" in done.stdout
        assert g.wait() == 0
        assert "guest exited: handed over" in g.expect("handed over")
        lease = ctl.lease
        assert lease.migration == UUID and lease.handed_over_ns >= before
        # Nothing deleted: the image holds the guest as it was paused.
        assert ctl.device_state() == paused_at and check_oracle(image, paused_at).ok

    assert guest_holder(image) is None
    refused = zcmigrate("guest", str(image))
    assert refused.returncode == 1
    assert "handed over to a destination" in refused.stderr and "--force" in refused.stderr
    assert "second copy" in refused.stderr
    with guest(image, "--force") as forced, GuestControl.open(image) as ctl:
        assert ctl.pid == forced.pid and _runs(ctl)
        assert check_oracle(image, ctl.pause()).ok


def test_retire_refuses_a_running_guest_and_a_pause_that_is_not_a_hold(tmp_path: Path) -> None:
    image = tmp_path / "img"
    with (
        guest(image, *_held_guest_args()) as g,
        GuestControl.open(image) as ctl,
    ):
        running = zcmigrate("retire", str(image))
        assert running.returncode == 1 and "it is not paused" in running.stderr
        with pauser(image) as p:
            watched = zcmigrate("retire", str(image))
            assert watched.returncode == 1 and "not a hold" in watched.stderr
            os.kill(p.pid, signal.SIGKILL)
        assert _runs(ctl)
        assert g.proc.poll() is None and ctl.lease.handed_over_ns == 0


def test_a_guest_that_ended_held_is_not_restarted_until_settled(tmp_path: Path) -> None:
    image = tmp_path / "img"
    with guest(image, *_held_guest_args()) as g, pauser(image, hold=UUID):
        g.proc.kill()  # the source host's guest dies while its device state is out
        g.wait()
    refused = zcmigrate("guest", str(image))
    assert refused.returncode == 1
    assert "ended held paused" in refused.stderr and f"zcmigrate retire {image}" in refused.stderr
    nothing = zcmigrate("resume", str(image))
    assert nothing.returncode == 1 and "--force" in nothing.stderr

    marked = zcmigrate("retire", str(image))
    assert marked.returncode == 0, marked.stderr
    assert f"marked {image} handed over (migration {UUID.hex()})" in marked.stdout
    record = read_control_record(image)
    assert record is not None and record.lease.handed_over_ns > 0
    assert "handed over" in zcmigrate("guest", str(image)).stderr


def test_the_job_settles_its_own_held_pause_with_the_same_functions(tmp_path: Path) -> None:
    """settle_resume and settle_retire take an open handle and no lock, for a job that
    holds IMAGE.lock and the lease itself."""
    image = tmp_path / "img"
    create_image(image, 64 * PAGE, PAGE, "zero")
    with guest_thread(image, dirty_rate=64 << 10) as ctl:
        ctl.pause()
        ctl.hold(UUID)
        assert settle_resume(ctl).action == "resumed"
        assert ctl.state == GuestState.RUNNING and ctl.lease.mode == LeaseMode.NONE
        with pytest.raises(GuestError, match="not paused"):
            settle_retire(ctl)
        paused = ctl.pause()
        ctl.hold(UUID)
        settled = settle_retire(ctl)
        assert (settled.action, settled.pid) == ("retired", os.getpid())
        assert ctl.state == GuestState.EXITED and ctl.lease.handed_over_ns > 0
        assert ctl.device_state() == paused
        with pytest.raises(GuestError, match="second copy"):
            ctl.resume()


def test_settling_an_image_without_a_guest_says_so_and_leaves_no_lock_file(
    tmp_path: Path,
) -> None:
    for verb in ("resume", "retire"):
        r = zcmigrate(verb, str(tmp_path / "img"))
        assert r.returncode == 1 and f"nothing to {verb}: no guest control file" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_device_state_newer_than_the_hand_over_resumes(tmp_path: Path) -> None:
    """A guest that was handed over and came back (a later migration committed here)
    resumes; a device state older than the hand-over does not."""
    image = tmp_path / "img"
    create_image(image, 64 * PAGE, PAGE, "zero")
    with guest_thread(image, dirty_rate=64 << 10) as ctl:
        state = ctl.pause()
        write_device_state(image, state)  # older than the hand-over below
        ctl.hand_over(UUID, timeout=5.0)
    with pytest.raises(GuestError, match="handed over"):
        run_guest(image, dirty_rate=0, resume=state)
    # As a later migration's commit; file times tick with the kernel's coarse clock,
    # which may lag the mark's by a jiffy.
    time.sleep(0.05)
    write_device_state(image, state)
    with guest_thread(image, dirty_rate=64 << 10, resume=state) as ctl:
        assert ctl.pause().position == state.position


# --------------------------------------------------------------------------- who runs


def test_guest_holder_names_the_guest_and_none_once_it_is_gone(tmp_path: Path) -> None:
    image = tmp_path / "img"
    assert guest_holder(image) is None
    with guest(image, "--size", "1M", "--dirty-rate", "1M") as g:
        assert guest_holder(image) == g.pid
        g.proc.send_signal(signal.SIGTERM)
        assert g.wait() == 0
        assert guest_holder(image) is None
    with guest(image, "--dirty-rate", "1M") as g:
        assert guest_holder(image) == g.pid
        g.proc.kill()
        g.wait()
        assert guest_holder(image) is None  # the lock goes with the process


# --------------------------------------------------------------------------- throttle


def _touched_in(ctl: GuestControl, throttle: int, seconds: float) -> int:
    ctl.throttle = throttle
    time.sleep(0.05)  # a tick or two to take the new share
    before = ctl.touched
    time.sleep(seconds)
    return ctl.touched - before


@pytest.mark.parametrize(("rate", "throttle", "low", "high"), [
    # A modest rate (2048 pages a second): the guest has CPU to spare, so the credit
    # it earns is the whole story and 500 per mille halves it.
    ("8M", 500, 0.35, 0.65),
    # As fast as it can: only the time it runs counts. 900 per mille leaves a tenth,
    # and a busy machine can only slow the unthrottled windows, not speed these up.
    ("0", 900, 0.0, 0.5),
])
def test_throttle_cuts_what_the_guest_dirties(
    tmp_path: Path, rate: str, throttle: int, low: float, high: float
) -> None:
    image = tmp_path / "img"
    with (
        guest(image, "--size", "4M", "--dirty-rate", rate) as g,
        GuestControl.open(image) as ctl,
    ):
        free = slow = 0
        for _ in range(3):  # interleaved, so a change in load hits both alike
            free += _touched_in(ctl, 0, 0.4)
            slow += _touched_in(ctl, throttle, 0.4)
        assert free > 0 and slow > 0, (free, slow)
        assert low < slow / free < high, (free, slow)
        assert f"guest throttle: {throttle} per mille" in g.expect("per mille")


def test_throttle_is_validated_and_lifted_when_its_setter_dies(tmp_path: Path) -> None:
    image = tmp_path / "img"
    with (
        guest(image, "--size", "1M", "--dirty-rate", "1M") as g,
        GuestControl.open(image) as ctl,
    ):
        for bad in (-1, MAX_THROTTLE + 1, 1000, True, 0.5):
            with pytest.raises(GuestError, match="throttle must be"):
                ctl.throttle = bad  # type: ignore[assignment]
        with throttler(image, 900) as t:
            assert ctl.throttle == 900
            g.expect("guest throttle: 900 per mille")
            os.kill(t.pid, signal.SIGKILL)
            _wait_until(lambda: ctl.throttle == 0, "the throttle to be lifted", 2.0)
        assert f"pid {t.pid}, which set it, is gone" in g.expect("lifted")
