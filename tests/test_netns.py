"""The fault suite's network harness (tests/netns.py) does what it says: the pair connects
over its veth, a pulled link and an nft drop stop traffic and undo cleanly, and nothing
is left behind. Its own test, so that a fault test's failure is never the harness's."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from tests.netns import (
    NFT,
    NamespacePair,
    enter,
    in_namespace,
    namespace_pair,
    netns_missing,
    nft_drop,
    nft_missing,
)


def connects(pair: NamespacePair, port: int, timeout: float = 0.5) -> bool:
    """Whether a TCP connection from the source namespace reaches `port` in the dest's."""
    def attempt() -> bool:
        try:
            socket.create_connection((pair.dest_addr, port), timeout=timeout).close()
        except OSError:
            return False
        return True
    return in_namespace(pair.source, attempt)


def test_the_pair_connects_and_each_fault_stops_traffic_until_undone() -> None:
    why = netns_missing() or nft_missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot run in CI: {why}")
        pytest.skip(why)
    with namespace_pair("zctest") as pair:
        lst = in_namespace(pair.dest, lambda: socket.create_server((pair.dest_addr, 0)))
        port = lst.getsockname()[1]
        try:
            assert connects(pair, port)
            pair.link_down()
            assert not pair.link_is_up() and not connects(pair, port)
            pair.link_up()
            assert connects(pair, port)
            with pair.blackhole(port) as table:
                assert not connects(pair, port)
                listed = subprocess.run([*enter(pair.dest), str(NFT), "list", "tables"],
                                        capture_output=True, text=True, check=True)
                assert table in listed.stdout
            assert connects(pair, port)
            with nft_drop(port, pair.source):  # either end can drop
                assert not connects(pair, port)
            assert connects(pair, port)
        finally:
            lst.close()
        names = (pair.source, pair.dest)
    assert not any(os.path.exists(f"/run/netns/{n}") for n in names)
