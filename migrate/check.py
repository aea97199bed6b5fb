"""`zcmigrate check`: will multifd-zerocopy work here, and pay off? (CRIU's `criu check`.)

Judges the host facts of channel.probe, the locked-memory budget of a configuration and the
route to a destination; one verdict with an exit code. It sends nothing and knows no CLI.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from zcmigrate.channel.probe import ZeroCopyProbe, probe
from zcmigrate.channel.route import RouteError, RouteFacts, lookup_route
from zcmigrate.migrate.errors import CheckError
from zcmigrate.migrate.memlock import (
    DEFAULT_IN_FLIGHT_CAP,
    DEFAULT_PAGES_PER_PACKET,
    PIN_SLACK_PAGES,
    LockedMemoryBudget,
    automatic_in_flight_cap,
    exact_size,
    limit_text,
    locked_memory_budget,
    locked_memory_needed,
    option_size,
)

DEFAULT_MULTIFD_CHANNELS = 2
# optmem_max's old default (recent kernels default to 128 KiB); below it QEMU's users hit
# ENOBUFS from the error queue's notification skbs (seed 003).
OPTMEM_MIN = 20480
_MIB = 1 << 20


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


@dataclass(frozen=True, slots=True)
class Finding:
    verdict: Verdict
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"code": int(self.verdict), "name": self.verdict.name.lower(),
                "message": self.message}


# ------------------------------------------------------------------------ verdict


def _memlock_remedy(b: LockedMemoryBudget) -> str:
    # systemd's LimitMEMLOCK takes binary suffixes; a whole MiB above the need is easy
    # to type and leaves room for short packets.
    raise_to = option_size(math.ceil(b.needed / _MIB) * _MIB)
    remedies = [f"raise LimitMEMLOCK to {raise_to}"]
    if b.hard_limit is None or b.hard_limit >= b.needed:
        remedies[0] += f" (the hard limit {limit_text(b.hard_limit)} allows it: ulimit -l)"
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
            f"zero copy: works, but RLIMIT_MEMLOCK ({limit_text(budget.limit)}) holds the "
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
            f"{limit_text(budget.limit)}; {_memlock_remedy(budget)}",
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
        yield (f"locked memory: RLIMIT_MEMLOCK soft {limit_text(p.memlock_soft)}, hard "
               f"{limit_text(p.memlock_hard)}; CAP_IPC_LOCK "
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
    try:
        route = lookup_route(destination) if destination else None
    except RouteError as e:
        raise CheckError(str(e)) from e
    return CheckReport(facts, budget, route,
                       assess(facts, budget, route, automatic_cap=automatic))

