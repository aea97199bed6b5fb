"""The zero-copy in-flight cap and the locked memory it pins: the arithmetic `send` uses
to choose a cap and `check` to judge one.

Numbers over channel.probe's facts only: no routes, no verdicts, no CLI. `send` imports
this and not migrate.check, whose route lookup it never needs.
"""

from __future__ import annotations

import math
import os

from zcmigrate.channel.probe import ZeroCopyProbe

# Zero-copy bytes in flight per channel, unless RLIMIT_MEMLOCK asks for less. Two
# channels at 4 MiB need 8224 KiB with the kernel's slack: just over the stock 8 MiB
# RLIMIT_MEMLOCK, which is what check tells an unprivileged user.
DEFAULT_IN_FLIGHT_CAP = 4 << 20
# Pages per multifd packet (2 MiB of 4 KiB pages: few Python steps per GiB); the
# migration's default (migrate/params.py) and what `check` judges.
DEFAULT_PAGES_PER_PACKET = 512
# mm_account_pinned_pages() charges each MSG_ZEROCOPY call (size >> PAGE_SHIFT) + 2 pages:
# "worst case", the partial pages at either end of an unaligned buffer.
PIN_SLACK_PAGES = 2

_KIB = 1 << 10
_MIB = 1 << 20


def exact_size(n: int) -> str:
    """A byte count exactly, in the largest binary unit that divides it: "8224 KiB"."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", _MIB), ("KiB", _KIB)):
        if n and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} B"


def calls_in_flight(in_flight_cap: int, packet_bytes: int) -> int:
    """Zero-copy calls one channel may have in flight: one per packet inside the cap.

    A cap below the packet size splits packets into cap-sized calls, one in flight at a
    time. Short packets (the end of a pass) can add calls, each with its own slack,
    beside full ones: this estimate leaves that to the channel's ENOBUFS rule (seed 003).
    """
    return max(1, math.ceil(in_flight_cap / packet_bytes))


def locked_memory_needed(channels: int, in_flight_cap: int, page_size: int,
                         pages_per_packet: int) -> int:
    """Bytes the kernel may charge to RLIMIT_MEMLOCK at once for this configuration."""
    calls = calls_in_flight(in_flight_cap, pages_per_packet * page_size)
    return channels * (in_flight_cap + calls * PIN_SLACK_PAGES * page_size)


def largest_fitting_cap(limit: int, channels: int, page_size: int,
                        pages_per_packet: int) -> int | None:
    """The largest page-aligned in-flight cap whose need fits `limit`, None if none does."""
    per_channel = limit // channels
    packet = pages_per_packet * page_size
    slack = PIN_SLACK_PAGES * page_size
    best = 0
    # With k calls in flight the cap may reach k packets, less the slack of k calls:
    # min(k * packet, per_channel - k * slack) peaks where the two meet, at
    # k = per_channel / (packet + slack); try the whole numbers either side.
    k0 = max(1, per_channel // (packet + slack))
    for k in (k0, k0 + 1):
        cap = min(k * packet, per_channel - k * slack)
        cap -= cap % page_size
        if cap > 0:
            best = max(best, cap)
    return best or None


def automatic_in_flight_cap(facts: ZeroCopyProbe, channels: int,
                            pages_per_packet: int) -> int | None:
    """The in-flight cap `send` and `check` use unless told: none where no limit applies
    (CAP_IPC_LOCK, or RLIMIT_MEMLOCK unlimited), else DEFAULT_IN_FLIGHT_CAP shrunk to what
    fits the limit. ValueError, naming the remedies, when not even one page fits."""
    limit = facts.memlock_soft
    if facts.cap_ipc_lock or limit is None:
        return None
    page_size = os.sysconf("SC_PAGE_SIZE")
    fit = largest_fitting_cap(limit, channels, page_size, pages_per_packet)
    if fit is None:
        raise ValueError(
            f"the locked-memory limit of {exact_size(limit)} is too small for zero copy on "
            f"{channels} channels: raise LimitMEMLOCK, grant CAP_IPC_LOCK, or set "
            "multifd-zerocopy off"
        )
    return min(DEFAULT_IN_FLIGHT_CAP, fit)
