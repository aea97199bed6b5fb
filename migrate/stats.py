"""Migration statistics under the names QEMU's query-migrate uses, and `info migrate` text.

The job feeds a StatsBuilder as it goes; snapshot() freezes it together with the worker
pool's per-channel numbers. The JSON layout that send, status and receive print is
spelled here (to_dict, channel_json; docs/operations.md, "JSON output"), and read back
here (from_dict). It knows no sockets, terminal or CLI.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from zcmigrate.migrate.state import State, StateMachine
from zcmigrate.multifd.stats import ChannelCounters


@dataclass(frozen=True, slots=True)
class MigrationStats:
    status: str
    total_time_ms: float
    setup_time_ms: float | None
    downtime_ms: float | None
    expected_downtime_ms: float | None
    transferred: int
    remaining: int
    total: int
    normal_pages: int
    normal_bytes: int
    zero_pages: int
    page_size: int
    dirty_sync_count: int
    dirty_pages_rate: float
    mbps: float
    dirty_sync_missed_zero_copy: int
    iteration: int
    live: bool
    error: str | None
    parameters: dict[str, Any] = field(default_factory=dict)
    channels: tuple[dict[str, int], ...] = ()
    cpu_throttle_percentage: int = 0  # auto-converge: share of the guest's time it sleeps

    @property
    def percent(self) -> float:
        """Share of the image's pages sent so far in the first pass (0..100)."""
        if not self.total:
            return 0.0
        return min(100.0, 100.0 * (self.total - self.remaining) / self.total)

    def to_dict(self) -> dict[str, Any]:
        """QEMU's query-migrate layout: times in ms, RAM figures under "ram", every key
        spelled with hyphens, the channels' counters too."""
        out: dict[str, Any] = {
            "status": self.status,
            "total-time": round(self.total_time_ms),
            "ram": {
                "transferred": self.transferred,
                "remaining": self.remaining,
                "total": self.total,
                "normal": self.normal_pages,
                "normal-bytes": self.normal_bytes,
                "zero-pages": self.zero_pages,
                "page-size": self.page_size,
                "dirty-sync-count": self.dirty_sync_count,
                "dirty-pages-rate": round(self.dirty_pages_rate),
                "mbps": round(self.mbps, 3),
                "dirty-sync-missed-zero-copy": self.dirty_sync_missed_zero_copy,
                "iterations": self.iteration,
            },
            "multifd": {"channels": [channel_json(c) for c in self.channels]},
            "parameters": self.parameters,
            "live": self.live,
        }
        if self.setup_time_ms is not None:
            out["setup-time"] = round(self.setup_time_ms)
        if self.downtime_ms is not None:
            out["downtime"] = round(self.downtime_ms, 1)
        if self.expected_downtime_ms is not None:
            out["expected-downtime"] = round(self.expected_downtime_ms, 1)
        if self.cpu_throttle_percentage:
            out["cpu-throttle-percentage"] = self.cpu_throttle_percentage
        if self.error:
            out["error-desc"] = self.error
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MigrationStats:
        """The statistics back from to_dict's layout (what `zcmigrate status` receives)."""
        ram = d["ram"]
        return cls(
            status=d["status"], total_time_ms=d["total-time"],
            setup_time_ms=d.get("setup-time"), downtime_ms=d.get("downtime"),
            expected_downtime_ms=d.get("expected-downtime"), transferred=ram["transferred"],
            remaining=ram["remaining"], total=ram["total"], normal_pages=ram["normal"],
            normal_bytes=ram["normal-bytes"], zero_pages=ram["zero-pages"],
            page_size=ram["page-size"], dirty_sync_count=ram["dirty-sync-count"],
            dirty_pages_rate=ram["dirty-pages-rate"], mbps=ram["mbps"],
            dirty_sync_missed_zero_copy=ram["dirty-sync-missed-zero-copy"],
            iteration=ram["iterations"], live=d["live"], error=d.get("error-desc"),
            parameters=d.get("parameters", {}),
            channels=tuple(channel_counters(c) for c in d["multifd"]["channels"]),
            cpu_throttle_percentage=d.get("cpu-throttle-percentage", 0),
        )

    def info_migrate(self) -> str:
        """The text of QEMU's HMP `info migrate`."""
        lines = [f"Migration status: {self.status}"]
        lines.append(f"total time: {self.total_time_ms:.0f} ms")
        if self.expected_downtime_ms is not None:
            lines.append(f"expected downtime: {self.expected_downtime_ms:.0f} ms")
        if self.downtime_ms is not None:
            lines.append(f"downtime: {self.downtime_ms:.1f} ms")
        if self.setup_time_ms is not None:
            lines.append(f"setup: {self.setup_time_ms:.0f} ms")
        kib = 1024
        lines += [
            f"transferred ram: {self.transferred // kib} kbytes",
            f"throughput: {self.mbps:.2f} mbps",
            f"remaining ram: {self.remaining // kib} kbytes",
            f"total ram: {self.total // kib} kbytes",
            f"zero pages: {self.zero_pages} pages",
            f"normal: {self.normal_pages} pages",
            f"normal bytes: {self.normal_bytes // kib} kbytes",
            f"dirty sync count: {self.dirty_sync_count}",
            f"page size: {self.page_size // kib} kbytes",
            f"dirty pages rate: {self.dirty_pages_rate:.0f} pages",
            f"zero-copy-send: dirty sync missed zero copy: {self.dirty_sync_missed_zero_copy}",
            f"iterations: {self.iteration}",
        ]
        if self.cpu_throttle_percentage:
            lines.append(f"cpu throttle percentage: {self.cpu_throttle_percentage}")
        for ch in self.channels:
            lines.append(
                "multifd channel {id}: packets {packets} bytes {bytes} normal {normal_pages} "
                "zero {zero_pages} syncs {syncs} zero-copy queued {zero_copy_queued} "
                "completed {zero_copy_completed} copied {zero_copy_copied}".format(**ch)
            )
        if self.error:
            lines.append(f"error: {self.error}")
        return "\n".join(lines)


class StatsBuilder:
    """What the job has done so far; every method is cheap and thread-safe enough for a
    status reader on another thread (plain attribute writes of whole values)."""

    def __init__(self, sm: StateMachine) -> None:
        self._sm = sm
        self._lock = threading.Lock()
        self.t_start = time.monotonic()
        self.t_end: float | None = None
        self.setup_ms: float | None = None
        self.t_pause: float | None = None
        self.downtime_ms: float | None = None
        self.expected_ms: float | None = None
        self.total = 0
        self.page_size = 4096
        self.live = False
        self.iterations = 0
        self.iter_bytes = 0
        self.iter_queued = 0
        self.first_pass_done = False
        self.dirty_syncs = 0
        self.dirty_rate = 0.0
        self.bandwidth = 0.0
        self.missed_zero_copy = 0
        self.throttle = 0  # percent
        self.error: str | None = None
        self.main_bytes = 0
        self.parameters: dict[str, Any] = {}

    def start(self) -> None:
        self.t_start = time.monotonic()

    def setup_done(self) -> None:
        self.setup_ms = (time.monotonic() - self.t_start) * 1000

    def set_image(self, size: int, page_size: int, *, live: bool) -> None:
        self.total, self.page_size, self.live = size, page_size, live

    def begin_iteration(self, iteration: int, nbytes: int) -> None:
        with self._lock:
            self.iterations = iteration
            self.iter_bytes = nbytes
            self.iter_queued = 0

    def queued(self, nbytes: int) -> None:
        with self._lock:
            self.iter_queued += nbytes

    def end_iteration(self, nbytes: int, elapsed: float) -> float:
        """Record an iteration's pages and time; return the bandwidth it measured."""
        with self._lock:
            self.first_pass_done = True
            if nbytes:
                self.bandwidth = nbytes / elapsed
            return max(self.bandwidth, 1.0)

    def dirty_sync(self, pages: int, elapsed: float, expected_ms: float) -> None:
        with self._lock:
            self.dirty_syncs += 1
            # What is dirty now is what remains, until the next iteration queues it.
            self.iter_bytes, self.iter_queued = pages * self.page_size, 0
            if elapsed > 0:
                self.dirty_rate = pages / elapsed
            self.expected_ms = expected_ms

    def synced(self, copied_channels: int) -> None:
        # QEMU counts one miss per channel whose flush reported a copy.
        self.missed_zero_copy += copied_channels

    def paused(self) -> None:
        self.t_pause = time.monotonic()

    def committed(self) -> None:
        now = time.monotonic()
        self.t_end = now
        if self.t_pause is not None:
            self.downtime_ms = (now - self.t_pause) * 1000

    def failed(self, message: str) -> None:
        self.t_end = time.monotonic()
        self.error = message

    def snapshot(self, pool: Any = None) -> MigrationStats:
        end = self.t_end if self.t_end is not None else time.monotonic()
        elapsed_ms = (end - self.t_start) * 1000
        channels: tuple[dict[str, int], ...] = ()
        transferred = normal = zero = 0
        if pool is not None:
            channels = tuple(channel_dict(c) for c in pool.channels)
            transferred = sum(c["bytes"] for c in channels)
            normal = sum(c["normal_pages"] for c in channels)
            zero = sum(c["zero_pages"] for c in channels)
        with self._lock:
            left = max(0, self.iter_bytes - self.iter_queued)
        state = self._sm.state
        if state is State.COMPLETED:
            left = 0
        seconds = max(elapsed_ms / 1000, 1e-6)
        return MigrationStats(
            status=state.value,
            total_time_ms=elapsed_ms,
            setup_time_ms=self.setup_ms,
            downtime_ms=self.downtime_ms,
            expected_downtime_ms=self.expected_ms,
            transferred=transferred,
            remaining=left,
            total=self.total,
            normal_pages=normal,
            normal_bytes=normal * self.page_size,
            zero_pages=zero,
            page_size=self.page_size,
            dirty_sync_count=self.dirty_syncs,
            dirty_pages_rate=self.dirty_rate,
            mbps=transferred * 8 / 1e6 / seconds,
            dirty_sync_missed_zero_copy=self.missed_zero_copy,
            cpu_throttle_percentage=self.throttle,
            iteration=self.iterations,
            live=self.live,
            error=self.error,
            parameters=dict(self.parameters),
            channels=channels,
        )


RECEIVE_FIELDS = ("id", "packets", "bytes", "normal_pages", "zero_pages", "syncs")
SEND_FIELDS = (*RECEIVE_FIELDS, "zero_copy_queued", "zero_copy_completed", "zero_copy_copied")


def channel_dict(c: ChannelCounters, fields: tuple[str, ...] = SEND_FIELDS) -> dict[str, int]:
    """One channel's numbers, under the counters' own names ("normal_pages")."""
    return {k: int(getattr(c, k)) for k in fields}


def channel_json(ch: Mapping[str, int]) -> dict[str, int]:
    """One channel as the JSON output spells it, query-migrate's way: "normal-pages"."""
    return {k.replace("_", "-"): v for k, v in ch.items()}


def channel_counters(ch: Mapping[str, int]) -> dict[str, int]:
    """channel_json read back: the counters' own names again."""
    return {k.replace("-", "_"): v for k, v in ch.items()}
