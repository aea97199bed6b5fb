"""The receiver pool writing an image file through its descriptor (pwrite), as the destination
does: the image arrives identical over rounds that change, zero and un-zero pages, on a fresh
file and on one holding stale data; a failed write fails the pool and names the channel.
"""

from __future__ import annotations

import mmap
import os
import random
from array import array
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_sender_receiver import (
    Background,
    assert_adds_up,
    assert_identical,
    make_pools,
    pool_threads,
    shuffled_batches,
)
from zcmigrate.multifd.exiting import MultifdError
from zcmigrate.multifd.receiver import ReceiverPool
from zcmigrate.multifd.wire import WireContext

PAGE = 4096
MiB = 1 << 20
SIZE = 64 * MiB
NPAGES = SIZE // PAGE
UUID = bytes(range(16))


@pytest.fixture(autouse=True)
def _no_pool_thread_survives() -> Iterator[None]:
    yield
    assert pool_threads() == []


def set_pages(src: mmap.mmap, first: int, count: int, *, zero: bool) -> None:
    src[first * PAGE:(first + count) * PAGE] = (bytes(count * PAGE) if zero
                                                else os.urandom(count * PAGE))


@pytest.fixture
def src() -> Iterator[mmap.mmap]:
    mm = mmap.mmap(-1, SIZE)
    mm[:] = os.urandom(SIZE)
    rng = random.Random(7)
    for block in range(0, NPAGES, 128):  # 1/8 of the pages zero, in runs of 16
        set_pages(mm, block + rng.randrange(0, 112), 16, zero=True)
    yield mm
    mm.close()


@pytest.fixture
def image_fd() -> Iterator[int]:
    fd = os.memfd_create("incoming")  # tmpfs with 4 KiB pages, like /dev/shm
    os.ftruncate(fd, SIZE)
    yield fd
    os.close(fd)


def read_back(fd: int) -> mmap.mmap:
    return mmap.mmap(fd, SIZE, prot=mmap.PROT_READ)


@pytest.mark.parametrize("channels", [1, 2, 4])
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "stale"])
def test_image_file_arrives_identical_over_two_rounds(
    src: mmap.mmap, image_fd: int, channels: int, fresh: bool
) -> None:
    if not fresh:
        os.pwrite(image_fd, b"\xa5" * SIZE, 0)  # an old image: every zero page is written
    ctx = WireContext(uuid=UUID, channels=channels, page_size=PAGE, image_size=SIZE,
                      pages_alloc=512)
    pools = make_pools(ctx, src, image_fd, zero_copy=False, known_zero=fresh)
    rng = random.Random(channels)
    try:
        coord = Background(lambda: pools.receiver.sync(timeout=60))
        pools.sender.send_pages(shuffled_batches(NPAGES, rng))
        assert pools.sender.sync(timeout=60).sync_num == 1
        assert coord.result(60) == 1
        # Round 2: new data, pages newly zero (already written: they must be overwritten),
        # and zero pages made non-zero.
        changed: set[int] = set()
        while len(changed) < NPAGES // 16:
            first, count = rng.randrange(0, NPAGES - 64), rng.randrange(1, 64)
            set_pages(src, first, count, zero=rng.random() < 0.3)
            changed.update(range(first, first + count))
        subset = sorted(changed)
        rng.shuffle(subset)
        coord = Background(lambda: pools.receiver.sync(timeout=60))
        pools.sender.send_pages(array("Q", (p * PAGE for p in subset)))
        assert pools.sender.sync(timeout=60).sync_num == 2
        assert coord.result(60) == 2
        sent, got = pools.sender.statistics(), pools.receiver.statistics()
        assert_adds_up(got)
        assert (sent.normal_pages, sent.zero_pages) == (got.normal_pages, got.zero_pages)
        assert got.zero_pages > 0
        assert os.fstat(image_fd).st_size == SIZE
        back = read_back(image_fd)
        try:
            assert_identical(src, back, SIZE)
        finally:
            back.close()
    finally:
        pools.close()
    # The pool never closes the caller's descriptor.
    os.fstat(image_fd)


def test_a_failed_write_fails_the_pool_and_names_the_channel(src: mmap.mmap,
                                                             tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(b"")
    os.truncate(path, SIZE)
    fd = os.open(path, os.O_RDONLY)  # pwrite: EBADF
    ctx = WireContext(uuid=UUID, channels=2, page_size=PAGE, image_size=SIZE, pages_alloc=64)
    pools = make_pools(ctx, src, fd, zero_copy=False)
    try:
        coord = Background(lambda: pools.receiver.sync(timeout=30))
        with pytest.raises(MultifdError):  # the source sees its peer go
            pools.sender.send_pages(array("Q", range(0, SIZE, PAGE)))
            pools.sender.sync(timeout=30)
        err = coord.exception(30)
        assert isinstance(err, MultifdError)
        assert err.channel_id in (0, 1)
        assert "writing pages to the image file" in str(err)
        assert "Bad file descriptor" in str(err)
    finally:
        pools.close()
        os.close(fd)


def test_an_image_file_smaller_than_the_image_is_refused(image_fd: int) -> None:
    ctx = WireContext(uuid=UUID, channels=1, page_size=PAGE, image_size=2 * SIZE,
                      pages_alloc=64)
    with pytest.raises(ValueError, match="image file of"):
        ReceiverPool([object()], ctx, image_fd)  # type: ignore[list-item]
