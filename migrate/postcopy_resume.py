"""The record of a post-copy in progress, beside the image (`IMAGE.postcopy-resume`), on
either end.

On the source: written durably right before the device state leaves, removed once the
destination's COMMIT_ACK came (or the guest was retired by hand). While it exists the
destination's guest may wait for pages only this image holds, so the image must not be
migrated afresh nor its guest resumed here, and `send --resume` finds in it what a new
session needs (the migration's UUID, the page size, the device state the commit must
acknowledge). It survives the sender's death and the host's restart: the pages are in
the image, which nothing frees before the commit.

On the destination: written before the guest gets its go, removed at the commit; a
receiver started with `receive IMAGE --resume` after the last one died finds in it which
migration the waiting guest belongs to. It knows files and JSON, not sockets, guests or
the CLI.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from zcmigrate.migrate.errors import MigrationError
from zcmigrate.migrate.imagefiles import resume_path

_KIND = "zcmigrate-postcopy-resume"
_VERSION = 1
_MAX_BYTES = 4 << 20  # a device state is at most 1 MiB by default: hex doubles it

# What tells, on the destination, whether a post-copy's guest ever got its go there: the
# destination writes DEST_IMAGE.postcopy-resume before the go and replaces it by
# DEST_IMAGE.state at its commit, so with neither the guest never ran there.
POSTCOPY_CHECK: Final = (
    "on the destination, a receiver still waiting for `send --resume`, or "
    "DEST_IMAGE.postcopy-resume, means the guest runs there (finish it with `send "
    "--resume`); if `zcmigrate receive DEST_IMAGE --resume --listen HOST:PORT` says "
    "\"nothing to take over\" and `zcmigrate guest --check DEST_IMAGE` says \"no device "
    "state\", the destination never started it"
)


@dataclass(frozen=True, slots=True)
class ResumeRecord:
    uuid: bytes
    page_size: int
    image_size: int
    device_state: bytes
    destination: str  # HOST:PORT of the last session, for the operator's message only
    role: str = "source"  # or "destination": which end of the migration this image is


def write_resume_record(image: str | os.PathLike[str], record: ResumeRecord) -> None:
    """Durably (a temporary file renamed over the record, then the directory synced): a
    crash right after the device state left must still find it."""
    path = resume_path(image)
    tmp = path.with_name(path.name + ".tmp")
    body = json.dumps({"kind": _KIND, "version": _VERSION, "uuid": record.uuid.hex(),
                       "page-size": record.page_size, "image-size": record.image_size,
                       "device-state": record.device_state.hex(),
                       "destination": record.destination, "role": record.role}).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _sync_dir(path.parent)


def read_resume_record(image: str | os.PathLike[str]) -> ResumeRecord | None:
    """The record beside `image`; None if there is none. MigrationError if it is there but
    unreadable (it is never guessed at: a wrong UUID would be refused anyway)."""
    path = resume_path(image)
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise MigrationError(f"cannot read {path}: {e.strerror}") from e
    try:
        if len(raw) > _MAX_BYTES:
            raise ValueError("too large")
        obj = json.loads(raw)
        if obj.get("kind") != _KIND or obj.get("version") != _VERSION:
            raise ValueError("not a post-copy resume record of this version")
        uuid = bytes.fromhex(obj["uuid"])
        page_size, image_size = obj["page-size"], obj["image-size"]
        role = obj.get("role", "source")
        if role not in ("source", "destination"):
            raise ValueError(f"role {role!r}")
        if (len(uuid) != 16 or type(page_size) is not int or type(image_size) is not int
                or page_size <= 0 or image_size <= 0):
            raise ValueError("bad uuid or sizes")
        return ResumeRecord(uuid=uuid, page_size=page_size, image_size=image_size,
                            device_state=bytes.fromhex(obj["device-state"]),
                            destination=str(obj.get("destination", "")), role=role)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise MigrationError(f"{path} is damaged ({e}); the post-copy it records cannot be "
                             "resumed from it") from e


def remove_resume_record(image: str | os.PathLike[str]) -> None:
    path = resume_path(image)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        _sync_dir(path.parent)


def _sync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["POSTCOPY_CHECK", "ResumeRecord", "read_resume_record", "remove_resume_record",
           "write_resume_record"]
