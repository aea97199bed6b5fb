"""The migration state machine table."""

from __future__ import annotations

import pytest

from zcmigrate.migrate.state import (
    TERMINAL,
    TRANSITIONS,
    Event,
    InvalidTransition,
    State,
    StateMachine,
)


def test_a_successful_migration_walks_setup_active_device_completed() -> None:
    seen: list[tuple[str, str]] = []
    sm = StateMachine(lambda old, new, ev: seen.append((old.value, new.value)))
    sm.fire(Event.CONNECTED)
    sm.fire(Event.CONVERGED)
    sm.fire(Event.COMMITTED)
    assert sm.state is State.COMPLETED
    assert seen == [("setup", "active"), ("active", "device"), ("device", "completed")]


@pytest.mark.parametrize("state", [State.SETUP, State.ACTIVE, State.DEVICE])
def test_every_live_state_can_fail_or_be_cancelled(state: State) -> None:
    assert TRANSITIONS[(state, Event.ERROR)] is State.FAILED
    assert TRANSITIONS[(state, Event.CANCEL)] is State.CANCELLED


def test_terminal_states_have_no_way_out() -> None:
    assert not [k for k in TRANSITIONS if k[0] in TERMINAL]


def test_missing_transitions_name_the_state_and_the_event() -> None:
    sm = StateMachine()
    with pytest.raises(InvalidTransition, match="'setup' on 'committed'"):
        sm.fire(Event.COMMITTED)
    assert sm.state is State.SETUP


def test_an_error_after_a_cancel_is_not_a_second_ending() -> None:
    sm = StateMachine()
    sm.fire(Event.CANCEL)
    assert sm.try_fire(Event.ERROR) is False
    assert sm.state is State.CANCELLED
