"""`send --json`, `status --json` and `receive --json` print one layout, query-migrate's,
with its key spelling throughout (hyphens), and the status command reads it back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zcmigrate.migrate.destination import ReceiveResult
from zcmigrate.migrate.stats import RECEIVE_FIELDS, MigrationStats, channel_json

SENT = MigrationStats(
    status="completed", total_time_ms=1234, setup_time_ms=12, downtime_ms=45.5,
    expected_downtime_ms=30.0, transferred=3 << 20, remaining=0, total=4 << 20,
    normal_pages=700, normal_bytes=700 * 4096, zero_pages=324, page_size=4096,
    dirty_sync_count=3, dirty_pages_rate=1000, mbps=20.4, dirty_sync_missed_zero_copy=2,
    iteration=4, live=True, error=None, parameters={"multifd-channels": 2},
    channels=tuple(
        {"id": i, "packets": 5, "bytes": 1 << 20, "normal_pages": 350, "zero_pages": 162,
         "syncs": 4, "zero_copy_queued": 5, "zero_copy_completed": 5, "zero_copy_copied": 5}
        for i in range(2)
    ),
)

IMAGE = Path("/var/lib/zcmigrate/vm1/vm1.img")
RECEIVED = ReceiveResult(
    image=IMAGE, state_file=IMAGE.with_name("vm1.img.state"), uuid="00" * 16,
    image_size=4 << 20, page_size=4096, channels=2,
    normal_pages=700, zero_pages=324, bytes_received=3 << 20, syncs=4, total_time_ms=1200.4,
    per_channel=[{k: v for k, v in SENT.channels[i].items() if k in RECEIVE_FIELDS}
                 for i in range(2)],
)


def keys(d: Any, path: str = "") -> set[str]:
    """Every key of a JSON document, as a path: "ram.normal-bytes", "multifd.channels[].id"."""
    out: set[str] = set()
    if isinstance(d, dict):
        for k, v in d.items():
            out |= {f"{path}{k}"} | keys(v, f"{path}{k}.")
    elif isinstance(d, list):
        for v in d:
            out |= keys(v, path.rstrip(".") + "[].")
    return out


def test_send_spells_every_key_as_query_migrate_does() -> None:
    d = SENT.to_dict()
    assert not [k for k in keys(d) if "_" in k]
    assert d["multifd"]["channels"][0] == {
        "id": 0, "packets": 5, "bytes": 1 << 20, "normal-pages": 350, "zero-pages": 162,
        "syncs": 4, "zero-copy-queued": 5, "zero-copy-completed": 5, "zero-copy-copied": 5}
    assert {"status", "total-time", "ram.transferred", "ram.total", "ram.normal",
            "ram.normal-bytes", "ram.zero-pages", "ram.page-size"} <= keys(d)


def test_receive_prints_the_layout_of_send_plus_what_only_it_knows() -> None:
    sent, received = keys(SENT.to_dict()), keys(RECEIVED.to_dict())
    assert not [k for k in received if "_" in k]
    only_here = received - sent
    assert only_here == {"image", "state-file", "uuid", "acknowledged"}
    # The zero-copy counters are the sending side's; nothing else of a channel is missing.
    assert {k for k in sent - received if k.startswith("multifd.")} == {
        "multifd.channels[].zero-copy-queued", "multifd.channels[].zero-copy-completed",
        "multifd.channels[].zero-copy-copied"}
    d = RECEIVED.to_dict()
    assert d["ram"]["iterations"] == 4 and d["ram"]["normal-bytes"] == 700 * 4096
    assert d["total-time"] == 1200 and d["status"] == "completed"


def test_status_reads_the_layout_back() -> None:
    assert MigrationStats.from_dict(SENT.to_dict()) == SENT
    text = MigrationStats.from_dict(SENT.to_dict()).info_migrate()
    assert "multifd channel 1: packets 5 bytes 1048576 normal 350 zero 162 syncs 4" in text


def test_a_channel_is_spelled_with_hyphens() -> None:
    assert channel_json({"id": 1, "normal_pages": 2}) == {"id": 1, "normal-pages": 2}
