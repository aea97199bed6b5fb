"""Post-copy's mechanism, end to end without the migration protocol.

First multifd/userfault.py (and native/zcuffd.c under it) inside this process: a thread
touches a missing page of a registered tmpfs mapping through ctypes.memmove (which
releases the GIL, so the serving thread runs) and waits in the kernel until the test
serves it. Then the harness: a real `zcmigrate guest IMAGE --postcopy SOCKET` process on
an image with holes, a test-side receiver that takes its userfaultfd and serves each
fault from a source copy while a background thread pwrites other missing pages into
the file, and the receiver's death and a second receiver's take-over.

Nothing here can hang: every thread that may wait on a page is joined with a deadline,
and closing the last descriptor of a range (each fixture's clean-up) wakes any thread
still waiting in it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from zcmigrate.multifd.pages import MappedFile
from zcmigrate.multifd.userfault import (
    Features,
    RangeGone,
    UnsupportedMapping,
    UserfaultRange,
    features_for,
    filesystem_type,
    first_missing,
    mapping_granule,
    punch_pages,
)
from zcmigrate.native import ffi, lib

PS = mmap.PAGESIZE
WAIT_S = 10.0
SHM = Path("/dev/shm")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 and Path("/proc/sys/vm/unprivileged_userfaultfd").read_text().strip() != "1",
    reason="userfaultfd needs root or vm.unprivileged_userfaultfd=1",
)


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    if not SHM.is_dir():
        pytest.skip("needs a tmpfs at /dev/shm")
    d = Path(tempfile.mkdtemp(prefix="zcm-uffd-", dir=SHM))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class Registered:
    fd: int
    mapping: MappedFile
    pages: UserfaultRange

    def address(self, page: int) -> int:
        return self.mapping.address + page * PS


@pytest.fixture
def registered(shm_dir: Path) -> Iterator[Registered]:
    """A 64-page tmpfs file, all holes, mapped shared and registered in this process."""
    fd = os.open(shm_dir / "img", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, 64 * PS)
    m = MappedFile(fd, 64 * PS, writable=True)
    pages = UserfaultRange.register(m.address, m.size, mapping_granule(fd), features_for(fd))
    try:
        yield Registered(fd, m, pages)
    finally:
        pages.close()  # wakes any thread still waiting: it reads zeros and ends
        m.close()
        os.close(fd)


class Toucher:
    """A thread that reads 8 bytes at an address without the GIL and times the read."""

    def __init__(self, address: int) -> None:
        self.out = ctypes.create_string_buffer(8)
        self.ns = 0
        self._address = address
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        t0 = time.monotonic_ns()
        ctypes.memmove(self.out, self._address, 8)
        self.ns = time.monotonic_ns() - t0

    def join(self) -> bytes:
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "the touching thread still waits for its page"
        return self.out.raw

    def waits(self, for_s: float = 0.2) -> bool:
        self.thread.join(for_s)
        return self.thread.is_alive()


def next_faults(pages: UserfaultRange, timeout: float = WAIT_S) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pages.wait_faults(0.05):
            got = pages.read_faults()
            if got:
                return got
    raise AssertionError(f"no fault within {timeout} s")


def page_of(byte: int) -> bytes:
    return bytes([byte]) * PS


# ------------------------------------------------------------------ the mechanism


def test_a_fault_names_its_page_and_thread_and_a_copy_wakes_the_thread(
    registered: Registered,
) -> None:
    t = Toucher(registered.address(5))
    (fault,) = next_faults(registered.pages)
    assert fault.offset == 5 * PS
    assert fault.tid == t.thread.native_id
    assert not fault.write
    assert t.waits()
    r = registered.pages.copy(fault.offset, page_of(7))
    assert (r.copied, r.existed) == (1, 0)
    assert t.join() == bytes([7]) * 8
    assert os.pread(registered.fd, PS, 5 * PS) == page_of(7)  # in the page cache


def test_a_page_that_arrived_by_pwrite_meanwhile_is_kept_and_its_waiter_woken(
    registered: Registered,
) -> None:
    """The race of a background push: the fault was read while the page was missing,
    then a pwrite put it into the page cache (which wakes no one). The copy finds it
    there (EEXIST), leaves it, and wakes the faulting thread, which reads the pwrite."""
    t = Toucher(registered.address(9))
    (fault,) = next_faults(registered.pages)
    os.pwrite(registered.fd, page_of(0x42), 9 * PS)
    assert t.waits(), "a pwrite must not wake a thread waiting in a userfault"
    r = registered.pages.copy(fault.offset, page_of(0x99))
    assert (r.copied, r.existed) == (0, 1)
    assert t.join() == bytes([0x42]) * 8


def test_a_run_is_copied_around_a_page_that_is_there_already(registered: Registered) -> None:
    os.pwrite(registered.fd, page_of(1), 11 * PS)
    r = registered.pages.copy(10 * PS, page_of(2) + page_of(3) + page_of(4))
    assert (r.copied, r.existed) == (2, 1)
    assert [os.pread(registered.fd, 1, p * PS) for p in (10, 11, 12)] == [b"\2", b"\1", b"\4"]


def test_a_woken_thread_whose_page_is_still_missing_faults_again(registered: Registered) -> None:
    """What lets a new server take over: a fault read and never served is raised again
    by a wake (the kernel never hands the same message out twice)."""
    t = Toucher(registered.address(3))
    next_faults(registered.pages)
    registered.pages.wake()
    (again,) = next_faults(registered.pages)
    assert again.offset == 3 * PS and again.tid == t.thread.native_id
    registered.pages.copy(again.offset, page_of(5))
    assert t.join() == bytes([5]) * 8


def test_closing_the_last_descriptor_lets_a_missing_page_read_as_zeros(
    registered: Registered,
) -> None:
    """Why the guest keeps its own descriptor: with the last one closed the range is
    unregistered, and a waiting thread finds a page of zeros nobody sent."""
    t = Toucher(registered.address(4))
    next_faults(registered.pages)
    registered.pages.close()
    assert t.join() == bytes(8)


def test_while_another_descriptor_stays_open_a_missing_page_waits(
    registered: Registered,
) -> None:
    """The receiver's copy of the descriptor closing (it died) unregisters nothing: the
    thread waits, and a server with the other descriptor can still serve it."""
    other = UserfaultRange(os.dup(registered.pages.fileno()), registered.pages.base,
                           registered.pages.length, registered.pages.granule)
    with other:
        t = Toucher(registered.address(6))
        next_faults(registered.pages)
        registered.pages.close()  # the "receiver" dies holding the fault it read
        assert t.waits(0.5)
        assert os.lseek(registered.fd, 6 * PS, os.SEEK_HOLE) == 6 * PS  # nothing invented
        other.wake()
        (fault,) = next_faults(other)
        other.copy(fault.offset, page_of(8))
        assert t.join() == bytes([8]) * 8


def test_a_punched_page_faults_as_missing_again(registered: Registered) -> None:
    registered.pages.copy(2 * PS, page_of(1))
    assert punch_pages(registered.fd, [2 * PS], PS) == 1
    assert first_missing(registered.fd, 64 * PS) == 0
    t = Toucher(registered.address(2))
    (fault,) = next_faults(registered.pages)
    assert fault.offset == 2 * PS
    registered.pages.copy(fault.offset, page_of(3))
    assert t.join() == bytes([3]) * 8


def test_first_missing_finds_the_first_hole_and_none_once_every_page_is_there(
    registered: Registered,
) -> None:
    assert first_missing(registered.fd, 64 * PS) == 0
    registered.pages.copy(0, page_of(1) * 64)
    assert first_missing(registered.fd, 64 * PS) is None
    punch_pages(registered.fd, [40 * PS, 41 * PS, 63 * PS], PS)
    assert first_missing(registered.fd, 64 * PS) == 40 * PS
    assert os.fstat(registered.fd).st_size == 64 * PS  # punching keeps the size


def test_pages_outside_the_range_or_not_whole_are_refused_and_nothing_is_done(
    registered: Registered,
) -> None:
    pages = registered.pages
    for offset, data in ((64 * PS, page_of(1)), (63 * PS, page_of(1) * 2),
                         (PS // 2, page_of(1)), (0, b"x" * (PS - 1)), (0, b"")):
        with pytest.raises(ValueError, match="not whole"):
            pages.copy(offset, data)
    for offset, length in ((0, 65 * PS), (64 * PS, PS), (1, PS), (0, 0)):
        with pytest.raises(ValueError, match="not whole"):
            pages.wake(offset, length)
    assert first_missing(registered.fd, 64 * PS) == 0 and os.lseek(
        registered.fd, 0, os.SEEK_HOLE) == 0
    registered.pages.copy(0, page_of(1) * 64)
    for bad in ([64 * PS], [PS + 1], [0, 1 << 63]):
        with pytest.raises(ValueError, match="inside the"):
            punch_pages(registered.fd, bad, PS)
    assert first_missing(registered.fd, 64 * PS) is None  # nothing punched
    for base, length in ((1, PS), (0, 0), (PS, PS + 1)):
        with pytest.raises(ValueError):
            UserfaultRange(-1, base, length, PS)


def test_the_c_side_refuses_what_python_would_not_pass() -> None:
    """zcuffd.c checks its bounds itself: a caller other than userfault.py gets
    ZCU_EBOUNDS, never a copy or wake outside the range (descriptor -1 is never used)."""
    res = ffi.new("struct zcu_copy_result *")
    src = ffi.new("char[]", 2 * PS)
    eb = lib.ZCU_EBOUNDS
    base, length = 1 << 30, 16 * PS
    assert lib.zcu_copy(-1, base, length, PS, 16 * PS, src, PS, res) == eb
    assert lib.zcu_copy(-1, base, length, PS, 15 * PS, src, 2 * PS, res) == eb
    assert lib.zcu_copy(-1, base, length, PS, 0, ffi.NULL, PS, res) == eb
    assert lib.zcu_copy(-1, base, length, 3000, 0, src, 3000, res) == eb  # not a power of 2
    assert lib.zcu_copy(-1, (1 << 64) - PS, 2 * PS, PS, 0, src, PS, res) == eb  # wraps
    assert lib.zcu_wake(-1, base, length, PS, 0, 0) == eb
    assert lib.zcu_wake(-1, base + 1, length, PS, 0, PS) == eb
    faults = ffi.new("struct zcu_fault[1]")
    assert lib.zcu_read_faults(-1, base, length, PS, faults, 0) == eb
    ioctls = ffi.new("uint64_t *")
    assert lib.zcu_register(-1, base, 0, PS, ioctls) == eb
    n = ffi.new("uint32_t *")
    offs = ffi.new("uint64_t[]", [PS, 2 * PS - 1])
    assert lib.zcu_punch(-1, 4 * PS, offs, 2, PS, n) == eb and n[0] == 0


def test_a_copy_after_the_registering_process_exited_says_the_range_is_gone(
    shm_dir: Path,
) -> None:
    """What a receiver sees when the guest exits while it serves: RangeGone, not a
    generic failure."""
    import socket

    child_code = (
        "import os, socket, sys\n"
        "from zcmigrate.multifd.pages import MappedFile\n"
        "from zcmigrate.multifd.userfault import UserfaultRange, features_for, mapping_granule\n"
        f"fd = os.open({str(shm_dir / 'child.img')!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
        f"os.ftruncate(fd, 8 * {PS})\n"
        "m = MappedFile(fd, m_size := 8 * os.sysconf('SC_PAGESIZE'), writable=True)\n"
        "r = UserfaultRange.register(m.address, m_size, mapping_granule(fd), features_for(fd))\n"
        "s = socket.socket(fileno=int(sys.argv[1]))\n"
        "socket.send_fds(s, [m.address.to_bytes(8, 'little')], [r.fileno()])\n"
        "s.recv(1)\n"
    )
    a, b = socket.socketpair()
    with a, b:
        proc = subprocess.Popen([sys.executable, "-c", child_code, str(b.fileno())],
                                pass_fds=[b.fileno()])
        try:
            data, fds, _, _ = socket.recv_fds(a, 8, 1)
            pages = UserfaultRange(fds[0], int.from_bytes(data, "little"), 8 * PS, PS)
            with pages:
                assert pages.copy(0, page_of(1)).copied == 1  # alive: served
                a.send(b"x")
                assert proc.wait(WAIT_S) == 0
                with pytest.raises(RangeGone, match="exited"):
                    pages.copy(PS, page_of(1))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_mapping_of_a_disk_file_is_refused_with_the_reason(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if filesystem_type(fd) in ("tmpfs", "hugetlbfs"):
            pytest.skip("the temporary directory is on a tmpfs here")
        os.ftruncate(fd, 4 * PS)
        m = MappedFile(fd, 4 * PS, writable=True)
        try:
            with pytest.raises(UnsupportedMapping, match="tmpfs"):
                UserfaultRange.register(m.address, m.size, PS, features_for(fd))
        finally:
            m.close()
    finally:
        os.close(fd)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_without_privilege_the_error_names_every_way_to_get_it() -> None:
    if Path("/proc/sys/vm/unprivileged_userfaultfd").read_text().strip() == "1":
        pytest.skip("unprivileged userfaultfd is allowed here")
    code = ("from zcmigrate.multifd.userfault import Features, open_userfault\n"
            "open_userfault(Features.MISSING_SHMEM)\n")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=30, cwd="/")
    assert r.returncode != 0
    assert "UserfaultUnavailable" in r.stderr
    for remedy in ("root", "vm.unprivileged_userfaultfd=1", "/dev/userfaultfd"):
        assert remedy in r.stderr


def test_the_features_asked_for_say_which_file_system_and_name_the_thread(
    shm_dir: Path,
) -> None:
    fd = os.open(shm_dir / "f", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        assert filesystem_type(fd) == "tmpfs"
        assert features_for(fd) == Features.MISSING_SHMEM | Features.THREAD_ID
        assert mapping_granule(fd) == PS
    finally:
        os.close(fd)


def _latency(samples_ns: list[int]) -> tuple[float, float]:
    ordered = sorted(samples_ns)
    p99 = ordered[min(len(ordered) - 1, (len(ordered) * 99) // 100)]
    return statistics.median(ordered) / 1000, p99 / 1000


def test_fault_service_latency_as_the_faulting_thread_sees_it(
    registered: Registered, record_property: Callable[[str, object], None]
) -> None:
    """From the touch of a missing page to the thread running again, served by another
    thread that polls, reads the fault and copies the page: the floor of what a
    post-copy guest waits for a page that is at hand (no network). Recorded, not judged:
    only a generous sanity bound."""
    n = 64
    src = page_of(0x5A)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if registered.pages.wait_faults(0.05):
                for f in registered.pages.read_faults():
                    registered.pages.copy(f.offset, src)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    stalls = []
    try:
        for rnd in range(4):  # 4 rounds of 64 faults: punch the pages out between them
            for page in range(n):
                t = Toucher(registered.address(page))
                assert t.join() == bytes([0x5A]) * 8
                stalls.append(t.ns)
            if rnd < 3:
                punch_pages(registered.fd, [p * PS for p in range(n)], PS)
    finally:
        stop.set()
        server.join(WAIT_S)
    median_us, p99_us = _latency(stalls)
    record_property("fault_stall_median_us", round(median_us, 1))
    record_property("fault_stall_p99_us", round(p99_us, 1))
    print(f"\nfault stall, in-process server: median {median_us:.1f} us, p99 {p99_us:.1f} us "
          f"over {len(stalls)} faults")
    assert median_us < 100_000  # 0.1 s: only a stuck server would miss it
