"""Options, parameter parsing and the run loop shared by `send` and `demo`.

Click plumbing only: no migration logic lives here.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from zcmigrate.migrate.cli_types import BandwidthType, SizeType
from zcmigrate.migrate.errors import MigrationError, ParameterError
from zcmigrate.migrate.params import (
    DEFAULT_CHANNELS,
    DEFAULT_DOWNTIME_LIMIT_MS,
    DEFAULT_MAX_ITERATIONS,
    MigrationParameters,
)
from zcmigrate.migrate.progress import ProgressDisplay
from zcmigrate.migrate.source import SourceJob
from zcmigrate.migrate.stats import MigrationStats

EXIT_CODES = """\b
Exit codes:
  0  completed (the destination committed)
  1  failed; the source guest was resumed, the destination discarded everything
  2  usage error
  4  cancelled (Ctrl-C or SIGTERM, or `zcmigrate cancel`)
  5  cannot converge (dirty rate too high for max-bandwidth and downtime-limit)
  6  outcome unknown: the device state left but no commit came back; the guest
     stays paused at the source (see the message)"""


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
    help="Shared secret: the receiver accepts only sources that hold the same key.",
)


def read_key(path: Path | None) -> bytes | None:
    if path is None:
        return None
    key = path.read_bytes().strip()
    if len(key) < 16:
        raise click.BadParameter(f"{path}: a key must have at least 16 bytes",
                                 param_hint="--auth-key-file")
    return key




def migration_options(f: Callable[..., Any]) -> Callable[..., Any]:
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
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def params_from(kw: dict[str, Any]) -> MigrationParameters:
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
        )
    except ParameterError as e:
        raise click.UsageError(str(e)) from e


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


