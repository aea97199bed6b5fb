"""The project's style gates, so CI keeps them: ruff and mypy (strict) are clean, and the
layers of the package import only downward."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.typecheck import run_mypy

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("migrate", "multifd", "channel", "native")  # top to bottom
BELOW = {layer: set(LAYERS[i + 1:]) for i, layer in enumerate(LAYERS)}


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_ruff_is_clean() -> None:
    r = subprocess.run(["ruff", "check", "."], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_is_clean() -> None:
    r = run_mypy()
    assert r.returncode == 0, r.stdout + r.stderr


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, absolute names as written."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.lineno, node.module))
            # `from zcmigrate import native` names the layer in the imported names.
            if node.module == "zcmigrate":
                out += [(node.lineno, f"zcmigrate.{a.name}") for a in node.names]
    return out


def _sources(layer: str) -> list[Path]:
    return sorted(p for p in (ROOT / layer).rglob("*.py") if "__pycache__" not in p.parts)


def test_layers_import_only_downward() -> None:
    """migrate -> multifd -> channel -> native (ARCHITECTURE.md, "The house")."""
    offenders = []
    for layer in LAYERS:
        for path in _sources(layer):
            for line, module in _imports(path):
                parts = module.split(".")
                if parts[0] in LAYERS:
                    # The old top-level names must not come back: a checkout's folder
                    # would shadow the installed build.
                    offenders.append(f"{path.relative_to(ROOT)}:{line}: bare {module}")
                elif parts[0] == "zcmigrate" and len(parts) > 1 and parts[1] in LAYERS:
                    other = parts[1]
                    if other != layer and other not in BELOW[layer]:
                        offenders.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not offenders, offenders


def test_the_rule_sees_a_bad_import(tmp_path: Path) -> None:
    """The checker above finds an upward import when there is one (it cannot pass blind)."""
    bad = tmp_path / "bad.py"
    bad.write_text("from zcmigrate.migrate.params import MigrationParameters\n"
                   "from zcmigrate import multifd\n")
    assert [m for _, m in _imports(bad)] == ["zcmigrate.migrate.params", "zcmigrate",
                                              "zcmigrate.multifd"]
