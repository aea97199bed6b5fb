"""The project's style gates, so CI keeps them: ruff and mypy (strict) are clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_ruff_is_clean() -> None:
    r = subprocess.run(["ruff", "check", "."], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_is_clean() -> None:
    r = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_layers_import_only_downward() -> None:
    """migrate -> multifd -> channel -> native (ARCHITECTURE.md, "The house")."""
    below = {"native": set(), "channel": {"native"}, "multifd": {"channel", "native"},
             "migrate": {"multifd", "channel", "native"}}
    offenders = []
    for layer, allowed in below.items():
        for path in (ROOT / layer).glob("*.py"):
            for line in path.read_text().splitlines():
                words = line.split()
                if len(words) >= 2 and words[0] in ("import", "from"):
                    top = words[1].split(".")[0]
                    if top in below and top != layer and top not in allowed:
                        offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not offenders, offenders
