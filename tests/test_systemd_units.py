"""The systemd units: systemd's own verifier accepts them, their exposure score does not
get worse than systemd/security-baseline.txt, the env file example names only variables
zcmigrate reads, and the receiver's code runs under MemoryDenyWriteExecute's rule.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
SERVICE = "zcmigrate-receive@.service"
INSTANCE = "zcmigrate-receive@guest1.service"
SHIPPED_EXEC = "/usr/local/bin/zcmigrate"
BASELINE = UNITS / "security-baseline.txt"
_EXPOSURE = re.compile(r"Overall exposure level for (\S+): (\d+\.\d+)")

needs_analyze = pytest.mark.skipif(not shutil.which("systemd-analyze"),
                                   reason="systemd-analyze is not installed")


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The units as shipped, with ExecStart pointing at the zcmigrate installed here
    (verify refuses a command that does not exist), plus a copy named as an instance."""
    installed = shutil.which("zcmigrate")
    if installed is None:
        pytest.skip("zcmigrate is not installed on PATH (pip install -e '.[test]')")
    for unit in UNITS.glob("zcmigrate-receive@.*"):
        text = unit.read_text()
        assert f"ExecStart={SHIPPED_EXEC} " in text
        (tmp_path / unit.name).write_text(text.replace(f"ExecStart={SHIPPED_EXEC} ",
                                                       f"ExecStart={installed} "))
    shutil.copy(tmp_path / SERVICE, tmp_path / INSTANCE)
    return tmp_path


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True,
                          timeout=120)


@needs_analyze
def test_systemd_analyze_verify_accepts_the_units(unit_dir: Path) -> None:
    for unit in sorted(unit_dir.iterdir()):
        r = analyze("verify", "--man=no", str(unit))
        assert r.returncode == 0, r.stderr
        # Unknown keys and bad values are only warnings: none may name our unit.
        assert "zcmigrate-receive@" not in r.stderr, r.stderr


@needs_analyze
def test_verify_catches_a_broken_unit(unit_dir: Path) -> None:
    # The check above means something: the same verifier rejects a missing command.
    broken = unit_dir / "zcmigrate-receive@broken.service"
    broken.write_text(re.sub(r"(?m)^ExecStart=\S+", "ExecStart=/nonexistent/zcmigrate",
                             (unit_dir / SERVICE).read_text()))
    r = analyze("verify", "--man=no", str(broken))
    assert r.returncode != 0 and "/nonexistent/zcmigrate" in r.stderr
    # A misspelt hardening key passes with exit 0 and a warning that names the unit.
    typo = unit_dir / "zcmigrate-receive@typo.service"
    typo.write_text((unit_dir / SERVICE).read_text().replace("PrivateTmp=", "PrivateTmpp="))
    r = analyze("verify", "--man=no", str(typo))
    assert r.returncode == 0 and "zcmigrate-receive@typo.service" in r.stderr


def exposure(unit: Path) -> float:
    r = analyze("security", "--offline=yes", "--no-pager", str(unit))
    m = _EXPOSURE.search(r.stdout)
    assert m is not None, r.stdout + r.stderr
    return float(m.group(2))


@needs_analyze
def test_the_exposure_score_is_no_worse_than_the_baseline(unit_dir: Path) -> None:
    baseline = float(BASELINE.read_text().split()[0])
    score = exposure(unit_dir / INSTANCE)
    print(f"systemd-analyze security: {INSTANCE}: {score} (baseline {baseline})")
    assert score <= baseline, (
        f"exposure {score} is worse than the baseline {baseline}: harden the unit again, "
        f"or justify the change and raise {BASELINE.name}"
    )


def _env_example_variables() -> list[str]:
    names = []
    for line in (UNITS / "zcmigrate.env.example").read_text().splitlines():
        line = line.strip().lstrip("#").strip()
        m = re.match(r"(ZCMIGRATE_[A-Z_]+)=", line)
        if m:
            names.append(m.group(1))
    return names


def test_the_env_file_example_names_only_variables_zcmigrate_reads() -> None:
    import click

    from zcmigrate.migrate.cli import main

    # The group loads a command's module on first use: ask it for each one.
    ctx = click.Context(main)
    cmds = {n: main.get_command(ctx, n) for n in main.list_commands(ctx)}
    read = {p.envvar for cmd in cmds.values() if cmd for p in cmd.params if p.envvar}
    names = _env_example_variables()
    assert {"ZCMIGRATE_LISTEN", "ZCMIGRATE_IMAGE", "ZCMIGRATE_MULTIFD_CHANNELS",
            "ZCMIGRATE_MULTIFD_ZEROCOPY"} <= set(names)
    assert set(names) <= read, set(names) - read
    # And the receiver reads where it listens and what it writes from the file.
    receive_cmd = cmds["receive"]
    assert receive_cmd is not None
    receive = {p.envvar for p in receive_cmd.params if p.envvar}
    assert {"ZCMIGRATE_LISTEN", "ZCMIGRATE_IMAGE"} <= receive


def test_the_image_directory_is_the_one_the_unit_may_write() -> None:
    unit = (UNITS / SERVICE).read_text()
    assert "StateDirectory=zcmigrate/%i" in unit
    assert "ReadWritePaths=/var/lib/zcmigrate/%i" in unit
    image = next(line.split("=", 1)[1] for line in
                 (UNITS / "zcmigrate.env.example").read_text().splitlines()
                 if line.startswith("ZCMIGRATE_IMAGE="))
    assert image.startswith("/var/lib/zcmigrate/guest1/")


# Under PR_SET_MDWE (the prctl behind MemoryDenyWriteExecute= where the kernel has it):
# load the whole CLI and the cffi module, send zero-copy over loopback, look up a route.
_UNDER_MDWE = """
import ctypes, mmap, os, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(77)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit(78)  # the rule is not in force: the test would prove nothing
except OSError:
    pass
import click
from zcmigrate.migrate.cli import main
ctx = click.Context(main)
assert all(main.get_command(ctx, n) for n in main.list_commands(ctx))  # every command
from zcmigrate.channel.zcsocket import Listener, connect
from zcmigrate.channel.route import lookup_route
lst = Listener("127.0.0.1", 0)
got = []
t = threading.Thread(target=lambda: got.append(lst.accept(10)))
t.start()
tx = connect("127.0.0.1", lst.port, zero_copy=True)
t.join(10)
rx = got[0]
data = mmap.mmap(-1, 1 << 20)
data.write(os.urandom(1 << 20))
into = bytearray(1 << 20)
r = threading.Thread(target=lambda: rx.readv_into([into]))
r.start()
tx.writev([memoryview(data)], zero_copy=True)
tx.flush(10)
r.join(10)
assert into == data[:], "pages differ"
assert lookup_route("127.0.0.1").ifname == "lo"
print("ok")
"""


def test_the_code_runs_without_writable_executable_memory() -> None:
    r = subprocess.run([sys.executable, "-c", _UNDER_MDWE], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    if r.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3)")
    assert r.returncode != 78, "PR_SET_MDWE did not refuse a W+X mapping"
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
