"""Pages read straight into place in C (zc_recv_pages) through Channel.read_with."""

from __future__ import annotations

import mmap
import os
import threading
from array import array
from typing import Any

import pytest

from tests.conftest import tcp_pair
from zcmigrate.channel.errors import ChannelClosed
from zcmigrate.native import ffi, lib

PAGE = 4096


def _receive(offsets: list[int], payload: bytes, image_pages: int = 16,
             close_early: bool = False) -> tuple[int, bytes]:
    tx, rx = tcp_pair(zero_copy=False)
    image = mmap.mmap(-1, image_pages * PAGE)
    offs = array("Q", offsets)
    offs_c: Any = ffi.from_buffer("uint64_t[]", offs)
    image_c: Any = ffi.from_buffer(image)
    base = int(ffi.cast("uintptr_t", image_c))

    def reader(fd: int, nread: Any) -> int:
        return int(lib.zc_recv_pages(fd, base, len(image), offs_c, len(offs), PAGE, nread))

    sender = threading.Thread(target=lambda: (tx.write_all(payload),
                                              tx.close() if close_early else None))
    sender.start()
    try:
        rc = rx.read_with(reader, len(offsets) * PAGE)
        return rc, image[:]
    finally:
        ffi.release(image_c)
        sender.join(10)
        tx.close()
        rx.close()


def test_scattered_and_adjacent_pages_land_at_their_offsets_in_order() -> None:
    offsets = [3 * PAGE, 4 * PAGE, 5 * PAGE, 0, 9 * PAGE, 10 * PAGE, 15 * PAGE]
    pages = [os.urandom(PAGE) for _ in offsets]
    rc, image = _receive(offsets, b"".join(pages))
    assert rc == 0
    for off, page in zip(offsets, pages, strict=True):
        assert image[off:off + PAGE] == page
    untouched = set(range(16)) - {o // PAGE for o in offsets}
    assert all(image[p * PAGE:(p + 1) * PAGE] == bytes(PAGE) for p in untouched)


@pytest.mark.parametrize("bad", [16 * PAGE, 5 * PAGE + 1, 2**63])
def test_an_offset_outside_the_image_or_unaligned_is_refused_before_any_read(bad: int) -> None:
    rc, image = _receive([0, bad], b"")
    assert rc == lib.ZC_EBOUNDS
    assert image == bytes(16 * PAGE)


def test_a_peer_closing_inside_the_pages_raises_channel_closed() -> None:
    with pytest.raises(ChannelClosed, match="peer closed"):
        _receive([0, PAGE], os.urandom(PAGE + 100), close_early=True)
