"""Throughput and CPU cost of the multifd sender and receiver pools over loopback TCP.

Runs both pools in this one process for each configuration (channels x zero copy), interleaved
and warmed up as ARCHITECTURE.md's "Facts" ask, and prints one JSON document on stdout. A
benchmark, not a test: it knows the pools and channels, not guests or the migration job.

    python bench/multifd_throughput.py --size 1G --channels 2 --zero-copy on,off --image random
"""

from __future__ import annotations

import argparse
import json
import logging
import mmap
import os
import resource
import statistics
import sys
import threading
import time
from array import array
from pathlib import Path
from typing import Any

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zcmigrate.channel.zcsocket import Channel, Listener, connect
from zcmigrate.migrate.units import parse_size
from zcmigrate.multifd.receiver import ReceiverPool, accept_data_channel
from zcmigrate.multifd.sender import SenderPool
from zcmigrate.multifd.wire import InitTracker, WireContext

GiB = 1 << 30
CHUNK = 16 << 20
WARM_FILE = "/dev/shm/zcmigrate-bench-warmup"


def make_image(size: int, kind: str, page_size: int) -> mmap.mmap:
    """random: os.urandom throughout; zero: untouched; half: runs of 64 zero pages between
    runs of 64 random ones."""
    mm = mmap.mmap(-1, size)
    if kind == "zero":
        return mm
    for off in range(0, size, CHUNK):
        n = min(CHUNK, size - off)
        mm[off:off + n] = os.urandom(n)
    if kind == "half":
        run = 64 * page_size
        for off in range(run, size, 2 * run):
            mm[off:off + run] = bytes(min(run, size - off))
    return mm


def warm_up(size: int) -> float:
    """Write and delete a file of the image's size in /dev/shm: this VM hands freed memory
    back to its host, and a run must not pay for faulting it back in."""
    t0 = time.monotonic()
    zeros = bytes(CHUNK)
    with open(WARM_FILE, "wb") as f:
        for off in range(0, size, CHUNK):
            f.write(zeros[:min(CHUNK, size - off)])
    os.unlink(WARM_FILE)
    return time.monotonic() - t0


def channel_pairs(n: int, zero_copy: bool) -> tuple[list[Channel], list[Channel]]:
    with Listener("127.0.0.1", 0) as lst:
        accepted: list[Channel] = []

        def accept() -> None:
            for _ in range(n):
                accepted.append(lst.accept(10))

        t = threading.Thread(target=accept)
        t.start()
        tx = [connect("127.0.0.1", lst.port, zero_copy=zero_copy) for _ in range(n)]
        t.join(10)
    return tx, accepted


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_once(src: mmap.mmap, ctx: WireContext, zero_copy: bool, fresh: bool,
             reused: mmap.mmap | None) -> dict[str, Any]:
    size = ctx.image_size
    dst = mmap.mmap(-1, size) if fresh else reused
    assert dst is not None
    tx, rx_unordered = channel_pairs(ctx.channels, zero_copy)
    sender = SenderPool(tx, ctx, src, zero_copy=zero_copy)
    sender.start()
    tracker = InitTracker(ctx)
    rx: list[Channel | None] = [None] * ctx.channels
    for ch in rx_unordered:
        rx[accept_data_channel(ch, tracker, timeout=10)] = ch
    receiver = ReceiverPool([c for c in rx if c is not None], ctx, dst, known_zero=fresh)
    receiver.start()
    offsets = array("Q", range(0, size, ctx.page_size))
    synced: list[int] = []
    coord = threading.Thread(target=lambda: synced.append(receiver.sync(timeout=300)))
    try:
        cpu0, t0 = cpu_seconds(), time.monotonic()
        coord.start()
        sender.send_pages(offsets)
        res = sender.sync(timeout=300)
        coord.join(300)
        wall, cpu = time.monotonic() - t0, cpu_seconds() - cpu0
        if synced != [1]:
            raise RuntimeError(f"receiver sync failed: {receiver.error}")
        st = sender.statistics()
    finally:
        sender.close()
        receiver.close()
    if fresh:
        dst.close()
    return {
        "channels": ctx.channels,
        "zero_copy": zero_copy,
        "image_bytes": size,
        "wall_s": round(wall, 4),
        "gb_per_s": round(size / wall / 1e9, 3),
        "mib_per_s": round(size / wall / (1 << 20), 1),
        "cpu_s": round(cpu, 3),
        "cpu_s_per_gib": round(cpu / (size / GiB), 3),
        "wire_bytes": st.bytes,
        "normal_pages": st.normal_pages,
        "zero_pages": st.zero_pages,
        "copied_channels": res.copied_channels,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size", default="1G", help="image size (default 1G)")
    ap.add_argument("--channels", default="1,2,4", help="comma list (default 1,2,4)")
    ap.add_argument("--zero-copy", default="on,off", help="comma list of on/off (default both)")
    ap.add_argument("--image", choices=["random", "zero", "half"], default="random")
    ap.add_argument("--repeat", type=int, default=3, help="rounds over all configurations")
    ap.add_argument("--page-size", type=int, default=4096)
    ap.add_argument("--pages-alloc", type=int, default=512, help="pages per packet")
    ap.add_argument("--destination", choices=["fresh", "reused"], default="fresh",
                    help="fresh: a new mapping per run, as a migration has (its page faults "
                         "count); reused: one mapping faulted in beforehand")
    args = ap.parse_args(argv)

    # Pools log through structlog; keep stdout for the JSON document alone.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    size = parse_size(args.size)
    channels = [int(c) for c in args.channels.split(",")]
    zcs = [{"on": True, "off": False}[z.strip()] for z in args.zero_copy.split(",")]
    configs = [(n, zc) for n in channels for zc in zcs]
    fresh = args.destination == "fresh"

    src = make_image(size, args.image, args.page_size)
    reused = None
    if not fresh:
        reused = mmap.mmap(-1, size)
        for off in range(0, size, CHUNK):
            reused[off:off + CHUNK] = bytes(min(CHUNK, size - off))
    runs: list[dict[str, Any]] = []
    for rnd in range(args.repeat):
        # Interleave: each round starts one configuration later, so no configuration always
        # runs first (or right after the same neighbour).
        k = rnd % len(configs)
        for n, zc in configs[k:] + configs[:k]:
            ctx = WireContext(uuid=os.urandom(16), channels=n, page_size=args.page_size,
                              image_size=size, pages_alloc=args.pages_alloc)
            warm = warm_up(size)
            result = run_once(src, ctx, zc, fresh, reused)
            result.update(round=rnd, warm_up_s=round(warm, 3))
            runs.append(result)
            print(f"round {rnd} channels {n} zero-copy {'on' if zc else 'off'}: "
                  f"{result['gb_per_s']} GB/s, {result['cpu_s_per_gib']} CPU s/GiB",
                  file=sys.stderr)

    summary: list[dict[str, Any]] = []
    for n, zc in configs:
        mine = [r for r in runs if r["channels"] == n and r["zero_copy"] == zc]
        wall = statistics.median(r["wall_s"] for r in mine)
        cpu = statistics.median(r["cpu_s"] for r in mine)
        summary.append({
            "channels": n,
            "zero_copy": zc,
            "image_bytes": size,
            "runs": len(mine),
            "wall_s": round(wall, 4),
            "gb_per_s": round(size / wall / 1e9, 3),
            "mib_per_s": round(size / wall / (1 << 20), 1),
            "cpu_user_sys_s": round(cpu, 3),
            "cpu_s_per_gib": round(cpu / (size / GiB), 3),
            "wall_s_min": min(r["wall_s"] for r in mine),
            "wall_s_max": max(r["wall_s"] for r in mine),
        })
    ratios: dict[str, dict[str, float]] = {}
    for n in channels:
        with_zc = next((s for s in summary if s["channels"] == n and s["zero_copy"]), None)
        without = next((s for s in summary if s["channels"] == n and not s["zero_copy"]), None)
        if with_zc and without:
            ratios[f"{n}ch_zero_copy_on_over_off"] = {
                "throughput": round(with_zc["gb_per_s"] / without["gb_per_s"], 3),
                "cpu_per_gib": round(with_zc["cpu_s_per_gib"] / without["cpu_s_per_gib"], 3),
            }
    doc = {
        "benchmark": "multifd_throughput",
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "threads_per_configuration": "N sender + N receiver workers, one coordinator",
        "image": args.image,
        "image_bytes": size,
        "page_size": args.page_size,
        "pages_alloc": args.pages_alloc,
        "destination": args.destination,
        "repeat": args.repeat,
        "note": "loopback always copies (every completion COPIED): no zero-copy speedup can "
                "show here; medians over the rounds, ratios from this one run",
        "configurations": summary,
        "ratios": ratios,
        "runs": runs,
    }
    json.dump(doc, sys.stdout, indent=2)
    print()
    src.close()
    if reused is not None:
        reused.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
