"""The guest stand-in's one error: its image, control file or device state is not usable,
or the guest does not do what it was asked. It knows nothing of what raises it."""

from __future__ import annotations

from zcmigrate import ZcmigrateError


class GuestError(ZcmigrateError):
    """The guest, its image, its control file or its device state is not usable."""


__all__ = ["GuestError"]
