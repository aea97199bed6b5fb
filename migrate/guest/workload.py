"""The running guest: the reference workload's loop over a mapped image, its control file
as the guest writes it (and flocks for its whole life), pause, lease, throttle and exit
handling, signals, and run_guest, also started post-copy (postcopy_link.py). It knows the
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
    MAX_THROTTLE,
    READABLE_VERSIONS,
    U64_MAX,
    Field,
    GuestRequest,
    GuestState,
    Lease,
    LeaseMode,
    check_page_size,
    control_file_size,
    read_control_header,
)
from zcmigrate.migrate.guest.oracle import check_image_size, infer_step, oracle_verdict
from zcmigrate.migrate.guest.owners import guest_holder, owner_alive
from zcmigrate.migrate.guest.postcopy_link import GO_TIMEOUT_S, PostcopyLink
from zcmigrate.migrate.imagefiles import control_path, state_path
from zcmigrate.multifd.pages import MappedFile, touch_pages

TICK_NS: Final = 5_000_000
_PAUSE_POLL_S: Final = 0.0005
# How often a paused guest looks at its lease's owner, and a throttled one at its
# throttle's setter: well inside the 100 ms the lease promises, for one read of /proc.
OWNER_CHECK_NS: Final = 50_000_000
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
    say: Callable[[str], None] | None = None,
    force: bool = False,
    postcopy: Path | None = None,
    go_timeout: float = GO_TIMEOUT_S,
    offered: Callable[[], None] | None = None,
) -> DeviceState:
    """Run the workload on `image` until asked to exit (request or SIGTERM/SIGINT).

    With `size`, creates the image if it does not exist. With `resume`, refuses to start
    unless the image satisfies the oracle for that state, then continues from it; without,
    continues from wherever the image's step is. Calls `ready()` once running, and
    `say(line)` for what the guest does by itself (it resumed after its lease's owner
    died, a throttle changed, it was handed over). Returns the device state at exit.

    Refuses, unless `force`, an image whose last guest was handed over to a destination
    (the control file's mark; with `resume`, only if the mark is newer than the device
    state, so that a guest that came back can resume) or ended held paused after its
    device state left: a guest here would be a second copy of the one that may run there.

    With `postcopy` (a socket path), starts post-copy on an image whose pages need not all
    be there: registers the mapping for missing pages, hands the userfaultfd to the
    receiver listening on `postcopy` (postcopy.py says what is sent, in which order),
    calls `offered()`, and runs from the device state of the receiver's go, which must
    come within `go_timeout` seconds. No oracle check at the start (reading the pages
    would fetch them all), and no refusal for a hand-over mark: the receiver, which owns
    the image for a migration that brings the guest here now, vouches for its state.
    """
    path = Path(image)
    check_page_size(page_size)
    if postcopy is not None and (resume is not None or size is not None):
        raise GuestError("a post-copy start takes its device state from the receiver and "
                         "needs the image the receiver made: no resume state, no size")
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
        how = "the receiver makes it" if postcopy is not None else "give a size to create it"
        raise GuestError(f"image {path} does not exist: {how}")
    with open_image(path, writable=True) as (fd, nbytes):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = guest_holder(path)
            if not pid:
                head = read_control_header(control_path(path))
                pid = head[Field.PID] if head and head[Field.MAGIC] == CONTROL_MAGIC else None
            who = f" (pid {pid})" if pid else ""
            raise GuestError(
                f"another guest{who} is already running on {path}; stop it first"
            ) from None
        if not force and postcopy is None:
            _refuse_a_second_copy(path, resume is not None)
        if nbytes == 0 or nbytes % page_size:
            raise GuestError(
                f"image {path} has {nbytes} bytes, not a positive multiple of the page size "
                f"{page_size}"
            )
        npages = nbytes // page_size
        m = MappedFile(fd, nbytes, writable=True)
        link: PostcopyLink | None = None
        try:
            if postcopy is None:
                start = _starting_state(path, m, npages, page_size, resume)
            else:
                link = PostcopyLink(postcopy, path, fd, m, page_size, say)
                start = _postcopy_go(link, path, npages, page_size, go_timeout, offered)
            guest = _Guest(path, m, start, dirty_rate, say)
            try:
                return guest.run(ready, None if link is None else link.running)
            finally:
                if link is not None:
                    link.stop()
                guest.close()
        finally:
            m.close()
            # After the mapping: nothing can fault on the range once its descriptor closes.
            if link is not None:
                link.close()


def _postcopy_go(
    link: PostcopyLink,
    path: Path,
    npages: int,
    page_size: int,
    go_timeout: float,
    offered: Callable[[], None] | None,
) -> DeviceState:
    deadline = time.monotonic() + go_timeout
    link.offer(deadline)
    if offered is not None:
        offered()
    state = link.wait_go(deadline)
    if (state.npages, state.page_size) != (npages, page_size):
        reason = (
            f"the device state describes {state.npages} pages of {state.page_size} bytes, "
            f"the image {path} {npages} pages of {page_size}"
        )
        link.refuse(reason)
        raise GuestError(f"refusing the receiver's go: {reason}")
    return state


def _refuse_a_second_copy(path: Path, resuming: bool) -> None:
    """GuestError if the last guest on `path` left it to a destination (handed over) or
    may have (it ended held paused with its device state gone)."""
    head = read_control_header(control_path(path))
    # An older version's mark counts too: an upgrade must not forget a hand-over.
    if (
        head is None
        or head[Field.MAGIC] != CONTROL_MAGIC
        or head[Field.VERSION] not in READABLE_VERSIONS
    ):
        return
    try:
        lease = Lease.from_header(head)
    except GuestError:
        return
    force = "pass --force (ZCMIGRATE_GUEST_FORCE=1)"
    if lease.handed_over_ns:
        if resuming:
            # A device state committed after the hand-over is a guest that came back.
            try:
                if state_path(path).stat().st_mtime_ns > lease.handed_over_ns:
                    return
            except OSError:
                pass
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease.handed_over_ns / 1e9))
        raise GuestError(
            f"refusing to start a guest on {path}: it was handed over to a destination at "
            f"{when} (migration {lease.migration_name}) and runs there now; a guest here "
            "would be a second copy of it. If the destination's copy is gone for good and "
            f"this image is to run again, {force}"
        )
    if lease.mode == LeaseMode.HOLD and not resuming:
        raise GuestError(
            f"refusing to start a guest on {path}: its last guest (pid {head[Field.PID]}) "
            "ended held paused after its device state left with migration "
            f"{lease.migration_name}, so the destination may own the guest. Check the "
            "destination first (`zcmigrate guest --check DEST_IMAGE` there): if it "
            f"committed, mark this image with `zcmigrate retire {path}`; if it did not, "
            f"{force} to run the guest here"
        )


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
    say: Callable[[str], None] | None = None
    _stop: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.npages = self.start.npages
        self.page_size = self.start.page_size
        self.position = self.start.position
        self.value = self.start.value
        self.touched = self.start.touched
        self.control, self.control_fd = self._create_control()
        self.ctl = self.control.u64_view(0, HEADER_WORDS)
        self.bm_address = self.control.address + BITMAP_OFFSET

    def _say(self, line: str) -> None:
        if self.say is not None:
            self.say(line)

    def _create_control(self) -> tuple[MappedFile, int]:
        path = control_path(self.path)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        size = control_file_size(self.npages)
        fd = -1
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            # Held for the guest's whole life, on the file that is renamed into place:
            # guest_holder() asks this lock whether a guest runs on the image.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, size)
            m = MappedFile(fd, size, writable=True)
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
            if fd >= 0:
                os.close(fd)
            raise GuestError(f"cannot create control file {path}: {exc.strerror}") from exc
        return m, fd

    def _publish(self, ctl: memoryview) -> None:
        ctl[Field.POSITION] = self.position
        ctl[Field.VALUE] = self.value & U64_MAX
        ctl[Field.TOUCHED] = self.touched & U64_MAX

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop = True

    def run(
        self,
        ready: Callable[[], None] | None,
        running: Callable[[memoryview], None] | None = None,
    ) -> DeviceState:
        handlers: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self.ctl[Field.STATE] = GuestState.RUNNING
            if running is not None:
                running(self.ctl)
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
            if self.ctl[Field.HANDED_OVER]:
                with contextlib.suppress(GuestError):
                    lease = Lease.from_header(self.ctl)
                    self._say(
                        f"guest exited: handed over to the destination (migration "
                        f"{lease.migration_name}); it runs there now"
                    )
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
        chunk = 256  # most pages per tick, adapted to the running share of a tick
        last = time.monotonic_ns()
        next_tick = last
        throttle_seen = 0
        next_throttle_check = last
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
            throttle = min(ctl[Field.THROTTLE], MAX_THROTTLE)
            if throttle and now >= next_throttle_check:
                next_throttle_check = now + OWNER_CHECK_NS
                throttle = self._check_throttle_owner(throttle)
            if throttle != throttle_seen:
                throttle_seen = throttle
                self._say(
                    f"guest throttle: {throttle} per mille (runs {(1000 - throttle) / 10:g}% "
                    "of each tick)"
                )
            # With throttle t the guest runs (1 - t) of each tick and sleeps t (QEMU's
            # cpu-throttle): only running time earns dirtying credit, and a tick's work
            # is cut to its running share, so the dirty rate falls by t at any rate.
            run_ns = TICK_NS * (1000 - throttle) // 1000
            if rate:
                credit = min(
                    credit + rate * (now - last) * (1000 - throttle) // 1000,
                    max(rate * _MAX_CARRY_NS, page_credit),
                )
                count = min(credit // page_credit, chunk)
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
            if count == chunk:
                spent = max(after - now, 1)
                chunk = max(64, min(chunk * 2, chunk * run_ns // spent))
            wait = TICK_NS - run_ns
            if rate:
                next_tick += TICK_NS
                # Behind (a tick's work took longer): no catching up, only the throttle.
                next_tick = max(next_tick, after)
                wait = max(wait, next_tick - after)
            if wait:
                time.sleep(wait / _NS_PER_S)

    def _check_throttle_owner(self, throttle: int) -> int:
        """The throttle in force: lifted (0) once the process that set it is dead."""
        ctl = self.ctl
        by, at = ctl[Field.THROTTLE_BY], ctl[Field.THROTTLE_AT]
        if by == 0 or owner_alive(by, at):
            return throttle
        # Only if nobody set it again while we looked.
        if ctl[Field.THROTTLE_BY] != by or ctl[Field.THROTTLE_AT] != at:
            return throttle
        ctl[Field.THROTTLE] = 0
        self._say(f"guest throttle lifted: pid {by}, which set it, is gone")
        return 0

    def _paused(self) -> bool:
        """Wait while paused; False when the guest must exit instead of resuming."""
        ctl = self.ctl
        self._publish(ctl)
        ctl[Field.HEARTBEAT] = time.monotonic_ns()
        ctl[Field.STATE] = GuestState.PAUSED
        next_check = 0  # look at the owner right away: it may be dead already
        while not self._stop:
            request = ctl[Field.REQUEST]
            if request == GuestRequest.EXIT:
                return False
            if request != GuestRequest.PAUSE:
                ctl[Field.STATE] = GuestState.RUNNING
                return True
            now = time.monotonic_ns()
            if now >= next_check:
                next_check = now + OWNER_CHECK_NS
                self._check_lease()
            ctl[Field.HEARTBEAT] = now
            time.sleep(_PAUSE_POLL_S)
        return False

    def _check_lease(self) -> None:
        """Resume (by writing the resume request ourselves) if the pause's lease is
        "resume if the owner dies" and its owner is dead; see layout.py."""
        ctl = self.ctl
        if ctl[Field.LEASE_MODE] != LeaseMode.RESUME_IF_OWNER_DIES:
            return
        owner, start = ctl[Field.LEASE_OWNER], ctl[Field.LEASE_START]
        if owner_alive(owner, start):
            return
        # Only if nothing changed while we looked: a hold or a new lease wins.
        if (
            ctl[Field.LEASE_MODE] != LeaseMode.RESUME_IF_OWNER_DIES
            or ctl[Field.LEASE_OWNER] != owner
            or ctl[Field.LEASE_START] != start
            or ctl[Field.REQUEST] != GuestRequest.PAUSE
        ):
            return
        # Lapsed before the request, so that whoever sees the resume sees why.
        ctl[Field.LEASE_MODE] = LeaseMode.LAPSED
        ctl[Field.REQUEST] = GuestRequest.RESUME
        self._say(
            f"guest resumed by itself: the migration (pid {owner}) that paused it is gone, "
            "and its device state never left"
        )

    def close(self) -> None:
        self.ctl.release()
        self.control.close()
        # Last: until here guest_holder() names this guest.
        os.close(self.control_fd)


__all__ = ["TICK_NS", "run_guest"]
