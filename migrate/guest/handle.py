"""GuestControl, the migration's handle on a running guest through its control file:
read its state, pause and resume it, ask it to exit, share its dirty bitmap. It knows the
control file's layout and the guest's process, not how the guest runs or what is sent.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from zcmigrate.migrate.guest.device import DeviceState
from zcmigrate.migrate.guest.errors import GuestError
from zcmigrate.migrate.guest.layout import (
    BITMAP_OFFSET,
    CONTROL_MAGIC,
    CONTROL_SIZE,
    CONTROL_VERSION,
    HEADER_WORDS,
    U64_MAX,
    Field,
    GuestRequest,
    GuestState,
    bitmap_words,
    check_page_size,
    control_file_size,
)
from zcmigrate.migrate.imagefiles import control_path
from zcmigrate.multifd.pages import MappedFile

_CONTROL_POLL_S: Final = 0.0002
_ALIVE_CHECK_NS: Final = 20_000_000
_NS_PER_S: Final = 1_000_000_000


class GuestControl:
    """The migration's handle on a running guest, through its control file."""

    def __init__(self, image: Path, mapping: MappedFile) -> None:
        self.image = image
        self._m: MappedFile | None = mapping
        self._ctl = mapping.u64_view(0, HEADER_WORDS)
        self._npages = self._ctl[Field.NPAGES]
        self._page_size = self._ctl[Field.PAGE_SIZE]
        self._nwords = bitmap_words(self._npages)
        self._bitmap = mapping.u64_view(BITMAP_OFFSET, self._nwords)
        self._bitmap_address = mapping.address + BITMAP_OFFSET

    @classmethod
    def open(cls, image_path: str | os.PathLike[str]) -> GuestControl:
        image = Path(image_path)
        path = control_path(image)
        start = f"start one with `zcmigrate guest {image}`"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise GuestError(
                f"no guest control file {path}: no guest runs on {image}; {start}"
            ) from None
        except OSError as exc:
            raise GuestError(f"cannot open guest control file {path}: {exc.strerror}") from exc
        try:
            head = os.pread(fd, CONTROL_SIZE, 0)
            if len(head) < CONTROL_SIZE:
                raise GuestError(f"{path} is not a guest control file (too short)")
            fields = memoryview(head).cast("Q")
            if fields[Field.MAGIC] != CONTROL_MAGIC:
                raise GuestError(
                    f"{path} is not a guest control file (wrong magic); remove it and {start}"
                )
            if fields[Field.VERSION] != CONTROL_VERSION:
                raise GuestError(
                    f"{path} has control version {fields[Field.VERSION]}, expected "
                    f"{CONTROL_VERSION}: the guest and the migration are different versions"
                )
            pid, state = fields[Field.PID], fields[Field.STATE]
            if state == GuestState.EXITED or not _pid_alive(pid):
                raise GuestError(f"the guest (pid {pid}) on {image} is not running; {start}")
            npages, page_size = fields[Field.NPAGES], fields[Field.PAGE_SIZE]
            try:
                check_page_size(page_size)
            except GuestError as exc:
                raise GuestError(f"{path}: {exc}") from None
            size = control_file_size(npages)
            if npages < 1 or os.fstat(fd).st_size < size:
                raise GuestError(f"{path} is truncated: {npages} pages need {size} bytes")
            mapping = MappedFile(fd, size, writable=True)
        finally:
            os.close(fd)
        return cls(image, mapping)

    def __enter__(self) -> GuestControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self) -> None:
        if self._m is None:
            raise GuestError("guest control is closed")

    def _field(self, index: int) -> int:
        self._require_open()
        return int(self._ctl[index])

    @property
    def pid(self) -> int:
        return self._field(Field.PID)

    @property
    def npages(self) -> int:
        return int(self._npages)

    @property
    def page_size(self) -> int:
        return int(self._page_size)

    @property
    def nwords(self) -> int:
        return self._nwords

    @property
    def state(self) -> GuestState:
        raw = self._field(Field.STATE)
        try:
            return GuestState(raw)
        except ValueError:
            raise GuestError(f"guest control block holds unknown state {raw}") from None

    @property
    def position(self) -> int:
        """Next page to touch; exact only while paused."""
        return self._field(Field.POSITION)

    @property
    def value(self) -> int:
        return self._field(Field.VALUE)

    @property
    def touched(self) -> int:
        return self._field(Field.TOUCHED)

    @property
    def heartbeat_age(self) -> float:
        """Seconds since the guest last ticked (CLOCK_MONOTONIC is system-wide)."""
        return (time.monotonic_ns() - self._field(Field.HEARTBEAT)) / _NS_PER_S

    @property
    def dirty_rate(self) -> int:
        return self._field(Field.DIRTY_RATE)

    @dirty_rate.setter
    def dirty_rate(self, rate: int) -> None:
        if type(rate) is not int or not 0 <= rate <= U64_MAX:
            raise GuestError(f"dirty rate must be a non-negative integer, got {rate!r}")
        self._require_open()
        self._ctl[Field.DIRTY_RATE] = rate

    @property
    def bitmap(self) -> memoryview:
        """The dirty bitmap words, writable (format "Q"). Release anything built on it
        (memoryviews, native buffers) before close()."""
        self._require_open()
        return self._bitmap

    @property
    def bitmap_address(self) -> int:
        self._require_open()
        return self._bitmap_address

    @property
    def alive(self) -> bool:
        return self.state != GuestState.EXITED and _pid_alive(self.pid)

    def device_state(self) -> DeviceState:
        """The device state in the control block; exact only while paused."""
        return DeviceState(
            npages=self.npages,
            page_size=self.page_size,
            position=self._field(Field.POSITION),
            value=self._field(Field.VALUE),
            touched=self._field(Field.TOUCHED),
        )

    def _request(self, request: GuestRequest) -> None:
        self._require_open()
        self._ctl[Field.REQUEST] = request

    def _wait(self, done: Callable[[GuestState], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic_ns() + int(timeout * _NS_PER_S)
        next_alive = time.monotonic_ns() + _ALIVE_CHECK_NS
        while True:
            state = self.state
            if done(state):
                return
            if state == GuestState.EXITED:
                raise GuestError(f"the guest (pid {self.pid}) exited while {what}")
            now = time.monotonic_ns()
            if now >= next_alive:
                if not _pid_alive(self.pid):
                    raise GuestError(f"the guest (pid {self.pid}) died while {what}")
                next_alive = now + _ALIVE_CHECK_NS
            if now >= deadline:
                raise GuestError(
                    f"the guest (pid {self.pid}) did not respond within {timeout:g} s while "
                    f"{what} (state {state.name.lower()}, heartbeat {self.heartbeat_age:.3f} s ago)"
                )
            time.sleep(_CONTROL_POLL_S)

    def pause(self, timeout: float = 5.0) -> DeviceState:
        """Pause the guest and return its device state. When this returns, every write
        the guest made is in the image and marked in the bitmap."""
        self._request(GuestRequest.PAUSE)
        try:
            self._wait(lambda s: s == GuestState.PAUSED, timeout, "pausing")
        except GuestError:
            # The caller treats a failed pause as "still running"; make it true rather than
            # leave a guest that pauses later with nobody to resume it.
            with contextlib.suppress(GuestError):
                self._request(GuestRequest.RESUME)
            raise
        return self.device_state()

    def resume(self, timeout: float | None = 5.0) -> None:
        """Let a paused guest run again; waits until it runs unless timeout is None."""
        self._request(GuestRequest.RESUME)
        if timeout is not None:
            self._wait(lambda s: s == GuestState.RUNNING, timeout, "resuming")

    def request_exit(self, timeout: float | None = None) -> None:
        """Ask the guest to exit; with a timeout, wait until it has."""
        self._request(GuestRequest.EXIT)
        if timeout is None:
            return
        try:
            self._wait(lambda s: s == GuestState.EXITED, timeout, "exiting")
        except GuestError:
            # Killed before it could say so: gone is what was asked for.
            if _pid_alive(self.pid):
                raise

    def close(self) -> None:
        if self._m is None:
            return
        m, self._m = self._m, None
        self._ctl.release()
        try:
            self._bitmap.release()
        except BufferError:
            # The caller still holds a buffer built on the bitmap; the mapping goes away
            # with the last reference instead.
            return
        m.close()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    # A dead child of ours stays a zombie until it is reaped: kill(0) still succeeds.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


__all__ = ["GuestControl"]
