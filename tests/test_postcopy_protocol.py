"""Post-copy's main-channel records and their place in the conversation table: the dirty
list's framing and bounds, and the order the switch must follow (pure, no sockets)."""

from __future__ import annotations

import pytest

from zcmigrate.migrate.conversation import Conversation, Phase
from zcmigrate.migrate.protocol import (
    DIRTY_CHUNK_PAGES,
    DeviceStateRecord,
    Error,
    Hello,
    HelloAck,
    PostcopyAdvise,
    PostcopyComplete,
    PostcopyDirty,
    PostcopyEnd,
    PostcopyListen,
    PostcopyMissing,
    PostcopyReady,
    PostcopyRunning,
    Role,
    decode_header,
)
from zcmigrate.multifd.wire import LocalProtocolError, RemoteProtocolError


def test_a_dirty_record_round_trips_and_bad_ones_are_refused() -> None:
    rec = PostcopyDirty(first=64, count=100, bitmap=bytes(16), last=True)
    assert PostcopyDirty.from_payload(rec.payload()) == rec
    for first, count, nbytes, last in ((1, 64, 8, 0), (0, 0, 0, 0), (0, 64, 16, 0),
                                       (0, 64, 8, 2), (0, DIRTY_CHUNK_PAGES + 64, 8, 0)):
        bad = PostcopyDirty(first=first, count=count, bitmap=bytes(nbytes),
                            last=bool(last)).payload()
        if last == 2:
            bad = bad[:16] + b"\x02" + bad[17:]
        with pytest.raises(RemoteProtocolError, match="POSTCOPY_DIRTY"):
            PostcopyDirty.from_payload(bad)
    with pytest.raises(RemoteProtocolError):
        PostcopyDirty.from_payload(b"short")
    # Its length is bounded before a byte of it is read.
    with pytest.raises(RemoteProtocolError, match="limit"):
        decode_header(PostcopyDirty(first=0, count=64, bitmap=b"", last=True).encode()[:8]
                      + (PostcopyDirty.MAX_PAYLOAD + 1).to_bytes(4, "big"))


def test_complete_carries_the_statistics() -> None:
    rec = PostcopyComplete(requests=3, latency_median_us=120, latency_p99_us=900,
                           total_time_ms=40)
    assert PostcopyComplete.from_payload(rec.payload()) == rec
    with pytest.raises(RemoteProtocolError):
        PostcopyComplete.from_payload(b'{"postcopy-requests": -1}')


def _precopy(role: Role) -> Conversation:
    conv = Conversation(role)
    conv.phase = Phase.PRECOPY
    return conv


def test_the_switch_follows_the_table() -> None:
    src, dst = _precopy(Role.SOURCE), _precopy(Role.DESTINATION)
    steps = [(src, dst, PostcopyAdvise()), (src, dst, PostcopyListen(1)),
             (src, dst, PostcopyDirty(first=0, count=64, bitmap=bytes(8), last=True)),
             (dst, src, PostcopyReady()), (src, dst, DeviceStateRecord(b"{}")),
             (dst, src, PostcopyRunning()), (src, dst, PostcopyEnd(2)),
             (dst, src, PostcopyComplete())]
    for sender, receiver, rec in steps:
        sender.send(rec)
        receiver.receive(rec)
    assert src.phase is dst.phase is Phase.COMMIT


def test_out_of_order_and_errors_after_the_go_are_refused() -> None:
    src = _precopy(Role.SOURCE)
    with pytest.raises(LocalProtocolError):
        src.send(DeviceStateRecord(b"{}"))  # not before POSTCOPY_READY
    src.send(PostcopyListen(1))
    assert src.may_send(Error("x").TYPE)  # the guest has not run there: may still fail
    dst = Conversation(Role.DESTINATION)
    dst.phase = Phase.POSTCOPY_READY
    dst.receive(DeviceStateRecord(b"{}"))
    # The guest may run on the destination now: no one may say "nothing committed".
    assert not dst.may_send(Error("x").TYPE)
    with pytest.raises(RemoteProtocolError):
        dst.receive(Hello(uuid=bytes(16), channels=1, page_size=4096, image_size=4096,
                          pages_alloc=1, block="b", zero_copy=False,
                          zero_page_detection=True))
    with pytest.raises(RemoteProtocolError):
        dst.receive(HelloAck())


def test_a_resume_session_follows_the_table() -> None:
    """Post-copy recovery: after HELLO_ACK, the destination's list of missing pages, then
    POSTCOPY_RUNNING, then the usual end; no ERROR or CANCEL once the list began (the
    guest runs on the destination), and the source may not send the list."""
    src, dst = _precopy(Role.SOURCE), _precopy(Role.DESTINATION)
    steps = [(dst, src, PostcopyMissing(first=0, count=64, bitmap=bytes(8), last=False)),
             (dst, src, PostcopyMissing(first=64, count=10, bitmap=bytes(8), last=True)),
             (dst, src, PostcopyRunning()), (src, dst, PostcopyEnd(1)),
             (dst, src, PostcopyComplete())]
    for i, (sender, receiver, rec) in enumerate(steps):
        sender.send(rec)
        receiver.receive(rec)
        if i == 0:
            assert src.phase is Phase.RESUME
            assert not src.may_send(Error("x").TYPE) and not dst.may_send(Error("x").TYPE)
    assert src.phase is dst.phase is Phase.COMMIT
    with pytest.raises(LocalProtocolError):
        _precopy(Role.SOURCE).send(PostcopyMissing(first=0, count=64, bitmap=bytes(8),
                                                   last=True))
    resumed = _precopy(Role.SOURCE)
    resumed.receive(PostcopyMissing(first=0, count=64, bitmap=bytes(8), last=True))
    with pytest.raises(RemoteProtocolError):
        resumed.receive(DeviceStateRecord(b"{}"))  # nothing but the list, then RUNNING


def test_a_missing_record_is_checked_as_a_dirty_one() -> None:
    rec = PostcopyMissing(first=128, count=65, bitmap=bytes(16), last=True)
    assert PostcopyMissing.from_payload(rec.payload()) == rec
    with pytest.raises(RemoteProtocolError, match="POSTCOPY_MISSING"):
        PostcopyMissing.from_payload(rec.payload()[:-1])
    assert decode_header(rec.encode()[:12])[0] is rec.TYPE


def test_hello_carries_resume_under_the_mac() -> None:
    hello = Hello(uuid=bytes(16), channels=1, page_size=4096, image_size=4096,
                  pages_alloc=1, block="b", zero_copy=False, zero_page_detection=True,
                  resume=True)
    assert b'"resume":true' in hello.body()
    assert Hello.from_payload(hello.payload()).resume
