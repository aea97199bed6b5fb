"""The live-migration benchmark: a guest stand-in dirtying its image at a fixed rate, migrated
over loopback by real `zcmigrate send` and `zcmigrate receive` processes.

Reports total time, downtime, iterations and dirty-sync-count (medians of --runs, and every
run), CPU per side from wait4, and the oracle's verdict at the destination. One JSON document
on stdout. It drives the product as a user does; it imports nothing of it.

    python bench/live.py --size 256M --dirty-rate 64M --runs 5 --channels 2 --zero-copy off
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import WORK, cli, parse_size, reap, warm_up

ROOT = Path(__file__).resolve().parent.parent


def _wait_line(proc: subprocess.Popen[bytes], pattern: str, timeout: float = 120) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if re.match(pattern, line):
            return line.strip()
        if not line and proc.poll() is not None:
            break
    raise RuntimeError(f"{proc.args!r}: no line matching {pattern!r}")


def _clean(*images: Path) -> None:
    for image in images:
        for suffix in ("", ".guest", ".state", ".incoming"):
            Path(str(image) + suffix).unlink(missing_ok=True)


def live_once(size: int, rate: int, channels: int, zero_copy: bool, fill: str,
              downtime_limit: int, log: Path) -> dict[str, Any]:
    src, dst = WORK / "live-src.img", WORK / "live-dst.img"
    _clean(src, dst)
    with open(log, "ab") as errf:
        guest = subprocess.Popen(cli("guest", str(src), "--size", str(size), "--dirty-rate",
                                     str(rate), "--fill", fill),
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=errf)
        recv = send = None
        try:
            _wait_line(guest, r"guest running")
            recv = subprocess.Popen(cli("receive", str(dst), "--listen", "127.0.0.1:0", "--json",
                                        "--accept-timeout", "60", "--log-format", "json"),
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=errf)
            port = _wait_line(recv, r"listening: .*:\d+").rsplit(":", 1)[1]
            t0 = time.perf_counter()
            send = subprocess.Popen(
                cli("send", str(src), "--to", f"127.0.0.1:{port}", "--multifd-channels",
                    str(channels), "--multifd-zerocopy", "on" if zero_copy else "off",
                    "--downtime-limit", str(downtime_limit), "--json", "--log-format", "json"),
                cwd=ROOT, stdout=subprocess.PIPE, stderr=errf)
            assert send.stdout is not None and recv.stdout is not None
            out = send.stdout.read()
            send_rc, su, ss = reap(send)
            wall = time.perf_counter() - t0
            recv.stdout.read()
            recv_rc, ru, rs = reap(recv)
            # After the commit the source guest is asked to exit: the destination owns it.
            guest.wait(30)
        finally:
            for p in (guest, recv, send):
                if p is not None and p.returncode is None:
                    p.kill()
                    reap(p)
    if send_rc or recv_rc:
        raise RuntimeError(f"send exited {send_rc}, receive {recv_rc}; see {log}")
    check = subprocess.run(cli("guest", str(dst), "--check"), cwd=ROOT, capture_output=True,
                           text=True)
    _clean(src, dst)
    stats = json.loads(out)
    ram = stats["ram"]
    gib = size / (1 << 30)
    return {
        "wall_s": round(wall, 4),
        "total_time_ms": stats["total-time"],
        "setup_time_ms": stats.get("setup-time"),
        "downtime_ms": stats.get("downtime"),
        "iterations": ram["iterations"],
        "dirty_sync_count": ram["dirty-sync-count"],
        "transferred": ram["transferred"],
        "normal_pages": ram["normal"],
        "zero_pages": ram["zero-pages"],
        "src_cpu_s_per_gib": round((su + ss) / gib, 3),
        "dst_cpu_s_per_gib": round((ru + rs) / gib, 3),
        "oracle_ok": check.returncode == 0,
        "oracle": (check.stdout or check.stderr).strip(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=256 << 20)
    ap.add_argument("--dirty-rate", type=parse_size, default=64 << 20,
                    help="bytes per second the guest dirties (default 64M)")
    ap.add_argument("--fill", choices=["random", "zero", "half"], default="random")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--channels", default="2")
    ap.add_argument("--zero-copy", default="off")
    ap.add_argument("--downtime-limit", type=int, default=300, help="ms (default 300)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    configs = [(int(n), {"on": True, "off": False}[z.strip()])
               for n in args.channels.split(",") for z in args.zero_copy.split(",")]
    WORK.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "live-children.log"
    log.write_bytes(b"")
    runs: list[dict[str, Any]] = []
    for rnd in range(args.runs):
        k = rnd % len(configs)
        for n, zc in configs[k:] + configs[:k]:  # interleaved, as in run.py
            warm_up(2 * args.size)  # both images live in /dev/shm
            r = {"channels": n, "zero_copy": zc, "round": rnd,
                 **live_once(args.size, args.dirty_rate, n, zc, args.fill,
                             args.downtime_limit, log)}
            runs.append(r)
            print(f"round {rnd} ch{n} zc {'on' if zc else 'off'}: total {r['total_time_ms']} ms,"
                  f" downtime {r['downtime_ms']} ms, {r['iterations']} iterations, oracle "
                  f"{'ok' if r['oracle_ok'] else 'FAILED'}", file=sys.stderr)
    summary = []
    for n, zc in configs:
        mine = [r for r in runs if r["channels"] == n and r["zero_copy"] == zc]
        summary.append({
            "channels": n, "zero_copy": zc, "n": len(mine),
            **{k: statistics.median(r[k] for r in mine)
               for k in ("wall_s", "total_time_ms", "downtime_ms", "iterations",
                         "dirty_sync_count", "src_cpu_s_per_gib", "dst_cpu_s_per_gib")},
            "oracle_ok_all": all(r["oracle_ok"] for r in mine),
        })
    doc = {
        "benchmark": "live migration of a guest stand-in over loopback",
        "command": "python bench/live.py " + " ".join(argv if argv is not None
                                                      else sys.argv[1:]),
        "cores": os.cpu_count(),
        "image_bytes": args.size,
        "dirty_rate": args.dirty_rate,
        "fill": args.fill,
        "downtime_limit_ms": args.downtime_limit,
        "configurations": summary,
        "runs": runs,
    }
    (args.out / f"live-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(doc, indent=2) + "\n")
    json.dump(doc, sys.stdout, indent=2)
    print()
    return 0 if all(s["oracle_ok_all"] for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
