"""`zcmigrate resume` and `zcmigrate retire`: settle a guest left held paused after its
device state left, when `send` could not learn whether the destination committed (it
exited 6, or died). Arguments and output only; the logic is migrate/settle.py's, which
the job can call too.
"""

from __future__ import annotations

from pathlib import Path

import click

from zcmigrate import ZcmigrateError
from zcmigrate.migrate.settle import Settled, resume_paused_guest, retire_paused_guest

_EXIT_CODES = """\b
Exit codes:
  0  done (resume: also when the guest was running already)
  1  refused or failed, nothing changed (see the message): a migration owns IMAGE
     (IMAGE.lock; then `zcmigrate cancel IMAGE`), the migration that paused the guest
     still runs, the guest was handed over, or no guest runs on IMAGE
  2  usage error"""

_IMAGE = click.argument("image", type=click.Path(dir_okay=False, path_type=Path),
                        envvar="ZCMIGRATE_IMAGE")


def _report(do: str, image: Path, *, postcopy_never_started: bool = False) -> None:
    try:
        settled: Settled = (
            resume_paused_guest(image, postcopy_never_started=postcopy_never_started)
            if do == "resume" else retire_paused_guest(image))
    except ZcmigrateError as e:
        raise click.ClickException(str(e)) from e
    click.echo(settled.message)


@click.command("resume", epilog=_EXIT_CODES)
@_IMAGE
@click.option("--postcopy-never-started", is_flag=True,
              envvar="ZCMIGRATE_POSTCOPY_NEVER_STARTED", show_envvar=True,
              help="An interrupted post-copy (IMAGE.postcopy-resume) whose destination never "
                   "started the guest: resume it here anyway and drop the record. Check "
                   "first (docs/operations.md, \"Post-copy recovery\"): a guest that runs "
                   "there would then run twice.")
def resume_command(image: Path, postcopy_never_started: bool) -> None:
    """Resume the guest on IMAGE, held paused here after its device state left: the
    destination did NOT commit (QEMU's `cont`).

    Check first: on the destination, `zcmigrate guest --check DEST_IMAGE` must say "no
    device state" (nothing committed), and no guest may run there. If it did commit
    (an oracle verdict), use `zcmigrate retire IMAGE` instead. Refused while a migration owns IMAGE
    (then `zcmigrate cancel IMAGE`).

    After an interrupted post-copy, refused unless --postcopy-never-started: on the
    destination, `zcmigrate receive DEST_IMAGE --resume` says "nothing to take over" and
    `zcmigrate guest --check DEST_IMAGE` finds no device state.
    """
    _report("resume", image, postcopy_never_started=postcopy_never_started)


@click.command("retire", epilog=_EXIT_CODES)
@_IMAGE
def retire_command(image: Path) -> None:
    """Retire the guest on IMAGE, held paused here after its device state left: the
    destination DID commit. Marks IMAGE handed over and makes the paused guest exit;
    its pages stay in IMAGE, nothing is deleted, and `zcmigrate guest IMAGE` refuses to
    start it again without --force.

    Check first: on the destination, `zcmigrate guest --check DEST_IMAGE` gives an oracle
    verdict (a committed device state; the receiver logs the migration's UUID with its
    commit). If it says "no device state", use `zcmigrate resume IMAGE` instead. Refused
    while a migration owns IMAGE (then `zcmigrate cancel IMAGE`).
    """
    _report("retire", image)
