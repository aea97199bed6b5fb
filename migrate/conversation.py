"""The main channel's conversation as one table: (state, record type) -> next state.

Both ends feed every record they send or receive through a Conversation, so a record out
of order is refused by the table (h2's style), never by flags in a job's loop: sending
one is our bug (LocalProtocolError), receiving one is the peer's (RemoteProtocolError),
and either message names the state and the record. Pure: no sockets, threads or guests.
"""

from __future__ import annotations

import enum

from zcmigrate.migrate.protocol import RECORDS, Record, RecordType, Role
from zcmigrate.multifd.wire import LocalProtocolError, RemoteProtocolError


class Phase(enum.Enum):
    GREETING = "greeting"  # connected; the destination speaks first
    HELLO = "hello"  # the source proposes the migration
    HELLO_ACK = "hello-ack"  # the destination accepts (or refuses)
    PRECOPY = "precopy"  # iterations: a MULTIFD_FLUSH after each
    WRITEBACK = "writeback"  # the destination makes its image durable while the guest runs
    DEVICE = "device"  # END_OF_RAM seen: the destination checks it has every page
    READY = "ready"  # RAM_RECEIVED seen: only the device state may follow
    COMMIT = "commit"  # the device state left: the destination commits; no way back
    # Post-copy: the guest is paused (LISTEN, POSTCOPY_READY) then runs on the destination
    # while its last pages arrive (POSTCOPY, POSTCOPY_END); COMMIT follows as in precopy.
    LISTEN = "postcopy-listen"  # the dirty list arrives; the destination gets ready
    POSTCOPY_READY = "postcopy-ready"  # only the device state may follow
    POSTCOPY = "postcopy"  # the device state left: the guest runs on the destination
    POSTCOPY_END = "postcopy-end"  # every background page was sent: the last ones land
    # Post-copy recovery: a new session (HELLO with resume set, same migration UUID) after
    # a break; the destination lists the pages still missing, then its guest runs on.
    RESUME = "postcopy-resume"
    DONE = "done"  # COMMIT_ACK: the destination owns the guest
    FAILED = "failed"  # an ERROR record went either way
    CANCELLED = "cancelled"  # the source cancelled before the commit


R = RecordType
TRANSITIONS: dict[tuple[Phase, RecordType], Phase] = {
    (Phase.GREETING, R.GREETING): Phase.HELLO,
    (Phase.HELLO, R.HELLO): Phase.HELLO_ACK,
    (Phase.HELLO_ACK, R.HELLO_ACK): Phase.PRECOPY,
    (Phase.PRECOPY, R.MULTIFD_FLUSH): Phase.PRECOPY,
    (Phase.PRECOPY, R.KEEPALIVE): Phase.PRECOPY,
    (Phase.PRECOPY, R.WRITEBACK): Phase.WRITEBACK,
    (Phase.WRITEBACK, R.WRITEBACK_DONE): Phase.PRECOPY,
    (Phase.PRECOPY, R.END_OF_RAM): Phase.DEVICE,
    (Phase.DEVICE, R.RAM_RECEIVED): Phase.READY,
    (Phase.READY, R.DEVICE_STATE): Phase.COMMIT,
    (Phase.COMMIT, R.COMMIT_ACK): Phase.DONE,
    # Post-copy, instead of END_OF_RAM: see docs/protocol.md.
    (Phase.PRECOPY, R.POSTCOPY_ADVISE): Phase.PRECOPY,
    (Phase.PRECOPY, R.POSTCOPY_LISTEN): Phase.LISTEN,
    (Phase.LISTEN, R.POSTCOPY_DIRTY): Phase.LISTEN,
    (Phase.LISTEN, R.POSTCOPY_READY): Phase.POSTCOPY_READY,
    (Phase.POSTCOPY_READY, R.DEVICE_STATE): Phase.POSTCOPY,
    (Phase.POSTCOPY, R.POSTCOPY_RUNNING): Phase.POSTCOPY,
    (Phase.POSTCOPY, R.KEEPALIVE): Phase.POSTCOPY,
    (Phase.POSTCOPY, R.POSTCOPY_END): Phase.POSTCOPY_END,
    (Phase.POSTCOPY_END, R.POSTCOPY_COMPLETE): Phase.COMMIT,
    # Post-copy recovery, right after a HELLO_ACK to a resume HELLO (a source that did
    # not ask for one refuses the list in its code: it expects no record there).
    (Phase.PRECOPY, R.POSTCOPY_MISSING): Phase.RESUME,
    (Phase.RESUME, R.POSTCOPY_MISSING): Phase.RESUME,
    (Phase.RESUME, R.POSTCOPY_RUNNING): Phase.POSTCOPY,
}
# Either end may give up, and the source may cancel, at any point before the commit.
# Not in COMMIT: once the device state has left, the destination may already own the
# guest, so no record may then claim that nothing was committed (ARCHITECTURE.md,
# invariant 5); the source that gives up there just closes, and says so to its user.
# Nor in POSTCOPY, POSTCOPY_END and RESUME: the guest runs on the destination by then.
_BEFORE_COMMIT = (Phase.GREETING, Phase.HELLO, Phase.HELLO_ACK, Phase.PRECOPY,
                  Phase.WRITEBACK, Phase.DEVICE, Phase.READY, Phase.LISTEN,
                  Phase.POSTCOPY_READY)
for _phase in _BEFORE_COMMIT:
    TRANSITIONS[(_phase, R.ERROR)] = Phase.FAILED
    TRANSITIONS[(_phase, R.CANCEL)] = Phase.CANCELLED

TERMINAL = frozenset({Phase.DONE, Phase.FAILED, Phase.CANCELLED})


class Conversation:
    """One end's view of the main channel. Not thread-safe: each end has one thread that
    sends and receives on the main channel (the migration thread, the receiver's main)."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self.phase = Phase.GREETING

    def _next(self, record: Record, sender: Role) -> Phase:
        rtype = record.TYPE
        if sender not in record.SENDERS:
            return self._refuse(rtype, sender, f"{rtype.name} is never sent by the {sender.value}")
        new = TRANSITIONS.get((self.phase, rtype))
        if new is None:
            return self._refuse(rtype, sender,
                                f"{rtype.name} is out of order in phase {self.phase.value}")
        return new

    def _refuse(self, rtype: RecordType, sender: Role, why: str) -> Phase:
        if sender is self.role:
            raise LocalProtocolError(f"main channel: we may not send {rtype.name}: {why}")
        raise RemoteProtocolError(f"main channel: the {sender.value} sent {rtype.name}: {why}")

    def send(self, record: Record) -> None:
        """Before sending: move on, or LocalProtocolError if we may not send it now."""
        self.phase = self._next(record, self.role)

    def receive(self, record: Record) -> None:
        """After receiving: move on, or RemoteProtocolError naming phase and record."""
        self.phase = self._next(record, self.role.peer)

    def may_send(self, rtype: RecordType) -> bool:
        """Whether the table lets us send a record of this type now (an ERROR after the
        commit has started, for example, it does not)."""
        return self.role in RECORDS[rtype].SENDERS and (self.phase, rtype) in TRANSITIONS

    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL

