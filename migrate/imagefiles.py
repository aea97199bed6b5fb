"""The names of the files that live beside an image, in one place: the guest's control
file, the committed device state, the destination's incoming pages, the lock of the one
migration that owns the image, and the control socket's default path. It knows names and
where they go, not what the files hold.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Final

GUEST_SUFFIX: Final = ".guest"
STATE_SUFFIX: Final = ".state"
INCOMING_SUFFIX: Final = ".incoming"
LOCK_SUFFIX: Final = ".lock"
SOCKET_SUFFIX: Final = ".sock"
POSTCOPY_SUFFIX: Final = ".postcopy"
GUEST_LOG_SUFFIX: Final = ".guest.log"
RESUME_SUFFIX: Final = ".postcopy-resume"


def _beside(image: str | os.PathLike[str], suffix: str) -> Path:
    p = Path(image)
    return p.with_name(p.name + suffix)


def control_path(image: str | os.PathLike[str]) -> Path:
    """`<image>.guest`: the control block and dirty bitmap of the guest on `image`."""
    return _beside(image, GUEST_SUFFIX)


def state_path(image: str | os.PathLike[str]) -> Path:
    """`<image>.state`: the device state a destination committed for `image`."""
    return _beside(image, STATE_SUFFIX)


def incoming_path(image: str | os.PathLike[str]) -> Path:
    """`<image>.incoming`: the pages a destination receives, until its commit renames
    them over `image`."""
    return _beside(image, INCOMING_SUFFIX)


def lock_path(image: str | os.PathLike[str]) -> Path:
    """`<image>.lock`: flocked by the one migration, sending or receiving, that owns
    `image`, for as long as it runs (migrate/imagelock.py)."""
    return _beside(image, LOCK_SUFFIX)


def runtime_dir() -> Path:
    """Where control sockets live: $ZCMIGRATE_RUNTIME_DIR, else $XDG_RUNTIME_DIR/zcmigrate,
    else /run/zcmigrate for root and /tmp/zcmigrate-<uid> for others."""
    env = os.environ.get("ZCMIGRATE_RUNTIME_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "zcmigrate"
    return Path("/run/zcmigrate") if os.geteuid() == 0 else Path(f"/tmp/zcmigrate-{os.getuid()}")


def default_socket(image: str | os.PathLike[str]) -> Path:
    """The control socket of the migration of `image`, unless --control-socket says
    otherwise, in runtime_dir(). Named after the image's resolved full path, so that
    /a/vm.img and /b/vm.img never share one (the file name stays in front, for people);
    a socket's path is at most 107 bytes, so the name is cut and the path hashed."""
    full = Path(image).resolve()
    digest = hashlib.sha256(os.fsencode(full)).hexdigest()[:16]
    return runtime_dir() / f"{full.name[:40]}-{digest}{SOCKET_SUFFIX}"


def postcopy_socket(image: str | os.PathLike[str]) -> Path:
    """The Unix socket on which a receiver serves the post-copy guest it started on
    `image` (in runtime_dir(), named as default_socket names control sockets)."""
    return default_socket(image).with_suffix(POSTCOPY_SUFFIX)


def guest_log_path(image: str | os.PathLike[str]) -> Path:
    """`<image>.guest.log`: the output of a guest a receiver started post-copy."""
    return _beside(image, GUEST_LOG_SUFFIX)


def resume_path(image: str | os.PathLike[str]) -> Path:
    """`<image>.postcopy-resume`: on a source, the record of a post-copy whose device state
    left and whose commit was not acknowledged yet (what `send --resume` needs)."""
    return _beside(image, RESUME_SUFFIX)


__all__ = [
    "GUEST_SUFFIX",
    "INCOMING_SUFFIX",
    "LOCK_SUFFIX",
    "SOCKET_SUFFIX",
    "STATE_SUFFIX",
    "control_path",
    "default_socket",
    "guest_log_path",
    "incoming_path",
    "lock_path",
    "postcopy_socket",
    "resume_path",
    "runtime_dir",
    "state_path",
]
