"""`zcmigrate demo`: a whole live migration on this machine, as a new user's first run.

Starts a guest stand-in on an image, a receiver on loopback, migrates the running guest
with progress, resumes it at the destination, and prints the statistics and the oracle's
verdict. It only orchestrates processes and the source job; it adds no behaviour.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from zcmigrate.migrate.cli import logs
from zcmigrate.migrate.cli.options import json_option, migration_options, params_from
from zcmigrate.migrate.cli.progress import ProgressDisplay
from zcmigrate.migrate.cli.send import run_source
from zcmigrate.migrate.guest import check_oracle, read_device_state
from zcmigrate.migrate.source import Destination, SourceJob
from zcmigrate.migrate.units import format_rate, format_size, parse_bandwidth, parse_size


def _spawn(args: list[str], cwd: Path, **kw: Any) -> subprocess.Popen[str]:
    # Not from the user's directory: `python -m` puts it first on sys.path, and inside a
    # source checkout that would shadow the installed (compiled) package.
    return subprocess.Popen([sys.executable, "-m", *args], text=True, cwd=cwd,
                            stdout=subprocess.PIPE, **kw)


def _wait_line(proc: subprocess.Popen[str], prefix: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line.strip()
        if not line and proc.poll() is not None:
            break
    raise click.ClickException(f"{proc.args!r} did not start "
                               f"(exit {proc.poll()})")


def _stop(proc: subprocess.Popen[str], timeout: float = 10.0) -> int:
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@click.command("demo")
@click.option("--size", default="256M", show_default=True, envvar="ZCMIGRATE_DEMO_SIZE",
              show_envvar=True, help="Guest image size.")
@click.option("--dirty-rate", default="64M", show_default=True,
              envvar="ZCMIGRATE_DEMO_DIRTY_RATE", show_envvar=True,
              help="Bytes per second the guest dirties while it is migrated.")
@click.option("--dir", "workdir", type=click.Path(file_okay=False, path_type=Path),
              default=None, envvar="ZCMIGRATE_DEMO_DIR", show_envvar=True,
              help="Where to put the images [default: a new temporary directory].")
@migration_options
@json_option("Print the final statistics as JSON.")
def demo_command(size: str, dirty_rate: str, workdir: Path | None, as_json: bool,
                 **kw: Any) -> None:
    """Live-migrate a running guest stand-in over loopback and check the result.

    Exit code 0 only if the migration completed and the oracle passed at the destination.
    """
    logs.configure("console" if sys.stderr.isatty() else "json", level="warning")
    nbytes, rate = parse_size(size), parse_bandwidth(dirty_rate)
    params = params_from(kw)
    base = (workdir or Path(tempfile.mkdtemp(prefix="zcmigrate-demo-"))).resolve()
    base.mkdir(parents=True, exist_ok=True)
    src, dst = base / "source.img", base / "destination.img"
    for p in (src, dst):
        for suffix in ("", ".guest", ".state", ".incoming"):
            Path(str(p) + suffix).unlink(missing_ok=True)
    say = click.echo
    say(f"demo: {format_size(nbytes)} guest dirtying {format_rate(rate)}, "
        f"{params.multifd_channels} channels, multifd-zerocopy "
        f"{'on' if params.multifd_zerocopy else 'off'}, in {base}")
    procs: list[subprocess.Popen[str]] = []
    try:
        guest = _spawn(["zcmigrate", "guest", str(src), "--size", str(nbytes),
                        "--dirty-rate", str(rate), "--fill", "half"], base)
        procs.append(guest)
        say(f"source guest: {_wait_line(guest, 'guest running', timeout=120)}")
        recv = _spawn(["zcmigrate", "receive", str(dst), "--listen", "127.0.0.1:0",
                       "--log-format", "json", "--json"], base, stderr=subprocess.DEVNULL)
        procs.append(recv)
        port = int(_wait_line(recv, "listening:").rsplit(":", 1)[1])
        say(f"receiver: listening on 127.0.0.1:{port}")
        job = SourceJob(src, Destination("127.0.0.1", port), params)
        code = run_source(job, as_json=as_json, display=ProgressDisplay())
        assert recv.stdout is not None
        out, _ = recv.communicate(timeout=60)
        if code != 0 or recv.returncode != 0:
            raise click.ClickException(f"migration failed (source exit {code}, receiver "
                                       f"exit {recv.returncode})")
        state = read_device_state(dst)
        verdict = check_oracle(dst, state)
        say(f"oracle: {verdict.message}")
        if not verdict.ok:
            raise click.ClickException("the destination image fails the oracle")
        resumed = _spawn(["zcmigrate", "guest", str(dst), "--resume",
                          "--dirty-rate", str(rate)], base)
        procs.append(resumed)
        say(f"destination guest: {_wait_line(resumed, 'guest running')}")
        time.sleep(0.5)
        _stop(resumed)
        info = json.loads(out[out.index("{"):]) if "{" in out else {}
        say(f"destination: committed {info.get('image', dst)}; the guest ran on there.")
    finally:
        for proc in procs:
            _stop(proc)
