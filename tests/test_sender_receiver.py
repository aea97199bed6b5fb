"""The sender and receiver pools end to end over real loopback TCP: a whole image arrives
byte-identical, zero pages are detected and counted, and sync() flushes every channel.

Also home of the pool set-up helpers the other pool tests import.
"""

from __future__ import annotations

import mmap
import os
import random
import threading
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pytest

from tests.conftest import tcp_pair
from tests.thread_wait import wait_until_blocked
from zcmigrate.channel.aead import SessionKeys
from zcmigrate.channel.zcsocket import Channel
from zcmigrate.multifd.exiting import Exiting
from zcmigrate.multifd.receiver import ReceiverPool, accept_data_channel
from zcmigrate.multifd.sender import SenderPool
from zcmigrate.multifd.stats import PoolStats
from zcmigrate.multifd.wire import InitTracker, WireContext

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE = 4096
CHUNK = 16 * MiB
UUID = bytes(range(16))
T = TypeVar("T")

# --------------------------------------------------------------------------- helpers


def pool_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("multifd-")]


@pytest.fixture(autouse=True)
def _no_pool_thread_survives() -> Iterator[None]:
    yield
    assert pool_threads() == []


class Background(Generic[T]):
    """Run fn in a thread (a destination's coordinator, say); result() joins with a timeout."""

    def __init__(self, fn: Callable[[], T], name: str = "test-background") -> None:
        self._value: list[T] = []
        self._error: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            self._value.append(fn())
        except BaseException as e:
            self._error.append(e)

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def result(self, timeout: float = 30.0) -> T:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"background call still running after {timeout} s"
        if self._error:
            raise self._error[0]
        return self._value[0]

    def exception(self, timeout: float = 30.0) -> BaseException | None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"background call still running after {timeout} s"
        return self._error[0] if self._error else None


@dataclass
class Pools:
    """A sender pool and a receiver pool joined by N real loopback TCP channel pairs."""

    ctx: WireContext
    sender: SenderPool
    receiver: ReceiverPool
    tx: list[Channel]
    rx: list[Channel]  # index == channel id

    def close(self) -> None:
        self.sender.close(timeout=10)
        self.receiver.close()


def make_pools(
    ctx: WireContext,
    src: Any,
    dst: Any,
    *,
    zero_copy: bool,
    known_zero: bool = True,
    sender_hook: Callable[[str, int], None] | None = None,
    receiver_hook: Callable[[str, int], None] | None = None,
    receiver_exiting: Exiting | str | None = None,
    keys: SessionKeys | None = None,
    **sender_options: Any,
) -> Pools:
    """receiver_exiting="sender": both pools share the sender's Exiting (one process).
    keys: a sealed context's session, for both pools (the sender's sealers, the
    receiver's openers)."""
    pairs = [tcp_pair(zero_copy=zero_copy) for _ in range(ctx.channels)]
    tx = [p[0] for p in pairs]
    sender = SenderPool(tx, ctx, src, zero_copy=zero_copy, hook=sender_hook, keys=keys,
                        **sender_options)
    sender.start()
    tracker = InitTracker(ctx)
    rx: list[Channel | None] = [None] * ctx.channels
    # Accept in reverse: the destination must order channels by the id in the init record.
    for _, r in reversed(pairs):
        rx[accept_data_channel(r, tracker, timeout=5)] = r
    assert tracker.complete
    channels = [c for c in rx if c is not None]
    if receiver_exiting == "sender":
        receiver_exiting = sender.exiting
    assert not isinstance(receiver_exiting, str)
    receiver = ReceiverPool(channels, ctx, dst, known_zero=known_zero, hook=receiver_hook,
                            exiting=receiver_exiting, keys=keys)
    receiver.start()
    return Pools(ctx, sender, receiver, tx, channels)


def assert_adds_up(stats: PoolStats) -> None:
    for name in ("packets", "bytes", "normal_pages", "zero_pages", "syncs", "zero_copy_queued",
                 "zero_copy_completed", "zero_copy_copied", "enobufs_retries"):
        assert sum(getattr(c, name) for c in stats.channels) == getattr(stats, name), name
    assert [c.id for c in stats.channels] == list(range(len(stats.channels)))


def assert_identical(a: Any, b: Any, size: int) -> None:
    va, vb = memoryview(a), memoryview(b)
    for off in range(0, size, CHUNK):
        if va[off:off + CHUNK] != vb[off:off + CHUNK]:
            bad = next(p for p in range(off, off + CHUNK, PAGE)
                       if va[p:p + PAGE] != vb[p:p + PAGE])
            pytest.fail(f"destination differs from the source at page {bad // PAGE}")


# --------------------------------------------------------------------------- the image


@dataclass
class SourceImage:
    """A random image with runs of zero pages; `zero[i]` is 1 where page i is all zero."""

    mm: mmap.mmap
    zero: bytearray
    rng: random.Random = field(default_factory=lambda: random.Random(0x5EED))

    def set_pages(self, first: int, count: int, *, zero: bool) -> None:
        data = bytes(count * PAGE) if zero else os.urandom(count * PAGE)
        self.mm[first * PAGE:(first + count) * PAGE] = data
        self.zero[first:first + count] = (b"\1" if zero else b"\0") * count


@pytest.fixture(scope="module")
def source() -> Iterator[SourceImage]:
    size = 1 * GiB
    mm = mmap.mmap(-1, size)
    # os.urandom 16 MiB at a time, each chunk a different rotation of a few random blocks:
    # every page is distinct (a misplaced page cannot go unnoticed) at a fraction of the
    # cost of 1 GiB of urandom.
    blocks = [os.urandom(CHUNK) for _ in range(4)]
    for i, off in enumerate(range(0, size, CHUNK)):
        b, k = blocks[i % 4], (i * 4099 + 8) % CHUNK
        mm[off:off + CHUNK] = b[k:] + b[:k]
    npages = size // PAGE
    zero = bytearray(npages)
    img = SourceImage(mm, zero)
    # 1/8 of the pages zero, in runs of 16 at a random place in every 128 pages.
    for block in range(0, npages, 128):
        img.set_pages(block + img.rng.randrange(0, 112), 16, zero=True)
    yield img
    mm.close()


def shuffled_batches(npages: int, rng: random.Random, batch: int = 1000) -> array[int]:
    """Every page once, in batches of consecutive pages sent in a shuffled order."""
    starts = list(range(0, npages, batch))
    rng.shuffle(starts)
    out = array("Q")
    for s in starts:
        out.extend(range(s * PAGE, min(s + batch, npages) * PAGE, PAGE))
    return out


def send_in_calls(pool: SenderPool, offsets: array[int], rng: random.Random) -> None:
    """send_pages in calls of uneven sizes, so jobs straddle calls and pages_alloc."""
    i = 0
    while i < len(offsets):
        n = rng.randrange(1, 40_000)
        pool.send_pages(offsets[i:i + n])
        i += n


# --------------------------------------------------------------------------- the test

# 1 GiB in every configuration: the module takes about 25 s on two cores (about 3 s per
# configuration, most of it the fresh destination faulting its pages in), well inside the
# one-minute budget, so no configuration needed a smaller image.
CONFIGS = [
    pytest.param(1, True, 1 * GiB, id="1ch-zerocopy-1GiB"),
    pytest.param(1, False, 1 * GiB, id="1ch-copy-1GiB"),
    pytest.param(2, False, 1 * GiB, id="2ch-copy-1GiB"),
    pytest.param(2, True, 1 * GiB, id="2ch-zerocopy-1GiB"),
    pytest.param(4, True, 1 * GiB, id="4ch-zerocopy-1GiB"),
    pytest.param(4, False, 1 * GiB, id="4ch-copy-1GiB"),
]


@pytest.mark.parametrize(("channels", "zero_copy", "size"), CONFIGS)
def test_image_arrives_identical_over_two_rounds(
    source: SourceImage, channels: int, zero_copy: bool, size: int
) -> None:
    npages = size // PAGE
    ctx = WireContext(uuid=UUID, channels=channels, page_size=PAGE, image_size=size,
                      pages_alloc=512)
    src = memoryview(source.mm)[:size]
    dst = mmap.mmap(-1, size)  # fresh: every page reads as zero, so known_zero holds
    pools = make_pools(ctx, src, dst, zero_copy=zero_copy, known_zero=True)
    rng = random.Random(channels * 1000 + zero_copy)
    try:
        # Round 1: every page.
        coord = Background(lambda: pools.receiver.sync(timeout=60))
        offsets = shuffled_batches(npages, rng)
        zeros_1 = source.zero[:npages].count(1)
        send_in_calls(pools.sender, offsets, rng)
        res1 = pools.sender.sync(timeout=60)
        assert res1.sync_num == 1
        assert coord.result(60) == 1
        s1 = pools.sender.statistics()
        check_flushed(s1, zero_copy)
        if zero_copy:
            # Loopback always copies (seed 004): every channel's flush says so.
            assert res1.copied_channels == channels
        else:
            assert res1.copied_channels == 0

        # Round 2: a subset, changed first (new data, newly zero, zero made non-zero).
        changed: set[int] = set()
        while len(changed) < npages // 16:
            first = rng.randrange(0, npages - 64)
            count = rng.randrange(1, 64)
            source.set_pages(first, count, zero=rng.random() < 0.25)
            changed.update(range(first, first + count))
        subset = sorted(changed)
        rng.shuffle(subset)
        zeros_2 = sum(source.zero[p] for p in subset)
        assert 0 < zeros_2 < len(subset)
        coord = Background(lambda: pools.receiver.sync(timeout=60))
        send_in_calls(pools.sender, array("Q", (p * PAGE for p in subset)), rng)
        res2 = pools.sender.sync(timeout=60)
        assert res2.sync_num == 2
        assert coord.result(60) == 2

        sent = pools.sender.statistics()
        got = pools.receiver.statistics()
        check_flushed(sent, zero_copy)
        if zero_copy:
            busy = sum(1 for a, b in zip(s1.channels, sent.channels, strict=True)
                       if b.zero_copy_queued > a.zero_copy_queued)
            assert res2.copied_channels == busy
        assert_adds_up(sent)
        assert_adds_up(got)
        assert sent.zero_pages == zeros_1 + zeros_2
        assert sent.normal_pages + sent.zero_pages == npages + len(subset)
        assert all(c.syncs == 2 for c in sent.channels + got.channels)
        # Whatever a channel sent, its peer received: packets, pages and every wire byte.
        for a, b in zip(sent.channels, got.channels, strict=True):
            assert (a.packets, a.normal_pages, a.zero_pages, a.bytes) == (
                b.packets, b.normal_pages, b.zero_pages, b.bytes)
        assert sent.channels[0].packets > 0 and sent.jobs_queued == 0
        assert_identical(src, dst, size)
    finally:
        pools.close()
        del src
        dst.close()


def check_flushed(stats: PoolStats, zero_copy: bool) -> None:
    """Right after sync() returned: every zero-copy send of every channel has completed."""
    for c in stats.channels:
        if zero_copy:
            assert c.zero_copy_queued > 0
            assert c.zero_copy_queued == c.zero_copy_completed, f"channel {c.id}"
            assert c.zero_copy_copied == c.zero_copy_completed, f"channel {c.id}"
        else:
            assert c.zero_copy_queued == c.zero_copy_completed == c.zero_copy_copied == 0


def test_without_zero_page_detection_zero_pages_travel_as_data(source: SourceImage) -> None:
    size = 16 * MiB
    ctx = WireContext(uuid=UUID, channels=2, page_size=PAGE, image_size=size, pages_alloc=128)
    src = memoryview(source.mm)[:size]
    dst = mmap.mmap(-1, size)
    dst[:] = b"\xa5" * size  # not fresh: every page, zero or not, must be overwritten
    pools = make_pools(ctx, src, dst, zero_copy=False, known_zero=False,
                       zero_page_detection=False)
    try:
        coord = Background(lambda: pools.receiver.sync(timeout=30))
        pools.sender.send_pages(array("Q", range(0, size, PAGE)))
        pools.sender.sync(timeout=30)
        coord.result()
        st = pools.sender.statistics()
        assert st.zero_pages == 0 and st.normal_pages == size // PAGE
        assert_identical(src, dst, size)
    finally:
        pools.close()
        del src
        dst.close()


def test_zero_pages_overwrite_stale_data_without_known_zero(source: SourceImage) -> None:
    size = 16 * MiB
    ctx = WireContext(uuid=UUID, channels=2, page_size=PAGE, image_size=size, pages_alloc=64)
    src = memoryview(source.mm)[:size]
    dst = mmap.mmap(-1, size)
    dst[:] = b"\x5a" * size  # an old image: known_zero must be off, zero pages are written
    pools = make_pools(ctx, src, dst, zero_copy=True, known_zero=False)
    try:
        coord = Background(lambda: pools.receiver.sync(timeout=30))
        pools.sender.send_pages(array("Q", range(0, size, PAGE)))
        pools.sender.sync(timeout=30)
        coord.result()
        assert pools.receiver.statistics().zero_pages == source.zero[:size // PAGE].count(1) > 0
        assert_identical(src, dst, size)
    finally:
        pools.close()
        del src
        dst.close()


def test_send_pages_spreads_jobs_and_applies_backpressure(source: SourceImage) -> None:
    size = 64 * MiB
    ctx = WireContext(uuid=UUID, channels=4, page_size=PAGE, image_size=size, pages_alloc=16)
    src = memoryview(source.mm)[:size]
    dst = mmap.mmap(-1, size)
    release = threading.Event()

    def hold_first_packets(point: str, channel_id: int) -> None:
        if point == "send_packet":
            assert release.wait(10)

    pools = make_pools(ctx, src, dst, zero_copy=False, queue_depth=2,
                       sender_hook=hold_first_packets)
    try:
        coord = Background(lambda: pools.receiver.sync(timeout=30))
        sending = Background(lambda: pools.sender.send_pages(array("Q", range(0, size, PAGE))))
        # The workers hold their first jobs, so at most 4 + 4 x 2 of the 1024 jobs fit:
        # send_pages must block (backpressure) until they go on.
        wait_until_blocked(sending.thread, inside="SenderPool._dispatch", syscalls={"futex"})
        st = pools.sender.statistics()
        assert st.send_waits >= 1 and 0 < st.jobs_queued <= 4 * 2
        assert st.packets == 0
        release.set()
        sending.result(30)
        pools.sender.sync(timeout=30)
        coord.result()
        st = pools.sender.statistics()
        # The first four jobs went one to each channel (least loaded, ties to the lowest id).
        assert all(c.packets > 0 for c in st.channels)
        assert st.packets == size // PAGE // 16
        assert_identical(src, dst, size)
    finally:
        pools.close()
        del src
        dst.close()


def test_close_is_idempotent_and_closes_channels(source: SourceImage) -> None:
    size = 1 * MiB
    ctx = WireContext(uuid=UUID, channels=2, page_size=PAGE, image_size=size, pages_alloc=8)
    src = memoryview(source.mm)[:size]
    dst = mmap.mmap(-1, size)
    pools = make_pools(ctx, src, dst, zero_copy=False)
    pools.close()
    pools.close()
    assert pools.sender.error is None and pools.receiver.error is None
    assert all(ch.is_shut_down for ch in pools.tx + pools.rx)
    del src
    dst.close()
