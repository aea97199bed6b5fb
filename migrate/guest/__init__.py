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
This module re-exports what callers use, so they import from `zcmigrate.migrate.guest`.
"""

from zcmigrate.migrate.guest.device import (
    DEVICE_KIND,
    DEVICE_STATE_MAX_BYTES,
    DEVICE_VERSION,
    DeviceState,
    read_device_state,
    write_device_state,
)
from zcmigrate.migrate.guest.errors import GuestError
from zcmigrate.migrate.guest.handle import (
    ControlRecord,
    GuestControl,
    Postcopy,
    mark_handed_over,
    read_control_record,
)
from zcmigrate.migrate.guest.image import FILLS, create_image
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
from zcmigrate.migrate.guest.oracle import OracleVerdict, check_oracle
from zcmigrate.migrate.guest.owners import (
    guest_holder,
    owner_alive,
    process_start_time,
    threads_waiting_for_pages,
)
from zcmigrate.migrate.guest.postcopy import PostcopyProtocolError
from zcmigrate.migrate.guest.postcopy_handle import PostcopyGuest
from zcmigrate.migrate.guest.postcopy_link import GO_TIMEOUT_S
from zcmigrate.migrate.guest.workload import TICK_NS, run_guest

# The files beside an image are named in migrate/imagefiles.py; these two are re-exported
# for callers that reach the guest's files through the guest (source.py).
from zcmigrate.migrate.imagefiles import control_path, state_path

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
