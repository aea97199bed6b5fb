"""The throughput benchmark: real `zcmigrate send --static` and `zcmigrate receive` processes
over loopback, against this machine's limit (iperf3 over loopback, same stream count).

Static images (random pages, all-zero, half and half), channels x multifd-zerocopy, and where
the images live (--locations: /dev/shm; a tmpfs mounted huge=within_size; an ext4 file system
on a loop device; the last two made by the bench itself, as root, and removed afterwards),
interleaved with iperf3 and warmed up as ARCHITECTURE.md's "Facts" ask; medians of --runs runs.
Per location it also measures the floor: write(2) of the image's bytes from a cache-hot
buffer into a fresh file there, and its fdatasync, CPU per GiB. Prints one JSON document on
stdout and a table on stderr, writes both and a PNG chart per location (matplotlib, the
`bench` extra) under --out. It drives the product as a user does; it imports nothing of it.

    python bench/run.py --size 1G --runs 5 --channels 1,2,4 --zero-copy on,off \
        --images random,zero,half --locations devshm,hugetmpfs,disk --out bench/results
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
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = Path("/dev/shm/zcmigrate-bench")  # the devshm location's work dir (live.py, cpu_profile.py)
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


def warm_up(size: int, work: Path = WORK) -> float:
    """Write and delete a file of the image's size where the images live: this VM hands freed
    memory back to its host, and a run must not pay for faulting it back in."""
    t0 = time.monotonic()
    path = work / "warm-up"
    zeros = bytes(CHUNK)
    with open(path, "wb") as f:
        for off in range(0, size, CHUNK):
            f.write(zeros[:min(CHUNK, size - off)])
    path.unlink()
    return time.monotonic() - t0


REPORTED_KIB = Path("/sys/module/page_reporting/parameters/reported_kib")


def host_counters() -> tuple[int, int | None]:
    """(steal ticks of all CPUs, KiB this VM has reported free to its host so far, or None
    without page reporting). A run during which either moved paid for the hypervisor: the
    vCPU was taken away (steal), or the memory it allocated had been handed back to the host
    and had to be faulted in there first (docs/performance.md, "Runs the host disturbed")."""
    steal = int(Path("/proc/stat").read_text().split("\n", 1)[0].split()[8])
    try:
        reported: int | None = int(REPORTED_KIB.read_text())
    except (OSError, ValueError):
        reported = None
    return steal, reported


def host_disturbance(before: tuple[int, int | None]) -> dict[str, Any]:
    steal, reported = host_counters()
    out: dict[str, Any] = {"steal_ticks": steal - before[0]}
    if reported is not None and before[1] is not None:
        out["reported_mib"] = (reported - before[1]) // 1024
    out["undisturbed"] = out["steal_ticks"] == 0
    return out


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
                 log: Path, verify: bool, *, send_args: tuple[str, ...] = (),
                 recv_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """One migration; send_args and recv_args go to each command (a key: bench/crypto.py)."""
    work = image.parent
    dst = work / "dst.img"
    for p in (dst, work / "dst.img.state", work / "dst.img.incoming"):
        p.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    host_before = host_counters()
    with open(log, "ab") as errf:
        recv = subprocess.Popen(
            cli("receive", str(dst), "--listen", "127.0.0.1:0", "--json", "--accept-timeout",
                "60", "--log-format", "json", *recv_args),
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
                    "--json", "--log-format", "json", *send_args),
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
    host = host_disturbance(host_before)
    if send_rc or recv_rc:
        raise RuntimeError(f"send exited {send_rc}, receive {recv_rc}; see {log}")
    stats = json.loads(send_out)
    result = json.loads(recv_out[recv_out.index(b"{"):])
    ok = same_content(image, dst) if verify else None
    dst.unlink(missing_ok=True)
    (work / "dst.img.state").unlink(missing_ok=True)
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
        **host,
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


# The floor, run in a child so that its CPU is its own: the image's bytes written with
# pwrite from one cache-hot 256 KiB buffer into a fresh file sized first (as the destination
# sizes its incoming image), then fdatasync (as the destination's commit makes it durable).
_FLOOR = r"""
import json, os, resource, sys, time
path, size = sys.argv[1], int(sys.argv[2])
buf = memoryview(os.urandom(256 << 10))
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
os.ftruncate(fd, size)
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
c0, t0 = cpu(), time.perf_counter()
for off in range(0, size, len(buf)):
    os.pwrite(fd, buf[:size - off], off)
c1, t1 = cpu(), time.perf_counter()
os.fdatasync(fd)
c2, t2 = cpu(), time.perf_counter()
os.close(fd)
print(json.dumps({"write_cpu_s": c1 - c0, "write_wall_s": t1 - t0,
                  "sync_cpu_s": c2 - c1, "sync_wall_s": t2 - t1}))
"""


def floor_once(work: Path, size: int) -> dict[str, Any]:
    """write(2) of `size` bytes into a fresh file in `work`, with its fdatasync: what any
    receiver must at least spend there (CPU in this process; the kernel's writeback threads
    are not counted, for the floor as for the receiver)."""
    path = work / "floor"
    path.unlink(missing_ok=True)
    try:
        out = subprocess.run([sys.executable, "-c", _FLOOR, str(path), str(size)], check=True,
                             capture_output=True, text=True).stdout
    finally:
        path.unlink(missing_ok=True)
    r = json.loads(out)
    gib = size / GiB
    return {
        "write_cpu_s_per_gib": round(r["write_cpu_s"] / gib, 3),
        "sync_cpu_s_per_gib": round(r["sync_cpu_s"] / gib, 3),
        "cpu_s_per_gib": round((r["write_cpu_s"] + r["sync_cpu_s"]) / gib, 3),
        "write_wall_s": round(r["write_wall_s"], 4),
        "sync_wall_s": round(r["sync_wall_s"], 4),
    }


# ------------------------------------------------------------------ locations


def run_quiet(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


@dataclass
class Location:
    """Where the images live. `devshm` and plain directories exist already; `hugetmpfs` (a
    tmpfs mounted huge=within_size) and `disk` (ext4 on a loop device backed by a file under
    --disk-backing) are made by setup() and removed by teardown(), which also runs after a
    failure."""

    name: str
    size_needed: int
    disk_backing: Path
    root: Path = Path()
    _undo: list[list[str]] = field(default_factory=list)
    _remove: list[Path] = field(default_factory=list)

    @property
    def work(self) -> Path:
        return self.root / "zcmigrate-bench"

    def setup(self) -> None:
        if self.name == "devshm":
            self.root = WORK.parent
        elif self.name in ("hugetmpfs", "disk"):
            if os.geteuid() != 0:
                raise SystemExit(f"location {self.name}: the bench mounts it, which needs root")
            self.root = Path(tempfile.mkdtemp(prefix=f"zcmigrate-bench-{self.name}-"))
            self._remove.append(self.root)
            if self.name == "hugetmpfs":
                run_quiet("mount", "-t", "tmpfs", "-o",
                          f"huge=within_size,size={self.size_needed >> 20}m", "tmpfs",
                          str(self.root))
                self._undo.append(["umount", str(self.root)])
            else:
                self.disk_backing.mkdir(parents=True, exist_ok=True)
                backing = Path(tempfile.mkstemp(prefix="zcmigrate-bench-disk-",
                                                suffix=".ext4", dir=self.disk_backing)[1])
                self._remove.append(backing)
                os.truncate(backing, self.size_needed)
                # Direct I/O on the backing file: its pages are not cached twice.
                dev = run_quiet("losetup", "--find", "--show", "--direct-io=on", str(backing))
                self._undo.append(["losetup", "-d", dev])
                run_quiet("mkfs.ext4", "-q", "-F", "-E",
                          "lazy_itable_init=0,lazy_journal_init=0", dev)
                run_quiet("mount", dev, str(self.root))
                self._undo.append(["umount", str(self.root)])
        else:
            self.root = Path(self.name)  # a directory given by path (--dir)
        self.work.mkdir(parents=True, exist_ok=True)

    def teardown(self) -> None:
        for cmd in reversed(self._undo):
            subprocess.run(cmd, capture_output=True)
        self._undo.clear()
        for p in reversed(self._remove):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        self._remove.clear()


def location_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in ("devshm", "hugetmpfs", "disk") and not n.startswith("/"):
            raise argparse.ArgumentTypeError(
                f"location {n!r}: expected devshm, hugetmpfs, disk or a directory's path")
    return names


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


def summarize(runs: list[dict[str, Any]], size: int) -> tuple[
        list[dict[str, Any]], dict[int, dict[str, Any]], dict[str, dict[str, Any]]]:
    limits: dict[int, dict[str, Any]] = {}
    for r in runs:
        if r["kind"] == "iperf3":
            limits.setdefault(r["streams"], {"streams": r["streams"], "runs": []})["runs"].append(r)
    for lim in limits.values():
        rs = lim.pop("runs")
        lim.update(bytes_per_s=round(med([r["bytes_per_s"] for r in rs])),
                   bytes_per_s_all=[r["bytes_per_s"] for r in rs], n=len(rs))
    floors: dict[str, dict[str, Any]] = {}
    for r in runs:
        if r["kind"] == "floor":
            floors.setdefault(r["location"], {"runs": []})["runs"].append(r)
    for loc, fl in floors.items():
        rs = fl.pop("runs")
        fl.update(location=loc, n=len(rs),
                  cpu_s_per_gib=round(med([r["cpu_s_per_gib"] for r in rs]), 3),
                  write_cpu_s_per_gib=round(med([r["write_cpu_s_per_gib"] for r in rs]), 3),
                  sync_cpu_s_per_gib=round(med([r["sync_cpu_s_per_gib"] for r in rs]), 3),
                  cpu_s_per_gib_all=[r["cpu_s_per_gib"] for r in rs])
    groups: dict[tuple[str, str, int, bool], list[dict[str, Any]]] = {}
    for r in runs:
        if r["kind"] == "migration":
            key = (r.get("location", "devshm"), r["image"], r["channels"], r["zero_copy"])
            groups.setdefault(key, []).append(r)
    table = []
    gib = size / GiB
    for (loc, image, ch, zc), rs in groups.items():
        wall = med([r["wall_s"] for r in rs])
        rate = size / wall
        lim = limits.get(ch, {}).get("bytes_per_s")
        tt = [r["total_time_ms"] for r in rs if r["total_time_ms"]]
        floor = floors.get(loc, {}).get("cpu_s_per_gib")
        dst_cpu = med([r["dst_cpu_s_per_gib"] for r in rs])
        table.append({
            "location": loc, "image": image, "channels": ch, "zero_copy": zc, "n": len(rs),
            "wall_s": round(wall, 4),
            "bytes_per_s": round(rate),
            "ratio_to_iperf3": round(rate / lim, 3) if lim else None,
            "total_time_ms": round(med(tt)) if tt else None,
            "ratio_to_iperf3_total_time": round(size / (med(tt) / 1000) / lim, 3)
            if lim and tt else None,
            "src_user_s_per_gib": round(med([r["src_user_s"] for r in rs]) / gib, 3),
            "src_sys_s_per_gib": round(med([r["src_sys_s"] for r in rs]) / gib, 3),
            "src_cpu_s_per_gib": round(med([r["src_cpu_s_per_gib"] for r in rs]), 3),
            "dst_user_s_per_gib": round(med([r["dst_user_s"] for r in rs]) / gib, 3),
            "dst_sys_s_per_gib": round(med([r["dst_sys_s"] for r in rs]) / gib, 3),
            "dst_cpu_s_per_gib": round(dst_cpu, 3),
            "floor_cpu_s_per_gib": floor,
            "dst_cpu_over_floor": round(dst_cpu / floor, 2) if floor else None,
            "wall_s_all": [r["wall_s"] for r in rs],
            "src_cpu_s_per_gib_all": [r["src_cpu_s_per_gib"] for r in rs],
            "dst_cpu_s_per_gib_all": [r["dst_cpu_s_per_gib"] for r in rs],
        })
    order = {"random": 0, "zero": 1, "half": 2}
    locs = {"devshm": 0, "hugetmpfs": 1, "disk": 2}
    table.sort(key=lambda t: (locs.get(t["location"], 9), t["location"],
                              order.get(t["image"], 9), t["channels"], not t["zero_copy"]))
    return table, limits, floors


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else ""


def markdown(table: list[dict[str, Any]], limits: dict[int, dict[str, Any]],
             floors: dict[str, dict[str, Any]] | None = None) -> str:
    floors = floors or {}
    lines = [
        "| location | image | channels | zero copy | GB/s | vs iperf3 | wall s (range) "
        "| src CPU s/GiB (user+sys) | dst CPU s/GiB (user+sys) [range] | floor CPU s/GiB "
        "| dst / floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        floor = t.get("floor_cpu_s_per_gib")
        dst_all = t.get("dst_cpu_s_per_gib_all", [])
        lines.append(
            f"| {t.get('location', 'devshm')} | {t['image']} | {t['channels']} "
            f"| {'on' if t['zero_copy'] else 'off'} "
            f"| {t['bytes_per_s'] / 1e9:.2f} | {t['ratio_to_iperf3'] or 0:.0%} "
            f"| {t['wall_s']:.3f} ({_spread(t['wall_s_all'])}) "
            f"| {t['src_cpu_s_per_gib']:.2f} ({t['src_user_s_per_gib']:.2f}+"
            f"{t['src_sys_s_per_gib']:.2f}) "
            f"| {t['dst_cpu_s_per_gib']:.2f} ({t['dst_user_s_per_gib']:.2f}+"
            f"{t['dst_sys_s_per_gib']:.2f}) [{_spread(dst_all)}] "
            f"| {'' if floor is None else f'{floor:.2f}'} "
            f"| {'' if t.get('dst_cpu_over_floor') is None else t['dst_cpu_over_floor']} |")
    for p, lim in sorted(limits.items()):
        lines.append(f"| | iperf3 -P {p} | {p} | | {lim['bytes_per_s'] / 1e9:.2f} | 100% "
                     "| | | | | |")
    if floors:
        lines += ["", "| location | floor CPU s/GiB: write(2) + fdatasync (write, sync) [range] "
                  "|", "|---|---|"]
        for loc, fl in floors.items():
            lines.append(f"| {loc} | {fl['cpu_s_per_gib']:.2f} ({fl['write_cpu_s_per_gib']:.2f}, "
                         f"{fl['sync_cpu_s_per_gib']:.2f}) [{_spread(fl['cpu_s_per_gib_all'])}] |")
    return "\n".join(lines) + "\n"


def chart(table: list[dict[str, Any]], limits: dict[int, dict[str, Any]], doc: dict[str, Any],
          path: Path, where: str | None = None) -> bool:
    """One location's chart (`table` holds that location's rows)."""
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
    if where is None:
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


def chart_path(base: Path, loc: str, several: bool) -> Path:
    """One chart per location: the path given, or with the location's name added."""
    if not several:
        return base
    tag = loc if not loc.startswith("/") else loc.strip("/").replace("/", "-") or "root"
    return base.with_name(f"{base.stem}-{tag}{base.suffix}")


def describe_location(name: str, directory: str, mount: str) -> str:
    fields = mount.split(" ")
    fstype = fields[2] if len(fields) > 2 else "?"
    opts = fields[3] if len(fields) > 3 else ""
    if name == "disk":
        return f"images on disk ({fstype} on a loop device)"
    if fstype == "tmpfs":
        huge = next((o for o in opts.split(",") if o.startswith("huge=")), "huge=never")
        where = "a tmpfs" if name == "hugetmpfs" else directory
        return f"images in {where} (tmpfs {huge})"
    return f"images in {directory} ({fstype})"


def write_outputs(doc: dict[str, Any], out: Path, chart_base: Path, table_path: Path) -> str:
    table, limits = doc["configurations"], {int(k): v for k, v in doc["limits"].items()}
    floors = doc.get("floors", {})
    md = markdown(table, limits, floors)
    table_path.write_text(md)
    locs = list(dict.fromkeys(t.get("location", "devshm") for t in table))
    mounts = doc.get("locations", {})
    for loc in locs:
        rows = [t for t in table if t.get("location", "devshm") == loc]
        where = describe_location(loc, mounts[loc]["dir"], mounts[loc]["mount"]) \
            if loc in mounts else None
        chart(rows, limits, doc, chart_path(chart_base, loc, len(locs) > 1), where)
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=GiB, help="image size (default 1G)")
    ap.add_argument("--runs", type=int, default=5, help="runs per configuration (default 5)")
    ap.add_argument("--channels", default="1,2,4")
    ap.add_argument("--zero-copy", default="on,off")
    ap.add_argument("--images", default="random,zero,half")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--chart", type=Path, default=None,
                    help="PNG path (default OUT/throughput.png); with several locations, "
                    "one per location with its name added (throughput-disk.png)")
    ap.add_argument("--table", type=Path, default=None,
                    help="Markdown table path (default OUT/table.md)")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip comparing each received image with its source")
    ap.add_argument("--no-iperf3", action="store_true")
    ap.add_argument("--locations", type=location_names, default=None,
                    help="where the images live, comma-separated: devshm (/dev/shm), "
                    "hugetmpfs (a tmpfs mounted huge=within_size in a temporary directory), "
                    "disk (ext4 on a loop device over a file under --disk-backing), or a "
                    "directory's path; the bench makes and removes hugetmpfs and disk (root)")
    ap.add_argument("--dir", type=Path, default=None,
                    help="one directory for the images (the same as --locations DIR); "
                    "default /dev/shm")
    ap.add_argument("--disk-backing", type=Path, default=Path("/var/tmp"),
                    help="where the disk location's backing file goes (default /var/tmp: "
                    "on this machine's disk, not a tmpfs)")
    ap.add_argument("--no-floor", action="store_true",
                    help="skip the write(2) floor of each location")
    ap.add_argument("--replot", type=Path, default=None, metavar="RESULTS_JSON",
                    help="only redraw the chart and table of an earlier run's JSON")
    args = ap.parse_args(argv)
    table_path = args.table or args.out / "table.md"
    chart_base = args.chart or args.out / "throughput.png"
    if args.replot:
        args.out.mkdir(parents=True, exist_ok=True)
        print(write_outputs(json.loads(args.replot.read_text()), args.out, chart_base,
                            table_path), file=sys.stderr)
        return 0
    if args.locations and args.dir:
        ap.error("--dir and --locations: give one")
    if args.locations:
        names = args.locations
    elif args.dir and args.dir.resolve() != Path("/dev/shm"):
        names = [str(args.dir.resolve())]
    else:
        names = ["devshm"]
    channels = [int(c) for c in args.channels.split(",")]
    zcs = [{"on": True, "off": False}[z.strip()] for z in args.zero_copy.split(",")]
    images = [i.strip() for i in args.images.split(",")]
    if not args.no_iperf3 and shutil.which("iperf3") is None:
        ap.error("iperf3 is missing: apt-get install -y iperf3 (or pass --no-iperf3)")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "children.log"
    log.write_bytes(b"")
    # Room for the images, the destination's image and the warm-up file, and some slack.
    needed = (len(images) + 2) * args.size + (512 << 20)
    locations = [Location(n, needed, args.disk_backing) for n in names]
    try:
        return run_all(args, argv, locations, channels, zcs, images, log, table_path,
                       chart_base)
    finally:
        for loc in locations:
            loc.teardown()


def run_all(args: argparse.Namespace, argv: list[str] | None, locations: list[Location],
            channels: list[int], zcs: list[bool], images: list[str], log: Path,
            table_path: Path, chart_base: Path) -> int:
    paths: dict[tuple[str, str], Path] = {}
    for loc in locations:
        loc.setup()
        for kind in images:
            path = paths[loc.name, kind] = loc.work / f"{kind}-{args.size}.img"
            if not path.exists() or path.stat().st_size != args.size:
                print(f"making the {kind} image in {loc.work}", file=sys.stderr)
                make_image(path, args.size, kind)
    by_name = {loc.name: loc for loc in locations}

    configs: list[tuple[Any, ...]] = [("migration", loc.name, i, n, zc) for loc in locations
                                      for i in images for n in channels for zc in zcs]
    if not args.no_floor:
        configs += [("floor", loc.name) for loc in locations]
    if not args.no_iperf3:
        configs += [("iperf3", n) for n in channels]
    runs: list[dict[str, Any]] = []
    for rnd in range(args.runs):
        # Interleave: each round starts one configuration further on, so none always runs
        # first or after the same neighbour (ARCHITECTURE.md, "Facts").
        k = (rnd * max(1, len(configs) // args.runs)) % len(configs)
        for cfg in configs[k:] + configs[:k]:
            if cfg[0] == "iperf3":
                warm = warm_up(args.size, locations[0].work)
                r = {"kind": "iperf3", "streams": cfg[1], **iperf3_once(args.size, cfg[1])}
                what = f"iperf3 -P {cfg[1]}: {r['bytes_per_s'] / 1e9:.2f} GB/s"
            elif cfg[0] == "floor":
                work = by_name[cfg[1]].work
                warm = warm_up(args.size, work)
                r = {"kind": "floor", "location": cfg[1], **floor_once(work, args.size)}
                what = f"{cfg[1]} floor: {r['cpu_s_per_gib']:.2f} s/GiB"
            else:
                _, name, image, n, zc = cfg
                warm = warm_up(args.size, by_name[name].work)
                r = {"kind": "migration", "location": name, "image": image, "channels": n,
                     "zero_copy": zc,
                     **migrate_once(paths[name, image], args.size, n, zc, log,
                                    not args.no_verify)}
                what = (f"{name} {image} ch{n} zc {'on' if zc else 'off'}: "
                        f"{r['bytes_per_s'] / 1e9:.2f} GB/s, dst {r['dst_cpu_s_per_gib']:.2f} "
                        f"s/GiB")
            r.update(round=rnd, warm_up_s=round(warm, 3), loadavg_1m=os.getloadavg()[0])
            runs.append(r)
            print(f"round {rnd} {what}", file=sys.stderr)

    table, limits, floors = summarize(runs, args.size)
    iperf_version = ""
    if not args.no_iperf3:
        iperf_version = subprocess.run(["iperf3", "--version"], capture_output=True,
                                       text=True).stdout.splitlines()[0]
    first = locations[0]
    doc: dict[str, Any] = {
        "benchmark": "zcmigrate send --static / receive over loopback vs iperf3",
        "command": "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cores": os.cpu_count(),
        "image_dir": str(first.root),
        "image_dir_mount": mount_options(first.work),
        "locations": {loc.name: {"dir": str(loc.root), "mount": mount_options(loc.work)}
                      for loc in locations},
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
        "floor": "per location: pwrite of the image's bytes from one cache-hot 256 KiB buffer "
                 "into a fresh file sized first, then fdatasync; CPU of that process only "
                 "(kernel writeback threads are not counted, for the floor as for receive)",
        "loadavg_1m_median": round(med([r["loadavg_1m"] for r in runs]), 2),
        "cli_start": cli_start_cost(),
        "note": "loopback always copies (every zero-copy completion COPIED)",
        "limits": {str(k): v for k, v in sorted(limits.items())},
        "floors": floors,
        "configurations": table,
        "runs": runs,
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"results-{stamp}.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = write_outputs(doc, args.out, chart_base, table_path)
    json.dump(doc, sys.stdout, indent=2)
    print()
    print(md, file=sys.stderr)
    for loc in locations:
        with contextlib.suppress(OSError):
            (loc.work / "dst.img").unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
