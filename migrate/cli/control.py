"""`zcmigrate status`, `zcmigrate cancel`, `zcmigrate set`: talk to a running `send`.

Argument parsing and output only; the socket protocol lives in migrate/control.py and
the statistics' layout in migrate/stats.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from zcmigrate.migrate.cli.options import json_option
from zcmigrate.migrate.control import request
from zcmigrate.migrate.errors import ControlError
from zcmigrate.migrate.imagefiles import default_socket
from zcmigrate.migrate.stats import MigrationStats
from zcmigrate.migrate.units import parse_bandwidth

SOCKET_OPT = click.option(
    "--socket", "sock", type=click.Path(path_type=Path), default=None,
    envvar="ZCMIGRATE_CONTROL_SOCKET", show_envvar=True,
    help="The migration's control socket [default: the one `send IMAGE` made].",
)


def _path(image: Path | None, sock: Path | None) -> Path:
    if sock is not None:
        return sock
    if image is None:
        raise click.UsageError("name the IMAGE being sent, or pass --socket")
    return default_socket(image)


def _call(path: Path, req: dict[str, Any]) -> dict[str, Any]:
    try:
        reply = request(path, req)
    except ControlError as e:
        raise click.ClickException(str(e)) from e
    if not reply.get("ok"):
        raise click.ClickException(str(reply.get("error", "refused")))
    return reply


@click.command("status")
@click.argument("image", type=click.Path(path_type=Path), required=False)
@SOCKET_OPT
@json_option("query-migrate's JSON instead of text.")
def status_command(image: Path | None, sock: Path | None, as_json: bool) -> None:
    """Show a running migration, in the layout of QEMU's `info migrate`."""
    st = _call(_path(image, sock), {"cmd": "status"})["status"]
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    stats = MigrationStats.from_dict(st)
    click.echo(stats.info_migrate())


@click.command("cancel")
@click.argument("image", type=click.Path(path_type=Path), required=False)
@SOCKET_OPT
def cancel_command(image: Path | None, sock: Path | None) -> None:
    """Cancel a running migration: the guest keeps running here, the destination discards."""
    _call(_path(image, sock), {"cmd": "cancel"})
    click.echo("cancel requested")


@click.command("set")
@click.argument("name", type=click.Choice(["max-bandwidth", "downtime-limit",
                                           "postcopy-start"]))
@click.argument("value", required=False)
@click.argument("image", type=click.Path(path_type=Path), required=False)
@SOCKET_OPT
def set_command(name: str, value: str | None, image: Path | None, sock: Path | None) -> None:
    """Change max-bandwidth (e.g. 256M, 0 = unlimited) or downtime-limit (ms) of a
    running migration, as QEMU's migrate-set-parameters does; or start post-copy at the
    end of the current iteration (`set postcopy-start IMAGE`, QEMU's
    migrate-start-postcopy; the migration must run with --postcopy)."""
    if name == "postcopy-start":
        if value is not None and image is None:
            image = Path(value)  # postcopy-start takes no value: IMAGE came second
        _call(_path(image, sock), {"cmd": "set", "name": name, "value": 1})
        click.echo("post-copy requested: it starts at the end of the current iteration")
        sys.stdout.flush()
        return
    if value is None:
        raise click.UsageError(f"{name} needs a VALUE")
    try:
        v = parse_bandwidth(value) if name == "max-bandwidth" else int(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="VALUE") from e
    _call(_path(image, sock), {"cmd": "set", "name": name, "value": v})
    click.echo(f"{name} set to {value}")
    sys.stdout.flush()
