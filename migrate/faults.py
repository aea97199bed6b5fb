"""Named points of a migration at which a test may stop this process, to act at an exact
step (kill -9 while the guest is paused, SIGTERM during the commit, a network fault).

ZCMIGRATE_FAULT=point[,point...] arms points; reaching an armed point logs it and sends
this process SIGSTOP, so the test sees it stopped (state T in /proc) and decides what
comes next. Unset, a point costs a set lookup. For the fault suite only; it knows names,
not what happens at them.
"""

from __future__ import annotations

import os
import signal
import threading

import structlog

POINTS = frozenset({
    "source:precopy",  # after the first iteration's sync
    "source:paused",  # the guest paused, the last pages not yet sent
    "source:device-sent",  # the device state written, no acknowledgement yet
    "destination:precopy",  # after the first MULTIFD_FLUSH's sync
    "destination:committing",  # the device state received, nothing renamed yet
    "destination:committed",  # the commit durable, the acknowledgement not yet sent
    "source:postcopy-device-sending",  # post-copy: the guest held, its device state not sent
    "source:postcopy-device-sent",  # post-copy: the device state sent, the guest may run there
    "source:postcopy-pushed",  # post-copy: every background page queued, not yet synced
    "destination:postcopy-ready",  # post-copy: ready said, the device state not yet read
    "destination:postcopy-running",  # post-copy: the guest runs here, pages still missing
    "source:postcopy-resumed",  # send --resume: the destination is served again, no push yet
})

_armed = frozenset(p.strip() for p in os.environ.get("ZCMIGRATE_FAULT", "").split(",")
                   if p.strip())
if _armed - POINTS:
    raise ImportError(f"ZCMIGRATE_FAULT names unknown points {sorted(_armed - POINTS)}; "
                      f"known: {sorted(POINTS)}")


def reached(point: str) -> None:
    assert point in POINTS, point
    if point in _armed:
        structlog.get_logger("zcmigrate.faults").warning("fault point reached; stopping",
                                                         point=point, pid=os.getpid())
        # Directed at this thread, not the process: a process-directed SIGSTOP is taken
        # by whichever thread the kernel picks (the main one, often asleep in a wait), and
        # until that one stops the group this thread runs on past the point (seen: a
        # device state sent after "source:postcopy-device-sending"). This thread takes
        # it on its way out of the call, before the next line of the job.
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
