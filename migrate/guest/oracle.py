"""The oracle, the end-to-end proof of a migration: does byte 0 of every page of an image
agree with a device state? Also where an image's step is, when no state says so. It
reads images only; it knows nothing of the running workload or of migrations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from zcmigrate.migrate.guest.device import DeviceState
from zcmigrate.migrate.guest.errors import GuestError
from zcmigrate.migrate.guest.image import open_image
from zcmigrate.multifd.pages import MappedFile, first_page_off_step


@dataclass(frozen=True, slots=True)
class OracleVerdict:
    """Whether byte 0 of every page agrees with a device state: pages before the
    position hold value+1, the rest value (mod 256)."""

    ok: bool
    npages: int
    first_bad_page: int | None
    found: int | None
    expected: int | None
    message: str


def oracle_verdict(m: MappedFile, state: DeviceState) -> OracleVerdict:
    """The oracle on an image already mapped (and checked to be the state's size)."""
    bad = first_page_off_step(m, state.npages, state.page_size, state.position, state.value)
    if bad is None:
        return OracleVerdict(
            ok=True,
            npages=state.npages,
            first_bad_page=None,
            found=None,
            expected=None,
            message=(
                f"ok: {state.npages} pages, step at page {state.position}, value {state.value}"
            ),
        )
    found = m.mm[bad * state.page_size]
    expected = (state.value + (1 if bad < state.position else 0)) & 0xFF
    return OracleVerdict(
        ok=False,
        npages=state.npages,
        first_bad_page=bad,
        found=found,
        expected=expected,
        message=f"FAILED: page {bad} holds {found}, expected {expected}",
    )


def check_image_size(path: Path, size: int, state: DeviceState) -> None:
    if size != state.npages * state.page_size:
        raise GuestError(
            f"image {path} has {size} bytes but the device state describes "
            f"{state.npages} pages of {state.page_size} bytes ({state.npages * state.page_size})"
        )


def check_oracle(image_path: str | os.PathLike[str], state: DeviceState) -> OracleVerdict:
    """Check the image against a device state (the end-to-end proof of a migration)."""
    path = Path(image_path)
    with open_image(path, writable=False) as (fd, size):
        check_image_size(path, size, state)
        m = MappedFile(fd, size, writable=False)
        try:
            return oracle_verdict(m, state)
        finally:
            m.close()


def infer_step(m: MappedFile, npages: int, page_size: int) -> tuple[int, int] | None:
    """(position, value & 255) of an image the workload left behind, or None.

    The workload leaves one step: a run of v+1 then a run of v. Binary search finds it in
    log(npages) reads; the caller confirms the whole image with oracle_verdict().
    """
    first = m.mm[0]
    last = m.mm[(npages - 1) * page_size]
    if first == last:
        return 0, first
    if first != (last + 1) & 0xFF:
        return None
    lo, hi = 0, npages - 1  # byte(lo) == first, byte(hi) == last
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if m.mm[mid * page_size] == first:
            lo = mid
        else:
            hi = mid
    return hi, last


__all__ = ["OracleVerdict", "check_image_size", "check_oracle", "infer_step", "oracle_verdict"]
