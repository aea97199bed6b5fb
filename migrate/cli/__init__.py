"""The zcmigrate command line: the click group `main` and the table of its commands.

A command's module is imported only when that command runs or is listed, so `send` pays
for `send` alone (its start-up is part of every migration's time). One module per
command beside this one; nothing outside migrate/cli/ imports click.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import click

# name -> "module:attribute" of every command.
COMMANDS: Mapping[str, str] = {
    "send": "zcmigrate.migrate.cli.send:send_command",
    "receive": "zcmigrate.migrate.cli.receive:receive_command",
    "guest": "zcmigrate.migrate.cli.guest:guest_command",
    "demo": "zcmigrate.migrate.cli.demo:demo_command",
    "check": "zcmigrate.migrate.cli.check:check_command",
    "status": "zcmigrate.migrate.cli.control:status_command",
    "cancel": "zcmigrate.migrate.cli.control:cancel_command",
    "set": "zcmigrate.migrate.cli.control:set_command",
}


class LazyGroup(click.Group):
    """A click group that imports a command's module on first use (click's documented
    "lazily loading subcommands" pattern); the loaded command is kept in `commands`."""

    def __init__(self, *args: Any, lazy_commands: Mapping[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            module, _, attr = self.lazy_commands[cmd_name].partition(":")
            cmd = getattr(importlib.import_module(module), attr)
            if not isinstance(cmd, click.Command) or cmd.name != cmd_name:
                raise TypeError(f"{self.lazy_commands[cmd_name]} is not the command "
                                f"{cmd_name!r}")
            self.add_command(cmd)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, lazy_commands=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zcmigrate")
def main() -> None:
    """Live-migrate a running workload's memory over multifd channels.

    Start `zcmigrate receive` on the destination, then `zcmigrate send` on the source.
    `zcmigrate demo` does both on this machine with a running guest stand-in.
    """
