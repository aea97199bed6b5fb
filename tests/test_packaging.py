"""Packaging: one import package, zcmigrate, from a fresh clone, as a wheel and as an
editable install; `python -m zcmigrate` works from anywhere; nothing else lands in
site-packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# pip builds the package (the C extension too) into a fresh venv: 13 to 20 s measured on
# 2 cores, up to 33 s while other suites shared them; 300 s before the run is ended as hung
# (the default is 90 s).
PIP_TIMEOUT_S = 300


def _clone(tmp_path: Path) -> Path:
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                      capture_output=True).returncode != 0:
        pytest.skip("this checkout has no commit to clone yet")
    clone = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    return clone


def _clean_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    return env


@pytest.mark.timeout(PIP_TIMEOUT_S)
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to make a fresh clone")
def test_the_wheel_holds_only_the_zcmigrate_package(tmp_path: Path) -> None:
    clone = _clone(tmp_path)
    out = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                        str(out), str(clone)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = out.glob("zcmigrate-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"zcmigrate", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert "zcmigrate/__main__.py" in names
    assert "zcmigrate/setup.py" not in names  # the build script is not part of the package
    assert any(n.startswith("zcmigrate/native/_zcnative") and n.endswith(".so")
               for n in names)
    for layer in ("migrate", "multifd", "channel", "native"):
        assert f"zcmigrate/{layer}/__init__.py" in names


@pytest.mark.timeout(PIP_TIMEOUT_S)
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to make a fresh clone")
def test_an_editable_install_runs_from_another_directory(tmp_path: Path) -> None:
    clone = _clone(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = _clean_env(venv)
    r = subprocess.run(["pip", "install", "-q", "-e", str(clone)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run(["python", "-m", "zcmigrate", "--version"], cwd=elsewhere, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("zcmigrate, version ")
    # The editable install imports the clone's files, with the C module built in place.
    r = subprocess.run(["python", "-c", "import zcmigrate.native as n, zcmigrate.migrate as m;"
                        "print(n.__file__); print(m.__file__); print(n.lib.ZC_EOF)"],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    native_file, migrate_file, eof = r.stdout.split()
    assert Path(native_file).parent == clone / "native"
    assert Path(migrate_file).parent == clone / "migrate"
    assert eof == "-1"


def test_every_subpackage_is_listed_for_the_wheel() -> None:
    """pyproject.toml lists the packages by hand (package-dir maps the checkout's root):
    a folder left out of the list would be missing from wheels while an editable install
    still found it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    found = {"zcmigrate"}
    for layer in ("migrate", "multifd", "channel", "native"):
        for init in (ROOT / layer).rglob("__init__.py"):
            found.add(".".join(("zcmigrate", *init.parent.relative_to(ROOT).parts)))
    assert listed == found
