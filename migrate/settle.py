"""Settling a guest left held paused after its device state left, when the source could
not learn whether the destination committed: resume it here (the destination did not
commit; QEMU's `cont`), or retire it (it did: mark the image handed over and let the
paused guest exit; its pages stay in the image). Refused while a migration owns the
image. It knows the guest's handle and the image lock, not the command line.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from zcmigrate.migrate.errors import ImageBusy
from zcmigrate.migrate.guest import (
    GuestControl,
    GuestError,
    GuestRequest,
    GuestState,
    LeaseMode,
    mark_handed_over,
    owner_alive,
    read_control_record,
)
from zcmigrate.migrate.imagefiles import control_path, lock_path, resume_path
from zcmigrate.migrate.imagelock import ImageLock, holder_pid, process_name
from zcmigrate.migrate.postcopy_resume import POSTCOPY_CHECK, remove_resume_record

SETTLE_TIMEOUT_S: Final = 5.0
CHECK_DESTINATION: Final = (
    "on the destination, `zcmigrate guest --check DEST_IMAGE` says \"no device state\" "
    "if it did not commit, and gives an oracle verdict if it did (the receiver logs the "
    "migration's UUID with its commit)"
)


@dataclass(frozen=True, slots=True)
class Settled:
    """What a settle command did, for the one who asked."""

    image: Path
    action: str
    """"resumed", "running" (nothing to do), "retired" or "marked" (no guest ran)."""
    pid: int
    """The guest's pid (the last guest's, for "marked")."""
    message: str


def resume_paused_guest(image: str | os.PathLike[str], timeout: float = SETTLE_TIMEOUT_S,
                        *, postcopy_never_started: bool = False) -> Settled:
    """`zcmigrate resume IMAGE`: take IMAGE.lock, then settle_resume the guest on it.

    An interrupted post-copy (IMAGE.postcopy-resume) is refused: its guest may run on the
    destination. `postcopy_never_started` is the operator's word that it does not (the
    device state left but the destination never received it, so never started the
    guest: POSTCOPY_CHECK); the guest resumes here and the record goes."""
    path = Path(image)
    with _own_image(path, "resume"):
        record = resume_path(path)
        if record.exists() and not postcopy_never_started:
            # Post-copy: the guest may have run on the destination from the switch on, so
            # it may have changed since this copy paused; then this copy must never run.
            raise GuestError(
                f"refusing to resume the guest on {path}: a post-copy of it was interrupted "
                f"({record.name}) after its device state left, so its guest may run on the "
                f"destination, waiting for pages from here. If it does, finish it: "
                f"`zcmigrate send {path} --resume --to HOST:PORT`. To tell: "
                f"{POSTCOPY_CHECK}; only then `zcmigrate resume {path} "
                "--postcopy-never-started` (docs/operations.md, \"Post-copy recovery\")")
        try:
            ctl = GuestControl.open(path)
        except GuestError as e:
            raise GuestError(_no_guest(path, "resume", e)) from None
        with ctl:
            settled = settle_resume(ctl, timeout)
        if record.exists():
            # Only once the guest runs here again: a failed resume leaves the refusal.
            remove_resume_record(path)
        return settled


def retire_paused_guest(image: str | os.PathLike[str], timeout: float = SETTLE_TIMEOUT_S
                        ) -> Settled:
    """`zcmigrate retire IMAGE`: take IMAGE.lock, then settle_retire the guest on it, or
    mark the control file of a held guest that no longer runs."""
    path = Path(image)
    with _own_image(path, "retire"):
        try:
            ctl = GuestControl.open(path)
        except GuestError as e:
            record = read_control_record(path)
            if record is None:
                raise GuestError(_no_guest(path, "retire", e)) from None
            if record.lease.handed_over_ns:
                return Settled(path, "marked", record.pid,
                               f"{path} is already marked handed over; no guest runs on it")
            if record.lease.mode != LeaseMode.HOLD:
                raise GuestError(
                    f"refusing to retire {path}: its last guest (pid {record.pid}) was not "
                    "held paused with its device state gone, so no destination can have "
                    f"committed it; start it again with `zcmigrate guest {path}`"
                ) from None
            mark_handed_over(path)
            remove_resume_record(path)
            return Settled(
                path, "marked", record.pid,
                f"marked {path} handed over (migration {record.lease.migration_name}): its "
                f"last guest (pid {record.pid}) ended held paused, and no guest may start "
                "on it now without --force; its pages stay in the image",
            )
        with ctl:
            settled = settle_retire(ctl, timeout=timeout)
        # A post-copy whose commit came without its acknowledgement is over too.
        remove_resume_record(path)
        return settled


def settle_resume(ctl: GuestControl, timeout: float = SETTLE_TIMEOUT_S) -> Settled:
    """Resume a guest left paused: the destination did not commit. The caller owns the
    image (holds IMAGE.lock). Refused for a guest handed over, or paused by another
    migration that still runs (it decides); a running guest is left as it is."""
    image, lease = ctl.image, ctl.lease
    if lease.handed_over_ns:
        raise GuestError(
            f"refusing to resume the guest (pid {ctl.pid}) on {image}: it was handed over to "
            f"a destination (migration {lease.migration_name}); resuming it here would run a "
            "second copy"
        )
    if ctl.state == GuestState.RUNNING and ctl.request != GuestRequest.PAUSE:
        return Settled(image, "running", ctl.pid,
                       f"the guest (pid {ctl.pid}) on {image} runs already; nothing to resume")
    _refuse_a_live_owner(ctl, "resume")
    held = lease.mode == LeaseMode.HOLD
    ctl.resume(timeout)
    why = (
        f"it was held paused after the device state left with migration "
        f"{lease.migration_name} (pid {lease.owner}, gone)" if held
        else "its pause had no live owner"
    )
    return Settled(
        image, "resumed", ctl.pid,
        f"resumed the guest (pid {ctl.pid}) on {image}: it runs here again ({why}). If the "
        "destination did commit after all, two copies now run: check it "
        f"({CHECK_DESTINATION}) and stop one",
    )


def settle_retire(ctl: GuestControl, uuid: bytes | None = None,
                  timeout: float = SETTLE_TIMEOUT_S) -> Settled:
    """Retire a guest held paused after its device state left: the destination did
    commit. Marks the control file handed over (migration `uuid`, else the one the
    lease names) and has the guest exit; the image keeps its pages. The caller owns the
    image (holds IMAGE.lock). Refused for a guest that runs, or whose pause is not a
    hold (its device state never left), or is held by another migration that still
    runs."""
    image, lease = ctl.image, ctl.lease
    if not lease.handed_over_ns:
        if ctl.state != GuestState.PAUSED or ctl.request != GuestRequest.PAUSE:
            raise GuestError(
                f"refusing to retire the guest (pid {ctl.pid}) on {image}: it is not paused. "
                "Only a guest held paused after its device state left can be retired; to "
                f"stop this one, `kill -TERM {ctl.pid}`"
            )
        if lease.mode != LeaseMode.HOLD:
            raise GuestError(
                f"refusing to retire the guest (pid {ctl.pid}) on {image}: its pause is not a "
                f"hold (lease {lease.mode.name.lower()}), so its device state never left and "
                f"no destination can have committed it; resume it: `zcmigrate resume {image}`"
            )
        _refuse_a_live_owner(ctl, "retire")
    ctl.hand_over(uuid, timeout=timeout)
    name = ctl.lease.migration_name
    return Settled(
        image, "retired", ctl.pid,
        f"retired the guest (pid {ctl.pid}) on {image}: marked handed over (migration "
        f"{name}) and exited; its pages stay in {image}, and `zcmigrate guest {image}` "
        "now refuses to start it without --force. The guest runs on the destination: "
        f"start it there with `zcmigrate guest DEST_IMAGE --resume` if it does not run yet",
    )


def _refuse_a_live_owner(ctl: GuestControl, verb: str) -> None:
    lease = ctl.lease
    if lease.owner == os.getpid():
        return  # the job settling its own pause
    if lease.mode in (LeaseMode.RESUME_IF_OWNER_DIES, LeaseMode.HOLD) and owner_alive(
        lease.owner, lease.owner_start
    ):
        raise GuestError(
            f"refusing to {verb} the guest (pid {ctl.pid}) on {ctl.image}: the migration "
            f"that paused it still runs (pid {lease.owner}: {process_name(lease.owner)}) and "
            f"decides; stop it first (`zcmigrate cancel {ctl.image}`, or kill it if it is "
            "stuck)"
        )


def _no_guest(image: Path, verb: str, cause: GuestError) -> str:
    record = read_control_record(image)
    if record is not None and record.lease.mode == LeaseMode.HOLD and not (
        record.lease.handed_over_ns
    ):
        return (
            f"nothing to {verb}: {cause}. Its last guest ended held paused after its device "
            f"state left: if the destination did not commit ({CHECK_DESTINATION}), start "
            f"it again with `zcmigrate guest {image} --force`; if it did, `zcmigrate retire "
            f"{image}`"
        )
    return f"nothing to {verb}: {cause}"


@contextlib.contextmanager
def _own_image(image: Path, verb: str) -> Iterator[ImageLock]:
    """IMAGE.lock for the settle command's whole run: no migration starts meanwhile, and
    one that runs refuses the command (it decides what happens to its guest)."""
    if not control_path(image).exists():
        # Before the lock, which would leave an IMAGE.lock beside a mistyped name.
        raise GuestError(f"nothing to {verb}: no guest control file {control_path(image)}; "
                         f"no guest ran on {image}")
    path = lock_path(image)
    try:
        lock = ImageLock(path, f"zcmigrate {verb}")
    except ImageBusy as e:
        pid = holder_pid(path)
        if pid is None:  # not held after all (it could not be opened), or by nobody named
            raise ImageBusy(f"refusing to {verb} the guest on {image}: {e}") from None
        who = f"pid {pid} ({process_name(pid)})"
        raise ImageBusy(
            f"refusing to {verb} the guest on {image}: a migration owns the image "
            f"({path.name} is held by {who}) and decides what happens to its guest; to "
            f"stop it, use `zcmigrate cancel {image}`"
        ) from None
    with lock:
        yield lock


__all__ = [
    "SETTLE_TIMEOUT_S",
    "Settled",
    "resume_paused_guest",
    "retire_paused_guest",
    "settle_resume",
    "settle_retire",
]
