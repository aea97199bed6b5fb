"""The migration state machine as one table: (state, event) -> next state.

A reader sees the whole life of a job at once (h2's style); anything not in the table is
an InvalidTransition naming the state and the event. It knows no sockets or threads.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable


class State(enum.Enum):
    SETUP = "setup"
    ACTIVE = "active"  # precopy: iterations while the guest runs
    DEVICE = "device"  # guest paused: last pages and the device state
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Event(enum.Enum):
    CONNECTED = "connected"  # handshake done, data channels up
    CONVERGED = "converged"  # expected downtime fits: pause the guest
    COMMITTED = "committed"  # the destination made everything durable
    ERROR = "error"
    CANCEL = "cancel"


TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.SETUP, Event.CONNECTED): State.ACTIVE,
    (State.SETUP, Event.ERROR): State.FAILED,
    (State.SETUP, Event.CANCEL): State.CANCELLED,
    (State.ACTIVE, Event.CONVERGED): State.DEVICE,
    (State.ACTIVE, Event.ERROR): State.FAILED,
    (State.ACTIVE, Event.CANCEL): State.CANCELLED,
    (State.DEVICE, Event.COMMITTED): State.COMPLETED,
    (State.DEVICE, Event.ERROR): State.FAILED,
    (State.DEVICE, Event.CANCEL): State.CANCELLED,
}

TERMINAL = frozenset({State.COMPLETED, State.FAILED, State.CANCELLED})


class InvalidTransition(Exception):
    pass


class StateMachine:
    """The current state, moved only through TRANSITIONS; thread-safe, observable."""

    def __init__(self, on_change: Callable[[State, State, Event], None] | None = None) -> None:
        self._state = State.SETUP
        self._lock = threading.Lock()
        self._on_change = on_change

    @property
    def state(self) -> State:
        return self._state

    def fire(self, event: Event) -> State:
        with self._lock:
            old = self._state
            new = TRANSITIONS.get((old, event))
            if new is None:
                raise InvalidTransition(f"no transition from {old.value!r} on {event.value!r}")
            self._state = new
        if self._on_change is not None:
            self._on_change(old, new, event)
        return new

    def try_fire(self, event: Event) -> bool:
        """Fire if the table allows it (an error after a cancel is not a second ending)."""
        try:
            self.fire(event)
        except InvalidTransition:
            return False
        return True
