"""The zcmigrate command line: the click group `main` and the table of its commands.

A command's module is imported only when that command runs or is listed, so `send` pays
for `send` alone (its start-up is part of every migration's time). One module per
command beside this one; nothing outside migrate/cli/ imports click.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from collections.abc import Mapping
from types import ModuleType
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
    "resume": "zcmigrate.migrate.cli.settle:resume_command",
    "retire": "zcmigrate.migrate.cli.settle:retire_command",
    "keygen": "zcmigrate.migrate.cli.keygen:keygen_command",
}


# ModuleType by name, not `import types`: once migrate/cli/types.py is imported, this
# package's global `types` is that submodule.
class _DeferredModule(ModuleType):
    """A module whose code runs on the first lookup of a name it does not have yet.

    Its metadata (__spec__, __path__) is there from the start, so `import` statements and
    submodule imports find it without loading it; the first real use (asyncio.run, ...)
    runs the module in this same object, and from then on it is an ordinary module.
    """

    def __getattr__(self, name: str) -> Any:
        # A thread arriving while another runs the module waits for it; a lookup by the
        # module's own code while it runs is an ordinary miss.
        with _LOADING:
            if type(self) is _DeferredModule and not self.__dict__.get(_RUNNING):
                spec = self.__spec__
                assert spec is not None and spec.loader is not None
                self.__dict__[_RUNNING] = True
                try:
                    spec.loader.exec_module(self)
                finally:
                    del self.__dict__[_RUNNING]
                self.__class__ = ModuleType  # type: ignore[assignment]
            elif type(self) is _DeferredModule:
                raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        return getattr(self, name)


_LOADING = threading.RLock()
_RUNNING = "__zcmigrate_deferred_running__"


def _defer_asyncio() -> None:
    """Put asyncio in sys.modules without running it, until something uses it.

    `import structlog` imports structlog.stdlib and structlog._native, which import
    asyncio for their async methods only; zcmigrate calls none of them, yet asyncio and
    what it pulls in (ssl, subprocess, concurrent.futures) cost `send` 40-60 ms of CPU,
    a third of its start-up. The stdlib's LazyLoader would not do: the `import asyncio`
    in structlog reads the module's __spec__, and that alone makes it load.
    """
    if "asyncio" in sys.modules:
        return
    spec = importlib.util.find_spec("asyncio")
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    module.__class__ = _DeferredModule
    sys.modules["asyncio"] = module


_defer_asyncio()


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
