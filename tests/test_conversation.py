"""The main channel's conversation table (migrate/conversation.py), without processes:
every record a migration sends, in order, passes on both ends; anything out of order is
refused by the table, as the peer's fault or as ours."""

from __future__ import annotations

import itertools

import pytest

from zcmigrate.migrate.conversation import TRANSITIONS, Conversation, Phase
from zcmigrate.migrate.protocol import (
    RECORDS,
    Cancel,
    CommitAck,
    DeviceStateRecord,
    EndOfRam,
    Error,
    Greeting,
    Hello,
    HelloAck,
    Keepalive,
    MultifdFlush,
    RamReceived,
    Record,
    RecordType,
    Role,
    Writeback,
    WritebackDone,
)
from zcmigrate.multifd.wire import LocalProtocolError, RemoteProtocolError

HELLO = Hello(uuid=bytes(16), channels=2, page_size=4096, image_size=1 << 20,
              pages_alloc=512, block="zcmigrate.ram", zero_copy=False,
              zero_page_detection=True)
# A whole live migration as the main channel carries it, in order.
MIGRATION: list[Record] = [
    Greeting(bytes(32)), HELLO, HelloAck(), MultifdFlush(1), Keepalive(), MultifdFlush(2),
    Writeback(),
    WritebackDone(), EndOfRam(3), RamReceived(), DeviceStateRecord(b"{}"), CommitAck(),
]


def _pair() -> tuple[Conversation, Conversation]:
    return Conversation(Role.SOURCE), Conversation(Role.DESTINATION)


def _play(src: Conversation, dst: Conversation, records: list[Record]) -> None:
    for rec in records:
        sender, receiver = (src, dst) if Role.SOURCE in rec.SENDERS else (dst, src)
        sender.send(rec)
        receiver.receive(rec)
        assert sender.phase is receiver.phase


def test_a_whole_migration_passes_on_both_ends_and_ends_done() -> None:
    src, dst = _pair()
    _play(src, dst, MIGRATION)
    assert src.phase is dst.phase is Phase.DONE
    assert src.finished and dst.finished


def test_device_state_before_end_of_ram_is_the_peers_fault() -> None:
    src, dst = _pair()
    _play(src, dst, MIGRATION[:4])
    with pytest.raises(RemoteProtocolError, match="DEVICE_STATE is out of order in phase "
                                                  "precopy"):
        dst.receive(DeviceStateRecord(b"{}"))
    assert dst.phase is Phase.PRECOPY  # a refused record changes nothing


def test_sending_out_of_order_is_our_bug_and_sends_nothing() -> None:
    src, _ = Conversation(Role.SOURCE), None
    with pytest.raises(LocalProtocolError, match="may not send HELLO"):
        src.send(HELLO)  # the destination's greeting comes first
    assert src.phase is Phase.GREETING


def test_a_record_from_the_wrong_end_is_refused_whatever_the_phase() -> None:
    src, dst = _pair()
    _play(src, dst, MIGRATION[:3])
    with pytest.raises(RemoteProtocolError, match="never sent by the destination"):
        src.receive(MultifdFlush(1))
    with pytest.raises(LocalProtocolError, match="never sent by the destination"):
        dst.send(Cancel())


@pytest.mark.parametrize("upto", range(0, 11))
def test_either_end_may_give_up_before_the_commit(upto: int) -> None:
    src, dst = _pair()
    _play(src, dst, MIGRATION[:upto])
    assert dst.may_send(RecordType.ERROR) and src.may_send(RecordType.CANCEL)
    dst.send(Error("no space"))
    src.receive(Error("no space"))
    assert src.phase is dst.phase is Phase.FAILED


def test_once_the_device_state_left_nothing_may_say_nothing_was_committed() -> None:
    """The commit point (ARCHITECTURE.md, invariant 5): after DEVICE_STATE neither end
    may send ERROR or CANCEL, and neither accepts one."""
    src, dst = _pair()
    _play(src, dst, MIGRATION[:11])
    assert src.phase is dst.phase is Phase.COMMIT
    for end, rtype in itertools.product((src, dst), (RecordType.ERROR, RecordType.CANCEL)):
        assert not end.may_send(rtype)
    with pytest.raises(LocalProtocolError):
        dst.send(Error("changed my mind"))
    with pytest.raises(RemoteProtocolError):
        src.receive(Error("changed my mind"))
    with pytest.raises(RemoteProtocolError):
        dst.receive(Cancel())


def test_nothing_follows_the_end() -> None:
    for ending in ([*MIGRATION], [*MIGRATION[:5], Cancel()]):
        src, dst = _pair()
        _play(src, dst, ending)
        assert dst.finished
        for rtype, cls in RECORDS.items():
            assert (dst.phase, rtype) not in TRANSITIONS, cls


def test_every_phase_but_the_ends_is_reachable_and_has_a_way_out() -> None:
    reachable = {Phase.GREETING} | set(TRANSITIONS.values())
    assert reachable == set(Phase)
    for phase in set(Phase) - {Phase.DONE, Phase.FAILED, Phase.CANCELLED}:
        assert any(p is phase for p, _ in TRANSITIONS), phase


def _documented_table() -> dict[tuple[Phase, RecordType], Phase]:
    """docs/architecture.md's table, parsed: `| phase[, phase] | RECORD (who)... | next |`."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "architecture.md").read_text()
    section = doc[doc.index("## The main channel's table"):]
    table: dict[tuple[Phase, RecordType], Phase] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[1] or not cells[1][0].isupper():
            continue  # not a row of the table (or its header)
        phases, record, after = cells
        record_type = RecordType[record.split()[0]]
        for phase in phases.split(","):
            table[(Phase(phase.strip()), record_type)] = Phase(after)
    return table


def test_the_documented_table_is_the_code_s_table() -> None:
    # docs/architecture.md is what a newcomer reads: it must say what the code does.
    assert _documented_table() == TRANSITIONS
