"""The zcmigrate command line (click): send, receive, guest, demo (and check, status, cancel).

Only argument parsing, signals, output and exit codes; the work lives in the modules
it calls. Every option also reads a ZCMIGRATE_... environment variable.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from zcmigrate.channel import sdnotify
from zcmigrate.channel.errors import ChannelError
from zcmigrate.channel.zcsocket import Listener, format_hostport
from zcmigrate.migrate import logs
from zcmigrate.migrate.check_cli import check_command
from zcmigrate.migrate.cli_options import (
    AUTH_KEY,
    EXIT_CODES,
    LOG_FORMAT,
    migration_options,
    params_from,
    parse_hostport,
    read_key,
    run_source,
)
from zcmigrate.migrate.cli_types import json_option
from zcmigrate.migrate.control import ControlServer
from zcmigrate.migrate.control_cli import cancel_command, set_command, status_command
from zcmigrate.migrate.demo import demo_command
from zcmigrate.migrate.destination import DestinationJob
from zcmigrate.migrate.errors import ControlError, ReceiveError
from zcmigrate.migrate.guest_cli import guest_command
from zcmigrate.migrate.imagefiles import default_socket
from zcmigrate.migrate.progress import ProgressDisplay
from zcmigrate.migrate.source import Destination, SourceJob


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zcmigrate")
def main() -> None:
    """Live-migrate a running workload's memory over multifd channels.

    Start `zcmigrate receive` on the destination, then `zcmigrate send` on the source.
    `zcmigrate demo` does both on this machine with a running guest stand-in.
    """


@main.command("send", epilog=EXIT_CODES)
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
@AUTH_KEY
@click.option("--control-socket", type=click.Path(path_type=Path), default=None,
              envvar="ZCMIGRATE_CONTROL_SOCKET", show_envvar=True,
              help="Unix socket for `zcmigrate status|cancel|set` [default: "
              "$XDG_RUNTIME_DIR/zcmigrate/IMAGE.sock, or /run/zcmigrate/IMAGE.sock as root].")
@json_option("Print the final statistics as JSON.")
@LOG_FORMAT
def send_command(image: Path, to: str, static: bool, page_size: int,
                 auth_key_file: Path | None, control_socket: Path | None, as_json: bool,
                 log_format: str, **kw: Any) -> None:
    """Migrate IMAGE (and the guest running on it, if any) to a receiver.

    With a guest running on IMAGE (started with `zcmigrate guest`), the migration is
    live: precopy iterations while the guest runs, then a short pause for the last
    pages and the device state. Without one, the image goes over in one pass.
    """
    logs.configure(log_format)
    host, port = parse_hostport(to)
    job = SourceJob(image, Destination(host, port), params_from(kw), page_size=page_size,
                    static=static, auth_key=read_key(auth_key_file))
    try:
        server = ControlServer(control_socket or default_socket(image), job)
    except (ControlError, OSError) as e:
        raise click.ClickException(f"control socket: {e}") from e
    try:
        code = run_source(job, as_json=as_json, display=ProgressDisplay())
    finally:
        server.close()
    sys.exit(code)


# ------------------------------------------------------------------- receive


@main.command("receive", epilog="""\b
Exit codes:
  0  committed (with --serve: stopped cleanly by SIGTERM)
  1  the migration failed; nothing was committed
  2  usage error
  4  cancelled by the source, or SIGTERM while receiving""")
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path),
                envvar="ZCMIGRATE_IMAGE")
@click.option("--listen", default="0.0.0.0:4444", show_default=True,
              envvar="ZCMIGRATE_LISTEN", show_envvar=True,
              help="HOST:PORT to listen on (port 0: any free port, printed on stdout).")
@click.option("--serve", is_flag=True, envvar="ZCMIGRATE_SERVE", show_envvar=True,
              help="Stay up and accept successive migrations (the systemd service).")
@click.option("--accept-timeout", type=click.FloatRange(0), default=0.0, show_default=True,
              envvar="ZCMIGRATE_ACCEPT_TIMEOUT", show_envvar=True,
              help="Seconds to wait for a source; 0 = forever.")
@AUTH_KEY
@json_option("Print the result as JSON.")
@LOG_FORMAT
def receive_command(image: Path, listen: str, serve: bool, accept_timeout: float,
                    auth_key_file: Path | None, as_json: bool, log_format: str) -> None:
    """Receive a migration into IMAGE.

    Pages land in IMAGE.incoming; IMAGE and its device state IMAGE.state are replaced
    only when the migration commits. Resume the guest with `zcmigrate guest IMAGE
    --resume`.
    """
    logs.configure(log_format)
    host, port = parse_hostport(listen)
    key = read_key(auth_key_file)
    try:
        socks = sdnotify.listen_fds()
        listener = Listener.from_socket(socks[0]) if socks else Listener(host, port)
    except ChannelError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"listening: {format_hostport(*listener.address)}")
    sys.stdout.flush()
    stopping = threading.Event()
    current: list[DestinationJob] = []

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()
        sdnotify.notify("STOPPING=1", f"STATUS=stopping on {signal.Signals(signum).name}")
        listener.shutdown()
        for job in current:
            job.cancel(f"{signal.Signals(signum).name} received")

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    sdnotify.notify("READY=1", f"STATUS=listening on {format_hostport(*listener.address)}")
    code = 0
    try:
        while not stopping.is_set():
            job = DestinationJob(
                image, listener, auth_key=key, accept_timeout=accept_timeout or None,
                status=_status_line,
            )
            current[:] = [job]
            try:
                result = job.run()
            except ReceiveError as e:
                if stopping.is_set() and serve:
                    break
                click.echo(f"zcmigrate: {e}", err=True)
                code = e.exit_code
                if not serve:
                    break
                continue
            if as_json:
                click.echo(json.dumps(result.to_dict(), indent=2))
            else:
                click.echo(f"committed: {result.image} ({result.normal_pages} normal pages, "
                           f"{result.zero_pages} zero pages, {result.syncs} syncs); "
                           f"resume with: zcmigrate guest {result.image} --resume")
            sys.stdout.flush()
            if not serve:
                break
    finally:
        listener.close()
    sys.exit(code)


def _status_line(text: str) -> None:
    """A STATUS= line for systemd; an unreachable NOTIFY_SOCKET must not fail a migration."""
    with contextlib.suppress(OSError):
        sdnotify.notify(f"STATUS={text}")


main.add_command(guest_command)


main.add_command(check_command)
main.add_command(demo_command)
main.add_command(status_command)
main.add_command(cancel_command)
main.add_command(set_command)
