"""`zcmigrate check`: the budget arithmetic, the judgement, and the verdicts of real runs.

Real runs are child processes: as root, unprivileged (setpriv drops CAP_IPC_LOCK, prlimit
sets a 64 KiB RLIMIT_MEMLOCK), and inside network namespaces this module creates (veth,
bridges, a lowered optmem_max) and removes again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from zcmigrate.channel.probe import ZeroCopyProbe
from zcmigrate.migrate.check import (
    OPTMEM_MIN,
    LockedMemoryBudget,
    RouteFacts,
    Verdict,
    assess,
    locked_memory_budget,
    option_size,
    split_host,
)
from zcmigrate.migrate.inflight import (
    DEFAULT_IN_FLIGHT_CAP,
    DEFAULT_PAGES_PER_PACKET,
    PIN_SLACK_PAGES,
    calls_in_flight,
    exact_size,
    largest_fitting_cap,
    locked_memory_needed,
)

ROOT = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")
SMALL_LIMIT = 64 * 1024
IS_ROOT = os.geteuid() == 0
HAVE_SETPRIV = bool(shutil.which("setpriv") and shutil.which("prlimit"))
HAVE_NSENTER = bool(shutil.which("nsenter"))

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root: real checks run as root "
                                "and drop privileges for the unprivileged child")
needs_setpriv = pytest.mark.skipif(
    not (IS_ROOT and HAVE_SETPRIV),
    reason="needs root with setpriv and prlimit to drop CAP_IPC_LOCK for a child",
)
needs_netns = pytest.mark.skipif(
    not (IS_ROOT and HAVE_NSENTER),
    reason="needs root (and nsenter) to create network namespaces",
)

UNPRIVILEGED = [
    "setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock",
    "prlimit", f"--memlock={SMALL_LIMIT}:{SMALL_LIMIT}",
]


def probe_facts(**changes: Any) -> ZeroCopyProbe:
    base = ZeroCopyProbe(tcp_zero_copy=True, tcp_zero_copy_error="", memlock_soft=8 << 20,
                         memlock_hard=8 << 20, cap_ipc_lock=False, optmem_max=131072)
    return replace(base, **changes)


def budget_for(facts: ZeroCopyProbe, channels: int = 2,
               cap: int = DEFAULT_IN_FLIGHT_CAP) -> LockedMemoryBudget:
    return locked_memory_budget(facts, channels, cap, 4096, DEFAULT_PAGES_PER_PACKET)


# -------------------------------------------------------------- budget arithmetic


def test_each_in_flight_call_costs_the_kernels_two_pages_of_slack() -> None:
    packet = DEFAULT_PAGES_PER_PACKET * 4096
    assert calls_in_flight(4 << 20, packet) == 2
    assert calls_in_flight(16 << 10, packet) == 1  # a cap below a packet: one piece at a time
    assert locked_memory_needed(2, 4 << 20, 4096, DEFAULT_PAGES_PER_PACKET) == (
        2 * ((4 << 20) + 2 * PIN_SLACK_PAGES * 4096)
    )


def test_the_largest_fitting_cap_fits_and_one_page_more_does_not() -> None:
    for limit, channels in ((SMALL_LIMIT, 2), (8 << 20, 2), (64 << 20, 8), (8 << 20, 3)):
        cap = largest_fitting_cap(limit, channels, 4096, DEFAULT_PAGES_PER_PACKET)
        assert cap is not None and cap % 4096 == 0
        need = locked_memory_needed(channels, cap, 4096, DEFAULT_PAGES_PER_PACKET)
        more = locked_memory_needed(channels, cap + 4096, 4096, DEFAULT_PAGES_PER_PACKET)
        assert need <= limit < more, (limit, channels, cap)


def test_no_cap_fits_a_limit_smaller_than_the_slack_of_one_call() -> None:
    assert largest_fitting_cap(2 * PIN_SLACK_PAGES * 4096, 2, 4096, 512) is None


def test_two_default_channels_do_not_fit_the_stock_8_mib_limit_without_ipc_lock() -> None:
    b = budget_for(probe_facts())
    assert not b.fits and b.needed == (8 << 20) + 2 * 2 * PIN_SLACK_PAGES * 4096
    assert b.largest_fitting_cap == (8 << 20) // 2 - 2 * PIN_SLACK_PAGES * 4096


def test_cap_ipc_lock_or_an_unlimited_limit_makes_any_budget_fit() -> None:
    assert budget_for(probe_facts(cap_ipc_lock=True, memlock_soft=0), channels=255).fits
    b = budget_for(probe_facts(memlock_soft=None, memlock_hard=None), channels=255)
    assert b.fits and b.largest_fitting_cap is None


def test_sizes_print_exactly() -> None:
    assert exact_size(8 << 20) == "8 MiB"
    assert exact_size((8 << 20) + (32 << 10)) == "8224 KiB"
    assert exact_size(4097) == "4097 B"
    assert option_size(4080 << 10) == "4080K" and option_size(9 << 20) == "9M"


def test_destinations_are_split_from_their_ports() -> None:
    assert split_host("10.0.0.2:4444") == "10.0.0.2"
    assert split_host("[fd00::2]:4444") == "fd00::2"
    assert split_host("fd00::2") == "fd00::2"
    assert split_host("dest.example") == "dest.example"


# ---------------------------------------------------------------------- judgement


def veth_route() -> RouteFacts:
    return RouteFacts(destination="198.18.0.2", address="198.18.0.2", ifindex=5,
                      ifname="zcv0", kind="veth", info_kind="veth", local=False,
                      gateway=None, scatter_gather=None, always_copies=True, reason="veth")


def test_nothing_against_zero_copy_is_ready() -> None:
    facts = probe_facts(cap_ipc_lock=True)
    (only,) = assess(facts, budget_for(facts), None)
    assert only.verdict is Verdict.READY and only.message == "zero copy: ready"


def test_the_most_severe_finding_wins_and_the_others_are_kept() -> None:
    facts = probe_facts(memlock_soft=SMALL_LIMIT, optmem_max=10000)
    findings = assess(facts, budget_for(facts), veth_route())
    assert [f.verdict for f in findings] == [
        Verdict.MEMLOCK_TOO_SMALL, Verdict.COPIES_ON_ROUTE, Verdict.READY_LOW_OPTMEM,
    ]
    unsupported = replace(facts, tcp_zero_copy=False, tcp_zero_copy_error="Protocol not available")
    first = assess(unsupported, budget_for(unsupported), veth_route())[0]
    assert first.verdict is Verdict.UNSUPPORTED
    assert "not supported by this kernel" in first.message
    assert "Protocol not available" in first.message


def test_a_small_budget_names_its_numbers_and_every_remedy() -> None:
    facts = probe_facts(memlock_soft=SMALL_LIMIT, memlock_hard=SMALL_LIMIT)
    (f,) = assess(facts, budget_for(facts), None)
    assert f.verdict is Verdict.MEMLOCK_TOO_SMALL
    for part in ("8224 KiB needed", "RLIMIT_MEMLOCK is 64 KiB", "LimitMEMLOCK to 9M",
                 "CAP_IPC_LOCK", "--in-flight-cap 24K or less", "multifd-zerocopy off"):
        assert part in f.message, part


def test_optmem_below_the_minimum_is_a_warning_verdict() -> None:
    facts = probe_facts(cap_ipc_lock=True, optmem_max=OPTMEM_MIN - 1)
    (f,) = assess(facts, budget_for(facts), None)
    assert f.verdict is Verdict.READY_LOW_OPTMEM and "ENOBUFS" in f.message
    facts = probe_facts(cap_ipc_lock=True, optmem_max=OPTMEM_MIN)
    assert assess(facts, budget_for(facts), None)[0].verdict is Verdict.READY


# ----------------------------------------------------------------- the real kernel

# One MSG_ZEROCOPY send of argv[1] bytes from page-aligned memory over loopback TCP.
_ONE_SEND = """
import mmap, socket, sys
size = int(sys.argv[1])
lst = socket.create_server(("127.0.0.1", 0))
tx = socket.create_connection(lst.getsockname())
rx, _ = lst.accept()
tx.setsockopt(socket.SOL_SOCKET, 60, 1)  # SO_ZEROCOPY
mm = mmap.mmap(-1, 1 << 20)
try:
    tx.send(memoryview(mm)[:size], 0x4000000)  # MSG_ZEROCOPY
    print("sent")
except OSError as e:
    print(e.errno)
"""


@needs_setpriv
def test_the_kernel_charges_a_zero_copy_call_its_pages_plus_the_slack() -> None:
    # The budget's model, checked against mm_account_pinned_pages() itself: the largest
    # single call that fits one channel's budget is accepted, one page more is refused.
    cap = largest_fitting_cap(SMALL_LIMIT, 1, PAGE, 1 << 10)
    assert cap == SMALL_LIMIT - PIN_SLACK_PAGES * PAGE

    def send(size: int) -> str:
        out = subprocess.run([*UNPRIVILEGED, sys.executable, "-c", _ONE_SEND, str(size)],
                             capture_output=True, text=True, timeout=30, check=True)
        return out.stdout.strip()

    assert send(cap) == "sent"
    assert send(cap + PAGE) == str(105)  # ENOBUFS


# -------------------------------------------------------------- real `check` runs


@dataclass
class Run:
    code: int
    out: dict[str, Any]
    text: str


def run_check(*args: str, prefix: tuple[str, ...] = (), env: dict[str, str] | None = None,
              as_json: bool = True) -> Run:
    cmd = [*prefix, sys.executable, "-m", "zcmigrate", "check", *args]
    if as_json:
        cmd.append("--json")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ZCMIGRATE_")}
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=full_env)
    assert proc.returncode != 2, proc.stderr  # never a usage error here
    out = json.loads(proc.stdout) if as_json else {}
    if as_json and "verdict" in out:
        assert out["verdict"]["code"] == proc.returncode
    return Run(proc.returncode, out, proc.stdout)


def host_optmem_verdict() -> int:
    optmem = int(Path("/proc/sys/net/core/optmem_max").read_text())
    return Verdict.READY if optmem >= OPTMEM_MIN else Verdict.READY_LOW_OPTMEM


@needs_root
def test_as_root_the_default_configuration_is_ready() -> None:
    r = run_check()
    assert r.out["probe"]["cap_ipc_lock"] is True
    assert r.out["budget"]["fits"] is True
    assert r.code == host_optmem_verdict()
    assert set(r.out) == {"verdict", "findings", "probe", "optmem_min", "budget", "route"}


@needs_setpriv
def test_unprivileged_with_a_small_limit_the_automatic_cap_is_throttled() -> None:
    r = run_check(prefix=tuple(UNPRIVILEGED))
    assert r.code == Verdict.MEMLOCK_THROTTLES
    assert r.out["budget"]["fits"] is True
    cap = largest_fitting_cap(SMALL_LIMIT, 2, PAGE, DEFAULT_PAGES_PER_PACKET)
    assert r.out["budget"]["in_flight_cap"] == cap
    msg = r.out["verdict"]["message"]
    assert "LimitMEMLOCK" in msg and "CAP_IPC_LOCK" in msg


@needs_setpriv
def test_unprivileged_with_a_small_limit_the_default_cap_is_too_small() -> None:
    r = run_check("--in-flight-cap", "4M", prefix=tuple(UNPRIVILEGED))
    assert r.code == Verdict.MEMLOCK_TOO_SMALL
    assert r.out["probe"]["cap_ipc_lock"] is False
    assert r.out["budget"]["limit"] == SMALL_LIMIT and r.out["budget"]["fits"] is False
    msg = r.out["verdict"]["message"]
    assert msg.startswith("zero copy: locked-memory budget too small")
    assert "LimitMEMLOCK" in msg and "CAP_IPC_LOCK" in msg and "multifd-zerocopy off" in msg


@needs_setpriv
def test_unprivileged_with_a_cap_inside_the_limit_is_ready() -> None:
    cap = largest_fitting_cap(SMALL_LIMIT, 2, PAGE, DEFAULT_PAGES_PER_PACKET)
    assert cap is not None
    r = run_check("--in-flight-cap", str(cap), prefix=tuple(UNPRIVILEGED))
    assert r.out["budget"]["fits"] is True
    assert r.code == host_optmem_verdict()


@needs_setpriv
def test_options_come_from_the_environment_too() -> None:
    r = run_check(prefix=tuple(UNPRIVILEGED), env={
        "ZCMIGRATE_MULTIFD_CHANNELS": "3", "ZCMIGRATE_IN_FLIGHT_CAP": "8K",
    })
    assert r.out["budget"]["channels"] == 3 and r.out["budget"]["in_flight_cap"] == 8192
    assert r.out["budget"]["fits"] is True  # 3 x (8 KiB + 8 KiB) = 48 KiB <= 64 KiB


@needs_root
def test_loopback_always_copies() -> None:
    r = run_check("--destination", "127.0.0.1")
    assert r.code == Verdict.COPIES_ON_ROUTE
    assert r.out["route"]["ifname"] == "lo" and r.out["route"]["kind"] == "loopback"
    text = run_check("--destination", "127.0.0.1:4444", as_json=False)
    assert text.code == Verdict.COPIES_ON_ROUTE
    last = text.text.strip().splitlines()[-1]
    assert last.startswith("zero copy: works but will copy on this route (loopback lo)")


# ------------------------------------------------------- network namespaces


@dataclass(frozen=True)
class Namespaces:
    """source: veth zcv0 198.18.0.1/30, bridges zcb0 198.18.1.1/24 (scatter-gather on)
    and zcb1 198.18.2.1/24 (off). peer: veth zcv1 198.18.0.2/30, optmem_max 10000."""

    source: str
    peer: str

    def enter(self, name: str) -> tuple[str, ...]:
        return ("nsenter", f"--net=/run/netns/{name}")


# Inside a namespace: switch scatter-gather off on a device (ETHTOOL_SSG), as
# `ethtool -K DEV sg off` would.
_SG_OFF = """
import array, fcntl, socket, struct, sys
value = array.array("I", [0x19, 0])
ifreq = struct.pack("16sP", sys.argv[1].encode(), value.buffer_info()[0]).ljust(40, b"\\0")
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    fcntl.ioctl(s.fileno(), 0x8946, ifreq)
"""


@pytest.fixture(scope="module")
def namespaces() -> Iterator[Namespaces]:
    from pyroute2 import NetNS, netns

    tag = uuid.uuid4().hex[:8]
    ns = Namespaces(source=f"zcchk-src-{tag}", peer=f"zcchk-peer-{tag}")
    created: list[str] = []
    try:
        for name in (ns.source, ns.peer):
            netns.create(name)
            created.append(name)
        # The veth is made inside the source namespace with its peer end placed straight
        # into the other: nothing of it ever exists in the host's namespace.
        with NetNS(ns.source) as src:
            src.link("add", ifname="zcv0", kind="veth",
                     peer={"ifname": "zcv1", "net_ns_fd": ns.peer})
            for ifname, kind, address, prefix in (("zcv0", None, "198.18.0.1", 30),
                                                  ("zcb0", "bridge", "198.18.1.1", 24),
                                                  ("zcb1", "bridge", "198.18.2.1", 24)):
                if kind:
                    src.link("add", ifname=ifname, kind=kind)
                idx = src.link_lookup(ifname=ifname)[0]
                src.addr("add", index=idx, address=address, prefixlen=prefix)
                src.link("set", index=idx, state="up")
            src.link("set", index=src.link_lookup(ifname="lo")[0], state="up")
        with NetNS(ns.peer) as peer:
            idx = peer.link_lookup(ifname="zcv1")[0]
            peer.addr("add", index=idx, address="198.18.0.2", prefixlen=30)
            peer.link("set", index=idx, state="up")
            peer.link("set", index=peer.link_lookup(ifname="lo")[0], state="up")
        subprocess.run([*ns.enter(ns.source), sys.executable, "-c", _SG_OFF, "zcb1"],
                       check=True, timeout=30)
        # optmem_max is per network namespace (since Linux 6.9): lowering it here
        # leaves the host's alone.
        subprocess.run([*ns.enter(ns.peer), "sh", "-c",
                        "echo 10000 > /proc/sys/net/core/optmem_max"], check=True, timeout=30)
        yield ns
    finally:
        for name in created:
            netns.remove(name)  # takes the veth and the bridges with it


@needs_netns
def test_a_route_over_veth_names_the_veth_and_always_copies(namespaces: Namespaces) -> None:
    r = run_check("--destination", "198.18.0.2", prefix=namespaces.enter(namespaces.source))
    assert r.code == Verdict.COPIES_ON_ROUTE
    route = r.out["route"]
    assert route["ifname"] == "zcv0" and route["kind"] == "veth"
    assert route["info_kind"] == "veth" and route["always_copies"] is True
    assert r.out["verdict"]["message"] == (
        "zero copy: works but will copy on this route (veth zcv0); "
        "multifd-zerocopy off costs nothing here"
    )


@needs_netns
def test_a_device_with_scatter_gather_may_pay_off(namespaces: Namespaces) -> None:
    r = run_check("--destination", "198.18.1.2", prefix=namespaces.enter(namespaces.source))
    route = r.out["route"]
    assert route["ifname"] == "zcb0" and route["kind"] == "other"
    assert route["info_kind"] == "bridge" and route["scatter_gather"] is True
    assert route["always_copies"] is False
    assert r.code == Verdict.READY


@needs_netns
def test_a_device_without_scatter_gather_copies(namespaces: Namespaces) -> None:
    r = run_check("--destination", "198.18.2.2", prefix=namespaces.enter(namespaces.source))
    route = r.out["route"]
    assert route["ifname"] == "zcb1" and route["scatter_gather"] is False
    assert r.code == Verdict.COPIES_ON_ROUTE and "no scatter-gather" in route["reason"]


@needs_netns
def test_a_low_optmem_max_is_reported_with_its_own_verdict(namespaces: Namespaces) -> None:
    r = run_check(prefix=namespaces.enter(namespaces.peer))
    assert r.out["probe"]["optmem_max"] == 10000
    assert r.code == Verdict.READY_LOW_OPTMEM
    # Beside a route that copies, the route's verdict is the more severe one.
    r = run_check("--destination", "198.18.0.1", prefix=namespaces.enter(namespaces.peer))
    assert r.code == Verdict.COPIES_ON_ROUTE
    assert [f["code"] for f in r.out["findings"]] == [10, 5]


@needs_netns
def test_no_route_or_no_name_is_a_failed_check_not_a_verdict(namespaces: Namespaces) -> None:
    enter = namespaces.enter(namespaces.peer)
    r = run_check("--destination", "203.0.113.1", prefix=enter)
    assert r.code == 1 and "no route to 203.0.113.1" in r.out["error"]
    r = run_check("--destination", "no-such-host.invalid", prefix=enter)
    assert r.code == 1 and "cannot resolve" in r.out["error"]
    r = run_check("--destination", "203.0.113.1", prefix=enter, as_json=False)
    assert r.code == 1
