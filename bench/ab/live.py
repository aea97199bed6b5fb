"""A/B of the destination's way into the image in a live migration (bench/live.py's guest,
256 MiB dirtying 64 MiB/s, 2 channels, zero copy off), images in DIR, interleaved; downtime
and CPU. Needs the switch of bench/ab/receive.py (receive_path.patch).

    FILL=half python bench/ab/live.py fd,mmap /var/tmp/zcm-live 5
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import live
import run


def main() -> None:
    modes = sys.argv[1].split(",")
    where, rounds = Path(sys.argv[2]), int(sys.argv[3])
    fill = os.environ.get("FILL", "random")
    live.WORK = where
    where.mkdir(parents=True, exist_ok=True)
    res: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for r in range(rounds):
        for m in modes[r % len(modes):] + modes[:r % len(modes)]:
            run.warm_up(2 * (256 << 20), where)
            os.environ["ZCM_AB"] = m
            x = live.live_once(256 << 20, 64 << 20, 2, False, fill, 300,
                               Path("/tmp/ab-live.log"))
            res[m].append(x)
            print(f"round {r} {m}: downtime {x['downtime_ms']} total {x['total_time_ms']} "
                  f"iterations {x['iterations']} dst {x['dst_cpu_s_per_gib']} oracle "
                  f"{x['oracle_ok']} load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    for m, xs in res.items():
        d = [x["downtime_ms"] for x in xs]
        print(m, "downtime median", statistics.median(d), "range", min(d), max(d),
              "dst CPU median", statistics.median(x["dst_cpu_s_per_gib"] for x in xs),
              file=sys.stderr)
    Path(f"ab-live-{fill}-{where.name}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
