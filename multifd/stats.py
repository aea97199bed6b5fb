"""Frozen statistics snapshots of the multifd sender and receiver pools (trio's statistics()).

Per channel and in total, named as QEMU's query-migrate names them; plain numbers only, it
must not know threads, sockets or the migration job.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["ChannelCounters", "PoolStats", "SyncResult"]


@dataclass(frozen=True, slots=True)
class ChannelCounters:
    """One data channel's numbers. On a receiver the zero-copy fields are always 0.

    packets: data packets (SYNC packets are counted in `syncs`, not here).
    bytes: wire bytes, everything sent (sender) or received (receiver): init record, packet
    headers, offsets, pages and SYNC packets.
    """

    id: int  # the channel id, 0..N-1
    packets: int
    bytes: int
    normal_pages: int
    zero_pages: int
    syncs: int
    zero_copy_queued: int
    zero_copy_completed: int
    zero_copy_copied: int
    enobufs_retries: int


# The counters a pool sums over its channels: all of a channel's but its id.
_SUMMED = tuple(f.name for f in fields(ChannelCounters) if f.name != "id")


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of a pool: every channel, and totals that are exactly their sums.

    jobs_queued: jobs waiting in the sender's queues at the snapshot (0 on a receiver);
    send_waits: how often send_pages() blocked on full queues (backpressure; 0 on a receiver).
    """

    channels: tuple[ChannelCounters, ...]
    packets: int
    bytes: int
    normal_pages: int
    zero_pages: int
    syncs: int
    zero_copy_queued: int
    zero_copy_completed: int
    zero_copy_copied: int
    enobufs_retries: int
    jobs_queued: int = 0
    send_waits: int = 0

    @classmethod
    def from_channels(
        cls, channels: tuple[ChannelCounters, ...], *, jobs_queued: int = 0, send_waits: int = 0
    ) -> PoolStats:
        # Totals are computed from the very snapshots they sum, so they always add up;
        # every counter of a channel is a total of the pool under the same name.
        totals = {name: sum(getattr(c, name) for c in channels) for name in _SUMMED}
        return cls(channels=channels, jobs_queued=jobs_queued, send_waits=send_waits,
                   **totals)


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What one sender sync() did.

    copied_channels: how many channels' flushes returned 1 (the kernel copied some zero-copy
    sends after all); the migration adds it to dirty-sync-missed-zero-copy. Always 0 with
    zero copy off. sync_num: this sync's number, 1 for the first.
    """

    copied_channels: int
    sync_num: int
