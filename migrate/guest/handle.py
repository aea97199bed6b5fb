"""GuestControl, the migration's handle on a running guest through its control file:
read its state, pause it under a lease and resume it, hold it while the device state is
out, hand it over, throttle it, ask it to exit, share its dirty bitmap. It knows the
control file's layout and the guest's process, not how the guest runs or what is sent.

One controller at a time: the migration that holds IMAGE.lock (or a settle command that
took it) writes requests and the lease; the guest is the only other writer (when it
resumes itself), and the order of the writes below is what makes that safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    MAX_THROTTLE,
    READABLE_VERSIONS,
    U64_MAX,
    Field,
    GuestRequest,
    GuestState,
    Lease,
    LeaseMode,
    PostcopyPhase,
    bitmap_words,
    check_page_size,
    control_file_size,
    read_control_header,
    uuid_words,
)
from zcmigrate.migrate.guest.owners import owner_alive, pid_alive, process_start_time
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
            if state == GuestState.EXITED or not pid_alive(pid):
                if fields[Field.HANDED_OVER]:
                    lease = Lease.from_header(fields)
                    raise GuestError(
                        f"the guest (pid {pid}) on {image} is not running: it was handed "
                        f"over to a destination (migration {lease.migration_name}), and "
                        "runs there now"
                    )
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
    def postcopy(self) -> Postcopy:
        """Where a post-copy start stands (PostcopyPhase.NONE for any other guest)."""
        self._require_open()
        return Postcopy.from_header(self._ctl)

    @property
    def throttle(self) -> int:
        """Per mille of every tick the guest sleeps (auto-converge), 0..MAX_THROTTLE."""
        return self._field(Field.THROTTLE)

    @throttle.setter
    def throttle(self, per_mille: int) -> None:
        self.set_throttle(per_mille)

    def set_throttle(self, per_mille: int, owner: int | None = None) -> None:
        """Have the guest sleep `per_mille` of every tick, for as long as `owner`
        (default: this process) lives: the guest lifts a throttle whose setter died."""
        if type(per_mille) is not int or not 0 <= per_mille <= MAX_THROTTLE:
            raise GuestError(
                f"throttle must be an integer from 0 to {MAX_THROTTLE} per mille, "
                f"got {per_mille!r}"
            )
        self._require_open()
        owner_pid = os.getpid() if owner is None else owner
        owner_start = process_start_time(owner_pid)
        if owner_start is None:
            raise GuestError(f"cannot throttle the guest for pid {owner_pid}: no such live process")
        ctl = self._ctl
        # The setter before the value, so the guest never judges a throttle by the wrong one.
        ctl[Field.THROTTLE_BY] = owner_pid
        ctl[Field.THROTTLE_AT] = owner_start
        ctl[Field.THROTTLE] = per_mille

    @property
    def request(self) -> GuestRequest:
        raw = self._field(Field.REQUEST)
        try:
            return GuestRequest(raw)
        except ValueError:
            raise GuestError(f"guest control block holds unknown request {raw}") from None

    @property
    def lease(self) -> Lease:
        """The pause lease and the hand-over mark, as the control block holds them now."""
        self._require_open()
        return Lease.from_header(self._ctl)

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
        return self.state != GuestState.EXITED and pid_alive(self.pid)

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
                if not pid_alive(self.pid):
                    raise GuestError(f"the guest (pid {self.pid}) died while {what}")
                next_alive = now + _ALIVE_CHECK_NS
            if now >= deadline:
                raise GuestError(
                    f"the guest (pid {self.pid}) did not respond within {timeout:g} s while "
                    f"{what} (state {state.name.lower()}, heartbeat {self.heartbeat_age:.3f} s ago)"
                )
            time.sleep(_CONTROL_POLL_S)

    def pause(self, timeout: float = 5.0, owner: int | None = None) -> DeviceState:
        """Pause the guest under a lease held by `owner` (default: this process) in mode
        "resume if the owner dies", and return its device state. When this returns,
        every write the guest made is in the image and marked in the bitmap.

        If the owner dies (kill -9 included) before resume() or hold(), the guest resumes
        itself within a second. A pause another live process holds, or one held for a
        device state that left (hold), is refused; a pause whose owner died is waited
        out (the guest resumes itself) before this one is taken.
        """
        owner_pid = os.getpid() if owner is None else owner
        owner_start = process_start_time(owner_pid)
        if owner_start is None:
            raise GuestError(f"cannot pause the guest for pid {owner_pid}: no such live process")
        deadline = time.monotonic_ns() + int(timeout * _NS_PER_S)
        self._wait_for_turn(owner_pid, owner_start, deadline, timeout)
        ctl = self._ctl
        renewing = (
            ctl[Field.REQUEST] == GuestRequest.PAUSE
            and ctl[Field.LEASE_OWNER] == owner_pid
            and ctl[Field.LEASE_START] == owner_start
            and ctl[Field.LEASE_MODE] == LeaseMode.HOLD
        )
        if not renewing:
            # The lease before the request: a guest that sees the pause sees its owner.
            # Nothing else writes the lease now: the guest reads it only while paused,
            # and _wait_for_turn saw it running (or paused by nobody, or by us).
            ctl[Field.LEASE_MODE] = LeaseMode.NONE
            ctl[Field.LEASE_OWNER] = owner_pid
            ctl[Field.LEASE_START] = owner_start
            ctl[Field.MIGRATION_HI] = 0
            ctl[Field.MIGRATION_LO] = 0
            ctl[Field.LEASE_MODE] = LeaseMode.RESUME_IF_OWNER_DIES
        self._request(GuestRequest.PAUSE)
        left = max(deadline - time.monotonic_ns(), 0) / _NS_PER_S
        try:
            self._wait(lambda s: s == GuestState.PAUSED, left, "pausing")
        except GuestError:
            # The caller treats a failed pause as "still running"; make it true rather than
            # leave a guest that pauses later with nobody to resume it.
            with contextlib.suppress(GuestError):
                self._end_lease_and_resume()
            raise
        return self.device_state()

    def _wait_for_turn(self, owner: int, start: int, deadline: int, timeout: float) -> None:
        """Return once the guest runs with no pause pending, or is paused by nobody or by
        `owner` itself; refuse a pause another live owner holds, or a hold."""
        while True:
            state, request, lease = self.state, self._field(Field.REQUEST), self.lease
            if state == GuestState.EXITED:
                raise GuestError(f"the guest (pid {self.pid}) exited while pausing")
            if not pid_alive(self.pid):
                raise GuestError(f"the guest (pid {self.pid}) died while pausing")
            if request == GuestRequest.PAUSE:
                if (lease.owner, lease.owner_start) == (owner, start):
                    return
                if lease.mode == LeaseMode.NONE:
                    return  # a pause nobody owns: ours from now on
                if lease.mode == LeaseMode.HOLD:
                    raise GuestError(
                        f"the guest (pid {self.pid}) on {self.image} is held paused: the "
                        f"device state left with migration {lease.migration_name} (pid "
                        f"{lease.owner}) and the destination may own the guest; settle it "
                        f"first with `zcmigrate resume {self.image}` or `zcmigrate retire "
                        f"{self.image}`"
                    )
                if lease.mode == LeaseMode.RESUME_IF_OWNER_DIES and owner_alive(
                    lease.owner, lease.owner_start
                ):
                    raise GuestError(
                        f"the guest (pid {self.pid}) on {self.image} is already paused by pid "
                        f"{lease.owner}: one migration at a time"
                    )
                # Its owner is dead (or the guest is resuming itself right now): the guest
                # resumes within its next owner check; take the pause after that.
            elif state == GuestState.RUNNING:
                return
            if time.monotonic_ns() >= deadline:
                raise GuestError(
                    f"the guest (pid {self.pid}) on {self.image} did not leave the pause of "
                    f"pid {lease.owner} (lease {lease.mode.name.lower()}) within {timeout:g} s"
                )
            time.sleep(_CONTROL_POLL_S)

    def hold(self, uuid: bytes | None = None) -> None:
        """Switch the pause lease to "hold": the guest stays paused whatever happens, its
        owner's death included. Call it right before the device state leaves; `uuid`
        names the migration it leaves with. GuestError if the guest is not paused under
        a live lease: then the device state must not leave."""
        hi, lo = uuid_words(uuid)
        lease = self.lease
        if not self._paused_by_request():
            raise GuestError(f"cannot hold the guest (pid {self.pid}): it is not paused")
        if lease.mode not in (LeaseMode.RESUME_IF_OWNER_DIES, LeaseMode.HOLD) or not owner_alive(
            lease.owner, lease.owner_start
        ):
            raise GuestError(
                f"cannot hold the guest (pid {self.pid}): its pause has no live owner "
                f"(lease {lease.mode.name.lower()}, pid {lease.owner})"
            )
        ctl = self._ctl
        ctl[Field.MIGRATION_HI] = hi
        ctl[Field.MIGRATION_LO] = lo
        ctl[Field.LEASE_MODE] = LeaseMode.HOLD
        # Read back: the guest resumes itself only once it judged the owner dead, which a
        # live owner (the caller, normally) never is; this catches one that just did.
        if not self._paused_by_request() or self.lease.mode != LeaseMode.HOLD:
            raise GuestError(
                f"the guest (pid {self.pid}) left its pause while it was being held: the "
                "device state must not leave"
            )

    def _paused_by_request(self) -> bool:
        return (
            self._field(Field.REQUEST) == GuestRequest.PAUSE and self.state == GuestState.PAUSED
        )

    def _end_lease_and_resume(self) -> None:
        # The lease ends before the resume request: a guest never runs under a lease.
        ctl = self._ctl
        ctl[Field.LEASE_MODE] = LeaseMode.NONE
        ctl[Field.LEASE_OWNER] = 0
        ctl[Field.LEASE_START] = 0
        self._request(GuestRequest.RESUME)

    def resume(self, timeout: float | None = 5.0) -> None:
        """End the pause lease and let the guest run again; waits until it runs unless
        timeout is None. Refused for a guest handed over to a destination."""
        lease = self.lease
        if lease.handed_over_ns:
            raise GuestError(
                f"the guest (pid {self.pid}) on {self.image} was handed over to a destination "
                f"(migration {lease.migration_name}): resuming it here would run a second copy"
            )
        self._end_lease_and_resume()
        if timeout is not None:
            self._wait(lambda s: s == GuestState.RUNNING, timeout, "resuming")

    def hand_over(self, uuid: bytes | None = None, timeout: float | None = None) -> None:
        """Mark the guest handed over to a destination that committed (migration `uuid`)
        and ask it to exit; with a timeout, wait until it has. From then on the guest
        stays paused until it exits, and a new guest on the image is refused (it would be
        a second copy of the one that runs on the destination)."""
        hi, lo = uuid_words(uuid)
        self._require_open()
        ctl = self._ctl
        ctl[Field.LEASE_MODE] = LeaseMode.HOLD
        if uuid is not None:
            ctl[Field.MIGRATION_HI] = hi
            ctl[Field.MIGRATION_LO] = lo
        ctl[Field.HANDED_OVER] = time.time_ns()
        assert self._m is not None
        with contextlib.suppress(OSError, ValueError):
            self._m.mm.flush(0, CONTROL_SIZE)
        self.request_exit(timeout)

    def request_exit(self, timeout: float | None = None) -> None:
        """Ask the guest to exit; with a timeout, wait until it has."""
        self._request(GuestRequest.EXIT)
        if timeout is None:
            return
        try:
            self._wait(lambda s: s == GuestState.EXITED, timeout, "exiting")
        except GuestError:
            # Killed before it could say so: gone is what was asked for.
            if pid_alive(self.pid):
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


@dataclass(frozen=True, slots=True)
class Postcopy:
    """The post-copy fields of a control block."""

    phase: PostcopyPhase
    peer: int
    """pid of the receiver that serves (or last served) the missing pages; 0 none yet."""
    changed_ns: int
    """CLOCK_MONOTONIC ns of the phase's last change; 0 never."""

    @classmethod
    def from_header(cls, words: Sequence[int]) -> Postcopy:
        raw = int(words[Field.POSTCOPY])
        try:
            phase = PostcopyPhase(raw)
        except ValueError:
            raise GuestError(f"guest control block holds unknown post-copy phase {raw}") from None
        return cls(phase=phase, peer=int(words[Field.POSTCOPY_PEER]),
                   changed_ns=int(words[Field.POSTCOPY_AT]))


@dataclass(frozen=True, slots=True)
class ControlRecord:
    """What a control file says when no guest may be running to ask: the last guest's
    pid and state, its lease and hand-over mark, and for an operator's look (`zcmigrate
    guest IMAGE --status`) its progress, heartbeat and post-copy fields."""

    pid: int
    state: GuestState
    lease: Lease
    version: int = CONTROL_VERSION
    position: int = 0
    value: int = 0
    touched: int = 0
    heartbeat_ns: int = 0
    """CLOCK_MONOTONIC ns of the guest's last tick."""
    postcopy: Postcopy = Postcopy(PostcopyPhase.NONE, 0, 0)


def read_control_record(image: str | os.PathLike[str]) -> ControlRecord | None:
    """The control file beside `image` as a plain read sees it; None if there is none this
    version reads (missing, short, wrong magic or version, unknown state or lease)."""
    head = read_control_header(control_path(image))
    if (
        head is None
        or head[Field.MAGIC] != CONTROL_MAGIC
        or head[Field.VERSION] not in READABLE_VERSIONS
    ):
        return None
    try:
        return ControlRecord(
            pid=int(head[Field.PID]), state=GuestState(head[Field.STATE]),
            lease=Lease.from_header(head), version=int(head[Field.VERSION]),
            position=int(head[Field.POSITION]), value=int(head[Field.VALUE]),
            touched=int(head[Field.TOUCHED]), heartbeat_ns=int(head[Field.HEARTBEAT]),
            postcopy=Postcopy.from_header(head),
        )
    except (ValueError, GuestError):
        return None


def mark_handed_over(image: str | os.PathLike[str], uuid: bytes | None = None) -> None:
    """Mark the control file of a guest that no longer runs as handed over (migration
    `uuid`, or the one its lease names), so that no guest starts on `image` by mistake.
    GuestError if a guest runs on it (use GuestControl.hand_over) or there is no control
    file of this version."""
    hi, lo = uuid_words(uuid)
    path = control_path(image)
    if read_control_record(image) is None:
        raise GuestError(
            f"no guest control file of version {'/'.join(map(str, sorted(READABLE_VERSIONS)))} "
            f"at {path}"
        )
    try:
        image_fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise GuestError(f"cannot open image {image}: {exc.strerror}") from exc
    try:
        # The lock a guest holds on its image for its whole life (workload.run_guest):
        # while we hold it no guest runs, and none can start and miss the mark.
        try:
            fcntl.flock(image_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GuestError(
                f"a guest runs on {image}: it is handed over with GuestControl.hand_over"
            ) from None
        words = {Field.LEASE_MODE: int(LeaseMode.HOLD), Field.HANDED_OVER: time.time_ns()}
        if uuid is not None:
            words |= {Field.MIGRATION_HI: hi, Field.MIGRATION_LO: lo}
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            for index, word in words.items():
                os.pwrite(fd, word.to_bytes(8, sys.byteorder), index * 8)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise GuestError(f"cannot mark {path} handed over: {exc.strerror}") from exc
    finally:
        os.close(image_fd)


__all__ = ["ControlRecord", "GuestControl", "Postcopy", "mark_handed_over",
           "read_control_record"]
