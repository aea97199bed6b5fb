"""The guest's device state: what a paused guest hands over, encoded for the main channel
and validated field by field when it comes back from the network, and its file beside
the image. It knows nothing of mappings, processes or migrations.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Final

from zcmigrate.migrate.durable import write_atomic
from zcmigrate.migrate.guest.errors import GuestError
from zcmigrate.migrate.guest.layout import MAX_IMAGE_BYTES, U64_MAX, check_page_size
from zcmigrate.migrate.imagefiles import state_path

DEVICE_KIND: Final = "zcmigrate-guest"
DEVICE_VERSION: Final = 1
DEVICE_STATE_MAX_BYTES: Final = 1024
"""An encoded device state is about 130 bytes; anything far larger is not one."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceState:
    """What a paused guest hands over: where the step is and how many passes it made.

    `decode` is fed bytes from the network, so construction validates every field.
    """

    kind: str = DEVICE_KIND
    version: int = DEVICE_VERSION
    npages: int
    page_size: int
    position: int
    value: int
    touched: int

    def __post_init__(self) -> None:
        if self.kind != DEVICE_KIND:
            raise GuestError(f"device state kind is {self.kind!r}, expected {DEVICE_KIND!r}")
        for name in ("version", "npages", "page_size", "position", "value", "touched"):
            v = getattr(self, name)
            # bool is an int subclass; JSON true is not a page count.
            if type(v) is not int:
                raise GuestError(f"device state field {name!r} must be an integer, got {v!r}")
            if not 0 <= v <= U64_MAX:
                raise GuestError(f"device state field {name!r} out of range: {v}")
        if self.version != DEVICE_VERSION:
            raise GuestError(
                f"device state version {self.version} is not supported (expected {DEVICE_VERSION})"
            )
        check_page_size(self.page_size)
        if self.npages < 1 or self.npages * self.page_size > MAX_IMAGE_BYTES:
            raise GuestError(f"device state npages out of range: {self.npages}")
        if self.position >= self.npages:
            raise GuestError(
                f"device state position {self.position} is not below npages {self.npages}"
            )

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> DeviceState:
        """Parse and validate an encoded device state; GuestError for anything else."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise GuestError(f"device state must be bytes, got {type(data).__name__}")
        raw = bytes(data)
        if len(raw) > DEVICE_STATE_MAX_BYTES:
            raise GuestError(
                f"device state is {len(raw)} bytes, more than {DEVICE_STATE_MAX_BYTES}"
            )
        try:
            obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except UnicodeDecodeError as exc:
            raise GuestError(f"device state is not UTF-8: {exc}") from exc
        except (ValueError, RecursionError) as exc:
            raise GuestError(f"device state is not valid JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise GuestError(f"device state must be a JSON object, got {type(obj).__name__}")
        expected = {f for f in cls.__dataclass_fields__}
        missing = expected - obj.keys()
        extra = obj.keys() - expected
        if missing or extra:
            raise GuestError(
                f"device state fields wrong: missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        return cls(**obj)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        # Two "position" keys would make the state mean whatever the parser picks.
        raise ValueError("duplicate key in object")
    return d


def read_device_state(image: str | os.PathLike[str]) -> DeviceState:
    """Read `<image>.state`, as a destination's receiver committed it."""
    path = state_path(image)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise GuestError(
            f"no device state at {path}: it is written when a migration to {image} commits"
        ) from None
    except OSError as exc:
        raise GuestError(f"cannot read device state {path}: {exc.strerror}") from exc
    try:
        return DeviceState.decode(data)
    except GuestError as exc:
        raise GuestError(f"{path}: {exc}") from exc


def write_device_state(image: str | os.PathLike[str], state: DeviceState) -> None:
    """Write `<image>.state` atomically and durably: a crash leaves the old state or the
    new one, never a torn file, and once this returns the rename survives a power cut."""
    path = state_path(image)
    try:
        write_atomic(path, state.encode())
    except OSError as exc:
        raise GuestError(f"cannot write device state {path}: {exc.strerror}") from exc


__all__ = [
    "DEVICE_KIND",
    "DEVICE_STATE_MAX_BYTES",
    "DEVICE_VERSION",
    "DeviceState",
    "read_device_state",
    "write_device_state",
]
