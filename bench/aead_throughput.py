"""Throughput of AES-128-GCM per core on zcmigrate's packet path: gather-and-seal and open.

Seals 2 MiB packets of 4 KiB pages gathered from an image (Sealer.seal_gather: the C path
that seals a packet's page data in Sealer.seal_packet) and opens such packets (zcc_open
into a separate buffer), with 1 and 2
threads, each with its own key and buffers; prints one JSON document. A benchmark, not a
test: it knows the AEAD and a mapping, not channels or migrations.

    python bench/aead_throughput.py --image-size 256M --seconds 2 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import ssl
import statistics
import sys
import threading
import time
from array import array
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zcmigrate.channel.aead import TAG_LEN, Direction, SessionKeys, StreamId
from zcmigrate.migrate.units import parse_size
from zcmigrate.native import ffi, lib

CHUNK = 16 << 20


def packets(image_size: int, packet: int, page: int, pattern: str) -> list[array[int]]:
    """Offsets of each packet: `sequential` (adjacent pages, one run per packet, as in a
    first precopy pass) or `scattered` (every other page: no two adjacent, one EVP
    update per page, the worst case)."""
    per = packet // page
    if pattern == "sequential":
        return [array("Q", range(start, start + packet, page))
                for start in range(0, image_size - packet + 1, packet)]
    step = 2 * page
    span = per * step
    return [array("Q", range(start + (k % 2) * page, start + span, step))
            for k, start in enumerate(range(0, image_size - span + 1, span))]


class Worker:
    """One thread's key, buffers and counters (nothing shared between threads)."""

    def __init__(self, idx: int, image: mmap.mmap, base: int, plan: list[array[int]],
                 packet: int, page: int) -> None:
        keys = SessionKeys(os.urandom(32), os.urandom(32), os.urandom(32), os.urandom(16))
        self.sealer = keys.sealer(Direction.SOURCE_TO_DESTINATION, idx)
        self.image, self.base, self.plan = image, base, plan
        self.packet, self.page = packet, page
        self.out = mmap.mmap(-1, packet + TAG_LEN)
        self.out_c = ffi.from_buffer("uint8_t[]", self.out)
        self.plain = mmap.mmap(-1, packet)
        self.plain_c = ffi.from_buffer("uint8_t[]", self.plain)
        self.offsets_c = [ffi.from_buffer("uint64_t[]", p) for p in plan]
        key = keys.key(StreamId(Direction.SOURCE_TO_DESTINATION, idx))
        self.ctx = ffi.gc(lib.zcc_aead_new(key, len(key)), lib.zcc_aead_free)
        self.nonce = b"\0" * 12
        self.bytes = 0
        self.cpu = 0.0

    def seal_pages(self, until: float) -> None:
        cpu0 = time.thread_time()
        n = 0
        k = 0
        view = self.out_c
        while time.monotonic() < until:
            offs = self.offsets_c[k % len(self.offsets_c)]
            self.sealer.seal_gather(self.base, len(self.image), offs, len(offs), self.page,
                                    view, view + self.packet)
            n += len(offs) * self.page
            k += 1
        self.bytes, self.cpu = n, time.thread_time() - cpu0

    def prepare_open(self) -> None:
        """One sealed packet under a fixed nonce, opened again and again into `plain`."""
        offs = self.offsets_c[0]
        rc = lib.zcc_seal_pages(self.ctx, self.nonce, b"", 0, b"", 0, self.base,
                                len(self.image), offs, len(offs), self.page, self.out_c,
                                self.packet, self.out_c + self.packet)
        assert rc == 0, rc

    def open(self, until: float) -> None:
        cpu0 = time.thread_time()
        n = 0
        while time.monotonic() < until:
            rc = lib.zcc_open(self.ctx, self.nonce, b"", 0, self.out_c, self.plain_c,
                              self.packet, self.out_c + self.packet)
            if rc:
                raise RuntimeError(f"open failed: {rc}")
            n += self.packet
        self.bytes, self.cpu = n, time.thread_time() - cpu0

    def close(self) -> None:
        self.sealer.close()
        for c in (self.out_c, self.plain_c, *self.offsets_c):
            ffi.release(c)
        self.out.close()
        self.plain.close()


def run(op: str, workers: list[Worker], seconds: float) -> dict[str, Any]:
    if op == "open":
        for w in workers:
            w.prepare_open()
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=getattr(w, op), args=(until,)) for w in workers]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    total = sum(w.bytes for w in workers)
    cpu = sum(w.cpu for w in workers)
    return {"bytes": total, "wall_s": wall, "cpu_s": cpu,
            "gb_per_s": total / wall / 1e9, "gb_per_s_per_core": total / cpu / 1e9}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", default="256M", help="random image to gather from")
    ap.add_argument("--packet", default="2M", help="bytes of pages per packet")
    ap.add_argument("--page-size", default="4K")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--patterns", default="sequential,scattered")
    ap.add_argument("--ops", default="seal_pages,open")
    ap.add_argument("--seconds", type=float, default=2.0, help="per run")
    ap.add_argument("--repeat", type=int, default=3, help="rounds, configurations interleaved")
    args = ap.parse_args()
    size, packet, page = (parse_size(args.image_size), parse_size(args.packet),
                          parse_size(args.page_size))
    thread_counts = [int(t) for t in args.threads.split(",")]
    patterns = args.patterns.split(",")
    ops = args.ops.split(",")

    image = mmap.mmap(-1, size)
    for off in range(0, size, CHUNK):
        image[off:off + min(CHUNK, size - off)] = os.urandom(min(CHUNK, size - off))
    image_c = ffi.from_buffer("uint8_t[]", image)
    base = int(ffi.cast("uintptr_t", image_c))
    plans = {p: packets(size, packet, page, p) for p in patterns}

    configs = [(op, pat, n) for op in ops for pat in (patterns if op == "seal_pages"
                                                      else ["-"]) for n in thread_counts]
    runs: list[dict[str, Any]] = []
    for rnd in range(args.repeat + 1):  # round 0 warms up (page faults, CPU clocks)
        for op, pat, n in configs:
            plan = plans[pat if pat != "-" else patterns[0]]
            workers = [Worker(i, image, base, plan, packet, page) for i in range(n)]
            try:
                r = run(op, workers, args.seconds if rnd else min(0.5, args.seconds))
            finally:
                for w in workers:
                    w.close()
            if rnd:
                runs.append({"op": op, "pattern": pat, "threads": n, "round": rnd, **r})

    summary = []
    for op, pat, n in configs:
        mine = [r for r in runs if (r["op"], r["pattern"], r["threads"]) == (op, pat, n)]
        summary.append({
            "op": op, "pattern": pat, "threads": n, "runs": len(mine),
            "gb_per_s": round(statistics.median(r["gb_per_s"] for r in mine), 3),
            "gb_per_s_per_core": round(statistics.median(r["gb_per_s_per_core"]
                                                         for r in mine), 3),
            "cpu_s_per_wall_s": round(statistics.median(r["cpu_s"] / r["wall_s"]
                                                        for r in mine), 2),
        })
    doc = {
        "benchmark": "aead_throughput",
        "cipher": "AES-128-GCM",
        "openssl": ssl.OPENSSL_VERSION,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "image_bytes": size,
        "packet_bytes": packet,
        "page_size": page,
        "seconds_per_run": args.seconds,
        "repeat": args.repeat,
        "note": "seal_pages: Sealer.seal_gather from the image into a send buffer (tag "
                "after the ciphertext); open: zcc_open of one sealed packet into a separate "
                "buffer; per core = bytes / thread CPU time; medians over the rounds",
        "configurations": summary,
        "runs": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                 for r in runs],
    }
    json.dump(doc, sys.stdout, indent=2)
    print()
    ffi.release(image_c)
    image.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
