"""native/zcnative.c refuses what a caller got wrong instead of reading or writing past it.

The error-queue parse takes control data the kernel would never send (cut short, a
cmsg_len that lies); every page helper that writes to an array gets its capacity and says
-ENOSPC or -ERANGE; a page size of 0 (or any non-power of two) is an error everywhere,
never __builtin_ctz(0); zc_sendv reports each zero-copy call's bytes.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import socket
import struct
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tcp_pair
from zcmigrate.native import ffi, lib

PAGE = 4096
NATIVE = Path(__file__).resolve().parent.parent / "native"

# struct cmsghdr on Linux: size_t cmsg_len, int cmsg_level, int cmsg_type, then the data
# at CMSG_ALIGN(sizeof(struct cmsghdr)); struct sock_extended_err is 16 bytes.
_CMSG_HDR = struct.Struct("@Nii")
_ALIGN = ffi.sizeof("size_t")
_SERR = struct.Struct("=IBBBBII")
SOL_IP, IP_RECVERR = 0, 11
SOL_IPV6, IPV6_RECVERR = 41, 25
SO_EE_ORIGIN_ZEROCOPY = 5
MSG_CTRUNC = 0x8


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def cmsg(level: int, ctype: int, data: bytes, *, claimed_len: int | None = None) -> bytes:
    """One control message as the kernel lays it out; claimed_len overrides cmsg_len."""
    hdr = _aligned(_CMSG_HDR.size)
    length = hdr + len(data) if claimed_len is None else claimed_len
    body = _CMSG_HDR.pack(length, level, ctype).ljust(hdr, b"\0") + data
    return body.ljust(_aligned(len(body)), b"\0")


def serr(lo: int, hi: int, *, copied: bool = False, origin: int = SO_EE_ORIGIN_ZEROCOPY,
         err: int = 0) -> bytes:
    return _SERR.pack(err, origin, 0, 1 if copied else 0, 0, lo, hi)


def parse(control: bytes, flags: int = 0, max_out: int = 4) -> tuple[int, list[Any]]:
    out = ffi.new("struct zc_completion[]", max_out)
    buf = ffi.from_buffer(control) if control else ffi.new("char[]", 1)
    rc = int(lib.zc_parse_errqueue(buf, len(control), flags, out, max_out))
    return rc, [out[i] for i in range(max(rc, 0))]


# ------------------------------------------------------------ the error queue


def test_a_well_formed_completion_is_read() -> None:
    rc, got = parse(cmsg(SOL_IP, IP_RECVERR, serr(7, 9, copied=True)))
    assert rc == 1
    c = got[0]
    assert (c.lo, c.hi, c.copied, c.origin, c.err) == (7, 9, 1, SO_EE_ORIGIN_ZEROCOPY, 0)


def test_an_ipv6_completion_after_an_unrelated_cmsg_is_read() -> None:
    other = cmsg(socket.SOL_SOCKET, 37, bytes(16))  # SCM_TIMESTAMPING-like, not ours
    rc, got = parse(other + cmsg(SOL_IPV6, IPV6_RECVERR, serr(0, 0)))
    assert rc == 1 and (got[0].lo, got[0].hi) == (0, 0)


def test_control_data_cut_short_is_an_error_not_a_lost_completion() -> None:
    rc, _ = parse(cmsg(SOL_IP, IP_RECVERR, serr(1, 1)), flags=MSG_CTRUNC)
    assert rc == -errno.EMSGSIZE


@pytest.mark.parametrize("claimed", ["shorter than a sock_extended_err", "past the buffer"])
def test_a_cmsg_len_that_lies_is_refused(claimed: str) -> None:
    hdr = _aligned(_CMSG_HDR.size)
    length = hdr + 8 if claimed.startswith("shorter") else hdr + 16 + 64
    rc, _ = parse(cmsg(SOL_IP, IP_RECVERR, serr(1, 1), claimed_len=length))
    assert rc == -errno.EPROTO


@pytest.mark.parametrize("control", [
    pytest.param(b"", id="no control data"),
    pytest.param(bytes(8), id="less than a cmsghdr"),
    pytest.param(cmsg(socket.SOL_SOCKET, 37, bytes(16)), id="no IP_RECVERR"),
    pytest.param(cmsg(SOL_IP, IP_RECVERR, serr(1, 1)) * 2, id="two completions in one"),
])
def test_a_message_without_exactly_one_completion_is_refused(control: bytes) -> None:
    assert parse(control)[0] == -errno.EPROTO


def test_the_parse_needs_room_for_its_completion() -> None:
    assert parse(cmsg(SOL_IP, IP_RECVERR, serr(1, 1)), max_out=0)[0] == -errno.EINVAL
    out = ffi.new("struct zc_completion[]", 1)
    assert lib.zc_drain_errqueue(0, out, 0) == -errno.EINVAL


# ------------------------------------------------------------- zc_sendv's calls


def test_zc_sendv_reports_each_zero_copy_call_and_stops_when_its_array_is_full() -> None:
    """Two zero-copy calls of different sizes (the first window is 1024 iovecs of 16 bytes,
    the second one large buffer): each reported with its own bytes; with room for one,
    zc_sendv returns 1 after it and the caller goes on from there."""
    tx, rx = tcp_pair(zero_copy=True)
    small = bytearray(os.urandom(16 * 1024))
    big = bytearray(os.urandom(1 << 20))
    bufs = [memoryview(small)[i * 16:(i + 1) * 16] for i in range(1024)] + [big]
    total = len(small) + len(big)
    got = bytearray()
    t = threading.Thread(target=lambda: got.extend(rx.read_exact(total, timeout=30)))
    t.start()
    try:
        keep = [ffi.from_buffer(b) for b in bufs]
        iov = ffi.new("struct iovec[]", len(bufs))
        for i, c in enumerate(keep):
            iov[i].iov_base = c
            iov[i].iov_len = len(c)
        res = ffi.new("struct zc_send_result *")
        sizes = ffi.new("uint64_t[]", 1)
        assert lib.zc_sendv(tx.fileno(), iov, len(bufs), 0, 1, 0, 0, res, sizes, 1) == 1
        assert (res.zc_calls, sizes[0], res.bytes) == (1, len(small), len(small))
        assert lib.zc_sendv(tx.fileno(), iov, len(bufs), 0, 1, res.bytes, 0, res, sizes,
                            1) == 0
        assert (res.zc_calls, res.bytes) == (1, len(big)) and sizes[0] == len(big)
        # Without room for the sizes, zero copy is refused before any call.
        assert lib.zc_sendv(tx.fileno(), iov, 1, 0, 1, 0, 0, res, ffi.NULL, 0) == -1
        assert res.err == errno.EINVAL
        t.join(30)
        assert bytes(got) == bytes(small) + bytes(big)
    finally:
        tx.close()
        rx.close()


# ---------------------------------------------------------------- page helpers


@pytest.fixture
def image() -> Any:
    mm = mmap.mmap(-1, 16 * PAGE)
    c = ffi.from_buffer(mm)
    yield mm, int(ffi.cast("uintptr_t", c)), len(mm)
    ffi.release(c)
    mm.close()


def _offs(*pages: int) -> Any:
    return ffi.new("uint64_t[]", [p * PAGE for p in pages])


def test_page_iovecs_fit_their_array_or_fail(image: Any) -> None:
    _, base, size = image
    iov = ffi.new("struct iovec[]", 4)
    assert lib.zc_page_iov(base, size, _offs(0, 1, 2, 3), 4, PAGE, iov, 1) == 1  # one run
    assert lib.zc_page_iov(base, size, _offs(0, 2, 4, 6), 4, PAGE, iov, 3) == -errno.ENOSPC
    assert lib.zc_page_iov(base, size, _offs(0, 2, 4, 6), 4, PAGE, iov, 4) == 4
    assert lib.zc_page_iov(base, size, _offs(16), 1, PAGE, iov, 4) == -errno.EINVAL


def test_split_zero_writes_within_both_capacities(image: Any) -> None:
    mm, base, size = image
    mm[PAGE:2 * PAGE] = b"\1" * PAGE
    mm[3 * PAGE:4 * PAGE] = b"\2" * PAGE
    normal, zero = ffi.new("uint64_t[]", 4), ffi.new("uint64_t[]", 4)
    nzero = ffi.new("uint32_t *")
    offs = _offs(0, 1, 2, 3)  # zero, normal, zero, normal
    assert lib.zc_split_zero(base, size, offs, 4, PAGE, normal, 1, zero, 4, nzero) == \
        -errno.ENOSPC
    assert lib.zc_split_zero(base, size, offs, 4, PAGE, normal, 4, zero, 1, nzero) == \
        -errno.ENOSPC
    assert lib.zc_split_zero(base, size, offs, 4, PAGE, normal, 2, zero, 2, nzero) == 2
    assert nzero[0] == 2 and list(normal[0:2]) == [PAGE, 3 * PAGE]


def test_marking_pages_stays_inside_the_bitmap_and_is_all_or_nothing() -> None:
    bm = ffi.new("uint64_t[]", 2)  # a guard word after the one the call may use
    assert lib.zc_mark_pages(bm, 1, _offs(3, 64), 2, PAGE) == -errno.ERANGE
    assert (bm[0], bm[1]) == (0, 0)  # page 3 was not marked either
    assert lib.zc_mark_pages(bm, 1, _offs(3, 63), 2, PAGE) == 0
    assert (bm[0], bm[1]) == ((1 << 3) | (1 << 63), 0)


def test_zeroing_pages_reads_no_written_bit_beyond_its_bitmap(image: Any, tmp_path: Path) -> None:
    _, base, size = image
    written = ffi.new("uint64_t[]", [~0 & (2**64 - 1)])
    nw = ffi.new("uint32_t *")
    # 16 pages need one word; claim none.
    assert lib.zc_zero_pages(base, size, _offs(5), 1, PAGE, written, 0, nw) == errno.EINVAL
    assert lib.zc_zero_pages(base, size, _offs(5), 1, PAGE, written, 1, nw) == 0
    fd = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        assert lib.zc_write_zero_pages(fd, size, _offs(5), 1, PAGE, written, 0, nw) == \
            lib.ZC_EBOUNDS
        assert lib.zc_write_zero_pages(fd, size, _offs(5), 1, PAGE, written, 1, nw) == 0
    finally:
        os.close(fd)


def test_the_dirty_bitmap_helpers_write_within_their_outputs() -> None:
    bm = ffi.new("uint64_t[]", [0b1011, 1 << 63])
    out = ffi.new("uint64_t[]", 3)
    assert lib.zc_bitmap_fetch_clear(bm, 2, out, 1) == -errno.ENOSPC
    assert (bm[0], bm[1]) == (0b1011, 1 << 63)  # nothing taken
    assert lib.zc_bitmap_fetch_clear(bm, 2, out, 2) == 4
    offsets = ffi.new("uint64_t[]", [0xAA] * 4)
    assert lib.zc_bitmap_offsets(out, 128, PAGE, offsets, 3) == -errno.ENOSPC
    assert offsets[3] == 0xAA  # not a word past the capacity
    assert lib.zc_bitmap_offsets(out, 128, PAGE, offsets, 4) == 4
    assert list(offsets) == [0, PAGE, 3 * PAGE, 127 * PAGE]
    assert lib.zc_bitmap_offsets(out, 127, PAGE, offsets, 3) == 3  # bit 127 is no page


def test_setting_a_range_stays_inside_the_bitmap() -> None:
    bm = ffi.new("uint64_t[]", 2)
    assert lib.zc_bitmap_set_range(bm, 1, 60, 5) == -errno.ERANGE
    assert lib.zc_bitmap_set_range(bm, 1, 2**64 - 1, 2) == -errno.ERANGE  # no wrap-around
    assert (bm[0], bm[1]) == (0, 0)
    assert lib.zc_bitmap_set_range(bm, 1, 60, 4) == 0
    assert (bm[0], bm[1]) == (0xF << 60, 0)


def test_the_workload_refuses_a_position_outside_its_pages(image: Any) -> None:
    _, base, _ = image
    bm = ffi.new("uint64_t[]", 1)
    assert lib.zc_guest_touch(base, bm, 16, PAGE, 16, 1) == -errno.EINVAL
    assert lib.zc_guest_touch(base, bm, 16, PAGE, 15, 2) == 1
    assert bm[0] == (1 << 15) | 1


def test_placing_pages_from_a_buffer_checks_everything_first(image: Any) -> None:
    mm, base, size = image
    payload = os.urandom(3 * PAGE)
    buf = ffi.from_buffer(payload)
    assert lib.zc_place_pages(base, size, _offs(2, 3, 9), 3, PAGE, buf, len(payload)) == 0
    assert mm[2 * PAGE:4 * PAGE] == payload[:2 * PAGE]
    assert mm[9 * PAGE:10 * PAGE] == payload[2 * PAGE:]
    before = bytes(mm)
    assert lib.zc_place_pages(base, size, _offs(0, 16), 2, PAGE, buf, len(payload)) == \
        lib.ZC_EBOUNDS  # the second page is outside: not even the first is copied
    assert lib.zc_place_pages(base, size, _offs(0, 1), 2, PAGE, buf, PAGE) == lib.ZC_EBOUNDS
    assert bytes(mm) == before


@pytest.mark.parametrize("page_size", [0, 3, 4096 + 512])
def test_a_page_size_that_is_not_a_power_of_two_is_refused_everywhere(
        image: Any, tmp_path: Path, page_size: int) -> None:
    """Never a division by zero, never __builtin_ctz(0): an error code from every helper."""
    _, base, size = image
    offs = _offs(0)
    iov = ffi.new("struct iovec[]", 1)
    out = ffi.new("uint64_t[]", 1)
    n32 = ffi.new("uint32_t *")
    n64 = ffi.new("uint64_t *")
    bm = ffi.new("uint64_t[]", 1)
    buf = ffi.new("char[]", PAGE)
    assert lib.zc_page_iov(base, size, offs, 1, page_size, iov, 1) == -errno.EINVAL
    assert lib.zc_split_zero(base, size, offs, 1, page_size, out, 1, out, 1, n32) == \
        -errno.EINVAL
    assert lib.zc_mark_pages(bm, 1, offs, 1, page_size) == -errno.EINVAL
    assert lib.zc_zero_pages(base, size, offs, 1, page_size, bm, 1, n32) == errno.EINVAL
    assert lib.zc_place_pages(base, size, offs, 1, page_size, buf, PAGE) == lib.ZC_EBOUNDS
    fd = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        assert lib.zc_write_pages(fd, size, offs, 1, page_size, buf, PAGE) == lib.ZC_EBOUNDS
        assert lib.zc_write_zero_pages(fd, size, offs, 1, page_size, bm, 1, n32) == \
            lib.ZC_EBOUNDS
        assert lib.zc_recv_pages(fd, base, size, offs, 1, page_size, n64) == lib.ZC_EBOUNDS
    finally:
        os.close(fd)
    assert lib.zc_guest_touch(base, bm, 16, 0, 0, 1) == -errno.EINVAL


def test_ctz_of_a_page_size_is_taken_only_behind_the_power_of_two_check() -> None:
    source = (NATIVE / "zcnative.c").read_text()
    calls = [m.start() for m in re.finditer(r"__builtin_ctz\(", source)]
    body = source.index("static int page_shift(")
    end = source.index("\n}\n", body)
    assert calls and all(body < at < end for at in calls), "ctz outside page_shift()"

