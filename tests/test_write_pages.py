"""The image-file path in C: a packet's pages written from a buffer with pwrite
(zc_write_pages) and zero pages written as zeros (zc_write_zero_pages). Whatever offsets
they are given, nothing is written outside the image and the file never grows.
"""

from __future__ import annotations

import errno
import os
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zcmigrate.native import ffi, lib

PAGE = 4096
PAGES = 16
SIZE = PAGES * PAGE


@pytest.fixture
def image(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path / "image", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, SIZE)
    yield fd
    os.close(fd)


def write_pages(fd: int, offsets: list[int], payload: bytes, *, image_size: int = SIZE,
                page_size: int = PAGE) -> int:
    offs = array("Q", offsets)
    buf = bytearray(payload)
    return int(lib.zc_write_pages(fd, image_size, ffi.from_buffer("uint64_t[]", offs),
                                  len(offs), page_size, ffi.from_buffer(buf), len(buf)))


def write_zero_pages(fd: int, offsets: list[int], written: array[int] | None,
                     *, page_size: int = PAGE) -> tuple[int, int]:
    offs = array("Q", offsets)
    bm: Any = ffi.NULL if written is None else ffi.from_buffer("uint64_t[]", written)
    nwritten: Any = ffi.new("uint32_t *")
    rc = lib.zc_write_zero_pages(fd, SIZE, ffi.from_buffer("uint64_t[]", offs), len(offs),
                                 page_size, bm, 0 if written is None else len(written),
                                 nwritten)
    return int(rc), int(nwritten[0])


def contents(fd: int) -> bytes:
    return os.pread(fd, SIZE + PAGE, 0)


def test_scattered_and_adjacent_pages_land_at_their_offsets(image: int) -> None:
    offsets = [3 * PAGE, 4 * PAGE, 5 * PAGE, 0, 9 * PAGE, 10 * PAGE, 15 * PAGE]
    pages = [os.urandom(PAGE) for _ in offsets]
    assert write_pages(image, offsets, b"".join(pages)) == 0
    got = contents(image)
    assert len(got) == SIZE
    for off, page in zip(offsets, pages, strict=True):
        assert got[off:off + PAGE] == page
    untouched = set(range(PAGES)) - {o // PAGE for o in offsets}
    assert all(got[p * PAGE:(p + 1) * PAGE] == bytes(PAGE) for p in untouched)


def test_a_later_write_of_the_same_page_in_one_packet_wins(image: int) -> None:
    first, second = os.urandom(PAGE), os.urandom(PAGE)
    assert write_pages(image, [2 * PAGE, 2 * PAGE], first + second) == 0
    assert contents(image)[2 * PAGE:3 * PAGE] == second


@pytest.mark.parametrize("bad", [SIZE, SIZE - PAGE + 1, 5 * PAGE + 1, 2**63, 2**64 - PAGE,
                                 2**64 - 1])
def test_an_offset_outside_the_image_or_unaligned_writes_nothing(image: int, bad: int) -> None:
    rc = write_pages(image, [0, PAGE, bad], os.urandom(3 * PAGE))
    assert rc == lib.ZC_EBOUNDS
    assert contents(image) == bytes(SIZE)  # not even the good pages before it, no growth


def test_a_buffer_shorter_than_the_pages_writes_nothing(image: int) -> None:
    assert write_pages(image, [0, PAGE], os.urandom(PAGE + 100)) == lib.ZC_EBOUNDS
    assert contents(image) == bytes(SIZE)


def test_page_size_zero_is_refused(image: int) -> None:
    assert write_pages(image, [0], os.urandom(PAGE), page_size=0) == lib.ZC_EBOUNDS
    assert contents(image) == bytes(SIZE)


def test_a_write_failure_is_its_errno(tmp_path: Path) -> None:
    path = tmp_path / "ro"
    path.write_bytes(bytes(SIZE))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert write_pages(fd, [0], os.urandom(PAGE)) == errno.EBADF
    finally:
        os.close(fd)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(0, PAGES - 1).map(lambda p: p * PAGE),
                          st.integers(0, 2**64 - 1)), min_size=1, max_size=24))
def test_hostile_offsets_never_write_outside_the_file(offsets: list[int]) -> None:
    fd = os.memfd_create("image")
    try:
        os.ftruncate(fd, SIZE)
        payload = os.urandom(len(offsets) * PAGE)
        rc = write_pages(fd, offsets, payload)
        assert os.fstat(fd).st_size == SIZE
        got = contents(fd)
        valid = all(o % PAGE == 0 and o + PAGE <= SIZE for o in offsets)
        if not valid:
            assert rc == lib.ZC_EBOUNDS
            assert got == bytes(SIZE)
            return
        assert rc == 0
        want = bytearray(SIZE)
        for i, o in enumerate(offsets):  # in order: a repeated page ends as its last copy
            want[o:o + PAGE] = payload[i * PAGE:(i + 1) * PAGE]
        assert got == want
    finally:
        os.close(fd)


# ------------------------------------------------------------------ zero pages


def filled(fd: int) -> bytes:
    data = os.urandom(SIZE)
    os.pwrite(fd, data, 0)
    return data


def test_zero_pages_on_an_image_holding_data_are_all_written(image: int) -> None:
    data = filled(image)
    offsets = [1 * PAGE, 2 * PAGE, 3 * PAGE, 7 * PAGE, 15 * PAGE]
    assert write_zero_pages(image, offsets, None) == (0, len(offsets))
    got = contents(image)
    for p in range(PAGES):
        want = bytes(PAGE) if p * PAGE in offsets else data[p * PAGE:(p + 1) * PAGE]
        assert got[p * PAGE:(p + 1) * PAGE] == want, p


def test_zero_pages_never_written_on_a_fresh_image_are_left_alone(image: int) -> None:
    data = filled(image)  # stands for pages the bitmap says were never written: untouched
    written = array("Q", [(1 << 2) | (1 << 3) | (1 << 9)])
    offsets = [1 * PAGE, 2 * PAGE, 3 * PAGE, 4 * PAGE, 9 * PAGE]
    assert write_zero_pages(image, offsets, written) == (0, 3)
    got = contents(image)
    for p in range(PAGES):
        want = bytes(PAGE) if p in (2, 3, 9) else data[p * PAGE:(p + 1) * PAGE]
        assert got[p * PAGE:(p + 1) * PAGE] == want, p


@pytest.mark.parametrize("bad", [SIZE, 3 * PAGE + 8, 2**64 - PAGE])
def test_zero_pages_outside_the_image_write_nothing(image: int, bad: int) -> None:
    data = filled(image)
    assert write_zero_pages(image, [0, bad], None)[0] == lib.ZC_EBOUNDS
    assert contents(image) == data


def test_zero_pages_larger_than_the_zero_block_are_refused(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "image", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 4 * 131072)
        offs = array("Q", [0])
        nwritten: Any = ffi.new("uint32_t *")
        rc = lib.zc_write_zero_pages(fd, 4 * 131072, ffi.from_buffer("uint64_t[]", offs), 1,
                                     131072, ffi.NULL, 0, nwritten)
        assert rc == lib.ZC_EBOUNDS
    finally:
        os.close(fd)


def test_a_long_run_of_zero_pages_is_written_whole(tmp_path: Path) -> None:
    npages = 3000  # more than one pwritev's 1024 iovecs
    fd = os.open(tmp_path / "image", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, npages * PAGE)
        os.pwrite(fd, b"\xff" * (npages * PAGE), 0)
        offs = array("Q", range(0, npages * PAGE, PAGE))
        nwritten: Any = ffi.new("uint32_t *")
        rc = lib.zc_write_zero_pages(fd, npages * PAGE, ffi.from_buffer("uint64_t[]", offs),
                                     npages, PAGE, ffi.NULL, 0, nwritten)
        assert (rc, nwritten[0]) == (0, npages)
        assert os.pread(fd, npages * PAGE, 0) == bytes(npages * PAGE)
    finally:
        os.close(fd)
