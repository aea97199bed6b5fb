"""migrate/guest/postcopy.py: the post-copy link's records and their table, without any
socket or process."""

from __future__ import annotations

import json

import pytest

from zcmigrate.migrate.guest import DeviceState
from zcmigrate.migrate.guest.postcopy import (
    GUEST,
    RECEIVER,
    TABLE,
    Complete,
    Conversation,
    Done,
    Go,
    Hello,
    Phase,
    PostcopyProtocolError,
    Record,
    Refused,
    Running,
    Serving,
    decode,
    encode,
)

STATE = DeviceState(npages=256, page_size=4096, position=17, value=3, touched=1000)


def hello(**kw: object) -> Hello:
    args: dict[str, object] = dict(pid=42, image="/dev/shm/vm.img", size=256 * 4096,
                                   page_size=4096, granule=4096, base=0x7F00_0000_0000,
                                   recovery=False)
    args.update(kw)
    return Hello(**args)  # type: ignore[arg-type]


EVERY: list[Record] = [hello(), hello(recovery=True), Go(device_state=STATE),
                       Running(pid=42), Serving(), Done(), Complete(),
                       Refused(reason="page at offset 8192 is still missing")]


@pytest.mark.parametrize("record", EVERY, ids=lambda r: r.tag)
def test_every_record_survives_encoding(record: Record) -> None:
    assert decode(encode(record)) == record


def _raw(rec: Record, /, **changes: object) -> bytes:
    obj = json.loads(encode(rec))
    for k, v in changes.items():
        if v is ...:
            del obj[k]
        else:
            obj[k] = v
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff", "not JSON"),
        (b"[1]", "JSON object"),
        (_raw(Done(), kind="other"), "not a post-copy record"),
        (_raw(Done(), version=2), "different versions"),
        (_raw(Done(), record="gossip"), "unknown post-copy record"),
        (_raw(Running(pid=1), pid=...), "missing \\['pid'\\]"),
        (_raw(Done(), extra=1), "unexpected \\['extra'\\]"),
        (_raw(Running(pid=1), pid=True), "must be a u64"),
        (_raw(Running(pid=1), pid=-1), "must be a u64"),
        (_raw(hello(), base=0x7F00_0000_0001), "not whole pages"),
        (_raw(hello(), size=0), "not whole pages"),
        (_raw(hello(), granule=3000), "power of two"),
        (_raw(hello(), recovery=1), "true or false"),
        (_raw(hello(), image=7), "must be text"),
        (_raw(Go(device_state=STATE), device_state={"npages": 1}), "post-copy go"),
        (_raw(Refused(reason="x"), reason="x" * 5000), "at most 1024"),
    ],
)
def test_a_malformed_record_is_refused_with_the_field_named(data: bytes, message: str) -> None:
    with pytest.raises(PostcopyProtocolError, match=message):
        decode(data)


def _converse(records: list[tuple[str, Record]]) -> tuple[Conversation, Conversation]:
    guest, receiver = Conversation(GUEST), Conversation(RECEIVER)
    for sender, record in records:
        (guest if sender == GUEST else receiver).sent(record)
        (receiver if sender == GUEST else guest).received(record)
        assert guest.phase == receiver.phase
    return guest, receiver


def test_a_first_connection_goes_from_hello_to_complete() -> None:
    guest, _ = _converse([(GUEST, hello()), (RECEIVER, Go(device_state=STATE)),
                          (GUEST, Running(pid=42)), (RECEIVER, Done()),
                          (GUEST, Refused(reason="hole")), (RECEIVER, Done()),
                          (GUEST, Complete())])
    assert guest.phase == Phase.COMPLETE


def test_a_recovery_connection_is_taken_over_not_started() -> None:
    guest, _ = _converse([(GUEST, hello(recovery=True)), (RECEIVER, Serving())])
    assert guest.phase == Phase.SERVED
    with pytest.raises(PostcopyProtocolError, match="'go' may not come in phase 'take-over'"):
        _converse([(GUEST, hello(recovery=True)), (RECEIVER, Go(device_state=STATE))])
    with pytest.raises(PostcopyProtocolError, match="'serving' may not come in phase 'go'"):
        _converse([(GUEST, hello()), (RECEIVER, Serving())])


def test_a_record_from_the_wrong_end_or_out_of_order_is_refused() -> None:
    receiver = Conversation(RECEIVER)
    with pytest.raises(PostcopyProtocolError, match="our record 'hello'"):
        receiver.sent(hello())
    guest = Conversation(GUEST)
    with pytest.raises(PostcopyProtocolError, match="the peer's record 'done' may not come "
                                                     "in phase 'hello'"):
        guest.received(Done())
    with pytest.raises(ValueError):
        Conversation("source")


def test_the_table_says_who_sends_each_record() -> None:
    guest_records = {"hello", "hello-recovery", "running", "complete"}
    receiver_records = {"go", "serving", "done"}
    for (_, tag), (sender, _) in TABLE.items():
        if tag in guest_records:
            assert sender == GUEST
        elif tag in receiver_records:
            assert sender == RECEIVER
        else:
            assert tag == "refused"
