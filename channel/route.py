"""The route to a destination: which interface it leaves by, and whether MSG_ZEROCOPY can
pay off there or the kernel always copies (loopback, veth, tun, no scatter-gather).

Facts from netlink (pyroute2, imported only when asked) and ethtool; `zcmigrate check`
judges them. It knows nothing of migrations.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
from dataclasses import asdict, dataclass
from typing import Any

from zcmigrate.channel.errors import ChannelError

_IFF_LOOPBACK = 0x8
_ARPHRD_LOOPBACK = 772
_RTN_LOCAL = 2
_SIOCETHTOOL = 0x8946
_ETHTOOL_GSG = 0x18
# Interfaces that hand every MSG_ZEROCOPY skb to a local receiver, which costs the
# deferred copy (seed 004, "Loopback"): veth ends in another namespace's stack, tun
# in a local process.
_ALWAYS_COPY_KINDS = frozenset({"veth", "tun"})


class RouteError(ChannelError):
    """The route could not be found (the destination does not resolve, no route)."""


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
            raise RouteError(f"destination {destination!r}: missing ']'")
        return host
    if destination.count(":") == 1:
        return destination.partition(":")[0]
    return destination


def resolve(destination: str) -> str:
    host = split_host(destination)
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RouteError(f"cannot resolve destination {host!r}: {e.strerror}") from e
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
    # Imported here: pyroute2 is slow to import, and only `zcmigrate check` asks.
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    address = resolve(destination)
    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=address)
        except NetlinkError as e:
            raise RouteError(f"no route to {destination} ({address}): "
                             f"{os.strerror(e.code)}") from e
        route = next(iter(routes))
        oif = route.get("RTA_OIF")
        if oif is None:
            # A multipath route spreads connections over several interfaces.
            raise RouteError(f"the route to {destination} ({address}) has no single "
                             "output interface (multipath?); check each next hop's address")
        ifindex = int(oif)
        try:
            link = next(iter(ipr.link("get", index=ifindex)))
        except NetlinkError as e:
            raise RouteError(f"route to {address} leaves by interface {ifindex}, "
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
