"""The page-cache floor: CPU per GiB of each route a receiver could take to put new data into
a fresh file (bench/pagecache_floor.c), interleaved, each run after a warm-up; medians.

    python bench/pagecache_floor.py --dir /dev/shm --size 1G --runs 7 \
        --routes write1,write2-shared,write2-locked,mmap1,mmap2 --out bench/results

Compiles pagecache_floor.c with cc into --out, prints a table on stderr and one JSON
document on stdout (also written under --out). It imports nothing of zcmigrate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GiB = 1 << 30
CHUNK = 16 << 20
ROUTES = ("write1", "write1-big", "write2-shared", "write2-locked", "write2-ranges",
          "write2-files", "mmap1", "mmap2", "populate-mmap", "falloc-mmap", "falloc-write",
          "write1-4k", "mmap1-4k", "zero-punch", "zero-write", "zero-check")


def parse_size(text: str) -> int:
    units = {"K": 10, "M": 20, "G": 30}
    text = text.strip().upper()
    return int(text[:-1]) << units[text[-1]] if text[-1] in units else int(text)


def build(out: Path) -> Path:
    exe = out / "pagecache_floor"
    src = HERE / "pagecache_floor.c"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-pthread", "-o", str(exe), str(src)],
                       check=True)
    return exe


def warm_up(directory: Path, size: int) -> None:
    """Write and delete a file of `size` in `directory`: this VM hands freed memory back to its
    host, and a route must not pay for faulting it back in (ARCHITECTURE.md, "Facts")."""
    path = directory / f"pcf-warm-up-{os.getpid()}"
    zeros = bytes(CHUNK)
    with open(path, "wb") as f:
        for off in range(0, size, CHUNK):
            f.write(zeros[:min(CHUNK, size - off)])
    path.unlink()


def spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm"))
    ap.add_argument("--size", type=parse_size, default=GiB)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--routes", default=",".join(ROUTES))
    ap.add_argument("--chunk-kib", type=int, default=256)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    routes = [r.strip() for r in args.routes.split(",")]
    unknown = set(routes) - set(ROUTES)
    if unknown:
        ap.error(f"unknown routes: {sorted(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)
    exe = build(args.out)
    runs: list[dict[str, Any]] = []
    for rnd in range(args.runs):
        k = rnd % len(routes)  # interleaved: each round starts one route further on
        for route in routes[k:] + routes[:k]:
            warm_up(args.dir, args.size)
            out = subprocess.run([str(exe), route, str(args.dir), str(args.size >> 20),
                                  str(args.chunk_kib)], check=True, capture_output=True,
                                 text=True).stdout
            r = json.loads(out)
            r["round"] = rnd
            r["loadavg_1m"] = os.getloadavg()[0]
            runs.append(r)
            print(f"round {rnd} {route}: cpu {r['cpu_s']:.3f} s wall {r['wall_s']:.3f} s",
                  file=sys.stderr)
    summary = []
    for route in routes:
        rs = [r for r in runs if r["route"] == route]
        gib = rs[0]["bytes"] / GiB
        summary.append({
            "route": route, "n": len(rs), "gib": gib,
            "cpu_s_per_gib": spread([r["cpu_s"] / gib for r in rs]),
            "sys_s_per_gib": spread([r["sys_s"] / gib for r in rs]),
            "wall_s_per_gib": spread([r["wall_s"] / gib for r in rs]),
        })
    doc = {
        "benchmark": "bench/pagecache_floor.c: new data into a fresh file's page cache",
        "command": "python bench/pagecache_floor.py " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "dir": str(args.dir), "bytes": args.size, "chunk_kib": args.chunk_kib,
        "cores": os.cpu_count(), "kernel": os.uname().release,
        "loadavg_1m_median": round(statistics.median(r["loadavg_1m"] for r in runs), 2),
        "summary": summary, "runs": runs,
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"pagecache-floor-{stamp}.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\n{args.dir}, {args.size >> 20} MiB, {args.runs} runs, median [min-max], "
          f"load avg {doc['loadavg_1m_median']}", file=sys.stderr)
    print(f"{'route':15} {'CPU s/GiB':>22} {'sys s/GiB':>8} {'wall s/GiB':>22}",
          file=sys.stderr)
    for s in summary:
        c, w = s["cpu_s_per_gib"], s["wall_s_per_gib"]
        print(f"{s['route']:15} {c['median']:7.3f} [{c['min']:.3f}-{c['max']:.3f}] "
              f"{s['sys_s_per_gib']['median']:8.3f} "
              f"{w['median']:7.3f} [{w['min']:.3f}-{w['max']:.3f}]", file=sys.stderr)
    json.dump(doc, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
