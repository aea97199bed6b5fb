"""Auto-converge: a guest that dirties twice as fast as max-bandwidth cannot be migrated by
plain precopy (exit 5), and can be with --auto-converge, which throttles it step by step,
reports the throttle it needed, and never leaves the guest throttled. Real processes."""

from __future__ import annotations

from pathlib import Path

from tests.migration_procs import Guest, Receiver, finish, send, stop
from zcmigrate.migrate.guest import GuestControl, check_oracle, read_device_state

SIZE, DIRTY, BANDWIDTH = "16M", "64M", "32M"  # the guest dirties twice what the link moves


def test_plain_precopy_gives_up_on_a_guest_twice_as_fast_as_the_link(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    guest = Guest.start(src, SIZE, DIRTY)
    try:
        recv = Receiver.start(dst)
        code, stats, err = finish(send(src, recv.port, "--max-bandwidth", BANDWIDTH))
        assert code == 5, err
        assert "cannot converge" in err and "--auto-converge" not in stats.get("error-desc", "")
        assert guest.running()
        stop(recv.proc)
    finally:
        stop(guest.proc)


def test_auto_converge_completes_and_lifts_the_throttle(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    guest = Guest.start(src, SIZE, DIRTY)
    try:
        recv = Receiver.start(dst)
        code, stats, err = finish(send(src, recv.port, "--max-bandwidth", BANDWIDTH,
                                       "--auto-converge", "--throttle-initial", "30",
                                       "--throttle-increment", "20"))
        assert code == 0, err
        assert recv.result()[0] == 0
        # The throttle it needed: at least enough to bring 64 MiB/s under 32 MiB/s.
        assert stats["cpu-throttle-percentage"] >= 50, stats
        assert '"event": "guest throttled"' in err
        verdict = check_oracle(dst, read_device_state(dst))
        assert verdict.ok, verdict.message
    finally:
        stop(guest.proc)


def test_a_failed_migration_leaves_the_guest_unthrottled(tmp_path: Path) -> None:
    """Throttled, then given up (max-iterations reached): the guest runs at full speed."""
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    guest = Guest.start(src, SIZE, DIRTY)
    try:
        recv = Receiver.start(dst)
        code, stats, err = finish(send(src, recv.port, "--max-bandwidth", BANDWIDTH,
                                       "--auto-converge", "--throttle-initial", "10",
                                       "--throttle-increment", "10", "--max-iterations",
                                       "3"))
        assert code == 5, err
        assert stats["cpu-throttle-percentage"] > 0
        with GuestControl.open(src) as g:
            assert g.throttle == 0
        assert guest.running()
        stop(recv.proc)
    finally:
        stop(guest.proc)
