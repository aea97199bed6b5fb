"""The start-up benchmark: CPU time (user+sys) a `zcmigrate` process spends before it does
any work, as a user runs it (`python -m zcmigrate`), medians of --runs runs.

- send: `send --static IMAGE --to 127.0.0.1:PORT` to a port that is bound but not
  listening, so the connect is refused at once and the process exits 1: everything it
  paid is start-up, argument parsing, mapping the image and the failed connect.
- receive: `receive IMAGE --listen 127.0.0.1:0`, killed (SIGKILL) as soon as it printed
  "listening:": its CPU up to the moment it could accept a source.
- version: `--version`, the floor (interpreter, site, the group).

CPU comes from wait4's rusage of each child alone; configurations are interleaved, after
one warm-up run each that leaves the bytecode caches written. On a shared machine CPU
time moves with the load; --instructions adds one run of each under valgrind's
callgrind, whose instruction count does not (receive then stops on SIGTERM, not SIGKILL,
so that callgrind can report: its clean shutdown is counted too).
It drives the product as a user does and imports nothing of it.

    python bench/startup.py --runs 15 [--instructions]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

IMAGE_BYTES = 1 << 20


def reap(proc: subprocess.Popen[bytes]) -> tuple[int, float, float]:
    """(exit code, user s, sys s) of one child, from wait4's rusage of that child alone."""
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, ru.ru_utime, ru.ru_stime


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "zcmigrate", *args]


def run_to_exit(args: list[str], cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    code, user, sys_ = reap(proc)
    return {"wall_s": time.perf_counter() - t0, "user_s": user, "sys_s": sys_, "exit": code}


def run_to_line(args: list[str], prefix: bytes, cwd: Path, env: dict[str, str],
                timeout: float = 30.0) -> dict[str, Any]:
    """Start, wait for a line starting with `prefix` on stdout, then SIGKILL: the CPU it
    spent up to that line (and the few microseconds until the signal lands)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    seen = False
    try:
        # The child is ours and a benchmark may hang: a timer kills it if it never speaks.
        timer = _kill_after(proc, timeout)
        for line in proc.stdout:
            if line.startswith(prefix):
                seen = True
                break
        wall = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        timer.cancel()
        proc.stdout.close()
        code, user, sys_ = reap(proc)
    if not seen:
        raise RuntimeError(f"{args} never printed {prefix!r} (exit {code})")
    return {"wall_s": wall, "user_s": user, "sys_s": sys_, "exit": code}


def _kill_after(proc: subprocess.Popen[bytes], seconds: float) -> threading.Timer:
    def kill() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)

    t = threading.Timer(seconds, kill)
    t.daemon = True
    t.start()
    return t


def instructions(args: list[str], cwd: Path, env: dict[str, str],
                 prefix: bytes | None = None, timeout: float = 600.0) -> int:
    """Instructions executed by one run under callgrind (until a line, then SIGTERM)."""
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                             *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    timer = _kill_after(proc, timeout)
    try:
        if prefix is not None:
            for line in proc.stdout:
                if line.startswith(prefix):
                    proc.send_signal(signal.SIGTERM)
                    break
        _, err = proc.communicate()
    finally:
        timer.cancel()
    m = re.search(rb"Collected : (\d+)", err)
    if not m:
        raise RuntimeError(f"callgrind reported nothing for {args}: {err[-2000:]!r}")
    return int(m.group(1))


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    cpu = [s["user_s"] + s["sys_s"] for s in samples]
    return {
        "n": len(samples),
        "cpu_s_median": round(statistics.median(cpu), 4),
        "user_s_median": round(statistics.median(s["user_s"] for s in samples), 4),
        "sys_s_median": round(statistics.median(s["sys_s"] for s in samples), 4),
        "wall_s_median": round(statistics.median(s["wall_s"] for s in samples), 4),
        "cpu_s_min": round(min(cpu), 4),
        "cpu_s_max": round(max(cpu), 4),
        "exit_codes": sorted({s["exit"] for s in samples}),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--only", default="send,receive,version",
                    help="comma-separated subset of send, receive, version")
    ap.add_argument("--instructions", action="store_true",
                    help="also count each command's instructions once under callgrind")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="zcmigrate-startup-"))
    image = work / "static.img"
    image.write_bytes(os.urandom(IMAGE_BYTES))
    # Bound, never listening: a connect to it is refused at once, and no other process
    # can take the port while we hold it.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    env = {**os.environ, "ZCMIGRATE_RUNTIME_DIR": str(work / "run"), "PYTHONUNBUFFERED": "1"}
    # With bytecode caches, as pip leaves an installed package: the warm-up run writes
    # them for a checkout, and the compiler's time is not start-up's.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    # Not from a source checkout: `python -m` puts the working directory first on sys.path.
    cwd = work
    commands: dict[str, tuple[list[str], Callable[[], dict[str, Any]], bytes | None]] = {}
    send = cli("send", "--static", str(image), "--to", f"127.0.0.1:{port}",
               "--log-format", "json")
    receive = cli("receive", str(work / "dst.img"), "--listen", "127.0.0.1:0",
                  "--log-format", "json")
    version = cli("--version")
    commands["send"] = (send, lambda: run_to_exit(send, cwd, env), None)
    commands["receive"] = (receive, lambda: run_to_line(receive, b"listening:", cwd, env),
                           b"listening:")
    commands["version"] = (version, lambda: run_to_exit(version, cwd, env), None)
    names = [n for n in args.only.split(",") if n]
    samples: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    counted: dict[str, int] = {}
    load_before = os.getloadavg()
    try:
        for n in names:  # one warm-up each: bytecode caches, page cache
            commands[n][1]()
        for rnd in range(args.runs):
            # Interleave, each round starting one further on, so none always runs first.
            k = rnd % len(names)
            for n in names[k:] + names[:k]:
                samples[n].append(commands[n][1]())
        if args.instructions:
            for n in names:
                args_n, _, line = commands[n]
                counted[n] = instructions(args_n, cwd, env, line)
    finally:
        closed.close()
        shutil.rmtree(work, ignore_errors=True)
    doc: dict[str, Any] = {
        "benchmark": "zcmigrate start-up: CPU (user+sys) of a child from wait4, per command",
        "command": "python bench/startup.py " + " ".join(argv if argv is not None
                                                          else sys.argv[1:]),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        # One child runs at a time; start-up is one thread until send connects.
        "children_at_once": 1,
        "python": sys.version.split()[0],
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "commands": {n: " ".join(commands[n][0][1:]) for n in names},
        "results": {n: summarize(samples[n]) for n in names},
    }
    if counted:
        doc["instructions"] = counted
    json.dump(doc, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
