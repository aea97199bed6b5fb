"""Who gets in: the connections that claim to be a source's main channel, or one of its
data channels, served together before any is trusted, each with its own deadline and size
limits, until they prove what they are (a HELLO that decodes and, with a key,
authenticates; an init record bound to the session over a fresh challenge, from the main
channel's peer).

A stray probe, a connection that sends nothing or one byte a second, a forged, replayed or
squatting channel, or one with the wrong key is logged and closed; it never holds up the
others and never ends a receiver's wait. It knows records and channels, not pages.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from zcmigrate import ZcmigrateError
from zcmigrate.channel.aead import fresh_nonce, macs_equal
from zcmigrate.channel.errors import ChannelClosed
from zcmigrate.channel.zcsocket import Channel, Listener, wait_readable_any
from zcmigrate.migrate.errors import ReceiveError
from zcmigrate.migrate.mainchannel import MainChannel
from zcmigrate.migrate.protocol import (
    DEVICE_STATE_MAX,
    RECORD_HEADER_SIZE,
    Error,
    Greeting,
    Hello,
    Role,
)
from zcmigrate.multifd.wire import (
    CHALLENGE_SIZE,
    INIT_SIZE,
    InitTracker,
    RemoteProtocolError,
    decode_init,
)

# From accept to a whole HELLO: a source sends it at once, after one round trip.
PREAUTH_TIMEOUT = 10.0
# Connections served at once. Every connection waiting is accepted; beyond this many the
# oldest is dropped (_CROWDED), so strangers that hold connections open, silent or one
# byte a second, cannot keep a real source waiting in the listen backlog until theirs time
# out: a real source answers within one round trip, and only MAX_PENDING newer connections
# within that round trip could push it out.
MAX_PENDING = 32
# From accept to a data channel's whole init record: the source sends it on our challenge.
INIT_TIMEOUT = 5.0
_POLL = 0.1

_CROWDED = (f"more than {MAX_PENDING} connections waiting to prove themselves: the oldest "
            "is dropped")

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
    device_state_max: int = DEVICE_STATE_MAX,
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
            _accept_waiting(listener, pending, keyed, peer_timeout, device_state_max)
            for c in [c for c in pending if now >= c.deadline]:
                _refuse(pending, c, f"no HELLO within {PREAUTH_TIMEOUT:g} s")
            ready = wait_readable_any([c.main.channel for c in pending], _POLL, listener)
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
                    peer_timeout: float, device_state_max: int) -> None:
    # At most MAX_PENDING a round, so a flood of connections cannot starve the reads.
    for _ in range(MAX_PENDING):
        ch = listener.try_accept(name="main", peer_timeout=peer_timeout)
        if ch is None:
            return
        if len(pending) >= MAX_PENDING:
            _refuse(pending, pending[0], _CROWDED)
        main = MainChannel(ch, Role.DESTINATION, device_state_max=device_state_max)
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


# ------------------------------------------------------------------ data channels


@dataclass
class _DataCandidate:
    channel: Channel
    challenge: bytes
    deadline: float
    peer: str
    buf: bytearray = field(default_factory=bytearray)


def admit_data_channels(
    listener: Listener,
    tracker: InitTracker,
    *,
    n: int,
    main: MainChannel,
    binding: Callable[[int, bytes], bytes] | None,
    timeout: float,
    peer_timeout: float,
    abort: Callable[[], None],
    first: int = 0,
) -> list[Channel]:
    """The migration's N data channels, by id. Each connection gets a fresh challenge at
    once and INIT_TIMEOUT to answer with its init record; it is admitted only from the
    main channel's peer address, for this migration (`tracker`), with an id not taken, and
    with a key (`binding(channel id, challenge)` gives the MAC) only with the right MAC.
    Anything else is logged and closed, the real channels unaffected. ReceiveError if the
    N are not there within `timeout`, or once the source closes its main channel.
    `first`: the ids wanted are first..first+N-1 (post-copy's urgent channel takes the
    id after the data channels'; the tracker's context must allow it)."""
    deadline = time.monotonic() + timeout
    got: dict[int, Channel] = {}
    pending: list[_DataCandidate] = []
    peer = main.channel.peer_host
    try:
        while len(got) < n:
            abort()
            now = time.monotonic()
            if now >= deadline:
                raise ReceiveError(f"only {len(got)} of {n} data channels connected within "
                                   f"{timeout:g} s")
            if main.peer_closed():
                # The source is gone: no more of its channels will come.
                raise ReceiveError(f"the source closed the main channel after {len(got)} of "
                                   f"{n} data channels connected")
            for _ in range(MAX_PENDING):  # as for main channels (_accept_waiting)
                ch = listener.try_accept(name="multifd?", peer_timeout=peer_timeout)
                if ch is None:
                    break
                if len(pending) >= MAX_PENDING:
                    _refuse_data(pending, pending[0], _CROWDED)
                challenge = fresh_nonce()[:CHALLENGE_SIZE]
                try:
                    ch.write_all(challenge)
                except ZcmigrateError:
                    ch.close()
                    continue
                pending.append(_DataCandidate(ch, challenge, now + INIT_TIMEOUT, ch.peer_host))
            for c in [c for c in pending if now >= c.deadline]:
                _refuse_data(pending, c, f"no init record within {INIT_TIMEOUT:g} s")
            ready = wait_readable_any([c.channel for c in pending], _POLL, listener)
            for c in [c for c in pending if c.channel in ready]:
                cid = _hear_init(pending, c, tracker, peer, binding, first)
                if cid is not None:
                    c.channel.name = f"multifd{cid}"
                    got[cid] = c.channel
    except BaseException:
        for ch in got.values():
            ch.close()
        raise
    finally:
        for c in pending:
            c.channel.close()
    return [got[i] for i in range(first, first + n)]


def _hear_init(pending: list[_DataCandidate], c: _DataCandidate, tracker: InitTracker,
               peer: str, binding: Callable[[int, bytes], bytes] | None,
               first: int = 0) -> int | None:
    try:
        c.buf += c.channel.read_some(INIT_SIZE - len(c.buf))
        if len(c.buf) < INIT_SIZE:
            return None
        if c.peer != peer:
            raise RemoteProtocolError(f"data channel from {c.peer}, not from the main "
                                      f"channel's peer {peer}")
        record = decode_init(bytes(c.buf), tracker.context)
        if binding is not None and not macs_equal(record.mac,
                                                  binding(record.channel_id, c.challenge)):
            raise RemoteProtocolError(f"data channel {record.channel_id}: its init record is "
                                      "not bound to this session (a forged or replayed one)")
        if record.channel_id < first:
            raise RemoteProtocolError(f"channel id {record.channel_id}: expected "
                                      f"{first} or more here")
        tracker.accept(bytes(c.buf))  # an id already taken: a squatter or a duplicate
    except ZcmigrateError as e:
        _refuse_data(pending, c, str(e))
        return None
    pending.remove(c)
    return record.channel_id


def _refuse_data(pending: list[_DataCandidate], c: _DataCandidate, why: str) -> None:
    log.warning("data channel refused", peer=c.peer, reason=why)
    c.channel.close()
    pending.remove(c)
