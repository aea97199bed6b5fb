"""The migration layer's errors under zcmigrate.ZcmigrateError, each with its exit code.

One place for what each way of ending means to a user (and to the CLI's exit status);
it knows no sockets, threads or click.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zcmigrate import ZcmigrateError

if TYPE_CHECKING:
    from zcmigrate.migrate.postcopy_destination import PostcopyOutcome

# Exit codes, shared by every command; `send` and `receive` document theirs in --help.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ORACLE_FAILED = 3
EXIT_CANCELLED = 4
EXIT_NOT_CONVERGING = 5
EXIT_COMMIT_UNCERTAIN = 6
EXIT_COMMITTED_UNACKNOWLEDGED = 7
EXIT_POSTCOPY_INTERRUPTED = 8


class MigrationError(ZcmigrateError):
    """The migration did not complete; the message says why and what was done about it.

    Raised by the source: the guest there is intact and running (or resumable)."""

    exit_code = EXIT_FAILED


class MigrationCancelled(MigrationError):
    exit_code = EXIT_CANCELLED


class NotConverging(MigrationError):
    exit_code = EXIT_NOT_CONVERGING


class CommitUncertain(MigrationError):
    """The device state left but no commit came back: the destination may own the guest."""

    exit_code = EXIT_COMMIT_UNCERTAIN


class PostcopyInterrupted(CommitUncertain):
    """The connection broke during post-copy: the guest runs on the destination and waits
    there for pages only the source holds. Neither side may give up its copy: the
    source keeps its image (and its paused guest) until the migration is finished."""

    exit_code = EXIT_POSTCOPY_INTERRUPTED


class NothingToResume(MigrationError):
    """`send --resume` found no interrupted post-copy of the image (or not this one):
    nothing was changed."""

    exit_code = EXIT_USAGE


class ReceiveError(ZcmigrateError):
    """The incoming migration failed; nothing was committed."""

    exit_code = EXIT_FAILED


class SourceFailed(ReceiveError):
    """The source's ERROR record: it gave up, with its message."""


class ReceiveCancelled(ReceiveError):
    exit_code = EXIT_CANCELLED


class ReceivePostcopyInterrupted(ReceiveError):
    """The source went away during post-copy: the guest here waits for pages it has not
    sent (it is paused, not failed); nothing is invented for it."""

    exit_code = EXIT_POSTCOPY_INTERRUPTED


class PostcopyUnacknowledged(ReceiveError):
    """Post-copy committed, but COMMIT_ACK could not be delivered; `outcome` is the
    post-copy's numbers (a PostcopyOutcome). Here, not in postcopy_destination.py, so that
    a receiver catches it without loading post-copy before one is asked for."""

    def __init__(self, outcome: PostcopyOutcome, why: str) -> None:
        super().__init__(why)
        self.outcome = outcome


class ImageBusy(ZcmigrateError):
    """Another process owns the image (a migration, a receiver, a running guest)."""


class ParameterError(ZcmigrateError, ValueError):
    """A parameter out of range; the message names it and says what is allowed."""

    exit_code = EXIT_USAGE


class ControlError(ZcmigrateError):
    """No migration answers on the control socket, or it answered nonsense."""


class CheckError(ZcmigrateError):
    """The check itself could not be made (as opposed to a verdict against zero copy)."""
