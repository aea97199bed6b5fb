"""The live-migration benchmark: a guest stand-in dirtying its image at a fixed rate, migrated
over loopback by real `zcmigrate send` and `zcmigrate receive` processes.

Reports total time, downtime, iterations and dirty-sync-count (medians of --runs, and every
run), CPU per side from wait4, and the oracle's verdict at the destination. One JSON document
on stdout. It drives the product as a user does; it imports nothing of it.

    python bench/live.py --size 256M --dirty-rate 64M --runs 5 --channels 2 --zero-copy off

With --modes, it compares precopy, auto-converge and post-copy instead, for a guest
dirtying at --rates (percent of --max-bandwidth): total time, downtime, and post-copy's
request latency, as JSON and an SVG chart (hand-written, no dependency):

    python bench/live.py --modes --size 256M --max-bandwidth 128M --rates 25,50,100,200
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
        for suffix in ("", ".guest", ".state", ".incoming", ".guest.log"):
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


MODES = {"precopy": [], "auto-converge": ["--auto-converge"], "postcopy": ["--postcopy"]}
# A post-copy guest's oracle: it runs on after the migration, so its own final control
# block (not IMAGE.state, the switch's) says where its step must be.
_POSTCOPY_ORACLE = """
import sys
from zcmigrate.migrate.guest import DeviceState, check_oracle, read_control_record
image, npages = sys.argv[1], int(sys.argv[2])
r = read_control_record(image)
v = check_oracle(image, DeviceState(npages=npages, page_size=4096, position=r.position,
                                    value=r.value, touched=r.touched))
print(v.message)
sys.exit(0 if v.ok else 3)
"""


def mode_once(mode: str, size: int, rate: int, bandwidth: int, downtime_limit: int,
              max_iterations: int, log: Path) -> dict[str, Any]:
    """One migration in `mode`; a precopy that cannot converge is a result (exit 5)."""
    src, dst = WORK / "modes-src.img", WORK / "modes-dst.img"
    _clean(src, dst)
    with open(log, "ab") as errf:
        guest = subprocess.Popen(cli("guest", str(src), "--size", str(size), "--dirty-rate",
                                     str(rate), "--fill", "random"),
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=errf)
        recv = send = None
        try:
            _wait_line(guest, r"guest running")
            recv = subprocess.Popen(cli("receive", str(dst), "--listen", "127.0.0.1:0",
                                        "--json", "--accept-timeout", "60", "--log-format",
                                        "json", "--guest-dirty-rate", str(rate)),
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=errf)
            port = _wait_line(recv, r"listening: .*:\d+").rsplit(":", 1)[1]
            send = subprocess.Popen(
                cli("send", str(src), "--to", f"127.0.0.1:{port}", "--max-bandwidth",
                    str(bandwidth), "--downtime-limit", str(downtime_limit),
                    "--max-iterations", str(max_iterations), "--json", "--log-format", "json",
                    *MODES[mode]),
                cwd=ROOT, stdout=subprocess.PIPE, stderr=errf)
            assert send.stdout is not None and recv.stdout is not None
            out = send.stdout.read()
            send_rc, _, _ = reap(send)
            rout = recv.stdout.read()
            recv_rc, _, _ = reap(recv)
        finally:
            for p in (guest, recv, send):
                if p is not None and p.returncode is None:
                    p.kill()
                    p.wait(10)  # SIGKILL ends it; a wait past that is a stuck kernel
    stats = json.loads(out)
    row: dict[str, Any] = {"mode": mode, "exit": send_rc, "status": stats["status"],
                           "total_time_ms": stats["total-time"],
                           "downtime_ms": stats.get("downtime"),
                           "iterations": stats["ram"]["iterations"],
                           "cpu_throttle_percentage": stats.get("cpu-throttle-percentage", 0)}
    row["switched"] = b"guest-pid" in rout
    if send_rc == 0 and row["switched"]:
        rdoc = json.loads(rout[rout.index(b"{"):])
        pid = rdoc["guest-pid"]
        os.kill(pid, 15)  # the destination's guest, started by the receiver: stop it
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        check = subprocess.run([sys.executable, "-c", _POSTCOPY_ORACLE, str(dst),
                                str(size // 4096)], cwd=ROOT, capture_output=True, text=True)
        row.update({k.replace("-", "_"): stats[k] for k in (
            "postcopy-requests", "postcopy-latency-median", "postcopy-latency-p99",
            "postcopy-total-time")})
    elif send_rc == 0:
        check = subprocess.run(cli("guest", str(dst), "--check"), cwd=ROOT,
                               capture_output=True, text=True)
    else:
        check = None
    row["oracle_ok"] = None if check is None else check.returncode == 0
    _clean(src, dst)
    del recv_rc
    return row


def _svg(rows: list[dict[str, Any]], rates: list[int], path: Path) -> None:
    """Two panels of grouped bars (total time, downtime) per dirty rate and mode; a run
    that did not complete is an empty bar marked x."""
    colours = {"precopy": "#4477aa", "auto-converge": "#ccbb44", "postcopy": "#ee6677"}
    width, height, pad = 760, 300, 50
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{2 * height}" '
           'font-family="sans-serif" font-size="11">']
    for panel, (key, title) in enumerate((("total_time_ms", "total time (ms)"),
                                          ("downtime_ms", "downtime (ms)"))):
        y0 = panel * height
        vals = [r[key] for r in rows if r["exit"] == 0 and r[key] is not None]
        top = max(vals or [1]) * 1.1
        out.append(f'<text x="{pad}" y="{y0 + 20}" font-size="13">{title}</text>')
        plot_h = height - 2 * pad
        group_w = (width - 2 * pad) / len(rates)
        bar_w = group_w / (len(MODES) + 1)
        for gi, rate in enumerate(rates):
            gx = pad + gi * group_w
            out.append(f'<text x="{gx + group_w / 2 - 20}" y="{y0 + height - pad + 15}">'
                       f'{rate}% of bw</text>')
            for mi, mode in enumerate(MODES):
                r = next((r for r in rows if r["mode"] == mode and r["rate_pct"] == rate), None)
                x = gx + (mi + 0.5) * bar_w
                if r is None or r["exit"] != 0 or r[key] is None:
                    out.append(f'<text x="{x + 2}" y="{y0 + height - pad - 3}" '
                               f'fill="{colours[mode]}">x</text>')
                    continue
                h = plot_h * r[key] / top
                out.append(f'<rect x="{x:.1f}" y="{y0 + height - pad - h:.1f}" '
                           f'width="{bar_w * 0.9:.1f}" height="{h:.1f}" '
                           f'fill="{colours[mode]}"/>')
                out.append(f'<text x="{x:.1f}" y="{y0 + height - pad - h - 3:.1f}" '
                           f'font-size="9">{r[key]:.0f}</text>')
        out.append(f'<line x1="{pad}" y1="{y0 + height - pad}" x2="{width - pad}" '
                   f'y2="{y0 + height - pad}" stroke="black"/>')
    for mi, (mode, c) in enumerate(colours.items()):
        out.append(f'<rect x="{width - 150}" y="{10 + mi * 15}" width="10" height="10" '
                   f'fill="{c}"/><text x="{width - 135}" y="{19 + mi * 15}">{mode}</text>')
    out.append('<text x="50" y="590">x: did not complete (precopy: cannot converge, exit 5)'
               '</text></svg>')
    path.write_text("\n".join(out) + "\n")


def modes_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    rates = [int(x) for x in args.rates.split(",")]
    WORK.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "live-modes-children.log"
    log.write_bytes(b"")
    rows: list[dict[str, Any]] = []
    for rate in rates:
        for mode in MODES:  # interleaved: every rate runs its modes back to back
            warm_up(2 * args.size)
            dirty = args.max_bandwidth * rate // 100
            r = {"rate_pct": rate, "dirty_rate": dirty,
                 **mode_once(mode, args.size, dirty, args.max_bandwidth, args.downtime_limit,
                             args.max_iterations, log)}
            rows.append(r)
            print(f"{rate:>3}% {mode:>13}: exit {r['exit']}, total {r['total_time_ms']} ms, "
                  f"downtime {r['downtime_ms']} ms, oracle {r['oracle_ok']}", file=sys.stderr)
    stamp = time.strftime('%Y%m%d-%H%M%S')
    chart = args.out / f"live-modes-{stamp}.svg"
    _svg(rows, rates, chart)
    doc = {
        "benchmark": "precopy, auto-converge and post-copy of a guest stand-in over loopback",
        "command": "python bench/live.py " + " ".join(argv if argv is not None
                                                      else sys.argv[1:]),
        "cores": os.cpu_count(),
        "image_bytes": args.size,
        "max_bandwidth": args.max_bandwidth,
        "downtime_limit_ms": args.downtime_limit,
        "chart": str(chart),
        "runs": rows,
    }
    (args.out / f"live-modes-{stamp}.json").write_text(json.dumps(doc, indent=2) + "\n")
    json.dump(doc, sys.stdout, indent=2)
    print()
    return 0 if all(r["oracle_ok"] is not False for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--modes", action="store_true",
                    help="compare precopy, auto-converge and post-copy (see above)")
    ap.add_argument("--max-bandwidth", type=parse_size, default=128 << 20)
    ap.add_argument("--rates", default="25,50,100,200",
                    help="--modes: dirty rates in percent of --max-bandwidth")
    ap.add_argument("--max-iterations", type=int, default=8)
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
    if args.modes:
        return modes_main(args, argv)
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
