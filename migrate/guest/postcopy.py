"""The post-copy link's records: the contract between a guest started with `--postcopy
SOCKET` and the receiver that serves its missing pages, over a local socket that also
carries the guest's userfaultfd (channel/fdpass.py). Records are frozen classes encoded
as JSON and checked field by field (they come from another process), and one table says
which record may come when. It holds no behaviour of either end (postcopy_link.py is the
guest's, postcopy_handle.py the receiver's).

One connection, in order:

    guest     HELLO, the userfaultfd attached    where the range is and how it faults
    receiver  GO (device state)                  first connection: start from this state
      guest   RUNNING                            the guest runs; its faults are served
    receiver  SERVING                            instead of GO, when HELLO says recovery:
                                                 the receiver woke the whole range first
    receiver  DONE                               every page is in place
      guest   COMPLETE                           no hole left; the range is unregistered
      guest   REFUSED (reason)                   a hole is left: the link stays served

Either end may send REFUSED instead of its next record and close: the guest then exits
before GO, or waits for a receiver to take over after it. A guest whose connection
breaks before COMPLETE connects again and sends HELLO with recovery set.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Final

from zcmigrate.migrate.guest.device import DeviceState
from zcmigrate.migrate.guest.errors import GuestError
from zcmigrate.migrate.guest.layout import MAX_IMAGE_BYTES, U64_MAX, check_page_size

POSTCOPY_KIND: Final = "zcmigrate-postcopy"
POSTCOPY_VERSION: Final = 1
MAX_PATH: Final = 4096
MAX_REASON: Final = 1024


class PostcopyProtocolError(GuestError):
    """A post-copy record is malformed, or came when the table does not allow it; the
    message names the phase and the record."""


def _u64(name: str, v: object) -> int:
    # bool is an int subclass; JSON true is not a size.
    if type(v) is not int or not 0 <= v <= U64_MAX:
        raise PostcopyProtocolError(f"post-copy field {name!r} must be a u64, got {v!r}")
    return v


def _text(name: str, v: object, limit: int) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise PostcopyProtocolError(
            f"post-copy field {name!r} must be text of at most {limit} characters"
        )
    return v


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """guest -> receiver, with the guest's userfaultfd attached."""

    TAG: ClassVar[str] = "hello"
    pid: int
    image: str
    """The image as the guest opened it (absolute)."""
    size: int
    """Bytes of the registered range: the whole image."""
    page_size: int
    """The image's page size (the migration's)."""
    granule: int
    """The page userfaultfd works in: every fault, copy and wake covers whole granules."""
    base: int
    """The range's address in the guest: where every copy lands."""
    recovery: bool
    """The guest runs already and a receiver before this one held the descriptor; it
    may have read faults it never served, so the new one wakes the whole range first."""

    def __post_init__(self) -> None:
        _u64("pid", self.pid)
        _text("image", self.image, MAX_PATH)
        _u64("base", self.base)
        try:
            check_page_size(self.page_size)
            check_page_size(self.granule)
        except GuestError as exc:
            raise PostcopyProtocolError(f"post-copy hello: {exc}") from None
        if (
            _u64("size", self.size) == 0
            or self.size > MAX_IMAGE_BYTES
            or self.size % self.page_size
            or self.size % self.granule
            or self.base % self.granule
        ):
            raise PostcopyProtocolError(
                f"post-copy hello: a range of {self.size} bytes at {self.base:#x} is not "
                f"whole pages of {self.page_size} and granules of {self.granule} bytes"
            )
        if type(self.recovery) is not bool:
            raise PostcopyProtocolError("post-copy field 'recovery' must be true or false")

    @property
    def tag(self) -> str:
        return "hello-recovery" if self.recovery else "hello"


@dataclass(frozen=True, slots=True, kw_only=True)
class Go:
    """receiver -> guest: run from this device state."""

    TAG: ClassVar[str] = "go"
    device_state: DeviceState

    @property
    def tag(self) -> str:
        return self.TAG


@dataclass(frozen=True, slots=True, kw_only=True)
class Running:
    """guest -> receiver: the guest runs (its control block says so already)."""

    TAG: ClassVar[str] = "running"
    pid: int

    def __post_init__(self) -> None:
        _u64("pid", self.pid)

    @property
    def tag(self) -> str:
        return self.TAG


@dataclass(frozen=True, slots=True, kw_only=True)
class Serving:
    """receiver -> guest, after a recovery hello: this receiver serves the faults now."""

    TAG: ClassVar[str] = "serving"

    @property
    def tag(self) -> str:
        return self.TAG


@dataclass(frozen=True, slots=True, kw_only=True)
class Done:
    """receiver -> guest: every page of the image is in place."""

    TAG: ClassVar[str] = "done"

    @property
    def tag(self) -> str:
        return self.TAG


@dataclass(frozen=True, slots=True, kw_only=True)
class Complete:
    """guest -> receiver: no hole is left and the range is unregistered; the end."""

    TAG: ClassVar[str] = "complete"

    @property
    def tag(self) -> str:
        return self.TAG


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """either way: the last record cannot be followed; `reason` says why."""

    TAG: ClassVar[str] = "refused"
    reason: str

    def __post_init__(self) -> None:
        _text("reason", self.reason, MAX_REASON)

    @property
    def tag(self) -> str:
        return self.TAG


Record = Hello | Go | Running | Serving | Done | Complete | Refused
_CLASSES: Final[dict[str, type[Record]]] = {
    c.TAG: c for c in (Hello, Go, Running, Serving, Done, Complete, Refused)
}


def encode(record: Record) -> bytes:
    body: dict[str, Any] = {"kind": POSTCOPY_KIND, "version": POSTCOPY_VERSION,
                            "record": record.TAG}
    for f in fields(record):
        v = getattr(record, f.name)
        body[f.name] = json.loads(v.encode()) if isinstance(v, DeviceState) else v
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def decode(data: bytes) -> Record:
    """Parse and check one record; PostcopyProtocolError for anything else."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PostcopyProtocolError(f"a post-copy record is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise PostcopyProtocolError("a post-copy record must be a JSON object")
    if obj.pop("kind", None) != POSTCOPY_KIND:
        raise PostcopyProtocolError(f"not a post-copy record (kind must be {POSTCOPY_KIND!r})")
    version = obj.pop("version", None)
    if version != POSTCOPY_VERSION:
        raise PostcopyProtocolError(
            f"post-copy record version {version!r}, expected {POSTCOPY_VERSION}: the guest "
            "and the receiver are different versions"
        )
    tag = obj.pop("record", None)
    cls = _CLASSES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise PostcopyProtocolError(f"unknown post-copy record {tag!r}")
    expected = {f.name for f in fields(cls)}
    if obj.keys() != expected:
        raise PostcopyProtocolError(
            f"post-copy {tag} fields wrong: missing {sorted(expected - obj.keys())}, "
            f"unexpected {sorted(obj.keys() - expected)}"
        )
    if cls is Go:
        try:
            state = DeviceState.decode(json.dumps(obj["device_state"]).encode())
        except GuestError as exc:
            raise PostcopyProtocolError(f"post-copy go: {exc}") from None
        return Go(device_state=state)
    try:
        return cls(**obj)
    except TypeError as exc:
        raise PostcopyProtocolError(f"post-copy {tag}: {exc}") from None


class Phase(enum.Enum):
    """Where one connection of the link stands."""

    HELLO = "hello"
    """Nothing yet: the guest speaks first."""
    GO = "go"
    """A first hello came: the receiver sends the device state."""
    TAKE_OVER = "take-over"
    """A recovery hello came: the receiver wakes the range and says it serves."""
    STARTING = "starting"
    """Go was sent: the guest starts and says it runs."""
    SERVED = "served"
    """The guest runs and this receiver serves its faults."""
    FINISHING = "finishing"
    """The receiver said every page is there: the guest checks and answers."""
    COMPLETE = "complete"
    """The range is unregistered: nothing more on this connection."""
    ENDED = "ended"
    """Refused: nothing more on this connection; the guest exits or waits for another."""


GUEST: Final = "guest"
RECEIVER: Final = "receiver"

# (phase, record tag) -> (who sends it, next phase). Anything missing is refused.
TABLE: Final[dict[tuple[Phase, str], tuple[str, Phase]]] = {
    (Phase.HELLO, "hello"): (GUEST, Phase.GO),
    (Phase.HELLO, "hello-recovery"): (GUEST, Phase.TAKE_OVER),
    (Phase.GO, "go"): (RECEIVER, Phase.STARTING),
    (Phase.GO, "refused"): (RECEIVER, Phase.ENDED),
    (Phase.TAKE_OVER, "serving"): (RECEIVER, Phase.SERVED),
    (Phase.TAKE_OVER, "refused"): (RECEIVER, Phase.ENDED),
    (Phase.STARTING, "running"): (GUEST, Phase.SERVED),
    (Phase.STARTING, "refused"): (GUEST, Phase.ENDED),
    (Phase.SERVED, "done"): (RECEIVER, Phase.FINISHING),
    (Phase.FINISHING, "complete"): (GUEST, Phase.COMPLETE),
    # The guest found a hole: it stays registered, and the receiver goes on serving.
    (Phase.FINISHING, "refused"): (GUEST, Phase.SERVED),
}


class Conversation:
    """One end of one connection, fed every record it sends and receives."""

    def __init__(self, role: str) -> None:
        if role not in (GUEST, RECEIVER):
            raise ValueError(f"role must be {GUEST!r} or {RECEIVER!r}, not {role!r}")
        self.role = role
        self.phase = Phase.HELLO

    def _feed(self, record: Record, sender: str) -> None:
        step = TABLE.get((self.phase, record.tag))
        if step is None or step[0] != sender:
            whose = "our" if sender == self.role else "the peer's"
            raise PostcopyProtocolError(
                f"post-copy: {whose} record {record.tag!r} may not come in phase "
                f"{self.phase.value!r}"
            )
        self.phase = step[1]

    def sent(self, record: Record) -> None:
        self._feed(record, self.role)

    def received(self, record: Record) -> None:
        self._feed(record, RECEIVER if self.role == GUEST else GUEST)


__all__ = [
    "GUEST",
    "POSTCOPY_KIND",
    "POSTCOPY_VERSION",
    "RECEIVER",
    "TABLE",
    "Complete",
    "Conversation",
    "Done",
    "Go",
    "Hello",
    "Phase",
    "PostcopyProtocolError",
    "Record",
    "Refused",
    "Running",
    "Serving",
    "decode",
    "encode",
]
