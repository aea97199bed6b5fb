"""What several commands share: the migration options, --log-format, --auth-key-file,
--json, HOST:PORT and key parsing, and the exit-code epilogs.

Click plumbing only: no migration logic lives here, and no command.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from zcmigrate.migrate.cli.types import BandwidthType, SizeType
from zcmigrate.migrate.errors import ParameterError
from zcmigrate.migrate.params import (
    DEFAULT_CHANNELS,
    DEFAULT_DOWNTIME_LIMIT_MS,
    DEFAULT_MAX_ITERATIONS,
    DEFAULT_PEER_TIMEOUT,
    DEFAULT_THROTTLE_INCREMENT,
    DEFAULT_THROTTLE_INITIAL,
    MAX_PEER_TIMEOUT,
    MIN_PEER_TIMEOUT,
    MigrationParameters,
)

F = TypeVar("F", bound=Callable[..., Any])

SEND_EXIT_CODES = """\b
Exit codes:
  0  completed (the destination committed)
  1  failed; the source guest was resumed, the destination discarded everything
  2  usage error
  4  cancelled (Ctrl-C or SIGTERM, or `zcmigrate cancel`)
  5  cannot converge (dirty rate too high for max-bandwidth and downtime-limit)
  6  outcome unknown: the device state left but no commit came back; the guest
     stays paused at the source: `zcmigrate resume IMAGE` if the destination did
     not commit, `zcmigrate retire IMAGE` if it did (see the message)"""

RECEIVE_EXIT_CODES = """\b
Exit codes:
  0  committed (with --serve: stopped cleanly by SIGTERM)
  1  the migration failed; nothing was committed
  2  usage error
  4  cancelled by the source, or SIGTERM while receiving; nothing was committed
  7  committed, but the acknowledgement could not be delivered: the source
     keeps its guest paused; retire it there (`zcmigrate retire IMAGE`)"""


def parse_hostport(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT; BadParameter otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{text!r} is not HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


ONOFF = click.Choice(["on", "off"])
LOG_FORMAT = click.option(
    "--log-format", type=click.Choice(["auto", "console", "json"]), default="auto",
    show_default=True, envvar="ZCMIGRATE_LOG_FORMAT", show_envvar=True,
    help="Logs on stderr: console on a terminal, JSON lines otherwise (auto).",
)
AUTH_KEY = click.option(
    "--auth-key-file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
    envvar="ZCMIGRATE_AUTH_KEY_FILE", show_envvar=True,
    help="Shared key (`zcmigrate keygen FILE`): both ends prove they hold it, and every "
    "record and packet is sealed (AES-GCM) under keys of this migration alone.",
)


def read_key(path: Path | None) -> bytes | None:
    """The shared key of --auth-key-file (migrate/keyfile.py), or None without one."""
    if path is None:
        return None
    from zcmigrate.migrate.keyfile import KeyFileError
    from zcmigrate.migrate.keyfile import read_key as read_key_file

    try:
        return read_key_file(path)
    except KeyFileError as e:
        raise click.BadParameter(str(e), param_hint="--auth-key-file") from e


def json_option(help_text: str) -> Callable[[F], F]:
    """`--json` as every command spells it, with its ZCMIGRATE_JSON variable."""
    return click.option("--json", "as_json", is_flag=True, envvar="ZCMIGRATE_JSON",
                        show_envvar=True, help=help_text)


PEER_TIMEOUT = click.option(
    "--peer-timeout", type=click.FloatRange(MIN_PEER_TIMEOUT, MAX_PEER_TIMEOUT),
    default=DEFAULT_PEER_TIMEOUT, show_default=True, envvar="ZCMIGRATE_PEER_TIMEOUT",
    show_envvar=True,
    help="Seconds within which a dead or silent peer is found (TCP keepalive and user "
    "timeout, and a deadline on every wait for the other end). The guest's pause lasts at "
    "most downtime-limit plus this before the source gives up and resumes it.",
)


def migration_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The parameters of a migration, as QEMU names them (`send` and `demo`)."""
    opts = [
        click.option("--multifd-channels", type=click.IntRange(1, 255),
                     default=DEFAULT_CHANNELS, show_default=True,
                     envvar="ZCMIGRATE_MULTIFD_CHANNELS", show_envvar=True,
                     help="Data channels (TCP connections), one worker thread each."),
        click.option("--multifd-zerocopy", type=ONOFF, default="off", show_default=True,
                     envvar="ZCMIGRATE_MULTIFD_ZEROCOPY", show_envvar=True,
                     help="Send page data with MSG_ZEROCOPY (see `zcmigrate check`)."),
        click.option("--max-bandwidth", type=BandwidthType(), default="0",
                     show_default=True, envvar="ZCMIGRATE_MAX_BANDWIDTH", show_envvar=True,
                     help="Bytes per second during precopy, e.g. 512M; 0 = unlimited."),
        click.option("--downtime-limit", type=click.IntRange(1), default=DEFAULT_DOWNTIME_LIMIT_MS,
                     show_default=True, envvar="ZCMIGRATE_DOWNTIME_LIMIT", show_envvar=True,
                     help="Milliseconds the guest may stay paused at the switch-over."),
        click.option("--zero-page-detection", type=click.Choice(["multifd", "none"]),
                     default="multifd", show_default=True,
                     envvar="ZCMIGRATE_ZERO_PAGE_DETECTION", show_envvar=True,
                     help="multifd: zero pages travel as offsets only; none: as data."),
        click.option("--max-iterations", type=click.IntRange(1),
                     default=DEFAULT_MAX_ITERATIONS, show_default=True,
                     envvar="ZCMIGRATE_MAX_ITERATIONS", show_envvar=True,
                     help="Give up (exit 5) if precopy has not converged by then."),
        click.option("--timeout", type=click.FloatRange(0), default=0.0, show_default=True,
                     envvar="ZCMIGRATE_TIMEOUT", show_envvar=True,
                     help="Seconds of precopy before giving up (exit 5); 0 = no limit."),
        click.option("--in-flight-cap", type=SizeType(), default=None,
                     envvar="ZCMIGRATE_IN_FLIGHT_CAP", show_envvar=True,
                     help="Zero-copy bytes in flight per channel [default: automatic, "
                     "inside RLIMIT_MEMLOCK unless CAP_IPC_LOCK is held]."),
        PEER_TIMEOUT,
        click.option("--auto-converge", is_flag=True, envvar="ZCMIGRATE_AUTO_CONVERGE",
                     show_envvar=True,
                     help="Throttle the guest harder each iteration that does not converge "
                     "(QEMU's auto-converge), instead of giving up (exit 5)."),
        click.option("--throttle-initial", type=click.IntRange(1, 99),
                     default=DEFAULT_THROTTLE_INITIAL, show_default=True,
                     envvar="ZCMIGRATE_THROTTLE_INITIAL", show_envvar=True,
                     help="Percent of its time the guest sleeps at the first throttle."),
        click.option("--throttle-increment", type=click.IntRange(1, 99),
                     default=DEFAULT_THROTTLE_INCREMENT, show_default=True,
                     envvar="ZCMIGRATE_THROTTLE_INCREMENT", show_envvar=True,
                     help="Percent added at each further step, up to 99."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def params_from(kw: dict[str, Any]) -> MigrationParameters:
    """MigrationParameters from the values of migration_options; UsageError if invalid."""
    try:
        return MigrationParameters(
            multifd_channels=kw["multifd_channels"],
            multifd_zerocopy=kw["multifd_zerocopy"] == "on",
            max_bandwidth=kw["max_bandwidth"],
            downtime_limit=kw["downtime_limit"],
            zero_page_detection=kw["zero_page_detection"] == "multifd",
            max_iterations=kw["max_iterations"],
            timeout=kw["timeout"],
            in_flight_cap=kw["in_flight_cap"],
            peer_timeout=kw["peer_timeout"],
            auto_converge=kw["auto_converge"],
            throttle_initial=kw["throttle_initial"],
            throttle_increment=kw["throttle_increment"],
        )
    except ParameterError as e:
        raise click.UsageError(str(e)) from e

