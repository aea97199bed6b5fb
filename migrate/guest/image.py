"""Guest images as files: creating one in the workload's initial shape (byte 0 of every
page zero, the rest filled as asked) and opening one to map it. It knows the page
pattern a fresh image needs, not the workload that runs on it or any migration.
"""

from __future__ import annotations

import contextlib
import os
import random
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from zcmigrate.migrate.guest.errors import GuestError
from zcmigrate.migrate.guest.layout import MAX_IMAGE_BYTES, check_page_size
from zcmigrate.multifd.pages import zero_pages

FILLS: Final = ("random", "zero", "half")
_CREATE_CHUNK: Final = 8 << 20


def create_image(
    path: str | os.PathLike[str],
    size: int,
    page_size: int = 4096,
    fill: str = "random",
    *,
    seed: int | None = None,
) -> None:
    """Create an image in the workload's initial shape: byte 0 of every page zero.

    fill: "zero" (sparse), "random" (bytes 1.. of every page random) or "half" (even pages
    random as above, odd pages all zero, for zero-page detection). Refuses to overwrite.
    The file appears under its name only once complete.
    """
    target = Path(path)
    check_page_size(page_size)
    if fill not in FILLS:
        raise GuestError(f"unknown fill {fill!r}: expected one of {', '.join(FILLS)}")
    if type(size) is not int or size <= 0 or size % page_size or size > MAX_IMAGE_BYTES:
        raise GuestError(
            f"image size {size!r} must be a positive multiple of the page size {page_size}"
        )
    if target.exists():
        raise GuestError(f"image {target} already exists; refusing to overwrite it")
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, size)
            if fill != "zero":
                _fill_random(fd, size, page_size, half=fill == "half", seed=seed)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise GuestError(f"cannot create image {target}: {exc.strerror}") from exc


def _fill_random(fd: int, size: int, page_size: int, *, half: bool, seed: int | None) -> None:
    rng = random.Random(seed if seed is not None else int.from_bytes(os.urandom(8)))
    # A whole number of page pairs per chunk, so "half" keeps its even/odd phase.
    chunk = max(2 * page_size, _CREATE_CHUNK - _CREATE_CHUNK % (2 * page_size))
    odd_offsets = array("Q", range(page_size, chunk, 2 * page_size)) if half else None
    offset = 0
    while offset < size:
        n = min(chunk, size - offset)
        buf = bytearray(rng.randbytes(n))
        # The oracle reads byte 0 only; it must start at 0 on every page.
        buf[::page_size] = bytes(n // page_size)
        if odd_offsets is not None:
            # The last chunk may be shorter: only its own odd pages.
            try:
                zero_pages(buf, odd_offsets[: (n // page_size) // 2], page_size)
            except ValueError as exc:
                raise GuestError(f"zeroing odd pages failed: {exc}") from exc
        view = memoryview(buf)
        pos = offset
        while view:
            written = os.pwrite(fd, view, pos)
            view = view[written:]
            pos += written
        offset += n


@contextlib.contextmanager
def open_image(path: Path, *, writable: bool) -> Iterator[tuple[int, int]]:
    """(descriptor, size) of an existing image, closed on exit; GuestError if it cannot
    be opened."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise GuestError(f"image {path} does not exist") from None
    except OSError as exc:
        raise GuestError(f"cannot open image {path}: {exc.strerror}") from exc
    try:
        yield fd, os.fstat(fd).st_size
    finally:
        os.close(fd)


__all__ = ["FILLS", "create_image", "open_image"]
