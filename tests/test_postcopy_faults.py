"""Post-copy recovery across a real network break (issue 13, "What it must show"): a
16 MiB guest dirtying 64 MiB/s migrates with --postcopy from one network namespace to
another (tests/netns.py's veth pair, keyed and sealed as tests/fault_lab.py's Lab does);
once the guest runs on the destination, nftables drops every segment of the migration's
port for 10 s. Both sides must say post-copy was interrupted (the sender exits 8, the
receiver keeps the guest's link and waits), the guest must wait on its missing pages,
and after the link is back `send --resume` must finish the migration, oracle ok.

Zero copy on and off: the resumed session opens its own data channels, with either.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import pytest

from tests.fault_lab import PEER_BOUND, Lab, scratch_dir, sigcont
from tests.netns import NamespacePair, namespace_pair, netns_missing, nft_drop, nft_missing
from tests.test_faults import unavailable
from tests.test_postcopy import kill_destination_guest, stop_and_check_destination
from zcmigrate.migrate.guest import read_control_record
from zcmigrate.migrate.imagefiles import resume_path

LINK_BROKEN_S = 10.0


@pytest.fixture(scope="module")
def pair() -> Iterator[NamespacePair]:
    unavailable(netns_missing())
    unavailable(nft_missing())
    with namespace_pair("zcpcrec") as p:
        yield p


@pytest.fixture(params=["on", "off"], ids=["zerocopy-on", "zerocopy-off"])
def lab(request: pytest.FixtureRequest, pair: NamespacePair) -> Iterator[Lab]:
    d = scratch_dir("zcpcrec-")  # /dev/shm: post-copy needs the destination on a tmpfs
    lab = Lab(d, pair, zerocopy=request.param)
    try:
        yield lab
    finally:
        kill_destination_guest(d / "dst.img")
        lab.close()
        shutil.rmtree(d, ignore_errors=True)


def test_postcopy_link_broken_for_10_s_resumes(lab: Lab, pair: NamespacePair) -> None:
    src, dst = lab.workdir / "src.img", lab.workdir / "dst.img"
    guest = lab.guest(src, size="16M", dirty_rate="64M")
    recv = lab.receive(dst, "--postcopy-recover-timeout", "120")
    send = lab.send(src, recv.port, "--postcopy", "--max-bandwidth", "4M",
                    faults=("source:postcopy-device-sent",))
    send.wait_event("fault point reached; stopping", 60)
    recv.child.wait_event("post-copy guest running", 30)
    # The guest runs on the destination, most of its dirty pages still at the source.
    with nft_drop(recv.port, pair.dest):
        t_drop = time.monotonic()
        sigcont(send)
        scode = send.exit_within(PEER_BOUND, t_drop, "post-copy with the link dropped")
        assert scode == 8, send.describe()
        assert "post-copy interrupted" in send.err and "--resume" in send.err
        recv.child.wait_event("post-copy interrupted: waiting for the source to resume",
                              PEER_BOUND)
        assert recv.child.alive, recv.child.describe()
        assert resume_path(src).exists() and guest.alive
        # Waiting on pages it lacks: its write counter stands still.
        before = read_control_record(dst)
        time.sleep(1.0)
        after = read_control_record(dst)
        assert before is not None and after is not None and after.touched == before.touched
        time.sleep(max(0.0, LINK_BROKEN_S - (time.monotonic() - t_drop)))
    resume = lab.send(src, recv.port, "--resume", name="resumed sender")
    assert resume.wait_exit(60) == 0, resume.describe()
    assert recv.child.wait_exit(30) == 0, recv.child.describe()
    assert resume.json_doc().get("status") == "completed"
    assert not resume_path(src).exists()
    guest.wait_exit(10)  # handed over
    stop_and_check_destination(dst)
