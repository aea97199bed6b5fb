"""The throughput benchmark: real `zcmigrate send --static` and `zcmigrate receive` processes
over loopback, against this machine's limit (iperf3 over loopback, same stream count).

Static images (random pages, all-zero, half and half) in /dev/shm, channels x multifd-zerocopy,
interleaved with iperf3 and warmed up as ARCHITECTURE.md's "Facts" ask; medians of --runs runs.
Prints one JSON document on stdout, writes it and a PNG chart (matplotlib, the `bench` extra)
under --out. It drives the product as a user does; it imports nothing of it.

    python bench/run.py --size 1G --runs 5 --channels 1,2,4 --zero-copy on,off \
        --images random,zero,half --out bench/results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = Path("/dev/shm/zcmigrate-bench")
GiB = 1 << 30
CHUNK = 16 << 20
PAGE = 4096
RUN_TIMEOUT = 300.0


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected e.g. 512M or 1G")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


# ------------------------------------------------------------------ images


def make_image(path: Path, size: int, kind: str) -> None:
    """random: os.urandom throughout; zero: zeros actually written (a guest's untouched RAM is
    zero-filled, not a hole); half: runs of 64 zero pages between runs of 64 random ones."""
    run = 64 * PAGE
    zeros = bytes(CHUNK)
    with open(path, "wb") as f:
        for off in range(0, size, CHUNK):
            n = min(CHUNK, size - off)
            if kind == "zero":
                f.write(zeros[:n])
                continue
            buf = bytearray(os.urandom(n))
            if kind == "half":
                for o in range(run, n, 2 * run):
                    buf[o:o + run] = zeros[:min(run, n - o)]
            f.write(buf)


def warm_up(size: int) -> float:
    """Write and delete a file of the image's size in /dev/shm: this VM hands freed memory
    back to its host, and a run must not pay for faulting it back in."""
    t0 = time.monotonic()
    path = WORK / "warm-up"
    zeros = bytes(CHUNK)
    with open(path, "wb") as f:
        for off in range(0, size, CHUNK):
            f.write(zeros[:min(CHUNK, size - off)])
    path.unlink()
    return time.monotonic() - t0


def same_content(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        ma = mmap.mmap(fa.fileno(), 0, prot=mmap.PROT_READ)
        mb = mmap.mmap(fb.fileno(), 0, prot=mmap.PROT_READ)
        try:
            return all(ma[o:o + CHUNK] == mb[o:o + CHUNK] for o in range(0, len(ma), CHUNK))
        finally:
            ma.close()
            mb.close()


# ------------------------------------------------------------------ processes


def reap(proc: subprocess.Popen[bytes]) -> tuple[int, float, float]:
    """(exit code, user s, sys s) of a child, from wait4's rusage of that child alone."""
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, ru.ru_utime, ru.ru_stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "zcmigrate", *args]


def migrate_once(image: Path, size: int, channels: int, zero_copy: bool,
                 log: Path, verify: bool) -> dict[str, Any]:
    dst = WORK / "dst.img"
    for p in (dst, WORK / "dst.img.state", WORK / "dst.img.incoming"):
        p.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as errf:
        recv = subprocess.Popen(
            cli("receive", str(dst), "--listen", "127.0.0.1:0", "--json", "--accept-timeout",
                "60", "--log-format", "json"),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=errf, env=env)
        try:
            assert recv.stdout is not None
            line = recv.stdout.readline().decode()
            m = re.match(r"listening: .*:(\d+)", line)
            if not m:
                raise RuntimeError(f"receiver said {line!r}; see {log}")
            t0 = time.perf_counter()
            send = subprocess.Popen(
                cli("send", str(image), "--to", f"127.0.0.1:{m.group(1)}", "--static",
                    "--multifd-channels", str(channels),
                    "--multifd-zerocopy", "on" if zero_copy else "off",
                    "--json", "--log-format", "json"),
                cwd=ROOT, stdout=subprocess.PIPE, stderr=errf, env=env)
            assert send.stdout is not None
            send_out = send.stdout.read()  # EOF: the child is exiting
            send_rc, send_user, send_sys = reap(send)
            wall = time.perf_counter() - t0
            recv_out = recv.stdout.read()
            recv_rc, recv_user, recv_sys = reap(recv)
        finally:
            for p in (recv, *([send] if "send" in locals() else [])):
                if p.returncode is None:
                    p.kill()
                    reap(p)
    if send_rc or recv_rc:
        raise RuntimeError(f"send exited {send_rc}, receive {recv_rc}; see {log}")
    stats = json.loads(send_out)
    result = json.loads(recv_out[recv_out.index(b"{"):])
    ok = same_content(image, dst) if verify else None
    dst.unlink(missing_ok=True)
    (WORK / "dst.img.state").unlink(missing_ok=True)
    if ok is False:
        raise RuntimeError(f"the received image differs from {image}")
    gib = size / GiB
    return {
        "wall_s": round(wall, 4),
        "bytes_per_s": round(size / wall),
        "total_time_ms": stats.get("total-time"),
        "bytes_per_s_total_time": round(size / (stats["total-time"] / 1000))
        if stats.get("total-time") else None,
        "receiver_total_time_ms": result.get("total-time"),
        "src_user_s": round(send_user, 3), "src_sys_s": round(send_sys, 3),
        "dst_user_s": round(recv_user, 3), "dst_sys_s": round(recv_sys, 3),
        "src_cpu_s_per_gib": round((send_user + send_sys) / gib, 3),
        "dst_cpu_s_per_gib": round((recv_user + recv_sys) / gib, 3),
        "verified": ok,
    }


def iperf3_once(size: int, streams: int) -> dict[str, Any]:
    """iperf3 over loopback, -P streams, -n the image's size: the same bytes, so the same
    duration scale as a migration of the image."""
    port = str(free_port())
    server = subprocess.Popen(["iperf3", "-s", "-1", "-p", port, "--forceflush"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert server.stdout is not None
        deadline = time.monotonic() + 10
        while b"listening" not in server.stdout.readline():
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("iperf3 server did not start")
        t0 = time.perf_counter()
        client = subprocess.Popen(["iperf3", "-c", "127.0.0.1", "-p", port, "-P", str(streams),
                                   "-n", str(size), "-J"], stdout=subprocess.PIPE)
        assert client.stdout is not None
        out = client.stdout.read()
        crc, cuser, csys = reap(client)
        wall = time.perf_counter() - t0
        server.stdout.read()
        _, suser, ssys = reap(server)
    finally:
        for p in (server, *([client] if "client" in locals() else [])):
            if p.returncode is None:
                p.kill()
                reap(p)
    if crc:
        raise RuntimeError(f"iperf3 client exited {crc}: {out[-500:]!r}")
    end = json.loads(out)["end"]
    rate = end["sum_received"]["bits_per_second"] / 8
    gib = size / GiB
    return {
        "wall_s": round(wall, 4),
        "bytes_per_s": round(rate),
        "seconds": round(end["sum_received"]["seconds"], 4),
        "sender_cpu_s_per_gib": round((cuser + csys) / gib, 3),
        "receiver_cpu_s_per_gib": round((suser + ssys) / gib, 3),
    }


def cli_start_cost(n: int = 3) -> dict[str, float]:
    """What starting the CLI costs before any page moves (`zcmigrate --version`): part of every
    send's wall time and CPU."""
    walls, cpus = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        p = subprocess.Popen(cli("--version"), cwd=ROOT, stdout=subprocess.DEVNULL)
        _, user, sys_ = reap(p)
        walls.append(time.perf_counter() - t0)
        cpus.append(user + sys_)
    return {"wall_s": round(statistics.median(walls), 3),
            "cpu_s": round(statistics.median(cpus), 3)}


# ------------------------------------------------------------------ summary


def med(values: list[float]) -> float:
    return float(statistics.median(values))


def summarize(runs: list[dict[str, Any]], size: int) -> tuple[list[dict[str, Any]],
                                                              dict[int, dict[str, Any]]]:
    limits: dict[int, dict[str, Any]] = {}
    for r in runs:
        if r["kind"] == "iperf3":
            limits.setdefault(r["streams"], {"streams": r["streams"], "runs": []})["runs"].append(r)
    for lim in limits.values():
        rs = lim.pop("runs")
        lim.update(bytes_per_s=round(med([r["bytes_per_s"] for r in rs])),
                   bytes_per_s_all=[r["bytes_per_s"] for r in rs], n=len(rs))
    groups: dict[tuple[str, int, bool], list[dict[str, Any]]] = {}
    for r in runs:
        if r["kind"] == "migration":
            groups.setdefault((r["image"], r["channels"], r["zero_copy"]), []).append(r)
    table = []
    for (image, ch, zc), rs in groups.items():
        wall = med([r["wall_s"] for r in rs])
        rate = size / wall
        lim = limits.get(ch, {}).get("bytes_per_s")
        tt = [r["total_time_ms"] for r in rs if r["total_time_ms"]]
        table.append({
            "image": image, "channels": ch, "zero_copy": zc, "n": len(rs),
            "wall_s": round(wall, 4),
            "bytes_per_s": round(rate),
            "ratio_to_iperf3": round(rate / lim, 3) if lim else None,
            "total_time_ms": round(med(tt)) if tt else None,
            "ratio_to_iperf3_total_time": round(size / (med(tt) / 1000) / lim, 3)
            if lim and tt else None,
            "src_user_s_per_gib": round(med([r["src_user_s"] for r in rs]) / (size / GiB), 3),
            "src_sys_s_per_gib": round(med([r["src_sys_s"] for r in rs]) / (size / GiB), 3),
            "src_cpu_s_per_gib": round(med([r["src_cpu_s_per_gib"] for r in rs]), 3),
            "dst_user_s_per_gib": round(med([r["dst_user_s"] for r in rs]) / (size / GiB), 3),
            "dst_sys_s_per_gib": round(med([r["dst_sys_s"] for r in rs]) / (size / GiB), 3),
            "dst_cpu_s_per_gib": round(med([r["dst_cpu_s_per_gib"] for r in rs]), 3),
            "wall_s_all": [r["wall_s"] for r in rs],
        })
    order = {"random": 0, "zero": 1, "half": 2}
    table.sort(key=lambda t: (order.get(t["image"], 9), t["channels"], not t["zero_copy"]))
    return table, limits


def markdown(table: list[dict[str, Any]], limits: dict[int, dict[str, Any]]) -> str:
    lines = [
        "| image | channels | zero copy | GB/s | vs iperf3 | wall s | total-time ms "
        "| src CPU s/GiB (user+sys) | dst CPU s/GiB (user+sys) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        lines.append(
            f"| {t['image']} | {t['channels']} | {'on' if t['zero_copy'] else 'off'} "
            f"| {t['bytes_per_s'] / 1e9:.2f} | {t['ratio_to_iperf3'] or 0:.0%} "
            f"| {t['wall_s']:.3f} | {t['total_time_ms']} "
            f"| {t['src_cpu_s_per_gib']:.2f} ({t['src_user_s_per_gib']:.2f}+"
            f"{t['src_sys_s_per_gib']:.2f}) "
            f"| {t['dst_cpu_s_per_gib']:.2f} ({t['dst_user_s_per_gib']:.2f}+"
            f"{t['dst_sys_s_per_gib']:.2f}) |")
    for p, lim in sorted(limits.items()):
        lines.append(f"| iperf3 -P {p} | {p} | | {lim['bytes_per_s'] / 1e9:.2f} | 100% "
                     "| | | | |")
    return "\n".join(lines) + "\n"


def chart(table: list[dict[str, Any]], limits: dict[int, dict[str, Any]], doc: dict[str, Any],
          path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing (pip install '.[bench]'): no chart", file=sys.stderr)
        return False
    images = [i for i in ("random", "zero", "half") if any(t["image"] == i for t in table)]
    channels = sorted({t["channels"] for t in table})
    fig, axes = plt.subplots(1, len(images), figsize=(4.2 * len(images), 4.2), sharey=True,
                             squeeze=False)
    top = max([t["bytes_per_s"] for t in table] + [v["bytes_per_s"] for v in limits.values()])
    width = 0.36
    for ax, image in zip(axes[0], images, strict=True):
        for k, (zc, color) in enumerate(((False, "#4c72b0"), (True, "#dd8452"))):
            xs, ys = [], []
            for i, ch in enumerate(channels):
                row = next((t for t in table if t["image"] == image and t["channels"] == ch
                            and t["zero_copy"] == zc), None)
                if row:
                    xs.append(i + (k - 0.5) * width)
                    ys.append(row["bytes_per_s"] / 1e9)
            bars = ax.bar(xs, ys, width, color=color,
                          label=f"zcmigrate, zero copy {'on' if zc else 'off'}")
            for b, y in zip(bars, ys, strict=True):
                ax.annotate(f"{y:.2f}", (b.get_x() + b.get_width() / 2, y), ha="center",
                            va="bottom", fontsize=7)
        for i, ch in enumerate(channels):
            if ch in limits:
                y = limits[ch]["bytes_per_s"] / 1e9
                ax.hlines(y, i - 0.45, i + 0.45, colors="black", linewidth=2,
                          label="iperf3, same streams (the limit)" if i == 0 else None)
        ax.set_xticks(range(len(channels)), [str(c) for c in channels])
        ax.set_xlabel("channels (iperf3 -P)")
        ax.set_title(f"{image} image")
        ax.set_ylim(0, top / 1e9 * 1.15)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("image GB/s (median; wall time of send)")
    axes[0][0].legend(loc="upper left", fontsize=7)
    mount = doc.get("image_dir_mount", "")
    huge = next((o for o in mount.split(",") if o.startswith("huge=")), "huge=never")
    where = f"images on {doc.get('image_dir', '/dev/shm')} (tmpfs {huge})"
    fig.suptitle(f"zcmigrate over loopback: {doc['image_bytes'] >> 20} MiB static image, "
                 f"median of {doc['runs_per_configuration']}, {doc['cores']} cores, {where}",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------ main


def mount_options(path: Path) -> str:
    """The mount line of the filesystem holding `path` (huge pages or not matters)."""
    best = ""
    target = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, mnt, fstype, opts, *_ = line.split()
        if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                best.split(" ")[1] if best else ""):
            best = f"{dev} {mnt} {fstype} {opts}"
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=GiB, help="image size (default 1G)")
    ap.add_argument("--runs", type=int, default=5, help="runs per configuration (default 5)")
    ap.add_argument("--channels", default="1,2,4")
    ap.add_argument("--zero-copy", default="on,off")
    ap.add_argument("--images", default="random,zero,half")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--chart", type=Path, default=None,
                    help="PNG path (default OUT/throughput.png)")
    ap.add_argument("--table", type=Path, default=None,
                    help="Markdown table path (default OUT/table.md)")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip comparing each received image with its source")
    ap.add_argument("--no-iperf3", action="store_true")
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm"),
                    help="where the images live (default /dev/shm); e.g. a tmpfs mounted "
                    "with huge=within_size, as docs/performance.md recommends")
    ap.add_argument("--replot", type=Path, default=None, metavar="RESULTS_JSON",
                    help="only redraw the chart and table of an earlier run's JSON")
    args = ap.parse_args(argv)
    if args.replot:
        old = json.loads(args.replot.read_text())
        lims = {int(k): v for k, v in old["limits"].items()}
        (args.table or args.out / "table.md").write_text(markdown(old["configurations"], lims))
        chart(old["configurations"], lims, old, args.chart or args.out / "throughput.png")
        return 0

    global WORK
    WORK = args.dir / "zcmigrate-bench"
    channels = [int(c) for c in args.channels.split(",")]
    zcs = [{"on": True, "off": False}[z.strip()] for z in args.zero_copy.split(",")]
    images = [i.strip() for i in args.images.split(",")]
    if not args.no_iperf3 and shutil.which("iperf3") is None:
        ap.error("iperf3 is missing: apt-get install -y iperf3 (or pass --no-iperf3)")
    WORK.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "children.log"
    log.write_bytes(b"")
    paths = {}
    for kind in images:
        paths[kind] = WORK / f"{kind}-{args.size}.img"
        if not paths[kind].exists() or paths[kind].stat().st_size != args.size:
            print(f"making the {kind} image", file=sys.stderr)
            make_image(paths[kind], args.size, kind)

    configs: list[tuple[Any, ...]] = [("migration", i, n, zc)
                                      for i in images for n in channels for zc in zcs]
    if not args.no_iperf3:
        configs += [("iperf3", n) for n in channels]
    runs: list[dict[str, Any]] = []
    for rnd in range(args.runs):
        # Interleave: each round starts one configuration further on, so none always runs
        # first or after the same neighbour (ARCHITECTURE.md, "Facts").
        k = (rnd * max(1, len(configs) // args.runs)) % len(configs)
        for cfg in configs[k:] + configs[:k]:
            warm = warm_up(args.size)
            if cfg[0] == "iperf3":
                r = {"kind": "iperf3", "streams": cfg[1], **iperf3_once(args.size, cfg[1])}
                what = f"iperf3 -P {cfg[1]}"
            else:
                _, image, n, zc = cfg
                r = {"kind": "migration", "image": image, "channels": n, "zero_copy": zc,
                     **migrate_once(paths[image], args.size, n, zc, log, not args.no_verify)}
                what = f"{image} ch{n} zc {'on' if zc else 'off'}"
            r.update(round=rnd, warm_up_s=round(warm, 3))
            runs.append(r)
            print(f"round {rnd} {what}: {r['bytes_per_s'] / 1e9:.2f} GB/s", file=sys.stderr)

    table, limits = summarize(runs, args.size)
    iperf_version = ""
    if not args.no_iperf3:
        iperf_version = subprocess.run(["iperf3", "--version"], capture_output=True,
                                       text=True).stdout.splitlines()[0]
    doc: dict[str, Any] = {
        "benchmark": "zcmigrate send --static / receive over loopback vs iperf3",
        "command": "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cores": os.cpu_count(),
        "image_dir": str(args.dir),
        "image_dir_mount": mount_options(args.dir),
        "cores_usable": len(os.sched_getaffinity(0)),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "iperf3": iperf_version,
        "iperf3_note": "iperf3 3.12 runs all -P streams in one thread; -n the image size",
        "image_bytes": args.size,
        "page_size": PAGE,
        "runs_per_configuration": args.runs,
        "throughput": "image bytes / wall time from the send child's start to its exit "
                      "(ratio_to_iperf3_total_time uses the migration's own total-time)",
        "cpu": "wait4 rusage of each child, whole process (interpreter start included)",
        "cli_start": cli_start_cost(),
        "note": "loopback always copies (every zero-copy completion COPIED)",
        "limits": {str(k): v for k, v in sorted(limits.items())},
        "configurations": table,
        "runs": runs,
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"results-{stamp}.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = markdown(table, limits)
    (args.table or args.out / "table.md").write_text(md)
    chart(table, limits, doc, args.chart or args.out / "throughput.png")
    json.dump(doc, sys.stdout, indent=2)
    print()
    with contextlib.suppress(OSError):
        (WORK / "dst.img").unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
