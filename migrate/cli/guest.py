"""`zcmigrate guest`: run the guest stand-in on an image (also post-copy, served by a
receiver), check an image against its committed device state, or show its control block.
Options, output and exit codes only; the guest is migrate.guest, and this module knows
nothing of migrations, channels or sockets.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click
from click.core import ParameterSource

from zcmigrate.migrate.cli.types import BandwidthType, SizeType
from zcmigrate.migrate.guest import (
    FILLS,
    GO_TIMEOUT_S,
    DeviceState,
    GuestError,
    PostcopyPhase,
    check_oracle,
    guest_holder,
    read_control_record,
    read_device_state,
    run_guest,
    threads_waiting_for_pages,
)
from zcmigrate.migrate.units import format_rate

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_ORACLE_FAILED = 3


class OracleFailed(click.ClickException):
    exit_code = EXIT_ORACLE_FAILED


def _rate_label(rate: int) -> str:
    # No space inside the value, so that the line splits into key=value words.
    return format_rate(rate).replace(" ", "") if rate else "unlimited"


def _verdict(image: Path) -> tuple[DeviceState, bool]:
    state = read_device_state(image)
    verdict = check_oracle(image, state)
    click.echo(f"oracle: {verdict.message}")
    return state, verdict.ok


@click.command(
    "guest",
    epilog=(
        "\b\nExit codes:\n"
        "  0  the guest exited on request (exit request, SIGTERM, SIGINT), --check passed,\n"
        "     or --status found a control block\n"
        "  1  the image, its control file or its device state is not usable, or a\n"
        "     post-copy start found no receiver or no go (see stderr)\n"
        "  2  bad command line\n"
        "  3  the oracle failed: the image does not match <IMAGE>.state"
    ),
)
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--size",
    type=SizeType(),
    default=None,
    envvar="ZCMIGRATE_GUEST_SIZE",
    show_envvar=True,
    help="Create IMAGE with this size if it does not exist (an existing one must match).",
)
@click.option(
    "--page-size",
    type=SizeType(),
    default="4096",
    show_default=True,
    envvar="ZCMIGRATE_GUEST_PAGE_SIZE",
    show_envvar=True,
    help="Page size; with --resume the device state's page size unless given.",
)
@click.option(
    "--dirty-rate",
    type=BandwidthType(),
    default="64M",
    show_default=True,
    envvar="ZCMIGRATE_DIRTY_RATE",
    show_envvar=True,
    help="Bytes of pages dirtied per second; 0 for as fast as possible.",
)
@click.option(
    "--fill",
    type=click.Choice(FILLS),
    default="random",
    show_default=True,
    envvar="ZCMIGRATE_GUEST_FILL",
    show_envvar=True,
    help="Content of a new image: random pages, zero pages, or half of each.",
)
@click.option(
    "--resume",
    is_flag=True,
    envvar="ZCMIGRATE_GUEST_RESUME",
    show_envvar=True,
    help="Continue from <IMAGE>.state after checking the oracle (on a migration's destination).",
)
@click.option(
    "--check",
    is_flag=True,
    envvar="ZCMIGRATE_GUEST_CHECK",
    show_envvar=True,
    help="Only check IMAGE against <IMAGE>.state and print the verdict.",
)
@click.option(
    "--postcopy",
    "postcopy",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="SOCKET",
    envvar="ZCMIGRATE_GUEST_POSTCOPY",
    show_envvar=True,
    help="Start post-copy: IMAGE (on a tmpfs) may miss pages. Hand its userfaultfd to the "
    "receiver listening on the Unix socket SOCKET, run from the device state it sends, "
    "and wait in the kernel for any missing page the guest touches until it arrives.",
)
@click.option(
    "--go-timeout",
    type=click.FloatRange(min=0.0, min_open=True),
    default=GO_TIMEOUT_S,
    show_default=True,
    envvar="ZCMIGRATE_GUEST_GO_TIMEOUT",
    show_envvar=True,
    help="With --postcopy: seconds to wait for the receiver and its go before giving up "
    "(nothing ran yet). Once running, a missing page is waited for without limit.",
)
@click.option(
    "--status",
    is_flag=True,
    envvar="ZCMIGRATE_GUEST_STATUS",
    show_envvar=True,
    help="Only print what IMAGE.guest says: pid, state, heartbeat age, progress, post-copy.",
)
@click.option(
    "--force",
    is_flag=True,
    envvar="ZCMIGRATE_GUEST_FORCE",
    show_envvar=True,
    help="Start even if IMAGE was handed over to a destination, or its last guest ended "
    "held paused after its device state left (either may make a second copy of the guest).",
)
@click.pass_context
def guest_command(
    ctx: click.Context,
    image: Path,
    size: int | None,
    page_size: int,
    dirty_rate: int,
    fill: str,
    resume: bool,
    check: bool,
    postcopy: Path | None,
    go_timeout: float,
    status: bool,
    force: bool,
) -> None:
    """Run the guest stand-in on IMAGE: increment byte 0 of every page, page after page,
    at the dirty rate, marking each page in the dirty bitmap of IMAGE.guest.

    Prints "guest running: pid=... image=... pages=... dirty-rate=..." once running, and
    a "guest ..." line for what it does by itself: it resumed because the migration
    that paused it died, its throttle changed, it was handed over to a destination, its
    post-copy receiver went away or took over, every page arrived. With --postcopy it
    first prints "guest offered: pid=... image=... socket=..." once the receiver has its
    userfaultfd.
    """
    chosen = [name for name, on in (("--resume", resume), ("--check", check),
                                    ("--postcopy", postcopy is not None),
                                    ("--status", status)) if on]
    if len(chosen) > 1:
        raise click.UsageError(f"{' and '.join(chosen)} exclude each other")
    if postcopy is not None and size is not None:
        raise click.UsageError("--postcopy runs on the image the receiver made: no --size")
    if status:
        _status(image)
        return
    try:
        state: DeviceState | None = None
        if check or resume:
            state, ok = _verdict(image)
            if check:
                ctx.exit(EXIT_OK if ok else EXIT_ORACLE_FAILED)
            if not ok:
                raise OracleFailed(f"refusing to resume: {image} does not match {image}.state")
            if ctx.get_parameter_source("page_size") in (
                ParameterSource.DEFAULT,
                ParameterSource.DEFAULT_MAP,
            ):
                page_size = state.page_size

        def announce() -> None:
            npages = os.stat(image).st_size // page_size
            click.echo(
                f"guest running: pid={os.getpid()} image={image} pages={npages} "
                f"dirty-rate={_rate_label(dirty_rate)}"
            )
            sys.stdout.flush()

        def say(line: str) -> None:
            click.echo(line)
            sys.stdout.flush()

        def offered() -> None:
            click.echo(f"guest offered: pid={os.getpid()} image={image} socket={postcopy}")
            sys.stdout.flush()

        run_guest(
            image,
            dirty_rate=dirty_rate,
            page_size=page_size,
            size=size,
            fill=fill,
            resume=state,
            ready=announce,
            say=say,
            force=force,
            postcopy=postcopy,
            go_timeout=go_timeout,
            offered=offered,
        )
    except GuestError as exc:
        raise click.ClickException(str(exc)) from exc


def _age(ns: int) -> str:
    return f"{(time.monotonic_ns() - ns) / 1e9:.3f}s" if ns else "never"


def _status(image: Path) -> None:
    record = read_control_record(image)
    if record is None:
        raise click.ClickException(f"no guest control block beside {image} (IMAGE.guest)")
    holder = guest_holder(image)
    alive = "yes" if holder is not None else "no"
    words = [
        f"guest: pid={record.pid}",
        f"alive={alive}",
        f"state={record.state.name.lower()}",
        f"heartbeat-age={_age(record.heartbeat_ns)}",
        f"position={record.position}",
        f"value={record.value}",
        f"touched={record.touched}",
        f"lease={record.lease.mode.name.lower()}",
    ]
    pc = record.postcopy
    if pc.phase != PostcopyPhase.NONE:
        words += [
            f"postcopy={pc.phase.name.lower()}",
            f"postcopy-peer={pc.peer}",
            f"postcopy-since={_age(pc.changed_ns)}",
        ]
        waiting = threads_waiting_for_pages(record.pid) if holder is not None else None
        if waiting is not None:
            # Threads asleep in handle_userfault: touched a page that has not arrived.
            words.append(f"waiting-for-pages={waiting}")
    click.echo(" ".join(words))
