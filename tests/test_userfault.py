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

import contextlib
import ctypes
import errno
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.guest_children import Child, child, zcmigrate
from zcmigrate.channel.errors import ReadTimeout
from zcmigrate.channel.fdpass import FdListener
from zcmigrate.migrate.guest import (
    CONTROL_MAGIC,
    CONTROL_SIZE,
    ControlRecord,
    DeviceState,
    GuestControl,
    GuestError,
    GuestState,
    LeaseMode,
    PostcopyGuest,
    PostcopyPhase,
    check_oracle,
    control_path,
    create_image,
    read_control_record,
    threads_waiting_for_pages,
)
from zcmigrate.migrate.guest.layout import Field
from zcmigrate.multifd.pages import MappedFile
from zcmigrate.multifd.userfault import (
    Fault,
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

    def join(self, timeout: float) -> bytes:
        """The 8 bytes read; fails the test if the read has not ended within `timeout`."""
        self.thread.join(timeout)
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


def present(fd: int, offset: int) -> bool:
    """Whether the file holds the page at `offset` (it is no hole)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) == offset
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data from there to the end
            return False
        raise


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
    assert t.join(WAIT_S) == bytes([7]) * 8
    assert os.pread(registered.fd, PS, 5 * PS) == page_of(7)  # in the page cache


def test_after_unregistering_a_copy_says_the_range_is_gone(registered: Registered) -> None:
    """What a receiver sees for a fault it read just before the guest unregistered (all
    pages there) and serves just after: nothing to do, said as RangeGone."""
    registered.pages.copy(0, page_of(1) * 64)
    registered.pages.unregister()
    with pytest.raises(RangeGone, match="no longer registered"):
        registered.pages.copy(0, page_of(2))
    registered.pages.wake()  # the kernel looks for waiters, not a registration: no-op


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
    assert t.join(WAIT_S) == bytes([0x42]) * 8


def test_a_run_is_copied_around_a_page_that_is_there_already(registered: Registered) -> None:
    os.pwrite(registered.fd, page_of(1), 11 * PS)
    r = registered.pages.copy(10 * PS, page_of(2) + page_of(3) + page_of(4))
    assert (r.copied, r.existed) == (2, 1)
    assert [os.pread(registered.fd, 1, p * PS) for p in (10, 11, 12)] == [b"\2", b"\1", b"\4"]


def test_a_packet_s_pages_are_placed_run_by_run_in_one_call(registered: Registered) -> None:
    """copy_pages: page i of the data goes to offsets[i], adjacent pages as one run, a
    page that is there already kept (and counted), every faulting thread woken."""
    os.pwrite(registered.fd, page_of(1), 21 * PS)
    t = Toucher(registered.address(30))
    next_faults(registered.pages)
    offsets = array("Q", [20 * PS, 21 * PS, 22 * PS, 30 * PS, 5 * PS])
    data = b"".join(page_of(b) for b in (2, 3, 4, 7, 9))
    r = registered.pages.copy_pages(offsets, len(offsets), PS, data)
    assert (r.copied, r.existed) == (4, 1)
    got = [os.pread(registered.fd, 1, p * PS) for p in (20, 21, 22, 30, 5)]
    assert got == [b"\2", b"\1", b"\4", b"\7", b"\x09"]
    assert t.join(WAIT_S) == bytes([7]) * 8


def test_a_packet_with_one_bad_offset_places_nothing(registered: Registered) -> None:
    pages = registered.pages
    for offsets, data in (([PS, 64 * PS], page_of(1) * 2),  # past the range
                          ([PS, PS + 1], page_of(1) * 2),  # unaligned
                          ([PS, 2 * PS], page_of(1))):  # data short of two pages
        with pytest.raises(ValueError, match="inside the"):
            pages.copy_pages(array("Q", offsets), len(offsets), PS, data)
    assert first_missing(registered.fd, 64 * PS) == 0
    assert not present(registered.fd, PS)


def test_a_woken_thread_whose_page_is_still_missing_faults_again(registered: Registered) -> None:
    """What lets a new server take over: a fault read and never served is raised again
    by a wake (the kernel never hands the same message out twice)."""
    t = Toucher(registered.address(3))
    next_faults(registered.pages)
    registered.pages.wake()
    (again,) = next_faults(registered.pages)
    assert again.offset == 3 * PS and again.tid == t.thread.native_id
    registered.pages.copy(again.offset, page_of(5))
    assert t.join(WAIT_S) == bytes([5]) * 8


def test_closing_the_last_descriptor_lets_a_missing_page_read_as_zeros(
    registered: Registered,
) -> None:
    """Why the guest keeps its own descriptor: with the last one closed the range is
    unregistered, and a waiting thread finds a page of zeros nobody sent."""
    t = Toucher(registered.address(4))
    next_faults(registered.pages)
    registered.pages.close()
    assert t.join(WAIT_S) == bytes(8)


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
        assert t.join(WAIT_S) == bytes([8]) * 8


def test_a_punched_page_faults_as_missing_again(registered: Registered) -> None:
    registered.pages.copy(2 * PS, page_of(1))
    assert punch_pages(registered.fd, [2 * PS], PS) == 1
    assert first_missing(registered.fd, 64 * PS) == 0
    t = Toucher(registered.address(2))
    (fault,) = next_faults(registered.pages)
    assert fault.offset == 2 * PS
    registered.pages.copy(fault.offset, page_of(3))
    assert t.join(WAIT_S) == bytes([3]) * 8


def test_threads_may_place_pages_into_one_range_at_once(registered: Registered) -> None:
    """A receiver's workers each place the pages they received: copies run in parallel,
    each counted by its own call."""
    results: dict[int, tuple[int, int]] = {}

    def place(worker: int) -> None:
        copied = existed = 0
        for page in range(worker, 64, 4):
            r = registered.pages.copy(page * PS, page_of(page))
            copied, existed = copied + r.copied, existed + r.existed
        results[worker] = (copied, existed)

    workers = [threading.Thread(target=place, args=(w,)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(WAIT_S)
    assert results == {w: (16, 0) for w in range(4)}
    assert all(os.pread(registered.fd, PS, p * PS) == page_of(p) for p in range(64))


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
    assert lib.zcu_copy_pages(-1, base, length, PS, offs, 2, PS, src, 2 * PS, res) == eb
    good = ffi.new("uint64_t[]", [0, 15 * PS])
    assert lib.zcu_copy_pages(-1, base, length, PS, good, 2, PS, src, PS, res) == eb  # short
    assert lib.zcu_copy_pages(-1, base, length, PS, good, 2, PS, ffi.NULL, 2 * PS, res) == eb
    flags = ffi.new("uint8_t[]", 4)
    assert lib.zcu_flags_set(flags, 4, offs, 2, PS, 1, n) == eb and list(flags) == [0] * 4
    assert lib.zcu_flags_set(flags, 4, good, 2, PS, 1, n) == eb and list(flags) == [0] * 4


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
                # The address space goes with the last reference to it, which anyone
                # reading the child's /proc files holds for a moment: until then a copy
                # may still land. Never after.
                with pytest.raises(RangeGone, match=r"exited|no longer registered"):
                    for attempt in range(100):
                        pages.copy((1 + attempt % 7) * PS, page_of(1))
                        time.sleep(0.02)
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
                assert t.join(WAIT_S) == bytes([0x5A]) * 8
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


# ------------------------------------------------------------------ the harness: a guest process

NPAGES = 8192  # 32 MiB
MISSING, SERVING, PUSHING, PRESENT = range(4)


@dataclass
class Images:
    src: Path
    """The source's latest version of every page (and the device state's step)."""
    dst: Path
    """The destination's image: the source's pages, less the holes."""
    state: DeviceState
    holes: list[int]


def make_images(d: Path, holes_of: Callable[[random.Random], set[int]]) -> Images:
    """A source image with its step at a third of the pages, and a destination copy of
    an older version of it from which every page the source changed since (and the
    pages never sent) is punched out: the destination holds no stale page, and every
    page it lacks must come from the source."""
    src, dst = d / "src.img", d / "dst.img"
    create_image(src, NPAGES * PS, PS, "random", seed=13)
    position = NPAGES // 3
    rng = random.Random(29)
    fd = os.open(src, os.O_RDWR | os.O_CLOEXEC)
    try:
        for p in range(position):  # touched once more: byte 0 is value + 1
            os.pwrite(fd, b"\1", p * PS)
        shutil.copyfile(src, dst)
        holes = holes_of(rng)
        # Dirtied at the source after precopy sent them: the source's newer contents.
        for p in sorted(holes)[::2]:
            byte0 = os.pread(fd, 1, p * PS)
            os.pwrite(fd, byte0 + rng.randbytes(PS - 1), p * PS)
    finally:
        os.close(fd)
    dfd = os.open(dst, os.O_RDWR | os.O_CLOEXEC)
    try:
        assert punch_pages(dfd, [p * PS for p in sorted(holes)], PS) == len(holes)
    finally:
        os.close(dfd)
    state = DeviceState(npages=NPAGES, page_size=PS, position=position, value=0,
                        touched=position)
    return Images(src, dst, state, sorted(holes))


class Receiver:
    """The test's receiver for one guest: a thread serves each fault from the source copy
    (the page fetched on demand), another pwrites missing pages into the destination file
    (the background push). Every page is placed once, by whichever of the two claims it
    while it is missing: a pwrite onto a page that is there may undo a write the guest
    made since. Every `defer`-th fault is not copied but asked of the pusher (a page
    request answered on the background stream): the server waits for its pwrite, and its
    copy then finds the page there (EEXIST) and wakes the faulting thread."""

    def __init__(self, guest: PostcopyGuest, images: Images, *, push: bool, defer: int = 0,
                 die_at: Callable[[Fault], bool] | None = None, push_rate: float = 20000.0):
        self.guest = guest
        self.pages = guest.pages
        self._src_fd = os.open(images.src, os.O_RDONLY | os.O_CLOEXEC)
        self.src = mmap.mmap(self._src_fd, NPAGES * PS, prot=mmap.PROT_READ)
        self.dst_fd = os.open(images.dst, os.O_RDWR | os.O_CLOEXEC)
        self.state = {p: MISSING for p in images.holes}
        # Pages present already, whatever this receiver saw (a take-over after another).
        for p in images.holes:
            if present(self.dst_fd, p * PS):
                self.state[p] = PRESENT
        self.cond = threading.Condition()
        self.requests: list[int] = []
        self.defer, self.die_at, self.push_gap = defer, die_at, 1.0 / push_rate
        self.faults = self.copied = self.existed = self.deferred = self.pushed = 0
        self.on_demand_ns: list[int] = []
        self.via_push_ns: list[int] = []
        self.died_on: Fault | None = None
        self.errors: list[str] = []
        self._stop = threading.Event()
        self.finishing = threading.Event()
        self._threads = [threading.Thread(target=self._guarded, args=(self._serve,),
                                          daemon=True)]
        self._order: list[int] = []
        if push:
            self._add_pusher()

    def _add_pusher(self) -> threading.Thread:
        with self.cond:
            self._order = [p for p, st in self.state.items() if st == MISSING]
        random.Random(3).shuffle(self._order)
        t = threading.Thread(target=self._guarded, args=(self._push,), daemon=True)
        self._threads.append(t)
        return t

    def start(self) -> Receiver:
        for t in self._threads:
            t.start()
        return self

    def start_push(self) -> None:
        """Push the pages still missing from now on."""
        self._add_pusher().start()

    def _guarded(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as e:
            # As text: the exception's frames would keep views of the source mapped.
            self.errors.append("".join(traceback.format_exception(e)))
            self._stop.set()

    def _page(self, page: int) -> memoryview:
        return memoryview(self.src)[page * PS:(page + 1) * PS]

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.pages.wait_faults(0.05):
                continue
            t_read = time.monotonic_ns()
            for f in self.pages.read_faults():
                if self.die_at is not None and self.die_at(f):
                    self.died_on = f
                    self.guest.close()  # the receiver dies holding the fault it read
                    self._stop.set()
                    return
                self.faults += 1
                page = f.offset // PS
                with self.cond:
                    mine = self.state.get(page, PRESENT) == MISSING
                    if mine and self.defer and self.faults % self.defer == 0 and len(
                            self._threads) > 1:
                        self.requests.append(page)
                        self.cond.notify_all()
                        self.deferred += 1
                        mine = False
                    if mine:
                        self.state[page] = SERVING
                    else:
                        assert self.cond.wait_for(
                            lambda p=page: self.state.get(p, PRESENT) == PRESENT, WAIT_S)
                try:
                    r = self.pages.copy(f.offset, self._page(page))
                except RangeGone:
                    # Read before the guest unregistered, served after: every page was
                    # there, and the unregister woke the thread.
                    if not self.finishing.is_set():
                        raise
                    continue
                self.copied += r.copied
                self.existed += r.existed
                if mine:
                    with self.cond:
                        self.state[page] = PRESENT
                        self.cond.notify_all()
                (self.on_demand_ns if mine else self.via_push_ns).append(
                    time.monotonic_ns() - t_read)

    def _push(self) -> None:
        while not self._stop.is_set():
            with self.cond:
                if not self.requests and not self._order:
                    return
                page = self.requests.pop(0) if self.requests else self._order.pop()
                if self.state[page] != MISSING:
                    continue
                self.state[page] = PUSHING
            os.pwrite(self.dst_fd, self._page(page), page * PS)
            with self.cond:
                self.state[page] = PRESENT
                self.cond.notify_all()
            self.pushed += 1
            time.sleep(self.push_gap)

    def wait_all_present(self, timeout: float = 60.0) -> None:
        with self.cond:
            assert self.cond.wait_for(
                lambda: all(s == PRESENT for s in self.state.values()) or bool(self.errors),
                timeout), "pages still missing"
        assert not self.errors, "\n".join(self.errors)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(WAIT_S)
        assert not any(t.is_alive() for t in self._threads), "a receiver thread hangs"
        assert not self.errors, "\n".join(self.errors)
        self.src.close()
        os.close(self._src_fd)
        os.close(self.dst_fd)


@pytest.fixture
def link_path(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    return d / "postcopy.sock"


def start_guest(images: Images, sock: Path, rate: str) -> contextlib.AbstractContextManager[
        Child]:
    return child([sys.executable, "-m", "zcmigrate", "guest", str(images.dst), "--postcopy",
                  str(sock), "--dirty-rate", rate, "--go-timeout", "30"])


def control(images: Images) -> ControlRecord:
    record = read_control_record(images.dst)
    assert record is not None
    return record


def wait_for(what: str, ok: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"not {what} within {timeout} s"
        time.sleep(0.01)


def assert_no_page_invented(images: Images, *, complete: bool) -> None:
    """Every page the destination holds is the source's latest version (bytes 1..; byte
    0 is the workload's), and with `complete` every page is there."""
    with open(images.src, "rb") as s, open(images.dst, "rb") as d:
        fd = d.fileno()
        for p in range(NPAGES):
            if not present(fd, p * PS):
                assert not complete, f"page {p} is missing"
                continue
            want, got = os.pread(s.fileno(), PS, p * PS), os.pread(fd, PS, p * PS)
            assert got[1:] == want[1:], f"page {p} is not the source's latest version"


def finish(receiver: Receiver, guest: PostcopyGuest, proc: Child, images: Images) -> None:
    """Every page pushed, the guest told, it unregisters, runs on, exits on request; the
    oracle holds for the state it exits with and every page is the source's."""
    receiver.wait_all_present()
    receiver.finishing.set()
    assert guest.done(WAIT_S) is None
    proc.expect("guest post-copy complete")
    assert control(images).postcopy.phase == PostcopyPhase.COMPLETE
    receiver.stop()
    guest.close()
    touched = control(images).touched
    wait_for("running on", lambda: control(images).touched > touched + 1000)
    with GuestControl.open(images.dst) as ctl:
        ctl.request_exit(WAIT_S)
    assert proc.wait() == 0
    final = control(images)
    state = DeviceState(npages=NPAGES, page_size=PS, position=final.position,
                        value=final.value, touched=final.touched)
    verdict = check_oracle(images.dst, state)
    assert verdict.ok, verdict.message
    assert_no_page_invented(images, complete=True)
    fd = os.open(images.dst, os.O_RDONLY)
    try:
        assert first_missing(fd, NPAGES * PS) is None
    finally:
        os.close(fd)


def test_a_postcopy_guest_gets_every_page_from_its_receiver(
    shm_dir: Path, link_path: Path, record_property: Callable[[str, object], None]
) -> None:
    """A fifth of the pages dirtied after precopy and four runs never sent are missing;
    the guest runs as fast as it can from the go on, its faults are served from the
    source copy while a paced pusher pwrites the rest, and some faults are answered by
    the pusher (EEXIST, then wake)."""
    def holes(rng: random.Random) -> set[int]:
        runs = {p for start in (200, 3000, 5100, 8000) for p in range(start, start + 150)}
        return runs | set(rng.sample(range(NPAGES), NPAGES // 5))

    images = make_images(shm_dir, holes)
    with FdListener(link_path) as lst, start_guest(images, link_path, "0") as proc:
        guest = PostcopyGuest.accept(lst, WAIT_S)
        assert (guest.hello.size, guest.hello.granule, guest.hello.recovery) == (
            NPAGES * PS, PS, False)
        assert guest.peer.pid == proc.pid
        proc.expect("guest offered:")
        receiver = Receiver(guest, images, push=True, defer=5, push_rate=4000).start()
        guest.go(images.state, WAIT_S)
        proc.expect("guest running:")
        assert control(images).postcopy.phase == PostcopyPhase.SERVED
        assert control(images).postcopy.peer == os.getpid()
        finish(receiver, guest, proc, images)
    assert receiver.faults > 0 and receiver.pushed > 0
    assert receiver.existed >= receiver.deferred > 0  # the race was run, and woke
    assert receiver.copied + receiver.pushed == len(images.holes)
    assert receiver.pages.stray_messages == 0
    median_us, p99_us = _latency(receiver.on_demand_ns)
    push_median_us, push_p99_us = _latency(receiver.via_push_ns)
    for name, value in (("faults", receiver.faults), ("copied", receiver.copied),
                        ("pushed", receiver.pushed), ("existed", receiver.existed),
                        ("service_median_us", round(median_us, 1)),
                        ("service_p99_us", round(p99_us, 1)),
                        ("via_push_median_us", round(push_median_us, 1)),
                        ("via_push_p99_us", round(push_p99_us, 1))):
        record_property(name, value)
    print(f"\nguest process: {receiver.faults} faults, {receiver.copied} pages copied on "
          f"demand, {receiver.pushed} pushed, {receiver.existed} found there (EEXIST, woken); "
          f"service from read to wake: median {median_us:.1f} us, p99 {p99_us:.1f} us; "
          f"through the pusher: median {push_median_us:.1f} us, p99 {push_p99_us:.1f} us")
    assert median_us < 100_000


def test_done_with_a_hole_left_is_refused_and_the_guest_stays_registered(
    shm_dir: Path, link_path: Path
) -> None:
    """The guest checks the receiver's word: with a page still missing it answers
    refused (unregistering would let that page read as zeros) and goes on being
    served; once every page is there, done completes."""
    images = make_images(shm_dir, lambda rng: set(range(NPAGES - 64, NPAGES)))
    with FdListener(link_path) as lst, start_guest(images, link_path, "4M") as proc:
        guest = PostcopyGuest.accept(lst, WAIT_S)
        receiver = Receiver(guest, images, push=False).start()
        guest.go(images.state, WAIT_S)
        reason = guest.done(WAIT_S)
        assert reason is not None and "still missing" in reason
        proc.expect("but the page at offset")
        assert control(images).postcopy.phase == PostcopyPhase.SERVED
        receiver.start_push()
        finish(receiver, guest, proc, images)


def _die_in_the_last_quarter(f: Fault) -> bool:
    return f.offset >= NPAGES * 3 // 4 * PS


def every_other_page(rng: random.Random) -> set[int]:
    return set(range(1, NPAGES, 2))


def wait_blocked(images: Images, receiver: Receiver, proc: Child) -> None:
    """The receiver died holding a fault: the guest stops, says so, and invents nothing."""
    wait_for("the receiver's death", lambda: receiver.died_on is not None)
    proc.expect("guest post-copy: the receiver")
    wait_for("lost", lambda: control(images).postcopy.phase == PostcopyPhase.LOST)
    touched = control(images).touched
    time.sleep(1.0)
    record = control(images)
    assert record.touched == touched, "the guest went on past a missing page"
    assert time.monotonic_ns() - record.heartbeat_ns > 900_000_000
    assert record.state == GuestState.RUNNING and proc.proc.poll() is None
    assert receiver.died_on is not None
    waited = receiver.died_on.offset
    fd = os.open(images.dst, os.O_RDONLY)
    try:
        assert not present(fd, waited), "the awaited page was filled"
    finally:
        os.close(fd)
    assert_no_page_invented(images, complete=False)
    status = zcmigrate("guest", str(images.dst), "--status")
    assert status.returncode == 0, status.stderr
    assert "postcopy=lost" in status.stdout and f"pid={proc.pid}" in status.stdout
    if threads_waiting_for_pages(proc.pid) is not None:
        assert "waiting-for-pages=1" in status.stdout


def test_a_dead_receiver_leaves_the_guest_waiting_never_reading_zeros(
    shm_dir: Path, link_path: Path
) -> None:
    images = make_images(shm_dir, every_other_page)
    with start_guest(images, link_path, "64M") as proc:
        with FdListener(link_path) as lst:
            guest = PostcopyGuest.accept(lst, WAIT_S)
            receiver = Receiver(guest, images, push=False,
                                die_at=_die_in_the_last_quarter).start()
            guest.go(images.state, WAIT_S)
            wait_blocked(images, receiver, proc)
            receiver.stop()
        proc.proc.kill()
        assert proc.wait() == -9
    assert_no_page_invented(images, complete=False)


def test_a_second_receiver_takes_over_and_the_guest_completes(
    shm_dir: Path, link_path: Path
) -> None:
    """After the death above, a receiver on the same socket gets the guest's descriptor
    again (a recovery hello), wakes the range so the fault the dead one read comes
    again, and serves everything: the guest ends as if nothing had happened."""
    images = make_images(shm_dir, every_other_page)
    with start_guest(images, link_path, "64M") as proc:
        with FdListener(link_path) as lst:
            first = PostcopyGuest.accept(lst, WAIT_S)
            dead = Receiver(first, images, push=False, die_at=_die_in_the_last_quarter).start()
            first.go(images.state, WAIT_S)
            wait_blocked(images, dead, proc)
            dead.stop()
        with FdListener(link_path) as lst:
            second = PostcopyGuest.accept(lst, WAIT_S)
            assert second.hello.recovery and second.peer.pid == proc.pid
            receiver = Receiver(second, images, push=True).start()
            second.take_over()
            proc.expect("took over")
            wait_for("served again", lambda: control(images).postcopy.phase
                     == PostcopyPhase.SERVED)
            finish(receiver, second, proc, images)
    assert receiver.faults >= 1  # the fault the dead receiver had read came again


# ------------------------------------------------------------------ the guest command's edges


def test_postcopy_excludes_the_other_starts(tmp_path: Path) -> None:
    for extra in (["--resume"], ["--check"], ["--status"], ["--size", "1M"]):
        r = zcmigrate("guest", str(tmp_path / "img"), "--postcopy", str(tmp_path / "s"), *extra)
        assert r.returncode == 2, r.stderr
        assert "--postcopy" in r.stderr


def test_without_a_receiver_the_guest_gives_up_at_its_deadline_having_run_nothing(
    shm_dir: Path, link_path: Path
) -> None:
    create_image(shm_dir / "img", 64 * PS, PS, "random")
    t0 = time.monotonic()
    r = zcmigrate("guest", str(shm_dir / "img"), "--postcopy", str(link_path),
                  "--go-timeout", "0.5")
    assert r.returncode == 1 and "no receiver" in r.stderr and "nothing listens" in r.stderr
    assert time.monotonic() - t0 < WAIT_S
    assert not (shm_dir / "img.guest").exists()  # no control block: it never ran


def test_an_image_on_a_disk_file_system_is_refused_before_anything_is_sent(
    tmp_path: Path, link_path: Path
) -> None:
    create_image(tmp_path / "img", 64 * PS, PS, "random")
    fd = os.open(tmp_path / "img", os.O_RDONLY)
    try:
        fs = filesystem_type(fd)
    finally:
        os.close(fd)
    if fs in ("tmpfs", "hugetlbfs"):
        pytest.skip("the temporary directory is on a tmpfs here")
    with FdListener(link_path) as lst:
        r = zcmigrate("guest", str(tmp_path / "img"), "--postcopy", str(link_path))
        assert r.returncode == 1
        assert f"on {fs}" in r.stderr and "tmpfs" in r.stderr
        with pytest.raises(ReadTimeout):
            lst.accept(0.1)  # it never connected


def test_a_go_for_another_image_is_refused_and_the_guest_never_runs(
    shm_dir: Path, link_path: Path
) -> None:
    create_image(shm_dir / "img", 64 * PS, PS, "random")
    images = Images(src=shm_dir / "img", dst=shm_dir / "img", state=DeviceState(
        npages=64, page_size=PS, position=0, value=0, touched=0), holes=[])
    with FdListener(link_path) as lst, start_guest(images, link_path, "0") as proc:
        guest = PostcopyGuest.accept(lst, WAIT_S)
        with guest, pytest.raises(GuestError, match=r"refused the go: .*128 pages"):
            guest.go(DeviceState(npages=128, page_size=PS, position=0, value=0, touched=0),
                     WAIT_S)
        assert proc.wait() == 1
    assert not (shm_dir / "img.guest").exists()


def test_a_control_block_of_version_2_is_still_read(tmp_path: Path) -> None:
    """Fields are only appended: a v2 block's hand-over mark still stops a second copy
    after an upgrade, and its post-copy fields read as none."""
    image = tmp_path / "img"
    create_image(image, 64 * PS, PS, "zero")
    words = [0] * (CONTROL_SIZE // 8)
    words[Field.MAGIC], words[Field.VERSION], words[Field.PID] = CONTROL_MAGIC, 2, 1
    words[Field.STATE], words[Field.LEASE_MODE] = GuestState.EXITED, LeaseMode.HOLD
    words[Field.HANDED_OVER] = time.time_ns()
    control_path(image).write_bytes(array("Q", words).tobytes())
    record = read_control_record(image)
    assert record is not None and record.version == 2
    assert record.postcopy.phase == PostcopyPhase.NONE and record.lease.handed_over_ns
    r = zcmigrate("guest", str(image), "--dirty-rate", "0")
    assert r.returncode == 1 and "handed over" in r.stderr
