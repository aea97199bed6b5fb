"""Locked memory for real: a child without CAP_IPC_LOCK and with a small RLIMIT_MEMLOCK.

Root is exempt from RLIMIT_MEMLOCK through CAP_IPC_LOCK, so the child drops the
capability with setpriv and gets a 512 KiB limit with prlimit (seed 003: ENOBUFS).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

LIMIT = 512 * 1024
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("prlimit"),
    reason="needs root with setpriv and prlimit to drop CAP_IPC_LOCK for a child",
)


def run_child(total: int, chunk: int, cap: int, delay: float) -> dict[str, Any]:
    cmd = [
        "setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock",
        "prlimit", f"--memlock={LIMIT}:{LIMIT}",
        sys.executable, "-m", "tests.memlock_child", str(total), str(chunk), str(cap), str(delay),
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    result: dict[str, Any] = json.loads(out.stdout)
    # The child really runs unprivileged with the small limit.
    assert result["probe"]["cap_ipc_lock"] is False
    assert result["probe"]["memlock_soft"] == LIMIT
    return result


def test_pinned_sends_past_the_limit_hit_enobufs_and_take_the_drain_and_retry_path() -> None:
    # 256 KiB sends to a reader that stalls until the sender hit ENOBUFS (10 s at most):
    # the second send would pin more than 512 KiB while the first is still unacknowledged.
    r = run_child(total=64 << 20, chunk=256 << 10, cap=0, delay=10)
    assert r["stats"]["enobufs_retries"] >= 1
    if r["error"] is not None:
        assert r["error_type"] == "ZeroCopyLimitError"
        assert "CAP_IPC_LOCK" in r["error"] and "multifd-zerocopy off" in r["error"]


def test_an_in_flight_cap_inside_the_budget_avoids_enobufs_entirely() -> None:
    # The reader stalls until the cap made the sender wait (10 s at most).
    r = run_child(total=64 << 20, chunk=256 << 10, cap=192 << 10, delay=10)
    assert r["error"] is None, r["error"]
    assert r["identical"] is True
    assert r["stats"]["enobufs_retries"] == 0
    assert r["stats"]["in_flight_peak"] <= 192 << 10
    assert r["stats"]["in_flight_waits"] > 0  # the cap, not luck, kept it inside
    assert r["stats"]["zero_copy_queued"] == r["stats"]["zero_copy_completed"]
    assert r["flush"] == 1


def test_a_limit_too_small_for_one_send_fails_with_an_error_naming_the_remedies() -> None:
    r = run_child(total=8 << 20, chunk=1 << 20, cap=0, delay=0.0)
    assert r["error_type"] == "ZeroCopyLimitError"
    for remedy in ("LimitMEMLOCK", "CAP_IPC_LOCK", "multifd-zerocopy off", "in-flight cap"):
        assert remedy in r["error"]
    assert r["stats"]["enobufs_retries"] == 1
    assert r["stats"]["zero_copy_queued"] == 0
