"""The zcmigrate command line (click): send, receive, guest, check, status, cancel.

Only argument parsing and wiring; the work lives in the modules it calls.
"""

import click

from migrate.guest_cli import guest_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zcmigrate")
def main() -> None:
    """Live-migrate a running workload's memory over multifd channels."""


main.add_command(guest_command)
