"""What encryption costs: real `zcmigrate send --static` and `receive` processes over loopback,
the same random image migrated with a key and encryption (every data packet sealed,
docs/protocol.md "Sealed packets") and with no key at all, interleaved in one run, with zero
copy on and off, where the images live (--locations, as bench/run.py: a huge-page tmpfs by
default). Prints one JSON document: per configuration the median throughput and CPU, and per
location and zero-copy setting the ratio encrypted / clear (of the medians, and per round),
on wall time from the send process's start (the target's measure) and on the migration's own
total-time. The target (issue 11): encryption keeps at least 60% of the clear throughput.

    python bench/crypto.py --size 1G --runs 3 --channels 2 --zero-copy on,off \
        --locations hugetmpfs [--cipher aes-128-gcm]

--cipher passes `send --cipher`; without it the encrypted runs use send's default.

It drives the product as a user does (bench/run.py's migrate_once); it imports nothing of it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as base  # bench/run.py, a script beside this one (bench/ is no package)

TARGET = 0.60


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=base.parse_size, default=base.GiB)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--zero-copy", default="on,off")
    ap.add_argument("--locations", type=base.location_names, default=["hugetmpfs"])
    ap.add_argument("--disk-backing", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--cipher", default=None,
                    help="send --cipher for the encrypted runs (default: send's own default)")
    ap.add_argument("--out", type=Path, default=base.ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    zcs = [z.strip() == "on" for z in args.zero_copy.split(",") if z.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "crypto-children.log"
    keydir = Path(tempfile.mkdtemp(prefix="zcmigrate-bench-key-"))
    key = keydir / "key"
    subprocess.run(base.cli("keygen", str(key)), check=True, cwd=base.ROOT,
                   capture_output=True)
    keyed = ("--auth-key-file", str(key))
    send_keyed = keyed + (("--cipher", args.cipher) if args.cipher else ())
    # Source, destination and the image (plus the warm-up file) at once in each location.
    locations = [base.Location(n, 3 * args.size + (512 << 20), args.disk_backing)
                 for n in args.locations]
    try:
        return run_all(args, argv, locations, zcs, keyed, send_keyed, log)
    finally:
        for loc in locations:
            loc.teardown()
        key.unlink(missing_ok=True)
        keydir.rmdir()


def undisturbed_ratio(runs: list[dict[str, Any]], location: str,
                      zc: bool) -> dict[str, Any] | None:
    """The ratio of the medians over the runs the host left alone (no steal time): what
    the software does, apart from this VM's hypervisor. None when either side has none."""
    def median_of(enc: bool) -> tuple[float, int] | None:
        quiet = [r["bytes_per_s"] for r in runs
                 if (r["location"], r["zero_copy"], r["encryption"]) == (location, zc, enc)
                 and r["undisturbed"]]
        return (base.med(quiet), len(quiet)) if quiet else None

    enc, clear = median_of(True), median_of(False)
    if enc is None or clear is None:
        return None
    return {"ratio": round(enc[0] / clear[0], 3), "encrypted_runs": enc[1],
            "clear_runs": clear[1]}


def run_all(args: argparse.Namespace, argv: list[str] | None,
            locations: list[base.Location], zcs: list[bool], keyed: tuple[str, ...],
            send_keyed: tuple[str, ...], log: Path) -> int:
    images: dict[str, Path] = {}
    for loc in locations:
        loc.setup()
        path = images[loc.name] = loc.work / f"random-{args.size}.img"
        if not path.exists() or path.stat().st_size != args.size:
            print(f"making the random image in {loc.work}", file=sys.stderr)
            base.make_image(path, args.size, "random")
    configs = [(loc.name, zc, enc) for loc in locations for zc in zcs
               for enc in (True, False)]
    runs: list[dict[str, Any]] = []
    for rnd in range(args.runs):
        # Interleaved, each round one further on (ARCHITECTURE.md, "Facts"), so neither
        # mode always runs first or right after the same neighbour.
        k = rnd % len(configs)
        for name, zc, enc in configs[k:] + configs[:k]:
            work = images[name].parent
            warm = base.warm_up(args.size, work)
            r = base.migrate_once(images[name], args.size, args.channels, zc, log,
                                  not args.no_verify, send_args=send_keyed if enc else (),
                                  recv_args=keyed if enc else ())
            r.update(location=name, zero_copy=zc, encryption=enc, round=rnd,
                     warm_up_s=round(warm, 3), loadavg_1m=os.getloadavg()[0])
            runs.append(r)
            print(f"round {rnd} {name} zc {'on' if zc else 'off'} "
                  f"{'key+encryption' if enc else 'no key'}: "
                  f"{r['bytes_per_s'] / 1e9:.2f} GB/s, src {r['src_cpu_s_per_gib']:.2f} "
                  f"dst {r['dst_cpu_s_per_gib']:.2f} CPU s/GiB", file=sys.stderr)

    table = []
    for name, zc, enc in configs:
        mine = [r for r in runs if (r["location"], r["zero_copy"], r["encryption"])
                == (name, zc, enc)]
        table.append({
            "location": name, "zero_copy": zc, "encryption": enc, "runs": len(mine),
            "bytes_per_s_median": round(base.med([r["bytes_per_s"] for r in mine])),
            "bytes_per_s_all": [r["bytes_per_s"] for r in mine],
            "total_time_ms_median": round(base.med([r["total_time_ms"] for r in mine
                                                    if r["total_time_ms"]] or [0])),
            "src_cpu_s_per_gib_median": round(base.med([r["src_cpu_s_per_gib"]
                                                        for r in mine]), 3),
            "dst_cpu_s_per_gib_median": round(base.med([r["dst_cpu_s_per_gib"]
                                                        for r in mine]), 3),
            "undisturbed_runs": sum(r["undisturbed"] for r in mine),
        })
    ratios = []
    for loc in locations:
        for zc in zcs:
            row = {t["encryption"]: t for t in table
                   if (t["location"], t["zero_copy"]) == (loc.name, zc)}
            per_round = []
            for rnd in range(args.runs):
                got = {r["encryption"]: r["bytes_per_s"] for r in runs
                       if (r["location"], r["zero_copy"], r["round"]) == (loc.name, zc, rnd)}
                per_round.append(round(got[True] / got[False], 3))
            ratio = row[True]["bytes_per_s_median"] / row[False]["bytes_per_s_median"]
            quiet = undisturbed_ratio(runs, loc.name, zc)
            # The same over the migration's own total-time (connect to commit), without
            # the send process's start, which both sides pay alike: a fixed cost in both
            # denominators pulls the wall ratio towards 1, so this one is the lower.
            tt_enc = row[True]["total_time_ms_median"]
            ratio_tt = row[False]["total_time_ms_median"] / tt_enc if tt_enc else 0.0
            ratios.append({"location": loc.name, "zero_copy": zc,
                           "ratio_encrypted_to_clear": round(ratio, 3),
                           "ratio_on_total_time": round(ratio_tt, 3),
                           "ratio_per_round": per_round,
                           "meets_target": ratio >= TARGET,
                           "ratio_undisturbed_runs": quiet})
    doc: dict[str, Any] = {
        "benchmark": "zcmigrate send --static / receive over loopback: key with encryption "
                     "vs no key",
        "command": "python bench/crypto.py " + " ".join(argv if argv is not None
                                                        else sys.argv[1:]),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "kernel": os.uname().release,
        "image": "random",
        "cipher": args.cipher or "send's default",
        "image_bytes": args.size,
        "channels": args.channels,
        "locations": {loc.name: {"dir": str(loc.root), "mount": base.mount_options(loc.work)}
                      for loc in locations},
        "runs_per_configuration": args.runs,
        "throughput": "image bytes / wall time from the send child's start to its exit; "
                      "ratio_on_total_time compares the migrations' own total-time instead "
                      "(connect to commit, without the interpreter's start)",
        "cpu": "wait4 rusage of each child, whole process (interpreter start included)",
        "target": f"encrypted >= {TARGET:.0%} of clear",
        "loadavg_1m_median": round(base.med([r["loadavg_1m"] for r in runs]), 2),
        "note": "loopback always copies (every zero-copy completion COPIED); the machine is "
                "shared, so the numbers are noisy: compare within one run",
        "host": "per run, steal_ticks (the hypervisor took a vCPU away) and reported_mib (free "
                "memory this VM handed back to its host, faulted in again by the next "
                "allocation); undisturbed: no steal. ratio_undisturbed_runs compares those "
                "runs alone",
        "ratios": ratios,
        "configurations": table,
        "runs": runs,
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"crypto-{stamp}.json").write_text(json.dumps(doc, indent=2) + "\n")
    json.dump(doc, sys.stdout, indent=2)
    print()
    for r in ratios:
        print(f"{r['location']} zc {'on' if r['zero_copy'] else 'off'}: encrypted / clear = "
              f"{r['ratio_encrypted_to_clear']:.2f} (per round {r['ratio_per_round']}), "
              f"on total-time {r['ratio_on_total_time']:.2f}; "
              f"over runs without steal time: {r['ratio_undisturbed_runs']}",
              file=sys.stderr)
    for loc in locations:
        (loc.work / "dst.img").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
