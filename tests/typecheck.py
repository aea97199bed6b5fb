"""Run mypy (strict, as pyproject.toml configures it) on the package `zcmigrate`.

mypy names modules after their paths, and the package's directory is the checkout itself,
which is not called zcmigrate. So this builds build/typecheck/zcmigrate/, a tree of
symbolic links to the package's own files and its four layer folders, and runs mypy
there. Usable by hand: `python tests/typecheck.py` prints mypy's report and exits with
mypy's code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"
# What the package directory holds (pyproject.toml's packages and the root modules).
MEMBERS = ("__init__.py", "__main__.py", "migrate", "multifd", "channel", "native")


def link_tree() -> Path:
    pkg = TREE / "zcmigrate"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in MEMBERS:
        link = pkg / name
        target = ROOT / name
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return TREE


def run_mypy() -> subprocess.CompletedProcess[str]:
    tree = link_tree()
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(ROOT / ".mypy_cache")],
        cwd=tree, capture_output=True, text=True, timeout=600,
    )


if __name__ == "__main__":
    r = run_mypy()
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    sys.exit(r.returncode)
