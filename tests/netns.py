"""Two network namespaces joined by a veth pair, and the network faults the fault suite
needs between them: the link down and up, and nftables rules that drop a port's traffic.

Names are unique per run and everything is removed whatever happens (a namespace takes
its veth and its nft tables with it). Processes enter a namespace with nsenter; a thread
of this process can create sockets in one (in_namespace). It knows links and packets,
not migrations.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000

IS_ROOT = os.geteuid() == 0
HAVE_NSENTER = shutil.which("nsenter") is not None
# CI may run with a PATH without /usr/sbin, where Debian puts nft.
NFT = shutil.which("nft") or next((p for p in ("/usr/sbin/nft", "/sbin/nft")
                                   if os.access(p, os.X_OK)), None)


def netns_missing() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if not IS_ROOT:
        return "needs root to create network namespaces"
    if not HAVE_NSENTER:
        return "needs nsenter (util-linux) to run processes in a namespace"
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return "needs pyroute2"
    return None


def nft_missing() -> str | None:
    """Why nftables rules cannot be used here, or None."""
    return None if NFT else "needs the nft tool (apt-get install nftables)"


def enter(ns: str | None) -> tuple[str, ...]:
    """The command prefix that runs a program inside namespace `ns` (none for None)."""
    return () if ns is None else ("nsenter", f"--net=/run/netns/{ns}")


@dataclass
class NamespacePair:
    """source: veth `source_if` with `source_addr`/30; dest: its peer `dest_if` with
    `dest_addr`/30. Loopback is up in both."""

    source: str
    dest: str
    source_if: str = "zcf0"
    dest_if: str = "zcf1"
    source_addr: str = "198.18.20.1"
    dest_addr: str = "198.18.20.2"
    _tables: list[tuple[str, str]] = field(default_factory=list)

    def _set_link(self, ns: str, ifname: str, state: str) -> None:
        from pyroute2 import NetNS

        with NetNS(ns) as n:
            n.link("set", index=n.link_lookup(ifname=ifname)[0], state=state)

    def link_down(self) -> None:
        """Pull the cable: the source's end of the veth goes down (the dest's loses its
        carrier), so nothing passes either way and nobody is told."""
        self._set_link(self.source, self.source_if, "down")

    def link_up(self) -> None:
        self._set_link(self.source, self.source_if, "up")

    def link_is_up(self) -> bool:
        from pyroute2 import NetNS

        with NetNS(self.source) as n:
            (link,) = n.get_links(n.link_lookup(ifname=self.source_if)[0])
            return str(link.get_attr("IFLA_OPERSTATE")) == "UP"

    def run(self, ns: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*enter(ns), *argv], capture_output=True, text=True,
                              timeout=timeout, check=False)

    @contextlib.contextmanager
    def blackhole(self, port: int, ns: str | None = None) -> Iterator[str]:
        """Drop every TCP segment to or from `port` in namespace `ns` (the destination's
        by default), silently, both ways, as a firewall that started dropping would; the
        rules live in a table of our own, deleted on exit."""
        ns = ns or self.dest
        with nft_drop(port, ns) as table:
            yield table


def _tag() -> str:
    return uuid.uuid4().hex[:8]


@contextlib.contextmanager
def namespace_pair(prefix: str = "zcfault") -> Iterator[NamespacePair]:
    """Create the pair (names unique to this run), yield it, remove it whatever happens."""
    from pyroute2 import NetNS, netns

    tag = _tag()
    pair = NamespacePair(source=f"{prefix}-src-{tag}", dest=f"{prefix}-dst-{tag}")
    created: list[str] = []
    try:
        for name in (pair.source, pair.dest):
            netns.create(name)
            created.append(name)
        # Made inside the source namespace with its peer placed straight into the other:
        # no part of the pair ever exists in the host's namespace.
        with NetNS(pair.source) as src:
            src.link("add", ifname=pair.source_if, kind="veth",
                     peer={"ifname": pair.dest_if, "net_ns_fd": pair.dest})
        for ns, ifname, addr in ((pair.source, pair.source_if, pair.source_addr),
                                 (pair.dest, pair.dest_if, pair.dest_addr)):
            with NetNS(ns) as n:
                idx = n.link_lookup(ifname=ifname)[0]
                n.addr("add", index=idx, address=addr, prefixlen=30)
                n.link("set", index=idx, state="up")
                n.link("set", index=n.link_lookup(ifname="lo")[0], state="up")
        yield pair
    finally:
        for name in created:
            with contextlib.suppress(Exception):
                netns.remove(name)  # takes the veth and any nft table with it


@contextlib.contextmanager
def loopback_namespace(prefix: str = "zcwhy") -> Iterator[str]:
    """One namespace with only loopback up, for loopback tests that change the network
    (nft rules) and must not touch the host's; removed whatever happens."""
    from pyroute2 import NetNS, netns

    name = f"{prefix}-{_tag()}"
    netns.create(name)
    try:
        with NetNS(name) as n:
            n.link("set", index=n.link_lookup(ifname="lo")[0], state="up")
        yield name
    finally:
        with contextlib.suppress(Exception):
            netns.remove(name)


@contextlib.contextmanager
def nft_drop(port: int, ns: str | None) -> Iterator[str]:
    """Drop TCP to and from `port` in namespace `ns` (None: this one) with a table of our
    own ("inet zcfault_<tag>"), in the input and output hooks, ahead of anything else;
    the table is deleted on exit."""
    table = f"zcfault_{_tag()}"
    rules = f"""
table inet {table} {{
    chain input {{
        type filter hook input priority -300; policy accept;
        tcp dport {port} drop
        tcp sport {port} drop
    }}
    chain output {{
        type filter hook output priority -300; policy accept;
        tcp dport {port} drop
        tcp sport {port} drop
    }}
}}
"""
    assert NFT is not None, nft_missing()
    r = subprocess.run([*enter(ns), NFT, "-f", "-"], input=rules, capture_output=True,
                       text=True, timeout=30, check=False)
    if r.returncode != 0:
        raise AssertionError(f"nft refused the drop rules: {r.stderr.strip()}")
    try:
        yield table
    finally:
        subprocess.run([*enter(ns), NFT, "delete", "table", "inet", table],
                       capture_output=True, timeout=30, check=False)


def in_namespace(ns: str | None, fn: Callable[[], T]) -> T:
    """Run fn() in a thread that has entered namespace `ns` (setns changes only the calling
    thread), and return its result: sockets it creates belong to `ns` for good."""
    if ns is None:
        return fn()
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            enter_namespace(ns)
            result.append(fn())
        except BaseException as e:  # handed to the caller's thread
            errors.append(e)

    t = threading.Thread(target=run, name=f"in-{ns}")
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return result[0]


def enter_namespace(ns: str) -> None:
    """Move the calling thread into network namespace `ns` (for a thread of our own)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)
