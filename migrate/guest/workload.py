"""The running guest: the reference workload's loop over a mapped image, its control file
as the guest writes it, pause and exit handling, signals, and run_guest. It knows the
control file's layout and the image, not the migration that drives it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

from zcmigrate.migrate.guest.device import DeviceState
from zcmigrate.migrate.guest.errors import GuestError
from zcmigrate.migrate.guest.image import create_image, open_image
from zcmigrate.migrate.guest.layout import (
    BITMAP_OFFSET,
    CONTROL_MAGIC,
    CONTROL_VERSION,
    HEADER_WORDS,
    U64_MAX,
    Field,
    GuestRequest,
    GuestState,
    check_page_size,
    control_file_size,
    read_control_header,
)
from zcmigrate.migrate.guest.oracle import check_image_size, infer_step, oracle_verdict
from zcmigrate.migrate.imagefiles import control_path
from zcmigrate.multifd.pages import MappedFile, touch_pages

TICK_NS: Final = 5_000_000
_PAUSE_POLL_S: Final = 0.0005
# Credit that piles up while the guest was descheduled is paid back at most this far, so
# a stall does not turn into a burst that would distort a migration's dirty-rate estimate.
_MAX_CARRY_NS: Final = 100_000_000
_NS_PER_S: Final = 1_000_000_000


def run_guest(
    image: str | os.PathLike[str],
    *,
    dirty_rate: int,
    page_size: int = 4096,
    size: int | None = None,
    fill: str = "random",
    resume: DeviceState | None = None,
    ready: Callable[[], None] | None = None,
) -> DeviceState:
    """Run the workload on `image` until asked to exit (request or SIGTERM/SIGINT).

    With `size`, creates the image if it does not exist. With `resume`, refuses to start
    unless the image satisfies the oracle for that state, then continues from it; without,
    continues from wherever the image's step is. Calls `ready()` once running. Returns the
    device state at exit.
    """
    path = Path(image)
    check_page_size(page_size)
    if type(dirty_rate) is not int or dirty_rate < 0:
        raise GuestError(f"dirty rate must be a non-negative integer, got {dirty_rate!r}")
    if resume is not None and resume.page_size != page_size:
        raise GuestError(
            f"the device state has {resume.page_size}-byte pages, not {page_size}: "
            f"run with a page size of {resume.page_size}"
        )
    if size is not None:
        if path.exists():
            actual = path.stat().st_size
            if actual != size:
                raise GuestError(
                    f"image {path} exists with {actual} bytes, not {size}; refusing to "
                    "overwrite it: remove it or leave the size out to use it as it is"
                )
        elif resume is not None:
            raise GuestError(f"cannot resume: image {path} does not exist")
        else:
            create_image(path, size, page_size, fill)
    elif not path.exists():
        raise GuestError(f"image {path} does not exist: give a size to create it")
    with open_image(path, writable=True) as (fd, nbytes):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            head = read_control_header(control_path(path))
            who = f" (pid {head[Field.PID]})" if head and head[Field.MAGIC] == CONTROL_MAGIC else ""
            raise GuestError(
                f"another guest{who} is already running on {path}; stop it first"
            ) from None
        if nbytes == 0 or nbytes % page_size:
            raise GuestError(
                f"image {path} has {nbytes} bytes, not a positive multiple of the page size "
                f"{page_size}"
            )
        npages = nbytes // page_size
        m = MappedFile(fd, nbytes, writable=True)
        try:
            start = _starting_state(path, m, npages, page_size, resume)
            guest = _Guest(path, m, start, dirty_rate)
            try:
                return guest.run(ready)
            finally:
                guest.close()
        finally:
            m.close()


def _starting_state(
    path: Path, m: MappedFile, npages: int, page_size: int, resume: DeviceState | None
) -> DeviceState:
    if resume is not None:
        check_image_size(path, m.size, resume)
        verdict = oracle_verdict(m, resume)
        if not verdict.ok:
            raise GuestError(
                f"refusing to resume the guest on {path}: oracle {verdict.message} "
                f"(device state: step at page {resume.position}, value {resume.value})"
            )
        return resume
    inferred = infer_step(m, npages, page_size)
    guess = None
    if inferred is not None:
        pos, byte = inferred
        guess = DeviceState(npages=npages, page_size=page_size, position=pos, value=byte, touched=0)
    if guess is None or not oracle_verdict(m, guess).ok:
        raise GuestError(
            f"image {path} does not hold the workload's pattern (byte 0 of the pages must "
            "step once from v+1 to v): recreate it, or resume it from a device state"
        )
    # A previous guest's control file keeps the full pass counter that byte 0 wraps away.
    head = read_control_header(control_path(path))
    if (
        head is not None
        and head[Field.MAGIC] == CONTROL_MAGIC
        and head[Field.NPAGES] == npages
        and head[Field.PAGE_SIZE] == page_size
        and head[Field.POSITION] == pos
        and head[Field.VALUE] & 0xFF == byte
    ):
        return DeviceState(
            npages=npages,
            page_size=page_size,
            position=pos,
            value=head[Field.VALUE],
            touched=head[Field.TOUCHED],
        )
    return guess


@dataclass
class _Guest:
    path: Path
    image: MappedFile
    start: DeviceState
    dirty_rate: int
    _stop: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.npages = self.start.npages
        self.page_size = self.start.page_size
        self.position = self.start.position
        self.value = self.start.value
        self.touched = self.start.touched
        self.control = self._create_control()
        self.ctl = self.control.u64_view(0, HEADER_WORDS)
        self.bm_address = self.control.address + BITMAP_OFFSET

    def _create_control(self) -> MappedFile:
        path = control_path(self.path)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        size = control_file_size(self.npages)
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
                m = MappedFile(fd, size, writable=True)
            finally:
                os.close(fd)
            ctl = m.u64_view(0, HEADER_WORDS)
            ctl[Field.VERSION] = CONTROL_VERSION
            ctl[Field.PID] = os.getpid()
            ctl[Field.NPAGES] = self.npages
            ctl[Field.PAGE_SIZE] = self.page_size
            ctl[Field.STATE] = GuestState.STARTING
            ctl[Field.REQUEST] = GuestRequest.NONE
            self._publish(ctl)
            ctl[Field.DIRTY_RATE] = self.dirty_rate
            ctl[Field.HEARTBEAT] = time.monotonic_ns()
            ctl[Field.MAGIC] = CONTROL_MAGIC
            # Renamed into place complete, so an opener never sees a half-written header.
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise GuestError(f"cannot create control file {path}: {exc.strerror}") from exc
        return m

    def _publish(self, ctl: memoryview) -> None:
        ctl[Field.POSITION] = self.position
        ctl[Field.VALUE] = self.value & U64_MAX
        ctl[Field.TOUCHED] = self.touched & U64_MAX

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop = True

    def run(self, ready: Callable[[], None] | None) -> DeviceState:
        handlers: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self.ctl[Field.STATE] = GuestState.RUNNING
            if ready is not None:
                ready()
            self._loop()
        finally:
            self._publish(self.ctl)
            # Exited is published only once the image is flushed, so "exited" means the
            # image file holds everything.
            self.image.mm.flush()
            self.ctl[Field.STATE] = GuestState.EXITED
            self.control.mm.flush()
            for signum, old in handlers.items():
                signal.signal(signum, old)
        return DeviceState(
            npages=self.npages,
            page_size=self.page_size,
            position=self.position,
            value=self.value & U64_MAX,
            touched=self.touched & U64_MAX,
        )

    def _loop(self) -> None:
        ctl = self.ctl
        image, bm_address = self.image, self.bm_address
        npages, page_size = self.npages, self.page_size
        page_credit = page_size * _NS_PER_S
        credit = 0  # bytes x ns of dirtying owed but not yet turned into whole pages
        chunk = 256  # pages per call when unlimited, adapted to about one tick
        last = time.monotonic_ns()
        next_tick = last
        while not self._stop:
            request = ctl[Field.REQUEST]
            if request == GuestRequest.EXIT:
                return
            if request == GuestRequest.PAUSE:
                if not self._paused():
                    return
                # No credit for the time spent paused.
                last = next_tick = time.monotonic_ns()
                continue
            rate = ctl[Field.DIRTY_RATE]
            now = time.monotonic_ns()
            if rate:
                credit = min(credit + rate * (now - last), max(rate * _MAX_CARRY_NS, page_credit))
                count = credit // page_credit
                credit -= count * page_credit
            else:
                count = chunk
            last = now
            if count:
                pos = self.position
                self.position = touch_pages(image, bm_address, npages, page_size, pos, count)
                # Every wrap to page 0 completes a pass.
                self.value += (pos + count) // npages
                self.touched += count
                self._publish(ctl)
            after = time.monotonic_ns()
            ctl[Field.HEARTBEAT] = after
            if rate:
                next_tick += TICK_NS
                if next_tick <= after:
                    next_tick = after + TICK_NS
                time.sleep((next_tick - after) / _NS_PER_S)
            else:
                spent = max(after - now, 1)
                chunk = max(64, min(chunk * 2, chunk * TICK_NS // spent))

    def _paused(self) -> bool:
        """Wait while paused; False when the guest must exit instead of resuming."""
        ctl = self.ctl
        self._publish(ctl)
        ctl[Field.HEARTBEAT] = time.monotonic_ns()
        ctl[Field.STATE] = GuestState.PAUSED
        while not self._stop:
            request = ctl[Field.REQUEST]
            if request == GuestRequest.EXIT:
                return False
            if request != GuestRequest.PAUSE:
                ctl[Field.STATE] = GuestState.RUNNING
                return True
            ctl[Field.HEARTBEAT] = time.monotonic_ns()
            time.sleep(_PAUSE_POLL_S)
        return False

    def close(self) -> None:
        self.ctl.release()
        self.control.close()


__all__ = ["TICK_NS", "run_guest"]
