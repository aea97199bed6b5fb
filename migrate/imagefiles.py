"""Every file that lives beside an image, named in one place: IMAGE.guest (the guest's
control block and dirty bitmap), IMAGE.state (the committed device state), IMAGE.incoming
(a destination's pages before the commit), IMAGE.lock (held by the one migration that owns
IMAGE). It knows names, not contents.
"""

from __future__ import annotations

import os
from pathlib import Path


def _beside(image: str | os.PathLike[str], suffix: str) -> Path:
    p = Path(image)
    return p.with_name(p.name + suffix)


def control_path(image: str | os.PathLike[str]) -> Path:
    """`IMAGE.guest`: the control block and dirty bitmap of the guest on `image`."""
    return _beside(image, ".guest")


def state_path(image: str | os.PathLike[str]) -> Path:
    """`IMAGE.state`: the device state a destination committed for `image`."""
    return _beside(image, ".state")


def incoming_path(image: str | os.PathLike[str]) -> Path:
    """`IMAGE.incoming`: a destination's pages before the commit renames it to IMAGE."""
    return _beside(image, ".incoming")


def lock_path(image: str | os.PathLike[str]) -> Path:
    """`IMAGE.lock`: flocked by the one migration, sending or receiving, that owns IMAGE."""
    return _beside(image, ".lock")
