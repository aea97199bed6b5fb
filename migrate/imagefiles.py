"""The names of the files that live beside an image, in one place: the guest's control
file, the committed device state, the destination's incoming pages, and the control
socket's default path. It knows names and where they go, not what the files hold.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

GUEST_SUFFIX: Final = ".guest"
STATE_SUFFIX: Final = ".state"
INCOMING_SUFFIX: Final = ".incoming"
SOCKET_SUFFIX: Final = ".sock"


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
    otherwise: named after the image's file name, in runtime_dir()."""
    return runtime_dir() / f"{Path(image).name}{SOCKET_SUFFIX}"


__all__ = [
    "GUEST_SUFFIX",
    "INCOMING_SUFFIX",
    "SOCKET_SUFFIX",
    "STATE_SUFFIX",
    "control_path",
    "default_socket",
    "incoming_path",
    "runtime_dir",
    "state_path",
]
