"""The guest stand-in: a process that increments byte 0 of every page of a shared image and
marks each write in a dirty bitmap it shares with the migration; the migration's handle on
it, its device state and the oracle. It must not know about channels, sockets or packets.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import mmap
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

from zcmigrate import native
from zcmigrate.migrate.durable import write_atomic

# Re-exported for callers that name the guest's files through the guest (source.py).
from zcmigrate.migrate.imagefiles import control_path as control_path
from zcmigrate.migrate.imagefiles import state_path as state_path

# --------------------------------------------------------------------------- the contract
#
# `<image>.guest`, the control file shared by the guest and the migration:
#
#   offset  field        meaning (every field a native-endian u64)
#   ------  -----------  --------------------------------------------------------------
#        0  magic        CONTROL_MAGIC; written last, so a reader never sees half a header
#        8  version      CONTROL_VERSION
#       16  pid          the guest process
#       24  npages       pages in the image
#       32  page_size    bytes per page
#       40  state        GuestState: 0 starting, 1 running, 2 paused, 3 exited
#       48  request      GuestRequest: 0 none, 1 pause, 2 resume, 3 exit (written by others)
#       56  position     next page to touch; authoritative only while paused or exited
#       64  value        full passes over the image; byte 0 of a page is value & 255
#       72  touched      page writes since the image was created (when known)
#       80  dirty_rate   bytes of pages per second, 0 = as fast as possible; others may
#                        change it while the guest runs
#       88  heartbeat    CLOCK_MONOTONIC ns, updated every tick, also while paused
#     4096  bitmap       ceil(npages / 64) u64 words, bit i of the bitmap = page i dirty
#
# Requests are levels, not edges: the guest never clears `request`, so a request cannot be
# lost between the guest reading it and clearing it. Pause means "be paused until the
# request says otherwise"; none and resume both mean "run".
#
# The guest writes position, value and touched before it publishes state=paused (x86
# stores are not reordered with each other, and each aligned u64 store through a
# memoryview is a single store), so a reader that sees "paused" reads a consistent
# device state. The bitmap words are only ever changed with atomic operations (native).

CONTROL_MAGIC: Final = 0x5A43_4755_4553_5431  # "ZCGUEST1"
CONTROL_VERSION: Final = 1
CONTROL_SIZE: Final = 4096
BITMAP_OFFSET: Final = CONTROL_SIZE

_F_MAGIC: Final = 0
_F_VERSION: Final = 1
_F_PID: Final = 2
_F_NPAGES: Final = 3
_F_PAGE_SIZE: Final = 4
_F_STATE: Final = 5
_F_REQUEST: Final = 6
_F_POSITION: Final = 7
_F_VALUE: Final = 8
_F_TOUCHED: Final = 9
_F_DIRTY_RATE: Final = 10
_F_HEARTBEAT: Final = 11

CONTROL_FIELDS: Final[dict[str, int]] = {
    "magic": _F_MAGIC * 8,
    "version": _F_VERSION * 8,
    "pid": _F_PID * 8,
    "npages": _F_NPAGES * 8,
    "page_size": _F_PAGE_SIZE * 8,
    "state": _F_STATE * 8,
    "request": _F_REQUEST * 8,
    "position": _F_POSITION * 8,
    "value": _F_VALUE * 8,
    "touched": _F_TOUCHED * 8,
    "dirty_rate": _F_DIRTY_RATE * 8,
    "heartbeat": _F_HEARTBEAT * 8,
}
"""Byte offset of every control-block field, for readers in other languages and tests."""

DEVICE_KIND: Final = "zcmigrate-guest"
DEVICE_VERSION: Final = 1
DEVICE_STATE_MAX_BYTES: Final = 1024
"""An encoded device state is about 130 bytes; anything far larger is not one."""

FILLS: Final = ("random", "zero", "half")
MIN_PAGE_SIZE: Final = 64
MAX_PAGE_SIZE: Final = 1 << 30
MAX_IMAGE_BYTES: Final = 1 << 50

TICK_NS: Final = 5_000_000
_PAUSE_POLL_S: Final = 0.0005
_CONTROL_POLL_S: Final = 0.0002
_ALIVE_CHECK_NS: Final = 20_000_000
# Credit that piles up while the guest was descheduled is paid back at most this far, so
# a stall does not turn into a burst that would distort a migration's dirty-rate estimate.
_MAX_CARRY_NS: Final = 100_000_000
_NS_PER_S: Final = 1_000_000_000
_U64: Final = (1 << 64) - 1
_CREATE_CHUNK: Final = 8 << 20


class GuestError(Exception):
    """The guest, its image, its control file or its device state is not usable."""


class GuestState(enum.IntEnum):
    STARTING = 0
    RUNNING = 1
    PAUSED = 2
    EXITED = 3


class GuestRequest(enum.IntEnum):
    NONE = 0
    PAUSE = 1
    RESUME = 2
    EXIT = 3


def bitmap_words(npages: int) -> int:
    return (npages + 63) // 64


def _check_page_size(page_size: int) -> None:
    if (
        type(page_size) is not int
        or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE
        or page_size & (page_size - 1)
    ):
        raise GuestError(
            f"page size {page_size!r} is not a power of two between {MIN_PAGE_SIZE} and "
            f"{MAX_PAGE_SIZE}"
        )


# --------------------------------------------------------------------------- device state


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceState:
    """What a paused guest hands over: where the step is and how many passes it made.

    `decode` is fed bytes from the network, so construction validates every field.
    """

    kind: str = DEVICE_KIND
    version: int = DEVICE_VERSION
    npages: int
    page_size: int
    position: int
    value: int
    touched: int

    def __post_init__(self) -> None:
        if self.kind != DEVICE_KIND:
            raise GuestError(f"device state kind is {self.kind!r}, expected {DEVICE_KIND!r}")
        for name in ("version", "npages", "page_size", "position", "value", "touched"):
            v = getattr(self, name)
            # bool is an int subclass; JSON true is not a page count.
            if type(v) is not int:
                raise GuestError(f"device state field {name!r} must be an integer, got {v!r}")
            if not 0 <= v <= _U64:
                raise GuestError(f"device state field {name!r} out of range: {v}")
        if self.version != DEVICE_VERSION:
            raise GuestError(
                f"device state version {self.version} is not supported (expected {DEVICE_VERSION})"
            )
        _check_page_size(self.page_size)
        if self.npages < 1 or self.npages * self.page_size > MAX_IMAGE_BYTES:
            raise GuestError(f"device state npages out of range: {self.npages}")
        if self.position >= self.npages:
            raise GuestError(
                f"device state position {self.position} is not below npages {self.npages}"
            )

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> DeviceState:
        """Parse and validate an encoded device state; GuestError for anything else."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise GuestError(f"device state must be bytes, got {type(data).__name__}")
        raw = bytes(data)
        if len(raw) > DEVICE_STATE_MAX_BYTES:
            raise GuestError(
                f"device state is {len(raw)} bytes, more than {DEVICE_STATE_MAX_BYTES}"
            )
        try:
            obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except UnicodeDecodeError as exc:
            raise GuestError(f"device state is not UTF-8: {exc}") from exc
        except (ValueError, RecursionError) as exc:
            raise GuestError(f"device state is not valid JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise GuestError(f"device state must be a JSON object, got {type(obj).__name__}")
        expected = {f for f in cls.__dataclass_fields__}
        missing = expected - obj.keys()
        extra = obj.keys() - expected
        if missing or extra:
            raise GuestError(
                f"device state fields wrong: missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        return cls(**obj)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        # Two "position" keys would make the state mean whatever the parser picks.
        raise ValueError("duplicate key in object")
    return d


def read_device_state(image: str | os.PathLike[str]) -> DeviceState:
    """Read `<image>.state`, as a destination's receiver committed it."""
    path = state_path(image)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise GuestError(
            f"no device state at {path}: it is written when a migration to {image} commits"
        ) from None
    except OSError as exc:
        raise GuestError(f"cannot read device state {path}: {exc.strerror}") from exc
    try:
        return DeviceState.decode(data)
    except GuestError as exc:
        raise GuestError(f"{path}: {exc}") from exc


def write_device_state(image: str | os.PathLike[str], state: DeviceState) -> None:
    """Write `<image>.state` atomically and durably: a crash leaves the old state or the
    new one, never a torn file, and once this returns the rename survives a power cut."""
    path = state_path(image)
    try:
        write_atomic(path, state.encode())
    except OSError as exc:
        raise GuestError(f"cannot write device state {path}: {exc.strerror}") from exc


# --------------------------------------------------------------------------- mappings


class _Mapping:
    """An mmap of a whole file with its address pinned for native calls."""

    def __init__(self, fd: int, size: int, *, writable: bool) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.size = size
        self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
        self._buf = native.ffi.from_buffer(self.mm)
        self.address: int = int(native.ffi.cast("uintptr_t", self._buf))
        self._views: list[memoryview] = []

    def u64_view(self, offset: int, count: int) -> memoryview:
        with memoryview(self.mm) as whole:
            view = whole[offset : offset + count * 8].cast("Q")
        self._views.append(view)
        return view

    def close(self) -> None:
        for v in self._views:
            v.release()
        self._views.clear()
        native.ffi.release(self._buf)
        self.mm.close()


@contextlib.contextmanager
def _open_image(path: Path, *, writable: bool) -> Iterator[tuple[int, int]]:
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


# --------------------------------------------------------------------------- the oracle


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


def _oracle(m: _Mapping, state: DeviceState) -> OracleVerdict:
    bad = native.lib.zc_guest_check(
        m.address, state.npages, state.page_size, state.position, state.value & 0xFF
    )
    if bad < 0:
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


def _check_image_size(path: Path, size: int, state: DeviceState) -> None:
    if size != state.npages * state.page_size:
        raise GuestError(
            f"image {path} has {size} bytes but the device state describes "
            f"{state.npages} pages of {state.page_size} bytes ({state.npages * state.page_size})"
        )


def check_oracle(image_path: str | os.PathLike[str], state: DeviceState) -> OracleVerdict:
    """Check the image against a device state (the end-to-end proof of a migration)."""
    path = Path(image_path)
    with _open_image(path, writable=False) as (fd, size):
        _check_image_size(path, size, state)
        m = _Mapping(fd, size, writable=False)
        try:
            return _oracle(m, state)
        finally:
            m.close()


def _infer_state(m: _Mapping, npages: int, page_size: int) -> tuple[int, int] | None:
    """(position, value & 255) of an image the workload left behind, or None.

    The workload leaves one step: a run of v+1 then a run of v. Binary search finds it in
    log(npages) reads; the caller confirms the whole image with the native oracle.
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


# --------------------------------------------------------------------------- image


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
    _check_page_size(page_size)
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
    zeroed = native.ffi.new("uint32_t *")
    odd = range(page_size, chunk, 2 * page_size)
    odd_offsets = native.ffi.new("uint64_t[]", list(odd)) if half else None
    offset = 0
    while offset < size:
        n = min(chunk, size - offset)
        buf = bytearray(rng.randbytes(n))
        # The oracle reads byte 0 only; it must start at 0 on every page.
        buf[::page_size] = bytes(n // page_size)
        if odd_offsets is not None:
            with native.ffi.from_buffer(buf) as cbuf:
                rc = native.lib.zc_zero_pages(
                    int(native.ffi.cast("uintptr_t", cbuf)),
                    n,
                    odd_offsets,
                    (n // page_size) // 2,
                    page_size,
                    native.ffi.NULL,
                    zeroed,
                )
            if rc:
                raise GuestError(f"zeroing odd pages failed: {os.strerror(rc)}")
        view = memoryview(buf)
        pos = offset
        while view:
            written = os.pwrite(fd, view, pos)
            view = view[written:]
            pos += written
        offset += n


# --------------------------------------------------------------------------- the guest


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


def _read_control_header(path: Path) -> list[int] | None:
    try:
        with open(path, "rb") as f:
            head = f.read(CONTROL_SIZE)
    except OSError:
        return None
    if len(head) < CONTROL_SIZE:
        return None
    return list(memoryview(head).cast("Q")[: _F_HEARTBEAT + 1])


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
    _check_page_size(page_size)
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
    with _open_image(path, writable=True) as (fd, nbytes):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            head = _read_control_header(control_path(path))
            who = f" (pid {head[_F_PID]})" if head and head[_F_MAGIC] == CONTROL_MAGIC else ""
            raise GuestError(
                f"another guest{who} is already running on {path}; stop it first"
            ) from None
        if nbytes == 0 or nbytes % page_size:
            raise GuestError(
                f"image {path} has {nbytes} bytes, not a positive multiple of the page size "
                f"{page_size}"
            )
        npages = nbytes // page_size
        m = _Mapping(fd, nbytes, writable=True)
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
    path: Path, m: _Mapping, npages: int, page_size: int, resume: DeviceState | None
) -> DeviceState:
    if resume is not None:
        _check_image_size(path, m.size, resume)
        verdict = _oracle(m, resume)
        if not verdict.ok:
            raise GuestError(
                f"refusing to resume the guest on {path}: oracle {verdict.message} "
                f"(device state: step at page {resume.position}, value {resume.value})"
            )
        return resume
    inferred = _infer_state(m, npages, page_size)
    guess = None
    if inferred is not None:
        pos, byte = inferred
        guess = DeviceState(npages=npages, page_size=page_size, position=pos, value=byte, touched=0)
    if guess is None or not _oracle(m, guess).ok:
        raise GuestError(
            f"image {path} does not hold the workload's pattern (byte 0 of the pages must "
            "step once from v+1 to v): recreate it, or resume it from a device state"
        )
    # A previous guest's control file keeps the full pass counter that byte 0 wraps away.
    head = _read_control_header(control_path(path))
    if (
        head is not None
        and head[_F_MAGIC] == CONTROL_MAGIC
        and head[_F_NPAGES] == npages
        and head[_F_PAGE_SIZE] == page_size
        and head[_F_POSITION] == pos
        and head[_F_VALUE] & 0xFF == byte
    ):
        return DeviceState(
            npages=npages,
            page_size=page_size,
            position=pos,
            value=head[_F_VALUE],
            touched=head[_F_TOUCHED],
        )
    return guess


@dataclass
class _Guest:
    path: Path
    image: _Mapping
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
        self.ctl = self.control.u64_view(0, _F_HEARTBEAT + 1)
        self.bm_address = self.control.address + BITMAP_OFFSET
        self.bm = native.ffi.cast("uint64_t *", self.bm_address)

    def _create_control(self) -> _Mapping:
        path = control_path(self.path)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        size = CONTROL_SIZE + 8 * bitmap_words(self.npages)
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
                m = _Mapping(fd, size, writable=True)
            finally:
                os.close(fd)
            ctl = m.u64_view(0, _F_HEARTBEAT + 1)
            ctl[_F_VERSION] = CONTROL_VERSION
            ctl[_F_PID] = os.getpid()
            ctl[_F_NPAGES] = self.npages
            ctl[_F_PAGE_SIZE] = self.page_size
            ctl[_F_STATE] = GuestState.STARTING
            ctl[_F_REQUEST] = GuestRequest.NONE
            self._publish(ctl)
            ctl[_F_DIRTY_RATE] = self.dirty_rate
            ctl[_F_HEARTBEAT] = time.monotonic_ns()
            ctl[_F_MAGIC] = CONTROL_MAGIC
            # Renamed into place complete, so an opener never sees a half-written header.
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise GuestError(f"cannot create control file {path}: {exc.strerror}") from exc
        return m

    def _publish(self, ctl: memoryview) -> None:
        ctl[_F_POSITION] = self.position
        ctl[_F_VALUE] = self.value & _U64
        ctl[_F_TOUCHED] = self.touched & _U64

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop = True

    def run(self, ready: Callable[[], None] | None) -> DeviceState:
        handlers: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self.ctl[_F_STATE] = GuestState.RUNNING
            if ready is not None:
                ready()
            self._loop()
        finally:
            self._publish(self.ctl)
            # Exited is published only once the image is flushed, so "exited" means the
            # image file holds everything.
            self.image.mm.flush()
            self.ctl[_F_STATE] = GuestState.EXITED
            self.control.mm.flush()
            for signum, old in handlers.items():
                signal.signal(signum, old)
        return DeviceState(
            npages=self.npages,
            page_size=self.page_size,
            position=self.position,
            value=self.value & _U64,
            touched=self.touched & _U64,
        )

    def _loop(self) -> None:
        ctl = self.ctl
        lib = native.lib
        base = self.image.address
        npages, page_size = self.npages, self.page_size
        page_credit = page_size * _NS_PER_S
        credit = 0  # bytes x ns of dirtying owed but not yet turned into whole pages
        chunk = 256  # pages per call when unlimited, adapted to about one tick
        last = time.monotonic_ns()
        next_tick = last
        while not self._stop:
            request = ctl[_F_REQUEST]
            if request == GuestRequest.EXIT:
                return
            if request == GuestRequest.PAUSE:
                if not self._paused():
                    return
                # No credit for the time spent paused.
                last = next_tick = time.monotonic_ns()
                continue
            rate = ctl[_F_DIRTY_RATE]
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
                self.position = lib.zc_guest_touch(base, self.bm, npages, page_size, pos, count)
                # Every wrap to page 0 completes a pass.
                self.value += (pos + count) // npages
                self.touched += count
                self._publish(ctl)
            after = time.monotonic_ns()
            ctl[_F_HEARTBEAT] = after
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
        ctl[_F_HEARTBEAT] = time.monotonic_ns()
        ctl[_F_STATE] = GuestState.PAUSED
        while not self._stop:
            request = ctl[_F_REQUEST]
            if request == GuestRequest.EXIT:
                return False
            if request != GuestRequest.PAUSE:
                ctl[_F_STATE] = GuestState.RUNNING
                return True
            ctl[_F_HEARTBEAT] = time.monotonic_ns()
            time.sleep(_PAUSE_POLL_S)
        return False

    def close(self) -> None:
        self.ctl.release()
        self.control.close()


# --------------------------------------------------------------------------- control


class GuestControl:
    """The migration's handle on a running guest, through its control file."""

    def __init__(self, image: Path, mapping: _Mapping) -> None:
        self.image = image
        self._m: _Mapping | None = mapping
        self._ctl = mapping.u64_view(0, _F_HEARTBEAT + 1)
        self._npages = self._ctl[_F_NPAGES]
        self._page_size = self._ctl[_F_PAGE_SIZE]
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
            if fields[_F_MAGIC] != CONTROL_MAGIC:
                raise GuestError(
                    f"{path} is not a guest control file (wrong magic); remove it and {start}"
                )
            if fields[_F_VERSION] != CONTROL_VERSION:
                raise GuestError(
                    f"{path} has control version {fields[_F_VERSION]}, expected "
                    f"{CONTROL_VERSION}: the guest and the migration are different versions"
                )
            pid, state = fields[_F_PID], fields[_F_STATE]
            if state == GuestState.EXITED or not _pid_alive(pid):
                raise GuestError(f"the guest (pid {pid}) on {image} is not running; {start}")
            npages, page_size = fields[_F_NPAGES], fields[_F_PAGE_SIZE]
            try:
                _check_page_size(page_size)
            except GuestError as exc:
                raise GuestError(f"{path}: {exc}") from None
            size = CONTROL_SIZE + 8 * bitmap_words(npages)
            if npages < 1 or os.fstat(fd).st_size < size:
                raise GuestError(f"{path} is truncated: {npages} pages need {size} bytes")
            mapping = _Mapping(fd, size, writable=True)
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
        return self._field(_F_PID)

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
        raw = self._field(_F_STATE)
        try:
            return GuestState(raw)
        except ValueError:
            raise GuestError(f"guest control block holds unknown state {raw}") from None

    @property
    def position(self) -> int:
        """Next page to touch; exact only while paused."""
        return self._field(_F_POSITION)

    @property
    def value(self) -> int:
        return self._field(_F_VALUE)

    @property
    def touched(self) -> int:
        return self._field(_F_TOUCHED)

    @property
    def heartbeat_age(self) -> float:
        """Seconds since the guest last ticked (CLOCK_MONOTONIC is system-wide)."""
        return (time.monotonic_ns() - self._field(_F_HEARTBEAT)) / _NS_PER_S

    @property
    def dirty_rate(self) -> int:
        return self._field(_F_DIRTY_RATE)

    @dirty_rate.setter
    def dirty_rate(self, rate: int) -> None:
        if type(rate) is not int or not 0 <= rate <= _U64:
            raise GuestError(f"dirty rate must be a non-negative integer, got {rate!r}")
        self._require_open()
        self._ctl[_F_DIRTY_RATE] = rate

    @property
    def bitmap(self) -> memoryview:
        """The dirty bitmap words, writable (format "Q"). Release anything built on it
        (ffi.from_buffer, casts) before close()."""
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
            position=self._field(_F_POSITION),
            value=self._field(_F_VALUE),
            touched=self._field(_F_TOUCHED),
        )

    def _request(self, request: GuestRequest) -> None:
        self._require_open()
        self._ctl[_F_REQUEST] = request

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
