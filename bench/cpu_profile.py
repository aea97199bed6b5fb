"""Profile `zcmigrate send --static` against a real `zcmigrate receive`: where the source's
CPU goes, function by function.

Default: cProfile in every thread of the send process, timed by each thread's own CPU clock
(user+sys, so a C call's share includes the kernel work it causes), as shares of the send
process's CPU from wait4. Python functions and C functions (cffi calls, builtins) apart.
--py-spy: py-spy record (pip install py-spy) instead; it samples wall time, so threads
blocked in waits count too on this VM.

    python bench/cpu_profile.py --size 1G --channels 2 --image random
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import WORK, cli, make_image, parse_size, reap, warm_up

ROOT = Path(__file__).resolve().parent.parent
_PY = re.compile(r"\(.*\.py:\d+\)$|\(<frozen [^>]+>:\d+\)$")


def summarize(folded: Path, top: int) -> dict[str, list[tuple[str, float]]]:
    own: Counter[str] = Counter()
    near: Counter[str] = Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf = re.sub(r":\d+\)$", ")", frames[-1])
        own[("python " if _PY.search(frames[-1]) else "native ") + leaf] += n
        pyframes = [f for f in frames if _PY.search(f)]
        near[re.sub(r":\d+\)$", ")", pyframes[-1]) if pyframes else "(no Python frame)"] += n

    def share(c: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in c.most_common(top)]

    return {"own": share(own), "nearest_python": share(near), "samples": [("all", total)]}


def _child(out: str, cli_args: list[str]) -> None:
    """Run the CLI in this process with a CPU-time cProfile in every thread; dump merged."""
    import cProfile
    import pstats
    import threading
    import time

    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()
    thread_run = threading.Thread.run

    def run(self: threading.Thread) -> None:
        prof = cProfile.Profile(time.thread_time)
        with lock:
            profiles.append(prof)
        prof.enable()
        try:
            thread_run(self)
        finally:
            prof.disable()

    threading.Thread.run = run  # type: ignore[method-assign]
    main_prof = cProfile.Profile(time.thread_time)
    profiles.append(main_prof)
    sys.argv = ["zcmigrate", *cli_args]
    code: object = 0
    main_prof.enable()
    try:
        from zcmigrate.migrate.cli import main as cli_main  # imports count: every send pays them

        cli_main()
    except SystemExit as e:
        code = e.code
    finally:
        main_prof.disable()
    with lock:
        stats = pstats.Stats(profiles[0])
        for prof in profiles[1:]:
            stats.add(prof)
    stats.dump_stats(out)
    sys.exit(code)


def summarize_cprofile(path: Path, cpu_s: float, top: int) -> dict[str, Any]:
    import pstats

    st: Any = pstats.Stats(str(path))
    python: list[tuple[str, float]] = []
    native: list[tuple[str, float]] = []
    for (file, line, func), (_, _, tottime, _, _) in st.stats.items():
        if file == "~":
            native.append((func, tottime))
        else:
            rel = file.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
            python.append((f"{func} ({rel}:{line})", tottime))

    def share(rows: list[tuple[str, float]]) -> list[tuple[str, float, float]]:
        rows.sort(key=lambda r: -r[1])
        return [(name, round(t, 4), round(100 * t / cpu_s, 1)) for name, t in rows[:top]]

    return {"source_cpu_s": round(cpu_s, 3),
            "python_own_time": share(python), "c_calls_own_time": share(native)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        _child(argv[1], argv[2:])
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=1 << 30)
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--zero-copy", choices=["on", "off"], default="off")
    ap.add_argument("--image", choices=["random", "zero", "half"], default="random")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--py-spy", action="store_true", help="py-spy record --native instead")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    if args.py_spy and shutil.which("py-spy") is None:
        ap.error("py-spy is missing: pip install py-spy")
    WORK.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    image = WORK / f"{args.image}-{args.size}.img"
    if not image.exists():
        make_image(image, args.size, args.image)
    dst = WORK / "dst.img"
    for p in (dst, WORK / "dst.img.state"):
        p.unlink(missing_ok=True)
    warm_up(args.size)
    recv = subprocess.Popen(cli("receive", str(dst), "--listen", "127.0.0.1:0",
                                "--accept-timeout", "60", "--log-format", "json"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert recv.stdout is not None
    port = recv.stdout.readline().decode().strip().rsplit(":", 1)[1]
    send_args = ["send", str(image), "--to", f"127.0.0.1:{port}", "--static",
                 "--multifd-channels", str(args.channels), "--multifd-zerocopy", args.zero_copy,
                 "--log-format", "json"]
    folded = args.out / "profile-send.folded"
    prof = args.out / "profile-send.prof"
    if args.py_spy:
        child = subprocess.Popen(["py-spy", "record", "--native", "-r", str(args.rate), "-f",
                                  "raw", "-o", str(folded), "--", *cli(*send_args)],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        child = subprocess.Popen([sys.executable, __file__, "_child", str(prof), *send_args],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rc, user, sys_ = reap(child)
    recv.stdout.read()
    reap(recv)
    for p in (dst, WORK / "dst.img.state"):
        p.unlink(missing_ok=True)
    if rc:
        print(f"send exited {rc}", file=sys.stderr)
        return 1
    doc: dict[str, Any] = {"command": "python bench/cpu_profile.py " + " ".join(argv)}
    if args.py_spy:
        doc.update(folded=str(folded), **summarize(folded, args.top))
    else:
        doc.update(profile=str(prof), **summarize_cprofile(prof, user + sys_, args.top))
    json.dump(doc, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
