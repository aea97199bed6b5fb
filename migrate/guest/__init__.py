"""The guest stand-in: a process that increments byte 0 of every page of a shared image
and marks each write in a dirty bitmap it shares with the migration; the migration's
handle on it, its device state and the oracle; started post-copy, its link to the
receiver that serves its missing pages. It knows no migration channel or packet: its one
socket is that local link (channel/fdpass.py), through postcopy_link.py.

One module per concern: layout (the control file's contract), device (the device
state), image (creating and opening images), oracle (the end-to-end check), owners (is a
lease's owner alive, which guest holds an image), workload (the running guest), handle
(GuestControl, the migration's side), and for post-copy postcopy (the link's records),
postcopy_link (the guest's end) and postcopy_handle (PostcopyGuest, the receiver's end).
This module re-exports what callers use, so they import from `zcmigrate.migrate.guest`;
it loads a submodule only when one of its names is first asked for, so that `send`,
which needs the handle alone, does not pay for the workload, the oracle or post-copy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zcmigrate.migrate.guest.device import (
        DEVICE_KIND,
        DEVICE_STATE_MAX_BYTES,
        DEVICE_VERSION,
        DeviceState,
        read_device_state,
        write_device_state,
    )
    from zcmigrate.migrate.guest.errors import (
        GuestError,
    )
    from zcmigrate.migrate.guest.handle import (
        ControlRecord,
        GuestControl,
        Postcopy,
        mark_handed_over,
        read_control_record,
    )
    from zcmigrate.migrate.guest.image import (
        FILLS,
        create_image,
    )
    from zcmigrate.migrate.guest.layout import (
        BITMAP_OFFSET,
        CONTROL_FIELDS,
        CONTROL_MAGIC,
        CONTROL_SIZE,
        CONTROL_VERSION,
        MAX_IMAGE_BYTES,
        MAX_PAGE_SIZE,
        MAX_THROTTLE,
        MIN_PAGE_SIZE,
        GuestRequest,
        GuestState,
        Lease,
        LeaseMode,
        PostcopyPhase,
        bitmap_words,
    )
    from zcmigrate.migrate.guest.oracle import (
        OracleVerdict,
        check_oracle,
    )
    from zcmigrate.migrate.guest.owners import (
        guest_holder,
        owner_alive,
        process_start_time,
        threads_waiting_for_pages,
    )
    from zcmigrate.migrate.guest.postcopy import (
        PostcopyProtocolError,
    )
    from zcmigrate.migrate.guest.postcopy_handle import (
        PostcopyGuest,
    )
    from zcmigrate.migrate.guest.postcopy_link import (
        GO_TIMEOUT_S,
    )
    from zcmigrate.migrate.guest.workload import (
        TICK_NS,
        run_guest,
    )
    from zcmigrate.migrate.imagefiles import (
        control_path,
        state_path,
    )

# name -> the submodule that defines it (the imports above, for type checkers)
_WHERE: dict[str, str] = {
    "BITMAP_OFFSET": "zcmigrate.migrate.guest.layout",
    "CONTROL_FIELDS": "zcmigrate.migrate.guest.layout",
    "CONTROL_MAGIC": "zcmigrate.migrate.guest.layout",
    "CONTROL_SIZE": "zcmigrate.migrate.guest.layout",
    "CONTROL_VERSION": "zcmigrate.migrate.guest.layout",
    "ControlRecord": "zcmigrate.migrate.guest.handle",
    "DEVICE_KIND": "zcmigrate.migrate.guest.device",
    "DEVICE_STATE_MAX_BYTES": "zcmigrate.migrate.guest.device",
    "DEVICE_VERSION": "zcmigrate.migrate.guest.device",
    "DeviceState": "zcmigrate.migrate.guest.device",
    "FILLS": "zcmigrate.migrate.guest.image",
    "GO_TIMEOUT_S": "zcmigrate.migrate.guest.postcopy_link",
    "GuestControl": "zcmigrate.migrate.guest.handle",
    "GuestError": "zcmigrate.migrate.guest.errors",
    "GuestRequest": "zcmigrate.migrate.guest.layout",
    "GuestState": "zcmigrate.migrate.guest.layout",
    "Lease": "zcmigrate.migrate.guest.layout",
    "LeaseMode": "zcmigrate.migrate.guest.layout",
    "MAX_IMAGE_BYTES": "zcmigrate.migrate.guest.layout",
    "MAX_PAGE_SIZE": "zcmigrate.migrate.guest.layout",
    "MAX_THROTTLE": "zcmigrate.migrate.guest.layout",
    "MIN_PAGE_SIZE": "zcmigrate.migrate.guest.layout",
    "OracleVerdict": "zcmigrate.migrate.guest.oracle",
    "Postcopy": "zcmigrate.migrate.guest.handle",
    "PostcopyGuest": "zcmigrate.migrate.guest.postcopy_handle",
    "PostcopyPhase": "zcmigrate.migrate.guest.layout",
    "PostcopyProtocolError": "zcmigrate.migrate.guest.postcopy",
    "TICK_NS": "zcmigrate.migrate.guest.workload",
    "bitmap_words": "zcmigrate.migrate.guest.layout",
    "check_oracle": "zcmigrate.migrate.guest.oracle",
    "control_path": "zcmigrate.migrate.imagefiles",
    "create_image": "zcmigrate.migrate.guest.image",
    "guest_holder": "zcmigrate.migrate.guest.owners",
    "mark_handed_over": "zcmigrate.migrate.guest.handle",
    "owner_alive": "zcmigrate.migrate.guest.owners",
    "process_start_time": "zcmigrate.migrate.guest.owners",
    "read_control_record": "zcmigrate.migrate.guest.handle",
    "read_device_state": "zcmigrate.migrate.guest.device",
    "run_guest": "zcmigrate.migrate.guest.workload",
    "state_path": "zcmigrate.migrate.imagefiles",
    "threads_waiting_for_pages": "zcmigrate.migrate.guest.owners",
    "write_device_state": "zcmigrate.migrate.guest.device",
}


def __getattr__(name: str) -> Any:
    """PEP 562: import the submodule that defines `name` on first use, then cache it."""
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value
    return value

__all__ = [
    "BITMAP_OFFSET",
    "CONTROL_FIELDS",
    "CONTROL_MAGIC",
    "CONTROL_SIZE",
    "CONTROL_VERSION",
    "DEVICE_KIND",
    "DEVICE_STATE_MAX_BYTES",
    "DEVICE_VERSION",
    "FILLS",
    "GO_TIMEOUT_S",
    "MAX_IMAGE_BYTES",
    "MAX_PAGE_SIZE",
    "MAX_THROTTLE",
    "MIN_PAGE_SIZE",
    "TICK_NS",
    "ControlRecord",
    "DeviceState",
    "GuestControl",
    "GuestError",
    "GuestRequest",
    "GuestState",
    "Lease",
    "LeaseMode",
    "OracleVerdict",
    "Postcopy",
    "PostcopyGuest",
    "PostcopyPhase",
    "PostcopyProtocolError",
    "bitmap_words",
    "check_oracle",
    "control_path",
    "create_image",
    "guest_holder",
    "mark_handed_over",
    "owner_alive",
    "process_start_time",
    "read_control_record",
    "read_device_state",
    "run_guest",
    "state_path",
    "threads_waiting_for_pages",
    "write_device_state",
]
