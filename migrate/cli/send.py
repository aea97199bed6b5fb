"""`zcmigrate send`: migrate an image, and the guest running on it, to a receiver; and
run_source, the loop that runs a source job under signals and progress (demo uses it).

Options, signals, output and exit codes only: the migration is migrate.source's. Its
imports are what every migration pays at start-up, so it imports nothing it does not run.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from zcmigrate.channel.aead import CIPHERS, DEFAULT_CIPHER
from zcmigrate.migrate.cli import logs
from zcmigrate.migrate.cli.options import (
    AUTH_KEY,
    LOG_FORMAT,
    SEND_EXIT_CODES,
    json_option,
    migration_options,
    params_from,
    parse_hostport,
    read_key,
)
from zcmigrate.migrate.cli.progress import ProgressDisplay
from zcmigrate.migrate.control import ControlServer
from zcmigrate.migrate.errors import ControlError, MigrationError
from zcmigrate.migrate.imagefiles import default_socket
from zcmigrate.migrate.source import Destination, SourceJob
from zcmigrate.migrate.stats import MigrationStats


@click.command("send", epilog=SEND_EXIT_CODES)
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path),
                envvar="ZCMIGRATE_IMAGE")
@click.option("--to", "to", required=True, envvar="ZCMIGRATE_DESTINATION", show_envvar=True,
              help="The receiver's HOST:PORT.")
@migration_options
@click.option("--static", is_flag=True, envvar="ZCMIGRATE_STATIC", show_envvar=True,
              help="Migrate the image as it is, even if a guest control file is beside it.")
@click.option("--page-size", type=click.IntRange(512, 65536), default=4096, show_default=True,
              envvar="ZCMIGRATE_PAGE_SIZE", show_envvar=True,
              help="Page size of a static image (a running guest says its own).")
@click.option("--resume", is_flag=True, envvar="ZCMIGRATE_RESUME", show_envvar=True,
              help="Finish the post-copy of IMAGE that was interrupted (exit 8): a new session "
              "to the receiver that waits for it (--to), same migration; it sends the pages "
              "the destination's guest still lacks, then commits.")
@AUTH_KEY
@click.option("--no-encryption", is_flag=True, envvar="ZCMIGRATE_NO_ENCRYPTION",
              show_envvar=True,
              help="With a key, leave page data in clear (the handshake stays mutual and the "
              "main channel sealed): only on a link no one else can read or write.")
@click.option("--cipher", type=click.Choice(list(CIPHERS)), default=DEFAULT_CIPHER,
              show_default=True, envvar="ZCMIGRATE_CIPHER", show_envvar=True,
              help="With a key, the AEAD of the session: aes-128-ocb, twice as fast as GCM "
              "where the CPU has AES-NI, or aes-128-gcm where policy asks for an algorithm "
              "NIST approves. The receiver takes either unless it requires one (receive "
              "--require-cipher).")
@click.option("--control-socket", type=click.Path(path_type=Path), default=None,
              envvar="ZCMIGRATE_CONTROL_SOCKET", show_envvar=True,
              help="Unix socket for `zcmigrate status|cancel|set` [default: one named after "
              "IMAGE's full path in $XDG_RUNTIME_DIR/zcmigrate, or /run/zcmigrate as root].")
@json_option("Print the final statistics as JSON.")
@LOG_FORMAT
def send_command(image: Path, to: str, static: bool, page_size: int, resume: bool,
                 auth_key_file: Path | None, no_encryption: bool, cipher: str,
                 control_socket: Path | None,
                 as_json: bool, log_format: str, **kw: Any) -> None:
    """Migrate IMAGE (and the guest running on it, if any) to a receiver.

    With a guest running on IMAGE (started with `zcmigrate guest`), the migration is
    live: precopy iterations while the guest runs, then a short pause for the last
    pages and the device state. Without one, the image goes over in one pass.
    """
    logs.configure(log_format)
    host, port = parse_hostport(to)
    key = read_key(auth_key_file)
    if no_encryption and key is None:
        raise click.UsageError("--no-encryption goes with --auth-key-file: without a key "
                               "nothing is encrypted anyway")
    if cipher != DEFAULT_CIPHER and key is None:
        raise click.UsageError("--cipher goes with --auth-key-file: without a key nothing is "
                               "encrypted")
    if resume and static:
        raise click.UsageError("--resume finishes an interrupted post-copy of a running "
                               "guest: --static does not go with it")
    job = SourceJob(image, Destination(host, port), params_from(kw), page_size=page_size,
                    static=static, auth_key=key, encryption=not no_encryption, cipher=cipher,
                    resume=resume)
    try:
        server = ControlServer(control_socket or default_socket(image), job)
    except (ControlError, OSError) as e:
        raise click.ClickException(f"control socket: {e}") from e
    try:
        code = run_source(job, as_json=as_json, display=ProgressDisplay())
    finally:
        server.close()
    sys.exit(code)


def run_source(job: SourceJob, *, as_json: bool, display: ProgressDisplay,
               install_signals: bool = True) -> int:
    """Run `job` on a migration thread; Ctrl-C and SIGTERM cancel it. Returns the exit code."""
    result: dict[str, Any] = {}

    def migrate() -> None:
        try:
            result["stats"] = job.run()
        except MigrationError as e:
            result["error"] = e

    def on_signal(signum: int, frame: object) -> None:
        if not job.cancel(f"{signal.Signals(signum).name} received"):
            click.echo("too late to cancel: the destination is committing", err=True)

    old: dict[signal.Signals, Any] = {}
    if install_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, on_signal)
    t = threading.Thread(target=migrate, name="migration")
    t.start()
    try:
        while t.is_alive():
            t.join(0.1)
            display.update(job.snapshot())
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    stats: MigrationStats = job.snapshot()
    display.finish(stats)
    if as_json:
        click.echo(json.dumps(stats.to_dict(), indent=2))
    else:
        click.echo(stats.info_migrate())
    err = result.get("error")
    if err is not None:
        click.echo(f"zcmigrate: {err}", err=True)
        return int(getattr(err, "exit_code", 1))
    return 0
