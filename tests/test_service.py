"""The receiver as the systemd service runs it: the unit's exact ExecStart line, its
environment file, and a NOTIFY_SOCKET this test binds (systemd is not PID 1 here)."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.child_output import DIE_WITH_PARENT, ChildOutput
from tests.migration_procs import ROOT, Guest, finish, send, stop

UNIT = ROOT / "systemd" / "zcmigrate-receive@.service"


def exec_start() -> list[str]:
    """The unit's ExecStart, with the installed script's real path for its binary."""
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.read(UNIT)
    argv = shlex.split(cp["Service"]["ExecStart"])
    script = shutil.which("zcmigrate")
    if script is None:
        pytest.skip("the zcmigrate script is not installed (pip install -e .)")
    assert Path(argv[0]).name == "zcmigrate"
    return [script, *argv[1:]]


def read_env_file(path: Path) -> dict[str, str]:
    """EnvironmentFile= semantics for the simple lines we write: KEY=value, # comments."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


class Notifications:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.lines: list[str] = []

    def wait_for(self, line: str, timeout: float = 30) -> None:
        self.wait_until(lambda lines: line in lines, repr(line), timeout)

    def wait_until(self, done: Callable[[list[str]], bool], what: str,
                   timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not done(self.lines):
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} never came; got {self.lines}")
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.lines += data.decode().splitlines()

    def status_lines(self) -> list[str]:
        return [x for x in self.lines if x.startswith("STATUS=")]


def test_service_readiness_two_migrations_status_and_clean_stop(tmp_path: Path) -> None:
    image = tmp_path / "guest.img"
    env_file = tmp_path / "guest1.env"
    env_file.write_text(
        "# as /etc/zcmigrate/guest1.env\n"
        "ZCMIGRATE_LISTEN=127.0.0.1:0\n"
        f"ZCMIGRATE_IMAGE={image}\n"
        "ZCMIGRATE_MULTIFD_CHANNELS=2\n"
        "ZCMIGRATE_MULTIFD_ZEROCOPY=on\n"
        "ZCMIGRATE_REPLACE=yes\n"
    )
    notify = Notifications(tmp_path / "notify.sock")
    env = {**os.environ, **read_env_file(env_file), "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    svc = subprocess.Popen([*DIE_WITH_PARENT, *exec_start()], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    # Read from the start: the service logs two migrations to stderr, more than a pipe
    # holds, and a service blocked on a full pipe would hang the test.
    output = ChildOutput(svc)
    try:
        notify.wait_for("READY=1")
        line = output.wait_line("stdout", lambda line: line.startswith("listening:"),
                                "its 'listening:' line", 30)
        port = int(line.strip().rsplit(":", 1)[1])

        # First: a live guest; second: a static image. Both into the same service.
        src1 = tmp_path / "src1.img"
        guest = Guest.start(src1, "16M", "8M")
        code, _, err = finish(send(src1, port, "--multifd-zerocopy", "on"))
        assert code == 0, err
        stop(guest.proc)
        assert (tmp_path / "guest.img.state").exists()
        check = subprocess.run([shutil.which("zcmigrate") or "zcmigrate", "guest", str(image),
                                "--check"], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr

        src2 = tmp_path / "src2.img"
        src2.write_bytes(os.urandom(4 << 20))
        code, _, err = finish(send(src2, port))
        assert code == 0, err
        assert image.read_bytes() == src2.read_bytes()

        # The service says "committed" after its COMMIT_ACK, so the source can exit before
        # it does: wait for the second one rather than look once and hope it came.
        notify.wait_until(
            lambda lines: sum("committed" in x for x in lines if x.startswith("STATUS=")) >= 2,
            "a second STATUS=... committed")
        statuses = notify.status_lines()
        assert any("committing" in s for s in statuses), statuses
        assert sum("committed" in s for s in statuses) >= 2, statuses
        assert svc.poll() is None, "the service stopped after a migration"

        # SIGTERM must wake a service waiting for the next migration: first see it there
        # (each job says so before it accepts), so the signal cannot land mid-migration.
        notify.wait_until(
            lambda lines: lines.count("STATUS=waiting for a migration") >= 3,
            "a third STATUS=waiting for a migration")
        svc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        code, _, err = output.wait_exit(15)
        assert code == 0, err
    finally:
        if svc.poll() is None:
            svc.kill()
            svc.wait()
        notify.sock.close()
