"""What this host allows for MSG_ZEROCOPY: SO_ZEROCOPY on TCP, locked memory, optmem_max.

Facts only, for `zcmigrate check` to judge; it knows nothing of migrations or routes.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
from dataclasses import asdict, dataclass
from typing import Any

from zcmigrate.channel.zcsocket import SO_ZEROCOPY

CAP_IPC_LOCK = 14


@dataclass(frozen=True, slots=True)
class ZeroCopyProbe:
    tcp_zero_copy: bool          # the kernel accepted SO_ZEROCOPY on a TCP socket
    tcp_zero_copy_error: str     # why not, when it did not
    memlock_soft: int | None     # RLIMIT_MEMLOCK in bytes; None = unlimited
    memlock_hard: int | None
    cap_ipc_lock: bool           # pinned pages are not charged against the limit
    optmem_max: int | None       # net.core.optmem_max: the error queue's budget per socket

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def locked_memory_budget(self) -> int | None:
        """Bytes this process may pin for zero copy; None means no limit applies."""
        return None if self.cap_ipc_lock else self.memlock_soft


def _limit(v: int) -> int | None:
    return None if v == resource.RLIM_INFINITY else v


def has_capability(cap: int) -> bool:
    """Whether the effective capability set of this process holds `cap`."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def probe() -> ZeroCopyProbe:
    ok, err = False, ""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
        ok = True
    except OSError as e:
        err = os.strerror(e.errno or 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    optmem = None
    with contextlib.suppress(OSError, ValueError), open("/proc/sys/net/core/optmem_max") as f:
        optmem = int(f.read().strip())
    return ZeroCopyProbe(
        tcp_zero_copy=ok,
        tcp_zero_copy_error=err,
        memlock_soft=_limit(soft),
        memlock_hard=_limit(hard),
        cap_ipc_lock=has_capability(CAP_IPC_LOCK),
        optmem_max=optmem,
    )
