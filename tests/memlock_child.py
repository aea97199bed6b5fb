"""Run as a child process with a small RLIMIT_MEMLOCK and no CAP_IPC_LOCK (see
test_memlock.py): sends an mmap over loopback TCP with zero copy, prints JSON.

Arguments: total bytes, bytes per writev, in-flight cap (0: none), and the longest the
reader stalls before it reads (seconds)."""

from __future__ import annotations

import contextlib
import json
import mmap
import sys
import threading
import time

from zcmigrate.channel.errors import ChannelError
from zcmigrate.channel.probe import probe
from zcmigrate.channel.zcsocket import Channel, Listener, connect


def main() -> None:
    total, chunk, cap = (int(a) for a in sys.argv[1:4])
    delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    mm = mmap.mmap(-1, total)
    mm.write(bytes(range(256)) * (total // 256))
    listener = Listener("127.0.0.1", 0)
    received = bytearray(total)
    sender: list[Channel] = []

    def receive() -> None:
        ch = listener.accept(10)
        # A stalled reader keeps sends pinned: it stalls until the sender had to wait (an
        # ENOBUFS retry, or the in-flight cap) or `delay` seconds passed, whichever is
        # first. Seen, not hoped for after a fixed sleep: a busy machine could take longer
        # than any sleep to get the sender that far.
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            if sender:
                st = sender[0].statistics()
                if st.enobufs_retries or st.in_flight_waits:
                    break
            time.sleep(0.001)
        with contextlib.suppress(ChannelError):
            ch.readv_into([received])
        ch.close()

    t = threading.Thread(target=receive)
    t.start()
    ch = connect("127.0.0.1", listener.port, zero_copy=True, in_flight_cap=cap or None)
    sender.append(ch)
    view = memoryview(mm)
    out: dict[str, object] = {"probe": probe().to_dict()}
    try:
        for off in range(0, total, chunk):
            ch.writev([view[off : off + chunk]], zero_copy=True)
        out["flush"] = ch.flush(10)
        out["error"] = None
    except ChannelError as e:
        out["error"] = str(e)
        out["error_type"] = type(e).__name__
    stats = ch.statistics()
    ch.shutdown()
    t.join(10)
    out["stats"] = {k: getattr(stats, k) for k in stats.__slots__}
    out["identical"] = out["error"] is None and received == view[:total]
    del view
    print(json.dumps(out))


if __name__ == "__main__":
    main()
