"""`zcmigrate keygen FILE`: write a new shared key for `send` and `receive`.

Output and exit codes only; the key file's format and permissions are migrate/keyfile.py's.
"""

from __future__ import annotations

from pathlib import Path

import click

from zcmigrate.migrate.keyfile import KeyFileError, keygen


@click.command("keygen", epilog="""\b
Exit codes:
  0  the key was written
  2  FILE exists or cannot be created (nothing was written)""")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def keygen_command(file: Path) -> None:
    """Write a new key to FILE (mode 0600; an existing file is never overwritten).

    Give the same file to both ends (--auth-key-file, or ZCMIGRATE_AUTH_KEY_FILE in the
    service's environment file): each proves to the other that it holds the key, and the
    migration is sealed under keys derived from it. docs/security.md says how to carry it
    to the other host.
    """
    try:
        keygen(file)
    except KeyFileError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"key written to {file} (mode 0600); give the same file to both ends")
