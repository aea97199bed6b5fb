"""`zcmigrate demo`: a whole live migration on this machine, as a new user's first run.

Starts a guest stand-in on an image, a receiver on loopback, migrates the running guest
with progress, resumes it at the destination, and prints the statistics and the oracle's
verdict. It only orchestrates processes (`python -m zcmigrate ...`) and the source job;
it adds no behaviour.
"""

from __future__ import annotations

import json
import os
import select
import shutil
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
from zcmigrate.migrate.imagefiles import GUEST_SUFFIX, INCOMING_SUFFIX, LOCK_SUFFIX, STATE_SUFFIX
from zcmigrate.migrate.keyfile import keygen, read_key
from zcmigrate.migrate.source import Destination, SourceJob
from zcmigrate.migrate.units import format_rate, format_size, parse_bandwidth, parse_size


class Child:
    """A `python -m zcmigrate ...` child whose stdout is read against deadlines: select on
    the pipe, never a blocking readline, so a silent child cannot hold the demo past its
    timeout."""

    def __init__(self, args: list[str], cwd: Path, **kw: Any) -> None:
        # Not from the user's directory: `python -m` puts it first on sys.path, and inside
        # a source checkout that would shadow the installed (compiled) package.
        self.proc = subprocess.Popen([sys.executable, "-m", "zcmigrate", *args], cwd=cwd,
                                     stdout=subprocess.PIPE, **kw)
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        self._buf = b""
        self._eof = False

    def _read(self, deadline: float) -> bool:
        """Add what the pipe holds to the buffer, waiting until `deadline` at most.
        False when nothing came: the deadline passed, or the child closed its stdout."""
        left = deadline - time.monotonic()
        if self._eof or left <= 0:
            return False
        ready, _, _ = select.select([self._fd], [], [], left)
        if not ready:
            return False
        chunk = os.read(self._fd, 1 << 16)
        if not chunk:
            self._eof = True
            return False
        self._buf += chunk
        return True

    def wait_line(self, prefix: str, timeout: float = 30.0) -> str:
        """The first line starting with `prefix`; ClickException if the child exits first
        or the deadline passes."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                raw, self._buf = self._buf.split(b"\n", 1)
                line = raw.decode(errors="replace")
                if line.startswith(prefix):
                    return line.strip()
            if not self._read(deadline):
                break
        why = "closed its output" if self._eof else f"printed nothing of it in {timeout:g} s"
        raise click.ClickException(f"{self.proc.args!r} did not start: it {why} "
                                   f"(exit {self.proc.poll()})")

    def output(self, timeout: float) -> tuple[int, str]:
        """(exit code, everything it printed after the lines already read), waiting until
        it exits; ClickException past the deadline."""
        deadline = time.monotonic() + timeout
        while self._read(deadline):
            pass
        try:
            if not self._eof:
                raise subprocess.TimeoutExpired(self.proc.args, timeout)
            code = self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise click.ClickException(f"{self.proc.args!r} did not finish within "
                                       f"{timeout:g} s") from None
        out, self._buf = self._buf, b""
        return code, out.decode(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)  # SIGKILL ends it; only reaping is left
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code


SUFFIXES = (GUEST_SUFFIX, STATE_SUFFIX, INCOMING_SUFFIX, LOCK_SUFFIX)


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
    # A directory we made is ours to remove; in the user's --dir, only our files are.
    ours = workdir is None or not workdir.exists()
    base = (workdir or Path(tempfile.mkdtemp(prefix="zcmigrate-demo-"))).resolve()
    base.mkdir(parents=True, exist_ok=True)
    src, dst = base / "source.img", base / "destination.img"
    key = base / "demo.key"
    for p in (src, dst):
        for suffix in ("", *SUFFIXES):
            Path(str(p) + suffix).unlink(missing_ok=True)
    key.unlink(missing_ok=True)
    say = click.echo
    say(f"demo: {format_size(nbytes)} guest dirtying {format_rate(rate)}, "
        f"{params.multifd_channels} channels, multifd-zerocopy "
        f"{'on' if params.multifd_zerocopy else 'off'}, a key of its own, in {base}")
    # Secure as a deployment is: both ends prove one key, and the migration is sealed.
    keygen(key)
    children: list[Child] = []
    ok = False
    try:
        guest = Child(["guest", str(src), "--size", str(nbytes), "--dirty-rate", str(rate),
                       "--fill", "half"], base)
        children.append(guest)
        say(f"source guest: {guest.wait_line('guest running', timeout=120)}")
        recv = Child(["receive", str(dst), "--listen", "127.0.0.1:0", "--log-format", "json",
                      "--json", "--auth-key-file", str(key)], base, stderr=subprocess.DEVNULL)
        children.append(recv)
        port = int(recv.wait_line("listening:").rsplit(":", 1)[1])
        say(f"receiver: listening on 127.0.0.1:{port}")
        job = SourceJob(src, Destination("127.0.0.1", port), params, auth_key=read_key(key))
        code = run_source(job, as_json=as_json, display=ProgressDisplay())
        recv_code, out = recv.output(timeout=60)
        if code != 0 or recv_code != 0:
            raise click.ClickException(f"migration failed (source exit {code}, receiver "
                                       f"exit {recv_code})")
        state = read_device_state(dst)
        verdict = check_oracle(dst, state)
        say(f"oracle: {verdict.message}")
        if not verdict.ok:
            raise click.ClickException("the destination image fails the oracle")
        resumed = Child(["guest", str(dst), "--resume", "--dirty-rate", str(rate)], base)
        children.append(resumed)
        say(f"destination guest: {resumed.wait_line('guest running')}")
        time.sleep(0.5)
        resumed.stop()
        info = json.loads(out[out.index("{"):]) if "{" in out else {}
        say(f"destination: committed {info.get('image', dst)}; the guest ran on there.")
        ok = True
    finally:
        for child in children:
            child.stop()
        files = [Path(str(p) + suffix) for p in (src, dst) for suffix in ("", *SUFFIXES)]
        _tidy(base, [*files, key], whole_dir=ours, failed=not ok)


def _tidy(base: Path, files: list[Path], *, whole_dir: bool, failed: bool) -> None:
    """Remove what the demo made (its directory too, if it made that), or, after a
    failure, keep it for a look and say where it is and how big."""
    if not failed:
        for f in files:
            f.unlink(missing_ok=True)
        if whole_dir:
            shutil.rmtree(base, ignore_errors=True)
        click.echo(f"demo: removed what it made in {base}")
        return
    size = sum(f.stat().st_blocks * 512 for f in files if f.is_file())
    click.echo(f"demo: left its files in {base} ({format_size(size)} on disk) for a look; "
               f"remove them with `rm -r {base}`" if whole_dir else
               f"demo: left its files in {base} ({format_size(size)} on disk) for a look",
               err=True)
