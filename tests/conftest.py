"""Shared fixtures: real loopback TCP channel pairs and mmap'd images."""

from __future__ import annotations

import atexit
import mmap
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from zcmigrate.channel.zcsocket import Channel, Listener, connect

# The control sockets of the migrations the tests start: in a directory of this run's own,
# inherited by every child. The default (/run/zcmigrate/IMAGE.sock, by the image's file
# name alone) is shared by every run on the machine, and two runs at once (or one and a
# sender left over by another) failed each other's migrations: "src.img.sock is in use by
# another migration". Set at import, before any test module builds a child's environment.
os.environ["ZCMIGRATE_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="zcmigrate-tests-")
atexit.register(shutil.rmtree, os.environ["ZCMIGRATE_RUNTIME_DIR"], ignore_errors=True)

# Hypothesis times each example against a 200 ms deadline and its data generation against
# the too_slow health check: a loaded 2-core machine can break either, and no test here is
# about speed. A test's own @settings still applies on top of this profile.
settings.register_profile("zcmigrate", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("zcmigrate")


def tcp_pair(
    *, zero_copy: bool, host: str = "127.0.0.1", in_flight_cap: int | None = None
) -> tuple[Channel, Channel]:
    """A connected (sender, receiver) pair over real TCP on loopback."""
    with Listener(host, 0) as lst:
        got: list[Channel] = []
        t = threading.Thread(target=lambda: got.append(lst.accept(10)))
        t.start()
        tx = connect(host, lst.port, zero_copy=zero_copy, in_flight_cap=in_flight_cap)
        t.join(10)
    return tx, got[0]


@pytest.fixture
def random_image() -> Iterator[mmap.mmap]:
    size = 256 << 20
    mm = mmap.mmap(-1, size)
    step = 16 << 20
    for off in range(0, size, step):
        mm[off : off + step] = os.urandom(step)
    yield mm
    mm.close()
