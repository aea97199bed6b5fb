"""The one shared "exiting" flag of a migration's threads, and the error the multifd pools raise.

Set once, with the first error: it wakes every waiter and shuts every registered socket down,
so every thread can be joined. It must not know sockets, pages, guests or the migration job.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from zcmigrate import ZcmigrateError

__all__ = ["Exiting", "MultifdError"]


class MultifdError(ZcmigrateError):
    """A multifd pool failed; the message names the channel (when there is one) and the cause."""

    def __init__(
        self,
        message: str,
        *,
        channel_id: int | None = None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(message)
        self.channel_id = channel_id
        self.cause = cause

    @classmethod
    def on_channel(cls, role: str, channel_id: int, cause: BaseException) -> MultifdError:
        """`role` is "send" or "receive"; the cause's type is named, as its text may not say."""
        error = cls(
            f"multifd {role} channel {channel_id}: {cause} ({type(cause).__name__})",
            channel_id=channel_id,
            cause=cause,
        )
        error.__cause__ = cause
        return error


class Exiting:
    """Set once, with the first error; wakes every waiter and shuts every registered socket down.

    Thread-safe. Callbacks run in the thread that calls set(), outside any lock of this
    object, so a callback may itself look at the flag (or take its own locks).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._error: BaseException | None = None
        self._where = ""
        self._callbacks: list[Callable[[], None]] = []

    def set(self, error: BaseException, where: str = "") -> bool:
        """Record `error` if it is the first; True for the first caller only.

        The first caller then calls every registered shutdown callback; exceptions they raise
        are suppressed, because shutting down must reach every socket whatever one of them does.
        """
        with self._lock:
            if self._event.is_set():
                return False
            self._error = error
            self._where = where
            callbacks = list(self._callbacks)
            # Set before the callbacks run: a thread woken by a shutdown sees the flag at once.
            self._event.set()
        for shutdown in callbacks:
            with contextlib.suppress(Exception):
                shutdown()
        return True

    def register(self, shutdown: Callable[[], None]) -> None:
        """Call `shutdown` when the flag is set; at once (in this thread) if it already is."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(shutdown)
                return
        with contextlib.suppress(Exception):
            shutdown()

    def unregister(self, shutdown: Callable[[], None]) -> None:
        """Forget a callback (a closed pool's channels must not be shut down again later)."""
        with self._lock, contextlib.suppress(ValueError):
            self._callbacks.remove(shutdown)

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the flag is set; False if `timeout` seconds passed first."""
        return self._event.wait(timeout)

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def where(self) -> str:
        return self._where

    def __repr__(self) -> str:
        if not self._event.is_set():
            return "<Exiting: not set>"
        return f"<Exiting: set at {self._where or '?'}: {self._error!r}>"
