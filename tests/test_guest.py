"""The guest stand-in: real guest processes on real mmap'd images, the dirty bitmap, pause
and resume, the oracle, the device state from the network, and the `guest` command."""

from __future__ import annotations

import contextlib
import json
import mmap
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.child_output import DIE_WITH_PARENT, ChildOutput
from zcmigrate import ZcmigrateError, native
from zcmigrate.migrate.cli.guest import guest_command
from zcmigrate.migrate.guest import (
    CONTROL_FIELDS,
    CONTROL_SIZE,
    DeviceState,
    GuestControl,
    GuestError,
    GuestState,
    check_oracle,
    create_image,
    read_device_state,
    run_guest,
    write_device_state,
)
from zcmigrate.migrate.imagefiles import control_path, state_path

PAGE = 4096
WAIT_S = 10.0


# --------------------------------------------------------------------------- helpers


def _wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def heartbeat_at(ctl: GuestControl) -> float:
    """When the guest's loop last ticked, on this process's time.monotonic() clock.

    A few microseconds late at most (the age is taken just before the clock is read)."""
    return time.monotonic() - ctl.heartbeat_age


def _wait_for_ticks(ctl: GuestControl, ticks: int = 2, timeout: float = WAIT_S) -> None:
    """Until the guest's loop has ticked `ticks` times after this call began: whatever was
    written to the control file before the call, the loop has read by the second tick
    (that tick's pass began after the first one ended)."""
    deadline = time.monotonic() + timeout
    since = time.monotonic()
    for n in range(ticks):
        # 0.1 ms past `since`: heartbeat_at may be a few microseconds late.
        while (beat := heartbeat_at(ctl)) <= since + 1e-4:
            if time.monotonic() > deadline:
                raise AssertionError(f"the guest ticked {n} times in {timeout} s, not {ticks}")
            time.sleep(0.001)
        since = beat


@contextlib.contextmanager
def guest_process(image: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A `zcmigrate guest` process, once it has printed its "guest running" line.

    Yields the process and everything it printed up to that line.
    """
    proc = subprocess.Popen(
        [*DIE_WITH_PARENT, sys.executable, "-m", "zcmigrate", "guest", str(image), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        lines = ChildOutput(proc).wait_for(
            "stdout", lambda line: line.startswith("guest running:"), "its 'guest running:' line",
            WAIT_S)
        yield proc, "".join(f"{line}\n" for line in lines)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=WAIT_S)


@contextlib.contextmanager
def guest_thread(image: Path, **kwargs: object) -> Iterator[GuestControl]:
    """run_guest in a thread of this process (no signal handlers there), for speed."""
    ready = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run_guest(image, ready=ready.set, **kwargs)  # type: ignore[arg-type]
        except BaseException as exc:  # handed to the test thread below
            errors.append(exc)
            ready.set()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    assert ready.wait(WAIT_S), "guest thread did not start"
    if errors:
        raise errors[0]
    ctl = GuestControl.open(image)
    try:
        yield ctl
    finally:
        with contextlib.suppress(GuestError):
            ctl.request_exit()
        t.join(WAIT_S)
        ctl.close()
    assert not t.is_alive()
    if errors:
        raise errors[0]


def fetch_clear(ctl: GuestControl) -> tuple[int, list[int]]:
    """(dirty page count, page numbers) from the native fetch-and-clear, as a sender does."""
    out = native.ffi.new("uint64_t[]", ctl.nwords)
    bm = native.ffi.cast("uint64_t *", ctl.bitmap_address)
    n = native.lib.zc_bitmap_fetch_clear(bm, ctl.nwords, out, ctl.nwords)
    offsets = native.ffi.new("uint64_t[]", max(n, 1))
    k = native.lib.zc_bitmap_offsets(out, ctl.npages, ctl.page_size, offsets, max(n, 1))
    assert k == n
    return n, [offsets[i] // ctl.page_size for i in range(k)]


def advance(image: Path, npages: int, count: int) -> None:
    """Put the workload's pattern of `count` page writes from a fresh image into it."""
    bm = native.ffi.new("uint64_t[]", (npages + 63) // 64)
    with open(image, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        buf = native.ffi.from_buffer(mm)
        try:
            addr = int(native.ffi.cast("uintptr_t", buf))
            assert native.lib.zc_guest_touch(addr, bm, npages, PAGE, 0, count) >= 0
        finally:
            native.ffi.release(buf)


def poke(image: Path, page: int, value: int) -> None:
    with open(image, "r+b") as f:
        f.seek(page * PAGE)
        f.write(bytes([value]))


def state_at(npages: int, position: int, value: int) -> DeviceState:
    return DeviceState(
        npages=npages,
        page_size=PAGE,
        position=position,
        value=value,
        touched=value * npages + position,
    )


@pytest.fixture
def stepped_image(tmp_path: Path) -> tuple[Path, DeviceState]:
    """A 256-page image as the workload leaves it after 7 passes and 100 pages."""
    image = tmp_path / "img"
    create_image(image, 256 * PAGE, PAGE, "zero")
    state = state_at(256, 100, 7)
    advance(image, 256, state.touched)
    return image, state


# --------------------------------------------------------------------------- a real guest


def test_guest_process_dirties_pages_at_its_rate_and_fetch_clear_returns_them(
    tmp_path: Path,
) -> None:
    image = tmp_path / "img"
    with guest_process(image, "--size", "4M", "--dirty-rate", "4M") as (proc, out):
        assert f"guest running: pid={proc.pid} image={image} pages=1024 dirty-rate=4.0MiB/s" in out
        with GuestControl.open(image) as ctl:
            assert (ctl.pid, ctl.npages, ctl.page_size, ctl.nwords) == (proc.pid, 1024, PAGE, 16)
            assert ctl.state == GuestState.RUNNING
            assert ctl.dirty_rate == 4 << 20
            _wait_until(lambda: any(ctl.bitmap), "dirty bits")
            n, pages = fetch_clear(ctl)
            assert n > 0 and all(0 <= p < 1024 for p in pages)

            # 4 MiB/s of 4 KiB pages: 1024 pages a second, give or take a busy machine.
            t0, before = time.monotonic(), ctl.touched
            time.sleep(0.5)
            rate = (ctl.touched - before) / (time.monotonic() - t0)
            assert 1024 * 0.5 < rate < 1024 * 1.5

            # The rate can be changed under a running guest: once its loop has seen the new
            # rate (two ticks after the write, not a sleep that hopes it did), 64 KiB/s is
            # 16 pages a second, plus at most the carry of one page and the page in hand.
            ctl.dirty_rate = 64 << 10
            _wait_for_ticks(ctl)
            t0, before = time.monotonic(), ctl.touched
            time.sleep(0.25)
            after, elapsed = ctl.touched, time.monotonic() - t0
            assert after - before <= 16 * elapsed + 2, (after - before, elapsed)

            # One guest per image.
            second = subprocess.run(
                [sys.executable, "-m", "zcmigrate", "guest", str(image)],
                capture_output=True,
                timeout=WAIT_S,
            )
            assert second.returncode == 1
            assert f"another guest (pid {proc.pid}) is already running" in second.stderr.decode()


def test_pause_freezes_image_and_bitmap_and_the_state_satisfies_the_oracle(
    tmp_path: Path,
) -> None:
    image = tmp_path / "img"
    with (
        guest_process(image, "--size", "4M", "--dirty-rate", "16M", "--fill", "half") as (proc, _),
        GuestControl.open(image) as ctl,
    ):
        _wait_until(lambda: ctl.value >= 1, "a full pass")
        state = ctl.pause(timeout=2.0)
        assert ctl.state == GuestState.PAUSED
        assert state.npages == 1024 and state.value >= 1
        assert check_oracle(image, state).ok

        fetch_clear(ctl)  # what was dirtied before the pause
        first = image.read_bytes()
        read_at = time.monotonic()
        # The paused loop still ticks (every 0.5 ms): once it has ticked 50 ms after the
        # read, a guest that went on writing while paused would have written.
        _wait_until(lambda: heartbeat_at(ctl) > read_at + 0.05, "a tick 50 ms into the pause")
        assert image.read_bytes() == first
        assert fetch_clear(ctl)[0] == 0
        assert ctl.device_state() == state

        ctl.resume()
        assert ctl.alive and ctl.state != GuestState.PAUSED
        _wait_until(lambda: ctl.touched > state.touched + 100, "progress after resume")
        n, pages = fetch_clear(ctl)
        assert n > 0 and state.position in pages

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT_S) == 0
        assert ctl.state == GuestState.EXITED
        final = ctl.device_state()
        assert check_oracle(image, final).ok
    with pytest.raises(GuestError, match="not running"):
        GuestControl.open(image)


def test_pause_of_a_dead_guest_fails_and_names_it(tmp_path: Path) -> None:
    image = tmp_path / "img"
    with (
        guest_process(image, "--size", "1M", "--dirty-rate", "1M") as (proc, _),
        GuestControl.open(image) as ctl,
    ):
        proc.kill()
        proc.wait(timeout=WAIT_S)
        with pytest.raises(GuestError, match=f"pid {proc.pid}.*died"):
            ctl.pause(timeout=2.0)


def test_resume_from_a_state_continues_from_its_position(
    stepped_image: tuple[Path, DeviceState],
) -> None:
    image, state = stepped_image
    write_device_state(image, state)
    assert read_device_state(image) == state
    # 64 KiB/s is 16 pages a second: the step moves slowly enough to see where it started.
    with (
        guest_process(image, "--resume", "--dirty-rate", "64K") as (proc, out),
        GuestControl.open(image) as ctl,
    ):
        assert out.splitlines()[0] == "oracle: ok: 256 pages, step at page 100, value 7"
        now = ctl.pause(timeout=2.0)
        assert now.value == 7
        assert 100 <= now.position <= 100 + 32
        assert now.touched == state.touched + now.position - 100
        assert check_oracle(image, now).ok
        ctl.resume()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=WAIT_S) == 0


def test_guest_on_an_existing_image_continues_from_its_step(
    stepped_image: tuple[Path, DeviceState],
) -> None:
    image, _ = stepped_image
    with guest_thread(image, dirty_rate=0) as ctl:
        now = ctl.pause(timeout=2.0)
        # The full pass counter is gone with no control file; byte 0 keeps value mod 256.
        assert now.value >= 7 and now.touched > 0
        assert check_oracle(image, now).ok
        ctl.resume()
        ctl.request_exit(timeout=2.0)
        assert ctl.state == GuestState.EXITED
    # The next guest takes the full counter from the control file the last one left.
    with guest_thread(image, dirty_rate=64 << 10) as ctl:
        assert ctl.pause(timeout=2.0).value >= now.value


def test_run_guest_refuses_a_resume_that_fails_the_oracle(
    stepped_image: tuple[Path, DeviceState],
) -> None:
    image, state = stepped_image
    poke(image, 17, 99)
    with pytest.raises(GuestError, match="page 17 holds 99, expected 8"):
        run_guest(image, dirty_rate=0, resume=state)
    assert not control_path(image).exists()


def test_run_guest_refuses_to_overwrite_an_image_of_another_size(tmp_path: Path) -> None:
    image = tmp_path / "img"
    create_image(image, 8 * PAGE, PAGE, "zero")
    with pytest.raises(GuestError, match="refusing to overwrite"):
        run_guest(image, dirty_rate=0, size=16 * PAGE)
    with pytest.raises(GuestError, match="does not exist"):
        run_guest(tmp_path / "missing", dirty_rate=0)


def test_run_guest_refuses_an_image_without_the_workload_pattern(tmp_path: Path) -> None:
    image = tmp_path / "img"
    create_image(image, 8 * PAGE, PAGE, "zero")
    poke(image, 3, 1)  # a step back up after the step down
    poke(image, 0, 1)
    with pytest.raises(GuestError, match="pattern"):
        run_guest(image, dirty_rate=0)


# --------------------------------------------------------------------------- control file


def test_open_without_a_guest_says_how_to_start_one(tmp_path: Path) -> None:
    with pytest.raises(GuestError, match="zcmigrate guest"):
        GuestControl.open(tmp_path / "img")


def test_open_rejects_a_control_file_with_the_wrong_magic(tmp_path: Path) -> None:
    control_path(tmp_path / "img").write_bytes(bytes(CONTROL_SIZE + 8))
    with pytest.raises(GuestError, match="wrong magic"):
        GuestControl.open(tmp_path / "img")


def test_control_fields_are_at_their_documented_offsets() -> None:
    assert list(CONTROL_FIELDS.values()) == list(range(0, 192, 8))
    assert CONTROL_FIELDS["heartbeat"] == 88
    assert CONTROL_FIELDS["lease_mode"] == 112
    assert CONTROL_FIELDS["throttle"] == 144
    assert CONTROL_FIELDS["postcopy"] == 168


# --------------------------------------------------------------------------- the oracle


def test_oracle_accepts_the_workload_pattern(stepped_image: tuple[Path, DeviceState]) -> None:
    image, state = stepped_image
    verdict = check_oracle(image, state)
    assert verdict.ok and verdict.first_bad_page is None
    assert verdict.message == "ok: 256 pages, step at page 100, value 7"


@pytest.mark.parametrize(
    ("page", "poked", "expected"),
    [(17, 5, 8), (99, 7, 8), (100, 8, 7), (255, 0, 7)],
)
def test_oracle_fails_on_a_tampered_page_and_names_it(
    stepped_image: tuple[Path, DeviceState], page: int, poked: int, expected: int
) -> None:
    image, state = stepped_image
    poke(image, page, poked)
    verdict = check_oracle(image, state)
    assert not verdict.ok
    assert (verdict.first_bad_page, verdict.found, verdict.expected) == (page, poked, expected)
    assert verdict.message == f"FAILED: page {page} holds {poked}, expected {expected}"


def test_oracle_refuses_an_image_of_the_wrong_size(
    stepped_image: tuple[Path, DeviceState],
) -> None:
    image, _ = stepped_image
    with pytest.raises(GuestError, match="device state describes 512 pages"):
        check_oracle(image, state_at(512, 0, 0))


# --------------------------------------------------------------------------- images


def test_create_image_fills(tmp_path: Path) -> None:
    n = 64
    for fill in ("zero", "random", "half"):
        create_image(tmp_path / fill, n * PAGE, PAGE, fill, seed=1)
    zero = (tmp_path / "zero").read_bytes()
    rand = (tmp_path / "random").read_bytes()
    half = (tmp_path / "half").read_bytes()
    assert zero == bytes(n * PAGE)
    assert rand[::PAGE] == bytes(n) and half[::PAGE] == bytes(n)
    assert all(rand[p * PAGE + 1 : (p + 1) * PAGE].count(0) < 64 for p in range(n))
    for p in range(n):
        body = half[p * PAGE + 1 : (p + 1) * PAGE]
        assert (body.count(0) < 64) if p % 2 == 0 else (body == bytes(PAGE - 1))
    with pytest.raises(GuestError, match="already exists"):
        create_image(tmp_path / "zero", n * PAGE, PAGE, "zero")
    with pytest.raises(GuestError, match="multiple of the page size"):
        create_image(tmp_path / "odd", PAGE + 1, PAGE, "zero")
    with pytest.raises(GuestError, match="power of two"):
        create_image(tmp_path / "odd", 3000 * 2, 3000, "zero")


# --------------------------------------------------------------------------- device state


def test_device_state_round_trips_as_compact_sorted_json() -> None:
    state = state_at(256, 100, 7)
    data = state.encode()
    assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode()
    assert json.loads(data)["kind"] == "zcmigrate-guest"
    assert DeviceState.decode(data) == state


def _encoded(**changes: object) -> bytes:
    obj: dict[str, object] = json.loads(state_at(256, 100, 7).encode())
    obj.update(changes)
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "JSON"),
        (b"\xff\xfe", "UTF-8"),
        (b"[1, 2]", "object"),
        (b"[" * 5000, "JSON|bytes"),
        (b"{}", "missing"),
        (_encoded(position=256), "position 256 is not below npages 256"),
        (_encoded(position=-1), "out of range"),
        (_encoded(npages=0), "npages"),
        (_encoded(page_size=4095), "power of two"),
        (_encoded(value=True), "integer"),
        (_encoded(value=7.0), "integer"),
        (_encoded(touched=1 << 64), "out of range"),
        (_encoded(kind="qemu"), "kind"),
        (_encoded(version=2), "version 2"),
        (_encoded(extra=1), "unexpected"),
        (b'{"position": 1, "position": 2}', "duplicate"),
        (b'{"value": NaN}', "."),
    ],
)
def test_device_state_decode_rejects_malformed_input(data: bytes, match: str) -> None:
    with pytest.raises(GuestError, match=match):
        DeviceState.decode(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_device_state_decode_of_random_bytes_raises_only_guest_error(data: bytes) -> None:
    with contextlib.suppress(GuestError):
        DeviceState.decode(data)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            k: _json | st.integers(min_value=-1, max_value=1 << 65)
            for k in ("kind", "version", "npages", "page_size", "position", "value", "touched")
        },
    )
)
def test_device_state_decode_of_json_objects_raises_only_guest_error(
    obj: dict[str, object],
) -> None:
    try:
        state = DeviceState.decode(json.dumps(obj).encode())
    except GuestError:
        return
    assert 0 <= state.position < state.npages


def test_device_state_file_is_replaced_atomically(tmp_path: Path) -> None:
    image = tmp_path / "img"
    with pytest.raises(GuestError, match="no device state"):
        read_device_state(image)
    write_device_state(image, state_at(256, 1, 1))
    write_device_state(image, state_at(256, 2, 2))
    assert read_device_state(image).position == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.state"]
    state_path(image).write_bytes(b"{")
    with pytest.raises(GuestError, match=r"img\.state"):
        read_device_state(image)


# --------------------------------------------------------------------------- the command


def test_check_command_prints_the_verdict_and_exits_0_or_3(
    stepped_image: tuple[Path, DeviceState],
) -> None:
    image, state = stepped_image
    runner = CliRunner()
    missing = runner.invoke(guest_command, [str(image), "--check"])
    assert missing.exit_code == 1 and "no device state" in missing.stderr

    write_device_state(image, state)
    ok = runner.invoke(guest_command, [str(image), "--check"])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout == "oracle: ok: 256 pages, step at page 100, value 7\n"

    poke(image, 17, 3)
    bad = runner.invoke(guest_command, [str(image)], env={"ZCMIGRATE_GUEST_CHECK": "1"})
    assert bad.exit_code == 3
    assert bad.stdout == "oracle: FAILED: page 17 holds 3, expected 8\n"

    resumed = runner.invoke(guest_command, [str(image), "--resume"])
    assert resumed.exit_code == 3
    assert "oracle: FAILED: page 17 holds 3, expected 8" in resumed.stdout
    assert "refusing to resume" in resumed.stderr
    assert not control_path(image).exists()


def test_command_rejects_bad_options_with_usage_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    image = str(tmp_path / "img")
    bad_size = runner.invoke(guest_command, [image, "--size", "12Q"])
    assert bad_size.exit_code == 2 and "invalid size '12Q'" in bad_size.stderr
    bad_env = runner.invoke(guest_command, [image], env={"ZCMIGRATE_DIRTY_RATE": "fast"})
    assert bad_env.exit_code == 2 and "invalid bandwidth" in bad_env.stderr
    both = runner.invoke(guest_command, [image, "--check", "--resume"])
    assert both.exit_code == 2
    assert "ZCMIGRATE_GUEST_SIZE" in runner.invoke(guest_command, ["--help"]).stdout


def test_guest_errors_are_zcmigrate_errors_with_the_generic_exit_code() -> None:
    assert issubclass(GuestError, ZcmigrateError)
    assert GuestError("x").exit_code == 1


def test_the_layout_table_and_the_fields_agree() -> None:
    """The offset table in layout.py is the contract readers see: it must say what the
    code does, row for row (a new field is one enum member and one row)."""
    from zcmigrate.migrate.guest import layout

    rows = re.findall(r"^#\s+(\d+)\s+([a-z_]+)\s", Path(layout.__file__).read_text(), re.M)
    table = {name: int(offset) for offset, name in rows}
    assert table.pop("bitmap") == layout.BITMAP_OFFSET
    assert table == CONTROL_FIELDS
    assert len(CONTROL_FIELDS) == layout.HEADER_WORDS
