"""What the sender and receiver pools share: their channels, the mapping they work on,
and the Exiting they belong to, with the error they report.

It knows channels and the C data path's view of the mapping; not guests or the CLI.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import structlog

from zcmigrate.channel.zcsocket import Channel
from zcmigrate.multifd.exiting import Exiting, MultifdError
from zcmigrate.multifd.wire import WireContext
from zcmigrate.native import ffi

if TYPE_CHECKING:
    from typing_extensions import Buffer

_log = structlog.get_logger("zcmigrate.multifd")


class PoolBase:
    role: ClassVar[str]  # "send" or "receive", for messages

    def __init__(self, channels: Sequence[Channel], ctx: WireContext, image: Buffer | None, *,
                 writable: bool, exiting: Exiting | None) -> None:
        if len(channels) != ctx.channels:
            raise ValueError(
                f"{len(channels)} channels given, the wire context says {ctx.channels}"
            )
        self._ctx = ctx
        self._exiting = exiting if exiting is not None else Exiting()
        self._lock = threading.RLock()
        self._channels = list(channels)
        # None: the pool works through a file descriptor, not a mapping (the receiver's
        # image file); then there is no address and nothing to release.
        self._image_c: Any = None
        self._base = 0
        if image is not None:
            self._image_c = ffi.from_buffer(image, require_writable=writable)
            if len(self._image_c) < ctx.image_size:
                ffi.release(self._image_c)
                raise ValueError(f"image of {len(self._image_c)} bytes, the wire context says "
                                 f"{ctx.image_size}")
            # The mapping's address, taken once: C builds iovecs from it for every packet.
            self._base = int(ffi.cast("uintptr_t", self._image_c))
        self._started = False
        self._stopping = False
        self._closed = False
        self._wrapped_error: MultifdError | None = None

    def _join_exiting(self) -> None:
        """Register last, from the subclass: if Exiting is already set, these run at once,
        and must find a complete pool."""
        self._exiting.register(self._wake)
        for ch in self._channels:
            self._exiting.register(ch.shutdown)

    _workers: Sequence[Any]  # each with .name and .thread; _run(worker) is its loop

    def _wake(self) -> None:
        raise NotImplementedError

    def _run(self, worker: Any) -> None:
        raise NotImplementedError

    def start(self) -> None:
        """Start one thread per channel."""
        with self._lock:
            if self._started:
                raise RuntimeError(f"{type(self).__name__}.start() called twice")
            if self._closed:
                raise MultifdError(f"multifd {self.role}: the pool is closed")
            self._started = True
            for w in self._workers:
                w.thread = threading.Thread(target=self._run, args=(w,), name=w.name,
                                            daemon=True)
                w.thread.start()

    def _release(self, threads: Sequence[threading.Thread]) -> bool:
        """After the workers were joined: leave Exiting, close the channels and release the
        mapping. Not if a thread is still alive: closing a descriptor or releasing the
        mapping under a thread still in C could let it touch a reused descriptor or freed
        memory, so they are leaked instead. Returns whether everything was released."""
        self._exiting.unregister(self._wake)
        for ch in self._channels:
            self._exiting.unregister(ch.shutdown)
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            _log.error("threads did not end; channels left open", threads=alive)
            return False
        for ch in self._channels:
            ch.close()
        if self._image_c is not None:
            ffi.release(self._image_c)
        return True

    def _raise_if_failed(self) -> None:
        err = self.error
        if err is not None:
            raise err

    @staticmethod
    def _next_wait(deadline: float | None, slice_s: float) -> float | None:
        """How long a sync may wait on its condition now: one slice (so that it looks at
        the workers' state again), less if the deadline is nearer; None once it passed."""
        if deadline is None:
            return slice_s
        left = deadline - time.monotonic()
        return None if left <= 0 else min(slice_s, left)

    def _fail(self, failure: MultifdError, where: str) -> NoReturn:
        """Fail the pool with `failure` and raise the error it now reports (the first one
        set, which may be another's). Called outside the lock: Exiting's callbacks take it
        to wake the workers."""
        self._exiting.set(failure, where=where)
        err = self.error
        raise err if err is not None else failure

    @property
    def exiting(self) -> Exiting:
        return self._exiting

    @property
    def error(self) -> MultifdError | None:
        """The error that set Exiting, as a MultifdError (wrapped if another layer set it)."""
        err = self._exiting.error
        if err is None or isinstance(err, MultifdError):
            return err
        with self._lock:
            if self._wrapped_error is None:
                self._wrapped_error = MultifdError(
                    f"multifd {self.role}: exiting ({self._exiting.where or 'elsewhere'}): "
                    f"{err}",
                    cause=err,
                )
            return self._wrapped_error
