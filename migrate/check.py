"""`zcmigrate check`: will multifd-zerocopy work here, and pay off? (CRIU's `criu check`.)

Judges the host facts of channel.probe, the locked-memory budget of a configuration and the
route to a destination; one verdict with an exit code. It sends nothing and knows no CLI.
"""

from __future__ import annotations

import array
import fcntl
import math
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any

from zcmigrate.channel.probe import ZeroCopyProbe, probe
from zcmigrate.migrate.inflight import (
    DEFAULT_IN_FLIGHT_CAP,
    DEFAULT_PAGES_PER_PACKET,
    PIN_SLACK_PAGES,
    automatic_in_flight_cap,
    calls_in_flight,
    exact_size,
    largest_fitting_cap,
    locked_memory_needed,
)

DEFAULT_MULTIFD_CHANNELS = 2
# optmem_max's old default (recent kernels default to 128 KiB); below it QEMU's users hit
# ENOBUFS from the error queue's notification skbs (seed 003).
OPTMEM_MIN = 20480

_KIB = 1 << 10
_MIB = 1 << 20
_IFF_LOOPBACK = 0x8
_ARPHRD_LOOPBACK = 772
_RTN_LOCAL = 2
_SIOCETHTOOL = 0x8946
_ETHTOOL_GSG = 0x18
# Interfaces that hand every MSG_ZEROCOPY skb to a local receiver, which costs the
# deferred copy (seed 004, "Loopback"): veth ends in another namespace's stack, tun
# in a local process.
_ALWAYS_COPY_KINDS = frozenset({"veth", "tun"})


class Verdict(IntEnum):
    """The verdicts, most severe last; the value is the exit code of `zcmigrate check`."""

    READY = 0
    READY_LOW_OPTMEM = 5
    COPIES_ON_ROUTE = 10
    MEMLOCK_THROTTLES = 15
    MEMLOCK_TOO_SMALL = 20
    UNSUPPORTED = 30


EXIT_CHECK_FAILED = 1  # the check itself could not run (destination unresolvable, no route)

VERDICT_TABLE: tuple[tuple[int, str], ...] = (
    (Verdict.READY, "ready: zero copy can be turned on"),
    (Verdict.READY_LOW_OPTMEM, "ready, but net.core.optmem_max is below 20480: ENOBUFS retries"),
    (Verdict.COPIES_ON_ROUTE, "works, but the route to --destination always copies"),
    (Verdict.MEMLOCK_THROTTLES, "works, but RLIMIT_MEMLOCK shrinks the automatic in-flight cap"),
    (Verdict.MEMLOCK_TOO_SMALL, "the locked-memory budget is too small for the configuration"),
    (Verdict.UNSUPPORTED, "the kernel does not support MSG_ZEROCOPY on TCP"),
    (EXIT_CHECK_FAILED, "the check could not run (destination unresolvable, no route)"),
)


class CheckError(Exception):
    """The check itself could not be made (as opposed to a verdict against zero copy)."""


@dataclass(frozen=True, slots=True)
class Finding:
    verdict: Verdict
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"code": int(self.verdict), "name": self.verdict.name.lower(),
                "message": self.message}


def option_size(n: int) -> str:
    """A byte count as an option value to copy: "4080K", "4M", "4097"."""
    for unit, factor in (("G", 1 << 30), ("M", _MIB), ("K", _KIB)):
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def _limit_text(n: int | None) -> str:
    return "unlimited" if n is None else exact_size(n)


# ------------------------------------------------------------------ locked memory


@dataclass(frozen=True, slots=True)
class LockedMemoryBudget:
    channels: int
    in_flight_cap: int            # bytes per channel
    page_size: int                # the kernel's page, the unit it charges in
    pages_per_packet: int
    calls_per_channel: int
    needed: int                   # bytes charged at most, all channels together
    limit: int | None             # RLIMIT_MEMLOCK soft limit; None = unlimited
    hard_limit: int | None
    cap_ipc_lock: bool            # pinned pages are not charged at all
    fits: bool
    largest_fitting_cap: int | None  # per channel, under the current limit

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def locked_memory_budget(facts: ZeroCopyProbe, channels: int, in_flight_cap: int,
                         page_size: int, pages_per_packet: int) -> LockedMemoryBudget:
    if channels < 1 or in_flight_cap < 1 or page_size < 1 or pages_per_packet < 1:
        raise ValueError("channels, in-flight cap, page size and pages per packet must be >= 1")
    needed = locked_memory_needed(channels, in_flight_cap, page_size, pages_per_packet)
    limit = facts.memlock_soft
    # The kernel skips the charge entirely for CAP_IPC_LOCK (mm_account_pinned_pages).
    fits = facts.cap_ipc_lock or limit is None or needed <= limit
    return LockedMemoryBudget(
        channels=channels,
        in_flight_cap=in_flight_cap,
        page_size=page_size,
        pages_per_packet=pages_per_packet,
        calls_per_channel=calls_in_flight(in_flight_cap, pages_per_packet * page_size),
        needed=needed,
        limit=limit,
        hard_limit=facts.memlock_hard,
        cap_ipc_lock=facts.cap_ipc_lock,
        fits=fits,
        largest_fitting_cap=(
            None if limit is None
            else largest_fitting_cap(limit, channels, page_size, pages_per_packet)
        ),
    )


# -------------------------------------------------------------------------- route


@dataclass(frozen=True, slots=True)
class RouteFacts:
    destination: str              # as given
    address: str                  # what it resolved to, the first getaddrinfo answer
    ifindex: int
    ifname: str
    kind: str                     # "loopback", "veth" or "other"
    info_kind: str | None         # IFLA_INFO_KIND as the kernel names it; None: a device
    local: bool                   # the route is of type local: the address is this host's
    gateway: str | None
    scatter_gather: bool | None   # ETHTOOL_GSG of the interface; None: not known
    always_copies: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_host(destination: str) -> str:
    """The host of "HOST", "HOST:PORT", "[V6]:PORT" or a bare IPv6 address."""
    if destination.startswith("["):
        host, sep, _ = destination[1:].partition("]")
        if not sep:
            raise CheckError(f"destination {destination!r}: missing ']'")
        return host
    if destination.count(":") == 1:
        return destination.partition(":")[0]
    return destination


def resolve(destination: str) -> str:
    host = split_host(destination)
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise CheckError(f"cannot resolve destination {host!r}: {e.strerror}") from e
    # The first answer is the one a connect() would try first.
    return str(infos[0][4][0])


def scatter_gather(ifname: str) -> bool | None:
    """Whether the interface does scatter-gather (`ethtool -k`), None if it cannot say.

    Without it TCP copies every MSG_ZEROCOPY send and flags it COPIED (seed 004).
    """
    value = array.array("I", [_ETHTOOL_GSG, 0])
    # struct ifreq: the name, then ifr_data pointing at struct ethtool_value.
    ifreq = struct.pack("16sP", ifname.encode(), value.buffer_info()[0]).ljust(40, b"\0")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s.fileno(), _SIOCETHTOOL, ifreq)
    except OSError:
        return None  # no ethtool ops (EOPNOTSUPP), or no IPv4 sockets allowed
    return bool(value[1])


def _classify(ifname: str, flags: int, arphrd: int, info_kind: str | None,
              local: bool) -> tuple[str, bool, bool | None, str]:
    """(kind, always_copies, scatter_gather, reason) for the interface a route leaves by."""
    if local or flags & _IFF_LOOPBACK or arphrd == _ARPHRD_LOOPBACK or ifname == "lo":
        return ("loopback", True, None,
                "the destination is this host: loopback always copies "
                "(seed 004, 'Loopback': deferred copy to a local socket)")
    if info_kind in _ALWAYS_COPY_KINDS:
        kind = "veth" if info_kind == "veth" else "other"
        return (kind, True, None,
                f"{info_kind} hands packets to a local stack: always copies "
                "(seed 004, 'Loopback': deferred copy)")
    sg = scatter_gather(ifname)
    if sg is False:
        return ("other", True, sg,
                f"{ifname} has no scatter-gather: the kernel copies every zero-copy send")
    if sg is True:
        return ("other", False, sg,
                f"{ifname} does scatter-gather: zero copy can pay off "
                "(flush() still reports any copy)")
    return ("other", False, sg,
            f"{ifname}: scatter-gather support decides "
            f"(`ethtool -k {ifname} | grep scatter-gather`)")


def lookup_route(destination: str) -> RouteFacts:
    """Which interface the route to `destination` leaves by, and whether it copies."""
    # Imported here: pyroute2 is slow to import, and only --destination needs it.
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    address = resolve(destination)
    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=address)
        except NetlinkError as e:
            raise CheckError(f"no route to {destination} ({address}): "
                             f"{os.strerror(e.code)}") from e
        route = next(iter(routes))
        oif = route.get("RTA_OIF")
        if oif is None:
            # A multipath route spreads connections over several interfaces.
            raise CheckError(f"the route to {destination} ({address}) has no single "
                             "output interface (multipath?); check each next hop's address")
        ifindex = int(oif)
        try:
            link = next(iter(ipr.link("get", index=ifindex)))
        except NetlinkError as e:
            raise CheckError(f"route to {address} leaves by interface {ifindex}, "
                             f"which cannot be read: {os.strerror(e.code)}") from e
    linkinfo = link.get("IFLA_LINKINFO")
    info_kind = linkinfo.get("IFLA_INFO_KIND") if linkinfo is not None else None
    ifname = str(link.get("IFLA_IFNAME"))
    local = route["type"] == _RTN_LOCAL
    kind, copies, sg, reason = _classify(ifname, int(link["flags"]), int(link["ifi_type"]),
                                         info_kind, local)
    return RouteFacts(
        destination=destination,
        address=address,
        ifindex=ifindex,
        ifname=ifname,
        kind=kind,
        info_kind=info_kind,
        local=local,
        gateway=route.get("RTA_GATEWAY"),
        scatter_gather=sg,
        always_copies=copies,
        reason=reason,
    )


# ------------------------------------------------------------------------ verdict


def _memlock_remedy(b: LockedMemoryBudget) -> str:
    # systemd's LimitMEMLOCK takes binary suffixes; a whole MiB above the need is easy
    # to type and leaves room for short packets.
    raise_to = option_size(math.ceil(b.needed / _MIB) * _MIB)
    remedies = [f"raise LimitMEMLOCK to {raise_to}"]
    if b.hard_limit is None or b.hard_limit >= b.needed:
        remedies[0] += f" (the hard limit {_limit_text(b.hard_limit)} allows it: ulimit -l)"
    remedies.append("or grant CAP_IPC_LOCK")
    if b.largest_fitting_cap is not None:
        remedies.append(f"or use --in-flight-cap {option_size(b.largest_fitting_cap)} or less")
    remedies.append("or use multifd-zerocopy off")
    return ", ".join(remedies)


def assess(facts: ZeroCopyProbe, budget: LockedMemoryBudget,
           route: RouteFacts | None, *, automatic_cap: bool = False) -> tuple[Finding, ...]:
    """Every finding against zero copy, most severe first; READY alone when none.

    automatic_cap: the cap judged is the one `send` chooses itself, shrunk to fit."""
    findings: list[Finding] = []
    if automatic_cap and budget.fits and budget.in_flight_cap < DEFAULT_IN_FLIGHT_CAP:
        full = locked_memory_needed(budget.channels, DEFAULT_IN_FLIGHT_CAP, budget.page_size,
                                    budget.pages_per_packet)
        findings.append(Finding(
            Verdict.MEMLOCK_THROTTLES,
            f"zero copy: works, but RLIMIT_MEMLOCK ({_limit_text(budget.limit)}) holds the "
            f"in-flight cap to {exact_size(budget.in_flight_cap)} per channel instead of "
            f"{exact_size(DEFAULT_IN_FLIGHT_CAP)}, so senders wait for completions; raise "
            f"LimitMEMLOCK to {option_size(full)} or grant CAP_IPC_LOCK for full speed",
        ))
    if not facts.tcp_zero_copy:
        findings.append(Finding(
            Verdict.UNSUPPORTED,
            f"zero copy: not supported by this kernel (SO_ZEROCOPY on TCP: "
            f"{facts.tcp_zero_copy_error or 'refused'}); use multifd-zerocopy off",
        ))
    if not budget.fits:
        findings.append(Finding(
            Verdict.MEMLOCK_TOO_SMALL,
            f"zero copy: locked-memory budget too small: {budget.channels} channels x "
            f"({exact_size(budget.in_flight_cap)} in-flight cap + "
            f"{budget.calls_per_channel} calls x {PIN_SLACK_PAGES} pages slack) = "
            f"{exact_size(budget.needed)} needed, RLIMIT_MEMLOCK is "
            f"{_limit_text(budget.limit)}; {_memlock_remedy(budget)}",
        ))
    if route is not None and route.always_copies:
        findings.append(Finding(
            Verdict.COPIES_ON_ROUTE,
            f"zero copy: works but will copy on this route ({route.kind} {route.ifname}); "
            "multifd-zerocopy off costs nothing here",
        ))
    if facts.optmem_max is not None and facts.optmem_max < OPTMEM_MIN:
        findings.append(Finding(
            Verdict.READY_LOW_OPTMEM,
            f"zero copy: ready, but net.core.optmem_max is {facts.optmem_max}, below "
            f"{OPTMEM_MIN}: notifications can exhaust it and sends fail with ENOBUFS "
            "(seed 003); sysctl -w net.core.optmem_max=131072",
        ))
    if not findings:
        findings.append(Finding(Verdict.READY, "zero copy: ready"))
    findings.sort(key=lambda f: f.verdict, reverse=True)
    return tuple(findings)


@dataclass(frozen=True, slots=True)
class CheckReport:
    probe: ZeroCopyProbe
    budget: LockedMemoryBudget
    route: RouteFacts | None
    findings: tuple[Finding, ...] = field(default=())

    @property
    def verdict(self) -> Finding:
        return self.findings[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.to_dict(),
            "findings": [f.to_dict() for f in self.findings],
            "probe": self.probe.to_dict(),
            "optmem_min": OPTMEM_MIN,
            "budget": self.budget.to_dict(),
            "route": None if self.route is None else self.route.to_dict(),
        }

    def lines(self) -> Iterator[str]:
        """The facts, the other findings as notes, and the verdict as the last line."""
        p, b, r = self.probe, self.budget, self.route
        yield ("kernel: SO_ZEROCOPY on TCP: "
               + ("supported" if p.tcp_zero_copy else f"refused ({p.tcp_zero_copy_error})"))
        yield (f"locked memory: RLIMIT_MEMLOCK soft {_limit_text(p.memlock_soft)}, hard "
               f"{_limit_text(p.memlock_hard)}; CAP_IPC_LOCK "
               + ("held: pinned pages are not charged" if p.cap_ipc_lock else "not held"))
        verdict = "fits" if b.fits else "does not fit"
        if b.fits and b.cap_ipc_lock:
            verdict += " (CAP_IPC_LOCK)"
        yield (f"budget: {b.channels} channels x ({exact_size(b.in_flight_cap)} in-flight cap"
               f" + {b.calls_per_channel} x {PIN_SLACK_PAGES} pages of {b.page_size} B) = "
               f"{exact_size(b.needed)}: {verdict}")
        optmem = "unknown" if p.optmem_max is None else str(p.optmem_max)
        yield f"optmem_max: {optmem} (zero copy wants at least {OPTMEM_MIN})"
        if r is None:
            yield "route: not checked (give --destination)"
        else:
            kind = r.kind if r.info_kind in (None, r.kind) else f"{r.kind}, {r.info_kind}"
            via = f" via {r.gateway}" if r.gateway else ""
            yield (f"route: {r.destination} ({r.address}) leaves by {r.ifname} ({kind}){via}: "
                   f"{r.reason}")
        for f in self.findings[1:]:
            yield f"also: {f.message.removeprefix('zero copy: ')}"
        yield self.verdict.message


def run_check(channels: int = DEFAULT_MULTIFD_CHANNELS,
              in_flight_cap: int | None = None,
              destination: str | None = None,
              pages_per_packet: int = DEFAULT_PAGES_PER_PACKET) -> CheckReport:
    """Gather the facts and judge them. Raises CheckError when the route cannot be found.

    in_flight_cap None: the cap `send` would choose (automatic_in_flight_cap)."""
    facts = probe()
    automatic = in_flight_cap is None
    if in_flight_cap is None:
        try:
            in_flight_cap = automatic_in_flight_cap(facts, channels, pages_per_packet)
        except ValueError:
            in_flight_cap = None  # nothing fits; judge the default to name the remedies
        in_flight_cap = in_flight_cap or DEFAULT_IN_FLIGHT_CAP
    page_size = os.sysconf("SC_PAGE_SIZE")
    budget = locked_memory_budget(facts, channels, in_flight_cap, page_size, pages_per_packet)
    route = lookup_route(destination) if destination else None
    return CheckReport(facts, budget, route,
                       assess(facts, budget, route, automatic_cap=automatic))

