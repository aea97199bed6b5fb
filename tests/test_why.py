"""Issue 10's "Why" list, one test per item: each thing that let a migration end with no
guest, two guests, a guest paused for ever or a process waiting for ever, shown with real
processes, on loopback unless the fault needs a link to pull (a namespace pair then) or
a firewall (a namespace of its own, so the host's rules are never touched).

Small guests (16 MiB): what is checked here is who refuses, who waits how long, and what
is committed, not throughput. The bounds are those of tests/fault_lab.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.children import Child
from tests.dropping_proxy import DroppingProxy
from tests.fault_lab import (
    LEASE,
    LEASE_MARGIN,
    MIGRATION_BOUND,
    PEER_BOUND,
    PEER_TIMEOUT,
    Lab,
    committed,
    guest_moves,
    reports_full,
    scratch_dir,
    sigcont,
    stays_paused,
    wait_running,
)
from tests.netns import (
    IS_ROOT,
    NamespacePair,
    loopback_namespace,
    namespace_pair,
    netns_missing,
    nft_drop,
    nft_missing,
)

SIZE = "16M"
DIRTY = "8M"
# A refusal at start comes before any network wait: the process's start-up and a look
# at some files, on a shared machine.
START_BOUND = 15.0
# Receivers, senders and guests reach their fault points within this (16 MiB images).
REACH_BOUND = 60.0


def unavailable(why: str | None) -> None:
    """Skip with the reason, except in CI on this machine, where every test must run."""
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"cannot run in CI: {why}")
    pytest.skip(why)


@pytest.fixture
def lab() -> Iterator[Lab]:
    d = scratch_dir("zcwhy-")
    lab = Lab(d)
    try:
        yield lab
    finally:
        lab.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def pair() -> Iterator[NamespacePair]:
    unavailable(netns_missing())
    with namespace_pair("zcwhy") as p:
        yield p


def static_image(path: Path, size: int = 16 << 20) -> Path:
    """An image without a guest: random pages, then zero pages."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size // 2) + bytes(size - size // 2))
    return path


def refused_at_start(child: Child, what: str, before: str = "listening:") -> str:
    """`child` must exit by itself, not with a usage error, before it ever prints
    `before`; returns what it said."""
    code = child.refusal(START_BOUND, before, what)
    assert code not in (0, 2), f"{what}: exit {code}, expected a refusal\n{child.describe()}"
    return child.err + child.out


# ------------------------------------------------------------------ the items


def test_control_commands_reach_only_the_migration_of_their_image(lab: Lab) -> None:
    """`zcmigrate cancel /a/vm.img` must not reach the migration of /b/vm.img; nor status
    or set (control sockets are named by the image's full path)."""
    a, b = lab.workdir / "a" / "vm.img", lab.workdir / "b" / "vm.img"
    a.parent.mkdir()
    b.parent.mkdir()
    guests = {a: lab.guest(a, size="16M", dirty_rate="4M"),
              b: lab.guest(b, size="32M", dirty_rate="4M")}
    sends = {}
    for img in (a, b):
        recv = lab.receive(img.parent / "dst.img", name=f"receiver {img.parent.name}")
        # Slow, so both are still running while we talk to them.
        sends[img] = lab.send(img, recv.port, "--max-bandwidth", "2M",
                              name=f"sender {img.parent.name}")
    for proc in sends.values():
        proc.wait_event("connected", REACH_BOUND)

    def status(img: Path) -> dict[str, object]:
        r = lab.run("status", str(img), "--json")
        assert r.returncode == 0, f"status {img}: {r.stderr}"
        doc: dict[str, object] = json.loads(r.stdout)
        return doc

    sa, sb = status(a), status(b)
    assert sa["ram"]["total"] == 16 << 20, "status /a/vm.img showed another migration"  # type: ignore[index]
    assert sb["ram"]["total"] == 32 << 20, "status /b/vm.img showed another migration"  # type: ignore[index]
    r = lab.run("set", "downtime-limit", "777", str(a))
    assert r.returncode == 0, r.stderr
    assert status(a)["parameters"]["downtime-limit"] == 777  # type: ignore[index]
    assert status(b)["parameters"]["downtime-limit"] != 777, "set on /a reached /b"  # type: ignore[index]
    r = lab.run("cancel", str(a))
    assert r.returncode == 0, r.stderr
    assert sends[a].wait_exit(PEER_BOUND) == 4, sends[a].describe()
    assert sends[b].alive, f"cancel of /a/vm.img ended /b's migration\n{sends[b].describe()}"
    assert status(b)["status"] == "active"
    assert guest_moves(a) and guest_moves(b)
    r = lab.run("set", "max-bandwidth", "0", str(b))
    assert r.returncode == 0, r.stderr
    assert sends[b].wait_exit(MIGRATION_BOUND) == 0, sends[b].describe()
    guests[b].wait_exit(10)


def test_a_receiver_refuses_an_existing_destination_unless_replace(lab: Lab) -> None:
    """An existing destination file is refused unless --replace; one a running guest
    holds is refused always, --replace or not."""
    src = static_image(lab.workdir / "src.img")
    dst = static_image(lab.workdir / "dst.img", 8 << 20)
    said = refused_at_start(lab.spawn("receive", str(dst), "--listen", "127.0.0.1:0",
                                      name="receiver without --replace"),
                            "an existing destination without --replace")
    assert "--replace" in said, f"the refusal does not name --replace: {said}"
    recv = lab.receive(dst, "--replace")
    send = lab.send(src, recv.port)
    assert send.wait_exit(MIGRATION_BOUND) == 0, send.describe()
    assert recv.child.wait_exit(PEER_BOUND) == 0, recv.child.describe()
    assert dst.read_bytes() == src.read_bytes()
    held = lab.workdir / "held.img"
    guest = lab.guest(held, size=SIZE, dirty_rate=DIRTY)
    said = refused_at_start(lab.spawn("receive", str(held), "--listen", "127.0.0.1:0",
                                      "--replace", name="receiver onto a running guest"),
                            "a destination a running guest holds, with --replace")
    assert str(guest.pid) in said or "guest" in said.lower(), (
        f"the refusal does not say a guest (pid {guest.pid}) holds it: {said}")
    assert guest_moves(held), "the guest on the destination stopped"


def test_a_second_send_of_the_same_image_is_refused_naming_the_first(lab: Lab) -> None:
    src = lab.workdir / "src.img"
    guest = lab.guest(src, size=SIZE, dirty_rate=DIRTY)
    r1 = lab.receive(lab.workdir / "dst1.img", name="receiver 1")
    first = lab.send(src, r1.port, "--max-bandwidth", "2M", name="first sender")
    first.wait_event("connected", REACH_BOUND)
    r2 = lab.receive(lab.workdir / "dst2.img", name="receiver 2")
    second = lab.send(src, r2.port, "--control-socket", str(lab.runtime / "second.sock"),
                      name="second sender")
    code = second.wait_exit(START_BOUND, "a second send of the same image was not refused")
    assert code not in (0, 2), f"second send: exit {code}\n{second.describe()}"
    assert str(first.pid) in second.err + second.out, (
        f"the refusal does not name the first sender's pid {first.pid}\n{second.describe()}")
    lab.assert_nothing_committed(lab.workdir / "dst2.img", "second send")
    assert lab.run("set", "max-bandwidth", "0", str(src)).returncode == 0
    assert first.wait_exit(MIGRATION_BOUND) == 0, first.describe()
    assert lab.assert_one_guest(guest, src, lab.workdir / "dst1.img") == "destination"


def test_a_paused_guest_resumes_by_itself_within_a_second_when_send_dies(lab: Lab) -> None:
    src, dst = lab.workdir / "src.img", lab.workdir / "dst.img"
    guest = lab.guest(src, size=SIZE, dirty_rate=DIRTY)
    recv = lab.receive(dst)
    send = lab.send(src, recv.port, faults=("source:paused",))
    send.wait_stopped(REACH_BOUND)
    assert not guest_moves(src, 0.3), "the guest was not paused at source:paused"
    send.kill()
    killed = time.monotonic()
    running = wait_running(src, killed + LEASE + LEASE_MARGIN)
    assert running is not None, (
        f"the guest stayed paused {LEASE + LEASE_MARGIN:g} s after its sender died "
        f"(bound {LEASE:g} s, +{LEASE_MARGIN:g} s for our polling)\n{guest.describe()}")
    assert recv.child.exit_within(PEER_BOUND, killed, "receiver after its sender died") == 1
    lab.assert_nothing_committed(dst, "sender killed while paused")


def uncertain_outcome(lab: Lab, recv_point: str) -> tuple[Child, Path, Path, Child]:
    """The device state leaves, the receiver stops at `recv_point` and is killed there:
    the source must exit 6 with its guest paused, naming resume and retire."""
    src, dst = lab.workdir / "src.img", lab.workdir / "dst.img"
    guest = lab.guest(src, size=SIZE, dirty_rate=DIRTY)
    recv = lab.receive(dst, faults=(recv_point,))
    send = lab.send(src, recv.port, faults=("source:device-sent",))
    send.wait_stopped(REACH_BOUND)
    recv.child.wait_stopped(REACH_BOUND)
    recv.child.kill()
    fault = time.monotonic()
    sigcont(send)
    code = send.exit_within(PEER_BOUND, fault, "device state left, receiver killed")
    assert code == 6, f"send exit {code}, expected 6\n{send.describe()}"
    said = send.err + str(send.json_doc().get("error-desc", ""))
    assert "zcmigrate resume" in said and "zcmigrate retire" in said, (
        f"exit 6 does not name `zcmigrate resume` and `zcmigrate retire`\n{send.describe()}")
    assert guest.alive and stays_paused(src, LEASE + LEASE_MARGIN), (
        "the guest resumed by itself although the device state had left")
    return guest, src, dst, send


def test_after_the_device_state_left_the_guest_stays_paused_and_resume_settles_it(
    lab: Lab,
) -> None:
    guest, src, dst, _ = uncertain_outcome(lab, "destination:committing")
    lab.assert_nothing_committed(dst, "receiver killed before its commit")
    r = lab.run("resume", str(src))
    assert r.returncode == 0, f"zcmigrate resume: exit {r.returncode}: {r.stdout}{r.stderr}"
    assert wait_running(src, time.monotonic() + 2) is not None, "resume did not resume"
    assert lab.assert_one_guest(guest, src, dst) == "source"


def test_after_the_device_state_left_the_guest_stays_paused_and_retire_settles_it(
    lab: Lab,
) -> None:
    guest, src, dst, _ = uncertain_outcome(lab, "destination:committed")
    assert committed(dst)
    r = lab.run("retire", str(src))
    assert r.returncode == 0, f"zcmigrate retire: exit {r.returncode}: {r.stdout}{r.stderr}"
    assert guest.wait_exit(10, "the retired guest did not exit") is not None
    assert lab.assert_one_guest(guest, src, dst) == "destination"


def test_after_a_completed_migration_the_source_refuses_a_guest_without_force(lab: Lab) -> None:
    src, dst = lab.workdir / "src.img", lab.workdir / "dst.img"
    guest = lab.guest(src, size=SIZE, dirty_rate=DIRTY)
    lab.migrate(src, dst, from_ns=None, to_ns=None)
    guest.wait_exit(10)
    again = lab.spawn("guest", str(src), "--dirty-rate", DIRTY, name="guest on the old source")
    said = refused_at_start(again, "a guest on a source image whose guest migrated away",
                            before="guest running")
    assert "--force" in said, f"the refusal does not name --force\n{again.describe()}"
    forced = lab.spawn("guest", str(src), "--dirty-rate", DIRTY, "--force",
                       name="forced guest")
    forced.wait_line("guest running", START_BOUND)


def test_sigterm_to_the_receiver_during_the_commit_finishes_the_commit(lab: Lab) -> None:
    """Once the device state is in, SIGTERM cannot undo the commit: the receiver finishes,
    reports committed and never sends ERROR; the source reports completed (or, if the
    acknowledgement was lost, exit 6 naming resume and retire)."""
    src, dst = lab.workdir / "src.img", lab.workdir / "dst.img"
    guest = lab.guest(src, size=SIZE, dirty_rate=DIRTY)
    recv = lab.receive(dst, faults=("destination:committing",))
    send = lab.send(src, recv.port)
    recv.child.wait_stopped(REACH_BOUND)
    recv.child.signal(signal.SIGTERM)  # pending until it runs again
    fault = time.monotonic()
    sigcont(recv.child)
    rcode = recv.child.exit_within(PEER_BOUND, fault, "receiver terminated during the commit")
    scode = send.exit_within(PEER_BOUND, fault, "sender of a receiver terminated mid-commit")
    assert committed(dst), f"the commit did not finish\n{recv.child.describe()}"
    assert rcode in (0, 7), f"receive exit {rcode}, expected 0 or 7\n{recv.child.describe()}"
    assert "nothing committed" not in recv.child.err, recv.child.describe()
    said = recv.child.out + recv.child.err
    assert recv.child.json_doc().get("status") == "completed" or re.search(
        r"(?<!nothing )committed", said), f"the receiver does not report its commit: {said}"
    assert "the destination failed" not in send.err + send.out, "the receiver sent ERROR"
    if scode == 6:
        said = send.err + str(send.json_doc().get("error-desc", ""))
        assert "zcmigrate resume" in said and "zcmigrate retire" in said, send.describe()
        assert lab.settle_uncertain(src, dst) == "destination"
    else:
        assert scode == 0, f"send exit {scode}, expected 0 (or 6)\n{send.describe()}"
        assert send.json_doc().get("status") == "completed"
    assert lab.assert_one_guest(guest, src, dst) == "destination"


def test_a_source_that_loses_power_does_not_leave_the_receiver_waiting(
    pair: NamespacePair,
) -> None:
    """The source host vanishes mid-precopy: its link goes down for good and its processes
    with it, so no FIN or RST ever comes. The receiver must give up by itself."""
    d = scratch_dir("zcwhy-")
    lab = Lab(d, pair)
    try:
        src, dst = d / "src.img", d / "dst.img"
        guest = lab.guest(src, size=SIZE, dirty_rate=DIRTY)
        recv = lab.receive(dst)
        send = lab.send(src, recv.port, faults=("source:precopy",))
        send.wait_stopped(REACH_BOUND)
        pair.link_down()
        send.kill()
        guest.kill()
        fault = time.monotonic()
        rcode = recv.child.exit_within(PEER_BOUND, fault, "the source lost power")
        assert rcode == 1, f"receive exit {rcode}, expected 1\n{recv.child.describe()}"
        lab.assert_nothing_committed(dst, "the source lost power")
    finally:
        lab.close()
        pair.link_up()
        shutil.rmtree(d, ignore_errors=True)


def test_a_stalled_destination_does_not_keep_the_source_guest_paused(lab: Lab) -> None:
    """The receiver stops (SIGSTOP) while the source guest is paused: the pause lasts at
    most downtime-limit + peer-timeout, then the source gives up and resumes its guest,
    and the receiver, let go on afterwards, commits nothing."""
    src, dst = lab.workdir / "src.img", lab.workdir / "dst.img"
    guest = lab.guest(src, size=SIZE, dirty_rate=DIRTY)
    recv = lab.receive(dst)
    send = lab.send(src, recv.port, faults=("source:paused",))
    paused = send.wait_stopped(REACH_BOUND)
    recv.child.signal(signal.SIGSTOP)
    sigcont(send)
    bound = 0.3 + PEER_BOUND  # the default downtime-limit, 300 ms
    running = wait_running(src, paused + bound)
    assert running is not None, (
        f"the guest stayed paused more than {bound:g} s (downtime-limit 300 ms + "
        f"peer-timeout {PEER_TIMEOUT:g} s + margin) behind a stalled destination\n"
        f"{send.describe()}")
    assert send.exit_within(bound, paused, "sender of a stalled destination") == 1
    woke = time.monotonic()
    sigcont(recv.child)
    rcode = recv.child.exit_within(PEER_BOUND, woke, "the stalled receiver, let go on")
    lab.assert_nothing_committed(dst, "a destination stalled while the guest was paused")
    assert rcode == 1, f"receive exit {rcode}\n{recv.child.describe()}"
    assert lab.assert_one_guest(guest, src, dst) == "source"


def test_a_second_receiver_on_the_same_image_is_refused_at_start(lab: Lab) -> None:
    src = static_image(lab.workdir / "src.img")
    dst = lab.workdir / "dst.img"
    first = lab.receive(dst, name="first receiver")
    said = refused_at_start(lab.spawn("receive", str(dst), "--listen", "127.0.0.1:0",
                                      name="second receiver"),
                            "a second receiver on the same image")
    assert str(first.child.pid) in said, (
        f"the refusal does not name the first receiver's pid {first.child.pid}: {said}")
    send = lab.send(src, first.port)
    assert send.wait_exit(MIGRATION_BOUND) == 0, send.describe()
    assert first.child.wait_exit(PEER_BOUND) == 0, first.child.describe()


def test_a_dropped_data_packet_fails_the_migration_with_nothing_committed(lab: Lab) -> None:
    src = static_image(lab.workdir / "src.img")
    dst = lab.workdir / "dst.img"
    recv = lab.receive(dst)
    with DroppingProxy(("127.0.0.1", recv.port), channel=0, nth=2) as proxy:
        send = lab.send(src, proxy.port)
        scode = send.wait_exit(MIGRATION_BOUND)
        rcode = recv.child.exit_within(PEER_BOUND, send.exited_at or time.monotonic(),
                                       "receiver after a dropped packet")
    assert proxy.dropped is not None, f"harness: nothing was dropped; {proxy.report()}"
    lab.assert_nothing_committed(dst, f"a dropped data packet went unnoticed ({proxy.dropped})")
    assert scode == 1, f"send exit {scode}, expected 1\n{send.describe()}"
    assert rcode == 1, f"receive exit {rcode}, expected 1\n{recv.child.describe()}"


def test_a_blackholed_link_in_stop_and_copy_does_not_keep_the_guest_paused(lab: Lab) -> None:
    """nftables drops everything once the guest is paused, with --downtime-limit 5000: the
    source gives up after downtime-limit + peer-timeout at most and resumes its guest."""
    unavailable(netns_missing() or nft_missing())
    src, dst = lab.workdir / "src.img", lab.workdir / "dst.img"
    guest = lab.guest(src, size=SIZE, dirty_rate=DIRTY)
    with loopback_namespace() as ns:
        recv = lab.receive(dst, ns=ns)
        send = lab.send(src, recv.port, "--downtime-limit", "5000", ns=ns,
                        faults=("source:paused",))
        paused = send.wait_stopped(REACH_BOUND)
        bound = 5.0 + PEER_BOUND
        with nft_drop(recv.port, ns):
            sigcont(send)
            running = wait_running(src, paused + bound)
            assert running is not None, (
                f"the guest stayed paused more than {bound:g} s (downtime-limit 5000 ms + "
                f"peer-timeout {PEER_TIMEOUT:g} s + margin)\n{send.describe()}")
            scode = send.exit_within(bound, paused, "sender behind a blackhole")
            rcode = recv.child.exit_within(bound, paused, "receiver behind a blackhole")
    assert scode == 1, f"send exit {scode}, expected 1\n{send.describe()}"
    assert rcode == 1, f"receive exit {rcode}, expected 1\n{recv.child.describe()}"
    lab.assert_nothing_committed(dst, "blackholed in stop-and-copy")
    assert lab.assert_one_guest(guest, src, dst) == "source"


def test_a_full_destination_disk_is_reported_as_such_on_both_ends(lab: Lab) -> None:
    unavailable(None if IS_ROOT else "needs root to mount a small tmpfs")
    src = static_image(lab.workdir / "src.img")
    small = lab.mount_tmpfs(lab.workdir / "small", "8M")
    dst = small / "dst.img"
    recv = lab.receive(dst)
    send = lab.send(src, recv.port)
    scode = send.wait_exit(MIGRATION_BOUND)
    rcode = recv.child.wait_exit(PEER_BOUND)
    lab.assert_nothing_committed(dst, "a full destination")
    assert (scode, rcode) == (1, 1), f"{send.describe()}\n{recv.child.describe()}"
    for child in (send, recv.child):
        missing = reports_full(child.err + str(child.json_doc().get("error-desc", "")))
        assert missing is None, (f"{child.name}: the report of a full destination lacks "
                                 f"{missing}\n{child.describe()}")


def test_a_missing_or_read_only_destination_directory_is_refused_before_listening(
    lab: Lab,
) -> None:
    unavailable(None if IS_ROOT else "needs root to mount a read-only tmpfs")
    missing = lab.workdir / "missing" / "dst.img"
    said = refused_at_start(lab.spawn("receive", str(missing), "--listen", "127.0.0.1:0",
                                      name="receiver into a missing directory"),
                            "a missing destination directory")
    assert str(missing.parent) in said, f"the refusal does not name the directory: {said}"
    ro = lab.mount_tmpfs(lab.workdir / "ro", "1M", "ro")
    said = refused_at_start(lab.spawn("receive", str(ro / "dst.img"), "--listen", "127.0.0.1:0",
                                      name="receiver into a read-only directory"),
                            "a read-only destination directory")
    assert re.search(r"read-only|not writable", said, re.I), (
        f"the refusal does not say read-only: {said}")


def test_receive_serve_exits_0_on_sigterm_after_an_earlier_failed_migration(lab: Lab) -> None:
    src = static_image(lab.workdir / "src.img")
    recv = lab.receive(lab.workdir / "dst.img", "--serve")
    send = lab.send(src, recv.port, "--max-bandwidth", "2M")
    send.wait_event("connected", REACH_BOUND)
    send.kill()
    recv.child.wait_stderr('"level": "error"', PEER_BOUND)  # that migration failed
    time.sleep(0.5)  # back to waiting for the next source
    assert recv.child.alive, f"--serve ended after one failure\n{recv.child.describe()}"
    recv.child.signal(signal.SIGTERM)
    code = recv.child.exit_within(START_BOUND, time.monotonic(), "receive --serve on SIGTERM")
    assert code == 0, (f"receive --serve stopped cleanly by SIGTERM exits {code}, expected 0 "
                       f"(the earlier failure was that migration's)\n{recv.child.describe()}")


def test_the_demo_removes_what_it_created(lab: Lab) -> None:
    tmp = lab.workdir / "tmp"
    mine = lab.workdir / "mine"
    tmp.mkdir()
    mine.mkdir()
    for args in ((), ("--dir", str(mine))):
        r = lab.run("demo", "--size", SIZE, "--dirty-rate", "4M", *args, timeout=120,
                    env={"TMPDIR": str(tmp)})
        assert r.returncode == 0, f"demo {args}: exit {r.returncode}\n{r.stdout}{r.stderr}"
    left = sorted(str(p.relative_to(lab.workdir)) for p in (*tmp.rglob("*"), *mine.rglob("*")))
    assert not left, f"the demo left behind: {left}"
    assert not list(lab.runtime.iterdir()), "the demo left a control socket"
