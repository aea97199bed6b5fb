"""multifd/pages.py on real shared mappings of real files: the mapping's pinned address,
the dirty bitmap's fetch-and-clear and offsets, the reference workload's touch and check,
and zeroing pages."""

from __future__ import annotations

import os
import threading
from array import array
from collections.abc import Iterator
from pathlib import Path

import pytest

from zcmigrate.multifd.pages import (
    MappedFile,
    bitmap_words,
    dirty_offsets,
    fetch_clear_dirty,
    first_page_off_step,
    or_words,
    touch_pages,
    zero_pages,
)
from zcmigrate.native import ffi

PAGE = 4096


def _mapped(path: Path, size: int, *, writable: bool = True) -> MappedFile:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        return MappedFile(fd, size, writable=writable)
    finally:
        # The mapping outlives the descriptor, as the guest's mappings do.
        os.close(fd)


@pytest.fixture
def image(tmp_path: Path) -> Iterator[MappedFile]:
    """A sparse 100-page image, mapped shared."""
    m = _mapped(tmp_path / "img", 100 * PAGE)
    yield m
    m.close()


@pytest.fixture
def bitmap(tmp_path: Path) -> Iterator[tuple[MappedFile, memoryview]]:
    """A shared bitmap for 100 pages, in a file as the guest's control file holds it."""
    m = _mapped(tmp_path / "bitmap", 8 * bitmap_words(100))
    yield m, m.u64_view(0, bitmap_words(100))
    m.close()


def _words(n: int) -> array[int]:
    return array("Q", bytes(8 * n))


def _pages_in(words: array[int], npages: int) -> set[int]:
    return {p for p in range(npages) if words[p // 64] >> (p % 64) & 1}


# --------------------------------------------------------------------------- the mapping


def test_bitmap_words_round_up_to_whole_words() -> None:
    assert [bitmap_words(n) for n in (0, 1, 63, 64, 65, 128)] == [0, 1, 1, 1, 2, 2]


def test_the_address_is_the_mapping_and_writes_reach_the_file(
    tmp_path: Path, image: MappedFile
) -> None:
    ffi.cast("unsigned char *", image.address)[3 * PAGE] = 0xAB
    assert image.mm[3 * PAGE] == 0xAB
    image.u64_view(PAGE, 1)[0] = 0x0102030405060708
    assert (tmp_path / "img").read_bytes()[PAGE : PAGE + 8] == (0x0102030405060708).to_bytes(
        8, "little"
    )


def test_the_mapping_cannot_be_closed_under_the_native_address(image: MappedFile) -> None:
    # The native buffer pins the mmap: a stray close would leave `address` dangling.
    with pytest.raises(BufferError):
        image.mm.close()


def test_close_fails_while_someone_holds_a_view_and_succeeds_after(tmp_path: Path) -> None:
    m = _mapped(tmp_path / "f", PAGE)
    view = m.u64_view(0, 4)
    held = memoryview(view)
    with pytest.raises(BufferError):
        m.close()
    held.release()
    m.close()
    assert m.mm.closed


def test_a_read_only_mapping_refuses_writes(tmp_path: Path) -> None:
    (tmp_path / "ro").write_bytes(bytes(PAGE))
    fd = os.open(tmp_path / "ro", os.O_RDONLY)
    try:
        m = MappedFile(fd, PAGE, writable=False)
    finally:
        os.close(fd)
    with pytest.raises(TypeError):
        m.mm[0] = 1
    m.close()


# --------------------------------------------------------------------------- the bitmap


def test_fetch_clear_moves_the_dirty_words_out_and_leaves_the_bitmap_clean(
    bitmap: tuple[MappedFile, memoryview],
) -> None:
    m, words = bitmap
    words[0] = 0b1011
    words[1] = 1 << 35  # page 99
    out = array("Q", [0xFFFF] * 2)  # stale words are overwritten, zeros included
    assert fetch_clear_dirty(m.address, 2, out) == 4
    assert list(out) == [0b1011, 1 << 35]
    assert list(words) == [0, 0]
    assert fetch_clear_dirty(m.address, 2, out) == 0
    assert list(out) == [0, 0]


def test_fetch_clear_loses_no_mark_made_while_it_runs(
    image: MappedFile, bitmap: tuple[MappedFile, memoryview]
) -> None:
    """A page marked concurrently is in this fetch or the next one, never in neither."""
    m, _ = bitmap
    done = threading.Event()
    touched = 100 * 50

    def workload() -> None:
        pos = 0
        for _ in range(50):
            pos = touch_pages(image, m.address, 100, PAGE, pos, 100)
        done.set()

    t = threading.Thread(target=workload)
    t.start()
    seen: set[int] = set()
    out = _words(2)
    while not done.is_set():
        if fetch_clear_dirty(m.address, 2, out):
            seen |= _pages_in(out, 100)
    t.join()
    fetch_clear_dirty(m.address, 2, out)
    seen |= _pages_in(out, 100)
    assert seen == set(range(100))
    assert first_page_off_step(image, 100, PAGE, 0, touched // 100) is None


def test_fetch_clear_refuses_an_output_too_short_or_of_another_type(
    bitmap: tuple[MappedFile, memoryview],
) -> None:
    m, _ = bitmap
    with pytest.raises(ValueError, match="at least 2 words"):
        fetch_clear_dirty(m.address, 2, _words(1))
    with pytest.raises(ValueError, match="array\\('Q'\\)"):
        fetch_clear_dirty(m.address, 2, array("I", [0] * 4))


def test_dirty_offsets_lists_marked_pages_in_order_and_ignores_the_tail() -> None:
    words = array("Q", [(1 << 63) | 0b101, (1 << 35) | (1 << 36)])  # pages 0, 2, 63, 99, 100
    out = _words(100)
    n = dirty_offsets(words, 100, PAGE, out)
    assert list(out[:n]) == [0, 2 * PAGE, 63 * PAGE, 99 * PAGE]


def test_dirty_offsets_refuses_short_arrays_and_bad_page_sizes() -> None:
    with pytest.raises(ValueError, match="bitmap"):
        dirty_offsets(_words(1), 100, PAGE, _words(100))
    with pytest.raises(ValueError, match="out"):
        dirty_offsets(_words(2), 100, PAGE, _words(99))
    with pytest.raises(ValueError, match="page size"):
        dirty_offsets(_words(2), 100, 0, _words(100))


def test_or_words_merges_two_bitmaps() -> None:
    a = array("Q", [0b0011, 1 << 63, 0])
    b = array("Q", [0b0110, 1, 0])
    assert list(or_words(a, b)) == [0b0111, (1 << 63) | 1, 0]
    assert list(or_words(array("Q"), array("Q"))) == []
    with pytest.raises(ValueError, match="1 and 2 words"):
        or_words(_words(1), _words(2))


# --------------------------------------------------------------------------- the workload


def test_touch_increments_byte_zero_wraps_and_marks_each_page(
    image: MappedFile, bitmap: tuple[MappedFile, memoryview]
) -> None:
    m, words = bitmap
    assert touch_pages(image, m.address, 100, PAGE, 90, 15) == 5
    assert [image.mm[p * PAGE] for p in range(100)] == [1] * 5 + [0] * 85 + [1] * 10
    assert image.mm[90 * PAGE + 1] == 0  # byte 0 only
    assert _pages_in(array("Q", words), 100) == set(range(5)) | set(range(90, 100))
    assert touch_pages(image, m.address, 100, PAGE, 5, 0) == 5


def test_check_accepts_the_step_the_workload_leaves_and_names_the_first_page_off_it(
    image: MappedFile, bitmap: tuple[MappedFile, memoryview]
) -> None:
    m, _ = bitmap
    pos = touch_pages(image, m.address, 100, PAGE, 0, 256 * 100 + 40)  # 256 passes wrap
    assert pos == 40
    assert first_page_off_step(image, 100, PAGE, 40, 256) is None
    assert first_page_off_step(image, 100, PAGE, 40, 0) is None  # mod 256
    assert first_page_off_step(image, 100, PAGE, 41, 0) == 40
    image.mm[70 * PAGE] = 9
    assert first_page_off_step(image, 100, PAGE, 40, 0) == 70


def test_touch_and_check_refuse_pages_outside_the_mapping(
    image: MappedFile, bitmap: tuple[MappedFile, memoryview]
) -> None:
    m, _ = bitmap
    with pytest.raises(ValueError, match="do not fit"):
        touch_pages(image, m.address, 101, PAGE, 0, 1)
    with pytest.raises(ValueError, match="position 100"):
        touch_pages(image, m.address, 100, PAGE, 100, 1)
    with pytest.raises(ValueError, match="cannot touch -1"):
        touch_pages(image, m.address, 100, PAGE, 0, -1)
    with pytest.raises(ValueError, match="do not fit"):
        first_page_off_step(image, 100, 2 * PAGE, 0, 0)


# --------------------------------------------------------------------------- zeroing


def test_zero_pages_zeroes_the_listed_pages_and_counts_only_real_writes() -> None:
    buf = bytearray(b"\x5a" * (4 * PAGE))
    buf[2 * PAGE : 3 * PAGE] = bytes(PAGE)  # already zero: not written again
    assert zero_pages(buf, array("Q", [PAGE, 2 * PAGE, 3 * PAGE]), PAGE) == 2
    assert buf[:PAGE] == b"\x5a" * PAGE
    assert buf[PAGE:] == bytes(3 * PAGE)
    assert zero_pages(buf, array("Q"), PAGE) == 0


def test_zero_pages_refuses_a_page_outside_the_buffer() -> None:
    buf = bytearray(2 * PAGE)
    with pytest.raises(ValueError, match="outside the 8192-byte buffer"):
        zero_pages(buf, array("Q", [PAGE + 1]), PAGE)
    with pytest.raises(ValueError, match="array\\('Q'\\)"):
        zero_pages(buf, array("I", [0]), PAGE)
