"""Who gets in: the connections that claim to be a source's main channel, served together
before any is trusted, each with its own deadline and size limits, until one proves it is
a migration (a HELLO that decodes and, with a key, authenticates).

A stray probe, a connection that sends nothing or one byte a second, or one with the wrong
key is logged and closed; it never holds up the others and never ends a receiver's wait.
It knows records and channels, not pages or images.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from zcmigrate import ZcmigrateError
from zcmigrate.channel.aead import fresh_nonce
from zcmigrate.channel.errors import ChannelClosed
from zcmigrate.channel.zcsocket import Listener, wait_readable_any
from zcmigrate.migrate.errors import ReceiveError
from zcmigrate.migrate.mainchannel import MainChannel
from zcmigrate.migrate.protocol import RECORD_HEADER_SIZE, Error, Greeting, Hello, Role

# From accept to a whole HELLO: a source sends it at once, after one round trip.
PREAUTH_TIMEOUT = 10.0
# Connections served at once; more wait in the listen backlog until one is done.
MAX_PENDING = 32
_POLL = 0.1

log = structlog.get_logger("zcmigrate.admission")


@dataclass
class _Candidate:
    main: MainChannel
    greeting: Greeting
    deadline: float
    peer: str
    buf: bytearray = field(default_factory=bytearray)
    need: int = RECORD_HEADER_SIZE  # bytes of the record known so far to be needed


@dataclass(frozen=True)
class Admitted:
    main: MainChannel
    greeting: Greeting
    hello: Hello


def admit_source(
    listener: Listener,
    *,
    keyed: bool,
    authenticate: Callable[[Greeting, Hello], None],
    accept_timeout: float | None,
    peer_timeout: float,
    abort: Callable[[], None],
) -> Admitted:
    """Serve connections until one sends a valid HELLO (authenticate() raises for a
    wrong one); the others are closed. ReceiveError after `accept_timeout` seconds
    (None: wait for ever); abort() is called every tenth of a second and may raise."""
    deadline = None if accept_timeout is None else time.monotonic() + accept_timeout
    pending: list[_Candidate] = []
    try:
        while True:
            abort()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise ReceiveError(f"no migration arrived within {accept_timeout:g} s "
                                   "(accept-timeout)")
            _accept_waiting(listener, pending, keyed, peer_timeout)
            for c in [c for c in pending if now >= c.deadline]:
                _refuse(pending, c, f"no HELLO within {PREAUTH_TIMEOUT:g} s")
            ready = wait_readable_any([c.main.channel for c in pending], _POLL)
            for c in [c for c in pending if c.main.channel in ready]:
                admitted = _hear(pending, c, authenticate)
                if admitted is not None:
                    return admitted
    except ChannelClosed as e:
        abort()  # a shut-down listener is a cancel: say so in its words if it is one
        raise ReceiveError(f"stopped waiting for a migration: {e}") from e
    finally:
        for c in pending:
            c.main.send_error("the receiver took another migration")
            c.main.close()


def _accept_waiting(listener: Listener, pending: list[_Candidate], keyed: bool,
                    peer_timeout: float) -> None:
    while len(pending) < MAX_PENDING:
        ch = listener.try_accept(name="main", peer_timeout=peer_timeout)
        if ch is None:
            return
        main = MainChannel(ch, Role.DESTINATION)
        greeting = Greeting(fresh_nonce(), keyed=keyed)
        try:
            main.send(greeting)
        except ZcmigrateError:
            main.close()
            continue
        pending.append(_Candidate(main, greeting, time.monotonic() + PREAUTH_TIMEOUT,
                                  ch.peer_host))


def _hear(pending: list[_Candidate], c: _Candidate,
          authenticate: Callable[[Greeting, Hello], None]) -> Admitted | None:
    """Read what a readable candidate sent; the Admitted one, or None (refused, or not
    done yet)."""
    try:
        # What has arrived, without waiting for more: a peer that sends one byte a second
        # cannot make this loop wait for it (each candidate has its own deadline).
        c.buf += c.main.channel.read_some(c.need - len(c.buf))
        if len(c.buf) < c.need:
            return None
        if c.need == RECORD_HEADER_SIZE:
            _, length = c.main.parse_header(bytes(c.buf))  # the type's size limit, first
            c.need += length
            if length:
                return None
        head, payload = bytes(c.buf[:RECORD_HEADER_SIZE]), bytes(c.buf[RECORD_HEADER_SIZE:])
        rec = c.main.deliver(head, payload)
        if isinstance(rec, Error):
            _refuse(pending, c, f"it gave up: {rec.message}", answer=False)
            return None
        assert isinstance(rec, Hello)  # the table admits nothing else here
        authenticate(c.greeting, rec)
    except ZcmigrateError as e:
        _refuse(pending, c, str(e))
        return None
    pending.remove(c)
    return Admitted(c.main, c.greeting, rec)


def _refuse(pending: list[_Candidate], c: _Candidate, why: str, *,
            answer: bool = True) -> None:
    log.warning("connection refused", peer=c.peer, reason=why)
    if answer:
        c.main.send_error(why)
    c.main.close()
    pending.remove(c)
