"""migrate/durable.py: atomic, durable, private writes that a planted file cannot redirect."""

from __future__ import annotations

import os
from pathlib import Path

from zcmigrate.migrate.durable import write_atomic


def test_the_new_file_replaces_the_old_whole_and_private(tmp_path: Path) -> None:
    target = tmp_path / "img.state"
    target.write_bytes(b"old")
    write_atomic(target, b"new state")
    assert target.read_bytes() == b"new state"
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.state"]  # no temporary left


def test_a_planted_link_beside_the_target_receives_nothing(tmp_path: Path) -> None:
    """Links at every name the old scheme would have used (.tmpPID) point elsewhere: the
    write neither follows them nor writes through them."""
    target = tmp_path / "img.state"
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (tmp_path / f"img.state.tmp{os.getpid()}").symlink_to(victim)
    write_atomic(target, b"state")
    assert target.read_bytes() == b"state" and not target.is_symlink()
    assert victim.read_bytes() == b"untouched"
