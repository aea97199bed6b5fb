"""The project's style gates, so CI keeps them: ruff and mypy (strict) are clean, the
layers of the package import only downward, and only the CLI imports click."""

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


def _click_outside_cli(root: Path) -> list[str]:
    """Modules of the package under `root`, outside migrate/cli/, that import click."""
    paths = [p for p in (root / "__init__.py", root / "__main__.py") if p.exists()]
    paths += [p for layer in LAYERS if (root / layer).is_dir()
              for p in sorted((root / layer).rglob("*.py")) if "__pycache__" not in p.parts]
    cli = root / "migrate" / "cli"
    return [f"{path.relative_to(root)}:{line}: {module}"
            for path in paths if cli not in path.parents
            for line, module in _imports(path) if module.split(".")[0] == "click"]


def test_only_the_cli_imports_click() -> None:
    """click is the command line's (migrate/cli/): the job, the guest and the layers
    below know nothing of it, and `send` pays for click only through its command."""
    assert not _click_outside_cli(ROOT)


def test_the_click_rule_sees_a_violation(tmp_path: Path) -> None:
    (tmp_path / "migrate" / "cli").mkdir(parents=True)
    (tmp_path / "migrate" / "cli" / "send.py").write_text("import click\n")
    (tmp_path / "migrate" / "job.py").write_text("import os\nfrom click.core import Context\n")
    (tmp_path / "channel").mkdir()
    (tmp_path / "channel" / "sock.py").write_text("import click\n")
    assert _click_outside_cli(tmp_path) == ["migrate/job.py:2: click.core",
                                            "channel/sock.py:1: click"]


def _reaching_around_channel(root: Path) -> list[str]:
    """Modules above channel/ that do socket I/O themselves, and modules of migrate/ that
    call the C layer directly: the channel layer offers what they need (reads with a
    deadline, readiness, peek, local sockets), and multifd/ the per-page C work."""
    found = []
    for layer in ("migrate", "multifd"):
        for path in sorted((root / layer).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            for line, module in _imports(path):
                top = module.split(".")
                if top[0] == "socket" or (layer == "migrate" and top[:2] == ["zcmigrate",
                                                                             "native"]):
                    found.append(f"{path.relative_to(root)}:{line}: {module}")
    return found


def test_nothing_above_channel_touches_a_socket_or_migrate_the_c_layer() -> None:
    assert not _reaching_around_channel(ROOT)


def test_the_socket_rule_sees_a_violation(tmp_path: Path) -> None:
    for layer in ("migrate", "multifd"):
        (tmp_path / layer).mkdir()
    (tmp_path / "migrate" / "job.py").write_text("from zcmigrate.native import lib\n")
    (tmp_path / "multifd" / "pool.py").write_text("import socket\nfrom zcmigrate import native\n")
    assert _reaching_around_channel(tmp_path) == ["migrate/job.py:1: zcmigrate.native",
                                                  "multifd/pool.py:1: socket"]
