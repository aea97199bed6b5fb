"""`zcmigrate check`: options, output and exit codes around migrate.check.

Parsing and printing only; the facts and the judgement are migrate.check's, and this
module knows nothing of channels, routes or the kernel.
"""

from __future__ import annotations

import json

import click

from zcmigrate.migrate.check import (
    DEFAULT_MULTIFD_CHANNELS,
    EXIT_CHECK_FAILED,
    VERDICT_TABLE,
    run_check,
)
from zcmigrate.migrate.cli.options import json_option
from zcmigrate.migrate.cli.types import SizeType
from zcmigrate.migrate.errors import CheckError
from zcmigrate.migrate.memlock import DEFAULT_PAGES_PER_PACKET
from zcmigrate.multifd.wire import MAX_CHANNELS, MAX_PAGES_ALLOC

_EPILOG = "\b\nExit codes (the most severe finding wins):\n" + "\n".join(
    f"  {code:>2}  {text}" for code, text in VERDICT_TABLE
) + "\n   2  bad command line"


@click.command(
    "check",
    epilog=_EPILOG,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option(
    "--multifd-channels",
    type=click.IntRange(1, MAX_CHANNELS),
    default=DEFAULT_MULTIFD_CHANNELS,
    show_default=True,
    envvar="ZCMIGRATE_MULTIFD_CHANNELS",
    show_envvar=True,
    help="Data channels the migration will use; each pins up to the in-flight cap.",
)
@click.option(
    "--in-flight-cap",
    type=SizeType(),
    default=None,
    envvar="ZCMIGRATE_IN_FLIGHT_CAP",
    show_envvar=True,
    help="Zero-copy bytes in flight per channel, e.g. 4M [default: what `send` chooses: "
    "none with CAP_IPC_LOCK, else 4 MiB shrunk to fit RLIMIT_MEMLOCK].",
)
@click.option(
    "--pages-per-packet",
    type=click.IntRange(1, MAX_PAGES_ALLOC),
    default=DEFAULT_PAGES_PER_PACKET,
    show_default=True,
    envvar="ZCMIGRATE_PAGES_PER_PACKET",
    show_envvar=True,
    help="Pages per multifd packet: one zero-copy call, charged 2 pages of slack.",
)
@click.option(
    "--destination",
    metavar="HOST[:PORT]",
    default=None,
    envvar="ZCMIGRATE_DESTINATION",
    show_envvar=True,
    help="Also check the route to the destination: loopback and veth always copy.",
)
@json_option("Print every fact and the verdict as one JSON object.")
@click.pass_context
def check_command(ctx: click.Context, multifd_channels: int, in_flight_cap: int | None,
                  pages_per_packet: int, destination: str | None, as_json: bool) -> None:
    """Check whether multifd-zerocopy will work on this host, and pay off.

    Reports SO_ZEROCOPY support, RLIMIT_MEMLOCK and CAP_IPC_LOCK against the locked
    memory the configured channels may pin, net.core.optmem_max, and with --destination
    the interface the route leaves by. The last line is the verdict.

    Zero copy is a sending-side feature: run this on the source host, as the user and
    with the limits that `zcmigrate send` will have (docs/operations.md).
    """
    try:
        report = run_check(multifd_channels, in_flight_cap, destination, pages_per_packet)
    except CheckError as e:
        if as_json:
            click.echo(json.dumps({"error": str(e), "code": EXIT_CHECK_FAILED}))
            ctx.exit(EXIT_CHECK_FAILED)
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for line in report.lines():
            click.echo(line)
    ctx.exit(int(report.verdict.verdict))
