"""A/B of the destination's way into the image, real `send`/`receive` processes as
bench/run.py runs them, interleaved, each after a warm-up. Needs the temporary switch
(`git apply bench/ab/receive_path.patch`; `git apply -R` afterwards): ZCM_AB=fd (pwrite
through the descriptor) or mmap (the mapping); the lock-or-not A/B of docs/performance.md
was made with an earlier version of the patch (git log bench/ab/receive_path.patch).

    python bench/ab/receive.py fd,mmap /dev/shm 7 1G [random|half|zero]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import run as bench


def main() -> None:
    modes = sys.argv[1].split(",")
    where, runs, size = Path(sys.argv[2]), int(sys.argv[3]), bench.parse_size(sys.argv[4])
    kind = sys.argv[5] if len(sys.argv) > 5 else "random"
    work = where / "zcmigrate-bench"
    work.mkdir(parents=True, exist_ok=True)
    img = work / f"{kind}-{size}.img"
    if not img.exists() or img.stat().st_size != size:
        bench.make_image(img, size, kind)
    res: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for r in range(runs):
        for m in modes[r % len(modes):] + modes[:r % len(modes)]:
            bench.warm_up(size, work)
            os.environ["ZCM_AB"] = m  # the receive child inherits it
            x = bench.migrate_once(img, size, 2, False, Path("/tmp/ab-children.log"), r == 0)
            x["load"] = os.getloadavg()[0]
            res[m].append(x)
            print(f"round {r} {m}: {size / x['wall_s'] / 1e9:.2f} GB/s dst "
                  f"{x['dst_cpu_s_per_gib']:.3f} src {x['src_cpu_s_per_gib']:.3f} "
                  f"load {x['load']:.1f}", file=sys.stderr)
    out: dict[str, dict[str, Any]] = {}
    for m, xs in res.items():
        d = [x["dst_cpu_s_per_gib"] for x in xs]
        w = [x["wall_s"] for x in xs]
        out[m] = {"n": len(xs), "dst_med": round(statistics.median(d), 3), "dst_min": min(d),
                  "dst_max": max(d),
                  "src_med": round(statistics.median(x["src_cpu_s_per_gib"] for x in xs), 3),
                  "gbps_med": round(size / statistics.median(w) / 1e9, 3),
                  "wall_min": min(w), "wall_max": max(w), "dst_all": d, "wall_all": w}
        print(m, {k: v for k, v in out[m].items() if not k.endswith("_all")}, file=sys.stderr)
    Path(f"ab-receive-{int(time.time())}.json").write_text(
        json.dumps({"argv": sys.argv, "results": out, "runs": res}, indent=1))


if __name__ == "__main__":
    main()
